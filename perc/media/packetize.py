"""RTP packetization of Opus and VP8, and VP8 frame reassembly, sans-IO.

Theory of operation
-------------------
**Sending.** :class:`Vp8Packetizer` splits one encoded VP8 frame into RTP payloads of at most
``max_payload`` bytes, each starting with an RFC 7741 §4.2 descriptor (X = 1, I = 1, a 15-bit
PictureID that advances by one per frame). The whole frame is sent as partition 0: S = 1 and
PID = 0 on the first packet only (§4.1 permits packets that are not aligned to partitions).
Packets are made as equal in size as possible, so the last one is not a runt. Each packet
gets the RFC 9626 frame marking values (S, E, I) and the marker bit on the frame's last packet
(RFC 7741 §4.1). :class:`OpusPacketizer` puts one Opus packet in one RTP payload (RFC 7587
§4.2). :class:`RtpSequencer` turns payloads into RTP packets for one SSRC (sequence numbers,
timestamps from the media clock, the frame marking element, RFC 3550 §5.1).

**Receiving.** :class:`Vp8FrameAssembler` takes the payloads of one SSRC in any order (with the
outer SEQ, RFC 8723 §5.3: the application orders by the outer header) and returns whole
frames in decode order. Sequence numbers are extended to 64 bits (RFC 3550 Appendix A.1
style). A frame is the run of packets from one with S = 1, PID = 0 up to the one with the
marker bit, all with one timestamp. Frames are released strictly in order: a later complete
frame waits behind a gap until the gap is filled (a retransmission) or given up, either by
the caller (:meth:`Vp8FrameAssembler.give_up`, from the NACK logic of
:mod:`perc.media.nack`) or by the assembler itself when the gap has blocked it for
``max_wait`` seconds or the buffer is full. A frame that lost a packet for good is dropped and
so is every delta frame after it, until a complete key frame arrives: a VP8 delta frame
decoded without its reference frames shows corruption (RFC 6386 §9.7), and the decoder needs
a key frame to recover. The assembler then reports that it wants one
(:meth:`Vp8FrameAssembler.take_keyframe_request`: the caller sends a PLI, RFC 4585 §6.3.1).
A stream starts in that state too: nothing decodes before the first key frame.

Every buffer is bounded (``max_packets``) and every drop is counted in
:class:`AssemblerStats`. The clock is injected (``now`` in seconds).
"""

from __future__ import annotations

import os

import attrs

from perc.wire.framemarking import FrameMarking
from perc.wire.rtp import RtpPacket, encode_extensions
from perc.wire.vp8 import Vp8DecodeError, Vp8Descriptor, split_vp8_payload, vp8_frame_is_keyframe

__all__ = [
    "AUDIO_CLOCK_RATE",
    "OPUS_FRAME_SAMPLES",
    "OPUS_PT",
    "VIDEO_CLOCK_RATE",
    "VP8_PT",
    "AssembledFrame",
    "AssemblerStats",
    "OpusPacketizer",
    "PacketizedPayload",
    "RtpSequencer",
    "Vp8FrameAssembler",
    "Vp8Packetizer",
]

OPUS_PT = 111  # D35
VP8_PT = 96  # D35
AUDIO_CLOCK_RATE = 48_000  # RFC 7587 §4.1: always 48 kHz
VIDEO_CLOCK_RATE = 90_000  # RFC 7741 §6.1
OPUS_FRAME_SAMPLES = 960  # 20 ms at 48 kHz


@attrs.frozen(slots=True)
class PacketizedPayload:
    """One RTP payload of a frame, with the header values the sender must set for it."""

    payload: bytes
    marker: bool
    frame_marking: FrameMarking
    keyframe: bool


class Vp8Packetizer:
    """Encoded VP8 frames in, RTP payloads with RFC 7741 descriptors out."""

    def __init__(self, max_payload: int = 1200, *, picture_id: int = 0) -> None:
        if max_payload < 8:
            raise ValueError(f"max_payload {max_payload} leaves no room for frame data")
        self.max_payload = max_payload
        self.picture_id = picture_id & 0x7FFF

    def packetize(self, frame: bytes) -> list[PacketizedPayload]:
        """Split one encoded frame. Key frames are recognised from the frame's own payload
        header (RFC 7741 §4.3), never from what the caller believes."""
        if len(frame) < 3:
            raise ValueError("a VP8 frame has at least its 3-byte payload header")
        keyframe = vp8_frame_is_keyframe(frame)
        first = Vp8Descriptor(start=True, picture_id=self.picture_id)
        rest = Vp8Descriptor(start=False, picture_id=self.picture_id)
        room = self.max_payload - first.length
        count = -(-len(frame) // room)
        base, extra = divmod(len(frame), count)
        out: list[PacketizedPayload] = []
        pos = 0
        for i in range(count):
            size = base + (1 if i < extra else 0)
            descriptor = first if i == 0 else rest
            last = i == count - 1
            out.append(
                PacketizedPayload(
                    payload=descriptor.serialize() + frame[pos : pos + size],
                    marker=last,
                    frame_marking=FrameMarking(start=i == 0, end=last, independent=keyframe),
                    keyframe=keyframe,
                )
            )
            pos += size
        self.picture_id = (self.picture_id + 1) & 0x7FFF
        return out


class OpusPacketizer:
    """One Opus packet per RTP payload (RFC 7587 §4.2); 20 ms frames advance 960 ticks.

    The marker bit is set on the stream's first packet only: perc sends no DTX, so there is
    one talkspurt (RFC 3551 §4.1)."""

    def __init__(self) -> None:
        self._first = True

    def packetize(self, packet: bytes) -> list[PacketizedPayload]:
        if not packet:
            raise ValueError("an Opus packet has at least its TOC byte (RFC 6716 §3.1)")
        marker, self._first = self._first, False
        return [PacketizedPayload(packet, marker, FrameMarking(), keyframe=False)]


class RtpSequencer:
    """RTP headers for one outgoing stream: SEQ + 1 per packet, timestamps from media time.

    ``timestamp`` arguments count clock ticks from the stream's start (e.g. an encoder's
    ``pts`` in 1/clock_rate units); the base of RFC 3550 §5.1 is added here. The first SEQ and
    the timestamp base are random unless given (RFC 3550 §5.1). ``frame_marking_id`` (video:
    :data:`~perc.wire.framemarking.DEFAULT_FRAME_MARKING_ID`, D35) adds the RFC 9626 element.
    """

    def __init__(
        self,
        ssrc: int,
        payload_type: int,
        *,
        sequence_number: int | None = None,
        timestamp_base: int | None = None,
        frame_marking_id: int | None = None,
    ) -> None:
        if sequence_number is None:
            sequence_number = int.from_bytes(os.urandom(2), "big")
        if timestamp_base is None:
            timestamp_base = int.from_bytes(os.urandom(4), "big")
        self.ssrc = ssrc
        self.payload_type = payload_type
        self.sequence_number = sequence_number & 0xFFFF
        self.timestamp_base = timestamp_base & 0xFFFFFFFF
        self.frame_marking_id = frame_marking_id

    def packets(self, payloads: list[PacketizedPayload], timestamp: int) -> list[bytes]:
        out = []
        for item in payloads:
            profile: int | None = None
            ext = b""
            if self.frame_marking_id is not None:
                profile, ext = encode_extensions(
                    [item.frame_marking.extension(self.frame_marking_id)]
                )
            out.append(
                RtpPacket(
                    payload_type=self.payload_type,
                    sequence_number=self.sequence_number,
                    timestamp=(self.timestamp_base + timestamp) & 0xFFFFFFFF,
                    ssrc=self.ssrc,
                    marker=item.marker,
                    extension_profile=profile,
                    extension_data=ext,
                    payload=item.payload,
                ).serialize()
            )
            self.sequence_number = (self.sequence_number + 1) & 0xFFFF
        return out


@attrs.frozen(slots=True)
class AssembledFrame:
    """One whole VP8 frame, in decode order. ``first_seq``/``last_seq`` are extended."""

    data: bytes
    timestamp: int
    keyframe: bool
    first_seq: int
    last_seq: int
    picture_id: int | None


@attrs.define
class AssemblerStats:
    packets: int = 0
    duplicates: int = 0  # a SEQ already buffered or already released
    late: int = 0  # arrived after its frame was released or given up
    malformed: int = 0  # not a VP8 payload (Vp8DecodeError)
    frames: int = 0  # released
    frames_dropped: int = 0  # incomplete for good, or a delta frame with no key frame before
    packets_dropped: int = 0  # buffered packets discarded with a dropped frame or overflow
    gaps_given_up: int = 0
    keyframe_requests: int = 0


@attrs.define(slots=True)
class _Packet:
    timestamp: int
    marker: bool
    descriptor: Vp8Descriptor
    data: bytes


class Vp8FrameAssembler:
    """VP8 payloads of one SSRC in, whole frames in decode order out (see the module doc)."""

    def __init__(self, *, max_packets: int = 1024, max_wait: float = 1.0) -> None:
        self.max_packets = max_packets
        self.max_wait = max_wait
        self.stats = AssemblerStats()
        self._buf: dict[int, _Packet] = {}
        self._lost: set[int] = set()  # extended SEQs given up for good
        self._highest: int | None = None  # highest extended SEQ seen
        self._next: int | None = None  # extended SEQ that starts the next frame to release
        self._need_key = True
        self._key_request = True
        self._blocked_at: int | None = None
        self._blocked_since = 0.0

    # --- input ---------------------------------------------------------------------------

    def extend(self, seq: int) -> int:
        """The extended (64-bit) sequence number of a 16-bit ``seq`` (RFC 3550 App. A.1)."""
        if self._highest is None:
            return seq + (1 << 16)  # room below the first packet for reordered ones
        delta = ((seq - self._highest + 0x8000) & 0xFFFF) - 0x8000
        return self._highest + delta

    def push(
        self, seq: int, timestamp: int, marker: bool, payload: bytes, now: float
    ) -> list[AssembledFrame]:
        """Add one packet (outer SEQ, timestamp, marker; the decrypted payload); return the
        frames that are now ready, in decode order."""
        try:
            descriptor, data = split_vp8_payload(payload)
        except Vp8DecodeError:
            self.stats.malformed += 1
            return self.poll(now)
        ext = self.extend(seq)
        self.stats.packets += 1
        if ext in self._buf:
            self.stats.duplicates += 1
            return self.poll(now)
        if ext in self._lost or (self._next is not None and ext < self._next):
            self.stats.late += 1  # or a duplicate of a released packet: it cannot be told apart
            return self.poll(now)
        if self._highest is None or ext > self._highest:
            self._highest = ext
        self._buf[ext] = _Packet(timestamp, marker, descriptor, data)
        frames: list[AssembledFrame] = []
        while len(self._buf) > self.max_packets:
            self._give_up_head()
            frames += self._release()
        return frames + self.poll(now)

    def give_up(self, seqs: list[int] | tuple[int, ...]) -> list[AssembledFrame]:
        """The caller will not get these 16-bit SEQs back (its repair gave up): stop waiting
        for them. Returns the frames this unblocks."""
        for seq in seqs:
            ext = self.extend(seq)
            if ext not in self._buf and (self._next is None or ext >= self._next):
                self._lost.add(ext)
        return self._release()

    def poll(self, now: float) -> list[AssembledFrame]:
        """Release what is ready; give up a gap that has blocked release for ``max_wait``."""
        frames = self._release()
        # Release drains everything it can, so buffered packets past the next SEQ mean a
        # frame is waiting for packets.
        if self._next is not None and self._buf:
            if self._blocked_at != self._next:
                self._blocked_at = self._next
                self._blocked_since = now
            elif now >= self._blocked_since + self.max_wait:  # the form timer() uses
                self._give_up_head()
                frames += self._release()
                self._blocked_at = self._next if self._buf else None
                self._blocked_since = now
        else:
            self._blocked_at = None
        return frames

    def timer(self) -> float | None:
        """When :meth:`poll` will give up the gap that blocks release (``None``: none)."""
        if self._blocked_at is None:
            return None
        return self._blocked_since + self.max_wait

    # --- state -----------------------------------------------------------------------------

    @property
    def needs_keyframe(self) -> bool:
        """Nothing more can decode until a key frame arrives."""
        return self._need_key

    @property
    def can_decode(self) -> bool:
        """The frames released so far form an unbroken chain from a key frame."""
        return not self._need_key

    def keyframe_buffered(self) -> bool:
        """A key frame's first packet waits in the buffer (its frame may still complete)."""
        return any(p.descriptor.frame_start and _is_key(p.data) for p in self._buf.values())

    def take_keyframe_request(self) -> bool:
        """True once each time the assembler starts waiting for a key frame (send a PLI)."""
        wanted = self._key_request
        self._key_request = False
        if wanted:
            self.stats.keyframe_requests += 1
        return wanted

    def missing(self) -> list[int]:
        """16-bit SEQs not received between the next frame to release and the highest SEQ."""
        if self._highest is None:
            return []
        low = self._next if self._next is not None else min(self._buf, default=self._highest)
        low = max(low, self._highest + 1 - self.max_packets)
        return [
            s & 0xFFFF
            for s in range(low, self._highest + 1)
            if s not in self._buf and s not in self._lost
        ]

    def incomplete_frames(self) -> list[int]:
        """Timestamps of buffered frames that still lack packets, oldest first."""
        complete_or_not: dict[int, bool] = {}
        for ext in sorted(self._buf):
            ts = self._buf[ext].timestamp
            complete_or_not.setdefault(ts, False)
        for ts in list(complete_or_not):
            complete_or_not[ts] = self._frame_complete(ts)
        return [ts for ts, done in complete_or_not.items() if not done]

    def _frame_complete(self, timestamp: int) -> bool:
        seqs = sorted(s for s, p in self._buf.items() if p.timestamp == timestamp)
        head, tail = self._buf[seqs[0]], self._buf[seqs[-1]]
        return head.descriptor.frame_start and tail.marker and seqs[-1] - seqs[0] + 1 == len(seqs)

    # --- release -----------------------------------------------------------------------------

    def _frame_at(self, start: int) -> tuple[int, str] | None:
        """How the frame starting at ``start`` stands: ``(last_seq, "ok")`` complete;
        ``(last_seq, "broken")`` it can never complete; ``(start, "stray")`` the packet there
        does not start a frame (the tail of a frame already given up); ``None`` while it
        waits for packets."""
        head = self._buf.get(start)
        if head is None:
            return (start, "broken") if start in self._lost else None
        if not head.descriptor.frame_start:
            return start, "stray"
        seq = start
        while True:
            packet = self._buf.get(seq)
            if packet is None:
                return (seq, "broken") if seq in self._lost else None
            if packet.timestamp != head.timestamp:
                return seq - 1, "broken"  # the marker packet never came: a different frame
            if packet.marker:
                return seq, "ok"
            seq += 1

    def _release(self) -> list[AssembledFrame]:
        out: list[AssembledFrame] = []
        while True:
            start = self._next
            if start is None:
                if not self._resync():
                    return out
                continue
            found = self._frame_at(start)
            if found is None:
                # Waiting for packets; but a decoder that needs a key frame gains nothing
                # from the frames in the gap: jump to a complete key frame if one is here.
                if self._need_key and self._resync():
                    continue
                return out
            last, status = found
            if status == "stray":
                self._discard_below(start + 1)
                self._next = start + 1
            elif status == "broken":
                self._drop_until_next_start(last)
            elif self._need_key and not _is_key(self._buf[start].data):
                self._discard_below(last + 1)  # a delta frame without its references
                self._next = last + 1
            else:
                out.append(self._emit(start, last))

    def _resync(self) -> bool:
        """Jump to the first complete key frame buffered at or after the next SEQ, dropping
        everything before it. False if there is none yet."""
        for ext in sorted(self._buf):
            if self._next is not None and ext < self._next:
                continue
            packet = self._buf[ext]
            if not packet.descriptor.frame_start or not _is_key(packet.data):
                continue
            found = self._frame_at(ext)
            if found is not None and found[1] == "ok":
                self._discard_below(ext)
                self._next = ext
                self._need_key = False
                return True
        return False

    def _emit(self, first: int, last: int) -> AssembledFrame:
        packets = [self._buf.pop(s) for s in range(first, last + 1)]
        head = packets[0]
        keyframe = _is_key(head.data)
        if keyframe:
            self._need_key = False
        self._next = last + 1
        self._prune_lost()
        self.stats.frames += 1
        return AssembledFrame(
            data=b"".join(p.data for p in packets),
            timestamp=head.timestamp,
            keyframe=keyframe,
            first_seq=first,
            last_seq=last,
            picture_id=head.descriptor.picture_id,
        )

    def _drop_until_next_start(self, after: int) -> None:
        """The frame at the next SEQ can never complete: drop it and wait for a key frame."""
        if self._next not in self._buf:
            self.stats.frames_dropped += 1  # its first packet is lost: not counted below
        later = [s for s in self._buf if s > after and self._buf[s].descriptor.frame_start]
        target = min(later) if later else max(after, self._highest or after) + 1
        self._discard_below(target)
        self._next = target
        self._want_keyframe()

    def _give_up_head(self) -> None:
        """Stop waiting for the first packet missing at the head of the buffer."""
        self.stats.gaps_given_up += 1
        if self._next is None:
            # Never in sync (no complete key frame yet): no head frame waits for a gap, so
            # marking gaps lost would release nothing. Drop the oldest packet instead (one
            # packet per call keeps a full buffer linear in its size, whatever the SEQs).
            if self._buf:
                self._discard_below(min(self._buf) + 1)
            self._want_keyframe()
            return
        low = self._next
        top = max(self._buf) if self._buf else low
        for s in range(low, top + 1):
            if s not in self._buf and s not in self._lost:
                self._lost.add(s)
                return
        # Nothing missing: the buffer is full of frames that cannot start (no key frame yet,
        # or one frame larger than the buffer), or the last frame's tail never came.
        self._discard_below(top + 1)
        self._next = top + 1
        self._want_keyframe()

    def _want_keyframe(self) -> None:
        if not self._need_key:
            self._need_key = True
            self._key_request = True

    def _discard_below(self, ext: int) -> None:
        gone = [s for s in self._buf if s < ext]
        for s in gone:
            if self._buf.pop(s).descriptor.frame_start:
                self.stats.frames_dropped += 1
        self.stats.packets_dropped += len(gone)
        self._prune_lost()

    def _prune_lost(self) -> None:
        if self._next is not None:
            self._lost = {s for s in self._lost if s >= self._next}


def _is_key(data: bytes) -> bool:
    return len(data) >= 3 and not data[0] & 0x01
