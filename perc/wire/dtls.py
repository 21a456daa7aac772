"""DTLS 1.2 wire codecs: records, handshake fragments, every handshake message, extensions.

Pure functions and attrs classes, no state, no I/O. Everything here that reads network bytes
(names ending in ``_untrusted`` and every ``decode`` classmethod) raises
:class:`DtlsDecodeError` and nothing else (STYLE practice 6); encoders raise ``ValueError`` on
local misuse (a field that does not fit its vector).

Layouts (RFC 6347 §4.1, §4.2.2; RFC 5246 §7):

* record header, 13 bytes: ``type(1) version(2) epoch(2) sequence_number(6) length(2)``
* handshake header, 12 bytes: ``msg_type(1) length(3) message_seq(2) fragment_offset(3)
  fragment_length(3)``; a whole message is the fragment ``offset 0, length = length``, and that
  form (12 + length bytes) is what the transcript hashes (RFC 6347 §4.2.6)
* message bodies: see each class; vectors ``<floor..ceiling>`` have 1-, 2- or 3-byte prefixes
* ``EKTKey`` (RFC 8870 §5.2.2; RFC 8446 §3.4): ``key<1..256> salt<1..256> spi(2) ttl(3)``, both
  vectors with 2-byte prefixes because the ceiling 256 needs them
* ``ACK`` (RFC 9147 §7, D9): ``record_numbers<0..2^16-1>`` of ``uint64 epoch, uint64 seq``
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from enum import IntEnum
from typing import ClassVar

import attrs

from perc.wire.buffer import Buffer
from perc.wire.errors import BufferReadError, DecodeError


class DtlsDecodeError(DecodeError):
    """DTLS bytes (a record, a handshake fragment, a message or an extension) do not parse."""


# --- constants ------------------------------------------------------------------------------

DTLS_1_2 = 0xFEFD
DTLS_1_0 = 0xFEFF


class ContentType(IntEnum):
    CHANGE_CIPHER_SPEC = 20
    ALERT = 21
    HANDSHAKE = 22
    APPLICATION_DATA = 23
    ACK = 26  # RFC 9147 §7, used in DTLS 1.2 for EKTKey (D9)


class HandshakeType(IntEnum):
    HELLO_REQUEST = 0
    CLIENT_HELLO = 1
    SERVER_HELLO = 2
    HELLO_VERIFY_REQUEST = 3
    NEW_SESSION_TICKET = 4
    CERTIFICATE = 11
    SERVER_KEY_EXCHANGE = 12
    CERTIFICATE_REQUEST = 13
    SERVER_HELLO_DONE = 14
    CERTIFICATE_VERIFY = 15
    CLIENT_KEY_EXCHANGE = 16
    FINISHED = 20
    EKT_KEY = 26  # RFC 8870 §5.2.2


class ExtensionType(IntEnum):
    SUPPORTED_GROUPS = 10
    EC_POINT_FORMATS = 11
    SIGNATURE_ALGORITHMS = 13
    USE_SRTP = 14
    EXTENDED_MASTER_SECRET = 23
    SUPPORTED_EKT_CIPHERS = 39
    EXTERNAL_SESSION_ID = 56
    RENEGOTIATION_INFO = 0xFF01


RECORD_HEADER = struct.Struct("!BHHHIH")  # type, version, epoch, seq_hi16, seq_lo32, length
RECORD_HEADER_SIZE = 13
HANDSHAKE_HEADER = struct.Struct("!IHHI")  # type<<24|len, seq, off_hi16, off_lo8<<24|flen
HANDSHAKE_HEADER_SIZE = 12
# RFC 5246 §6.2.3: a protected fragment never exceeds 2^14 + 2048 bytes.
MAX_RECORD_FRAGMENT = (1 << 14) + 2048


def _guard(exc: BufferReadError) -> DtlsDecodeError:
    return DtlsDecodeError(str(exc))


# --- records -------------------------------------------------------------------------------


@attrs.frozen(slots=True)
class DtlsRecord:
    content_type: int
    version: int
    epoch: int
    sequence_number: int
    fragment: bytes


def encode_record_header(
    content_type: int, version: int, epoch: int, sequence_number: int, length: int
) -> bytes:
    return RECORD_HEADER.pack(
        content_type, version, epoch, sequence_number >> 32, sequence_number & 0xFFFFFFFF, length
    )


def encode_record(record: DtlsRecord) -> bytes:
    return (
        encode_record_header(
            record.content_type,
            record.version,
            record.epoch,
            record.sequence_number,
            len(record.fragment),
        )
        + record.fragment
    )


def parse_datagram_untrusted(data: bytes) -> tuple[list[DtlsRecord], int]:
    """Split a datagram into records (RFC 6347 §4.1.1).

    Returns the records and the number of trailing bytes dropped: a header whose length runs
    past the end of the datagram, or an over-long fragment, ends parsing (RFC 6347 §4.1.1). Never
    raises on input.
    """
    records: list[DtlsRecord] = []
    pos = 0
    end = len(data)
    unpack = RECORD_HEADER.unpack_from
    while end - pos >= RECORD_HEADER_SIZE:
        ctype, version, epoch, hi, lo, length = unpack(data, pos)
        start = pos + RECORD_HEADER_SIZE
        if length > MAX_RECORD_FRAGMENT or start + length > end:
            break
        records.append(
            DtlsRecord(ctype, version, epoch, (hi << 32) | lo, data[start : start + length])
        )
        pos = start + length
    return records, end - pos


# --- handshake fragments -------------------------------------------------------------------


@attrs.frozen(slots=True)
class HandshakeFragment:
    msg_type: int
    length: int  # of the whole message body
    message_seq: int
    fragment_offset: int
    body: bytes  # fragment_length bytes

    @property
    def is_whole(self) -> bool:
        return self.fragment_offset == 0 and len(self.body) == self.length


def encode_handshake_fragment(
    msg_type: int, length: int, message_seq: int, fragment_offset: int, body: bytes
) -> bytes:
    flen = len(body)
    return (
        HANDSHAKE_HEADER.pack(
            (msg_type << 24) | length,
            message_seq,
            fragment_offset >> 8,
            ((fragment_offset & 0xFF) << 24) | flen,
        )
        + body
    )


def encode_handshake(msg_type: int, message_seq: int, body: bytes) -> bytes:
    """A whole handshake message: the single-fragment form the transcript hashes."""
    return encode_handshake_fragment(msg_type, len(body), message_seq, 0, body)


def parse_handshake_fragments_untrusted(data: bytes) -> list[HandshakeFragment]:
    """All handshake fragments in one handshake record's plaintext (RFC 6347 §4.2.3)."""
    out: list[HandshakeFragment] = []
    pos = 0
    end = len(data)
    if end == 0:
        raise DtlsDecodeError("empty handshake record")
    while pos < end:
        if end - pos < HANDSHAKE_HEADER_SIZE:
            raise DtlsDecodeError("truncated handshake header")
        a, seq, b, c = HANDSHAKE_HEADER.unpack_from(data, pos)
        msg_type = a >> 24
        length = a & 0xFFFFFF
        offset = (b << 8) | (c >> 24)
        flen = c & 0xFFFFFF
        start = pos + HANDSHAKE_HEADER_SIZE
        if start + flen > end:
            raise DtlsDecodeError("handshake fragment runs past the record")
        if offset + flen > length:
            raise DtlsDecodeError("handshake fragment runs past the message end")
        out.append(HandshakeFragment(msg_type, length, seq, offset, data[start : start + flen]))
        pos = start + flen
    return out


# --- extensions ----------------------------------------------------------------------------


@attrs.frozen(slots=True)
class Extension:
    extension_type: int
    data: bytes


def _pull_extensions(buf: Buffer) -> tuple[Extension, ...]:
    block = buf.pull_block(2)
    out: list[Extension] = []
    seen: set[int] = set()
    while not block.eof():
        etype = block.pull_uint16()
        if etype in seen:
            # RFC 5246 §7.4.1.4: at most one extension of each type.
            raise DtlsDecodeError(f"duplicate extension {etype}")
        seen.add(etype)
        out.append(Extension(etype, block.pull_vector(2)))
    return tuple(out)


def _push_extensions(buf: Buffer, extensions: Iterable[Extension]) -> None:
    with buf.push_block(2):
        for ext in extensions:
            buf.push_uint16(ext.extension_type)
            buf.push_vector(2, ext.data)


def find_extension(extensions: Sequence[Extension] | None, etype: int) -> bytes | None:
    for ext in extensions or ():
        if ext.extension_type == etype:
            return ext.data
    return None


def encode_uint16_list(values: Sequence[int]) -> bytes:
    """supported_groups (RFC 8422 §5.1.1) / signature_algorithms (RFC 5246 §7.4.1.4.1)."""
    buf = Buffer()
    with buf.push_block(2):
        for v in values:
            buf.push_uint16(v)
    return buf.data()


def decode_uint16_list(data: bytes) -> tuple[int, ...]:
    """A ``uint16 list<2..2^16-1>`` consuming ``data`` exactly."""
    try:
        buf = Buffer(data)
        raw = buf.pull_vector(2, 2)
        buf.expect_end()
    except BufferReadError as e:
        raise _guard(e) from None
    if len(raw) % 2:
        raise DtlsDecodeError("odd length for a uint16 list")
    return tuple(int.from_bytes(raw[i : i + 2], "big") for i in range(0, len(raw), 2))


def encode_uint8_list(values: Sequence[int]) -> bytes:
    """ec_point_formats (RFC 8422 §5.1.2); supported_ekt_ciphers in a ClientHello (D24)."""
    return bytes([len(values), *values])


def decode_uint8_list(data: bytes) -> tuple[int, ...]:
    """A ``uint8 list<1..2^8-1>`` consuming ``data`` exactly."""
    try:
        buf = Buffer(data)
        raw = buf.pull_vector(1, 1)
        buf.expect_end()
    except BufferReadError as e:
        raise _guard(e) from None
    return tuple(raw)


def encode_opaque8(value: bytes) -> bytes:
    """renegotiation_info (RFC 5746 §3.2) and external_session_id (RFC 8844 §4.3)."""
    buf = Buffer()
    buf.push_vector(1, value)
    return buf.data()


def decode_opaque8(data: bytes) -> bytes:
    try:
        buf = Buffer(data)
        value = buf.pull_vector(1)
        buf.expect_end()
    except BufferReadError as e:
        raise _guard(e) from None
    return value


def decode_ekt_selected(data: bytes) -> int:
    """supported_ekt_ciphers in a ServerHello: exactly one byte (D24)."""
    if len(data) != 1:
        raise DtlsDecodeError("supported_ekt_ciphers in ServerHello must be one byte")
    return data[0]


def decode_empty(data: bytes) -> None:
    if data:
        raise DtlsDecodeError("extension must be empty")


@attrs.frozen(slots=True)
class UseSrtp:
    """use_srtp (RFC 5764 §4.1.1): ``profiles<2..2^16-1> srtp_mki<0..255>``."""

    profiles: tuple[int, ...]
    mki: bytes = b""

    def encode(self) -> bytes:
        buf = Buffer()
        with buf.push_block(2):
            for p in self.profiles:
                buf.push_uint16(p)
        buf.push_vector(1, self.mki)
        return buf.data()

    @classmethod
    def decode(cls, data: bytes) -> UseSrtp:
        try:
            buf = Buffer(data)
            raw = buf.pull_vector(2, 2)
            mki = buf.pull_vector(1)
            buf.expect_end()
        except BufferReadError as e:
            raise _guard(e) from None
        if len(raw) % 2:
            raise DtlsDecodeError("odd SRTP profile list length")
        return cls(tuple(int.from_bytes(raw[i : i + 2], "big") for i in range(0, len(raw), 2)), mki)


# --- handshake messages --------------------------------------------------------------------


@attrs.frozen(slots=True)
class ClientHello:
    """RFC 6347 §4.2.1 / RFC 5246 §7.4.1.2; ``extensions`` None when the block is absent."""

    msg_type: ClassVar[int] = HandshakeType.CLIENT_HELLO
    client_version: int
    random: bytes
    session_id: bytes
    cookie: bytes
    cipher_suites: tuple[int, ...]
    compression_methods: bytes
    extensions: tuple[Extension, ...] | None

    def encode(self) -> bytes:
        buf = Buffer()
        buf.push_uint16(self.client_version)
        if len(self.random) != 32:
            raise ValueError("random must be 32 bytes")
        buf.push_bytes(self.random)
        buf.push_vector(1, self.session_id, 0, 32)
        buf.push_vector(1, self.cookie)
        with buf.push_block(2):
            for cs in self.cipher_suites:
                buf.push_uint16(cs)
        buf.push_vector(1, self.compression_methods, 1)
        if self.extensions is not None:
            _push_extensions(buf, self.extensions)
        return buf.data()

    @classmethod
    def decode(cls, data: bytes) -> ClientHello:
        try:
            buf = Buffer(data)
            version = buf.pull_uint16()
            random = buf.pull_bytes(32)
            session_id = buf.pull_vector(1, 0, 32)
            cookie = buf.pull_vector(1)
            raw_suites = buf.pull_vector(2, 2)
            compression = buf.pull_vector(1, 1)
            extensions = None if buf.eof() else _pull_extensions(buf)
            buf.expect_end()
        except BufferReadError as e:
            raise _guard(e) from None
        if len(raw_suites) % 2:
            raise DtlsDecodeError("odd cipher_suites length")
        suites = tuple(
            int.from_bytes(raw_suites[i : i + 2], "big") for i in range(0, len(raw_suites), 2)
        )
        return cls(version, random, session_id, cookie, suites, compression, extensions)


@attrs.frozen(slots=True)
class HelloVerifyRequest:
    """RFC 6347 §4.2.1: ``server_version(2) cookie<0..2^8-1>``."""

    msg_type: ClassVar[int] = HandshakeType.HELLO_VERIFY_REQUEST
    server_version: int
    cookie: bytes

    def encode(self) -> bytes:
        buf = Buffer()
        buf.push_uint16(self.server_version)
        buf.push_vector(1, self.cookie)
        return buf.data()

    @classmethod
    def decode(cls, data: bytes) -> HelloVerifyRequest:
        try:
            buf = Buffer(data)
            version = buf.pull_uint16()
            cookie = buf.pull_vector(1)
            buf.expect_end()
        except BufferReadError as e:
            raise _guard(e) from None
        return cls(version, cookie)


@attrs.frozen(slots=True)
class ServerHello:
    """RFC 5246 §7.4.1.3."""

    msg_type: ClassVar[int] = HandshakeType.SERVER_HELLO
    server_version: int
    random: bytes
    session_id: bytes
    cipher_suite: int
    compression_method: int
    extensions: tuple[Extension, ...] | None

    def encode(self) -> bytes:
        buf = Buffer()
        buf.push_uint16(self.server_version)
        if len(self.random) != 32:
            raise ValueError("random must be 32 bytes")
        buf.push_bytes(self.random)
        buf.push_vector(1, self.session_id, 0, 32)
        buf.push_uint16(self.cipher_suite)
        buf.push_uint8(self.compression_method)
        if self.extensions is not None:
            _push_extensions(buf, self.extensions)
        return buf.data()

    @classmethod
    def decode(cls, data: bytes) -> ServerHello:
        try:
            buf = Buffer(data)
            version = buf.pull_uint16()
            random = buf.pull_bytes(32)
            session_id = buf.pull_vector(1, 0, 32)
            suite = buf.pull_uint16()
            compression = buf.pull_uint8()
            extensions = None if buf.eof() else _pull_extensions(buf)
            buf.expect_end()
        except BufferReadError as e:
            raise _guard(e) from None
        return cls(version, random, session_id, suite, compression, extensions)


@attrs.frozen(slots=True)
class Certificate:
    """RFC 5246 §7.4.2: ``ASN.1Cert certificate_list<0..2^24-1>``, each ``<1..2^24-1>``."""

    msg_type: ClassVar[int] = HandshakeType.CERTIFICATE
    certificates: tuple[bytes, ...]

    def encode(self) -> bytes:
        buf = Buffer()
        with buf.push_block(3):
            for der in self.certificates:
                buf.push_vector(3, der, 1)
        return buf.data()

    @classmethod
    def decode(cls, data: bytes) -> Certificate:
        try:
            buf = Buffer(data)
            block = buf.pull_block(3)
            buf.expect_end()
            certs: list[bytes] = []
            while not block.eof():
                certs.append(block.pull_vector(3, 1))
        except BufferReadError as e:
            raise _guard(e) from None
        return cls(tuple(certs))


@attrs.frozen(slots=True)
class ServerKeyExchange:
    """ECDHE ServerKeyExchange (RFC 8422 §5.4): params then a DigitallySigned."""

    msg_type: ClassVar[int] = HandshakeType.SERVER_KEY_EXCHANGE
    named_curve: int
    public: bytes
    signature_scheme: int
    signature: bytes
    curve_type: int = 3  # named_curve

    @property
    def params(self) -> bytes:
        """ServerECDHParams exactly as sent: what the signature covers after both randoms."""
        buf = Buffer()
        buf.push_uint8(self.curve_type)
        buf.push_uint16(self.named_curve)
        buf.push_vector(1, self.public, 1)
        return buf.data()

    def encode(self) -> bytes:
        buf = Buffer()
        buf.push_bytes(self.params)
        buf.push_uint16(self.signature_scheme)
        buf.push_vector(2, self.signature)
        return buf.data()

    @classmethod
    def decode(cls, data: bytes) -> ServerKeyExchange:
        try:
            buf = Buffer(data)
            curve_type = buf.pull_uint8()
            if curve_type != 3:
                raise DtlsDecodeError(f"unsupported ECCurveType {curve_type}")
            curve = buf.pull_uint16()
            public = buf.pull_vector(1, 1)
            scheme = buf.pull_uint16()
            signature = buf.pull_vector(2)
            buf.expect_end()
        except BufferReadError as e:
            raise _guard(e) from None
        return cls(curve, public, scheme, signature, curve_type)


@attrs.frozen(slots=True)
class CertificateRequest:
    """RFC 5246 §7.4.4: types<1..2^8-1>, signature algorithms<2..2^16-2>, CA names<0..2^16-1>."""

    msg_type: ClassVar[int] = HandshakeType.CERTIFICATE_REQUEST
    certificate_types: bytes
    signature_algorithms: tuple[int, ...]
    certificate_authorities: tuple[bytes, ...] = ()

    def encode(self) -> bytes:
        buf = Buffer()
        buf.push_vector(1, self.certificate_types, 1)
        buf.push_bytes(encode_uint16_list(self.signature_algorithms))
        with buf.push_block(2):
            for name in self.certificate_authorities:
                buf.push_vector(2, name, 1)
        return buf.data()

    @classmethod
    def decode(cls, data: bytes) -> CertificateRequest:
        try:
            buf = Buffer(data)
            types = buf.pull_vector(1, 1)
            raw = buf.pull_vector(2, 2)
            block = buf.pull_block(2)
            buf.expect_end()
            names: list[bytes] = []
            while not block.eof():
                names.append(block.pull_vector(2, 1))
        except BufferReadError as e:
            raise _guard(e) from None
        if len(raw) % 2:
            raise DtlsDecodeError("odd signature algorithm list length")
        algs = tuple(int.from_bytes(raw[i : i + 2], "big") for i in range(0, len(raw), 2))
        return cls(types, algs, tuple(names))


@attrs.frozen(slots=True)
class ServerHelloDone:
    msg_type: ClassVar[int] = HandshakeType.SERVER_HELLO_DONE

    def encode(self) -> bytes:
        return b""

    @classmethod
    def decode(cls, data: bytes) -> ServerHelloDone:
        if data:
            raise DtlsDecodeError("ServerHelloDone must be empty")
        return cls()


@attrs.frozen(slots=True)
class ClientKeyExchange:
    """ECDHE ClientKeyExchange (RFC 8422 §5.7): ``ECPoint ecdh_Yc`` = ``point<1..2^8-1>``."""

    msg_type: ClassVar[int] = HandshakeType.CLIENT_KEY_EXCHANGE
    public: bytes

    def encode(self) -> bytes:
        return encode_opaque8(self.public)

    @classmethod
    def decode(cls, data: bytes) -> ClientKeyExchange:
        public = decode_opaque8(data)
        if not public:
            raise DtlsDecodeError("empty ECDH point")
        return cls(public)


@attrs.frozen(slots=True)
class CertificateVerify:
    """RFC 5246 §7.4.8: ``SignatureAndHashAlgorithm(2) signature<0..2^16-1>``."""

    msg_type: ClassVar[int] = HandshakeType.CERTIFICATE_VERIFY
    signature_scheme: int
    signature: bytes

    def encode(self) -> bytes:
        buf = Buffer()
        buf.push_uint16(self.signature_scheme)
        buf.push_vector(2, self.signature)
        return buf.data()

    @classmethod
    def decode(cls, data: bytes) -> CertificateVerify:
        try:
            buf = Buffer(data)
            scheme = buf.pull_uint16()
            signature = buf.pull_vector(2)
            buf.expect_end()
        except BufferReadError as e:
            raise _guard(e) from None
        return cls(scheme, signature)


@attrs.frozen(slots=True)
class Finished:
    """RFC 5246 §7.4.9: 12 bytes of verify_data for every perc suite."""

    msg_type: ClassVar[int] = HandshakeType.FINISHED
    verify_data: bytes

    def encode(self) -> bytes:
        return self.verify_data

    @classmethod
    def decode(cls, data: bytes) -> Finished:
        if len(data) != 12:
            raise DtlsDecodeError("verify_data must be 12 bytes")
        return cls(data)


@attrs.frozen(slots=True)
class EktKey:
    """EKTKey (RFC 8870 §5.2.2): ``key<1..256> salt<1..256> spi(2) ttl(3)``."""

    msg_type: ClassVar[int] = HandshakeType.EKT_KEY
    ekt_key_value: bytes
    srtp_master_salt: bytes
    ekt_spi: int
    ekt_ttl: int

    def encode(self) -> bytes:
        buf = Buffer()
        buf.push_vector(2, self.ekt_key_value, 1, 256)
        buf.push_vector(2, self.srtp_master_salt, 1, 256)
        if not (0 <= self.ekt_spi < 1 << 16 and 0 <= self.ekt_ttl < 1 << 24):
            raise ValueError("ekt_spi or ekt_ttl out of range")
        buf.push_uint16(self.ekt_spi)
        buf.push_uint24(self.ekt_ttl)
        return buf.data()

    @classmethod
    def decode(cls, data: bytes) -> EktKey:
        try:
            buf = Buffer(data)
            key = buf.pull_vector(2, 1, 256)
            salt = buf.pull_vector(2, 1, 256)
            spi = buf.pull_uint16()
            ttl = buf.pull_uint24()
            buf.expect_end()
        except BufferReadError as e:
            raise _guard(e) from None
        return cls(key, salt, spi, ttl)


HandshakeMessage = (
    ClientHello
    | HelloVerifyRequest
    | ServerHello
    | Certificate
    | ServerKeyExchange
    | CertificateRequest
    | ServerHelloDone
    | ClientKeyExchange
    | CertificateVerify
    | Finished
    | EktKey
)

MESSAGE_CLASSES: dict[int, type[HandshakeMessage]] = {
    cls.msg_type: cls
    for cls in (
        ClientHello,
        HelloVerifyRequest,
        ServerHello,
        Certificate,
        ServerKeyExchange,
        CertificateRequest,
        ServerHelloDone,
        ClientKeyExchange,
        CertificateVerify,
        Finished,
        EktKey,
    )
}


def decode_handshake_body_untrusted(msg_type: int, body: bytes) -> HandshakeMessage:
    """Decode the body of a reassembled handshake message of a known type."""
    cls = MESSAGE_CLASSES.get(msg_type)
    if cls is None:
        raise DtlsDecodeError(f"unknown handshake type {msg_type}")
    return cls.decode(body)


# --- other content types -------------------------------------------------------------------


@attrs.frozen(slots=True)
class Alert:
    """RFC 5246 §7.2: ``level(1) description(1)``."""

    level: int
    description: int

    def encode(self) -> bytes:
        return bytes((self.level, self.description))

    @classmethod
    def decode(cls, data: bytes) -> Alert:
        if len(data) != 2:
            raise DtlsDecodeError("alert must be 2 bytes")
        return cls(data[0], data[1])


_RECORD_NUMBER = struct.Struct("!QQ")


@attrs.frozen(slots=True)
class Ack:
    """RFC 9147 §7 ACK: ``RecordNumber record_numbers<0..2^16-1>`` of (uint64, uint64).

    DTLS 1.2 mapping (D9): the 16-bit epoch and 48-bit sequence number, zero-extended.
    """

    record_numbers: tuple[tuple[int, int], ...]

    def encode(self) -> bytes:
        body = b"".join(_RECORD_NUMBER.pack(e, s) for e, s in self.record_numbers)
        if len(body) >= 1 << 16:
            raise ValueError("too many record numbers for one ACK")
        return len(body).to_bytes(2, "big") + body

    @classmethod
    def decode(cls, data: bytes) -> Ack:
        if len(data) < 2:
            raise DtlsDecodeError("truncated ACK")
        n = int.from_bytes(data[:2], "big")
        if n != len(data) - 2 or n % 16:
            raise DtlsDecodeError("bad ACK length")
        return cls(tuple(_RECORD_NUMBER.unpack_from(data, 2 + i) for i in range(0, n, 16)))


def decode_change_cipher_spec(data: bytes) -> None:
    """RFC 5246 §7.1: exactly the byte 0x01."""
    if data != b"\x01":
        raise DtlsDecodeError("ChangeCipherSpec must be the single byte 0x01")
