"""``perc demo``: start what exists of perc on loopback, show it working, say what is missing.

Temporary form until the conference issue lands the whole system. It makes throwaway
identities and config files in a temporary folder, starts ``perc kmf`` and ``perc mdd`` as
subprocesses through the CLI (the same commands a user runs) and waits until the MDD logs that
its tunnel to the KMF is up. Then two ``perc endpoint`` processes (alice and bob) join the
conference through the MDD: each runs DTLS-SRTP with the KMF through the tunnel and gets the
conference's EKTKey, while the MDD gets their hop-by-hop keys (MediaKeys). The demo checks in
the logs that both joined with the same EKTKey (SPI and key digest) and that the MDD installed
keys for both, stops the endpoints with SIGTERM (close_notify: the KMF ends the associations
and tells the MDD, EndpointDisconnect), then stops the MDD and the KMF. Exit status 0 only if
every step worked and every process exited 0.
"""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import attrs
import trio

from perc import identity

__all__ = ["DemoFiles", "main", "make_demo_files"]

_STEP_TIMEOUT = 20.0

_EXISTS = """\
What runs now:
  - KMF: TLS 1.3 tunnel server; requires the MDD's certificate and pins it by fingerprint;
    one DTLS-SRTP server per endpoint association (cookies, roster, DOUBLE profiles, EKT):
    MediaKeys (hop-by-hop halves only) to the MDD, the conference's EKTKey to the endpoint.
  - MDD: one tunnel per conference to the KMF (pinned by fingerprint), RFC 9185 messages,
    reconnects with backoff; UDP port per conference; DTLS from endpoints relayed to the
    KMF as TunneledDtls and back; MediaKeys stored; idle endpoints reported with
    EndpointDisconnect.
  - endpoint: joins through the MDD (KMF pinned by fingerprint), holds its hop-by-hop keys
    and the EKTKey, leaves with close_notify.
Not yet (later issues):
  - media: SRTP forwarding at the MDD, double encryption and EKT tags at the endpoints,
  - rekeying on join/leave, a whole conference with media on loopback."""


@attrs.frozen
class DemoFiles:
    folder: Path
    kmf_config: Path
    mdd_config: Path
    kmf_port: int
    mdd_port: int
    kmf_fingerprint: str = ""


def _free_port(kind: socket.SocketKind) -> int:
    # Bind port 0, read the port, close: a small race, acceptable for a loopback demo.
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_demo_files(folder: Path) -> DemoFiles:
    """Identities (kmf, mdd, alice, bob) and kmf.toml / mdd.toml for one loopback conference."""
    kmf_id = identity.generate("kmf")
    mdd_id = identity.generate("mdd")
    alice = identity.generate("alice")
    bob = identity.generate("bob")
    for name, ident in (("kmf", kmf_id), ("mdd", mdd_id), ("alice", alice), ("bob", bob)):
        identity.write(ident, folder, name)
    kmf_port = _free_port(socket.SOCK_STREAM)
    mdd_port = _free_port(socket.SOCK_DGRAM)
    kmf_toml = folder / "kmf.toml"
    kmf_toml.write_text(
        f"""[kmf]
listen = "127.0.0.1:{kmf_port}"
cert = "kmf.crt"
key = "kmf.key"
trusted_mdds = ["{mdd_id.fingerprint}"]

[[conference]]
id = "demo"
participants = ["{alice.fingerprint}", "{bob.fingerprint}"]
"""
    )
    mdd_toml = folder / "mdd.toml"
    mdd_toml.write_text(
        f"""[mdd]
cert = "mdd.crt"
key = "mdd.key"

[[conference]]
id = "demo"
listen = "127.0.0.1:{mdd_port}"
kmf = "127.0.0.1:{kmf_port}"
kmf_fingerprint = "{kmf_id.fingerprint}"
"""
    )
    return DemoFiles(folder, kmf_toml, mdd_toml, kmf_port, mdd_port, kmf_id.fingerprint)


class _Child:
    """A perc subprocess whose stderr is echoed with a prefix and searchable."""

    def __init__(self, name: str, process: trio.Process) -> None:
        self.name = name
        self.process = process
        self.lines: list[str] = []
        self._changed = trio.Event()

    async def pump(self) -> None:
        stream = self.process.stderr
        if stream is None:
            return
        pending = b""
        async for chunk in stream:
            pending += chunk
            *complete, pending = pending.split(b"\n")
            for raw in complete:
                line = raw.decode(errors="replace")
                self.lines.append(line)
                print(f"  [{self.name}] {line}", file=sys.stderr, flush=True)
            self._changed.set()
            self._changed = trio.Event()

    async def wait_for(self, text: str) -> bool:
        return await self.line_with(text) is not None

    async def line_with(self, text: str) -> str | None:
        """The first log line containing ``text``; None if the process ended or time ran out."""
        with trio.move_on_after(_STEP_TIMEOUT):
            while True:
                for line in self.lines:
                    if text in line:
                        return line
                if self.process.returncode is not None:
                    return None
                await self._changed.wait()
        return None


async def _start(nursery: trio.Nursery, name: str, args: list[str]) -> _Child:
    cmd = [sys.executable, "-m", "perc", "--log-level", "info", *args]
    process = await trio.lowlevel.open_process(cmd, stderr=subprocess.PIPE)
    child = _Child(name, process)
    nursery.start_soon(child.pump)
    return child


def _fields(line: str) -> dict[str, str]:
    """The ``key=value`` fields of a log line."""
    return dict(re.findall(r"(\w+)=(\S+)", line))


async def _stop(child: _Child) -> int:
    if child.process.returncode is None:
        child.process.send_signal(signal.SIGTERM)
    with trio.move_on_after(_STEP_TIMEOUT):
        return await child.process.wait()
    child.process.kill()
    await child.process.wait()
    return -1


def _say(text: str) -> None:
    print(text, flush=True)


async def _run(files: DemoFiles) -> bool:
    ok = True
    async with trio.open_nursery() as nursery:
        kmf = await _start(nursery, "kmf", ["kmf", "--config", str(files.kmf_config)])
        children = [kmf]
        try:
            if not await kmf.wait_for("KMF listening"):
                _say("FAILED: the KMF did not start")
                return False
            mdd = await _start(nursery, "mdd", ["mdd", "--config", str(files.mdd_config)])
            children.append(mdd)
            if not await mdd.wait_for("tunnel up"):
                _say("FAILED: the MDD's tunnel to the KMF did not come up")
                return False
            _say(f"OK: tunnel up between MDD and KMF (127.0.0.1:{files.kmf_port}, TLS 1.3, pinned)")
            endpoints = [await _start_endpoint(nursery, files, name) for name in ("alice", "bob")]
            children += endpoints
            if not await _joins(files, kmf, mdd, endpoints):
                return False
            for child in endpoints:
                children.remove(child)
                code = await _stop(child)
                if code != 0:
                    _say(f"FAILED: perc endpoint {child.name} exited with status {code}")
                    return False
            for child in endpoints:
                if not await _left(mdd, child):
                    _say(f"FAILED: the MDD was not told that {child.name} left")
                    return False
            _say(
                "OK: alice and bob left with close_notify (SIGTERM, exit 0); the KMF ended "
                "their associations and told the MDD (EndpointDisconnect)"
            )
        finally:
            for child in reversed(children):
                code = await _stop(child)
                if code != 0:
                    _say(f"FAILED: perc {child.name} exited with status {code}")
                    ok = False
                else:
                    _say(f"OK: perc {child.name} stopped cleanly on SIGTERM")
    return ok


async def _start_endpoint(nursery: trio.Nursery, files: DemoFiles, name: str) -> _Child:
    args = [
        "endpoint",
        "--mdd", f"127.0.0.1:{files.mdd_port}",
        "--cert", str(files.folder / f"{name}.crt"),
        "--key", str(files.folder / f"{name}.key"),
        "--kmf-fingerprint", files.kmf_fingerprint,
    ]  # fmt: skip
    return await _start(nursery, name, args)


async def _joins(files: DemoFiles, kmf: _Child, mdd: _Child, endpoints: list[_Child]) -> bool:
    """Both endpoints joined, hold the KMF's EKTKey, and the MDD has both their MediaKeys."""
    joined: dict[str, dict[str, str]] = {}
    for child in endpoints:
        line = await child.line_with(f"joined name={child.name} ")
        if line is None:
            _say(f"FAILED: {child.name} did not join")
            return False
        f = joined[child.name] = _fields(line)
        _say(
            f"OK: {child.name}'s DTLS reached the KMF through the tunnel (udp "
            f"127.0.0.1:{files.mdd_port}) and {child.name} joined in {f.get('join_ms')} ms: "
            f"{f.get('profile')}, EKTKey SPI {f.get('spi')} ({f.get('ekt_cipher')}, "
            f"digest {f.get('ekt_key')}), hop-by-hop keys digest {f.get('hbh_keys')}"
        )
    key = await _same_ektkey(kmf, endpoints)
    if key is None:
        _say("FAILED: alice and bob do not hold the KMF's current conference EKTKey")
        return False
    for name, f in joined.items():
        line = await mdd.line_with(f"keys={f.get('hbh_keys')}")
        if line is None or f"peer={f.get('local')} " not in line:
            _say(f"FAILED: the MDD did not install {name}'s hop-by-hop keys")
            return False
    _say(
        f"OK: alice and bob hold the conference's EKTKey (SPI {key[0]}, digest {key[1]}, as the "
        "KMF logged it); the MDD installed exactly their hop-by-hop keys (same digests; the "
        "EKTKey never reaches it)"
    )
    return True


def _latest_key(child: _Child) -> tuple[str | None, str | None]:
    """(SPI, key digest) of the last EKTKey an endpoint logged (joined, or a later rekey)."""
    lines = [x for x in child.lines if "joined name=" in x or "ektkey name=" in x]
    f = _fields(lines[-1]) if lines else {}
    return f.get("spi"), f.get("ekt_key")


async def _same_ektkey(kmf: _Child, endpoints: list[_Child]) -> tuple[str, str] | None:
    """The KMF's latest conference key once every endpoint holds it (a rekey may be running)."""
    with trio.move_on_after(_STEP_TIMEOUT):
        while True:
            made = [_fields(x) for x in kmf.lines if "ektkey conference=demo " in x]
            if made:
                want = (made[-1].get("spi", ""), made[-1].get("key", ""))
                if {_latest_key(c) for c in endpoints} == {want}:
                    return want
            await trio.sleep(0.05)
    return None


async def _left(mdd: _Child, child: _Child) -> bool:
    """The MDD heard from the KMF that ``child``'s association ended."""
    joining = next((x for x in child.lines if "joining name=" in x), "")
    peer = f"peer={_fields(joining).get('local')}"
    aid = next(
        (
            _fields(x).get("association")
            for x in mdd.lines
            if "association new" in x and f"{peer} " in f"{x} "
        ),
        None,
    )
    if aid is None:
        return False
    return await mdd.wait_for(f"association ended by KMF conference=demo association={aid}")


def main() -> int:
    """Run the demo; 0 if everything worked."""
    _say("perc demo: starting a KMF, an MDD and two endpoints on loopback (throwaway identities)")
    with tempfile.TemporaryDirectory(prefix="perc-demo-") as tmp:
        files = make_demo_files(Path(tmp))
        _say(f"files in {tmp}: kmf.toml mdd.toml kmf/mdd/alice/bob .crt/.key")
        try:
            ok = trio.run(_run, files)
        except KeyboardInterrupt:
            _say("interrupted")
            return 130
    _say("")
    _say(_EXISTS)
    _say("")
    _say("demo result: " + ("all steps worked" if ok else "FAILED (see above)"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
