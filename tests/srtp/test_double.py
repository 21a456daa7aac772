"""Double encryption end to end (RFC 8723 §5): sender -> MD -> MD -> receiver, with EKT."""

from __future__ import annotations

import os
import struct
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from perc.srtp.context import SrtpSession
from perc.srtp.double import (
    DoubleDecodeError,
    DoubleReceiver,
    DoubleSender,
    MediaPacket,
    NoInnerKeyError,
)
from perc.srtp.ekt import EktCipher, EktOutcome, EktUnwrapError, UnknownSpiError
from perc.srtp.errors import AuthenticationError, ReplayError, SrtpError, SrtpUsageError
from perc.srtp.hop import HeaderChanges, MediaDistributorHop
from perc.srtp.keys import SrtpProfile, exporter_length, outer_media_keys, split_exporter
from perc.wire.ohb import Ohb, decode_ohb

from .double_helpers import (
    Chain,
    make_chain,
    new_params,
    one_byte_extension,
    rtp,
    two_byte_extension,
)

EXTENSIONS = {
    "none": None,
    "one-byte": one_byte_extension([(1, b"\x30"), (3, b"abcd")]),
    "two-byte": two_byte_extension([(7, b""), (200, bytes(range(20)))]),
}


def check(view: MediaPacket, packet: bytes, *, payload: bytes, pt: int, seq: int) -> None:
    assert view.payload == payload
    assert view.original_payload_type == packet[1] & 0x7F
    assert view.original_sequence_number == struct.unpack_from("!H", packet, 2)[0]
    assert view.payload_type == pt
    assert view.sequence_number == seq
    assert view.marker == bool(packet[1] & 0x80)
    assert view.timestamp == struct.unpack_from("!I", packet, 4)[0]
    assert view.ssrc == struct.unpack_from("!I", packet, 8)[0]


@pytest.mark.parametrize("cipher", list(EktCipher))
@pytest.mark.parametrize("key_length", [16, 32])
@pytest.mark.parametrize("ext", list(EXTENSIONS))
@pytest.mark.parametrize("csrcs", [(), (1, 0xFFFFFFFF)])
@pytest.mark.parametrize("padding", [0, 1, 7])
def test_end_to_end_unchanged(
    cipher: EktCipher, key_length: int, ext: str, csrcs: tuple[int, ...], padding: int
) -> None:
    chain = make_chain(key_length, cipher)
    for i in range(6):
        payload = os.urandom(i * 37)
        packet = rtp(
            100 + i,
            payload=payload,
            extension=EXTENSIONS[ext],
            csrcs=csrcs,
            padding=padding,
            marker=i == 0,
        )
        wire = chain.sender.protect(packet, i * 0.02)
        # sizes (RFC 8723 §8): two 16-byte tags, 1-byte OHB, 47/63-byte Full or 1-byte Short
        ekt = (47 if key_length == 16 else 63) if i < 3 else 1
        assert len(wire) == len(packet) + 32 + 1 + ekt
        view = chain.receiver.unprotect(chain.forward(wire), i * 0.02)
        check(view, packet, payload=payload, pt=111, seq=100 + i)
        assert view.csrcs == csrcs
        assert view.spi == chain.params.spi and view.epoch == 0
        assert view.header[:1] == packet[:1]
        if ext != "none":
            assert EXTENSIONS[ext] is not None
            assert view.header.endswith(EXTENSIONS[ext][1])
    assert chain.receiver.stats.accepted == 6


def test_ohb_grows_is_left_alone_and_shrinks() -> None:
    chain = make_chain()
    p = rtp(0x1234, pt=96, marker=True)
    # MD1 changes PT and SEQ; MD2 changes PT again and the marker.
    c1 = HeaderChanges(payload_type=100, sequence_number=0x0100)
    c2 = HeaderChanges(payload_type=101, marker=False)
    wire = chain.sender.protect(p, 0.0)
    in1 = chain.md1.decrypt(wire)
    assert in1.ohb() == Ohb()
    hop1 = chain.md1.encrypt_for(chain.md1_out, in1, c1)
    assert len(hop1) == len(wire) + 3  # OHB grew from 1 to 4 bytes
    in2 = chain.md2.decrypt(hop1)
    assert in2.ohb() == Ohb(payload_type=96, sequence_number=0x1234)
    hop2 = chain.md2.encrypt_for(chain.md2_out, in2, c2)
    assert len(hop2) == len(hop1)  # PT already recorded; M recorded in Config: same size
    view = chain.receiver.unprotect(hop2, 0.0)
    check(view, p, payload=b"\xab" * 160, pt=101, seq=0x0100)
    assert view.marker is True  # the E2E marker, not the outer one
    assert view.header[1] == 101  # outer M=0, PT 101


def test_second_md_restores_and_ohb_shrinks() -> None:
    chain = make_chain()
    p = rtp(500, pt=96)
    wire = chain.sender.protect(p, 0.0)
    c1 = HeaderChanges(payload_type=100, sequence_number=9, marker=True)
    in2 = chain.md2.decrypt(chain.md1.encrypt_for(chain.md1_out, chain.md1.decrypt(wire), c1))
    assert in2.ohb() == Ohb(payload_type=96, sequence_number=500, marker=False)
    # MD2 sets everything back: the OHB shrinks to the single 0x00 byte.
    back = HeaderChanges(payload_type=96, sequence_number=500, marker=False)
    out = chain.md2.encrypt_for(chain.md2_out, in2, back)
    assert len(out) == len(wire)
    view = chain.receiver.unprotect(out, 0.0)
    check(view, p, payload=b"\xab" * 160, pt=96, seq=500)


def test_md_renumbering_across_wrap_keeps_working() -> None:
    """MD1 renumbers SEQ (e.g. after switching sources) across a 16-bit wrap."""
    chain = make_chain()
    for i in range(40):
        p = rtp(1000 + i, ts=i * 960)
        out = chain.through(p, i * 0.02, c1=HeaderChanges(sequence_number=(65520 + i) & 0xFFFF))
        view = chain.receiver.unprotect(out, i * 0.02)
        assert view.sequence_number == (65520 + i) & 0xFFFF
        assert view.original_sequence_number == 1000 + i
    assert chain.receiver.outer_session.receive_roc(0x11223344) == 1
    assert chain.receiver.ekt.keys(0x11223344)[0].session.receive_roc(0x11223344) == 0


def test_sender_seq_wrap_inner_and_outer_roc() -> None:
    chain = make_chain()
    for i in range(10):
        p = rtp((65530 + i) & 0xFFFF)
        view = chain.receiver.unprotect(chain.through(p, i * 0.02), i * 0.02)
        assert view.sequence_number == (65530 + i) & 0xFFFF
    assert chain.sender.inner_roc(0x11223344) == 1
    assert chain.sender.outer_roc(0x11223344) == 1


headers = st.fixed_dictionaries(
    {
        "seq": st.integers(0, 0xFFFF),
        "ssrc": st.integers(0, 0xFFFFFFFF),
        "pt": st.integers(0, 127),
        "ts": st.integers(0, 0xFFFFFFFF),
        "marker": st.booleans(),
        "csrcs": st.lists(st.integers(0, 0xFFFFFFFF), max_size=15).map(tuple),
        "extension": st.none()
        | st.tuples(
            st.integers(0, 0xFFFF), st.binary(max_size=64).map(lambda b: b + bytes(-len(b) % 4))
        ),
        "padding": st.integers(0, 255),
        "payload": st.binary(max_size=300),
    }
)
changes = st.none() | st.builds(
    HeaderChanges,
    payload_type=st.none() | st.integers(0, 127),
    sequence_number=st.none() | st.integers(0, 0xFFFF),
    marker=st.none() | st.booleans(),
)


@settings(max_examples=60, deadline=None)
@given(headers, changes, changes)
def test_property_random_headers(
    h: dict[str, object], c1: HeaderChanges | None, c2: HeaderChanges | None
) -> None:
    chain = make_chain()
    packet = rtp(**h)  # type: ignore[arg-type]
    out = chain.through(packet, 0.0, c1, c2)
    view = chain.receiver.unprotect(out, 0.0)
    exp_pt, exp_seq = packet[1] & 0x7F, struct.unpack_from("!H", packet, 2)[0]
    for c in (c1, c2):
        if c is not None:
            exp_pt = exp_pt if c.payload_type is None else c.payload_type
            exp_seq = exp_seq if c.sequence_number is None else c.sequence_number
    check(view, packet, payload=h["payload"], pt=exp_pt, seq=exp_seq)  # type: ignore[arg-type]
    assert view.csrcs == h["csrcs"]
    # header + OHB at the receiver always describe the original fields exactly
    inner_ohb_len = len(out) - len(packet) - 32 - 47
    assert 1 <= inner_ohb_len <= 4


# --- tampering -----------------------------------------------------------------------------


def _first_packets(chain: Chain) -> tuple[bytes, bytes]:
    """A Full-tag packet and a Short-tag packet as the receiver gets them."""
    p = rtp(7, extension=EXTENSIONS["one-byte"], csrcs=(5,), padding=3)
    full = chain.through(p, 0.0, c1=HeaderChanges(payload_type=100))
    for i in range(1, 3):
        chain.receiver.unprotect(chain.through(rtp(7 + i), i * 0.001), 0.0)
    short = chain.through(rtp(10), 0.01, c1=HeaderChanges(sequence_number=77))
    assert full[-1] == 2 and short[-1] == 0
    return full, short


def test_tampering_any_byte_on_the_wire_is_detected() -> None:
    chain = make_chain()
    full, short = _first_packets(chain)
    # The receiver holds the key from earlier tags; a fresh receiver state per try is not
    # needed because a detected packet changes no state.
    for packet in (short, full):
        n_ekt = 47 if packet is full else 1
        for i in range(len(packet)):
            if packet is full and (len(packet) - 5 <= i < len(packet) - 3 or i == len(packet) - 1):
                # The epoch and the type byte are not integrity protected (RFC 8870 §6: EKT
                # fields ride outside SRTP's protection); see the test below.
                continue
            bad = bytearray(packet)
            bad[i] ^= 0x01
            with pytest.raises(SrtpError):
                chain.receiver.unprotect(bytes(bad), 0.02)
        # every EKT ciphertext byte specifically fails the key unwrap
        if packet is full:
            for i in range(len(packet) - n_ekt, len(packet) - 7):
                bad = bytearray(packet)
                bad[i] ^= 0x80
                with pytest.raises(EktUnwrapError):
                    chain.receiver.unprotect(bytes(bad), 0.02)
    # the untouched packets are still accepted (nothing above moved the replay windows)
    chain.receiver.unprotect(short, 0.02)
    chain.receiver.unprotect(full, 0.02)


def test_tampered_epoch_or_type_only_changes_the_tag_outcome() -> None:
    """Epoch and type byte are outside any integrity check; the media stays authentic."""
    chain = make_chain()
    full, _ = _first_packets(chain)
    bad = bytearray(full)
    bad[-4] ^= 0x05  # epoch 0 -> 5: same key unwraps, recorded as a newer epoch of that key
    view = chain.receiver.unprotect(bytes(bad), 0.02)
    assert view.payload == b"\xab" * 160 and view.ekt_outcome is EktOutcome.NEW_KEY
    chain2 = make_chain()
    full2, _ = _first_packets(chain2)
    bad = bytearray(full2)
    bad[-1] = 0x03  # Full -> unknown extension type: the tag is discarded (RFC 8870 §4.1)
    view = chain2.receiver.unprotect(bytes(bad), 0.02)
    assert view.ekt_outcome is EktOutcome.IGNORED_TYPE


def test_md_tampering_inner_part_or_ohb_is_detected() -> None:
    """An MD holds the outer key, so it can re-encrypt anything; the inner layer catches it."""
    packet = rtp(50, csrcs=(9,), extension=EXTENSIONS["two-byte"])

    def tampered(edit: Callable[[bytes], bytes]) -> MediaPacket:
        chain = make_chain()  # fresh state: each forgery is the first use of its SEQ
        inbound = chain.md1.decrypt(chain.sender.protect(packet, 0.0))
        inbound.packet = edit(inbound.packet)
        out = chain.md1.encrypt_for(chain.md1_out, inbound)
        return chain.receiver.unprotect(chain.forward_md2(out), 0.0)

    def flip(i: int) -> Callable[[bytes], bytes]:
        return lambda p: p[:i] + bytes([p[i] ^ 0x10]) + p[i + 1 :]

    hlen = 12 + 4 + 4 + len(EXTENSIONS["two-byte"][1])  # type: ignore[index]
    total = len(packet) + 16 + 1
    mutable = {1, 2, 3}  # PT/M and SEQ: the MD may change them, through the OHB (above)
    for i in range(total):
        if i in mutable or 16 <= i < hlen:
            continue
        with pytest.raises((AuthenticationError, DoubleDecodeError)):
            tampered(flip(i))
    # A forged OHB claiming another original PT, or dropping the inner tag, fails too.
    with pytest.raises(AuthenticationError):
        tampered(lambda p: p[:-1] + Ohb(payload_type=5).encode())
    with pytest.raises(AuthenticationError):
        tampered(lambda p: p[:-2] + b"\x00")
    with pytest.raises(DoubleDecodeError):
        tampered(lambda p: p[:hlen] + bytes(15) + b"\x00")
    # Changing the header extension is allowed to an MD (RFC 8723 §5.2) and passes.
    view = tampered(flip(hlen - 1))
    assert view.header[-1] == packet[hlen - 1] ^ 0x10


def test_replays_rejected_at_every_hop() -> None:
    chain = make_chain()
    wire = chain.sender.protect(rtp(1), 0.0)
    hop1 = chain.md1.encrypt_for(chain.md1_out, chain.md1.decrypt(wire))
    with pytest.raises(ReplayError):
        chain.md1.decrypt(wire)
    hop2 = chain.md2.encrypt_for(chain.md2_out, chain.md2.decrypt(hop1))
    with pytest.raises(ReplayError):
        chain.md2.decrypt(hop1)
    chain.receiver.unprotect(hop2, 0.0)
    with pytest.raises(ReplayError):
        chain.receiver.unprotect(hop2, 0.0)
    # A malicious MD re-encrypts the same inner packet under a new outer SEQ: the inner
    # (end-to-end) replay window catches it (RFC 8871 §8.2.2).
    inbound = chain.md2.decrypt(
        chain.md1.encrypt_for(chain.md1_out, chain.md1.decrypt(chain.sender.protect(rtp(2), 0.001)))
    )
    first = chain.md2.encrypt_for(chain.md2_out, inbound, HeaderChanges(sequence_number=2))
    again = chain.md2.encrypt_for(chain.md2_out, inbound, HeaderChanges(sequence_number=3))
    chain.receiver.unprotect(first, 0.0)
    with pytest.raises(ReplayError):
        chain.receiver.unprotect(again, 0.0)
    assert chain.receiver.stats.inner_replays == 1


# --- EKT through the double transform ------------------------------------------------------


def test_receiver_without_key_until_next_full_tag() -> None:
    chain = make_chain()
    # the first three packets (with Full tags) are lost
    for i in range(3):
        chain.through(rtp(i), i * 0.02)
    with pytest.raises(NoInnerKeyError):
        chain.receiver.unprotect(chain.through(rtp(3), 0.06), 0.06)
    # the periodic Full tag (every 100 ms for audio) brings the key
    view = chain.receiver.unprotect(chain.through(rtp(4), 0.16), 0.16)
    assert view.ekt_outcome is EktOutcome.NEW_KEY
    assert chain.receiver.stats.no_key == 1


def test_rekey_followed_without_losing_in_order_packets() -> None:
    chain = make_chain()
    ssrc = 0x11223344
    t = 0.0
    seq = 65000
    outcomes: list[tuple[int, int, EktOutcome]] = []

    def send(n: int) -> None:
        nonlocal t, seq
        for _ in range(n):
            view = chain.receiver.unprotect(chain.through(rtp(seq & 0xFFFF, ssrc), t), t)
            assert view.original_sequence_number == seq & 0xFFFF
            outcomes.append((view.spi, view.epoch, view.ekt_outcome))
            t += 0.02
            seq += 1

    send(20)
    # the KD sends a new EKTKey to everybody; the sender must change its E2E key
    params2 = new_params(spi=2)
    chain.receiver.add_parameter_set(params2)
    old_key = chain.sender.inner_key
    chain.sender.rekey(params2, t)
    send(1)
    assert chain.sender.inner_key == old_key  # still the old key for 250 ms
    assert outcomes[-1] == (1, 0, EktOutcome.NEW_KEY)  # decrypted with old key, new key learnt
    send(20)  # across the switch and across a SEQ wrap
    assert chain.sender.inner_key != old_key
    assert outcomes[-1][:2] == (2, 0)
    assert chain.receiver.stats.accepted == 41
    spis = [o[0] for o in outcomes]
    assert spis.count(1) == 20 + 13  # 250 ms at 20 ms per packet: 13 more old-key packets
    # same SPI, new key (epoch 1)
    chain.sender.rekey(None, t)
    send(30)
    assert outcomes[-1][:2] == (2, 1)
    assert chain.receiver.stats.accepted == 71
    assert chain.receiver.ekt.stats.new_keys == 3


def test_rekey_late_packet_with_old_key_still_decrypts() -> None:
    chain = make_chain()
    wires = [chain.sender.protect(rtp(i), i * 0.02) for i in range(5)]
    params2 = new_params(spi=2)
    chain.receiver.add_parameter_set(params2)
    chain.sender.rekey(params2, 0.1)
    new = [chain.sender.protect(rtp(5 + i), 0.4 + i * 0.02) for i in range(3)]  # new key
    for w in wires[:4] + new:
        chain.receiver.unprotect(chain.forward(w), 0.5)
    # packet 4 (old key) arrives late, after the new key is in use
    view = chain.receiver.unprotect(chain.forward(wires[4]), 0.6)
    assert view.spi == 1 and view.original_sequence_number == 4


def test_unknown_spi_drops_packet() -> None:
    chain = make_chain()
    key, salt = os.urandom(16), os.urandom(12)
    sender = DoubleSender(key, salt, new_params(spi=7))
    hop = MediaDistributorHop(SrtpSession(key, salt))
    out = hop.encrypt_for(chain.md2_out, hop.decrypt(sender.protect(rtp(1), 0.0)))
    with pytest.raises(UnknownSpiError):
        chain.receiver.unprotect(out, 0.0)
    assert chain.receiver.ekt.stats.unknown_spi == 1
    # the same SPI number under a different EKTKey: the tag does not unwrap
    sender = DoubleSender(key, salt, new_params(spi=chain.params.spi))
    out = hop.encrypt_for(chain.md2_out, hop.decrypt(sender.protect(rtp(2), 0.0)))
    with pytest.raises(EktUnwrapError):
        chain.receiver.unprotect(out, 0.0)


def test_sender_matches_srtp_session_byte_for_byte() -> None:
    """The fused send path equals two SrtpSession.protect_rtp calls (inner, then outer)."""
    params = new_params()
    okey, osalt, ikey = os.urandom(16), os.urandom(12), os.urandom(16)
    sender = DoubleSender(okey, osalt, params, inner_key=ikey)
    inner, outer = SrtpSession(ikey, params.salt), SrtpSession(okey, osalt)
    ext = EXTENSIONS["one-byte"]
    for i, seq in enumerate([65534, 65535, 0, 1, 3, 2]):
        p = rtp(seq, extension=ext if i % 2 else None, csrcs=(1, 2)[: i % 3])
        wire = sender.protect(p, i * 0.05)
        cc = p[0] & 0x0F
        hlen = len(p) - 160
        synth = bytes([p[0] & 0xEF]) + p[1 : 12 + 4 * cc] + p[hlen:]
        expect = outer.protect_rtp(p[:hlen] + inner.protect_rtp(synth)[12 + 4 * cc :] + b"\x00")
        assert wire.startswith(expect)
        assert len(wire) - len(expect) in (1, 47)
    assert sender.inner_roc(0x11223344) == inner.send_roc(0x11223344) == 1
    with pytest.raises(SrtpUsageError):
        sender.protect(rtp(3), 1.0)  # index reuse refused (RFC 7714 §8.4)
    for bad in (b"", b"\x80" * 11, b"\x40" + bytes(20), b"\x90" + bytes(13)):
        with pytest.raises(SrtpUsageError):
            sender.protect(bad, 1.0)


def test_malformed_outer_plaintext() -> None:
    """An MD (holding the outer key) sends a plaintext without OHB/inner tag."""
    chain = make_chain()
    chain.receiver.unprotect(chain.through(rtp(1), 0.0), 0.0)
    for body in (b"", b"\x0f", bytes(10) + b"\x00", bytes(20) + b"\xf0"):
        pkt = chain.md2_out.protect_rtp(rtp(2 + len(body), payload=body)) + b"\x00"
        with pytest.raises(DoubleDecodeError):
            chain.receiver.unprotect(pkt, 0.0)
    assert decode_ohb(b"\x00") == (Ohb(), 1)


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=200))
def test_receiver_garbage_raises_only_srtp_errors(data: bytes) -> None:
    chain = make_chain()
    for cut in (len(data), len(data) // 2):
        try:
            chain.receiver.unprotect(data[:cut], 0.0)
        except SrtpError:
            continue
        raise AssertionError("garbage accepted")  # pragma: no cover


def test_receiver_every_truncation_raises_only_srtp_errors() -> None:
    chain = make_chain()
    full, short = _first_packets(chain)
    for packet in (full, short):
        for cut in range(len(packet)):
            with pytest.raises(SrtpError):
                chain.receiver.unprotect(packet[:cut], 0.0)


@pytest.mark.parametrize(
    "profile", [SrtpProfile.DOUBLE_AEAD_AES_128_GCM, SrtpProfile.DOUBLE_AEAD_AES_256_GCM]
)
def test_endpoints_from_dtls_keying_material(profile: SrtpProfile) -> None:
    """A and B from their DTLS-SRTP exports; the MD only from MediaKeys' outer halves (D4)."""
    export_a = os.urandom(exporter_length(profile))
    export_b = os.urandom(exporter_length(profile))
    cipher = EktCipher.AESKW_128 if profile.half_key_length == 16 else EktCipher.AESKW_256
    params = new_params(cipher=cipher)
    sender = DoubleSender.for_endpoint(split_exporter(profile, export_a), params)
    receiver = DoubleReceiver.for_endpoint(split_exporter(profile, export_b))
    receiver.add_parameter_set(params)
    a_ck, _, a_cs, _ = outer_media_keys(profile, export_a)
    _, b_sk, _, b_ss = outer_media_keys(profile, export_b)
    hop = MediaDistributorHop(SrtpSession(a_ck, a_cs))
    to_b = SrtpSession(b_sk, b_ss)
    for i in range(5):
        out = hop.encrypt_for(to_b, hop.decrypt(sender.protect(rtp(i), i * 0.02)))
        assert receiver.unprotect(out, i * 0.02).payload == b"\xab" * 160


def test_video_sender_keyframes_and_two_ssrcs() -> None:
    chain = make_chain()
    key, salt = os.urandom(16), os.urandom(12)
    video = DoubleSender(key, salt, chain.params, period=None)
    hop = MediaDistributorHop(SrtpSession(key, salt))
    kinds = []
    for i in range(12):
        for ssrc in (1, 2):  # audio and video SSRC under one E2E key
            wire = video.protect(rtp(i, ssrc), i * 0.5, keyframe=i == 8)
            kinds.append("F" if wire[-1] == 2 else "s")
            out = hop.encrypt_for(chain.md2_out, hop.decrypt(wire))
            assert chain.receiver.unprotect(out, i * 0.5).ssrc == ssrc
    assert "".join(kinds) == "FF" * 3 + "ss" * 5 + "FF" + "ss" * 3
    assert chain.receiver.ekt.keys(1)[0].master_key == chain.receiver.ekt.keys(2)[0].master_key


def test_rekey_twice_before_switch_keeps_old_key_until_last_announcement() -> None:
    chain = make_chain()
    chain.receiver.unprotect(chain.through(rtp(0), 0.0), 0.0)
    key0 = chain.sender.inner_key
    p2, p3 = new_params(spi=2), new_params(spi=3)
    chain.receiver.add_parameter_set(p2)
    chain.receiver.add_parameter_set(p3)
    chain.sender.rekey(p2, 0.01)
    chain.sender.rekey(p3, 0.02)  # the SPI 2 key never encrypted anything: replaced
    views = [
        chain.receiver.unprotect(chain.through(rtp(i), i * 0.05), i * 0.05) for i in range(1, 9)
    ]
    assert chain.sender.inner_key != key0
    assert [v.spi for v in views] == [1, 1, 1, 1, 1, 3, 3, 3]  # switch at 0.02 + 0.25
    assert chain.receiver.stats.accepted == 9


def test_full_tags_before_the_ekt_key_are_applied_when_it_comes() -> None:
    """A receiver whose copy of a new EKTKey is late sees the sender's announcements of its
    new E2E key (Full tags under the new SPI) before it can read them; once the EKTKey
    arrives the receiver applies the kept tags, so the sender's packets under its new key
    verify without waiting for its next Full tag."""
    chain = make_chain()
    ssrc, t, seq = 0x5566, 0.0, 100
    accepted: list[bool] = []

    def send(n: int) -> None:
        nonlocal t, seq
        for _ in range(n):
            try:
                chain.receiver.unprotect(chain.through(rtp(seq, ssrc), t), t)
                accepted.append(True)
            except SrtpError:
                accepted.append(False)
            t += 0.02
            seq += 1

    send(5)
    params2 = new_params(spi=2)
    chain.sender.rekey(params2, t)  # the receiver does not hold SPI 2 yet
    send(40)  # announcements (dropped: unknown SPI), the switch, then Short tags
    assert not any(accepted[-20:])
    assert chain.receiver.ekt.stats.unknown_spi > 0
    chain.receiver.add_parameter_set(params2, t)  # late, with its arrival time
    assert chain.receiver.ekt.stats.parked_applied == 1
    send(10)
    assert all(accepted[-10:])


def test_a_forged_parked_tag_installs_nothing() -> None:
    """Parked tags are checked as on arrival: one wrapped under another key fails to unwrap."""
    chain = make_chain()
    key, salt = os.urandom(16), os.urandom(12)
    forger = DoubleSender(key, salt, new_params(spi=9))
    hop = MediaDistributorHop(SrtpSession(key, salt))
    out = hop.encrypt_for(chain.md2_out, hop.decrypt(forger.protect(rtp(1), 0.0)))
    with pytest.raises(UnknownSpiError):
        chain.receiver.unprotect(out, 0.0)
    chain.receiver.add_parameter_set(new_params(spi=9), 0.1)  # a different key under SPI 9
    assert chain.receiver.ekt.stats.parked_applied == 0
    assert chain.receiver.ekt.stats.unwrap_failures == 1


def test_rekeys_faster_than_the_switch_never_lose_the_key_in_use() -> None:
    """Leaves every 150 ms (each a rekey): the sender announces key after key and keeps
    encrypting with the one in use until the last announcement ends; a receiver that holds
    every EKTKey must keep that key although more than keys_per_stream newer ones came."""
    chain = make_chain()
    ssrc, t, seq = 0x7788, 0.0, 1
    failed = 0

    def send(n: int) -> None:
        nonlocal t, seq, failed
        for _ in range(n):
            try:
                chain.receiver.unprotect(chain.through(rtp(seq, ssrc), t), t)
            except SrtpError:
                failed += 1
            t += 0.02
            seq += 1

    send(10)
    for spi in range(2, 8):
        params = new_params(spi=spi)
        chain.receiver.add_parameter_set(params, t)
        chain.sender.rekey(params, t)
        send(8)  # 160 ms
    send(40)
    assert failed == 0
