"""The double transform against libsrtp (pylibsrtp) as an independent referee.

libsrtp has no double transform, but each layer is plain AEAD_AES_*_GCM SRTP (RFC 8723 §3,
§5.1): libsrtp with the outer key must accept our outer layer, and libsrtp with the inner key
(and the conference salt) must accept our inner layer applied to the synthetic packet. In the
other direction a double packet built from two libsrtp layers must pass our hop and receiver.
"""

from __future__ import annotations

import os
import struct

import pytest
from pylibsrtp import Policy, Session

from perc.srtp.context import SrtpSession
from perc.srtp.double import DoubleReceiver, DoubleSender
from perc.srtp.ekt import EktCipher, EktSender
from perc.srtp.hop import HeaderChanges, MediaDistributorHop
from perc.wire.ekt import split_ekt_field

from .double_helpers import new_params, one_byte_extension, rtp

PROFILES = {16: Policy.SRTP_PROFILE_AEAD_AES_128_GCM, 32: Policy.SRTP_PROFILE_AEAD_AES_256_GCM}


def libsrtp(key: bytes, salt: bytes, *, outbound: bool) -> Session:
    return Session(
        Policy(
            key=key + salt,
            ssrc_type=Policy.SSRC_ANY_OUTBOUND if outbound else Policy.SSRC_ANY_INBOUND,
            srtp_profile=PROFILES[len(key)],
        )
    )


def synthetic(packet: bytes) -> tuple[bytes, int, int]:
    """(synthetic packet, header length, synthetic header length) per RFC 8723 §5.1 step 3."""
    b0 = packet[0]
    slen = 12 + 4 * (b0 & 0x0F)
    hlen = slen
    if b0 & 0x10:
        hlen += 4 + 4 * struct.unpack_from("!H", packet, slen + 2)[0]
    return bytes([b0 & 0xEF]) + packet[1:slen] + packet[hlen:], hlen, slen


CASES = [
    pytest.param(16, None, (), 0, id="128-plain"),
    pytest.param(16, one_byte_extension([(2, b"xy")]), (7, 8), 5, id="128-ext-csrc-pad"),
    pytest.param(32, None, (9,), 0, id="256-csrc"),
    pytest.param(32, one_byte_extension([(1, b"\x01")]), (), 3, id="256-ext-pad"),
]


@pytest.mark.parametrize(("klen", "ext", "csrcs", "padding"), CASES)
def test_libsrtp_accepts_our_outer_and_inner_layers(
    klen: int, ext: tuple[int, bytes] | None, csrcs: tuple[int, ...], padding: int
) -> None:
    cipher = EktCipher.AESKW_128 if klen == 16 else EktCipher.AESKW_256
    params = new_params(cipher=cipher)
    okey, osalt, ikey = os.urandom(klen), os.urandom(12), os.urandom(klen)
    sender = DoubleSender(okey, osalt, params, inner_key=ikey)
    lib_outer = libsrtp(okey, osalt, outbound=False)
    lib_inner = libsrtp(ikey, params.salt, outbound=False)
    for i in range(40):  # across the SEQ wrap
        seq = (65520 + i) & 0xFFFF
        packet = rtp(seq, payload=os.urandom(20 + i), extension=ext, csrcs=csrcs, padding=padding)
        wire = sender.protect(packet, i * 0.02)
        n, _ = split_ekt_field(wire)
        outer_plain = lib_outer.unprotect(wire[:n])
        synth, hlen, slen = synthetic(packet)
        assert outer_plain[:hlen] == packet[:hlen]
        assert outer_plain[-1] == 0  # the empty OHB
        inner_srtp = synth[:slen] + outer_plain[hlen:-1]
        assert lib_inner.unprotect(inner_srtp) == synth


@pytest.mark.parametrize("klen", [16, 32])
def test_our_hop_and_receiver_accept_libsrtp_layers(klen: int) -> None:
    """A double packet made of two libsrtp layers (plus our EKT tag) passes hop and receiver."""
    cipher = EktCipher.AESKW_128 if klen == 16 else EktCipher.AESKW_256
    params = new_params(cipher=cipher)
    okey, osalt, ikey = os.urandom(klen), os.urandom(12), os.urandom(klen)
    lib_inner = libsrtp(ikey, params.salt, outbound=True)
    lib_outer = libsrtp(okey, osalt, outbound=True)
    ekt = EktSender(params, ikey)
    hop = MediaDistributorHop(SrtpSession(okey, osalt))
    bkey, bsalt = os.urandom(klen), os.urandom(12)
    to_b = SrtpSession(bkey, bsalt)
    receiver = DoubleReceiver(SrtpSession(bkey, bsalt))
    receiver.add_parameter_set(params)
    lib_b = libsrtp(bkey, bsalt, outbound=False)
    ext = one_byte_extension([(5, b"abc")])
    for i in range(40):
        seq = (65530 + i) & 0xFFFF
        payload = os.urandom(30)
        packet = rtp(seq, payload=payload, extension=ext if i % 2 else None, csrcs=(3,))
        synth, hlen, slen = synthetic(packet)
        inner = lib_inner.protect(synth)[slen:]
        wire = lib_outer.protect(packet[:hlen] + inner + b"\x00")
        wire += ekt.field(0x11223344, 1 if seq < 100 else 0, i * 0.02)
        out = hop.encrypt_for(to_b, hop.decrypt(wire), HeaderChanges(sequence_number=i))
        if i % 3 == 0:
            # libsrtp, holding the receiver's outer key, accepts the hop's output too
            n, _ = split_ekt_field(out)
            plain = lib_b.unprotect(out[:n])
            assert struct.unpack_from("!H", plain, 2)[0] == i
            assert plain.endswith(struct.pack("!HB", seq, 0x01))  # OHB records SEQ
            continue
        view = receiver.unprotect(out, i * 0.02)
        assert view.payload == payload
        assert view.sequence_number == i and view.original_sequence_number == seq
