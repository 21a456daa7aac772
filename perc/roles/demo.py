"""``perc demo``: start what exists of perc on loopback, show it working, say what is missing.

Temporary form until the conference issue lands the whole system. It makes throwaway
identities and config files in a temporary folder, starts ``perc kmf`` and ``perc mdd`` as
subprocesses through the CLI (the same commands a user runs), waits until the MDD logs that
its tunnel to the KMF is up, sends one DTLS-looking datagram from a stand-in endpoint to the
MDD and waits until the KMF logs that it arrived through the tunnel, then stops both with
SIGTERM. Exit status 0 only if every step worked and both processes exited 0.
"""

from __future__ import annotations

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
  - KMF: TLS 1.3 tunnel server; requires the MDD's certificate and pins it by fingerprint.
  - MDD: one tunnel per conference to the KMF (pinned by fingerprint), RFC 9185 messages,
    reconnects with backoff; UDP port per conference; DTLS from endpoints relayed to the
    KMF as TunneledDtls and back; idle endpoints reported with EndpointDisconnect.
Not yet (later issues):
  - the KMF's DTLS-SRTP engine (it only logs and counts tunneled DTLS today),
  - endpoints, MediaKeys delivery, SRTP forwarding at the MDD, double encryption and EKT,
  - a whole conference on loopback (this command will grow into that)."""


@attrs.frozen
class DemoFiles:
    folder: Path
    kmf_config: Path
    mdd_config: Path
    kmf_port: int
    mdd_port: int


def _free_port(kind: socket.SocketKind) -> int:
    # Bind port 0, read the port, close: a small race, acceptable for a loopback demo.
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_demo_files(folder: Path) -> DemoFiles:
    """Identities (kmf, mdd, alice) and kmf.toml / mdd.toml for one loopback conference."""
    kmf_id = identity.generate("kmf")
    mdd_id = identity.generate("mdd")
    alice = identity.generate("alice")
    for name, ident in (("kmf", kmf_id), ("mdd", mdd_id), ("alice", alice)):
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
participants = ["{alice.fingerprint}"]
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
    return DemoFiles(folder, kmf_toml, mdd_toml, kmf_port, mdd_port)


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
        with trio.move_on_after(_STEP_TIMEOUT):
            while not any(text in line for line in self.lines):
                if self.process.returncode is not None:
                    return False
                await self._changed.wait()
            return True
        return False


async def _start(nursery: trio.Nursery, name: str, config: Path) -> _Child:
    cmd = [sys.executable, "-m", "perc", "--log-level", "info", name, "--config", str(config)]
    process = await trio.lowlevel.open_process(cmd, stderr=subprocess.PIPE)
    child = _Child(name, process)
    nursery.start_soon(child.pump)
    return child


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
        kmf = await _start(nursery, "kmf", files.kmf_config)
        children = [kmf]
        try:
            if not await kmf.wait_for("KMF listening"):
                _say("FAILED: the KMF did not start")
                return False
            mdd = await _start(nursery, "mdd", files.mdd_config)
            children.append(mdd)
            if not await mdd.wait_for("tunnel up"):
                _say("FAILED: the MDD's tunnel to the KMF did not come up")
                return False
            _say(f"OK: tunnel up between MDD and KMF (127.0.0.1:{files.kmf_port}, TLS 1.3, pinned)")
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as endpoint:
                # First byte 22: a DTLS handshake record, which the MDD relays to the KMF.
                endpoint.sendto(
                    bytes.fromhex("16fefd0000000000000000000100"), ("127.0.0.1", files.mdd_port)
                )
            if not await kmf.wait_for("association seen"):
                _say("FAILED: a DTLS datagram sent to the MDD did not reach the KMF")
                return False
            _say(
                f"OK: a DTLS datagram sent to the MDD (udp 127.0.0.1:{files.mdd_port}) "
                "reached the KMF through the tunnel"
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


def main() -> int:
    """Run the demo; 0 if everything worked."""
    _say("perc demo: starting a KMF and an MDD on loopback (throwaway identities)")
    with tempfile.TemporaryDirectory(prefix="perc-demo-") as tmp:
        files = make_demo_files(Path(tmp))
        _say(f"files in {tmp}: kmf.toml mdd.toml kmf/mdd/alice .crt/.key")
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
