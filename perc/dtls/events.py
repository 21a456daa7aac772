"""Events a :class:`~perc.dtls.connection.DtlsConnection` hands out through ``next_event()``."""

from __future__ import annotations

import attrs


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
    HandshakeCompleted
    | EktKeyReceived
    | EktKeyAcknowledged
    | ApplicationDataReceived
    | AlertReceived
    | ConnectionClosed
)
