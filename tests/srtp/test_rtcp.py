"""RTCP compound codec: SR, RR, SDES, BYE, NACK, PLI, FIR, unknown types; garbage, truncations."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from perc.wire.errors import DecodeError
from perc.wire.rtcp import (
    Bye,
    Fir,
    Nack,
    PayloadFeedback,
    Pli,
    ReceiverReport,
    ReportBlock,
    RtcpDecodeError,
    RtcpPacket,
    RtpFeedback,
    SdesChunk,
    SdesItem,
    SenderReport,
    SourceDescription,
    UnknownRtcp,
    media_ssrcs,
    parse_rtcp,
    peek_rtcp,
    sender_ssrc,
    serialize_rtcp,
)
from tests.srtp.conftest import RFC7714_RTCP, h


def test_rfc7714_rtcp_packet() -> None:
    # The RFC 7714 §17 packet is 13 words long but its length field says 13 (= 14 words):
    # as RTCP it is malformed (SRTCP does not care; the vectors still hold). With the length
    # field corrected to 12 it is an SR with one report block.
    with pytest.raises(RtcpDecodeError):
        parse_rtcp(RFC7714_RTCP)
    fixed = RFC7714_RTCP[:3] + b"\x0c" + RFC7714_RTCP[4:]
    [sr] = parse_rtcp(fixed)
    assert sr == SenderReport(
        ssrc=0x4D617273,
        ntp_timestamp=0x4E5450314E545032,
        rtp_timestamp=0x52545020,
        packet_count=0x42A,
        octet_count=0xE930,
        reports=(
            ReportBlock(
                ssrc=0x4C756E61,
                fraction_lost=0xDE,
                packets_lost=int.from_bytes(b"\xad\xbe\xef", "big", signed=True),
                highest_sequence=0xDEADBEEF,
                jitter=0xDEADBEEF,
                lsr=0xDEADBEEF,
                dlsr=0xDEADBEEF,
            ),
        ),
    )
    assert sr.reports[0].packets_lost < 0
    assert serialize_rtcp([sr]) == fixed
    assert peek_rtcp(RFC7714_RTCP) == (200, 0x4D617273)
    assert issubclass(RtcpDecodeError, DecodeError)


SAMPLE: list[RtcpPacket] = [
    ReceiverReport(1, (ReportBlock(2, 10, -5, 70000, 3, 4, 5),), extension=b"ext!"),
    SourceDescription(
        (
            SdesChunk(1, (SdesItem(1, b"alice@example.org"), SdesItem(2, b"Alice"))),
            SdesChunk(2, ()),
            SdesChunk(3, (SdesItem(1, b"abc"),)),
        )
    ),
    Nack(1, 2, ((100, 0b101), (65535, 0))),
    Pli(1, 2),
    Fir(1, 0, ((2, 7), (3, 8))),
    RtpFeedback(15, 1, 2, b"tcc!"),
    PayloadFeedback(15, 1, 2, b"remb1234"),
    UnknownRtcp(204, 3, b"NAMEdata"),
    Bye((1, 2), b"leaving"),
    Bye((), None),
]


def test_compound_round_trip() -> None:
    data = serialize_rtcp([SenderReport(1, 2, 3, 4, 5), *SAMPLE])
    assert parse_rtcp(data) == [SenderReport(1, 2, 3, 4, 5), *SAMPLE]
    assert len(data) % 4 == 0


def test_known_encodings() -> None:
    assert Pli(0x11, 0x22).serialize() == h("81ce0002 00000011 00000022")
    assert Nack(1, 2, ((0x1234, 0x8001),)).serialize() == h("81cd0003 00000001 00000002 12348001")
    assert Fir(1, 0, ((5, 9),)).serialize() == h("84ce0004 00000001 00000000 00000005 09000000")
    assert Bye((7,), b"x").serialize() == h("81cb0002 00000007 01780000")
    sdes = SourceDescription((SdesChunk(9, (SdesItem(1, b"ab"),)),)).serialize()
    assert sdes == h("81ca0003 00000009 01026162 00000000")


def test_nack_lost_and_from_lost() -> None:
    nack = Nack(1, 2, ((100, 0b101), (65535, 0x8000)))
    assert nack.lost() == (100, 101, 103, 65535, 15)
    rebuilt = Nack.from_lost(1, 2, nack.lost())
    assert rebuilt.lost() == nack.lost()
    assert rebuilt.items == ((100, 0b101), (65535, 0x8000))
    assert Nack.from_lost(1, 2, [5, 5, 6]).items == ((5, 1),)
    with pytest.raises(ValueError, match="range"):
        Nack.from_lost(1, 2, [70000])


def test_padding_is_removed() -> None:
    pli = Pli(1, 2).serialize()
    padded = bytes([pli[0] | 0x20, pli[1]]) + (3).to_bytes(2, "big") + pli[4:] + h("00000004")
    assert parse_rtcp(padded) == [Pli(1, 2)]


def test_pli_with_fci_kept_generic() -> None:
    data = PayloadFeedback(1, 1, 2, b"abcd").serialize()
    assert parse_rtcp(data) == [PayloadFeedback(1, 1, 2, b"abcd")]


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"\x80\xc8",
        b"\x40\xc8\x00\x00",  # version 1
        b"\x80\xc8\x00\x01\x00\x00\x00\x01",  # SR too short
        b"\x81\xc9\x00\x01\x00\x00\x00\x01",  # RR with a block missing
        b"\x80\xc9\x00\x02\x00\x00\x00\x01",  # length past the end
        b"\xa0\xc9\x00\x01\x00\x00\x00\x00",  # padding count 0
        b"\xa0\xc9\x00\x01\x00\x00\x00\x09",  # padding count past the body
        b"\x81\xca\x00\x01\x00\x00\x00\x01",  # SDES item list not terminated
        b"\x81\xca\x00\x02\x00\x00\x00\x01\x01\x09ab",  # SDES item runs past
        b"\x81\xca\x00\x02\x00\x00\x00\x01\x00\x00\x00\x01",  # SDES non-zero padding
        b"\x80\xca\x00\x01\x00\x00\x00\x01",  # SDES trailing bytes
        b"\x82\xcb\x00\x01\x00\x00\x00\x01",  # BYE list past the end
        b"\x81\xcb\x00\x02\x00\x00\x00\x01\x05abc",  # BYE reason length wrong
        b"\x81\xcd\x00\x01\x00\x00\x00\x01",  # feedback shorter than two SSRCs
        h("84ce0003 00000001 00000000 00000005"),  # FIR entry cut
        h("81c8000bcafebabe") + b"\xab" * 16,  # SPEC 8.4 test data: SR length 11, 24 bytes
    ],
)
def test_malformed(raw: bytes) -> None:
    with pytest.raises(RtcpDecodeError):
        parse_rtcp(raw)


def test_peek_rejects_garbage() -> None:
    with pytest.raises(RtcpDecodeError):
        peek_rtcp(b"\x80\xc8\x00\x01")
    with pytest.raises(RtcpDecodeError):
        peek_rtcp(b"\x00" * 8)


def test_serialize_rejects_bad_fields() -> None:
    with pytest.raises(ValueError, match="multiple of 4"):
        UnknownRtcp(204, 0, b"abc").serialize()
    with pytest.raises(ValueError, match="range"):
        UnknownRtcp(204, 32, b"").serialize()
    with pytest.raises(ValueError, match="24-bit"):
        ReportBlock(1, packets_lost=1 << 23).serialize()
    with pytest.raises(ValueError, match="range"):
        SenderReport(1 << 32).serialize()
    with pytest.raises(ValueError, match="255"):
        Bye((1,), b"x" * 256).serialize()
    with pytest.raises(ValueError, match="SDES"):
        SourceDescription((SdesChunk(1, (SdesItem(0, b"x"),)),)).serialize()
    with pytest.raises(ValueError, match="range"):
        Nack(1, 2, ((1 << 16, 0),)).serialize()
    with pytest.raises(ValueError, match="range"):
        Fir(1, 0, ((1, 256),)).serialize()


def _parse_or_error(data: bytes) -> None:
    try:
        packets = parse_rtcp(data)
    except RtcpDecodeError:
        return
    assert packets  # a successful parse yields at least one packet


@settings(max_examples=500)
@given(st.binary(max_size=120))
def test_garbage(data: bytes) -> None:
    _parse_or_error(data)


@settings(max_examples=300)
@given(
    st.sampled_from([200, 201, 202, 203, 204, 205, 206, 207]),
    st.integers(0, 63),
    st.binary(max_size=80),
)
def test_garbage_bodies(packet_type: int, b0: int, body: bytes) -> None:
    # A valid-looking header with a random body reaches every body decoder.
    words = len(body) // 4
    data = bytes([0x80 | b0 & 0x3F, packet_type]) + words.to_bytes(2, "big") + body[: 4 * words]
    _parse_or_error(data)


def test_every_truncation_of_sample() -> None:
    data = serialize_rtcp([SenderReport(1, 2, 3, 4, 5, (ReportBlock(9),)), *SAMPLE])
    for n in range(len(data)):
        _parse_or_error(data[:n])


u32 = st.integers(0, 0xFFFFFFFF)
blocks = st.lists(
    st.builds(
        ReportBlock,
        u32,
        st.integers(0, 255),
        st.integers(-(1 << 23), (1 << 23) - 1),
        u32,
        u32,
        u32,
        u32,
    ),
    max_size=3,
).map(tuple)
words = st.binary(max_size=12).map(lambda b: b[: len(b) // 4 * 4])
packets = st.one_of(
    st.builds(SenderReport, u32, st.integers(0, (1 << 64) - 1), u32, u32, u32, blocks, words),
    st.builds(ReceiverReport, u32, blocks, words),
    st.builds(
        SourceDescription,
        st.lists(
            st.builds(
                SdesChunk,
                u32,
                st.lists(
                    st.builds(SdesItem, st.integers(1, 255), st.binary(max_size=20)), max_size=3
                ).map(tuple),
            ),
            max_size=3,
        ).map(tuple),
    ),
    st.builds(Bye, st.lists(u32, max_size=4).map(tuple), st.none() | st.binary(max_size=20)),
    st.builds(
        Nack,
        u32,
        u32,
        st.lists(st.tuples(st.integers(0, 0xFFFF), st.integers(0, 0xFFFF)), max_size=3).map(tuple),
    ),
    st.builds(Pli, u32, u32),
    st.builds(Fir, u32, u32, st.lists(st.tuples(u32, st.integers(0, 255)), max_size=3).map(tuple)),
    st.builds(RtpFeedback, st.integers(2, 31), u32, u32, words),
    st.builds(PayloadFeedback, st.integers(5, 31), u32, u32, words),
    st.builds(UnknownRtcp, st.sampled_from([204, 207, 210]), st.integers(0, 31), words),
)


@settings(max_examples=200)
@given(st.lists(packets, min_size=1, max_size=5))
def test_round_trip_property(items: list[RtcpPacket]) -> None:
    data = serialize_rtcp(items)
    assert parse_rtcp(data) == items
    for n in range(0, len(data), 3):
        _parse_or_error(data[:n])


def test_routing_helpers() -> None:
    expected = [
        (1, (2,)),  # RR: report block about SSRC 2
        (1, ()),  # SDES
        (1, (2,)),  # NACK
        (1, (2,)),  # PLI
        (1, (2, 3)),  # FIR entries
        (1, (2,)),
        (1, (2,)),
        (None, ()),  # APP
        (1, ()),  # BYE
        (None, ()),  # empty BYE
    ]
    assert [(sender_ssrc(p), media_ssrcs(p)) for p in SAMPLE] == expected
    assert sender_ssrc(SenderReport(9, reports=(ReportBlock(4),))) == 9
    assert media_ssrcs(SenderReport(9, reports=(ReportBlock(4),))) == (4,)
    assert sender_ssrc(SourceDescription(())) is None
