"""Stateless HelloVerifyRequest cookies for the server (RFC 6347 §4.2.1, D14).

The gate looks at a datagram *before* any per-client state exists. A ClientHello with a valid
cookie is ``accepted`` (the caller then creates a ``DtlsConnection(server_config,
cookie_identity=identity)`` and feeds it the same datagram); any other ClientHello gets a
HelloVerifyRequest ``reply``; anything else gets neither. The only state is the secret and
the two derived period keys, so a ClientHello flood allocates nothing (D14).

Cookie layout (17 bytes)::

    key_id(1) || trunc16(HMAC-SHA256(period_key[key_id],
        identity || client_version || random || len8(session_id) || len16(cipher_suites)
        || len8(compression_methods)))

``identity`` replaces the client address of RFC 6347 (the KMF passes the association id); the
ClientHello fields are those the client must repeat (§4.2.1); extensions are left out because
DTLS 1.3-capable clients may change them. ``period_key[p] = HMAC(secret, "perc cookie" || p)``
with ``p = floor(now / rotate_every)``; the current and the previous period are accepted, so a
cookie lives between one and two periods. The HVR echoes the ClientHello's record sequence
number and message_seq (RFC 6347 §4.2.1) and uses version 0xFEFF as OpenSSL does.
"""

from __future__ import annotations

import hmac as std_hmac
import os

import attrs
from cryptography.hazmat.primitives import hashes, hmac

from perc.dtls.offer import first_client_hello_untrusted
from perc.wire.dtls import (
    DTLS_1_0,
    ClientHello,
    ContentType,
    HandshakeType,
    HelloVerifyRequest,
    encode_handshake,
    encode_record_header,
)

COOKIE_LENGTH = 17


@attrs.frozen
class CookieVerdict:
    reply: bytes | None = None
    accepted: bool = False


class CookieGate:
    __slots__ = ("_keys", "_rotate_every", "_secret")

    def __init__(self, secret: bytes | None = None, rotate_every: float = 60.0) -> None:
        self._secret = os.urandom(32) if secret is None else secret
        if rotate_every <= 0:
            raise ValueError("rotate_every must be positive")
        self._rotate_every = rotate_every
        self._keys: dict[int, bytes] = {}  # at most the two live periods

    def _period_key(self, period: int) -> bytes:
        key = self._keys.get(period)
        if key is None:
            h = hmac.HMAC(self._secret, hashes.SHA256())
            h.update(b"perc cookie" + period.to_bytes(8, "big", signed=True))
            key = h.finalize()
            if len(self._keys) >= 2:
                for old in sorted(self._keys)[:-1]:
                    del self._keys[old]
            self._keys[period] = key
        return key

    def _cookie(self, period: int, identity: bytes, ch: ClientHello) -> bytes:
        h = hmac.HMAC(self._period_key(period), hashes.SHA256())
        suites = b"".join(s.to_bytes(2, "big") for s in ch.cipher_suites)
        h.update(
            identity
            + ch.client_version.to_bytes(2, "big")
            + ch.random
            + bytes((len(ch.session_id),))
            + ch.session_id
            + len(suites).to_bytes(2, "big")
            + suites
            + bytes((len(ch.compression_methods),))
            + ch.compression_methods
        )
        return bytes((period & 0xFF,)) + h.finalize()[:16]

    def check(self, datagram: bytes, identity: bytes, now: float) -> CookieVerdict:
        first = first_client_hello_untrusted(datagram)
        if first is None:
            return CookieVerdict()
        rec, frag, ch = first.record, first.fragment, first.hello
        period = int(now // self._rotate_every)
        cookie = ch.cookie
        if len(cookie) == COOKIE_LENGTH:
            for p in (period, period - 1):
                if p & 0xFF == cookie[0] and std_hmac.compare_digest(
                    cookie, self._cookie(p, identity, ch)
                ):
                    return CookieVerdict(accepted=True)
        # Missing or invalid cookie: a fresh HVR (RFC 6347 §4.2.1), echoing both sequence
        # numbers of the ClientHello (RFC 6347 §4.2.1, §4.2.2).
        body = HelloVerifyRequest(DTLS_1_0, self._cookie(period, identity, ch)).encode()
        message = encode_handshake(HandshakeType.HELLO_VERIFY_REQUEST, frag.message_seq, body)
        header = encode_record_header(
            ContentType.HANDSHAKE, DTLS_1_0, 0, rec.sequence_number, len(message)
        )
        return CookieVerdict(reply=header + message)
