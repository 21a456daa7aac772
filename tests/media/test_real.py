"""Real media in the endpoint engine (D35, D36), in memory: identity, repair, decode errors."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from perc.media.endpoint import EndpointMedia
from perc.media.payload import PayloadDecodeError, StreamKind
from perc.media.real import (
    RealSettings,
    RealSource,
    identity_padding,
    parse_identity_untrusted,
)
from perc.wire.framemarking import frame_marking_of_packet
from perc.wire.rtp import RtpPacket
from tests.media.conference import Conference, new_ekt, seeded_link

av = pytest.importorskip("av")

from perc.media.pipeline import MediaSink, Pipeline  # noqa: E402

SMALL = RealSettings(width=160, height=96, fps=30, bitrate=300_000)


def test_identity_padding_round_trip() -> None:
    pad = identity_padding("alice", StreamKind.VIDEO)
    assert pad[-1] == len(pad)
    assert parse_identity_untrusted(pad) == ("alice", StreamKind.VIDEO)
    for cut in range(len(pad)):
        with pytest.raises(PayloadDecodeError):
            parse_identity_untrusted(pad[:cut])


@given(st.binary(max_size=300))
def test_identity_parser_raises_only_its_error(data: bytes) -> None:
    try:
        parse_identity_untrusted(data)
    except PayloadDecodeError:
        pass


def feed(conf: Conference, pipelines: dict[str, Pipeline], until: float, step: float) -> None:
    """Run the conference to ``until``, encoding each real frame just before its slot (what
    the shell does in a thread)."""
    t = conf.now
    fed: dict[int, int] = {}
    while t < until:
        t = min(until, t + step)
        for name, pipeline in pipelines.items():
            ep = conf.endpoints[name]
            for source, producer in ((ep.audio, pipeline.audio), (ep.video, pipeline.video)):
                if not isinstance(source, RealSource) or producer is None:
                    continue
                index = max(fed.get(id(source), 0), source.slot)
                while source.due(index) <= t:
                    frames = producer.make(source.take_keyframe_request(t))
                    assert frames is not None
                    source.push(index, frames)
                    index += 1
                fed[id(source)] = index
        conf.run(t)


def real_conference(
    tmp_path: Path, *, loss: float = 0.0, repair: bool = True
) -> tuple[Conference, EndpointMedia, EndpointMedia, dict[str, Pipeline]]:
    conf = Conference()
    ekt = new_ekt()
    alice = conf.add("alice", "both", ekt, real=SMALL)
    bob = conf.add("bob", "none", ekt, collect_media=True, repair=repair)
    if loss:
        conf.links["bob"] = seeded_link(7, loss, 0.0)
    rec = RealSettings(record=tmp_path / "rec")
    pipelines = {"alice": Pipeline(SMALL, "alice", audio=True, video=True)}
    pipelines["bob"] = Pipeline(rec, "bob", audio=False, video=False)
    return conf, alice, bob, pipelines


def test_real_media_arrives_named_and_decodes(tmp_path: Path) -> None:
    conf, alice, bob, pipelines = real_conference(tmp_path)
    sent: list[bytes] = []
    conf.on_deliver = lambda to, d, now: sent.append(d)
    feed(conf, pipelines, 2.0, 0.01)
    items = bob.take_received_media()
    sink = pipelines["bob"].sink
    sink.process(items)
    pipelines["bob"].close()
    report = bob.report()
    peer = report["peers"]["alice"]
    assert peer["verified"] == peer["received"] > 0
    assert peer["payload_failures"] == 0
    decoded = sink.report()["alice"]
    assert decoded["audio_decode_errors"] == decoded["video_decode_errors"] == 0
    assert decoded["audio_packets"] >= 95  # 2 s of 20 ms frames
    assert decoded["video_frames"] >= 55  # 2 s at 30 fps
    assert peer["video"]["frames_complete"] == decoded["video_frames"]
    assert peer["video"]["frames_incomplete"] == 0 and report["repair"]["nacks_sent"] == 0
    assert sorted(Path(f).name for f in decoded["files"]) == ["alice.audio.ogg", "alice.video.webm"]
    sources = alice.report()["streams"]
    assert sources["video"]["keyframes"] == 1 and sources["video"]["skipped"] == 0
    # Video carries the RFC 9626 frame marking (id 4) from the encoder's key-frame flag; the
    # outer header is what the MDD sees.
    video = [d for d in sent if d[1] & 0x7F == 96]
    marks = [frame_marking_of_packet(d) for d in video]
    assert all(m is not None for m in marks)
    assert marks[0] is not None and marks[0].start and marks[0].independent
    assert sum(1 for m in marks if m is not None and m.independent and m.start) == 1


def test_loss_is_nacked_and_a_lost_frame_asks_for_a_key_frame(tmp_path: Path) -> None:
    conf, alice, bob, pipelines = real_conference(tmp_path, loss=0.05)
    feed(conf, pipelines, 4.0, 0.01)
    report = bob.report()
    repair = report["repair"]
    # The fake MDD keeps no cache and the sender does not retransmit: every NACK goes
    # unanswered, so lost frames are given up and each asks for a key frame (PLI).
    assert repair["nacks_sent"] > 0 and repair["nacked_seqs"] > 0
    assert repair["frames_incomplete"] > 0 and repair["plis_sent"] > 0
    assert report["stats"]["nack_sent"] == repair["nacks_sent"]
    sender = alice.report()
    assert sender["stats"]["nack_received"] > 0
    assert sender["stats"]["pli_received"] > 0
    # The PLIs made the encoder send key frames, so bob's decoder recovered.
    assert sender["streams"]["video"]["keyframes"] > 1
    sink = pipelines["bob"].sink
    sink.process(bob.take_received_media())
    assert sink.report()["alice"]["video_decode_errors"] == 0
    assert sink.report()["alice"]["video_frames"] == repair["frames_complete"]


def test_without_repair_nothing_is_nacked(tmp_path: Path) -> None:
    conf, _, bob, pipelines = real_conference(tmp_path, loss=0.05, repair=False)
    feed(conf, pipelines, 2.0, 0.01)
    repair = bob.report()["repair"]
    assert repair["nacks_sent"] == 0 and repair["plis_sent"] > 0


def garbage_vp8(keyframe: bool) -> bytes:
    """Well-framed VP8 payload headers (RFC 6386 §9.1) over random bytes."""
    if keyframe:
        return bytes((0x50, 0x02, 0x00, 0x9D, 0x01, 0x2A, 0xA0, 0x00, 0x60, 0x00)) + bytes(
            range(200)
        )
    return bytes((0x31, 0x02, 0x00)) + bytes(range(37, 237))


def test_undecodable_payloads_are_counted_and_recording_resumes(tmp_path: Path) -> None:
    conf, alice, bob, pipelines = real_conference(tmp_path)
    feed(conf, pipelines, 1.0, 0.01)
    # Valid SRTP with garbage inside: one delta frame and one Opus packet that cannot decode.
    video, audio = pipelines["alice"].video, pipelines["alice"].audio
    assert video is not None and audio is not None
    real_video, real_audio = video.make, audio.make
    video.make = lambda key=False: [(garbage_vp8(False), False)]  # type: ignore[method-assign]
    audio.make = lambda key=False: [(b"\xff\xff\xff", True)]  # type: ignore[method-assign]
    feed(conf, pipelines, 1.04, 0.01)
    video.make, audio.make = real_video, real_audio  # type: ignore[method-assign]
    feed(conf, pipelines, 1.5, 0.01)
    assert isinstance(alice.video, RealSource)
    alice.video.request_keyframe()  # the next real frame is a key frame: recording resumes
    feed(conf, pipelines, 2.5, 0.01)
    sink = pipelines["bob"].sink
    sink.process(bob.take_received_media())
    pipelines["bob"].close()
    decoded = sink.report()["alice"]
    assert decoded["video_decode_errors"] >= 1 and decoded["audio_decode_errors"] >= 1
    assert decoded["video_frames"] > 50  # before and after the garbage
    with av.open(str(tmp_path / "rec" / "alice.video.webm")) as f:
        frames = sum(1 for p in f.demux(video=0) if p.size)
    assert frames == decoded["video_frames"]


def test_sink_survives_garbage_from_a_peer(tmp_path: Path) -> None:
    from perc.media.real import ReceivedMedia

    sink = MediaSink(tmp_path)
    sink.process(
        [
            ReceivedMedia("mallory", StreamKind.VIDEO, 5, 0, garbage_vp8(True), True),
            ReceivedMedia("mallory", StreamKind.VIDEO, 5, 3000, garbage_vp8(False)),
            ReceivedMedia("mallory", StreamKind.AUDIO, 6, 0, b""),
            ReceivedMedia("mallory", StreamKind.AUDIO, 6, 960, b"\xff" * 40),
        ]
    )
    sink.close()
    stats = sink.report()["mallory"]
    assert stats["video_decode_errors"] >= 1 and stats["audio_decode_errors"] >= 1


def test_new_ssrcs_of_a_peer_go_to_new_files(tmp_path: Path) -> None:
    conf, alice, bob, pipelines = real_conference(tmp_path)
    feed(conf, pipelines, 0.6, 0.01)
    # As after a rejoin with the same EKTKey: new SSRCs, same name.
    alice._new_ssrcs()
    feed(conf, pipelines, 1.2, 0.01)
    sink = pipelines["bob"].sink
    sink.process(bob.take_received_media())
    pipelines["bob"].close()
    names = sorted(Path(f).name for f in sink.report()["alice"]["files"])
    assert names == [
        "alice-2.audio.ogg",
        "alice-2.video.webm",
        "alice.audio.ogg",
        "alice.video.webm",
    ]


def test_real_source_waits_for_a_late_frame_then_skips() -> None:
    source = RealSource("a", StreamKind.AUDIO, 10.0, rate=50, clock_rate=48000, pt=111)
    assert source.next_due() == 10.0
    assert source.packets_due(10.0) == []  # not encoded yet: look again soon
    assert 10.0 < source.next_due() <= 10.01
    source.push(0, [(b"\x78\x01\x02", True)])
    (pkt,) = source.packets_due(10.004)
    rtp = RtpPacket.parse(pkt.rtp)
    assert rtp.payload == b"\x78\x01\x02" and rtp.marker
    assert parse_identity_untrusted(rtp.padding) == ("a", StreamKind.AUDIO)
    assert source.packets_due(11.0) == []  # slots 1.. never came: skipped after 0.5 s
    assert source.stats.skipped > 0
    source.push(1, [(b"\x78", True)])
    assert source.stats.stale == 1
    source.end(source.slot)
    assert source.ended and source.next_due() == float("inf")


def test_a_late_receiver_asks_for_a_key_frame_and_gets_one(tmp_path: Path) -> None:
    conf = Conference()
    ekt = new_ekt()
    alice = conf.add("alice", "both", ekt, real=SMALL)
    pipelines = {"alice": Pipeline(SMALL, "alice", audio=True, video=True)}
    feed(conf, pipelines, 1.0, 0.01)  # alice's first (and only) key frame is gone
    bob = conf.add("bob", "none", ekt, now=1.0, collect_media=True)
    feed(conf, pipelines, 2.0, 0.01)
    sink = MediaSink()
    sink.process(bob.take_received_media())
    # The first packets fail for want of alice's key, which asks for a key frame (it brings a
    # Full EKT tag); the VideoReceiver then starts on that key frame and needs no PLI itself.
    assert bob.report()["repair"]["plis_sent_total"] >= 1
    assert alice.report()["stats"]["pli_received"] >= 1
    assert alice.report()["streams"]["video"]["keyframes"] == 2
    decoded = sink.report()["alice"]
    assert decoded["video_frames"] > 20 and decoded["video_decode_errors"] == 0
