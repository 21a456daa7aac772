"""KMF keying over real loopback TLS and UDP: endpoint -> MDD -> tunnel -> KMF and back.

The endpoints are perc's own sans-IO DTLS clients (tests/roles/join_helpers.py); the KMF runs
:class:`perc.roles.keying.KeyingHandler`; everything is in one trio process under MockClock.
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
from perc.forwarding import Association
from perc.keying import key_digest
from perc.mdd import Address
from perc.roles import kmf, mdd
from perc.roles.keying import KeyingHandler
from perc.srtp.keys import outer_media_keys
from perc.wire.tunnel import MediaKeys

from .helpers import mdd_config, until
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
    def __init__(self, ids: SimpleNamespace, config: KmfConfig, **handler_args: object) -> None:
        self.ids = ids
        self.config = config
        self.kmf_lines: list[str] = []
        self.handler = KeyingHandler(config, keylog=self.kmf_lines.append, **handler_args)  # type: ignore[arg-type]
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
                    partial(kmf.serve, self.config, handler=self.handler)
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


def assert_conference_key(handler: KeyingHandler, result: JoinResult, conference: str) -> None:
    key = handler.state.conferences[conference].current
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
        result = await setup.join(relay, alice, kmf_tls_id=setup.handler.tls_id)
        assert result.joined, result.closed
        done = result.completed
        assert done is not None and done.srtp_keying_material is not None
        assert done.srtp_profile == 0x0009  # kmf.profiles order, both offered and listed (D18)
        assert done.ekt_cipher == 2  # AESKW256 preferred (RFC 8870 §6)
        assert done.peer_tls_id == setup.handler.tls_id
        assert len(result.ekt_key.key) == 32  # type: ignore[union-attr]
        assert_conference_key(setup.handler, result, "demo")
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
        text = caplog.text
        aid = mdd_association(relay, result).association_id
        assert f"keys installed conference=demo association={aid}" in text
        assert f"keys={digest}" in text
        ekt_digest = key_digest(key.key, key.salt)
        assert f"ektkey conference=demo spi={key.spi} cipher=2 ttl=86400 key={ekt_digest}" in text
        assert (
            f"joined conference=demo association={mdd_association(relay, result).association_id}"
            in text
        )
        assert key.key.hex() not in text and not any(part.hex() in text for part in outer)
        # The EKTKey is acknowledged (D9) and the endpoint is a member.
        await until(lambda: setup.handler.stats.ekt_keys_acknowledged == 1)
        conf = setup.handler.state.conferences["demo"]
        assert [m.fingerprint for m in conf.members.values()] == [alice.fingerprint]
        member = next(iter(conf.members.values()))
        assert member.association_id == mdd_association(relay, result).association_id
        # D21: both sides logged the same NSS line.
        assert len(result.keylog_lines) == 1
        assert setup.kmf_lines == result.keylog_lines
        assert result.keylog_lines[0].startswith("CLIENT_RANDOM ")
        stats = setup.handler.stats
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
        assert setup.handler.stats.refused == 1
        assert setup.handler.stats.disconnects_sent == 1
        assert setup.handler.associations == {}
        assert setup.handler.state.conferences["demo"].current is None
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
        assert setup.handler.stats.refused == 2
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
        tunnel = next(iter(server.tunnels.values()))
        assert tunnel.protection_profiles == (0x000A,)
        result = await setup.join(relay, alice, profiles=(0x0009,))
        assert result.alert_received == AlertDescription.handshake_failure
        await until(lambda: relay.stats.associations_ended_by_kmf == 1)
        assert setup.handler.stats.refused == 1
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
        assert_conference_key(setup.handler, results[0], "demo")
        assert len(setup.handler.state.conferences["demo"].members) == 20
        await until(lambda: relay.stats.media_keys == 20)
        await until(lambda: setup.handler.stats.ekt_keys_acknowledged == 20)
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
        assert_conference_key(setup.handler, ra, "demo")
        # Each MDD got the MediaKeys of its own endpoint only.
        await until(lambda: relay1.stats.media_keys == 1 and relay2.stats.media_keys == 1)
        assert mdd_association(relay1, ra).has_keys
        assert mdd_association(relay2, rb).has_keys
        members = setup.handler.state.conferences["demo"].members.values()
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
        conf = setup.handler.state.conferences["demo"]
        assert len(conf.members) == 1
        # The endpoint goes silent: the MDD's idle timeout (D3) ends it at the KMF.
        await until(lambda: setup.handler.stats.ended_by_mdd == 1)
        assert trio.current_time() - joined_at >= 3.0
        assert setup.handler.associations == {}
        assert conf.members == {}
        assert conf.current is None  # the last member took the key with it
        assert setup.handler.stats.left == 1
        assert setup.handler.stats.disconnects_sent == 0  # the MDD ended it, not us
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
        conf = setup.handler.state.conferences["demo"]
        assert [m.fingerprint for m in conf.members.values()] == [b.fingerprint]
        assert conf.current is not None and conf.current.spi == rb.ekt_key.spi  # type: ignore[union-attr]
        assert setup.handler.stats.left == 1
        assert setup.handler.stats.disconnects_sent == 1
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
        assert setup.handler.stats.cookies_sent == (1 if cookies else 0)
        assert setup.handler.stats.associations_created == 1
        nursery.cancel_scope.cancel()


async def test_no_state_before_a_valid_cookie(
    ids: SimpleNamespace, people: SimpleNamespace, clock: MockClock
) -> None:
    """ClientHellos without a cookie and junk datagrams leave no association behind (D14)."""
    setup = Setup(ids, keying_kmf_config(ids.kmf, [ids.mdd], {"demo": people.members[:1]}))
    async with setup.running() as nursery:
        server = setup.kmf
        await setup.start_mdd(nursery)
        tunnel = next(iter(server.tunnels.values()))
        handler = setup.handler
        client = DtlsConnection(
            DtlsConfiguration(
                is_client=True,
                certificate=people.members[0].certificate,
                private_key=people.members[0].private_key,
            )
        )
        client.connect(0.0)
        (hello,) = client.datagrams_to_send()
        for _ in range(50):
            handler.on_datagram(uuid.uuid4(), hello, tunnel)
        handler.on_datagram(uuid.uuid4(), b"\x17\xfe\xfd" + bytes(20), tunnel)
        assert handler.associations == {}
        assert handler.stats.cookies_sent == 50
        assert handler.stats.dropped_no_association == 1
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
        assert setup.handler.stats.dropped_capacity >= 1
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
        await until(lambda: len(setup.handler.associations) == 1)
        started = trio.current_time()
        # The KMF retransmits its flight on its timers, then gives up at the deadline.
        await until(lambda: setup.handler.stats.failed == 1)
        assert 3.5 <= trio.current_time() - started <= 6.0
        await until(lambda: relay.stats.associations_ended_by_kmf == 1)
        assert setup.handler.associations == {}
        assert setup.handler.stats.timer_wakeups >= 2
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
        assert setup.handler.stats.restarts == 1
        assert len(setup.handler.associations) == 1
        assert len(setup.handler.state.conferences["demo"].members) == 1
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
        await until(lambda: setup.handler.stats.ekt_keys_acknowledged == 2)
        old = setup.handler.state.conferences["demo"].current
        new = setup.handler.rekey("demo")
        assert new is not None and old is not None and new.spi != old.spi and new.key != old.key
        await until(lambda: setup.handler.stats.ekt_keys_acknowledged == 4)
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
        assert isinstance(server.handler, KeyingHandler)
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
    assert path.read_text().splitlines() == result.keylog_lines
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
        await sock.sendto(rtp, relay.address)
        await until(lambda: relay.stats.dropped_srtp_no_keys == 2)
        assoc = next(iter(relay.associations.values()))
        assert assoc.counters.held == 1 and not assoc.has_keys
        # Join from the same socket (a fresh ClientHello: the KMF restarts the association).
        result = await setup.join(relay, alice, sock=sock)
        assert result.joined
        await until(lambda: assoc.has_keys)
        await sock.sendto(rtp, relay.address)
        await until(lambda: relay.stats.dropped_srtp == 3)
        assert relay.stats.dropped_srtp_no_keys == 2
        assert assoc.counters.received == 2


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
        assert setup.handler.stats.refused == 2
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
        await until(lambda: setup.handler.stats.failed == 1)
        await until(lambda: relay.stats.associations_ended_by_kmf == 1)
        assert setup.handler.state.conferences["demo"].members == {}
        assert relay.stats.media_keys == 0


class FakeTunnel:
    """Duck-typed KmfTunnel that records what the handler sends."""

    def __init__(self, fingerprint: str, profiles: tuple[int, ...] = (9, 10)) -> None:
        self.mdd_fingerprint = fingerprint
        self.protection_profiles = profiles
        self.peer = f"fake-{id(self)}"
        self.is_open = True
        self.dtls: list[tuple[uuid.UUID, bytes]] = []
        self.media_keys: list[MediaKeys] = []
        self.disconnects: list[uuid.UUID] = []

    def send_dtls(self, aid: uuid.UUID, data: bytes) -> bool:
        if self.is_open:
            self.dtls.append((aid, data))
        return self.is_open

    def send_media_keys(self, keys: MediaKeys) -> bool:
        if self.is_open:
            self.media_keys.append(keys)
        return self.is_open

    def send_disconnect(self, aid: uuid.UUID) -> bool:
        if self.is_open:
            self.disconnects.append(aid)
        return self.is_open


def pump_in_memory(
    handler: KeyingHandler, client: DtlsConnection, aid: uuid.UUID, tunnel: FakeTunnel
) -> None:
    """Carry datagrams both ways until nothing moves (no loss, no timers)."""
    while True:
        moved = False
        for datagram in client.datagrams_to_send():
            handler.on_datagram(aid, datagram, tunnel)  # type: ignore[arg-type]
            moved = True
        replies, tunnel.dtls = tunnel.dtls, []
        for _, datagram in replies:
            client.receive_datagram(datagram, trio.current_time())
            moved = True
        if not moved:
            return


async def test_answers_follow_a_reconnected_mdd(
    ids: SimpleNamespace, people: SimpleNamespace, memory_clock: MockClock
) -> None:
    """After the tunnel that carried a joined endpoint closes, a rekey reaches it through the
    same MDD's new tunnel (in memory: fake tunnels, the real handler and engine)."""
    alice = people.members[0]
    handler = KeyingHandler(keying_kmf_config(ids.kmf, [ids.mdd], {"demo": [alice]}))
    old, other_mdd = FakeTunnel(ids.mdd.fingerprint), FakeTunnel(ids.mdd2.fingerprint)
    handler.on_tunnel_up(old)  # type: ignore[arg-type]
    handler.on_tunnel_up(other_mdd)  # type: ignore[arg-type]
    client = DtlsConnection(
        DtlsConfiguration(
            is_client=True,
            certificate=alice.certificate,
            private_key=alice.private_key,
            tls_id=b"alice-session-0123456789",
        )
    )
    aid = uuid.uuid4()
    client.connect(trio.current_time())
    pump_in_memory(handler, client, aid, old)
    assert handler.stats.joined == 1
    assert [k.association_id for k in old.media_keys] == [aid]
    first_key = handler.state.conferences["demo"].current
    # The tunnel drops; the MDD reconnects with a new one.
    old.is_open = False
    handler.on_tunnel_down(old)  # type: ignore[arg-type]
    new = FakeTunnel(ids.mdd.fingerprint)
    handler.on_tunnel_up(new)  # type: ignore[arg-type]
    key = handler.rekey("demo")
    assert key is not None and first_key is not None and key.spi != first_key.spi
    assert [a for a, _ in new.dtls] == [aid]
    assert other_mdd.dtls == []  # another MDD never gets this endpoint's DTLS
    pump_in_memory(handler, client, aid, new)
    received = []
    while (event := client.next_event()) is not None:
        if isinstance(event, events.EktKeyReceived):
            received.append(event.spi)
    assert received == [first_key.spi, key.spi]
    assert handler.stats.ekt_keys_acknowledged == 2


@pytest.mark.parametrize("seed", range(4))
async def test_join_under_loss_with_heap_timers(
    ids: SimpleNamespace, people: SimpleNamespace, memory_clock: MockClock, seed: int
) -> None:
    """30% loss each way between an in-memory client and the handler: the KMF's flights and
    its EKTKey are retransmitted by the handler's single timer task until the client ACKs."""
    rng = random.Random(seed)
    alice = people.members[0]
    handler = KeyingHandler(keying_kmf_config(ids.kmf, [ids.mdd], {"demo": [alice]}))
    tunnel = FakeTunnel(ids.mdd.fingerprint)
    handler.on_tunnel_up(tunnel)  # type: ignore[arg-type]
    client = DtlsConnection(
        DtlsConfiguration(
            is_client=True,
            certificate=alice.certificate,
            private_key=alice.private_key,
            tls_id=b"alice-session-0123456789",
        )
    )
    aid = uuid.uuid4()
    got_key = False
    async with trio.open_nursery() as nursery:
        nursery.start_soon(handler.run)
        client.connect(trio.current_time())
        with trio.fail_after(120):
            while not (got_key and handler.stats.ekt_keys_acknowledged == 1):
                for datagram in client.datagrams_to_send():
                    if rng.random() >= 0.3:
                        handler.on_datagram(aid, datagram, tunnel)  # type: ignore[arg-type]
                replies, tunnel.dtls = tunnel.dtls, []
                now = trio.current_time()
                for _, datagram in replies:
                    if rng.random() >= 0.3:
                        client.receive_datagram(datagram, now)
                while (event := client.next_event()) is not None:
                    assert not isinstance(event, events.ConnectionClosed), event
                    got_key = got_key or isinstance(event, events.EktKeyReceived)
                timer = client.get_timer()
                if timer is not None and timer <= now:
                    client.handle_timer(now)
                await trio.sleep(0.05)
        nursery.cancel_scope.cancel()
    assert handler.stats.joined == 1
    assert len(tunnel.media_keys) == 1
    assert handler.stats.timer_wakeups >= 1


async def test_many_stalled_handshakes_share_one_timer_task(
    ids: SimpleNamespace, people: SimpleNamespace, memory_clock: MockClock
) -> None:
    """300 endpoints stop after their ClientHello: one task retransmits every server flight and
    ends every association at its deadline, waking once per distinct deadline, not per
    association; each end is reported to the MDD."""
    alice = people.members[0]
    config = keying_kmf_config(ids.kmf, [ids.mdd], {"demo": [alice]}, dtls_cookies=False)
    handler = KeyingHandler(config, dtls_handshake_timeout=5.0)
    tunnel = FakeTunnel(ids.mdd.fingerprint)
    handler.on_tunnel_up(tunnel)  # type: ignore[arg-type]
    client_config = DtlsConfiguration(
        is_client=True, certificate=alice.certificate, private_key=alice.private_key
    )
    aids = [uuid.uuid4() for _ in range(300)]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(handler.run)
        start = trio.current_time()
        for aid in aids:
            client = DtlsConnection(client_config)
            client.connect(start)
            for datagram in client.datagrams_to_send():
                handler.on_datagram(aid, datagram, tunnel)  # type: ignore[arg-type]
        assert len(handler.associations) == 300
        first_flights = len(tunnel.dtls)
        await until(lambda: handler.stats.failed == 300, timeout=30)
        assert 5.0 <= trio.current_time() - start <= 6.0
        nursery.cancel_scope.cancel()
    assert handler.associations == {}
    assert sorted(tunnel.disconnects) == sorted(aids)
    assert len(tunnel.dtls) > first_flights  # flights were retransmitted on the timers
    # deadlines 1 s, 3 s (backed off) and 5 s, shared by all: a handful of wake-ups
    assert handler.stats.timer_wakeups < 20


async def test_answers_go_through_the_latest_tunnel_and_disconnects_end_handshakes(
    ids: SimpleNamespace, people: SimpleNamespace, memory_clock: MockClock
) -> None:
    alice = people.members[0]
    handler = KeyingHandler(
        keying_kmf_config(ids.kmf, [ids.mdd], {"demo": [alice]}, dtls_cookies=False)
    )
    t1, t2 = FakeTunnel(ids.mdd.fingerprint), FakeTunnel(ids.mdd.fingerprint)
    for t in (t1, t2):
        handler.on_tunnel_up(t)  # type: ignore[arg-type]
    client_config = DtlsConfiguration(
        is_client=True,
        certificate=alice.certificate,
        private_key=alice.private_key,
        tls_id=b"alice-session-0123456789",
    )
    client = DtlsConnection(client_config)
    aid = uuid.uuid4()
    client.connect(trio.current_time())
    for datagram in client.datagrams_to_send():
        handler.on_datagram(aid, datagram, t1)  # type: ignore[arg-type]
    assert t1.dtls and not t2.dtls  # flight 2 answers the carrying tunnel
    for _, datagram in t1.dtls:
        client.receive_datagram(datagram, trio.current_time())
    t1.dtls.clear()
    # The client's flight 5 arrives over the other tunnel: flight 6, MediaKeys, EKTKey go there.
    pump_in_memory(handler, client, aid, t2)
    assert handler.stats.joined == 1
    assert [k.association_id for k in t2.media_keys] == [aid] and t1.media_keys == []
    # EndpointDisconnect for an unknown id is counted; for ours it ends the membership.
    handler.on_disconnect(uuid.uuid4(), t2)  # type: ignore[arg-type]
    assert handler.stats.unknown_disconnects == 1
    handler.on_disconnect(aid, t1)  # type: ignore[arg-type]
    assert handler.stats.ended_by_mdd == 1 and handler.stats.left == 1
    assert handler.associations == {} and handler.state.conferences["demo"].members == {}
    assert t1.disconnects == t2.disconnects == []  # the MDD ended it: nothing to tell it
    # A second endpoint disconnected mid-handshake leaves no state either.
    other = uuid.uuid4()
    client2 = DtlsConnection(client_config)
    client2.connect(trio.current_time())
    for datagram in client2.datagrams_to_send():
        handler.on_datagram(other, datagram, t1)  # type: ignore[arg-type]
    assert other in handler.associations
    handler.on_disconnect(other, t1)  # type: ignore[arg-type]
    assert handler.associations == {}
    assert handler.stats.failed == 1


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
        assert setup.handler.stats.rekeys == 1
        rb = await setup.join(relay, b)  # a join: one more rekey, both on it
        assert rb.joined and rb.ekt_key is not None
        await until(lambda: len(ra.ekt_keys) == 3)
        assert ra.ekt_keys[-1] == rb.ekt_key
        assert_conference_key(setup.handler, rb, "demo")
        nursery.cancel_scope.cancel()


async def test_another_mdd_cannot_divert_or_end_an_association(
    ids: SimpleNamespace, people: SimpleNamespace, memory_clock: MockClock
) -> None:
    alice = people.members[0]
    handler = KeyingHandler(
        keying_kmf_config(ids.kmf, [ids.mdd, ids.mdd2], {"demo": [alice]}, dtls_cookies=False)
    )
    mine, theirs = FakeTunnel(ids.mdd.fingerprint), FakeTunnel(ids.mdd2.fingerprint)
    client = DtlsConnection(
        DtlsConfiguration(
            is_client=True,
            certificate=alice.certificate,
            private_key=alice.private_key,
            tls_id=b"alice-session-0123456789",
        )
    )
    aid = uuid.uuid4()
    client.connect(trio.current_time())
    for datagram in client.datagrams_to_send():
        handler.on_datagram(aid, datagram, mine)  # type: ignore[arg-type]
    for _, datagram in mine.dtls:
        client.receive_datagram(datagram, trio.current_time())
    mine.dtls.clear()
    # The client's flight 5 arrives through the other MDD: ignored, counted.
    for datagram in client.datagrams_to_send():
        handler.on_datagram(aid, datagram, theirs)  # type: ignore[arg-type]
    handler.on_disconnect(aid, theirs)  # type: ignore[arg-type]
    assert handler.stats.dropped_wrong_mdd >= 2
    assert theirs.dtls == [] and theirs.media_keys == []
    assert aid in handler.associations and handler.stats.joined == 0


async def test_rekey_failure_is_counted_and_stops_that_conference_timer(
    ids: SimpleNamespace, people: SimpleNamespace, memory_clock: MockClock
) -> None:
    alice = people.members[0]
    handler = KeyingHandler(keying_kmf_config(ids.kmf, [ids.mdd], {"demo": [alice]}))
    tunnel = FakeTunnel(ids.mdd.fingerprint)
    handler.on_tunnel_up(tunnel)  # type: ignore[arg-type]
    client = DtlsConnection(
        DtlsConfiguration(
            is_client=True,
            certificate=alice.certificate,
            private_key=alice.private_key,
            tls_id=b"alice-session-0123456789",
        )
    )
    client.connect(trio.current_time())
    pump_in_memory(handler, client, uuid.uuid4(), tunnel)
    assert handler.stats.joined == 1
    assert "demo" in handler._conference_timers  # the TTL refresh is armed
    handler.state.conferences["demo"].keys_issued = 1 << 16  # as if 65536 keys were made
    assert handler.rekey("demo") is None
    assert handler.stats.rekey_errors == 1 and handler.stats.rekeys == 0
    assert "demo" not in handler._conference_timers  # no spinning on a due timer


def _client(ident: identity.Identity, ekt_ciphers: tuple[int, ...] = (1, 2)) -> DtlsConnection:
    return DtlsConnection(
        DtlsConfiguration(
            is_client=True,
            certificate=ident.certificate,
            private_key=ident.private_key,
            tls_id=b"a-session-id-0123456789",
            ekt_ciphers=ekt_ciphers,
        )
    )


def _closed(client: DtlsConnection) -> events.ConnectionClosed | None:
    while (event := client.next_event()) is not None:
        if isinstance(event, events.ConnectionClosed):
            return event
    return None


class NoKeysTunnel(FakeTunnel):
    """A tunnel that carries DTLS but refuses MediaKeys (as if it closed at that moment)."""

    def send_media_keys(self, keys: MediaKeys) -> bool:
        return False


async def test_media_keys_not_delivered_ends_the_join_with_internal_error(
    ids: SimpleNamespace, people: SimpleNamespace, memory_clock: MockClock
) -> None:
    alice = people.members[0]
    handler = KeyingHandler(
        keying_kmf_config(ids.kmf, [ids.mdd], {"demo": [alice]}, dtls_cookies=False)
    )
    tunnel = NoKeysTunnel(ids.mdd.fingerprint)
    client, aid = _client(alice), uuid.uuid4()
    client.connect(trio.current_time())
    pump_in_memory(handler, client, aid, tunnel)
    closed = _closed(client)
    assert closed is not None and closed.sent_by_peer
    assert closed.alert == AlertDescription.internal_error  # a fatal alert, not close_notify
    assert handler.stats.media_keys_failed == 1 and handler.stats.refused == 1
    assert handler.stats.joined == 0 and handler.associations == {}
    assert handler.state.conferences["demo"].members == {}


async def test_cipher_fixed_by_another_member_mid_handshake_gets_handshake_failure(
    ids: SimpleNamespace, people: SimpleNamespace, memory_clock: MockClock
) -> None:
    """The race the roster check cannot see: between this endpoint's admission and its
    Finished, another member fixes the conference's EKT cipher (one cipher per conference)."""
    alice = people.members[0]
    handler = KeyingHandler(
        keying_kmf_config(ids.kmf, [ids.mdd], {"demo": [alice]}, dtls_cookies=False)
    )
    tunnel = FakeTunnel(ids.mdd.fingerprint)
    admit = handler._verify_peer

    def admit_then_race(assoc: object, peer: object) -> int | None:
        verdict = admit(assoc, peer)  # type: ignore[arg-type]
        # meanwhile another member started the conference with AESKW128
        handler.state.conferences["demo"].key_for(1, trio.current_time())
        return verdict

    handler._verify_peer = admit_then_race  # type: ignore[method-assign]
    client, aid = _client(alice), uuid.uuid4()  # negotiates AESKW256 (our preference)
    client.connect(trio.current_time())
    pump_in_memory(handler, client, aid, tunnel)
    closed = _closed(client)
    assert closed is not None and closed.sent_by_peer
    assert closed.alert == AlertDescription.handshake_failure
    assert handler.stats.refused == 1 and handler.stats.joined == 0
    assert tunnel.media_keys == [] and tunnel.disconnects == [aid]
