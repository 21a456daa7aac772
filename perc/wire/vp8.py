"""VP8 RTP payload descriptor codec (RFC 7741 §4.2) and VP8 payload header peek (§4.3).

Wire layout of the payload descriptor (RFC 7741 §4.2), one byte per row::

    required     X(1) | R(1) | N(1) | S(1) | R(1) | PID(3)
    if X:        I(1) | L(1) | T(1) | K(1) | RSV(4)
    if I:        M(1) | PictureID(7)             M = 1: PictureID is 15 bits ...
    if I and M:  PictureID (low 8 bits)          ... and this byte holds its low 8 bits
    if L:        TL0PICIDX(8)
    if T or K:   TID(2) | Y(1) | KEYIDX(5)       TID/Y meaningful only with T, KEYIDX only with K

- X: extension byte present; N: non-reference frame (may be discarded); S: start of a VP8
  partition; PID: partition index. R and RSV bits are sent as 0 and ignored on receipt
  (§4.2), so a parse/serialize round trip clears them.
- The first packet of a frame has S = 1 and PID = 0 (§4.1).

VP8 payload header (RFC 7741 §4.3; RFC 6386 §9.1), the first 3 bytes of the first partition,
present only in a packet with S = 1 and PID = 0::

    Size0(3) | H(1) | VER(3) | P(1)    P = 0: key frame (an "inverse key frame" flag)
    Size1(8)
    Size2(8)

A key frame continues with the start code ``9d 01 2a`` and two 16-bit little-endian fields,
``scale(2) | width(14)`` and ``scale(2) | height(14)`` (RFC 6386 §9.1).

API: :class:`Vp8Descriptor` (``parse``/``serialize``), :func:`split_vp8_payload` (descriptor and
the VP8 bytes after it), :func:`is_keyframe_start` (§4.3 key frame test on one RTP payload),
:func:`vp8_keyframe_size` (width and height of a key frame). Untrusted bytes raise
:class:`Vp8DecodeError` and nothing else; out-of-range fields when serializing raise
``ValueError``.
"""

from __future__ import annotations

import attrs

from perc.wire.errors import DecodeError

__all__ = [
    "Vp8DecodeError",
    "Vp8Descriptor",
    "is_keyframe_start",
    "split_vp8_payload",
    "vp8_frame_is_keyframe",
    "vp8_keyframe_size",
]

_X, _N, _S = 0x80, 0x20, 0x10
_I, _L, _T, _K = 0x80, 0x40, 0x20, 0x10
_M = 0x80
_KEY_START_CODE = b"\x9d\x01\x2a"


class Vp8DecodeError(DecodeError):
    """Untrusted bytes are not a well-formed VP8 RTP payload (descriptor or payload header)."""


@attrs.frozen(slots=True)
class Vp8Descriptor:
    """An RFC 7741 §4.2 payload descriptor. Optional fields are ``None`` when absent."""

    start: bool = False  # S
    partition_id: int = 0  # PID, 0-7
    non_reference: bool = False  # N
    picture_id: int | None = None  # I: 7 bits, or 15 bits when long_picture_id
    long_picture_id: bool = True  # M
    tl0_pic_idx: int | None = None  # L
    tid: int | None = None  # T: temporal layer index, 0-3
    layer_sync: bool = False  # Y, meaningful only with T
    key_idx: int | None = None  # K: temporal key frame index, 0-31

    @property
    def frame_start(self) -> bool:
        """First packet of a frame (RFC 7741 §4.1: S = 1 and PID = 0)."""
        return self.start and self.partition_id == 0

    @property
    def length(self) -> int:
        n = 1
        if self._extended:
            n += 1
            if self.picture_id is not None:
                n += 2 if self.long_picture_id else 1
            if self.tl0_pic_idx is not None:
                n += 1
            if self.tid is not None or self.key_idx is not None:
                n += 1
        return n

    @property
    def _extended(self) -> bool:
        return (
            self.picture_id is not None
            or self.tl0_pic_idx is not None
            or self.tid is not None
            or self.key_idx is not None
        )

    def serialize(self) -> bytes:
        if not 0 <= self.partition_id <= 7:
            raise ValueError(f"VP8 partition index out of range: {self.partition_id}")
        out = bytearray()
        b0 = (_S if self.start else 0) | (_N if self.non_reference else 0) | self.partition_id
        if not self._extended:
            out.append(b0)
            return bytes(out)
        out.append(b0 | _X)
        x = 0
        if self.picture_id is not None:
            x |= _I
        if self.tl0_pic_idx is not None:
            x |= _L
        if self.tid is not None:
            x |= _T
        if self.key_idx is not None:
            x |= _K
        out.append(x)
        if self.picture_id is not None:
            limit = 0x7FFF if self.long_picture_id else 0x7F
            if not 0 <= self.picture_id <= limit:
                raise ValueError(f"PictureID {self.picture_id} does not fit its field")
            if self.long_picture_id:
                out += (_M << 8 | self.picture_id).to_bytes(2, "big")
            else:
                out.append(self.picture_id)
        if self.tl0_pic_idx is not None:
            if not 0 <= self.tl0_pic_idx <= 0xFF:
                raise ValueError(f"TL0PICIDX out of range: {self.tl0_pic_idx}")
            out.append(self.tl0_pic_idx)
        if self.tid is not None or self.key_idx is not None:
            tid = self.tid or 0
            key_idx = self.key_idx or 0
            if not 0 <= tid <= 3 or not 0 <= key_idx <= 31:
                raise ValueError("TID must be 0-3 and KEYIDX 0-31")
            y = 0x20 if self.layer_sync and self.tid is not None else 0
            out.append(tid << 6 | y | key_idx)
        return bytes(out)

    @classmethod
    def parse(cls, data: bytes) -> Vp8Descriptor:
        """The descriptor at the start of an untrusted RTP payload (trailing bytes allowed)."""
        return _parse(data)[0]


def _parse(data: bytes) -> tuple[Vp8Descriptor, int]:
    n = len(data)
    if n < 1:
        raise Vp8DecodeError("empty VP8 payload")
    b0 = data[0]
    pos = 1
    picture_id: int | None = None
    long_id = True
    tl0: int | None = None
    tid: int | None = None
    sync = False
    key_idx: int | None = None
    if b0 & _X:
        if n < 2:
            raise Vp8DecodeError("VP8 descriptor extension byte missing")
        x = data[1]
        pos = 2
        if x & _I:
            if pos >= n:
                raise Vp8DecodeError("VP8 PictureID missing")
            if data[pos] & _M:
                if pos + 2 > n:
                    raise Vp8DecodeError("VP8 15-bit PictureID truncated")
                picture_id = ((data[pos] & 0x7F) << 8) | data[pos + 1]
                pos += 2
            else:
                picture_id = data[pos]
                long_id = False
                pos += 1
        if x & _L:
            if pos >= n:
                raise Vp8DecodeError("VP8 TL0PICIDX missing")
            tl0 = data[pos]
            pos += 1
        if x & (_T | _K):
            if pos >= n:
                raise Vp8DecodeError("VP8 TID/KEYIDX byte missing")
            tk = data[pos]
            pos += 1
            if x & _T:
                tid = tk >> 6
                sync = bool(tk & 0x20)
            if x & _K:
                key_idx = tk & 0x1F
    descriptor = Vp8Descriptor(
        start=bool(b0 & _S),
        partition_id=b0 & 0x07,
        non_reference=bool(b0 & _N),
        picture_id=picture_id,
        long_picture_id=long_id,
        tl0_pic_idx=tl0,
        tid=tid,
        layer_sync=sync,
        key_idx=key_idx,
    )
    return descriptor, pos


def split_vp8_payload(payload: bytes) -> tuple[Vp8Descriptor, bytes]:
    """``(descriptor, vp8_data)`` of an untrusted RTP payload; the VP8 data must not be empty
    (RFC 7741 §4.2: a packet carries at least one byte of the frame)."""
    descriptor, pos = _parse(payload)
    if pos >= len(payload):
        raise Vp8DecodeError("VP8 payload carries no frame data")
    return descriptor, payload[pos:]


def vp8_frame_is_keyframe(frame: bytes) -> bool:
    """Whether VP8 frame bytes (the start of the first partition) begin a key frame: the P bit
    of the payload header is 0 (RFC 7741 §4.3)."""
    if len(frame) < 3:
        raise Vp8DecodeError("VP8 payload header needs 3 bytes")
    return not frame[0] & 0x01


def is_keyframe_start(payload: bytes) -> bool:
    """Whether an untrusted RTP payload is the first packet of a key frame: S = 1, PID = 0 and
    P = 0 in the VP8 payload header that follows the descriptor (RFC 7741 §4.3)."""
    descriptor, data = split_vp8_payload(payload)
    if not descriptor.frame_start:
        return False
    return vp8_frame_is_keyframe(data)


def vp8_keyframe_size(frame: bytes) -> tuple[int, int]:
    """``(width, height)`` of a VP8 key frame (RFC 6386 §9.1); raises for a delta frame."""
    if not vp8_frame_is_keyframe(frame):
        raise Vp8DecodeError("not a VP8 key frame")
    if len(frame) < 10:
        raise Vp8DecodeError("VP8 key frame header truncated")
    if frame[3:6] != _KEY_START_CODE:
        raise Vp8DecodeError("VP8 key frame start code missing")
    width = int.from_bytes(frame[6:8], "little") & 0x3FFF
    height = int.from_bytes(frame[8:10], "little") & 0x3FFF
    return width, height
