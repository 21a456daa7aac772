"""KMF and MDD over real loopback TLS and UDP: authentication, versions, D2 errors, relay."""

from __future__ import annotations

import uuid
from functools import partial
from types import SimpleNamespace

import pytest
import trio
from trio.testing import MockClock

from perc.kmf import Tunnel
from perc.roles import kmf, mdd
from perc.roles.tunnel import TunnelClosed, TunnelConnection
from perc.wire.tunnel import (
    EndpointDisconnect,
    MediaKeys,
    SupportedProfiles,
    TunneledDtls,
    UnsupportedVersion,
    encode_message,
)

from ..forwarding.helpers import client_hello, server_hello_flight
from .helpers import LOCAL, RecordingEngine, kmf_config, mdd_config, open_raw_tunnel, until

DTLS = client_hello()  # a well-formed ClientHello: what admits a new address at the MDD


def hello(tag: bytes) -> bytes:
    """A ClientHello told apart by ``tag`` (its client random)."""
    return client_hello(random=tag.ljust(32, b"."))


def admit(data: bytes) -> bytes:
    """A stand-in KMF's answer that admits the association at the MDD (a ServerHello)."""
    return server_hello_flight()


async def start_kmf(
    nursery: trio.Nursery, ids: SimpleNamespace, handler: RecordingEngine, port: int = 0
) -> kmf.KmfServer:
    config = kmf_config(ids.kmf, [ids.mdd, ids.mdd2], port)
    server: kmf.KmfServer = await nursery.start(partial(kmf.serve, config, engine=handler))
    return server


async def start_mdd(nursery: trio.Nursery, config: object) -> mdd.ConferenceRelay:
    server: mdd.MddServer = await nursery.start(partial(mdd.serve, config))
    return next(iter(server.conferences.values()))


async def endpoint() -> trio.socket.SocketType:
    sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
    await sock.bind((LOCAL, 0))
    return sock


async def test_mutual_authentication(ids: SimpleNamespace, clock: MockClock) -> None:
    handler = RecordingEngine()
    async with trio.open_nursery() as nursery:
        server = await start_kmf(nursery, ids, handler)
        relay = await start_mdd(nursery, mdd_config(ids.mdd, server.address, ids.kmf.fingerprint))
        await until(lambda: bool(handler.up))
        tunnel = handler.up[0]
        assert tunnel.mdd_fingerprint == ids.mdd.fingerprint
        assert tunnel.version == 0
        assert tunnel.protection_profiles == (0x0009, 0x000A)
        assert relay.tunnel_is_up
        assert relay.stats.tunnels_up == 1
        assert server.engine.tunnel_stats.tunnels_up == 1
        assert server.stats.refused == 0
        nursery.cancel_scope.cancel()


async def test_untrusted_mdd_is_refused(ids: SimpleNamespace, clock: MockClock) -> None:
    handler = RecordingEngine()
    async with trio.open_nursery() as nursery:
        server = await start_kmf(nursery, ids, handler)
        config = mdd_config(ids.stranger, server.address, ids.kmf.fingerprint)
        relay = await start_mdd(nursery, config)
        await until(lambda: relay.stats.connect_failures >= 2)
        assert server.stats.refused >= 2
        assert server.engine.tunnel_stats.tunnels_up == 0
        assert relay.stats.tunnels_up == 0
        assert not handler.up
        nursery.cancel_scope.cancel()


async def test_mdd_refuses_a_kmf_with_another_fingerprint(
    ids: SimpleNamespace, clock: MockClock
) -> None:
    handler = RecordingEngine()
    async with trio.open_nursery() as nursery:
        server = await start_kmf(nursery, ids, handler)
        config = mdd_config(ids.mdd, server.address, ids.stranger.fingerprint)
        relay = await start_mdd(nursery, config)
        await until(lambda: relay.stats.connect_failures >= 2)
        assert relay.stats.tunnels_up == 0
        # The KMF sees the MDD's alert: its handshake fails, no tunnel is ever up.
        assert server.stats.refused >= 2
        assert server.engine.tunnel_stats.tunnels_up == 0
        assert not handler.up
        nursery.cancel_scope.cancel()


async def test_version_1_gets_unsupported_version_then_close(
    ids: SimpleNamespace, clock: MockClock
) -> None:
    async with trio.open_nursery() as nursery:
        server = await start_kmf(nursery, ids, RecordingEngine())
        conn = await open_raw_tunnel(server.address, ids.mdd, ids.kmf.fingerprint)

        async def session(conn: TunnelConnection) -> None:
            conn.send(SupportedProfiles(version=1, protection_profiles=(0x0009,)))
            assert await conn.receive_messages() == [UnsupportedVersion(highest_version=0)]
            with pytest.raises(TunnelClosed, match="close_notify"):
                await conn.receive_messages()

        await conn.run(session)
        # Exactly the 4 bytes 02 00 01 00 came through the tunnel (RFC 9185 §5.5).
        assert conn.stats.bytes_in == 4
        assert encode_message(UnsupportedVersion(highest_version=0)) == bytes.fromhex("02000100")
        assert server.engine.tunnel_stats.unsupported_version == 1
        assert server.engine.tunnel_stats.tunnels_up == 0
        nursery.cancel_scope.cancel()


AID = uuid.UUID("3f2c9a1e-7b4d-4c8e-9a10-55aa66bb77cc")
HELLO = encode_message(SupportedProfiles(version=0, protection_profiles=(0x0009, 0x000A)))
KEYS = MediaKeys(AID, 0x0009, b"", b"k" * 16, b"K" * 16, b"s" * 12, b"S" * 12)

BAD_STREAMS = {
    "unknown type": HELLO + bytes.fromhex("090000"),
    "dtls before hello": encode_message(TunneledDtls(AID, DTLS)) + HELLO,
    "second hello": HELLO + HELLO,
    "kmf-only message": HELLO + encode_message(KEYS),
    "body does not parse": HELLO + bytes.fromhex("050003010203"),
    "dtls length mismatch": HELLO + bytes.fromhex("040013") + AID.bytes + bytes.fromhex("0002aa"),
}


@pytest.mark.parametrize("name", sorted(BAD_STREAMS))
async def test_bad_tunnel_is_closed_others_keep_working(
    name: str, ids: SimpleNamespace, clock: MockClock
) -> None:
    handler = RecordingEngine(reply=lambda data: b"\x17" + data)
    async with trio.open_nursery() as nursery:
        server = await start_kmf(nursery, ids, handler)
        relay = await start_mdd(nursery, mdd_config(ids.mdd, server.address, ids.kmf.fingerprint))
        await until(lambda: relay.tunnel_is_up and bool(handler.up))

        bad = await open_raw_tunnel(server.address, ids.mdd2, ids.kmf.fingerprint)

        async def session(conn: TunnelConnection) -> None:
            conn.send_encoded(BAD_STREAMS[name], droppable=False)
            with pytest.raises(TunnelClosed):
                await conn.receive_messages()

        await bad.run(session)
        assert server.engine.tunnel_stats.protocol_errors == 1
        # The good tunnel still relays both ways.
        sock = await endpoint()
        with sock:
            await sock.sendto(DTLS, relay.address)
            with trio.fail_after(5):
                data, _ = await sock.recvfrom(2048)
        assert data == b"\x17" + DTLS
        assert relay.tunnel_is_up
        assert relay.stats.tunnels_up == 1
        nursery.cancel_scope.cancel()


async def test_kmf_restart_mdd_reconnects_and_says_hello_again(
    ids: SimpleNamespace, clock: MockClock
) -> None:
    first, second = RecordingEngine(), RecordingEngine()
    async with trio.open_nursery() as nursery:
        async with trio.open_nursery() as kmf_nursery:
            server = await start_kmf(kmf_nursery, ids, first)
            port = server.address[1]
            relay = await start_mdd(
                nursery, mdd_config(ids.mdd, server.address, ids.kmf.fingerprint)
            )
            await until(lambda: bool(first.up))
            kmf_nursery.cancel_scope.cancel()
        await until(lambda: not relay.tunnel_is_up)
        # Stay down long enough for a few failed reconnects (backoff grows).
        await trio.sleep(1.0)
        failures = relay.stats.connect_failures
        assert failures >= 2
        async with trio.open_nursery() as kmf_nursery:
            await start_kmf(kmf_nursery, ids, second, port=port)
            await until(lambda: bool(second.up))
            assert second.up[0].protection_profiles == (0x0009, 0x000A)
            assert second.up[0].version == 0
            assert relay.stats.tunnels_up == 2
            kmf_nursery.cancel_scope.cancel()
        nursery.cancel_scope.cancel()


async def test_endpoints_get_distinct_ids_and_replies_reach_their_endpoint(
    ids: SimpleNamespace, clock: MockClock
) -> None:
    handler = RecordingEngine(reply=lambda data: b"\x17reply-to-" + data)
    async with trio.open_nursery() as nursery:
        server = await start_kmf(nursery, ids, handler)
        relay = await start_mdd(nursery, mdd_config(ids.mdd, server.address, ids.kmf.fingerprint))
        await until(lambda: relay.tunnel_is_up)
        a, b = await endpoint(), await endpoint()
        with a, b:
            await a.sendto(hello(b"from-a"), relay.address)
            await b.sendto(hello(b"from-b"), relay.address)
            with trio.fail_after(5):
                got_a, _ = await a.recvfrom(2048)
                got_b, _ = await b.recvfrom(2048)
            # Both endpoints again: the ids are stable per 5-tuple.
            await a.sendto(hello(b"again-a"), relay.address)
            with trio.fail_after(5):
                again_a, _ = await a.recvfrom(2048)
        assert got_a == b"\x17reply-to-" + hello(b"from-a")
        assert got_b == b"\x17reply-to-" + hello(b"from-b")
        assert again_a == b"\x17reply-to-" + hello(b"again-a")
        by_data = {s.data: s.association_id for s in handler.seen}
        assert by_data[hello(b"from-a")] != by_data[hello(b"from-b")]
        assert by_data[hello(b"from-a")] == by_data[hello(b"again-a")]
        for aid in by_data.values():
            assert aid.version == 4
        assert set(relay.associations) == set(by_data.values())
        assert relay.stats.dtls_to_kmf == 3
        assert relay.stats.dtls_to_endpoint == 3
        nursery.cancel_scope.cancel()


async def test_idle_timeout_sends_endpoint_disconnect(
    ids: SimpleNamespace, clock: MockClock
) -> None:
    handler = RecordingEngine(reply=admit)
    async with trio.open_nursery() as nursery:
        server = await start_kmf(nursery, ids, handler)
        relay = await start_mdd(nursery, mdd_config(ids.mdd, server.address, ids.kmf.fingerprint))
        await until(lambda: relay.tunnel_is_up)
        sock = await endpoint()
        with sock:
            await sock.sendto(DTLS, relay.address)
            await until(lambda: bool(handler.seen))
            aid = handler.seen[0].association_id
            start = trio.current_time()
            # SRTP keeps an association alive too (D3: any packet).
            await trio.sleep(6.0)
            await sock.sendto(b"\x80" + bytes(11), relay.address)
            await until(lambda: bool(handler.disconnected))
        elapsed = handler.disconnected_at[0] - start
        assert handler.disconnected == [aid]
        # Sent within the sweep granularity (idle_timeout / 8) after 10 s of silence.
        assert 6.0 + 10.0 <= elapsed <= 6.0 + 10.0 * 1.125 + 0.1
        assert aid not in relay.associations
        assert relay.stats.associations_idle == 1
        assert relay.stats.dropped_srtp == 1
        nursery.cancel_scope.cancel()


async def test_endpoint_disconnect_from_kmf_drops_the_association(
    ids: SimpleNamespace, clock: MockClock
) -> None:
    handler = RecordingEngine()
    async with trio.open_nursery() as nursery:
        server = await start_kmf(nursery, ids, handler)
        relay = await start_mdd(nursery, mdd_config(ids.mdd, server.address, ids.kmf.fingerprint))
        await until(lambda: relay.tunnel_is_up)
        sock = await endpoint()
        with sock:
            await sock.sendto(DTLS, relay.address)
            await until(lambda: len(handler.seen) == 1)
            seen = handler.seen[0]
            assert server.send(seen.tunnel.tunnel_id, attrs_evolve_keys(seen.association_id))
            await until(lambda: relay.stats.media_keys == 1)
            assert relay.associations[seen.association_id].media_keys is not None
            assert server.send(seen.tunnel.tunnel_id, EndpointDisconnect(seen.association_id))
            await until(lambda: not relay.associations)
            assert relay.stats.associations_ended_by_kmf == 1
            # Messages naming an unknown association are counted and ignored (D2).
            server.send(seen.tunnel.tunnel_id, TunneledDtls(seen.association_id, DTLS))
            server.send(seen.tunnel.tunnel_id, EndpointDisconnect(seen.association_id))
            await until(lambda: relay.stats.dropped_unknown_association == 2)
            # The same endpoint starting again is a new association.
            await sock.sendto(DTLS, relay.address)
            await until(lambda: len(handler.seen) == 2)
        assert handler.seen[1].association_id != seen.association_id
        assert relay.tunnel_is_up
        nursery.cancel_scope.cancel()


def attrs_evolve_keys(aid: uuid.UUID) -> MediaKeys:
    return MediaKeys(aid, 0x0009, b"", b"k" * 16, b"K" * 16, b"s" * 12, b"S" * 12)


async def test_demultiplexing_and_drops(ids: SimpleNamespace, clock: MockClock) -> None:
    handler = RecordingEngine()
    async with trio.open_nursery() as nursery:
        server = await start_kmf(nursery, ids, handler)
        relay = await start_mdd(nursery, mdd_config(ids.mdd, server.address, ids.kmf.fingerprint))
        await until(lambda: relay.tunnel_is_up)
        sock = await endpoint()
        with sock:
            for first in (0, 3, 16, 19, 64, 127, 192, 255):  # STUN, ZRTP, TURN, QUIC: dropped
                await sock.sendto(bytes([first, 1, 2]), relay.address)
            await sock.sendto(b"", relay.address)
            for first in (128, 191):  # SRTP/SRTCP: dropped until the media issue
                await sock.sendto(bytes([first]) + bytes(11), relay.address)
            for first in (20, 63):  # DTLS but no ClientHello from a new address: dropped
                await sock.sendto(bytes([first, 9]), relay.address)
            await sock.sendto(DTLS, relay.address)  # a ClientHello: relayed
            await until(lambda: len(handler.seen) == 1)
        assert [s.data for s in handler.seen] == [DTLS]
        assert relay.stats.dropped_other == 9
        assert relay.engine.admission_stats.dropped_not_hello == 2
        assert relay.stats.dropped_srtp == 2
        assert relay.stats.datagrams_in == 14
        # Non-DTLS from an unknown 5-tuple creates no association.
        assert relay.stats.associations_created == 1
        nursery.cancel_scope.cancel()


async def test_dtls_while_tunnel_down_is_dropped(ids: SimpleNamespace, clock: MockClock) -> None:
    async with trio.open_nursery() as nursery:
        # Nobody listens on the KMF address: the tunnel never comes up.
        probe = trio.socket.socket()
        await probe.bind((LOCAL, 0))
        dead = probe.getsockname()
        probe.close()
        relay = await start_mdd(nursery, mdd_config(ids.mdd, dead, ids.kmf.fingerprint))
        sock = await endpoint()
        with sock:
            for _ in range(3):
                await sock.sendto(DTLS, relay.address)
            await until(lambda: relay.stats.dropped_no_tunnel == 3)
            await until(lambda: relay.stats.connect_failures >= 1)
        assert not relay.associations
        nursery.cancel_scope.cancel()


async def test_mdd_remembers_unsupported_version(ids: SimpleNamespace, clock: MockClock) -> None:
    # A stand-in KMF that speaks only a (hypothetical) older version: answers every
    # SupportedProfiles with UnsupportedVersion and closes.
    from perc.roles.tunnel import make_tls_context

    ctx = make_tls_context(ids.kmf, server=True, is_trusted=lambda fp: fp == ids.mdd.fingerprint)
    hellos: list[SupportedProfiles] = []

    async def handle(stream: trio.SocketStream) -> None:
        conn = TunnelConnection(stream, ctx, server=True, peer="mdd")
        await conn.handshake(5.0)

        async def session(conn: TunnelConnection) -> None:
            msg = (await conn.receive_messages())[0]
            assert isinstance(msg, SupportedProfiles)
            hellos.append(msg)
            conn.send(UnsupportedVersion(highest_version=0))

        await conn.run(session)

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, handle, 0, host=LOCAL))
        address = listeners[0].socket.getsockname()
        relay = await start_mdd(nursery, mdd_config(ids.mdd, address, ids.kmf.fingerprint))
        await until(lambda: len(hellos) == 2)
        assert relay.kmf_highest_version == 0
        assert relay.stats.unsupported_version >= 1
        assert all(h.version == 0 for h in hellos)
        nursery.cancel_scope.cancel()


async def test_two_conferences_two_tunnels(ids: SimpleNamespace, clock: MockClock) -> None:
    handler = RecordingEngine(reply=lambda data: data)
    async with trio.open_nursery() as nursery:
        server = await start_kmf(nursery, ids, handler)
        config = mdd_config(
            ids.mdd, server.address, ids.kmf.fingerprint, conferences=("one", "two")
        )
        mdd_server: mdd.MddServer = await nursery.start(partial(mdd.serve, config))
        await until(lambda: len(handler.up) == 2)
        one, two = mdd_server.conferences["one"], mdd_server.conferences["two"]
        assert one.address != two.address
        sock = await endpoint()
        with sock:
            await sock.sendto(hello(b"one"), one.address)
            await sock.sendto(hello(b"two"), two.address)
            await until(lambda: len(handler.seen) == 2)
        tunnels = {s.data: s.tunnel.tunnel_id for s in handler.seen}
        assert tunnels[hello(b"one")] != tunnels[hello(b"two")]
        nursery.cancel_scope.cancel()


async def test_association_table_is_bounded(ids: SimpleNamespace, clock: MockClock) -> None:
    handler = RecordingEngine(reply=admit)  # both are admitted when the KMF answers
    async with trio.open_nursery() as nursery:
        server = await start_kmf(nursery, ids, handler)
        config = mdd_config(ids.mdd, server.address, ids.kmf.fingerprint, max_associations=1)
        relay = await start_mdd(nursery, config)
        await until(lambda: relay.tunnel_is_up)
        a, b = await endpoint(), await endpoint()
        with a, b:
            await a.sendto(DTLS, relay.address)
            await b.sendto(DTLS, relay.address)
            await until(lambda: relay.stats.dropped_table_full == 1)
        assert relay.stats.dropped_table_full == 1
        assert len(relay.associations) == 1
        nursery.cancel_scope.cancel()


def test_endpoint_disconnect_encoding_used_by_mdd() -> None:
    # The MDD sends exactly RFC 9185's 19-byte EndpointDisconnect.
    assert encode_message(EndpointDisconnect(AID)) == bytes.fromhex("050010") + AID.bytes


async def test_handler_failure_closes_only_that_tunnel(
    ids: SimpleNamespace, clock: MockClock
) -> None:
    class Exploding(RecordingEngine):
        def on_dtls(
            self, tunnel: Tunnel, association_id: uuid.UUID, data: bytes, now: float
        ) -> None:
            super().on_dtls(tunnel, association_id, data, now)
            if data == hello(b"boom"):
                raise RuntimeError("handler bug")

    handler = Exploding()
    async with trio.open_nursery() as nursery:
        server = await start_kmf(nursery, ids, handler)
        relay = await start_mdd(nursery, mdd_config(ids.mdd, server.address, ids.kmf.fingerprint))
        await until(lambda: relay.tunnel_is_up)
        sock = await endpoint()
        with sock:
            await sock.sendto(hello(b"boom"), relay.address)
            await until(lambda: server.stats.engine_errors == 1)
            # The KMF keeps running; the MDD reconnects and the relay works again.
            await until(lambda: relay.stats.tunnels_up == 2 and relay.tunnel_is_up)
            await sock.sendto(hello(b"fine"), relay.address)
            await until(lambda: handler.seen[-1].data == hello(b"fine"))
        assert len(handler.down) == 1
        closed = handler.down[0].tunnel_id  # a closed tunnel refuses messages
        assert not handler.send(closed, TunneledDtls(uuid.uuid4(), b"\x16"))
        assert not server.send(closed, TunneledDtls(uuid.uuid4(), b"\x16"))
        nursery.cancel_scope.cancel()


async def test_ipv6_endpoints(ids: SimpleNamespace, clock: MockClock) -> None:
    handler = RecordingEngine(reply=lambda data: b"\x17" + data)
    async with trio.open_nursery() as nursery:
        server = await start_kmf(nursery, ids, handler)
        config = mdd_config(ids.mdd, server.address, ids.kmf.fingerprint, listen_host="::1")
        relay = await start_mdd(nursery, config)
        await until(lambda: relay.tunnel_is_up)
        sock = trio.socket.socket(trio.socket.AF_INET6, trio.socket.SOCK_DGRAM)
        with sock:
            await sock.bind(("::1", 0))
            await sock.sendto(DTLS, relay.address)
            with trio.fail_after(5):
                data, _ = await sock.recvfrom(2048)
            assert data == b"\x17" + DTLS
            first = handler.seen[0]
            server.send(first.tunnel.tunnel_id, EndpointDisconnect(first.association_id))
            await until(lambda: not relay.associations)
            await sock.sendto(DTLS, relay.address)
            await until(lambda: len(handler.seen) == 2)
        assert handler.seen[1].association_id != first.association_id
        assert len(relay.associations) == 1
        nursery.cancel_scope.cancel()
