"""Original Header Block codec (RFC 8723 §4; decision D12).

The OHB is the last 1-4 bytes of the outer (hop-by-hop) plaintext of a double-encrypted SRTP
packet. It records the original values of the only header fields a Media Distributor may
change (PT, SEQ, marker bit), so the receiver can rebuild the inner (end-to-end) AAD::

    OHB    = [ PT ] [ SEQ ] Config          (ABNF order, Config is the LAST byte)
    Config = R R R R B M P Q                (MSB first)
             Q 0x01  SEQ present (2 bytes, network order)
             P 0x02  PT present (1 byte, 7-bit payload type, high bit 0)
             M 0x04  marker bit recorded
             B 0x08  original marker value (only meaningful with M)
             R 0xF0  reserved, MUST be 0

Because the OHB sits at the end of the payload and its length is given by its last byte,
it is parsed backwards from the end of the outer plaintext. RFC 8723 §4 forbids ``B`` without
``M``; the RFC's text says "``C & 0x0C`` MUST NOT be ``0x80``", a typo for ``0x08`` (D12).

:func:`decode_ohb` (and its object-free twin :func:`decode_ohb_fields`, for hot paths) is
the one parser of untrusted OHB bytes and raises only :class:`OhbDecodeError`.
:func:`update_ohb` / :func:`update_ohb_fields` are the Media Distributor's §5.2 rule for
growing and shrinking the block when it rewrites header fields; :meth:`Ohb.encode` /
:func:`encode_ohb_fields` write it.
"""

from __future__ import annotations

from typing import TypeVar

import attrs

from perc.wire.errors import DecodeError

T = TypeVar("T", int, bool)

OHB_Q = 0x01
OHB_P = 0x02
OHB_M = 0x04
OHB_B = 0x08
OHB_R = 0xF0

#: The empty OHB a sender appends (RFC 8723 §5.1 step 5): nothing was modified.
EMPTY_OHB = b"\x00"

# Total OHB length indexed by (Config & 0x03): Config byte + PT byte if P + 2 SEQ bytes if Q.
_LENGTH_BY_PQ = (1, 3, 2, 4)  # index 1 = Q only (SEQ), 2 = P only (PT)


class OhbDecodeError(DecodeError):
    """The bytes at the end of an outer plaintext are not a valid Original Header Block."""


@attrs.frozen
class Ohb:
    """The recorded original header values; ``None`` means "not recorded" (unchanged)."""

    payload_type: int | None = None
    sequence_number: int | None = None
    marker: bool | None = None

    def __attrs_post_init__(self) -> None:
        # Local misuse, not peer input: constructing an OHB that cannot be encoded.
        if self.payload_type is not None and not 0 <= self.payload_type <= 0x7F:
            raise ValueError(f"payload type {self.payload_type} outside 0..127")
        if self.sequence_number is not None and not 0 <= self.sequence_number <= 0xFFFF:
            raise ValueError(f"sequence number {self.sequence_number} outside 0..65535")

    @property
    def empty(self) -> bool:
        return self.payload_type is None and self.sequence_number is None and self.marker is None

    @property
    def config(self) -> int:
        c = 0
        if self.sequence_number is not None:
            c |= OHB_Q
        if self.payload_type is not None:
            c |= OHB_P
        if self.marker is not None:
            c |= OHB_M
            if self.marker:
                c |= OHB_B
        return c

    def encode(self) -> bytes:
        """The wire bytes: ``[PT] [SEQ] Config``."""
        return encode_ohb_fields(self.payload_type, self.sequence_number, self.marker)

    def __len__(self) -> int:
        return _LENGTH_BY_PQ[self.config & 0x03]


EMPTY = Ohb()


def ohb_length_untrusted(config: int) -> int:
    """Length of the OHB whose last (Config) byte is ``config``; validates the Config byte."""
    if config & OHB_R:
        raise OhbDecodeError(f"OHB config {config:#04x} has reserved bits set")
    if (config & 0x0C) == OHB_B:
        # RFC 8723 §4 (D12): B may only be set together with M.
        raise OhbDecodeError(f"OHB config {config:#04x} has B set without M")
    return _LENGTH_BY_PQ[config & 0x03]


def decode_ohb_fields(
    data: bytes | bytearray | memoryview, start: int = 0
) -> tuple[int | None, int | None, bool | None, int]:
    """:func:`decode_ohb` without objects, for hot paths: ``(pt, seq, marker, length)``.

    The OHB must lie within ``data[start:]`` (``start`` = where the outer payload begins).
    """
    end = len(data)
    if end <= start:
        raise OhbDecodeError("no room for an OHB: empty outer plaintext")
    config = data[end - 1]
    length = ohb_length_untrusted(config)
    if length > end - start:
        raise OhbDecodeError(f"OHB of {length} bytes does not fit in {end - start} bytes")
    pos = end - length
    payload_type: int | None = None
    sequence_number: int | None = None
    if config & OHB_P:
        payload_type = data[pos]
        if payload_type & 0x80:
            # The PT octet holds a 7-bit payload type (RFC 8723 §4); a set high bit is garbage.
            raise OhbDecodeError(f"OHB payload type byte {payload_type:#04x} has the high bit set")
        pos += 1
    if config & OHB_Q:
        sequence_number = (data[pos] << 8) | data[pos + 1]
    marker: bool | None = None
    if config & OHB_M:
        marker = bool(config & OHB_B)
    return payload_type, sequence_number, marker, length


def decode_ohb(data: bytes | bytearray | memoryview) -> tuple[Ohb, int]:
    """Parse the OHB at the end of ``data`` (an outer plaintext), backwards from its last byte.

    Returns the block and its length in bytes, so ``data[:-length]`` is what precedes it
    (the inner ciphertext and inner tag). Raises :class:`OhbDecodeError` only.
    """
    pt, seq, marker, length = decode_ohb_fields(data)
    return Ohb(pt, seq, marker), length


def encode_ohb_fields(pt: int | None, seq: int | None, marker: bool | None) -> bytes:
    """The wire bytes ``[PT] [SEQ] Config`` of the given recorded fields (None = absent)."""
    if pt is None and seq is None:
        if marker is None:
            return EMPTY_OHB
        return b"\x0c" if marker else b"\x04"
    config = 0
    out = bytearray()
    if pt is not None:
        out.append(pt)
        config |= OHB_P
    if seq is not None:
        out += seq.to_bytes(2, "big")
        config |= OHB_Q
    if marker is not None:
        config |= OHB_M | (OHB_B if marker else 0)
    out.append(config)
    return bytes(out)


def _update_field(recorded: T | None, current: T, new: T | None) -> T | None:
    if new is None or new == current:
        return recorded  # not changed: MUST NOT modify the OHB
    if recorded is None:
        return current  # changed, not yet recorded: record the original (grow)
    if new == recorded:
        return None  # set back to the original: remove it (shrink, the RFC's SHOULD)
    return recorded  # already recorded by an earlier MD: leave it


def update_ohb_fields(
    recorded: tuple[int | None, int | None, bool | None],
    current: tuple[int, int, bool],
    new: tuple[int | None, int | None, bool | None],
) -> tuple[int | None, int | None, bool | None]:
    """:func:`update_ohb` on plain ``(pt, seq, marker)`` tuples (hot path of the MD)."""
    return (
        _update_field(recorded[0], current[0], new[0]),
        _update_field(recorded[1], current[1], new[1]),
        _update_field(recorded[2], current[2], new[2]),
    )


def update_ohb(
    ohb: Ohb,
    *,
    current_payload_type: int,
    current_sequence_number: int,
    current_marker: bool,
    new_payload_type: int | None = None,
    new_sequence_number: int | None = None,
    new_marker: bool | None = None,
) -> Ohb:
    """RFC 8723 §5.2 step 3: the OHB after a Media Distributor changes header fields.

    ``current_*`` are the values in the header the MD received, ``new_*`` the values it will
    send (``None`` = leave the field alone). For each field:

    * changed and not yet in the OHB: record the *current* value (it is the original, since
      no earlier MD changed it) -- the OHB grows;
    * set back to the value the OHB records as original: remove it -- the OHB shrinks
      (the RFC's SHOULD);
    * otherwise the OHB entry is left exactly as it was, so a later MD in a cascade never
      overwrites the first MD's record.
    """
    old = (ohb.payload_type, ohb.sequence_number, ohb.marker)
    pt, seq, m = update_ohb_fields(
        old,
        (current_payload_type, current_sequence_number, current_marker),
        (new_payload_type, new_sequence_number, new_marker),
    )
    if (pt, seq, m) == old:
        return ohb
    return Ohb(pt, seq, m)
