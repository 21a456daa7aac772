"""The Media Distributor's hop-by-hop transform for double-encrypted SRTP (RFC 8723 §5.2).

The MD holds **only outer (hop-by-hop) keys**. This module must never import
``perc.srtp.ekt`` or ``perc.srtp.double``, directly or indirectly (a test checks it): the
MDD process never loads the code that unwraps EKT tags.

Theory of operation
-------------------
A packet from an endpoint (or an upstream MD) is::

    RTP header | outer AEAD( inner ciphertext | inner tag | OHB ) | outer tag | EKT field

:meth:`MediaDistributorHop.decrypt` runs once per incoming packet: it strips the trailing EKT
field by the last-byte rule of RFC 8870 §4.3.2 step 1 *as opaque bytes* (D11: the MD never
parses the ciphertext), reads the RTP header once, then verifies and decrypts the outer layer
with the sender's inbound :class:`~perc.srtp.context.SrtpSession` (outer replay check
included, RFC 8871 §4.4). The result, an :class:`Inbound`, keeps the parts apart as they were
found: the header (the outer AAD), the outer plaintext (inner ciphertext | inner tag | OHB),
SEQ, SSRC and the EKT field.

:meth:`MediaDistributorHop.encrypt_for` runs once per receiver: optionally rewrites PT, SEQ
and the marker bit, updating the OHB exactly as RFC 8723 §5.2 says (a changed field that is
not yet recorded gets its original value recorded, a field set back to its recorded original
is removed, everything else leaves the OHB alone, so in a cascade the first MD's record
survives), then encrypts the outer layer with that receiver's outbound session and appends
the EKT field unchanged. The receiver's session keeps its own ROC per SSRC, driven by the SEQ
we send (so a renumbering MD gets fresh IVs, RFC 7714 §8.4); RFC 8723 §9 forbids re-encrypting
with the sender's own key, which is the caller's job to respect (one session per receiver).

Hot path: one header parse per incoming packet, none per receiver. Without changes a
receiver's encryption is ``header + stream.seal(seq, plaintext, header) + ekt_field`` on the
parts decrypt found (the forwarding table keeps each receiver's send stream of the SSRC at hand
and does exactly that); with changes the header and OHB are rewritten on plain integers, and
the rewritten parts are reused for consecutive receivers asking for the same changes.

API
---
``MediaDistributorHop(inbound: SrtpSession, *, expect_ekt=True)``;
``decrypt(packet) -> Inbound``; ``encrypt_for(session, inbound, changes=None) -> bytes``;
``rewrite(inbound, changes) -> (header, plaintext)``;
``HeaderChanges(payload_type=None, sequence_number=None, marker=None)``; ``stats``.
``Inbound``: ``header``, ``payload`` (the outer plaintext), ``seq``, ``ssrc``, ``ekt_field``;
``packet`` (header and plaintext glued, for tests and tools; assigning it re-splits).
Errors: :class:`HopDecodeError` (a :class:`~perc.srtp.errors.SrtpDecodeError`) for a bad EKT
framing or RTP header, or an OHB that does not parse when changes are asked for; plus whatever
the SRTP session raises (:mod:`perc.srtp.errors`).
"""

from __future__ import annotations

import struct

import attrs

from perc.srtp.context import TAG_LENGTH, SrtpSession
from perc.srtp.errors import SrtpDecodeError, SrtpUsageError
from perc.wire.ekt import EktDecodeError, ekt_field_length_untrusted
from perc.wire.ohb import (
    Ohb,
    OhbDecodeError,
    decode_ohb,
    decode_ohb_fields,
    encode_ohb_fields,
    update_ohb_fields,
)
from perc.wire.rtp import rtp_header_length_or_negative as rtp_header_length

__all__ = [
    "HeaderChanges",
    "HopDecodeError",
    "HopStats",
    "Inbound",
    "MediaDistributorHop",
    "rtp_header_length",
]

_unpack_seq_ssrc = struct.Struct("!H4xI").unpack_from
_SHORT_EKT = b"\x00"


class HopDecodeError(SrtpDecodeError):
    """The packet's EKT framing or (when rewriting) its OHB does not parse."""


@attrs.frozen
class HeaderChanges:
    """Header fields a Media Distributor sets (RFC 8723 §4: only PT, SEQ and M); None = keep."""

    payload_type: int | None = None
    sequence_number: int | None = None
    marker: bool | None = None

    def __attrs_post_init__(self) -> None:
        if self.payload_type is not None and not 0 <= self.payload_type <= 0x7F:
            raise SrtpUsageError(f"payload type {self.payload_type} outside 0..127")
        if self.sequence_number is not None and not 0 <= self.sequence_number <= 0xFFFF:
            raise SrtpUsageError(f"sequence number {self.sequence_number} outside 0..65535")


@attrs.define
class HopStats:
    """Drops the hop itself decides (the SRTP sessions count their own in their ``stats``)."""

    ekt_framing_errors: int = 0
    ohb_errors: int = 0
    malformed: int = 0
    """Not an RTP header followed by at least a tag (before the EKT field)."""


class Inbound:
    """One incoming packet after outer decryption, in the parts ``encrypt_for`` re-encrypts."""

    __slots__ = ("_cache_changes", "_cache_parts", "ekt_field", "header", "payload", "seq", "ssrc")

    def __init__(
        self, header: bytes, payload: bytes, ekt_field: bytes, seq: int, ssrc: int
    ) -> None:
        #: the RTP header (fixed part, CSRCs, extension): the outer layer's AAD
        self.header = header
        #: the outer plaintext: inner ciphertext | inner tag | OHB
        self.payload = payload
        #: the trailing EKT field, opaque (D11); b"" when the hop expects none
        self.ekt_field = ekt_field
        self.seq = seq
        self.ssrc = ssrc
        self._cache_changes: HeaderChanges | None = None
        self._cache_parts = (b"", b"")

    @property
    def packet(self) -> bytes:
        """Header and outer plaintext as one packet (tests and tools; not the hot path)."""
        return self.header + self.payload

    @packet.setter
    def packet(self, packet: bytes) -> None:
        hlen = rtp_header_length(packet)
        if hlen < 0:
            raise HopDecodeError("not a well-formed RTP packet")
        self.header = packet[:hlen]
        self.payload = packet[hlen:]
        self.seq, self.ssrc = _unpack_seq_ssrc(packet, 2)
        self._cache_changes = None

    @property
    def payload_type(self) -> int:
        return self.header[1] & 0x7F

    @property
    def sequence_number(self) -> int:
        return self.seq

    @property
    def marker(self) -> bool:
        return bool(self.header[1] & 0x80)

    def ohb(self) -> Ohb:
        """The OHB this packet carries (parsed on demand; raises OhbDecodeError)."""
        return decode_ohb(self.payload)[0]


class MediaDistributorHop:
    """Outer-layer decrypt of one sender's packets and per-receiver re-encryption."""

    __slots__ = ("_expect_ekt", "_inbound", "_open", "stats")

    def __init__(self, inbound: SrtpSession, *, expect_ekt: bool = True) -> None:
        self._inbound = inbound
        self._open = inbound.open_rtp
        self._expect_ekt = expect_ekt
        self.stats = HopStats()

    @property
    def inbound_session(self) -> SrtpSession:
        return self._inbound

    def decrypt(self, packet: bytes) -> Inbound:
        """Strip the EKT field, verify and decrypt the outer layer (raises on any problem)."""
        n = len(packet)
        if not self._expect_ekt:
            ekt = b""
        elif n and packet[n - 1] == 0:  # ShortEKTField, by far the most common (RFC 8870 §4.6)
            n -= 1
            ekt = _SHORT_EKT
        else:
            try:
                length = ekt_field_length_untrusted(packet)
            except EktDecodeError as exc:
                self.stats.ekt_framing_errors += 1
                raise HopDecodeError(f"EKT field: {exc}") from None
            n -= length
            ekt = packet[n:]
        # The one header parse of this packet: the parts go on to every receiver.
        hlen = rtp_header_length(packet)
        if hlen < 0 or n < hlen + TAG_LENGTH:
            self.stats.malformed += 1
            raise HopDecodeError("not an RTP header followed by an SRTP tag")
        header = packet[:hlen]
        seq, ssrc = _unpack_seq_ssrc(packet, 2)
        return Inbound(header, self._open(ssrc, seq, header, packet[hlen:n]), ekt, seq, ssrc)

    def encrypt_for(
        self, session: SrtpSession, inbound: Inbound, changes: HeaderChanges | None = None
    ) -> bytes:
        """The packet for one receiver: outer-encrypted with ``session``, EKT field re-appended."""
        if session is self._inbound:
            # RFC 8723 §5.2, §9: never re-encrypt with the sender's key (GCM nonce reuse).
            raise SrtpUsageError("re-encrypting with the inbound session's key is forbidden")
        if changes is None:
            header, payload, seq = inbound.header, inbound.payload, inbound.seq
        else:
            header, payload = self.rewrite(inbound, changes)
            seq = (header[2] << 8) | header[3]
        stream = session.send_stream(inbound.ssrc, seq)
        return header + stream.seal(seq, payload, header) + inbound.ekt_field

    def rewrite(self, inbound: Inbound, changes: HeaderChanges) -> tuple[bytes, bytes]:
        """``(header, plaintext)`` of ``inbound`` with PT/SEQ/M changed and the OHB updated as
        RFC 8723 §5.2 says; the result is kept for the next receiver with equal changes."""
        if inbound._cache_changes is changes or inbound._cache_changes == changes:
            return inbound._cache_parts
        parts = self._rewrite(inbound.header, inbound.payload, changes)
        inbound._cache_changes = changes
        inbound._cache_parts = parts
        return parts

    def _rewrite(
        self, header: bytes, payload: bytes, changes: HeaderChanges
    ) -> tuple[bytes, bytes]:
        """Apply PT/SEQ/M changes to the header, growing or shrinking the OHB (§5.2)."""
        b1 = header[1]
        current = (b1 & 0x7F, (header[2] << 8) | header[3], bool(b1 & 0x80))
        try:
            pt, seq, m, olen = decode_ohb_fields(payload)
        except OhbDecodeError as exc:
            self.stats.ohb_errors += 1
            raise HopDecodeError(f"OHB: {exc}") from None
        new = (changes.payload_type, changes.sequence_number, changes.marker)
        recorded = update_ohb_fields((pt, seq, m), current, new)
        out_pt = current[0] if new[0] is None else new[0]
        out_seq = current[1] if new[1] is None else new[1]
        out_m = current[2] if new[2] is None else new[2]
        head = (
            bytes((header[0], (0x80 if out_m else 0) | out_pt, out_seq >> 8, out_seq & 0xFF))
            + header[4:]
        )
        if recorded == (pt, seq, m):
            return head, payload
        return head, payload[: len(payload) - olen] + encode_ohb_fields(*recorded)
