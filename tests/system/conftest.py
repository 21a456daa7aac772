"""Whole-system fixtures: real ``perc kmf|mdd|endpoint`` processes on loopback.

:class:`System` (fixture ``system``) makes throwaway identities and TOML configs in
``tmp_path``, starts ``python -m perc ...`` subprocesses with their stderr (the log) captured
line by line, waits for log lines (event-driven: each new chunk of output wakes the waiter; no
polling, no sleeps), and at the end of the test kills whatever is still running and waits for
it, so no process outlives its test. Every process runs with ``--log-level debug``.

Ports: the KMF and MDD configs use port 0 and the tests read the bound ports from the
processes' "listening" log lines, so parallel runs never collide.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from pathlib import Path

import pytest
import trio

from perc import identity
from perc.identity import Identity

#: Upper bound on any single wait for a log line (a hang fails the test instead of the suite).
WAIT = 20.0
LOCAL = "127.0.0.1"


class Proc:
    """One perc subprocess and its captured log (stderr) and stdout."""

    def __init__(self, name: str, process: trio.Process) -> None:
        self.name = name
        self.process = process
        self.lines: list[str] = []
        self.stdout = ""
        self._partial = b""
        self._changed = trio.Event()
        self._eof = False

    async def pump_stderr(self) -> None:
        stream = self.process.stderr
        assert stream is not None
        async for chunk in stream:
            *complete, self._partial = (self._partial + chunk).split(b"\n")
            self.lines += [raw.decode(errors="replace") for raw in complete]
            self._wake()
        if self._partial:
            self.lines.append(self._partial.decode(errors="replace"))
        self._eof = True
        self._wake()

    async def pump_stdout(self) -> None:
        stream = self.process.stdout
        if stream is None:
            return
        async for chunk in stream:
            self.stdout += chunk.decode(errors="replace")

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    @property
    def text(self) -> str:
        return "\n".join(self.lines)

    def find(self, pattern: str) -> list[re.Match[str]]:
        """Every match of ``pattern`` (a regex) in the log, one per line, in order."""
        rx = re.compile(pattern)
        return [m for line in self.lines if (m := rx.search(line)) is not None]

    async def wait_for(self, pattern: str, timeout: float = WAIT, count: int = 1) -> re.Match[str]:
        """The ``count``-th line matching ``pattern``; fails if the process exits first."""
        with trio.fail_after(timeout):
            while True:
                found = self.find(pattern)
                if len(found) >= count:
                    return found[count - 1]
                if self._eof:
                    raise AssertionError(
                        f"perc {self.name} ended (status {self.process.returncode}) before "
                        f"logging {pattern!r}:\n{self.text}"
                    )
                await self._changed.wait()

    async def wait_exit(self, timeout: float = WAIT) -> int:
        with trio.fail_after(timeout):
            code = await self.process.wait()
            while not self._eof:
                await self._changed.wait()
            return code

    def signal(self, signum: int) -> None:
        if self.process.returncode is None:
            self.process.send_signal(signum)

    @property
    def error_line(self) -> str:
        """The last ``perc: error:`` line (what a user sees when the process fails)."""
        errors = [line for line in self.lines if line.startswith("perc: error: ")]
        return errors[-1] if errors else ""


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
        cmd = [sys.executable, "-m", "perc"]
        if debug:
            cmd += ["--log-level", "debug"]
        environ = dict(os.environ)
        environ.pop("SSLKEYLOGFILE", None)
        environ.update(env or {})
        process = await trio.lowlevel.open_process(
            [*cmd, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=self.folder,
            env=environ,
        )
        proc = Proc(name, process)
        self.procs.append(proc)
        self.nursery.start_soon(proc.pump_stderr)
        self.nursery.start_soon(proc.pump_stdout)
        return proc

    async def start_kmf(
        self, config: Path, *, env: Mapping[str, str] | None = None
    ) -> tuple[Proc, int]:
        """Start a KMF; returns it and its bound tunnel port, once it listens."""
        kmf = await self.start(config.stem, "kmf", "--config", str(config), env=env)
        m = await kmf.wait_for(r"KMF listening on [\d.]+:(\d+)")
        return kmf, int(m.group(1))

    async def start_mdd(self, config: Path, *, wait_tunnel: bool = True) -> tuple[Proc, int]:
        """Start an MDD; returns it and its UDP port (once its tunnel is up, by default)."""
        mdd = await self.start(config.stem, "mdd", "--config", str(config))
        m = await mdd.wait_for(r"listening on udp [\d.]+:(\d+)")
        if wait_tunnel:
            await mdd.wait_for(r"tunnel up conference=")
        return mdd, int(m.group(1))

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
            if proc.process.returncode is None:
                proc.process.kill()
        with trio.move_on_after(WAIT):
            for proc in self.procs:
                await proc.process.wait()


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
