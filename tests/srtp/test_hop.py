"""The Media Distributor hop (RFC 8723 §5.2): outer keys only, EKT opaque, OHB rules."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from perc.srtp.context import SrtpSession
from perc.srtp.errors import ReplayError, SrtpError, SrtpUsageError
from perc.srtp.hop import (
    HeaderChanges,
    HopDecodeError,
    HopStats,
    MediaDistributorHop,
    rtp_header_length,
)
from perc.wire.ekt import ExtensionEktField, FullEktField
from perc.wire.ohb import Ohb, OhbDecodeError

from .double_helpers import make_chain, rtp, session_pair


def test_hop_never_loads_ekt_unwrapping_code() -> None:
    """The MDD imports hop.py; neither perc.srtp.ekt nor key unwrap may come with it."""
    code = (
        "import sys, perc.srtp.hop\n"
        "bad = [m for m in sys.modules if m in ('perc.srtp.ekt', 'perc.srtp.double')"
        " or m.endswith('keywrap')]\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == ""


def _hop() -> tuple[SrtpSession, MediaDistributorHop, SrtpSession, SrtpSession]:
    """(upstream sender session, hop, hop -> receiver session, receiver session)."""
    up, hop_in = session_pair()
    to_b, b_in = session_pair()
    return up, MediaDistributorHop(hop_in), to_b, b_in


@pytest.mark.parametrize(
    "field",
    [
        b"\x00",
        FullEktField(os.urandom(40), 0x0102, 9).encode(),
        FullEktField(os.urandom(251), 0xFFFF, 0xFFFF).encode(),
        ExtensionEktField(0x10, b"future").encode(),
    ],
    ids=["short", "full", "full-longest", "extension"],  # stable across pytest processes
)
def test_ekt_field_passes_unchanged(field: bytes) -> None:
    up, hop, to_b, b_in = _hop()
    body = os.urandom(50) + b"\x00"  # inner part + empty OHB
    wire = up.protect_rtp(rtp(1, payload=body)) + field
    inbound = hop.decrypt(wire)
    assert inbound.ekt_field == field
    out = hop.encrypt_for(to_b, inbound, HeaderChanges(payload_type=5))
    assert out.endswith(field)
    plain = b_in.unprotect_rtp(out[: len(out) - len(field)])
    assert plain[1] == 5 and plain.endswith(Ohb(payload_type=111).encode())


@pytest.mark.parametrize(
    "trailer", [b"\x01", b"\x02", b"\x00\x07\x02", b"\x03\x00\x02", b"\x00\x02\x04"]
)
def test_bad_ekt_framing(trailer: bytes) -> None:
    up, hop, _, _ = _hop()
    wire = up.protect_rtp(rtp(1, payload=b"\x00")) + trailer
    with pytest.raises(HopDecodeError):
        hop.decrypt(wire[-len(trailer) - 1 :] if trailer == b"\x02" else wire)
    assert hop.stats.ekt_framing_errors == 1


def test_bad_ohb_only_matters_when_rewriting() -> None:
    up, hop, to_b, b_in = _hop()
    inbound = hop.decrypt(up.protect_rtp(rtp(1, payload=b"abc\xf0")) + b"\x00")
    with pytest.raises(OhbDecodeError):
        inbound.ohb()
    # without changes the MD does not look at the OHB at all
    out = hop.encrypt_for(to_b, inbound)
    assert b_in.unprotect_rtp(out[:-1]).endswith(b"abc\xf0")
    with pytest.raises(HopDecodeError):
        hop.encrypt_for(to_b, inbound, HeaderChanges(sequence_number=9))
    assert hop.stats.ohb_errors == 1


def test_changes_per_receiver_and_cache() -> None:
    chain = make_chain()
    wire = chain.sender.protect(rtp(10, pt=96), 0.0)
    inbound = chain.md1.decrypt(wire)
    assert (inbound.ssrc, inbound.payload_type, inbound.sequence_number, inbound.marker) == (
        0x11223344,
        96,
        10,
        False,
    )
    receivers = [session_pair() for _ in range(3)]
    changes = [HeaderChanges(payload_type=100), HeaderChanges(payload_type=100), None]
    outs = [
        chain.md1.encrypt_for(tx, inbound, c) for (tx, _), c in zip(receivers, changes, strict=True)
    ]
    for (_, rx), out, c in zip(receivers, outs, changes, strict=True):
        plain = rx.unprotect_rtp(out[:-47])
        assert plain[1] == (96 if c is None else 100)
        assert plain.endswith(b"\x00" if c is None else Ohb(payload_type=96).encode())
    # the same changes gave the same plaintext (built once), different ciphertexts (keys)
    assert outs[0] != outs[1]
    assert chain.md1.stats == HopStats()


def test_hop_replay_even_with_other_ekt_field() -> None:
    up, hop, _, _ = _hop()
    srtp = up.protect_rtp(rtp(1, payload=b"\x00"))
    hop.decrypt(srtp + b"\x00")
    with pytest.raises(ReplayError):
        hop.decrypt(srtp + ExtensionEktField(4, b"x").encode())


def test_without_ekt() -> None:
    up, hop_in = session_pair()
    to_b, b_in = session_pair()
    hop = MediaDistributorHop(hop_in, expect_ekt=False)
    pkt = rtp(1, payload=b"xyz\x00")
    out = hop.encrypt_for(to_b, hop.decrypt(up.protect_rtp(pkt)))
    assert b_in.unprotect_rtp(out) == pkt


def test_header_changes_validation() -> None:
    with pytest.raises(SrtpUsageError):
        HeaderChanges(payload_type=128)
    with pytest.raises(SrtpUsageError):
        HeaderChanges(sequence_number=-1)


def test_rtp_header_length() -> None:
    assert rtp_header_length(rtp(1, payload=b"")) == 12
    assert rtp_header_length(rtp(1, payload=b"", csrcs=(1, 2))) == 20
    assert rtp_header_length(rtp(1, payload=b"", extension=(0xBEDE, bytes(8)))) == 24
    assert rtp_header_length(b"\x90" + bytes(13)) == -1
    assert rtp_header_length(b"\x40" + bytes(20)) == -1
    assert rtp_header_length(b"\x8f" + bytes(20)) == -1


@given(st.binary(max_size=120))
def test_garbage_raises_only_srtp_errors(data: bytes) -> None:
    _, hop, to_b, _ = _hop()
    for cut in (len(data), len(data) // 2):
        try:
            inbound = hop.decrypt(data[:cut])
        except SrtpError:
            continue
        hop.encrypt_for(to_b, inbound)  # pragma: no cover - a forgery would need the key


def test_refuses_to_reencrypt_with_inbound_session() -> None:
    up, hop, _, _ = _hop()
    inbound = hop.decrypt(up.protect_rtp(rtp(1, payload=b"\x00")) + b"\x00")
    with pytest.raises(SrtpUsageError):
        hop.encrypt_for(hop.inbound_session, inbound)


def test_decrypt_keeps_the_parts_it_found() -> None:
    """One header parse: header (outer AAD), outer plaintext, SEQ, SSRC and EKT field apart."""
    up, hop, to_b, b_in = _hop()
    pkt = rtp(7, payload=b"inner\x00", csrcs=(9,), extension=(0xBEDE, b"\x10\xaa\x00\x00"))
    hlen = 12 + 4 + 8
    field = FullEktField(os.urandom(24), 3, 1).encode()
    inbound = hop.decrypt(up.protect_rtp(pkt) + field)
    assert (inbound.header, inbound.payload) == (pkt[:hlen], pkt[hlen:])
    assert (inbound.seq, inbound.ssrc, inbound.ekt_field) == (7, 0x11223344, field)
    assert inbound.packet == pkt
    # The receiver's send stream seals the same parts: what encrypt_for does.
    stream = to_b.send_stream(inbound.ssrc, inbound.seq)
    out = inbound.header + stream.seal(inbound.seq, inbound.payload, inbound.header) + field
    assert b_in.unprotect_rtp(out[: -len(field)]) == pkt
    # Re-splitting an edited packet (tests tamper with it this way).
    inbound.packet = rtp(8, payload=b"other\x00")
    assert (inbound.header, inbound.payload, inbound.seq) == (
        rtp(8, payload=b"")[:12],
        b"other\x00",
        8,
    )
    with pytest.raises(HopDecodeError):
        inbound.packet = b"\x80" * 5


def test_a_header_running_into_the_tag_or_ekt_field_is_malformed() -> None:
    up, hop, _, _ = _hop()
    srtp = up.protect_rtp(rtp(1, payload=b"\x00"))
    for data in (srtp[:20] + b"\x00", b"\x90" + srtp[1:12] + b"\x00"):
        with pytest.raises(HopDecodeError):
            hop.decrypt(data)
    assert hop.stats.malformed == 2
