"""RTCP compound packet codec (RFC 3550 §6, RFC 4585 §6, RFC 5104 §4.3.1), for untrusted input.

Every RTCP packet starts with the same 4 bytes (RFC 3550 §6.4.1)::

    V(2)=2 | P(1) | count(5)   PT(8)   length(16): packet length in 32-bit words minus one

``count`` is the report count (SR, RR), source count (SDES, BYE) or the feedback message
type FMT (RTPFB, PSFB). A compound packet is a concatenation of such packets; the lengths
must add up exactly. With P set, the last byte of that packet counts the padding bytes at
its end, itself included.

Packet bodies (after the 4-byte header):

- SR (200): sender SSRC, NTP timestamp (64), RTP timestamp, packet count, octet count, then
  ``count`` report blocks of 24 bytes, then an optional profile-specific extension.
- RR (201): sender SSRC, ``count`` report blocks, optional extension.
  Report block: SSRC, fraction lost (8), cumulative lost (24, signed), extended highest
  SEQ, jitter, LSR, DLSR.
- SDES (202): ``count`` chunks, each 32-bit aligned: SSRC, items ``type(8) len(8) text``,
  ended by a zero type octet and zero padding to the next 32-bit boundary.
- BYE (203): ``count`` SSRCs, then optionally ``len(8) reason`` zero-padded to 32 bits.
- RTPFB (205) / PSFB (206) (RFC 4585 §6.1): sender SSRC, media SSRC, FCI. Decoded further:
  Generic NACK (RTPFB FMT 1, FCI = ``PID(16) BLP(16)`` pairs), PLI (PSFB FMT 1, no FCI), FIR
  (PSFB FMT 4, RFC 5104: FCI = ``SSRC(32) seq(8) reserved(24)`` entries). Other FMTs are kept
  as :class:`RtpFeedback` / :class:`PayloadFeedback` with raw FCI.
- Anything else (APP 204, XR 207, unknown types) is kept as :class:`UnknownRtcp` with its raw
  body, so routing and rewriting never lose a packet.

API: :func:`parse_rtcp` (compound bytes -> list of packet objects), :func:`serialize_rtcp`
(the reverse; each object also has ``serialize()``), :func:`peek_rtcp` (type and sender SSRC
of the first packet without building objects); for routing, :func:`sender_ssrc` and
:func:`media_ssrcs` (the sources a packet is about). ``parse_rtcp`` raises :class:`RtcpDecodeError`
and nothing else. It does not enforce the RFC 3550 §6.1 compound rules (SR/RR first, CNAME
present), so reduced-size RTCP (RFC 5506) passes; padding is removed on parse and never
written (SRTCP does not need it). Out-of-range fields when serializing raise ``ValueError``.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from typing import TypeAlias

import attrs

from perc.wire.errors import DecodeError

__all__ = [
    "APP",
    "BYE",
    "PSFB",
    "RR",
    "RTPFB",
    "SDES",
    "SR",
    "Bye",
    "Fir",
    "Nack",
    "PayloadFeedback",
    "Pli",
    "ReceiverReport",
    "ReportBlock",
    "RtcpDecodeError",
    "RtcpPacket",
    "RtpFeedback",
    "SdesChunk",
    "SdesItem",
    "SenderReport",
    "SourceDescription",
    "UnknownRtcp",
    "media_ssrcs",
    "parse_rtcp",
    "peek_rtcp",
    "sender_ssrc",
    "serialize_rtcp",
]

SR, RR, SDES, BYE, APP, RTPFB, PSFB = 200, 201, 202, 203, 204, 205, 206
FMT_NACK = 1  # RFC 4585 §6.2.1
FMT_PLI = 1  # RFC 4585 §6.3.1
FMT_FIR = 4  # RFC 5104 §4.3.1

_HEADER = struct.Struct("!BBH")
_U32 = struct.Struct("!I")
_SR_INFO = struct.Struct("!IQIII")
_BLOCK = struct.Struct("!IB3sIIII")
_TWO_U32 = struct.Struct("!II")
_NACK_ITEM = struct.Struct("!HH")
_FIR_ITEM = struct.Struct("!IB3x")


class RtcpDecodeError(DecodeError):
    """Untrusted bytes are not a well-formed RTCP (compound) packet."""


def _header(packet_type: int, count: int, body: bytes) -> bytes:
    if not 0 <= count <= 31:
        raise ValueError(f"RTCP count/FMT out of range: {count}")
    if len(body) % 4:
        raise ValueError("RTCP body must be a multiple of 4 bytes")
    words = len(body) // 4
    if words > 0xFFFF:
        raise ValueError("RTCP packet too long")
    return _HEADER.pack(0x80 | count, packet_type, words) + body


def _u32(value: int) -> bytes:
    if not 0 <= value <= 0xFFFFFFFF:
        raise ValueError(f"32-bit field out of range: {value}")
    return _U32.pack(value)


@attrs.frozen
class ReportBlock:
    """RFC 3550 §6.4.1 reception report block."""

    ssrc: int
    fraction_lost: int = 0
    packets_lost: int = 0  # cumulative, signed 24-bit
    highest_sequence: int = 0
    jitter: int = 0
    lsr: int = 0
    dlsr: int = 0

    @classmethod
    def _parse(cls, data: bytes, at: int) -> ReportBlock:
        ssrc, fraction, lost, highest, jitter, lsr, dlsr = _BLOCK.unpack_from(data, at)
        return cls(
            ssrc, fraction, int.from_bytes(lost, "big", signed=True), highest, jitter, lsr, dlsr
        )

    def serialize(self) -> bytes:
        if not 0 <= self.fraction_lost <= 0xFF:
            raise ValueError("fraction lost out of range")
        if not -(1 << 23) <= self.packets_lost < (1 << 23):
            raise ValueError("cumulative packets lost out of the signed 24-bit range")
        try:
            return _BLOCK.pack(
                self.ssrc,
                self.fraction_lost,
                self.packets_lost.to_bytes(3, "big", signed=True),
                self.highest_sequence,
                self.jitter,
                self.lsr,
                self.dlsr,
            )
        except struct.error as exc:
            raise ValueError(f"report block field out of range: {exc}") from None


def _parse_blocks(body: bytes, at: int, count: int) -> tuple[tuple[ReportBlock, ...], bytes]:
    end = at + 24 * count
    if end > len(body):
        raise RtcpDecodeError(f"{count} report blocks do not fit the packet")
    blocks = tuple(ReportBlock._parse(body, at + 24 * i) for i in range(count))
    return blocks, body[end:]


@attrs.frozen
class SenderReport:
    """RFC 3550 §6.4.1 SR."""

    ssrc: int
    ntp_timestamp: int = 0
    rtp_timestamp: int = 0
    packet_count: int = 0
    octet_count: int = 0
    reports: tuple[ReportBlock, ...] = ()
    extension: bytes = b""  # profile-specific extension, a multiple of 4 bytes

    @classmethod
    def _parse(cls, count: int, body: bytes) -> SenderReport:
        if len(body) < 24:
            raise RtcpDecodeError("SR shorter than its sender info")
        ssrc, ntp, rtp_ts, packets, octets = _SR_INFO.unpack_from(body, 0)
        blocks, extension = _parse_blocks(body, 24, count)
        return cls(ssrc, ntp, rtp_ts, packets, octets, blocks, extension)

    def serialize(self) -> bytes:
        try:
            info = _SR_INFO.pack(
                self.ssrc,
                self.ntp_timestamp,
                self.rtp_timestamp,
                self.packet_count,
                self.octet_count,
            )
        except struct.error as exc:
            raise ValueError(f"SR field out of range: {exc}") from None
        blocks = b"".join(b.serialize() for b in self.reports)
        return _header(SR, len(self.reports), info + blocks + self.extension)


@attrs.frozen
class ReceiverReport:
    """RFC 3550 §6.4.2 RR."""

    ssrc: int
    reports: tuple[ReportBlock, ...] = ()
    extension: bytes = b""

    @classmethod
    def _parse(cls, count: int, body: bytes) -> ReceiverReport:
        if len(body) < 4:
            raise RtcpDecodeError("RR shorter than its sender SSRC")
        blocks, extension = _parse_blocks(body, 4, count)
        return cls(_U32.unpack_from(body, 0)[0], blocks, extension)

    def serialize(self) -> bytes:
        blocks = b"".join(b.serialize() for b in self.reports)
        return _header(RR, len(self.reports), _u32(self.ssrc) + blocks + self.extension)


@attrs.frozen
class SdesItem:
    """One SDES item: type 1 CNAME, 2 NAME, ... 8 PRIV (RFC 3550 §6.5)."""

    type: int
    value: bytes


@attrs.frozen
class SdesChunk:
    ssrc: int
    items: tuple[SdesItem, ...] = ()


@attrs.frozen
class SourceDescription:
    """RFC 3550 §6.5 SDES."""

    chunks: tuple[SdesChunk, ...] = ()

    @classmethod
    def _parse(cls, count: int, body: bytes) -> SourceDescription:
        chunks = []
        pos, n = 0, len(body)
        for _ in range(count):
            if pos + 4 > n:
                raise RtcpDecodeError("SDES chunk SSRC runs past the packet")
            ssrc = _U32.unpack_from(body, pos)[0]
            pos += 4
            items = []
            while True:
                if pos >= n:
                    raise RtcpDecodeError("SDES item list not terminated")
                item_type = body[pos]
                if item_type == 0:
                    end = (pos + 4) & ~3  # the null octet, then zeros to the next boundary
                    if end > n or any(body[pos:end]):
                        raise RtcpDecodeError("SDES chunk padding is missing or not zero")
                    pos = end
                    break
                if pos + 2 > n:
                    raise RtcpDecodeError("SDES item header runs past the packet")
                length = body[pos + 1]
                if pos + 2 + length > n:
                    raise RtcpDecodeError("SDES item runs past the packet")
                items.append(SdesItem(item_type, body[pos + 2 : pos + 2 + length]))
                pos += 2 + length
            chunks.append(SdesChunk(ssrc, tuple(items)))
        if pos != n:
            raise RtcpDecodeError("trailing bytes after the SDES chunks")
        return cls(tuple(chunks))

    def serialize(self) -> bytes:
        out = bytearray()
        for chunk in self.chunks:
            out += _u32(chunk.ssrc)
            for item in chunk.items:
                if not 1 <= item.type <= 255 or len(item.value) > 255:
                    raise ValueError("SDES item type must be 1-255 and its value at most 255 bytes")
                out += bytes((item.type, len(item.value))) + item.value
            out += bytes(4 - len(out) % 4)  # the null item, then zero padding (1-4 bytes)
        return _header(SDES, len(self.chunks), bytes(out))


@attrs.frozen
class Bye:
    """RFC 3550 §6.6 BYE."""

    ssrcs: tuple[int, ...] = ()
    reason: bytes | None = None

    @classmethod
    def _parse(cls, count: int, body: bytes) -> Bye:
        n = len(body)
        if 4 * count > n:
            raise RtcpDecodeError("BYE SSRC list runs past the packet")
        ssrcs = struct.unpack_from(f"!{count}I", body, 0)
        pos = 4 * count
        reason = None
        if pos < n:
            length = body[pos]
            end = pos + 1 + length
            padded = (end + 3) & ~3
            if padded != n or any(body[end:padded]):
                raise RtcpDecodeError("BYE reason length does not match the packet")
            reason = body[pos + 1 : end]
        return cls(tuple(ssrcs), reason)

    def serialize(self) -> bytes:
        out = b"".join(_u32(s) for s in self.ssrcs)
        if self.reason is not None:
            if len(self.reason) > 255:
                raise ValueError("BYE reason longer than 255 bytes")
            text = bytes((len(self.reason),)) + self.reason
            out += text + bytes(-len(text) % 4)
        return _header(BYE, len(self.ssrcs), out)


@attrs.frozen
class RtpFeedback:
    """RFC 4585 §6.1 transport-layer feedback (RTPFB) of a FMT perc does not decode."""

    fmt: int
    sender_ssrc: int
    media_ssrc: int
    fci: bytes = b""

    def serialize(self) -> bytes:
        return _header(RTPFB, self.fmt, _u32(self.sender_ssrc) + _u32(self.media_ssrc) + self.fci)


@attrs.frozen
class PayloadFeedback:
    """RFC 4585 §6.1 payload-specific feedback (PSFB) of a FMT perc does not decode."""

    fmt: int
    sender_ssrc: int
    media_ssrc: int
    fci: bytes = b""

    def serialize(self) -> bytes:
        return _header(PSFB, self.fmt, _u32(self.sender_ssrc) + _u32(self.media_ssrc) + self.fci)


@attrs.frozen
class Nack:
    """RFC 4585 §6.2.1 Generic NACK: ``items`` are (PID, BLP) pairs as on the wire."""

    sender_ssrc: int
    media_ssrc: int
    items: tuple[tuple[int, int], ...] = ()

    def lost(self) -> tuple[int, ...]:
        """Every sequence number the NACK reports lost, in wire order."""
        out = []
        for pid, blp in self.items:
            out.append(pid)
            out.extend((pid + i + 1) & 0xFFFF for i in range(16) if blp >> i & 1)
        return tuple(out)

    @classmethod
    def from_lost(cls, sender_ssrc: int, media_ssrc: int, lost: Iterable[int]) -> Nack:
        """Pack sequence numbers into as few (PID, BLP) pairs as a single pass allows."""
        items: list[list[int]] = []
        for seq in lost:
            if not 0 <= seq <= 0xFFFF:
                raise ValueError(f"sequence number out of range: {seq}")
            for item in items:
                d = (seq - item[0]) & 0xFFFF
                if d == 0:
                    break
                if 1 <= d <= 16:
                    item[1] |= 1 << (d - 1)
                    break
            else:
                items.append([seq, 0])
        return cls(sender_ssrc, media_ssrc, tuple((p, b) for p, b in items))

    def serialize(self) -> bytes:
        try:
            fci = b"".join(_NACK_ITEM.pack(pid, blp) for pid, blp in self.items)
        except struct.error as exc:
            raise ValueError(f"NACK item out of range: {exc}") from None
        return _header(RTPFB, FMT_NACK, _u32(self.sender_ssrc) + _u32(self.media_ssrc) + fci)


@attrs.frozen
class Pli:
    """RFC 4585 §6.3.1 Picture Loss Indication."""

    sender_ssrc: int
    media_ssrc: int

    def serialize(self) -> bytes:
        return _header(PSFB, FMT_PLI, _u32(self.sender_ssrc) + _u32(self.media_ssrc))


@attrs.frozen
class Fir:
    """RFC 5104 §4.3.1 Full Intra Request: ``entries`` are (SSRC, command sequence number)."""

    sender_ssrc: int
    media_ssrc: int = 0  # RFC 5104: SHALL be 0
    entries: tuple[tuple[int, int], ...] = ()

    def serialize(self) -> bytes:
        try:
            fci = b"".join(_FIR_ITEM.pack(ssrc, seq) for ssrc, seq in self.entries)
        except struct.error as exc:
            raise ValueError(f"FIR entry out of range: {exc}") from None
        return _header(PSFB, FMT_FIR, _u32(self.sender_ssrc) + _u32(self.media_ssrc) + fci)


@attrs.frozen
class UnknownRtcp:
    """An RTCP packet perc does not decode (APP, XR, ...), kept whole (padding removed)."""

    packet_type: int
    count: int
    body: bytes

    def serialize(self) -> bytes:
        if not 0 <= self.packet_type <= 255:
            raise ValueError("packet type out of range")
        return _header(self.packet_type, self.count, self.body)


RtcpPacket: TypeAlias = (
    SenderReport
    | ReceiverReport
    | SourceDescription
    | Bye
    | Nack
    | Pli
    | Fir
    | RtpFeedback
    | PayloadFeedback
    | UnknownRtcp
)


def _parse_feedback(packet_type: int, fmt: int, body: bytes) -> RtcpPacket:
    if len(body) < 8:
        raise RtcpDecodeError("feedback message shorter than its two SSRCs")
    sender, media = _TWO_U32.unpack_from(body, 0)
    fci = body[8:]
    if packet_type == RTPFB:
        if fmt == FMT_NACK:
            if len(fci) % 4:
                raise RtcpDecodeError("NACK FCI is not a whole number of items")
            items = tuple(_NACK_ITEM.unpack_from(fci, i) for i in range(0, len(fci), 4))
            return Nack(sender, media, items)
        return RtpFeedback(fmt, sender, media, fci)
    if fmt == FMT_PLI and not fci:
        return Pli(sender, media)
    if fmt == FMT_FIR:
        if len(fci) % 8:
            raise RtcpDecodeError("FIR FCI is not a whole number of entries")
        entries = tuple(_FIR_ITEM.unpack_from(fci, i) for i in range(0, len(fci), 8))
        return Fir(sender, media, entries)
    return PayloadFeedback(fmt, sender, media, fci)


def parse_rtcp(data: bytes) -> list[RtcpPacket]:
    """Parse an RTCP compound packet from untrusted bytes (raises RtcpDecodeError only)."""
    out: list[RtcpPacket] = []
    pos, n = 0, len(data)
    if n == 0:
        raise RtcpDecodeError("empty RTCP packet")
    while pos < n:
        if pos + 4 > n:
            raise RtcpDecodeError("RTCP header runs past the compound packet")
        b0, packet_type, words = _HEADER.unpack_from(data, pos)
        if b0 & 0xC0 != 0x80:
            raise RtcpDecodeError(f"RTCP version {b0 >> 6}, expected 2")
        end = pos + 4 + 4 * words
        if end > n:
            raise RtcpDecodeError("RTCP length runs past the compound packet")
        body = data[pos + 4 : end]
        if b0 & 0x20:
            if not body or body[-1] == 0 or body[-1] > len(body):
                raise RtcpDecodeError("RTCP padding count is invalid")
            body = body[: len(body) - body[-1]]
        count = b0 & 0x1F
        packet: RtcpPacket
        if packet_type == SR:
            packet = SenderReport._parse(count, body)
        elif packet_type == RR:
            packet = ReceiverReport._parse(count, body)
        elif packet_type == SDES:
            packet = SourceDescription._parse(count, body)
        elif packet_type == BYE:
            packet = Bye._parse(count, body)
        elif packet_type in (RTPFB, PSFB):
            packet = _parse_feedback(packet_type, count, body)
        else:
            packet = UnknownRtcp(packet_type, count, body)
        out.append(packet)
        pos = end
    return out


def serialize_rtcp(packets: Iterable[RtcpPacket]) -> bytes:
    """Concatenate packets into one compound packet."""
    return b"".join(p.serialize() for p in packets)


def sender_ssrc(packet: RtcpPacket) -> int | None:
    """The SSRC that sent ``packet`` (SDES: first chunk, BYE: first SSRC; None if unknown)."""
    if isinstance(packet, (SenderReport, ReceiverReport)):
        return packet.ssrc
    if isinstance(packet, (Nack, Pli, Fir, RtpFeedback, PayloadFeedback)):
        return packet.sender_ssrc
    if isinstance(packet, SourceDescription):
        return packet.chunks[0].ssrc if packet.chunks else None
    if isinstance(packet, Bye):
        return packet.ssrcs[0] if packet.ssrcs else None
    return None


def media_ssrcs(packet: RtcpPacket) -> tuple[int, ...]:
    """The media sources ``packet`` reports on or asks something of: route it toward their
    senders. Report blocks of SR/RR, the media SSRC of feedback, the SSRCs of FIR entries
    (RFC 5104 §4.3.1: the FIR media SSRC field is 0). ``()`` for SDES, BYE and unknown types,
    which describe the sender itself."""
    if isinstance(packet, (SenderReport, ReceiverReport)):
        return tuple(block.ssrc for block in packet.reports)
    if isinstance(packet, Fir):
        return tuple(ssrc for ssrc, _ in packet.entries)
    if isinstance(packet, (Nack, Pli, RtpFeedback, PayloadFeedback)):
        return (packet.media_ssrc,)
    return ()


def peek_rtcp(data: bytes) -> tuple[int, int]:
    """``(packet_type, sender_ssrc)`` of the first packet, without building objects."""
    if len(data) < 8 or data[0] & 0xC0 != 0x80:
        raise RtcpDecodeError("not an RTCP version 2 packet")
    return data[1], _U32.unpack_from(data, 4)[0]
