"""Receiver-side repair of video (D36): generic NACKs for missing packets, PLI for lost frames.

Theory of operation
-------------------
:class:`NackTracker` follows one sending SSRC's sequence numbers, extended to 64 bits so the
16-bit wrap is invisible (RFC 3550 Appendix A.1). A jump forward leaves *holes*; each hole is
NACKed once it has been missing for ``reorder_delay`` (packets are often merely reordered, and
a NACK for a packet already in flight costs the sender a useless retransmission), then again
every ``retry_interval`` (about one round trip) up to ``max_retries`` times. A hole still open
``give_up_after`` seconds after it appeared, or ``retry_interval`` after its last NACK, is
given up: the Media Distributor keeps 1 s of packets (D36), and a packet later than that is
no use to a real-time decoder. A packet arriving in a hole fills it (a reordered packet or a
retransmission; the statistics tell which). At most ``max_tracked`` holes are tracked; a gap
wider than that is a stream restart or an outage, and the tracker starts afresh there.

:class:`VideoReceiver` joins a tracker to a :class:`~perc.media.packetize.Vp8FrameAssembler`
for one sending SSRC: holes given up are handed to the assembler, and whenever the assembler
starts waiting for a key frame (the stream's start, or a frame that cannot be completed) the
receiver sends a PLI (RFC 4585 §6.3.1), at most one per ``pli_interval`` and again every
``keyframe_retry`` while no key frame comes. Requests come out as :mod:`perc.wire.rtcp`
objects (:class:`~perc.wire.rtcp.Nack` packing holes as PID + BLP, RFC 4585 §6.2.1, and
:class:`~perc.wire.rtcp.Pli`); the caller serializes them into a compound SRTCP packet.

A receiver also counts its *feed starts*: the stream's first packet, or a packet whose RTP
timestamp is more than ``FEED_GAP`` (1 s of the 90 kHz clock) ahead of every earlier one, so
the stream was off for this receiver meanwhile (a Media Distributor's ``last_n`` paused it, or
the sender did); and how many of them began with the first packet of a key frame, read from
the end-to-end decrypted VP8 payload (RFC 7741 §4.2 S = 1 and PID = 0, RFC 6386 §9.1 P = 0).

Everything is sans-IO: the clock is injected (``now`` in seconds), ``timer()`` says when
``poll(now)`` has something to do next.
"""

from __future__ import annotations

import attrs

from perc.media.packetize import AssembledFrame, Vp8FrameAssembler
from perc.wire.rtcp import Nack, Pli
from perc.wire.vp8 import Vp8DecodeError, split_vp8_payload

__all__ = [
    "FEED_GAP",
    "NackSettings",
    "NackStats",
    "NackTracker",
    "VideoReceiver",
]


#: RTP timestamp ticks (90 kHz) ahead of the newest earlier packet that make a feed start
FEED_GAP = 90_000


@attrs.frozen
class NackSettings:
    """Tuning of receiver-side repair. Times in seconds."""

    nack: bool = True
    """Send generic NACKs for missing packets (off: loss is only detected, never repaired)."""
    pli: bool = True
    """Send a PLI when a frame cannot be completed and at the stream's start."""
    reorder_delay: float = 0.015
    """A hole younger than this is taken for reordering, not loss."""
    retry_interval: float = 0.1
    """Between two NACKs of one packet: about one round trip through the Media Distributor."""
    max_retries: int = 5
    give_up_after: float = 1.0
    """A hole this old is lost for good (the Media Distributor caches 1 s, D36)."""
    max_tracked: int = 512
    max_nack_seqs: int = 128
    """At most this many SEQs in one NACK (its FCI stays well under an MTU); the rest follow
    in the next poll."""
    pli_interval: float = 0.5
    """At most one PLI per this interval (the Media Distributor throttles the same way, D36)."""
    keyframe_retry: float = 1.0
    """Send another PLI if no key frame came this long after the last one."""


@attrs.define
class NackStats:
    received: int = 0
    duplicates: int = 0
    reordered: int = 0  # filled a hole before any NACK for it
    recovered: int = 0  # filled a hole after a NACK: a retransmission
    nacks_sent: int = 0  # NACK packets
    nacked_seqs: int = 0  # sequence numbers requested, retries included
    given_up: int = 0
    resets: int = 0  # gaps wider than max_tracked
    plis_sent: int = 0
    plis_throttled: int = 0
    feed_starts: int = 0  # the stream's first packet, or one after a gap (module doc)
    feed_starts_keyframe: int = 0  # ... that was the first packet of a key frame


@attrs.define(slots=True)
class _Hole:
    first_seen: float
    next_at: float
    sends: int = 0


class NackTracker:
    """Holes in one SSRC's sequence numbers, and when to NACK or give up each (module doc)."""

    def __init__(self, settings: NackSettings | None = None) -> None:
        self.settings = settings or NackSettings()
        self.stats = NackStats()
        self._highest: int | None = None
        self._holes: dict[int, _Hole] = {}

    def _extend(self, seq: int) -> int:
        if self._highest is None:
            return seq + (1 << 16)
        return self._highest + (((seq - self._highest + 0x8000) & 0xFFFF) - 0x8000)

    def on_packet(self, seq: int, now: float) -> None:
        """A packet with 16-bit ``seq`` arrived (first copy, reordered or retransmitted)."""
        self.stats.received += 1
        ext = self._extend(seq)
        if self._highest is None:
            self._highest = ext
            return
        if ext > self._highest:
            gap = ext - self._highest - 1
            if gap > self.settings.max_tracked:
                self.stats.resets += 1
                self._holes.clear()
            else:
                first = now
                due = now + self.settings.reorder_delay
                for missing in range(self._highest + 1, ext):
                    self._holes[missing] = _Hole(first, due)
                while len(self._holes) > self.settings.max_tracked:
                    del self._holes[min(self._holes)]
                    self.stats.given_up += 1
            self._highest = ext
            return
        hole = self._holes.pop(ext, None)
        if hole is None:
            self.stats.duplicates += 1  # or older than anything tracked
        elif hole.sends:
            self.stats.recovered += 1
        else:
            self.stats.reordered += 1

    def missing(self) -> list[int]:
        """16-bit SEQs currently missing, oldest first."""
        return [s & 0xFFFF for s in sorted(self._holes)]

    def poll(self, now: float) -> tuple[list[int], list[int]]:
        """``(to_nack, given_up)``: 16-bit SEQs to request now, and SEQs lost for good."""
        s = self.settings
        to_nack: list[int] = []
        given_up: list[int] = []
        for ext in sorted(self._holes):
            hole = self._holes[ext]
            if now >= hole.first_seen + s.give_up_after:  # the form timer() uses
                given_up.append(ext)
            elif not s.nack or now < hole.next_at or len(to_nack) >= s.max_nack_seqs:
                continue
            elif hole.sends >= s.max_retries:
                given_up.append(ext)
            else:
                hole.sends += 1
                hole.next_at = now + s.retry_interval
                to_nack.append(ext & 0xFFFF)
        for ext in given_up:
            del self._holes[ext]
        given_up = [ext & 0xFFFF for ext in given_up]
        self.stats.given_up += len(given_up)
        self.stats.nacked_seqs += len(to_nack)
        return to_nack, given_up

    def timer(self) -> float | None:
        s = self.settings
        times = [h.first_seen + s.give_up_after for h in self._holes.values()]
        if s.nack:
            times += [h.next_at for h in self._holes.values()]
        return min(times, default=None)


class VideoReceiver:
    """One sending SSRC's VP8 stream: frames out, NACK and PLI requests out (module doc).

    ``own_ssrc`` is the SSRC this endpoint puts in the feedback's sender field.
    """

    def __init__(
        self,
        media_ssrc: int,
        own_ssrc: int,
        settings: NackSettings | None = None,
        *,
        assembler: Vp8FrameAssembler | None = None,
    ) -> None:
        self.media_ssrc = media_ssrc
        self.own_ssrc = own_ssrc
        self.settings = settings or NackSettings()
        self.tracker = NackTracker(self.settings)
        self.assembler = assembler or Vp8FrameAssembler(max_wait=self.settings.give_up_after)
        self._feedback: list[Nack | Pli] = []
        self._last_pli: float | None = None
        self._pli_pending = False
        self._pli_throttled_once = False
        self._newest_ts: int | None = None

    @property
    def stats(self) -> NackStats:
        return self.tracker.stats

    def push(
        self, seq: int, timestamp: int, marker: bool, payload: bytes, now: float
    ) -> list[AssembledFrame]:
        """One decrypted packet (outer SEQ, timestamp, marker, payload): frames now ready."""
        self._watch_feed(timestamp, payload)
        self.tracker.on_packet(seq, now)
        frames = self.assembler.push(seq, timestamp, marker, payload, now)
        return frames + self.poll(now)

    def _watch_feed(self, timestamp: int, payload: bytes) -> None:
        """Count a feed start, and whether it began with a key frame (module doc)."""
        if self._newest_ts is not None:
            ahead = (timestamp - self._newest_ts) & 0xFFFFFFFF
            if ahead >= 1 << 31:
                return  # older than the newest: reordered or retransmitted
            self._newest_ts = timestamp
            if ahead <= FEED_GAP:
                return
        self._newest_ts = timestamp
        self.stats.feed_starts += 1
        try:
            descriptor, data = split_vp8_payload(payload)
        except Vp8DecodeError:
            return  # counted as malformed by the assembler
        if descriptor.frame_start and len(data) >= 3 and not data[0] & 0x01:
            self.stats.feed_starts_keyframe += 1

    def poll(self, now: float) -> list[AssembledFrame]:
        """Run the timers: queue NACKs and PLIs, release frames unblocked by giving up."""
        to_nack, given_up = self.tracker.poll(now)
        frames = self.assembler.give_up(given_up) if given_up else []
        frames += self.assembler.poll(now)
        if to_nack:
            self._feedback.append(Nack.from_lost(self.own_ssrc, self.media_ssrc, to_nack))
            self.stats.nacks_sent += 1
        if self.assembler.take_keyframe_request() or (
            self.assembler.needs_keyframe
            and self._last_pli is not None
            and now >= self._last_pli + self.settings.keyframe_retry
        ):
            self._pli_pending = True
        if not self.assembler.needs_keyframe:
            self._pli_pending = False  # a key frame came meanwhile
        if self._pli_pending and self.settings.pli:
            if self.assembler.keyframe_buffered():
                pass  # a key frame is arriving (e.g. the stream's first): ask only if it fails
            elif self._last_pli is None or now >= self._last_pli + self.settings.pli_interval:
                self._feedback.append(Pli(self.own_ssrc, self.media_ssrc))
                self.stats.plis_sent += 1
                self._last_pli = now
                self._pli_pending = False
            elif not self._pli_throttled_once:
                self.stats.plis_throttled += 1
                self._pli_throttled_once = True
        else:
            self._pli_pending = False
        if not self._pli_pending:
            self._pli_throttled_once = False
        return frames

    def feedback(self) -> list[Nack | Pli]:
        """Take the RTCP feedback queued since the last call (send it as one compound)."""
        out, self._feedback = self._feedback, []
        return out

    def timer(self) -> float | None:
        """When :meth:`poll` next has work (``None``: nothing scheduled)."""
        times = [t for t in (self.tracker.timer(), self.assembler.timer()) if t is not None]
        if self.settings.pli and self._last_pli is not None:
            if self._pli_pending:
                times.append(self._last_pli + self.settings.pli_interval)
            elif self.assembler.needs_keyframe:
                times.append(self._last_pli + self.settings.keyframe_retry)
        return min(times, default=None)
