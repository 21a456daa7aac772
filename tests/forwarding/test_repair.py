"""D36 repair at the MDD: NACKs answered from the cache with the bytes of the first sending,
the rest turned toward the sender, retransmissions and PLI/FIR throttled and counted."""

from __future__ import annotations

import random

import pytest

from perc.forwarding import ForwardingConfig, ForwardingTable, ForwardingUsageError
from perc.repair import RepairCache
from perc.srtp.context import SrtpSession
from perc.srtp.errors import SrtpError, SrtpUsageError
from perc.wire.rtcp import Nack, Pli, ReceiverReport

from .helpers import Address, Endpoint, conference


def _is_rtcp(data: bytes) -> bool:
    return 192 <= data[1] <= 223


def nack(ep: Endpoint, media_ssrc: int, lost: list[int]) -> bytes:
    """``ep``'s SRTCP compound: an empty RR and a generic NACK for ``lost``."""
    return ep.send_rtcp(
        ReceiverReport(ep.ssrc).serialize() + Nack.from_lost(ep.ssrc, media_ssrc, lost).serialize()
    )


def pli(ep: Endpoint, media_ssrc: int) -> bytes:
    return ep.send_rtcp(ReceiverReport(ep.ssrc).serialize() + Pli(ep.ssrc, media_ssrc).serialize())


class Sent:
    """Drives ``a``'s video into the table and keeps every datagram each receiver got."""

    def __init__(self, table: ForwardingTable[Address], eps: list[Endpoint]) -> None:
        self.table = table
        self.eps = eps
        self.first: dict[tuple[Address, int], bytes] = {}  # (receiver, SEQ) -> first bytes

    def video(self, ep: Endpoint, now: float, n: int = 1) -> list[tuple[Address, bytes]]:
        out: list[tuple[Address, bytes]] = []
        for _ in range(n):
            data = ep.send(now, pt=96, keyframe=True)
            got = self.table.handle_datagram(ep.address, data, now)
            for address, d in got:
                self.first.setdefault((address, ep.seq), d)
            out += got
        return out


def test_retransmission_is_byte_identical_and_decrypts_end_to_end() -> None:
    table: ForwardingTable[Address] = ForwardingTable(ForwardingConfig())
    a, b, c = eps = conference(table, 3)
    s = Sent(table, eps)
    lost = {1005, 1007, 1008}
    for _ in range(20):
        for address, data in s.video(a, 0.1):
            ep = b if address == b.address else c
            seq = int.from_bytes(data[2:4], "big")
            if not (ep is b and seq in lost):  # the network loses three packets to b
                ep.deliver(data, 0.1)
    out = table.handle_datagram(b.address, nack(b, a.ssrc, sorted(lost)), 0.2)
    assert [address for address, _ in out] == [b.address] * 3  # nothing for the sender
    for address, data in out:
        seq = int.from_bytes(data[2:4], "big")
        assert data == s.first[(address, seq)]  # the same bytes as the first time
        b.deliver(data, 0.2)  # and the receiver decrypts them end to end
    assert sorted(p.sequence_number for p in b.got) == list(range(1001, 1021))
    counters = table.associations[b.association_id].counters
    assert (counters.nack_received, counters.nack_answered, counters.nack_forwarded) == (3, 3, 0)
    # Asked again (its retransmission was lost too): the same bytes again.
    again = table.handle_datagram(b.address, nack(b, a.ssrc, [1005]), 0.3)
    assert again == [(b.address, s.first[(b.address, 1005)])]


def test_uncached_pids_go_to_the_sender_and_only_those() -> None:
    table: ForwardingTable[Address] = ForwardingTable(ForwardingConfig(repair_cache_packets=8))
    a, b, _c = eps = conference(table, 3)
    s = Sent(table, eps)
    s.video(a, 0.0, 20)  # SEQ 1001..1020: the cache keeps 1013..1020
    out = table.handle_datagram(b.address, nack(b, a.ssrc, [1002, 1003, 1015, 1020]), 0.1)
    to_b = [d for address, d in out if address == b.address]
    to_a = [d for address, d in out if address == a.address]
    assert to_b == [s.first[(b.address, 1015)], s.first[(b.address, 1020)]]
    assert len(to_a) == 1
    a.deliver(to_a[0], 0.1)
    nacks = [p for p in a.rtcp[-1] if isinstance(p, Nack)]
    assert [n.lost() for n in nacks] == [(1002, 1003)]
    assert nacks[0].sender_ssrc == b.ssrc and nacks[0].media_ssrc == a.ssrc
    counters = table.associations[b.association_id].counters
    assert (counters.nack_received, counters.nack_answered, counters.nack_forwarded) == (4, 2, 2)


def test_packets_too_old_are_not_answered() -> None:
    table: ForwardingTable[Address] = ForwardingTable(ForwardingConfig(repair_cache_time=0.5))
    a, b, _c = eps = conference(table, 3)
    s = Sent(table, eps)
    s.video(a, 0.0, 5)
    s.video(a, 1.0, 5)  # the first five are older than 0.5 s now
    out = table.handle_datagram(b.address, nack(b, a.ssrc, [1002, 1008]), 1.1)
    assert (b.address, s.first[(b.address, 1008)]) in out
    assert sum(address == a.address for address, _ in out) == 1  # 1002 asked of the sender


def test_a_receiver_that_joined_later_gets_no_repair_of_what_it_was_not_sent() -> None:
    table: ForwardingTable[Address] = ForwardingTable(ForwardingConfig())
    a, _b = eps = conference(table, 2)
    s = Sent(table, eps)
    s.video(a, 0.0, 10)  # 1001..1010 to b only
    (c,) = conference(table, 1, first_port=6000, first_name="c", params=a.params)
    eps.append(c)
    s.video(a, 0.1, 5)  # 1011..1015 to b and c
    out = table.handle_datagram(c.address, nack(c, a.ssrc, [1005, 1012]), 0.2)
    assert (c.address, s.first[(c.address, 1012)]) in out
    assert all(d != s.first.get((c.address, 1005)) for _, d in out)
    assert sum(address == a.address for address, _ in out) == 1  # 1005: never sent to c
    for address, data in out:
        if address == c.address:
            c.deliver(data, 0.2)


def test_nack_storm_is_limited_counted_and_never_reaches_the_sender() -> None:
    table: ForwardingTable[Address] = ForwardingTable(ForwardingConfig(repair_rate=50.0))
    a, b, _c = eps = conference(table, 3)
    s = Sent(table, eps)
    s.video(a, 0.0, 100)
    seqs = list(range(1001, 1101))
    sent = 0
    for i in range(10):
        out = table.handle_datagram(b.address, nack(b, a.ssrc, seqs), 0.5 + i * 0.001)
        assert all(address == b.address for address, _ in out)
        sent += len(out)
    counters = table.associations[b.association_id].counters
    assert sent == counters.nack_answered <= 51  # a burst of one second's worth (+ refill)
    assert counters.retransmit_throttled == 1000 - sent
    assert counters.nack_forwarded == 0
    # Later the bucket has refilled (50 per second).
    out = table.handle_datagram(b.address, nack(b, a.ssrc, seqs[-10:]), 0.95)
    assert len(out) == 10


def test_pli_toward_one_sender_passes_once_per_500ms_per_receiver() -> None:
    table: ForwardingTable[Address] = ForwardingTable(ForwardingConfig())
    a, b, c = eps = conference(table, 3)
    Sent(table, eps).video(a, 0.0, 3)
    passed = 0
    for i in range(10):
        now = 0.1 + i * 0.01
        passed += len(table.handle_datagram(b.address, pli(b, a.ssrc), now))
        passed += len(table.handle_datagram(c.address, pli(c, a.ssrc), now))
    assert passed == 2  # one from each receiver
    assert table.associations[b.association_id].counters.pli_throttled == 9
    assert len(table.handle_datagram(b.address, pli(b, a.ssrc), 0.7)) == 1


def test_repair_off_forwards_every_nack() -> None:
    table: ForwardingTable[Address] = ForwardingTable(ForwardingConfig(repair=False))
    a, b, _c = eps = conference(table, 3)
    Sent(table, eps).video(a, 0.0, 10)
    out = table.handle_datagram(b.address, nack(b, a.ssrc, [1003, 1004]), 0.1)
    assert [address for address, _ in out] == [a.address]


def test_config_checks() -> None:
    for bad in (
        {"repair_cache_packets": 0},
        {"repair_cache_time": 0.0},
        {"repair_rate": 0.0},
        {"frame_marking_id": 15},
        {"keyframe_wait": -1.0},
    ):
        with pytest.raises(ForwardingUsageError):
            ForwardingConfig(**bad)  # type: ignore[arg-type]


def _record(got: dict[tuple[Address, int, int], set[bytes]], out: list[tuple[Address, bytes]]):
    for address, d in out:
        if not _is_rtcp(d):
            key = (address, int.from_bytes(d[8:12], "big"), d[2] << 8 | d[3])
            got.setdefault(key, set()).add(d)


@pytest.mark.parametrize("last_n", [None, 1, 2])
@pytest.mark.parametrize("seed", range(4))
def test_random_membership_and_reordering_never_repairs_other_bytes(
    seed: int, last_n: int | None
) -> None:
    """Whatever happens (joins, leaves, reordering, SEQ jumps, SSRC reuse), a repair is a copy
    of a datagram that receiver already got with that SEQ: never new bytes under an index."""
    rng = random.Random(seed)
    config = ForwardingConfig(repair_cache_packets=64, last_n=last_n, last_n_idle=0.3)
    table: ForwardingTable[Address] = ForwardingTable(config)
    eps = conference(table, 3)
    params = eps[0].params
    got: dict[tuple[Address, int, int], set[bytes]] = {}  # (receiver, SSRC, SEQ) -> bytes
    held: list[tuple[Endpoint, bytes]] = []
    gone: list[int] = []
    answered = 0
    port = 7000
    now = 0.0
    for _ in range(800):
        now += 0.005
        live = [ep for ep in eps if ep.association_id in table.associations]
        roll = rng.random()
        if roll < 0.02 and len(live) < 6:
            port += 1
            (ep,) = conference(table, 1, now, first_port=port, params=params)
            ep.ssrc = gone.pop() if gone and rng.random() < 0.5 else rng.randrange(1 << 32)
            eps.append(ep)
        elif roll < 0.03 and len(live) > 2:
            leaver = rng.choice(live)
            table.remove(leaver.association_id)
            gone.append(leaver.ssrc)
        elif roll < 0.35:
            r = rng.choice(live)
            m = rng.choice([x for x in live if x is not r])
            lost = [(m.seq - rng.randrange(80)) & 0xFFFF for _ in range(rng.randrange(1, 6))]
            for address, data in table.handle_datagram(r.address, nack(r, m.ssrc, lost), now):
                if not _is_rtcp(data):
                    key = (address, int.from_bytes(data[8:12], "big"), data[2] << 8 | data[3])
                    assert data in got.get(key, set()), "a repair that is not a copy"
                    answered += 1
        else:
            ep = rng.choice(live[: rng.randrange(1, len(live) + 1)])  # some speak more
            if rng.random() < 0.03:
                ep.seq = (ep.seq + rng.choice([3, 40, 5000, 20000, 40000])) & 0xFFFF
            try:
                data = ep.send(now, pt=96, marker=rng.random() < 0.3, keyframe=True)
            except SrtpError:
                continue  # the sender's own session refused the jump
            if rng.random() < 0.1:
                held.append((ep, data))  # delivered later: reordering
                continue
            _record(got, table.handle_datagram(ep.address, data, now))
            if held and rng.random() < 0.5:
                late, late_data = held.pop(rng.randrange(len(held)))
                _record(got, table.handle_datagram(late.address, late_data, now))
    assert answered > 0


def test_reseal_refuses_an_index_never_sealed_and_repeats_bytes_of_one_that_was() -> None:
    session = SrtpSession(bytes(16), bytes(12))
    stream = session.send_stream(0x1234, 10)
    header = bytes(12)
    sealed = {seq: stream.seal(seq, b"payload %d" % seq, header) for seq in (10, 11, 13)}
    assert stream.reseal(11, b"payload 11", header) == sealed[11]
    for idx in (12, 14, -1):  # a hole, beyond the highest, nonsense
        with pytest.raises(SrtpUsageError):
            stream.reseal(idx, b"payload", header)


def test_a_seq_jump_ends_the_epoch() -> None:
    cache = RepairCache(16, 1.0, object(), 100)
    assert cache.add(100, 0.0, b"h", b"p", b"") == 100
    assert cache.add(99, 0.0, b"h", b"p", b"") == 99  # reordered: fine
    assert cache.add(100 + 20000, 0.0, b"h", b"p", b"") == -1  # beyond 2^14: epoch over
    assert cache.fan is None and cache.find(100, 0.0) is None
