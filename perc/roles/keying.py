"""tls-id generation for the KMF and endpoints (RFC 8842 §4); the KMF's keying is perc.kmf."""

from __future__ import annotations

import base64
import os

__all__ = ["random_tls_id"]


def random_tls_id() -> str:
    """A fresh tls-id (RFC 8842 §4: 20-255 of A-Z a-z 0-9 + / - _): 32 url-safe base64 chars."""
    return base64.urlsafe_b64encode(os.urandom(24)).decode("ascii")
