"""The forwarding core with real endpoints: RTP fan-out, D5 hold, removal, drops, RTCP routing."""

from __future__ import annotations

import uuid

import attrs
import pytest

from perc.forwarding import (
    ForwardingConfig,
    ForwardingTable,
    ForwardingUsageError,
    MediaKeysError,
)
from perc.srtp.index import MAX_RTP_INDEX
from perc.wire.ekt import ekt_field_length_untrusted
from perc.wire.rtcp import (
    Bye,
    Fir,
    Nack,
    Pli,
    ReceiverReport,
    ReportBlock,
    RtcpPacket,
    SdesChunk,
    SdesItem,
    SenderReport,
    SourceDescription,
    serialize_rtcp,
)

from .helpers import Address, Endpoint, conference, dispatch


def test_three_endpoints_every_packet_to_the_other_two_verified_end_to_end() -> None:
    table: ForwardingTable[Address] = ForwardingTable()
    eps = conference(table, 3)
    now = 0.0
    bytes_to = {ep.address: 0 for ep in eps}
    for _ in range(30):
        for ep in eps:
            now += 0.001
            wire = ep.send(now)
            out = table.handle_datagram(ep.address, wire, now)
            for address, data in out:
                assert len(data) == len(wire)  # nothing changed but the outer layer
                bytes_to[address] += len(data)
            names = dispatch(eps, out, now)
            assert sorted(names) == sorted(o.name for o in eps if o is not ep)
    for ep in eps:
        # 30 packets from each of two peers, all verified by DoubleReceiver (both layers).
        assert len(ep.got) == 60
        assert {p.ssrc for p in ep.got} == {o.ssrc for o in eps if o is not ep}
        for p in ep.got:
            assert p.payload[:4] == p.ssrc.to_bytes(4, "big")  # what the sender put there
            assert p.sequence_number == p.original_sequence_number
        c = table.associations[ep.association_id].counters
        assert (c.received, c.packets_in, c.packets_out, c.audio_in) == (30, 30, 60, 30)
        assert c.bytes_out == bytes_to[ep.address]
    snap = table.snapshot(now)
    totals = snap.totals()
    assert totals["packets_in"] == 90 and totals["packets_out"] == 180
    assert sum(v for k, v in totals.items() if k.startswith("drop_")) == 0
    assert snap.table["unknown_source"] == 0 and snap.table["keys_installed"] == 3


def test_ekt_field_passes_through_unchanged() -> None:
    table: ForwardingTable[Address] = ForwardingTable()
    a, b = conference(table, 2)
    full = 0
    for i in range(8):  # the first packets carry Full EKT tags (RFC 8870 §4.6)
        wire = a.send(i * 0.02)
        [(addr, data)] = table.handle_datagram(a.address, wire, i * 0.02)
        assert addr == b.address
        length = ekt_field_length_untrusted(wire)
        full += length > 1
        assert data[-length:] == wire[-length:]  # opaque, re-appended unchanged (D11)
        assert data[: -length - 16] != wire[: -length - 16]  # re-encrypted under b's key
        b.deliver(data, i * 0.02)
    assert full >= 3 and len(b.got) == 8


def test_aes_256_profile() -> None:
    table: ForwardingTable[Address] = ForwardingTable()
    eps = conference(table, 3, profile=0x000A)
    for ep in eps:
        dispatch(eps, table.handle_datagram(ep.address, ep.send(0.0), 0.0), 0.0)
    assert [len(ep.got) for ep in eps] == [2, 2, 2]


def test_d5_hold_then_release_in_order_and_overflow_counted() -> None:
    table: ForwardingTable[Address] = ForwardingTable()
    a, b, c = conference(table, 3, keys=False)
    table.install_keys(b.media_keys, 0.0)
    table.install_keys(c.media_keys, 0.0)
    wires = [a.send(i * 0.02) for i in range(70)]
    for i, w in enumerate(wires):
        assert table.handle_datagram(a.address, w, i * 0.02) == []
    ca = table.associations[a.association_id].counters
    assert (ca.held, ca.drop_queue_full, ca.packets_in, ca.received) == (64, 6, 0, 70)
    out = table.install_keys(a.media_keys, 2.0)
    assert len(out) == 128  # 64 held, each to b and c
    dispatch([a, b, c], out, 2.0)
    # Released in arrival order: b sees SEQs 1001..1064 in order, all verified.
    assert [p.sequence_number for p in b.got] == list(range(1001, 1065))
    assert len(c.got) == 64
    assert ca.packets_in == 64
    assert ca.received == 70  # released datagrams are not counted again (one arrival each)
    # Later packets flow normally.
    dispatch([a, b, c], table.handle_datagram(a.address, a.send(3.0), 3.0), 3.0)
    assert len(b.got) == 65


def test_d5_srtcp_held_too_and_removed_association_counts_held_as_no_keys() -> None:
    table: ForwardingTable[Address] = ForwardingTable()
    a, b = conference(table, 2, keys=False)
    table.install_keys(b.media_keys, 0.0)
    sr = serialize_rtcp([SenderReport(a.ssrc, packet_count=1)])
    table.handle_datagram(a.address, a.send_rtcp(sr), 0.0)
    table.handle_datagram(a.address, a.send(0.0), 0.0)
    counters = table.associations[a.association_id].counters
    assert counters.held == 2
    out = table.install_keys(a.media_keys, 0.1)
    dispatch([a, b], out, 0.1)
    assert len(b.rtcp) == 1 and len(b.got) == 1
    # Held, then the association ends before its keys: counted as drop_no_keys.
    table.handle_datagram(b.address, b.send(0.2), 0.2)
    other = conference(table, 1, keys=False, first_port=6000, first_name="x")[0]
    for i in range(3):
        table.handle_datagram(other.address, other.send(i), float(i))
    oc = table.associations[other.association_id].counters
    assert table.remove(other.association_id)
    assert oc.drop_no_keys == 3 and oc.held == 3


def test_auth_failures_and_replays_are_counted_and_dropped() -> None:
    table: ForwardingTable[Address] = ForwardingTable()
    a, b = conference(table, 2)
    w = a.send(0.0)
    tampered = bytearray(w)
    tampered[20] ^= 1
    assert table.handle_datagram(a.address, bytes(tampered), 0.0) == []
    ca = table.associations[a.association_id].counters
    assert ca.drop_auth == 1
    dispatch([a, b], table.handle_datagram(a.address, w, 0.0), 0.0)
    assert table.handle_datagram(a.address, w, 0.0) == []  # the same packet again
    assert ca.drop_replay == 1
    # SRTCP too.
    s = a.send_rtcp(serialize_rtcp([SenderReport(a.ssrc)]))
    bad = bytearray(s)
    bad[10] ^= 1
    assert table.handle_datagram(a.address, bytes(bad), 0.0) == []
    assert ca.drop_auth == 2
    assert len(table.handle_datagram(a.address, s, 0.0)) == 1
    assert table.handle_datagram(a.address, s, 0.0) == []
    assert ca.drop_replay == 2
    # A packet under the wrong key (b's keys used for a's address) fails authentication.
    assert table.handle_datagram(a.address, b.send(0.0), 0.0) == []
    assert ca.drop_auth == 3
    assert len(b.got) == 1 and ca.packets_in == 2


def test_malformed_and_unknown_source() -> None:
    table: ForwardingTable[Address] = ForwardingTable()
    a, _b = conference(table, 2)
    ca = table.associations[a.association_id].counters
    for junk in (b"", b"\x80", b"\x00" * 40, b"\x80\x60" + bytes(10), b"\x80\xc8" + bytes(10)):
        assert table.handle_datagram(a.address, junk, 0.0) == []
    assert ca.drop_malformed + ca.drop_auth == 5
    assert table.handle_datagram(("10.0.0.1", 1), a.send(0.0), 0.0) == []
    assert table.stats.unknown_source == 1
    assert table.handle_from(uuid.uuid4(), a.send(0.0), 0.0) == []
    assert table.stats.unknown_source == 2


def test_several_datagrams_from_one_address_are_handled_as_one_by_one() -> None:
    table: ForwardingTable[Address] = ForwardingTable()
    eps = conference(table, 3)
    a, b, c = eps
    batch = [a.send(0.001), b"\x80", a.send(0.002), a.send(0.003)]
    out = table.handle_datagrams(a.address, batch, 0.01)
    assert sorted(dispatch(eps, out, 0.01)) == ["b"] * 3 + ["c"] * 3
    assert [p.sequence_number for p in b.got] == [p.sequence_number for p in c.got]
    assert [p.sequence_number for p in b.got] == [1001, 1002, 1003]
    ca = table.associations[a.association_id].counters
    assert (ca.received, ca.packets_in, ca.drop_malformed) == (4, 3, 1)
    assert table.associations[a.association_id].last_seen == 0.01
    assert table.handle_datagrams(("10.0.0.1", 1), batch, 0.02) == []
    assert table.stats.unknown_source == 4


def test_removal_and_idle_expiry() -> None:
    table: ForwardingTable[Address] = ForwardingTable()
    a, b, c = conference(table, 3)
    assert table.remove(b.association_id)
    assert not table.remove(b.association_id)
    names = dispatch([a, b, c], table.handle_datagram(a.address, a.send(1.0), 1.0), 1.0)
    assert names == ["c"]
    assert table.handle_datagram(b.address, b.send(1.0), 1.0) == []
    assert table.stats.unknown_source == 1
    # idle: c keeps sending, a stays silent
    dispatch([a, c], table.handle_datagram(c.address, c.send(5.0), 5.0), 5.0)
    table.touch(c.association_id, 11.5)
    assert table.expire_idle(12.0, 10.0) == [a.association_id]
    assert list(table.associations) == [c.association_id]
    assert table.handle_datagram(c.address, c.send(12.0), 12.0) == []  # nobody left


def test_ssrc_owned_by_first_sender() -> None:
    table: ForwardingTable[Address] = ForwardingTable()
    a, b, c = conference(table, 3)
    dispatch([a, b, c], table.handle_datagram(a.address, a.send(0.0), 0.0), 0.0)
    # b sends with a's SSRC: would make c's outbound session see one SSRC from two sources.
    assert table.handle_datagram(b.address, b.send(0.0, ssrc=a.ssrc), 0.0) == []
    assert table.associations[b.association_id].counters.drop_ssrc_conflict == 1
    # Once a is gone the SSRC is free.
    table.remove(a.association_id)
    assert len(table.handle_datagram(b.address, b.send(0.1, ssrc=a.ssrc), 0.1)) == 1


def test_ssrc_bound_per_association() -> None:
    table: ForwardingTable[Address] = ForwardingTable(ForwardingConfig(max_ssrcs_per_association=2))
    a, _b = conference(table, 2)
    for ssrc in (1, 2, 3):
        table.handle_datagram(a.address, a.send(0.0, ssrc=ssrc), 0.0)
    c = table.associations[a.association_id].counters
    assert c.packets_in == 2 and c.drop_limit == 1


def test_usage_errors_and_bad_media_keys() -> None:
    table: ForwardingTable[Address] = ForwardingTable(ForwardingConfig(max_associations=2))
    a, b = conference(table, 2, keys=False)
    with pytest.raises(ForwardingUsageError):
        table.add(a.association_id, ("h", 1), 0.0)
    with pytest.raises(ForwardingUsageError):
        table.add(uuid.uuid4(), a.address, 0.0)
    with pytest.raises(ForwardingUsageError):
        table.add(uuid.uuid4(), ("h", 2), 0.0)  # full
    assert table.stats.associations_refused == 1
    with pytest.raises(ForwardingUsageError):
        table.install_keys(attrs.evolve(a.media_keys, association_id=uuid.uuid4()), 0.0)
    mk = a.media_keys
    for bad in (
        attrs.evolve(mk, protection_profile=0x0007),
        attrs.evolve(mk, protection_profile=0x1234),
        attrs.evolve(mk, mki=b"\x01"),
        attrs.evolve(mk, client_write_master_key=bytes(32)),
        attrs.evolve(mk, server_write_master_salt=bytes(14)),
        attrs.evolve(mk, server_write_master_key=mk.client_write_master_key),
    ):
        with pytest.raises(MediaKeysError):
            table.install_keys(bad, 0.0)
    assert not table.associations[a.association_id].has_keys
    with pytest.raises(ForwardingUsageError):
        ForwardingConfig(last_n=-1)
    with pytest.raises(ForwardingUsageError):
        ForwardingConfig(video_payload_types=frozenset({200}))
    with pytest.raises(ForwardingUsageError):
        ForwardingConfig(replay_window=10)
    del b


# --- RTCP ---------------------------------------------------------------------------------------


def _media(table: ForwardingTable[Address], eps: list[Endpoint], now: float = 0.0) -> None:
    """Every endpoint sends one RTP packet so the table learns who owns which SSRC."""
    for ep in eps:
        dispatch(eps, table.handle_datagram(ep.address, ep.send(now), now), now)


def _rtcp_to(
    table: ForwardingTable[Address],
    eps: list[Endpoint],
    sender: Endpoint,
    packets: list[RtcpPacket],
) -> dict[str, list[RtcpPacket]]:
    out = table.handle_datagram(sender.address, sender.send_rtcp(serialize_rtcp(packets)), 0.0)
    for ep in eps:
        ep.rtcp.clear()
    dispatch(eps, out, 0.0)
    return {ep.name: ep.rtcp[0] for ep in eps if ep.rtcp}


def test_rtcp_sender_report_with_sdes_and_bye_goes_to_all_others() -> None:
    table: ForwardingTable[Address] = ForwardingTable()
    eps = conference(table, 3)
    a, b, _c = eps
    _media(table, eps)
    compound: list[RtcpPacket] = [
        SenderReport(a.ssrc, packet_count=5, reports=(ReportBlock(b.ssrc),)),
        SourceDescription((SdesChunk(a.ssrc, (SdesItem(1, b"alice@perc"),)),)),
        Bye((a.ssrc,)),
    ]
    got = _rtcp_to(table, eps, a, compound)
    assert set(got) == {"b", "c"}
    for packets in got.values():
        assert packets == compound
    assert table.associations[b.association_id].counters.rtcp_out == 1


def test_rtcp_receiver_reports_and_feedback_go_only_to_the_media_sender() -> None:
    table: ForwardingTable[Address] = ForwardingTable()
    eps = conference(table, 3)
    a, b, c = eps
    _media(table, eps)
    rr = ReceiverReport(b.ssrc, (ReportBlock(a.ssrc, fraction_lost=3),))
    sdes = SourceDescription((SdesChunk(b.ssrc, (SdesItem(1, b"bob"),)),))
    pli = Pli(b.ssrc, a.ssrc)
    nack = Nack.from_lost(b.ssrc, a.ssrc, [5, 7])
    got = _rtcp_to(table, eps, b, [rr, sdes, pli, nack])
    assert got == {"a": [rr, sdes, pli, nack]}
    # FIR names the media source in its entries (RFC 5104): routed to c only. The compound's
    # leading RR is about a, so c gets an empty RR from b in front (RFC 3550 §6.1).
    fir = Fir(b.ssrc, 0, ((c.ssrc, 1),))
    got = _rtcp_to(table, eps, b, [rr, fir])
    assert got == {"a": [rr], "c": [ReceiverReport(b.ssrc), fir]}
    # An RR about two senders is split: each gets only the block about its own stream.
    ba, bc = ReportBlock(a.ssrc, fraction_lost=1), ReportBlock(c.ssrc, fraction_lost=2)
    rr2 = ReceiverReport(b.ssrc, (ba, bc, ReportBlock(0xDEAD)))
    got = _rtcp_to(table, eps, b, [rr2, sdes])
    assert got == {
        "a": [ReceiverReport(b.ssrc, (ba,)), sdes],
        "c": [ReceiverReport(b.ssrc, (bc,)), sdes],
    }
    assert table.associations[b.association_id].counters.drop_unknown_ssrc == 1


def test_rtcp_about_unknown_or_own_ssrc_is_dropped_and_counted() -> None:
    table: ForwardingTable[Address] = ForwardingTable()
    eps = conference(table, 3)
    a, b, c = eps
    _media(table, eps)
    got = _rtcp_to(table, eps, b, [Pli(b.ssrc, 0xDEAD), Pli(b.ssrc, b.ssrc)])
    assert got == {}
    assert table.associations[b.association_id].counters.drop_unknown_ssrc == 2
    # A lone SDES (no SR/RR) describes the sender: everyone else gets it.
    sdes = SourceDescription((SdesChunk(b.ssrc, (SdesItem(1, b"bob"),)),))
    got = _rtcp_to(table, eps, b, [sdes])
    assert got == {"a": [sdes], "c": [sdes]}
    # Malformed RTCP inside valid SRTCP: counted.
    bad = b.rtcp_tx.protect_rtcp(b"\x80\xc9\x00\x07" + bytes(8))
    assert table.handle_datagram(b.address, bad, 0.0) == []
    assert table.associations[b.association_id].counters.drop_malformed == 1
    del a, c


def test_a_receiver_session_refusing_is_counted_and_the_others_still_served() -> None:
    table: ForwardingTable[Address] = ForwardingTable()
    a, b, c = conference(table, 3)
    dispatch([a, b, c], table.handle_datagram(a.address, a.send(0.0), 0.0), 0.0)
    # b's outbound stream of a's SSRC at the end of the index space (2^48 packets for real):
    # the next packet would need index 2^48 (RFC 7714 §8.4), so b's session refuses it.
    to_b = table.associations[b.association_id].outbound_session
    assert to_b is not None
    to_b.send_stream(a.ssrc, 0).hi = MAX_RTP_INDEX
    out = table.handle_datagram(a.address, a.send(0.1), 0.1)
    assert [addr for addr, _ in out] == [c.address]
    dispatch([a, b, c], out, 0.1)
    assert (len(b.got), len(c.got)) == (1, 2)
    counters = {ep.name: table.associations[ep.association_id].counters for ep in (a, b, c)}
    assert counters["a"].drop_limit == 1
    assert (counters["b"].packets_out, counters["c"].packets_out) == (1, 2)


def test_snapshot_log_lines() -> None:
    table: ForwardingTable[Address] = ForwardingTable()
    a, b = conference(table, 2)
    dispatch([a, b], table.handle_datagram(a.address, a.send(0.0), 0.0), 0.0)
    table.handle_datagram(a.address, b"\x80" * 40, 0.0)
    lines = table.snapshot(1.0).log_lines()
    assert len(lines) == 2
    assert f"association={a.association_id} in=1/" in lines[0]
    assert lines[0].endswith("drops: malformed=1")  # its last byte is no EKT field
    assert "out=1/" in lines[1] and lines[1].endswith("drops: none")


def test_new_media_keys_for_an_association_replace_the_old_ones() -> None:
    table: ForwardingTable[Address] = ForwardingTable()
    a, b = conference(table, 2)
    dispatch([a, b], table.handle_datagram(a.address, a.send(0.0), 0.0), 0.0)
    # b's association gets new keys (as after a new handshake on the same association id).
    b2 = Endpoint("b2", 0x2000, a.params, port=b.address[1])
    b2.association_id = b.association_id
    b2.media_keys = attrs.evolve(b2.media_keys, association_id=b.association_id)
    assert table.install_keys(b2.media_keys, 0.1) == []
    out = table.handle_datagram(a.address, a.send(0.1), 0.1)
    dispatch([a, b2], out, 0.1)  # verified under b's new keys
    assert len(b2.got) == 1 and len(b.got) == 1
    # Old-key packets from b are now refused; new-key ones go through.
    assert table.handle_datagram(b.address, b.send(0.2), 0.2) == []
    assert len(table.handle_datagram(b.address, b2.send(0.2), 0.2)) == 1


def test_a_receiver_session_without_room_for_the_ssrc_is_counted_and_the_others_served() -> None:
    table: ForwardingTable[Address] = ForwardingTable()
    a, b, c = conference(table, 3)
    # b's outbound session has no room for a new SSRC (the bound is 2^20 for real).
    to_b = table.associations[b.association_id].outbound_session
    assert to_b is not None
    to_b._max_streams = 0
    out = table.handle_datagram(a.address, a.send(0.0), 0.0)
    assert [addr for addr, _ in out] == [c.address]
    dispatch([a, b, c], out, 0.0)
    assert (len(b.got), len(c.got)) == (0, 1)
    counters = {ep.name: table.associations[ep.association_id].counters for ep in (a, b, c)}
    assert counters["a"].drop_limit == 1
    assert (counters["b"].packets_out, counters["c"].packets_out) == (0, 1)
    # Once b has room, the fan-out is made again and b is served.
    to_b._max_streams = 4
    dispatch([a, b, c], table.handle_datagram(a.address, a.send(0.1), 0.1), 0.1)
    assert (len(b.got), len(c.got)) == (1, 2)
