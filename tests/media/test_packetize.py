"""VP8/Opus packetization and VP8 frame reassembly under loss, reorder and duplication."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from perc.media.packetize import (
    AssembledFrame,
    OpusPacketizer,
    PacketizedPayload,
    RtpSequencer,
    Vp8FrameAssembler,
    Vp8Packetizer,
)
from perc.wire.framemarking import FrameMarking, frame_marking_of_packet
from perc.wire.rtp import RtpPacket
from perc.wire.vp8 import Vp8Descriptor, split_vp8_payload

Wire = tuple[int, int, bool, bytes]  # seq, timestamp, marker, payload


def fake_frame(index: int, size: int, *, key: bool) -> bytes:
    """Bytes that pass for a VP8 frame: the §4.3 P bit says key or delta; the rest is noise."""
    rng = random.Random(index)
    head = b"\x50\x00\x00\x9d\x01\x2a" if key else b"\x51\x00\x00\x00\x00\x00"
    return head + rng.randbytes(size - len(head))


def stream(
    count: int, *, key_every: int = 10, size: int = 3000, seq0: int = 0, max_payload: int = 1200
) -> tuple[list[bytes], list[Wire]]:
    packetizer = Vp8Packetizer(max_payload, picture_id=0x7FF0)
    frames, wire = [], []
    seq = seq0
    for i in range(count):
        frame = fake_frame(i, size + 37 * i, key=i % key_every == 0)
        frames.append(frame)
        for item in packetizer.packetize(frame):
            wire.append((seq & 0xFFFF, 3000 * i, item.marker, item.payload))
            seq += 1
    return frames, wire


def feed(assembler: Vp8FrameAssembler, wire: list[Wire], now: float = 0.0) -> list[AssembledFrame]:
    out = []
    for seq, ts, marker, payload in wire:
        out += assembler.push(seq, ts, marker, payload, now)
    return out


def test_packetizer_splits_evenly_and_marks_frames() -> None:
    packetizer = Vp8Packetizer(1200, picture_id=0x7FFF)
    frame = fake_frame(0, 2500, key=True)
    items = packetizer.packetize(frame)
    assert [len(i.payload) for i in items] == [4 + 834, 4 + 833, 4 + 833]
    assert [i.marker for i in items] == [False, False, True]
    assert [i.frame_marking for i in items] == [
        FrameMarking(start=True, independent=True),
        FrameMarking(independent=True),
        FrameMarking(end=True, independent=True),
    ]
    assert all(i.keyframe for i in items)
    parts = [split_vp8_payload(i.payload) for i in items]
    assert parts[0][0] == Vp8Descriptor(start=True, picture_id=0x7FFF)
    assert parts[1][0] == Vp8Descriptor(picture_id=0x7FFF)
    assert b"".join(p[1] for p in parts) == frame
    (small,) = packetizer.packetize(fake_frame(1, 50, key=False))
    assert small.marker and not small.keyframe
    assert small.frame_marking == FrameMarking(start=True, end=True)
    assert split_vp8_payload(small.payload)[0].picture_id == 0  # 15-bit wrap
    for size in range(3, 2500, 97):
        items = Vp8Packetizer(100).packetize(fake_frame(2, max(size, 6), key=False))
        assert all(len(i.payload) <= 100 for i in items)
    with pytest.raises(ValueError):
        Vp8Packetizer(7)
    with pytest.raises(ValueError):
        packetizer.packetize(b"\x50\x00")


def test_opus_packetizer_and_sequencer() -> None:
    opus = OpusPacketizer()
    first = opus.packetize(b"\xfc\x01\x02")
    second = opus.packetize(b"\xfc\x03")
    assert first == [PacketizedPayload(b"\xfc\x01\x02", True, FrameMarking(), False)]
    assert not second[0].marker
    with pytest.raises(ValueError):
        opus.packetize(b"")
    audio = RtpSequencer(0x1234, 111, sequence_number=0xFFFF, timestamp_base=0xFFFFFC40)
    a = [RtpPacket.parse(p) for p in audio.packets(first + second, 960)]
    assert [(p.sequence_number, p.timestamp, p.marker) for p in a] == [
        (0xFFFF, 0, True),
        (0, 0, False),
    ]
    assert a[0].payload_type == 111 and a[0].extension_profile is None
    video = RtpSequencer(0x99, 96, frame_marking_id=4)
    packets = video.packets(Vp8Packetizer(500).packetize(fake_frame(0, 900, key=True)), 90)
    assert [frame_marking_of_packet(p) for p in packets] == [
        FrameMarking(start=True, independent=True),
        FrameMarking(end=True, independent=True),
    ]
    assert [RtpPacket.parse(p).marker for p in packets] == [False, True]
    seqs = {RtpSequencer(1, 96).sequence_number for _ in range(8)}
    assert len(seqs) > 1  # a random first SEQ by default (RFC 3550 §5.1)


def test_in_order_stream_is_reassembled_with_wrap() -> None:
    frames, wire = stream(25, seq0=0xFFF0)
    assembler = Vp8FrameAssembler()
    out = feed(assembler, wire)
    assert [f.data for f in out] == frames
    assert [f.keyframe for f in out] == [i % 10 == 0 for i in range(25)]
    assert [f.timestamp for f in out] == [3000 * i for i in range(25)]
    assert out[0].picture_id == 0x7FF0 and out[-1].picture_id == (0x7FF0 + 24) & 0x7FFF
    assert out[-1].last_seq - out[0].first_seq + 1 == len(wire)
    assert not assembler.needs_keyframe and assembler.can_decode and assembler.missing() == []
    assert assembler.take_keyframe_request()  # the initial request, once
    assert not assembler.take_keyframe_request()


def test_reorder_and_duplicates_lose_nothing() -> None:
    frames, wire = stream(30)
    rng = random.Random(7)
    shuffled = []
    for i in range(0, len(wire), 6):  # reorder inside windows of 6 packets
        chunk = wire[i : i + 6]
        rng.shuffle(chunk)
        shuffled += chunk
    shuffled += rng.sample(wire, 10)  # late duplicates
    shuffled.insert(20, wire[18])  # an early duplicate
    assembler = Vp8FrameAssembler()
    out = feed(assembler, shuffled)
    assert [f.data for f in out] == frames
    assert assembler.stats.duplicates + assembler.stats.late == 11


def test_a_retransmission_fills_the_gap() -> None:
    frames, wire = stream(6)
    lost = wire.pop(5)
    assembler = Vp8FrameAssembler()
    out = feed(assembler, wire)
    assert len(out) < 6
    assert assembler.missing() == [lost[0]]
    assert assembler.incomplete_frames() == [lost[1]]
    out += assembler.push(*lost, 0.1)
    assert [f.data for f in out] == frames
    assert assembler.missing() == [] and assembler.incomplete_frames() == []


def test_loss_given_up_drops_deltas_until_the_next_keyframe() -> None:
    frames, wire = stream(25, key_every=10)
    per_frame = 3
    lost = wire.pop(4 * per_frame + 1)  # the middle packet of frame 4
    assembler = Vp8FrameAssembler()
    out = feed(assembler, wire)
    assert [f.data for f in out] == frames[:4]
    assert assembler.take_keyframe_request()  # the start-up one
    assert not assembler.needs_keyframe
    out = assembler.give_up([lost[0]])
    assert assembler.needs_keyframe is False  # the key frame of frame 10 is already here
    assert [f.data for f in out] == frames[10:]
    assert assembler.stats.frames_dropped == 6  # frame 4 incomplete, 5-9 without references
    assert assembler.take_keyframe_request()
    assert assembler.push(*lost, 1.0) == [] and assembler.stats.late == 1


def test_gap_blocking_release_is_given_up_after_max_wait() -> None:
    frames, wire = stream(4, key_every=100)
    del wire[4]  # a packet of frame 1
    assembler = Vp8FrameAssembler(max_wait=0.5)
    out = feed(assembler, wire[:9], now=10.0)
    assert [f.data for f in out] == frames[:1]
    assert assembler.poll(10.4) == []
    assert assembler.poll(10.5) == []  # given up; frames 2-3 have no key frame before them
    assert assembler.needs_keyframe and assembler.take_keyframe_request()
    assert assembler.stats.gaps_given_up == 1
    key = Vp8Packetizer(1200).packetize(fake_frame(9, 100, key=True))[0]
    (frame,) = assembler.push(2000, 99, key.marker, key.payload, 11.0)
    assert frame.keyframe and frame.timestamp == 99


def test_nothing_decodes_before_the_first_keyframe_and_garbage_is_counted() -> None:
    frames, wire = stream(12, key_every=5)
    assembler = Vp8FrameAssembler()
    assert assembler.push(1, 2, True, b"", 0.0) == []
    assert assembler.push(1, 2, True, b"\x90", 0.0) == []
    assert assembler.stats.malformed == 2
    out = feed(assembler, wire[3 * 2 :])  # join at frame 2
    assert [f.data for f in out] == frames[5:]
    assert assembler.stats.frames_dropped == 3


def test_a_full_buffer_gives_up() -> None:
    frames, wire = stream(30, key_every=30)
    assembler = Vp8FrameAssembler(max_packets=16)
    out = feed(assembler, wire[:3] + wire[4:])
    assert [f.data for f in out] == frames[:1]
    assert assembler.needs_keyframe
    assert len(assembler.missing()) <= 16


@settings(max_examples=40, deadline=None)
@given(st.randoms(use_true_random=False), st.floats(0, 0.3), st.integers(0, 0xFFFF))
def test_any_loss_pattern_releases_exact_frames_in_order(
    rng: random.Random, loss: float, seq0: int
) -> None:
    frames, wire = stream(20, key_every=4, size=1500, seq0=seq0, max_payload=600)
    delivered = [w for w in wire if rng.random() >= loss]
    delivered += [w for w in wire if rng.random() < 0.05]  # duplicates
    for i in range(len(delivered) - 1):  # local reordering
        if rng.random() < 0.2:
            delivered[i], delivered[i + 1] = delivered[i + 1], delivered[i]
    assembler = Vp8FrameAssembler(max_wait=0.05)
    out = []
    for n, w in enumerate(delivered):
        out += assembler.push(*w, n * 0.001)
    out += assembler.poll(1000.0)
    index = {f: i for i, f in enumerate(frames)}
    got = [index[f.data] for f in out]  # every released frame is byte-exact
    assert got == sorted(set(got))  # in order, no repeats
    for prev, cur in zip([-1, *got], got, strict=False):
        if cur != prev + 1:  # after any skipped frame the next one is a key frame
            assert cur % 4 == 0
    stats = assembler.stats
    assert stats.frames == len(got)


@settings(max_examples=80, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.integers(0, 0xFFFF),
            st.integers(0, 0xFFFFFFFF),
            st.booleans(),
            st.binary(max_size=12),
        ),
        max_size=60,
    )
)
def test_garbage_packets_never_raise_and_stay_bounded(
    packets: list[tuple[int, int, bool, bytes]],
) -> None:
    assembler = Vp8FrameAssembler(max_packets=16, max_wait=0.01)
    for n, (seq, ts, marker, payload) in enumerate(packets):
        for frame in assembler.push(seq, ts, marker, payload, n * 0.004):
            assert frame.data
        assert len(assembler.missing()) <= 16
        assembler.incomplete_frames()
        assembler.give_up([seq ^ 1])
    assembler.poll(100.0)
    assert assembler.timer() is None or assembler.timer() >= 100.0


def test_a_full_buffer_never_in_sync_drops_oldest_in_linear_time() -> None:
    """Packets far apart with no key frame: a full buffer drops its oldest packet per push
    (it once marked every missing SEQ one scan at a time, quadratic in the SEQ spread)."""
    assembler = Vp8FrameAssembler(max_packets=16, max_wait=0.01)
    delta = b"\x10" + b"\x01\x00\x00"  # descriptor S=1, PID=0; VP8 P bit set: not a key frame
    for n in range(200):
        seq = (n * 2000) & 0xFFFF
        assert assembler.push(seq, n, False, delta, n * 0.001) == []
        assert len(assembler._buf) == min(n + 1, 16)  # only the oldest packet goes
    assert assembler.stats.packets_dropped == 200 - 16
    assert assembler.needs_keyframe
