"""Forged RTCP from a roster member, against real ``perc kmf``, ``perc mdd`` and endpoints.

Three real ``perc endpoint`` processes (alice sends audio and video, bob and carol audio) and
mallory, a member on the roster who joins through the MDD in this test process (perc's own
sans-IO DTLS client, tests/roles/join_helpers.py, driven by a small UDP loop) and then sends,
under its own hop-by-hop SRTCP key, what a hostile member would:

* RTCP BYE naming alice's SSRCs and bob's, an SR and an SDES chunk with alice's SSRC;
* a storm of 1,000 PLI at alice's video SSRC in about 5 s.

What must hold (RFC 3550 §6.6, D26, D36), read where a user would look:

* at the real endpoints' reports (``--report``): alice is never marked ``bye`` while she is
  live, her media keeps verifying to the end (exit 0 under ``--silence-limit``);
* the MDD's counters for mallory's association (``mdd_counters`` events and their log lines)
  count every forged part (``drop_rtcp_spoof``) and the throttled PLIs
  (``drop_feedback_throttled``);
* alice received at most ``1 + pli_rate x (storm length + 1 s)`` of mallory's PLIs (burst 1,
  then the configured rate; the extra second covers arrival jitter at the MDD on a loaded
  machine), plus what bob and carol sent themselves (their ``pli_sent``).
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Sequence
from typing import Any

import pytest
import trio

from perc import events
from perc.srtp.context import SrtpSession
from perc.srtp.keys import split_exporter
from perc.wire.rtcp import (
    Bye,
    Pli,
    ReceiverReport,
    RtcpPacket,
    SdesChunk,
    SdesItem,
    SenderReport,
    SourceDescription,
    serialize_rtcp,
)

from ..roles.join_helpers import JoinResult, join_once
from .conftest import LOCAL, System

pytestmark = pytest.mark.slow

PLI_COUNT = 1000
PLI_PER_SECOND = 200.0  # 1,000 in 5 s
PLI_RATE = 2.0  # the MDD's configured pli_rate (per receiver toward one media sender)
SPOOF_EVERY = 50  # one round of forged BYE/SR/SDES every this many PLIs
VIDEO_PT = 96


class Rogue:
    """A joined member's hop-by-hop side: answers its DTLS (EKTKey ACKs, rekeys), notes the
    SSRC and payload type of the media the MDD forwards to it, and sends RTCP it makes up."""

    def __init__(self, result: JoinResult) -> None:
        done = result.completed
        assert done is not None and done.srtp_profile is not None
        assert done.srtp_keying_material is not None
        outer = split_exporter(done.srtp_profile, done.srtp_keying_material).outer()
        self.result = result
        self.srtcp = SrtpSession(outer.client_key, outer.client_salt)
        self.ssrc = random.getrandbits(32)
        self.seen: dict[int, int] = {}  # SSRC -> payload type of the media forwarded to us
        self.sent = 0
        self._changed = trio.Event()

    async def serve(self) -> None:
        conn, sock, mdd = self.result.connection, self.result.socket, self.result.mdd_addr
        while True:
            for datagram in conn.datagrams_to_send():
                await sock.sendto(datagram, mdd)
            while conn.next_event() is not None:
                pass
            for datagram in conn.datagrams_to_send():  # the ACK of an EKTKey
                await sock.sendto(datagram, mdd)
            timer = conn.get_timer()
            with trio.move_on_at(timer if timer is not None else math.inf):
                data, _ = await sock.recvfrom(65535)
                if 20 <= data[0] <= 63:  # RFC 7983: DTLS
                    conn.receive_datagram(data, trio.current_time())
                elif 128 <= data[0] <= 191 and len(data) >= 12 and not 192 <= data[1] <= 223:
                    ssrc = int.from_bytes(data[8:12], "big")
                    if ssrc not in self.seen:
                        self.seen[ssrc] = data[1] & 0x7F
                        self._changed.set()
                        self._changed = trio.Event()
                continue
            conn.handle_timer(trio.current_time())

    async def video_ssrc_of(self, ssrcs: Sequence[int]) -> int:
        """Which of ``ssrcs`` carries video, from the media forwarded to us."""
        with trio.fail_after(20.0):
            while True:
                video = [s for s in ssrcs if self.seen.get(s) == VIDEO_PT]
                if video:
                    return video[0]
                await self._changed.wait()

    async def send(self, packets: list[RtcpPacket]) -> None:
        compound = self.srtcp.protect_rtcp(serialize_rtcp(packets))
        await self.result.socket.sendto(compound, self.result.mdd_addr)
        self.sent += 1


def read_report(system: System, name: str) -> dict[str, Any]:
    report: dict[str, Any] = json.loads((system.folder / f"{name}.json").read_text())
    return report


async def test_forged_rtcp_from_a_member_never_reaches_real_endpoints(system: System) -> None:
    people = ["alice", "bob", "carol"]
    kmf, kmf_port = await system.start_kmf(
        system.kmf_config(conferences={"demo": [*people, "mallory"]})
    )
    mdd_config = system.mdd_config(
        "mdd",
        kmf_port,
        mdd_extra="stats_interval = 1.0\n",
        conference_extra=f"pli_rate = {PLI_RATE}\n",
    )
    mdd, port = await system.start_mdd(mdd_config)
    media = {"alice": "both", "bob": "audio", "carol": "audio"}
    args = ("--expect-peers", "2", "--join-timeout", "15")
    procs = {
        name: await system.start_endpoint(
            name, port, *args, "--media", media[name], "--report", f"{name}.json"
        )
        for name in people
    }
    for name, proc in procs.items():
        for peer in people:
            if peer != name:
                await proc.wait_event(events.EndpointPeerVerified, peer=peer)
    alice_ssrcs = (await procs["alice"].wait_event(events.EndpointMediaStarted)).ssrcs
    (bob_ssrc,) = (await procs["bob"].wait_event(events.EndpointMediaStarted)).ssrcs

    joined = await join_once((LOCAL, port), system.identity("mallory"), system.fingerprint("kmf"))
    assert joined.joined, joined
    rogue = Rogue(joined)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(rogue.serve)
        video = await rogue.video_ssrc_of(alice_ssrcs)
        audio = next(s for s in alice_ssrcs if s != video)
        forged: list[list[RtcpPacket]] = [
            [ReceiverReport(rogue.ssrc), Bye(tuple(alice_ssrcs), b"forged")],
            [
                SenderReport(audio, packet_count=1),
                SourceDescription((SdesChunk(audio, (SdesItem(1, b"alice"),)),)),
            ],
            [ReceiverReport(rogue.ssrc), Bye((bob_ssrc,), b"forged")],
        ]
        spoofed_parts = len(alice_ssrcs) + 2 + 1  # BYE SSRCs, SR, SDES chunk, BYE SSRC
        rounds = 0
        start = trio.current_time()
        for i in range(PLI_COUNT):
            if i % SPOOF_EVERY == 0:
                for compound in forged:
                    await rogue.send(compound)
                rounds += 1
            await rogue.send([ReceiverReport(rogue.ssrc), Pli(rogue.ssrc, video)])
            if i % 20 == 19:
                # Pacing the attacker (200 PLI/s), not waiting for a result.
                await trio.sleep_until(start + (i + 1) / PLI_PER_SECOND)
        storm = trio.current_time() - start

        # The MDD counted all of it (its counters come once a second while they change).
        local = f"{LOCAL}:{joined.local_address[1]}"
        keyed = await mdd.wait_event(events.AssociationKeyed, peer=local)
        counted = await mdd.wait_event(
            events.MddCounters,
            association=keyed.association,
            where=lambda e: e.counters.get("rtcp_in", 0) >= rogue.sent,
            timeout=30.0,
        )
        nursery.cancel_scope.cancel()
    await joined.leave()

    allowed = 1 + PLI_RATE * (storm + 1.0)
    c = counted.counters
    assert c["drop_rtcp_spoof"] == rounds * spoofed_parts, c
    assert c["drop_feedback_throttled"] >= PLI_COUNT - allowed, (c, storm)
    assert mdd.find(r"drops: .*feedback_throttled=\d+.*rtcp_spoof=\d+"), mdd.text

    # bob leaves first, then carol, then alice: alice is live all along, so nobody may have
    # seen a BYE from her; bob, who left first, saw no BYE from anyone.
    reports = {}
    for name in ("bob", "carol", "alice"):
        assert await system.stop(procs[name]) == 0, procs[name].text
        reports[name] = read_report(system, name)
    for name in ("bob", "carol"):
        peer = reports[name]["peers"]["alice"]
        assert peer["bye"] is False, (name, peer)
        assert not any(s["bye"] for s in peer["streams"].values()), (name, peer)
        assert peer["verified"] > 0 and peer["gap"] is None, (name, peer)
        assert peer["silent_for"] < reports[name]["silence_limit"], (name, peer)
    assert reports["bob"]["stats"]["bye_received"] == 0, reports["bob"]["stats"]
    assert reports["carol"]["peers"]["bob"]["bye"] is True  # bob's own BYE does go through

    # The PLI storm reached alice at the configured rate, no faster.
    own = sum(reports[n]["stats"]["pli_sent"] for n in ("bob", "carol"))
    pli = reports["alice"]["stats"]["pli_received"]
    assert 1 <= pli <= allowed + own, (pli, allowed, own, storm)
    await system.stop(mdd)
    await system.stop(kmf)
    for proc in (kmf, mdd, *procs.values()):
        assert "Traceback" not in proc.text, proc.text
    print(
        f"rtcp spoof: {rogue.sent} compounds ({rounds} forged rounds, {PLI_COUNT} PLI in "
        f"{storm:.2f} s); MDD drop_rtcp_spoof={c['drop_rtcp_spoof']} "
        f"drop_feedback_throttled={c['drop_feedback_throttled']}; alice pli_received={pli} "
        f"(bound {allowed:.1f} + {own} from bob and carol)"
    )
