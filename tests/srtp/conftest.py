"""Shared helpers for the SRTP tests: RTP/RTCP packet builders and RFC 7714 vector data."""

from __future__ import annotations

import struct

h = bytes.fromhex

# RFC 7714 §16 / §17 inputs (SPEC 6.5, Appendix A).
RFC7714_KEY_128 = h("000102030405060708090a0b0c0d0e0f")
RFC7714_KEY_256 = h("000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f")
RFC7714_SALT = h("517569642070726f2071756f")
RFC7714_RTP = h(
    "8040f17b 8041f8d3 5501a0b2 47616c6c 69612065 7374206f 6d6e6973 20646976"
    " 69736120 696e2070 61727465 73207472 6573"
)
RFC7714_RTCP = h(
    "81c8000d4d6172734e5450314e54503252545020"
    "0000042a0000e9304c756e61deadbeefdeadbeefdeadbeefdeadbeefdeadbeef"
)
RFC7714_RTCP_INDEX = 0x5D4


def rtp_packet(
    seq: int,
    ssrc: int = 0x11223344,
    *,
    payload: bytes = b"\xab" * 20,
    pt: int = 96,
    ts: int = 1000,
    marker: bool = False,
    csrcs: tuple[int, ...] = (),
    extension: tuple[int, bytes] | None = None,
    padding: int = 0,
) -> bytes:
    """Build an RTP packet. ``extension`` is (profile, body) with body a multiple of 4 bytes."""
    b0 = 0x80 | len(csrcs)
    if extension is not None:
        b0 |= 0x10
    if padding:
        b0 |= 0x20
    out = struct.pack("!BBHII", b0, (0x80 if marker else 0) | pt, seq & 0xFFFF, ts, ssrc)
    out += b"".join(struct.pack("!I", c) for c in csrcs)
    if extension is not None:
        profile, body = extension
        assert len(body) % 4 == 0
        out += struct.pack("!HH", profile, len(body) // 4) + body
    out += payload
    if padding:
        out += bytes(padding - 1) + bytes([padding])
    return out


def rtcp_sr(ssrc: int = 0x11223344, extra: bytes = b"") -> bytes:
    """A sender report with no report blocks, optionally followed by more RTCP packets."""
    body = struct.pack("!IIIII", ssrc, 0x01020304, 0x05060708, 1234, 10) + struct.pack("!I", 500)
    return struct.pack("!BBH", 0x80, 200, len(body) // 4) + body + extra
