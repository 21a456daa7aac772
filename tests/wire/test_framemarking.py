"""RFC 9626 frame marking element: vectors, round trips, truncations, garbage, RTP packets."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from perc.wire.framemarking import (
    DEFAULT_FRAME_MARKING_ID,
    FrameMarking,
    FrameMarkingDecodeError,
    find_frame_marking,
    frame_marking_of_packet,
)
from perc.wire.rtp import HeaderExtension, RtpPacket, encode_extensions

VECTORS: list[tuple[str, FrameMarking]] = [
    ("80", FrameMarking(start=True)),
    ("40", FrameMarking(end=True)),
    ("e0", FrameMarking(start=True, end=True, independent=True)),
    ("10", FrameMarking(discardable=True)),
    ("8b 02", FrameMarking(start=True, base_layer_sync=True, tid=3, lid=2)),
    ("47 01 ff", FrameMarking(end=True, tid=7, lid=1, tl0_pic_idx=255)),
]


@pytest.mark.parametrize(("text", "marking"), VECTORS)
def test_vectors(text: str, marking: FrameMarking) -> None:
    wire = bytes.fromhex(text.replace(" ", ""))
    assert marking.serialize() == wire
    assert FrameMarking.parse(wire) == marking
    assert marking.extension(7) == HeaderExtension(7, wire)


def test_lengths_outside_the_forms_raise() -> None:
    for bad in (b"", b"\x80\x00\x00\x00"):
        with pytest.raises(FrameMarkingDecodeError):
            FrameMarking.parse(bad)


def test_short_form_ignores_the_low_bits() -> None:
    assert FrameMarking.parse(b"\xef") == FrameMarking(start=True, end=True, independent=True)


def test_serialize_rejects_what_the_form_cannot_carry() -> None:
    for bad in (
        FrameMarking(tid=1),
        FrameMarking(tl0_pic_idx=1),
        FrameMarking(lid=1, tid=8),
        FrameMarking(lid=256),
        FrameMarking(lid=0, tl0_pic_idx=256),
    ):
        with pytest.raises(ValueError):
            bad.serialize()
    with pytest.raises(ValueError):
        FrameMarking().extension(15)


def _packet(elements: tuple[HeaderExtension, ...], *, two_byte: bool = False) -> bytes:
    profile, data = encode_extensions(elements, two_byte=two_byte)
    return RtpPacket(
        payload_type=96,
        sequence_number=1,
        timestamp=2,
        ssrc=3,
        csrcs=(9,),
        extension_profile=profile,
        extension_data=data,
        payload=b"\x10\x00",
    ).serialize()


def test_from_rtp_packets() -> None:
    mark = FrameMarking(start=True, independent=True)
    other = HeaderExtension(1, b"\x01\x02")
    for two_byte in (False, True):
        packet = _packet((other, mark.extension()), two_byte=two_byte)
        assert frame_marking_of_packet(packet) == mark
        assert frame_marking_of_packet(packet, 5) is None
    plain = RtpPacket(payload_type=96, sequence_number=1, timestamp=2, ssrc=3).serialize()
    assert frame_marking_of_packet(plain) is None
    assert find_frame_marking([other]) is None
    assert find_frame_marking([mark.extension()]) == mark
    packet = _packet((mark.extension(),))
    for cut in range(len(packet) - 2):  # every truncation of the header
        with pytest.raises(FrameMarkingDecodeError):
            frame_marking_of_packet(packet[:cut])
    broken = _packet((HeaderExtension(DEFAULT_FRAME_MARKING_ID, b"\x80\x00\x00\x00"),))
    with pytest.raises(FrameMarkingDecodeError):
        frame_marking_of_packet(broken)


markings = st.builds(
    FrameMarking,
    start=st.booleans(),
    end=st.booleans(),
    independent=st.booleans(),
    discardable=st.booleans(),
)
scalable = st.builds(
    FrameMarking,
    start=st.booleans(),
    end=st.booleans(),
    independent=st.booleans(),
    discardable=st.booleans(),
    base_layer_sync=st.booleans(),
    tid=st.integers(0, 7),
    lid=st.integers(0, 255),
    tl0_pic_idx=st.none() | st.integers(0, 255),
)


@given(markings | scalable)
def test_round_trip(marking: FrameMarking) -> None:
    assert FrameMarking.parse(marking.serialize()) == marking


@given(st.binary(max_size=40))
def test_garbage_raises_only_the_format_error(data: bytes) -> None:
    for parse in (FrameMarking.parse, frame_marking_of_packet):
        try:
            parse(data)
        except FrameMarkingDecodeError:
            pass
