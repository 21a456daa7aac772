"""Codec for the RFC 9185 DTLS tunnel between Media Distributor (MDD) and Key Distributor (KMF).

Theory of operation
-------------------
The tunnel is a TLS byte stream carrying ``TunnelMessage`` structs (RFC 9185 §6.1)::

    +--------+-----------------+-----------------------------+
    | type   | length (uint16) | body (exactly length bytes) |
    | 1 byte | 2 bytes, BE     |                             |
    +--------+-----------------+-----------------------------+

Body layouts (RFC 9185 §6.2-§6.6; vector bounds from the RFC structs):

* ``SupportedProfiles`` (1, MDD -> KMF): ``version(1) | profiles<2..2^16-1>`` (2-byte length
  counting bytes, so even; two bytes per RFC 5764 profile code).
* ``UnsupportedVersion`` (2, KMF -> MDD): ``highest_version(1)``.
* ``MediaKeys`` (3, KMF -> MDD): ``uuid(16) | profile(2) | mki<0..255> |
  client_key<1..255> | server_key<1..255> | client_salt<1..255> | server_salt<1..255>``.
* ``TunneledDtls`` (4, both ways): ``uuid(16) | dtls_message<1..2^16-1>``.
* ``EndpointDisconnect`` (5, both ways): ``uuid(16)``.

This module is the trust boundary for tunnel bytes: :func:`decode_message` and
:class:`TunnelFramer` parse untrusted input and raise :class:`TunnelDecodeError` and nothing
else. A body must parse exactly (no trailing bytes), per decision D2; the one leniency is a
``SupportedProfiles`` of a version other than 0: its body is read in the version 0 layout if
that parses, else kept as the version byte alone (``protection_profiles == ()``), because the
KMF must still answer ``UnsupportedVersion`` to it (RFC 9185 §5.5). Association ids are any
16 bytes: RFC 9185 §5.3 has the MDD make version 4 UUIDs, but the receiver only routes by them.
Protocol rules above the codec (``SupportedProfiles`` first and once, D2) are the roles'.

Encoding values that cannot be represented (a vector outside its bounds, an integer that does
not fit its field) is local misuse and raises :class:`ValueError`.

API::

    SupportedProfiles(version: int, protection_profiles: tuple[int, ...])
    UnsupportedVersion(highest_version: int)
    MediaKeys(association_id: UUID, protection_profile: int, mki: bytes,
              client_write_master_key: bytes, server_write_master_key: bytes,
              client_write_master_salt: bytes, server_write_master_salt: bytes)
    TunneledDtls(association_id: UUID, dtls_message: bytes)
    EndpointDisconnect(association_id: UUID)
    TunnelMessage = the union of the five
    encode_message(msg) -> bytes            # 3-byte header + body
    decode_message(msg_type, body) -> TunnelMessage
    TunnelFramer(max_body=65535).feed(data) -> list[TunnelMessage]; .pending (bytes held)
    MsgType, TUNNEL_VERSION (0), MAX_BODY (65535), HEADER_SIZE (3)
"""

from __future__ import annotations

import enum
import struct
import uuid

import attrs

from perc.wire.buffer import Buffer
from perc.wire.errors import DecodeError

__all__ = [
    "HEADER_SIZE",
    "MAX_BODY",
    "TUNNEL_VERSION",
    "EndpointDisconnect",
    "MediaKeys",
    "MsgType",
    "SupportedProfiles",
    "TunnelDecodeError",
    "TunnelFramer",
    "TunnelMessage",
    "TunneledDtls",
    "UnsupportedVersion",
    "decode_message",
    "encode_message",
]

#: The tunnel protocol version of RFC 9185 (carried in ``SupportedProfiles``, §5.5).
TUNNEL_VERSION = 0
#: The largest body the 16-bit ``length`` field can declare (RFC 9185 §6.1).
MAX_BODY = 0xFFFF
#: ``msg_type(1) | length(2)``.
HEADER_SIZE = 3

_HEADER = struct.Struct("!BH")
# TunneledDtls is the relay's hot path: its header, association id and dtls_message length
# are packed in one go rather than through Buffer.
_DTLS_PREFIX = struct.Struct("!BH16sH")
_UUID_LEN = 16


class TunnelDecodeError(DecodeError):
    """Tunnel bytes from the peer do not parse: framing error, unknown type or bad body."""


class MsgType(enum.IntEnum):
    """RFC 9185 §6.1 ``MsgType`` (IANA registry of §8; 0 is reserved)."""

    SUPPORTED_PROFILES = 1
    UNSUPPORTED_VERSION = 2
    MEDIA_KEYS = 3
    TUNNELED_DTLS = 4
    ENDPOINT_DISCONNECT = 5


@attrs.frozen
class SupportedProfiles:
    """MDD -> KMF, first message on every tunnel connection (RFC 9185 §5.3, §6.2)."""

    version: int
    """Tunnel protocol version; 0 for RFC 9185."""
    protection_profiles: tuple[int, ...]
    """RFC 5764 SRTP protection profile codes the MDD can act as Media Distributor for."""


@attrs.frozen
class UnsupportedVersion:
    """KMF -> MDD answer to an unknown ``SupportedProfiles.version`` (RFC 9185 §5.5, §6.3)."""

    highest_version: int


@attrs.frozen
class MediaKeys:
    """KMF -> MDD hop-by-hop keys for one association (RFC 9185 §6.4; D4: outer halves)."""

    association_id: uuid.UUID
    protection_profile: int
    mki: bytes
    client_write_master_key: bytes
    server_write_master_key: bytes
    client_write_master_salt: bytes
    server_write_master_salt: bytes

    def __repr__(self) -> str:
        # Keep key material out of logs and tracebacks.
        return (
            f"MediaKeys(association_id={self.association_id}, "
            f"protection_profile=0x{self.protection_profile:04X}, mki={self.mki.hex()}, "
            f"key_lengths={len(self.client_write_master_key)}/"
            f"{len(self.server_write_master_key)}, salt_lengths="
            f"{len(self.client_write_master_salt)}/{len(self.server_write_master_salt)})"
        )


@attrs.frozen
class TunneledDtls:
    """One endpoint DTLS datagram, both directions (RFC 9185 §6.5)."""

    association_id: uuid.UUID
    dtls_message: bytes


@attrs.frozen
class EndpointDisconnect:
    """The endpoint's association has ended, both directions (RFC 9185 §6.6, D3)."""

    association_id: uuid.UUID


TunnelMessage = (
    SupportedProfiles | UnsupportedVersion | MediaKeys | TunneledDtls | EndpointDisconnect
)


# --- encoding (local values; misuse raises ValueError) ------------------------------------------


def _check_uint(name: str, value: int, bits: int) -> None:
    if not 0 <= value < (1 << bits):
        raise ValueError(f"{name}={value} does not fit uint{bits}")


def _frame(msg_type: MsgType, body: bytes) -> bytes:
    if len(body) > MAX_BODY:
        raise ValueError(f"{msg_type.name} body of {len(body)} bytes exceeds {MAX_BODY}")
    return _HEADER.pack(msg_type, len(body)) + body


def encode_message(msg: TunnelMessage) -> bytes:
    """Encode one tunnel message: 3-byte header plus body."""
    if isinstance(msg, TunneledDtls):
        n = len(msg.dtls_message)
        if not 1 <= n <= MAX_BODY - _UUID_LEN - 2:
            raise ValueError(f"dtls_message of {n} bytes outside <1..{MAX_BODY - 18}>")
        return (
            _DTLS_PREFIX.pack(MsgType.TUNNELED_DTLS, n + 18, msg.association_id.bytes, n)
            + msg.dtls_message
        )
    buf = Buffer()
    if isinstance(msg, SupportedProfiles):
        _check_uint("version", msg.version, 8)
        buf.push_uint8(msg.version)
        if msg.version != TUNNEL_VERSION and not msg.protection_profiles:
            # A later version's body we only know the version byte of (see decode).
            return _frame(MsgType.SUPPORTED_PROFILES, buf.data())
        for p in msg.protection_profiles:
            _check_uint("protection profile", p, 16)
        profiles = b"".join(p.to_bytes(2, "big") for p in msg.protection_profiles)
        buf.push_vector(2, profiles, floor=2, ceiling=MAX_BODY)
        return _frame(MsgType.SUPPORTED_PROFILES, buf.data())
    if isinstance(msg, UnsupportedVersion):
        _check_uint("highest_version", msg.highest_version, 8)
        buf.push_uint8(msg.highest_version)
        return _frame(MsgType.UNSUPPORTED_VERSION, buf.data())
    if isinstance(msg, MediaKeys):
        _check_uint("protection_profile", msg.protection_profile, 16)
        buf.push_bytes(msg.association_id.bytes)
        buf.push_uint16(msg.protection_profile)
        buf.push_vector(1, msg.mki, floor=0, ceiling=255)
        buf.push_vector(1, msg.client_write_master_key, floor=1, ceiling=255)
        buf.push_vector(1, msg.server_write_master_key, floor=1, ceiling=255)
        buf.push_vector(1, msg.client_write_master_salt, floor=1, ceiling=255)
        buf.push_vector(1, msg.server_write_master_salt, floor=1, ceiling=255)
        return _frame(MsgType.MEDIA_KEYS, buf.data())
    if isinstance(msg, EndpointDisconnect):
        return _frame(MsgType.ENDPOINT_DISCONNECT, msg.association_id.bytes)
    raise TypeError(f"not a tunnel message: {msg!r}")


# --- decoding (untrusted bytes; raises TunnelDecodeError only) ---------------------------------


def _pull_profiles(buf: Buffer) -> tuple[int, ...]:
    raw = buf.pull_vector(2, floor=2, ceiling=MAX_BODY)
    if len(raw) % 2:
        raise TunnelDecodeError(f"protection_profiles length {len(raw)} is odd")
    buf.expect_end()
    return tuple(int.from_bytes(raw[i : i + 2], "big") for i in range(0, len(raw), 2))


def _decode_supported_profiles(buf: Buffer) -> SupportedProfiles:
    version = buf.pull_uint8()
    if version == TUNNEL_VERSION:
        return SupportedProfiles(version=version, protection_profiles=_pull_profiles(buf))
    # RFC 9185 §5.5: the version decides the rest of the layout. For a version we do not
    # know, read the version 0 layout if it is there, else keep only the version, so that
    # the KMF answers UnsupportedVersion rather than treating the message as malformed.
    try:
        profiles = _pull_profiles(buf)
    except DecodeError:
        profiles = ()
    return SupportedProfiles(version=version, protection_profiles=profiles)


def _decode_unsupported_version(buf: Buffer) -> UnsupportedVersion:
    highest = buf.pull_uint8()
    buf.expect_end()
    return UnsupportedVersion(highest_version=highest)


def _decode_media_keys(buf: Buffer) -> MediaKeys:
    association_id = uuid.UUID(bytes=buf.pull_bytes(_UUID_LEN))
    profile = buf.pull_uint16()
    mki = buf.pull_vector(1, floor=0, ceiling=255)
    ck = buf.pull_vector(1, floor=1, ceiling=255)
    sk = buf.pull_vector(1, floor=1, ceiling=255)
    cs = buf.pull_vector(1, floor=1, ceiling=255)
    ss = buf.pull_vector(1, floor=1, ceiling=255)
    buf.expect_end()
    return MediaKeys(
        association_id=association_id,
        protection_profile=profile,
        mki=mki,
        client_write_master_key=ck,
        server_write_master_key=sk,
        client_write_master_salt=cs,
        server_write_master_salt=ss,
    )


def _decode_tunneled_dtls(body: bytes) -> TunneledDtls:
    # Hot path: slicing instead of Buffer; the checks are the same as pull_vector's.
    if len(body) < _UUID_LEN + 2:
        raise TunnelDecodeError(f"TunneledDtls body of {len(body)} bytes is too short")
    n = int.from_bytes(body[_UUID_LEN : _UUID_LEN + 2], "big")
    if n == 0:
        raise TunnelDecodeError("TunneledDtls dtls_message is empty (must be <1..2^16-1>)")
    if len(body) != _UUID_LEN + 2 + n:
        raise TunnelDecodeError(
            f"TunneledDtls dtls_message declares {n} bytes, body carries "
            f"{len(body) - _UUID_LEN - 2}"
        )
    return TunneledDtls(
        association_id=uuid.UUID(bytes=bytes(body[:_UUID_LEN])),
        dtls_message=bytes(body[_UUID_LEN + 2 :]),
    )


def _decode_endpoint_disconnect(body: bytes) -> EndpointDisconnect:
    if len(body) != _UUID_LEN:
        raise TunnelDecodeError(f"EndpointDisconnect body is {len(body)} bytes, not 16")
    return EndpointDisconnect(association_id=uuid.UUID(bytes=bytes(body)))


def decode_message(msg_type: int, body: bytes) -> TunnelMessage:
    """Decode the body of one tunnel message of type ``msg_type`` (untrusted input).

    Raises :class:`TunnelDecodeError` for an unknown type or a body that does not parse
    exactly; nothing else.
    """
    try:
        if msg_type == MsgType.TUNNELED_DTLS:
            return _decode_tunneled_dtls(body)
        if msg_type == MsgType.ENDPOINT_DISCONNECT:
            return _decode_endpoint_disconnect(body)
        if msg_type == MsgType.MEDIA_KEYS:
            return _decode_media_keys(Buffer(body))
        if msg_type == MsgType.SUPPORTED_PROFILES:
            return _decode_supported_profiles(Buffer(body))
        if msg_type == MsgType.UNSUPPORTED_VERSION:
            return _decode_unsupported_version(Buffer(body))
    except TunnelDecodeError:
        raise
    except DecodeError as e:
        raise TunnelDecodeError(f"malformed {MsgType(msg_type).name} body: {e}") from None
    raise TunnelDecodeError(f"unknown tunnel msg_type {msg_type}")


class TunnelFramer:
    """Turns the tunnel's TLS byte stream into messages (RFC 9185 §6.1 framing).

    One TLS read may hold several messages or a fragment of one; :meth:`feed` returns every
    message completed by ``data`` and keeps the incomplete tail. The tail is bounded: a
    header declaring a body over ``max_body`` or naming an unknown type is an error as soon
    as the 3 header bytes arrive, so at most ``HEADER_SIZE + max_body - 1`` bytes are ever
    held. After an error the stream has lost framing for good (D2: close the tunnel), and
    every later :meth:`feed` raises again. Messages completed earlier in the failing call
    are discarded with it: the tunnel is being closed anyway.
    """

    __slots__ = ("_buf", "_failed", "_ids", "max_body")

    #: Association ids seen recently, so that the relay's hot path does not build a new
    #: uuid.UUID (about 1 us) per message. Bounded: cleared when it reaches this size.
    ID_CACHE_SIZE = 4096

    def __init__(self, max_body: int = MAX_BODY) -> None:
        if not 0 <= max_body <= MAX_BODY:
            raise ValueError(f"max_body must be in 0..{MAX_BODY}")
        self.max_body = max_body
        self._buf = bytearray()
        self._failed: str | None = None
        self._ids: dict[bytes, uuid.UUID] = {}

    @property
    def pending(self) -> int:
        """Bytes of an incomplete message held."""
        return len(self._buf)

    def feed(self, data: bytes | bytearray | memoryview) -> list[TunnelMessage]:
        """Add stream bytes; return the messages they complete, in order."""
        if self._failed is not None:
            raise TunnelDecodeError(f"tunnel stream already failed: {self._failed}")
        if self._buf:
            self._buf += data
            chunk = bytes(self._buf)
        else:
            chunk = data if isinstance(data, bytes) else bytes(data)
        try:
            out, used = self._parse(chunk)
        except TunnelDecodeError as e:
            self._failed = str(e)
            self._buf = bytearray()
            raise
        self._buf = bytearray(chunk[used:]) if used < len(chunk) else bytearray()
        return out

    def _parse(self, chunk: bytes) -> tuple[list[TunnelMessage], int]:
        out: list[TunnelMessage] = []
        ids = self._ids
        pos = 0
        end = len(chunk)
        while end - pos >= HEADER_SIZE:
            msg_type, length = _HEADER.unpack_from(chunk, pos)
            if not MsgType.SUPPORTED_PROFILES <= msg_type <= MsgType.ENDPOINT_DISCONNECT:
                raise TunnelDecodeError(f"unknown tunnel msg_type {msg_type}")
            if length > self.max_body:
                raise TunnelDecodeError(
                    f"declared body length {length} exceeds the limit {self.max_body}"
                )
            start = pos + HEADER_SIZE
            stop = start + length
            if stop > end:
                break
            if (
                msg_type == MsgType.TUNNELED_DTLS
                and length > _UUID_LEN + 2
                and int.from_bytes(chunk[start + _UUID_LEN : start + _UUID_LEN + 2], "big")
                == length - _UUID_LEN - 2
            ):
                # Hot path: a well-formed TunneledDtls, decoded in place (same checks as
                # _decode_tunneled_dtls, which handles and reports every malformed case).
                key = chunk[start : start + _UUID_LEN]
                association_id = ids.get(key)
                if association_id is None:
                    if len(ids) >= self.ID_CACHE_SIZE:
                        ids.clear()
                    association_id = ids[key] = uuid.UUID(bytes=key)
                out.append(TunneledDtls(association_id, chunk[start + _UUID_LEN + 2 : stop]))
            else:
                out.append(decode_message(msg_type, chunk[start:stop]))
            pos = stop
        return out, pos
