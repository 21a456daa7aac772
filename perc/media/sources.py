"""Synthetic audio and video sources: RTP packets on a schedule driven by an injected clock.

Theory of operation
-------------------
A source is a packetizer with a timetable; it never reads a clock. ``next_due()`` says when
its next packet is due; ``packets_due(now)`` returns every packet due at or before ``now``
as :class:`OutgoingPacket` (plain RTP bytes plus what the sender needs to know about them).

**Audio** (:class:`AudioSource`): one packet every ``1/rate`` seconds (50/s: 20 ms frames),
``payload_size`` bytes (160), PT 111, RTP timestamps at 48 kHz (960 ticks per 20 ms packet).

**Video** (:class:`VideoSource`): ``fps`` frames per second; a frame carries
``bitrate / 8 / fps`` bytes (key frames ``keyframe_factor`` times more), split into as many
packets of at most ``max_payload`` bytes as needed, all with the frame's 90 kHz timestamp and
the marker bit on the frame's last packet (RFC 3551 §4.1 / the usual video convention). A key
frame is sent every ``keyframe_interval`` seconds and whenever :meth:`VideoSource.request_keyframe`
was called (a PLI or FIR arrived, RFC 4585 §6.3.1, RFC 5104 §4.3.1), but requested ones at
most every ``min_keyframe_gap`` seconds. The first packet of a key
frame has ``ekt_full_hint`` set: RFC 8870 §4.6 sends a Full EKT tag with each key frame.

Both: a random SSRC (RFC 3550 §8.1), random initial SEQ and timestamp (RFC 3550 §5.1), and a
payload from :mod:`perc.media.payload` naming the sender. SEQ increases by one per packet sent.
If the caller falls more than ``max_lateness`` seconds behind, the missed slots are skipped
(counted in ``skipped``; the timestamp still follows the clock) instead of sending a burst.
"""

from __future__ import annotations

import math
import os
import struct

import attrs

from perc.config import EndpointConfig, default
from perc.media.payload import StreamKind, build_payload, minimum_payload_size

__all__ = [
    "AUDIO_CLOCK_RATE",
    "AUDIO_PT",
    "VIDEO_CLOCK_RATE",
    "VIDEO_PT",
    "AudioSource",
    "OutgoingPacket",
    "SourceUsageError",
    "VideoSettings",
    "VideoSource",
    "random_ssrc",
]

AUDIO_PT = 111
VIDEO_PT = 96
AUDIO_CLOCK_RATE = 48_000
VIDEO_CLOCK_RATE = 90_000
_RTP_HEADER = struct.Struct("!BBHII")


class SourceUsageError(ValueError):
    """Local misuse: impossible rates or sizes."""


def random_ssrc() -> int:
    """A random non-zero 32-bit SSRC (RFC 3550 §8.1)."""
    while True:
        ssrc = int.from_bytes(os.urandom(4), "big")
        if ssrc:
            return ssrc


def _random16() -> int:
    return int.from_bytes(os.urandom(2), "big")


def _random32() -> int:
    return int.from_bytes(os.urandom(4), "big")


@attrs.frozen(slots=True)
class OutgoingPacket:
    """One plain RTP packet a source made, with the facts the sender and statistics need."""

    kind: StreamKind
    ssrc: int
    rtp: bytes
    sequence_number: int
    timestamp: int
    marker: bool
    #: stream sequence number in the payload (packets sent on this stream before this one)
    stream_seq: int
    #: payload bytes (RFC 3550 §6.4.1 SR octet count)
    payload_length: int
    keyframe: bool = False
    #: first packet of a key frame: RFC 8870 §4.6 wants a Full EKT tag here
    ekt_full_hint: bool = False


class _Stream:
    """RTP numbering shared by both source kinds."""

    def __init__(
        self,
        name: str,
        kind: StreamKind,
        *,
        pt: int,
        clock_rate: int,
        start: float,
        ssrc: int | None,
        first_seq: int | None,
        first_timestamp: int | None,
        max_lateness: float,
    ) -> None:
        if not 0 <= pt <= 127:
            raise SourceUsageError(f"payload type {pt} out of range")
        self.name = name
        self.kind = kind
        self.pt = pt
        self.clock_rate = clock_rate
        self.start = start
        self.ssrc = random_ssrc() if ssrc is None else ssrc
        self.seq = _random16() if first_seq is None else first_seq & 0xFFFF
        self.ts0 = _random32() if first_timestamp is None else first_timestamp & 0xFFFFFFFF
        self.max_lateness = max_lateness
        self.stream_seq = 0
        self.sent = 0
        self.octets = 0
        self.skipped = 0
        self.last_sent_at: float | None = None

    def rtp_timestamp_at(self, now: float) -> int:
        """The RTP timestamp that corresponds to ``now`` (for sender reports, RFC 3550 §6.4.1)."""
        return (self.ts0 + round((now - self.start) * self.clock_rate)) & 0xFFFFFFFF

    def packet(
        self,
        timestamp: int,
        payload: bytes,
        marker: bool,
        now: float,
        *,
        keyframe: bool = False,
        hint: bool = False,
    ) -> OutgoingPacket:
        seq = self.seq
        rtp = (
            _RTP_HEADER.pack(0x80, (0x80 if marker else 0) | self.pt, seq, timestamp, self.ssrc)
            + payload
        )
        out = OutgoingPacket(
            self.kind,
            self.ssrc,
            rtp,
            seq,
            timestamp,
            marker,
            self.stream_seq,
            len(payload),
            keyframe,
            hint,
        )
        self.seq = (seq + 1) & 0xFFFF
        self.stream_seq = (self.stream_seq + 1) & 0xFFFFFFFF
        self.sent += 1
        self.octets += len(payload)
        self.last_sent_at = now
        return out


class _Source:
    """What the audio and video sources share: one RTP stream."""

    _s: _Stream

    @property
    def ssrc(self) -> int:
        return self._s.ssrc

    @property
    def stream(self) -> _Stream:
        return self._s


class AudioSource(_Source):
    """Constant-rate synthetic audio: ``rate`` packets/s of ``payload_size`` bytes."""

    def __init__(
        self,
        name: str,
        start: float,
        *,
        rate: float = 50.0,
        payload_size: int = 160,
        pt: int = AUDIO_PT,
        clock_rate: int = AUDIO_CLOCK_RATE,
        ssrc: int | None = None,
        first_seq: int | None = None,
        first_timestamp: int | None = None,
        max_lateness: float = 1.0,
    ) -> None:
        if not 0 < rate <= 1000:
            raise SourceUsageError(f"audio packet rate {rate} out of range")
        if payload_size < minimum_payload_size(name):
            raise SourceUsageError(
                f"audio payload of {payload_size} bytes cannot carry the name {name!r}"
            )
        self._s = _Stream(
            name,
            StreamKind.AUDIO,
            pt=pt,
            clock_rate=clock_rate,
            start=start,
            ssrc=ssrc,
            first_seq=first_seq,
            first_timestamp=first_timestamp,
            max_lateness=max_lateness,
        )
        self._interval = 1.0 / rate
        self._ticks = clock_rate / rate
        self._payload_size = payload_size
        self._slot = 0  # index of the next packet slot since start

    @property
    def kind(self) -> StreamKind:
        return StreamKind.AUDIO

    def next_due(self) -> float:
        return self._s.start + self._slot * self._interval

    def packets_due(self, now: float) -> list[OutgoingPacket]:
        s = self._s
        out: list[OutgoingPacket] = []
        due = s.start + self._slot * self._interval
        if now - due > s.max_lateness:
            # Far behind (a stalled caller): skip the missed slots rather than burst them.
            behind = math.floor((now - due) / self._interval)
            self._slot += behind
            s.skipped += behind
            due = s.start + self._slot * self._interval
        while due <= now:
            payload = build_payload(s.name, StreamKind.AUDIO, s.stream_seq, self._payload_size)
            ts = (s.ts0 + round(self._slot * self._ticks)) & 0xFFFFFFFF
            # RFC 3551 §4.1: audio sets the marker on the first packet of a talkspurt; our one
            # talkspurt starts with the stream.
            out.append(s.packet(ts, payload, s.sent == 0, now))
            self._slot += 1
            due = s.start + self._slot * self._interval
        return out


@attrs.frozen
class VideoSettings:
    """Synthetic video parameters."""

    fps: float = default(EndpointConfig, "video_fps")
    #: average bit rate of delta frames (bit/s); key frames are ``keyframe_factor`` times larger
    bitrate: int = default(EndpointConfig, "video_bitrate")
    #: largest RTP payload per packet (bytes)
    max_payload: int = 1000
    #: seconds between periodic key frames
    keyframe_interval: float = 2.0
    keyframe_factor: float = 3.0
    #: requested key frames (PLI/FIR) come at most this often; later requests wait for it
    min_keyframe_gap: float = 0.25

    def __attrs_post_init__(self) -> None:
        if not 0 < self.fps <= 240:
            raise SourceUsageError(f"video frame rate {self.fps} out of range")
        if not 1000 <= self.bitrate <= 100_000_000:
            raise SourceUsageError(f"video bit rate {self.bitrate} out of range")
        if not 100 <= self.max_payload <= 1400:
            raise SourceUsageError(f"video packet size {self.max_payload} out of range")
        if self.keyframe_interval <= 0 or self.keyframe_factor < 1:
            raise SourceUsageError("key-frame interval must be > 0 and factor >= 1")
        if self.min_keyframe_gap < 0:
            raise SourceUsageError("min_keyframe_gap must be >= 0")


class VideoSource(_Source):
    """Synthetic video: frames of several packets, marker on the last, periodic key frames."""

    def __init__(
        self,
        name: str,
        start: float,
        settings: VideoSettings | None = None,
        *,
        pt: int = VIDEO_PT,
        clock_rate: int = VIDEO_CLOCK_RATE,
        ssrc: int | None = None,
        first_seq: int | None = None,
        first_timestamp: int | None = None,
        max_lateness: float = 1.0,
    ) -> None:
        self.settings = settings or VideoSettings()
        if self.settings.max_payload < minimum_payload_size(name):
            raise SourceUsageError(f"video packets too small to carry the name {name!r}")
        self._s = _Stream(
            name,
            StreamKind.VIDEO,
            pt=pt,
            clock_rate=clock_rate,
            start=start,
            ssrc=ssrc,
            first_seq=first_seq,
            first_timestamp=first_timestamp,
            max_lateness=max_lateness,
        )
        self._min = minimum_payload_size(name)
        self._interval = 1.0 / self.settings.fps
        self._frame = 0  # index of the next frame slot since start
        self._frames_per_key = max(1, round(self.settings.keyframe_interval * self.settings.fps))
        self._min_gap_frames = math.ceil(self.settings.min_keyframe_gap * self.settings.fps)
        self._frames_since_key = self._frames_per_key  # the first frame is a key frame
        self._key_requested = False
        self.keyframes = 0
        self.keyframe_requests = 0

    @property
    def kind(self) -> StreamKind:
        return StreamKind.VIDEO

    def request_keyframe(self) -> None:
        """Make the next frame a key frame (PLI/FIR received); requests coalesce."""
        self.keyframe_requests += 1
        self._key_requested = True

    def next_due(self) -> float:
        return self._s.start + self._frame * self._interval

    def frame_sizes(self, keyframe: bool) -> list[int]:
        """Payload sizes of the packets of one frame."""
        st = self.settings
        total = st.bitrate / 8.0 / st.fps * (st.keyframe_factor if keyframe else 1.0)
        count = max(1, math.ceil(total / st.max_payload))
        size = max(self._min, min(st.max_payload, math.ceil(total / count)))
        return [size] * count

    def packets_due(self, now: float) -> list[OutgoingPacket]:
        s = self._s
        out: list[OutgoingPacket] = []
        due = s.start + self._frame * self._interval
        if now - due > s.max_lateness:
            behind = math.floor((now - due) / self._interval)
            self._frame += behind
            self._frames_since_key += behind
            s.skipped += behind
            due = s.start + self._frame * self._interval
        while due <= now:
            # A key frame is periodic, or requested (PLI/FIR) and not too soon after the last
            # one: many receivers asking at once must not turn every frame into a key frame.
            key = self._frames_since_key >= self._frames_per_key or (
                self._key_requested and self._frames_since_key >= self._min_gap_frames
            )
            if key:
                self._key_requested = False
                self._frames_since_key = 0
                self.keyframes += 1
            self._frames_since_key += 1
            ts = (s.ts0 + round(self._frame * s.clock_rate / self.settings.fps)) & 0xFFFFFFFF
            sizes = self.frame_sizes(key)
            last = len(sizes) - 1
            for i, size in enumerate(sizes):
                payload = build_payload(
                    s.name,
                    StreamKind.VIDEO,
                    s.stream_seq,
                    size,
                    frame=self._frame & 0xFFFFFFFF,
                    keyframe=key,
                    end_of_frame=i == last,
                )
                out.append(s.packet(ts, payload, i == last, now, keyframe=key, hint=key and i == 0))
            self._frame += 1
            due = s.start + self._frame * self._interval
        return out
