"""RFC 7983 §7 first-byte demultiplexing."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from perc.wire.demux import Kind, classify, is_dtls, is_srtp


def test_every_first_byte() -> None:
    expected = {0: Kind.STUN, 3: Kind.STUN, 4: Kind.UNKNOWN, 16: Kind.ZRTP, 19: Kind.ZRTP,
                20: Kind.DTLS, 22: Kind.DTLS, 63: Kind.DTLS, 64: Kind.TURN, 79: Kind.TURN,
                80: Kind.UNKNOWN, 127: Kind.UNKNOWN, 128: Kind.SRTP, 191: Kind.SRTP,
                192: Kind.UNKNOWN, 255: Kind.UNKNOWN}  # fmt: skip
    for first, kind in expected.items():
        assert classify(bytes([first, 0])) is kind, first
    assert classify(b"") is Kind.EMPTY


@given(st.binary(max_size=8))
def test_predicates_agree_with_classify(data: bytes) -> None:
    assert is_dtls(data) == (classify(data) is Kind.DTLS)
    assert is_srtp(data) == (classify(data) is Kind.SRTP)
