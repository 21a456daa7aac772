"""Whole-system fixtures: real ``perc kmf|mdd|endpoint`` processes on loopback.

:class:`System` (fixture ``system``) makes throwaway identities and TOML configs in
``tmp_path``, starts ``python -m perc ...`` subprocesses with their stderr (the log) captured
through the one process harness (:class:`tests.procs.Proc`: typed events and log lines,
event-driven waits), and at the end of the test kills whatever is still running and waits for
it, so no process outlives its test. Every process runs with ``--log-level debug`` and
``--log-format json``.

Ports: the KMF and MDD configs use port 0 and the tests read the bound ports from the
processes' ``listening`` events, so parallel runs never collide.
"""

from __future__ import annotations

import signal
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from pathlib import Path

import pytest
import trio

from perc import identity
from perc.events import Event, Listening, MddTunnelUp
from perc.identity import Identity
from tests.procs import WAIT, Proc

__all__ = ["LOCAL", "WAIT", "Proc", "System"]

LOCAL = "127.0.0.1"


class System:
    """Identities, configs and processes of one test (see the module docstring)."""

    def __init__(self, nursery: trio.Nursery, folder: Path) -> None:
        self.nursery = nursery
        self.folder = folder
        self.procs: list[Proc] = []
        self.ids: dict[str, Identity] = {}
        self.keylog = folder / "keys.log"

    # --- files ---------------------------------------------------------------------------------

    def identity(self, name: str) -> Identity:
        if name not in self.ids:
            ident = identity.generate(name)
            identity.write(ident, self.folder, name)
            self.ids[name] = ident
        return self.ids[name]

    def fingerprint(self, name: str) -> str:
        return self.identity(name).fingerprint

    def kmf_config(
        self,
        name: str = "kmf",
        *,
        trusted_mdds: Sequence[str] = ("mdd",),
        conferences: Mapping[str, Sequence[str]] | None = None,
        conference_extra: str = "",
        kmf_extra: str = "",
    ) -> Path:
        """``conferences``: id -> participant identity names (default: demo -> alice)."""
        self.identity(name)
        confs = conferences if conferences is not None else {"demo": ["alice"]}
        text = (
            f'[kmf]\nlisten = "{LOCAL}:0"\ncert = "{name}.crt"\nkey = "{name}.key"\n'
            f"trusted_mdds = {_toml_list(self.fingerprint(m) for m in trusted_mdds)}\n{kmf_extra}"
        )
        for cid, people in confs.items():
            text += (
                f'\n[[conference]]\nid = "{cid}"\n'
                f"participants = {_toml_list(self.fingerprint(p) for p in people)}\n"
                f"{conference_extra}"
            )
        path = self.folder / f"{name}.toml"
        path.write_text(text)
        return path

    def mdd_config(
        self,
        name: str,
        kmf_port: int,
        *,
        kmf: str = "kmf",
        conference: str = "demo",
        idle_timeout: float = 10.0,
        mdd_extra: str = "",
        conference_extra: str = "",
    ) -> Path:
        """``mdd_extra``/``conference_extra``: more TOML lines for [mdd] / [[conference]]."""
        self.identity(name)
        text = (
            f'[mdd]\ncert = "{name}.crt"\nkey = "{name}.key"\nidle_timeout = {idle_timeout}\n'
            f"reconnect_min = 0.1\nreconnect_max = 1.0\n{mdd_extra}"
            f'\n[[conference]]\nid = "{conference}"\nlisten = "{LOCAL}:0"\n'
            f'kmf = "{LOCAL}:{kmf_port}"\nkmf_fingerprint = "{self.fingerprint(kmf)}"\n'
            f"{conference_extra}"
        )
        path = self.folder / f"{name}.toml"
        path.write_text(text)
        return path

    # --- processes -----------------------------------------------------------------------------

    async def start(
        self, name: str, *args: str, env: Mapping[str, str] | None = None, debug: bool = True
    ) -> Proc:
        proc = await Proc.start(self.nursery, name, *args, cwd=self.folder, env=env, debug=debug)
        self.procs.append(proc)
        return proc

    async def start_kmf(
        self, config: Path, *, env: Mapping[str, str] | None = None
    ) -> tuple[Proc, int]:
        """Start a KMF; returns it and its bound tunnel port, once it listens."""
        kmf = await self.start(config.stem, "kmf", "--config", str(config), env=env)
        listening = await kmf.wait_event(Listening, what="tunnel")
        return kmf, listening.port

    async def start_mdd(
        self,
        config: Path,
        *,
        wait_tunnel: bool = True,
        env: Mapping[str, str] | None = None,
    ) -> tuple[Proc, int]:
        """Start an MDD; returns it and its (first) conference's UDP port, once its tunnel
        is up (by default)."""
        mdd = await self.start(config.stem, "mdd", "--config", str(config), env=env)
        listening = await mdd.wait_event(Listening, what="conference")
        if wait_tunnel:
            await mdd.wait_event(MddTunnelUp, conference=listening.conference)
        return mdd, listening.port

    async def start_endpoint(
        self,
        name: str,
        mdd_port: int,
        *extra: str,
        kmf: str = "kmf",
        kmf_fingerprint: str | None = None,
        env: Mapping[str, str] | None = None,
    ) -> Proc:
        self.identity(name)
        fp = kmf_fingerprint if kmf_fingerprint is not None else self.fingerprint(kmf)
        return await self.start(
            name,
            "endpoint",
            "--mdd", f"{LOCAL}:{mdd_port}",
            "--cert", f"{name}.crt",
            "--key", f"{name}.key",
            "--kmf-fingerprint", fp,
            *extra,
            env=env,
        )  # fmt: skip

    async def stop(self, proc: Proc, signum: int = signal.SIGTERM) -> int:
        proc.signal(signum)
        return await proc.wait_exit()

    async def aclose(self) -> None:
        """Kill every process still running and reap them all (no process outlives a test)."""
        for proc in self.procs:
            await proc.kill_and_reap()


def _toml_list(items: Iterable[str]) -> str:
    return "[" + ", ".join(f'"{i}"' for i in items) + "]"


@pytest.fixture
async def system(tmp_path: Path) -> AsyncIterator[System]:
    async with trio.open_nursery() as nursery:
        sys_ = System(nursery, tmp_path)
        try:
            yield sys_
        finally:
            with trio.CancelScope(shield=True):
                await sys_.aclose()
            nursery.cancel_scope.cancel()


async def any_event(seen: Iterable[tuple[Proc, int]], timeout: float = 3 * WAIT) -> None:
    """Until one of the processes has logged more events than counted in ``seen`` (counted
    before the caller looked at them: an event logged meanwhile ends the wait at once)."""
    async with trio.open_nursery() as nursery:
        for proc, count in seen:

            async def one(proc: Proc = proc, count: int = count) -> None:
                await proc.wait_event(Event, timeout, count=count + 1)
                nursery.cancel_scope.cancel()

            nursery.start_soon(one)
