"""Codec round trips, every truncation, and garbage: only DtlsDecodeError may come out."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from perc.dtls import CookieGate
from perc.wire import dtls as w
from tests.dtls.test_vectors import _trace_messages
from tests.dtls.trace import TRACE

EXT = (
    w.Extension(10, w.encode_uint16_list((29, 23))),
    w.Extension(11, w.encode_uint8_list((0,))),
    w.Extension(14, w.UseSrtp((9, 10), b"").encode()),
    w.Extension(23, b""),
    w.Extension(39, w.encode_uint8_list((1, 2))),
    w.Extension(56, w.encode_opaque8(b"A" * 20)),
    w.Extension(0xFF01, w.encode_opaque8(b"")),
    w.Extension(0x1234, b"unknown kept in order"),
)

MESSAGES: list[object] = [
    w.ClientHello(0xFEFD, bytes(range(32)), b"", b"c" * 17, (0xC02B, 0xC02C, 0xCCA9), b"\0", EXT),
    w.ClientHello(0xFEFD, bytes(32), b"s" * 32, b"", (0xC02B,), b"\0", None),
    w.HelloVerifyRequest(0xFEFF, b"x" * 255),
    w.ServerHello(0xFEFD, bytes(32), b"", 0xC02B, 0, EXT[:4]),
    w.ServerHello(0xFEFD, bytes(32), b"", 0xC02B, 0, None),
    w.Certificate((b"\x30" * 300, b"\x31" * 5)),
    w.Certificate(()),
    w.ServerKeyExchange(29, bytes(32), 0x0403, b"\x30" * 70),
    w.CertificateRequest(b"\x40", (0x0403, 0x0503), (b"CA",)),
    w.ServerHelloDone(),
    w.ClientKeyExchange(b"\x04" * 65),
    w.CertificateVerify(0x0403, b"\x30" * 71),
    w.Finished(bytes(12)),
    w.EktKey(bytes(16), bytes(12), 7, 86400),
]


@pytest.mark.parametrize("msg", MESSAGES, ids=lambda m: type(m).__name__)
def test_round_trip_and_every_truncation(msg: object) -> None:
    body = msg.encode()  # type: ignore[attr-defined]
    cls = type(msg)
    assert cls.decode(body) == msg  # type: ignore[attr-defined]
    for n in range(len(body)):
        try:
            decoded = cls.decode(body[:n])  # type: ignore[attr-defined]
        except w.DtlsDecodeError:
            continue
        # A prefix may only parse if it is itself a valid encoding (e.g. no extension block).
        assert decoded.encode() == body[:n]
    with pytest.raises(w.DtlsDecodeError):
        cls.decode(body + b"\x00")  # type: ignore[attr-defined]


def test_trace_messages_every_truncation() -> None:
    for _, m in _trace_messages():
        for n in range(len(m.body)):
            try:
                w.decode_handshake_body_untrusted(m.msg_type, m.body[:n])
            except w.DtlsDecodeError:
                pass


def test_extension_codecs_round_trip() -> None:
    assert w.decode_uint16_list(w.encode_uint16_list((1, 2, 3))) == (1, 2, 3)
    assert w.decode_uint8_list(w.encode_uint8_list((0, 1))) == (0, 1)
    assert w.decode_opaque8(w.encode_opaque8(b"tls-id")) == b"tls-id"
    assert w.UseSrtp.decode(w.UseSrtp((7, 8), b"mk").encode()) == w.UseSrtp((7, 8), b"mk")
    for bad in (b"", b"\x00", b"\x00\x01\x00", b"\x00\x02\x00"):
        with pytest.raises(w.DtlsDecodeError):
            w.decode_uint16_list(bad)
        with pytest.raises(w.DtlsDecodeError):
            w.UseSrtp.decode(bad)
    with pytest.raises(w.DtlsDecodeError):
        w.decode_empty(b"\x00")


def test_duplicate_extension_rejected() -> None:
    ch = w.ClientHello(
        0xFEFD, bytes(32), b"", b"", (0xC02B,), b"\0", (w.Extension(23, b""), w.Extension(23, b""))
    )
    with pytest.raises(w.DtlsDecodeError):
        w.ClientHello.decode(ch.encode())


def test_record_and_fragment_round_trip() -> None:
    rec = w.DtlsRecord(22, 0xFEFD, 1, (1 << 48) - 1, b"abc")
    data = w.encode_record(rec) + w.encode_record(rec)
    assert w.parse_datagram_untrusted(data) == ([rec, rec], 0)
    assert w.parse_datagram_untrusted(data[:-1]) == ([rec], 15)
    frag = w.encode_handshake_fragment(11, 100, 3, 40, b"x" * 20)
    (f,) = w.parse_handshake_fragments_untrusted(frag)
    assert (f.msg_type, f.length, f.message_seq, f.fragment_offset, f.body) == (
        11,
        100,
        3,
        40,
        b"x" * 20,
    )
    for n in range(len(frag)):
        with pytest.raises(w.DtlsDecodeError):
            w.parse_handshake_fragments_untrusted(frag[:n])
    with pytest.raises(w.DtlsDecodeError):  # runs past the message end
        w.parse_handshake_fragments_untrusted(w.encode_handshake_fragment(11, 10, 0, 5, b"x" * 6))


def test_alert_ack_ccs() -> None:
    assert w.Alert.decode(b"\x02\x28") == w.Alert(2, 40)
    for bad in (b"", b"\x01", b"\x01\x02\x03"):
        with pytest.raises(w.DtlsDecodeError):
            w.Alert.decode(bad)
    for bad in (b"", b"\x00", b"\x00\x10" + bytes(15), b"\x00\x01\x00"):
        with pytest.raises(w.DtlsDecodeError):
            w.Ack.decode(bad)
    w.decode_change_cipher_spec(b"\x01")
    with pytest.raises(w.DtlsDecodeError):
        w.decode_change_cipher_spec(b"\x02")


DECODERS = [cls.decode for cls in w.MESSAGE_CLASSES.values()] + [
    w.Alert.decode,
    w.Ack.decode,
    w.UseSrtp.decode,
    w.decode_uint16_list,
    w.decode_uint8_list,
    w.decode_opaque8,
    w.decode_ekt_selected,
    w.decode_change_cipher_spec,
    w.parse_handshake_fragments_untrusted,
]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_garbage_only_raises_decode_error(data: bytes) -> None:
    for decode in DECODERS:
        try:
            decode(data)  # type: ignore[operator]
        except w.DtlsDecodeError:
            pass
    w.parse_datagram_untrusted(data)  # never raises
    CookieGate(b"k" * 32).check(data, b"id", 0.0)  # never raises


@settings(max_examples=200, deadline=None)
@given(st.integers(0, len(TRACE) - 1), st.data())
def test_mutated_trace_datagrams(i: int, data: st.DataObject) -> None:
    dg = bytearray(TRACE[i][1])
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(dg) - 1))
        dg[pos] = data.draw(st.integers(0, 255))
    records, _ = w.parse_datagram_untrusted(bytes(dg))
    for rec in records:
        try:
            for frag in w.parse_handshake_fragments_untrusted(rec.fragment):
                if frag.is_whole:
                    w.decode_handshake_body_untrusted(frag.msg_type, frag.body)
        except w.DtlsDecodeError:
            pass
