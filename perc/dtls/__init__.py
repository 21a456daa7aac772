"""perc's own sans-IO DTLS 1.2 engine for DTLS-SRTP with EKT (issue 6).

Public API (API.md)::

    from perc.dtls import DtlsConfiguration, DtlsConnection, CookieGate, events, errors

* :class:`DtlsConfiguration` (``perc.dtls.config``), :class:`PeerIdentity`
* :class:`DtlsConnection` (``perc.dtls.connection``): connect / receive_datagram /
  datagrams_to_send / next_event / get_timer / handle_timer / send_ekt_key /
  send_application_data / close / export_keying_material / stats
* :class:`CookieGate` (``perc.dtls.cookie``): ``check(datagram, identity, now) ->
  CookieVerdict(reply, accepted)``
* ``events``: HandshakeCompleted, EktKeyReceived, EktKeyAcknowledged,
  ApplicationDataReceived, AlertReceived, ConnectionClosed
* ``errors``: LocalProtocolError (caller misuse), AlertError (peer misbehaviour, internal),
  AlertDescription codes

Layers: ``perc.wire.dtls`` (codecs), ``record`` (protection, replay), ``flight``
(fragmentation, reassembly, timers), ``handshake`` (state machine), ``keys`` (PRF, key
schedule, exporter), ``connection`` (the glue), ``cookie`` (stateless HVR).
"""

from perc.dtls import errors, events
from perc.dtls.config import DtlsConfiguration, PeerIdentity
from perc.dtls.connection import DtlsConnection, DtlsStats
from perc.dtls.cookie import CookieGate, CookieVerdict
from perc.dtls.errors import AlertDescription, LocalProtocolError

__all__ = [
    "AlertDescription",
    "CookieGate",
    "CookieVerdict",
    "DtlsConfiguration",
    "DtlsConnection",
    "DtlsStats",
    "LocalProtocolError",
    "PeerIdentity",
    "errors",
    "events",
]
