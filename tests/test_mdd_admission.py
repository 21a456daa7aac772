"""MDD admission (perc.mdd, in memory, fake `now`): what a new address must send to get an
association, the pending budget, the per-IP cap, expiry, and the rate-limited summaries."""

from __future__ import annotations

import uuid

import attrs
import pytest

from perc import events
from perc.forwarding import ForwardingConfig
from perc.mdd import MDD_PROFILES, AdmissionConfig, MddEngine
from perc.wire.tunnel import EndpointDisconnect, SupportedProfiles, TunneledDtls

from .forwarding.helpers import Endpoint, client_hello, new_params, server_hello_flight

HELLO = client_hello()


def engine(**admission: object) -> MddEngine:
    e = MddEngine(
        "demo",
        kmf="127.0.0.1:4444",
        forwarding=ForwardingConfig(max_associations=4),
        idle_timeout=10.0,
        stats_interval=1000.0,
        admission=AdmissionConfig(**admission),  # type: ignore[arg-type]
    )
    e.handle_timer(0.0)
    e.tunnel_up(0.0)
    assert e.tunnel_messages_to_send() == [SupportedProfiles(0, MDD_PROFILES)]
    drain(e)
    return e


def drain(e: MddEngine) -> list[events.Event]:
    out = []
    while (event := e.next_event()) is not None:
        out.append(event)
    return out


def relayed(e: MddEngine) -> list[TunneledDtls]:
    msgs = e.tunnel_messages_to_send()
    assert all(isinstance(m, TunneledDtls) for m in msgs)
    return msgs  # type: ignore[return-value]


def admit(e: MddEngine, addr: tuple[str, int], now: float = 0.0) -> uuid.UUID:
    """A ClientHello, then the KMF's ServerHello: an admitted association."""
    e.receive_datagram(client_hello(), addr, now)
    (msg,) = relayed(e)
    e.receive_tunnel_message(TunneledDtls(msg.association_id, server_hello_flight()), now)
    assert e.datagrams_to_send() == [(addr, server_hello_flight())]
    assert msg.association_id not in e.pending
    return msg.association_id


# --- what creates an association --------------------------------------------------------------


def _truncated_hello() -> bytes:
    return HELLO[:-3]


def _bad_length() -> bytes:
    # The record length says more than the datagram holds.
    return HELLO[:11] + (len(HELLO)).to_bytes(2, "big") + HELLO[13:]


def _epoch_1() -> bytes:
    return HELLO[:3] + b"\x00\x01" + HELLO[5:]


def _alert() -> bytes:
    return bytes.fromhex("15fefd00000000000000000002" + "0228")  # a fatal alert record


def _server_hello() -> bytes:
    return server_hello_flight()


def _fragment() -> bytes:
    # The first half of the ClientHello as a fragment (fragment_length < length).
    body = HELLO[13:]
    length = int.from_bytes(body[1:4], "big")
    half = length // 2
    frag = body[:9] + half.to_bytes(3, "big") + body[12 : 12 + half]
    return HELLO[:11] + len(frag).to_bytes(2, "big") + frag


@pytest.mark.parametrize(
    "datagram",
    [
        b"\x14",
        b"\x16",
        bytes([22]) + bytes(40),
        bytes([63, 9]),
        _truncated_hello(),
        _bad_length(),
        _epoch_1(),
        _alert(),
        _server_hello(),
        _fragment(),
    ],
    ids=[
        "one byte 0x14",
        "one byte 0x16",
        "zeros",
        "first byte 63",
        "truncated",
        "record length",
        "epoch 1",
        "alert",
        "server hello",
        "fragment",
    ],
)
def test_anything_but_a_client_hello_from_an_unknown_address_is_dropped_not_relayed(
    datagram: bytes,
) -> None:
    e = engine()
    e.receive_datagram(datagram, ("10.0.0.1", 1000), 0.0)
    assert e.tunnel_messages_to_send() == []
    assert not e.associations and drain(e) == []
    assert e.admission_stats.dropped_not_hello == 1
    assert e.stats.dtls_to_kmf == 0


def test_a_client_hello_makes_a_pending_association_and_only_hellos_pass_until_progress() -> None:
    e = engine()
    addr = ("10.0.0.1", 1000)
    e.receive_datagram(HELLO, addr, 0.0)
    (msg,) = relayed(e)
    aid = msg.association_id
    assert e.pending == {aid}
    (created,) = drain(e)
    assert isinstance(created, events.AssociationCreated)
    # From a pending association only ClientHellos are relayed; SRTP is not even held.
    e.receive_datagram(b"\x14\xfe\xfd" + bytes(20), addr, 0.1)
    e.receive_datagram(b"\x80" + bytes(30), addr, 0.1)
    assert e.tunnel_messages_to_send() == []
    st = e.admission_stats
    assert (st.dropped_pending_not_hello, st.dropped_pending_srtp) == (1, 1)
    # The KMF's HelloVerifyRequest is forwarded and is no progress; the cookie ClientHello is
    # relayed; the KMF's ServerHello admits it.
    e.receive_tunnel_message(TunneledDtls(aid, b"\x16hvr"), 0.2)
    assert e.datagrams_to_send() == [(addr, b"\x16hvr")] and aid in e.pending
    e.receive_datagram(client_hello(cookie=b"c" * 32), addr, 0.3)
    assert [m.association_id for m in relayed(e)] == [aid]
    e.receive_tunnel_message(TunneledDtls(aid, server_hello_flight()), 0.4)
    assert not e.pending and st.admitted == 1
    # Admitted: any DTLS is relayed now (the handshake's later flights).
    e.receive_datagram(b"\x14\xfe\xfd" + bytes(20), addr, 0.5)
    assert len(relayed(e)) == 1


def test_media_keys_admit_a_pending_association_too() -> None:
    e = engine()
    ep = Endpoint("a", 0x1000, new_params(), port=5000)
    e.receive_datagram(HELLO, ep.address, 0.0)
    (msg,) = relayed(e)
    e.receive_tunnel_message(attrs.evolve(ep.media_keys, association_id=msg.association_id), 0.5)
    assert not e.pending and e.associations[msg.association_id].has_keys
    assert e.admission_stats.admitted == 1


def test_the_pending_budget_evicts_the_oldest_pending_never_an_admitted_one() -> None:
    e = engine(max_pending=3, max_pending_per_ip=100)
    members = [admit(e, ("10.1.0.1", 1000 + i)) for i in range(2)]
    for port in range(5):
        e.receive_datagram(client_hello(), ("10.9.9.9", port), 0.1 * port)
    first = [m.association_id for m in relayed(e)]
    assert len(first) == 5  # every well-formed ClientHello is relayed
    assert e.pending == set(first[2:])  # the two oldest made room
    assert e.admission_stats.pending_evicted == 2
    assert all(aid in e.associations for aid in members)
    # The evicted sent no cookie: the KMF's cookie gate kept nothing, nothing to tell it.
    assert e.tunnel_messages_to_send() == []
    # A newcomer can still be admitted: its own budget, max_associations (4) not reached.
    assert admit(e, ("10.1.0.9", 1), 1.0) in e.associations


def test_an_address_evicted_before_its_cookie_gets_its_association_id_back() -> None:
    """Under a flood of new addresses a pending association may be evicted while its endpoint
    waits for the KMF's HelloVerifyRequest. The KMF's cookie is bound to the association id,
    so the endpoint's ClientHello with that cookie must come back under the same id."""
    e = engine(max_pending=2, max_pending_per_ip=100)
    joiner = ("10.1.0.1", 5000)
    e.receive_datagram(client_hello(), joiner, 0.0)
    (first,) = relayed(e)
    for port in range(2):  # the flood: the joiner's pending association is evicted
        e.receive_datagram(client_hello(), ("10.9.9.9", port), 0.1)
    assert first.association_id not in e.pending
    relayed(e)
    e.receive_datagram(client_hello(cookie=b"c" * 16), joiner, 0.5)
    (again,) = relayed(e)
    assert again.association_id == first.association_id
    # Spent: a later eviction of it (cookie sent) is not remembered, the KMF holds state.
    for port in range(2, 4):
        e.receive_datagram(client_hello(), ("10.9.9.9", port), 0.6)
    e.receive_datagram(client_hello(), joiner, 0.7)
    msgs = e.tunnel_messages_to_send()
    fresh = [m for m in msgs if isinstance(m, TunneledDtls)][-1]
    assert fresh.association_id != first.association_id


def test_the_evicted_ids_are_bounded_by_max_pending() -> None:
    e = engine(max_pending=3, max_pending_per_ip=1000)
    for port in range(50):
        e.receive_datagram(client_hello(), ("10.9.9.9", port), 0.01 * port)
    assert e.admission_stats.pending_evicted == 47
    assert len(e._evicted) <= 3


def test_the_per_ip_cap_drops_new_ports_of_one_address_only() -> None:
    e = engine(max_pending=100, max_pending_per_ip=3)
    for port in range(10):
        e.receive_datagram(client_hello(), ("10.6.6.6", port), 0.0)
    assert len(relayed(e)) == 3 and e.admission_stats.dropped_per_ip == 7
    # Another address is unaffected; an admitted one frees its slot.
    aid = admit(e, ("10.1.1.1", 1))
    assert aid in e.associations
    assert len(e.pending) == 3


def test_pending_expiry_after_the_timeout_with_endpoint_disconnect_only_after_a_cookie() -> None:
    e = engine(pending_timeout=2.0)
    e.receive_datagram(client_hello(), ("10.0.0.1", 1), 0.0)
    e.receive_datagram(client_hello(), ("10.0.0.2", 1), 0.0)
    e.receive_datagram(client_hello(cookie=b"x" * 32), ("10.0.0.2", 1), 0.5)
    quiet, cookie = (m.association_id for m in relayed(e)[:2])
    e.handle_timer(1.9)
    assert len(e.pending) == 2
    t = 1.9
    while e.pending:
        t = e.get_timer()
        e.handle_timer(t)
    assert 2.0 <= t <= 2.0 + 2.0 / 4 + 1e-9  # swept every pending_timeout / 4
    # The KMF may hold state only for the one that showed a cookie: it is told.
    assert e.tunnel_messages_to_send() == [EndpointDisconnect(cookie)]
    st = e.admission_stats
    assert (st.pending_expired, st.disconnects_sent) == (2, 1)
    ended = {x.association: x for x in drain(e) if isinstance(x, events.AssociationEnded)}
    assert ended[quiet].reason == ended[cookie].reason == "pending_timeout"
    assert ended[cookie].disconnect_sent and not ended[quiet].disconnect_sent
    assert not e.associations


def test_an_admitted_association_is_never_displaced_and_outlives_the_pending_timeout() -> None:
    e = engine(max_pending=2, max_pending_per_ip=2, pending_timeout=2.0)
    addr = ("10.1.0.1", 1)
    aid = admit(e, addr)
    for i in range(1000):  # a flood from spoofed ports of many addresses
        e.receive_datagram(client_hello(), (f"10.7.{i // 250}.{i % 250}", i), i * 0.005)
        if i % 100 == 0:
            e.handle_timer(i * 0.005)
            e.receive_datagram(b"\x14\xfe\xfd" + bytes(20), addr, i * 0.005)  # still talking
    e.handle_timer(5.0)
    assert aid in e.associations and aid not in e.pending
    assert e.admission_stats.pending_evicted == 998


def test_per_address_events_are_rate_limited_into_summaries() -> None:
    e = engine(max_pending=10_000, max_pending_per_ip=10_000, event_burst=20, event_rate=2.0)
    summaries: list[events.MddAdmission] = []
    per_address = 0
    for i in range(12_000):  # 2,000 new addresses a second for 6 s
        now = i / 2000
        e.receive_datagram(b"\x14", ("10.8.0.1", i), now)  # junk: never relayed
        e.receive_datagram(client_hello(), ("10.8.0.2", i), now)
        if now >= e.get_timer():
            e.handle_timer(now)
        e.tunnel_messages_to_send()
        for x in drain(e):
            if isinstance(x, events.MddAdmission):
                summaries.append(x)
            else:
                per_address += 1
    # Burst of 20, then 2/s (as configured here) for creation and end together; one summary
    # a second at most.
    assert per_address <= 20 + 2 * 6 + 1
    assert 5 <= len(summaries) <= 7
    last = summaries[-1]
    assert last.counters["dropped_not_hello"] >= 11_000
    assert sum(s.suppressed for s in summaries) >= 11_000
    assert "admission conference=demo" in last.describe()
    # Nothing changes: no more summaries.
    e.handle_timer(100.0)
    drain(e)
    e.handle_timer(200.0)
    assert [x for x in drain(e) if isinstance(x, events.MddAdmission)] == []
