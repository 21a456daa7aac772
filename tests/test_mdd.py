"""The sans-IO MDD engine (perc.mdd) driven in memory: fake datagrams, tunnel messages and `now`.

The endpoints are tests/forwarding/helpers.py's: real double encryption, so what the engine
forwards is checked end to end (the test process may load the E2E code; the engine may not).
"""

from __future__ import annotations

import subprocess
import sys
import uuid

import attrs
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from perc import events
from perc.forwarding import ForwardingConfig
from perc.mdd import MDD_PROFILES, TICK_INTERVAL, Address, AdmissionConfig, MddEngine
from perc.wire.tunnel import (
    EndpointDisconnect,
    MediaKeys,
    SupportedProfiles,
    TunneledDtls,
    TunnelMessage,
    UnsupportedVersion,
)

from .forwarding.helpers import Endpoint, client_hello, new_params, server_hello_flight

DTLS = client_hello()  # a well-formed DTLS ClientHello (what admits a new address)
IDLE = 10.0
STATS = 5.0


#: Admission whose timers never fire in a test that checks the other schedules.
QUIET = AdmissionConfig(pending_timeout=1000.0, summary_interval=1000.0)


def engine(
    idle: float = IDLE, admission: AdmissionConfig | None = None, **forwarding: object
) -> MddEngine:
    e = MddEngine(
        "demo",
        kmf="127.0.0.1:4444",
        forwarding=ForwardingConfig(**forwarding),  # type: ignore[arg-type]
        idle_timeout=idle,
        stats_interval=STATS,
        admission=admission,
    )
    e.handle_timer(0.0)  # starts the schedules
    return e


def up(e: MddEngine, now: float = 0.0) -> None:
    e.tunnel_up(now, fingerprint="sha-256 AA", tls="TLSv1.3")
    assert e.tunnel_messages_to_send() == [SupportedProfiles(0, MDD_PROFILES)]
    assert isinstance(e.next_event(), events.MddTunnelUp)


def drain(e: MddEngine) -> list[events.Event]:
    out = []
    while (event := e.next_event()) is not None:
        out.append(event)
    return out


def join(
    e: MddEngine, ep: Endpoint, now: float = 0.0, *, keys: bool = True, admit: bool = True
) -> uuid.UUID:
    """``ep``'s ClientHello makes its (pending) association; the KMF's MediaKeys key it (or,
    with ``keys=False`` and ``admit``, the KMF's ServerHello admits it)."""
    e.receive_datagram(DTLS, ep.address, now)
    (msg,) = e.tunnel_messages_to_send()
    assert isinstance(msg, TunneledDtls) and msg.dtls_message == DTLS
    created = drain(e)
    assert created == [events.AssociationCreated("demo", msg.association_id, peer(ep))]
    ep.association_id = msg.association_id
    ep.media_keys = attrs.evolve(ep.media_keys, association_id=msg.association_id)
    if keys:
        e.receive_tunnel_message(ep.media_keys, now)
        assert [type(x) for x in drain(e)] == [events.AssociationKeyed]
    elif admit:
        e.receive_tunnel_message(TunneledDtls(msg.association_id, server_hello_flight()), now)
        assert e.datagrams_to_send() == [(ep.address, server_hello_flight())]
        assert msg.association_id not in e.pending
    return msg.association_id


def endpoints(n: int) -> list[Endpoint]:
    params = new_params()
    return [Endpoint(chr(ord("a") + i), 0x1000 + i, params, port=5000 + i) for i in range(n)]


def peer(ep: Endpoint) -> str:
    return f"{ep.address[0]}:{ep.address[1]}"


def deliver(eps: list[Endpoint], out: list[tuple[Address, bytes]], now: float) -> list[str]:
    by_address = {ep.address: ep for ep in eps}
    names = []
    for address, data in out:
        by_address[(address[0], address[1])].deliver(data, now)
        names.append(by_address[(address[0], address[1])].name)
    return names


# --- demultiplexing (RFC 7983) -----------------------------------------------------------------


def test_first_dtls_record_creates_an_association_and_goes_to_the_kmf() -> None:
    e = engine()
    up(e)
    (a,) = endpoints(1)
    aid = join(e, a, 1.0, keys=False)
    assoc = e.associations[aid]
    assert (assoc.address, assoc.created, assoc.dtls_in, assoc.has_keys) == (
        a.address,
        1.0,
        1,
        False,
    )
    # The same address again: the same association, no event.
    e.receive_datagram(DTLS, a.address, 2.0)
    assert e.tunnel_messages_to_send() == [TunneledDtls(aid, DTLS)]
    assert drain(e) == [] and len(e.associations) == 1 and assoc.last_seen == 2.0
    # The KMF's answer goes to the endpoint's address.
    e.receive_tunnel_message(TunneledDtls(aid, b"\x16answer"), 2.5)
    assert e.datagrams_to_send() == [(a.address, b"\x16answer")]
    st = e.stats
    # (the KMF's ServerHello that admitted it counts too)
    assert (st.dtls_to_kmf, st.dtls_to_endpoint, st.associations_created) == (2, 2, 1)
    assert (assoc.dtls_in, assoc.dtls_out) == (2, 2)


@pytest.mark.parametrize("first", [0, 1, 19, 64, 127, 192, 255])
def test_neither_dtls_nor_srtp_is_dropped_and_counted(first: int) -> None:
    e = engine()
    up(e)
    e.receive_datagram(bytes([first]) + bytes(20), ("10.0.0.1", 1), 0.0)
    e.receive_datagram(b"", ("10.0.0.1", 1), 0.0)
    assert e.stats.dropped_other == 2 and e.stats.datagrams_in == 2
    assert not e.associations and e.tunnel_messages_to_send() == [] and drain(e) == []


def test_srtp_from_an_unknown_address_is_dropped_and_counted() -> None:
    e = engine()
    up(e)
    (a,) = endpoints(1)
    e.receive_datagram(a.send(0.0), a.address, 0.0)
    assert e.datagrams_to_send() == [] and not e.associations
    st = e.stats
    assert (st.srtp_in, st.dropped_srtp, st.dropped_srtp_no_keys) == (1, 1, 1)
    assert e.table.stats.unknown_source == 1


def test_media_is_forwarded_to_every_other_keyed_endpoint() -> None:
    e = engine()
    up(e)
    eps = endpoints(3)
    for ep in eps:
        join(e, ep)
    a = eps[0]
    for i in range(3):
        e.receive_datagram(a.send(float(i)), a.address, float(i))
        assert deliver(eps, e.datagrams_to_send(), float(i)) == ["b", "c"]
    st = e.stats
    assert (st.srtp_in, st.srtp_out, st.dropped_srtp) == (3, 6, 0)
    assert e.associations[a.association_id].counters.packets_in == 3


def test_a_coalesced_receive_is_handled_as_its_datagrams_one_by_one() -> None:
    e = engine()
    up(e)
    eps = endpoints(4)
    a, d = eps[0], eps[3]
    for ep in eps[:3]:
        join(e, ep)
    e.receive_datagrams([a.send(1.0), a.send(1.0), a.send(1.0)], a.address, 1.0)
    assert deliver(eps, e.datagrams_to_send(), 1.0) == ["b", "c"] * 3
    assert [p.sequence_number for p in eps[1].got] == [1001, 1002, 1003]
    # DTLS among them: each datagram goes its own way, the record to the KMF.
    e.receive_datagrams([a.send(2.0), DTLS], a.address, 2.0)
    assert deliver(eps, e.datagrams_to_send(), 2.0) == ["b", "c"]
    (msg,) = e.tunnel_messages_to_send()
    assert isinstance(msg, TunneledDtls) and msg.dtls_message == DTLS
    # From an address that is no association: each is unknown.
    e.receive_datagrams([a.send(3.0), a.send(3.0)], ("10.0.0.9", 9), 3.0)
    assert e.datagrams_to_send() == [] and e.table.stats.unknown_source == 2
    # From a pending association: each is dropped and counted, as one by one.
    join(e, d, keys=False, admit=False)
    e.receive_datagrams([d.send(4.0), d.send(4.0)], d.address, 4.0)
    assert e.datagrams_to_send() == [] and e.admission_stats.dropped_pending_srtp == 2
    st = e.stats
    assert (st.srtp_in, st.srtp_out, st.dropped_srtp) == (6, 8, 2)  # the unknown two


_FUZZ_ENGINE = engine()
up(_FUZZ_ENGINE)
_FUZZ_EPS = endpoints(2)
for _ep in _FUZZ_EPS:
    join(_FUZZ_ENGINE, _ep)
_FUZZ_ADDRESSES = [ep.address for ep in _FUZZ_EPS] + [("10.0.0.9", 9)]


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(range(3)),
    st.lists(
        st.one_of(
            st.binary(max_size=120),
            st.builds(lambda b0, rest: bytes((b0,)) + rest, st.integers(0x80, 0xBF), st.binary()),
            st.just(DTLS),
        ),
        max_size=6,
    ),
)
def test_a_coalesced_receive_of_garbage_never_raises(which: int, batch: list[bytes]) -> None:
    _FUZZ_ENGINE.receive_datagrams(batch, _FUZZ_ADDRESSES[which], 1.0)
    assert _FUZZ_ENGINE.datagrams_to_send() == []  # nothing forged authenticates
    _FUZZ_ENGINE.tunnel_messages_to_send()  # DTLS goes to the KMF


# --- the tunnel --------------------------------------------------------------------------------


def test_dtls_while_the_tunnel_is_down_is_dropped_and_makes_no_association() -> None:
    e = engine()
    (a,) = endpoints(1)
    e.receive_datagram(DTLS, a.address, 0.0)
    assert not e.associations and e.stats.dropped_no_tunnel == 1
    assert e.tunnel_messages_to_send() == [] and drain(e) == []


def test_tunnel_down_keeps_associations_and_keys_media_goes_on() -> None:
    e = engine()
    up(e)
    a, b = eps = endpoints(2)
    join(e, a)
    join(e, b)
    e.tunnel_down(1.0, reason="closed", retry_in=0.5)
    assert drain(e) == [events.MddTunnelDown("demo", "closed", kmf="127.0.0.1:4444", retry_in=0.5)]
    assert not e.tunnel_is_up and len(e.associations) == 2
    assert all(x.has_keys for x in e.associations.values())
    e.receive_datagram(a.send(2.0), a.address, 2.0)
    assert deliver(eps, e.datagrams_to_send(), 2.0) == ["b"]
    # DTLS (a rekey, a new join) is dropped until a tunnel is up again.
    e.receive_datagram(DTLS, a.address, 2.0)
    assert e.tunnel_messages_to_send() == [] and e.stats.dropped_no_tunnel == 1
    e.tunnel_connect_failed(3.0, reason="refused", retry_in=1.0)
    (failed,) = drain(e)
    assert isinstance(failed, events.MddTunnelDown) and not failed.connected
    assert e.stats.connect_failures == 1
    up(e, 4.0)
    assert e.stats.tunnels_up == 2
    e.receive_datagram(DTLS, a.address, 5.0)
    assert e.tunnel_messages_to_send() == [TunneledDtls(a.association_id, DTLS)]


def test_unsupported_version_closes_the_tunnel_and_is_remembered() -> None:
    e = engine()
    up(e)
    (a,) = endpoints(1)
    aid = join(e, a, keys=False)
    e.receive_tunnel_message(UnsupportedVersion(highest_version=0), 1.0)
    (refused,) = drain(e)
    assert refused == events.MddTunnelRefused("demo", "127.0.0.1:4444", 0, 0)
    assert e.tunnel_close_reason == "KMF answered UnsupportedVersion" and e.version_refused
    assert e.kmf_highest_version == 0 and not e.tunnel_is_up
    # RFC 9185 §5.5: the rest is discarded, nothing more goes to the KMF.
    e.receive_tunnel_message(TunneledDtls(aid, b"\x16late"), 1.0)
    e.receive_datagram(DTLS, a.address, 1.0)
    assert e.datagrams_to_send() == [] and e.tunnel_messages_to_send() == []
    e.tunnel_down(1.5, reason="closed", retry_in=30.0)
    (down,) = drain(e)
    assert isinstance(down, events.MddTunnelDown) and down.reason == e.tunnel_close_reason
    up(e, 31.0)
    assert e.tunnel_close_reason is None and not e.version_refused
    assert e.stats.unsupported_version == 1


def test_a_kmf_sending_supported_profiles_breaks_the_tunnel_rules() -> None:
    e = engine()
    up(e)
    e.receive_tunnel_message(SupportedProfiles(0, (9,)), 0.0)
    assert e.tunnel_close_reason is not None and "D2" in e.tunnel_close_reason
    assert e.stats.protocol_errors == 1 and not e.tunnel_is_up


def test_messages_naming_unknown_associations_are_counted_and_ignored() -> None:
    e = engine()
    up(e)
    (a,) = endpoints(1)
    stranger = uuid.uuid4()
    msgs: list[TunnelMessage] = [
        TunneledDtls(stranger, b"\x16x"),
        EndpointDisconnect(stranger),
        attrs.evolve(a.media_keys, association_id=stranger),
    ]
    for msg in msgs:
        e.receive_tunnel_message(msg, 0.0)
    assert e.stats.dropped_unknown_association == 3
    assert e.datagrams_to_send() == [] and drain(e) == [] and e.tunnel_is_up


def test_endpoint_disconnect_removes_the_association_and_its_keys() -> None:
    e = engine()
    up(e)
    a, b = eps = endpoints(2)
    join(e, a)
    join(e, b)
    e.receive_datagram(a.send(1.0), a.address, 1.0)
    deliver(eps, e.datagrams_to_send(), 1.0)
    assoc = e.associations[b.association_id]
    e.receive_tunnel_message(EndpointDisconnect(b.association_id), 2.0)
    final, ended = drain(e)
    assert isinstance(final, events.MddCounters) and final.final
    assert final.counters["packets_out"] == 1
    assert ended == events.AssociationEnded("demo", b.association_id, "kmf", peer=peer(b))
    assert b.association_id not in e.associations and assoc.media_keys is None
    assert e.stats.associations_ended_by_kmf == 1
    # Nothing is forwarded to or from it any more.
    e.receive_datagram(a.send(3.0), a.address, 3.0)
    e.receive_datagram(b.send(3.0), b.address, 3.0)
    assert e.datagrams_to_send() == []
    assert e.stats.srtp_out == 1  # the ended association's counters stay in the totals


def test_max_associations_bounds_the_admitted_associations() -> None:
    e = engine(max_associations=2)
    up(e)
    eps = endpoints(3)
    join(e, eps[0], keys=False)
    join(e, eps[1], keys=False)
    # A third ClientHello is pending (its own budget) until the KMF's ServerHello, which
    # finds the conference full: removed, the KMF told, the ServerHello not forwarded.
    aid = join(e, eps[2], keys=False, admit=False)
    e.receive_tunnel_message(TunneledDtls(aid, server_hello_flight()), 0.5)
    assert len(e.associations) == 2 and aid not in e.associations
    assert e.stats.dropped_table_full == 1 and e.admission_stats.dropped_admit_full == 1
    assert e.tunnel_messages_to_send() == [EndpointDisconnect(aid)]
    assert e.datagrams_to_send() == []
    (ended,) = [x for x in drain(e) if isinstance(x, events.AssociationEnded)]
    assert ended.reason == "full" and ended.disconnect_sent
    assert e.table.stats.associations_refused == 0  # the engine checks before the table would


# --- keys (D4, D5, D18) ------------------------------------------------------------------------


def test_srtp_before_media_keys_is_held_then_released_in_order() -> None:
    e = engine(hold_limit=64)
    up(e)
    a, b = eps = endpoints(2)
    join(e, b)
    join(e, a, keys=False)
    sent = [a.send(float(i)) for i in range(70)]
    for data in sent:
        e.receive_datagram(data, a.address, 1.0)
    assert e.datagrams_to_send() == []
    counters = e.associations[a.association_id].counters
    assert (counters.held, counters.drop_queue_full) == (64, 6)
    st = e.stats
    assert (st.srtp_held, st.dropped_srtp_no_keys, st.dropped_srtp) == (64, 70, 6)
    e.receive_tunnel_message(a.media_keys, 2.0)
    (keyed,) = drain(e)
    assert isinstance(keyed, events.AssociationKeyed) and keyed.released == 64
    assert deliver(eps, e.datagrams_to_send(), 2.0) == ["b"] * 64
    assert [p.sequence_number for p in b.got] == list(range(1001, 1065))
    assert e.stats.srtp_in == 70  # a held datagram counts once


def test_keys_replaced_are_reported_as_such() -> None:
    e = engine()
    up(e)
    (a,) = endpoints(1)
    join(e, a)
    e.receive_tunnel_message(a.media_keys, 1.0)
    (keyed,) = drain(e)
    assert isinstance(keyed, events.AssociationKeyed) and keyed.replaced
    assert "(replaced)" in keyed.describe() and e.stats.media_keys == 2


def _keys(aid: uuid.UUID, profile: int, k: int, s: int, mki: bytes = b"") -> MediaKeys:
    return MediaKeys(aid, profile, mki, b"\x01" * k, b"\x02" * k, b"\x03" * s, b"\x04" * s)


def test_media_keys_fit_only_the_outer_halves_of_perc_profiles() -> None:
    e = engine()
    up(e)
    eps = endpoints(2)
    aids = [join(e, ep, keys=False) for ep in eps]
    bad = [
        _keys(aids[0], 0x0009, 32, 12),  # the whole double key, not the outer half (D4)
        _keys(aids[0], 0x000A, 16, 12),
        _keys(aids[0], 0x0009, 16, 24),
        _keys(aids[0], 0x0007, 16, 12),  # single-layer profile: not an MDD-endpoint hop (D18)
        _keys(aids[0], 0x0009, 16, 12, mki=b"\x01"),  # EKT forbids MKI (D4)
        MediaKeys(aids[0], 0x0009, b"", b"\x01" * 16, b"\x01" * 16, bytes(12), bytes(12)),
    ]
    for msg in bad:
        e.receive_tunnel_message(msg, 0.0)
    rejected = drain(e)
    assert [type(x) for x in rejected] == [events.MediaKeysRejected] * len(bad)
    assert e.stats.media_keys_rejected == len(bad) and e.stats.media_keys == 0
    assert not e.associations[aids[0]].has_keys
    e.receive_tunnel_message(_keys(aids[0], 0x0009, 16, 12), 0.0)
    e.receive_tunnel_message(_keys(aids[1], 0x000A, 32, 12), 0.0)
    assert [type(x) for x in drain(e)] == [events.AssociationKeyed] * 2
    assert all(x.has_keys for x in e.associations.values())
    # Events carry a digest of the keys, never the keys.
    e.receive_tunnel_message(_keys(aids[0], 0x0009, 16, 12), 0.0)
    (keyed,) = drain(e)
    text = str(events.to_json(keyed)) + keyed.describe()
    assert "01" * 16 not in text and "0101" not in text


# --- idle expiry (D3) --------------------------------------------------------------------------


def test_a_silent_endpoint_is_expired_and_the_kmf_told() -> None:
    e = engine()
    up(e)
    a, b = endpoints(2)
    join(e, a, 0.0)
    join(e, b, 0.0)
    assert e.get_timer() <= IDLE
    t = 0.0
    while t < 12.0:  # a keeps talking (DTLS counts too), b is silent
        t += 1.0
        e.receive_datagram(a.send(t) if t < 6 else DTLS, a.address, t)
        e.datagrams_to_send()
        e.tunnel_messages_to_send()
        while e.get_timer() <= t:
            e.handle_timer(t)
    assert e.tunnel_messages_to_send() == [EndpointDisconnect(b.association_id)]
    ended = [x for x in drain(e) if isinstance(x, events.AssociationEnded)]
    assert ended == [
        events.AssociationEnded(
            "demo", b.association_id, "idle", peer=peer(b), disconnect_sent=True
        )
    ]
    assert "association idle conference=demo" in ended[0].describe()
    assert "EndpointDisconnect sent" in ended[0].describe()
    assert list(e.associations) == [a.association_id] and e.stats.associations_idle == 1


def test_idle_expiry_while_the_tunnel_is_down_sends_nothing() -> None:
    e = engine()
    up(e)
    (a,) = endpoints(1)
    join(e, a, 0.0)
    e.tunnel_down(1.0, reason="closed")
    drain(e)
    e.handle_timer(IDLE + 1.0)
    assert e.tunnel_messages_to_send() == []
    (ended,) = [x for x in drain(e) if isinstance(x, events.AssociationEnded)]
    assert ended.disconnect_sent is False
    assert "not sent (tunnel down)" in ended.describe()


def test_the_timer_never_moves_earlier_and_sweeps_are_coalesced() -> None:
    e = engine(admission=QUIET)
    up(e)
    assert e.get_timer() == STATS  # idle sweep at IDLE, counters at STATS, no last_n ticks
    eps = endpoints(3)
    for i, ep in enumerate(eps):
        join(e, ep, 1.0 + i)
        assert e.get_timer() == STATS
    e.handle_timer(STATS)
    assert e.get_timer() == IDLE
    e.handle_timer(IDLE)  # nobody expired yet; the oldest expires at 11.0, but sweeps are
    assert e.get_timer() == IDLE + IDLE / 8  # at most ~8 per timeout period
    e.handle_timer(IDLE + IDLE / 8)  # the first one goes; the next at max(12, 11.25 + 1.25)
    assert len(e.associations) == 2
    assert e.get_timer() == IDLE + 2 * IDLE / 8


def test_last_n_ticks_the_table() -> None:
    e = engine(last_n=1)
    assert e.get_timer() == TICK_INTERVAL
    e.handle_timer(TICK_INTERVAL)
    assert e.get_timer() == 2 * TICK_INTERVAL


# --- counters ----------------------------------------------------------------------------------


def test_periodic_counters_only_for_what_changed_and_totals_at_close() -> None:
    e = engine(idle=100.0, admission=QUIET)
    up(e)
    a, b = eps = endpoints(2)
    join(e, a)
    join(e, b)
    e.handle_timer(STATS)
    assert drain(e) == []  # nothing counted yet
    e.receive_datagram(a.send(6.0), a.address, 6.0)
    deliver(eps, e.datagrams_to_send(), 6.0)
    e.handle_timer(2 * STATS)
    counters = drain(e)
    assert all(isinstance(x, events.MddCounters) for x in counters)
    assert {x.association for x in counters} == {a.association_id, b.association_id}  # type: ignore[attr-defined]
    e.handle_timer(3 * STATS)
    assert drain(e) == []  # unchanged
    e.close(20.0, {"send_waits": 0})
    *every, totals = drain(e)
    assert len(every) == 2 and not any(x.final for x in every)  # type: ignore[attr-defined]
    assert isinstance(totals, events.MddTotals)
    assert totals.describe().startswith(
        "totals conference=demo associations=2 created=2 srtp_in=1 srtp_out=1 dropped_srtp=0 "
    )
    assert totals.describe().endswith(" send_waits=0")


# --- events: JSON for programs, the old lines for people ---------------------------------------


def test_mdd_events_round_trip_and_keep_their_human_lines() -> None:
    aid = uuid.UUID(int=1)
    cases: list[tuple[events.Event, str]] = [
        (
            events.MddTunnelUp("demo", "h:1", fingerprint="fp", version=0, tls="TLSv1.3"),
            "tunnel up conference=demo peer=h:1 kmf=fp version=0 tls=TLSv1.3",
        ),
        (
            events.MddTunnelDown("demo", "closed", kmf="h:1", retry_in=0.5),
            "tunnel down conference=demo peer=h:1: closed; reconnect in 0.5 s",
        ),
        (
            events.MddTunnelDown("demo", "refused", connected=False, kmf="h:1", retry_in=2.0),
            "tunnel connect failed conference=demo peer=h:1: refused; retry in 2 s",
        ),
        (
            events.AssociationCreated("demo", aid, "h:2"),
            f"association new conference=demo association={aid} peer=h:2",
        ),
        (
            events.AssociationKeyed("demo", aid, 9, peer="h:2", keys="abcd"),
            f"keys installed conference=demo association={aid} peer=h:2 profile=0x0009 keys=abcd",
        ),
        (
            events.AssociationEnded("demo", aid, "kmf", peer="h:2"),
            f"association ended by KMF conference=demo association={aid} peer=h:2",
        ),
        (
            events.MddCounters("demo", aid, {"packets_in": 3, "drop_auth": 1}, final=True),
            f"counters conference=demo association={aid} in=3/0B out=0/0B rtcp=0/0 held=0 "
            "drops: auth=1 (final)",
        ),
        (
            events.KeyIsolation(loaded=[], checked=["perc.srtp.ekt"]),
            "key isolation: end-to-end modules loaded: none (checked perc.srtp.ekt)",
        ),
        (
            events.ConferenceListening("conference", "::1", 5004, "demo"),
            "conference=demo listening on udp [::1]:5004",
        ),
    ]
    for event, line in cases:
        assert event.describe() == line
        back = events.from_json(events.to_json(event))
        assert back == event or (
            isinstance(event, events.ConferenceListening)
            and type(back) is events.Listening
            and events.to_json(back) == events.to_json(event)
        )


def test_the_engine_module_needs_no_trio_and_no_end_to_end_code() -> None:
    code = (
        "import sys, perc.mdd\n"
        "bad = [m for m in ('trio', *perc.mdd.E2E_MODULES) if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
