"""Typed errors of the DTLS engine (STYLE practice 7).

* :class:`LocalProtocolError`: the caller misused the API (e.g. ``send_ekt_key`` before the
  handshake completed). Raised to the caller.
* :class:`AlertError`: the peer misbehaved; carries the alert description we send. Raised
  inside the engine and turned into a fatal alert plus ``ConnectionClosed``; never escapes
  ``receive_datagram``.
"""

from __future__ import annotations

from enum import IntEnum


class AlertDescription(IntEnum):
    close_notify = 0
    unexpected_message = 10
    bad_record_mac = 20
    record_overflow = 22
    handshake_failure = 40
    bad_certificate = 42
    unsupported_certificate = 43
    certificate_unknown = 46
    illegal_parameter = 47
    access_denied = 49
    decode_error = 50
    decrypt_error = 51
    protocol_version = 70
    internal_error = 80
    user_canceled = 90
    no_renegotiation = 100
    unsupported_extension = 110


class AlertLevel(IntEnum):
    warning = 1
    fatal = 2


class DtlsError(Exception):
    """Base of the engine's errors."""


class LocalProtocolError(DtlsError):
    """The caller used the API wrongly."""


class AlertError(DtlsError):
    """The peer misbehaved: we answer with fatal alert ``description``."""

    def __init__(self, description: int, message: str) -> None:
        super().__init__(message)
        self.description = description

    def __str__(self) -> str:
        try:
            name = AlertDescription(self.description).name
        except ValueError:
            name = str(self.description)
        return f"{name}: {self.args[0]}"
