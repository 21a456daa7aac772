"""tls-id values: what endpoints and the KMF put in ``external_session_id`` (D15).

RFC 8842 §4: ``tls-id-value = 20*255(ALPHA / DIGIT / "+" / "/" / "-" / "_")``. RFC 8844 §4
carries it in the DTLS ``external_session_id`` extension; RFC 9185 §5.1 has the endpoint check
the KMF's. Every tls-id perc makes is random per session (D15) and every one it reads from a
file or the command line passes :func:`check_tls_id`; this module is the one place both rules
live. Sans-IO, no state.
"""

from __future__ import annotations

import re
import secrets

__all__ = ["TLS_ID_LENGTH", "TLS_ID_RULE", "check_tls_id", "is_tls_id", "random_tls_id"]

_TLS_ID_RE = re.compile(r"[A-Za-z0-9+/\-_]{20,255}")
#: The rule in words, for error messages.
TLS_ID_RULE = "20 to 255 characters of A-Z a-z 0-9 + / - _ (RFC 8842 §4)"
#: Length of a generated tls-id: 24 random bytes in url-safe base64, 32 characters, 192 bits.
TLS_ID_LENGTH = 32


def random_tls_id() -> str:
    """A fresh random tls-id (D15): 32 characters of the url-safe base64 alphabet."""
    return secrets.token_urlsafe(TLS_ID_LENGTH * 3 // 4)


def is_tls_id(text: str) -> bool:
    """Whether ``text`` is a valid tls-id-value."""
    return _TLS_ID_RE.fullmatch(text) is not None


def check_tls_id(text: str) -> str:
    """``text`` if it is a valid tls-id, else ValueError naming the rule."""
    if not is_tls_id(text):
        raise ValueError(f"bad tls-id {text!r}: {TLS_ID_RULE}")
    return text
