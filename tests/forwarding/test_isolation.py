"""The MDD's forwarding core never loads end-to-end key code; garbage never raises."""

from __future__ import annotations

import os
import struct
import subprocess
import sys

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from perc.forwarding import ForwardingConfig, ForwardingTable

from .helpers import Address, Endpoint, conference


def test_forwarding_core_never_loads_e2e_key_code() -> None:
    """RFC 8871 §4.1 : the MDD process never loads the code that unwraps EKT tags
    or holds end-to-end keys. A fresh interpreter imports the core (and uses it) and lists
    what got loaded."""
    code = (
        "import sys, uuid\n"
        "import perc.forwarding as f\n"
        "t = f.ForwardingTable(f.ForwardingConfig(last_n=1))\n"
        "t.add(uuid.uuid4(), ('h', 1), 0.0)\n"
        "t.handle_datagram(('h', 1), bytes(64), 0.0)\n"
        "bad = sorted(m for m in sys.modules if m in ('perc.srtp.ekt', 'perc.srtp.double')"
        " or 'keywrap' in m)\n"
        "print(','.join(bad) or 'clean')\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == "clean", out.stdout + out.stderr


def _table() -> tuple[ForwardingTable[Address], list[Address]]:
    table: ForwardingTable[Address] = ForwardingTable(ForwardingConfig(last_n=1, hold_limit=4))
    eps = conference(table, 3)
    (unkeyed,) = conference(table, 1, keys=False, first_port=6000, first_name="x")
    # Let the table learn SSRCs and a video stream so RTCP and last_n paths are live.
    for ep in eps:
        table.handle_datagram(ep.address, ep.send(0.0, pt=96, keyframe=True), 0.0)
    return table, [ep.address for ep in eps] + [unkeyed.address, ("10.0.0.9", 9)]


_TABLE, _ADDRESSES = _table()

_rtpish = st.builds(
    lambda b0, b1, rest: bytes((b0, b1)) + rest,
    st.integers(0x80, 0xBF),
    st.integers(0, 255),
    st.binary(max_size=120),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(range(5)),
    st.one_of(st.binary(max_size=200), _rtpish),
    st.floats(0, 100),
)
def test_garbage_datagrams_never_raise(which: int, data: bytes, now: float) -> None:
    out = _TABLE.handle_datagram(_ADDRESSES[which], data, now)
    assert out == []  # nothing forged authenticates


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(range(5)),
    st.lists(st.one_of(st.binary(max_size=200), _rtpish), max_size=8),
    st.floats(0, 100),
)
def test_garbage_batches_never_raise(which: int, batch: list[bytes], now: float) -> None:
    # What a coalesced receive hands the table (handle_datagrams).
    assert _TABLE.handle_datagrams(_ADDRESSES[which], batch, now) == []


def test_truncations_and_bit_flips_of_valid_packets_never_raise_and_are_counted() -> None:
    table: ForwardingTable[Address] = ForwardingTable(ForwardingConfig(last_n=1))
    a, _b, _c = conference(table, 3)
    rtcp = struct.pack("!BBHI", 0x80, 200, 6, a.ssrc) + bytes(20)
    samples = [a.send(0.0), a.send(0.0, pt=96, keyframe=True), a.send_rtcp(rtcp)]
    dropped = 0
    for wire in samples:
        for cut in range(len(wire)):
            assert table.handle_datagram(a.address, wire[:cut], 0.0) == []
            dropped += 1
        for _ in range(20):
            i = int.from_bytes(os.urandom(2), "big") % len(wire)
            flipped = bytearray(wire)
            flipped[i] ^= 1 << (i % 8)
            # Most flips fail authentication; an EKT-tag flip passes the MD untouched (D11:
            # the MD never parses the tag; the receiver's EKT check catches it).
            out = table.handle_datagram(a.address, bytes(flipped), 0.0)
            dropped += not out
    c = table.associations[a.association_id].counters
    drops = sum(v for k, v in c.as_dict().items() if k.startswith("drop_"))
    assert drops == dropped
    assert c.received == drops + c.packets_in


def _rtcp_packet(ptype: int, count: int, body: bytes, pad: int) -> bytes:
    if pad:
        body = body + bytes(pad - 1) + bytes((pad,))
    body += bytes(-len(body) % 4)
    b0 = 0x80 | (0x20 if pad else 0) | count
    return struct.pack("!BBH", b0, ptype, len(body) // 4) + body


def _rr_table() -> tuple[ForwardingTable[Address], list[Endpoint]]:
    table: ForwardingTable[Address] = ForwardingTable()
    eps = conference(table, 3, first_port=7000)
    for ep in eps:
        table.handle_datagram(ep.address, ep.send(0.0), 0.0)
    return table, eps


def test_padded_rr_about_two_senders_is_split_or_forwarded_never_raises() -> None:
    table, (a, b, c) = _rr_table()
    blocks = struct.pack("!I", b.ssrc) + b"".join(
        struct.pack("!IB3sIIII", s, 0, b"\x00\x00\x00", 0, 0, 0, 0) for s in (a.ssrc, c.ssrc)
    )
    # P set with 2 bytes of padding: the parsed RR's extension is not a multiple of 4 bytes.
    rr = _rtcp_packet(201, 2, blocks + b"\xaa\xbb", 2)
    out = table.handle_datagram(b.address, b.send_rtcp(rr), 0.0)
    assert sorted(addr for addr, _ in out) == sorted([a.address, c.address])
    for ep, (_, data) in zip([a, c], sorted(out), strict=True):
        ep.deliver(data, 0.0)  # still valid SRTCP under the receiver's key


_ssrc_words = st.sampled_from([0x1000, 0x1001, 0x1002, 0xDEAD]).map(lambda s: struct.pack("!I", s))


_word = st.binary(min_size=4, max_size=4)


@st.composite
def _compounds(draw: st.DrawFn) -> bytes:
    """Mostly well-formed compounds about known and unknown SSRCs, with padding, extensions
    and now and then a wrong count or a cut."""
    out = b""
    for _ in range(draw(st.integers(1, 4))):
        ptype = draw(st.sampled_from([200, 201, 202, 203, 204, 205, 206, 207, 192, 223]))
        ssrc = draw(_ssrc_words)
        blocks = draw(st.lists(_ssrc_words.map(lambda w: w + bytes(20)), max_size=3))
        extra = b"".join(draw(st.lists(_word, max_size=2)))
        if ptype == 200:
            count, body = len(blocks), ssrc + bytes(20) + b"".join(blocks) + extra
        elif ptype == 201:
            count, body = len(blocks), ssrc + b"".join(blocks) + extra
        elif ptype in (205, 206):
            count, body = draw(st.integers(0, 31)), ssrc + draw(_ssrc_words) + extra
        else:
            count, body = draw(st.integers(0, 31)), ssrc + extra
        if draw(st.integers(0, 9)) == 0:
            count = draw(st.integers(0, 31))
        out += _rtcp_packet(ptype, count, body, draw(st.sampled_from([0, 0, 0, 1, 2, 3, 4])))
    if len(out) > 8 and draw(st.integers(0, 9)) == 0:  # now and then a broken length
        out = out[: draw(st.integers(8, len(out)))]
    return out.ljust(8, b"\x00")  # SRTCP needs the first 8 bytes (the test encrypts it)


_RR_TABLE, _RR_EPS = _rr_table()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(range(3)), _compounds())
def test_authenticated_garbage_rtcp_never_raises(which: int, compound: bytes) -> None:
    """RTCP inside valid SRTCP from a keyed endpoint is still untrusted."""
    ep = _RR_EPS[which]
    out = _RR_TABLE.handle_datagram(ep.address, ep.send_rtcp(compound), 0.0)
    for address, data in out:
        assert address != ep.address
        receiver = next(r for r in _RR_EPS if r.address == address)
        receiver.rtcp_rx.unprotect_rtcp(data)  # what we send is always valid SRTCP


def _renumbering_table() -> tuple[ForwardingTable[Address], list[Endpoint]]:
    """A last_n conference where c's feed of a's video is renumbered (offset != 0)."""
    from .test_last_n import Video

    table: ForwardingTable[Address] = ForwardingTable(ForwardingConfig(last_n=1))
    eps = conference(table, 3, first_port=8000)
    a, b, c = eps
    v = Video(table, eps)
    v.run(0.3, [a])
    v.run(0.3, [a, b])
    v.run(2.5, [a])
    assert c.got[-1].sequence_number != c.got[-1].original_sequence_number
    return table, eps


_RN_TABLE, _RN_EPS = _renumbering_table()
_RN_SEQ = [_RN_EPS[0].seq]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from([96, 111, 100, 0]),
    st.booleans(),
    st.integers(0, 3),
    st.sampled_from([None, 0, 1, 3]),
    st.binary(max_size=40),
    st.sampled_from([0, 0, 1, 5]),
)
def test_authenticated_garbage_rtp_never_raises(
    pt: int, marker: bool, cc: int, ext_words: int | None, body: bytes, pad: int
) -> None:
    """Outer-authenticated RTP with any header shape and any inner part (no inner tag, bad
    OHB) from a sender whose video is being renumbered: counted drops, never an exception."""
    a = _RN_EPS[0]
    _RN_SEQ[0] = (_RN_SEQ[0] + 1) & 0xFFFF
    b0 = 0x80 | cc | (0x10 if ext_words is not None else 0) | (0x20 if pad else 0)
    header = struct.pack("!BBHII", b0, (0x80 if marker else 0) | pt, _RN_SEQ[0], 0, a.ssrc)
    header += bytes(4 * cc)
    if ext_words is not None:
        header += struct.pack("!HH", 0xBEDE, ext_words) + bytes(4 * ext_words)
    payload = body + (bytes(pad - 1) + bytes((pad,)) if pad else b"")
    wire = a.rtcp_tx.protect_rtp(header + payload) + b"\x00"  # a's outer key, Short EKT field
    counters = _RN_TABLE.associations[a.association_id].counters
    before = counters.received
    _RN_TABLE.handle_datagram(a.address, wire, 3.2)
    assert counters.received == before + 1
    # Nothing a sender does can make the table offer a receiver's session an index twice
    # (SrtpSession would refuse it: counted as drop_limit).
    assert counters.drop_limit == 0
