"""RFC 7741 VP8 payload descriptor: vectors, round trips, truncations, garbage."""

from __future__ import annotations

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from perc.wire.errors import DecodeError
from perc.wire.vp8 import (
    Vp8DecodeError,
    Vp8Descriptor,
    is_keyframe_start,
    split_vp8_payload,
    vp8_frame_is_keyframe,
    vp8_keyframe_size,
)

# (hex, descriptor) pairs worked out by hand from the RFC 7741 §4.2 diagram.
VECTORS: list[tuple[str, Vp8Descriptor]] = [
    ("10", Vp8Descriptor(start=True)),
    ("00", Vp8Descriptor()),
    ("23", Vp8Descriptor(non_reference=True, partition_id=3)),
    ("90 80 81 23", Vp8Descriptor(start=True, picture_id=0x0123)),
    ("90 80 7f", Vp8Descriptor(start=True, picture_id=0x7F, long_picture_id=False)),
    (
        "90 f0 ff ff 05 e7",
        Vp8Descriptor(
            start=True, picture_id=0x7FFF, tl0_pic_idx=5, tid=3, layer_sync=True, key_idx=7
        ),
    ),
    ("80 10 1f", Vp8Descriptor(key_idx=31)),
    ("80 20 40", Vp8Descriptor(tid=1)),
    ("80 40 09", Vp8Descriptor(tl0_pic_idx=9)),
]


def _hex(text: str) -> bytes:
    return bytes.fromhex("".join(text.split()))


@pytest.mark.parametrize(("text", "descriptor"), VECTORS)
def test_vectors(text: str, descriptor: Vp8Descriptor) -> None:
    wire = _hex(text)
    assert descriptor.serialize() == wire
    assert descriptor.length == len(wire)
    assert Vp8Descriptor.parse(wire) == descriptor
    parsed, data = split_vp8_payload(wire + b"\xaa\xbb")
    assert (parsed, data) == (descriptor, b"\xaa\xbb")


@pytest.mark.parametrize(("text", "descriptor"), VECTORS)
def test_every_truncation_raises(text: str, descriptor: Vp8Descriptor) -> None:
    wire = _hex(text)
    for cut in range(len(wire)):
        with pytest.raises(Vp8DecodeError):
            Vp8Descriptor.parse(wire[:cut])
    with pytest.raises(Vp8DecodeError):  # a descriptor with no frame data after it
        split_vp8_payload(wire)


def test_reserved_bits_are_ignored() -> None:
    assert Vp8Descriptor.parse(b"\x58") == Vp8Descriptor(start=True)  # R bits 0x40, 0x08
    assert Vp8Descriptor.parse(b"\x80\x0f") == Vp8Descriptor()  # RSV bits only


def test_serialize_rejects_out_of_range_fields() -> None:
    for bad in (
        Vp8Descriptor(partition_id=8),
        Vp8Descriptor(picture_id=0x8000),
        Vp8Descriptor(picture_id=0x80, long_picture_id=False),
        Vp8Descriptor(tl0_pic_idx=256),
        Vp8Descriptor(tid=4),
        Vp8Descriptor(key_idx=32),
    ):
        with pytest.raises(ValueError):
            bad.serialize()


# A 64x48 key frame header: P = 0, start code, width 64, height 48 (RFC 6386 §9.1).
KEY_HEADER = bytes.fromhex("501c00 9d012a 4000 3000")


def test_keyframe_detection() -> None:
    assert vp8_frame_is_keyframe(KEY_HEADER)
    assert vp8_keyframe_size(KEY_HEADER) == (64, 48)
    delta = b"\x51\x1c\x00\x00"
    assert not vp8_frame_is_keyframe(delta)
    assert is_keyframe_start(b"\x10" + KEY_HEADER)
    assert not is_keyframe_start(b"\x10" + delta)
    assert not is_keyframe_start(b"\x00" + KEY_HEADER)  # not the frame's first packet
    assert not is_keyframe_start(b"\x11" + KEY_HEADER)  # S = 1 but PID = 1
    with pytest.raises(Vp8DecodeError):
        vp8_keyframe_size(delta)
    with pytest.raises(Vp8DecodeError):
        vp8_keyframe_size(KEY_HEADER[:9])
    with pytest.raises(Vp8DecodeError):
        vp8_keyframe_size(KEY_HEADER[:3] + b"\x00\x00\x00" + KEY_HEADER[6:])
    with pytest.raises(Vp8DecodeError):
        is_keyframe_start(b"\x10\x50")


descriptors = st.builds(
    Vp8Descriptor,
    start=st.booleans(),
    partition_id=st.integers(0, 7),
    non_reference=st.booleans(),
    picture_id=st.none() | st.integers(0, 0x7F),
    long_picture_id=st.just(True) | st.just(False),
    tl0_pic_idx=st.none() | st.integers(0, 255),
    tid=st.none() | st.integers(0, 3),
    key_idx=st.none() | st.integers(0, 31),
)


@given(descriptors, st.booleans(), st.integers(0, 0x7FFF))
def test_round_trip(descriptor: Vp8Descriptor, sync: bool, long_id: int) -> None:
    if descriptor.tid is not None:
        descriptor = attrs.evolve(descriptor, layer_sync=sync)
    if descriptor.picture_id is None:
        descriptor = attrs.evolve(descriptor, long_picture_id=True)
    elif descriptor.long_picture_id:
        descriptor = attrs.evolve(descriptor, picture_id=long_id)
    wire = descriptor.serialize()
    assert Vp8Descriptor.parse(wire) == descriptor
    assert len(wire) == descriptor.length


@given(st.binary(max_size=24))
def test_garbage_raises_only_the_format_error(data: bytes) -> None:
    try:
        descriptor, rest = split_vp8_payload(data)
    except Vp8DecodeError:
        return
    assert descriptor.serialize() == Vp8Descriptor.parse(descriptor.serialize()).serialize()
    try:
        is_keyframe_start(data)
        vp8_keyframe_size(rest)
    except DecodeError as exc:
        assert isinstance(exc, Vp8DecodeError)
