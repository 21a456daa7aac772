"""OHB codec (RFC 8723 §4, SPEC 4.3, D12): examples, round trips, §5.2 update rule, garbage."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from perc.wire.ohb import (
    EMPTY,
    Ohb,
    OhbDecodeError,
    decode_ohb,
    decode_ohb_fields,
    encode_ohb_fields,
    ohb_length_untrusted,
    update_ohb,
)

# The examples table of SPEC.md 4.3.
EXAMPLES = [
    (Ohb(), "00"),
    (Ohb(payload_type=96), "6002"),
    (Ohb(sequence_number=0x1234), "123401"),
    (Ohb(payload_type=96, sequence_number=0x1234), "60123403"),
    (Ohb(marker=True), "0c"),
    (Ohb(marker=False), "04"),
]


@pytest.mark.parametrize(("ohb", "hexbytes"), EXAMPLES)
def test_spec_examples(ohb: Ohb, hexbytes: str) -> None:
    assert ohb.encode().hex() == hexbytes
    assert len(ohb) == len(bytes.fromhex(hexbytes))
    prefix = b"\xaa" * 20
    assert decode_ohb(prefix + bytes.fromhex(hexbytes)) == (ohb, len(hexbytes) // 2)


def test_reserved_and_b_without_m_rejected() -> None:
    for config in range(256):
        data = b"\x01" * 3 + bytes([config])
        if config & 0xF0 or (config & 0x0C) == 0x08:
            with pytest.raises(OhbDecodeError):
                decode_ohb(data)
            with pytest.raises(OhbDecodeError):
                ohb_length_untrusted(config)
        else:
            ohb, n = decode_ohb(data)
            assert ohb.config == config
            assert n == 1 + bool(config & 2) + 2 * bool(config & 1)


def test_pt_high_bit_rejected() -> None:
    with pytest.raises(OhbDecodeError):
        decode_ohb(b"\xe0\x02")


def test_empty_and_short_inputs() -> None:
    with pytest.raises(OhbDecodeError):
        decode_ohb(b"")
    with pytest.raises(OhbDecodeError):
        decode_ohb(b"\x03")
    with pytest.raises(OhbDecodeError):
        decode_ohb(b"\x12\x34\x03")


def test_local_misuse_is_value_error() -> None:
    with pytest.raises(ValueError):
        Ohb(payload_type=128)
    with pytest.raises(ValueError):
        Ohb(sequence_number=70000)


ohbs = st.builds(
    Ohb,
    payload_type=st.none() | st.integers(0, 127),
    sequence_number=st.none() | st.integers(0, 0xFFFF),
    marker=st.none() | st.booleans(),
)


@given(ohbs, st.binary(max_size=40))
def test_round_trip(ohb: Ohb, prefix: bytes) -> None:
    data = prefix + ohb.encode()
    assert decode_ohb(data) == (ohb, len(ohb))
    # every truncation that cuts into the OHB fails with the one error type or parses as
    # something shorter that still fits
    enc = ohb.encode()
    for cut in range(len(enc)):
        try:
            decode_ohb(enc[:cut])
        except OhbDecodeError:
            pass


@given(st.binary(max_size=16))
def test_garbage_raises_only_ohb_error(data: bytes) -> None:
    try:
        ohb, n = decode_ohb(data)
    except OhbDecodeError:
        return
    assert 1 <= n <= min(4, len(data))
    assert data[len(data) - n :] == ohb.encode()


@given(st.binary(max_size=16))
def test_every_truncation_of_garbage(data: bytes) -> None:
    for cut in range(len(data) + 1):
        try:
            decode_ohb(data[:cut])
        except OhbDecodeError:
            pass


# --- RFC 8723 §5.2 update rule -------------------------------------------------------------


def test_update_grows_then_left_alone_then_shrinks() -> None:
    # MD1 changes PT 96 -> 100: OHB records 96.
    o1 = update_ohb(
        EMPTY,
        current_payload_type=96,
        current_sequence_number=5,
        current_marker=True,
        new_payload_type=100,
    )
    assert o1 == Ohb(payload_type=96)
    # MD2 changes PT 100 -> 101: original already recorded, OHB untouched.
    o2 = update_ohb(
        o1,
        current_payload_type=100,
        current_sequence_number=5,
        current_marker=True,
        new_payload_type=101,
    )
    assert o2 is o1
    # MD3 sets PT back to 96: OHB entry removed.
    o3 = update_ohb(
        o2,
        current_payload_type=101,
        current_sequence_number=5,
        current_marker=True,
        new_payload_type=96,
    )
    assert o3 == EMPTY


def test_update_seq_and_marker() -> None:
    o = update_ohb(
        EMPTY,
        current_payload_type=96,
        current_sequence_number=0x1234,
        current_marker=True,
        new_sequence_number=0x0100,
        new_marker=False,
    )
    assert o == Ohb(sequence_number=0x1234, marker=True)
    assert o.encode().hex() == "12340d"
    # no change requested, or same value: untouched
    assert (
        update_ohb(
            o,
            current_payload_type=96,
            current_sequence_number=0x0100,
            current_marker=False,
            new_sequence_number=0x0100,
            new_marker=False,
            new_payload_type=96,
        )
        is o
    )
    back = update_ohb(
        o,
        current_payload_type=96,
        current_sequence_number=0x0100,
        current_marker=False,
        new_sequence_number=0x1234,
        new_marker=True,
    )
    assert back == EMPTY


@given(
    st.lists(
        st.tuples(
            st.none() | st.integers(0, 127),
            st.none() | st.integers(0, 0xFFFF),
            st.none() | st.booleans(),
        ),
        max_size=6,
    ),
    st.integers(0, 127),
    st.integers(0, 0xFFFF),
    st.booleans(),
)
def test_update_chain_always_recovers_original(
    steps: list[tuple[int | None, int | None, bool | None]], pt: int, seq: int, m: bool
) -> None:
    """Whatever a chain of MDs does, header + OHB always yields the original fields."""
    ohb = EMPTY
    cur = (pt, seq, m)
    for npt, nseq, nm in steps:
        ohb = update_ohb(
            ohb,
            current_payload_type=cur[0],
            current_sequence_number=cur[1],
            current_marker=cur[2],
            new_payload_type=npt,
            new_sequence_number=nseq,
            new_marker=nm,
        )
        cur = (
            cur[0] if npt is None else npt,
            cur[1] if nseq is None else nseq,
            cur[2] if nm is None else nm,
        )
        orig = (
            cur[0] if ohb.payload_type is None else ohb.payload_type,
            cur[1] if ohb.sequence_number is None else ohb.sequence_number,
            cur[2] if ohb.marker is None else ohb.marker,
        )
        assert orig == (pt, seq, m)
        assert decode_ohb(ohb.encode())[0] == ohb


@given(ohbs, st.binary(max_size=10))
def test_field_helpers_match_objects(ohb: Ohb, prefix: bytes) -> None:
    enc = ohb.encode()
    assert encode_ohb_fields(ohb.payload_type, ohb.sequence_number, ohb.marker) == enc
    data = prefix + enc
    fields = decode_ohb_fields(data, len(prefix))
    assert fields == (ohb.payload_type, ohb.sequence_number, ohb.marker, len(enc))
    # the OHB may not reach back before ``start``
    if len(enc) > 1:
        with pytest.raises(OhbDecodeError):
            decode_ohb_fields(data, len(prefix) + 1)
