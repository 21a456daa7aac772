"""SrtpSession: RFC 7714 vectors, SPEC 8.4 cross-check, ROC, replay, tampering, limits."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from perc.srtp.context import MAX_RTCP_INDEX, MAX_RTP_INDEX, SrtpSession
from perc.srtp.errors import (
    AuthenticationError,
    KeyLifetimeError,
    ReplayError,
    SrtpDecodeError,
    SrtpError,
    SrtpUsageError,
    StreamLimitError,
)
from perc.srtp.index import SrtpStream, iv_base
from perc.srtp.keys import SessionKeys, SrtpProfile, derive_session_keys
from tests.srtp.conftest import (
    RFC7714_KEY_128,
    RFC7714_KEY_256,
    RFC7714_RTCP,
    RFC7714_RTCP_INDEX,
    RFC7714_RTP,
    RFC7714_SALT,
    h,
    rtcp_sr,
    rtp_packet,
)

KEY = bytes(range(16))
SALT = bytes(range(100, 112))


def vector_session(key: bytes) -> SrtpSession:
    # RFC 7714 §16-17 give the session key and salt directly (no KDF).
    return SrtpSession.from_session_keys(SessionKeys(key, RFC7714_SALT, key, RFC7714_SALT))


def rtp_iv(salt: bytes, ssrc: int, index: int) -> bytes:
    """The nonce the index core makes (one stream of ``ssrc`` under ``salt``)."""
    stream = SrtpStream(0, iv_base(int.from_bytes(salt, "big"), ssrc), AESGCM(bytes(16)), 128)
    return stream.nonce(index)


def pair(key: bytes = KEY, salt: bytes = SALT, **kw: int) -> tuple[SrtpSession, SrtpSession]:
    return SrtpSession(key, salt, **kw), SrtpSession(key, salt, **kw)


# --- RFC 7714 §16-17 vectors ---------------------------------------------------------------

SRTP_128 = h(
    "8040f17b 8041f8d3 5501a0b2 f24de3a3 fb34de6c acba861c 9d7e4bca be633bd5"
    " 0d294e6f 42a5f47a 51c7d19b 36de3adf 8833899d 7f27beb1 6a9152cf 765ee439 0cce"
)
SRTP_256 = h(
    "8040f17b 8041f8d3 5501a0b2 32b1de78 a822fe12 ef9f78fa 332e33aa b1801238"
    " 9a58e2f3 b50b2a02 76ffae0f 1ba63799 b87b7aa3 db36dfff d6b0f9bb 7878d7a7 6c13"
)
SRTCP_128_E1 = h(
    "81c8000d 4d617273 63e94885 dcdab67c a727d766 2f6b7e99 7ff5c0f7 6c06f32d"
    " c676a5f1 730d6fda 4ce09b46 86303ded 0bb9275b c84aa458 96cf4d2f c5abf872"
    " 45d9eade 800005d4"
)
SRTCP_256_E1 = h(
    "81c8000d 4d617273 d50ae4d1 f5ce5d30 4ba297e4 7d470c28 2c3ece5d bffe0a50"
    " a2eaa5c1 110555be 8415f658 c61de047 6f1b6fad 1d1eb30c 4446839f 57ff6f6c"
    " b26ac3be 800005d4"
)
SRTCP_128_E0 = RFC7714_RTCP + h("841dd968 3dd78ec9 2ae58790 125f62b3 000005d4")
SRTCP_256_E0 = RFC7714_RTCP + h("91db4afb feee5a97 8fab4393 ed2615fe 000005d4")


@pytest.mark.parametrize(
    ("key", "expected"), [(RFC7714_KEY_128, SRTP_128), (RFC7714_KEY_256, SRTP_256)]
)
def test_rfc7714_16_x_1_srtp_encrypt_and_16_x_2_decrypt(key: bytes, expected: bytes) -> None:
    assert vector_session(key).protect_rtp(RFC7714_RTP) == expected
    rx = vector_session(key)
    assert rx.unprotect_rtp(expected) == RFC7714_RTP
    assert rx.receive_index(0x5501A0B2) == 0xF17B


def test_rfc7714_iv_formation() -> None:
    assert rtp_iv(RFC7714_SALT, 0x5501A0B2, 0xF17B) == h("51753c6580c2726f20718414")
    # SRTCP: the same rule with the 31-bit SRTCP index (RFC 7714 §9.1)
    assert rtp_iv(RFC7714_SALT, 0x4D617273, 0x5D4) == h("517524055203726f207170bb")


@pytest.mark.parametrize(
    ("key", "tag"),
    [
        (RFC7714_KEY_128, h("22493f82d2bce397e9d79e3b19aa4216")),
        (RFC7714_KEY_256, h("a866d5910f887463067ceefec45215d4")),
    ],
)
def test_rfc7714_16_x_3_gmac_tagging(key: bytes, tag: bytes) -> None:
    # 16.1.3 / 16.2.3 authenticate the whole packet without encryption: not a legal SRTP
    # mode (RFC 7714 §8.2), so test the GCM primitive path with our IV construction.
    iv = rtp_iv(RFC7714_SALT, 0x5501A0B2, 0xF17B)
    assert AESGCM(key).encrypt(iv, b"", RFC7714_RTP) == tag
    assert AESGCM(key).decrypt(iv, tag, RFC7714_RTP) == b""


@pytest.mark.parametrize(
    ("key", "expected"), [(RFC7714_KEY_128, SRTCP_128_E1), (RFC7714_KEY_256, SRTCP_256_E1)]
)
def test_rfc7714_17_srtcp_e1(key: bytes, expected: bytes) -> None:
    # protect_rtcp numbers from 0: its packet number 0x5d4 is the vector.
    s = vector_session(key)
    for _ in range(RFC7714_RTCP_INDEX):
        s.protect_rtcp(RFC7714_RTCP)
    assert s.protect_rtcp(RFC7714_RTCP) == expected
    assert vector_session(key).unprotect_rtcp(expected) == RFC7714_RTCP


@pytest.mark.parametrize(
    ("key", "expected"), [(RFC7714_KEY_128, SRTCP_128_E0), (RFC7714_KEY_256, SRTCP_256_E0)]
)
def test_rfc7714_17_srtcp_e0(key: bytes, expected: bytes) -> None:
    # perc never sends E=0 (D19), but accepts it.
    assert vector_session(key).unprotect_rtcp(expected) == RFC7714_RTCP
    bad = bytearray(expected)
    bad[20] ^= 1  # the E=0 packet's body is authenticated
    with pytest.raises(AuthenticationError):
        vector_session(key).unprotect_rtcp(bytes(bad))


def test_spec_8_4_pion_libsrtp_cross_check() -> None:
    key, salt = h("000102030405060708090a0b0c0d0e0f"), h("a0a1a2a3a4a5a6a7a8a9aaab")
    s = SrtpSession(key, salt)
    assert s.profile is SrtpProfile.AEAD_AES_128_GCM
    rtp = h("800f1234decafbadcafebabe") + b"\xab" * 16
    assert s.protect_rtp(rtp) == h(
        "800f1234decafbadcafebabec5002ede04cfdd2eb91159e0880aa06ed2976826f796b201df3131a127e8a392"
    )
    rtcp = h("81c8000bcafebabe") + b"\xab" * 16
    expected = h(
        "81c8000bcafebabec98b8b5df0392a55852b6c21ac8e7025c52c6fbea2b3b446ea31123ba88ce61e80000001"
    )
    assert SrtpSession(key, salt).unprotect_rtcp(expected) == rtcp
    # protect_rtcp numbers from 0 (RFC 3711 §3.3.2), so its second packet is this vector.
    s2 = SrtpSession(key, salt)
    s2.protect_rtcp(rtcp)
    assert s2.protect_rtcp(rtcp) == expected


def test_256_key_selects_256_profile() -> None:
    s = SrtpSession(bytes(32), bytes(12))
    assert s.profile is SrtpProfile.AEAD_AES_256_GCM
    assert "256" in repr(s)


def test_bad_key_material() -> None:
    with pytest.raises(SrtpUsageError):
        SrtpSession(bytes(24), bytes(12))
    with pytest.raises(SrtpUsageError):
        SrtpSession(bytes(16), bytes(14))
    with pytest.raises(SrtpUsageError):
        SrtpSession(bytes(16), bytes(12), replay_window=32)
    with pytest.raises(SrtpUsageError):
        SrtpSession.from_session_keys(SessionKeys(bytes(16), bytes(12), bytes(32), bytes(12)))


# --- round trips, ROC, reordering -------------------------------------------------------------


def test_round_trip_with_extensions_csrcs_padding() -> None:
    tx, rx = pair()
    pkts = [
        rtp_packet(1),
        rtp_packet(2, csrcs=(1, 2, 3)),
        rtp_packet(3, extension=(0xBEDE, b"\x10\xaa\x00\x00")),
        rtp_packet(4, csrcs=(9,), extension=(0x1000, b"\x01\x02\xaa\xbb"), padding=4),
        rtp_packet(5, payload=b""),
    ]
    for p in pkts:
        srtp = tx.protect_rtp(p)
        assert len(srtp) == len(p) + 16
        assert rx.unprotect_rtp(srtp) == p


def test_header_is_authenticated_not_encrypted() -> None:
    tx = SrtpSession(KEY, SALT)
    p = rtp_packet(7, extension=(0xBEDE, b"\x10\xaa\x00\x00"))
    srtp = tx.protect_rtp(p)
    assert srtp[:20] == p[:20]
    assert srtp[20:-16] != p[20:]


def test_seq_wrap_increments_roc() -> None:
    tx, rx = pair()
    ssrc = 0xCAFE
    for seq in range(65530, 65536 + 10):
        p = rtp_packet(seq, ssrc)
        assert rx.unprotect_rtp(tx.protect_rtp(p)) == p
        assert rx.receive_index(ssrc) == seq
    assert tx.send_roc(ssrc) == 1
    assert rx.receive_roc(ssrc) == 1
    assert rx.receive_index(ssrc) == 65536 + 9


def test_reordering_across_wrap() -> None:
    tx, rx = pair()
    sent = [(seq, tx.protect_rtp(rtp_packet(seq))) for seq in range(65500, 65600)]
    # Deliver in a shuffled order that crosses the wrap in both directions.
    order = list(range(0, 100, 2)) + list(range(99, 0, -2))
    highest = -1
    for i in order:
        seq, srtp = sent[i]
        assert rx.unprotect_rtp(srtp) == rtp_packet(seq)
        highest = max(highest, seq)
        assert rx.receive_index(0x11223344) == highest
    assert rx.receive_roc(0x11223344) == 1
    # A late packet from ROC 0 (SEQ 65535) after ROC 1 packets uses ROC 0.
    for i in order:
        with pytest.raises(ReplayError):
            rx.unprotect_rtp(sent[i][1])


def test_sender_reordering_and_reuse() -> None:
    tx, rx = pair()
    a = tx.protect_rtp(rtp_packet(10))
    c = tx.protect_rtp(rtp_packet(12))
    b = tx.protect_rtp(rtp_packet(11))  # out of order on the send side: allowed, not reused
    with pytest.raises(SrtpUsageError):
        tx.protect_rtp(rtp_packet(11))  # (SSRC, ROC, SEQ) reuse would reuse the IV
    for p in (a, b, c):
        rx.unprotect_rtp(p)


def test_first_packet_low_then_high_seq_keeps_roc_zero() -> None:
    # libsrtp parity: a guess of ROC -1 while ROC is 0 means ROC 0.
    tx, rx = pair()
    for seq in (100, 60000):
        rx.unprotect_rtp(tx.protect_rtp(rtp_packet(seq)))
    assert rx.receive_index(0x11223344) == 60000
    # From SEQ 60000 (>= 2^15), SEQ 101 is read as after the wrap (Appendix A: ROC + 1).
    rx.unprotect_rtp(tx.protect_rtp(rtp_packet(101)))
    assert rx.receive_index(0x11223344) == 65536 + 101


def test_replay_window_and_too_old() -> None:
    tx, rx = pair(replay_window=128)
    pkts = [tx.protect_rtp(rtp_packet(seq)) for seq in range(300)]
    rx.unprotect_rtp(pkts[299])
    rx.unprotect_rtp(pkts[172])  # 127 behind: inside the window
    with pytest.raises(ReplayError):
        rx.unprotect_rtp(pkts[171])  # 128 behind: too old
    with pytest.raises(ReplayError):
        rx.unprotect_rtp(pkts[172])
    with pytest.raises(ReplayError):
        rx.unprotect_rtp(pkts[299])
    assert rx.stats.replays == 3


def test_larger_window() -> None:
    tx, rx = pair(replay_window=1024)
    pkts = [tx.protect_rtp(rtp_packet(seq)) for seq in range(1100)]
    rx.unprotect_rtp(pkts[1099])
    rx.unprotect_rtp(pkts[100])
    with pytest.raises(ReplayError):
        rx.unprotect_rtp(pkts[50])


def test_several_ssrcs_share_one_key() -> None:
    tx, rx = pair()
    for seq in range(5):
        for ssrc in (1, 2, 3):
            rx.unprotect_rtp(tx.protect_rtp(rtp_packet(seq + ssrc * 1000, ssrc)))
    assert [rx.receive_index(s) for s in (1, 2, 3)] == [1004, 2004, 3004]
    # Same SEQ on different SSRCs gives different IVs, so different ciphertexts.
    t2 = SrtpSession(KEY, SALT)
    assert t2.protect_rtp(rtp_packet(1, 1))[12:] != t2.protect_rtp(rtp_packet(1, 2))[12:]


def test_set_receive_roc_before_first_packet() -> None:
    tx, rx = pair()
    tx.set_send_roc(7, 5)
    assert tx.send_roc(7) == 5
    out = tx.protect_rtp(rtp_packet(3, 7))
    assert tx.send_stream(7, 3).hi == (5 << 16) | 3
    with pytest.raises(AuthenticationError):
        SrtpSession(KEY, SALT).unprotect_rtp(out)  # ROC 0 assumed: wrong IV
    rx.set_receive_roc(7, 5)
    assert rx.receive_roc(7) == 5
    assert rx.unprotect_rtp(out) == rtp_packet(3, 7)
    assert rx.receive_index(7) == (5 << 16) | 3


def test_set_receive_roc_on_known_stream() -> None:
    tx, rx = pair()
    rx.unprotect_rtp(tx.protect_rtp(rtp_packet(9, 7)))
    tx.set_send_roc(7, 3)
    p = tx.protect_rtp(rtp_packet(10, 7))
    assert tx.send_stream(7, 10).hi == (3 << 16) | 10
    with pytest.raises(AuthenticationError):
        rx.unprotect_rtp(p)
    rx.set_receive_roc(7, 3)
    rx.unprotect_rtp(p)
    assert rx.receive_index(7) == (3 << 16) | 10
    with pytest.raises(SrtpUsageError):
        rx.set_receive_roc(7, 1 << 32)


def test_index_and_nonce_with_a_set_roc() -> None:
    """The packet index (ROC << 16 | SEQ) goes into the nonce as RFC 7714 §8.1 says."""
    tx, rx = pair()
    p = rtp_packet(0x1234, 0x99, extension=(0xBEDE, b"\x10\xaa\x00\x00"))
    hlen = len(p) - 20
    tx.set_send_roc(0x99, 77)
    out = tx.protect_rtp(p)
    keys = derive_session_keys(KEY, SALT)
    index = (77 << 16) | 0x1234
    iv = rtp_iv(keys.rtp_salt, 0x99, index)
    assert out == p[:hlen] + AESGCM(keys.rtp_key).encrypt(iv, p[hlen:], p[:hlen])
    with pytest.raises(AuthenticationError):
        rx.unprotect_rtp(out)  # ROC 0 assumed
    rx2 = SrtpSession(KEY, SALT)
    rx2.set_receive_roc(0x99, 77)
    assert rx2.unprotect_rtp(out) == p
    with pytest.raises(SrtpDecodeError):
        rx2.open_rtp(0x99, 0x1235, p[:hlen], out[hlen : hlen + 15])


# --- limits -----------------------------------------------------------------------------------


def test_rtp_index_limit() -> None:
    tx, rx = pair()
    tx.set_send_roc(1, 0xFFFFFFFF)
    rx.set_receive_roc(1, 0xFFFFFFFF)
    rx.unprotect_rtp(tx.protect_rtp(rtp_packet(0xFFFE, 1)))
    last = tx.protect_rtp(rtp_packet(0xFFFF, 1))
    assert tx.send_stream(1, 0).hi == MAX_RTP_INDEX
    with pytest.raises(KeyLifetimeError):
        tx.protect_rtp(rtp_packet(0, 1))  # would need ROC 2^32
    rx.unprotect_rtp(last)
    forged = rtp_packet(0, 1) + bytes(16)
    with pytest.raises(KeyLifetimeError):
        rx.unprotect_rtp(forged)
    assert rx.stats.lifetime_errors == 1


def test_rtcp_index_limit_and_numbering() -> None:
    tx, rx = pair()
    for expected in range(3):
        srtcp = tx.protect_rtcp(rtcp_sr())
        assert int.from_bytes(srtcp[-4:], "big") == 0x80000000 | expected  # E=1, from 0
        assert rx.unprotect_rtcp(srtcp) == rtcp_sr()
    st = tx._tx_rtcp[0x11223344]
    st.hi = MAX_RTCP_INDEX - 1
    rx.unprotect_rtcp(tx.protect_rtcp(rtcp_sr()))
    with pytest.raises(KeyLifetimeError):
        tx.protect_rtcp(rtcp_sr())


def test_stream_limit() -> None:
    tx = SrtpSession(KEY, SALT)
    rx = SrtpSession(KEY, SALT, max_streams=2)
    rx.unprotect_rtp(tx.protect_rtp(rtp_packet(1, 1)))
    rx.unprotect_rtp(tx.protect_rtp(rtp_packet(1, 2)))
    with pytest.raises(StreamLimitError):
        rx.unprotect_rtp(tx.protect_rtp(rtp_packet(1, 3)))
    assert rx.stats.stream_limit_drops == 1
    # Forged packets of new SSRCs never reach the limit check: they fail authentication.
    with pytest.raises(AuthenticationError):
        rx.unprotect_rtp(rtp_packet(1, 4) + bytes(16))


# --- SRTCP ------------------------------------------------------------------------------------


def test_srtcp_round_trip_compound_and_replay() -> None:
    tx, rx = pair()
    compound = rtcp_sr(extra=b"\x81\xcb\x00\x01\x11\x22\x33\x44")  # SR + BYE
    pkts = [tx.protect_rtcp(compound) for _ in range(5)]
    for p in pkts:
        assert p[-4] & 0x80  # E=1 always when sending (D19)
        assert len(p) == len(compound) + 20
    for p in (pkts[4], pkts[0], pkts[2]):
        assert rx.unprotect_rtcp(p) == compound
    for p in (pkts[4], pkts[0]):
        with pytest.raises(ReplayError):
            rx.unprotect_rtcp(p)
    assert rx.unprotect_rtcp(pkts[1]) == compound


def test_srtcp_tamper_every_byte() -> None:
    tx = SrtpSession(KEY, SALT)
    first = tx.protect_rtcp(rtcp_sr())
    p = tx.protect_rtcp(rtcp_sr())
    known = SrtpSession(KEY, SALT)  # knows the SSRC: the fast path
    known.unprotect_rtcp(first)
    for i in range(len(p)):
        bad = bytearray(p)
        bad[i] ^= 0x01
        for rx in (SrtpSession(KEY, SALT), known):
            with pytest.raises((AuthenticationError, SrtpDecodeError, ReplayError)):
                rx.unprotect_rtcp(bytes(bad))
    assert known.unprotect_rtcp(p) == rtcp_sr()


def test_srtcp_e_flag_is_authenticated() -> None:
    tx = SrtpSession(KEY, SALT)
    p = bytearray(tx.protect_rtcp(rtcp_sr()))
    p[-4] &= 0x7F  # claim E=0
    with pytest.raises(AuthenticationError):
        SrtpSession(KEY, SALT).unprotect_rtcp(bytes(p))


# --- tampering and garbage --------------------------------------------------------------------


def test_srtp_tamper_every_byte() -> None:
    tx = SrtpSession(KEY, SALT)
    p = tx.protect_rtp(rtp_packet(5, csrcs=(1,), extension=(0xBEDE, b"\x10\xaa\x00\x00")))
    rx = SrtpSession(KEY, SALT)
    for i in range(len(p)):
        for bit in (0x01, 0x80):
            bad = bytearray(p)
            bad[i] ^= bit
            with pytest.raises((AuthenticationError, SrtpDecodeError)):
                rx.unprotect_rtp(bytes(bad))
    assert rx.unprotect_rtp(p)  # the untouched packet still passes afterwards


def test_wrong_key_fails() -> None:
    p = SrtpSession(KEY, SALT).protect_rtp(rtp_packet(1))
    with pytest.raises(AuthenticationError):
        SrtpSession(bytes(16), SALT).unprotect_rtp(p)
    with pytest.raises(AuthenticationError):
        SrtpSession(KEY, bytes(12)).unprotect_rtp(p)


def test_every_truncation_of_srtp_and_srtcp() -> None:
    tx = SrtpSession(KEY, SALT)
    p = tx.protect_rtp(rtp_packet(5, csrcs=(1, 2), extension=(0x1000, b"\x01\x02\xaa\xbb")))
    c = tx.protect_rtcp(rtcp_sr())
    rx = SrtpSession(KEY, SALT)
    for n in range(len(p)):
        with pytest.raises((SrtpDecodeError, AuthenticationError)):
            rx.unprotect_rtp(p[:n])
        with pytest.raises((SrtpDecodeError, AuthenticationError)):
            rx.open_rtp(0x11223344, 5, p[:28], p[28:n])
    for n in range(len(c)):
        with pytest.raises((SrtpDecodeError, AuthenticationError)):
            rx.unprotect_rtcp(c[:n])


def test_protect_rejects_malformed() -> None:
    tx = SrtpSession(KEY, SALT)
    for bad in (b"", b"\x80" * 11, b"\x40" + bytes(20), rtp_packet(1, csrcs=(1, 2))[:18]):
        with pytest.raises(SrtpUsageError):
            tx.protect_rtp(bad)
    ext = rtp_packet(1, extension=(0xBEDE, b"\x10\xaa\x00\x00"))
    with pytest.raises(SrtpUsageError):
        tx.protect_rtp(ext[:14])
    with pytest.raises(SrtpUsageError):
        tx.protect_rtp(ext[:18])
    with pytest.raises(SrtpUsageError):
        tx.protect_rtcp(b"\x80\xc8\x00")


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=200))
def test_unprotect_garbage_raises_only_srtp_errors(data: bytes) -> None:
    rx = SrtpSession(KEY, SALT)
    for call in (rx.unprotect_rtp, rx.unprotect_rtcp):
        with pytest.raises(SrtpError) as info:
            call(data)
        assert isinstance(info.value, (SrtpDecodeError, AuthenticationError))


@settings(max_examples=100)
@given(
    seqs=st.lists(st.integers(0, 0xFFFF), min_size=1, max_size=30, unique=True),
    payload=st.binary(max_size=64),
)
def test_round_trip_property(seqs: list[int], payload: bytes) -> None:
    tx, rx = pair()
    base = seqs[0]
    # Keep the spread inside the replay window: packets are delivered in reverse.
    seqs = sorted({(base + (s % 120)) & 0xFFFF for s in seqs}, key=lambda s: (s - base) & 0xFFFF)
    pkts = [(s, tx.protect_rtp(rtp_packet(s, payload=payload))) for s in seqs]
    # The first packet a receiver sees fixes its ROC (RFC 3711 §3.3.1), so it goes first; the
    # rest arrive in reverse order.
    for s, p in [pkts[0], *reversed(pkts[1:])]:
        assert rx.unprotect_rtp(p) == rtp_packet(s, payload=payload)


# --- parts API for the MD hop and the double transform ---------------------------------------


def test_parts_api_matches_whole_packet_api() -> None:
    p = rtp_packet(40, csrcs=(5,), extension=(0xBEDE, b"\x10\xaa\x00\x00"))
    hlen = 12 + 4 + 8
    header, payload = p[:hlen], p[hlen:]
    a = SrtpSession(KEY, SALT).protect_rtp(p)
    tx = SrtpSession(KEY, SALT)
    stream = tx.send_stream(0x11223344, 40)
    assert tx.send_stream(0x11223344, 99) is stream  # made once, at its first SEQ
    assert header + stream.seal(40, payload, header) == a
    with pytest.raises(SrtpUsageError):
        stream.seal(40, payload, header)  # same index again
    with pytest.raises(SrtpUsageError):
        tx.protect_rtp(p)  # the same stream as the whole-packet call
    rx = SrtpSession(KEY, SALT)
    assert rx.open_rtp(0x11223344, 40, header, a[hlen:]) == payload
    with pytest.raises(ReplayError):
        rx.open_rtp(0x11223344, 40, header, a[hlen:])
    with pytest.raises(ReplayError):
        rx.unprotect_rtp(a)  # the same stream as the whole-packet call
    with pytest.raises(SrtpDecodeError):
        rx.open_rtp(0x11223344, 40, header, a[hlen : hlen + 15])
    assert rx.stats.replays == 2
    assert rx.stats.decode_errors == 1


def test_seal_open_with_synthetic_header_across_wrap() -> None:
    # Inner-layer shape: the AAD is a header the packet on the wire does not carry.
    tx, rx = pair()
    for seq in range(65530, 65536 + 5):
        synthetic = rtp_packet(seq, payload=b"")
        body = tx.send_stream(0x11223344, seq).seal(seq, b"media", synthetic)
        assert rx.open_rtp(0x11223344, seq, synthetic, body) == b"media"
    assert rx.receive_roc(0x11223344) == 1
    other = rtp_packet(5, payload=b"", pt=97)
    body = tx.send_stream(0x11223344, 5).seal(5, b"x", rtp_packet(5, payload=b""))
    with pytest.raises(AuthenticationError):
        rx.open_rtp(0x11223344, 5, other, body)
    assert rx.stats.auth_failures == 1


def test_context_never_loads_ekt() -> None:
    # The MDD imports perc.srtp.context; it must not pull in the EKT unwrapping code.
    import subprocess
    import sys

    code = (
        "import sys, perc.srtp, perc.srtp.context, perc.srtp.keys, perc.wire.rtp, perc.wire.rtcp;"
        "bad = [m for m in sys.modules if m.startswith(('perc.srtp.ekt', 'perc.srtp.double'))];"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


@settings(max_examples=60)
@given(
    csrcs=st.lists(st.integers(0, 0xFFFFFFFF), max_size=4),
    ext_words=st.none() | st.integers(0, 3),
    payload=st.binary(max_size=40),
    flip=st.integers(0, 10_000),
)
def test_every_truncation_and_a_flip_property(
    csrcs: list[int], ext_words: int | None, payload: bytes, flip: int
) -> None:
    extension = None if ext_words is None else (0xBEDE, bytes(4 * ext_words))
    p = rtp_packet(9, csrcs=tuple(csrcs), extension=extension, payload=payload)
    srtp = SrtpSession(KEY, SALT).protect_rtp(p)
    rx = SrtpSession(KEY, SALT)
    for n in range(len(srtp)):
        with pytest.raises((SrtpDecodeError, AuthenticationError)):
            rx.unprotect_rtp(srtp[:n])
    bad = bytearray(srtp)
    bad[flip % len(bad)] ^= 1 << (flip % 8)
    with pytest.raises((SrtpDecodeError, AuthenticationError)):
        rx.unprotect_rtp(bytes(bad))
    assert rx.unprotect_rtp(srtp) == p
