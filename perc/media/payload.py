"""The synthetic media payload: who sent it, which stream, which packet, and a checksum.

perc's endpoints send no real audio or video. Each RTP payload instead says who made it and
carries enough redundancy that a receiver can prove that what came out of the end-to-end
(inner) decryption is byte for byte what the named sender put in: the point of the
conference is to show that the double transform (RFC 8723) and EKT (RFC 8870) deliver the
sender's plaintext across a Media Distributor that never holds the end-to-end keys.

Wire layout (all integers big-endian)::

    magic      4   b"PRCM"
    version    1   1
    kind       1   0 audio, 1 video (:class:`StreamKind`)
    flags      1   bit 0: key frame; bit 1: last packet of a video frame
    name_len   1   1..64
    name       name_len bytes of UTF-8: the sender's endpoint name
    seq        4   stream sequence number: 0 for the stream's first packet, +1 per packet
    frame      4   video frame number (audio: equal to seq)
    filler     F   F >= 0 bytes, a pure function of (name, kind, seq): see below
    checksum   16  SHA-256 of every byte above, first 16 bytes

The filler pads the payload to the configured size (160 bytes for audio). It is the 32-byte
block ``SHA-256(b"perc filler" | name_len | name | kind | seq)`` repeated and cut to F bytes,
so the receiver can regenerate it from the header alone and compare.

The checksum is not a security mechanism: the inner AEAD tag already authenticates the
payload end to end. It is a self-check that guards against perc's own bugs (a wrong slice,
a stale buffer, padding removed twice) that would otherwise pass unnoticed because the AEAD
would faithfully protect wrong bytes. Hashes come from ``cryptography``.

API
---
``StreamKind``; ``Payload`` (the decoded header); ``build_payload(name, kind, seq, size, *,
frame=None, keyframe=False, end_of_frame=False) -> bytes``; ``parse_payload(data) -> Payload``
(untrusted input: checks the layout, the checksum and the filler; raises
:class:`PayloadDecodeError` and nothing else); ``minimum_payload_size(name)``.
Local misuse (a name that does not fit, a size too small) raises :class:`PayloadUsageError`.
"""

from __future__ import annotations

import enum
import hmac
import struct

import attrs
from cryptography.hazmat.primitives import hashes

from perc.wire.errors import DecodeError

__all__ = [
    "CHECKSUM_LENGTH",
    "MAX_NAME_LENGTH",
    "Payload",
    "PayloadDecodeError",
    "PayloadUsageError",
    "StreamKind",
    "build_payload",
    "minimum_payload_size",
    "parse_payload",
]

MAGIC = b"PRCM"
VERSION = 1
MAX_NAME_LENGTH = 64
CHECKSUM_LENGTH = 16
_FLAG_KEYFRAME = 0x01
_FLAG_END_OF_FRAME = 0x02
_HEAD = struct.Struct("!4sBBBB")  # magic, version, kind, flags, name_len
_COUNTERS = struct.Struct("!II")  # seq, frame
_FIXED = _HEAD.size + _COUNTERS.size + CHECKSUM_LENGTH
#: an empty SHA-256 context: copying it skips the algorithm checks of a fresh ``Hash``
_SHA256_EMPTY = hashes.Hash(hashes.SHA256())


class StreamKind(enum.IntEnum):
    AUDIO = 0
    VIDEO = 1


class PayloadDecodeError(DecodeError):
    """A decrypted payload is not a well-formed perc payload, or its checksum/filler is wrong."""


class PayloadUsageError(ValueError):
    """Local misuse: a sender name that does not fit, or a size below the minimum."""


@attrs.frozen(slots=True)
class Payload:
    """The verified contents of one payload (the filler and checksum are not kept)."""

    name: str
    kind: StreamKind
    seq: int
    frame: int
    keyframe: bool
    end_of_frame: bool
    size: int


def _sha256(data: bytes) -> bytes:
    h = _SHA256_EMPTY.copy()
    h.update(data)
    return h.finalize()


def _filler(name_field: bytes, kind: int, seq: int, length: int) -> bytes:
    if length <= 0:
        return b""
    block = _sha256(b"perc filler" + name_field + bytes((kind,)) + seq.to_bytes(4, "big"))
    reps = -(-length // 32)
    return (block * reps)[:length]


def _encode_name(name: str) -> bytes:
    raw = name.encode("utf-8")
    if not 1 <= len(raw) <= MAX_NAME_LENGTH:
        raise PayloadUsageError(f"sender name must be 1..{MAX_NAME_LENGTH} bytes of UTF-8")
    return raw


def minimum_payload_size(name: str) -> int:
    """The smallest payload (no filler) that can carry ``name``."""
    return _FIXED + len(_encode_name(name))


def build_payload(
    name: str,
    kind: StreamKind,
    seq: int,
    size: int,
    *,
    frame: int | None = None,
    keyframe: bool = False,
    end_of_frame: bool = False,
) -> bytes:
    """A payload of exactly ``size`` bytes for packet ``seq`` of ``name``'s ``kind`` stream."""
    raw = _encode_name(name)
    if not 0 <= seq <= 0xFFFFFFFF:
        raise PayloadUsageError(f"stream sequence number out of range: {seq}")
    if frame is None:
        frame = seq
    if not 0 <= frame <= 0xFFFFFFFF:
        raise PayloadUsageError(f"frame number out of range: {frame}")
    fill = size - _FIXED - len(raw)
    if fill < 0:
        raise PayloadUsageError(f"payload size {size} below the minimum {_FIXED + len(raw)}")
    flags = (_FLAG_KEYFRAME if keyframe else 0) | (_FLAG_END_OF_FRAME if end_of_frame else 0)
    name_field = bytes((len(raw),)) + raw
    body = (
        _HEAD.pack(MAGIC, VERSION, int(kind), flags, len(raw))
        + raw
        + _COUNTERS.pack(seq, frame)
        + _filler(name_field, int(kind), seq, fill)
    )
    return body + _sha256(body)[:CHECKSUM_LENGTH]


def parse_payload(data: bytes) -> Payload:
    """Decode and verify an untrusted payload; any defect is :class:`PayloadDecodeError`."""
    n = len(data)
    if n < _FIXED + 1:
        raise PayloadDecodeError(f"payload of {n} bytes is shorter than the minimum")
    magic, version, kind, flags, name_len = _HEAD.unpack_from(data, 0)
    if magic != MAGIC:
        raise PayloadDecodeError("not a perc payload (magic)")
    if version != VERSION:
        raise PayloadDecodeError(f"unknown payload version {version}")
    if kind > 1:
        raise PayloadDecodeError(f"unknown stream kind {kind}")
    if flags & ~(_FLAG_KEYFRAME | _FLAG_END_OF_FRAME):
        raise PayloadDecodeError(f"unknown flags {flags:#x}")
    if not 1 <= name_len <= MAX_NAME_LENGTH:
        raise PayloadDecodeError(f"name length {name_len} out of range")
    at = _HEAD.size + name_len
    fill = n - _FIXED - name_len
    if fill < 0:
        raise PayloadDecodeError("payload shorter than its name says")
    body_end = n - CHECKSUM_LENGTH
    # Checksum first: everything after it may rely on the bytes being what the sender made.
    if not hmac.compare_digest(_sha256(data[:body_end])[:CHECKSUM_LENGTH], data[body_end:]):
        raise PayloadDecodeError("payload checksum mismatch")
    raw = data[_HEAD.size : at]
    try:
        name = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise PayloadDecodeError("sender name is not UTF-8") from None
    seq, frame = _COUNTERS.unpack_from(data, at)
    filler = data[at + _COUNTERS.size : body_end]
    if filler != _filler(data[_HEAD.size - 1 : at], kind, seq, fill):
        raise PayloadDecodeError("payload filler does not match (name, seq)")
    return Payload(
        name=name,
        kind=StreamKind(kind),
        seq=seq,
        frame=frame,
        keyframe=bool(flags & _FLAG_KEYFRAME),
        end_of_frame=bool(flags & _FLAG_END_OF_FRAME),
        size=n,
    )
