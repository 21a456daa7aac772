"""The SRTP index core: Appendix A guess, fast paths, window, limits, against a plain model."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import given, settings
from hypothesis import strategies as st

from perc.srtp.errors import (
    AuthenticationError,
    KeyLifetimeError,
    ReplayError,
    SrtpUsageError,
)
from perc.srtp.index import MAX_RTCP_INDEX, MAX_RTP_INDEX, SrtpStream, guess_index, iv_base

AEAD = AESGCM(bytes(range(16)))
HEADER = bytes(12)


def stream(first: int = 0, window: int = 128) -> SrtpStream:
    return SrtpStream(first, iv_base(0x1234, 0xCAFE), AEAD, window)


def reference_guess(hi: int, seq: int) -> int:
    """RFC 3711 Appendix A as written (v = ROC - 1, ROC, ROC + 1), ROC -1 read as 0."""
    roc, s_l = hi >> 16, hi & 0xFFFF
    if s_l < 0x8000:
        v = roc - 1 if seq - s_l > 0x8000 else roc
    else:
        v = roc + 1 if s_l - 0x8000 > seq else roc
    return (max(v, 0) << 16) | seq


@settings(max_examples=500)
@given(st.integers(0, MAX_RTP_INDEX - 0x10000), st.integers(0, 0xFFFF))
def test_guess_index_is_appendix_a(hi: int, seq: int) -> None:
    assert guess_index(hi, seq) == reference_guess(hi, seq)


@pytest.mark.parametrize("hi", [0, 1, 0x7FFF, 0x8000, 0xFFFE, 0xFFFF, 0x10000, 0x3FFFF])
def test_the_in_order_fast_path_is_the_guess(hi: int) -> None:
    # seal/open take hi + 1 for the next SEQ without the general rule: it must agree.
    assert guess_index(hi, (hi + 1) & 0xFFFF) == hi + 1


class Model:
    """Every index used, kept as a plain set: what the window must answer inside it."""

    def __init__(self, first: int, window: int) -> None:
        self.hi = first
        self.used: set[int] = set()
        self.window = window

    def unused(self, idx: int) -> bool:
        return idx > self.hi or (self.hi - idx < self.window and idx not in self.used)

    def accept(self, idx: int) -> None:
        self.used.add(idx)
        self.hi = max(self.hi, idx)


@settings(max_examples=200)
@given(
    st.integers(0, 0xFFFF),
    st.lists(st.integers(-300, 300), min_size=1, max_size=80),
    st.sampled_from([64, 128, 200]),
)
def test_send_and_receive_windows_follow_the_model(
    first_seq: int, steps: list[int], window: int
) -> None:
    tx = stream(first_seq, window)
    rx = stream(first_seq, window)
    model = Model(first_seq, window)
    seq = first_seq
    sent: dict[int, bytes] = {}
    for step in steps:
        seq = (seq + step) & 0xFFFF
        idx = guess_index(model.hi, seq)
        if model.unused(idx):
            body = tx.seal(seq, b"media", HEADER)
            model.accept(idx)
            sent[idx] = body
            assert tx.hi == model.hi
            assert rx.open(seq, body, HEADER) == b"media"
            assert rx.hi == model.hi
            with pytest.raises(ReplayError):
                rx.open(seq, body, HEADER)
        else:
            with pytest.raises(SrtpUsageError):
                tx.seal(seq, b"media", HEADER)
            assert tx.hi == model.hi


def test_a_forged_packet_moves_nothing() -> None:
    rx = stream(10)
    tx = stream(10)
    rx.open(10, tx.seal(10, b"a", HEADER), HEADER)
    before = (rx.hi, rx.holes)
    with pytest.raises(AuthenticationError):
        rx.open(11, bytes(20), HEADER)
    with pytest.raises(AuthenticationError):
        rx.open(500, bytes(20), HEADER)  # the general path too
    assert (rx.hi, rx.holes) == before
    rx.open(11, tx.seal(11, b"b", HEADER), HEADER)


def test_a_jump_past_the_window_clears_it() -> None:
    tx, rx = stream(0), stream(0)
    for seq in (0, 1, 2, 1000, 999):
        rx.open(seq, tx.seal(seq, b"x", HEADER), HEADER)
    assert rx.hi == 1000
    assert rx.unused(1000 - 127) and not rx.unused(1000 - 128) and not rx.unused(999)


def test_rtp_index_space_ends_at_2_48() -> None:
    tx = stream(MAX_RTP_INDEX - 1)
    tx.seal(0xFFFE, b"", HEADER)
    tx.seal(0xFFFF, b"", HEADER)
    assert tx.hi == MAX_RTP_INDEX
    with pytest.raises(KeyLifetimeError):
        tx.seal(0, b"", HEADER)  # would be 2^48: the fast path must refuse it too
    rx = stream(MAX_RTP_INDEX)
    rx.holes = 0
    with pytest.raises(KeyLifetimeError):
        rx.open(0, bytes(16), HEADER)
    with pytest.raises(KeyLifetimeError):
        rx.receive_index(0)


def test_srtcp_counter_window_and_limit() -> None:
    tx = stream(-1)
    rx_first = tx.seal_rtcp(b"h" * 8, b"one")
    assert rx_first[-4:] == (0x80000000).to_bytes(4, "big")
    second = tx.seal_rtcp(b"h" * 8, b"two")
    assert int.from_bytes(second[-4:], "big") == 0x80000001
    rx = stream(1)
    aad = b"h" * 8 + second[-4:]
    assert rx.open_rtcp(1, second[8:-4], aad) == b"two"
    assert rx.open_rtcp(0, rx_first[8:-4], b"h" * 8 + rx_first[-4:]) == b"one"
    with pytest.raises(ReplayError):
        rx.open_rtcp(1, second[8:-4], aad)
    tx.hi = MAX_RTCP_INDEX - 1
    tx.seal_rtcp(b"h" * 8, b"")
    with pytest.raises(KeyLifetimeError):
        tx.seal_rtcp(b"h" * 8, b"")


def test_restart_and_window_bounds() -> None:
    s = stream(5)
    s.accept(5)
    s.restart((3 << 16) | 5)
    assert s.unused((3 << 16) | 5) and s.hi == (3 << 16) | 5
    for bad in (63, 0x8001):
        with pytest.raises(SrtpUsageError):
            stream(0, bad)
    assert "hi=" in repr(s)
