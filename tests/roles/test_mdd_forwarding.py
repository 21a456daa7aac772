"""The MDD forwarding double-encrypted media, in one trio process over real loopback UDP/TLS.

A real KMF (:class:`perc.kmf.KmfEngine`) and a real MDD (``perc.roles.mdd.serve``);
endpoints join with perc's sans-IO DTLS client (tests/roles/join_helpers.py) and then talk
with :class:`~perc.srtp.double.DoubleSender` / :class:`~perc.srtp.double.DoubleReceiver` built
from the keys their join gave them. Time is a ``MockClock`` (see conftest.py).
"""

from __future__ import annotations

import logging
import os
import random
import re
import socket
import struct
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import attrs
import pytest
import trio
from trio.testing import MockClock

from perc import events, identity
from perc.config import ConfigError, KmfConfig, MddConfig, build_mdd_config
from perc.forwarding import Association
from perc.kmf import KmfEngine
from perc.logsetup import JsonFormatter
from perc.mdd import Address
from perc.roles import kmf, mdd
from perc.roles.endpoint import JoinSettings, JoinTimeout, join
from perc.roles.tunnel import TunnelConnection
from perc.srtp.context import SrtpSession
from perc.srtp.double import DoubleReceiver, DoubleSender
from perc.srtp.ekt import EktCipher, EktParameterSet
from perc.srtp.errors import SrtpError
from perc.srtp.keys import KeyingMaterial, exporter_length, split_exporter
from perc.wire.rtcp import (
    Bye,
    Pli,
    ReceiverReport,
    RtcpPacket,
    SdesChunk,
    SdesItem,
    SenderReport,
    SourceDescription,
    parse_rtcp,
    serialize_rtcp,
)
from perc.wire.tunnel import EndpointDisconnect, MediaKeys, TunnelMessage, encode_message

from ..forwarding.helpers import client_hello, server_hello_flight
from .helpers import RecordingEngine, logged_events, mdd_config, until
from .join_helpers import JoinResult, join_once, keying_kmf_config

LOCAL = "127.0.0.1"
AUDIO = 111


@pytest.fixture(scope="module")
def people() -> list[identity.Identity]:
    return [identity.generate(f"member{i}") for i in range(5)]


def no_rekeys(config: KmfConfig) -> KmfConfig:
    """Keep one EKTKey for the whole test: the rekey policy is not what these tests are about."""
    return attrs.evolve(
        config,
        conferences=tuple(
            attrs.evolve(c, rekey_on_join=False, rekey_on_leave=False) for c in config.conferences
        ),
    )


def with_stats_interval(config: MddConfig, seconds: float) -> MddConfig:
    return attrs.evolve(config, mdd=attrs.evolve(config.mdd, stats_interval=seconds))


def rtp(seq: int, ssrc: int, payload: bytes, pt: int = AUDIO, marker: bool = False) -> bytes:
    return struct.pack("!BBHII", 0x80, (0x80 if marker else 0) | pt, seq, seq * 160, ssrc) + payload


class Peer:
    """A joined endpoint's media side: double encryption with the keys of its join."""

    def __init__(self, name: str, result: JoinResult) -> None:
        done = result.completed
        assert done is not None and done.srtp_keying_material is not None
        assert done.srtp_profile is not None and result.ekt_keys
        self.name = name
        self.result = result
        self.sock = result.socket
        self.mdd_addr = result.mdd_addr
        self.material = split_exporter(done.srtp_profile, done.srtp_keying_material)
        self.cipher = done.ekt_cipher
        self.params = [self.ekt(k.key, k.salt, k.spi, k.ttl) for k in result.ekt_keys]
        # A Full EKT tag on every packet (period 0, RFC 8870 §4.6 allows it): a later joiner
        # learns each sender's E2E key from its first packet, whatever the timing.
        self.sender = DoubleSender.for_endpoint(self.material, self.params[-1], period=0.0)
        self.receiver = DoubleReceiver.for_endpoint(self.material)
        for p in self.params:
            self.receiver.add_parameter_set(p)
        self.ssrc = random.getrandbits(32)
        self.seq = random.getrandbits(15)
        self.sent = 0
        self.verified: dict[int, list[bytes]] = {}
        self.failures = 0

    def ekt(self, key: bytes, salt: bytes, spi: int, ttl: int) -> EktParameterSet:
        return EktParameterSet.from_ekt_key(
            key, salt, spi, ttl, trio.current_time(), cipher=self.cipher
        )

    def learn(self, others: Sequence[Peer]) -> None:
        """Give the receiver every conference key the others were given (normally the KMF's
        rekeys do that; here the test plays that part when keys differ)."""
        for other in others:
            for p in other.params:
                try:
                    self.receiver.add_parameter_set(p)
                except SrtpError:
                    pass  # already known

    def payload(self, i: int) -> bytes:
        return f"{self.name}:{i}:".encode() + bytes(150)

    async def send(self, count: int) -> None:
        for _ in range(count):
            packet = rtp(self.seq & 0xFFFF, self.ssrc, self.payload(self.sent))
            await self.sock.sendto(self.sender.protect(packet, trio.current_time()), self.mdd_addr)
            self.seq += 1
            self.sent += 1

    async def receive(self, count: int, timeout: float = 10.0) -> None:
        """Receive until ``count`` packets verified end to end (DTLS is ignored here)."""
        with trio.fail_after(timeout):
            while sum(len(v) for v in self.verified.values()) < count:
                data, _ = await self.sock.recvfrom(65535)
                if not 128 <= data[0] <= 191:
                    continue
                try:
                    media = self.receiver.unprotect(data, trio.current_time())
                except SrtpError:
                    self.failures += 1
                    continue
                self.verified.setdefault(media.ssrc, []).append(media.payload)


class Conference:
    """A KMF (restartable) and an MDD in one nursery, plus the peers that joined."""

    def __init__(self, ids: SimpleNamespace, members: Sequence[identity.Identity]) -> None:
        self.ids = ids
        self.config = no_rekeys(keying_kmf_config(ids.kmf, [ids.mdd], {"demo": list(members)}))
        self.kmf_scope: trio.CancelScope | None = None
        self.kmf_server: kmf.KmfServer | None = None
        self.engine: KmfEngine | None = None
        self.relay: mdd.ConferenceRelay | None = None
        self.results: list[JoinResult] = []

    async def start_kmf(self, nursery: trio.Nursery, port: int = 0) -> None:
        config = self.config
        if port:
            config = attrs.evolve(
                config,
                kmf=attrs.evolve(config.kmf, listen=attrs.evolve(config.kmf.listen, port=port)),
            )
        self.engine = engine = KmfEngine(config, keylog=None)
        scope = self.kmf_scope = trio.CancelScope()

        async def owner(task_status: trio.TaskStatus[kmf.KmfServer]) -> None:
            with scope:  # kill_kmf() cancels only the KMF
                await kmf.serve(config, engine=engine, task_status=task_status)

        self.kmf_server = await nursery.start(owner)

    def kill_kmf(self) -> None:
        assert self.kmf_scope is not None
        self.kmf_scope.cancel()

    async def start_mdd(self, nursery: trio.Nursery, **kw: object) -> mdd.ConferenceRelay:
        assert self.kmf_server is not None
        config = mdd_config(self.ids.mdd, self.kmf_server.address, self.ids.kmf.fingerprint, **kw)  # type: ignore[arg-type]
        config = with_stats_interval(config, 1.0)
        server: mdd.MddServer = await nursery.start(partial(mdd.serve, config))
        self.relay = next(iter(server.conferences.values()))
        await until(lambda: self.relay is not None and self.relay.tunnel_is_up)
        return self.relay

    async def join(self, member: identity.Identity, **kw: object) -> JoinResult:
        assert self.relay is not None
        result = await join_once(self.relay.address, member, self.ids.kmf.fingerprint, **kw)  # type: ignore[arg-type]
        self.results.append(result)
        return result

    async def join_peer(self, name: str, member: identity.Identity) -> Peer:
        result = await self.join(member)
        assert result.joined, result.closed
        peer = Peer(name, result)
        # The MDD has the keys once MediaKeys arrived (sent before the EKTKey, RFC 9185 §5.4).
        relay = self.relay
        assert relay is not None
        await until(
            lambda: any(
                a.address == result.local_address and a.has_keys
                for a in relay.associations.values()
            )
        )
        return peer

    @asynccontextmanager
    async def running(self) -> AsyncIterator[trio.Nursery]:
        try:
            async with trio.open_nursery() as nursery:
                await self.start_kmf(nursery)
                try:
                    yield nursery
                finally:
                    nursery.cancel_scope.cancel()
        finally:
            for r in self.results:
                r.socket.close()


def association_of(relay: mdd.ConferenceRelay, peer: Peer) -> Association[Address]:
    return next(a for a in relay.associations.values() if a.address == peer.result.local_address)


async def exchange(peers: Sequence[Peer], count: int) -> None:
    """Every peer sends ``count`` packets; every peer verifies everyone else's."""
    before = {p.name: sum(len(v) for v in p.verified.values()) for p in peers}
    for p in peers:
        await p.send(count)
    for p in peers:
        await p.receive(before[p.name] + count * (len(peers) - 1))


def check_payloads(peers: Sequence[Peer]) -> None:
    """What each receiver decrypted is exactly what each sender sent, in order, no gaps."""
    for p in peers:
        for q in peers:
            if q is p:
                continue
            got = p.verified[q.ssrc]
            sent = [q.payload(i) for i in range(q.sent)]
            # Everything since the receiver joined (a later joiner gets a suffix), in order.
            assert got and got == sent[len(sent) - len(got) :], (p.name, q.name)
        assert p.failures == 0


# --- forwarding ------------------------------------------------------------------------------


async def test_three_endpoints_talk_through_the_mdd(
    ids: SimpleNamespace,
    people: list[identity.Identity],
    clock: MockClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="perc.roles.mdd")
    conf = Conference(ids, people[:3])
    async with conf.running() as nursery:
        relay = await conf.start_mdd(nursery)
        peers = [await conf.join_peer(n, m) for n, m in zip("abc", people, strict=False)]
        for p in peers:
            p.learn(peers)
        await exchange(peers, 20)
        check_payloads(peers)
        # The MDD's counters match: 20 in from each, 40 out to each, nothing dropped.
        for p in peers:
            c = association_of(relay, p).counters
            assert (c.packets_in, c.packets_out, c.drop_auth, c.drop_replay) == (20, 40, 0, 0)
            assert c.received == 20
        stats = relay.stats
        assert (stats.srtp_in, stats.srtp_out, stats.dropped_srtp) == (60, 120, 0)
        # SRTCP (D19): a sender report from a goes hop-by-hop to b and c.
        a, b, c_ = peers
        outer = a.material.outer()
        sr = struct.pack("!BBHI", 0x80, 200, 6, a.ssrc) + bytes(20)
        await a.sock.sendto(
            SrtpSession(outer.client_key, outer.client_salt).protect_rtcp(sr), a.mdd_addr
        )
        for p in (b, c_):
            with trio.fail_after(5):
                data, _ = await p.sock.recvfrom(65535)
            o = p.material.outer()
            assert SrtpSession(o.server_key, o.server_salt).unprotect_rtcp(data) == sr
        # Counters are logged every stats_interval (1 s here), only when they changed.
        await trio.sleep(2.5)  # the MockClock's time
        counters = logged_events(caplog, events.MddCounters)
        for p in peers:
            aid = association_of(relay, p).association_id
            mine = [e for e in counters if e.association == aid]
            assert mine and not any(
                v for k, v in mine[-1].counters.items() if k.startswith("drop_")
            ), mine
        await trio.sleep(3.0)  # nothing changed: nothing logged
        assert logged_events(caplog, events.MddCounters) == counters
        nursery.cancel_scope.cancel()
    # At exit: every association's counters, the totals and the key-isolation report.
    (totals,) = logged_events(caplog, events.MddTotals)
    assert (totals.conference, totals.totals["associations"]) == ("demo", 3)
    assert (totals.totals["srtp_in"], totals.totals["srtp_out"]) == (61, 122)
    assert totals.totals["dropped_srtp"] == 0
    assert len(logged_events(caplog, events.KeyIsolation)) == 1
    # Every one of those lines is an event: with --log-format json a program reads it back.
    formatter = JsonFormatter()
    seen: dict[type[events.Event], list[events.Event]] = {}
    for record in caplog.records:
        event = getattr(record, events.RECORD_KEY, None)
        if record.name == "perc.roles.mdd" and event is not None:
            assert record.getMessage() == event.describe()
            back = events.parse_line(formatter.format(record))
            assert back is not None and events.to_json(back) == events.to_json(event)
            seen.setdefault(type(event), []).append(event)
    assert len(seen[events.AssociationCreated]) == len(seen[events.AssociationKeyed]) == 3
    for kind in (events.ConferenceListening, events.MddTunnelUp, events.MddTotals):
        assert [e.conference for e in seen[kind]] == ["demo"]  # type: ignore[attr-defined]
    assert len(seen[events.KeyIsolation]) == 1
    assert {e.association for e in seen[events.MddCounters]} == {  # type: ignore[attr-defined]
        e.association
        for e in seen[events.AssociationCreated]  # type: ignore[attr-defined]
    }


async def test_srtp_before_media_keys_is_held_then_forwarded(
    ids: SimpleNamespace, clock: MockClock
) -> None:
    """D5 with a scripted KMF: up to 64 datagrams per association wait for MediaKeys."""
    handler = RecordingEngine(reply=lambda data: server_hello_flight())  # admits each
    profile = 0x0009
    params = EktParameterSet(7, EktCipher.AESKW_128, os.urandom(16), os.urandom(12))
    async with trio.open_nursery() as nursery:
        server = await nursery.start(partial(kmf.serve, _plain_kmf_config(ids), engine=handler))
        config = mdd_config(ids.mdd, server.address, ids.kmf.fingerprint)
        srv: mdd.MddServer = await nursery.start(partial(mdd.serve, config))
        relay = next(iter(srv.conferences.values()))
        await until(lambda: relay.tunnel_is_up)
        socks = []
        materials: list[KeyingMaterial] = []
        for _ in range(2):
            sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
            await sock.bind((LOCAL, 0))
            socks.append(sock)
            materials.append(split_exporter(profile, os.urandom(exporter_length(profile))))
            await sock.sendto(client_hello(), relay.address)  # a ClientHello: association
        await until(lambda: len(handler.seen) == 2)
        for sock in socks:  # the ServerHello that admitted it
            with trio.fail_after(5):
                assert (await sock.recvfrom(2048))[0] == server_hello_flight()
        by_addr = {
            s.getsockname(): seen.association_id
            for s, seen in zip(socks, handler.seen, strict=True)
        }
        aids = [by_addr[s.getsockname()] for s in socks]
        tunnel_id = handler.seen[0].tunnel.tunnel_id

        def media_keys(i: int) -> MediaKeys:
            o = materials[i].outer()
            return MediaKeys(
                aids[i], profile, b"", o.client_key, o.server_key, o.client_salt, o.server_salt
            )

        # The receiver (1) is keyed; the sender (0) sends 70 packets before its keys.
        assert server.send(tunnel_id, media_keys(1))
        await until(lambda: relay.stats.media_keys == 1)
        sender = DoubleSender.for_endpoint(materials[0], params)
        for i in range(70):
            await socks[0].sendto(sender.protect(rtp(i, 0x1234, b"p%d" % i), 0.0), relay.address)
        await until(lambda: relay.stats.dropped_srtp_no_keys == 70)
        assoc = relay.associations[aids[0]]
        c = assoc.counters
        assert (c.held, c.drop_queue_full, relay.stats.srtp_held) == (64, 6, 64)
        assert relay.stats.dropped_srtp == 6
        # Keys arrive: the 64 held packets go out to the receiver, in order.
        assert server.send(tunnel_id, media_keys(0))
        receiver = DoubleReceiver.for_endpoint(materials[1])
        receiver.add_parameter_set(params)
        got = []
        with trio.fail_after(5):
            while len(got) < 64:
                data, _ = await socks[1].recvfrom(65535)
                got.append(receiver.unprotect(data, 0.0).payload)
        assert got == [b"p%d" % i for i in range(64)]
        # EndpointDisconnect from the KMF: the association leaves the table too (both ways).
        assert server.send(tunnel_id, EndpointDisconnect(aids[1]))
        await until(lambda: aids[1] not in relay.associations)
        unknown = relay.engine.table.stats.unknown_source
        await socks[1].sendto(b"\x80" + bytes(40), relay.address)
        await until(lambda: relay.engine.table.stats.unknown_source == unknown + 1)
        await socks[0].sendto(sender.protect(rtp(70, 0x1234, b"late"), 0.0), relay.address)
        await until(lambda: relay.associations[aids[0]].counters.packets_in == 65)
        assert relay.associations[aids[0]].counters.packets_out == 0
        for s in socks:
            s.close()
        nursery.cancel_scope.cancel()


def _plain_kmf_config(ids: SimpleNamespace) -> KmfConfig:
    from .helpers import kmf_config

    return kmf_config(ids.kmf, [ids.mdd])


async def test_idle_timeout_removes_the_association_from_forwarding(
    ids: SimpleNamespace, people: list[identity.Identity], clock: MockClock
) -> None:
    conf = Conference(ids, people[:2])
    async with conf.running() as nursery:
        relay = await conf.start_mdd(nursery, idle_timeout=3.0)
        a = await conf.join_peer("a", people[0])
        b = await conf.join_peer("b", people[1])
        a.learn([b])
        b.learn([a])
        # a keeps talking, b goes silent: b is dropped after 3 s (D3), media to it stops.
        aid_b = association_of(relay, b).association_id
        for _ in range(20):
            await a.send(1)
            await trio.sleep(0.25)
        assert aid_b not in relay.associations
        assert association_of(relay, a).counters.packets_in == 20
        assert relay.stats.associations_idle == 1
        nursery.cancel_scope.cancel()


# --- the KMF killed mid-conference ----------------------------------------------------------


async def test_kmf_killed_media_goes_on_new_join_fails_then_works_after_restart(
    ids: SimpleNamespace,
    people: list[identity.Identity],
    clock: MockClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="perc.roles")
    conf = Conference(ids, people[:4])
    async with conf.running() as nursery:
        relay = await conf.start_mdd(nursery)
        assert conf.kmf_server is not None
        port = conf.kmf_server.address[1]
        a = await conf.join_peer("a", people[0])
        b = await conf.join_peer("b", people[1])
        a.learn([b])
        b.learn([a])
        await exchange([a, b], 10)
        keys_before = {aid: x.media_keys for aid, x in relay.associations.items()}

        conf.kill_kmf()
        await until(lambda: not relay.tunnel_is_up)
        # The MDD keeps every association and its hop-by-hop keys while the tunnel is down...
        await trio.sleep(3.0)  # reconnect attempts fail meanwhile
        assert relay.stats.connect_failures >= 1
        assert {aid: x.media_keys for aid, x in relay.associations.items()} == keys_before
        assert all(x.has_keys for x in relay.associations.values())
        # ... so the joined endpoints keep talking.
        await exchange([a, b], 10)
        check_payloads([a, b])

        # A new join fails: its DTLS is dropped while the tunnel is down, and the endpoint
        # role ends with its clear message.
        dropped = relay.stats.dropped_no_tunnel
        settings = JoinSettings(
            mdd=relay.address,
            identity=people[2],
            kmf_fingerprint=ids.kmf.fingerprint,
            name="carol",
            join_timeout=3.0,
        )
        with pytest.raises(JoinTimeout) as failure:
            await join(settings)
        assert "tunnel to the KMF up" in str(failure.value)
        assert relay.stats.dropped_no_tunnel > dropped
        assert len(relay.associations) == 2

        # The KMF comes back on the same port: the MDD reconnects and new joins work.
        await conf.start_kmf(nursery, port=port)
        await until(lambda: relay.tunnel_is_up)
        d = await conf.join_peer("d", people[3])
        for p in (a, b, d):
            p.learn([a, b, d])  # the restarted KMF made a new conference key
        await exchange([a, b, d], 5)
        check_payloads([a, b, d])
        assert relay.stats.tunnels_up == 2
        nursery.cancel_scope.cancel()
    down = logged_events(caplog, events.MddTunnelDown)
    assert [(e.conference, e.connected) for e in down if e.connected] == [("demo", True)], down


# --- key isolation ---------------------------------------------------------------------------


async def test_the_mdd_never_receives_an_ekt_key_or_an_e2e_key(
    ids: SimpleNamespace,
    people: list[identity.Identity],
    clock: MockClock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every tunnel message the MDD receives during joins: MediaKeys carry exactly the outer
    halves of each endpoint's exporter output, and no message contains the EKTKey, an inner
    (end-to-end) half, or an endpoint's own E2E key."""
    received: list[TunnelMessage] = []
    original = TunnelConnection.receive_messages

    async def recording(self: TunnelConnection) -> list[TunnelMessage]:
        msgs = await original(self)
        if self.peer_fingerprint == ids.kmf.fingerprint:  # the MDD's end of the tunnel
            received.extend(msgs)
        return msgs

    monkeypatch.setattr(TunnelConnection, "receive_messages", recording)
    conf = Conference(ids, people[:3])
    async with conf.running() as nursery:
        relay = await conf.start_mdd(nursery)
        peers = [await conf.join_peer(n, m) for n, m in zip("abc", people, strict=False)]
        for p in peers:
            p.learn(peers)
        await exchange(peers, 3)  # the E2E keys go out (wrapped) in the EKT tags
        nursery.cancel_scope.cancel()
    assert relay is not None
    media_keys = [m for m in received if isinstance(m, MediaKeys)]
    assert len(media_keys) == 3
    by_aid = {m.association_id: m for m in media_keys}
    secrets: list[bytes] = []
    for p in peers:
        aid = next(
            aid for aid, a in relay.associations.items() if a.address == p.result.local_address
        )
        m = by_aid[aid]
        outer, inner = p.material.outer(), p.material.inner()
        assert (
            m.client_write_master_key,
            m.server_write_master_key,
            m.client_write_master_salt,
            m.server_write_master_salt,
        ) == (outer.client_key, outer.server_key, outer.client_salt, outer.server_salt)
        assert m.mki == b""
        secrets += [inner.client_key, inner.server_key, inner.client_salt, inner.server_salt]
        secrets.append(p.sender.inner_key)
        for k in p.result.ekt_keys:
            secrets += [k.key, k.salt]
    wire = b"".join(encode_message(m) for m in received)
    assert len(received) > len(media_keys)  # the DTLS flights were recorded too
    for secret in secrets:
        assert len(secret) >= 12 and secret not in wire


# --- sending -----------------------------------------------------------------------------------


class ScriptedSocket:
    """A real UDP socket's fileno (wait_writable works) with a scripted ``sendto``."""

    def __init__(self, failures: dict[int, OSError]) -> None:
        self.real = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.failures = failures
        self.calls = 0
        self.sent: list[bytes] = []

    def fileno(self) -> int:
        return self.real.fileno()

    def sendto(self, data: bytes, addr: object) -> int:
        self.calls += 1
        error = self.failures.pop(self.calls, None)
        if error is not None:
            raise error
        self.sent.append(data)
        return len(data)


async def test_send_failures_wait_on_eagain_and_drop_the_rest_counted(ids: SimpleNamespace) -> None:
    config = mdd_config(ids.mdd, (LOCAL, 9), ids.kmf.fingerprint)
    relay = mdd.ConferenceRelay(config.conferences[0], config)
    # Call 1 (datagram 0) would block, its retry succeeds; call 4 (datagram 2) is refused.
    fake = ScriptedSocket({1: BlockingIOError(), 4: ConnectionRefusedError()})
    relay._sock = fake  # type: ignore[assignment]
    out = [((LOCAL, 5000 + i), b"d%d" % i) for i in range(5)]
    with fake.real:
        await relay._send(out)
    assert fake.sent == [b"d0", b"d1", b"d3", b"d4"]
    assert (relay.io.send_waits, relay.io.dropped_udp_send) == (1, 1)


# --- configuration ---------------------------------------------------------------------------


def _mdd_data(folder: Path, ids: SimpleNamespace, **extra: object) -> dict[str, Any]:
    identity.write(ids.mdd, folder, "mdd")
    conference: dict[str, Any] = {
        "id": "demo",
        "listen": f"{LOCAL}:0",
        "kmf": f"{LOCAL}:4444",
        "kmf_fingerprint": ids.kmf.fingerprint,
    }
    mdd_table: dict[str, Any] = {"cert": "mdd.crt", "key": "mdd.key"}
    for key, value in extra.items():
        (mdd_table if key == "stats_interval" else conference)[key] = value
    return {"mdd": mdd_table, "conference": [conference]}


def test_forwarding_options_reach_the_table(ids: SimpleNamespace, tmp_path: Path) -> None:
    data = _mdd_data(tmp_path, ids, last_n=2, video_payload_types=[96, 98], stats_interval=2.5)
    config = build_mdd_config(data, base=tmp_path)
    assert config.mdd.stats_interval == 2.5
    relay = mdd.ConferenceRelay(config.conferences[0], config)
    table = relay.engine.table
    assert table.config.last_n == 2
    assert table.config.video_payload_types == frozenset({96, 98})
    # the table holds the admitted and the pending associations (each bounded by the engine)
    assert table.config.max_associations == (
        config.conferences[0].max_associations + config.mdd.max_pending
    )
    defaults = build_mdd_config(_mdd_data(tmp_path, ids), base=tmp_path)
    assert defaults.mdd.stats_interval == 10.0
    assert defaults.conferences[0].video_payload_types == (96,)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"video_payload_types": [128]}, "conference[0].video_payload_types: payload type 128"),
        ({"stats_interval": 0}, "mdd.stats_interval: must be a positive number"),
    ],
)
def test_bad_forwarding_options_are_refused(
    ids: SimpleNamespace, tmp_path: Path, extra: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        build_mdd_config(_mdd_data(tmp_path, ids, **extra), base=tmp_path)


async def test_rekeys_on_join_and_leave_pass_the_mdd_as_ciphertext_only(
    ids: SimpleNamespace,
    people: list[identity.Identity],
    clock: MockClock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With the KMF's default rekey policy (D22: a new EKTKey on every join and leave), every
    EKTKey the endpoints get crosses the MDD inside DTLS: none of them, and no inner half of
    any exporter output, is ever in a tunnel message the MDD receives."""
    received: list[TunnelMessage] = []
    original = TunnelConnection.receive_messages

    async def recording(self: TunnelConnection) -> list[TunnelMessage]:
        msgs = await original(self)
        if self.peer_fingerprint == ids.kmf.fingerprint:
            received.extend(msgs)
        return msgs

    monkeypatch.setattr(TunnelConnection, "receive_messages", recording)
    conf = Conference(ids, people[:3])
    conf.config = keying_kmf_config(ids.kmf, [ids.mdd], {"demo": people[:3]})  # rekeys on
    results: list[JoinResult] = []
    serving: list[tuple[trio.CancelScope, trio.Event]] = []

    async def serve(result: JoinResult, scope: trio.CancelScope, done: trio.Event) -> None:
        """Answer rekeys (EKTKey, ACK) until cancelled."""
        with scope:
            await result.serve()
        done.set()

    async with conf.running() as nursery:
        await conf.start_mdd(nursery)
        for member in people[:3]:
            result = await conf.join(member)
            assert result.joined
            results.append(result)
            serving.append((trio.CancelScope(), trio.Event()))
            nursery.start_soon(serve, result, *serving[-1])

        def latest_spis() -> set[int]:
            return {r.ekt_keys[-1].spi for r in results}

        await until(lambda: len(latest_spis()) == 1 and len(results[0].ekt_keys) >= 3)
        spi = latest_spis().pop()
        scope, done = serving[2]
        scope.cancel()
        await done.wait()
        await results[2].leave()  # close_notify: the others get a new key (rekey on leave)
        await until(lambda: all(r.ekt_keys[-1].spi != spi for r in results[:2]))
        nursery.cancel_scope.cancel()
    keys = {(k.key, k.salt) for r in results for k in r.ekt_keys}
    # The first key, a rekey for each later join (sequential here: each joiner waits for its
    # key, so none coalesce), the leave's rekey.
    assert len(keys) == 4, len(keys)
    secrets = [part for pair in keys for part in pair]
    for r in results:
        done = r.completed
        assert done is not None and done.srtp_keying_material is not None
        inner = split_exporter(done.srtp_profile or 0, done.srtp_keying_material).inner()
        secrets += [inner.client_key, inner.server_key, inner.client_salt, inner.server_salt]
    wire = b"".join(encode_message(m) for m in received)
    assert sum(isinstance(m, MediaKeys) for m in received) == 3
    for secret in secrets:
        assert secret not in wire


async def test_forged_bye_sr_sdes_never_reach_the_others_and_a_pli_storm_is_throttled(
    ids: SimpleNamespace, people: list[identity.Identity], clock: MockClock
) -> None:
    """b, under its own hop-by-hop key, sends RTCP naming a's SSRC (BYE, SR, SDES): the MDD
    removes it (drop_rtcp_spoof), so neither a nor c ever sees it; b's own BYE goes through.
    Then b sends 50 PLIs at a at once: a gets one (D36: one per 500 ms)."""
    conf = Conference(ids, people[:3])
    async with conf.running() as nursery:
        relay = await conf.start_mdd(nursery)
        peers = [await conf.join_peer(n, m) for n, m in zip("abc", people, strict=False)]
        for p in peers:
            p.learn(peers)
        await exchange(peers, 5)  # every SSRC is owned by its sender now
        a, b, c = peers
        ob = b.material.outer()
        b_rtcp = SrtpSession(ob.client_key, ob.client_salt)

        async def b_sends(packets: list[RtcpPacket]) -> None:
            await b.sock.sendto(b_rtcp.protect_rtcp(serialize_rtcp(packets)), b.mdd_addr)

        sdes_a = SourceDescription((SdesChunk(a.ssrc, (SdesItem(1, b"a"),)),))
        await b_sends([ReceiverReport(b.ssrc), Bye((a.ssrc,), b"forged")])
        await b_sends([SenderReport(a.ssrc, packet_count=1), sdes_a])
        await b_sends([ReceiverReport(b.ssrc), Bye((b.ssrc,), b"bye")])  # its own: forwarded

        for p in (a, c):
            o = p.material.outer()
            rx = SrtpSession(o.server_key, o.server_salt)
            with trio.fail_after(5):
                while True:
                    data, _ = await p.sock.recvfrom(65535)
                    if 192 <= data[1] <= 223:
                        break
            # The first RTCP to arrive is b's own BYE: the forged ones were never forwarded.
            assert parse_rtcp(rx.unprotect_rtcp(data)) == [
                ReceiverReport(b.ssrc),
                Bye((b.ssrc,), b"bye"),
            ], p.name
        counters = association_of(relay, b).counters
        assert counters.drop_rtcp_spoof == 3  # BYE SSRC, SR, SDES chunk

        # A PLI storm from c at a: one gets through now, the rest are counted.
        oc = c.material.outer()
        c_rtcp = SrtpSession(oc.client_key, oc.client_salt)
        for _ in range(50):
            pli = serialize_rtcp([ReceiverReport(c.ssrc), Pli(c.ssrc, a.ssrc)])
            await c.sock.sendto(c_rtcp.protect_rtcp(pli), c.mdd_addr)
        await until(lambda: association_of(relay, c).counters.rtcp_in == 50)
        assert association_of(relay, c).counters.drop_feedback_throttled == 49
        nursery.cancel_scope.cancel()
