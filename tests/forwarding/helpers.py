"""Endpoints for the forwarding-core tests: real double encryption and SRTCP on both sides.

Each :class:`Endpoint` has random DTLS-SRTP keying material of a DOUBLE profile, a
``DoubleSender``/``DoubleReceiver`` pair (tests may load the E2E code; the core must not),
SRTCP sessions on the outer halves, and the ``MediaKeys`` the KMF would give the MDD for it.
"""

from __future__ import annotations

import os
import struct
import uuid

from perc.forwarding import ForwardingTable
from perc.srtp.context import SrtpSession
from perc.srtp.double import DoubleReceiver, DoubleSender, MediaPacket
from perc.srtp.ekt import EktCipher, EktParameterSet
from perc.srtp.keys import exporter_length, outer_media_keys, split_exporter
from perc.wire.dtls import (
    ClientHello,
    ContentType,
    DtlsRecord,
    HandshakeType,
    encode_handshake,
    encode_record,
)
from perc.wire.rtcp import RtcpPacket, parse_rtcp
from perc.wire.tunnel import MediaKeys

Address = tuple[str, int]


def client_hello(cookie: bytes = b"", random: bytes | None = None) -> bytes:
    """A well-formed DTLS 1.2 ClientHello datagram (one record, one whole message)."""
    hello = ClientHello(0xFEFD, random or os.urandom(32), b"", cookie, (0xC02B,), b"\x00", None)
    body = encode_handshake(HandshakeType.CLIENT_HELLO, 1 if cookie else 0, hello.encode())
    return encode_record(DtlsRecord(ContentType.HANDSHAKE, 0xFEFD, 0, 1 if cookie else 0, body))


def server_hello_flight() -> bytes:
    """The start of a KMF's answer to a ClientHello with a valid cookie: a ServerHello record
    (its body is not looked at by the MDD)."""
    body = encode_handshake(HandshakeType.SERVER_HELLO, 1, bytes(38))
    return encode_record(DtlsRecord(ContentType.HANDSHAKE, 0xFEFD, 0, 1, body))


def new_params(key_length: int = 16) -> EktParameterSet:
    cipher = EktCipher.AESKW_128 if key_length == 16 else EktCipher.AESKW_256
    return EktParameterSet(1, cipher, os.urandom(cipher.key_length), os.urandom(12))


def rtp(
    seq: int,
    ssrc: int,
    *,
    pt: int = 111,
    marker: bool = False,
    ts: int = 0,
    payload: bytes | None = None,
) -> bytes:
    body = payload if payload is not None else struct.pack("!IH", ssrc, seq) + bytes(154)
    return struct.pack("!BBHII", 0x80, (0x80 if marker else 0) | pt, seq, ts, ssrc) + body


class Endpoint:
    """One conference participant as the MDD sees it from outside."""

    def __init__(
        self,
        name: str,
        ssrc: int,
        params: EktParameterSet,
        *,
        port: int,
        profile: int = 0x0009,
    ) -> None:
        self.name = name
        self.params = params
        self.ssrc = ssrc
        self.address: Address = ("127.0.0.1", port)
        self.association_id = uuid.uuid4()
        material = os.urandom(exporter_length(profile))
        km = split_exporter(profile, material)
        self.sender = DoubleSender.for_endpoint(km, params)
        self.receiver = DoubleReceiver.for_endpoint(km)
        self.receiver.add_parameter_set(params)
        outer = km.outer()
        self.rtcp_tx = SrtpSession(outer.client_key, outer.client_salt)
        self.rtcp_rx = SrtpSession(outer.server_key, outer.server_salt)
        ck, sk, cs, ss = outer_media_keys(profile, material)
        self.media_keys = MediaKeys(self.association_id, profile, b"", ck, sk, cs, ss)
        self.seq = 1000
        self.got: list[MediaPacket] = []
        self.rtcp: list[list[RtcpPacket]] = []

    def send(
        self,
        now: float,
        *,
        pt: int = 111,
        marker: bool = False,
        ssrc: int | None = None,
        keyframe: bool = False,
    ) -> bytes:
        self.seq = (self.seq + 1) & 0xFFFF
        packet = rtp(self.seq, self.ssrc if ssrc is None else ssrc, pt=pt, marker=marker)
        return self.sender.protect(packet, now, keyframe=keyframe)

    def send_rtcp(self, compound: bytes) -> bytes:
        return self.rtcp_tx.protect_rtcp(compound)

    def deliver(self, data: bytes, now: float) -> None:
        """What the MDD sent this endpoint: verify it end to end (raises on failure)."""
        if 192 <= data[1] <= 223:
            self.rtcp.append(parse_rtcp(self.rtcp_rx.unprotect_rtcp(data)))
        else:
            self.got.append(self.receiver.unprotect(data, now))


def conference(
    table: ForwardingTable[Address],
    n: int,
    now: float = 0.0,
    *,
    keys: bool = True,
    profile: int = 0x0009,
    first_port: int = 5000,
    first_name: str = "a",
    params: EktParameterSet | None = None,
) -> list[Endpoint]:
    key_length = 16 if profile == 0x0009 else 32
    if params is None:
        params = new_params(key_length)
    eps = [
        Endpoint(chr(ord(first_name) + i), 0x1000 + i, params, port=first_port + i, profile=profile)
        for i in range(n)
    ]
    for ep in eps:
        table.add(ep.association_id, ep.address, now)
        if keys:
            assert table.install_keys(ep.media_keys, now) == []
    return eps


def dispatch(eps: list[Endpoint], out: list[tuple[Address, bytes]], now: float) -> list[str]:
    """Deliver the table's output; returns the receiving endpoints' names in order."""
    by_address = {ep.address: ep for ep in eps}
    names = []
    for address, data in out:
        ep = by_address[address]
        ep.deliver(data, now)
        names.append(ep.name)
    return names
