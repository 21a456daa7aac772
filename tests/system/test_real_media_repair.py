"""Repair and keyframe-aware switching of real VP8 through real processes (D35, D36).

*Repair under loss.* Alice sends real VP8 (the generated test pattern) straight to the MDD;
bob (``--repair``) and carol (``--no-repair``) receive through the impairment proxy, which
drops 5 % of the datagrams in the MDD-to-receiver direction only. The loss starts once both
have verified alice's media (the stream's first key frame went through: a start under loss
is a PLI matter, not a NACK one) and lasts to the end. With repair, at least 99 % of the
frames alice sent reach bob complete; carol's figure, without repair, is printed next to it
(and is lower), so the gain is measured, and the MDD answered bob's NACKs from its cache.

*last_n = 1 with three video senders.* Dave receives (``--media none --record``) while alice
sends all along and bob, then carol, send for a few seconds each: each newcomer takes dave's
one feed, and when it leaves alice's feed resumes at the MDD's choice of packet. Every feed
dave starts (its report's ``feed_starts``, counted on the end-to-end decrypted payload) must
begin with a key frame, and dave's decoders report no error.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest

from perc.events import AssociationKeyed, EndpointPeerVerified, MddCounters
from tests.netutil.impair import ImpairmentProxy

from .conftest import LOCAL, Proc, System
from .test_conference import NO_REKEY, conference, endpoint, report, watch

pytest.importorskip("av")

pytestmark = pytest.mark.slow

LOSS = 0.05
#: Alice's real video: 30 fps for this long
SECONDS = 8


def latest_counters(mdd: Proc) -> Counter[str]:
    """The MDD's counters summed over its associations (each one's latest report)."""
    latest = {e.association: e.counters for e in mdd.find_events(MddCounters)}
    total: Counter[str] = Counter()
    for counters in latest.values():
        total.update(counters)
    return total


async def test_repair_brings_lossy_video_to_99_percent(system: System) -> None:
    kmf, mdd, port = await conference(system, ["alice", "bob", "carol"], kmf_extra=NO_REKEY)
    proxy = ImpairmentProxy((LOCAL, port), drop=0.0, reorder=0.0, seed=13)
    await system.nursery.start(proxy.serve)
    assert proxy.address is not None
    receivers = {
        name: await endpoint(system, name, proxy.address[1], "--media", "none", flag)
        for name, flag in (("bob", "--repair"), ("carol", "--no-repair"))
    }
    for proc in receivers.values():
        await proc.wait_for(r"joined")
    alice = await endpoint(
        system, "alice", port, "--codec", "real", "--media", "video", "--duration", str(SECONDS)
    )
    for proc in receivers.values():
        await proc.wait_event(EndpointPeerVerified, 60, peer="alice")
    proxy.drop_to_client = LOSS
    assert await alice.wait_exit(60) == 0, alice.text
    for proc in receivers.values():
        assert await system.stop(proc) == 0, proc.text
    await system.stop(mdd)
    await system.stop(kmf)

    sent = report(system, "alice")["streams"]["video"]["frames"]
    assert sent >= SECONDS * 30 * 0.9, sent  # the sender kept its frame rate, near enough
    got: dict[str, dict[str, Any]] = {
        name: report(system, name)["peers"]["alice"]["video"] for name in receivers
    }
    on, off = (got[n]["frames_complete"] / sent for n in ("bob", "carol"))
    print(
        f"\nvideo frames complete at the receiver with {LOSS:.0%} loss toward it: "
        f"repair on {on:.2%} ({got['bob']['frames_complete']}/{sent}), "
        f"repair off {off:.2%} ({got['carol']['frames_complete']}/{sent}); "
        f"datagrams dropped by the proxy: {proxy.to_client.dropped}"
    )
    assert proxy.to_client.dropped > 0 and proxy.to_server.dropped == 0
    assert on >= 0.99, got["bob"]
    assert off <= on, got
    assert got["bob"]["recovered"] > 0 and got["bob"]["nacks_sent"] > 0, got["bob"]
    assert got["carol"]["nacks_sent"] == 0, got["carol"]
    mdd_counts = latest_counters(mdd)
    print(f"MDD: {mdd_counts['nack_received']} NACKs received, "
          f"{mdd_counts['nack_answered']} answered from its cache, "
          f"{mdd_counts['nack_forwarded']} forwarded")  # fmt: skip
    assert mdd_counts["nack_received"] > 0 and mdd_counts["nack_answered"] > 0, mdd_counts


async def test_last_n_feeds_start_at_key_frames(system: System) -> None:
    people = ["alice", "bob", "carol", "dave"]
    kmf, mdd, port = await conference(system, people, kmf_extra=NO_REKEY, mdd_extra="last_n = 1\n")
    video = ("--codec", "real", "--media", "video", "--video-fps", "15")
    dave = await endpoint(system, "dave", port, "--media", "none", "--record", "rec")
    await dave.wait_for(r"joined")
    dave_assoc = (await mdd.wait_event(AssociationKeyed)).association
    alice = await endpoint(system, "alice", port, *video, "--duration", "60")
    await dave.wait_event(EndpointPeerVerified, 60, peer="alice")
    for name in ("bob", "carol"):
        # The newcomer's activity start puts it first: dave's one feed switches to it.
        proc = await endpoint(system, name, port, *video, "--duration", "3")
        await dave.wait_event(EndpointPeerVerified, 60, peer=name)
        assert await proc.wait_exit(60) == 0, proc.text
        # Only alice sends now: what dave gets next is alice's feed, resumed.
        await watch(mdd, dave_assoc, sent_to=40, timeout=60)
    assert await system.stop(alice) == 0, alice.text
    assert await system.stop(dave) == 0, dave.text
    await system.stop(mdd)
    await system.stop(kmf)

    got = report(system, "dave")
    starts = {name: got["peers"][name]["video"] for name in ("alice", "bob", "carol")}
    print("\nfeed starts at dave:", {n: (v["feed_starts"], v["feed_starts_keyframe"])
                                     for n, v in starts.items()})  # fmt: skip
    assert starts["alice"]["feed_starts"] >= 3, starts  # the first, and after bob and carol
    assert starts["bob"]["feed_starts"] >= 1 and starts["carol"]["feed_starts"] >= 1, starts
    for name, v in starts.items():
        assert v["feed_starts_keyframe"] == v["feed_starts"], (name, v)
    for name in ("alice", "bob", "carol"):
        decoded = got["decoded"][name]
        assert decoded["video_decode_errors"] == 0, (name, decoded)
        assert decoded["video_frames"] > 0, (name, decoded)
    assert latest_counters(mdd)["drop_last_n"] > 0
