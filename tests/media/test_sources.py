"""Synthetic sources under an injected clock: rates, timestamps, SEQ, markers, key frames."""

from __future__ import annotations

import itertools
import math

import pytest

from perc.media.payload import StreamKind, parse_payload
from perc.media.sources import (
    AUDIO_PT,
    VIDEO_PT,
    AudioSource,
    OutgoingPacket,
    SourceUsageError,
    VideoSettings,
    VideoSource,
)
from perc.wire.rtp import RtpPacket


def drive(source: AudioSource | VideoSource, start: float, end: float, step: float):
    out: list[tuple[float, OutgoingPacket]] = []
    steps = round((end - start) / step)
    for i in range(steps + 1):
        now = start + i * step
        out.extend((now, p) for p in source.packets_due(now))
    return out


@pytest.mark.parametrize("step", [0.001, 0.007, 0.02, 0.1])
def test_audio_rate_timestamps_and_seq_wrap(step: float) -> None:
    src = AudioSource("alice", 10.0, first_seq=65530, first_timestamp=2**32 - 1000, ssrc=7)
    sent = drive(src, 10.0, 20.0, step)
    # 50 packets/s over [10, 20] inclusive of both ends: slots 0..500.
    assert len(sent) == 501
    for i, (now, p) in enumerate(sent):
        rtp = RtpPacket.parse(p.rtp)
        assert rtp.payload_type == AUDIO_PT and p.kind is StreamKind.AUDIO
        assert rtp.ssrc == 7 == p.ssrc
        assert rtp.sequence_number == (65530 + i) & 0xFFFF
        assert rtp.timestamp == (2**32 - 1000 + 960 * i) & 0xFFFFFFFF  # 48 kHz, 20 ms
        assert rtp.marker == (i == 0)  # one talkspurt
        assert len(rtp.payload) == 160 == p.payload_length
        payload = parse_payload(rtp.payload)
        assert (payload.name, payload.seq, payload.kind) == ("alice", i, StreamKind.AUDIO)
        # never early, never later than one step
        due = 10.0 + i * 0.02
        assert due - 1e-9 <= now < due + step + 1e-9
    assert src.stream.sent == 501 and src.stream.octets == 501 * 160


def test_audio_next_due_and_skipping_when_far_behind() -> None:
    src = AudioSource("alice", 0.0)
    assert src.next_due() == 0.0
    assert len(src.packets_due(0.0)) == 1
    assert src.next_due() == pytest.approx(0.02)
    assert src.packets_due(0.019) == []
    # The caller stalls for 5 s: no 250-packet burst, the slots are skipped and counted.
    burst = src.packets_due(5.0)
    assert len(burst) < 60
    assert src.stream.skipped > 190
    # SEQ stays contiguous (nothing was sent), the timestamp follows the clock.
    rtp = [RtpPacket.parse(p.rtp) for p in burst]
    assert all(
        (b.sequence_number - a.sequence_number) & 0xFFFF == 1 for a, b in itertools.pairwise(rtp)
    )
    assert (rtp[-1].timestamp - src.stream.ts0) & 0xFFFFFFFF == 250 * 960


def test_random_ssrcs_and_initial_values_differ() -> None:
    a = AudioSource("a", 0.0)
    b = VideoSource("a", 0.0)
    assert a.ssrc != b.ssrc and a.ssrc and b.ssrc


def test_video_frames_markers_timestamps_and_keyframes() -> None:
    settings = VideoSettings(fps=30, bitrate=600_000, max_payload=1000, keyframe_interval=1.0)
    src = VideoSource("bob", 0.0, settings, first_timestamp=5)
    sent = [p for _, p in drive(src, 0.0, 3.0, 0.005)]
    frames: dict[int, list[OutgoingPacket]] = {}
    for p in sent:
        frames.setdefault(p.timestamp, []).append(p)
    assert len(frames) == 91  # frames 0..90 over [0, 3]
    for i, (ts, pkts) in enumerate(sorted(frames.items(), key=lambda kv: kv[1][0].stream_seq)):
        assert ts == (5 + 3000 * i) & 0xFFFFFFFF  # 90 kHz at 30 fps
        assert len(pkts) >= 3  # several packets per frame
        assert [p.marker for p in pkts] == [False] * (len(pkts) - 1) + [True]
        key = i % 30 == 0  # one key frame per second, the first frame is one
        assert all(p.keyframe == key for p in pkts)
        assert [p.ekt_full_hint for p in pkts] == [key] + [False] * (len(pkts) - 1)
        for j, p in enumerate(pkts):
            rtp = RtpPacket.parse(p.rtp)
            assert rtp.payload_type == VIDEO_PT
            payload = parse_payload(rtp.payload)
            assert payload.kind is StreamKind.VIDEO
            assert payload.frame == i and payload.keyframe == key
            assert payload.end_of_frame == (j == len(pkts) - 1)
            assert len(rtp.payload) <= 1000
    # SEQ increases by one per packet; the stream sequence too.
    assert [p.stream_seq for p in sent] == list(range(len(sent)))
    # The delta-frame bit rate is what was asked for (within one packet's rounding).
    delta = [pkts for pkts in frames.values() if not pkts[0].keyframe]
    per_frame = sum(sum(p.payload_length for p in f) for f in delta) / len(delta)
    assert per_frame * 8 * 30 == pytest.approx(600_000, rel=0.02)
    keyframe = next(f for f in frames.values() if f[0].keyframe)
    assert sum(p.payload_length for p in keyframe) == pytest.approx(3 * per_frame, rel=0.02)


def test_video_keyframe_on_request() -> None:
    src = VideoSource("bob", 0.0, VideoSettings(keyframe_interval=10.0))
    first = src.packets_due(0.0)
    assert first[0].keyframe and first[0].ekt_full_hint
    assert not any(p.keyframe for p in src.packets_due(1.0))
    src.request_keyframe()
    src.request_keyframe()  # requests before the next frame coalesce
    nxt = src.packets_due(1.04)
    assert len({p.timestamp for p in nxt}) == 1
    assert all(p.keyframe for p in nxt) and nxt[0].ekt_full_hint
    assert not any(p.keyframe for p in src.packets_due(1.2))
    assert src.keyframes == 2 and src.keyframe_requests == 2


def test_requested_keyframes_are_spaced() -> None:
    """A storm of PLIs gives at most one key frame per min_keyframe_gap (0.25 s)."""
    src = VideoSource("bob", 0.0, VideoSettings(fps=30, keyframe_interval=10.0))
    key_times = []
    for i in range(61):  # two seconds, a PLI before every frame
        now = i / 30
        src.request_keyframe()
        if any(p.keyframe for p in src.packets_due(now)):
            key_times.append(now)
    gaps = [b - a for a, b in itertools.pairwise(key_times)]
    assert len(key_times) == 8 and all(g >= 0.25 for g in gaps)


def test_video_small_frames_still_carry_the_payload() -> None:
    settings = VideoSettings(fps=10, bitrate=1000, max_payload=200)
    src = VideoSource("x" * 64, 0.0, settings)
    pkts = src.packets_due(0.0)
    assert len(pkts) == 1 and pkts[0].marker
    parse_payload(RtpPacket.parse(pkts[0].rtp).payload)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"fps": 0},
        {"bitrate": 10},
        {"max_payload": 50},
        {"keyframe_interval": 0},
        {"min_keyframe_gap": -1},
    ],
)
def test_video_settings_are_checked(kwargs: dict[str, float]) -> None:
    with pytest.raises(SourceUsageError):
        VideoSettings(**kwargs)  # type: ignore[arg-type]


def test_audio_settings_are_checked() -> None:
    with pytest.raises(SourceUsageError):
        AudioSource("alice", 0.0, rate=0)
    with pytest.raises(SourceUsageError):
        AudioSource("x" * 64, 0.0, payload_size=91)


def test_rtp_timestamp_at_follows_the_clock() -> None:
    src = AudioSource("a", 2.0, first_timestamp=0)
    assert src.stream.rtp_timestamp_at(3.5) == 72_000
    vid = VideoSource("a", 2.0, first_timestamp=0)
    assert vid.stream.rtp_timestamp_at(3.0) == 90_000
    assert math.isclose(vid.next_due(), 2.0)
