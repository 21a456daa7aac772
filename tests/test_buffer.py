import pytest
from hypothesis import given
from hypothesis import strategies as st

from perc.wire.buffer import Buffer
from perc.wire.errors import BufferReadError, DecodeError


def test_round_trip_integers() -> None:
    out = Buffer()
    out.push_uint8(0x01)
    out.push_uint16(0x0203)
    out.push_uint24(0x040506)
    out.push_uint32(0x0708090A)
    out.push_uint48(0x0B0C0D0E0F10)
    out.push_uint64(0x1112131415161718)
    data = out.data()
    assert data == bytes(range(1, 0x19))
    buf = Buffer(data)
    assert buf.pull_uint8() == 0x01
    assert buf.pull_uint16() == 0x0203
    assert buf.pull_uint24() == 0x040506
    assert buf.pull_uint32() == 0x0708090A
    assert buf.pull_uint48() == 0x0B0C0D0E0F10
    assert buf.pull_uint64() == 0x1112131415161718
    buf.expect_end()


def test_block_back_patches_length() -> None:
    out = Buffer()
    with out.push_block(2):
        out.push_bytes(b"abc")
    assert out.data() == b"\x00\x03abc"
    inner = Buffer(out.data()).pull_block(2)
    assert inner.pull_rest() == b"abc"


def test_vector_bounds() -> None:
    with pytest.raises(BufferReadError):
        Buffer(b"\x01\x00").pull_vector(1, floor=2)
    with pytest.raises(ValueError, match="outside"):
        Buffer().push_vector(1, b"x" * 256)


@given(st.binary(max_size=40), st.lists(st.sampled_from([1, 2, 3, 6, 8]), max_size=8))
def test_reads_past_end_raise_only_buffer_read_error(data: bytes, widths: list[int]) -> None:
    buf = Buffer(data)
    pulls = {
        1: buf.pull_uint8,
        2: buf.pull_uint16,
        3: buf.pull_uint24,
        6: buf.pull_uint48,
        8: buf.pull_uint64,
    }
    try:
        for w in widths:
            pulls[w]()
        buf.pull_vector(2)
    except DecodeError:
        pass
