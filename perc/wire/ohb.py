"""Original Header Block codec (RFC 8723 §4; SPEC.md 4.3, decision D12).

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

:func:`decode_ohb` is the one parser of untrusted OHB bytes and raises only
:class:`OhbDecodeError`. :func:`update_ohb` is the Media Distributor's §5.2 rule for growing
and shrinking the block when it rewrites header fields.
"""

from __future__ import annotations

import attrs

from perc.wire.errors import DecodeError

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
        out = bytearray()
        if self.payload_type is not None:
            out.append(self.payload_type)
        if self.sequence_number is not None:
            out += self.sequence_number.to_bytes(2, "big")
        out.append(self.config)
        return bytes(out)

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


def decode_ohb(data: bytes | bytearray | memoryview) -> tuple[Ohb, int]:
    """Parse the OHB at the end of ``data`` (an outer plaintext), backwards from its last byte.

    Returns the block and its length in bytes, so ``data[:-length]`` is what precedes it
    (the inner ciphertext and inner tag). Raises :class:`OhbDecodeError` only.
    """
    end = len(data)
    if end == 0:
        raise OhbDecodeError("no room for an OHB: empty outer plaintext")
    config = data[end - 1]
    length = ohb_length_untrusted(config)
    if length > end:
        raise OhbDecodeError(f"OHB of {length} bytes does not fit in {end} bytes")
    pos = end - length
    payload_type: int | None = None
    sequence_number: int | None = None
    if config & OHB_P:
        payload_type = data[pos]
        if payload_type & 0x80:
            # The PT octet holds a 7-bit payload type (SPEC 4.3); a set high bit is garbage.
            raise OhbDecodeError(f"OHB payload type byte {payload_type:#04x} has the high bit set")
        pos += 1
    if config & OHB_Q:
        sequence_number = (data[pos] << 8) | data[pos + 1]
    marker: bool | None = None
    if config & OHB_M:
        marker = bool(config & OHB_B)
    return Ohb(payload_type, sequence_number, marker), length


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
    pt = ohb.payload_type
    if new_payload_type is not None and new_payload_type != current_payload_type:
        if pt is None:
            pt = current_payload_type
        elif new_payload_type == pt:
            pt = None
    seq = ohb.sequence_number
    if new_sequence_number is not None and new_sequence_number != current_sequence_number:
        if seq is None:
            seq = current_sequence_number
        elif new_sequence_number == seq:
            seq = None
    m = ohb.marker
    if new_marker is not None and new_marker != current_marker:
        if m is None:
            m = current_marker
        elif new_marker == m:
            m = None
    if pt == ohb.payload_type and seq == ohb.sequence_number and m == ohb.marker:
        return ohb
    return Ohb(pt, seq, m)
