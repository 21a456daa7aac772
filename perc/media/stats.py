"""Receive statistics: RFC 3550 reception math per SSRC, per-peer counters and the report.

Theory of operation
-------------------
:class:`SeqStats` is RFC 3550 Appendix A.1 (sequence tracking with MAX_DROPOUT/MAX_MISORDER,
cycle counting), A.3 (expected and lost packets, the fraction lost of the last interval) and
A.8 (interarrival jitter in timestamp units), fed only with packets that passed both SRTP
layers and the payload check. It runs on the **outer** SEQ: RFC 8723 §5.3 says the
application orders by the outer SEQ, and reception reports describe the hop the packets
arrived on (RTCP is hop-by-hop, D19). The first verified packet starts the stream (no
probation: the packet is authenticated). Cumulative loss is clamped to the signed 24-bit
field of the report block. "Lost" therefore means not delivered to the application: lost on
the network, or dropped by a check (failures, key wait) after arriving.

:class:`RemoteStream` is everything known about one received SSRC: the sender name and
stream kind from its first verified payload, counters of what arrived and why it failed, the
SPIs it was decrypted under, the last sender report (for LSR/DLSR, RFC 3550 §6.4.1) and
whether a BYE was seen. Packets that fail before any packet of their SSRC was verified
cannot be attributed to a sender name: they are counted in :class:`Unattributed` (a joiner
cannot read packets sent before its first Full EKT tag, and must not be able to read the
ones under a key from before it joined, RFC 8871 §4.5.2).

:func:`build_report` groups streams by sender name into the endpoint's JSON report::

    {"name", "ssrc", "sent", "spis": [...],
     "peers": {name: {"ssrc", "last_verified", "bye", "received", "verified", ...}}}

``last_verified`` is the arrival of the peer's last verified packet in seconds after
``since`` (the start of media); ``bye`` says whether an RTCP BYE named one of its SSRCs.

NTP helpers: perc's sans-IO core has only the caller's monotonic ``now``; ``ntp_offset``
(seconds) maps it to NTP time. Round-trip times only need the sender's own clock to be
consistent, so the offset may be 0 in tests.
"""

from __future__ import annotations

from typing import Any

import attrs

from perc.media.payload import StreamKind
from perc.wire.rtcp import ReportBlock

__all__ = [
    "MAX_DROPOUT",
    "MAX_MISORDER",
    "RemoteStream",
    "SeqStats",
    "Unattributed",
    "build_report",
    "ntp_middle32",
    "ntp_timestamp",
]

#: RFC 3550 Appendix A.1 constants.
MAX_DROPOUT = 3000
MAX_MISORDER = 100
RTP_SEQ_MOD = 1 << 16
_LOST_MAX = (1 << 23) - 1
_LOST_MIN = -(1 << 23)
_NTP_UNIX_OFFSET = 2_208_988_800


def ntp_timestamp(now: float, ntp_offset: float = 0.0) -> int:
    """64-bit NTP timestamp (RFC 3550 §4) of ``now`` on the caller's clock."""
    return int((now + ntp_offset) * (1 << 32)) & 0xFFFFFFFFFFFFFFFF


def ntp_middle32(ntp: int) -> int:
    """The middle 32 bits of a 64-bit NTP timestamp (LSR, RFC 3550 §6.4.1)."""
    return (ntp >> 16) & 0xFFFFFFFF


class SeqStats:
    """RFC 3550 A.1/A.3/A.8 reception statistics of one source."""

    __slots__ = (
        "bad_seq",
        "base_seq",
        "clock_rate",
        "cycles",
        "expected_prior",
        "jitter",
        "max_seq",
        "received",
        "received_prior",
        "reordered",
        "restarts",
        "transit",
    )

    def __init__(self, seq: int, clock_rate: int) -> None:
        self.clock_rate = clock_rate
        self.restarts = 0
        self.reordered = 0
        self.jitter = 0.0
        self.transit: int | None = None
        self._init(seq)

    def _init(self, seq: int) -> None:
        self.base_seq = seq
        self.max_seq = seq
        self.bad_seq = RTP_SEQ_MOD + 1  # so seq == bad_seq is false
        self.cycles = 0
        self.received = 0
        self.expected_prior = 0
        self.received_prior = 0

    def update(self, seq: int, timestamp: int, now: float) -> bool:
        """Count one packet (RFC 3550 A.1 ``update_seq``); False: it was set aside as bad."""
        udelta = (seq - self.max_seq) & 0xFFFF
        if udelta < MAX_DROPOUT:
            # in order, with a permissible gap
            if seq < self.max_seq:
                self.cycles += RTP_SEQ_MOD  # SEQ wrapped: count another 64K cycle
            self.max_seq = seq
        elif udelta <= RTP_SEQ_MOD - MAX_MISORDER:
            # the SEQ made a very large jump
            if seq == self.bad_seq:
                # Two sequential packets: the source restarted without telling us.
                self.restarts += 1
                self._init(seq)
            else:
                self.bad_seq = (seq + 1) & (RTP_SEQ_MOD - 1)
                return False
        else:
            # a late (reordered) packet; duplicates never get here, SRTP replay checks drop them
            self.reordered += 1
        self.received += 1
        self._jitter(timestamp, now)
        return True

    def _jitter(self, timestamp: int, now: float) -> None:
        # RFC 3550 A.8: transit = arrival - timestamp in timestamp units; J += (|D| - J) / 16.
        arrival = round(now * self.clock_rate)
        transit = (arrival - timestamp) & 0xFFFFFFFF
        prev = self.transit
        self.transit = transit
        if prev is not None:
            d = (transit - prev) & 0xFFFFFFFF
            if d >= 0x80000000:
                d -= 1 << 32
            self.jitter += (abs(d) - self.jitter) / 16.0

    @property
    def extended_max(self) -> int:
        return self.cycles + self.max_seq

    @property
    def expected(self) -> int:
        return self.extended_max - self.base_seq + 1

    @property
    def lost(self) -> int:
        """Cumulative packets lost (late packets make it go down, RFC 3550 A.3), unclamped."""
        return self.expected - self.received

    def report_block(self, ssrc: int, lsr: int = 0, dlsr: int = 0) -> ReportBlock:
        """A reception report block; starts a new interval for the fraction lost (A.3)."""
        expected = self.expected
        expected_interval = expected - self.expected_prior
        self.expected_prior = expected
        received_interval = self.received - self.received_prior
        self.received_prior = self.received
        lost_interval = expected_interval - received_interval
        if expected_interval == 0 or lost_interval <= 0:
            fraction = 0
        else:
            fraction = (lost_interval << 8) // expected_interval
        lost = max(_LOST_MIN, min(_LOST_MAX, self.lost))
        return ReportBlock(
            ssrc=ssrc,
            fraction_lost=min(fraction, 255),
            packets_lost=lost,
            highest_sequence=self.extended_max & 0xFFFFFFFF,
            jitter=int(self.jitter) & 0xFFFFFFFF,
            lsr=lsr,
            dlsr=dlsr,
        )


#: how long after a late EKTKey arrived failures still count as waiting for the sender's key
KEY_WAIT_GRACE = 2.0


@attrs.define(slots=True, kw_only=True)
class _Failures:
    """End-to-end failure counting, with the *key wait* rule.

    A receiver whose copy of a new EKTKey is late (a lost DTLS record is retransmitted after
    1 s, D9) sees Full tags under an SPI it does not know, then packets under a key it could
    not learn. Until the EKTKey arrives such failures are indistinguishable from those of a
    receiver that was left out of the rekey on purpose (a leaver), so they count as
    ``e2e_failures``. Once :meth:`key_arrived` names the awaited SPI they are moved to
    ``key_wait``, and so are failures until the stream verifies again (at most
    ``KEY_WAIT_GRACE`` seconds): they are the cost of late key delivery, not of tampering.

    The same holds for a sender's new E2E key whose Full tags were all lost (a rekey is
    announced in the next three packets, then video repeats it only on key frames, RFC 8870
    §4.6): its packets fail (``inner_auth``, ``no_key``) until a later Full tag brings the key.
    When the stream then verifies under an SPI newer than any it verified before, the
    failures since its last verified packet (if they began at most ``KEY_WAIT_GRACE`` seconds
    earlier) are moved to ``key_wait`` too (:meth:`verified_one`).
    """

    e2e_failures: int = 0
    e2e_reasons: dict[str, int] = attrs.Factory(dict)
    #: failures caused by an EKTKey that arrived late (see above); not in e2e_failures
    key_wait: int = 0
    #: the newest SPI we saw named in a Full tag without holding its key
    waiting_spi: int | None = None
    #: failures waiting for a key, per awaited SPI (a second rekey may come before the first
    #: key arrives; the first key's failures must not be forgotten then)
    waiting: dict[int, dict[str, int]] = attrs.Factory(dict)
    key_arrived_at: float | None = None
    #: failures (waiting reasons) since the last verified packet not already awaiting an
    #: EKTKey, and when the first of them came
    unsettled: dict[str, int] = attrs.Factory(dict)
    unsettled_since: float = 0.0

    def count_e2e(self, reason: str, now: float, spi: int | None = None) -> None:
        if spi is not None and spi != self.waiting_spi:
            # a Full tag under an SPI we lack: the sender moved to an EKTKey we do not have
            self.waiting_spi = spi
            self.key_arrived_at = None
            if spi not in self.waiting and len(self.waiting) >= _MAX_AWAITED:
                del self.waiting[next(iter(self.waiting))]  # bounded: the oldest stay failures
            self.waiting.setdefault(spi, {})
        if self.waiting_spi is not None and reason in _WAITING_REASONS:
            if self.key_arrived_at is not None:
                if now - self.key_arrived_at <= KEY_WAIT_GRACE:
                    self.key_wait += 1
                    return
                self.waiting_spi = None
            else:
                counts = self.waiting.setdefault(self.waiting_spi, {})
                counts[reason] = counts.get(reason, 0) + 1
        elif reason in _WAITING_REASONS:
            if not self.unsettled:
                self.unsettled_since = now
            self.unsettled[reason] = self.unsettled.get(reason, 0) + 1
        self.e2e_failures += 1
        self.e2e_reasons[reason] = self.e2e_reasons.get(reason, 0) + 1

    def key_arrived(self, spi: int, now: float) -> None:
        """The EKTKey with ``spi`` arrived: failures that waited for it, or for a key it
        supersedes (an SPI up to half the space before it), were not integrity failures."""
        for awaited in list(self.waiting):
            if (spi - awaited) & 0xFFFF > 0x7FFF:
                continue  # a newer key than this one: still awaited
            self._settle(self.waiting.pop(awaited))
        if self.waiting_spi is None or self.key_arrived_at is not None:
            return
        if (spi - self.waiting_spi) & 0xFFFF <= 0x7FFF:
            # the newest awaited key (or a later one) is here: the grace period begins
            self.key_arrived_at = now

    def verified_one(self, now: float = 0.0, *, newer_spi: bool = False) -> None:
        """A packet verified; ``newer_spi``: under an SPI newer than any this stream verified
        before (the sender's key changed and we learnt it late, see the class docstring)."""
        if self.key_arrived_at is not None:
            self.waiting_spi = None
            self.key_arrived_at = None
        if self.unsettled:
            if newer_spi and now - self.unsettled_since <= KEY_WAIT_GRACE:
                self._settle(self.unsettled)
            self.unsettled = {}

    def _settle(self, counts: dict[str, int]) -> None:
        """Move ``counts`` (reason -> failures) from ``e2e_failures`` to ``key_wait``."""
        for reason, count in counts.items():
            self.e2e_failures -= count
            left = self.e2e_reasons[reason] - count
            if left:
                self.e2e_reasons[reason] = left
            else:
                del self.e2e_reasons[reason]
            self.key_wait += count


_WAITING_REASONS = frozenset(("unknown_spi", "inner_auth", "no_key"))
#: how many awaited SPIs a stream remembers failures for (each rekey adds one)
_MAX_AWAITED = 8


@attrs.define(slots=True)
class RemoteStream(_Failures):
    """One SSRC we receive from: identity (once verified), counters, reception statistics."""

    ssrc: int
    name: str | None = None
    kind: StreamKind | None = None
    #: every packet that arrived with this SSRC once it was known (incl. failures)
    received: int = 0
    #: passed both SRTP layers and the payload check
    verified: int = 0
    #: the outer (hop-by-hop) layer failed: bad tag, malformed, stream limit
    hbh_failures: int = 0
    #: outer replay check: duplicates, or later than the 128-packet window (not failures)
    hbh_replays: int = 0
    #: decrypted end to end, but the payload did not verify (checksum, filler, identity)
    payload_failures: int = 0
    spis: list[int] = attrs.Factory(list)
    seq: SeqStats | None = None
    #: RTP SEQ minus the payload's stream sequence number (constant for an honest sender)
    seq_offset: int | None = None
    #: middle 32 bits of the last SR's NTP time and when it arrived (LSR/DLSR)
    last_sr: int = 0
    last_sr_at: float | None = None
    sr_packet_count: int | None = None
    bye: bool = False
    #: when the last verified packet arrived
    last_at: float = 0.0


@attrs.define
class Unattributed(_Failures):
    """Failures of packets whose SSRC never had a verified packet (no sender name known)."""

    received: int = 0
    hbh_failures: int = 0
    hbh_replays: int = 0
    payload_failures: int = 0
    #: packets dropped because the table of remote streams is full
    untracked: int = 0
    #: E2E failures of packets sent under keys from before our first EKTKey (not in
    #: e2e_failures; see perc.media.endpoint, "Pre-join")
    pre_join: int = 0
    #: no-key failures later shown to be early packets of a stream that verified (not in
    #: e2e_failures; see perc.media.endpoint, "Early")
    early: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "received": self.received,
            "hbh_failures": self.hbh_failures,
            "hbh_replays": self.hbh_replays,
            "e2e_failures": self.e2e_failures,
            "payload_failures": self.payload_failures,
            "e2e_reasons": dict(self.e2e_reasons),
            "key_wait": self.key_wait,
            "untracked": self.untracked,
            "pre_join": self.pre_join,
            "early": self.early,
        }


def _peer_entry(streams: list[RemoteStream], since: float) -> dict[str, Any]:
    # The peer's "ssrc" is its audio SSRC if it sends audio, else its first stream's; after a
    # rejoin (new SSRCs under the same name) the most recently heard one.
    latest = sorted(streams, key=lambda s: s.last_at, reverse=True)
    first = next((s for s in latest if s.kind is StreamKind.AUDIO), latest[0])
    spis: list[int] = []
    reasons: dict[str, int] = {}
    lost = expected = reordered = 0
    for s in streams:
        for spi in s.spis:
            if spi not in spis:
                spis.append(spi)
        for k, v in s.e2e_reasons.items():
            reasons[k] = reasons.get(k, 0) + v
        if s.seq is not None:
            lost += s.seq.lost
            expected += s.seq.expected
            reordered += s.seq.reordered
    return {
        "ssrc": first.ssrc,
        # seconds from the start of media (our first join) to this peer's last verified packet
        "last_verified": round(max(s.last_at for s in streams) - since, 3),
        # an RTCP BYE arrived for one of its SSRCs (it said it was leaving)
        "bye": any(s.bye for s in streams),
        "received": sum(s.received for s in streams),
        "verified": sum(s.verified for s in streams),
        "hbh_failures": sum(s.hbh_failures for s in streams),
        "e2e_failures": sum(s.e2e_failures for s in streams),
        "key_wait": sum(s.key_wait for s in streams),
        "payload_failures": sum(s.payload_failures for s in streams),
        "hbh_replays": sum(s.hbh_replays for s in streams),
        "e2e_reasons": reasons,
        "expected": expected,
        "lost": lost,
        "reordered": reordered,
        "spis": spis,
        "streams": {
            str(s.ssrc): {
                "kind": s.kind.name.lower() if s.kind is not None else None,
                "received": s.received,
                "verified": s.verified,
                "lost": s.seq.lost if s.seq is not None else 0,
                "jitter": int(s.seq.jitter) if s.seq is not None else 0,
                "bye": s.bye,
            }
            for s in streams
        },
    }


def build_report(
    name: str,
    *,
    ssrc: int,
    sent: int,
    spis: list[int],
    streams: dict[int, RemoteStream],
    unattributed: Unattributed,
    since: float = 0.0,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The JSON-ready report of one endpoint (the report schema plus diagnostic fields)."""
    by_name: dict[str, list[RemoteStream]] = {}
    for s in streams.values():
        if s.name is not None:
            by_name.setdefault(s.name, []).append(s)
    report: dict[str, Any] = {
        "name": name,
        "ssrc": ssrc,
        "sent": sent,
        "spis": list(spis),
        "peers": {peer: _peer_entry(group, since) for peer, group in sorted(by_name.items())},
        "unattributed": unattributed.as_dict(),
    }
    if extra:
        report.update(extra)
    return report
