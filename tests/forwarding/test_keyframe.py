"""D35 keyframe-aware last_n: with RFC 9626 frame marking a feed starts only at a key frame,
and the MDD asks the sender for one (a PLI on the receiver's behalf) when none comes."""

from __future__ import annotations

import itertools
import struct

from perc.forwarding import ForwardingConfig, ForwardingTable
from perc.srtp.double import MediaPacket
from perc.wire.framemarking import FrameMarking
from perc.wire.rtcp import Pli

from .helpers import Address, Endpoint, conference

FPS = 30
PACKETS = 3  # per frame


def marked_rtp(seq: int, ssrc: int, ts: int, payload: bytes, fm: FrameMarking | None) -> bytes:
    """A video RTP packet (PT 96), with the one-byte frame marking element (id 4) if ``fm``."""
    marker = 0x80 if fm is None or fm.end else 0
    if fm is None:
        return struct.pack("!BBHII", 0x80, marker | 96, seq, ts, ssrc) + payload
    ext = b"\xbe\xde\x00\x01" + bytes(((4 << 4) | 0, fm.serialize()[0], 0, 0))
    return struct.pack("!BBHII", 0x90, marker | 96, seq, ts, ssrc) + ext + payload


class Camera:
    """A fake encoder: key frames at its start and after a PLI, frame-marked if ``marks``."""

    def __init__(self, ep: Endpoint, *, marks: bool, full_tags: bool = False) -> None:
        self.ep = ep
        self.marks = marks
        self.full_tags = full_tags
        self.frame = 0
        self.want_key = True
        self.keyframes = 0
        self.plis = 0

    def frame_packets(self, now: float) -> list[bytes]:
        key = self.want_key
        self.want_key = False
        self.keyframes += key
        out = []
        for i in range(PACKETS):
            ep = self.ep
            ep.seq = (ep.seq + 1) & 0xFFFF
            first, last = i == 0, i == PACKETS - 1
            body = (b"K" if key and first else b"D") + struct.pack("!IH", self.frame, i) + bytes(40)
            fm = FrameMarking(start=first, end=last, independent=key) if self.marks else None
            packet = marked_rtp(ep.seq, ep.ssrc, self.frame * 3000, body, fm)
            # Full EKT tags with key frames only (marks) or always (no marks: the MDD cannot
            # find key frames, so a receiver must be able to start anywhere).
            full = key or self.full_tags or not self.marks
            out.append(ep.sender.protect(packet, now, keyframe=full))
        self.frame += 1
        return out

    def check_rtcp(self) -> None:
        for compound in self.ep.rtcp:
            for p in compound:
                if isinstance(p, Pli) and p.media_ssrc == self.ep.ssrc:
                    self.plis += 1
                    self.want_key = True
        self.ep.rtcp.clear()


def run(marks: bool) -> tuple[ForwardingTable[Address], list[Endpoint], list[Camera]]:
    """last_n = 1, three senders; ``a`` pauses from 1 s to 4 s (it leaves the ranking) and
    resumes with ordinary frames, which puts it first: every other receiver switches to it."""
    table: ForwardingTable[Address] = ForwardingTable(ForwardingConfig(last_n=1))
    eps = conference(table, 3)
    by_address = {ep.address: ep for ep in eps}
    cams = [Camera(ep, marks=marks) for ep in eps]
    for step in range(6 * FPS):
        now = step / FPS
        for i, cam in enumerate(cams):
            if step < i:  # a starts first, then b, then c: c is the most recent
                continue
            if cam.ep.name == "a" and 1.0 <= now < 4.0:
                continue
            if cam.ep.name == "a" and now >= 4.0 and cam.frame and step == 4 * FPS:
                cam.want_key = False  # it resumes without a key frame
            for data in cam.frame_packets(now):
                for address, out in table.handle_datagram(cam.ep.address, data, now):
                    by_address[address].deliver(out, now)
            for c in cams:
                c.check_rtcp()
    return table, eps, cams


def _runs(packets: list[MediaPacket]) -> list[list[MediaPacket]]:
    """Contiguous runs of one SSRC's packets (a new run after each gap in the sender's SEQ)."""
    out: list[list[MediaPacket]] = []
    for p in packets:
        if out and out[-1][-1].ssrc == p.ssrc:
            prev = out[-1][-1].original_sequence_number
            if p.original_sequence_number == (prev + 1) & 0xFFFF:
                out[-1].append(p)
                continue
        out.append([p])
    return out


def test_every_feed_starts_with_a_key_frame_and_the_mdd_asks_for_one() -> None:
    table, eps, cams = run(marks=True)
    a, b, c = eps
    starts = 0
    for ep in eps:
        by_ssrc = {}
        for p in ep.got:
            by_ssrc.setdefault(p.ssrc, []).append(p)
        for packets in by_ssrc.values():
            for run_ in _runs(packets):
                starts += 1
                # Checked after end-to-end decryption: the payload says what the frame was.
                assert run_[0].payload[:1] == b"K", (ep.name, run_[0].original_sequence_number)
    assert starts >= 5
    # b and c switched to a when it resumed; a sent no key frame until the MDD asked.
    assert any(p.ssrc == a.ssrc for p in b.got) and any(p.ssrc == a.ssrc for p in c.got)
    assert cams[0].plis >= 1 and cams[0].keyframes >= 2
    originated = sum(table.associations[ep.association_id].counters.pli_originated for ep in eps)
    assert originated >= 1
    # The frame numbers a receiver sees of one stream only grow: nothing from before a start.
    for ep in eps:
        for ssrc, group in itertools.groupby(ep.got, key=lambda p: p.ssrc):
            frames = [struct.unpack_from("!I", p.payload, 1)[0] for p in group]
            assert frames == sorted(frames), (ep.name, ssrc)


def test_without_frame_marking_a_feed_starts_at_a_frame_boundary_and_asks_for_a_key_frame() -> (
    None
):
    table, eps, cams = run(marks=False)
    a, b, _c = eps
    resumed = list(_runs([p for p in b.got if p.ssrc == a.ssrc]))
    assert resumed and resumed[-1][0].payload[:1] == b"D"  # the marker-bit rule: a frame start
    assert struct.unpack_from("!H", resumed[-1][0].payload, 5)[0] == 0  # its first packet
    assert table.associations[b.association_id].counters.pli_originated >= 1
    assert cams[0].plis >= 1


def test_frame_marking_off_by_config_uses_the_marker_rule() -> None:
    table: ForwardingTable[Address] = ForwardingTable(
        ForwardingConfig(last_n=1, frame_marking_id=None)
    )
    eps = conference(table, 2)
    a, b = eps
    cam = Camera(a, marks=True, full_tags=True)
    cam.want_key = False
    for data in cam.frame_packets(0.1):
        for address, out in table.handle_datagram(a.address, data, 0.1):
            assert address == b.address
            b.deliver(out, 0.1)
    assert [p.payload[:1] for p in b.got] == [b"D"] * PACKETS  # marks ignored: frame start
