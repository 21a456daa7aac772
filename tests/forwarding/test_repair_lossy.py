"""D36 over a lossy fake network under a fake clock: a receiver with a NackTracker NACKs what
the MDD-to-receiver path loses; with repair on at least 99% of frames complete, with repair
off (NACKs go to a sender that does not retransmit) fewer. Both figures are reported."""

from __future__ import annotations

import heapq
import random
from collections.abc import Callable

import pytest

from perc.forwarding import ForwardingConfig, ForwardingTable
from perc.media.nack import NackTracker
from perc.srtp.errors import SrtpError
from perc.wire.rtcp import Nack, ReceiverReport

from .helpers import Address, conference

FPS = 30
PACKETS = 5  # per frame
SECONDS = 10
LOSS = 0.05  # on the MDD -> receiver path
DELAY = 0.02  # one way, each link
DEADLINE = 1.0  # a frame counts as complete if all its packets arrive within this


def complete_frames(repair: bool, seed: int = 7) -> tuple[float, dict[str, int]]:
    rng = random.Random(seed)
    table: ForwardingTable[Address] = ForwardingTable(ForwardingConfig(repair=repair))
    a, b = conference(table, 2)
    tracker = NackTracker()
    events: list[tuple[float, int, Callable[[float], None]]] = []
    order = 0

    def at(when: float, action: Callable[[float], None]) -> None:
        nonlocal order
        order += 1
        heapq.heappush(events, (when, order, action))

    sent_at: dict[int, float] = {}  # SEQ -> when a sent it
    arrived: dict[int, float] = {}  # SEQ -> when b first decrypted it

    def route(out: list[tuple[Address, bytes]], now: float) -> None:
        for address, data in out:
            if address == b.address and rng.random() >= LOSS:
                at(now + DELAY + rng.uniform(0, 0.004), lambda t, d=data: to_b(d, t))
            # To a: forwarded NACKs; this sender does not retransmit.

    def to_b(data: bytes, now: float) -> None:
        if 192 <= data[1] <= 223:
            return
        try:
            b.deliver(data, now)
        except SrtpError:
            return  # a duplicate (the first copy arrived after all)
        seq = b.got[-1].sequence_number
        arrived.setdefault(seq, now)
        tracker.on_packet(seq, now)

    def send_frame(now: float) -> None:
        for _ in range(PACKETS):
            data = a.send(now, pt=96, keyframe=True)
            sent_at[a.seq] = now
            route(table.handle_datagram(a.address, data, now + DELAY), now + DELAY)

    def poll(now: float) -> None:
        lost, _ = tracker.poll(now)
        if lost:
            compound = (
                ReceiverReport(b.ssrc).serialize()
                + Nack.from_lost(b.ssrc, a.ssrc, lost).serialize()
            )
            data = b.send_rtcp(compound)
            at(now + DELAY, lambda t, d=data: route(table.handle_datagram(b.address, d, t), t))
        if now < SECONDS + 2:
            at(now + 0.005, poll)

    for k in range(SECONDS * FPS):
        at(k / FPS, send_frame)
    at(0.0, poll)
    while events:
        now, _, action = heapq.heappop(events)
        action(now)
    frames = [sorted(sent_at)[i : i + PACKETS] for i in range(0, len(sent_at), PACKETS)]
    ok = sum(
        all(s in arrived and arrived[s] - sent_at[s] <= DEADLINE for s in frame)
        for frame in frames
    )
    counters = table.associations[b.association_id].counters
    figures = {
        "nack_received": counters.nack_received,
        "nack_answered": counters.nack_answered,
        "nack_forwarded": counters.nack_forwarded,
        "recovered": tracker.stats.recovered,
    }
    return ok / len(frames), figures


@pytest.mark.parametrize("seed", [7, 8])
def test_repair_on_completes_99_percent_of_frames_and_off_fewer(seed: int) -> None:
    on, on_figures = complete_frames(repair=True, seed=seed)
    off, off_figures = complete_frames(repair=False, seed=seed)
    print(
        f"\n5% loss MDD->receiver, {SECONDS * FPS} frames of {PACKETS} packets: "
        f"complete with repair {on:.2%} {on_figures}, without {off:.2%} {off_figures}"
    )
    assert on >= 0.99
    assert off < on
    assert on_figures["nack_answered"] > 0 and on_figures["recovered"] > 0
    assert off_figures["nack_answered"] == 0 and off_figures["nack_forwarded"] > 0
