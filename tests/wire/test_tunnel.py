"""RFC 9185 tunnel codec: vectors, round trips, truncations, garbage and stream framing."""

from __future__ import annotations

import uuid

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from perc.wire.tunnel import (
    MAX_BODY,
    EndpointDisconnect,
    MediaKeys,
    MsgType,
    SupportedProfiles,
    TunnelDecodeError,
    TunneledDtls,
    TunnelFramer,
    TunnelMessage,
    UnsupportedVersion,
    decode_message,
    encode_message,
)

UUID = uuid.UUID("3f2c9a1e-7b4d-4c8e-9a10-55aa66bb77cc")

# RFC 9185 §7 and SPEC 2.10 (hex, whitespace ignored) with the message each one encodes.
VECTORS: list[tuple[str, TunnelMessage]] = [
    ("0100070000040009000A", SupportedProfiles(version=0, protection_profiles=(0x0009, 0x000A))),
    ("02000100", UnsupportedVersion(highest_version=0)),
    (
        """03004f 3f2c9a1e7b4d4c8e9a1055aa66bb77cc 0009 00
           10 101112131415161718191a1b1c1d1e1f
           10 303132333435363738393a3b3c3d3e3f
           0c 4c4d4e4f5051525354555657
           0c 6465666768696a6b6c6d6e6f""",
        MediaKeys(
            association_id=UUID,
            protection_profile=0x0009,
            mki=b"",
            client_write_master_key=bytes(range(0x10, 0x20)),
            server_write_master_key=bytes(range(0x30, 0x40)),
            client_write_master_salt=bytes(range(0x4C, 0x58)),
            server_write_master_salt=bytes(range(0x64, 0x70)),
        ),
    ),
    (
        "040022 3f2c9a1e7b4d4c8e9a1055aa66bb77cc 0010 16fefd00000000000000000003010203",
        TunneledDtls(
            association_id=UUID, dtls_message=bytes.fromhex("16fefd00000000000000000003010203")
        ),
    ),
    ("050010 3f2c9a1e7b4d4c8e9a1055aa66bb77cc", EndpointDisconnect(association_id=UUID)),
]


def _wire(hex_text: str) -> bytes:
    return bytes.fromhex("".join(hex_text.split()))


def _decode_one(wire: bytes) -> TunnelMessage:
    (msg,) = TunnelFramer().feed(wire)
    return msg


@pytest.mark.parametrize(("hex_text", "message"), VECTORS)
def test_vectors_decode_and_reencode_byte_exactly(hex_text: str, message: TunnelMessage) -> None:
    wire = _wire(hex_text)
    assert decode_message(wire[0], wire[3:]) == message
    assert _decode_one(wire) == message
    assert encode_message(message) == wire


def test_unsupported_version_is_exactly_four_octets() -> None:
    assert encode_message(UnsupportedVersion(highest_version=0)) == b"\x02\x00\x01\x00"


def test_media_keys_repr_hides_keys() -> None:
    msg = VECTORS[2][1]
    assert "1011121314" not in repr(msg)
    assert str(UUID) in repr(msg)


# --- strategies -------------------------------------------------------------------------------

uuids = st.binary(min_size=16, max_size=16).map(lambda b: uuid.UUID(bytes=b))
vec255 = st.binary(min_size=1, max_size=255)

supported_profiles = st.builds(
    SupportedProfiles,
    version=st.integers(0, 255),
    protection_profiles=st.lists(st.integers(0, 0xFFFF), min_size=1, max_size=40).map(tuple),
)
unsupported_version = st.builds(UnsupportedVersion, highest_version=st.integers(0, 255))
media_keys = st.builds(
    MediaKeys,
    association_id=uuids,
    protection_profile=st.integers(0, 0xFFFF),
    mki=st.binary(max_size=255),
    client_write_master_key=vec255,
    server_write_master_key=vec255,
    client_write_master_salt=vec255,
    server_write_master_salt=vec255,
)
tunneled_dtls = st.builds(
    TunneledDtls,
    association_id=uuids,
    dtls_message=st.one_of(
        st.binary(min_size=1, max_size=300),
        st.integers(MAX_BODY - 18 - 3, MAX_BODY - 18).map(lambda n: b"\x17" * n),
    ),
)
endpoint_disconnect = st.builds(EndpointDisconnect, association_id=uuids)
messages = st.one_of(
    supported_profiles, unsupported_version, media_keys, tunneled_dtls, endpoint_disconnect
)


@pytest.mark.parametrize(
    "strategy",
    [supported_profiles, unsupported_version, media_keys, tunneled_dtls, endpoint_disconnect],
    ids=[
        "SupportedProfiles",
        "UnsupportedVersion",
        "MediaKeys",
        "TunneledDtls",
        "EndpointDisconnect",
    ],
)
def test_round_trip(strategy: st.SearchStrategy[TunnelMessage]) -> None:
    @settings(max_examples=150, deadline=None)
    @given(strategy)
    def check(msg: TunnelMessage) -> None:
        wire = encode_message(msg)
        assert int.from_bytes(wire[1:3], "big") == len(wire) - 3
        assert decode_message(wire[0], wire[3:]) == msg
        assert _decode_one(wire) == msg

    check()


@settings(max_examples=200, deadline=None)
@given(messages)
def test_every_truncation_raises_only_decode_error(msg: TunnelMessage) -> None:
    wire = encode_message(msg)
    if len(wire) > 2000:  # the 64 KiB TunneledDtls case: sample the cut points
        cuts = [*range(40), *range(len(wire) - 40, len(wire))]
    else:
        cuts = list(range(len(wire)))
    for cut in cuts:
        body = wire[3:cut] if cut >= 3 else b""
        try:
            decoded = decode_message(wire[0], body)
        except TunnelDecodeError:
            continue
        # Only a later-version SupportedProfiles may be read short (RFC 9185 §5.5).
        assert isinstance(decoded, SupportedProfiles)
        assert decoded.version != 0
        assert decoded.protection_profiles == ()
        # A truncated stream is not a message: the framer waits for the rest.
        framer = TunnelFramer()
        assert framer.feed(wire[:cut]) == []
        assert framer.pending == cut


@settings(max_examples=500, deadline=None)
@given(st.integers(0, 255), st.binary(max_size=300))
def test_garbage_bodies_raise_only_decode_error(msg_type: int, body: bytes) -> None:
    try:
        msg = decode_message(msg_type, body)
    except TunnelDecodeError:
        return
    assert 1 <= msg_type <= 5
    # Whatever parses is the type it claims, and re-encodes to the same bytes (the only
    # exception is a later-version SupportedProfiles kept as its version byte).
    wire = encode_message(msg)
    if not (
        isinstance(msg, SupportedProfiles) and msg.version != 0 and not msg.protection_profiles
    ):
        assert wire[3:] == body
    assert wire[0] == msg_type


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=400))
def test_garbage_streams_raise_only_decode_error(data: bytes) -> None:
    framer = TunnelFramer()
    try:
        framer.feed(data)
    except TunnelDecodeError:
        with pytest.raises(TunnelDecodeError):
            framer.feed(b"")
        return
    assert framer.pending <= len(data)


@settings(max_examples=200, deadline=None)
@given(st.lists(messages, max_size=8), st.data())
def test_framer_with_arbitrary_chunking(msgs: list[TunnelMessage], data: st.DataObject) -> None:
    stream = b"".join(encode_message(m) for m in msgs)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=20)))
    framer = TunnelFramer()
    got: list[TunnelMessage] = []
    start = 0
    for cut in [*cuts, len(stream)]:
        got += framer.feed(stream[start:cut])
        start = cut
    assert got == msgs
    assert framer.pending == 0


def test_framer_byte_by_byte() -> None:
    stream = b"".join(_wire(h) for h, _ in VECTORS)
    framer = TunnelFramer()
    got: list[TunnelMessage] = []
    for i in range(len(stream)):
        got += framer.feed(stream[i : i + 1])
    assert got == [m for _, m in VECTORS]


def test_framer_rejects_oversized_declared_length_at_the_header() -> None:
    framer = TunnelFramer(max_body=1000)
    # Only the header has arrived: the error comes before any body is buffered.
    with pytest.raises(TunnelDecodeError, match="exceeds the limit 1000"):
        framer.feed(b"\x04\x03\xe9")
    assert framer.pending == 0
    with pytest.raises(TunnelDecodeError, match="already failed"):
        framer.feed(_wire(VECTORS[0][0]))


def test_framer_accepts_a_body_at_the_limit() -> None:
    msg = TunneledDtls(association_id=UUID, dtls_message=b"\x16" * (1000 - 18))
    assert TunnelFramer(max_body=1000).feed(encode_message(msg)) == [msg]


@pytest.mark.parametrize("msg_type", [0, 6, 255])
def test_framer_rejects_unknown_type_at_the_header(msg_type: int) -> None:
    with pytest.raises(TunnelDecodeError, match="unknown tunnel msg_type"):
        TunnelFramer().feed(bytes([msg_type, 0, 0]))


def test_framer_holds_at_most_one_partial_message() -> None:
    framer = TunnelFramer()
    wire = encode_message(TunneledDtls(association_id=UUID, dtls_message=b"x" * 5000))
    assert framer.feed(wire * 3 + wire[:100]) != []
    assert framer.pending == 100


U = "3f2c9a1e7b4d4c8e9a1055aa66bb77cc"
KEYS = "10" + "11" * 16 + "10" + "22" * 16 + "0c" + "33" * 12 + "0c" + "44" * 12


@pytest.mark.parametrize(
    ("msg_type", "hex_body", "reason"),
    [
        (1, "00", "need 2 bytes"),
        (1, "000000", "outside <2..65535>"),
        (1, "0000030009aa", "odd"),
        (1, "000002000900", "trailing"),
        (2, "", "need 1 bytes"),
        (2, "0000", "trailing"),
        (3, U + "0009" + "00" + "00" + "22" * 16, "outside <1..255>"),
        (3, U + "0009" + "00" + KEYS + "ff", "trailing"),
        (3, U + "0009" + "01", "need 1 bytes"),
        (4, U + "0000", "empty"),
        (4, U + "000201", "declares 2 bytes, body carries 1"),
        (4, U + "00010102", "declares 1 bytes, body carries 2"),
        (4, U[:30], "too short"),
        (5, U[:30], "15 bytes"),
        (5, U + "00", "17 bytes"),
        (0, "", "unknown tunnel msg_type 0"),
        (6, "00", "unknown tunnel msg_type 6"),
    ],
)
def test_malformed_bodies(msg_type: int, hex_body: str, reason: str) -> None:
    with pytest.raises(TunnelDecodeError, match=reason):
        decode_message(msg_type, bytes.fromhex(hex_body))


def test_later_version_supported_profiles_is_read_for_its_version() -> None:
    # RFC 9185 §5.5: the KMF must recognise the version to answer UnsupportedVersion.
    assert decode_message(1, bytes.fromhex("010004000900")) == SupportedProfiles(
        version=1, protection_profiles=()
    )
    assert decode_message(1, bytes.fromhex("01000400090a0000")) == SupportedProfiles(
        version=1, protection_profiles=()
    )
    assert decode_message(1, bytes.fromhex("0100020009")) == SupportedProfiles(
        version=1, protection_profiles=(9,)
    )


def test_encoding_out_of_range_values_is_local_misuse() -> None:
    with pytest.raises(ValueError, match="outside"):
        encode_message(SupportedProfiles(version=0, protection_profiles=()))
    with pytest.raises(ValueError, match="uint16"):
        encode_message(SupportedProfiles(version=0, protection_profiles=(0x10000,)))
    with pytest.raises(ValueError, match="uint8"):
        encode_message(UnsupportedVersion(highest_version=256))
    with pytest.raises(ValueError, match="outside"):
        encode_message(TunneledDtls(association_id=UUID, dtls_message=b""))
    with pytest.raises(ValueError, match="outside"):
        encode_message(TunneledDtls(association_id=UUID, dtls_message=b"x" * (MAX_BODY - 17)))
    with pytest.raises(ValueError, match="outside"):
        encode_message(
            MediaKeys(
                association_id=UUID,
                protection_profile=9,
                mki=b"",
                client_write_master_key=b"",
                server_write_master_key=b"k",
                client_write_master_salt=b"s",
                server_write_master_salt=b"s",
            )
        )
    with pytest.raises(ValueError, match="exceeds"):
        encode_message(SupportedProfiles(version=0, protection_profiles=(9,) * 32767))
    assert MsgType.TUNNELED_DTLS == 4


def test_framer_reports_malformed_tunneled_dtls_like_decode_message() -> None:
    for body_hex, reason in [(U + "0000", "empty"), (U + "000201", "declares 2 bytes")]:
        body = bytes.fromhex(body_hex)
        with pytest.raises(TunnelDecodeError, match=reason):
            TunnelFramer().feed(bytes([4]) + len(body).to_bytes(2, "big") + body)


def test_framer_association_id_cache_is_bounded() -> None:
    class SmallCache(TunnelFramer):
        ID_CACHE_SIZE = 2

    framer = SmallCache()
    msgs = [TunneledDtls(association_id=uuid.uuid4(), dtls_message=b"\x16") for _ in range(5)]
    stream = b"".join(encode_message(m) for m in msgs * 2)
    assert framer.feed(stream) == msgs * 2
    assert len(framer._ids) <= 2
