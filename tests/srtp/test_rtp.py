"""RTP codec: fixed header, CSRCs, RFC 8285 extensions, padding; garbage and truncations."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from perc.wire.errors import DecodeError
from perc.wire.rtp import (
    ONE_BYTE_PROFILE,
    HeaderExtension,
    RtpDecodeError,
    RtpPacket,
    encode_extensions,
    parse_extensions,
    peek_rtp,
    rewrite_rtp_header,
    rtp_header_length,
)
from tests.srtp.conftest import RFC7714_RTP, h, rtp_packet


def test_rfc7714_packet() -> None:
    p = RtpPacket.parse(RFC7714_RTP)
    assert p.payload_type == 0x40
    assert p.sequence_number == 0xF17B
    assert p.timestamp == 0x8041F8D3
    assert p.ssrc == 0x5501A0B2
    assert not p.marker
    assert p.payload == b"Gallia est omnis divisa in partes tres"
    assert p.serialize() == RFC7714_RTP
    assert peek_rtp(RFC7714_RTP) == (12, 0x5501A0B2, 0xF17B)
    assert issubclass(RtpDecodeError, DecodeError)


def test_csrcs_extension_padding_round_trip() -> None:
    raw = rtp_packet(
        7,
        0xAABBCCDD,
        payload=b"hello",
        marker=True,
        csrcs=(1, 2, 3),
        extension=(0xBEDE, b"\x10\xaa\x21\xbb\xcc\x00\x00\x00"),
        padding=3,
    )
    p = RtpPacket.parse(raw)
    assert p.marker
    assert p.csrcs == (1, 2, 3)
    assert p.extension_profile == ONE_BYTE_PROFILE
    assert p.extensions() == (HeaderExtension(1, b"\xaa"), HeaderExtension(2, b"\xbb\xcc"))
    assert p.payload == b"hello"
    assert p.padding == b"\x00\x00\x03"
    assert p.header_length == 12 + 12 + 12
    assert rtp_header_length(raw) == p.header_length
    assert p.serialize() == raw


def test_two_byte_extensions() -> None:
    elements = (HeaderExtension(1, b""), HeaderExtension(200, b"x" * 20))
    profile, data = encode_extensions(elements)
    assert profile == 0x1000
    assert len(data) % 4 == 0
    assert parse_extensions(profile, data) == elements
    raw = rtp_packet(1, extension=(profile, data))
    assert RtpPacket.parse(raw).extensions() == elements
    # forced two-byte form with appbits
    profile, data = encode_extensions([HeaderExtension(3, b"ab")], two_byte=True, appbits=5)
    assert profile == 0x1005
    assert data == b"\x03\x02ab"


def test_one_byte_extension_rules() -> None:
    # padding between elements, ID 15 stops processing (RFC 8285 §4.2)
    data = h("10aa 00 00 21bbcc f0 ffff")
    assert parse_extensions(ONE_BYTE_PROFILE, data) == (
        HeaderExtension(1, b"\xaa"),
        HeaderExtension(2, b"\xbb\xcc"),
    )
    with pytest.raises(RtpDecodeError):
        parse_extensions(ONE_BYTE_PROFILE, h("13aabb"))  # says 4 bytes, has 2
    with pytest.raises(RtpDecodeError):
        parse_extensions(0x1000, h("0105aa"))
    with pytest.raises(RtpDecodeError):
        parse_extensions(0x1000, h("0000 07"))  # element header cut
    assert parse_extensions(0x1234, b"anything") == ()  # not RFC 8285: opaque
    assert encode_extensions([HeaderExtension(14, b"z" * 16)])[0] == ONE_BYTE_PROFILE
    with pytest.raises(ValueError, match="one-byte"):
        encode_extensions([HeaderExtension(15, b"z")], two_byte=False)
    with pytest.raises(ValueError, match="two-byte"):
        encode_extensions([HeaderExtension(0, b"z")], two_byte=True)


def test_rewrite_header() -> None:
    raw = rtp_packet(10, pt=96, marker=True, payload=b"abc")
    out = rewrite_rtp_header(raw, payload_type=100, sequence_number=0xFFFF, marker=False)
    p = RtpPacket.parse(out)
    assert (p.payload_type, p.sequence_number, p.marker, p.payload) == (100, 0xFFFF, False, b"abc")
    assert rewrite_rtp_header(raw) == raw
    assert RtpPacket.parse(rewrite_rtp_header(raw, marker=True, payload_type=5)).marker
    with pytest.raises(ValueError, match="payload type"):
        rewrite_rtp_header(raw, payload_type=128)
    with pytest.raises(ValueError, match="sequence"):
        rewrite_rtp_header(raw, sequence_number=-1)
    with pytest.raises(RtpDecodeError):
        rewrite_rtp_header(raw[:11])


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        bytes(11),
        b"\x40" + bytes(11),  # version 1
        b"\x81" + bytes(14),  # CC=1 but only 3 CSRC bytes
        b"\x90" + bytes(13),  # X but the extension header is cut
        b"\x90" + bytes(11) + b"\xbe\xde\x00\x02" + bytes(4),  # extension says 8, has 4
        b"\xa0" + bytes(11),  # padding bit, no padding byte
        b"\xa0" + bytes(11) + b"\x00",  # padding count 0
        b"\xa0" + bytes(11) + b"ab\x04",  # padding count past the payload
    ],
)
def test_malformed(raw: bytes) -> None:
    with pytest.raises(RtpDecodeError):
        RtpPacket.parse(raw)


def test_serialize_rejects_bad_fields() -> None:
    with pytest.raises(ValueError, match="payload type"):
        RtpPacket(128, 0, 0, 0).serialize()
    with pytest.raises(ValueError, match="range"):
        RtpPacket(0, 1 << 16, 0, 0).serialize()
    with pytest.raises(ValueError, match="padding"):
        RtpPacket(0, 0, 0, 0, padding=b"\x00\x01").serialize()
    with pytest.raises(ValueError, match="multiple of 4"):
        RtpPacket(0, 0, 0, 0, extension_profile=0xBEDE, extension_data=b"abc").serialize()
    with pytest.raises(ValueError, match="15 CSRCs"):
        RtpPacket(0, 0, 0, 0, csrcs=tuple(range(16))).serialize()


def _parse_all(data: bytes) -> None:
    """Every entry point for untrusted bytes either succeeds or raises RtpDecodeError."""
    for call in (RtpPacket.parse, rtp_header_length, peek_rtp):
        try:
            call(data)
        except RtpDecodeError:
            pass
    try:
        p = RtpPacket.parse(data)
    except RtpDecodeError:
        return
    assert p.serialize() == data  # lossless for everything parse accepts
    try:
        p.extensions()
    except RtpDecodeError:
        pass


@settings(max_examples=500)
@given(st.binary(max_size=120))
def test_garbage(data: bytes) -> None:
    _parse_all(data)


@settings(max_examples=300)
@given(st.binary(min_size=12, max_size=80))
def test_garbage_with_version_2(data: bytes) -> None:
    # Force version 2 so the deeper paths (CSRCs, extensions, padding) are exercised.
    _parse_all(bytes([0x80 | (data[0] & 0x3F)]) + data[1:])


extension_elements = st.lists(
    st.builds(HeaderExtension, st.integers(1, 14), st.binary(min_size=1, max_size=16)),
    max_size=4,
)


@settings(max_examples=200)
@given(
    pt=st.integers(0, 127),
    seq=st.integers(0, 0xFFFF),
    ts=st.integers(0, 0xFFFFFFFF),
    ssrc=st.integers(0, 0xFFFFFFFF),
    marker=st.booleans(),
    csrcs=st.lists(st.integers(0, 0xFFFFFFFF), max_size=15),
    elements=st.none() | extension_elements,
    two_byte=st.booleans(),
    payload=st.binary(max_size=64),
    pad=st.integers(0, 8),
)
def test_round_trip_and_every_truncation(
    pt: int,
    seq: int,
    ts: int,
    ssrc: int,
    marker: bool,
    csrcs: list[int],
    elements: list[HeaderExtension] | None,
    two_byte: bool,
    payload: bytes,
    pad: int,
) -> None:
    profile, data = (
        (None, b"") if elements is None else encode_extensions(elements, two_byte=two_byte)
    )
    p = RtpPacket(
        payload_type=pt,
        sequence_number=seq,
        timestamp=ts,
        ssrc=ssrc,
        marker=marker,
        csrcs=tuple(csrcs),
        extension_profile=profile,
        extension_data=data,
        payload=payload,
        padding=bytes(pad - 1) + bytes([pad]) if pad else b"",
    )
    raw = p.serialize()
    q = RtpPacket.parse(raw)
    assert q == p
    assert peek_rtp(raw) == (p.header_length, ssrc, seq)
    if elements is not None:
        assert list(q.extensions()) == elements
    for n in range(len(raw)):
        _parse_all(raw[:n])
