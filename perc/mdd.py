"""The Media Distributor of one conference, sans-IO: datagrams and tunnel messages in,
datagrams, tunnel messages, events and a timer out.

API::

    engine = MddEngine(conference_id, kmf="host:port", forwarding=ForwardingConfig(...),
                       idle_timeout=10.0, stats_interval=10.0)   # or MddEngine.from_config
    engine.receive_datagram(data, addr, now)      # anything from the conference's UDP port
    engine.receive_datagrams([data, ...], addr, now)   # several from one sender (UDP_GRO)
    engine.receive_tunnel_message(msg, now)       # anything the KMF sent on the tunnel
    engine.tunnel_up(now, fingerprint=..., tls=...)          # SupportedProfiles is queued
    engine.tunnel_down(now, reason=..., retry_in=...)        # the shell's tunnel ended
    engine.tunnel_connect_failed(now, reason=..., retry_in=...)
    engine.datagrams_to_send() -> list[(addr, bytes)]
    engine.tunnel_messages_to_send() -> list[TunnelMessage]
    engine.next_event() -> perc.events.Event | None
    engine.get_timer() -> float;  engine.handle_timer(now)
    engine.close(now, extra_totals)               # at exit: counters and totals events
    engine.add_link(LinkSpec(peer, fingerprint, connect), now)   # a cascade link (D25)
    engine.remove_link(peer, now);  engine.link_manager;  engine.links_up
    engine.link_counters(peer)    # forwarding + link counters of one link (LinkCounters)
    engine.associations      # the forwarding table's associations by id (the only table)
    engine.stats             # MddStats
    engine.stats_and_totals()  # and the association counters summed, ended ones included
    engine.tunnel_is_up, engine.tunnel_close_reason, engine.kmf_highest_version, engine.version
    engine.admin_status() -> dict; engine.admin_links() -> [dict]   # D33 (perc admin)

Nothing here does I/O or reads a clock; :mod:`perc.roles.mdd` is the trio shell that owns the
socket, the TLS tunnel, the reconnect backoff and the sleeping.

Theory of operation
-------------------
**One table.** Every fact about an endpoint association lives on its
:class:`perc.forwarding.Association`, in the conference's
:class:`~perc.forwarding.ForwardingTable`: the association id (a version 4 UUID, RFC 9185
§5.3), the endpoint's address (the 5-tuple with the conference's socket), when it was created
and last heard from, its hop-by-hop keys (the ``MediaKeys`` they came from, the SRTP sessions
made of them), the D5 hold, the DTLS counters and the forwarding counters. The engine adds no
dict of its own beside it; lookups by address and by id are the table's.

**Demultiplexing** on the first byte of each datagram (RFC 7983 §7, after RFC 5764 §5.1.2):
128-191 is SRTP/SRTCP and goes to :meth:`ForwardingTable.handle_datagram`, whose output (one
datagram per receiver, RFC 8723 §5.2) is queued for sending; 20-63 is DTLS and goes to the KMF
as ``TunneledDtls`` with the association id of the sender's address, a new address getting a
new association only through admission (below); anything else is dropped and counted
(RFC 7983: MUST drop). DTLS arriving while the tunnel is down is dropped and counted, not
buffered: the endpoint retransmits, and a joining endpoint times out with its own message.

**Admission** (:class:`AdmissionConfig`, counters in :class:`AdmissionStats`). A spoofed
source address costs an attacker nothing, so a new address gets state only for one
well-formed ClientHello: the datagram's first record is a DTLS handshake record of epoch 0
whose first fragment is one whole ClientHello that decodes (RFC 6347 §4.1, §4.2.2;
:func:`perc.dtls.offer.first_client_hello_untrusted`). Anything else from an unknown address
(a one-byte ``0x14``, an alert, a fragment, a bad length) is dropped and counted
(``dropped_not_hello``) and never reaches the KMF. The ClientHello makes a *pending*
association, relayed like any other, with its own bounds:

* ``max_pending`` per conference; at the bound the *oldest pending* association is dropped
  (``pending_evicted``) rather than the newcomer refused, so under a flood of new addresses a
  real endpoint still has max_pending / flood rate seconds for its cookie round trip, where
  refusing newcomers would lock every join out for the whole flood. An address evicted
  before it sent a cookie gets the same association id back with its next ClientHello (the
  last ``max_pending`` such addresses are remembered): the KMF's cookie is bound to the id, so
  an endpoint whose cookie round trip outlasts its pending association still gets in. Admitted
  associations are never displaced (they have ``max_associations`` of their own);
* ``max_pending_per_ip`` per source IP; beyond, ClientHellos from new ports of that IP are
  dropped (``dropped_per_ip``);
* ``pending_timeout`` from creation (swept every ``pending_timeout / 4``).

*Progress* is the KMF's word that the endpoint passed its cookie check (D14, RFC 6347 §4.2.1:
the endpoint received the HelloVerifyRequest at its address): a datagram from the KMF for the
association whose first record is a ServerHello, or ``MediaKeys`` for it (a KMF with
``dtls_cookies`` off sends its ServerHello to the first ClientHello). Retransmitted
ClientHellos, the KMF's HelloVerifyRequest and the endpoint's ClientHello with a cookie are
not progress (a blind spoofer can send a made-up cookie). On progress the association is
admitted if fewer than ``max_associations`` are (else removed, ``EndpointDisconnect`` sent,
``dropped_table_full``). Until then only its ClientHellos are relayed
(``dropped_pending_not_hello``) and its SRTP is neither held nor forwarded
(``dropped_pending_srtp``). An expired or evicted pending association is removed with
``EndpointDisconnect`` to the KMF only if it sent a ClientHello with a cookie (the KMF may then
hold its state); before that the KMF's cookie gate kept nothing, and the KMF would only count
the message as naming an unknown association.

*Logging under attack* (STYLE 17): :class:`~perc.events.AssociationCreated` and a pending
association's :class:`~perc.events.AssociationEnded` are per-address events; they pass a token
bucket (``event_burst`` 10, then ``event_rate`` 1/s) and the rest are only counted.
:class:`~perc.events.MddAdmission` carries the counters and how many events were left out, at
most once per ``summary_interval`` (1 s) and only when something changed.

**From the KMF** (RFC 9185 §6): ``TunneledDtls`` becomes a datagram to the association's
endpoint; ``MediaKeys`` is the MDD's only source of keys (RFC 8871 §4.1: outer halves only,
D4) and goes to :meth:`ForwardingTable.install_keys`, which checks the profile, MKI and
lengths (D4, D18) and returns the D5 hold (up to 64 datagrams that arrived before the keys),
queued for sending at once; ``EndpointDisconnect`` removes the association and its keys (D3).
A message naming an unknown association id is counted and ignored (D2). ``UnsupportedVersion``
is remembered (RFC 9185 §5.5: the next tunnel offers the lower version) and the tunnel is to
be closed; so is a tunnel on which the KMF sends what only an MDD sends (D2). "To be closed"
is :attr:`MddEngine.tunnel_close_reason`: the engine takes no more messages from that tunnel,
and the shell closes it.

**The tunnel going down changes nothing for associations.** The keys live in the table, not in
the tunnel: while the tunnel is down and the shell reconnects, joined endpoints keep talking
and keep their associations; only DTLS (new joins, rekeys) is dropped. Associations still in
their handshake stay too: the KMF keeps an association's DTLS state when a tunnel drops, and
its datagrams may come back on the next tunnel (RFC 9185 §5.3, §5.4). A KMF that restarted
knows none of the old associations (it ignores their DTLS and never sends them
``EndpointDisconnect``), so they keep their keys until they leave or go idle. On every new
tunnel ``SupportedProfiles`` is the first message (RFC 9185 §5.3, D1).

**Timers.** :meth:`MddEngine.get_timer` is the earliest of four schedules, and new input
never makes it earlier, so a shell may simply sleep until it:

* idle expiry (D3): an association whose endpoint has sent nothing (DTLS or SRTP) for
  ``idle_timeout`` is removed and ``EndpointDisconnect`` is sent to the KMF if the tunnel is
  up; sweeps are coalesced to at most ~8 per timeout period;
* the forwarding table's ``tick`` every :data:`TICK_INTERVAL` when ``last_n`` is on (the
  ranking of silent video streams);
* every ``stats_interval`` the counters of each association that changed since they were
  last reported (:class:`~perc.events.MddCounters`);
* admission upkeep every ``min(summary_interval, pending_timeout / 4)``: pending expiry and
  the :class:`~perc.events.MddAdmission` summary (fixed period, so a new pending association
  never needs an earlier wake-up).

**Events** are the classes of the MDD section of :mod:`perc.events`:
:class:`~perc.events.MddTunnelUp`, :class:`~perc.events.MddTunnelDown`,
:class:`~perc.events.MddTunnelRefused`, :class:`~perc.events.AssociationCreated`,
:class:`~perc.events.AssociationKeyed`, :class:`~perc.events.MediaKeysRejected`,
:class:`~perc.events.AssociationEnded` (``reason`` ``kmf`` or ``idle``; the association's last
:class:`~perc.events.MddCounters`, ``final``, come just before it),
:class:`~perc.events.MddCounters`, :class:`~perc.events.MddAdmission` and
:class:`~perc.events.MddTotals`. They never carry key
material: ``AssociationKeyed.keys`` is a one-way digest (:func:`perc.keying.key_digest`).

**Cascade links** (D25, D26; :mod:`perc.links`). With the MDD's identity the engine has a
:class:`~perc.links.LinkManager`. DTLS from a configured link peer's address goes to it, never
to the KMF; SRTP from a link peer whose link has no keys is dropped and counted there. When a
link is keyed (or re-keyed after a peer restart) the engine replaces its forwarding-table entry
(:meth:`ForwardingTable.add_link`, a fresh association id each time, so the SSRCs it brought
are free again); when it goes down the entry goes. A link's counters (the entries' forwarding
counters summed, and the link's own) are :class:`~perc.events.LinkCounters`, reported with
the associations' (not as MddCounters); an SSRC seen from two directions is one
:class:`~perc.events.SsrcLoop` warning. Links are never idle-expired: they have keepalives.

**Key isolation** (RFC 8871 §3.1, §4.1). ``MediaKeys`` carries only the outer halves (D4);
this module and the forwarding core never import the code that unwraps EKT tags or removes the
inner layer (:data:`E2E_MODULES`); :func:`key_isolation` reports which of them a process has
loaded, and a system test checks a real ``perc mdd`` process loads none.
"""

from __future__ import annotations

import sys
import uuid
from collections import deque
from collections.abc import Callable
from typing import Any

import attrs

from perc import events
from perc.config import DOUBLE_PROFILES, MddConference, MddSettings
from perc.dtls.offer import first_client_hello_untrusted
from perc.forwarding import (
    Association,
    AssociationCounters,
    ForwardingConfig,
    ForwardingTable,
    MediaKeysError,
)
from perc.identity import Identity
from perc.keying import key_digest
from perc.links import LinkKeyed, LinkManager, LinkSpec, LinkState
from perc.logsetup import format_address
from perc.wire.demux import is_dtls, is_srtp
from perc.wire.dtls import (
    ContentType,
    DtlsDecodeError,
    HandshakeType,
    parse_datagram_untrusted,
    parse_handshake_fragments_untrusted,
)
from perc.wire.tunnel import (
    TUNNEL_VERSION,
    EndpointDisconnect,
    MediaKeys,
    SupportedProfiles,
    TunneledDtls,
    TunnelMessage,
    UnsupportedVersion,
)

__all__ = [
    "E2E_MODULES",
    "MDD_PROFILES",
    "TICK_INTERVAL",
    "Address",
    "AdmissionConfig",
    "AdmissionStats",
    "MddEngine",
    "MddStats",
    "key_isolation",
    "loaded_e2e_modules",
]

#: An endpoint's socket address as ``recvfrom`` gives it: ``(host, port)``, or the 4-tuple of
#: IPv6. Opaque to the engine (hashable, formatted only for events).
Address = tuple[Any, ...]

#: The profiles an MDD can act as Media Distributor for: the DOUBLE profiles (D18).
MDD_PROFILES = DOUBLE_PROFILES
#: Seconds between the forwarding table's ``tick`` (last_n ranking upkeep) when last_n is on.
TICK_INTERVAL = 0.25
#: Code that only an endpoint may run: EKT tag unwrapping and the inner (end-to-end) layer.
#: The MDD never imports them (RFC 8871 §4.1).
E2E_MODULES = (
    "perc.srtp.ekt",
    "perc.srtp.double",
    "cryptography.hazmat.primitives.keywrap",
)

#: Forwarding counters summed into MddStats.dropped_srtp (drop_last_n is per receiver, not a
#: drop of the datagram).
_PACKET_DROPS = (
    "drop_auth",
    "drop_replay",
    "drop_malformed",
    "drop_queue_full",
    "drop_no_keys",
    "drop_ssrc_conflict",
    "drop_limit",
    "drop_loop",
)


def _direction(assoc: Association[Address]) -> str:
    """How a loop warning names a direction (D26)."""
    if assoc.link is not None:
        return f"link {assoc.link}"
    return f"endpoint {format_address(assoc.address)}"


def loaded_e2e_modules() -> list[str]:
    """Which of :data:`E2E_MODULES` this process has imported (an MDD: none)."""
    return [name for name in E2E_MODULES if name in sys.modules]


def key_isolation() -> events.KeyIsolation:
    """The key-isolation report of this process (logged by the MDD at exit)."""
    return events.KeyIsolation(loaded=loaded_e2e_modules(), checked=list(E2E_MODULES))


@attrs.frozen
class AdmissionConfig:
    """Admission of new endpoint addresses (the defaults are :class:`perc.config.MddSettings`'s).

    See "Admission" in the module docstring."""

    max_pending: int = 1000
    """Pending associations (a ClientHello seen, the KMF not yet past its cookie) at once."""
    max_pending_per_ip: int = 64
    """Pending associations from one source IP address at once."""
    pending_timeout: float = 2.0
    """Seconds a pending association has to progress (see the module docstring)."""
    summary_interval: float = 1.0
    """Least seconds between two MddAdmission events."""
    event_burst: int = 10
    """Per-address AssociationCreated/AssociationEnded events allowed in a burst ..."""
    event_rate: float = 1.0
    """... and per second after it; the rest only counted in MddAdmission (STYLE 17)."""


@attrs.define
class AdmissionStats:
    """Counters of the admission of new addresses (STYLE 8: every refusal by reason)."""

    pending_created: int = 0
    """Well-formed ClientHellos from new addresses that made a pending association."""
    admitted: int = 0
    """Pending associations that progressed (the KMF's ServerHello or MediaKeys)."""
    pending_expired: int = 0
    """Pending associations that did not progress within pending_timeout (removed)."""
    pending_evicted: int = 0
    """Oldest pending associations removed to make room at max_pending."""
    disconnects_sent: int = 0
    """EndpointDisconnects sent for expired/evicted pending associations (those that sent a
    ClientHello with a cookie: the KMF may hold their state)."""
    dropped_not_hello: int = 0
    """DTLS from an unknown address that is not one well-formed ClientHello (never relayed)."""
    dropped_per_ip: int = 0
    """ClientHellos from new addresses of an IP already at max_pending_per_ip."""
    dropped_pending_not_hello: int = 0
    """DTLS other than a ClientHello from a pending association (not relayed)."""
    dropped_admit_full: int = 0
    """Pending associations that progressed while max_associations were admitted (removed)."""
    dropped_pending_srtp: int = 0
    """SRTP/SRTCP from a pending association (not held: it cannot have keys yet)."""


@attrs.define
class MddStats:
    """Counters of one conference; every drop has its counter (STYLE 8).

    The SRTP fields are computed from the forwarding table when :attr:`MddEngine.stats` is
    read; the per-association detail is in ``Association.counters`` and in the
    :class:`~perc.events.MddCounters` events.
    """

    datagrams_in: int = 0
    """Datagrams received on the conference's port (SRTP included)."""
    dtls_to_kmf: int = 0
    """DTLS datagrams from endpoints queued for the KMF as TunneledDtls."""
    dtls_to_endpoint: int = 0
    """DTLS datagrams from the KMF queued for their endpoint."""
    associations_created: int = 0
    associations_idle: int = 0
    """Associations dropped after idle_timeout (EndpointDisconnect sent when the tunnel was up)."""
    associations_ended_by_kmf: int = 0
    media_keys: int = 0
    """MediaKeys installed on an association."""
    media_keys_rejected: int = 0
    """MediaKeys whose profile, MKI or lengths do not fit D4/D18 (reported, ignored)."""
    tunnels_up: int = 0
    connect_failures: int = 0
    unsupported_version: int = 0
    protocol_errors: int = 0
    """Tunnels closed because the KMF broke the tunnel rules (D2)."""
    dropped_no_tunnel: int = 0
    """DTLS from an endpoint while the tunnel was down."""
    dropped_table_full: int = 0
    """Pending associations that progressed while max_associations were admitted."""
    dropped_other: int = 0
    """Datagrams that are neither DTLS nor SRTP (RFC 7983 §7: drop), including empty ones."""
    dropped_unknown_association: int = 0
    """Messages from the KMF naming an association we do not have (D2: count and ignore)."""
    dropped_link_elsewhere: int = 0
    """DTLS from a link peer that another worker of this MDD runs (D27), which reached this
    one anyway: neither this worker's link nor an endpoint's join."""
    srtp_in: int = 0
    """SRTP/SRTCP datagrams received (first byte 128-191)."""
    srtp_out: int = 0
    """SRTP/SRTCP datagrams the forwarding table produced for receivers."""
    dropped_srtp: int = 0
    """SRTP/SRTCP datagrams not forwarded: from an address with no association, or dropped
    by the forwarding table for any reason (authentication, replay, malformed, D5 hold full or
    discarded with its association, SSRC conflict, limits). last_n withholding is not a drop
    of the datagram (it is counted per receiver in ``drop_last_n``)."""
    dropped_srtp_no_keys: int = 0
    """SRTP/SRTCP that arrived with no keys to process it: from an address with no association
    (dropped), or before its association's MediaKeys (held up to 64 per association, D5, and
    forwarded when the keys arrive; beyond that dropped)."""
    srtp_held: int = 0
    """Of ``dropped_srtp_no_keys``: datagrams held for their association's keys (D5)."""


@attrs.define(slots=True)
class _Pending:
    created: float
    ip: Any
    cookie_sent: bool
    """A ClientHello with a cookie was relayed: the KMF may have made state for it."""


def _is_server_hello(datagram: bytes) -> bool:
    """The KMF's datagram starts with a ServerHello (epoch-0 handshake record, RFC 6347
    §4.2.1): the KMF accepted the ClientHello's cookie and keeps state for the association."""
    records, _ = parse_datagram_untrusted(datagram)
    if not records or records[0].content_type != ContentType.HANDSHAKE or records[0].epoch:
        return False
    try:
        fragments = parse_handshake_fragments_untrusted(records[0].fragment)
    except DtlsDecodeError:
        return False
    return fragments[0].msg_type == HandshakeType.SERVER_HELLO


class MddEngine:
    """One conference's Media Distributor state machine (see the module docstring)."""

    def __init__(
        self,
        conference: str,
        *,
        kmf: str,
        forwarding: ForwardingConfig,
        idle_timeout: float,
        stats_interval: float,
        profiles: tuple[int, ...] | None = None,
        admission: AdmissionConfig | None = None,
        identity: Identity | None = None,
        keylog: Callable[[str], None] | None = None,
    ) -> None:
        self.conference = conference
        self.kmf = kmf
        """The KMF's tunnel address as configured (``host:port``; for events)."""
        self.idle_timeout = idle_timeout
        self.stats_interval = stats_interval
        self.profiles = MDD_PROFILES if profiles is None else profiles
        """What SupportedProfiles lists (default :data:`MDD_PROFILES`, D18)."""
        self.admission = AdmissionConfig() if admission is None else admission
        adm = self.admission
        if adm.max_pending < 1 or adm.max_pending_per_ip < 1 or adm.pending_timeout <= 0:
            raise ValueError("max_pending, max_pending_per_ip >= 1 and pending_timeout > 0")
        # The table holds admitted and pending associations; each kind has its own bound here.
        self.table: ForwardingTable[Address] = ForwardingTable(
            attrs.evolve(forwarding, max_associations=forwarding.max_associations + adm.max_pending)
        )
        self._max_associations = forwarding.max_associations
        self.admission_stats = AdmissionStats()
        #: The table's associations that are pending, oldest first (an index, not a table).
        self._pending: dict[uuid.UUID, _Pending] = {}
        self._pending_per_ip: dict[Any, int] = {}
        #: association ids of pending associations evicted before their cookie (address ->
        #: id, oldest first, at most max_pending): see _create_pending
        self._evicted: dict[Address, uuid.UUID] = {}
        self._tokens = float(adm.event_burst)  # per-address events (token bucket)
        self._tokens_at = float("-inf")
        self._suppressed = 0
        self._summarized = (attrs.asdict(self.admission_stats), 0)  # nothing to report yet
        self._stats = MddStats()
        self._other_in = 0  # datagrams that were not SRTP/SRTCP (the table counts those)
        #: Forwarding counters of associations that ended, summed (conference totals).
        self._retired: dict[str, int] = {}
        self._datagrams: list[tuple[Address, bytes]] = []
        self._tunnel_out: list[TunnelMessage] = []
        self._events: deque[events.Event] = deque()
        self._tunnel_up = False
        self.tunnel_close_reason: str | None = None
        """Set when the engine wants the current tunnel closed (UnsupportedVersion, D2); the
        engine takes no more messages from it. Cleared by the next :meth:`tunnel_up`."""
        self.kmf_highest_version: int | None = None
        """Highest tunnel version the KMF said it supports (RFC 9185 §5.5), if it ever did."""
        self.version_refused = False
        """The current (or last) tunnel ended with the KMF's UnsupportedVersion."""
        self._now = 0.0
        # Every schedule is due at once: the first handle_timer(now) sets them from now.
        self._next_idle = float("-inf")
        self._next_tick = float("-inf") if forwarding.last_n is not None else float("inf")
        self._next_stats = float("-inf")
        self._next_admission = float("-inf")
        self._next_summary = float("-inf")
        #: D25 cascade links (the MDD's certificate is the links' DTLS identity).
        self.link_manager: LinkManager | None = (
            LinkManager(conference, identity.certificate, identity.private_key, keylog=keylog)
            if identity is not None
            else None
        )
        #: Link peers without keys: their SRTP is dropped and counted, not "unknown source".
        self._unkeyed_links: set[Address] = set()
        #: D27: the peers of links another worker runs
        self._links_elsewhere: set[Address] = set()
        #: Per link peer: the forwarding counters of its past table entries, summed.
        self._link_retired: dict[Address, dict[str, int]] = {}
        self._link_reported: dict[Address, dict[str, int]] = {}

    @classmethod
    def from_config(
        cls,
        conference: MddConference,
        settings: MddSettings,
        *,
        identity: Identity | None = None,
        keylog: Callable[[str], None] | None = None,
    ) -> MddEngine:
        """The engine of one configured conference; ``identity`` (the MDD's certificate) is
        needed for its links (:meth:`add_link`, with addresses the shell resolved)."""
        return cls(
            conference.id,
            kmf=str(conference.kmf),
            forwarding=ForwardingConfig(
                last_n=conference.last_n,
                video_payload_types=frozenset(conference.video_payload_types),
                max_associations=conference.max_associations,
                pli_rate=conference.pli_rate,
                nack_rate=conference.nack_rate,
                repair=conference.repair,
                repair_cache_time=conference.repair_cache_ms / 1000,
                repair_cache_packets=conference.repair_cache_packets,
                repair_rate=conference.repair_rate,
                frame_marking_id=conference.frame_marking_id or None,
                keyframe_wait=conference.keyframe_wait,
            ),
            idle_timeout=settings.idle_timeout,
            stats_interval=settings.stats_interval,
            admission=AdmissionConfig(
                max_pending=settings.max_pending,
                max_pending_per_ip=settings.max_pending_per_ip,
                pending_timeout=settings.pending_timeout,
            ),
            identity=identity,
            keylog=keylog,
        )

    # --- observation ---------------------------------------------------------------------------

    @property
    def associations(self) -> dict[uuid.UUID, Association[Address]]:
        """Every association by id: the forwarding table's (do not modify)."""
        return self.table.associations

    @property
    def pending(self) -> frozenset[uuid.UUID]:
        """The ids of the associations that are pending (see "Admission")."""
        return frozenset(self._pending)

    @property
    def tunnel_is_up(self) -> bool:
        """A tunnel is up and not being closed: DTLS goes to the KMF."""
        return self._tunnel_up and self.tunnel_close_reason is None

    @property
    def version(self) -> int:
        """The tunnel version we send: ours, lowered to the KMF's answer if it gave one (§5.5)."""
        if self.kmf_highest_version is None:
            return TUNNEL_VERSION
        return min(TUNNEL_VERSION, self.kmf_highest_version)

    @property
    def stats(self) -> MddStats:
        """The counters, SRTP fields brought up to date from the forwarding table."""
        return self.stats_and_totals()[0]

    def stats_and_totals(self) -> tuple[MddStats, dict[str, int]]:
        """:attr:`stats` and every :class:`~perc.forwarding.AssociationCounters` field summed
        over the conference, ended associations included (monotonic), from one snapshot of
        the table (for the metrics, D34)."""
        st = self._stats
        totals = self._forwarding_totals()
        unknown = self.table.stats.unknown_source
        held = totals.get("held", 0)
        st.srtp_in = unknown + totals.get("received", 0)  # a held datagram counted once
        st.datagrams_in = self._other_in + st.srtp_in
        st.srtp_out = totals.get("packets_out", 0)
        st.dropped_srtp = unknown + sum(totals.get(k, 0) for k in _PACKET_DROPS)
        st.srtp_held = held
        st.dropped_srtp_no_keys = unknown + held + totals.get("drop_queue_full", 0)
        return st, totals

    def admin_status(self) -> dict[str, object]:
        """D33 ``status``: this conference's tunnel, associations and counters (no keys)."""
        return {
            "id": self.conference,
            "tunnel_up": self.tunnel_is_up,
            "associations": len(self.associations) - len(self.pending),
            "pending": len(self.pending),
            "links": len(self.admin_links()),
            "counters": attrs.asdict(self.stats),
        }

    def admin_links(self) -> list[dict[str, object]]:
        """D33 ``links``: the conference's cascade links (D25): peer, name, who dials, the
        pinned fingerprint, state, profile, split-horizon group and counters (no keys)."""
        lm = self.link_manager
        if lm is None:
            return []
        out: list[dict[str, object]] = []
        for peer, link in lm.links.items():
            spec = link.spec
            out.append(
                {
                    "peer": format_address(peer),
                    "name": link.label,
                    "connect": spec.connect,
                    "fingerprint": spec.fingerprint,
                    "state": link.state.value,
                    "profile": link.profile,
                    "group": spec.group,
                    "counters": self.link_counters(peer),
                }
            )
        return out

    def _forwarding_totals(self) -> dict[str, int]:
        totals = dict(self._retired)
        for name, value in self.table.snapshot(self._now).totals().items():
            totals[name] = totals.get(name, 0) + value
        return totals

    # --- outputs -------------------------------------------------------------------------------

    def datagrams_to_send(self) -> list[tuple[Address, bytes]]:
        """``(address, datagram)`` pairs to send from the conference's socket, in order."""
        out = self._datagrams
        self._datagrams = []
        return out

    def tunnel_messages_to_send(self) -> list[TunnelMessage]:
        """Messages for the KMF, in order (empty while the tunnel is down)."""
        out = self._tunnel_out
        self._tunnel_out = []
        return out

    def next_event(self) -> events.Event | None:
        return self._events.popleft() if self._events else None

    def get_timer(self) -> float:
        """When :meth:`handle_timer` is next due (absolute; input never makes it earlier)."""
        due = min(self._next_idle, self._next_tick, self._next_stats, self._next_admission)
        if self.link_manager is not None:
            due = min(due, self.link_manager.get_timer())
        return due

    # --- cascade links (D25, D26) --------------------------------------------------------------

    def add_link(self, spec: LinkSpec, now: float) -> None:
        """A cascade link to another MDD (``spec.peer`` resolved as ``recvfrom`` reports it).
        From then on DTLS from that address is the link's, never the KMF's."""
        if self.link_manager is None:
            raise ValueError("links need the MDD's identity (MddEngine(identity=...))")
        self._now = now
        stale = self.table.association_for(spec.peer)
        if stale is not None:
            self._end(stale, "link")
        self.link_manager.add(spec, now)
        self._unkeyed_links.add(spec.peer)
        self._drain_links(now)

    def link_elsewhere(self, peer: Address) -> None:
        """``peer`` is a link another worker of this MDD runs (D27): DTLS from it that reaches
        this worker is dropped and counted (``dropped_link_elsewhere``), never taken for an
        endpoint's join and relayed to the KMF. (Its SRTP already is: no association.)"""
        self._links_elsewhere.add(peer)

    def remove_link(self, peer: Address, now: float) -> None:
        if self.link_manager is None:
            return
        self.link_manager.remove(peer, now)
        self._drain_links(now)
        self._unkeyed_links.discard(peer)

    def _drain_links(self, now: float) -> None:
        """Apply the link manager's changes to the table; queue its datagrams and events."""
        lm = self.link_manager
        if lm is None:
            return
        out = lm.datagrams_to_send()
        if out:
            self._datagrams += out
        while (change := lm.next_change()) is not None:
            link = change.link
            self._retire_link(link.peer, link.association)
            link.association = None
            if isinstance(change, LinkKeyed):
                aid = uuid.uuid4()
                stale = self.table.association_for(link.peer)
                if stale is not None:  # pragma: no cover - add_link ended it
                    self._end(stale, "link")
                keys = change.keys
                self.table.add_link(
                    aid,
                    link.peer,
                    now,
                    inbound=keys.inbound,
                    outbound=keys.outbound,
                    name=link.label,
                    group=link.spec.group,
                )
                link.association = aid
                self._unkeyed_links.discard(link.peer)
            else:
                self._unkeyed_links.add(link.peer)
        while (event := lm.next_event()) is not None:
            self._events.append(event)

    def _retire_link(self, peer: Address, aid: uuid.UUID | None) -> None:
        if aid is None:
            return
        assoc = self.table.associations.get(aid)
        if assoc is None:
            return
        retired = self._link_retired.setdefault(peer, {})
        for name, value in assoc.counters.as_dict().items():
            retired[name] = retired.get(name, 0) + value
        self.table.remove(aid)

    def _drain_loops(self) -> None:
        """D26: one warning per SSRC seen from two directions."""
        for ssrc, owner, refused in self.table.loop_reports:
            self._events.append(
                events.SsrcLoop(
                    conference=self.conference,
                    ssrc=ssrc,
                    owner=_direction(owner),
                    refused=_direction(refused),
                )
            )
        self.table.loop_reports.clear()

    def link_counters(self, peer: Address) -> dict[str, int]:
        """One link's counters: forwarding (all its table entries) and the link's own."""
        totals = AssociationCounters().as_dict()  # every key, zero until counted
        for name, value in self._link_retired.get(peer, {}).items():
            totals[name] += value
        lm = self.link_manager
        link = lm.links.get(peer) if lm is not None else None
        if link is not None and link.association is not None:
            assoc = self.table.associations.get(link.association)
            if assoc is not None:
                for name, value in assoc.counters.as_dict().items():
                    totals[name] = totals.get(name, 0) + value
        if link is not None:
            totals.update(attrs.asdict(link.stats))
        return totals

    def _report_links(self, *, changed_only: bool, final: bool = False) -> None:
        lm = self.link_manager
        if lm is None:
            return
        for peer, link in lm.links.items():
            counters = self.link_counters(peer)
            if changed_only and counters == self._link_reported.get(peer):
                continue
            self._link_reported[peer] = counters
            self._events.append(
                events.LinkCounters(
                    conference=self.conference,
                    link=link.label,
                    state=link.state.value,
                    counters=counters,
                    final=final,
                )
            )

    @property
    def links_up(self) -> int:
        """How many links are keyed."""
        lm = self.link_manager
        return 0 if lm is None else sum(li.state is LinkState.UP for li in lm.links.values())

    # --- endpoint side -------------------------------------------------------------------------

    def receive_datagram(self, data: bytes, addr: Address, now: float) -> None:
        """One datagram from ``addr`` on the conference's port (never raises on its content)."""
        if is_srtp(data):  # SRTP/SRTCP (RFC 7983 §7)
            if self._unkeyed_links and addr in self._unkeyed_links:
                # D25: a link peer's media before its link is keyed: dropped, counted.
                lm = self.link_manager
                if lm is not None:
                    lm.media_before_keys(addr, now)
                    self._drain_links(now)
                return
            if self._pending and self._is_pending(addr):
                # Not held (D5) for a pending association: its endpoint has not even got
                # the KMF's ServerHello, so it has no keys to send SRTP with.
                self.admission_stats.dropped_pending_srtp += 1
                return
            out = self.table.handle_datagram(addr, data, now)
            if out:
                self._datagrams += out
            if self.table.loop_reports:
                self._drain_loops()
            return
        self._now = now
        self._other_in += 1
        if not is_dtls(data):  # not DTLS (RFC 7983 §7: MUST drop)
            self._stats.dropped_other += 1
            return
        lm = self.link_manager
        if lm is not None and lm.links and addr in lm.links:
            # D25: DTLS from a configured link peer is the MDD's own, never the KMF's.
            lm.receive(addr, data, now)
            self._drain_links(now)
            return
        if self._links_elsewhere and addr in self._links_elsewhere:
            self._stats.dropped_link_elsewhere += 1
            return
        assoc = self.table.association_for(addr)
        adm = self.admission_stats
        if assoc is None:
            # Admission: only one well-formed ClientHello (content type 22, epoch 0, one whole
            # handshake message of type 1, RFC 6347 §4.1, §4.2.2) makes a (pending)
            # association; nothing else from an unknown address reaches the KMF.
            first = first_client_hello_untrusted(data)
            if first is None:
                adm.dropped_not_hello += 1
                return
            if not self.tunnel_is_up:
                self._stats.dropped_no_tunnel += 1
                return
            created = self._create_pending(addr, bool(first.hello.cookie), now)
            if created is None:
                return
            assoc = created
        elif assoc.association_id in self._pending:
            # Before the KMF's ServerHello an endpoint sends only ClientHellos (the second
            # one with the cookie, RFC 6347 §4.2.1).
            first = first_client_hello_untrusted(data)
            if first is None:
                adm.dropped_pending_not_hello += 1
                return
            if first.hello.cookie:
                self._pending[assoc.association_id].cookie_sent = True
        assoc.last_seen = now
        assoc.dtls_in += 1
        if not self.tunnel_is_up:
            self._stats.dropped_no_tunnel += 1
            return
        self._tunnel_out.append(TunneledDtls(assoc.association_id, data))
        self._stats.dtls_to_kmf += 1

    def receive_datagrams(self, datagrams: list[bytes], addr: Address, now: float) -> None:
        """Several datagrams from ``addr`` at once (a coalesced receive): the same as
        :meth:`receive_datagram` for each in order, with the checks that depend only on
        ``addr`` made once when all of them are SRTP/SRTCP."""
        if (
            len(datagrams) > 1
            and not (self._unkeyed_links and addr in self._unkeyed_links)
            and not (self._pending and self._is_pending(addr))
            and all(map(is_srtp, datagrams))
        ):
            out = self.table.handle_datagrams(addr, datagrams, now)
            if out:
                self._datagrams += out
            if self.table.loop_reports:
                self._drain_loops()
            return
        for data in datagrams:
            self.receive_datagram(data, addr, now)

    def _is_pending(self, addr: Address) -> bool:
        assoc = self.table.association_for(addr)
        return assoc is not None and assoc.association_id in self._pending

    def _create_pending(
        self, addr: Address, cookie: bool, now: float
    ) -> Association[Address] | None:
        """A pending association for a ClientHello from a new address, or None (counted)."""
        cfg, adm = self.admission, self.admission_stats
        ip = addr[0]
        if self._pending_per_ip.get(ip, 0) >= cfg.max_pending_per_ip:
            adm.dropped_per_ip += 1
            return None
        if len(self._pending) >= cfg.max_pending:
            # The oldest pending one makes room (never an admitted one): under a flood of new
            # addresses a real endpoint still gets max_pending / flood rate seconds to show
            # the KMF its cookie, where refusing newcomers would lock every join out.
            oldest = next(iter(self._pending))
            adm.pending_evicted += 1
            self._drop_pending(oldest, "evicted")
        if len(self.table.associations) >= self.table.config.max_associations:
            self._stats.dropped_table_full += 1  # pragma: no cover - both bounds hold above
            return None
        # RFC 9185 §5.3: a version 4 (random) UUID per association. An address whose pending
        # association was evicted before its cookie came gets its id back: the KMF's cookie is
        # bound to the id (D14), so an endpoint whose cookie round trip outlasted the eviction
        # under a flood still passes the gate with the cookie it holds.
        aid = self._evicted.pop(addr, None) or uuid.uuid4()
        assoc = self.table.add(aid, addr, now)
        aid = assoc.association_id
        self._pending[aid] = _Pending(now, ip, cookie)
        self._pending_per_ip[ip] = self._pending_per_ip.get(ip, 0) + 1
        adm.pending_created += 1
        self._stats.associations_created += 1
        self._per_address(
            events.AssociationCreated(
                conference=self.conference, association=aid, peer=format_address(addr)
            ),
            now,
        )
        return assoc

    def _per_address(self, event: events.Event, now: float) -> None:
        """Queue a per-address event unless the token bucket is empty (then only counted)."""
        cfg = self.admission
        self._tokens = min(
            float(cfg.event_burst), self._tokens + (now - self._tokens_at) * cfg.event_rate
        )
        self._tokens_at = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            self._events.append(event)
        else:
            self._suppressed += 1

    def _forget_pending(self, aid: uuid.UUID) -> _Pending | None:
        p = self._pending.pop(aid, None)
        if p is not None:
            left = self._pending_per_ip[p.ip] - 1
            if left:
                self._pending_per_ip[p.ip] = left
            else:
                del self._pending_per_ip[p.ip]
        return p

    def _drop_pending(self, aid: uuid.UUID, reason: str) -> None:
        """Remove a pending association; EndpointDisconnect only if it sent a ClientHello with
        a cookie (the KMF may have made state for it; after a cookie-less one the KMF's cookie
        gate kept none, D14, and the message would only be counted there as unknown)."""
        p = self._pending[aid]
        sent = p.cookie_sent and self.tunnel_is_up
        if reason == "evicted" and not p.cookie_sent:
            if len(self._evicted) >= self.admission.max_pending:
                del self._evicted[next(iter(self._evicted))]
            self._evicted[self.table.associations[aid].address] = aid
        if sent:
            self._tunnel_out.append(EndpointDisconnect(association_id=aid))
            self.admission_stats.disconnects_sent += 1
        self._end(self.table.associations[aid], reason, disconnect_sent=sent)

    def _progress(self, assoc: Association[Address]) -> bool:
        """A pending association progressed: admit it if max_associations allows (else it is
        removed, EndpointDisconnect sent, False)."""
        aid = assoc.association_id
        if self._forget_pending(aid) is None:
            return True
        admitted = len(self.table.associations) - len(self._pending) - 1  # others
        if admitted >= self._max_associations:
            self._stats.dropped_table_full += 1
            self.admission_stats.dropped_admit_full += 1
            sent = self.tunnel_is_up
            if sent:
                self._tunnel_out.append(EndpointDisconnect(association_id=aid))
            self._end(assoc, "full", disconnect_sent=sent)
            return False
        self.admission_stats.admitted += 1
        return True

    # --- KMF side ------------------------------------------------------------------------------

    def tunnel_up(self, now: float, *, fingerprint: str = "", tls: str = "") -> None:
        """A new tunnel to the KMF is open: ``SupportedProfiles`` is queued first (§5.3)."""
        self._now = now
        self._tunnel_up = True
        self.tunnel_close_reason = None
        self.version_refused = False
        self._stats.tunnels_up += 1
        self._tunnel_out.append(
            SupportedProfiles(version=self.version, protection_profiles=self.profiles)
        )
        self._events.append(
            events.MddTunnelUp(
                conference=self.conference,
                kmf=self.kmf,
                fingerprint=fingerprint,
                version=self.version,
                tls=tls,
            )
        )

    def tunnel_down(
        self,
        now: float,
        *,
        reason: str,
        retry_in: float | None = None,
        protocol_error: bool = False,
    ) -> None:
        """The tunnel ended (``protocol_error``: its bytes broke the tunnel rules, D2)."""
        self._now = now
        if protocol_error:
            self._stats.protocol_errors += 1
        self._tunnel_up = False
        self._tunnel_out = []  # nothing queued for a tunnel that is gone
        self._events.append(
            events.MddTunnelDown(
                conference=self.conference,
                reason=self.tunnel_close_reason or reason,
                kmf=self.kmf,
                retry_in=retry_in,
            )
        )

    def tunnel_connect_failed(
        self, now: float, *, reason: str, retry_in: float | None = None
    ) -> None:
        """A connection attempt (TCP, TLS or the KMF's acceptance) failed."""
        self._now = now
        self._stats.connect_failures += 1
        self._events.append(
            events.MddTunnelDown(
                conference=self.conference,
                reason=reason,
                connected=False,
                kmf=self.kmf,
                retry_in=retry_in,
            )
        )

    def receive_tunnel_message(self, msg: TunnelMessage, now: float) -> None:
        """One message from the KMF (never raises on its content)."""
        if not self.tunnel_is_up:
            return  # RFC 9185 §5.5: after UnsupportedVersion the rest is discarded
        self._now = now
        if isinstance(msg, TunneledDtls):
            assoc = self.table.associations.get(msg.association_id)
            if assoc is None:
                self._stats.dropped_unknown_association += 1
                return
            if (
                msg.association_id in self._pending
                and _is_server_hello(msg.dtls_message)
                and not self._progress(assoc)
            ):
                return
            self._datagrams.append((assoc.address, msg.dtls_message))
            assoc.dtls_out += 1
            self._stats.dtls_to_endpoint += 1
        elif isinstance(msg, MediaKeys):
            self._install(msg, now)
        elif isinstance(msg, EndpointDisconnect):
            assoc = self.table.associations.get(msg.association_id)
            if assoc is None:
                self._stats.dropped_unknown_association += 1
                return
            self._stats.associations_ended_by_kmf += 1
            self._end(assoc, "kmf")
        elif isinstance(msg, UnsupportedVersion):
            # RFC 9185 §5.5: remember it, discard the rest, close; the next tunnel offers the
            # lower version (perc speaks only version 0, so that is still 0).
            self._stats.unsupported_version += 1
            refused = self.version
            self.kmf_highest_version = msg.highest_version
            self.version_refused = True
            self.tunnel_close_reason = "KMF answered UnsupportedVersion"
            self._events.append(
                events.MddTunnelRefused(
                    conference=self.conference,
                    kmf=self.kmf,
                    version=refused,
                    highest_version=msg.highest_version,
                )
            )
        else:  # SupportedProfiles: only an MDD sends it (D2: close the tunnel)
            self._stats.protocol_errors += 1
            self.tunnel_close_reason = (
                f"protocol error (D2): {type(msg).__name__} is not sent by a KMF"
            )

    def _install(self, msg: MediaKeys, now: float) -> None:
        assoc = self.table.associations.get(msg.association_id)
        if assoc is None:
            self._stats.dropped_unknown_association += 1
            return
        if not self._progress(assoc):
            return
        replaced = assoc.media_keys is not None
        try:
            released = self.table.install_keys(msg, now)
        except MediaKeysError as e:  # profile, MKI, lengths (D4, D18) or equal keys (§5.2)
            self._stats.media_keys_rejected += 1
            self._events.append(
                events.MediaKeysRejected(
                    conference=self.conference,
                    association=assoc.association_id,
                    profile=msg.protection_profile,
                    reason=str(e),
                )
            )
            return
        self._stats.media_keys += 1
        self._events.append(
            events.AssociationKeyed(
                conference=self.conference,
                association=assoc.association_id,
                profile=msg.protection_profile,
                peer=format_address(assoc.address),
                keys=key_digest(
                    msg.client_write_master_key,
                    msg.server_write_master_key,
                    msg.client_write_master_salt,
                    msg.server_write_master_salt,
                ),
                replaced=replaced,
                released=len(released),
            )
        )
        # D5: what was held for these keys goes out now, in arrival order.
        self._datagrams += released

    def _end(
        self, assoc: Association[Address], reason: str, disconnect_sent: bool | None = None
    ) -> None:
        """D3: the association, its keys and its forwarding state go (if the table still has
        them); its last counters are reported and kept in the conference totals. A pending
        one's events are rate-limited like AssociationCreated (a flood's are summarized)."""
        self.table.remove(assoc.association_id)
        was_pending = self._forget_pending(assoc.association_id) is not None
        counters = assoc.counters.as_dict()
        for name, value in counters.items():
            self._retired[name] = self._retired.get(name, 0) + value
        aid = assoc.association_id
        ended = events.AssociationEnded(
            conference=self.conference,
            association=aid,
            reason=reason,
            peer=format_address(assoc.address),
            disconnect_sent=disconnect_sent,
        )
        if was_pending:
            self._per_address(ended, self._now)
            return
        self._events.append(
            events.MddCounters(
                conference=self.conference, association=aid, counters=counters, final=True
            )
        )
        self._events.append(ended)

    # --- timers --------------------------------------------------------------------------------

    def handle_timer(self, now: float) -> None:
        """Run whatever is due at ``now``: idle expiry, last_n upkeep, periodic counters."""
        self._now = now
        if self.link_manager is not None and now >= self.link_manager.get_timer():
            self.link_manager.handle_timer(now)
            self._drain_links(now)
        if now >= self._next_tick:
            self.table.tick(now)
            self._next_tick = now + TICK_INTERVAL
        if now >= self._next_idle:
            self._expire_idle(now)
        if now >= self._next_stats:
            self._next_stats = now + self.stats_interval
            self.report_counters(now, changed_only=True)
        if now >= self._next_admission:
            cfg = self.admission
            self._next_admission = now + min(cfg.summary_interval, cfg.pending_timeout / 4)
            self._expire_pending(now)
            if now >= self._next_summary:
                self._summarize(now)

    def _expire_pending(self, now: float) -> None:
        """Pending associations older than pending_timeout go (oldest first)."""
        deadline = now - self.admission.pending_timeout
        while self._pending:
            aid, p = next(iter(self._pending.items()))
            if p.created > deadline:
                break
            self.admission_stats.pending_expired += 1
            self._drop_pending(aid, "pending_timeout")

    def _summarize(self, now: float) -> None:
        """An MddAdmission event if anything changed since the last one (at most one per
        summary_interval)."""
        state = (attrs.asdict(self.admission_stats), len(self._pending))
        if state == self._summarized and not self._suppressed:
            return
        self._summarized = state
        self._next_summary = now + self.admission.summary_interval
        self._events.append(
            events.MddAdmission(
                conference=self.conference,
                pending=state[1],
                counters=state[0],
                suppressed=self._suppressed,
            )
        )
        self._suppressed = 0

    def _expire_idle(self, now: float) -> None:
        timeout = self.idle_timeout
        # expire_idle removes what is past the timeout; keep the objects for the events.
        by_id = dict(self.table.associations)
        for aid in self.table.expire_idle(now, timeout):
            assoc = by_id[aid]
            self._stats.associations_idle += 1
            sent = self.tunnel_is_up
            if sent:
                self._tunnel_out.append(EndpointDisconnect(association_id=aid))
            self._end(assoc, "idle", disconnect_sent=sent)
        oldest = min((a.last_seen for a in self.table.associations.values()), default=now)
        # Coalesce wake-ups: at most ~8 sweeps per timeout period.
        self._next_idle = max(oldest + timeout, now + timeout / 8)

    def report_counters(self, now: float, *, changed_only: bool) -> int:
        """An :class:`~perc.events.MddCounters` per association (only those whose counters
        changed since they were last reported, if ``changed_only``); returns how many."""
        snapshot = self.table.snapshot(now)
        reported = 0
        for aid, counters in snapshot.associations.items():
            if aid in self._pending:
                continue  # nothing to report: no SRTP is taken from it (see "Admission")
            assoc = self.table.associations[aid]
            if assoc.link is not None:
                continue  # a link's counters are LinkCounters (see _report_links)
            last = assoc.reported
            if changed_only and (counters == last or (last is None and not any(counters.values()))):
                continue  # unchanged (a new association with nothing counted yet included)
            assoc.reported = counters
            self._events.append(
                events.MddCounters(conference=self.conference, association=aid, counters=counters)
            )
            reported += 1
        self._report_links(changed_only=changed_only)
        return reported

    def close(self, now: float, extra_totals: dict[str, int] | None = None) -> None:
        """At exit: every association's counters, then the conference totals (with the
        shell's I/O counters, ``extra_totals``, at the end)."""
        self._now = now
        if self.link_manager is not None:
            self.link_manager.close(now)
            self._drain_links(now)
        self.report_counters(now, changed_only=False)
        self._report_links(changed_only=False, final=True)
        st = self.stats
        totals = {
            "associations": len(self.table.associations),
            "created": st.associations_created,
            "srtp_in": st.srtp_in,
            "srtp_out": st.srtp_out,
            "dropped_srtp": st.dropped_srtp,
            "held": st.srtp_held,
            "unknown_source": self.table.stats.unknown_source,
            "dtls_to_kmf": st.dtls_to_kmf,
            "dtls_to_endpoint": st.dtls_to_endpoint,
            "dropped_no_tunnel": st.dropped_no_tunnel,
            **attrs.asdict(self.admission_stats),
            **(extra_totals or {}),
        }
        self._events.append(events.MddTotals(conference=self.conference, totals=totals))
