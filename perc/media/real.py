"""Real audio and video in the endpoint's media engine, without the codecs (sans-IO, no PyAV).

Theory of operation
-------------------
With real media (D35) the codecs run in the I/O shell, off its event loop (PyAV through
:mod:`perc.media.pipeline`); this module is what the sans-IO engine
(:class:`perc.media.endpoint.EndpointMedia`) does with their output.

**Who sent it.** A real payload is an Opus packet or a VP8 payload (RFC 7587, RFC 7741) that
any RTP receiver can decode, so it cannot say who made it the way perc's synthetic payload
does. The sender's name and the stream kind travel instead in the packet's RTP padding
(RFC 3550 §5.1): the padding is covered by the inner, end-to-end layer only (RFC 8723 §5.1),
so the Media Distributor neither reads nor changes it, and a standard receiver discards it.
Layout (:func:`identity_padding`)::

    magic     4   b"PRCI"
    kind      1   0 audio, 1 video (perc.media.payload.StreamKind)
    name_len  1   1..64
    name      name_len bytes of UTF-8
    count     1   RFC 3550 §5.1: the padding's length, this byte included

Every real packet carries it, so every packet is attributed and verified on its own, as a
synthetic one is (the name and kind must stay those the SSRC first said).

**Sending** (:class:`RealSource`). The shell encodes frame *k* of a stream shortly before its
slot ``start + k / rate`` and hands the encoded frame over with :meth:`RealSource.push`; the
engine's timer sends it at its slot: packetized (:mod:`perc.media.packetize`: one Opus packet
per payload; VP8 with the RFC 7741 descriptor), RTP timestamps from the slot number (48 kHz,
960 ticks per 20 ms; 90 kHz for video), the RFC 9626 frame-marking element (id 4) on video
from the encoder's own key-frame flag, a Full EKT tag with each key frame's first packet
(RFC 8870 §4.6). A slot whose frame is not there yet is waited for (polled every few
milliseconds) for up to ``max_lateness`` seconds, then skipped and counted. Key-frame
requests (PLI/FIR, RFC 4585 §6.3.1, RFC 5104 §4.3.1) are taken by the shell before it
encodes the next frame, at most one per ``min_keyframe_gap``.

**Receiving.** The engine checks the identity and then, per sending SSRC, runs
:class:`~perc.media.nack.VideoReceiver` on video (generic NACKs for holes, PLI when a frame
cannot be completed, D36; whole frames in decode order out) and passes audio packets through.
What is ready goes out as :class:`ReceivedMedia` items for the shell to decode and record.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import attrs

from perc.media.payload import MAX_NAME_LENGTH, PayloadDecodeError, PayloadUsageError, StreamKind
from perc.media.sources import OutgoingPacket, SourceUsageError, random_ssrc
from perc.wire.framemarking import DEFAULT_FRAME_MARKING_ID
from perc.wire.rtp import RtpPacket, encode_extensions

if TYPE_CHECKING:  # the packetizers are loaded by the first real source only
    from perc.media.packetize import OpusPacketizer, PacketizedPayload, Vp8Packetizer

__all__ = [
    "IDENTITY_MAGIC",
    "RealSettings",
    "RealSource",
    "ReceivedMedia",
    "default_tone",
    "identity_padding",
    "parse_identity_untrusted",
]

IDENTITY_MAGIC = b"PRCI"
#: while a due frame is still being encoded, look again this often (seconds)
_POLL = 0.005


def identity_padding(name: str, kind: StreamKind) -> bytes:
    """The RTP padding that names the sender and the stream kind (module docstring)."""
    raw = name.encode("utf-8")
    if not 1 <= len(raw) <= MAX_NAME_LENGTH:
        raise PayloadUsageError(f"sender name must be 1..{MAX_NAME_LENGTH} bytes of UTF-8")
    body = IDENTITY_MAGIC + bytes((int(kind), len(raw))) + raw
    return body + bytes((len(body) + 1,))


def parse_identity_untrusted(padding: bytes) -> tuple[str, StreamKind]:
    """``(name, kind)`` from a packet's RTP padding; raises :class:`PayloadDecodeError`."""
    n = len(padding)
    if n < 8 or padding[:4] != IDENTITY_MAGIC or padding[-1] != n:
        raise PayloadDecodeError("RTP padding carries no sender identity")
    kind, length = padding[4], padding[5]
    if kind not in (0, 1) or not 1 <= length <= MAX_NAME_LENGTH or 6 + length + 1 != n:
        raise PayloadDecodeError("malformed sender identity in the RTP padding")
    try:
        name = padding[6 : 6 + length].decode("utf-8")
    except UnicodeDecodeError:
        raise PayloadDecodeError("sender name is not UTF-8") from None
    return name, StreamKind(kind)


def default_tone(name: str) -> float:
    """A pitch of its own per name (Hz), between 300 and 1000, so peers sound different."""
    return 300.0 + (sum(name.encode()) * 47) % 700


@attrs.frozen
class RealSettings:
    """What a real-media endpoint sends and does with what it receives."""

    audio_file: Path | None = None
    """Read audio from this file (anything FFmpeg reads); None: a tone of ``tone`` Hz."""
    video_file: Path | None = None
    """Read video from this file; None: a generated test pattern (name and clock)."""
    loop: bool = False
    """Start input files again at their end (else the stream stops there)."""
    record: Path | None = None
    """Write each peer's received media under this folder (``NAME.audio.ogg``/``.webm``)."""
    fps: int = 30
    bitrate: int = 500_000
    """VP8 target bit rate (bit/s)."""
    width: int = 640
    height: int = 360
    audio_bitrate: int = 32_000
    tone: float | None = None
    """Generated tone's pitch (Hz); None: :func:`default_tone` of the name."""
    repair: bool = True
    """Send NACKs for missing video packets (D36); PLI is sent either way."""
    frame_marking_id: int = DEFAULT_FRAME_MARKING_ID

    def __attrs_post_init__(self) -> None:
        if not 1 <= self.fps <= 120:
            raise SourceUsageError(f"real video needs a frame rate of 1-120, not {self.fps}")
        if self.width % 2 or self.height % 2 or not (16 <= self.width <= 4096 >= self.height >= 16):
            raise SourceUsageError(f"video size {self.width}x{self.height} is not even or sane")


@attrs.frozen(slots=True)
class ReceivedMedia:
    """One received Opus packet or whole VP8 frame, end-to-end plaintext, for the shell."""

    name: str
    kind: StreamKind
    ssrc: int
    timestamp: int
    data: bytes
    keyframe: bool = False


class _RealStream:
    """RTP numbering of one real stream (the attributes the engine's reports read)."""

    def __init__(self, ssrc: int, pt: int, clock_rate: int, start: float) -> None:
        self.ssrc = ssrc
        self.pt = pt
        self.clock_rate = clock_rate
        self.start = start
        self.seq = random_ssrc() & 0xFFFF
        self.ts0 = random_ssrc()
        self.stream_seq = 0
        self.sent = 0
        self.octets = 0
        self.skipped = 0

    def rtp_timestamp_at(self, now: float) -> int:
        return (self.ts0 + round((now - self.start) * self.clock_rate)) & 0xFFFFFFFF


@attrs.define
class RealSourceStats:
    frames: int = 0  # sent
    keyframes: int = 0
    late: int = 0  # slots sent after waiting for the encoder
    skipped: int = 0  # slots given up (encoder too slow) or encoded empty
    stale: int = 0  # frames pushed after their slot was given up


class RealSource:
    """One outgoing real stream: encoded frames from the shell out on their slots."""

    def __init__(
        self,
        name: str,
        kind: StreamKind,
        start: float,
        *,
        rate: float,
        clock_rate: int,
        pt: int,
        ssrc: int | None = None,
        frame_marking_id: int | None = None,
        max_payload: int = 1100,
        max_lateness: float = 0.5,
        min_keyframe_gap: float = 0.25,
    ) -> None:
        self._padding = identity_padding(name, kind)
        self.name = name
        self._kind = kind
        self._s = _RealStream(random_ssrc() if ssrc is None else ssrc, pt, clock_rate, start)
        self._interval = 1.0 / rate
        self._ticks = clock_rate / rate
        self._marking = frame_marking_id
        from perc.media.packetize import OpusPacketizer, Vp8Packetizer

        self._packetizer: Vp8Packetizer | OpusPacketizer = (
            Vp8Packetizer(max_payload - len(self._padding))
            if kind is StreamKind.VIDEO
            else OpusPacketizer()
        )
        self._max_lateness = max_lateness
        self._min_gap = min_keyframe_gap
        self._frames: dict[int, list[tuple[bytes, bool]]] = {}
        self._slot = 0
        self._end: int | None = None
        self._retry_at = 0.0
        self._key_requested = True  # the first frame is a key frame anyway
        self._last_key_at: float | None = None
        self.keyframe_requests = 0
        self.stats = RealSourceStats()

    @property
    def kind(self) -> StreamKind:
        return self._kind

    @property
    def ssrc(self) -> int:
        return self._s.ssrc

    @property
    def stream(self) -> _RealStream:
        return self._s

    @property
    def slot(self) -> int:
        """The next slot to send (earlier ones were sent or given up)."""
        return self._slot

    @property
    def ended(self) -> bool:
        return self._end is not None and self._slot >= self._end

    def due(self, index: int) -> float:
        """When frame ``index`` (0: the first) is sent."""
        return self._s.start + index * self._interval

    # --- from the shell ------------------------------------------------------------------

    def push(self, index: int, frames: list[tuple[bytes, bool]]) -> None:
        """The encoded output for slot ``index``: ``(data, keyframe)`` pairs (usually one;
        none if the encoder held it back)."""
        if index < self._slot:
            self.stats.stale += 1
            return
        self._frames[index] = frames

    def end(self, index: int) -> None:
        """The input ended: slot ``index`` and later have nothing."""
        self._end = index

    def request_keyframe(self) -> None:
        """A PLI or FIR arrived for this stream (see :meth:`take_keyframe_request`)."""
        self.keyframe_requests += 1
        self._key_requested = True

    def take_keyframe_request(self, now: float) -> bool:
        """Whether the next frame the shell encodes must be a key frame."""
        if not self._key_requested:
            return False
        if self._last_key_at is not None and now - self._last_key_at < self._min_gap:
            return False
        self._key_requested = False
        self._last_key_at = now
        return True

    # --- the engine's timetable ------------------------------------------------------------

    def next_due(self) -> float:
        if self.ended:
            return math.inf
        return max(self.due(self._slot), self._retry_at)

    def packets_due(self, now: float) -> list[OutgoingPacket]:
        out: list[OutgoingPacket] = []
        while not self.ended and self.due(self._slot) <= now:
            frames = self._frames.pop(self._slot, None)
            if frames is None:
                if now - self.due(self._slot) <= self._max_lateness:
                    self._retry_at = now + _POLL  # still being encoded: look again soon
                    return out
                self.stats.skipped += 1
                self._s.skipped += 1
            else:
                if now - self.due(self._slot) > _POLL:
                    self.stats.late += 1
                if not frames:
                    self.stats.skipped += 1
                timestamp = (self._s.ts0 + round(self._slot * self._ticks)) & 0xFFFFFFFF
                for data, _ in frames:
                    out += self._packets(data, timestamp, now)
            self._slot += 1
        return out

    def _packets(self, data: bytes, timestamp: int, now: float) -> list[OutgoingPacket]:
        s = self._s
        payloads: list[PacketizedPayload] = self._packetizer.packetize(data)
        self.stats.frames += 1
        out = []
        for i, item in enumerate(payloads):
            if i == 0 and item.keyframe:
                self.stats.keyframes += 1
            profile: int | None = None
            ext = b""
            if self._marking is not None:
                profile, ext = encode_extensions([item.frame_marking.extension(self._marking)])
            rtp = RtpPacket(
                payload_type=s.pt,
                sequence_number=s.seq,
                timestamp=timestamp,
                ssrc=s.ssrc,
                marker=item.marker,
                extension_profile=profile,
                extension_data=ext,
                payload=item.payload,
                padding=self._padding,
            ).serialize()
            out.append(
                OutgoingPacket(
                    self._kind,
                    s.ssrc,
                    rtp,
                    s.seq,
                    timestamp,
                    item.marker,
                    s.stream_seq,
                    len(item.payload),
                    item.keyframe,
                    # RFC 8870 §4.6: a Full EKT tag with each key frame
                    item.keyframe and i == 0,
                )
            )
            s.seq = (s.seq + 1) & 0xFFFF
            s.stream_seq = (s.stream_seq + 1) & 0xFFFFFFFF
            s.sent += 1
            s.octets += len(item.payload)
        return out
