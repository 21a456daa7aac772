"""The sans-IO media engine of a PERC endpoint: send, receive, verify, report.

Theory of operation
-------------------
:class:`EndpointMedia` is everything an endpoint does with media once its DTLS-SRTP
association with the Key Distributor is up (RFC 8871 §4.5.1: the endpoint is the DTLS
client) and it holds an EKTKey. It never touches a socket or a clock: the I/O shell calls

* ``timer()`` for the next deadline and ``handle_timer(now)`` when it passes;
* ``receive(datagram, now)`` for every SRTP/SRTCP datagram from the Media Distributor;
* ``datagrams_to_send()`` to drain what to send (bounded queue, drops counted);
* ``rekey(params, now)`` for every new EKTKey; ``rejoin(keying, params, now)`` for a new
  association (D30); ``bye(now)`` when leaving;
* ``report()`` for the JSON report.

**Keys** (RFC 8871 §6.2, RFC 8723 §3, §6). From the DOUBLE profile's exporter output the
endpoint uses only the outer halves: it *sends* (SRTP outer layer and SRTCP) with the outer
half of ``client_write`` and *receives* with the outer half of ``server_write``, which is
what the Media Distributor re-encrypts with (RFC 9185 §6.4). The inner (end-to-end) key is a
fresh random key of its own (RFC 8870 §6), made by :class:`~perc.srtp.double.DoubleSender` and
announced in Full EKT tags under the current EKTKey; the inner salt is the EKTKey's conference
salt (RFC 8871 §4.5.1).

**Sending.** :mod:`perc.media.sources` makes plain RTP on the audio (50 packets/s, PT 111)
and video (PT 96) timetables; one :class:`DoubleSender` (the only user of the outer write key,
RFC 7714 §8.4) double-encrypts each packet and appends the EKT field on the RFC 8870 §4.6
schedule: Full tags in the first three packets and after each key change, then every 100 ms
when audio is sent, or with each key frame for a video-only sender (the source flags the
first packet of a key frame).

**Real media** (D35, ``real=RealSettings(...)``): the sources are
:class:`~perc.media.real.RealSource` instead: the shell encodes each frame with PyAV just
before its slot and pushes it; the engine packetizes and sends it on the same timetable, with
the sender's identity in the RTP padding and RFC 9626 frame marking on video. A real packet
received (its padding names the sender) is verified like a synthetic one; audio packets and,
through a :class:`~perc.media.nack.VideoReceiver` per sending SSRC (generic NACKs for missing
packets, PLI when a frame cannot be completed, D36), whole VP8 frames are handed to the shell
(``take_received_media``, with ``collect_media``) to decode and record.

**Rekeying** (D22, RFC 8870 §4.5, RFC 8871 §4.5.2). ``rekey`` hands the new parameter set to
the receiver first (so tags under the new SPI are readable) and then to the sender, which
picks a new random E2E key, announces it in three Full tags under the new SPI and keeps
encrypting with the old key for 250 ms. Every SPI ever used is remembered for the report.

**Rejoining** (D30). ``rejoin`` swaps the hop-by-hop keys for the new association's and takes
its EKTKey like a rekey (see :meth:`EndpointMedia.rejoin`). What healing reads from here:
``stale_key_for`` (how long peers' Full tags have named an SPI newer than ours),
``take_newly_verified`` (peers verified for the first time since the last join) and
``peers_last_verified`` (when each peer last verified, and whether it said BYE).

**Receiving** (RFC 8723 §5.3). RTP and RTCP share the port; RFC 5761 §4 tells them apart by
the second byte (RTCP packet types 192-223). SRTP goes through
:class:`~perc.srtp.double.DoubleReceiver`; what comes out must then parse as a perc payload
(:mod:`perc.media.payload`) whose sender name and stream kind match what this SSRC said
before and whose stream sequence keeps a constant distance to the original RTP SEQ. Failures
are classified:

* **HBH failure**: the outer (hop-by-hop) layer rejected the packet (bad tag, malformed
  framing, too many streams). Outer replays (network duplicates, or packets later than the
  128-packet window) are counted apart as ``hbh_replays``: they are not forgeries.
* **E2E failure**: the packet was good hop by hop (or was dropped for its EKT tag before the
  outer layer, as RFC 8870 §4.3.2 orders it: unknown SPI, unwrap failure), but the EKT or
  inner layer failed: no key for the SSRC, inner tag mismatch, inner replay, bad OHB. The
  reason is counted too.
* **Payload failure**: both layers verified but the payload did not.
* **Pre-join**: a joiner cannot decrypt what was sent under keys from before its first EKTKey,
  by design (D22: a joiner cannot read the past): the packets held during the join and the
  members' last ~250 ms under their previous E2E keys. They are counted as
  ``unattributed.pre_join``, not as ``e2e_failures``, when there is evidence of a key older
  than ours: a Full tag under an SPI before our first (SPIs count up), or, within
  ``PRE_JOIN_GRACE`` of our first EKTKey, an inner tag that fails on a never-verified SSRC
  (the sender announced its new key but still encrypts with the old one, RFC 8870 §4.3.1).
  An SSRC with pre-join packets stays pre-join until it verifies, without a time limit (a
  member whose copy of the rekey was late switches late); after that, its failures with a
  SEQ before the first verified one are pre-join packets overtaken by it (reordering).
  Other E2E failures of never-verified SSRCs in that window (no key yet) wait until the
  window ends: with such evidence they are pre-join, without it (a joiner that simply waits
  for a sender's next Full tag) they are ``e2e_failures`` as before. Once an SSRC verified,
  its failures are never pre-join.
* **Early**: a packet that overtook (reordering) or outlived (loss) the Full EKT tags that
  announce its sender's key fails with "no key" although nothing is wrong with it. When a
  never-verified SSRC's first packet verifies, its earlier no-key failures with a *later*
  RTP SEQ (they used the key just learnt) are moved from ``e2e_failures`` to
  ``unattributed.early``. No-key failures with earlier SEQs stay failures: nothing shows
  they used a key we could ever have.
* **Key wait**: E2E failures that turn out to have waited for an EKTKey that arrived late
  (the failing Full tags named its SPI, and :meth:`EndpointMedia.rekey` then delivered it) are
  moved out of ``e2e_failures`` into ``key_wait`` (see :class:`perc.media.stats._Failures`). A
  receiver that never gets the new EKTKey (a leaver) keeps them as E2E failures. So do, for a
  stream that verified before, failures that end when it verifies under a newer SPI: the
  Full tags with the sender's new key were lost, and a later one brought it.

Counters are per SSRC and reported per sender name (learnt from the first verified payload of
the SSRC); failures on an SSRC that never verified have no name and go to ``unattributed``.
A video packet that fails for want of a key triggers a PLI (rate-limited): the key frame it
asks for brings a Full EKT tag (RFC 8870 §4.6).

**RTCP** (D19: hop-by-hop only, SRTCP with E=1 under the outer keys; RFC 8871 §4.1: nothing
confidential, so the CNAME is random, not the endpoint name). Every ``rtcp_interval`` seconds
(randomised by [0.5, 1.5], RFC 3550 §6.3.1) one compound packet: an SR per sending stream (or
an RR from a receive-only SSRC), RFC 3550 reception report blocks for every stream heard in
the last few intervals (more than 31 go into further RR packets), and SDES CNAME. Incoming
SR (LSR/DLSR for our reports), RR blocks about our streams (round-trip time), PLI and FIR
(the video source makes a key frame; a FIR with a repeated command sequence number is a
retransmission and ignored, RFC 5104 §4.3.1.2), NACK (counted: the sender keeps no
retransmission buffer; the Media Distributor answers from its cache, D36) and BYE are
consumed and counted.
"""

from __future__ import annotations

import enum
import math
import random
import struct
from typing import TYPE_CHECKING, Any

import attrs

from perc.media.payload import (
    PayloadDecodeError,
    PayloadUsageError,
    StreamKind,
    minimum_payload_size,
    parse_payload,
)
from perc.media.real import RealSettings, RealSource, ReceivedMedia, parse_identity_untrusted
from perc.media.sources import (
    AUDIO_CLOCK_RATE,
    AUDIO_PT,
    VIDEO_CLOCK_RATE,
    VIDEO_PT,
    AudioSource,
    OutgoingPacket,
    VideoSettings,
    VideoSource,
    random_ssrc,
)
from perc.media.stats import (
    RemoteStream,
    SeqStats,
    Unattributed,
    build_report,
    ntp_middle32,
    ntp_timestamp,
)
from perc.srtp.context import SrtpSession
from perc.srtp.double import (
    DoubleDecodeError,
    DoubleReceiver,
    DoubleSender,
    MediaPacket,
    NoInnerKeyError,
)
from perc.srtp.ekt import (
    EktError,
    EktFieldError,
    EktParameterSet,
    EktPlaintextError,
    EktStreamLimitError,
    EktUnwrapError,
    UnknownSpiError,
)
from perc.srtp.errors import ReplayError, SrtpError
from perc.srtp.keys import KeyingMaterial, SrtpProfile, split_exporter
from perc.wire.ekt import EktDecodeError, FullEktField, split_ekt_field
from perc.wire.rtcp import (
    Bye,
    Fir,
    Nack,
    Pli,
    ReceiverReport,
    ReportBlock,
    RtcpDecodeError,
    RtcpPacket,
    SdesChunk,
    SdesItem,
    SenderReport,
    SourceDescription,
    parse_rtcp,
    serialize_rtcp,
)

if TYPE_CHECKING:  # real video's repair is imported when a real video stream arrives
    from perc.media.nack import VideoReceiver
    from perc.media.packetize import AssembledFrame

__all__ = [
    "EndpointMedia",
    "EndpointMediaStats",
    "MediaChoice",
    "MediaUsageError",
    "is_rtcp",
]

_unpack_ssrc = struct.Struct("!I").unpack_from
_MAX_BLOCKS = 31  # RFC 3550 §6.4.1: the 5-bit report count
#: report on a stream heard within this many seconds (RFC 3550 §6.4: sources heard since the
#: last report; a few intervals so one lost report interval does not hide a stream)
_REPORT_WINDOW = 5.0
_PLI_MIN_INTERVAL = 0.5
_HOUSEKEEPING = 1.0
#: Seconds after our first EKTKey during which end-to-end failures of a never-verified SSRC
#: count as ``pre_join`` (see the module docstring): the held packets of the join, and the
#: members' last 250 ms under their previous E2E keys (RFC 8870 §4.3.1), plus delivery.
PRE_JOIN_GRACE = 1.0
_PRE_JOIN_REASONS = frozenset(("unknown_spi", "no_key", "inner_auth"))
#: How far behind a stream's first verified SEQ a pre-join packet may arrive (reordering).
_STRAGGLER_SEQS = 1024
#: No-key failures remembered per never-verified SSRC (see "Early" in the module docstring).
_EARLY_PER_SSRC = 64


class MediaUsageError(ValueError):
    """Local misuse of the media engine (bad name, media choice, keying material)."""


class MediaChoice(enum.Enum):
    """What an endpoint sends (``--media``)."""

    AUDIO = "audio"
    VIDEO = "video"
    BOTH = "both"
    NONE = "none"

    @property
    def audio(self) -> bool:
        return self in (MediaChoice.AUDIO, MediaChoice.BOTH)

    @property
    def video(self) -> bool:
        return self in (MediaChoice.VIDEO, MediaChoice.BOTH)


def is_rtcp(datagram: bytes) -> bool:
    """RFC 5761 §4: on a shared port, a second byte of 192-223 is RTCP, anything else RTP."""
    return len(datagram) > 1 and 192 <= datagram[1] <= 223


@attrs.define
class EndpointMediaStats:
    sent_rtp: int = 0
    sent_octets: int = 0
    sent_rtcp: int = 0
    #: packets the sources made that could not be protected (e.g. expired EKTKey)
    send_errors: int = 0
    #: packets not sent because the current EKTKey's lifetime (ekt_ttl) is over
    ekt_expired: int = 0
    #: datagrams dropped because the caller did not drain ``datagrams_to_send``
    queue_drops: int = 0
    received_rtp: int = 0
    received_rtcp: int = 0
    rtcp_auth_failures: int = 0
    rtcp_replays: int = 0
    rtcp_decode_errors: int = 0
    sr_received: int = 0
    rr_received: int = 0
    report_blocks_about_us: int = 0
    pli_received: int = 0
    fir_received: int = 0
    fir_duplicates: int = 0
    nack_received: int = 0
    bye_received: int = 0
    feedback_not_ours: int = 0
    other_rtcp: int = 0
    pli_sent: int = 0
    #: generic NACK packets sent for missing video packets (D36)
    nack_sent: int = 0
    #: real media handed to the shell's decoders dropped because it did not take them
    media_out_drops: int = 0
    rekeys: int = 0
    duplicate_ekt_keys: int = 0
    #: last round-trip time (seconds) computed from a report block about one of our streams
    last_rtt: float | None = None


class EndpointMedia:
    """Sans-IO media core of one endpoint (see the module docstring)."""

    def __init__(
        self,
        name: str,
        media: MediaChoice | str,
        keying: KeyingMaterial,
        ekt: EktParameterSet,
        now: float,
        *,
        video: VideoSettings | None = None,
        audio_rate: float = 50.0,
        audio_payload_size: int = 160,
        rtcp_interval: float = 1.0,
        ntp_offset: float = 0.0,
        max_streams: int = 256,
        max_queue: int = 4096,
        seed: int | None = None,
        real: RealSettings | None = None,
        repair: bool = True,
        collect_media: bool = False,
    ) -> None:
        try:
            choice = MediaChoice(media)
        except ValueError:
            raise MediaUsageError(f"unknown media choice {media!r}") from None
        try:
            minimum_payload_size(name)
        except PayloadUsageError as exc:
            raise MediaUsageError(str(exc)) from None
        if not keying.profile.is_double:
            raise MediaUsageError(f"{keying.profile.name} is not a DOUBLE profile")
        if rtcp_interval <= 0 or max_streams < 1 or max_queue < 1:
            raise MediaUsageError("rtcp_interval, max_streams and max_queue must be positive")
        self.name = name
        self.media = choice
        self._rng = random.Random(seed)
        self._ntp_offset = ntp_offset
        self._rtcp_interval = rtcp_interval
        self._max_streams = max_streams
        self._max_queue = max_queue
        outer = keying.outer()
        # Sending: outer half of client_write (SRTP via the DoubleSender, SRTCP via a session
        # used only for RTCP); receiving: outer half of server_write for both.
        self._rtcp_tx = SrtpSession(outer.client_key, outer.client_salt)
        rx_session = SrtpSession(outer.server_key, outer.server_salt)
        self._rx = DoubleReceiver(rx_session)
        self._rx.add_parameter_set(ekt)
        self._rtcp_rx = rx_session
        self.real = real
        #: real media (D35): hand received Opus packets and VP8 frames to the shell
        self.collect_media = collect_media
        self.audio: AudioSource | RealSource | None = None
        if choice.audio:
            self.audio = (
                AudioSource(name, now, rate=audio_rate, payload_size=audio_payload_size)
                if real is None
                else RealSource(
                    name,
                    StreamKind.AUDIO,
                    now,
                    rate=50.0,
                    clock_rate=AUDIO_CLOCK_RATE,
                    pt=AUDIO_PT,
                )
            )
        self.video: VideoSource | RealSource | None = None
        if choice.video:
            # RFC 3550 §8.1: each stream its own SSRC; the two must not collide.
            taken = self.audio.ssrc if self.audio is not None else None
            vssrc = random_ssrc()
            while vssrc == taken:
                vssrc = random_ssrc()
            self.video = (
                VideoSource(name, now, video, ssrc=vssrc)
                if real is None
                else RealSource(
                    name,
                    StreamKind.VIDEO,
                    now,
                    rate=real.fps,
                    clock_rate=VIDEO_CLOCK_RATE,
                    pt=VIDEO_PT,
                    ssrc=vssrc,
                    frame_marking_id=real.frame_marking_id,
                )
            )
        self._sources: list[AudioSource | VideoSource | RealSource] = [
            s for s in (self.audio, self.video) if s is not None
        ]
        self._tx: DoubleSender | None = None
        if self._sources:
            # RFC 8870 §4.6: Full tags every 100 ms with audio, with each key frame for video.
            period = None if choice is MediaChoice.VIDEO else 0.1
            self._tx = DoubleSender(outer.client_key, outer.client_salt, ekt, period=period)
        # A receive-only endpoint still needs an SSRC for its reports (RFC 3550 §6.4.2).
        self.rtcp_ssrc = self._sources[0].ssrc if self._sources else random_ssrc()
        self._cname = self._rng.getrandbits(96).to_bytes(12, "big").hex().encode()
        self.spis: list[int] = [ekt.spi]
        self._first_spi = ekt.spi
        self._joined_at = now
        self._pre_join_seen = False
        #: never-verified SSRCs' failures in the pre-join window, waiting for evidence
        self._pre_join_pending: dict[str, int] = {}
        #: RTP SEQs of no-key failures of never-verified SSRCs (see "Early"), bounded
        self._early: dict[int, list[tuple[int, str]]] = {}
        #: never-verified SSRCs seen sending under an SPI older than our first
        self._pre_join_ssrcs: set[int] = set()
        self._ekt_params = ekt
        self._period = None if choice is MediaChoice.VIDEO else 0.1
        #: an SPI newer than ours seen in peers' Full tags that we could not read, and when
        #: such a tag first and last arrived (D30: a key we were left out of)
        self.newer_spi: int | None = None
        self.newer_spi_first = 0.0
        self.newer_spi_last = 0.0
        #: peers verified since the last (re)join, and those not yet taken by the caller
        self._verified_since_join: set[str] = set()
        self._new_verified: list[str] = []
        self.stats = EndpointMediaStats()
        self.streams: dict[int, RemoteStream] = {}
        self.unattributed = Unattributed()
        self._out: list[bytes] = []
        self._e2e_mark = 0
        self._pli_at: dict[int, float] = {}
        self._fir_seq: dict[tuple[int, int], int] = {}
        #: per sending SSRC of real video: NACK/PLI repair and frame assembly (D36)
        self._video_rx: dict[int, VideoReceiver] = {}
        self._repair = repair
        self._media_out: list[ReceivedMedia] = []
        #: latest report block about each of our SSRCs, per reporting SSRC (bounded)
        self.reports_about_us: dict[int, dict[int, ReportBlock]] = {}
        self._next_rtcp = now + self._rtcp_delay()
        self._next_housekeeping = now + _HOUSEKEEPING
        self._closed = False

    @classmethod
    def from_exporter(
        cls,
        name: str,
        media: MediaChoice | str,
        profile: SrtpProfile | int,
        exporter: bytes,
        *,
        ekt: EktParameterSet,
        now: float,
        **kwargs: Any,
    ) -> EndpointMedia:
        """From the negotiated DOUBLE profile and the raw EXTRACTOR-dtls_srtp output."""
        return cls(name, media, split_exporter(profile, exporter), ekt, now, **kwargs)

    # --- properties --------------------------------------------------------------------------

    @property
    def ssrc(self) -> int:
        """The report's SSRC: the audio SSRC, else the first stream's, else the RTCP SSRC."""
        return self.rtcp_ssrc

    @property
    def receiver(self) -> DoubleReceiver:
        return self._rx

    @property
    def sender(self) -> DoubleSender | None:
        return self._tx

    @property
    def sent(self) -> int:
        return self.stats.sent_rtp

    def our_ssrcs(self) -> list[int]:
        return [s.ssrc for s in self._sources] or [self.rtcp_ssrc]

    def peers_verified(self) -> set[str]:
        """Names of the peers with at least one verified packet."""
        return {s.name for s in self.streams.values() if s.name is not None and s.verified}

    def peers_last_verified(self) -> dict[str, tuple[float, bool]]:
        """Per peer name: when its last verified packet arrived, and whether it said BYE."""
        out: dict[str, tuple[float, bool]] = {}
        for s in self.streams.values():
            if s.name is None or not s.verified:
                continue
            last, bye = out.get(s.name, (s.last_at, False))
            out[s.name] = (max(last, s.last_at), bye or s.bye)
        return out

    def take_newly_verified(self) -> list[str]:
        """Peers whose media verified for the first time since the last (re)join (each once)."""
        out, self._new_verified = self._new_verified, []
        return out

    def stale_key_for(self, now: float) -> float:
        """Seconds during which peers' Full tags named an SPI newer than ours that we lack
        (0 when none did, or the last such tag is older than a second ago)."""
        if self.newer_spi is None or now - self.newer_spi_last > 1.0:
            return 0.0
        return self.newer_spi_last - self.newer_spi_first

    # --- timers and output -------------------------------------------------------------------

    def timer(self) -> float | None:
        """When ``handle_timer`` should next be called (None: nothing scheduled)."""
        if self._closed:
            return None
        t = min(self._next_rtcp, self._next_housekeeping)
        for s in self._sources:
            t = min(t, s.next_due())
        for rx in self._video_rx.values():
            rt = rx.timer()
            if rt is not None:
                t = min(t, rt)
        return t

    def handle_timer(self, now: float) -> None:
        """Make the media packets and reports due at ``now``."""
        if self._pre_join_pending and now - self._joined_at > PRE_JOIN_GRACE:
            self._settle_pre_join(now)
        if self._closed:
            return
        tx = self._tx
        if tx is not None:
            # RFC 8870 §5.2.2: past ekt_ttl the EKTKey must not be used; receivers drop tags
            # under it, so the packets it would have to announce keys for are not sent.
            expired = tx.ekt.params.expired(now)
            for source in self._sources:
                for pkt in source.packets_due(now):
                    if expired:
                        self.stats.ekt_expired += 1
                    else:
                        self._send_rtp(tx, pkt, now)
        for rx in self._video_rx.values():
            rt = rx.timer()
            if rt is not None and rt <= now:
                self._video_out(rx, rx.poll(now))
        if now >= self._next_rtcp:
            for compound in self._rtcp_compounds(now):
                self._send_rtcp(compound)
            self._next_rtcp = now + self._rtcp_delay()
        if now >= self._next_housekeeping:
            self._rx.ekt.expire_old_keys(now)
            self._next_housekeeping = now + _HOUSEKEEPING

    def datagrams_to_send(self) -> list[bytes]:
        """Drain the SRTP/SRTCP datagrams made since the last call."""
        out, self._out = self._out, []
        return out

    def _queue(self, datagram: bytes) -> bool:
        if len(self._out) >= self._max_queue:
            self.stats.queue_drops += 1
            return False
        self._out.append(datagram)
        return True

    def _send_rtp(self, tx: DoubleSender, pkt: OutgoingPacket, now: float) -> None:
        try:
            data = tx.protect(pkt.rtp, now, keyframe=pkt.ekt_full_hint)
        except SrtpError:
            self.stats.send_errors += 1
            return
        if self._queue(data):
            self.stats.sent_rtp += 1
            self.stats.sent_octets += pkt.payload_length

    def _send_rtcp(self, packets: list[RtcpPacket]) -> None:
        try:
            data = self._rtcp_tx.protect_rtcp(serialize_rtcp(packets))
        except SrtpError:
            self.stats.send_errors += 1
            return
        if self._queue(data):
            self.stats.sent_rtcp += 1

    def _rtcp_delay(self) -> float:
        # RFC 3550 §6.3.1: randomise the interval by [0.5, 1.5] to avoid synchronisation.
        return self._rtcp_interval * (0.5 + self._rng.random())

    # --- rekeying and leaving ----------------------------------------------------------------

    def rekey(self, params: EktParameterSet, now: float) -> bool:
        """A new EKTKey arrived: accept tags under it and switch to a new E2E key (D22).

        The same parameter set again (a repeated EKTKey message) changes nothing: RFC 8871
        §4.5.2 asks for a new E2E key per *new* EKT key. Returns whether a rekey happened.
        """
        if params == self._ekt_params:
            self.stats.duplicate_ekt_keys += 1
            return False
        self._ekt_params = params
        # Receiver first, so Full tags under the new SPI from faster peers are readable (also
        # those that came before this EKTKey: they announced keys we must not miss).
        self._rx.add_parameter_set(params, now)
        if self._tx is not None:
            self._tx.rekey(params, now)
        if params.spi not in self.spis:
            self.spis.append(params.spi)
        self._forget_newer_spi(params.spi)
        # Failures that were waiting for this EKTKey were late key delivery, not tampering.
        for st in self.streams.values():
            st.key_arrived(params.spi, now)
        self.unattributed.key_arrived(params.spi, now)
        self.stats.rekeys += 1
        return True

    def rejoin(self, keying: KeyingMaterial, params: EktParameterSet, now: float) -> None:
        """A new association (D30): new hop-by-hop keys and a new EKTKey; media goes on.

        Our SSRCs and RTP sequence numbers continue, so to the peers this looks like a rekey:
        a fresh random E2E key announced in Full tags under the new SPI. The outer layer
        starts over (the MDD's new association knows nothing of our ROCs). The EKT receiver
        is kept, so peers still sending under the previous EKTKey stay readable until they
        switch.

        When the KMF hands out the EKTKey we already had (no rekey on join, D22), our new
        sender's Full tags would carry the same SPI with epoch 0 again and a different E2E
        key, which receivers must ignore (D8); so then our streams take new SSRCs instead,
        as a new member's would (the peers' reports group them under our name).
        """
        if not keying.profile.is_double:
            raise MediaUsageError(f"{keying.profile.name} is not a DOUBLE profile")
        if params.spi == self._ekt_params.spi:
            self._new_ssrcs()
        outer = keying.outer()
        self._rtcp_tx = SrtpSession(outer.client_key, outer.client_salt)
        rx_session = SrtpSession(outer.server_key, outer.server_salt)
        self._rx = DoubleReceiver(rx_session, ekt=self._rx.ekt)
        self._rtcp_rx = rx_session
        self._e2e_mark = 0
        self._ekt_params = params
        self._rx.add_parameter_set(params, now)
        if self._tx is not None:
            self._tx = DoubleSender(
                outer.client_key, outer.client_salt, params, period=self._period
            )
        if self.video is not None:
            self.video.request_keyframe()  # receivers need a key frame under the new key
        if params.spi not in self.spis:
            self.spis.append(params.spi)
        self._forget_newer_spi(params.spi)
        for st in self.streams.values():
            st.key_arrived(params.spi, now)
        self.unattributed.key_arrived(params.spi, now)
        self._verified_since_join = set()
        self._new_verified = []

    def _new_ssrcs(self) -> None:
        taken = set(self.our_ssrcs())
        for source in self._sources:
            ssrc = random_ssrc()
            while ssrc in taken:
                ssrc = random_ssrc()
            taken.add(ssrc)
            source.stream.ssrc = ssrc
        self.rtcp_ssrc = self._sources[0].ssrc if self._sources else random_ssrc()
        for rx in self._video_rx.values():
            rx.own_ssrc = self.rtcp_ssrc  # our feedback names the SSRC we now send RTCP from

    def _forget_newer_spi(self, spi: int) -> None:
        waiting = self.newer_spi
        if waiting is not None and not 1 <= (waiting - spi) & 0xFFFF <= 0x7FFF:
            self.newer_spi = None  # we now hold that SPI or a later one

    def bye(self, now: float, reason: bytes = b"leaving") -> None:
        """Queue a final report with an RTCP BYE for our SSRCs and stop sending (RFC 3550 §6.6)."""
        if self._closed:
            return
        compounds = self._rtcp_compounds(now)
        compounds[0].append(Bye(tuple(self.our_ssrcs()), reason[:255]))
        for compound in compounds:
            self._send_rtcp(compound)
        self._closed = True

    # --- receiving ---------------------------------------------------------------------------

    def receive(self, datagram: bytes, now: float) -> None:
        """Consume one SRTP or SRTCP datagram from the Media Distributor."""
        if is_rtcp(datagram):
            self._receive_rtcp(datagram, now)
        else:
            self._receive_rtp(datagram, now)

    def _receive_rtp(self, data: bytes, now: float) -> None:
        self.stats.received_rtp += 1
        ssrc = _unpack_ssrc(data, 8)[0] if len(data) >= 12 else None
        st = self.streams.get(ssrc) if ssrc is not None else None
        try:
            pkt = self._rx.unprotect(data, now)
        except SrtpError as exc:
            self._count_failure(st, data, exc, now)
            return
        if pkt.padding:
            self._receive_real(st, pkt, now)
            return
        try:
            payload = parse_payload(pkt.payload)
        except PayloadDecodeError:
            self._count_payload_failure(st)
            return
        st = self._stream_for(st, pkt.ssrc, payload.name, payload.kind)
        if st is None:
            return
        offset = (pkt.original_sequence_number - payload.seq) & 0xFFFF
        if st.seq_offset is None:
            st.seq_offset = offset
        elif offset != st.seq_offset:
            self._count_payload_failure(st)
            return
        self._verified(st, pkt, payload.kind, now)

    def _receive_real(self, st: RemoteStream | None, pkt: MediaPacket, now: float) -> None:
        """A real (Opus or VP8) packet: its identity is in the padding (perc.media.real)."""
        try:
            name, kind = parse_identity_untrusted(pkt.padding)
        except PayloadDecodeError:
            self._count_payload_failure(st)
            return
        st = self._stream_for(st, pkt.ssrc, name, kind)
        if st is None:
            return
        self._verified(st, pkt, kind, now)
        if kind is StreamKind.AUDIO:
            if self.collect_media:
                self._hand_out(ReceivedMedia(name, kind, pkt.ssrc, pkt.timestamp, pkt.payload))
            return
        rx = self._video_rx.get(pkt.ssrc)
        if rx is None:
            if len(self._video_rx) >= self._max_streams:
                return  # bounded: this stream is verified and counted, not repaired
            from perc.media.nack import NackSettings, VideoReceiver

            settings = NackSettings(nack=self._repair)
            rx = self._video_rx[pkt.ssrc] = VideoReceiver(pkt.ssrc, self.rtcp_ssrc, settings)
        frames = rx.push(pkt.sequence_number, pkt.timestamp, pkt.marker, pkt.payload, now)
        self._video_out(rx, frames)

    def _stream_for(
        self, st: RemoteStream | None, ssrc: int, name: str, kind: StreamKind
    ) -> RemoteStream | None:
        """The stream a verified packet from ``name`` (``kind``) belongs to: ``st``, or a new
        one for ``ssrc``. None (counted) when no stream may be added or ``st`` is someone
        else's: another sender (any EKTKey holder can make tags for any SSRC) or a confused
        one."""
        if st is None:
            if len(self.streams) >= self._max_streams:
                self.unattributed.received += 1
                self.unattributed.untracked += 1
                return None
            st = self.streams[ssrc] = RemoteStream(ssrc, name, kind)
        elif name != st.name or kind is not st.kind:
            self._count_payload_failure(st)
            return None
        return st

    def _video_out(self, rx: VideoReceiver, frames: list[AssembledFrame]) -> None:
        """Frames a video receiver released go to the shell; its NACK/PLI go out now
        (reduced-size RTCP, RFC 5506, as early feedback, RFC 4585 §3.5)."""
        st = self.streams.get(rx.media_ssrc)
        if self.collect_media and st is not None and st.name is not None:
            for f in frames:
                self._hand_out(
                    ReceivedMedia(
                        st.name, StreamKind.VIDEO, rx.media_ssrc, f.timestamp, f.data, f.keyframe
                    )
                )
        feedback = rx.feedback()
        if feedback:
            self._send_rtcp(list(feedback))
            for fb in feedback:
                if isinstance(fb, Pli):
                    self.stats.pli_sent += 1
                else:
                    self.stats.nack_sent += 1

    def _hand_out(self, item: ReceivedMedia) -> None:
        if len(self._media_out) >= self._max_queue:
            self.stats.media_out_drops += 1
            return
        self._media_out.append(item)

    def take_received_media(self) -> list[ReceivedMedia]:
        """Real media received since the last call (with ``collect_media``), in order."""
        out, self._media_out = self._media_out, []
        return out

    def _verified(self, st: RemoteStream, pkt: MediaPacket, kind: StreamKind, now: float) -> None:
        st.received += 1
        st.verified += 1
        spis = st.spis
        st.verified_one(now, newer_spi=bool(spis) and 1 <= (pkt.spi - spis[-1]) & 0xFFFF <= 0x7FFF)
        if st.name not in self._verified_since_join and st.name is not None:
            self._verified_since_join.add(st.name)
            self._new_verified.append(st.name)
        if (not spis or spis[-1] != pkt.spi) and pkt.spi not in spis:
            spis.append(pkt.spi)  # in order of first use
        seq = st.seq
        if seq is None:
            rate = AUDIO_CLOCK_RATE if kind is StreamKind.AUDIO else VIDEO_CLOCK_RATE
            seq = st.seq = SeqStats(pkt.sequence_number, rate)
            if self._early:
                self._settle_early(pkt.ssrc, pkt.sequence_number)
        seq.update(pkt.sequence_number, pkt.timestamp, now)
        st.last_at = now

    def _count_payload_failure(self, st: RemoteStream | None) -> None:
        if st is None:
            self.unattributed.received += 1
            self.unattributed.payload_failures += 1
        else:
            st.received += 1
            st.payload_failures += 1

    def _count_failure(
        self, st: RemoteStream | None, data: bytes, exc: SrtpError, now: float
    ) -> None:
        target: RemoteStream | Unattributed = self.unattributed if st is None else st
        target.received += 1
        reason = _e2e_reason(exc)
        if reason is None:
            # Errors from after the outer layer raise the same base types as the outer layer
            # itself; the receiver's end-to-end counters tell which layer it was.
            s = self._rx.stats
            mark = s.no_key + s.inner_auth_failures + s.inner_replays + s.ohb_errors
            mark += s.padding_errors
            if mark != self._e2e_mark:
                self._e2e_mark = mark
                reason = _inner_reason(exc)
        if reason is None:
            if isinstance(exc, ReplayError):
                target.hbh_replays += 1
            else:
                target.hbh_failures += 1
            return
        spi = None
        if reason == "unknown_spi":
            try:
                field = split_ekt_field(data)[1]
            except EktDecodeError:  # cannot happen: the receiver parsed it already
                field = None
            if isinstance(field, FullEktField):
                spi = field.spi
                if 1 <= (spi - self._ekt_params.spi) & 0xFFFF <= 0x7FFF:
                    if self.newer_spi != spi or now - self.newer_spi_last > 1.0:
                        self.newer_spi, self.newer_spi_first = spi, now
                    self.newer_spi_last = now
        ssrc = _unpack_ssrc(data, 8)[0] if len(data) >= 12 else None
        bucket = None
        if st is None and reason in _PRE_JOIN_REASONS:
            bucket = self._pre_join(ssrc, reason, now, spi)
        if bucket is not None:
            if bucket == "pending" and reason == "no_key":
                self._remember_early(ssrc, data, "pending")
        elif st is not None and reason in _PRE_JOIN_REASONS and self._straggler(st, data):
            # Sent before the first packet of this stream we could verify (overtaken by it):
            # a pre-join packet, not a failure of the stream.
            st.received -= 1
            self.unattributed.received += 1
            self.unattributed.pre_join += 1
        else:
            if st is None and reason == "no_key" and self.unattributed.waiting_spi is None:
                self._remember_early(ssrc, data, "e2e")
            target.count_e2e(reason, now, spi)
        # A video receiver without the sender's current key waits for the next Full tag,
        # which comes with a key frame (RFC 8870 §4.6): ask for one.
        if (
            reason in ("no_key", "inner_auth", "unknown_spi")
            and len(data) >= 12
            and data[1] & 0x7F == VIDEO_PT
        ):
            self._maybe_pli(_unpack_ssrc(data, 8)[0], now)

    def _pre_join(self, ssrc: int | None, reason: str, now: float, spi: int | None) -> str | None:
        """Count a never-verified SSRC's failure as pre-join ("pre_join"), keep it waiting for
        evidence ("pending"), or let the caller count it as an E2E failure (None); see
        "Pre-join" in the module docstring."""
        # An SPI before our first one (mod 2^16, half the space back): a key we never had.
        older = spi is not None and 1 <= (self._first_spi - spi) & 0xFFFF <= 0x7FFF
        # An SSRC seen on a key we never had: until its stream verifies, its packets are
        # pre-join (e.g. its own copy of the rekey came late, so its switch is late). The
        # set is bounded; forgetting only makes us stricter.
        if reason == "unknown_spi" and not older:
            # A key newer than ours that we lack: late key delivery, which the key-wait rule
            # handles (perc.media.stats._Failures), not a key from before our join.
            return None
        in_window = now - self._joined_at <= PRE_JOIN_GRACE
        if older or (ssrc in self._pre_join_ssrcs) or (in_window and reason == "inner_auth"):
            if ssrc is not None:
                if len(self._pre_join_ssrcs) >= self._max_streams:
                    self._pre_join_ssrcs.clear()
                self._pre_join_ssrcs.add(ssrc)
            self._pre_join_seen = True
            self.unattributed.pre_join += 1 + sum(self._pre_join_pending.values())
            self._pre_join_pending.clear()
            return "pre_join"
        if not in_window:
            return None
        if self._pre_join_seen:
            self.unattributed.pre_join += 1
            return "pre_join"
        self._pre_join_pending[reason] = self._pre_join_pending.get(reason, 0) + 1
        return "pending"

    def _remember_early(self, ssrc: int | None, data: bytes, bucket: str) -> None:
        if ssrc is None:
            return
        seqs = self._early.get(ssrc)
        if seqs is None:
            if len(self._early) >= self._max_streams:
                return  # bounded: such a packet simply stays counted as a failure
            seqs = self._early[ssrc] = []
        if len(seqs) < _EARLY_PER_SSRC:
            seqs.append((int.from_bytes(data[2:4], "big"), bucket))

    def _settle_early(self, ssrc: int, first_seq: int) -> None:
        """An SSRC's first packet verified: its no-key failures with a later SEQ were sent
        under the key we now have and only overtook the Full EKT tag that announced it."""
        un = self.unattributed
        for seq, bucket in self._early.pop(ssrc, ()):
            if not 1 <= (seq - first_seq) & 0xFFFF <= _STRAGGLER_SEQS:
                continue
            if bucket == "e2e" and un.e2e_reasons.get("no_key", 0) > 0:
                un.e2e_failures -= 1
                un.e2e_reasons["no_key"] -= 1
                if not un.e2e_reasons["no_key"]:
                    del un.e2e_reasons["no_key"]
            elif bucket == "pending" and self._pre_join_pending.get("no_key", 0) > 0:
                self._pre_join_pending["no_key"] -= 1
                if not self._pre_join_pending["no_key"]:
                    del self._pre_join_pending["no_key"]
            else:
                continue  # already moved to pre_join: leave it there
            un.early += 1

    def _straggler(self, st: RemoteStream, data: bytes) -> bool:
        """A packet of a stream that had pre-join packets, from before its first verified
        one (RTP SEQ up to _STRAGGLER_SEQS behind it, RFC 3550 A.1 style)."""
        if st.ssrc not in self._pre_join_ssrcs or st.seq is None:
            return False
        seq = int.from_bytes(data[2:4], "big")
        return 1 <= (st.seq.base_seq - seq) & 0xFFFF <= _STRAGGLER_SEQS

    def _settle_pre_join(self, now: float) -> None:
        """The window is over without evidence of older keys: pending ones were failures."""
        pending, self._pre_join_pending = self._pre_join_pending, {}
        for seqs in self._early.values():
            seqs[:] = [(seq, "e2e" if b == "pending" else b) for seq, b in seqs]
        for reason, count in pending.items():
            for _ in range(count):
                self.unattributed.count_e2e(reason, now)

    def _maybe_pli(self, media_ssrc: int, now: float) -> None:
        last = self._pli_at.get(media_ssrc)
        if last is not None and now - last < _PLI_MIN_INTERVAL:
            return
        if len(self._pli_at) >= self._max_streams:
            self._pli_at.clear()  # bounded; losing old rate-limit entries is harmless
        self._pli_at[media_ssrc] = now
        # RFC 4585 §3.5 early feedback; reduced-size RTCP (RFC 5506) with the PLI alone.
        self._send_rtcp([Pli(self.rtcp_ssrc, media_ssrc)])
        self.stats.pli_sent += 1

    def _receive_rtcp(self, data: bytes, now: float) -> None:
        self.stats.received_rtcp += 1
        try:
            plain = self._rtcp_rx.unprotect_rtcp(data)
        except ReplayError:
            self.stats.rtcp_replays += 1
            return
        except SrtpError:
            self.stats.rtcp_auth_failures += 1
            return
        try:
            packets = parse_rtcp(plain)
        except RtcpDecodeError:
            self.stats.rtcp_decode_errors += 1
            return
        video_ssrc = self.video.ssrc if self.video is not None else None
        ours = set(self.our_ssrcs())
        for p in packets:
            if isinstance(p, SenderReport):
                self.stats.sr_received += 1
                st = self.streams.get(p.ssrc)
                if st is not None:
                    st.last_sr = ntp_middle32(p.ntp_timestamp)
                    st.last_sr_at = now
                    st.sr_packet_count = p.packet_count
                self._report_blocks(p.ssrc, p.reports, ours, now)
            elif isinstance(p, ReceiverReport):
                self.stats.rr_received += 1
                self._report_blocks(p.ssrc, p.reports, ours, now)
            elif isinstance(p, Pli):
                if p.media_ssrc == video_ssrc and self.video is not None:
                    self.stats.pli_received += 1
                    self.video.request_keyframe()
                else:
                    self.stats.feedback_not_ours += 1
            elif isinstance(p, Fir):
                self._fir(p, video_ssrc)
            elif isinstance(p, Nack):
                if p.media_ssrc in ours:
                    self.stats.nack_received += 1
                else:
                    self.stats.feedback_not_ours += 1
            elif isinstance(p, Bye):
                self.stats.bye_received += 1
                for ssrc in p.ssrcs:
                    bye_st = self.streams.get(ssrc)
                    if bye_st is not None:
                        bye_st.bye = True
            elif not isinstance(p, SourceDescription):
                self.stats.other_rtcp += 1

    def _fir(self, p: Fir, video_ssrc: int | None) -> None:
        mine = [seq for ssrc, seq in p.entries if ssrc == video_ssrc]
        if not mine or self.video is None or video_ssrc is None:
            self.stats.feedback_not_ours += 1
            return
        key = (p.sender_ssrc, video_ssrc)
        if self._fir_seq.get(key) == mine[-1]:
            # RFC 5104 §4.3.1.2: the same command sequence number is a retransmission.
            self.stats.fir_duplicates += 1
            return
        if len(self._fir_seq) >= self._max_streams:
            self._fir_seq.clear()
        self._fir_seq[key] = mine[-1]
        self.stats.fir_received += 1
        self.video.request_keyframe()

    def _report_blocks(
        self, reporter: int, blocks: tuple[ReportBlock, ...], ours: set[int], now: float
    ) -> None:
        for block in blocks:
            if block.ssrc not in ours:
                continue  # a report about someone else's stream (the MD may fan RTCP out)
            self.stats.report_blocks_about_us += 1
            table = self.reports_about_us.setdefault(block.ssrc, {})
            if reporter not in table and len(table) >= self._max_streams:
                continue
            table[reporter] = block
            if block.lsr:
                # RFC 3550 §6.4.1: RTT = A - LSR - DLSR, in 1/65536 s.
                arrival = ntp_middle32(ntp_timestamp(now, self._ntp_offset))
                rtt = (arrival - block.lsr - block.dlsr) & 0xFFFFFFFF
                if rtt < 0x80000000:
                    self.stats.last_rtt = rtt / 65536.0

    # --- RTCP generation ---------------------------------------------------------------------

    def _report_blocks_due(self, now: float) -> list[ReportBlock]:
        blocks: list[ReportBlock] = []
        for st in self.streams.values():
            if st.seq is None or st.bye or now - st.last_at > _REPORT_WINDOW:
                continue
            lsr = dlsr = 0
            if st.last_sr_at is not None:
                lsr = st.last_sr
                dlsr = min(0xFFFFFFFF, max(0, math.floor((now - st.last_sr_at) * 65536)))
            blocks.append(st.seq.report_block(st.ssrc, lsr, dlsr))
        return blocks

    def _rtcp_compounds(self, now: float) -> list[list[RtcpPacket]]:
        """RFC 3550 §6.1 compound packets: SR/RR first, extra RRs, then SDES CNAME."""
        blocks = self._report_blocks_due(now)
        groups = [blocks[i : i + _MAX_BLOCKS] for i in range(0, len(blocks), _MAX_BLOCKS)]
        first = groups[0] if groups else []
        ntp = ntp_timestamp(now, self._ntp_offset)
        head: list[RtcpPacket] = []
        for source in self._sources:
            s = source.stream
            if s.sent:
                # RFC 3550 §6.4.1: a sender reports as a sender; the reception blocks ride on
                # the first SR.
                head.append(
                    SenderReport(
                        ssrc=s.ssrc,
                        ntp_timestamp=ntp,
                        rtp_timestamp=s.rtp_timestamp_at(now),
                        packet_count=s.sent & 0xFFFFFFFF,
                        octet_count=s.octets & 0xFFFFFFFF,
                        reports=tuple(first) if not head else (),
                    )
                )
        if not head:
            # Nothing sent yet (or a receive-only endpoint): an RR leads (RFC 3550 §6.4.2).
            head.append(ReceiverReport(self.rtcp_ssrc, tuple(first)))
        sdes = SourceDescription(
            tuple(SdesChunk(ssrc, (SdesItem(1, self._cname),)) for ssrc in self.our_ssrcs())
        )
        out: list[list[RtcpPacket]] = [[*head, sdes]]
        for group in groups[1:]:
            # Further blocks: their own compound packets so each stays well under the MTU.
            out.append([ReceiverReport(self.rtcp_ssrc, tuple(group)), sdes])
        return out

    # --- report ------------------------------------------------------------------------------

    def _repair_report(self, peers: dict[str, Any]) -> dict[str, Any]:
        """Receiver repair (D36): per peer's real video and in total; adds ``video`` to the
        peers' report entries."""
        total = dict.fromkeys(_REPAIR_KEYS, 0)
        for ssrc, rx in self._video_rx.items():
            st = self.streams.get(ssrc)
            a, n = rx.assembler.stats, rx.stats
            values = (a.frames, a.frames_dropped, n.nacks_sent, n.nacked_seqs, n.recovered,
                      n.given_up, n.plis_sent, n.feed_starts, n.feed_starts_keyframe)  # fmt: skip
            row = dict(zip(_REPAIR_KEYS, values, strict=True))
            if st is not None and st.name in peers:
                video = peers[st.name].setdefault("video", dict.fromkeys(_REPAIR_KEYS, 0))
                for k, v in row.items():
                    video[k] += v
            for k, v in row.items():
                total[k] += v
        total["plis_sent_total"] = self.stats.pli_sent
        total["plis_received"] = self.stats.pli_received
        total["firs_received"] = self.stats.fir_received
        total["nacks_received"] = self.stats.nack_received
        total["media_out_drops"] = self.stats.media_out_drops
        return total

    def report(self) -> dict[str, Any]:
        """The endpoint's report (the report schema, plus diagnostic fields)."""
        sent_by_stream: dict[str, dict[str, Any]] = {
            s.kind.name.lower(): {
                "ssrc": s.ssrc,
                "sent": s.stream.sent,
                "skipped": s.stream.skipped,
            }
            for s in self._sources
        }
        for s in self._sources:
            if isinstance(s, RealSource):
                entry = sent_by_stream[s.kind.name.lower()]
                entry.update(attrs.asdict(s.stats), keyframe_requests=s.keyframe_requests)
        rtcp = attrs.asdict(self.stats)
        report = build_report(
            self.name,
            ssrc=self.ssrc,
            sent=self.stats.sent_rtp,
            spis=self.spis,
            streams=self.streams,
            unattributed=self.unattributed,
            since=self._joined_at,
            extra={"media": self.media.value, "streams": sent_by_stream, "stats": rtcp},
        )
        if self.real is not None or self._video_rx:
            report["codec"] = "real" if self.real is not None else "synthetic"
            report["repair"] = self._repair_report(report["peers"])
        # Failures still waiting for pre-join evidence are reported as failures until then.
        un = report["unattributed"]
        for reason, count in self._pre_join_pending.items():
            un["e2e_failures"] += count
            un["e2e_reasons"][reason] = un["e2e_reasons"].get(reason, 0) + count
        return report


_REPAIR_KEYS = ("frames_complete", "frames_incomplete", "nacks_sent", "nacked_seqs",
                "recovered", "given_up", "plis_sent", "feed_starts",
                "feed_starts_keyframe")  # fmt: skip


def _e2e_reason(exc: SrtpError) -> str | None:
    """The end-to-end reason of an error that can only come from the EKT layer (or None)."""
    if isinstance(exc, EktFieldError):
        return None  # the packet's framing is broken: counted with the hop-by-hop failures
    if isinstance(exc, UnknownSpiError):
        return "unknown_spi"
    if isinstance(exc, EktUnwrapError):
        return "ekt_unwrap"
    if isinstance(exc, EktPlaintextError):
        return "ekt_plaintext"
    if isinstance(exc, EktStreamLimitError):
        return "ekt_stream_limit"
    if isinstance(exc, EktError):
        return "ekt"
    return None


def _inner_reason(exc: SrtpError) -> str:
    if isinstance(exc, NoInnerKeyError):
        return "no_key"
    if isinstance(exc, ReplayError):
        return "inner_replay"
    if isinstance(exc, DoubleDecodeError):
        return "ohb"
    return "inner_auth"
