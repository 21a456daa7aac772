"""perc's own sans-IO DTLS 1.2 engine for DTLS-SRTP with EKT.

Public API (the contract, as built)::

    from perc.dtls import DtlsConfiguration, DtlsConnection, CookieGate, events, errors

    DtlsConfiguration(                      # attrs frozen, perc.dtls.config
        is_client, certificate, private_key,
        cipher_suites=(0xC02B, 0xC02C, 0xCCA9), groups=(29, 23),
        srtp_profiles=(0x0009, 0x000A), select_srtp_profile=None,   # server callback
        ekt_ciphers=(1, 2), require_ekt=False,
        inspect_client_offer=None,          # server: (ClientOffer) -> None | alert code
        tls_id=None, expected_peer_tls_id=None,
        verify_peer=None,                   # (PeerIdentity) -> None | alert code
        mtu=1200, handshake_timeout=60.0, keylog=None)               # keylog(str)
    PeerIdentity(certificate_der, fingerprint, tls_id, negotiated=None)

    conn = DtlsConnection(configuration, *, cookie_identity=b"")
    conn.connect(now)                       # client: queue the ClientHello
    conn.receive_datagram(data, now)        # never raises on peer input
    conn.datagrams_to_send() -> list[bytes] # each <= mtu
    conn.next_event() -> Event | None
    conn.get_timer() -> float | None        # absolute time; None when nothing is pending
    conn.handle_timer(now)
    conn.send_ekt_key(key, salt, spi, ttl, now)  # server, after HandshakeCompleted with EKT
    conn.send_application_data(data, now)
    conn.close(now)                         # close_notify; idempotent
    conn.abort(description, now)            # fatal alert of the caller's choosing; idempotent
    conn.export_keying_material(label, length)   # RFC 5705 without context
    conn.stats                              # DtlsStats counters (drops, retransmissions, ...)
    conn.negotiated                         # Negotiated | None (set on completion)
    conn.is_established, conn.is_closed, conn.state, conn.cookie_identity
    conn.export_record_state() -> RecordState   # server, established: keys, IVs, numbers
    DtlsConnection.resume(configuration, state, *, next_sequence, cookie_identity=b"")
    conn.next_record_sequence               # next epoch-1 record number we send
    RecordState.encode() / decode_record_state(bytes)   # RecordStateError (perc.dtls.resume)

    gate = CookieGate(secret=None, rotate_every=60.0)
    gate.check(datagram, identity, now) -> CookieVerdict(reply: bytes | None, accepted: bool)
    client_offer_untrusted(datagram) -> ClientOffer | None   # a whole ClientHello's offer

    Negotiated(cipher_suite, named_group, srtp_profile, ekt_cipher, client_random,
               server_random, local_tls_id, peer_tls_id, peer_fingerprint, peer_certificate_der)
    ClientOffer(client_random, cipher_suites, use_srtp, srtp_profiles, srtp_mki,
                supported_ekt_ciphers, ekt_ciphers, tls_id, cookie)

    events.ClientHelloReceived(offer)                # server, before it answers or refuses
    events.HandshakeCompleted(cipher_suite, srtp_profile, ekt_cipher, peer_certificate_der,
                              peer_fingerprint, peer_tls_id, srtp_keying_material, negotiated)
    events.EktKeyReceived(key, salt, spi, ttl)       # client
    events.EktKeyAcknowledged(spi)                   # server
    events.ApplicationDataReceived(data)
    events.AlertReceived(level, description)         # every alert received
    events.ConnectionClosed(alert, sent_by_peer, reason)
        # reason: "close_notify", "timeout", "alert sent: <name>: <why>",
        # "alert received: <name>"; alert None only for a timeout

    errors.LocalProtocolError   # caller misuse, raised to the caller
    errors.AlertError           # peer misbehaviour inside the engine (carries .description)
    errors.AlertDescription     # IntEnum of the alert codes

Behaviour worth knowing for callers:

* The server numbers its flight from the ClientHello (stateless cookie echo), so a connection
  created after ``CookieGate.check(...).accepted`` must be fed that same datagram.
* A ClientHello with a new random on a live server association is dropped (counted): a
  restarted client needs a new ``DtlsConnection`` (route it through the gate);
  ``client_offer_untrusted(datagram).client_random`` tells it apart from a retransmission.
* A server refuses at the ClientHello, with handshake_failure and before sending its flight,
  an offer without use_srtp (when it has profiles), without a common profile, or (with
  ``require_ekt``) without a common EKT cipher; ``inspect_client_offer`` may refuse more.
* ``send_ekt_key`` supersedes an unacknowledged EKTKey; retransmission runs on its own timer
  (1 s doubling to 60 s) and gives up after 10 x ``handshake_timeout`` with ConnectionClosed
  ``"timeout"``.
* Peer certificates are validated once per distinct DER (LRU cache of 1024).

Layers: ``perc.wire.dtls`` (codecs), ``record`` (protection, replay), ``flight``
(fragmentation, reassembly, timers), ``handshake`` (state machine: every transition in its one
table), ``keys`` (PRF, key schedule, exporter), ``connection`` (the glue), ``cookie``
(stateless HVR), ``offer`` (a ClientHello's offer for callers that must not parse bytes).
"""

from perc.dtls import errors, events
from perc.dtls.config import DtlsConfiguration, PeerIdentity
from perc.dtls.connection import DtlsConnection, DtlsStats
from perc.dtls.cookie import CookieGate, CookieVerdict
from perc.dtls.errors import AlertDescription, LocalProtocolError
from perc.dtls.events import ClientOffer, Negotiated
from perc.dtls.offer import client_offer_untrusted
from perc.dtls.resume import RecordState, RecordStateError, decode_record_state

__all__ = [
    "AlertDescription",
    "ClientOffer",
    "CookieGate",
    "CookieVerdict",
    "DtlsConfiguration",
    "DtlsConnection",
    "DtlsStats",
    "LocalProtocolError",
    "Negotiated",
    "PeerIdentity",
    "RecordState",
    "RecordStateError",
    "client_offer_untrusted",
    "decode_record_state",
    "errors",
    "events",
]
