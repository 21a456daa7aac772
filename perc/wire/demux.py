"""First-byte demultiplexing of one UDP port (RFC 7983 §7, extended by RFC 9443).

A PERC endpoint and a Media Distributor receive DTLS, SRTP and SRTCP on one port; the first
byte of a datagram tells them apart without parsing anything else:

    +----------------+-------------------------------+
    | first byte     | protocol                      |
    +----------------+-------------------------------+
    |   0 ..   3     | STUN                          |
    |  16 ..  19     | ZRTP                          |
    |  20 ..  63     | DTLS                          |
    |  64 ..  79     | TURN channel                  |
    | 128 .. 191     | RTP / RTCP (SRTP, SRTCP)      |
    | anything else  | unknown: drop (RFC 7983 §7)   |
    +----------------+-------------------------------+

perc speaks neither STUN, ZRTP nor TURN; they are named so that counters can say what was
dropped. RTP and RTCP share 128..191; the payload type byte separates them (RFC 5761 §4),
which is the SRTP layer's business, not this module's.
"""

from __future__ import annotations

import enum

__all__ = ["Kind", "classify", "is_dtls", "is_srtp"]


class Kind(enum.Enum):
    """What a datagram's first byte says it is."""

    EMPTY = "empty"
    STUN = "stun"
    ZRTP = "zrtp"
    DTLS = "dtls"
    TURN = "turn"
    SRTP = "srtp"  # SRTP or SRTCP
    UNKNOWN = "unknown"


def _table() -> tuple[Kind, ...]:
    kinds = [Kind.UNKNOWN] * 256
    for lo, hi, kind in (
        (0, 3, Kind.STUN),
        (16, 19, Kind.ZRTP),
        (20, 63, Kind.DTLS),
        (64, 79, Kind.TURN),
        (128, 191, Kind.SRTP),
    ):
        for b in range(lo, hi + 1):
            kinds[b] = kind
    return tuple(kinds)


_BY_FIRST_BYTE = _table()


def classify(datagram: bytes) -> Kind:
    """The protocol of ``datagram`` by its first byte (untrusted input: never raises)."""
    return _BY_FIRST_BYTE[datagram[0]] if datagram else Kind.EMPTY


def is_dtls(datagram: bytes) -> bool:
    """True for a DTLS record's first byte (content types 20..63)."""
    return bool(datagram) and 20 <= datagram[0] <= 63


def is_srtp(datagram: bytes) -> bool:
    """True for an SRTP or SRTCP packet's first byte (version 2: 128..191)."""
    return bool(datagram) and 128 <= datagram[0] <= 191
