"""EndpointMedia instances joined through an in-memory Media Distributor (layers ii and iii).

Everything runs on a fake clock (the endpoints' own timers); the fake MDD holds only the outer
halves and uses perc's MediaDistributorHop, as the real MDD does.
"""

from __future__ import annotations

import json
import os
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from perc.media.endpoint import EndpointMedia, MediaChoice, MediaUsageError, is_rtcp
from perc.media.sources import VideoSettings
from perc.srtp.context import SrtpSession
from perc.srtp.ekt import EktCipher, EktParameterSet
from perc.srtp.hop import HeaderChanges, Inbound
from perc.srtp.keys import SrtpProfile, exporter_length, split_exporter
from perc.wire.rtcp import Fir, Pli, serialize_rtcp
from tests.media.conference import Conference, Link, new_ekt, new_keying, seeded_link

PEER_KEYS = ("ssrc", "received", "verified", "hbh_failures", "e2e_failures")


def assert_clean(receiver: EndpointMedia, sender: EndpointMedia) -> None:
    """``receiver`` got and verified every packet ``sender`` sent, with no failure at all."""
    peer = receiver.report()["peers"][sender.name]
    assert peer["verified"] == peer["received"] == sender.sent > 0
    assert peer["hbh_failures"] == peer["e2e_failures"] == peer["payload_failures"] == 0
    assert peer["hbh_replays"] == peer["key_wait"] == peer["lost"] == 0
    assert peer["ssrc"] == sender.ssrc


@pytest.mark.parametrize(
    ("profile", "cipher"),
    [
        (SrtpProfile.DOUBLE_AEAD_AES_128_GCM, EktCipher.AESKW_128),
        (SrtpProfile.DOUBLE_AEAD_AES_256_GCM, EktCipher.AESKW_256),
    ],
)
def test_three_endpoints_verify_each_other(profile: SrtpProfile, cipher: EktCipher) -> None:
    conf = Conference()
    ekt = new_ekt(7, cipher)
    for name in ("alice", "bob", "carol"):
        conf.add(name, "both", ekt, keying=new_keying(profile))
    conf.run(3.0)
    eps = conf.endpoints
    for r in eps.values():
        report = r.report()
        assert set(report["peers"]) == set(eps) - {r.name}
        assert report["unattributed"]["received"] == 0
        assert report["spis"] == [7]
        for s in eps.values():
            if s is not r:
                assert_clean(r, s)
                assert report["peers"][s.name]["spis"] == [7]
    # audio: 50/s over [0, 3]; video: several packets per frame
    assert eps["alice"].report()["streams"]["audio"]["sent"] == 151
    assert eps["alice"].report()["streams"]["video"]["sent"] > 3 * 91
    # the MDD forwarded every packet to the two others (plus RTCP)
    total_rtp = sum(ep.sent for ep in eps.values())
    assert conf.mdd.forwarded >= 2 * total_rtp


def test_mixed_media_choices() -> None:
    conf = Conference()
    ekt = new_ekt()
    a = conf.add("audio-only", "audio", ekt)
    v = conf.add("video-only", MediaChoice.VIDEO, ekt, video=VideoSettings(keyframe_interval=0.5))
    n = conf.add("listener", "none", ekt)
    conf.run(2.0)
    for receiver in (a, v, n):
        peers = receiver.report()["peers"]
        assert "listener" not in peers
        for sender in (a, v):
            if sender is not receiver:
                assert_clean(receiver, sender)
    assert n.sent == 0 and n.report()["ssrc"] == n.rtcp_ssrc
    assert v.report()["ssrc"] == v.video.ssrc  # type: ignore[union-attr]
    assert a.report()["ssrc"] == a.audio.ssrc  # type: ignore[union-attr]
    # the video-only sender follows the key-frame schedule for Full tags (RFC 8870 §4.6)
    assert v.sender is not None and v.sender.ekt.stats.full_tags < v.sent // 5


def test_report_schema() -> None:
    conf = Conference()
    ekt = new_ekt(1)
    alice = conf.add("alice", "both", ekt)
    conf.add("bob", "audio", ekt)
    conf.run(0.5)
    report = alice.report()
    assert isinstance(report["name"], str) and report["name"] == "alice"
    assert isinstance(report["ssrc"], int) and report["ssrc"] == alice.audio.ssrc  # type: ignore[union-attr]
    assert isinstance(report["sent"], int) and report["sent"] == alice.sent
    assert report["spis"] == [1]
    bob = report["peers"]["bob"]
    assert all(isinstance(bob[k], int) for k in PEER_KEYS)
    assert json.loads(json.dumps(report)) == report


def test_rtcp_sender_and_receiver_reports() -> None:
    conf = Conference()
    ekt = new_ekt()
    eps = [conf.add(n, "both", ekt, rtcp_interval=0.5) for n in ("alice", "bob", "carol")]
    listener = conf.add("dave", "none", ekt, rtcp_interval=0.5)
    conf.run(3.0)
    for ep in eps:
        assert ep.stats.sent_rtcp >= 3
        assert ep.stats.sr_received >= 6  # two SRs (audio, video) per compound, from two peers
        assert ep.stats.rtcp_auth_failures == ep.stats.rtcp_decode_errors == 0
        # both our streams are reported on by every other endpoint, listener included
        assert set(ep.reports_about_us) == {ep.audio.ssrc, ep.video.ssrc}  # type: ignore[union-attr]
        for blocks in ep.reports_about_us.values():
            assert len(blocks) == 3
            for b in blocks.values():
                assert b.packets_lost == 0 and b.fraction_lost == 0
        assert ep.stats.last_rtt is not None and 0 <= ep.stats.last_rtt < 0.001
    assert listener.stats.rr_received == 0 and listener.stats.sr_received > 0
    # the listener reports from its own receive-only SSRC
    reporters = {r for blocks in eps[0].reports_about_us.values() for r in blocks}
    assert listener.rtcp_ssrc in reporters


def test_loss_and_reordering_are_counted_without_false_failures() -> None:
    conf = Conference()
    ekt = new_ekt()
    alice = conf.add("alice", "both", ekt)
    carol = conf.add("carol", "audio", ekt)
    bob = conf.add("bob", "both", ekt)
    seeded = seeded_link(1234, loss=0.10, reorder=0.10)
    first: dict[int, int] = {}

    def decide(index: int, datagram: bytes) -> str:
        if is_rtcp(datagram):
            return seeded._decide(index, datagram)
        ssrc = struct.unpack_from("!I", datagram, 8)[0]
        pos = first.get(ssrc, 0)
        first[ssrc] = pos + 1
        # The first packets of each stream get through in order: they start the RFC 3550
        # statistics (a late first packet would read as negative loss, A.3) and carry the
        # first Full EKT tags.
        return "pass" if pos < 3 else seeded._decide(index, datagram)

    link = Link(decide)
    conf.links["bob"] = link
    conf.run(4.0)
    delivered_rtp = [d for d in link.delivered if not is_rtcp(d)]
    dropped_rtp = [d for d in link.dropped if not is_rtcp(d)]
    assert len(dropped_rtp) > 50
    report = bob.report()
    for sender in (alice, carol):
        peer = report["peers"][sender.name]
        ssrcs = {int(s) for s in peer["streams"]}
        got = [d for d in delivered_rtp if struct.unpack_from("!I", d, 8)[0] in ssrcs]
        lost = [d for d in dropped_rtp if struct.unpack_from("!I", d, 8)[0] in ssrcs]
        assert peer["hbh_failures"] == peer["e2e_failures"] == peer["payload_failures"] == 0
        assert peer["hbh_replays"] == 0
        assert peer["received"] == peer["verified"] == len(got)
        assert peer["verified"] + len(lost) == sender.sent
        # RFC 3550 cumulative loss: every dropped packet except trailing ones is counted
        assert 0 < peer["lost"] <= len(lost)
        assert len(lost) - peer["lost"] <= 10
        assert peer["reordered"] > 0
    # RFC 3550 statistics per stream, recomputed from the order bob got the packets in
    stats = {s.ssrc: s.seq for s in bob.streams.values()}
    seq_of: dict[int, list[int]] = {}
    for d in delivered_rtp:
        ssrc, seq = struct.unpack_from("!I", d, 8)[0], struct.unpack_from("!H", d, 2)[0]
        seq_of.setdefault(ssrc, []).append(seq)
    for ssrc, seqs in seq_of.items():
        # unwrap relative to the first packet (streams are short: fewer than 2^15 packets)
        base = seqs[0]
        rel = [(s - base) & 0xFFFF for s in seqs]
        late = sum(1 for i, r in enumerate(rel) if r < max(rel[:i], default=-1))
        expected = max(rel) + 1
        seq_stats = stats[ssrc]
        assert seq_stats is not None
        assert seq_stats.reordered == late
        assert seq_stats.expected == expected
        assert seq_stats.lost == expected - len(seqs)
    assert alice.report()["peers"]["bob"]["lost"] == 0  # only bob's link was impaired


def test_rekey_mid_stream_has_no_e2e_failures() -> None:
    conf = Conference()
    ekt = new_ekt(1)
    eps = [conf.add(n, "both", ekt, rtcp_interval=0.5) for n in ("alice", "bob", "carol")]
    conf.run(1.5)
    keys_before = [ep.sender.inner_key for ep in eps]  # type: ignore[union-attr]
    second = new_ekt(2)
    for ep in eps:
        ep.rekey(second, conf.now)
    conf.run(3.0)
    third = new_ekt(3)
    for ep in eps:
        ep.rekey(third, conf.now)
    conf.run(4.5)
    for r in eps:
        assert r.spis == [1, 2, 3]
        for s in eps:
            if s is not r:
                assert_clean(r, s)
                assert r.report()["peers"][s.name]["spis"] == [1, 2, 3]
    keys_after = [ep.sender.inner_key for ep in eps]  # type: ignore[union-attr]
    assert all(a != b for a, b in zip(keys_before, keys_after, strict=True))


def test_rekey_while_a_packet_burst_is_on_the_wire() -> None:
    """EKTKeys reach endpoints a few milliseconds apart: still nothing is lost (the old key is
    used for 250 ms, RFC 8870 §4.3.1), as long as each receiver has the new EKTKey before the
    first Full tag under it arrives."""
    conf = Conference()
    ekt = new_ekt(1)
    eps = [conf.add(n, "both", ekt) for n in ("alice", "bob", "carol")]
    conf.run(1.0)
    new = new_ekt(2)
    # receivers first (they only learn it), then each sender shortly after
    for ep in eps:
        ep.receiver.add_parameter_set(new)
    for i, ep in enumerate(eps):
        conf.run(1.0 + 0.004 * i)
        ep.rekey(new, conf.now)
    conf.run(2.5)
    for r in eps:
        for s in eps:
            if s is not r:
                assert_clean(r, s)


def test_a_receiver_with_only_the_old_ekt_key_cannot_read_after_the_rekey() -> None:
    conf = Conference()
    ekt = new_ekt(1)
    alice = conf.add("alice", "both", ekt)
    bob = conf.add("bob", "both", ekt)
    leaver = conf.add("leaver", "none", ekt)  # still on the MDD, but not given the new key
    conf.run(1.0)
    rekey_at = conf.now
    new = new_ekt(2)
    alice.rekey(new, rekey_at)
    bob.rekey(new, rekey_at)
    readable_after: list[float] = []

    def watch(to: str, datagram: bytes, now: float) -> None:
        if to != "leaver" or is_rtcp(datagram):
            return
        before = sum(s.verified for s in leaver.streams.values())
        leaver.receive(datagram, now)
        if sum(s.verified for s in leaver.streams.values()) > before:
            readable_after.append(now)

    # deliver to the leaver through the watcher only
    conf.on_deliver = watch
    conf.endpoints["leaver"] = _Mute(leaver)  # type: ignore[assignment]
    conf.run(3.0)
    # Nothing sent 250 ms after the rekey (when the senders switch keys) is readable.
    assert readable_after and max(readable_after) < rekey_at + 0.25
    report = leaver.report()
    for name, sender in (("alice", alice), ("bob", bob)):
        peer = report["peers"][name]
        assert peer["hbh_failures"] == 0 and peer["hbh_replays"] == 0
        assert peer["payload_failures"] == 0
        assert peer["e2e_failures"] > 0
        assert peer["verified"] + peer["e2e_failures"] == peer["received"] == sender.sent
        assert set(peer["e2e_reasons"]) <= {"unknown_spi", "inner_auth"}
        assert peer["e2e_reasons"].get("unknown_spi", 0) > 0  # Full tags under the new SPI
    # the two who got the new key still hear each other perfectly
    assert_clean(alice, bob)
    assert_clean(bob, alice)
    assert alice.spis == [1, 2] and leaver.spis == [1]


class _Mute:
    """Stands in for an endpoint whose deliveries are handled by ``on_deliver``."""

    def __init__(self, ep: EndpointMedia) -> None:
        self._ep = ep

    def receive(self, datagram: bytes, now: float) -> None:
        pass

    def __getattr__(self, name: str) -> object:
        return getattr(self._ep, name)


def test_a_late_video_receiver_asks_for_a_key_frame() -> None:
    """Video-only senders send Full tags with key frames only; a receiver without the key
    sends a PLI, the sender makes a key frame, and the receiver gets the key (RFC 8870 §4.6)."""
    conf = Conference()
    ekt = new_ekt()
    sender = conf.add("cam", "video", ekt, video=VideoSettings(keyframe_interval=30.0))
    conf.run(1.0)
    late = conf.add("late", "none", ekt)
    conf.run(1.3)
    assert late.stats.pli_sent >= 1
    assert sender.stats.pli_received >= 1
    assert sender.video is not None and sender.video.keyframes == 2
    peer = late.report()["peers"]["cam"]
    assert peer["verified"] > 0 and peer["e2e_failures"] == 0
    # the packets before the key are failures nobody can be blamed by name for
    unattributed = late.report()["unattributed"]
    assert unattributed["e2e_reasons"] == {"no_key": unattributed["e2e_failures"]}
    assert 0 < unattributed["e2e_failures"] < 30


def test_pli_and_fir_from_the_network_trigger_key_frames() -> None:
    conf = Conference()
    ekt = new_ekt()
    cam = conf.add("cam", "both", ekt, video=VideoSettings(keyframe_interval=30.0))
    conf.add("viewer", "none", ekt)
    conf.run(0.5)
    assert cam.video is not None
    vssrc = cam.video.ssrc
    base = cam.video.keyframes
    pli = conf.mdd.originate_rtcp("cam", serialize_rtcp([Pli(0x1234, vssrc)]))
    cam.receive(pli, conf.now)
    fir = serialize_rtcp([Fir(0x1234, 0, ((vssrc, 5),))])
    cam.receive(conf.mdd.originate_rtcp("cam", fir), conf.now)
    cam.receive(conf.mdd.originate_rtcp("cam", fir), conf.now)  # retransmission: same seq
    other = conf.mdd.originate_rtcp("cam", serialize_rtcp([Pli(0x1234, 0xDEAD)]))
    cam.receive(other, conf.now)
    assert cam.stats.pli_received == 1 and cam.stats.fir_received == 1
    assert cam.stats.fir_duplicates == 1 and cam.stats.feedback_not_ours == 1
    conf.run(0.6)
    assert cam.video.keyframes == base + 1  # requests coalesce into the next frame


def _one_hop(profile: SrtpProfile = SrtpProfile.DOUBLE_AEAD_AES_128_GCM):
    conf = Conference()
    ekt = new_ekt()
    alice = conf.add("alice", "audio", ekt)
    bob = conf.add("bob", "none", ekt)
    conf.run(0.5)
    return conf, alice, bob


def _next_for_bob(conf: Conference, alice: EndpointMedia, *, full: bool | None = None) -> bytes:
    """Advance until alice sends a packet (with a Full tag if ``full``), return bob's copy."""
    while True:
        conf.now = alice.timer()  # type: ignore[assignment]
        alice.handle_timer(conf.now)
        for d in alice.datagrams_to_send():
            if is_rtcp(d):
                continue
            if full is not None and (d[-1] == 2) != full:
                continue
            return conf.mdd.forward("alice", d)[0][1]


def test_failures_are_classified_by_layer() -> None:
    conf, alice, bob = _one_hop()
    base = bob.report()["peers"]["alice"]
    assert base["verified"] > 0

    # outer ciphertext modified: the hop-by-hop layer rejects it
    d = bytearray(_next_for_bob(conf, alice, full=False))
    d[20] ^= 1
    bob.receive(bytes(d), conf.now)
    # a network duplicate: an outer replay, not a failure
    d = _next_for_bob(conf, alice)
    bob.receive(d, conf.now)
    bob.receive(d, conf.now)
    # EKT ciphertext modified (it is not covered by the outer tag): end to end
    d = bytearray(_next_for_bob(conf, alice, full=True))
    d[-10] ^= 1
    bob.receive(bytes(d), conf.now)
    # an MDD that changes the inner ciphertext and re-encrypts the outer layer properly
    conf.mdd.tamper_inner = lambda _s, p: p[:14] + bytes([p[14] ^ 1]) + p[15:]
    bob.receive(_next_for_bob(conf, alice, full=False), conf.now)
    conf.mdd.tamper_inner = None
    # a truncated datagram and an empty one
    bob.receive(_next_for_bob(conf, alice)[:11], conf.now)
    bob.receive(b"", conf.now)

    peer = bob.report()["peers"]["alice"]
    assert peer["hbh_failures"] - base["hbh_failures"] == 1
    assert peer["hbh_replays"] == 1
    assert peer["e2e_failures"] == 2
    assert peer["e2e_reasons"] == {"ekt_unwrap": 1, "inner_auth": 1}
    assert peer["payload_failures"] == 0
    unattributed = bob.report()["unattributed"]
    assert unattributed["hbh_failures"] == 2  # the two datagrams without an SSRC
    # and the stream goes on
    bob.receive(_next_for_bob(conf, alice), conf.now)
    assert bob.report()["peers"]["alice"]["verified"] == peer["verified"] + 1


def test_payload_that_does_not_verify_is_a_payload_failure() -> None:
    """Both layers fine but the payload is not what the sender's generator makes."""
    conf, alice, bob = _one_hop()
    assert alice.sender is not None and alice.audio is not None
    seq = alice.audio.stream.seq
    bad = struct.pack("!BBHII", 0x80, 111, seq, 0, alice.audio.ssrc) + os.urandom(160)
    alice.audio.stream.seq = (seq + 1) & 0xFFFF
    d = alice.sender.protect(bad, conf.now)
    bob.receive(conf.mdd.forward("alice", d)[0][1], conf.now)
    peer = bob.report()["peers"]["alice"]
    assert peer["payload_failures"] == 1 and peer["e2e_failures"] == 0


def test_bye_marks_the_stream_and_stops_the_sender() -> None:
    conf = Conference()
    ekt = new_ekt()
    alice = conf.add("alice", "both", ekt)
    bob = conf.add("bob", "audio", ekt)
    conf.run(1.0)
    alice.bye(conf.now)
    conf.pump(conf.now)
    assert alice.timer() is None
    assert bob.stats.bye_received == 1
    streams = bob.report()["peers"]["alice"]["streams"]
    assert all(s["bye"] for s in streams.values())
    sent = alice.sent
    conf.run(2.0)
    assert alice.sent == sent


def test_send_queue_is_bounded_and_drops_are_counted() -> None:
    ep = EndpointMedia("alice", "both", new_keying(), new_ekt(), 0.0, max_queue=5)
    ep.handle_timer(1.0)
    assert len(ep.datagrams_to_send()) == 5
    assert ep.stats.queue_drops > 0


def test_expired_ekt_key_stops_full_tags_and_is_counted() -> None:
    ekt = EktParameterSet.from_ekt_key(os.urandom(16), os.urandom(12), 1, 1, 0.0)
    ep = EndpointMedia("alice", "audio", new_keying(), ekt, 0.0)
    ep.handle_timer(0.5)
    ok = len(ep.datagrams_to_send())
    ep.handle_timer(1.5)  # past ekt_ttl: no more media under this EKTKey
    assert ok > 0 and ep.stats.ekt_expired == 50
    assert all(is_rtcp(d) for d in ep.datagrams_to_send())
    ep.rekey(new_ekt(2), 1.5)  # a fresh EKTKey: media resumes
    ep.handle_timer(2.0)
    assert sum(not is_rtcp(d) for d in ep.datagrams_to_send()) == 25


def test_from_exporter_and_usage_errors() -> None:
    profile = SrtpProfile.DOUBLE_AEAD_AES_256_GCM
    raw = os.urandom(exporter_length(profile))
    ep = EndpointMedia.from_exporter(
        "alice", "audio", profile, raw, ekt=new_ekt(cipher=EktCipher.AESKW_256), now=0.0
    )
    assert ep.receiver.outer_session.profile is SrtpProfile.AEAD_AES_256_GCM
    with pytest.raises(MediaUsageError):
        EndpointMedia("alice", "radio", new_keying(), new_ekt(), 0.0)
    for bad_name in ("", "x" * 65):
        with pytest.raises(MediaUsageError):
            EndpointMedia(bad_name, "none", new_keying(), new_ekt(), 0.0)
    single = split_exporter(SrtpProfile.AEAD_AES_128_GCM, os.urandom(56))
    with pytest.raises(MediaUsageError):
        EndpointMedia("alice", "audio", single, new_ekt(), 0.0)


_GARBAGE_EP = EndpointMedia("bob", "both", new_keying(), new_ekt(), 0.0)


@given(st.binary(max_size=300))
@settings(max_examples=300, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_garbage_datagrams_are_counted_never_raised(data: bytes) -> None:
    ep = _GARBAGE_EP
    before = ep.stats.received_rtp + ep.stats.received_rtcp
    ep.receive(data, 1.0)
    assert ep.stats.received_rtp + ep.stats.received_rtcp == before + 1
    assert not any(s.verified for s in ep.streams.values())


def test_a_repeated_ekt_key_does_not_rekey() -> None:
    ekt = new_ekt(1)
    ep = EndpointMedia("alice", "audio", new_keying(), ekt, 0.0)
    assert ep.sender is not None
    key = ep.sender.inner_key
    assert not ep.rekey(ekt, 0.1)
    same_again = EktParameterSet(ekt.spi, ekt.cipher, ekt.key, ekt.salt, ekt.expires_at)
    assert not ep.rekey(same_again, 0.1)
    assert ep.stats.duplicate_ekt_keys == 2 and ep.stats.rekeys == 0
    assert ep.rekey(new_ekt(2), 0.2)
    ep.handle_timer(0.5)
    assert ep.sender.inner_key != key and ep.spis == [1, 2]


def test_more_than_31_report_blocks_are_split() -> None:
    """RFC 3550 §6.4.1: the report count is 5 bits; extra blocks go into more RR packets."""
    from perc.media.stats import RemoteStream, SeqStats
    from perc.wire.rtcp import ReceiverReport, SourceDescription, parse_rtcp

    keying = new_keying()
    ep = EndpointMedia("alice", "none", keying, new_ekt(), 0.0, rtcp_interval=1.0)
    for ssrc in range(1, 41):
        st = ep.streams[ssrc] = RemoteStream(ssrc, f"peer{ssrc}")
        st.seq = SeqStats(100, 48_000)
        st.seq.update(100, 0, 1.0)
        st.last_at = 1.0
    ep.handle_timer(2.0)
    outer = keying.outer()
    mdd_side = SrtpSession(outer.client_key, outer.client_salt)
    compounds = [parse_rtcp(mdd_side.unprotect_rtcp(d)) for d in ep.datagrams_to_send()]
    assert len(compounds) == 2
    for c in compounds:
        assert isinstance(c[0], ReceiverReport) and isinstance(c[-1], SourceDescription)
        assert c[0].ssrc == ep.rtcp_ssrc
    counts = [len(c[0].reports) for c in compounds]  # type: ignore[union-attr]
    assert counts == [31, 9]
    reported = {b.ssrc for c in compounds for b in c[0].reports}  # type: ignore[union-attr]
    assert reported == set(range(1, 41))


def test_a_late_ekt_key_is_key_wait_not_an_e2e_failure() -> None:
    """bob's copy of the new EKTKey arrives 600 ms late (a lost DTLS record): until then he
    cannot read the others; once it arrives, those drops are reclassified as key wait."""
    conf = Conference()
    ekt = new_ekt(1)
    alice, bob, carol = (conf.add(n, "both", ekt) for n in ("alice", "bob", "carol"))
    conf.run(1.0)
    new = new_ekt(2)
    alice.rekey(new, conf.now)
    carol.rekey(new, conf.now)
    conf.run(1.6)
    waiting = bob.report()["peers"]["alice"]
    assert waiting["e2e_failures"] > 0  # indistinguishable from a leaver, for now
    bob.rekey(new, conf.now)
    conf.run(3.0)
    for sender in (alice, carol):
        peer = bob.report()["peers"][sender.name]
        assert peer["e2e_failures"] == 0 and peer["e2e_reasons"] == {}
        assert peer["hbh_failures"] == peer["payload_failures"] == 0
        assert peer["key_wait"] >= waiting["e2e_failures"]
        assert peer["verified"] + peer["key_wait"] == peer["received"] == sender.sent
        assert peer["spis"] == [1, 2]
    for receiver in (alice, carol):
        assert_clean(receiver, bob)


def test_last_n_renumbering_keeps_seq_contiguous_and_verifies_via_the_ohb() -> None:
    """The MDD forwards video from one of two cameras at a time (last_n = 1), renumbers each
    stream per receiver so it stays contiguous and changes the PT; the original SEQ and PT
    travel in the OHB (RFC 8723 §5.2) and the receiver still verifies every packet."""
    conf = Conference()
    ekt = new_ekt()
    cams = [conf.add(n, "video", ekt, video=VideoSettings(keyframe_interval=0.5)) for n in "AB"]
    viewer = conf.add("viewer", "none", ekt)
    next_seq: dict[tuple[str, int], int] = {}
    forwarded = {"A": 0, "B": 0}

    def select(sender: str, receiver: str, inbound: Inbound) -> HeaderChanges | bool | None:
        if receiver != "viewer":
            return False
        active = "A" if int(conf.now / 0.5) % 2 == 0 else "B"
        if sender != active:
            return False
        key = (sender, inbound.ssrc)
        seq = next_seq.get(key, inbound.sequence_number)
        next_seq[key] = (seq + 1) & 0xFFFF
        forwarded[sender] += 1
        return HeaderChanges(payload_type=100, sequence_number=seq)

    conf.mdd.select = select
    conf.run(3.0)
    report = viewer.report()
    for cam in cams:
        peer = report["peers"][cam.name]
        assert 0 < forwarded[cam.name] < cam.sent  # paused half of the time
        assert peer["verified"] == peer["received"] == forwarded[cam.name]
        assert peer["e2e_failures"] == peer["hbh_failures"] == peer["payload_failures"] == 0
        assert peer["lost"] == 0 and peer["reordered"] == 0  # contiguous for this receiver
    assert report["unattributed"]["received"] == 0


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_lossy_conference_with_a_rekey_has_no_false_failures(seed: int) -> None:
    """10% loss and 10% reordering on every link in both directions (RTP and RTCP), a rekey
    halfway whose EKTKey reaches one endpoint 0.7 s late: losses are counted, nothing is
    reported as a hop-by-hop, end-to-end or payload failure."""
    conf = Conference()
    ekt = new_ekt(1)
    names = ("alice", "bob", "carol")
    eps = [conf.add(n, "both", ekt, rtcp_interval=0.5) for n in names]
    for i, n in enumerate(names):
        conf.uplinks[n] = seeded_link(seed * 100 + i, loss=0.10, reorder=0.10)
        conf.links[n] = seeded_link(seed * 100 + 50 + i, loss=0.10, reorder=0.10)
    conf.run(1.5)
    new = new_ekt(2)
    late = eps[seed % 3]
    for ep in eps:
        if ep is not late:
            ep.rekey(new, conf.now)
    conf.run(2.2)
    late.rekey(new, conf.now)
    conf.run(4.0)
    for r in eps:
        report = r.report()
        assert r.spis == [1, 2]
        for s in eps:
            if s is r:
                continue
            peer = report["peers"][s.name]
            assert peer["hbh_failures"] == peer["e2e_failures"] == peer["payload_failures"] == 0
            assert peer["hbh_replays"] == 0
            assert peer["verified"] + peer["key_wait"] == peer["received"]
            # about 19% of packets are lost on the two links (a late key costs more)
            assert 0.08 * s.sent < peer["lost"] < 0.35 * s.sent
            assert peer["verified"] > 0.5 * s.sent
            assert 2 in peer["spis"]
        # failures without a name can only be packets before the first Full tag of a stream
        unattributed = report["unattributed"]
        assert unattributed["hbh_failures"] == unattributed["payload_failures"] == 0
        assert set(unattributed["e2e_reasons"]) <= {"no_key"}
        assert r.stats.rtcp_auth_failures == r.stats.rtcp_decode_errors == 0
    assert sum(p["key_wait"] for p in late.report()["peers"].values()) > 0
