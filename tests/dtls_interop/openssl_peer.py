"""A pyOpenSSL DTLS 1.2 peer with perc's sans-IO surface, for interop tests and the benchmark.

Theory of operation
-------------------
pyOpenSSL gives a ``Connection`` two memory BIOs: we ``bio_write`` an incoming datagram and
then let OpenSSL run (``do_handshake``/``DTLSv1_listen``/``read``) until it wants more input, so
OpenSSL sees exactly one datagram per read. Outgoing bytes come out of ``bio_read`` as one byte
stream (a memory BIO, unlike a socket, keeps no datagram boundaries), so we cut that stream into
DTLS records (13-byte header with a length, RFC 6347 §4.1) and pack whole records greedily into
datagrams of at most ``mtu`` bytes. Records never span datagrams (§4.1.1), so the result is a
valid datagram sequence of the kind OpenSSL would have written to a UDP socket.

OpenSSL's own retransmission timers read the wall clock, so this peer is for clean in-memory
networks only: ``get_timer`` returns None and ``handle_timer`` asks OpenSSL whether its real
timer expired (harmless). Interop tests pump pairs to completion without loss.

Surface shared with :class:`perc.dtls.DtlsConnection` (through ``harness.EnginePeer``):
``connect(now)``, ``receive_datagram(data, now)``, ``datagrams_to_send()``, ``get_timer()``,
``handle_timer(now)``, ``handshake_complete``, ``failed``, ``export_keying_material``.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Sequence

from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL
from OpenSSL._util import lib as _lib

from perc.identity import Identity

DTLS1_2_VERSION = 0xFEFD
RECORD_HEADER_LENGTH = 13
EXPORTER_LABEL = b"EXTRACTOR-dtls_srtp"

# IANA cipher suite code -> OpenSSL name (RFC 5289 §3.2, RFC 7905 §2).
CIPHER_NAMES: dict[int, str] = {
    0xC02B: "ECDHE-ECDSA-AES128-GCM-SHA256",
    0xC02C: "ECDHE-ECDSA-AES256-GCM-SHA384",
    0xCCA9: "ECDHE-ECDSA-CHACHA20-POLY1305",
}
CIPHER_CODES: dict[str, int] = {name: code for code, name in CIPHER_NAMES.items()}

# use_srtp profile code -> OpenSSL name (RFC 7714 §14.2, RFC 8723 §8.2).
SRTP_PROFILE_NAMES: dict[int, str] = {
    0x0007: "SRTP_AEAD_AES_128_GCM",
    0x0008: "SRTP_AEAD_AES_256_GCM",
    0x0009: "SRTP_DOUBLE_AEAD_AES_128_GCM_AEAD_AES_128_GCM",
    0x000A: "SRTP_DOUBLE_AEAD_AES_256_GCM_AEAD_AES_256_GCM",
}
SRTP_PROFILE_CODES: dict[str, int] = {name: code for code, name in SRTP_PROFILE_NAMES.items()}

# Exporter length per profile: 2 * (key + salt) (RFC 5764 §4.2; API.md key lengths).
SRTP_EXPORTER_LENGTH: dict[int, int] = {
    0x0007: 2 * (16 + 12),
    0x0008: 2 * (32 + 12),
    0x0009: 2 * (32 + 24),
    0x000A: 2 * (64 + 24),
}

GROUP_NAMES: dict[int, str] = {29: "X25519", 23: "P-256"}


class OpensslPeerError(Exception):
    """The OpenSSL peer failed its handshake (carries OpenSSL's error)."""


def split_records(stream: bytes) -> list[bytes]:
    """Cut a byte stream of DTLS records into records (trusted input: OpenSSL's own output)."""
    records = []
    pos = 0
    while pos + RECORD_HEADER_LENGTH <= len(stream):
        length = int.from_bytes(stream[pos + 11 : pos + 13], "big")
        end = pos + RECORD_HEADER_LENGTH + length
        records.append(stream[pos:end])
        pos = end
    if pos != len(stream):
        raise OpensslPeerError(f"OpenSSL wrote a partial record: {stream[pos:].hex()}")
    return records


def pack_records(records: Sequence[bytes], mtu: int) -> list[bytes]:
    """Pack whole records into datagrams of at most ``mtu`` bytes (a lone record may exceed it)."""
    datagrams: list[bytes] = []
    current = b""
    for record in records:
        if current and len(current) + len(record) > mtu:
            datagrams.append(current)
            current = b""
        current += record
    if current:
        datagrams.append(current)
    return datagrams


def build_context(
    identity: Identity,
    *,
    cipher_suites: Sequence[int] = (0xC02B, 0xC02C, 0xCCA9),
    groups: Sequence[int] = (29, 23),
    srtp_profiles: Sequence[int] = (0x0007, 0x0008, 0x0009, 0x000A),
    cookie_exchange: bool = False,
) -> SSL.Context:
    """A DTLS 1.2-only context with perc's profile, for one or many OpensslPeers."""
    ctx = SSL.Context(SSL.DTLS_METHOD)
    ctx.set_min_proto_version(DTLS1_2_VERSION)
    ctx.set_max_proto_version(DTLS1_2_VERSION)
    ctx.set_cipher_list(":".join(CIPHER_NAMES[c] for c in cipher_suites).encode())
    groups_list = ":".join(GROUP_NAMES[g] for g in groups).encode()
    if _lib.SSL_CTX_set1_curves_list(ctx._context, groups_list) != 1:
        raise OpensslPeerError(f"OpenSSL refused groups {groups_list!r}")
    ctx.set_tlsext_use_srtp(":".join(SRTP_PROFILE_NAMES[p] for p in srtp_profiles).encode())
    ctx.use_certificate(identity.certificate)
    ctx.use_privatekey(identity.private_key)
    ctx.check_privatekey()
    # We pin fingerprints ourselves; accept any (self-signed) certificate, but require one
    # from the client (mutual authentication, D17).
    ctx.set_verify(
        SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT,
        lambda conn, cert, errno, depth, ok: True,
    )
    # The memory BIO cannot answer an MTU query; the peer fixes the MTU itself.
    ctx.set_options(SSL.OP_NO_QUERY_MTU | SSL.OP_NO_TICKET)
    ctx.set_keylog_callback(lambda conn, line: conn.get_app_data().on_keylog(line))
    if cookie_exchange:
        ctx.set_cookie_generate_callback(lambda conn: conn.get_app_data().generate_cookie())
        ctx.set_cookie_verify_callback(
            lambda conn, cookie: conn.get_app_data().verify_cookie(cookie)
        )
    return ctx


class OpensslPeer:
    """One side of a DTLS 1.2 association run by OpenSSL over memory BIOs."""

    def __init__(
        self,
        *,
        is_client: bool,
        identity: Identity,
        cipher_suites: Sequence[int] = (0xC02B, 0xC02C, 0xCCA9),
        groups: Sequence[int] = (29, 23),
        srtp_profiles: Sequence[int] = (0x0007, 0x0008, 0x0009, 0x000A),
        mtu: int = 1200,
        cookie_exchange: bool = False,
        one_record_per_datagram: bool = False,
        context: SSL.Context | None = None,
    ) -> None:
        """``context``: a prebuilt :func:`build_context` to share (then the identity, suite,
        group, profile and cookie options given here are not applied)."""
        self.is_client = is_client
        self.identity = identity
        self.mtu = mtu
        self.one_record_per_datagram = one_record_per_datagram
        self.cookie_exchange = cookie_exchange and not is_client
        self.keylog_lines: list[str] = []
        self.handshake_complete = False
        self.failed: Exception | None = None
        self.datagrams_received = 0
        self.application_data: list[bytes] = []
        self.peer_closed = False
        self.cookies_generated = 0
        self.cookies_verified = 0
        self._cookie_secret = os.urandom(32)
        self._listening = self.cookie_exchange

        if context is None:
            context = build_context(
                identity,
                cipher_suites=cipher_suites,
                groups=groups,
                srtp_profiles=srtp_profiles,
                cookie_exchange=self.cookie_exchange,
            )
        self.context = context
        self.connection = SSL.Connection(context, None)
        self.connection.set_app_data(self)
        self.connection.set_ciphertext_mtu(mtu)
        if is_client:
            self.connection.set_connect_state()
        else:
            self.connection.set_accept_state()

    # -- callbacks (called through the context with the connection's app data) -------------
    def on_keylog(self, line: bytes) -> None:
        self.keylog_lines.append(line.decode("ascii"))

    def _cookie(self) -> bytes:
        # A memory BIO has no peer address; one peer per object, so the secret alone binds it.
        return hmac.new(self._cookie_secret, b"openssl-peer-cookie", hashlib.sha256).digest()[:20]

    def generate_cookie(self) -> bytes:
        self.cookies_generated += 1
        return self._cookie()

    def verify_cookie(self, cookie: bytes) -> bool:
        ok = hmac.compare_digest(cookie, self._cookie())
        self.cookies_verified += ok
        return ok

    # -- sans-IO surface ------------------------------------------------------------------
    def connect(self, now: float) -> None:
        self._drive()

    def receive_datagram(self, data: bytes, now: float) -> None:
        self.datagrams_received += 1
        self.connection.bio_write(data)
        self._drive()

    def datagrams_to_send(self) -> list[bytes]:
        chunks = []
        while True:
            try:
                chunks.append(self.connection.bio_read(65536))
            except SSL.WantReadError:
                break
        if not chunks:
            return []
        records = split_records(b"".join(chunks))
        if self.one_record_per_datagram:
            return records
        return pack_records(records, self.mtu)

    def get_timer(self) -> float | None:
        return None

    def handle_timer(self, now: float) -> None:
        if self.failed is None:
            self.connection.DTLSv1_handle_timeout()

    def send_application_data(self, data: bytes) -> None:
        self.connection.send(data)

    def export_keying_material(self, label: bytes, length: int) -> bytes:
        return self.connection.export_keying_material(label, length)

    # -- negotiated parameters ------------------------------------------------------------
    @property
    def srtp_profile(self) -> int | None:
        name = self.connection.get_selected_srtp_profile().decode()
        return SRTP_PROFILE_CODES[name] if name else None

    @property
    def cipher_suite(self) -> int:
        name = self.connection.get_cipher_name()
        if name is None:
            raise OpensslPeerError("no cipher negotiated")
        return CIPHER_CODES[name]

    @property
    def srtp_keying_material(self) -> bytes | None:
        profile = self.srtp_profile
        if profile is None:
            return None
        return self.export_keying_material(EXPORTER_LABEL, SRTP_EXPORTER_LENGTH[profile])

    @property
    def peer_certificate_der(self) -> bytes | None:
        cert = self.connection.get_peer_certificate(as_cryptography=True)
        return None if cert is None else cert.public_bytes(serialization.Encoding.DER)

    @property
    def group_name(self) -> str | None:
        return self.connection.get_group_name()

    @property
    def client_random(self) -> bytes | None:
        return self.connection.client_random()

    @property
    def server_random(self) -> bytes | None:
        return self.connection.server_random()

    # -- internals ------------------------------------------------------------------------
    def _drive(self) -> None:
        if self.failed is not None:
            return
        try:
            if self._listening:
                try:
                    self.connection.DTLSv1_listen()
                except SSL.WantReadError:
                    return
                # A ClientHello with a valid cookie: OpenSSL keeps it and accept() goes on.
                self._listening = False
            if not self.handshake_complete:
                self.connection.do_handshake()
                self.handshake_complete = True
            # After the handshake: consume retransmissions, alerts, application data.
            while True:
                self.application_data.append(self.connection.recv(65536))
        except SSL.WantReadError:
            pass
        except SSL.ZeroReturnError:
            self.peer_closed = True
        except SSL.Error as e:
            self.failed = e
