"""The verifiable payload: round trips, tampering, truncations and garbage (one error type)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from perc.media.payload import (
    CHECKSUM_LENGTH,
    MAX_NAME_LENGTH,
    PayloadDecodeError,
    PayloadUsageError,
    StreamKind,
    _sha256,
    build_payload,
    minimum_payload_size,
    parse_payload,
)
from perc.wire.errors import DecodeError

names = st.text(min_size=1, max_size=20).filter(lambda s: 1 <= len(s.encode()) <= 64)


@pytest.mark.parametrize("size", [None, 160, 1000, 1400])
@pytest.mark.parametrize("kind", list(StreamKind))
def test_round_trip(kind: StreamKind, size: int | None) -> None:
    name = "alice"
    size = size or minimum_payload_size(name)
    data = build_payload(name, kind, 12345, size, frame=77, keyframe=True, end_of_frame=True)
    assert len(data) == size
    p = parse_payload(data)
    assert (p.name, p.kind, p.seq, p.frame, p.keyframe, p.end_of_frame, p.size) == (
        name,
        kind,
        12345,
        77,
        True,
        True,
        size,
    )


@given(names, st.integers(0, 2**32 - 1), st.integers(0, 600), st.booleans(), st.booleans())
@settings(max_examples=100)
def test_round_trip_property(name: str, seq: int, extra: int, key: bool, eof: bool) -> None:
    size = minimum_payload_size(name) + extra
    data = build_payload(name, StreamKind.VIDEO, seq, size, keyframe=key, end_of_frame=eof)
    p = parse_payload(data)
    assert (p.name, p.seq, p.frame, p.keyframe, p.end_of_frame) == (name, seq, seq, key, eof)


def test_filler_is_a_function_of_name_and_seq() -> None:
    assert build_payload("bob", StreamKind.AUDIO, 5, 160) == build_payload(
        "bob", StreamKind.AUDIO, 5, 160
    )
    assert build_payload("bob", StreamKind.AUDIO, 5, 160) != build_payload(
        "bob", StreamKind.AUDIO, 6, 160
    )
    assert build_payload("bob", StreamKind.AUDIO, 5, 160) != build_payload(
        "bOb", StreamKind.AUDIO, 5, 160
    )


def test_wrong_filler_with_a_good_checksum_is_caught() -> None:
    """The filler check is independent of the checksum: a self-consistent forgery fails."""
    data = bytearray(build_payload("bob", StreamKind.AUDIO, 5, 160))
    data[40] ^= 1  # inside the filler
    body = bytes(data[:-CHECKSUM_LENGTH])
    forged = body + _sha256(body)[:CHECKSUM_LENGTH]
    with pytest.raises(PayloadDecodeError, match="filler"):
        parse_payload(forged)


def test_usage_errors() -> None:
    with pytest.raises(PayloadUsageError):
        build_payload("", StreamKind.AUDIO, 0, 160)
    with pytest.raises(PayloadUsageError):
        build_payload("x" * (MAX_NAME_LENGTH + 1), StreamKind.AUDIO, 0, 400)
    with pytest.raises(PayloadUsageError):
        build_payload("alice", StreamKind.AUDIO, 0, minimum_payload_size("alice") - 1)
    with pytest.raises(PayloadUsageError):
        build_payload("alice", StreamKind.AUDIO, 2**32, 160)


@given(st.data())
@settings(max_examples=200)
def test_any_flipped_bit_is_detected(data: st.DataObject) -> None:
    payload = build_payload("carol", StreamKind.VIDEO, 99, 300, frame=3)
    pos = data.draw(st.integers(0, len(payload) - 1))
    bit = data.draw(st.integers(0, 7))
    tampered = bytearray(payload)
    tampered[pos] ^= 1 << bit
    with pytest.raises(PayloadDecodeError):
        parse_payload(bytes(tampered))


def test_every_truncation_and_extension_raises_the_one_error() -> None:
    payload = build_payload("dave", StreamKind.AUDIO, 1, 160)
    for n in range(len(payload)):
        with pytest.raises(PayloadDecodeError):
            parse_payload(payload[:n])
    with pytest.raises(PayloadDecodeError):
        parse_payload(payload + b"\x00")


@given(st.binary(max_size=400))
@settings(max_examples=300)
def test_garbage_raises_only_the_decode_error(data: bytes) -> None:
    try:
        parse_payload(data)
    except PayloadDecodeError as exc:
        assert isinstance(exc, DecodeError)


@given(st.binary(min_size=1, max_size=300))
@settings(max_examples=200)
def test_garbage_behind_a_valid_header_raises_only_the_decode_error(tail: bytes) -> None:
    head = build_payload("eve", StreamKind.AUDIO, 0, 160)[:14]
    with pytest.raises(PayloadDecodeError):
        parse_payload(head + tail)
