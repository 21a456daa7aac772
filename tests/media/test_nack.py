"""Receiver-side repair (D36) under a fake clock: NACK timing, give-up, PLI, a lossy link."""

from __future__ import annotations

import heapq
import random
from collections.abc import Callable

from perc.media.nack import FEED_GAP, NackSettings, NackTracker, VideoReceiver
from perc.media.packetize import AssembledFrame, Vp8Packetizer
from perc.wire.rtcp import Nack, Pli, parse_rtcp, serialize_rtcp
from tests.media.test_packetize import fake_frame

# Binary fractions keep the fake clock's arithmetic exact.
S = NackSettings(reorder_delay=1 / 64, retry_interval=1 / 8, max_retries=3, give_up_after=1.0)


def test_a_reordered_packet_is_never_nacked() -> None:
    t = NackTracker(S)
    for seq in (10, 11, 13):
        t.on_packet(seq, 0.0)
    assert t.missing() == [12]
    assert t.timer() == 1 / 64
    assert t.poll(1 / 128) == ([], [])
    t.on_packet(12, 1 / 128)
    assert t.poll(1 / 32) == ([], []) and t.missing() == [] and t.timer() is None
    assert t.stats.reordered == 1 and t.stats.recovered == 0


def test_retries_then_give_up_across_the_wrap() -> None:
    t = NackTracker(S)
    t.on_packet(0xFFFE, 0.0)
    t.on_packet(1, 0.0)  # 0xFFFF and 0 missing
    assert t.poll(1 / 64) == ([0xFFFF, 0], [])  # at 1/64
    assert t.poll(1 / 32) == ([], [])
    assert t.timer() == 1 / 64 + 1 / 8
    assert t.poll(1 / 64 + 1 / 8) == ([0xFFFF, 0], [])
    t.on_packet(0, 0.25)  # a retransmission
    assert t.poll(1 / 64 + 2 / 8) == ([0xFFFF], [])
    assert t.poll(1 / 64 + 3 / 8) == ([], [0xFFFF])  # three NACKs sent, none answered
    assert t.stats.recovered == 1 and t.stats.given_up == 1 and t.stats.nacked_seqs == 5
    t.on_packet(0xFFFF, 0.4)  # too late: counted with the duplicates
    assert t.stats.duplicates == 1


def test_the_deadline_wins_over_retries_and_a_huge_gap_resets() -> None:
    t = NackTracker(NackSettings(retry_interval=0.4, max_retries=10, give_up_after=1.0))
    t.on_packet(100, 0.0)
    t.on_packet(102, 0.0)
    assert t.poll(0.5)[0] == [101]
    assert t.poll(0.9)[0] == [101]
    assert t.poll(1.0) == ([], [101])
    t.on_packet(102 + 600, 1.0)
    assert t.missing() == [] and t.stats.resets == 1
    quiet = NackTracker(NackSettings(nack=False, give_up_after=0.5))
    quiet.on_packet(1, 0.0)
    quiet.on_packet(3, 0.0)
    assert quiet.poll(0.4) == ([], []) and quiet.timer() == 0.5
    assert quiet.poll(0.5) == ([], [2])


def test_tracked_holes_are_bounded() -> None:
    t = NackTracker(NackSettings(max_tracked=8))
    t.on_packet(0, 0.0)
    t.on_packet(6, 0.0)
    t.on_packet(12, 0.0)
    assert t.missing() == [3, 4, 5, 7, 8, 9, 10, 11]  # the oldest two went
    assert t.stats.given_up == 2


class LossyLink:
    """Sender -> receiver over a link with seeded loss and a fixed delay; the sender (standing
    in for the Media Distributor's cache) answers NACKs after one more delay."""

    def __init__(self, receiver: VideoReceiver, loss: float, seed: int, delay: float = 0.02):
        self.receiver = receiver
        self.rng = random.Random(seed)
        self.loss = loss
        self.delay = delay
        self.sent: dict[int, tuple[int, int, bool, bytes]] = {}
        self.events: list[tuple[float, int, Callable[[float], None]]] = []
        self.order = 0
        self.frames: list[AssembledFrame] = []
        self.plis = 0
        self.nacked: list[int] = []

    def at(self, when: float, action: Callable[[float], None]) -> None:
        self.order += 1
        heapq.heappush(self.events, (when, self.order, action))

    def send(self, packet: tuple[int, int, bool, bytes], now: float) -> None:
        self.sent[packet[0]] = packet
        if self.rng.random() >= self.loss:
            self.at(now + self.delay, lambda t: self.deliver(packet, t))

    def deliver(self, packet: tuple[int, int, bool, bytes], now: float) -> None:
        self.frames += self.receiver.push(*packet, now)
        self.collect(now)

    def collect(self, now: float) -> None:
        wire = serialize_rtcp(self.receiver.feedback())
        for fb in parse_rtcp(wire) if wire else []:
            if isinstance(fb, Pli):
                self.plis += 1
            elif isinstance(fb, Nack):
                for seq in fb.lost():
                    self.nacked.append(seq)
                    self.send(self.sent[seq], now + self.delay)
        t = self.receiver.timer()
        if t is not None:
            self.at(max(t, now), self.tick)

    def tick(self, now: float) -> None:
        self.frames += self.receiver.poll(now)
        self.collect(now)

    def run(self, until: float) -> None:
        for _ in range(100_000):  # a timer that does not advance would spin here
            if not self.events or self.events[0][0] > until:
                return
            when, _, action = heapq.heappop(self.events)
            action(when)
        raise AssertionError("the event loop does not make progress")


def run_stream(settings: NackSettings, loss: float, frames: int = 90) -> LossyLink:
    receiver = VideoReceiver(0xAAAA, 0xBBBB, settings)
    link = LossyLink(receiver, loss, seed=5)
    packetizer = Vp8Packetizer(1200)
    seq = 65000  # wraps during the run
    for i in range(frames):
        frame = fake_frame(i, 2000 + 50 * (i % 7), key=i == 0)
        for item in packetizer.packetize(frame):
            packet = (seq & 0xFFFF, 3000 * i, item.marker, item.payload)
            link.at(i / 30, lambda t, p=packet: link.send(p, t))
            seq += 1
    link.run(until=frames / 30 + 3)
    return link


def test_repair_recovers_every_frame_over_a_lossy_link() -> None:
    link = run_stream(S, loss=0.1)
    assert len(link.frames) == 90
    assert link.nacked and link.receiver.stats.recovered > 0
    assert link.plis == 0  # the stream began with a key frame: nothing to ask for
    assert link.receiver.stats.given_up == 0


def test_without_nack_loss_costs_frames_and_brings_plis() -> None:
    link = run_stream(NackSettings(nack=False, give_up_after=0.2, pli_interval=0.5), loss=0.1)
    assert link.nacked == []
    assert len(link.frames) < 60  # one key frame only: everything after the first loss is gone
    assert link.plis >= 2  # a lost frame, then re-requests while no key frame comes
    stats = link.receiver.stats
    assert stats.plis_sent == link.plis and stats.given_up > 0


def test_one_nack_asks_for_at_most_max_nack_seqs() -> None:
    t = NackTracker(NackSettings(max_nack_seqs=128, reorder_delay=0.0))
    t.on_packet(0, 0.0)
    t.on_packet(301, 0.0)
    first, _ = t.poll(0.0)
    second, _ = t.poll(0.0)
    assert first == list(range(1, 129)) and second == list(range(129, 257))
    assert len(Nack.from_lost(1, 2, first).items) == 8  # 128 consecutive SEQs: 8 PID + BLP


def test_feed_starts_are_counted_with_whether_they_began_at_a_key_frame() -> None:
    """The stream's first packet, and one more than FEED_GAP ahead (a last_n pause), start a
    feed; reordered packets and the second packet of a frame never do."""
    rx = VideoReceiver(1, 2, S)
    packetizer = Vp8Packetizer(600)
    key, delta = (packetizer.packetize(fake_frame(i, 1500, key=i == 0)) for i in range(2))
    seq = 0
    ts = 0xFFFF_FFFF - 2000  # the 32-bit timestamp wraps below
    for frame, jump in ((key, 0), (delta, 3000), (delta, FEED_GAP + 1), (key, FEED_GAP + 3000)):
        ts = (ts + jump) & 0xFFFFFFFF
        for p in frame:
            rx.push(seq, ts, p.marker, p.payload, 0.0)
            seq += 1
    rx.push(1, (ts - 5 * FEED_GAP) & 0xFFFFFFFF, False, delta[1].payload, 0.0)  # old: no start
    assert (rx.stats.feed_starts, rx.stats.feed_starts_keyframe) == (3, 2)
