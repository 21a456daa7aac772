"""The MDD as a real ``python -m perc mdd`` process: forwarding, key isolation, KMF restarts.

The KMF and the MDD are real processes (tests/system/conftest.py). The endpoints that talk are
perc's endpoint join (:func:`perc.roles.endpoint.join`) run in the test process, with
:class:`~perc.srtp.double.DoubleSender` / :class:`~perc.srtp.double.DoubleReceiver` built from
the keys of their join; a join that must fail is a real ``perc endpoint`` process.

No step assumes how long another takes (CI runs the suite on 2 loaded cores, where starting a
Python process can take seconds): every wait is for an event, a process exit or the
expected packets, each with a generous deadline. Two things are pinned so that slowness
cannot change the outcome:

* The MDD's idle timeout (D3) is far beyond any test's length. These talkers send media only
  during :func:`exchange` and no keepalive (a real ``perc endpoint`` sends one every few
  seconds), so with the 10 s default a slow phase between two exchanges (a ``perc endpoint``
  join timing out plus a KMF restart: two process start-ups) made the MDD drop them as idle,
  and the next exchange failed. The idle path is tested in tests/system/test_join.py.
* The KMF listens on a port outside the kernel's ephemeral range, so the KMF killed in
  :func:`test_kmf_killed_mid_conference` can come back on the same port (where the MDD looks)
  without any other socket having been given that port while it was free.
"""

from __future__ import annotations

import random
import signal
import socket
import struct
import uuid

import pytest
import trio

from perc.events import (
    AssociationEnded,
    KeyIsolation,
    MddCounters,
    MddTotals,
    MddTunnelDown,
    MddTunnelUp,
)
from perc.roles.endpoint import JoinResult, JoinSettings, join
from perc.srtp.double import DoubleReceiver, DoubleSender
from perc.srtp.errors import SrtpError
from tests.netutil.ports import unassigned_port

from .conftest import LOCAL, WAIT, Proc, System

pytestmark = pytest.mark.slow

#: One EKTKey for the whole test: the rekey policy is not what these tests are about.
NO_REKEY = "rekey_on_join = false\nrekey_on_leave = false\n"
#: D3 idle timeout of the MDD: never reached in these tests (see the module docstring).
IDLE_TIMEOUT = 3600.0


class Talker:
    """A joined endpoint's media: double encryption with the keys of its join."""

    def __init__(self, name: str, result: JoinResult) -> None:
        self.name = name
        self.result = result
        self.sock = result.socket
        # A Full EKT tag on every packet (period 0, RFC 8870 §4.6 allows it): a later joiner
        # learns each sender's E2E key from its first packet, whatever the timing.
        self.sender = DoubleSender.for_endpoint(result.keying, result.ekt_parameters(), period=0.0)
        self.receiver = DoubleReceiver.for_endpoint(result.keying)
        self.ssrc = random.getrandbits(32)
        self.seq = random.getrandbits(15)
        self.sent = 0
        self.got: dict[int, list[bytes]] = {}

    def learn(self, others: list[Talker]) -> None:
        spis = set()
        for other in others:
            params = other.result.ekt_parameters()
            if params.spi not in spis:
                spis.add(params.spi)
                self.receiver.add_parameter_set(params)

    def payload(self, i: int) -> bytes:
        return f"{self.name}:{i}:".encode() + bytes(140)

    async def send(self, count: int) -> None:
        for _ in range(count):
            header = struct.pack("!BBHII", 0x80, 111, self.seq & 0xFFFF, self.seq * 160, self.ssrc)
            packet = self.sender.protect(header + self.payload(self.sent), trio.current_time())
            await trio.lowlevel.wait_writable(self.sock)
            self.sock.send(packet)
            self.seq += 1
            self.sent += 1
            await trio.lowlevel.checkpoint()  # no pacing: loopback buffers hold a burst

    async def receive(self, count: int) -> None:
        with trio.fail_after(WAIT):
            while sum(len(v) for v in self.got.values()) < count:
                await trio.lowlevel.wait_readable(self.sock)
                while True:
                    try:
                        data = self.sock.recv(65535)
                    except BlockingIOError:
                        break
                    if not 128 <= data[0] <= 191:
                        continue  # DTLS (an EKTKey retransmission) is not media
                    try:
                        media = self.receiver.unprotect(data, trio.current_time())
                    except SrtpError as e:
                        raise AssertionError(f"{self.name}: {e!r}") from e
                    self.got.setdefault(media.ssrc, []).append(media.payload)


async def join_talker(system: System, name: str, mdd_port: int) -> Talker:
    settings = JoinSettings(
        mdd=(LOCAL, mdd_port),
        identity=system.identity(name),
        kmf_fingerprint=system.fingerprint("kmf"),
        name=name,
        join_timeout=WAIT,
    )
    return Talker(name, await join(settings))


async def exchange(talkers: list[Talker], count: int) -> None:
    before = [sum(len(v) for v in t.got.values()) for t in talkers]
    for t in talkers:
        await t.send(count)
    for t, b in zip(talkers, before, strict=True):
        await t.receive(b + count * (len(talkers) - 1))
    for t in talkers:
        for other in talkers:
            if other is not t:
                got = t.got[other.ssrc]
                sent = [other.payload(i) for i in range(other.sent)]
                assert got == sent[len(sent) - len(got) :]


async def start(system: System, people: list[str]) -> tuple[int, int]:
    """KMF and MDD processes; returns (KMF tunnel port, MDD UDP port)."""
    kmf_config = system.kmf_config(conferences={"demo": people}, conference_extra=NO_REKEY)
    # A fixed port outside the ephemeral range: a restarted KMF is where the MDD looks.
    port = unassigned_port(socket.SOCK_STREAM)
    text = kmf_config.read_text().replace(f'listen = "{LOCAL}:0"', f'listen = "{LOCAL}:{port}"')
    kmf_config.write_text(text)
    _, kmf_port = await system.start_kmf(kmf_config)
    assert kmf_port == port
    mdd_config = system.mdd_config("mdd", kmf_port, idle_timeout=IDLE_TIMEOUT)
    _, mdd_port = await system.start_mdd(mdd_config)
    return kmf_port, mdd_port


def last_counters(mdd: Proc) -> dict[uuid.UUID, tuple[int, int]]:
    """The last counters of each association: (packets in, packets out)."""
    return {
        e.association: (e.counters["packets_in"], e.counters["packets_out"])
        for e in mdd.find_events(MddCounters, conference="demo")
    }


def assert_isolated(mdd: Proc) -> None:
    """The MDD checked, at exit, that it never loaded end-to-end code (RFC 8871 §4.1)."""
    (report,) = mdd.find_events(KeyIsolation)
    assert report.loaded == [], report
    assert "perc.srtp.ekt" in report.checked, report


async def test_mdd_process_forwards_and_never_loads_end_to_end_code(system: System) -> None:
    _, port = await start(system, ["alice", "bob", "carol"])
    mdd = system.procs[1]
    talkers = [await join_talker(system, n, port) for n in ("alice", "bob", "carol")]
    try:
        for t in talkers:
            t.learn(talkers)
        await exchange(talkers, 20)
    finally:
        for t in talkers:
            t.sock.close()
    assert await system.stop(mdd) == 0
    # At exit: the key-isolation check, every association's counters, the totals.
    assert_isolated(mdd)
    counters = last_counters(mdd)
    assert len(counters) == 3
    assert set(counters.values()) == {(20, 40)}
    (totals,) = mdd.find_events(MddTotals, conference="demo")
    assert {k: totals.totals[k] for k in ("associations", "created", "srtp_in", "srtp_out")} == {
        "associations": 3,
        "created": 3,
        "srtp_in": 60,
        "srtp_out": 120,
    }, totals
    assert "Traceback" not in mdd.text


async def test_kmf_killed_mid_conference(system: System) -> None:
    """Joined endpoints keep talking while the KMF is gone; a new join fails with a clear
    message; once the KMF is back, the MDD reconnects and new joins work."""
    kmf_config = system.folder / "kmf.toml"
    _, port = await start(system, ["alice", "bob", "carol", "dave"])
    kmf, mdd = system.procs[0], system.procs[1]
    a = await join_talker(system, "alice", port)
    b = await join_talker(system, "bob", port)
    talkers = [a, b]
    try:
        for t in talkers:
            t.learn(talkers)
        await exchange(talkers, 10)

        kmf.process.kill()  # SIGKILL: no close_notify, the MDD sees the TCP connection end
        await kmf.wait_exit()
        await mdd.wait_event(MddTunnelDown, conference="demo", connected=True)
        await exchange(talkers, 10)  # the MDD kept every association and its keys

        carol = await system.start_endpoint("carol", port, "--join-timeout", "2")
        assert await carol.wait_exit() == 5  # ExitCode: timeout
        assert "is its tunnel to the KMF up" in carol.error_line, carol.text
        # The MDD retries from 0.1 s after the loss; waited for, not assumed to have happened.
        await mdd.wait_event(MddTunnelDown, conference="demo", connected=False)

        await system.start_kmf(kmf_config)
        await mdd.wait_event(MddTunnelUp, conference="demo", count=2)
        await exchange(talkers, 5)
        dave = await join_talker(system, "dave", port)
        talkers.append(dave)
        for t in talkers:
            t.learn(talkers)  # the restarted KMF made a new conference key
        await exchange(talkers, 5)
    finally:
        for t in talkers:
            t.sock.close()
    assert await system.stop(mdd) == 0
    assert not mdd.find_events(AssociationEnded, where=lambda e: e.reason in ("idle", "kmf"))
    assert_isolated(mdd)


async def test_stop_signal_logs_counters(system: System) -> None:
    """SIGINT stops the MDD the same way (exit 0, counters and the check logged)."""
    _, port = await start(system, ["alice", "bob"])
    mdd = system.procs[1]
    talkers = [await join_talker(system, n, port) for n in ("alice", "bob")]
    try:
        for t in talkers:
            t.learn(talkers)
        await exchange(talkers, 3)
    finally:
        for t in talkers:
            t.sock.close()
    assert await system.stop(mdd, signal.SIGINT) == 0
    (totals,) = mdd.find_events(MddTotals, conference="demo")
    assert totals.totals["associations"] == 2, totals
    assert_isolated(mdd)
