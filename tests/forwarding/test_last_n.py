"""last_n: video only from the N most recently active senders, contiguous SEQ per receiver."""

from __future__ import annotations

import itertools
import random
import struct

import pytest

from perc.forwarding import ForwardingConfig, ForwardingTable
from perc.srtp.double import MediaPacket

from .helpers import Address, Endpoint, conference, dispatch

FRAME = 3  # packets per video frame; the last one carries the marker bit
STEP = 0.01  # seconds between packets of one sender


class Video:
    """Drives video senders in lock step and records which packets ended a frame."""

    def __init__(self, table: ForwardingTable[Address], eps: list[Endpoint]) -> None:
        self.table = table
        self.eps = eps
        self.now = 0.0
        self.sent = {ep.ssrc: 0 for ep in eps}
        self.marker: dict[tuple[int, int], bool] = {}  # (ssrc, seq) -> marker bit

    def wire(self, ep: Endpoint) -> bytes:
        k = self.sent[ep.ssrc]
        self.sent[ep.ssrc] = k + 1
        marker = k % FRAME == FRAME - 1
        # Every frame starts as a keyframe with a Full EKT tag (RFC 8870 §4.6), so a receiver
        # that starts at a frame start can decrypt at once.
        data = ep.send(self.now, pt=96, marker=marker, keyframe=k % FRAME == 0)
        self.marker[(ep.ssrc, ep.seq)] = marker
        return data

    def feed(self, ep: Endpoint, data: bytes) -> list[str]:
        return dispatch(self.eps, self.table.handle_datagram(ep.address, data, self.now), self.now)

    def run(self, seconds: float, senders: list[Endpoint]) -> None:
        end = self.now + seconds
        while self.now < end:
            self.now += STEP
            for ep in senders:
                self.feed(ep, self.wire(ep))


def _check_receiver(v: Video, ep: Endpoint) -> dict[int, int]:
    """Contiguous outer SEQ per stream, whole frames around every pause; returns renumbered
    packet counts per SSRC (packets whose OHB carries the original SEQ)."""
    renumbered: dict[int, int] = {}
    by_ssrc: dict[int, list[MediaPacket]] = {}
    for p in ep.got:
        by_ssrc.setdefault(p.ssrc, []).append(p)
    for ssrc, packets in by_ssrc.items():
        for prev, cur in itertools.pairwise(packets):
            assert cur.sequence_number == (prev.sequence_number + 1) & 0xFFFF, (ep.name, ssrc)
            if cur.original_sequence_number != (prev.original_sequence_number + 1) & 0xFFFF:
                # A pause: it began after a frame end and resumes with a frame start.
                assert v.marker[(ssrc, prev.original_sequence_number)], "stopped mid-frame"
                before = (cur.original_sequence_number - 1) & 0xFFFF
                assert v.marker[(ssrc, before)], "resumed mid-frame"
        for p in packets:
            assert p.marker == v.marker[(ssrc, p.original_sequence_number)]  # E2E marker
        renumbered[ssrc] = sum(p.sequence_number != p.original_sequence_number for p in packets)
    return renumbered


def _pauses(ep: Endpoint, ssrc: int) -> int:
    """How often ``ssrc`` paused for ``ep`` (gaps in the original SEQ it received)."""
    seqs = [p.original_sequence_number for p in ep.got if p.ssrc == ssrc]
    return sum((y - x) & 0xFFFF != 1 for x, y in itertools.pairwise(seqs))


def test_last_n_1_two_video_senders_switch_both_ways_contiguous_and_verified() -> None:
    table: ForwardingTable[Address] = ForwardingTable(ForwardingConfig(last_n=1))
    eps = conference(table, 3)
    a, b, c = eps
    v = Video(table, eps)
    phases = [
        (1.0, [a]),  # only a: c gets a
        (1.0, [a, b]),  # b starts: the most recent activity start, c switches to b
        (3.0, [a]),  # b silent > last_n_idle leaves the ranking: c gets a again, renumbered
        (1.0, [a, b]),  # b resumes after silence: at the front again, c switches to b
        (2.5, [b]),  # a silent for 2.5 s ...
        (1.0, [a, b]),  # ... then resumes: c switches to a, b goes on unseen by c
        (3.0, [b]),  # a silent for good: c back to b, renumbered
    ]
    current = []
    for seconds, senders in phases:
        v.run(seconds, senders)
        current.append(c.got[-1].ssrc)
        if seconds >= 3.0:
            assert table.video_ranking() == [senders[0].ssrc]
    assert current == [a.ssrc, b.ssrc, a.ssrc, b.ssrc, b.ssrc, a.ssrc, b.ssrc]
    # Gaps in the original SEQ at c: a was withheld while sending in phases 2 and 4, b in
    # phase 6 (a silent sender leaves no gap).
    assert _pauses(c, a.ssrc) == 2 and _pauses(c, b.ssrc) == 1
    renumbered = _check_receiver(v, c)
    # Both streams resumed for c after c missed some of their packets: the OHB carried the
    # original SEQ and c's end-to-end check still passed (DoubleReceiver raises otherwise).
    assert renumbered[a.ssrc] > 0 and renumbered[b.ssrc] > 0
    # a and b see each other (top 1 without their own stream) whenever the other sends.
    for ep, other in ((a, b), (b, a)):
        _check_receiver(v, ep)
        assert {p.ssrc for p in ep.got} == {other.ssrc}
    ca = table.associations[a.association_id].counters
    cb = table.associations[b.association_id].counters
    assert ca.drop_last_n > 0 and cb.drop_last_n > 0
    for cnt in (ca, cb, table.associations[c.association_id].counters):
        assert cnt.drop_limit == cnt.drop_reorder == cnt.drop_auth == 0
    assert table.stats.last_n_switches >= 10


def test_late_packet_from_before_the_resume_point_is_not_sent() -> None:
    table: ForwardingTable[Address] = ForwardingTable(ForwardingConfig(last_n=1))
    eps = conference(table, 3)
    a, b, c = eps
    v = Video(table, eps)
    v.run(0.5, [a])
    v.run(0.5, [a, b])  # c on b
    v.run(1.9, [a])  # b about to be pruned: hold one of a's packets back, then go on
    held = v.wire(a)
    v.run(0.5, [a])  # c resumed a (renumbered) after `held` was sent by a
    assert c.got[-1].ssrc == a.ssrc and _pauses(c, a.ssrc) == 1
    before = (len(b.got), len(c.got))
    names = v.feed(a, held)
    # b still gets it (its feed of a never paused); for c it would reuse an index.
    assert names == ["b"]
    assert (len(b.got), len(c.got)) == (before[0] + 1, before[1])
    assert table.associations[a.association_id].counters.drop_reorder == 1
    _check_receiver(v, c)


def test_switch_without_markers_after_the_timeout() -> None:
    cfg = ForwardingConfig(last_n=1, last_n_switch_timeout=0.2)
    table: ForwardingTable[Address] = ForwardingTable(cfg)
    eps = conference(table, 3)
    a, b, c = eps
    now = 0.0
    for _ in range(20):
        now += STEP
        dispatch(eps, table.handle_datagram(a.address, a.send(now, pt=96), now), now)
    for _ in range(40):
        now += STEP
        for ep in (a, b):
            dispatch(eps, table.handle_datagram(ep.address, ep.send(now, pt=96), now), now)
    assert c.got[-1].ssrc == b.ssrc and _pauses(c, a.ssrc) == 0
    # About 0.2 s of b was withheld from c (no frame start in sight), a stopped after 0.2 s.
    a_at_c = [p for p in c.got if p.ssrc == a.ssrc]
    assert 35 <= len(a_at_c) <= 42


def test_audio_and_other_payload_types_ignore_last_n() -> None:
    table: ForwardingTable[Address] = ForwardingTable(ForwardingConfig(last_n=0))
    eps = conference(table, 3)
    a, b, c = eps
    for i in range(5):
        dispatch(eps, table.handle_datagram(a.address, a.send(i * STEP, pt=111), i * STEP), 0.0)
        dispatch(eps, table.handle_datagram(a.address, a.send(i * STEP, pt=100), i * STEP), 0.0)
        dispatch(eps, table.handle_datagram(b.address, b.send(i * STEP, pt=96), i * STEP), 0.0)
    assert len(c.got) == 10 and {p.ssrc for p in c.got} == {a.ssrc}
    counters = table.associations[b.association_id].counters
    assert counters.drop_last_n == 10 and counters.video_in == 5


def test_receiver_joining_and_leaving_under_last_n() -> None:
    table: ForwardingTable[Address] = ForwardingTable(ForwardingConfig(last_n=2))
    eps = conference(table, 3)
    a, b, c = eps
    (d,) = conference(table, 1, keys=False, first_port=6000, first_name="d", params=a.params)
    everyone = [*eps, d]
    v = Video(table, everyone)
    v.run(0.3, [a, b])
    table.install_keys(d.media_keys, v.now)  # d joins: gets a and b from their next frame
    v.run(0.3, [a, b])
    assert {p.ssrc for p in d.got} == {a.ssrc, b.ssrc}
    _check_receiver(v, d)
    table.remove(b.association_id)
    assert table.video_ranking() == [a.ssrc]
    v.run(0.3, [a])
    _check_receiver(v, c)
    _check_receiver(v, d)


def test_a_video_ssrc_changing_payload_type_keeps_its_feed() -> None:
    table: ForwardingTable[Address] = ForwardingTable(ForwardingConfig(last_n=1))
    eps = conference(table, 3)
    a, b, c = eps
    v = Video(table, eps)
    v.run(0.5, [a])
    v.run(0.5, [a, b])  # c on b; a withheld from c while sending
    v.run(2.5, [a])  # b gone: c resumes a, renumbered
    assert (
        _pauses(c, a.ssrc) == 1 and c.got[-1].sequence_number != c.got[-1].original_sequence_number
    )
    # a switches PT (100: no class; 111: the audio PT): still renumbered on c's feed.
    for pt in (100, 100, 111, 111):
        v.now += STEP
        data = a.send(v.now, pt=pt)
        v.marker[(a.ssrc, a.seq)] = False
        v.feed(a, data)
        assert c.got[-1].payload_type == pt
        assert c.got[-1].sequence_number != c.got[-1].original_sequence_number
    _check_receiver(v, c)


@pytest.mark.parametrize("seed", [7, 8, 9])
def test_random_switching_with_loss_and_reordering_never_repeats_an_index(seed: int) -> None:
    """Three video senders turning on and off at random, 5% loss and adjacent swaps before
    the MDD: every receiver verifies everything it gets, never sees one outer SEQ of an SSRC
    twice (its replay check would raise), and the table never hits a refused index."""
    rng = random.Random(seed)
    table: ForwardingTable[Address] = ForwardingTable(
        ForwardingConfig(last_n=1, last_n_idle=0.3, last_n_switch_timeout=0.1)
    )
    eps = conference(table, 4)
    senders = eps[:3]
    v = Video(table, eps)
    active = {ep.ssrc: True for ep in senders}
    pending: list[tuple[Endpoint, bytes]] = []
    for _ in range(1500):
        v.now += STEP
        for ep in senders:
            if rng.random() < 0.01:
                active[ep.ssrc] = not active[ep.ssrc]
            if active[ep.ssrc]:
                pending.append((ep, v.wire(ep)))
        if len(pending) >= 2 and rng.random() < 0.1:
            pending[-1], pending[-2] = pending[-2], pending[-1]
        while len(pending) > 1:
            ep, data = pending.pop(0)
            if rng.random() >= 0.05:
                v.feed(ep, data)
    for ep in eps:
        seen: set[tuple[int, int]] = set()
        for p in ep.got:
            key = (p.ssrc, p.sequence_number)
            assert key not in seen
            seen.add(key)
    totals = table.snapshot(v.now).totals()
    assert totals["drop_limit"] == 0 and totals["drop_replay"] == 0
    assert totals["drop_last_n"] > 0 and table.stats.last_n_switches > 20
    assert any(p.sequence_number != p.original_sequence_number for ep in eps for p in ep.got)


def test_tick_prunes_silent_streams_without_traffic() -> None:
    table: ForwardingTable[Address] = ForwardingTable(ForwardingConfig(last_n=1))
    eps = conference(table, 3)
    v = Video(table, eps)
    v.run(0.2, eps[:2])
    assert table.video_ranking() == [eps[1].ssrc, eps[0].ssrc]
    table.tick(v.now + 1.0)
    assert len(table.video_ranking()) == 2
    table.tick(v.now + 2.5)
    assert table.video_ranking() == []
    table.remove(eps[0].association_id)
    assert eps[0].ssrc not in table._video


def test_a_feed_that_stays_on_keeps_forwarding_past_half_the_seq_space() -> None:
    """A receiver's feed of one sender that never pauses: its packets keep flowing after
    32,768 of them (the resume-point check must not turn into "everything is old")."""
    table: ForwardingTable[Address] = ForwardingTable(ForwardingConfig(last_n=1))
    eps = conference(table, 2)
    a, b = eps
    v = Video(table, eps)
    count = 33_500
    for _ in range(count):
        v.now += 0.001
        v.feed(a, v.wire(a))
    assert table.associations[a.association_id].counters.drop_reorder == 0
    assert sum(1 for p in b.got if p.ssrc == a.ssrc) == count


def test_a_packet_whose_ohb_does_not_parse_is_dropped_by_every_renumbered_feed() -> None:
    """Feeds that resumed together share one rewrite of each packet. When that rewrite fails
    (the OHB does not parse), every one of those feeds drops the packet, counted; none is
    sent parts left from another rewrite."""
    table: ForwardingTable[Address] = ForwardingTable(ForwardingConfig(last_n=1))
    eps = conference(table, 4, first_port=8100)
    a, b, c, d = eps
    v = Video(table, eps)
    v.run(0.3, [a])
    v.run(0.3, [a, b])  # c and d switch to b
    v.run(2.5, [a])  # b pruned: c and d resume a, with one offset
    for ep in (c, d):
        assert ep.got[-1].sequence_number != ep.got[-1].original_sequence_number
    header = struct.pack("!BBHII", 0x80, 96, (a.seq + 1) & 0xFFFF, 0, a.ssrc)
    # a's outer key (so the hop opens it), a Short EKT field; the outer plaintext is a bare
    # OHB config byte with B set and M clear (RFC 8723 §4: not an OHB).
    wire = a.rtcp_tx.protect_rtp(header + b"\x08") + b"\x00"
    counters = table.associations[a.association_id].counters
    before = counters.drop_malformed
    out = table.handle_datagram(a.address, wire, v.now + STEP)
    # b's feed of a never paused: sent as it came, without a rewrite.
    assert [address for address, _ in out] == [b.address]
    assert counters.drop_malformed == before + 2
