"""Interop with libsrtp (pylibsrtp) in both directions: SRTP and SRTCP, AES-128/256-GCM.

Packets carry CSRCs and RFC 8285 header extensions, cross a SEQ wrap (ROC 0 -> 1) and are
delivered out of order.
"""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pylibsrtp import Error as LibsrtpError
from pylibsrtp import Policy, Session

from perc.srtp.context import SrtpSession
from perc.srtp.errors import AuthenticationError, ReplayError, SrtpUsageError
from tests.srtp.conftest import rtcp_sr, rtp_packet

PROFILES = {16: Policy.SRTP_PROFILE_AEAD_AES_128_GCM, 32: Policy.SRTP_PROFILE_AEAD_AES_256_GCM}


def libsrtp(key: bytes, salt: bytes, *, outbound: bool) -> Session:
    # pylibsrtp takes master key || 12-byte master salt.
    policy = Policy(
        key=key + salt,
        ssrc_type=Policy.SSRC_ANY_OUTBOUND if outbound else Policy.SSRC_ANY_INBOUND,
        srtp_profile=PROFILES[len(key)],
    )
    return Session(policy)


EXTENSIONS: list[tuple[int, bytes] | None] = [
    None,
    None,
    (0xBEDE, b"\x10\xaa\x21\xbb\xcc\x00\x00\x00"),  # RFC 8285 one-byte form
    (0x1000, b"\x01\x02\xaa\xbb\x02\x00\x00\x00"),  # RFC 8285 two-byte form
]


def media(count: int, first_seq: int, ssrc: int) -> list[bytes]:
    out = []
    for i in range(count):
        seq = (first_seq + i) & 0xFFFF
        kind = i % 4
        out.append(
            rtp_packet(
                seq,
                ssrc,
                payload=bytes([i & 0xFF]) * (20 + i % 50),
                ts=160 * i,
                marker=kind == 0,
                csrcs=(0xA1, 0xB2) if kind in (1, 3) else (),
                extension=EXTENSIONS[kind],
                padding=4 if i % 7 == 0 else 0,
            )
        )
    return out


def shuffled(items: list[bytes], seed: int) -> list[bytes]:
    """Keep the first packet first (it fixes the receiver's ROC), then swap neighbours within
    a distance well inside the 128-packet replay window."""
    rng = random.Random(seed)
    rest = items[1:]
    for _ in range(len(rest)):
        i = rng.randrange(len(rest))
        j = min(len(rest) - 1, i + rng.randrange(1, 20))
        rest[i], rest[j] = rest[j], rest[i]
    return [items[0], *rest]


KEY_SIZES = [16, 32]


@pytest.mark.parametrize("key_len", KEY_SIZES)
def test_ours_protect_libsrtp_unprotect_across_wrap(key_len: int) -> None:
    key, salt = bytes(range(key_len)), bytes(range(50, 62))
    ours = SrtpSession(key, salt)
    plain = media(300, 65400, 0x5501A0B2)  # SEQ 65400 .. 164: ROC 0 -> 1
    protected = {p: ours.protect_rtp(p) for p in plain}
    assert ours.send_roc(0x5501A0B2) == 1
    lib = libsrtp(key, salt, outbound=False)
    for p in shuffled(plain, 1):
        assert lib.unprotect(protected[p]) == p
    with pytest.raises(LibsrtpError):
        lib.unprotect(protected[plain[-1]])  # libsrtp sees our replay too


@pytest.mark.parametrize("key_len", KEY_SIZES)
def test_libsrtp_protect_ours_unprotect_across_wrap(key_len: int) -> None:
    key, salt = bytes(range(100, 100 + key_len)), bytes(range(12))
    lib = libsrtp(key, salt, outbound=True)
    plain = media(300, 65300, 0x0BADCAFE)
    protected = {p: lib.protect(p) for p in plain}
    ours = SrtpSession(key, salt)
    for p in shuffled(plain, 2):
        assert ours.unprotect_rtp(protected[p]) == p
    assert ours.receive_index(0x0BADCAFE) == 65536 + (65300 + 299 - 65536)
    assert ours.receive_roc(0x0BADCAFE) == 1
    with pytest.raises(ReplayError):
        ours.unprotect_rtp(protected[plain[5]])
    bad = bytearray(protected[plain[0]])
    bad[-1] ^= 1
    with pytest.raises(AuthenticationError):
        SrtpSession(key, salt).unprotect_rtp(bytes(bad))


@pytest.mark.parametrize("key_len", KEY_SIZES)
def test_several_ssrcs_both_ways(key_len: int) -> None:
    key, salt = bytes(range(7, 7 + key_len)), bytes(range(30, 42))
    ours_tx, ours_rx = SrtpSession(key, salt), SrtpSession(key, salt)
    lib_tx, lib_rx = libsrtp(key, salt, outbound=True), libsrtp(key, salt, outbound=False)
    for i in range(50):
        for ssrc in (1, 2, 0xFFFFFFFF):
            p = rtp_packet(65520 + i, ssrc, payload=bytes([i]) * 33)
            assert lib_rx.unprotect(ours_tx.protect_rtp(p)) == p
            assert ours_rx.unprotect_rtp(lib_tx.protect(p)) == p


@pytest.mark.parametrize("key_len", KEY_SIZES)
def test_srtcp_both_ways(key_len: int) -> None:
    key, salt = bytes(range(200, 200 + key_len)), bytes(range(12, 24))
    bye = b"\x81\xcb\x00\x01\x11\x22\x33\x44"
    compounds = [rtcp_sr(extra=bye if i % 2 else b"") for i in range(40)]
    # ours -> libsrtp, with reordering
    ours = SrtpSession(key, salt)
    protected = [ours.protect_rtcp(c) for c in compounds]
    lib_rx = libsrtp(key, salt, outbound=False)
    order = [0, *list(range(39, 0, -1))]
    for i in order:
        assert lib_rx.unprotect_rtcp(protected[i]) == compounds[i]
    # libsrtp -> ours, with reordering and a replay
    lib_tx = libsrtp(key, salt, outbound=True)
    lib_protected = [lib_tx.protect_rtcp(c) for c in compounds]
    rx = SrtpSession(key, salt)
    for i in order:
        assert rx.unprotect_rtcp(lib_protected[i]) == compounds[i]
        word = int.from_bytes(lib_protected[i][-4:], "big")
        assert word >> 31  # libsrtp encrypts SRTCP by default with GCM (E=1)
        assert word & 0x7FFFFFFF == i + 1  # libsrtp numbers SRTCP from 1
    with pytest.raises(ReplayError):
        rx.unprotect_rtcp(lib_protected[3])


@pytest.mark.parametrize("key_len", KEY_SIZES)
def test_byte_identical_to_libsrtp_across_wrap(key_len: int) -> None:
    # AES-GCM is deterministic: same key, IV and AAD give the same bytes. Equal output over a
    # wrap shows the same KDF, IV, AAD and ROC (RFC 3711 App. A) on the send side.
    key, salt = bytes(range(3, 3 + key_len)), bytes(range(90, 102))
    ours, lib = SrtpSession(key, salt), libsrtp(key, salt, outbound=True)
    for p in media(200, 65450, 0x01020304):
        assert ours.protect_rtp(p) == lib.protect(p)


WRAP_PACKETS = [
    rtp_packet((65500 + i) & 0xFFFF, 0xABCDEF01, payload=bytes([i & 0xFF]) * 24) for i in range(400)
]
WRAP_KEY, WRAP_SALT = bytes(range(16)), bytes(range(12))


def _wrap_protected() -> list[bytes]:
    tx = SrtpSession(WRAP_KEY, WRAP_SALT)
    return [tx.protect_rtp(p) for p in WRAP_PACKETS]


_PROTECTED = _wrap_protected()


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.integers(0, 399),  # anywhere: far jumps back and forward
            st.tuples(st.integers(-40, 40)),  # near the previous delivery
        ),
        min_size=1,
        max_size=60,
    )
)
def test_receiver_agrees_with_libsrtp(steps: list[int | tuple[int]]) -> None:
    """Differential test: for any delivery order (loss, duplicates, reordering, jumps across the
    SEQ wrap) our receiver accepts exactly the packets libsrtp accepts, with the same output."""
    ours = SrtpSession(WRAP_KEY, WRAP_SALT)
    lib = libsrtp(WRAP_KEY, WRAP_SALT, outbound=False)
    at = 0
    for step in steps:
        at = min(399, max(0, at + step[0])) if isinstance(step, tuple) else step
        packet = _PROTECTED[at]
        try:
            lib_out: bytes | None = lib.unprotect(packet)
        except LibsrtpError:
            lib_out = None
        try:
            our_out: bytes | None = ours.unprotect_rtp(packet)
        except (ReplayError, AuthenticationError):
            our_out = None
        assert our_out == lib_out, f"delivery of packet {at} differs"


def _libsrtp_srtcp() -> list[bytes]:
    tx = libsrtp(WRAP_KEY, WRAP_SALT, outbound=True)
    return [
        tx.protect_rtcp(rtcp_sr(extra=bytes([0x81, 0xCB, 0, 1]) + bytes(4))) for _ in range(300)
    ]


_SRTCP = _libsrtp_srtcp()


@settings(max_examples=100, deadline=None)
@given(
    st.lists(
        st.one_of(st.integers(0, 299), st.tuples(st.integers(-40, 40))), min_size=1, max_size=60
    )
)
def test_srtcp_receiver_agrees_with_libsrtp(steps: list[int | tuple[int]]) -> None:
    ours = SrtpSession(WRAP_KEY, WRAP_SALT)
    lib = libsrtp(WRAP_KEY, WRAP_SALT, outbound=False)
    at = 0
    for step in steps:
        at = min(299, max(0, at + step[0])) if isinstance(step, tuple) else step
        try:
            lib_out: bytes | None = lib.unprotect_rtcp(_SRTCP[at])
        except LibsrtpError:
            lib_out = None
        try:
            our_out: bytes | None = ours.unprotect_rtcp(_SRTCP[at])
        except (ReplayError, AuthenticationError):
            our_out = None
        assert our_out == lib_out, f"delivery of SRTCP packet {at} differs"


@settings(max_examples=100, deadline=None)
@given(
    st.lists(
        st.one_of(st.integers(0, 399), st.tuples(st.integers(-40, 40))), min_size=1, max_size=60
    )
)
def test_sender_agrees_with_libsrtp(steps: list[int | tuple[int]]) -> None:
    """Differential test of the send side: for any order of SEQs to protect (across the wrap,
    repeats, reordering, jumps), we refuse exactly the indexes libsrtp refuses (RFC 7714 §8.4)
    and produce the same bytes for the others."""
    ours = SrtpSession(WRAP_KEY, WRAP_SALT)
    lib = libsrtp(WRAP_KEY, WRAP_SALT, outbound=True)
    at = 0
    for step in steps:
        at = min(399, max(0, at + step[0])) if isinstance(step, tuple) else step
        packet = WRAP_PACKETS[at]
        try:
            lib_out: bytes | None = lib.protect(packet)
        except LibsrtpError:
            lib_out = None
        try:
            our_out: bytes | None = ours.protect_rtp(packet)
        except SrtpUsageError:
            our_out = None
        assert our_out == lib_out, f"protect of packet {at} differs"
