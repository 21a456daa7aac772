"""RTCP ownership and feedback throttling in the forwarding core (fake `now`).

A member may speak in SR, SDES and BYE only for the SSRCs it sends media with (D26: an SSRC is
owned by the association it first arrived from); foreign parts are removed and counted
(``drop_rtcp_spoof``). PLI/FIR/NACK toward one media sender are rate-limited per receiver
(D36; ``drop_feedback_throttled``).
"""

from __future__ import annotations

from perc.forwarding import ForwardingConfig, ForwardingTable
from perc.wire.rtcp import (
    Bye,
    Fir,
    Nack,
    Pli,
    ReceiverReport,
    RtcpPacket,
    SdesChunk,
    SdesItem,
    SenderReport,
    SourceDescription,
    serialize_rtcp,
)

from .helpers import Address, Endpoint, conference, dispatch


def _media(table: ForwardingTable[Address], eps: list[Endpoint], now: float = 0.0) -> None:
    for ep in eps:
        dispatch(eps, table.handle_datagram(ep.address, ep.send(now), now), now)


def _send(
    table: ForwardingTable[Address],
    eps: list[Endpoint],
    sender: Endpoint,
    packets: list[RtcpPacket],
    now: float = 0.0,
) -> dict[str, list[RtcpPacket]]:
    out = table.handle_datagram(sender.address, sender.send_rtcp(serialize_rtcp(packets)), now)
    for ep in eps:
        ep.rtcp.clear()
    dispatch(eps, out, now)
    return {ep.name: ep.rtcp[0] for ep in eps if ep.rtcp}


def _sdes(*ssrcs: int) -> SourceDescription:
    return SourceDescription(tuple(SdesChunk(s, (SdesItem(1, b"cname-%d" % s),)) for s in ssrcs))


def test_a_forged_bye_for_another_members_ssrc_never_reaches_anyone() -> None:
    table: ForwardingTable[Address] = ForwardingTable()
    eps = conference(table, 3)
    a, b, c = eps
    _media(table, eps)
    # b says BYE for a's SSRC: nothing of it goes anywhere (the RR leads, empty, and is about
    # nobody, so the compound has no destination left).
    assert _send(table, eps, b, [ReceiverReport(b.ssrc), Bye((a.ssrc,))]) == {}
    assert table.associations[b.association_id].counters.drop_rtcp_spoof == 1
    # A BYE naming both its own and a's SSRC: only its own goes on.
    got = _send(table, eps, b, [ReceiverReport(b.ssrc), Bye((a.ssrc, b.ssrc), b"bye")])
    assert got == {"a": [ReceiverReport(b.ssrc), Bye((b.ssrc,), b"bye")],
                   "c": [ReceiverReport(b.ssrc), Bye((b.ssrc,), b"bye")]}  # fmt: skip
    assert table.associations[b.association_id].counters.drop_rtcp_spoof == 2
    del c


def test_a_forged_sr_and_sdes_are_removed_own_parts_forwarded() -> None:
    table: ForwardingTable[Address] = ForwardingTable()
    eps = conference(table, 3)
    a, b, c = eps
    _media(table, eps)
    # An SR as a (b is not a's sender): removed; the empty RR put first comes from b's own
    # SSRC, never a's; the SDES keeps only b's chunk.
    got = _send(table, eps, b, [SenderReport(a.ssrc, packet_count=9), _sdes(a.ssrc, b.ssrc)])
    assert got == {
        "a": [ReceiverReport(b.ssrc), _sdes(b.ssrc)],
        "c": [ReceiverReport(b.ssrc), _sdes(b.ssrc)],
    }
    counters = table.associations[b.association_id].counters
    assert counters.drop_rtcp_spoof == 2
    # An SDES only about c: dropped whole.
    assert _send(table, eps, b, [_sdes(c.ssrc)]) == {}
    assert counters.drop_rtcp_spoof == 3
    # Its own SR, SDES and BYE go to everyone else unchanged.
    own: list[RtcpPacket] = [SenderReport(b.ssrc, packet_count=1), _sdes(b.ssrc), Bye((b.ssrc,))]
    assert _send(table, eps, b, own) == {"a": own, "c": own}
    assert counters.drop_rtcp_spoof == 3


def test_sr_before_the_first_rtp_claims_a_free_ssrc_but_never_a_taken_one() -> None:
    table: ForwardingTable[Address] = ForwardingTable()
    eps = conference(table, 2)
    a, b = eps
    a_rtp = a.send(0.0)  # a's first RTP arrives after its SR
    sr = SenderReport(a.ssrc, packet_count=1)
    assert _send(table, eps, a, [sr]) == {"b": [sr]}
    dispatch(eps, table.handle_datagram(a.address, a_rtp, 0.0), 0.0)
    assert len(b.got) == 1  # the SSRC stays a's
    # b's SR under a's SSRC: a spoof; a BYE for an SSRC nobody owns: unknown, dropped.
    assert _send(table, eps, b, [SenderReport(a.ssrc)]) == {}
    assert _send(table, eps, b, [ReceiverReport(b.ssrc), Bye((0xDEAD,))]) == {}
    counters = table.associations[b.association_id].counters
    assert (counters.drop_rtcp_spoof, counters.drop_unknown_ssrc) == (1, 1)


def test_a_pli_storm_is_throttled_to_the_configured_rate() -> None:
    table: ForwardingTable[Address] = ForwardingTable(ForwardingConfig(pli_rate=2.0))
    eps = conference(table, 3)
    a, b, c = eps
    _media(table, eps)
    delivered = 0
    # b sends 1,000 PLI and 1,000 FIR toward a over 5 s (400/s): a gets at most 2/s of them.
    for i in range(1000):
        now = i * 0.005
        got = _send(table, eps, b, [ReceiverReport(b.ssrc), Pli(b.ssrc, a.ssrc)], now)
        delivered += "a" in got
        got = _send(
            table, eps, b, [ReceiverReport(b.ssrc), Fir(b.ssrc, 0, ((a.ssrc, i & 0xFF),))], now
        )
        delivered += "a" in got
    assert delivered == 10  # one at once, then one per 500 ms up to 4.995 s (PLI, FIR share)
    counters = table.associations[b.association_id].counters
    assert counters.drop_feedback_throttled == 2000 - 10
    # Toward another sender (c) the budget is separate; from c toward a too.
    assert "c" in _send(table, eps, b, [ReceiverReport(b.ssrc), Pli(b.ssrc, c.ssrc)], 5.0)
    assert "a" in _send(table, eps, c, [ReceiverReport(c.ssrc), Pli(c.ssrc, a.ssrc)], 5.0)


def test_nacks_are_bounded_in_packets_per_second() -> None:
    table: ForwardingTable[Address] = ForwardingTable(ForwardingConfig(nack_rate=100.0))
    eps = conference(table, 2)
    a, b = eps
    _media(table, eps)
    counters = table.associations[b.association_id].counters
    passed = 0
    for i in range(50):  # 50 NACKs of 17 packets each at t=0: 100 packets' worth pass
        nack = Nack(b.ssrc, a.ssrc, ((i * 17, 0xFFFF),))
        passed += "a" in _send(table, eps, b, [ReceiverReport(b.ssrc), nack], 0.0)
    assert passed == 5 and counters.drop_feedback_throttled == 45
    # One second later the budget is back.
    nack = Nack.from_lost(b.ssrc, a.ssrc, [1, 2, 3])
    assert "a" in _send(table, eps, b, [ReceiverReport(b.ssrc), nack], 1.0)
