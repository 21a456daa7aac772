"""Helpers for the double-encryption tests: RTP builder and a two-MD conference in memory."""

from __future__ import annotations

import os
import struct

import attrs

from perc.srtp.context import SrtpSession
from perc.srtp.double import DoubleReceiver, DoubleSender
from perc.srtp.ekt import EktCipher, EktParameterSet
from perc.srtp.hop import HeaderChanges, MediaDistributorHop


def one_byte_extension(elements: list[tuple[int, bytes]]) -> tuple[int, bytes]:
    """RFC 8285 one-byte header extension (profile 0xBEDE), padded to 32 bits."""
    body = b"".join(bytes([(i << 4) | (len(d) - 1)]) + d for i, d in elements)
    body += bytes(-len(body) % 4)
    return 0xBEDE, body


def two_byte_extension(elements: list[tuple[int, bytes]]) -> tuple[int, bytes]:
    """RFC 8285 two-byte header extension (profile 0x1000), padded to 32 bits."""
    body = b"".join(bytes([i, len(d)]) + d for i, d in elements)
    body += bytes(-len(body) % 4)
    return 0x1000, body


def rtp(
    seq: int,
    ssrc: int = 0x11223344,
    *,
    payload: bytes = b"\xab" * 160,
    pt: int = 111,
    ts: int = 1000,
    marker: bool = False,
    csrcs: tuple[int, ...] = (),
    extension: tuple[int, bytes] | None = None,
    padding: int = 0,
) -> bytes:
    b0 = 0x80 | len(csrcs) | (0x10 if extension is not None else 0) | (0x20 if padding else 0)
    out = struct.pack("!BBHII", b0, (0x80 if marker else 0) | pt, seq, ts, ssrc)
    out += b"".join(struct.pack("!I", c) for c in csrcs)
    if extension is not None:
        profile, body = extension
        out += struct.pack("!HH", profile, len(body) // 4) + body
    out += payload
    if padding:
        out += bytes(padding - 1) + bytes([padding])
    return out


def new_params(spi: int = 1, cipher: EktCipher = EktCipher.AESKW_128) -> EktParameterSet:
    return EktParameterSet(spi, cipher, os.urandom(cipher.key_length), os.urandom(12))


def session_pair(key_length: int = 16) -> tuple[SrtpSession, SrtpSession]:
    """Two sessions on one fresh outer key: (sending side, receiving side) of one hop."""
    key, salt = os.urandom(key_length), os.urandom(12)
    return SrtpSession(key, salt), SrtpSession(key, salt)


@attrs.define
class Chain:
    """Sender A -> MD1 -> MD2 -> receiver B, each hop with its own outer key."""

    sender: DoubleSender
    md1: MediaDistributorHop
    md1_out: SrtpSession
    md2: MediaDistributorHop
    md2_out: SrtpSession
    receiver: DoubleReceiver
    params: EktParameterSet

    def through(
        self,
        packet: bytes,
        now: float = 0.0,
        c1: HeaderChanges | None = None,
        c2: HeaderChanges | None = None,
    ) -> bytes:
        """Protect at A, forward through both MDs, return what B receives."""
        wire = self.sender.protect(packet, now)
        return self.forward(wire, c1, c2)

    def forward(
        self, wire: bytes, c1: HeaderChanges | None = None, c2: HeaderChanges | None = None
    ) -> bytes:
        hop1 = self.md1.encrypt_for(self.md1_out, self.md1.decrypt(wire), c1)
        return self.forward_md2(hop1, c2)

    def forward_md2(self, hop1: bytes, c2: HeaderChanges | None = None) -> bytes:
        return self.md2.encrypt_for(self.md2_out, self.md2.decrypt(hop1), c2)


def make_chain(key_length: int = 16, cipher: EktCipher = EktCipher.AESKW_128) -> Chain:
    params = new_params(cipher=cipher)
    a_key, a_salt = os.urandom(key_length), os.urandom(12)
    md1_in = SrtpSession(a_key, a_salt)
    md1_out, md2_in = session_pair(key_length)
    md2_out, b_in = session_pair(key_length)
    receiver = DoubleReceiver(b_in)
    receiver.add_parameter_set(params)
    return Chain(
        sender=DoubleSender(a_key, a_salt, params),
        md1=MediaDistributorHop(md1_in),
        md1_out=md1_out,
        md2=MediaDistributorHop(md2_in),
        md2_out=md2_out,
        receiver=receiver,
        params=params,
    )
