"""The Media Distributor's forwarding core: one conference's SRTP/SRTCP routing table (sans-IO).

The MDD's I/O shell hands every SRTP/SRTCP datagram an endpoint sends to
:meth:`ForwardingTable.handle_datagram` and sends what it returns: ``(address, datagram)``
pairs, one per receiving endpoint. Only the hop-by-hop layer is touched: the table holds the
outer (HBH) keys of each association from ``MediaKeys`` (D4) and nothing else. It imports
``perc.srtp.hop`` and ``perc.srtp.context`` but never ``perc.srtp.ekt`` or
``perc.srtp.double`` (RFC 8871 §4.1: the MD must not be able to read media; a test checks
that importing this module loads neither).

Theory of operation
-------------------
**Associations.** One per endpoint DTLS association (RFC 9185 §5.3), keyed by its association
id, with the endpoint's transport address (opaque and hashable, e.g. ``(host, port)``). When
``MediaKeys`` arrive (:meth:`ForwardingTable.install_keys`) the association gets two
RFC 7714 sessions: *inbound* from ``client_write`` (decrypts what the endpoint sends) and
*outbound* from ``server_write`` (encrypts what we send to it), RFC 9185 §6.4.
``MediaKeys`` for an association that already has keys replace them (fresh sessions).

**D5 hold.** SRTP/SRTCP from a known address before its keys is held, at most
``hold_limit`` (64) datagrams per association, and processed in arrival order when the keys
arrive (their output is returned by ``install_keys``). Beyond that: dropped, counted
(``drop_queue_full``). A held datagram counts once in ``received`` (on arrival) and once in
``held``; its release is not a second arrival. An association removed with datagrams still
held counts them as ``drop_no_keys``.

**RTP vs RTCP** by the second byte (RFC 5761 §4): 192-223 is RTCP (its packet
type sits where RTP has M+PT), anything else RTP.

**RTP** (RFC 8723 §5.2). :meth:`~perc.srtp.hop.MediaDistributorHop.decrypt` once with the
sender's inbound session (EKT field cut off as opaque bytes, D11; outer authentication and
replay check, RFC 8871 §4.4): the one parse of the packet's header, which leaves the header
(the outer AAD), the outer plaintext, SEQ and SSRC apart. Then for every receiver one outer
encryption with that receiver's outbound session and the EKT field re-appended unchanged.
Each sender keeps a precomputed route list ``[(address, protect)]`` of every other keyed
association, updated in place when the membership changes (see *Route upkeep*), and per SSRC
it sends the *fan-out*: every receiver's send stream of that SSRC
(:class:`~perc.srtp.index.SrtpStream`, from ``SrtpSession.send_stream``) in route order,
remade when the route list differs from the one it was made for. So the per-delivery path is
one ``seal`` of the parts decrypt found (no parse, no slicing, no re-gluing), two
concatenations (header, EKT field) and one tuple in a list comprehension; the receivers'
``packets_out``/``bytes_out`` are credited in bulk from one counter per sender (see
:meth:`ForwardingTable.flush`).
This is exactly ``MediaDistributorHop.encrypt_for(session, inbound)`` without header changes,
inlined: the hop's guard against re-encrypting with the sender's key is upheld structurally
(a route never points back at its sender, and ``install_keys`` refuses ``client_write ==
server_write``, RFC 8723 §5.2/§9). Renumbered deliveries (``last_n`` below) are
``encrypt_for`` with :class:`~perc.srtp.hop.HeaderChanges` the same way: the hop's
``rewrite`` (which updates the OHB) once per packet and SEQ change, then each feed's own
``seal``.

**SSRC ownership.** The first association whose authenticated RTP carries an SSRC owns it
until it is removed; RTP with that SSRC from anyone else is dropped (``drop_ssrc_conflict``):
two senders merged into one SSRC would make a receiver's outbound session see the same
(SSRC, ROC, SEQ) twice, which RFC 7714 §8.4 forbids (``SrtpSession`` refuses it anyway). The
owner map routes RTCP feedback. At most ``max_ssrcs_per_association`` SSRCs per association.
A receiver's outbound session never forgets an SSRC it has sent (forgetting would allow an
index to be used twice under that receiver's key), so an SSRC reused by a later association
is refused for a receiver until its SEQ passes what that receiver was last sent (counted,
``drop_limit``); endpoints pick a fresh random SSRC when they rejoin (RFC 3550 §8.1).

**RTCP** (D19, RFC 8871 §4.4: the MD may forward, split or originate RTCP). The compound is
decrypted with the sender's inbound SRTCP context and parsed (:func:`perc.wire.rtcp.parse_rtcp`);
each packet is routed on its own:

- SR (200): to every other keyed endpoint, if the sender owns its SSRC;
- RR (201): to the owners of the SSRCs its report blocks are about, each getting an RR with
  only the blocks about its own streams (as received when all blocks are about one owner);
- RTPFB/PSFB (205/206: NACK, PLI, FIR, others): to the owner of the media SSRC (FIR: of the
  SSRCs in its entries, RFC 5104 §4.3.1);
- SDES, BYE, APP and anything else describe the sender: they go along to every destination
  the rest of the compound goes to, or to every other endpoint when it goes nowhere else.

*Ownership* (D26; SRTCP is hop-by-hop, D19, so the MD sees and may edit the compound): an
endpoint speaks only for its own SSRCs. An SR whose SSRC, an SDES chunk whose SSRC, or a BYE
SSRC that another association owns is removed (``drop_rtcp_spoof``): a member's forged BYE
must not make the others drop a live member's streams (RFC 3550 §6.6). An SR or SDES chunk
about an SSRC nobody owns claims it as the SSRC's first RTP would (an SR can come before the
first RTP, e.g. released from the D5 hold); a BYE about one is removed
(``drop_unknown_ssrc``). SDES and BYE keeping some parts are re-serialized; a packet with no
part left goes nowhere. If a leading SR was removed, the empty RR that heads the compound
comes from an SSRC the sender owns (none: nothing is sent).

*Feedback throttling* (D36): per receiver and media sender, a token bucket lets PLI and FIR
through at ``pli_rate`` (default 2/s, burst 1: one per 500 ms) and NACKs at ``nack_rate``
packets per second (a NACK costs 1 + the BLP bits set, RFC 4585 §6.2.1; burst one second's
worth). What does not fit is dropped (``drop_feedback_throttled``): one member's storm of
keyframe requests cannot make a sender encode keyframes without end. These checks run only
on the RTCP path; the RTP path is unchanged.

*Repair* (D36, ``ForwardingConfig.repair``; :mod:`perc.repair` has the theory). After every
receiver's seal of a video packet (receivers NACK video only) on the fan-out path, the packet's
parts (header, outer plaintext, EKT field) are appended to the sender's
:class:`~perc.repair.RepairCache` of that SSRC (one deque append). A generic NACK is answered
first from the cache: each SEQ it holds *as sent to this receiver* goes back to the receiver
byte-identical (same outer index), within ``repair_rate`` per receiver (beyond:
``retransmit_throttled``, not asked of the sender either); a NACK with the remaining SEQs only
(``nack_forwarded``) goes on to the owner, under ``nack_rate``. Under ``last_n`` every video
packet is cached once and each feed records its on-periods (:class:`~perc.repair.FeedPeriod`):
a NACK names the receiver's renumbered SEQs, answered with the bytes that feed sent (the same
OHB rewrite, the same index); the rest goes to the owner translated to the sender's SEQs.

Every destination gets one compound in the original order; if the original compound began
with an SR/RR (RFC 3550 §6.1) that this destination does not get, an empty RR (no report
blocks) from the same SSRC is put first, so what it receives is still a valid compound.
Each compound is re-encrypted with the destination's outbound SRTCP context (E=1). A
report or feedback about an SSRC nobody owns is dropped and counted (``drop_unknown_ssrc``,
the "unknown source" of RTCP), as is a packet about the sender's own SSRC.

**last_n** (``ForwardingConfig.last_n``, ``None`` = off). Video (``video_payload_types``,
default {96}) is forwarded to a receiver only from the ``last_n`` most recently active video
streams other than its own; audio and every other PT are always forwarded. The rule:

- *Ranking.* The table keeps the video SSRCs in order of their latest **activity start**, most
  recent first. A stream's activity starts with its first packet, or with its first packet
  after it was silent for more than ``last_n_idle`` (default 2 s); at that moment it goes to
  the front. A stream silent for more than ``last_n_idle`` leaves the ranking (checked on
  video packets, at most every ``last_n_idle / 8``, and by :meth:`ForwardingTable.tick`), which
  lets the streams behind it move up. For a receiver the wanted streams are the first
  ``last_n`` of the ranking that it does not send itself.
- *Hysteresis.* Only an activity start or a stream falling silent changes the ranking, so a
  stream that pauses for less than ``last_n_idle`` keeps its place, and continuous streams
  never reorder among themselves: no flapping.
- *Switch at frame boundaries.* The MD cannot see keyframes (the payload is end-to-end
  encrypted), but the outer marker bit ends a frame. A wanted stream starts for a receiver
  with the first packet after a marker (a frame start); an unwanted one stops after its next
  marker (frame end). If no marker shows for ``last_n_switch_timeout`` (1 s) it switches
  anyway. *Key frames* (D35): when the stream carries the RFC 9626 frame marking extension
  (``frame_marking_id``), a wanted stream starts only at a packet with S and I set (any frame
  start once ``last_n_switch_timeout`` passed); after ``keyframe_wait`` without one, the MDD
  sends the sender one PLI on the receiver's behalf (``pli_originated``: from the receiver's
  SSRC, protected with the sender's outbound SRTCP context, within the receiver's PLI
  throttle). A stream without the extension starts at the marker-bit frame start and the PLI
  goes at once (the MDD cannot tell a key frame). The extension is trusted for this choice
  only: it is not end-to-end protected.
- Once an SSRC has been seen as video, all its packets take this path whatever their PT, so
  the feed offsets apply to every packet of the SSRC.
- *Contiguous SEQ per receiver.* Each (receiver, SSRC) feed has an offset: ``out_seq = in_seq
  - offset (mod 2^16)``. The first time a feed starts the offset is 0 (no rewrite, no OHB
  change); when it resumes after a pause the offset is chosen so that ``out_seq`` continues
  at the highest SEQ this receiver got for that SSRC plus one. Renumbered packets are
  rewritten with a SEQ change, so the OHB records the original SEQ (RFC 8723 §5.2) and
  the receiver's end-to-end check still passes. Packets older than the current start point
  (late arrivals from the paused period) are dropped (``drop_reorder``): with the new offset
  they would reuse an index already sent, RFC 7714 §8.4. Within a running feed the map is
  one to one, and the inbound replay check guarantees each input index is seen once, so no
  (SSRC, ROC, SEQ) is ever emitted twice to one receiver; ``SrtpSession`` refusing an index
  is still caught and counted (``drop_limit``) rather than raised.
- Every (receiver, packet) pair not forwarded because of ``last_n`` counts as
  ``drop_last_n`` on the sender.

**Route upkeep.** The keyed associations are kept in one list in ``add`` order; every
sender's route lists (``_routes``, ``_route_counters``, ``_rtcp_routes``, index-aligned) are
that list without the sender, so a member's position in them follows from its position in
the table list. A first ``install_keys`` inserts the newcomer into each member's lists and
builds its own; ``remove`` deletes it from each; replacement keys swap its ``protect`` in
place: O(k) Python steps per join or leave for k keyed associations (plus C-level list
inserts/deletes), where a full rebuild was O(k^2) and dominated the MDD's CPU in a join storm.
Pending bulk credits (see :meth:`ForwardingTable.flush`) are settled per route change in O(1):
a receiver inserted into a sender's routes is pre-debited that sender's pending credit, a
receiver deleted from them is credited it directly. Under ``last_n`` only the feeds of the
joining receiver are made; a leave reranks only when the leaver had a ranked stream (the
wanted set depends only on the ranking). The result is identical to a from-scratch rebuild
(tested against one on random interleavings).

**Links** (D25, D26). A cascade link to another MDD is one more member, made by
:meth:`ForwardingTable.add_link` with the link's single-layer keys (``Association.link`` names
it). So split horizon is the rule every member already has: nothing goes back to its sender.
A link may carry a split-horizon ``group`` (D27's worker mesh): a grouped link's routes leave
out the links of its group (its route lists are rebuilt on each membership change rather than
patched; links are few). A link may bring many SSRCs (``max_associations`` x the per-endpoint
bound); an SSRC that one direction owns and another brings (a cycle, or a link bringing a
local endpoint's SSRC) is dropped as ``drop_loop`` and reported once per SSRC in
``loop_reports`` for the MDD engine's warning. Under ``last_n`` links get no feed: every video
packet goes to them unchanged (``_to_links``), and the MDD that serves the receiver applies its
own ``last_n``. Feedback a link forwards is not throttled again (its MDD did), and links are
never idle-expired (the link manager has keepalives).

**Removal.** :meth:`ForwardingTable.remove` (EndpointDisconnect, D3) drops the association,
its keys and SSRCs, and its routes; :meth:`ForwardingTable.expire_idle` removes those
silent for longer than a timeout and returns their ids (the MDD engine, :mod:`perc.mdd`, then
sends EndpointDisconnect).

**Errors.** :meth:`ForwardingTable.handle_datagram` never raises on network input: every
problem is a counted drop and an empty list. Local misuse (unknown association id, an
address already in use) raises :class:`ForwardingUsageError`; unusable ``MediaKeys`` (a peer,
the KMF, sent them) raise :class:`MediaKeysError`.

API
---
``ForwardingConfig(last_n=None, video_payload_types={96}, audio_payload_types={111},
hold_limit=64, max_associations=1024, max_ssrcs_per_association=32, last_n_idle=2.0,
last_n_switch_timeout=1.0, replay_window=128, pli_rate=2.0, nack_rate=1000.0, repair=True,
repair_cache_time=1.0, repair_cache_packets=512, repair_rate=500.0, frame_marking_id=4,
keyframe_wait=0.1)``.

``ForwardingTable(config=ForwardingConfig())`` (generic in the address type):

- ``add_link(association_id, address, now, *, inbound=(key, salt), outbound=(key, salt),
  name, group=None) -> Association`` (a cascade link, keyed; ``remove`` ends it);
  ``loop_reports`` (``(ssrc, owner, refused)``, drained by the caller).
- ``add(association_id, address, now) -> Association``; ``install_keys(media_keys, now) ->
  list[(address, bytes)]`` (held datagrams released); ``remove(association_id) -> bool``;
  ``expire_idle(now, timeout) -> list[UUID]``; ``tick(now)`` (last_n ranking upkeep);
  ``touch(association_id, now)`` (other traffic, e.g. DTLS, also counts as activity).
- ``handle_datagram(address, data, now) -> list[(address, bytes)]``;
  ``handle_from(association_id, data, now)`` (the same, looked up by id);
  ``handle_datagrams(address, [data, ...], now)`` (several from one address, in order).
- ``associations`` (dict by id, read only; ``Association.counters`` is an
  :class:`AssociationCounters`), ``association_for(address)``, ``stats`` (:class:`TableStats`),
  ``snapshot(now) -> ForwardingSnapshot`` (plain dicts; ``totals()``, ``log_lines()``; cheap,
  for periodic logging and on exit), ``video_ranking()`` (last_n ranking, most recent first).

``data`` is ``bytes``; every returned datagram is a new ``bytes`` object. Counters of what
was sent to a receiver are credited in bulk (one increment per incoming packet, not per
delivery); ``snapshot`` and ``Association.counters`` flush them, so readers see exact values.
"""

from __future__ import annotations

import bisect
import struct
import uuid
from collections import deque
from collections.abc import Callable, Hashable
from typing import Generic, TypeAlias, TypeVar

import attrs

from perc.repair import FeedPeriod, RepairCache
from perc.srtp.context import SrtpSession
from perc.srtp.errors import (
    AuthenticationError,
    ReplayError,
    SrtpDecodeError,
    SrtpError,
)
from perc.srtp.hop import HeaderChanges, Inbound, MediaDistributorHop
from perc.srtp.keys import GCM_SALT_LENGTH, SrtpProfile
from perc.wire.framemarking import FrameMarkingDecodeError, frame_marking_of_packet
from perc.wire.rtcp import (
    RR,
    SR,
    Bye,
    Fir,
    PayloadFeedback,
    Pli,
    ReceiverReport,
    RtcpDecodeError,
    RtpFeedback,
    SdesChunk,
    SenderReport,
    SourceDescription,
    parse_rtcp,
)
from perc.wire.rtcp import Nack as _Nack
from perc.wire.tunnel import MediaKeys

__all__ = [
    "Association",
    "AssociationCounters",
    "ForwardingConfig",
    "ForwardingError",
    "ForwardingSnapshot",
    "ForwardingTable",
    "ForwardingUsageError",
    "MediaKeysError",
    "TableStats",
]

AddrT = TypeVar("AddrT", bound=Hashable)

#: ``SrtpSession.protect_rtp`` / ``protect_rtcp`` of a receiver's outbound session, prebound.
_Protect: TypeAlias = Callable[[bytes], bytes]
#: ``SrtpStream.seal`` of one receiver's send stream of one SSRC: (seq, payload, header) -> ct.
_Seal: TypeAlias = Callable[[int, bytes, bytes], bytes]

_unpack_u32 = struct.Struct("!I").unpack_from
_U32 = struct.Struct("!I")


def _u32(value: int) -> bytes:
    return _U32.pack(value)


def _nacked(nack: _Nack) -> int:
    """How many packets a generic NACK asks for (RFC 4585 §6.2.1: PID plus the BLP bits)."""
    return sum(1 + bin(blp).count("1") for _, blp in nack.items)


def _serialize_sdes(chunks: tuple[SdesChunk, ...]) -> bytes:
    return SourceDescription(chunks).serialize()


_RTCP_HEADER = struct.Struct("!BBH")
#: Outbound sessions see every SSRC of the conference; the table bounds them itself
#: (max_associations x max_ssrcs_per_association), so the session's own bound is set wide.
_OUTBOUND_MAX_STREAMS = 1 << 20


#: How far a last_n feed's resume point may trail its newest packet (RTP SEQ units).
_RESUME_TRAIL = 0x4000


class ForwardingError(Exception):
    """Base of the forwarding core's errors."""


class ForwardingUsageError(ForwardingError, ValueError):
    """Local misuse: unknown association id, duplicate address or id, bad configuration."""


class MediaKeysError(ForwardingError):
    """``MediaKeys`` from the KMF that the MDD cannot use (wrong profile, lengths or an MKI)."""


@attrs.frozen
class ForwardingConfig:
    """Per-conference forwarding options (one source of defaults, STYLE 14)."""

    last_n: int | None = None
    """Forward video only from the N most recently active video streams (None: all)."""
    video_payload_types: frozenset[int] = frozenset({96})
    """RTP payload types that are video (subject to last_n)."""
    audio_payload_types: frozenset[int] = frozenset({111})
    """RTP payload types that are audio (always forwarded; counted as audio)."""
    hold_limit: int = 64
    """D5: SRTP/SRTCP datagrams held per association before its MediaKeys."""
    max_associations: int = 1024
    """Associations per conference."""
    max_ssrcs_per_association: int = 32
    """RTP SSRCs one association may send."""
    last_n_idle: float = 2.0
    """Seconds of silence after which a video stream leaves the last_n ranking."""
    last_n_switch_timeout: float = 1.0
    """Seconds to wait for a frame boundary (marker bit) before switching a stream anyway."""
    replay_window: int = 128
    """Inbound SRTP/SRTCP replay window (RFC 3711 §3.3.2: at least 64)."""
    pli_rate: float = 2.0
    """PLI and FIR one receiver may send toward one media sender, per second (D36: one per
    500 ms); more are dropped (``drop_feedback_throttled``)."""
    nack_rate: float = 1000.0
    """Packets one receiver may NACK toward one media sender, per second (a burst of one
    second's worth); NACKs beyond are dropped (``drop_feedback_throttled``)."""
    repair: bool = True
    """D36: keep recent packets per sending SSRC and answer NACKs from them."""
    repair_cache_time: float = 1.0
    """D36: seconds of packets kept per sending SSRC for repair."""
    repair_cache_packets: int = 512
    """D36: packets kept per sending SSRC for repair, at most."""
    repair_rate: float = 500.0
    """Packets per second the MDD retransmits to one receiver from its cache (a burst of one
    second's worth); beyond, counted (``retransmit_throttled``) and neither sent nor asked of
    the sender."""
    frame_marking_id: int | None = 4
    """D35: the RFC 9626 frame marking extension's one-byte id, used by last_n to start a
    feed at a key frame (None: ignore the extension, marker-bit rule only)."""
    keyframe_wait: float = 0.1
    """D35: seconds a last_n feed waits for a key frame before the MDD asks the sender for one
    (a PLI on the receiver's behalf)."""

    def __attrs_post_init__(self) -> None:
        if self.last_n is not None and self.last_n < 0:
            raise ForwardingUsageError(f"last_n must be >= 0 or None, got {self.last_n}")
        if self.hold_limit < 0 or self.max_associations < 1 or self.max_ssrcs_per_association < 1:
            raise ForwardingUsageError("hold_limit >= 0, max_associations and SSRC bound >= 1")
        if not 64 <= self.replay_window <= 0x8000:
            raise ForwardingUsageError("replay_window must be 64..32768")
        if not (self.pli_rate > 0 and self.nack_rate > 0):
            raise ForwardingUsageError("pli_rate and nack_rate must be > 0")
        if self.repair_cache_time <= 0 or self.repair_cache_packets < 1 or self.repair_rate <= 0:
            raise ForwardingUsageError("repair_cache_time, repair_cache_packets, repair_rate > 0")
        if self.frame_marking_id is not None and not 1 <= self.frame_marking_id <= 14:
            raise ForwardingUsageError("frame_marking_id must be 1..14 (one-byte form)")
        if self.keyframe_wait < 0:
            raise ForwardingUsageError("keyframe_wait must be >= 0")
        if self.last_n_idle <= 0 or self.last_n_switch_timeout < 0:
            raise ForwardingUsageError("last_n_idle > 0 and last_n_switch_timeout >= 0")
        for pt in (*self.video_payload_types, *self.audio_payload_types):
            if not 0 <= pt <= 127:
                raise ForwardingUsageError(f"payload type {pt} outside 0..127")


class AssociationCounters:
    """Per-association counters (STYLE 8: every drop counted, by reason).

    ``*_in`` count what the endpoint sent that authenticated; ``*_out`` what was sent to it.
    Drops are counted on the association whose datagram was dropped (for ``drop_last_n``:
    once per receiver that did not get the packet).
    """

    __slots__ = (
        "audio_in",
        "bytes_in",
        "bytes_out",
        "drop_auth",
        "drop_feedback_throttled",
        "drop_last_n",
        "drop_limit",
        "drop_loop",
        "drop_malformed",
        "drop_no_keys",
        "drop_queue_full",
        "drop_reorder",
        "drop_replay",
        "drop_rtcp_spoof",
        "drop_ssrc_conflict",
        "drop_unknown_ssrc",
        "held",
        "nack_answered",
        "nack_forwarded",
        "nack_received",
        "packets_in",
        "packets_out",
        "pli_originated",
        "pli_throttled",
        "received",
        "retransmit_throttled",
        "rtcp_in",
        "rtcp_out",
        "video_in",
    )

    def __init__(self) -> None:
        self.received = 0  #: datagrams received (before any check)
        self.packets_in = 0  #: authenticated SRTP + SRTCP packets accepted
        self.bytes_in = 0
        self.rtcp_in = 0  #: of which SRTCP
        self.audio_in = 0  #: RTP with an audio payload type
        self.video_in = 0  #: RTP with a video payload type
        self.packets_out = 0  #: datagrams produced for this endpoint (RTP + RTCP)
        self.bytes_out = 0
        self.rtcp_out = 0
        self.held = 0  #: datagrams held before the keys (D5), processed later
        self.drop_no_keys = 0  #: held datagrams discarded because the association ended
        self.drop_auth = 0  #: outer authentication failed
        self.drop_replay = 0  #: replayed or older than the replay window
        self.drop_malformed = 0  #: not SRTP/SRTCP, bad EKT framing, RTCP that does not parse
        self.drop_queue_full = 0  #: D5 hold queue full
        self.drop_last_n = 0  #: (receiver, packet) pairs not sent because of last_n
        self.drop_unknown_ssrc = 0  #: RTCP about an SSRC no other endpoint sends
        self.drop_ssrc_conflict = 0  #: RTP with an SSRC owned by another association
        self.drop_reorder = 0  #: late packet from before a last_n resume point
        self.drop_limit = 0  #: SSRC bound, key lifetime, or an index the session refused
        #: SR, SDES chunks and BYE SSRCs about an SSRC another association owns (removed)
        self.drop_rtcp_spoof = 0
        #: PLI/FIR/NACK over this receiver's rate toward one media sender (D36)
        self.drop_feedback_throttled = 0
        #: D36, on the receiver that sent them: packets its NACKs asked for, of them answered
        #: from the repair cache, turned toward the sender, and not answered for its rate
        self.nack_received = 0
        self.nack_answered = 0
        self.nack_forwarded = 0
        self.retransmit_throttled = 0
        #: D36: PLI/FIR from this receiver dropped by the throttle (also in the drop above)
        self.pli_throttled = 0
        #: D35: PLIs the MDD sent a video sender on this receiver's behalf (last_n feed start)
        self.pli_originated = 0
        #: RTP whose SSRC another direction owns, a link on either side (D26: a loop)
        self.drop_loop = 0

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.__slots__}


@attrs.define
class TableStats:
    """Conference-level counters (what cannot be charged to an association)."""

    unknown_source: int = 0
    """Datagrams from an address no association has."""
    associations_refused: int = 0
    """``add`` calls refused because the table was full."""
    keys_installed: int = 0
    removed: int = 0
    last_n_switches: int = 0
    """Feed switches (on or off) executed at a frame boundary or timeout."""


@attrs.frozen
class ForwardingSnapshot:
    """A copy of every counter, for periodic logging (cheap: no state is shared)."""

    now: float
    table: dict[str, int]
    associations: dict[uuid.UUID, dict[str, int]]

    def log_lines(self) -> list[str]:
        """One line per association: traffic, then the non-zero drop counters."""
        lines = []
        for aid, c in self.associations.items():
            drops = " ".join(f"{k[5:]}={v}" for k, v in c.items() if k.startswith("drop_") and v)
            lines.append(
                f"association={aid} in={c['packets_in']}/{c['bytes_in']}B "
                f"out={c['packets_out']}/{c['bytes_out']}B rtcp={c['rtcp_in']}/{c['rtcp_out']} "
                f"held={c['held']} drops: {drops or 'none'}"
            )
        return lines

    def totals(self) -> dict[str, int]:
        """Every association counter summed over the conference."""
        out: dict[str, int] = {}
        for counters in self.associations.values():
            for k, v in counters.items():
                out[k] = out.get(k, 0) + v
        return out


class Association(Generic[AddrT]):
    """One endpoint of the conference: address, keys, counters, routes."""

    __slots__ = (
        "_counters",
        "_fan_bytes",
        "_fan_packets",
        "_fanout",
        "_feedback",
        "_flush",
        "_hop",
        "_in_session",
        "_links_out",
        "_max_ssrcs",
        "_out_session",
        "_protect_rtcp",
        "_protect_rtp",
        "_repair",
        "_route_counters",
        "_routes",
        "_rtcp_routes",
        "_rtx",
        "_seq",
        "address",
        "association_id",
        "created",
        "dtls_in",
        "dtls_out",
        "group",
        "held",
        "last_seen",
        "link",
        "media_keys",
        "reported",
        "ssrcs",
    )

    def __init__(
        self,
        association_id: uuid.UUID,
        address: AddrT,
        now: float,
        flush: Callable[[], None] = lambda: None,
        seq: int = 0,
    ) -> None:
        self.association_id = association_id
        #: ``add`` order: the order of every route list
        self._seq = seq
        self.address = address
        self.created = now
        self.last_seen = now
        self._counters = AssociationCounters()
        self._flush = flush
        #: RTP packets (and their bytes) sent to every entry of ``_routes`` since the last
        #: flush: the receivers' packets_out/bytes_out are credited from these in bulk.
        self._fan_packets = 0
        self._fan_bytes = 0
        #: per RTP SSRC it sends: the ``_routes`` it was made for, and (address, seal) of each
        #: receiver's send stream of that SSRC (see ``ForwardingTable._process``)
        self._fanout: dict[int, tuple[list[tuple[AddrT, _Protect]], list[tuple[AddrT, _Seal]]]] = {}
        #: D5: datagrams received before the keys, in order
        self.held: list[bytes] = []
        #: RTP SSRCs this association sends (it owns them in the table)
        self.ssrcs: set[int] = set()
        #: The ``MediaKeys`` its sessions were made from (None before keys and once removed)
        self.media_keys: MediaKeys | None = None
        #: DTLS datagrams relayed from and to the endpoint (counted by the MDD engine)
        self.dtls_in = 0
        self.dtls_out = 0
        #: The counters last reported for it (the MDD engine reports only changes)
        self.reported: dict[str, int] | None = None
        self._hop: MediaDistributorHop | None = None
        self._in_session: SrtpSession | None = None
        self._out_session: SrtpSession | None = None
        self._protect_rtp: _Protect | None = None
        self._protect_rtcp: _Protect | None = None
        #: (address, protect_rtp) of every other keyed association, and their counters
        self._routes: list[tuple[AddrT, _Protect]] = []
        self._route_counters: list[AssociationCounters] = []
        #: every other keyed association (RTCP destinations)
        self._rtcp_routes: list[Association[AddrT]] = []
        #: feedback throttle per (media sender's id, is NACK): [tokens, when last updated]
        self._feedback: dict[tuple[uuid.UUID, bool], list[float]] = {}
        #: D36: repair cache per RTP SSRC it sends
        self._repair: dict[int, RepairCache] = {}
        #: D36: retransmissions to it: [tokens, when last updated] (empty: full)
        self._rtx: list[float] = []
        #: D25/D26: the link's name when this is a cascade link to another MDD (None: an
        #: endpoint); ``group``: its split-horizon group (media from a link never goes to a
        #: link of the same group; None: a group of its own)
        self.link: str | None = None
        self.group: str | None = None
        #: RTP SSRCs it may send (a link carries every remote SSRC)
        self._max_ssrcs = 0
        #: the links among its routes (for the last_n path: links carry every stream)
        self._links_out: list[Association[AddrT]] = []

    @property
    def counters(self) -> AssociationCounters:
        """This association's counters, up to date (pending fan-out credits flushed)."""
        self._flush()
        return self._counters

    @property
    def has_keys(self) -> bool:
        return self._hop is not None

    @property
    def outbound_session(self) -> SrtpSession | None:
        """The session that encrypts what we send to this endpoint (None before keys)."""
        return self._out_session

    def __repr__(self) -> str:
        return (
            f"<Association {self.association_id} {self.address!r} "
            f"keys={self.has_keys} ssrcs={len(self.ssrcs)}>"
        )


class _Feed(Generic[AddrT]):
    """One (receiver, video SSRC) pair under last_n: switching state and SEQ offset."""

    __slots__ = (
        "address",
        "asked",
        "counters",
        "ever_on",
        "last_out",
        "offset",
        "on",
        "pending",
        "periods",
        "receiver",
        "seal",
        "session",
        "since",
        "start_seq",
        "want",
    )

    def __init__(self, receiver: Association[AddrT], session: SrtpSession) -> None:
        self.receiver = receiver
        self.session = session
        #: the receiver's send stream of this SSRC (made at the first packet sent)
        self.seal: _Seal | None = None
        self.address = receiver.address
        self.counters = receiver._counters
        self.on = False  # packets are being sent to the receiver
        self.want = False  # the ranking says they should be
        self.since = -1.0  # when ``want`` last changed (< 0: at the next packet)
        self.asked = False  # D35: a PLI was sent for the key frame this start waits for
        self.pending = False  # D36: the current on-period has no repair record yet
        #: D36: its last on-periods, for repair (perc.repair.FeedPeriod); None until one
        self.periods: deque[FeedPeriod] | None = None
        self.ever_on = False
        self.offset = 0  # out_seq = in_seq - offset (mod 2^16)
        self.start_seq = 0  # in_seq of the first packet of the current on period
        self.last_out = 0  # highest out_seq sent (valid once ever_on)


class _VideoStream(Generic[AddrT]):
    """One video SSRC under last_n: activity, frame boundary, and its feeds."""

    __slots__ = ("feeds", "last_seen", "marks", "owner", "prev_marker", "ranked", "ssrc")

    def __init__(self, ssrc: int, owner: Association[AddrT], now: float) -> None:
        self.ssrc = ssrc
        self.owner = owner
        self.last_seen = now
        self.ranked = False
        self.prev_marker = True  # the first packet seen counts as a frame start
        self.marks = False  # D35: it carries RFC 9626 frame marking
        self.feeds: dict[uuid.UUID, _Feed[AddrT]] = {}


Output = list[tuple[AddrT, bytes]]


def _seq_of(a: Association[AddrT]) -> int:
    return a._seq


def _count_srtp_drop(c: AssociationCounters, exc: SrtpError) -> None:
    """Count an inbound SRTP/SRTCP packet the hop-by-hop layer refused, by reason."""
    if isinstance(exc, AuthenticationError):
        c.drop_auth += 1
    elif isinstance(exc, ReplayError):
        c.drop_replay += 1
    elif isinstance(exc, SrtpDecodeError):
        c.drop_malformed += 1
    else:  # key lifetime, SSRC bound of the inbound session
        c.drop_limit += 1


class ForwardingTable(Generic[AddrT]):
    """One conference: associations, keys, routes, last_n state and counters."""

    def __init__(self, config: ForwardingConfig | None = None) -> None:
        self.config = config or ForwardingConfig()
        self.stats = TableStats()
        self._by_id: dict[uuid.UUID, Association[AddrT]] = {}
        self._by_address: dict[AddrT, Association[AddrT]] = {}
        #: keyed associations in ``add`` order (every route list is this minus its sender)
        self._keyed: list[Association[AddrT]] = []
        self._next_seq = 0
        self._ssrc_owner: dict[int, Association[AddrT]] = {}
        self._video_pts = frozenset(self.config.video_payload_types)
        self._audio_pts = frozenset(self.config.audio_payload_types)
        self._last_n = self.config.last_n
        self._video: dict[int, _VideoStream[AddrT]] = {}
        self._rank: list[_VideoStream[AddrT]] = []
        self._pruned_at = float("-inf")
        self._prune_every = self.config.last_n_idle / 8
        self._repair_on = self.config.repair
        #: D26 loops: (ssrc, owner, refused sender), once per SSRC; the MDD engine drains it
        self.loop_reports: list[tuple[int, Association[AddrT], Association[AddrT]]] = []
        self._loops_seen: set[int] = set()
        #: keyed links with a split-horizon group (their route lists are rebuilt, not patched)
        self._grouped: list[Association[AddrT]] = []

    # --- membership -----------------------------------------------------------------------------

    @property
    def associations(self) -> dict[uuid.UUID, Association[AddrT]]:
        """Every association by id (do not modify)."""
        return self._by_id

    def association_for(self, address: AddrT) -> Association[AddrT] | None:
        return self._by_address.get(address)

    def add(self, association_id: uuid.UUID, address: AddrT, now: float) -> Association[AddrT]:
        """A new endpoint association (the shell saw its first datagram)."""
        if association_id in self._by_id:
            raise ForwardingUsageError(f"association {association_id} already exists")
        if address in self._by_address:
            raise ForwardingUsageError(f"address {address!r} already has an association")
        if len(self._by_id) >= self.config.max_associations:
            self.stats.associations_refused += 1
            raise ForwardingUsageError(
                f"conference full ({self.config.max_associations} associations)"
            )
        assoc: Association[AddrT] = Association(
            association_id, address, now, self.flush, self._next_seq
        )
        self._next_seq += 1
        assoc._max_ssrcs = self.config.max_ssrcs_per_association
        self._by_id[association_id] = assoc
        self._by_address[address] = assoc
        return assoc

    def add_link(
        self,
        association_id: uuid.UUID,
        address: AddrT,
        now: float,
        *,
        inbound: tuple[bytes, bytes],
        outbound: tuple[bytes, bytes],
        name: str,
        group: str | None = None,
    ) -> Association[AddrT]:
        """A keyed cascade link to another MDD (D25), as one more member of the table.

        ``inbound``/``outbound``: (master key, master salt) of the link's single AES-GCM
        layer for what the peer sends us and what we send it (from the link's DTLS exporter).
        Forwarding (D26): what arrives over it goes to every other member (split horizon:
        never back; never to a link of the same ``group``), what a local endpoint sends goes
        over it, RTCP feedback about an SSRC it brought goes to it. Removed with
        :meth:`remove` (its SSRCs are then free again)."""
        for key, salt in (inbound, outbound):
            if len(key) not in (16, 32) or len(salt) != GCM_SALT_LENGTH:
                raise ForwardingUsageError("link keys are 16 or 32 bytes, salts 12")
        if inbound[0] == outbound[0]:
            raise ForwardingUsageError("link inbound and outbound keys are equal (RFC 8723 §9)")
        assoc = self.add(association_id, address, now)
        assoc.link = name
        assoc.group = group
        # A link carries every remote SSRC of the conference.
        assoc._max_ssrcs = self.config.max_associations * self.config.max_ssrcs_per_association
        window = self.config.replay_window
        assoc._in_session = SrtpSession(
            inbound[0], inbound[1], replay_window=window, max_streams=_OUTBOUND_MAX_STREAMS
        )
        out = assoc._out_session = SrtpSession(
            outbound[0], outbound[1], max_streams=_OUTBOUND_MAX_STREAMS
        )
        assoc._hop = MediaDistributorHop(assoc._in_session, expect_ekt=True)
        assoc._protect_rtp = out.protect_rtp
        assoc._protect_rtcp = out.protect_rtcp
        self.stats.keys_installed += 1
        self._join_routes(assoc)
        return assoc

    def install_keys(self, keys: MediaKeys, now: float) -> Output[AddrT]:
        """Install an association's hop-by-hop keys; returns the released D5 output."""
        assoc = self._by_id.get(keys.association_id)
        if assoc is None:
            raise ForwardingUsageError(f"no association {keys.association_id}")
        inbound, outbound = self._sessions(keys)
        replacing = assoc._protect_rtp is not None
        assoc._in_session = inbound
        assoc._out_session = outbound
        assoc._hop = MediaDistributorHop(inbound, expect_ekt=True)
        assoc._protect_rtp = outbound.protect_rtp
        assoc._protect_rtcp = outbound.protect_rtcp
        assoc.media_keys = keys
        self.stats.keys_installed += 1
        if replacing:
            self._replace_routes(assoc)
        else:
            self._join_routes(assoc)
        if self._last_n is not None:
            self._join_feeds(assoc)
        # D5 release: processed in arrival order, not counted again in ``received``.
        held, assoc.held = assoc.held, []
        out: Output[AddrT] = []
        for data in held:
            out += self._process(assoc, data, now)
        return out

    def _sessions(self, keys: MediaKeys) -> tuple[SrtpSession, SrtpSession]:
        try:
            profile = SrtpProfile(keys.protection_profile)
        except ValueError:
            raise MediaKeysError(f"unknown profile 0x{keys.protection_profile:04X}") from None
        if not profile.is_double:
            raise MediaKeysError(f"{profile.name} is not a DOUBLE profile (D18)")
        klen = profile.half_key_length
        if keys.mki:
            raise MediaKeysError("MediaKeys with an MKI (EKT forbids MKI, D4)")
        for name, value, want in (
            ("client_write key", keys.client_write_master_key, klen),
            ("server_write key", keys.server_write_master_key, klen),
            ("client_write salt", keys.client_write_master_salt, GCM_SALT_LENGTH),
            ("server_write salt", keys.server_write_master_salt, GCM_SALT_LENGTH),
        ):
            if len(value) != want:
                raise MediaKeysError(
                    f"{name} of {len(value)} bytes, {profile.name} needs {want} (D4)"
                )
        if keys.client_write_master_key == keys.server_write_master_key:
            # RFC 8723 §5.2, §9: decrypt and re-encrypt keys must be independent.
            raise MediaKeysError("client_write and server_write keys are equal")
        window = self.config.replay_window
        inbound = SrtpSession(
            keys.client_write_master_key,
            keys.client_write_master_salt,
            replay_window=window,
            max_streams=self.config.max_ssrcs_per_association,
        )
        outbound = SrtpSession(
            keys.server_write_master_key,
            keys.server_write_master_salt,
            max_streams=_OUTBOUND_MAX_STREAMS,
        )
        return inbound, outbound

    def remove(self, association_id: uuid.UUID) -> bool:
        """Drop an association, its keys, SSRCs and feeds (EndpointDisconnect, D3)."""
        if association_id not in self._by_id:
            return False
        assoc = self._by_id.pop(association_id)
        del self._by_address[assoc.address]
        assoc._counters.drop_no_keys += len(assoc.held)
        assoc.held = []
        if assoc._protect_rtp is not None:
            self._leave_routes(assoc)
        reranked = False
        for ssrc in assoc.ssrcs:
            if self._ssrc_owner.get(ssrc) is assoc:
                del self._ssrc_owner[ssrc]
            vs = self._video.pop(ssrc, None)
            if vs is not None and vs.ranked:
                self._rank.remove(vs)
                reranked = True
        for vs in self._video.values():
            vs.feeds.pop(association_id, None)
        if reranked:
            # The streams behind the leaver's move up; with an unchanged ranking every other
            # feed's ``want`` is unchanged (it depends on the ranking only).
            self._rerank(-1.0)
        assoc._repair = {}
        assoc._hop = None
        assoc._in_session = assoc._out_session = None
        assoc._protect_rtp = assoc._protect_rtcp = None
        assoc.media_keys = None
        self.stats.removed += 1
        return True

    def expire_idle(self, now: float, timeout: float) -> list[uuid.UUID]:
        """Remove associations silent for more than ``timeout`` (D3); returns their ids."""
        gone = [
            a.association_id
            for a in self._by_id.values()
            if now - a.last_seen > timeout and a.link is None  # links: their own liveness
        ]
        for aid in gone:
            self.remove(aid)
        return gone

    def touch(self, association_id: uuid.UUID, now: float) -> None:
        """Non-media traffic (DTLS) from the endpoint also keeps it alive."""
        assoc = self._by_id.get(association_id)
        if assoc is not None:
            assoc.last_seen = now

    def tick(self, now: float) -> None:
        """Periodic upkeep (call every few hundred ms): last_n ranking of silent streams."""
        if self._last_n is not None:
            self._prune(now)

    def _join_routes(self, r: Association[AddrT]) -> None:
        """First keys of ``r``: insert it into every keyed member's routes, build its own. O(k)."""
        keyed = self._keyed
        p = bisect.bisect_left(keyed, r._seq, key=_seq_of)
        entry = (r.address, r._protect_rtp)
        rc = r._counters
        for g in self._grouped:
            self._flush_one(g)  # its routes are rebuilt below
        for i, s in enumerate(keyed):
            if s.group is not None:
                continue  # rebuilt below
            j = p - 1 if i < p else p  # r's index in s's list (s is not in its own list)
            s._routes.insert(j, entry)  # type: ignore[arg-type]  # keyed: protect is set
            s._route_counters.insert(j, rc)
            s._rtcp_routes.insert(j, r)
            if s._fan_packets:
                # s's pending credit (see flush) predates r's arrival: debit it in advance.
                rc.packets_out -= s._fan_packets
                rc.bytes_out -= s._fan_bytes
        keyed.insert(p, r)
        if r.group is not None:
            self._grouped.append(r)
        else:
            others = keyed[:p] + keyed[p + 1 :]
            r._rtcp_routes = others
            r._routes = [(b.address, b._protect_rtp) for b in others]  # type: ignore[misc]
            r._route_counters = [b._counters for b in others]
        self._links_changed(r)

    def _replace_routes(self, r: Association[AddrT]) -> None:
        """New keys for keyed ``r``: swap its protect in every member's routes. O(k)."""
        keyed = self._keyed
        p = self._keyed_index(r)
        entry = (r.address, r._protect_rtp)
        for i, s in enumerate(keyed):
            if i != p and s.group is None:
                s._routes[p - 1 if i < p else p] = entry  # type: ignore[assignment]
        for g in self._grouped:
            self._flush_one(g)
        self._links_changed(r)

    def _leave_routes(self, r: Association[AddrT]) -> None:
        """Keyed ``r`` leaves: delete it from every member's routes. O(k)."""
        self._flush_one(r)  # credit r's pending fan-out while its routes still exist
        for g in self._grouped:
            self._flush_one(g)  # its routes are rebuilt below
        if r.group is not None:
            self._grouped.remove(r)
        keyed = self._keyed
        p = self._keyed_index(r)
        del keyed[p]
        rc = r._counters
        for i, s in enumerate(keyed):
            if s.group is not None:
                continue  # rebuilt below
            j = p - 1 if i < p else p
            del s._routes[j]
            del s._route_counters[j]
            del s._rtcp_routes[j]
            if s._fan_packets:
                # s's pending credit includes r: credit r now, flush will not reach it.
                rc.packets_out += s._fan_packets
                rc.bytes_out += s._fan_bytes
        r._routes = []
        r._route_counters = []
        r._rtcp_routes = []
        r._links_out = []
        self._links_changed(r)

    def _links_changed(self, r: Association[AddrT]) -> None:
        """After ``r`` joined, left or was rekeyed: rebuild the route lists of the grouped links
        (D27: a link's list leaves out its own group; links are few, so O(k) each) and the
        ``_links_out`` lists (every member's links, for the last_n path)."""
        keyed = self._keyed
        for g in self._grouped:
            if g._protect_rtp is None:
                continue
            others = [b for b in keyed if b is not g and b.group != g.group]
            g._rtcp_routes = others
            g._routes = [(b.address, b._protect_rtp) for b in others]  # type: ignore[misc]
            g._route_counters = [b._counters for b in others]
        if r.link is not None:
            links = [b for b in keyed if b.link is not None]
            for s in keyed:
                s._links_out = [
                    b for b in links if b is not s and (s.group is None or b.group != s.group)
                ]
        elif r._protect_rtp is not None and r in keyed:
            r._links_out = [b for b in keyed if b.link is not None]

    def _keyed_index(self, r: Association[AddrT]) -> int:
        keyed = self._keyed
        p = bisect.bisect_left(keyed, r._seq, key=_seq_of)
        if p == len(keyed) or keyed[p] is not r:  # pragma: no cover - table invariant
            raise ForwardingError(f"association {r.association_id} missing from the routes")
        return p

    def _join_feeds(self, r: Association[AddrT]) -> None:
        """last_n: (re)make the feeds of receiver ``r`` (fresh outbound session) in every
        video stream it does not send; the others' feeds are unchanged."""
        session = r._out_session
        if session is None:  # pragma: no cover - called after keys are set
            return
        aid = r.association_id
        for vs in self._video.values():
            vs.feeds.pop(aid, None)
            if vs.owner is not r:
                feed = vs.feeds[aid] = _Feed(r, session)
                # A new feed starts unwanted; ``since`` stays -1, so the switch timeout
                # starts at the stream's next packet (as after a membership rerank).
                feed.want = self._wants(vs, aid)

    # --- datagrams ------------------------------------------------------------------------------

    def handle_datagram(self, address: AddrT, data: bytes, now: float) -> Output[AddrT]:
        """One SRTP/SRTCP datagram from ``address``: the datagrams to send (never raises)."""
        assoc = self._by_address.get(address)
        if assoc is None:
            self.stats.unknown_source += 1
            return []
        assoc._counters.received += 1
        assoc.last_seen = now
        return self._process(assoc, data, now)

    def handle_datagrams(self, address: AddrT, datagrams: list[bytes], now: float) -> Output[AddrT]:
        """:meth:`handle_datagram` for several datagrams from ``address``, in order."""
        assoc = self._by_address.get(address)
        if assoc is None:
            self.stats.unknown_source += len(datagrams)
            return []
        assoc._counters.received += len(datagrams)
        assoc.last_seen = now
        process = self._process
        out: Output[AddrT] = []
        for data in datagrams:
            part = process(assoc, data, now)
            if part:
                out += part
        return out

    def handle_from(self, association_id: uuid.UUID, data: bytes, now: float) -> Output[AddrT]:
        """:meth:`handle_datagram` for a datagram the shell already matched to its association."""
        assoc = self._by_id.get(association_id)
        if assoc is None:
            self.stats.unknown_source += 1
            return []
        assoc._counters.received += 1
        assoc.last_seen = now
        return self._process(assoc, data, now)

    def _process(self, assoc: Association[AddrT], data: bytes, now: float) -> Output[AddrT]:
        """One datagram already counted in ``received`` (arrival) or released from the hold."""
        c = assoc._counters
        hop = assoc._hop
        n = len(data)
        if n < 12 or data[0] & 0xC0 != 0x80:
            c.drop_malformed += 1
            return []
        if hop is None:
            # D5: hold until MediaKeys, bounded.
            if len(assoc.held) >= self.config.hold_limit:
                c.drop_queue_full += 1
            else:
                assoc.held.append(bytes(data))
                c.held += 1
            return []
        if 192 <= data[1] <= 223:  # RFC 5761 §4: RTCP packet types 192-223
            return self._rtcp(assoc, data, now)
        try:
            inbound = hop.decrypt(data)
        except SrtpError as exc:
            _count_srtp_drop(c, exc)
            return []
        ssrc = inbound.ssrc
        if ssrc not in assoc.ssrcs and not self._claim(assoc, ssrc):
            return []
        c.packets_in += 1
        c.bytes_in += n
        header = inbound.header
        pt = header[1] & 0x7F
        if pt in self._video_pts:
            c.video_in += 1
            if self._last_n is not None:
                return self._video_rtp(assoc, inbound, ssrc, now)
        else:
            if pt in self._audio_pts:
                c.audio_in += 1
            if ssrc in self._video:
                # A last_n video SSRC with any other PT stays on its feeds: their SEQ offsets
                # must apply to every packet of the SSRC (RFC 7714 §8.4).
                return self._video_rtp(assoc, inbound, ssrc, now)
        # The hot path: the parts decrypt found (one header parse) go to every receiver's send
        # stream of this SSRC, kept at hand per SSRC as long as the routes are unchanged; one
        # seal per receiver, EKT field re-appended (D11); receivers' packets_out/bytes_out are
        # credited in bulk (see flush).
        fan = assoc._fanout.get(ssrc)
        if fan is None or fan[0] != assoc._routes:
            fan = self._make_fanout(assoc, ssrc, inbound.seq)
            if fan is None:
                return self._fan_out_slowly(assoc, inbound, n)
        payload = inbound.payload
        seq = inbound.seq
        ekt = inbound.ekt_field
        assoc._fan_packets += 1
        assoc._fan_bytes += n
        try:
            out = [(address, header + seal(seq, payload, header) + ekt) for address, seal in fan[1]]
        except SrtpError:
            # A receiver's stream refused (index space exhausted, or an index it was already
            # sent): redo one by one. Receivers already served refuse the index now and lose
            # this packet.
            return self._fan_out_slowly(assoc, inbound, n, credited=True)
        if self._repair_on and pt in self._video_pts:
            # D36: every receiver got this video packet; keep it for repair (see perc.repair).
            cache = assoc._repair.get(ssrc)
            if cache is None or cache.fan is not fan:
                cache = self._repair_epoch(
                    assoc, ssrc, fan, seq, now, header=header, payload=payload, ekt=ekt
                )
            else:
                cache.add(seq, now, header, payload, ekt)
        return out

    def _repair_epoch(
        self,
        assoc: Association[AddrT],
        ssrc: int,
        fan: object,
        seq: int,
        now: float,
        *,
        header: bytes,
        payload: bytes,
        ekt: bytes,
    ) -> RepairCache:
        """A new repair epoch for ``ssrc`` starting with the packet just sealed for every
        receiver of ``fan``: each receiver's index offset from its send stream (O(routes), at
        a fan-out change only)."""
        cfg = self.config
        old = assoc._repair.get(ssrc)
        if old is not None:
            old.end()
        cache = assoc._repair[ssrc] = RepairCache(
            cfg.repair_cache_packets, cfg.repair_cache_time, fan, seq
        )
        cache.add(seq, now, header, payload, ekt)
        cache.start(
            [
                (r.association_id, r._out_session.send_stream(ssrc, seq))  # type: ignore[union-attr]
                for r in assoc._rtcp_routes
            ]
        )
        return cache

    @staticmethod
    def _make_fanout(
        assoc: Association[AddrT], ssrc: int, seq: int
    ) -> tuple[list[tuple[AddrT, _Protect]], list[tuple[AddrT, _Seal]]] | None:
        """Every receiver's send stream of ``ssrc`` (made now if new, starting at ``seq``), in
        route order, for the routes as they are; None if a receiver's session refuses one."""
        try:
            seals = [
                (r.address, r._out_session.send_stream(ssrc, seq).seal)  # type: ignore[union-attr]
                for r in assoc._rtcp_routes
            ]
        except SrtpError:
            return None
        fan = (list(assoc._routes), seals)
        assoc._fanout[ssrc] = fan
        return fan

    def _fan_out_slowly(
        self, assoc: Association[AddrT], inbound: Inbound, n: int, *, credited: bool = False
    ) -> Output[AddrT]:
        """The fan-out one receiver at a time, counting each refusal (``drop_limit``)."""
        cache = assoc._repair.get(inbound.ssrc)
        if cache is not None:
            cache.end()  # D36: a receiver's stream moved apart from the cache (perc.repair)
        out: Output[AddrT] = []
        hop = assoc._hop
        if hop is None:  # pragma: no cover - decrypt succeeded, so the keys are there
            return out
        for r, rc in zip(assoc._rtcp_routes, assoc._route_counters, strict=True):
            try:
                out.append((r.address, hop.encrypt_for(r._out_session, inbound)))  # type: ignore[arg-type]
            except SrtpError:
                assoc._counters.drop_limit += 1
                if credited:
                    rc.packets_out -= 1  # the bulk credit (see flush) counted it
                    rc.bytes_out -= n
                continue
            if not credited:
                rc.packets_out += 1
                rc.bytes_out += n
        return out

    def _claim(self, assoc: Association[AddrT], ssrc: int) -> bool:
        """First authenticated RTP of ``ssrc`` from ``assoc``: take ownership if free."""
        owner = self._ssrc_owner.get(ssrc)
        if owner is not None and owner is not assoc:
            if owner.link is None and assoc.link is None:
                assoc._counters.drop_ssrc_conflict += 1
            else:
                # D26: one SSRC from two directions (a loop, or a link bringing an SSRC a
                # local endpoint owns): the first direction keeps it.
                assoc._counters.drop_loop += 1
                if ssrc not in self._loops_seen:
                    if len(self._loops_seen) >= 4096:
                        self._loops_seen.clear()
                    self._loops_seen.add(ssrc)
                    self.loop_reports.append((ssrc, owner, assoc))
            return False
        if len(assoc.ssrcs) >= assoc._max_ssrcs:
            assoc._counters.drop_limit += 1
            return False
        assoc.ssrcs.add(ssrc)
        self._ssrc_owner[ssrc] = assoc
        return True

    # --- last_n ---------------------------------------------------------------------------------

    def video_ranking(self) -> list[int]:
        """The last_n ranking: video SSRCs by latest activity start, most recent first."""
        return [vs.ssrc for vs in self._rank]

    def _sync_feeds(self, vs: _VideoStream[AddrT]) -> None:
        """Make ``vs.feeds`` match the current keyed receivers (state of survivors kept)."""
        # Links carry every stream (D26): they get no feed, see _to_links.
        receivers = {a.association_id: a for a in vs.owner._rtcp_routes if a.link is None}
        for aid in [aid for aid in vs.feeds if aid not in receivers]:
            del vs.feeds[aid]
        for aid, a in receivers.items():
            if aid not in vs.feeds and a._out_session is not None:
                vs.feeds[aid] = _Feed(a, a._out_session)

    def _prune(self, now: float) -> None:
        self._pruned_at = now
        idle = self.config.last_n_idle
        stale = [vs for vs in self._rank if now - vs.last_seen > idle]
        if stale:
            for vs in stale:
                vs.ranked = False
                self._rank.remove(vs)
            self._rerank(now)

    def _rerank(self, now: float) -> None:
        """Recompute every feed's ``want`` from the ranking (only when the ranking changed).

        ``now < 0``: the time is not known here (membership change); the switch timeout
        then starts at the stream's next packet."""
        if self._last_n is None:
            return
        for vs in self._video.values():
            for aid, feed in vs.feeds.items():
                want = self._wants(vs, aid)
                if want != feed.want:
                    feed.want = want
                    feed.since = now
                    feed.asked = False

    def _wants(self, vs: _VideoStream[AddrT], aid: uuid.UUID) -> bool:
        """Is ``vs`` among the first last_n ranked streams not sent by receiver ``aid``?"""
        limit = self._last_n
        if limit is None or not vs.ranked:
            return False
        taken = 0
        for other in self._rank:
            if other.owner.association_id == aid:
                continue  # a receiver never gets its own video
            if taken >= limit:
                return False
            if other is vs:
                return True
            taken += 1
        return False  # pragma: no cover - a ranked stream is in the ranking

    def _video_rtp(
        self, assoc: Association[AddrT], inbound: Inbound, ssrc: int, now: float
    ) -> Output[AddrT]:
        """A video packet under last_n: ranking, frame-boundary switching, SEQ renumbering."""
        c = assoc._counters
        vs = self._video.get(ssrc)
        fresh = vs is None
        if vs is None:
            vs = self._video[ssrc] = _VideoStream(ssrc, assoc, now)
            self._sync_feeds(vs)
        elif now - vs.last_seen > self.config.last_n_idle and vs.ranked:
            # Silent past the idle limit but not pruned yet: this is a new activity start.
            vs.ranked = False
            self._rank.remove(vs)
        vs.last_seen = now
        if not vs.ranked:
            vs.ranked = True
            self._rank.insert(0, vs)  # activity start: the most recently active stream
            self._rerank(now)
        elif now - self._pruned_at >= self._prune_every:
            self._prune(now)
        header = inbound.header
        payload = inbound.payload
        seq = inbound.seq
        marker = bool(header[1] & 0x80)
        frame_start = vs.prev_marker
        vs.prev_marker = marker
        timeout = self.config.last_n_switch_timeout
        # D26: last_n is the receiving MDD's choice; links get every packet, unchanged.
        out: Output[AddrT] = self._to_links(assoc, inbound) if assoc._links_out else []
        hop = assoc._hop
        if hop is None:  # pragma: no cover - decrypt succeeded, so the keys are there
            return out
        rewrite = hop.rewrite
        ekt = inbound.ekt_field
        ext = -1  # D36: this packet's index in the stream's repair cache (-1: none)
        cache: RepairCache | None = None
        if self._repair_on:
            cache = assoc._repair.get(ssrc)
            if cache is None or cache.fan is not vs:
                if cache is not None:
                    cache.end()
                cfg = self.config
                cache = assoc._repair[ssrc] = RepairCache(
                    cfg.repair_cache_packets, cfg.repair_cache_time, vs, seq
                )
            ext = cache.add(seq, now, header, payload, ekt)
        changes: HeaderChanges | None = None  # the SEQ change of head and body below
        head = body = b""
        key = -1  # D35: 2 starts a key frame, 1 another frame, 0 neither; -1 not looked at
        for feed in vs.feeds.values():
            send = feed.on
            if send != feed.want:
                if feed.since < 0:
                    feed.since = now
                late = now - feed.since >= timeout
                if feed.want:
                    if key < 0:
                        key = self._frame_mark(vs, header)
                    if vs.marks:
                        # D35: start at a key frame; only when late at any frame start.
                        start = key == 2 or (late and (key == 1 or frame_start))
                    else:
                        start = frame_start or late  # start with a frame start
                    if start:
                        self._start_feed(feed, seq)
                        send = True
                        if key != 2 and not fresh:
                            self._ask_keyframe(feed.receiver, vs, now, out)
                    elif (
                        vs.marks
                        and not feed.asked
                        and now - feed.since >= self.config.keyframe_wait
                    ):
                        feed.asked = True
                        self._ask_keyframe(feed.receiver, vs, now, out)
                elif marker or late:
                    # Stop after the frame end: the packet with the marker is still sent;
                    # with no boundary in sight (late), stop before this packet.
                    feed.on = False
                    self.stats.last_n_switches += 1
                    send = marker
            if not send:
                c.drop_last_n += 1
                continue
            ahead = (seq - feed.start_seq) & 0xFFFF
            if ahead & 0x8000:
                c.drop_reorder += 1  # from before this feed's resume point (RFC 7714 §8.4)
                continue
            if ahead >= _RESUME_TRAIL:
                # A feed that stays on: the resume point trails the newest packet by at most
                # a quarter of the SEQ space, so "before it" never comes to mean "everything"
                # after 2^15 packets; older packets are far outside any replay window anyway.
                feed.start_seq = (seq - _RESUME_TRAIL) & 0xFFFF
            out_seq = (seq - feed.offset) & 0xFFFF
            try:
                # hop.encrypt_for(feed.session, inbound, changes) on the feed's own stream.
                seal = feed.seal
                if seal is None:
                    seal = feed.seal = feed.session.send_stream(ssrc, out_seq).seal
                if out_seq == seq:
                    data = header + seal(seq, payload, header) + ekt
                else:
                    if changes is None or changes.sequence_number != out_seq:
                        # Feeds that resumed together share an offset, so this packet is
                        # rewritten once for all of them (the OHB updated, RFC 8723 §5.2);
                        # ``changes`` names head and body only once the rewrite succeeded.
                        wanted = HeaderChanges(sequence_number=out_seq)
                        head, body = rewrite(inbound, wanted)
                        changes = wanted
                    data = head + seal(out_seq, body, head) + ekt
            except SrtpDecodeError:  # the OHB does not parse (HopDecodeError)
                c.drop_malformed += 1
                continue
            except SrtpError:
                c.drop_limit += 1
                if feed.periods:
                    feed.periods[-1].valid = False  # D36: no repair from this period
                continue
            if feed.pending and ext >= 0 and cache is not None:
                self._open_period(feed, cache, ssrc, seq=seq, out_seq=out_seq, ext=ext)
            if (out_seq - feed.last_out) & 0xFFFF < 0x8000:
                feed.last_out = out_seq
            rc = feed.counters
            rc.packets_out += 1
            rc.bytes_out += len(data)
            out.append((feed.address, data))
        return out

    @staticmethod
    def _open_period(
        feed: _Feed[AddrT], cache: RepairCache, ssrc: int, *, seq: int, out_seq: int, ext: int
    ) -> None:
        """D36: the feed's first packet of an on-period was sealed: record how its receiver's
        indexes map to the cache's (perc.repair.FeedPeriod), if this packet became its
        stream's highest index (otherwise the period is not answered from the cache)."""
        feed.pending = False
        stream = feed.session.send_stream(ssrc, out_seq)
        if stream.hi & 0xFFFF == out_seq:
            if feed.periods is None:
                feed.periods = deque(maxlen=4)
            offset = (seq - out_seq) & 0xFFFF
            feed.periods.append(FeedPeriod(cache, stream, ext - stream.hi, offset))

    def _repair_feed(
        self, owner: Association[AddrT], feed: _Feed[AddrT], ssrc: int, out_seq: int, now: float
    ) -> bytes | None:
        """D36 under last_n: ``out_seq`` (the receiver's SEQ) exactly as the feed sent it."""
        for period in reversed(feed.periods or ()):
            found = period.locate(out_seq, now)
            if found is None:
                continue
            idx, (_, _, header, payload, ekt) = found
            if period.offset:
                hop = owner._hop
                if hop is None:
                    return None
                seq = (out_seq + period.offset) & 0xFFFF
                try:  # the rewrite the first sending made (deterministic, RFC 8723 §5.2)
                    header, payload = hop.rewrite(
                        Inbound(header, payload, ekt, seq, ssrc),
                        HeaderChanges(sequence_number=out_seq),
                    )
                except SrtpDecodeError:
                    return None
            try:
                return header + period.stream.reseal(idx, payload, header) + ekt
            except SrtpError:
                return None
        return None

    @staticmethod
    def _sender_seq(feed: _Feed[AddrT], out_seq: int) -> int:
        """The sender's SEQ of a receiver's ``out_seq`` under last_n (its period's offset, or
        the feed's current one)."""
        for period in reversed(feed.periods or ()):
            if period.index_of(out_seq) >= 0:
                return (out_seq + period.offset) & 0xFFFF
        return (out_seq + feed.offset) & 0xFFFF

    def _frame_mark(self, vs: _VideoStream[AddrT], header: bytes) -> int:
        """D35: the RFC 9626 frame marking of a video packet's header: 2 if it starts a key
        frame (S and I), 1 if it starts another frame (S), else 0. A stream that carries the
        extension once is marked (``vs.marks``). Trusted for this choice only (not E2E)."""
        fid = self.config.frame_marking_id
        if fid is None or not header[0] & 0x10:
            return 0
        try:
            fm = frame_marking_of_packet(header, fid)
        except FrameMarkingDecodeError:
            return 0
        if fm is None:
            return 0
        vs.marks = True
        return (2 if fm.independent else 1) if fm.start else 0

    def _ask_keyframe(
        self, receiver: Association[AddrT], vs: _VideoStream[AddrT], now: float, out: Output[AddrT]
    ) -> None:
        """D35: a PLI to the sender of ``vs`` on ``receiver``'s behalf (a feed started or is
        waiting without a key frame), from the receiver's SSRC (0 if it sends none), under
        the MDD's hop key toward the sender and the receiver's PLI throttle (D36)."""
        owner = vs.owner
        protect = owner._protect_rtcp
        if protect is None:  # pragma: no cover - a ranked stream's owner is keyed
            return
        me = min(receiver.ssrcs) if receiver.ssrcs else 0
        pli = Pli(me, vs.ssrc).serialize()
        if not self._throttle(receiver, {owner.association_id: pli}, now, 0):
            return
        try:
            sealed = protect(ReceiverReport(me).serialize() + pli)
        except SrtpError:
            owner._counters.drop_limit += 1
            return
        receiver._counters.pli_originated += 1
        oc = owner._counters
        oc.packets_out += 1
        oc.rtcp_out += 1
        oc.bytes_out += len(sealed)
        out.append((owner.address, sealed))

    def _to_links(self, assoc: Association[AddrT], inbound: Inbound) -> Output[AddrT]:
        """A last_n video packet for every link among the sender's routes (no feed, no
        renumbering: the MDD that serves the receiver applies its own last_n)."""
        out: Output[AddrT] = []
        header, payload, seq = inbound.header, inbound.payload, inbound.seq
        ssrc, ekt = inbound.ssrc, inbound.ekt_field
        for r in assoc._links_out:
            session = r._out_session
            if session is None:  # pragma: no cover - links are keyed while in the table
                continue
            try:
                data = header + session.send_stream(ssrc, seq).seal(seq, payload, header) + ekt
            except SrtpError:
                assoc._counters.drop_limit += 1
                continue
            rc = r._counters
            rc.packets_out += 1
            rc.bytes_out += len(data)
            out.append((r.address, data))
        return out

    def _start_feed(self, feed: _Feed[AddrT], seq: int) -> None:
        if feed.ever_on:
            # Continue where this receiver's view of the stream stopped (contiguous SEQ).
            feed.offset = (seq - feed.last_out - 1) & 0xFFFF
        else:
            feed.offset = 0
            feed.last_out = (seq - 1) & 0xFFFF
            feed.ever_on = True
        feed.start_seq = seq
        feed.on = True
        feed.asked = False
        if self._repair_on:
            feed.pending = True  # D36: a repair period opens at its first packet sealed
            if feed.periods:
                feed.periods[-1].close()
        self.stats.last_n_switches += 1

    # --- RTCP -----------------------------------------------------------------------------------

    def _rtcp(self, assoc: Association[AddrT], data: bytes, now: float) -> Output[AddrT]:
        c = assoc._counters
        session = assoc._in_session
        if session is None:  # pragma: no cover - keys are checked by the caller
            return []
        try:
            compound = session.unprotect_rtcp(data)
        except SrtpError as exc:
            _count_srtp_drop(c, exc)
            return []
        try:
            packets = parse_rtcp(compound)
        except RtcpDecodeError:
            c.drop_malformed += 1
            return []
        c.packets_in += 1
        c.bytes_in += len(data)
        c.rtcp_in += 1
        others = assoc._rtcp_routes
        # Each packet's bytes per destination id, or None for a "companion" (SDES, BYE, ...:
        # goes wherever the rest goes). Raw slices keep the sender's bytes (padding included).
        pos = 0
        parts: list[tuple[bytes, dict[uuid.UUID, bytes] | None]] = []
        targets: dict[uuid.UUID, Association[AddrT]] = {}
        repairs: Output[AddrT] = []  # D36: retransmissions from the repair cache
        # The leading SR/RR's SSRC, for the empty RR put in front below (None: not ours).
        lead: bytes | None = compound[4:8] if compound[1] in (SR, RR) else None
        for i, pkt in enumerate(packets):
            end = pos + 4 + 4 * _RTCP_HEADER.unpack_from(compound, pos)[2]
            raw = compound[pos:end]
            pos = end
            per: dict[uuid.UUID, bytes] | None
            if isinstance(pkt, SenderReport):
                # Ownership: only the SSRC's sender reports as its sender (RFC 3550 §6.4.1).
                if self._owns(assoc, pkt.ssrc, claim=True):
                    per = {d.association_id: raw for d in others}
                else:
                    per = {}
                    if i == 0:
                        lead = None
            elif isinstance(pkt, ReceiverReport):
                per = self._split_rr(assoc, pkt, raw)
            elif isinstance(pkt, Fir):
                per = self._to_owners(assoc, [s for s, _ in pkt.entries], raw)
                per = self._throttle(assoc, per, now, 0) if per else per
            elif isinstance(pkt, Pli):
                per = self._to_owners(assoc, [pkt.media_ssrc], raw)
                per = self._throttle(assoc, per, now, 0) if per else per
            elif isinstance(pkt, _Nack):
                nack = pkt
                c.nack_received += len(pkt.lost())
                if self._repair_on:
                    # D36: answer what the cache has; the rest goes on to the sender.
                    nack, raw = self._repair_nack(assoc, pkt, raw, now, repairs)
                per = self._to_owners(assoc, [nack.media_ssrc], raw) if nack.items else {}
                per = self._throttle(assoc, per, now, _nacked(nack)) if per else per
                if per:
                    c.nack_forwarded += len(nack.lost())
            elif isinstance(pkt, (RtpFeedback, PayloadFeedback)):
                per = self._to_owners(assoc, [pkt.media_ssrc], raw)
            elif isinstance(pkt, SourceDescription):
                # Ownership: chunks about another member's SSRC are removed (RFC 3550 §6.5).
                mine = tuple(ch for ch in pkt.chunks if self._owns(assoc, ch.ssrc, claim=True))
                if len(mine) == len(pkt.chunks):
                    per = None
                elif mine:
                    per = None
                    raw = _serialize_sdes(mine)
                else:
                    per = {}
            elif isinstance(pkt, Bye):
                # Ownership: a BYE only for the sender's own SSRCs (RFC 3550 §6.6).
                own = tuple(x for x in pkt.ssrcs if self._owns(assoc, x, claim=False))
                if len(own) == len(pkt.ssrcs):
                    per = None
                elif own:
                    per = None
                    raw = Bye(own, pkt.reason).serialize()
                else:
                    per = {}
            else:  # APP, XR, unknown: about the sender itself
                per = None
            parts.append((raw, per))
        for _, per in parts:
            if per:
                for aid in per:
                    targets[aid] = self._by_id[aid]
        if not targets and any(per is None for _, per in parts):
            targets = {d.association_id: d for d in others}
        # RFC 3550 §6.1: a compound starts with SR or RR. A destination that does not get
        # the leading report gets an empty RR from the same SSRC in its place (from an SSRC
        # the sender owns when its leading SR was removed; with none, nothing goes out).
        first = parts[0][1]
        if lead is None and compound[1] in (SR, RR):
            if not assoc.ssrcs:
                return repairs
            lead = _u32(min(assoc.ssrcs))
        head = bytes((0x80, RR, 0, 1)) + lead if lead is not None else None
        out: Output[AddrT] = []
        for aid, dest in targets.items():
            chunks = [
                raw if per is None else per[aid] for raw, per in parts if per is None or aid in per
            ]
            if head is not None and first is not None and aid not in first:
                chunks.insert(0, head)
            protect = dest._protect_rtcp
            if protect is None:  # pragma: no cover - targets are keyed associations
                continue
            try:
                sealed = protect(b"".join(chunks))
            except SrtpError:
                c.drop_limit += 1
                continue
            rc = dest._counters
            rc.packets_out += 1
            rc.rtcp_out += 1
            rc.bytes_out += len(sealed)
            out.append((dest.address, sealed))
        return out + repairs if repairs else out

    def _repair_nack(
        self,
        receiver: Association[AddrT],
        nack: _Nack,
        raw: bytes,
        now: float,
        repairs: Output[AddrT],
    ) -> tuple[_Nack, bytes]:
        """D36: retransmit to ``receiver`` every packet ``nack`` asks for that the cache holds
        as it was sent to it (byte-identical, perc.repair), within its ``repair_rate``;
        returns the NACK for the rest (no items: nothing left for the sender) and its bytes."""
        c = receiver._counters
        lost = nack.lost()
        owner = self._ssrc_owner.get(nack.media_ssrc)
        cache = owner._repair.get(nack.media_ssrc) if owner is not None else None
        if cache is None or owner is None or owner is receiver:
            return nack, raw
        rid = receiver.association_id
        vs = self._video.get(nack.media_ssrc)
        feed = vs.feeds.get(rid) if vs is not None else None
        if vs is not None and feed is None:
            return nack, raw  # not a feed of this receiver (its own stream)
        rate = self.config.repair_rate
        bucket = receiver._rtx
        if not bucket:
            bucket += [rate, now]
        tokens = min(rate, bucket[0] + (now - bucket[1]) * rate)
        bucket[1] = now
        missing = []
        wanted = list(dict.fromkeys(lost))
        for seq in wanted:
            if feed is None:
                data = cache.retransmit(rid, seq, now)
            else:
                data = self._repair_feed(owner, feed, nack.media_ssrc, seq, now)
            if data is None:
                missing.append(seq)
            elif tokens >= 1.0:
                tokens -= 1.0
                c.nack_answered += 1
                c.packets_out += 1
                c.bytes_out += len(data)
                repairs.append((receiver.address, data))
            else:
                c.retransmit_throttled += 1  # the sender is not asked either
        bucket[0] = tokens
        if feed is not None:
            # The sender knows its own SEQs, not this receiver's renumbered ones.
            missing = [self._sender_seq(feed, seq) for seq in missing]
        elif len(missing) == len(wanted):
            return nack, raw
        rest = _Nack.from_lost(nack.sender_ssrc, nack.media_ssrc, missing)
        return rest, rest.serialize()

    def _split_rr(
        self, sender: Association[AddrT], rr: ReceiverReport, raw: bytes
    ) -> dict[uuid.UUID, bytes]:
        """An RR for each owner of its report blocks, holding only that owner's blocks.

        Built from the raw 24-byte blocks (not re-serialized: a padded RR may carry an
        extension that is not a whole number of words). A profile-specific extension is kept
        only when it is word aligned."""
        blocks: dict[uuid.UUID, list[bytes]] = {}
        for i, block in enumerate(rr.reports):
            owner = self._owner(sender, block.ssrc)
            if owner is not None:
                blocks.setdefault(owner.association_id, []).append(raw[8 + 24 * i : 32 + 24 * i])
        if len(blocks) == 1 and len(next(iter(blocks.values()))) == len(rr.reports):
            return dict.fromkeys(blocks, raw)  # all about one sender: forward as received
        ext = rr.extension if len(rr.extension) % 4 == 0 else b""
        return {
            aid: _RTCP_HEADER.pack(0x80 | len(mine), RR, 1 + 6 * len(mine) + len(ext) // 4)
            + raw[4:8]
            + b"".join(mine)
            + ext
            for aid, mine in blocks.items()
        }

    def _to_owners(
        self, sender: Association[AddrT], ssrcs: list[int], raw: bytes
    ) -> dict[uuid.UUID, bytes]:
        out: dict[uuid.UUID, bytes] = {}
        for ssrc in ssrcs:
            owner = self._owner(sender, ssrc)
            if owner is not None:
                out[owner.association_id] = raw
        return out

    def _owns(self, sender: Association[AddrT], ssrc: int, *, claim: bool) -> bool:
        """``ssrc`` is the sender's (it sends RTP with it, or, with ``claim``, nobody owns it
        and the sender takes it as its RTP would: D26, the first direction owns an SSRC; an
        SR may come before the first RTP, e.g. released from the D5 hold); otherwise counted
        (another member's: ``drop_rtcp_spoof``; nobody's: ``drop_unknown_ssrc``), False."""
        if ssrc in sender.ssrcs:
            return True
        if ssrc in self._ssrc_owner:
            sender._counters.drop_rtcp_spoof += 1
            return False
        if claim:
            return self._claim(sender, ssrc)
        sender._counters.drop_unknown_ssrc += 1
        return False

    def _throttle(
        self, sender: Association[AddrT], per: dict[uuid.UUID, bytes], now: float, nacked: int
    ) -> dict[uuid.UUID, bytes]:
        """Feedback from ``sender`` (a receiver) toward each media sender in ``per``, limited by
        a token bucket per (receiver, media sender): PLI/FIR at ``pli_rate`` (burst 1: D36's
        one per 500 ms at the default 2/s), NACKed packets at ``nack_rate`` (burst one
        second's worth). ``nacked``: the packets a NACK asks for, 0 for PLI/FIR. What does
        not fit is dropped and counted."""
        if sender.link is not None:
            return per  # an MDD link: its receivers were throttled by their own MDD
        nack = nacked > 0
        cost = float(nacked) if nack else 1.0
        buckets = sender._feedback
        if len(buckets) > 64 + 4 * len(self._keyed):  # entries of members that left
            buckets.clear()
        out: dict[uuid.UUID, bytes] = {}
        for aid, raw in per.items():
            key = (aid, nack)
            rate = self.config.nack_rate if nack else self.config.pli_rate
            burst = rate if nack else 1.0
            bucket = buckets.get(key)
            if bucket is None:
                bucket = buckets[key] = [burst, now]
            tokens = min(burst, bucket[0] + (now - bucket[1]) * rate)
            bucket[1] = now
            if tokens >= cost:
                bucket[0] = tokens - cost
                out[aid] = raw
            else:
                bucket[0] = tokens
                sender._counters.drop_feedback_throttled += 1
                if not nack:
                    sender._counters.pli_throttled += 1
        return out

    def _owner(self, sender: Association[AddrT], ssrc: int) -> Association[AddrT] | None:
        """The keyed owner of ``ssrc`` if it is not the sender; otherwise counted, None."""
        owner = self._ssrc_owner.get(ssrc)
        if owner is None or owner is sender or owner._protect_rtcp is None:
            sender._counters.drop_unknown_ssrc += 1
            return None
        return owner

    # --- statistics -----------------------------------------------------------------------------

    def snapshot(self, now: float) -> ForwardingSnapshot:
        """Copy every counter (cheap; for periodic logging and on exit)."""
        self.flush()
        return ForwardingSnapshot(
            now=now,
            table=attrs.asdict(self.stats),
            associations={aid: a._counters.as_dict() for aid, a in self._by_id.items()},
        )

    def flush(self) -> None:
        """Credit pending fan-out to the receivers' packets_out/bytes_out (O(routes)).

        The RTP hot path counts one increment per incoming packet on the sender instead of
        one per delivery on each receiver; reading ``Association.counters`` or taking a
        snapshot flushes, so readers always see exact numbers."""
        for a in self._by_id.values():
            if a._fan_packets:
                self._flush_one(a)

    @staticmethod
    def _flush_one(a: Association[AddrT]) -> None:
        packets = a._fan_packets
        if packets:
            size = a._fan_bytes
            for rc in a._route_counters:
                rc.packets_out += packets
                rc.bytes_out += size
            a._fan_packets = a._fan_bytes = 0
