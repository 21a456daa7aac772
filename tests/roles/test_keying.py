"""KMF keying over real loopback TLS and UDP: endpoint -> MDD -> tunnel -> KMF and back.

The endpoints are perc's own sans-IO DTLS clients (tests/roles/join_helpers.py); the KMF runs
:class:`perc.kmf.KmfEngine` under its shell :mod:`perc.roles.kmf`; everything is in one trio
process under MockClock. The last tests drive the engine in memory (tests/kmf_memory.py).
"""

from __future__ import annotations

import logging
import random
import stat
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import attrs
import pytest
import trio
from trio.testing import MockClock

import perc.mdd
from perc import identity
from perc.config import KmfConfig
from perc.dtls import DtlsConfiguration, DtlsConnection, events
from perc.dtls.errors import AlertDescription
from perc.events import (
    AssociationKeyed,
    Denied,
    HandshakeFailed,
    Joined,
    Left,
    Rekeyed,
    RekeyFailed,
)
from perc.forwarding import Association
from perc.keying import EktKeyMaterial, KeyingError, key_digest
from perc.kmf import KmfEngine
from perc.mdd import Address
from perc.roles import kmf, mdd
from perc.srtp.keys import outer_media_keys
from perc.wire.tunnel import TunneledDtls

from ..kmf_memory import MemoryKmf, client, endpoint_events, pump
from .helpers import logged_events, mdd_config, until
from .join_helpers import JoinResult, join_once, keying_kmf_config


def with_policy(config: KmfConfig, **policy: object) -> KmfConfig:
    """The config with every conference's rekey settings changed (D22), e.g. no rekeys."""
    return attrs.evolve(
        config, conferences=tuple(attrs.evolve(c, **policy) for c in config.conferences)
    )


NO_REKEY = {"rekey_on_join": False, "rekey_on_leave": False}


@pytest.fixture(scope="module")
def people() -> SimpleNamespace:
    return SimpleNamespace(
        members=[identity.generate(f"ep{i}") for i in range(20)],
        outsider=identity.generate("outsider"),
    )


@pytest.fixture
def memory_clock() -> MockClock:
    """For in-memory tests (no sockets): virtual time jumps as soon as every task waits."""
    return MockClock(autojump_threshold=0)


class Setup:
    def __init__(self, ids: SimpleNamespace, config: KmfConfig, **engine_args: object) -> None:
        self.ids = ids
        self.config = config
        self.kmf_lines: list[str] = []
        self.engine = KmfEngine(config, keylog=self.kmf_lines.append, **engine_args)  # type: ignore[arg-type]
        self.server: kmf.KmfServer | None = None
        self.results: list[JoinResult] = []

    @property
    def kmf(self) -> kmf.KmfServer:
        assert self.server is not None
        return self.server

    @asynccontextmanager
    async def running(self) -> AsyncIterator[trio.Nursery]:
        """A nursery with the KMF started; closes the endpoints' sockets and cancels at the end."""
        try:
            async with trio.open_nursery() as nursery:
                self.server = await nursery.start(
                    partial(kmf.serve, self.config, engine=self.engine)
                )
                try:
                    yield nursery
                finally:
                    nursery.cancel_scope.cancel()
        finally:
            for result in self.results:
                result.socket.close()

    async def start_mdd(
        self, nursery: trio.Nursery, ident: identity.Identity | None = None, **kw: object
    ) -> mdd.ConferenceRelay:
        assert self.server is not None
        config = mdd_config(
            ident or self.ids.mdd,
            self.server.address,
            self.ids.kmf.fingerprint,
            **kw,  # type: ignore[arg-type]
        )
        server: mdd.MddServer = await nursery.start(partial(mdd.serve, config))
        relay = next(iter(server.conferences.values()))
        await until(lambda: relay.tunnel_is_up)
        return relay

    async def join(
        self, relay: mdd.ConferenceRelay, ident: identity.Identity, **kw: object
    ) -> JoinResult:
        result = await join_once(relay.address, ident, self.ids.kmf.fingerprint, **kw)  # type: ignore[arg-type]
        self.results.append(result)
        return result


def mdd_association(relay: mdd.ConferenceRelay, result: JoinResult) -> Association[Address]:
    return next(a for a in relay.associations.values() if a.address == result.local_address)


def assert_conference_key(engine: KmfEngine, result: JoinResult, conference: str) -> None:
    key = engine.state.conferences[conference].current
    assert key is not None and result.ekt_key is not None
    assert key.same_key(result.ekt_key.key, result.ekt_key.salt, result.ekt_key.spi)
    assert result.ekt_key.ttl == key.ttl
    assert len(result.ekt_key.salt) == 12


async def test_one_endpoint_joins(
    ids: SimpleNamespace,
    people: SimpleNamespace,
    clock: MockClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="perc.roles")
    alice = people.members[0]
    setup = Setup(ids, keying_kmf_config(ids.kmf, [ids.mdd], {"demo": [alice]}))
    async with setup.running() as nursery:
        relay = await setup.start_mdd(nursery)
        result = await setup.join(relay, alice, kmf_tls_id=setup.engine.tls_id)
        assert result.joined, result.closed
        done = result.completed
        assert done is not None and done.srtp_keying_material is not None
        assert done.srtp_profile == 0x0009  # kmf.profiles order, both offered and listed (D18)
        assert done.ekt_cipher == 2  # AESKW256 preferred (RFC 8870 §6)
        assert done.peer_tls_id == setup.engine.tls_id
        assert len(result.ekt_key.key) == 32  # type: ignore[union-attr]
        assert_conference_key(setup.engine, result, "demo")
        # The MDD holds exactly the outer halves of the endpoint's exporter output (D4).
        await until(lambda: mdd_association(relay, result).media_keys is not None)
        keys = mdd_association(relay, result).media_keys
        assert keys is not None
        assert keys.protection_profile == 0x0009
        outer = (
            keys.client_write_master_key,
            keys.server_write_master_key,
            keys.client_write_master_salt,
            keys.server_write_master_salt,
        )
        assert outer == outer_media_keys(done.srtp_profile, done.srtp_keying_material)
        assert keys.mki == b""
        assert not any(part.hex() in repr(keys) for part in outer)
        # The logs carry digests only: the MDD's of its keys, the KMF's of the EKTKey.
        digest = key_digest(*outer)
        key = result.ekt_key
        assert key is not None
        aid = mdd_association(relay, result).association_id
        (keyed,) = logged_events(caplog, AssociationKeyed, conference="demo", association=aid)
        assert keyed.keys == digest
        (rekeyed,) = logged_events(caplog, Rekeyed, conference="demo", spi=key.spi)
        assert (rekeyed.cipher, rekeyed.ttl) == (2, 86400)
        assert rekeyed.key == key_digest(key.key, key.salt)
        assert logged_events(caplog, Joined, conference="demo", association=aid)
        text = caplog.text  # what people read holds no key either
        assert key.key.hex() not in text and not any(part.hex() in text for part in outer)
        # The EKTKey is acknowledged (D9) and the endpoint is a member.
        await until(lambda: setup.engine.stats.ekt_keys_acknowledged == 1)
        conf = setup.engine.state.conferences["demo"]
        assert [m.fingerprint for m in conf.members.values()] == [alice.fingerprint]
        member = next(iter(conf.members.values()))
        assert member.association_id == mdd_association(relay, result).association_id
        # D21: both sides logged the same NSS line.
        assert len(result.keylog_lines) == 1
        assert setup.kmf_lines == result.keylog_lines
        assert result.keylog_lines[0].startswith("CLIENT_RANDOM ")
        stats = setup.engine.stats
        assert (stats.joined, stats.cookies_sent, stats.media_keys_sent, stats.refused) == (
            1,
            1,
            1,
            0,
        )
        nursery.cancel_scope.cancel()


async def test_kmf_profile_preference(
    ids: SimpleNamespace, people: SimpleNamespace, clock: MockClock
) -> None:
    alice = people.members[0]
    config = keying_kmf_config(ids.kmf, [ids.mdd], {"demo": [alice]}, profiles=(0x000A, 0x0009))
    setup = Setup(ids, config)
    async with setup.running() as nursery:
        relay = await setup.start_mdd(nursery)
        result = await setup.join(relay, alice)
        assert result.joined
        assert result.completed.srtp_profile == 0x000A  # type: ignore[union-attr]
        await until(lambda: mdd_association(relay, result).media_keys is not None)
        keys = mdd_association(relay, result).media_keys
        assert keys is not None and len(keys.client_write_master_key) == 32
        assert len(keys.client_write_master_salt) == 12
        nursery.cancel_scope.cancel()


async def test_outsider_gets_access_denied_and_mdd_is_told(
    ids: SimpleNamespace, people: SimpleNamespace, clock: MockClock
) -> None:
    setup = Setup(ids, keying_kmf_config(ids.kmf, [ids.mdd], {"demo": people.members[:2]}))
    async with setup.running() as nursery:
        relay = await setup.start_mdd(nursery)
        result = await setup.join(relay, people.outsider)
        assert not result.joined
        assert result.ekt_key is None
        assert result.alert_received == AlertDescription.access_denied
        await until(lambda: relay.stats.associations_ended_by_kmf == 1)
        assert relay.associations == {}
        assert relay.stats.media_keys == 0
        assert setup.engine.stats.refused == 1
        assert setup.engine.stats.disconnects_sent == 1
        assert setup.engine.associations == {}
        assert setup.engine.state.conferences["demo"].current is None
        nursery.cancel_scope.cancel()


async def test_tls_id_on_the_roster_is_checked(
    ids: SimpleNamespace, people: SimpleNamespace, clock: MockClock
) -> None:
    alice = people.members[0]
    expected = "alice-tls-id-0123456789"
    config = keying_kmf_config(
        ids.kmf, [ids.mdd], {"demo": [alice]}, tls_ids={"demo": {alice: expected}}
    )
    setup = Setup(ids, config)
    async with setup.running() as nursery:
        relay = await setup.start_mdd(nursery)
        wrong = await setup.join(relay, alice, tls_id=b"someone-else-0123456789")
        assert wrong.alert_received == AlertDescription.access_denied
        missing = await setup.join(relay, alice, send_tls_id=False)
        assert missing.alert_received == AlertDescription.access_denied
        right = await setup.join(relay, alice, tls_id=expected.encode())
        assert right.joined
        assert setup.engine.stats.refused == 2
        nursery.cancel_scope.cancel()


async def test_mdd_without_a_common_profile_gets_handshake_failure(
    ids: SimpleNamespace, people: SimpleNamespace, clock: MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    alice = people.members[0]
    monkeypatch.setattr(perc.mdd, "MDD_PROFILES", (0x000A,))
    setup = Setup(ids, keying_kmf_config(ids.kmf, [ids.mdd], {"demo": [alice]}))
    async with setup.running() as nursery:
        server = setup.kmf
        relay = await setup.start_mdd(nursery)
        tunnel = next(iter(server.engine.tunnels.values()))
        assert tunnel.protection_profiles == (0x000A,)
        result = await setup.join(relay, alice, profiles=(0x0009,))
        assert result.alert_received == AlertDescription.handshake_failure
        await until(lambda: relay.stats.associations_ended_by_kmf == 1)
        assert setup.engine.stats.refused == 1
        nursery.cancel_scope.cancel()


async def test_twenty_concurrent_joins_share_one_ekt_key(
    ids: SimpleNamespace, people: SimpleNamespace, clock: MockClock
) -> None:
    config = keying_kmf_config(ids.kmf, [ids.mdd], {"demo": people.members})
    setup = Setup(ids, with_policy(config, **NO_REKEY))
    results: list[JoinResult] = []

    async def one(ident: identity.Identity) -> None:
        results.append(await setup.join(relay, ident))

    async with setup.running() as nursery:
        relay = await setup.start_mdd(nursery)
        async with trio.open_nursery() as joins:
            for ident in people.members:
                joins.start_soon(one, ident)
        assert len(results) == 20
        assert all(r.joined for r in results), [r.closed for r in results if not r.joined]
        assert len({(r.ekt_key.spi, r.ekt_key.key, r.ekt_key.salt) for r in results}) == 1  # type: ignore[union-attr]
        assert_conference_key(setup.engine, results[0], "demo")
        assert len(setup.engine.state.conferences["demo"].members) == 20
        await until(lambda: relay.stats.media_keys == 20)
        await until(lambda: setup.engine.stats.ekt_keys_acknowledged == 20)
        nursery.cancel_scope.cancel()


async def test_two_mdds_serve_one_conference_with_one_key(
    ids: SimpleNamespace, people: SimpleNamespace, clock: MockClock
) -> None:
    a, b = people.members[:2]
    config = keying_kmf_config(ids.kmf, [ids.mdd, ids.mdd2], {"demo": [a, b]})
    setup = Setup(ids, with_policy(config, **NO_REKEY))
    async with setup.running() as nursery:
        relay1 = await setup.start_mdd(nursery, ids.mdd)
        relay2 = await setup.start_mdd(nursery, ids.mdd2)
        ra = await setup.join(relay1, a)
        rb = await setup.join(relay2, b)
        assert ra.joined and rb.joined
        assert ra.ekt_key == rb.ekt_key
        assert_conference_key(setup.engine, ra, "demo")
        # Each MDD got the MediaKeys of its own endpoint only.
        await until(lambda: relay1.stats.media_keys == 1 and relay2.stats.media_keys == 1)
        assert mdd_association(relay1, ra).has_keys
        assert mdd_association(relay2, rb).has_keys
        members = setup.engine.state.conferences["demo"].members.values()
        assert {m.tunnel.mdd_fingerprint for m in members} == {  # type: ignore[attr-defined]
            ids.mdd.fingerprint,
            ids.mdd2.fingerprint,
        }
        nursery.cancel_scope.cancel()


async def test_idle_endpoint_disconnect_from_mdd_tears_down(
    ids: SimpleNamespace, people: SimpleNamespace, clock: MockClock
) -> None:
    a, b = people.members[:2]
    setup = Setup(ids, keying_kmf_config(ids.kmf, [ids.mdd], {"demo": [a, b]}))
    async with setup.running() as nursery:
        relay = await setup.start_mdd(nursery, idle_timeout=3.0)
        ra = await setup.join(relay, a)
        assert ra.joined
        joined_at = trio.current_time()
        conf = setup.engine.state.conferences["demo"]
        assert len(conf.members) == 1
        # The endpoint goes silent: the MDD's idle timeout (D3) ends it at the KMF.
        await until(lambda: setup.engine.stats.ended_by_mdd == 1)
        assert trio.current_time() - joined_at >= 3.0
        assert setup.engine.associations == {}
        assert conf.members == {}
        assert conf.current is None  # the last member took the key with it
        assert setup.engine.stats.left == 1
        assert setup.engine.stats.disconnects_sent == 0  # the MDD ended it, not us
        nursery.cancel_scope.cancel()


async def test_endpoint_close_notify_ends_membership_and_tells_mdd(
    ids: SimpleNamespace, people: SimpleNamespace, clock: MockClock
) -> None:
    a, b = people.members[:2]
    config = keying_kmf_config(ids.kmf, [ids.mdd], {"demo": [a, b]})
    setup = Setup(ids, with_policy(config, **NO_REKEY))  # (tests/roles/test_rekey.py: rekeys)
    async with setup.running() as nursery:
        relay = await setup.start_mdd(nursery)
        ra = await setup.join(relay, a)
        rb = await setup.join(relay, b)
        assert ra.joined and rb.joined
        await ra.leave()
        await until(lambda: relay.stats.associations_ended_by_kmf == 1)
        conf = setup.engine.state.conferences["demo"]
        assert [m.fingerprint for m in conf.members.values()] == [b.fingerprint]
        assert conf.current is not None and conf.current.spi == rb.ekt_key.spi  # type: ignore[union-attr]
        assert setup.engine.stats.left == 1
        assert setup.engine.stats.disconnects_sent == 1
        assert len(relay.associations) == 1
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("cookies", [True, False])
async def test_cookies_on_and_off(
    ids: SimpleNamespace, people: SimpleNamespace, clock: MockClock, cookies: bool
) -> None:
    alice = people.members[0]
    config = keying_kmf_config(ids.kmf, [ids.mdd], {"demo": [alice]}, dtls_cookies=cookies)
    setup = Setup(ids, config)
    async with setup.running() as nursery:
        relay = await setup.start_mdd(nursery)
        result = await setup.join(relay, alice)
        assert result.joined
        assert setup.engine.stats.cookies_sent == (1 if cookies else 0)
        assert setup.engine.stats.associations_created == 1
        nursery.cancel_scope.cancel()


async def test_no_state_before_a_valid_cookie(
    ids: SimpleNamespace, people: SimpleNamespace, clock: MockClock
) -> None:
    """ClientHellos without a cookie and junk datagrams leave no association behind (D14)."""
    setup = Setup(ids, keying_kmf_config(ids.kmf, [ids.mdd], {"demo": people.members[:1]}))
    async with setup.running() as nursery:
        server = setup.kmf
        await setup.start_mdd(nursery)
        tunnel = next(iter(server.engine.tunnels.values()))
        engine = setup.engine
        client = DtlsConnection(
            DtlsConfiguration(
                is_client=True,
                certificate=people.members[0].certificate,
                private_key=people.members[0].private_key,
            )
        )
        client.connect(0.0)
        (hello,) = client.datagrams_to_send()
        junk = TunneledDtls(uuid.uuid4(), b"\x17\xfe\xfd" + bytes(20))
        hellos = [TunneledDtls(uuid.uuid4(), hello) for _ in range(50)]
        engine.receive_messages(tunnel.tunnel_id, [*hellos, junk], trio.current_time())
        server.service()
        assert engine.associations == {}
        assert engine.stats.cookies_sent == 50
        assert engine.stats.dropped_no_association == 1
        nursery.cancel_scope.cancel()


async def test_association_bound_is_counted(
    ids: SimpleNamespace, people: SimpleNamespace, clock: MockClock
) -> None:
    alice, bob = people.members[:2]
    config = keying_kmf_config(ids.kmf, [ids.mdd], {"demo": [alice, bob]}, dtls_cookies=False)
    setup = Setup(ids, config, max_associations=1)
    async with setup.running() as nursery:
        relay = await setup.start_mdd(nursery)
        ra = await setup.join(relay, alice)
        assert ra.joined
        rb = await setup.join(relay, bob, timeout=3.0)
        assert not rb.joined
        assert setup.engine.stats.dropped_capacity >= 1
        nursery.cancel_scope.cancel()


async def test_handshake_timeout_ends_association_and_tells_mdd(
    ids: SimpleNamespace, people: SimpleNamespace, clock: MockClock
) -> None:
    """An endpoint that stops mid-handshake: the KMF's timer task ends it (heap timers)."""
    alice = people.members[0]
    config = keying_kmf_config(ids.kmf, [ids.mdd], {"demo": [alice]}, dtls_cookies=False)
    setup = Setup(ids, config, dtls_handshake_timeout=4.0)
    async with setup.running() as nursery:
        relay = await setup.start_mdd(nursery, idle_timeout=60.0)
        client = DtlsConnection(
            DtlsConfiguration(
                is_client=True, certificate=alice.certificate, private_key=alice.private_key
            )
        )
        client.connect(trio.current_time())
        sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
        await sock.bind(("127.0.0.1", 0))
        for datagram in client.datagrams_to_send():
            await sock.sendto(datagram, relay.address)
        await until(lambda: len(setup.engine.associations) == 1)
        started = trio.current_time()
        # The KMF retransmits its flight on its timers, then gives up at the deadline.
        await until(lambda: setup.engine.stats.failed == 1)
        assert 3.5 <= trio.current_time() - started <= 6.0
        await until(lambda: relay.stats.associations_ended_by_kmf == 1)
        assert setup.engine.associations == {}
        assert setup.engine.stats.timer_wakeups >= 2
        sock.close()
        nursery.cancel_scope.cancel()


async def test_restarted_endpoint_on_the_same_address_rejoins(
    ids: SimpleNamespace, people: SimpleNamespace, clock: MockClock
) -> None:
    alice = people.members[0]
    setup = Setup(ids, keying_kmf_config(ids.kmf, [ids.mdd], {"demo": [alice]}))
    async with setup.running() as nursery:
        relay = await setup.start_mdd(nursery)
        first = await setup.join(relay, alice)
        assert first.joined
        second = await setup.join(relay, alice, sock=first.socket)
        assert second.joined
        assert setup.engine.stats.restarts == 1
        assert len(setup.engine.associations) == 1
        assert len(setup.engine.state.conferences["demo"].members) == 1
        await until(lambda: relay.stats.media_keys == 2)
        assert len(relay.associations) == 1
        keys = mdd_association(relay, second).media_keys
        done = second.completed
        assert keys is not None and done is not None and done.srtp_keying_material is not None
        outer = outer_media_keys(done.srtp_profile, done.srtp_keying_material)  # type: ignore[arg-type]
        assert keys.client_write_master_key == outer[0]
        nursery.cancel_scope.cancel()


async def test_rekey_hook_sends_a_new_key_to_every_member(
    ids: SimpleNamespace, people: SimpleNamespace, clock: MockClock
) -> None:
    a, b = people.members[:2]
    config = keying_kmf_config(ids.kmf, [ids.mdd], {"demo": [a, b]})
    setup = Setup(ids, with_policy(config, **NO_REKEY))  # the hook alone
    async with setup.running() as nursery:
        relay = await setup.start_mdd(nursery)
        ra = await setup.join(relay, a)
        rb = await setup.join(relay, b)
        assert ra.ekt_key == rb.ekt_key
        nursery.start_soon(ra.serve)
        nursery.start_soon(rb.serve)
        # (a rekey before the first ACK arrived would supersede the first key, D22)
        await until(lambda: setup.engine.stats.ekt_keys_acknowledged == 2)
        old = setup.engine.state.conferences["demo"].current
        new = setup.engine.rekey("demo", trio.current_time())
        setup.kmf.service()  # the shell sends what the engine queued
        assert new is not None and old is not None and new.spi != old.spi and new.key != old.key
        await until(lambda: setup.engine.stats.ekt_keys_acknowledged == 4)
        for r in (ra, rb):
            assert [k.spi for k in r.ekt_keys] == [old.spi, new.spi]
            assert new.same_key(r.ekt_keys[-1].key, r.ekt_keys[-1].salt, r.ekt_keys[-1].spi)
        nursery.cancel_scope.cancel()


async def test_kmf_serve_honours_sslkeylogfile(
    ids: SimpleNamespace,
    people: SimpleNamespace,
    clock: MockClock,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """D21: ``kmf.serve`` without a handler appends the NSS line the client also computes."""
    alice = people.members[0]
    path = tmp_path / "keys.log"
    monkeypatch.setenv("SSLKEYLOGFILE", str(path))
    config = keying_kmf_config(ids.kmf, [ids.mdd], {"demo": [alice]})
    sockets = []
    async with trio.open_nursery() as nursery:
        server: kmf.KmfServer = await nursery.start(partial(kmf.serve, config))
        assert isinstance(server.engine, KmfEngine)
        relay_server: mdd.MddServer = await nursery.start(
            partial(mdd.serve, mdd_config(ids.mdd, server.address, ids.kmf.fingerprint))
        )
        relay = relay_server.conferences["demo"]
        await until(lambda: relay.tunnel_is_up)
        result = await join_once(relay.address, alice, ids.kmf.fingerprint)
        sockets.append(result.socket)
        assert result.joined
        nursery.cancel_scope.cancel()
    for sock in sockets:
        sock.close()
    # the tunnel's TLS 1.3 lines share the file (tests/roles/test_tunnel_keylog.py)
    lines = path.read_text().splitlines()
    assert [x for x in lines if x.startswith("CLIENT_RANDOM ")] == result.keylog_lines
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


async def test_srtp_before_keys_is_dropped_and_counted(
    ids: SimpleNamespace, people: SimpleNamespace, clock: MockClock
) -> None:
    alice = people.members[0]
    setup = Setup(ids, keying_kmf_config(ids.kmf, [ids.mdd], {"demo": [alice]}))
    rtp = bytes([0x80, 111]) + bytes(10) + bytes(40)
    async with setup.running() as nursery:
        relay = await setup.start_mdd(nursery)
        sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
        await sock.bind(("127.0.0.1", 0))
        # From an address with no association at all.
        await sock.sendto(rtp, relay.address)
        await until(lambda: relay.stats.dropped_srtp_no_keys == 1)
        # A ClientHello creates the MDD association; SRTP before its MediaKeys is dropped.
        client = DtlsConnection(
            DtlsConfiguration(
                is_client=True, certificate=alice.certificate, private_key=alice.private_key
            )
        )
        client.connect(trio.current_time())
        for datagram in client.datagrams_to_send():
            await sock.sendto(datagram, relay.address)
        await until(lambda: len(relay.associations) == 1)
        # Still pending (the KMF answered with its cookie): SRTP is not even held (D5 holds
        # only for an association the KMF has let past its cookie check).
        await sock.sendto(rtp, relay.address)
        await until(lambda: relay.engine.admission_stats.dropped_pending_srtp == 1)
        pending = next(iter(relay.associations.values()))
        assert pending.counters.received == 0 and not pending.has_keys
        # Join from the same socket (a fresh ClientHello: the KMF restarts the association).
        result = await setup.join(relay, alice, sock=sock)
        assert result.joined
        assoc = relay.engine.table.association_for(sock.getsockname())
        assert assoc is not None
        await until(lambda: assoc.has_keys)
        await sock.sendto(rtp, relay.address)
        await until(lambda: assoc.counters.received == 1)
        assert relay.stats.dropped_srtp_no_keys == 1
        sock.close()


async def test_one_ekt_cipher_per_conference(
    ids: SimpleNamespace, people: SimpleNamespace, clock: MockClock
) -> None:
    a, b, c = people.members[:3]
    setup = Setup(ids, keying_kmf_config(ids.kmf, [ids.mdd], {"demo": [a, b, c]}))
    async with setup.running() as nursery:
        relay = await setup.start_mdd(nursery)
        # The first member offers only AESKW128: the conference's key is a 16-byte one.
        ra = await setup.join(relay, a, ekt_ciphers=(1,))
        assert ra.joined and len(ra.ekt_key.key) == 16  # type: ignore[union-attr]
        # The KMF selects AESKW256 for an endpoint offering both: not the conference's cipher.
        rb = await setup.join(relay, b)
        assert rb.alert_received == AlertDescription.handshake_failure
        # No EKT at all: PERC needs it.
        rc = await setup.join(relay, c, ekt_ciphers=())
        assert rc.alert_received == AlertDescription.handshake_failure
        assert setup.engine.stats.refused == 2
        await until(lambda: relay.stats.associations_ended_by_kmf == 2)


async def test_endpoint_refusing_the_kmf_ends_the_association(
    ids: SimpleNamespace, people: SimpleNamespace, clock: MockClock
) -> None:
    alice = people.members[0]
    setup = Setup(ids, keying_kmf_config(ids.kmf, [ids.mdd], {"demo": [alice]}))
    async with setup.running() as nursery:
        relay = await setup.start_mdd(nursery)
        result = await join_once(relay.address, alice, ids.stranger.fingerprint)
        setup.results.append(result)
        assert result.closed is not None and not result.closed.sent_by_peer
        assert result.closed.alert == AlertDescription.bad_certificate
        await until(lambda: setup.engine.stats.failed == 1)
        await until(lambda: relay.stats.associations_ended_by_kmf == 1)
        assert setup.engine.state.conferences["demo"].members == {}
        assert relay.stats.media_keys == 0


# --- in memory: the engine under a fake shell (tests/kmf_memory.py), a fake clock ----------------


def test_answers_follow_a_reconnected_mdd(ids: SimpleNamespace, people: SimpleNamespace) -> None:
    """After the tunnel that carried a joined endpoint closes, a rekey reaches it through the
    same MDD's new tunnel."""
    alice = people.members[0]
    mem = MemoryKmf(keying_kmf_config(ids.kmf, [ids.mdd], {"demo": [alice]}))
    old, other_mdd = mem.tunnel(ids.mdd.fingerprint), mem.tunnel(ids.mdd2.fingerprint)
    endpoint, aid = client(alice), uuid.uuid4()
    endpoint.connect(mem.now)
    pump(mem, endpoint, aid, old)
    assert mem.engine.stats.joined == 1
    assert [k.association_id for k in old.media_keys] == [aid]
    first_key = mem.engine.state.conferences["demo"].current
    # The tunnel drops; the MDD reconnects with a new one.
    old.close()
    new = mem.tunnel(ids.mdd.fingerprint)
    key = mem.rekey("demo")
    assert isinstance(key, EktKeyMaterial) and first_key is not None
    assert key.spi != first_key.spi
    assert [a for a, _ in new.dtls] == [aid]
    assert other_mdd.dtls == []  # another MDD never gets this endpoint's DTLS
    pump(mem, endpoint, aid, new)
    received = [e.spi for e in endpoint_events(endpoint) if isinstance(e, events.EktKeyReceived)]
    assert received == [first_key.spi, key.spi]
    assert mem.engine.stats.ekt_keys_acknowledged == 2


@pytest.mark.parametrize("seed", range(4))
def test_join_under_loss_with_heap_timers(
    ids: SimpleNamespace, people: SimpleNamespace, seed: int
) -> None:
    """30% loss each way between the client and the engine: the KMF's flights and its EKTKey
    are retransmitted on the engine's timer until the client ACKs."""
    rng = random.Random(seed)
    alice = people.members[0]
    mem = MemoryKmf(keying_kmf_config(ids.kmf, [ids.mdd], {"demo": [alice]}))
    tunnel = mem.tunnel(ids.mdd.fingerprint)
    endpoint, aid = client(alice), uuid.uuid4()
    got_key = False
    fired = 0
    endpoint.connect(mem.now)
    while not (got_key and mem.engine.stats.ekt_keys_acknowledged == 1):
        assert mem.now < 120
        for datagram in endpoint.datagrams_to_send():
            if rng.random() >= 0.3:
                tunnel.deliver(aid, datagram)
        for datagram in tunnel.take_dtls():
            if rng.random() >= 0.3:
                endpoint.receive_datagram(datagram, mem.now)
        for event in endpoint_events(endpoint):
            assert not isinstance(event, events.ConnectionClosed), event
            got_key = got_key or isinstance(event, events.EktKeyReceived)
        timer = endpoint.get_timer()
        if timer is not None and timer <= mem.now:
            endpoint.handle_timer(mem.now)
        fired += mem.advance(mem.now + 0.05)
    assert mem.engine.stats.joined == 1
    assert len(tunnel.media_keys) == 1
    assert mem.engine.stats.timer_wakeups == fired  # one count per firing


def test_many_stalled_handshakes_share_one_timer(
    ids: SimpleNamespace, people: SimpleNamespace
) -> None:
    """300 endpoints stop after their ClientHello: the engine retransmits every server flight
    and ends every association at its deadline, its timer firing once per distinct deadline,
    not per association; each end is reported to the MDD."""
    alice = people.members[0]
    config = keying_kmf_config(ids.kmf, [ids.mdd], {"demo": [alice]}, dtls_cookies=False)
    mem = MemoryKmf(config, dtls_handshake_timeout=5.0)
    tunnel = mem.tunnel(ids.mdd.fingerprint)
    aids = [uuid.uuid4() for _ in range(300)]
    for aid in aids:
        endpoint = client(alice, tls_id=None)
        endpoint.connect(mem.now)
        for datagram in endpoint.datagrams_to_send():
            tunnel.deliver(aid, datagram)
    assert len(mem.engine.associations) == 300
    first_flights = len(tunnel.dtls)
    fired = mem.advance(5.0)
    assert mem.engine.stats.failed == 300
    assert mem.engine.associations == {}
    assert sorted(tunnel.disconnects) == sorted(aids)
    assert len(tunnel.dtls) > first_flights  # flights were retransmitted on the timers
    # deadlines 1 s, 3 s (backed off) and 5 s, shared by all: a handful of firings
    assert 1 <= fired < 20
    assert len(mem.of(HandshakeFailed)) == 300


def test_answers_go_through_the_latest_tunnel_and_disconnects_end_handshakes(
    ids: SimpleNamespace, people: SimpleNamespace
) -> None:
    alice = people.members[0]
    mem = MemoryKmf(keying_kmf_config(ids.kmf, [ids.mdd], {"demo": [alice]}, dtls_cookies=False))
    t1, t2 = mem.tunnel(ids.mdd.fingerprint), mem.tunnel(ids.mdd.fingerprint)
    endpoint, aid = client(alice), uuid.uuid4()
    endpoint.connect(mem.now)
    for datagram in endpoint.datagrams_to_send():
        t1.deliver(aid, datagram)
    assert t1.dtls and not t2.dtls  # flight 2 answers the carrying tunnel
    for datagram in t1.take_dtls():
        endpoint.receive_datagram(datagram, mem.now)
    # The client's flight 5 arrives over the other tunnel: flight 6, MediaKeys, EKTKey go there.
    pump(mem, endpoint, aid, t2)
    assert mem.engine.stats.joined == 1
    assert [k.association_id for k in t2.media_keys] == [aid] and t1.media_keys == []
    # EndpointDisconnect for an unknown id is counted; for ours it ends the membership.
    t2.disconnect(uuid.uuid4())
    assert mem.engine.stats.unknown_disconnects == 1
    t1.disconnect(aid)
    stats = mem.engine.stats
    assert stats.ended_by_mdd == 1 and stats.left == 1
    assert mem.engine.associations == {} and mem.engine.state.conferences["demo"].members == {}
    assert t1.disconnects == t2.disconnects == []  # the MDD ended it: nothing to tell it
    # A second endpoint disconnected mid-handshake leaves no state either.
    other = uuid.uuid4()
    endpoint2 = client(alice)
    endpoint2.connect(mem.now)
    for datagram in endpoint2.datagrams_to_send():
        t1.deliver(other, datagram)
    assert other in mem.engine.associations
    t1.disconnect(other)
    assert mem.engine.associations == {}
    assert mem.engine.stats.failed == 1


def test_another_mdd_cannot_divert_or_end_an_association(
    ids: SimpleNamespace, people: SimpleNamespace
) -> None:
    alice = people.members[0]
    config = keying_kmf_config(ids.kmf, [ids.mdd, ids.mdd2], {"demo": [alice]}, dtls_cookies=False)
    mem = MemoryKmf(config)
    mine, theirs = mem.tunnel(ids.mdd.fingerprint), mem.tunnel(ids.mdd2.fingerprint)
    endpoint, aid = client(alice), uuid.uuid4()
    endpoint.connect(mem.now)
    for datagram in endpoint.datagrams_to_send():
        mine.deliver(aid, datagram)
    for datagram in mine.take_dtls():
        endpoint.receive_datagram(datagram, mem.now)
    # The client's flight 5 arrives through the other MDD: ignored, counted.
    for datagram in endpoint.datagrams_to_send():
        theirs.deliver(aid, datagram)
    theirs.disconnect(aid)
    assert mem.engine.stats.dropped_wrong_mdd >= 2
    assert theirs.dtls == [] and theirs.media_keys == []
    assert aid in mem.engine.associations and mem.engine.stats.joined == 0


def test_rekey_failure_is_counted_and_stops_that_conference_timer(
    ids: SimpleNamespace, people: SimpleNamespace
) -> None:
    alice = people.members[0]
    mem = MemoryKmf(keying_kmf_config(ids.kmf, [ids.mdd], {"demo": [alice]}))
    tunnel = mem.tunnel(ids.mdd.fingerprint)
    endpoint = client(alice)
    endpoint.connect(mem.now)
    pump(mem, endpoint, uuid.uuid4(), tunnel)
    engine = mem.engine
    assert engine.stats.joined == 1
    assert "demo" in engine.conference_timers  # the TTL refresh is armed
    conf = engine.state.conferences["demo"]

    def refuse(now: float, reason: str = "manual", *, immediate: bool = False) -> None:
        raise KeyingError("refused for the test")  # SPIs never run out (D28): simulate it

    conf.request_rekey = refuse  # type: ignore[method-assign]
    assert mem.rekey("demo") is None
    assert engine.stats.rekey_errors == 1 and engine.stats.rekeys == 0
    assert "demo" not in engine.conference_timers  # no spinning on a due timer
    (failed,) = mem.of(RekeyFailed)
    assert isinstance(failed, RekeyFailed) and failed.conference == "demo"


def _closed(endpoint: DtlsConnection) -> events.ConnectionClosed | None:
    return next(
        (e for e in endpoint_events(endpoint) if isinstance(e, events.ConnectionClosed)), None
    )


def test_media_keys_not_delivered_ends_the_association_with_internal_error(
    ids: SimpleNamespace, people: SimpleNamespace
) -> None:
    """The shell could not queue the MediaKeys (its tunnel was closing): the MDD cannot
    forward this endpoint's media, so the KMF ends the association with a fatal alert."""
    alice = people.members[0]
    mem = MemoryKmf(keying_kmf_config(ids.kmf, [ids.mdd], {"demo": [alice]}, dtls_cookies=False))
    tunnel = mem.tunnel(ids.mdd.fingerprint, refuse_media_keys=True)
    endpoint, aid = client(alice), uuid.uuid4()
    endpoint.connect(mem.now)
    pump(mem, endpoint, aid, tunnel)
    closed = _closed(endpoint)
    assert closed is not None and closed.sent_by_peer
    assert closed.alert == AlertDescription.internal_error  # a fatal alert, not close_notify
    assert mem.engine.stats.media_keys_failed == 1
    assert mem.engine.associations == {}
    assert mem.engine.state.conferences["demo"].members == {}
    assert tunnel.disconnects == [aid]
    (left,) = mem.of(Left)
    assert isinstance(left, Left) and left.reason.startswith("MediaKeys not delivered")


def test_cipher_fixed_by_another_member_mid_handshake_gets_handshake_failure(
    ids: SimpleNamespace, people: SimpleNamespace
) -> None:
    """The race the roster check cannot see: between this endpoint's admission and its
    Finished, another member fixes the conference's EKT cipher (one cipher per conference)."""
    alice = people.members[0]
    mem = MemoryKmf(keying_kmf_config(ids.kmf, [ids.mdd], {"demo": [alice]}, dtls_cookies=False))
    engine = mem.engine
    tunnel = mem.tunnel(ids.mdd.fingerprint)
    admit = engine._verify_peer

    def admit_then_race(assoc: object, peer: object) -> int | None:
        verdict = admit(assoc, peer)  # type: ignore[arg-type]
        # meanwhile another member started the conference with AESKW128
        engine.state.conferences["demo"].key_for(1, mem.now)
        return verdict

    engine._verify_peer = admit_then_race  # type: ignore[method-assign]
    endpoint, aid = client(alice), uuid.uuid4()  # negotiates AESKW256 (our preference)
    endpoint.connect(mem.now)
    pump(mem, endpoint, aid, tunnel)
    closed = _closed(endpoint)
    assert closed is not None and closed.sent_by_peer
    assert closed.alert == AlertDescription.handshake_failure
    assert engine.stats.refused == 1 and engine.stats.joined == 0
    assert tunnel.media_keys == [] and tunnel.disconnects == [aid]
    (denied,) = mem.of(Denied)
    assert isinstance(denied, Denied) and denied.alert == "handshake_failure"


async def test_key_is_refreshed_before_its_ttl_then_a_join_rekeys(
    ids: SimpleNamespace, people: SimpleNamespace, clock: MockClock
) -> None:
    a, b = people.members[:2]
    setup = Setup(ids, keying_kmf_config(ids.kmf, [ids.mdd], {"demo": [a, b]}, ekt_ttl=10))
    async with setup.running() as nursery:
        relay = await setup.start_mdd(nursery, idle_timeout=60.0)
        ra = await setup.join(relay, a)
        assert ra.joined and ra.ekt_key is not None and ra.ekt_key.ttl == 10
        joined_at = trio.current_time()
        nursery.start_soon(ra.serve)
        # RFC 8870 §5.2.2: the key must not be used past its TTL; a live conference gets a new
        # one a tenth of the TTL before (perc.keying.refresh_lead), without any join.
        await until(lambda: len(ra.ekt_keys) == 2)
        assert 9.0 <= trio.current_time() - joined_at < 10.0
        assert ra.ekt_keys[1].spi == (ra.ekt_keys[0].spi + 1) & 0xFFFF
        assert setup.engine.stats.rekeys == 1
        rb = await setup.join(relay, b)  # a join: one more rekey, both on it
        assert rb.joined and rb.ekt_key is not None
        await until(lambda: len(ra.ekt_keys) == 3)
        assert ra.ekt_keys[-1] == rb.ekt_key
        assert_conference_key(setup.engine, rb, "demo")
        nursery.cancel_scope.cancel()
