"""RFC 3550 reception statistics (Appendix A.1, A.3, A.8) and the report builder."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from perc.media.payload import StreamKind
from perc.media.stats import (
    KEY_WAIT_GRACE,
    RemoteStream,
    SeqStats,
    Unattributed,
    build_report,
    ntp_middle32,
    ntp_timestamp,
)


def feed(stats: SeqStats, seqs: list[int], rate: int = 48_000) -> None:
    for i, s in enumerate(seqs):
        stats.update(s & 0xFFFF, (960 * i) & 0xFFFFFFFF, i * 0.02)


def test_in_order_no_loss_no_jitter() -> None:
    s = SeqStats(100, 48_000)
    feed(s, list(range(100, 200)))
    assert (s.expected, s.received, s.lost, s.reordered) == (100, 100, 0, 0)
    assert s.jitter == 0.0
    b = s.report_block(5)
    assert (b.fraction_lost, b.packets_lost, b.highest_sequence, b.jitter) == (0, 0, 199, 0)


def test_loss_fraction_per_interval_and_cumulative() -> None:
    s = SeqStats(0, 48_000)
    feed(s, [x for x in range(100) if x % 4 != 1])  # 25 lost of 100
    b = s.report_block(1)
    assert b.packets_lost == 25 and b.highest_sequence == 99
    assert b.fraction_lost == (25 << 8) // 100  # 64: a quarter
    # Next interval: no loss, the fraction goes back to 0, the cumulative count stays.
    for x in range(100, 150):
        s.update(x, 0, 0.0)
    b = s.report_block(1)
    assert (b.fraction_lost, b.packets_lost) == (0, 25)


def test_reordering_is_not_loss() -> None:
    s = SeqStats(0, 48_000)
    order = list(range(20))
    order[5], order[6] = order[6], order[5]
    order[10], order[13] = order[13], order[10]
    feed(s, order)
    # late arrivals: 5 (after 6), then 11, 12 and 10 (after 13)
    assert (s.lost, s.reordered, s.extended_max) == (0, 4, 19)


def test_sequence_wrap_counts_cycles() -> None:
    s = SeqStats(65_500, 48_000)
    feed(s, list(range(65_500, 65_500 + 100)))
    assert s.cycles == 65_536 and s.extended_max == 65_599 and s.lost == 0
    assert s.report_block(1).highest_sequence == 65_536 + 63


def test_late_packet_across_the_wrap() -> None:
    s = SeqStats(65_534, 48_000)
    feed(s, [65_534, 0, 65_535, 1])
    assert (s.lost, s.reordered, s.cycles) == (0, 1, 65_536)


def test_large_jump_needs_two_sequential_packets() -> None:
    s = SeqStats(10, 48_000)
    feed(s, [10, 11, 12])
    assert not s.update(20_000, 0, 1.0)  # set aside once
    assert s.received == 3
    assert s.update(20_001, 0, 1.02)  # sequential: the source restarted
    assert s.restarts == 1 and s.base_seq == 20_001 and s.received == 1


def test_jitter_grows_with_arrival_variation() -> None:
    s = SeqStats(0, 90_000)
    for i in range(200):
        arrival = i * 0.033 + (0.01 if i % 2 else 0.0)  # 10 ms zig-zag
        s.update(i, 2970 * i, arrival)
    # |D| = 900 ticks on every packet, J converges to 900.
    assert 850 < s.jitter <= 900
    assert s.report_block(1).jitter == int(s.jitter)


def test_cumulative_loss_is_clamped_to_24_bits() -> None:
    s = SeqStats(0, 48_000)
    s.cycles = 1 << 30
    assert s.report_block(1).packets_lost == (1 << 23) - 1


@given(st.lists(st.integers(0, 2), min_size=1, max_size=300), st.integers(0, 65_535))
@settings(max_examples=100)
def test_loss_matches_a_model_without_reordering(gaps: list[int], start: int) -> None:
    s = SeqStats(start, 48_000)
    seq = start
    s.update(seq, 0, 0.0)
    for g in gaps:
        seq += g + 1
        s.update(seq & 0xFFFF, 0, 0.0)
    assert s.received == len(gaps) + 1
    assert s.expected == seq - start + 1
    assert s.lost == sum(gaps)


def test_ntp_helpers() -> None:
    ntp = ntp_timestamp(1.5, 100.0)
    assert ntp >> 32 == 101 and ntp & 0xFFFFFFFF == 1 << 31
    assert ntp_middle32(ntp) == (101 << 16) | 0x8000


def test_report_groups_streams_by_name_and_is_json() -> None:
    audio = RemoteStream(1, "bob", StreamKind.AUDIO, received=10, verified=9, e2e_failures=1)
    audio.e2e_reasons["inner_auth"] = 1
    audio.spis.extend([1, 2])
    audio.seq = SeqStats(0, 48_000)
    feed(audio.seq, list(range(9)))
    video = RemoteStream(2, "bob", StreamKind.VIDEO, received=5, verified=5)
    video.spis.append(2)
    anon = RemoteStream(3)  # never verified: not a peer
    report = build_report(
        "alice",
        ssrc=42,
        sent=100,
        spis=[1, 2],
        streams={1: audio, 2: video, 3: anon},
        unattributed=Unattributed(received=3, e2e_failures=3),
    )
    assert json.loads(json.dumps(report)) == report
    assert set(report) >= {"name", "ssrc", "sent", "spis", "peers"}
    assert (report["name"], report["ssrc"], report["sent"], report["spis"]) == (
        "alice",
        42,
        100,
        [1, 2],
    )
    assert list(report["peers"]) == ["bob"]
    bob = report["peers"]["bob"]
    assert {
        k: bob[k] for k in ("ssrc", "received", "verified", "hbh_failures", "e2e_failures")
    } == {
        "ssrc": 1,
        "received": 15,
        "verified": 14,
        "hbh_failures": 0,
        "e2e_failures": 1,
    }
    assert bob["spis"] == [1, 2] and bob["e2e_reasons"] == {"inner_auth": 1}
    assert report["unattributed"]["e2e_failures"] == 3


def test_key_wait_survives_a_second_rekey_before_the_first_key_arrives() -> None:
    """Late keys under loss: Full tags under SPI 2, then under SPI 3, arrive before either
    EKTKey. When the keys come, every failure that waited for them is key wait; a key that
    supersedes an awaited one (3 after 2) settles the older SPI's failures too."""

    un = Unattributed()
    for _ in range(4):
        un.count_e2e("unknown_spi", 10.0, spi=2)
    un.count_e2e("no_key", 10.1)
    for _ in range(3):
        un.count_e2e("unknown_spi", 10.2, spi=3)
    assert un.e2e_failures == 8
    un.key_arrived(3, 10.5)  # SPI 2's key never came: superseded by 3
    assert (un.e2e_failures, un.e2e_reasons, un.key_wait) == (0, {}, 8)
    un.count_e2e("inner_auth", 11.0)  # within the grace after the key: still key wait
    assert (un.e2e_failures, un.key_wait) == (0, 9)


def test_a_key_older_than_the_awaited_one_settles_only_its_own_failures() -> None:

    un = Unattributed()
    un.count_e2e("unknown_spi", 1.0, spi=0xFFFF)
    un.count_e2e("unknown_spi", 1.0, spi=1)  # SPIs wrap: 1 is newer than 0xFFFF
    un.key_arrived(0xFFFF, 1.5)
    assert (un.e2e_failures, un.key_wait, un.key_arrived_at) == (1, 1, None)
    un.key_arrived(1, 1.6)
    assert (un.e2e_failures, un.key_wait, un.key_arrived_at) == (0, 2, 1.6)


def test_a_left_out_receiver_keeps_its_failures() -> None:
    """A leaver never gets the newer key: what it cannot read stays an E2E failure."""

    un = Unattributed()
    for spi in range(5, 20):
        un.count_e2e("unknown_spi", float(spi), spi=spi)
    assert (un.e2e_failures, un.key_wait) == (15, 0)
    assert len(un.waiting) <= 8


def test_failures_until_a_sender_new_key_is_learnt_late_are_key_wait() -> None:
    """All three Full tags announcing a sender's new key were lost: its packets fail until a
    later Full tag (a key frame) brings the key. The stream then verifies under the newer SPI:
    those failures were the cost of the loss, not tampering."""
    st = RemoteStream(7)
    st.verified_one(1.0)  # under SPI 5
    st.count_e2e("inner_auth", 1.3)
    st.count_e2e("inner_auth", 1.35)
    st.verified_one(1.4, newer_spi=True)  # the first packet under SPI 6
    assert (st.e2e_failures, st.e2e_reasons, st.key_wait) == (0, {}, 2)


def test_failures_a_stream_recovers_from_without_a_new_key_stay_failures() -> None:
    st = RemoteStream(7)
    st.count_e2e("inner_auth", 1.0)  # a forged or damaged packet
    st.verified_one(1.1)  # the same key verifies again: nothing excuses it
    st.count_e2e("inner_auth", 2.0)
    st.verified_one(2.0 + KEY_WAIT_GRACE + 0.1, newer_spi=True)  # too long ago to excuse
    assert (st.e2e_failures, st.e2e_reasons, st.key_wait) == (2, {"inner_auth": 2}, 0)
    st.count_e2e("payload", 3.0)  # not a key problem at all
    st.verified_one(3.1, newer_spi=True)
    assert (st.e2e_failures, st.key_wait) == (3, 0)
