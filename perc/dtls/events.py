"""Events a :class:`~perc.dtls.connection.DtlsConnection` hands out through ``next_event()``."""

from __future__ import annotations

import attrs


@attrs.frozen
class ClientOffer:
    """What a ClientHello offers, decoded once by the engine so that no caller reads handshake
    bytes. ``use_srtp`` / ``supported_ekt_ciphers`` say whether the extension was present
    (RFC 5764 §4.1.1, RFC 8870 §5.2.1): an empty list and a missing extension differ."""

    client_random: bytes
    cipher_suites: tuple[int, ...]
    use_srtp: bool
    srtp_profiles: tuple[int, ...]
    srtp_mki: bytes
    supported_ekt_ciphers: bool
    ekt_ciphers: tuple[int, ...]
    #: external_session_id (RFC 8844), None when absent
    tls_id: bytes | None
    cookie: bytes


@attrs.frozen
class Negotiated:
    """What one handshake settled, the same on both sides except for local/peer."""

    cipher_suite: int
    named_group: int
    #: None only when neither side configured SRTP profiles (plain DTLS)
    srtp_profile: int | None
    #: None when EKT was not negotiated (RFC 8870 §5.2.1: the server omitted the extension)
    ekt_cipher: int | None
    client_random: bytes
    server_random: bytes
    #: our external_session_id as sent (RFC 8844), None when we sent none
    local_tls_id: bytes | None
    peer_tls_id: bytes | None
    #: "sha-256 AB:CD:..." (D20, :func:`perc.identity.fingerprint_of_der`)
    peer_fingerprint: str
    peer_certificate_der: bytes


@attrs.frozen
class ClientHelloReceived:
    """Server: the ClientHello this association answers (or refuses), before any decision."""

    offer: ClientOffer


@attrs.frozen
class HandshakeCompleted:
    cipher_suite: int
    srtp_profile: int | None
    ekt_cipher: int | None
    peer_certificate_der: bytes
    peer_fingerprint: str
    peer_tls_id: bytes | None
    # EXTRACTOR-dtls_srtp, 2 * (key + salt) bytes for the profile (RFC 5764 §4.2); None when no
    # SRTP profile was negotiated or its lengths are unknown.
    srtp_keying_material: bytes | None
    #: everything the handshake settled, in one value
    negotiated: Negotiated


@attrs.frozen
class EktKeyReceived:
    key: bytes
    salt: bytes
    spi: int
    ttl: int


@attrs.frozen
class EktKeyAcknowledged:
    spi: int


@attrs.frozen
class ApplicationDataReceived:
    data: bytes


@attrs.frozen
class AlertReceived:
    level: int
    description: int


@attrs.frozen
class ConnectionClosed:
    """The association ended.

    ``alert``: the alert that ended it (0 = close_notify), None for a timeout.
    ``sent_by_peer``: True when the peer sent that alert.
    ``reason``: ``"close_notify"``, ``"timeout"``, or a short text naming the fatal alert.
    """

    alert: int | None
    sent_by_peer: bool
    reason: str


Event = (
    ClientHelloReceived
    | HandshakeCompleted
    | EktKeyReceived
    | EktKeyAcknowledged
    | ApplicationDataReceived
    | AlertReceived
    | ConnectionClosed
)
