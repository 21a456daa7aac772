"""Unit tests of the record and flight layers: replay window, reassembly, packetizing, timer."""

from __future__ import annotations

import random

import pytest

from perc.dtls.flight import (
    ADDED,
    DROPPED,
    MAX_AHEAD,
    OLD,
    OutgoingCcs,
    OutgoingMessage,
    Reassembler,
    ReceivedMessage,
    RetransmitTimer,
    packetize,
)
from perc.dtls.keys import CIPHER_SUITES
from perc.dtls.record import RecordLayer, ReplayWindow
from perc.wire import dtls as w


def test_replay_window() -> None:
    win = ReplayWindow()
    assert win.is_new(0)
    win.update(0)
    assert not win.is_new(0)
    win.update(5)
    assert win.is_new(3) and not win.is_new(5)
    win.update(3)
    assert not win.is_new(3)
    win.update(100)  # slide far
    assert not win.is_new(36)  # 100 - 36 = 64: left of the window
    assert win.is_new(37) and win.is_new(99) and not win.is_new(100)
    win.update(37)
    assert not win.is_new(37)
    win.update(1 << 47)
    assert win.is_new((1 << 47) - 1) and not win.is_new(100)


def _frag(seq: int, body: bytes, off: int, n: int, t: int = 11) -> w.HandshakeFragment:
    return w.HandshakeFragment(t, len(body), seq, off, body[off : off + n])


def test_reassembly_overlaps_duplicates_any_order() -> None:
    body = bytes(range(256)) * 3
    rng = random.Random(1)
    for _ in range(50):
        pieces = []
        off = 0
        while off < len(body):
            n = rng.randint(1, 200)
            start = max(0, off - rng.randint(0, 30))  # overlapping ranges
            pieces.append((start, off + n - start))
            off += n
        pieces += rng.sample(pieces, k=min(3, len(pieces)))  # duplicates
        rng.shuffle(pieces)
        r = Reassembler()
        out: list[ReceivedMessage] = []
        for start, n in pieces:
            # ADDED until the message is complete, then the leftovers are retransmissions.
            expected = OLD if out else ADDED
            assert r.add(_frag(0, body, start, n), out) == expected
        assert out == [ReceivedMessage(11, 0, body)]
        assert r.add(_frag(0, body, 0, 10), out) == OLD


def test_reassembly_in_order_delivery_and_bounds() -> None:
    r = Reassembler()
    out: list[ReceivedMessage] = []
    r.add(w.HandshakeFragment(14, 0, 2, 0, b""), out)  # ahead: held
    r.add(w.HandshakeFragment(12, 4, 1, 0, b"abcd"), out)
    assert out == []
    r.add(w.HandshakeFragment(11, 2, 0, 0, b"xy"), out)
    assert [m.message_seq for m in out] == [0, 1, 2]
    assert r.next_seq == 3
    assert r.add(w.HandshakeFragment(11, 2, 3 + MAX_AHEAD + 1, 0, b"xy"), out) == DROPPED
    assert r.add(w.HandshakeFragment(11, 20000, 3, 0, b"x"), out) == DROPPED  # too big
    assert r.add(w.HandshakeFragment(1, 3000, 3, 0, b"x"), out) == DROPPED  # CH > 2048
    r.add(w.HandshakeFragment(11, 100, 4, 0, b"x" * 10), out)
    # Same message_seq with another type or length: the contradicting fragment starts the
    # slot over (a forged partial fragment must not block the real message).
    assert r.add(w.HandshakeFragment(12, 100, 4, 10, b"x" * 10), out) == ADDED
    assert r._slots[4].msg_type == 12 and r._slots[4].ranges == [[10, 20]]
    assert r.add(w.HandshakeFragment(11, 99, 4, 10, b"x" * 10), out) == ADDED
    assert r._slots[4].length == 99 and r._buffered == 99
    # A protected fragment replaces a plaintext slot; plaintext never joins a protected one.
    assert r.add(w.HandshakeFragment(11, 50, 4, 0, b"y" * 5), out, epoch=1) == ADDED
    assert r._slots[4].epoch == 1
    assert r.add(w.HandshakeFragment(11, 50, 4, 5, b"z" * 5), out, epoch=0) == DROPPED
    r.reset_to(5)
    assert r._buffered == 0


def test_reassembly_any_order_mode() -> None:
    r = Reassembler()
    r.any_order = True
    r.next_seq = 7
    out: list[ReceivedMessage] = []
    r.add(w.HandshakeFragment(26, 4, 30, 0, b"late"), out)
    assert out == [ReceivedMessage(26, 30, b"late")] and r.next_seq == 31
    assert r.add(w.HandshakeFragment(26, 4, 8, 0, b"old!"), out) == OLD


def test_packetize_respects_mtu_and_round_trips() -> None:
    layer = RecordLayer()
    layer.install_keys(CIPHER_SUITES[0xC02B], bytes(16), bytes(4), bytes(16), bytes(4))
    cert = bytes(range(256)) * 4
    items = [
        OutgoingMessage(0, 2, 1, b"s" * 90),
        OutgoingMessage(0, 11, 2, cert),
        OutgoingMessage(0, 14, 3, b""),
        OutgoingCcs(0),
        OutgoingMessage(1, 20, 4, b"f" * 12),
    ]
    for mtu in (128, 200, 300, 1200):
        numbers: list[tuple[int, int]] = []
        dgs = packetize(
            items,
            seal=layer.seal,
            overhead=layer.overhead,
            next_sequence=layer.next_sequence,
            mtu=mtu,
            record_numbers=numbers,
        )
        assert all(len(d) <= mtu for d in dgs)
        r = Reassembler()
        r.next_seq = 1
        out: list[ReceivedMessage] = []
        ccs = 0
        for d in dgs:
            records, trailing = w.parse_datagram_untrusted(d)
            assert trailing == 0
            for rec in records:
                if rec.content_type == 20:
                    ccs += 1
                elif rec.epoch == 0:
                    for f in w.parse_handshake_fragments_untrusted(rec.fragment):
                        r.add(f, out)
        assert ccs == 1
        assert [m.body for m in out] == [b"s" * 90, cert, b""]
        assert all(e in (0, 1) for e, _ in numbers)
    with pytest.raises(ValueError, match="MTU"):
        packetize(
            items,
            seal=layer.seal,
            overhead=layer.overhead,
            next_sequence=layer.next_sequence,
            mtu=30,
        )


def test_retransmit_timer_doubles_to_60() -> None:
    t = RetransmitTimer()
    t.start(10.0)
    assert t.deadline == 11.0
    seen = []
    now = 11.0
    for _ in range(9):
        t.backoff(now)
        seen.append(t.interval)
        now = t.deadline
    assert seen == [2, 4, 8, 16, 32, 60, 60, 60, 60]
    t.start(now)
    assert t.interval == 1.0
    t.stop()
    assert t.deadline is None


def test_sequence_numbers_per_epoch_and_echo() -> None:
    layer = RecordLayer()
    layer.set_next_sequence(0, 5)
    layer.set_next_sequence(0, 2)  # never backwards
    rec = layer.seal(22, b"x")
    assert w.parse_datagram_untrusted(rec)[0][0].sequence_number == 5
    layer.install_keys(CIPHER_SUITES[0xCCA9], bytes(32), bytes(12), bytes(32), bytes(12))
    layer.activate_write_epoch()
    r1 = w.parse_datagram_untrusted(layer.seal(23, b"y"))[0][0]
    r0 = w.parse_datagram_untrusted(layer.seal(22, b"z", epoch=0))[0][0]
    assert (r1.epoch, r1.sequence_number, len(r1.fragment)) == (1, 0, 17)  # ChaCha: +16
    assert (r0.epoch, r0.sequence_number) == (0, 6)
