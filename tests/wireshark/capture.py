"""Capture a small real conference on loopback for the dissector tests (dumpcap, as root)."""

from __future__ import annotations

import shutil
import signal
import subprocess
from pathlib import Path

import attrs
import trio

from perc.events import EndpointJoined, MddCounters
from perc.roles.tunnel import TunnelConnection
from perc.wire.tunnel import SupportedProfiles, UnsupportedVersion
from tests.roles.helpers import open_raw_tunnel
from tests.system.conftest import LOCAL, WAIT, Proc, System


def require(tool: str) -> str:
    """The tool's path; a missing one fails (never skips) with what to install."""
    path = shutil.which(tool)
    assert path is not None, (
        f"{tool} is not installed: the Wireshark dissector tests need the Debian packages "
        "tshark and wireshark-common (apt-get install tshark), as dev.sh installs them"
    )
    return path


@attrs.define
class Capture:
    pcap: Path
    keylog: Path
    kmf_port: int
    mdd_port: int
    kmf: Proc
    mdd: Proc


async def start_dumpcap(nursery: trio.Nursery, pcap: Path, bpf: str) -> trio.Process:
    """dumpcap on lo, started once it says it is capturing (so nothing is missed)."""
    proc = await trio.lowlevel.open_process(
        [require("dumpcap"), "-q", "-i", "lo", "-f", bpf, "-w", str(pcap)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    assert proc.stderr is not None
    seen = b""
    with trio.fail_after(WAIT):
        async for chunk in proc.stderr:
            seen += chunk
            if b"Capturing on" in seen:
                break
        else:
            raise AssertionError(f"dumpcap did not start: {seen.decode(errors='replace')}")
    stderr = proc.stderr

    async def drain() -> None:
        async for _ in stderr:
            pass

    nursery.start_soon(drain)
    return proc


async def stop_dumpcap(proc: trio.Process) -> None:
    proc.send_signal(signal.SIGTERM)
    with trio.fail_after(WAIT):
        code = await proc.wait()
    assert code == 0, f"dumpcap exited with {code}"


async def capture_conference(system: System, nursery: trio.Nursery) -> Capture:
    """KMF, MDD and two endpoints with SSLKEYLOGFILE, plus one tunnel that asks for version 1
    (so the KMF answers UnsupportedVersion, which a real MDD never provokes)."""
    keylog = system.folder / "keys.log"
    env = {"SSLKEYLOGFILE": str(keylog)}
    pcap = system.folder / "conference.pcapng"
    kmf_config = system.kmf_config(
        conferences={"demo": ["alice", "bob"]}, conference_extra="rekey_window = 0.05\n"
    )
    kmf, kmf_port = await system.start_kmf(kmf_config, env=env)
    # The KMF's port is known now and nothing has connected yet; the MDD's UDP port is not
    # known until it runs, so every loopback UDP datagram is captured and tshark filters.
    dumpcap = await start_dumpcap(nursery, pcap, f"tcp port {kmf_port} or udp")
    try:
        mdd, mdd_port = await system.start_mdd(system.mdd_config("mdd", kmf_port), env=env)

        # A raw tunnel asking for version 1 gets UnsupportedVersion (a real MDD never asks);
        # the KMF logs this connection's secrets too.
        raw = await open_raw_tunnel(
            (LOCAL, kmf_port), system.identity("mdd"), system.fingerprint("kmf")
        )

        async def session(conn: TunnelConnection) -> None:
            conn.send(SupportedProfiles(version=1, protection_profiles=(0x0009,)))
            with trio.fail_after(WAIT):
                assert isinstance((await conn.receive_messages())[0], UnsupportedVersion)

        await raw.run(session)

        people = []
        for name in ("alice", "bob"):
            people.append(
                await system.start_endpoint(
                    name, mdd_port, "--duration", "1.2", "--join-timeout", "20", env=env
                )
            )
            await people[-1].wait_event(EndpointJoined, name=name)
        for proc in people:
            with trio.fail_after(WAIT):
                assert await proc.wait_exit() == 0, proc.text
        # both associations' final counters: the KMF's EndpointDisconnect is in the capture
        await mdd.wait_event(MddCounters, count=2, final=True)
    finally:
        await stop_dumpcap(dumpcap)
    return Capture(pcap, keylog, kmf_port, mdd_port, kmf, mdd)
