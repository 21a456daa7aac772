"""Configuration of a DTLS endpoint and the peer identity handed to the certificate policy."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from perc.dtls.events import ClientOffer, Negotiated
from perc.identity import fingerprint_of_der
from perc.srtp.keys import SrtpProfile


@attrs.frozen
class PeerIdentity:
    """What ``verify_peer`` sees: the peer's certificate, its D20 fingerprint, its tls-id.

    ``negotiated``: everything the handshake has settled by then (it is called once the peer's
    certificate is proven, after the hellos), e.g. the EKT cipher a server's policy may check.
    """

    certificate_der: bytes
    fingerprint: str
    tls_id: bytes | None
    negotiated: Negotiated | None = None


@attrs.frozen
class DtlsConfiguration:
    """One side of a DTLS 1.2 association (D17). The defaults are perc's profile."""

    is_client: bool
    certificate: x509.Certificate
    private_key: ec.EllipticCurvePrivateKey
    #: offered (client) or accepted in preference order (server)
    cipher_suites: tuple[int, ...] = (0xC02B, 0xC02C, 0xCCA9)
    #: ECDHE groups: x25519, secp256r1
    groups: tuple[int, ...] = (29, 23)
    #: client: offered, in order; server: preference order for the default selection
    srtp_profiles: tuple[int, ...] = tuple(int(p) for p in SrtpProfile if p.is_double)
    #: server: given the client's offered list, the chosen profile or None
    #: (-> fatal handshake_failure). Default: first of ``srtp_profiles`` the client offered.
    #: A server with profiles refuses a ClientHello without use_srtp (handshake_failure).
    select_srtp_profile: Callable[[Sequence[int]], int | None] | None = None
    #: client offers; server picks the first it supports; () = no EKT
    ekt_ciphers: tuple[int, ...] = (1, 2)
    #: refuse (handshake_failure) a peer that does not negotiate one of ``ekt_ciphers``; the
    #: server refuses at the ClientHello, before sending anything (a PERC KMF needs EKT)
    require_ekt: bool = False
    #: server: sees the ClientHello's offer before anything is chosen; None goes on, an alert
    #: code refuses at once, before any server flight
    inspect_client_offer: Callable[[ClientOffer], int | None] | None = None
    #: our tls-id, sent in external_session_id (ext 56, RFC 8844)
    tls_id: bytes | None = None
    #: client: require the server's ext 56 to equal this (RFC 8844; else illegal_parameter)
    expected_peer_tls_id: bytes | None = None
    #: None accepts the peer; an int refuses it with that alert (KMF 49, endpoint 42)
    verify_peer: Callable[[PeerIdentity], int | None] | None = None
    #: largest datagram we produce
    mtu: int = 1200
    #: overall handshake deadline in seconds (then ConnectionClosed reason "timeout")
    handshake_timeout: float = 60.0
    #: receives "CLIENT_RANDOM <hex> <hex>" lines (D21)
    keylog: Callable[[str], None] | None = None


@functools.lru_cache(maxsize=64)
def own_certificate_der(certificate: x509.Certificate) -> bytes:
    """Our certificate's DER, computed once per certificate object."""
    return certificate.public_bytes(serialization.Encoding.DER)


@functools.lru_cache(maxsize=64)
def own_fingerprint(certificate: x509.Certificate) -> str:
    return fingerprint_of_der(own_certificate_der(certificate))
