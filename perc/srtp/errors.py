"""Error types of the SRTP layer.

Peer misbehaviour (what ``unprotect_*`` may raise on bytes from the network):

- :class:`SrtpDecodeError`: the packet is malformed (too short, not RTP/RTCP version 2, header
  extension running past the end). Also a :class:`perc.wire.errors.DecodeError`.
- :class:`AuthenticationError`: the AEAD tag does not verify (tampering, wrong key).
- :class:`ReplayError`: the packet index was already accepted or is older than the replay
  window (RFC 3711 §3.3.2).
- :class:`KeyLifetimeError`: the packet would need an index beyond the key's lifetime
  (2^48 SRTP, 2^31 SRTCP; RFC 7714 §8.4, §9.4). Raised on both sides: a sender must rekey.
- :class:`StreamLimitError`: an authenticated packet of a new SSRC arrived while the session
  already tracks its maximum number of SSRCs (the per-SSRC state is bounded).

Local misuse (the caller's fault, never caused by a peer):

- :class:`SrtpUsageError`: wrong key or salt length, a malformed packet handed to
  ``protect_*``, or an RTP index that was already used for sending (IV reuse, RFC 7714 §8.4).
"""

from perc.wire.errors import DecodeError


class SrtpError(Exception):
    """Base of every SRTP-layer error."""


class SrtpDecodeError(SrtpError, DecodeError):
    """A received SRTP or SRTCP packet is malformed."""


class AuthenticationError(SrtpError):
    """The AEAD authentication tag of a received packet does not verify."""


class ReplayError(SrtpError):
    """A received packet is a replay or older than the replay window."""


class KeyLifetimeError(SrtpError):
    """The packet index space of this master key is exhausted (2^48 SRTP / 2^31 SRTCP)."""


class StreamLimitError(SrtpError):
    """A new SSRC would exceed the session's bound on tracked streams."""


class SrtpUsageError(SrtpError, ValueError):
    """Local misuse: bad key material, malformed packet given to protect, send-side IV reuse."""
