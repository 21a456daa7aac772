"""KMF rekeying (D22, RFC 8871 §4.5.2) over real loopback TLS and UDP, under MockClock.

The KMF runs :class:`perc.kmf.KmfEngine` behind a real MDD; the endpoints are
perc's DTLS clients (tests/roles/join_helpers.py). Virtual time: every delay below is
measured with ``trio.current_time()``.

The end-to-end tests put media on top of the joins: one :class:`perc.media.endpoint.EndpointMedia`
per endpoint, built from its join result (exporter output, EKTKey), fed each later EKTKey
from the client's ``EktKeyReceived`` events, and a stand-in Media Distributor in this process
that re-encrypts the outer layer with the hop-by-hop keys the real MDD received in
``MediaKeys`` (:class:`perc.srtp.hop.MediaDistributorHop`; RTP only). A "spy" receiver holds
the outer keys of a remaining member (the most an attacker with the MDD's help could have)
but only the EKTKeys of the leaver (or of the joiner): it must not decrypt what it must not.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from types import SimpleNamespace

import attrs
import pytest
import trio
from trio.testing import MockClock

from perc import identity
from perc.config import KmfConfig
from perc.dtls import events
from perc.events import Rekeyed
from perc.keying import Conference
from perc.media.endpoint import EndpointMedia, is_rtcp
from perc.roles import mdd
from perc.srtp.context import SrtpSession
from perc.srtp.double import DoubleReceiver
from perc.srtp.ekt import EktParameterSet
from perc.srtp.errors import SrtpError
from perc.srtp.hop import MediaDistributorHop
from perc.srtp.keys import split_exporter

from .helpers import logged_events, until
from .join_helpers import JoinResult, keying_kmf_config
from .test_keying import Setup, mdd_association, with_policy

#: Step of the media simulation in virtual seconds (each step costs the mock clock's 30 ms of
#: real idleness); within a step the media engines run on their own 5 ms sub-steps.
STEP = 0.1
SUBSTEP = 0.005


@pytest.fixture(scope="module")
def people() -> SimpleNamespace:
    return SimpleNamespace(members=[identity.generate(f"rk{i}") for i in range(12)])


def policy_config(
    ids: SimpleNamespace, members: Iterable[identity.Identity], **policy: object
) -> KmfConfig:
    config = keying_kmf_config(ids.kmf, [ids.mdd], {"demo": list(members)})
    return with_policy(config, **policy) if policy else config


def conference(setup: Setup) -> Conference:
    return setup.engine.state.conferences["demo"]


def spi_of(result: JoinResult) -> int | None:
    return result.ekt_keys[-1].spi if result.ekt_keys else None


async def converged(setup: Setup, results: Iterable[JoinResult]) -> int:
    """Wait until every endpoint's latest EKTKey is the conference's key; return its SPI."""
    conf = conference(setup)
    rs = list(results)

    def done() -> bool:
        key = conf.current
        return (
            key is not None
            and conf.pending is None
            and all(r.ekt_keys for r in rs)
            and all(key.same_key(k.key, k.salt, k.spi) for k in (r.ekt_keys[-1] for r in rs))
        )

    await until(done)
    assert conf.current is not None
    return conf.current.spi


async def wait_time(predicate: object, step: float = 0.02, timeout: float = 10.0) -> float:
    """Poll ``predicate()`` every ``step`` virtual seconds; return the virtual time it held."""
    with trio.fail_after(timeout):
        while not predicate():  # type: ignore[operator]
            await trio.sleep(step)
    return trio.current_time()


@asynccontextmanager
async def conference_with(
    ids: SimpleNamespace, config: KmfConfig, idle_timeout: float = 60.0
) -> AsyncIterator[tuple[Setup, trio.Nursery, mdd.ConferenceRelay]]:
    setup = Setup(ids, config)
    async with setup.running() as nursery:
        relay = await setup.start_mdd(nursery, idle_timeout=idle_timeout)
        yield setup, nursery, relay


_SERVING: dict[int, tuple[trio.CancelScope, trio.Event]] = {}


async def join_and_serve(
    setup: Setup, nursery: trio.Nursery, relay: mdd.ConferenceRelay, ident: identity.Identity
) -> JoinResult:
    """Join, then keep the endpoint answering the KMF (rekeys) until it leaves."""
    result = await setup.join(relay, ident)
    assert result.joined, result.closed

    scope, stopped = trio.CancelScope(), trio.Event()
    _SERVING[id(result)] = (scope, stopped)

    async def serve() -> None:
        try:
            with scope:
                await result.serve()
        finally:
            stopped.set()

    nursery.start_soon(serve)
    return result


async def leave(result: JoinResult) -> None:
    """Stop serving, send close_notify, close the socket (a DTLS close from the endpoint)."""
    serving = _SERVING.pop(id(result), None)
    if serving is not None:
        serving[0].cancel()
        await serving[1].wait()  # its receive must end before the socket closes
    await result.leave()


def logged_rekeys(caplog: pytest.LogCaptureFixture) -> list[Rekeyed]:
    """The KMF's rekeys of conference demo logged so far (its first key left out)."""
    return [e for e in logged_events(caplog, Rekeyed, conference="demo") if e.reason != "first"]


# --- key distribution -----------------------------------------------------------------------


async def test_leave_by_close_notify_rekeys_the_others_within_a_second(
    ids: SimpleNamespace,
    people: SimpleNamespace,
    clock: MockClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="perc.roles")
    a, b, c = people.members[:3]
    async with conference_with(ids, policy_config(ids, [a, b, c])) as (setup, nursery, relay):
        ra, rb, rc = [await join_and_serve(setup, nursery, relay, x) for x in (a, b, c)]
        old = await converged(setup, [ra, rb, rc])
        rekeys = setup.engine.stats.rekeys
        a_keys = list(ra.ekt_keys)
        caplog.clear()
        left_at = trio.current_time()
        await leave(ra)  # close_notify through the MDD to the KMF
        got = await wait_time(lambda: spi_of(rb) != old and spi_of(rc) != old)
        # D22: the window (0.5 s) plus delivery, well within one second of virtual time.
        assert got - left_at < 1.0, got - left_at
        new = await converged(setup, [rb, rc])
        assert new == spi_of(rb) == spi_of(rc) != old
        assert setup.engine.stats.rekeys == rekeys + 1
        assert ra.ekt_keys == a_keys  # the leaver is not sent the new key
        assert set(conference(setup).members) == {
            mdd_association(relay, r).association_id for r in (rb, rc)
        }
        (rekey,) = logged_rekeys(caplog)
        assert (rekey.reason, rekey.spi, rekey.members) == ("leave", new, 2)
        assert len(rekey.key) == 16  # a digest, never the key
        await until(lambda: relay.stats.associations_ended_by_kmf == 1)
        nursery.cancel_scope.cancel()


async def test_endpoint_disconnect_from_the_mdd_is_a_leave(
    ids: SimpleNamespace, people: SimpleNamespace, clock: MockClock
) -> None:
    """D3: the MDD's idle timeout sends EndpointDisconnect; the KMF rekeys the others."""
    a, b, c = people.members[:3]
    async with conference_with(ids, policy_config(ids, [a, b, c]), idle_timeout=3.0) as (
        setup,
        nursery,
        relay,
    ):
        ra = await setup.join(relay, a)  # joins, then goes silent (no serve, no keepalive)
        rb, rc = [await join_and_serve(setup, nursery, relay, x) for x in (b, c)]

        async def keepalive(r: JoinResult) -> None:
            # An empty application-data record every second keeps b and c alive at the MDD.
            while True:
                r.connection.send_application_data(b"", trio.current_time())
                for datagram in r.connection.datagrams_to_send():
                    await r.socket.sendto(datagram, r.mdd_addr)
                await trio.sleep(1.0)

        nursery.start_soon(keepalive, rb)
        nursery.start_soon(keepalive, rc)
        old = await converged(setup, [rb, rc])
        await until(lambda: setup.engine.stats.ended_by_mdd == 1)
        ended_at = trio.current_time()
        got = await wait_time(lambda: spi_of(rb) != old and spi_of(rc) != old)
        assert got - ended_at < 1.0
        assert spi_of(ra) != spi_of(rb)
        assert await converged(setup, [rb, rc]) == spi_of(rb)
        assert len(conference(setup).members) == 2
        nursery.cancel_scope.cancel()


async def test_ektkey_timeout_is_a_leave(
    ids: SimpleNamespace, people: SimpleNamespace, clock: MockClock
) -> None:
    """An endpoint that stops answering: its EKTKey is retransmitted until the engine gives
    up (10 x the handshake timeout, D9), the association ends, the others are rekeyed."""
    a, b = people.members[:2]
    setup = Setup(ids, policy_config(ids, [a, b]), dtls_handshake_timeout=1.0)
    async with setup.running() as nursery:
        relay = await setup.start_mdd(nursery, idle_timeout=60.0)
        ra = await setup.join(relay, a)  # joins, then never answers again
        rb = await join_and_serve(setup, nursery, relay, b)  # b's join rekeys a too: unanswered
        joined_at = trio.current_time()
        await until(lambda: setup.engine.stats.left == 1, timeout=30.0)
        assert 9.0 <= trio.current_time() - joined_at <= 12.0
        await until(lambda: relay.stats.associations_ended_by_kmf == 1)  # D3: MDD told
        new = await converged(setup, [rb])
        assert [k.spi for k in ra.ekt_keys] == [new - 2 & 0xFFFF]
        assert setup.engine.stats.rekeys == 2  # b's join, then a's leave
        nursery.cancel_scope.cancel()


async def test_joins_and_a_leave_in_one_window_make_one_rekey(
    ids: SimpleNamespace,
    people: SimpleNamespace,
    clock: MockClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="perc.roles")
    a, b, c, d = people.members[:4]
    async with conference_with(ids, policy_config(ids, [a, b, c, d])) as (
        setup,
        nursery,
        relay,
    ):
        ra, rb = [await join_and_serve(setup, nursery, relay, x) for x in (a, b)]
        old = await converged(setup, [ra, rb])
        rekeys = setup.engine.stats.rekeys
        caplog.clear()
        joined: list[JoinResult] = []

        async def join(x: identity.Identity) -> None:
            joined.append(await join_and_serve(setup, nursery, relay, x))

        started = trio.current_time()
        async with trio.open_nursery() as inner:
            inner.start_soon(join, c)
            inner.start_soon(join, d)
            inner.start_soon(leave, rb)
        new = await converged(setup, [ra, *joined])
        assert trio.current_time() - started < 1.0
        assert setup.engine.stats.rekeys == rekeys + 1  # coalesced: one new EKTKey
        (rekey,) = logged_rekeys(caplog)
        assert rekey.reason in {"join+leave", "leave+join"} and rekey.members == 3
        # The joiners' first (and only) EKTKey is the new one: never the key used before.
        for r in joined:
            assert [k.spi for k in r.ekt_keys] == [new]
        assert spi_of(ra) == new != old
        assert spi_of(rb) == old  # the leaver
        assert setup.engine.stats.joins_waited_for_rekey >= 3  # b, c, d
        nursery.cancel_scope.cancel()


async def test_after_joins_everyone_is_on_the_same_newest_spi(
    ids: SimpleNamespace, people: SimpleNamespace, clock: MockClock
) -> None:
    """Eight concurrent joiners: few rekeys (coalesced), all on the conference's key."""
    members = people.members[:8]
    async with conference_with(ids, policy_config(ids, members)) as (setup, nursery, relay):
        results: list[JoinResult] = []

        async def join(x: identity.Identity) -> None:
            results.append(await join_and_serve(setup, nursery, relay, x))

        async with trio.open_nursery() as inner:
            for x in members:
                inner.start_soon(join, x)
        spi = await converged(setup, results)
        assert {spi_of(r) for r in results} == {spi}
        assert 1 <= setup.engine.stats.rekeys <= 3, setup.engine.stats.rekeys
        # every joiner but the first waited for a rekey: none holds a key from before it
        assert setup.engine.stats.joins_waited_for_rekey == 7
        assert sum(len(r.ekt_keys) == 1 for r in results) >= 7
        # D31: the joins' rekey runs at once, so it may supersede the first member's first key
        # before that key's ACK (D22: the newest key wins); every member acknowledges its last.
        await until(lambda: setup.engine.stats.ekt_keys_acknowledged >= len(members))
        nursery.cancel_scope.cancel()


async def test_zero_window_rekeys_each_join_and_leave_at_once(
    ids: SimpleNamespace, people: SimpleNamespace, clock: MockClock
) -> None:
    """rekey_window = 0: no coalescing, no wait (the timer task runs the rekey right away)."""
    a, b, c = people.members[:3]
    config = policy_config(ids, [a, b, c], rekey_window=0.0)
    async with conference_with(ids, config) as (setup, nursery, relay):
        ra = await join_and_serve(setup, nursery, relay, a)
        rb = await join_and_serve(setup, nursery, relay, b)
        assert rb.elapsed < 0.1  # no window to wait for (virtual time)
        rc = await join_and_serve(setup, nursery, relay, c)
        assert await converged(setup, [ra, rb, rc]) == spi_of(rc)
        assert setup.engine.stats.rekeys == 2
        left_at = trio.current_time()
        await leave(ra)
        await wait_time(lambda: setup.engine.stats.rekeys == 3, step=0.005)
        assert trio.current_time() - left_at < 0.1
        await converged(setup, [rb, rc])
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("switch", ["rekey_on_join", "rekey_on_leave"])
async def test_switches_off_mean_no_rekey(
    ids: SimpleNamespace, people: SimpleNamespace, clock: MockClock, switch: str
) -> None:
    a, b, c = people.members[:3]
    config = policy_config(ids, [a, b, c], **{switch: False})
    async with conference_with(ids, config) as (setup, nursery, relay):
        ra = await join_and_serve(setup, nursery, relay, a)
        rb = await join_and_serve(setup, nursery, relay, b)
        if switch == "rekey_on_join":
            # b got the current key at once, nothing else happened
            assert spi_of(ra) == spi_of(rb) and setup.engine.stats.rekeys == 0
            rc = await join_and_serve(setup, nursery, relay, c)
            await trio.sleep(2.0)
            assert setup.engine.stats.rekeys == 0 and spi_of(rc) == spi_of(ra)
            await leave(rc)  # leaves still rekey
            await until(lambda: setup.engine.stats.rekeys == 1)
        else:
            old = await converged(setup, [ra, rb])
            rekeys = setup.engine.stats.rekeys
            assert rekeys == 1  # b's join
            await leave(rb)
            await until(lambda: setup.engine.stats.left == 1)
            await trio.sleep(2.0)
            assert setup.engine.stats.rekeys == rekeys and spi_of(ra) == old
        nursery.cancel_scope.cancel()


# --- end to end: media on the joins -------------------------------------------------------


def params_of(result: JoinResult, key: events.EktKeyReceived, now: float) -> EktParameterSet:
    done = result.completed
    assert done is not None
    return EktParameterSet.from_ekt_key(
        key.key, key.salt, key.spi, key.ttl, now, cipher=done.ekt_cipher
    )


def material_of(result: JoinResult):  # type: ignore[no-untyped-def]
    done = result.completed
    assert done is not None and done.srtp_profile is not None
    return split_exporter(done.srtp_profile, done.srtp_keying_material or b"")


@attrs.define(eq=False)
class SimEndpoint:
    name: str
    result: JoinResult
    media: EndpointMedia
    hop: MediaDistributorHop
    """The stand-in MDD's inbound hop for what this endpoint sends (its client_write keys)."""
    to_it: SrtpSession
    """The stand-in MDD's outbound session to this endpoint (its server_write keys)."""
    keys_given: int = 1


class MediaSim:
    """Endpoints' media through a stand-in MDD (outer re-encryption with the real MDD's keys)."""

    def __init__(self, setup: Setup, relay: mdd.ConferenceRelay) -> None:
        self.setup = setup
        self.relay = relay
        self.endpoints: dict[str, SimEndpoint] = {}
        self.time = trio.current_time()
        #: (send time, sender, receiver, packet) of every RTP packet delivered
        self.delivered: list[tuple[float, str, str, bytes]] = []

    def add(self, name: str, result: JoinResult) -> SimEndpoint:
        now = trio.current_time()
        keys = mdd_association(self.relay, result).media_keys
        assert keys is not None
        media = EndpointMedia(
            name, "audio", material_of(result), params_of(result, result.ekt_keys[-1], now), now
        )
        endpoint = SimEndpoint(
            name,
            result,
            media,
            MediaDistributorHop(
                SrtpSession(keys.client_write_master_key, keys.client_write_master_salt)
            ),
            SrtpSession(keys.server_write_master_key, keys.server_write_master_salt),
            keys_given=len(result.ekt_keys),
        )
        self.endpoints[name] = endpoint
        return endpoint

    def spy(
        self, watches: str, keys_of: JoinResult, *, before: float = float("inf")
    ) -> list[tuple[float, str, bool]]:
        """Try every packet delivered to ``watches`` (sent before ``before``) with its outer
        keys but only the EKTKeys ``keys_of`` was given: (send time, sender, decrypted)."""
        material = material_of(self.endpoints[watches].result).outer()
        receiver = DoubleReceiver(SrtpSession(material.server_key, material.server_salt))
        for key in keys_of.ekt_keys:
            receiver.add_parameter_set(params_of(keys_of, key, self.time))
        out = []
        for t, sender, to, packet in self.delivered:
            if to != watches or t >= before:
                continue
            try:
                receiver.unprotect(packet, t)
                ok = True
            except SrtpError:
                ok = False
            out.append((t, sender, ok))
        return out

    def remove(self, name: str) -> None:
        del self.endpoints[name]

    def step(self, now: float) -> None:
        # New EKTKeys from the DTLS clients go to the media engines (RFC 8871 §4.5.2).
        for ep in self.endpoints.values():
            while ep.keys_given < len(ep.result.ekt_keys):
                key = ep.result.ekt_keys[ep.keys_given]
                ep.keys_given += 1
                ep.media.rekey(params_of(ep.result, key, self.time), self.time)
        t = self.time
        while t < now:
            t = min(t + SUBSTEP, now)
            for ep in list(self.endpoints.values()):
                deadline = ep.media.timer()
                if deadline is not None and deadline <= t:
                    ep.media.handle_timer(t)
                for datagram in ep.media.datagrams_to_send():
                    if not is_rtcp(datagram):
                        self._forward(ep, datagram, t)
        self.time = now

    def _forward(self, sender: SimEndpoint, datagram: bytes, t: float) -> None:
        inbound = sender.hop.decrypt(datagram)
        for receiver in self.endpoints.values():
            if receiver is sender:
                continue
            packet = sender.hop.encrypt_for(receiver.to_it, inbound)
            self.delivered.append((t, sender.name, receiver.name, packet))
            receiver.media.receive(packet, t)

    async def run(self, seconds: float) -> None:
        end = trio.current_time() + seconds
        while trio.current_time() < end:
            await trio.sleep(STEP)
            self.step(trio.current_time())

    def count(self, sender: str, receiver: str, since: float = 0.0) -> int:
        return sum(
            1 for t, s, r, _ in self.delivered if (s, r) == (sender, receiver) and t >= since
        )

    def peer(self, at: str, peer: str) -> dict[str, int]:
        report = self.endpoints[at].media.report()
        entry: dict[str, int] = report["peers"][peer]
        return entry


async def test_leave_and_rejoin_end_to_end(
    ids: SimpleNamespace, people: SimpleNamespace, clock: MockClock
) -> None:
    """a leaves: b and c get a new SPI within 1 s, a's keys read nothing they send 1 s after
    the rekey, and they lose nothing; a rejoins: everyone on the newest SPI, a verifies both
    again, b and c still without an E2E failure."""
    a, b, c = people.members[:3]
    async with conference_with(ids, policy_config(ids, [a, b, c])) as (setup, nursery, relay):
        ra, rb, rc = [await join_and_serve(setup, nursery, relay, x) for x in (a, b, c)]
        await converged(setup, [ra, rb, rc])
        sim = MediaSim(setup, relay)
        for name, r in (("a", ra), ("b", rb), ("c", rc)):
            sim.add(name, r)
        await sim.run(1.0)
        old = spi_of(rb)
        a_keys = len(ra.ekt_keys)
        sim.endpoints["a"].media.bye(sim.time)
        sim.remove("a")
        left_at = trio.current_time()
        await leave(ra)
        media_done = trio.Event()

        async def media() -> None:
            await sim.run(3.0)
            media_done.set()

        nursery.start_soon(media)
        got = await wait_time(lambda: spi_of(rb) != old and spi_of(rc) != old)
        assert got - left_at < 1.0
        rekeyed_at = conference(setup).current.created  # type: ignore[union-attr]
        await media_done.wait()
        assert len(ra.ekt_keys) == a_keys  # a got no key after it left
        # Receivers with b's or c's outer keys (as if the MDD helped) but only a's EKTKeys:
        seen = [(t, ok) for at in ("b", "c") for t, _, ok in sim.spy(at, ra)]
        # they read the media while a was a member (so they are able to) ...
        assert sum(ok for t, ok in seen if t < left_at) > 40
        # ... and nothing sent 1 s after the rekey.
        late = [ok for t, ok in seen if t >= rekeyed_at + 1.0]
        assert len(late) > 100  # b <-> c, about 1.9 s of 50 packets/s each way
        assert not any(late)
        # The remaining members verify each other with no E2E failure (clean network).
        for at, peer in (("b", "c"), ("c", "b")):
            entry = sim.peer(at, peer)
            assert entry["e2e_failures"] == 0 and entry["hbh_failures"] == 0, entry
            assert entry["verified"] == entry["received"] == sim.count(peer, at), entry
            assert entry["verified"] > 150
        for at in ("b", "c"):
            assert sim.peer(at, "a")["e2e_failures"] == 0
            assert sim.endpoints[at].media.report()["spis"][-1] == spi_of(rb)

        # a comes back (new socket, new association): its first key is the rekey's.
        rejoined: list[JoinResult] = []

        async def rejoin() -> None:
            rejoined.append(await join_and_serve(setup, nursery, relay, a))

        nursery.start_soon(rejoin)
        while not rejoined:
            await trio.sleep(STEP)
            sim.step(trio.current_time())
        ra2 = rejoined[0]
        newest = await converged(setup, [rb, rc, ra2])
        assert [k.spi for k in ra2.ekt_keys] == [newest]
        rejoin_rekey = conference(setup).current.created  # type: ignore[union-attr]
        sim.add("a", ra2)
        a_back = trio.current_time()
        await sim.run(1.5)
        since = max(rejoin_rekey + STEP + 0.3, a_back + 0.15)
        for peer in ("b", "c"):
            assert sim.peer("a", peer)["verified"] >= sim.count(peer, "a", since) > 40
        for at, peer in (("b", "c"), ("c", "b"), ("b", "a"), ("c", "a")):
            entry = sim.peer(at, peer)
            assert entry["e2e_failures"] == 0 and entry["hbh_failures"] == 0, entry
        nursery.cancel_scope.cancel()


async def test_joiner_cannot_read_media_from_before_it_joined(
    ids: SimpleNamespace, people: SimpleNamespace, clock: MockClock
) -> None:
    a, b, c = people.members[:3]
    async with conference_with(ids, policy_config(ids, [a, b, c])) as (setup, nursery, relay):
        ra, rb = [await join_and_serve(setup, nursery, relay, x) for x in (a, b)]
        await converged(setup, [ra, rb])
        sim = MediaSim(setup, relay)
        sim.add("a", ra)
        sim.add("b", rb)
        joining: list[JoinResult] = []

        async def join_c() -> None:
            await trio.sleep(1.0)
            joining.append(await join_and_serve(setup, nursery, relay, c))

        nursery.start_soon(join_c)
        # a and b talk; c joins after 1 s and its first key arrives with the rekey.
        while not joining:
            await trio.sleep(STEP)
            sim.step(trio.current_time())
        rc = joining[0]
        new = await converged(setup, [ra, rb, rc])
        assert [k.spi for k in rc.ekt_keys] == [new]  # its first EKTKey is the new key
        rekeyed_at = conference(setup).current.created  # type: ignore[union-attr]
        sim.add("c", rc)
        c_added = trio.current_time()
        await sim.run(2.0)
        # Everything a and b sent before c's keys existed, tried with c's keys (and b's outer
        # keys, as if the MDD helped): nothing is readable.
        pre_join = sim.spy("b", rc, before=rekeyed_at)
        assert len(pre_join) > 40
        assert not any(ok for _, _, ok in pre_join)
        # (the same receiver does read what a and b sent once they switched to new E2E keys)
        since = rekeyed_at + STEP + 0.3
        after = [ok for t, _, ok in sim.spy("b", rc) if t >= since]
        assert len(after) > 50 and all(after)
        # The old members lost nothing to the rekey; c verifies both once they switched keys
        # (RFC 8870 §4.3.1: 250 ms on the old key) and it saw a Full tag (every 100 ms).
        for at, peer in (("a", "b"), ("b", "a")):
            entry = sim.peer(at, peer)
            assert entry["e2e_failures"] == 0 and entry["hbh_failures"] == 0, entry
        since = max(since, c_added + 0.15)
        for peer in ("a", "b"):
            assert sim.peer("c", peer)["verified"] >= sim.count(peer, "c", since) > 50
        nursery.cancel_scope.cancel()
