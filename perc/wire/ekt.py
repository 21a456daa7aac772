"""EKT field and EKTPlaintext codecs (RFC 8870 §4.1). No cryptography here.

An EKT field is appended after the whole SRTP packet (after the outer tag of a
double-encrypted packet) and is parsed **backwards from the end of the packet**: the last byte
is the message type, and for every type but Short the two bytes before it are the total field
length (including the length and type bytes)::

    ShortEKTField     = 0x00
    FullEKTField      = EKTCiphertext(1..251) SPI(2) Epoch(2) Length(2) 0x02
                        Length = len(EKTCiphertext) + 7
    ExtensionEKTField = ExtensionData(1..1024) Length(2) Type(0x03..0xFF)
                        Length = len(ExtensionData) + 3
    (type 0x01 is reserved for legacy implementations and cannot be parsed)

    EKTPlaintext      = KeyLength(1) SRTPMasterKey(KeyLength, 1..242) SSRC(4) ROC(4)

:func:`split_ekt_field` is the one parser of untrusted EKT fields and
:func:`decode_ekt_plaintext` the one parser of (already unwrapped) plaintexts; both raise
only :class:`EktDecodeError`. :func:`ekt_field_length_untrusted` is the cheap version the
Media Distributor uses to strip the field as opaque bytes (D11).
"""

from __future__ import annotations

import struct

import attrs

from perc.wire.errors import DecodeError

EKT_TYPE_SHORT = 0x00
EKT_TYPE_LEGACY = 0x01
EKT_TYPE_FULL = 0x02

SHORT_EKT_FIELD = b"\x00"

MAX_CIPHERTEXT = 251
MAX_EXTENSION_DATA = 1024
MAX_MASTER_KEY = 242
_FULL_TRAILER = struct.Struct("!HHHB")  # SPI, Epoch, Length, Type


class EktDecodeError(DecodeError):
    """Bytes at the end of a packet, or an unwrapped plaintext, are not a valid EKT message."""


@attrs.frozen
class ShortEktField:
    """The one-byte field: no key in this packet."""

    def encode(self) -> bytes:
        return SHORT_EKT_FIELD


@attrs.frozen
class FullEktField:
    """A wrapped SRTP master key under the EKT parameter set named by ``spi``."""

    ciphertext: bytes
    spi: int
    epoch: int

    def __attrs_post_init__(self) -> None:
        if not 1 <= len(self.ciphertext) <= MAX_CIPHERTEXT:
            raise ValueError(f"EKT ciphertext of {len(self.ciphertext)} bytes outside 1..251")
        if not 0 <= self.spi <= 0xFFFF or not 0 <= self.epoch <= 0xFFFF:
            raise ValueError("SPI and epoch are 16-bit values")

    def encode(self) -> bytes:
        return self.ciphertext + _FULL_TRAILER.pack(
            self.spi, self.epoch, len(self.ciphertext) + 7, EKT_TYPE_FULL
        )


@attrs.frozen
class ExtensionEktField:
    """A field of a type this codec does not know (0x03..0xFF); receivers discard it."""

    message_type: int
    data: bytes

    def __attrs_post_init__(self) -> None:
        if not 0x03 <= self.message_type <= 0xFF:
            raise ValueError(f"extension EKT type {self.message_type} outside 3..255")
        if not 1 <= len(self.data) <= MAX_EXTENSION_DATA:
            raise ValueError(f"extension data of {len(self.data)} bytes outside 1..1024")

    def encode(self) -> bytes:
        return self.data + (len(self.data) + 3).to_bytes(2, "big") + bytes([self.message_type])


EktField = ShortEktField | FullEktField | ExtensionEktField

SHORT = ShortEktField()


def ekt_field_length_untrusted(packet: bytes | bytearray | memoryview) -> int:
    """Length of the EKT field at the end of ``packet`` by the last-byte rule (§4.3.2 step 1).

    Checks only what the framing needs (type, length bounds, fits in the packet); the Media
    Distributor uses this to strip the field without looking inside it (D11).
    """
    end = len(packet)
    if end == 0:
        raise EktDecodeError("empty packet has no EKT field")
    msg_type = packet[end - 1]
    if msg_type == EKT_TYPE_SHORT:
        return 1
    if msg_type == EKT_TYPE_LEGACY:
        raise EktDecodeError("EKT message type 1 (legacy) has no defined format")
    if end < 3:
        raise EktDecodeError(f"EKT field type {msg_type} needs a length, packet has {end} bytes")
    length = (packet[end - 3] << 8) | packet[end - 2]
    if msg_type == EKT_TYPE_FULL:
        if not 8 <= length <= MAX_CIPHERTEXT + 7:
            raise EktDecodeError(f"Full EKT field length {length} outside 8..258")
    elif not 4 <= length <= MAX_EXTENSION_DATA + 3:
        raise EktDecodeError(f"extension EKT field length {length} outside 4..1027")
    if length > end:
        raise EktDecodeError(f"EKT field of {length} bytes does not fit in {end} bytes")
    return length


def split_ekt_field(packet: bytes | bytearray | memoryview) -> tuple[int, EktField]:
    """Parse the EKT field at the end of ``packet``.

    Returns ``(n, field)`` where ``packet[:n]`` is the SRTP packet without the field.
    Raises :class:`EktDecodeError` only.
    """
    length = ekt_field_length_untrusted(packet)
    end = len(packet)
    msg_type = packet[end - 1]
    if msg_type == EKT_TYPE_SHORT:
        return end - 1, SHORT
    start = end - length
    if msg_type == EKT_TYPE_FULL:
        spi, epoch, _length, _type = _FULL_TRAILER.unpack_from(packet, end - 7)
        return start, FullEktField(bytes(packet[start : end - 7]), spi, epoch)
    return start, ExtensionEktField(msg_type, bytes(packet[start : end - 3]))


def encode_ekt_field(field: EktField) -> bytes:
    return field.encode()


@attrs.frozen
class EktPlaintext:
    """What an EKT ciphertext wraps: the sender's SRTP master key, its SSRC and its ROC."""

    master_key: bytes
    ssrc: int
    roc: int

    def __attrs_post_init__(self) -> None:
        if not 1 <= len(self.master_key) <= MAX_MASTER_KEY:
            raise ValueError(f"master key of {len(self.master_key)} bytes outside 1..242")
        if not 0 <= self.ssrc <= 0xFFFFFFFF or not 0 <= self.roc <= 0xFFFFFFFF:
            raise ValueError("SSRC and ROC are 32-bit values")

    def encode(self) -> bytes:
        return (
            bytes([len(self.master_key)])
            + self.master_key
            + self.ssrc.to_bytes(4, "big")
            + self.roc.to_bytes(4, "big")
        )


def encode_ekt_plaintext(plaintext: EktPlaintext) -> bytes:
    return plaintext.encode()


def decode_ekt_plaintext(data: bytes | bytearray | memoryview) -> EktPlaintext:
    """Parse an unwrapped EKTPlaintext; it must fill ``data`` exactly. Raises EktDecodeError."""
    if len(data) < 1:
        raise EktDecodeError("empty EKT plaintext")
    key_length = data[0]
    if not 1 <= key_length <= MAX_MASTER_KEY:
        raise EktDecodeError(f"EKT master key length {key_length} outside 1..242")
    if len(data) != 1 + key_length + 8:
        raise EktDecodeError(
            f"EKT plaintext of {len(data)} bytes, key length {key_length} needs {key_length + 9}"
        )
    key = bytes(data[1 : 1 + key_length])
    ssrc = int.from_bytes(data[1 + key_length : 5 + key_length], "big")
    roc = int.from_bytes(data[5 + key_length : 9 + key_length], "big")
    return EktPlaintext(key, ssrc, roc)
