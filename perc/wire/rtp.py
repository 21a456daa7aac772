"""RTP packet codec (RFC 3550 §5.1) with RFC 8285 header extensions, for untrusted input.

Wire layout (RFC 3550 §5.1, RFC 8285 §4)::

    byte 0      V(2)=2 | P(1) | X(1) | CC(4)
    byte 1      M(1) | PT(7)
    bytes 2-3   sequence number
    bytes 4-7   timestamp
    bytes 8-11  SSRC
    CC x 4      CSRC list
    if X:       profile(16) | length(16, in 32-bit words) | extension data (length x 4)
    payload
    if P:       padding; its last byte counts the padding bytes, itself included (>= 1)

RFC 8285 header extension elements live in the extension data:

- one-byte form (profile 0xBEDE): ``ID(4) | L(4)`` then L+1 data bytes; ID 1-14. A zero byte
  is padding and is skipped; ID 15 ends processing (§4.2).
- two-byte form (profile 0x100X, X = "appbits"): ``ID(8) | L(8)`` then L data bytes (L may be
  0); a zero ID byte is padding (§4.3).

Two levels of API:

- Per-packet fast path (no object built): :func:`peek_rtp` returns ``(header_length, ssrc,
  seq)``; :func:`rtp_header_length` only the header length; :func:`rewrite_rtp_header` changes
  PT, SEQ and the marker bit in place of a copy.
- Full codec for tests and tools: :class:`RtpPacket` (``parse``/``serialize``, lossless for
  every packet ``parse`` accepts), :class:`HeaderExtension`, :func:`parse_extensions`,
  :func:`encode_extensions`.

Every function given untrusted bytes raises :class:`RtpDecodeError` and nothing else. Bad
arguments from local code (an out-of-range field when serializing) raise ``ValueError``.
"""

from __future__ import annotations

import struct

import attrs

from perc.wire.errors import DecodeError

__all__ = [
    "ONE_BYTE_PROFILE",
    "HeaderExtension",
    "RtpDecodeError",
    "RtpPacket",
    "encode_extensions",
    "is_two_byte_profile",
    "parse_extensions",
    "peek_rtp",
    "rewrite_rtp_header",
    "rtp_header_length",
    "rtp_header_length_or_negative",
]

ONE_BYTE_PROFILE = 0xBEDE  # RFC 8285 §4.2
TWO_BYTE_PROFILE = 0x1000  # RFC 8285 §4.3: 0x100 followed by 4 "appbits"

_FIXED = struct.Struct("!BBHII")
_SEQ_SSRC = struct.Struct("!H4xI")
_EXT_HEADER = struct.Struct("!HH")


class RtpDecodeError(DecodeError):
    """Untrusted bytes are not a well-formed RTP packet or RFC 8285 extension block."""


def is_two_byte_profile(profile: int) -> bool:
    return profile & 0xFFF0 == TWO_BYTE_PROFILE


def rtp_header_length_or_negative(packet: bytes | bytearray | memoryview) -> int:
    """Length of the RTP header (fixed part, CSRCs, RFC 8285 extension), or -1 if malformed.

    The per-packet SRTP paths use this form: a malformed packet is an ordinary outcome there,
    reported by their own error types.
    """
    n = len(packet)
    if n < 12:
        return -1
    b0 = packet[0]
    if b0 & 0xC0 != 0x80:
        return -1
    hlen = 12 + ((b0 & 0x0F) << 2)
    if b0 & 0x10:
        if n < hlen + 4:
            return -1
        hlen += 4 + (((packet[hlen + 2] << 8) | packet[hlen + 3]) << 2)
    return hlen if n >= hlen else -1


def rtp_header_length(packet: bytes) -> int:
    """Length of the RTP header (fixed part, CSRCs, header extension) of ``packet``."""
    hlen = rtp_header_length_or_negative(packet)
    if hlen < 0:
        n = len(packet)
        if n < 12:
            raise RtpDecodeError(f"RTP packet of {n} bytes is shorter than the fixed header")
        if packet[0] & 0xC0 != 0x80:
            raise RtpDecodeError(f"RTP version {packet[0] >> 6}, expected 2")
        raise RtpDecodeError(f"RTP header runs past the {n}-byte packet")
    return hlen


def peek_rtp(packet: bytes) -> tuple[int, int, int]:
    """``(header_length, ssrc, sequence_number)`` without building any object."""
    hlen = rtp_header_length(packet)
    seq, ssrc = _SEQ_SSRC.unpack_from(packet, 2)
    return hlen, ssrc, seq


def rewrite_rtp_header(
    packet: bytes,
    *,
    payload_type: int | None = None,
    sequence_number: int | None = None,
    marker: bool | None = None,
) -> bytes:
    """A copy of ``packet`` with PT, SEQ and/or the marker bit replaced (the fields a Media
    Distributor may change, RFC 8723 §5.2)."""
    if len(packet) < 12 or packet[0] & 0xC0 != 0x80:
        raise RtpDecodeError("not an RTP version 2 packet")
    b1 = packet[1]
    if payload_type is not None:
        if not 0 <= payload_type <= 127:
            raise ValueError(f"payload type out of range: {payload_type}")
        b1 = (b1 & 0x80) | payload_type
    if marker is not None:
        b1 = (b1 & 0x7F) | (0x80 if marker else 0)
    if sequence_number is None:
        seq = packet[2:4]
    else:
        if not 0 <= sequence_number <= 0xFFFF:
            raise ValueError(f"sequence number out of range: {sequence_number}")
        seq = sequence_number.to_bytes(2, "big")
    return packet[0:1] + bytes((b1,)) + seq + packet[4:]


@attrs.frozen
class HeaderExtension:
    """One RFC 8285 header extension element."""

    id: int
    data: bytes


def parse_extensions(profile: int, data: bytes) -> tuple[HeaderExtension, ...]:
    """Elements of an RFC 8285 extension block; ``()`` for a profile that is not RFC 8285."""
    out: list[HeaderExtension] = []
    n = len(data)
    pos = 0
    if profile == ONE_BYTE_PROFILE:
        while pos < n:
            b = data[pos]
            if b == 0:  # padding byte
                pos += 1
                continue
            ext_id, length = b >> 4, (b & 0x0F) + 1
            if ext_id == 15:  # RFC 8285 §4.2: stop processing at ID 15
                break
            if pos + 1 + length > n:
                raise RtpDecodeError(f"one-byte extension element {ext_id} runs past the block")
            out.append(HeaderExtension(ext_id, data[pos + 1 : pos + 1 + length]))
            pos += 1 + length
    elif is_two_byte_profile(profile):
        while pos < n:
            ext_id = data[pos]
            if ext_id == 0:  # padding byte
                pos += 1
                continue
            if pos + 2 > n:
                raise RtpDecodeError("two-byte extension element header runs past the block")
            length = data[pos + 1]
            if pos + 2 + length > n:
                raise RtpDecodeError(f"two-byte extension element {ext_id} runs past the block")
            out.append(HeaderExtension(ext_id, data[pos + 2 : pos + 2 + length]))
            pos += 2 + length
    return tuple(out)


def encode_extensions(
    elements: tuple[HeaderExtension, ...] | list[HeaderExtension],
    *,
    two_byte: bool | None = None,
    appbits: int = 0,
) -> tuple[int, bytes]:
    """``(profile, data)`` for RFC 8285 elements, zero-padded to a multiple of 4 bytes.

    The one-byte form is used when every element fits it (ID 1-14, 1-16 data bytes) unless
    ``two_byte`` says otherwise.
    """
    fits_one = all(1 <= e.id <= 14 and 1 <= len(e.data) <= 16 for e in elements)
    if two_byte is None:
        two_byte = not fits_one
    out = bytearray()
    if not two_byte:
        if not fits_one:
            raise ValueError("element does not fit the one-byte form (ID 1-14, 1-16 bytes)")
        for e in elements:
            out.append((e.id << 4) | (len(e.data) - 1))
            out += e.data
        profile = ONE_BYTE_PROFILE
    else:
        if not 0 <= appbits <= 15:
            raise ValueError(f"appbits out of range: {appbits}")
        for e in elements:
            if not 1 <= e.id <= 255 or len(e.data) > 255:
                raise ValueError("element does not fit the two-byte form (ID 1-255, 0-255 bytes)")
            out += bytes((e.id, len(e.data)))
            out += e.data
        profile = TWO_BYTE_PROFILE | appbits
    out += bytes(-len(out) % 4)
    return profile, bytes(out)


@attrs.frozen
class RtpPacket:
    """A parsed RTP packet. ``padding`` holds the padding bytes, count byte included."""

    payload_type: int
    sequence_number: int
    timestamp: int
    ssrc: int
    marker: bool = False
    csrcs: tuple[int, ...] = ()
    extension_profile: int | None = None  # None: X bit clear
    extension_data: bytes = b""  # raw extension body, a multiple of 4 bytes
    payload: bytes = b""
    padding: bytes = b""

    @property
    def header_length(self) -> int:
        ext = 0 if self.extension_profile is None else 4 + len(self.extension_data)
        return 12 + 4 * len(self.csrcs) + ext

    def extensions(self) -> tuple[HeaderExtension, ...]:
        """The RFC 8285 elements of the header extension (``()`` if none or not RFC 8285)."""
        if self.extension_profile is None:
            return ()
        return parse_extensions(self.extension_profile, self.extension_data)

    @classmethod
    def parse(cls, data: bytes) -> RtpPacket:
        """Parse untrusted bytes; raises :class:`RtpDecodeError` only."""
        hlen = rtp_header_length(data)
        b0, b1, seq, ts, ssrc = _FIXED.unpack_from(data, 0)
        cc = b0 & 0x0F
        csrcs = struct.unpack_from(f"!{cc}I", data, 12) if cc else ()
        profile: int | None = None
        ext = b""
        if b0 & 0x10:
            at = 12 + 4 * cc
            profile = _EXT_HEADER.unpack_from(data, at)[0]
            ext = data[at + 4 : hlen]
        end = len(data)
        padding = b""
        if b0 & 0x20:
            if end == hlen:
                raise RtpDecodeError("RTP padding bit set but no padding byte")
            count = data[end - 1]
            if count == 0 or count > end - hlen:
                raise RtpDecodeError(f"RTP padding count {count} is invalid")
            padding = data[end - count :]
            end -= count
        return cls(
            payload_type=b1 & 0x7F,
            sequence_number=seq,
            timestamp=ts,
            ssrc=ssrc,
            marker=bool(b1 & 0x80),
            csrcs=tuple(csrcs),
            extension_profile=profile,
            extension_data=ext,
            payload=data[hlen:end],
            padding=padding,
        )

    def serialize(self) -> bytes:
        if not 0 <= self.payload_type <= 127:
            raise ValueError(f"payload type out of range: {self.payload_type}")
        if not (
            0 <= self.sequence_number <= 0xFFFF
            and 0 <= self.timestamp <= 0xFFFFFFFF
            and 0 <= self.ssrc <= 0xFFFFFFFF
            and all(0 <= c <= 0xFFFFFFFF for c in self.csrcs)
        ):
            raise ValueError("RTP header field out of range")
        if self.extension_profile is not None and not 0 <= self.extension_profile <= 0xFFFF:
            raise ValueError("extension profile out of range")
        if len(self.csrcs) > 15:
            raise ValueError("at most 15 CSRCs")
        if self.padding and (self.padding[-1] != len(self.padding)):
            raise ValueError("the last padding byte must count the padding bytes")
        if len(self.extension_data) % 4 or len(self.extension_data) > 0xFFFF * 4:
            raise ValueError("extension data must be a multiple of 4 bytes, at most 262140")
        b0 = 0x80 | len(self.csrcs)
        if self.padding:
            b0 |= 0x20
        if self.extension_profile is not None:
            b0 |= 0x10
        b1 = (0x80 if self.marker else 0) | self.payload_type
        out = [
            _FIXED.pack(b0, b1, self.sequence_number, self.timestamp, self.ssrc),
            struct.pack(f"!{len(self.csrcs)}I", *self.csrcs),
        ]
        if self.extension_profile is not None:
            out.append(_EXT_HEADER.pack(self.extension_profile, len(self.extension_data) // 4))
            out.append(self.extension_data)
        out.append(self.payload)
        out.append(self.padding)
        return b"".join(out)
