"""The Key Distributor (KMF) engine: sans-IO, RFC 9185 tunnels in, tunnel messages out.

Theory of operation
-------------------
The KMF is the TLS server end of every MDD tunnel (RFC 9185 §5.4; D1-D3) and the DTLS-SRTP
server of every endpoint behind those tunnels (RFC 8871). This module holds all of its state
and decisions; :mod:`perc.roles.kmf` only moves bytes (TLS listener, tunnel connections, one
timer task) and logs the events. The engine has the shape of
:class:`~perc.dtls.DtlsConnection` (STYLE practice 16): the shell tells it what happened on a
tunnel and when (``now``), then collects what to send (:meth:`TunnelServerEngine.messages_to_send`:
``(tunnel_id, message)`` pairs, :class:`CloseTunnel` to end a tunnel), the next deadline
(:meth:`~TunnelServerEngine.get_timer`, then :meth:`~TunnelServerEngine.handle_timer`) and
typed events (:meth:`~TunnelServerEngine.next_event`, classes of :mod:`perc.events`).

:class:`TunnelServerEngine` applies the tunnel's rules and knows nothing of DTLS:

* A tunnel is opened by the shell once TLS authenticated the MDD's certificate (pinned by
  fingerprint, :mod:`perc.roles.tunnel`). Its first message must be ``SupportedProfiles``;
  version 0 is accepted and the MDD's profile list kept for the tunnel's life, any other
  version gets ``UnsupportedVersion(highest_version=0)`` and the tunnel is closed
  (RFC 9185 §5.5).
* Any rule break of D2 (a message before or a second ``SupportedProfiles``, a KMF-to-MDD
  message type from the MDD) closes that tunnel only, with a :class:`~perc.events.KmfTunnelDown`
  saying why. Framing errors are found by the shell's framer and reported through
  :meth:`~TunnelServerEngine.tunnel_closed`.
* Subclasses get ``on_tunnel_up``/``on_dtls``/``on_disconnect``/``on_tunnel_down`` and send
  with :meth:`~TunnelServerEngine.send` (False when the tunnel is not up).

:class:`KmfEngine` keys endpoints on top of it. Every ``TunneledDtls`` names an association
id (the MDD's UUID for one endpoint 5-tuple, RFC 9185 §5.3); the engine keeps one
``DtlsConnection`` (server) per id and answers through the tunnel that carried the latest
datagram of that id (§5.3/§5.4 let an association move to another tunnel, e.g. after the MDD
reconnected). A joined endpoint sends no DTLS after its EKTKey ACK, so when its tunnel has
closed, what the KMF sends it (EKTKey retransmissions, rekeys, EndpointDisconnect) goes to the
open tunnels of the same MDD certificate; an MDD that does not know the id counts and ignores
it (D2). Another MDD (another certificate) naming a known id is ignored and counted: it must
not divert or end an endpoint it does not carry.

Admission, in the order the handshake reaches each step:

1. **Cookie** (D14): a datagram for an unknown id goes to the stateless
   :class:`~perc.dtls.CookieGate` with the association id bytes as the identity (the KMF never
   sees endpoint addresses). A ClientHello without a valid cookie gets a HelloVerifyRequest
   and no state is kept; one with a valid cookie creates the association. With
   ``kmf.dtls_cookies = false`` the ClientHello creates it. Associations are bounded
   (``max_associations``); beyond it new ones are dropped, counted. Each tunnel may also
   hold at most ``kmf.max_pending_associations`` associations that have not joined yet
   (charged to the tunnel that created them until they join or end): one MDD, even a
   trusted one, cannot fill the table with handshakes that never finish
   (``dropped_tunnel_pending``, and one log line per tunnel when it first hits the bound).
2. **Profile** (D18), at the ClientHello: the first profile of ``kmf.profiles`` that the
   endpoint offered and the carrying tunnel's ``SupportedProfiles`` listed; none ->
   ``handshake_failure``.
3. **Roster** (D15), when the client's certificate has been verified (``verify_peer``): the
   fingerprint and tls-id must map to a conference (:meth:`perc.keying.KeyingState.admit`),
   else ``access_denied`` (49). The EKT cipher the ServerHello selects must be the
   conference's (one cipher per conference, :mod:`perc.keying`), else ``handshake_failure``.
4. **Keys**, on ``HandshakeCompleted``: ``MediaKeys`` with the outer halves of the exporter
   output (D4) go at once to the MDD that carried the Finished (RFC 9185 §5.4); the endpoint
   is then a member and its first EKTKey goes out with ``send_ekt_key`` (the DTLS engine
   retransmits it until the endpoint's ACK, D9): at once if it is the conference's first
   member (or ``rekey_on_join`` is off and no rekey is pending), else when the conference's
   pending rekey fires, together with every other member (:mod:`perc.keying`, "Rekey policy").

Rekeys (D22, D31): a join or a leave asks the conference for a rekey; the conference's
deadline (now after a quiet period, else the coalescing window's end; else its TTL refresh)
lives in the same timer heap as the associations' DTLS timers. When it fires the new key goes
to every member; a newer EKTKey supersedes an unacknowledged older one in the DTLS engine, so a
slow member ends on the newest key too. A rekey that falls due while a datagram is handled is
never run inside that handling: its deadline (now) is what :meth:`get_timer` returns next.

Endings: when the DTLS engine reports ``ConnectionClosed`` (our fatal alert, the endpoint's
alert or close_notify, handshake or EKTKey timeout) the association is removed, its membership
ends and ``EndpointDisconnect`` goes to the MDD after the last DTLS datagram (RFC 9185 §5.4;
D3: so the MDD still relays a fatal alert). ``EndpointDisconnect`` from the MDD removes it
silently (the MDD already dropped its side). A fresh ClientHello (new random) on a known id is
a restarted endpoint (RFC 6347 §4.2.8): it passes the cookie gate and replaces the old
connection.

Persistence (D28, D32), when the shell keeps a state (``persistent=True``): the engine does
no I/O; it asks, through :meth:`KmfEngine.persistence_requests`, for

* :class:`ReserveSpis`: SPIs are reserved in blocks of :data:`SPI_BLOCK`, like sequence
  ceilings. The engine starts each conference at the counter the state stored (``spi_starts``:
  the stored ceiling) with nothing reserved, asks at once for ``counter + SPI_BLOCK``, and asks
  for the next block when fewer than half a block is left. No EKTKey goes out while a key made
  so far lies at or past the ceiling the shell has confirmed (:meth:`KmfEngine.spis_reserved`,
  called once the write is durable): a pending rekey waits (its timer is disarmed), and the
  first member's key is held like a pending rekey (its ``Joined`` says ``at-rekey``). So a
  restart, even after SIGKILL, resumes after every SPI that was ever sent, and no SPI comes
  round again before 65,536 newer keys. In the steady state nothing waits: the next block is
  on disk long before the current one runs out.
* :class:`AuditRecord`: one per join, leave, deny and new key (``rekey``, the first key
  included), with conference, fingerprint, certificate common name, association id, SPI and
  MDD fingerprint, never key material. The shell writes them off the event loop.
* :class:`RosterEdit`: a roster change made through the admin socket (D33), with its
  ``roster_add``/``roster_remove`` audit row; a restarted engine gets the stored changes back
  as ``roster_changes``.

Admin operations (D33; :mod:`perc.admin` parses the requests): ``admin_kick`` closes the
member's association with a close_notify (the one graceful close the KMF makes, the
endpoint's sign that it was removed), which ends it like any close (``Left``, the leave's
rekey request, EndpointDisconnect after the last DTLS), then makes the pending rekey due at
once (reason ``kick``, past ``rekey_window``) so the others stop using a key the removed
member holds; ``--ban`` also takes its fingerprint off the roster (:class:`RosterEdit`).

Resumable associations (D29; with ``resumable=True``, i.e. ``persist_keys``), asked for
through the same :meth:`KmfEngine.persistence_requests`:

* :class:`SaveAssociation` when an association joins: its facts and the DTLS engine's export
  of its record state (:mod:`perc.dtls.resume`), with a sequence ceiling ``SEQ_BLOCK``
  records ahead; :class:`ReserveSeq` for the next block once half of one is used (with a
  fresh export); :class:`ForgetAssociation` when it ends; :class:`SaveEktKey` for each new
  current key of a conference (None once it has none). The shell answers
  :meth:`KmfEngine.seq_reserved` once a ceiling is durable. Records at or past the durable
  ceiling are held in the engine until then, so a restart that resumes at the stored ceiling
  never reuses a record number under the same key. A new row's first block needs no wait:
  if its write is lost, nothing resumes the association at all.
* :meth:`KmfEngine.resume` (before any tunnel): every stored association whose conference
  has a stored key and whose fingerprint the roster still admits is rebuilt at its stored
  ceiling, a member of its conference again, routed to its MDD's tunnel once that
  reconnects (association ids are the MDD's and survive the tunnel); when an MDD's tunnel
  comes up, each conference with resumed members behind it gets one ``restart`` rekey.
  Rows that cannot be resumed are deleted; when the same endpoint joins again, the MDD is
  told to drop its old association (``EndpointDisconnect``) so its SSRCs are free at once.
  Without ``persist_keys`` rows carry no key material and only serve that last purpose.

Timers: one heap of (deadline, owner) with lazy deletion (an entry is live only if it equals
its owner's recorded deadline), so thousands of associations cost one shell task and one
wake-up per distinct due deadline.

Key bytes never leave the engine except in ``MediaKeys`` and DTLS records; events carry a
one-way digest at most. SSLKEYLOGFILE lines go through the ``keylog`` callback (D21).

API::

    TunnelServerEngine()
        tunnel_opened(tunnel_id, *, peer, mdd_fingerprint, tls="", now)
        receive_messages(tunnel_id, messages, now)
        tunnel_closed(tunnel_id, reason, now, *, protocol_error=False)
        message_not_sent(tunnel_id, message, now)   # the shell's queue refused it
        messages_to_send() -> [(tunnel_id, TunnelMessage | CloseTunnel)]
        get_timer() -> float | None; handle_timer(now); next_event() -> perc.events.Event | None
        send(tunnel_id, message) -> bool; .tunnels: dict[int, Tunnel]; .tunnel_stats
    KmfEngine(config: KmfConfig, *, keylog=None, max_associations=65536,
              dtls_handshake_timeout=30.0,
              max_pending_per_tunnel=config.kmf.max_pending_associations)  # a TunnelServerEngine
        .state: perc.keying.KeyingState   .associations: dict[UUID, KmfAssociation]
        .stats: KeyingStats               .tls_id: bytes (sent in every ServerHello)
        rekey(conference_id, now) -> EktKeyMaterial | None   # new EKTKey to every member
        admin_answer(request: perc.admin.Request, now) -> dict   # D33 (not audit)
        admin_conferences(now), admin_members(conf, now), admin_kick(conf, who, now, ban=),
        admin_roster(conf, fp, now, add=, name=), admin_rekey(conf, now)   # D33, dicts
        (roster_changes=[(conference, fingerprint, listed)]: run-time roster edits, D33)
        (with spi_starts={conference: counter}, persistent=True:)
        persistence_requests() -> [ReserveSpis | AuditRecord | SaveAssociation | ReserveSeq
                                   | ForgetAssociation | SaveEktKey]
        spis_reserved(conference_id, ceiling, now)           # a ReserveSpis is on disk
        .join_seconds, .rekey_seconds: Durations; .handshakes: Counter[(result, reason)];
        .rekey_causes: Counter[(conference, cause)]   # read by perc.metrics (D34)
        (and resumable=True, D29:)
        seq_reserved(association_id, ceiling, now)           # a sequence ceiling is on disk
        resume(rows: [perc.state.AssociationRow], keys: {conference: EktKeyMaterial}, now)
    EchoEngine: sends every datagram back (bench/tests)
"""

from __future__ import annotations

import enum
import heapq
import itertools
import logging
import uuid
from bisect import bisect_left
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping, Sequence

import attrs
from cryptography import x509
from cryptography.x509.oid import NameOID

from perc import admin
from perc.admin import (
    KMF_OPS,
    AdminError,
    Conferences,
    Kick,
    Members,
    Request,
    RosterAdd,
    RosterRemove,
)
from perc.config import KmfConfig
from perc.dtls import (
    ClientOffer,
    CookieGate,
    DtlsConfiguration,
    DtlsConnection,
    LocalProtocolError,
    PeerIdentity,
    RecordStateError,
    client_offer_untrusted,
    decode_record_state,
)
from perc.dtls import events as dtls_events
from perc.dtls.errors import AlertDescription
from perc.events import (
    Denied,
    DisconnectFromMdd,
    EktKeyAcked,
    Event,
    HandshakeFailed,
    Joined,
    Kicked,
    KmfTunnelDown,
    KmfTunnelUp,
    Left,
    Rekeyed,
    RekeyFailed,
    RosterChanged,
)
from perc.identity import IdentityError, parse_fingerprint
from perc.keying import (
    AESKW128,
    AESKW256,
    MANUAL,
    RESTART,
    Conference,
    EktKeyMaterial,
    KeyingError,
    KeyingState,
    Member,
    Rekey,
    choose_profile,
    key_digest,
)
from perc.srtp.errors import SrtpError
from perc.srtp.keys import outer_media_keys
from perc.state import SEQ_BLOCK, AssociationRow, seq_ceiling_after
from perc.tlsid import random_tls_id
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
    "DTLS_HANDSHAKE_TIMEOUT",
    "EKT_CIPHER_PREFERENCE",
    "MAX_ASSOCIATIONS",
    "SPI_BLOCK",
    "AuditRecord",
    "CloseTunnel",
    "Durations",
    "EchoEngine",
    "ForgetAssociation",
    "KeyingStats",
    "KmfAssociation",
    "KmfEngine",
    "PersistRequest",
    "ReserveSeq",
    "ReserveSpis",
    "RosterEdit",
    "SaveAssociation",
    "SaveEktKey",
    "Tunnel",
    "TunnelServerEngine",
    "TunnelStats",
]

log = logging.getLogger(__name__)

#: Bound on DTLS associations (handshaking or joined) in one KMF process.
MAX_ASSOCIATIONS = 65536
#: Datagrams for unknown associations that are logged at INFO before only counting them.
LOGGED_DROPS = 10
#: Deadline of one endpoint DTLS handshake, seconds (then ConnectionClosed "timeout").
DTLS_HANDSHAKE_TIMEOUT = 30.0
#: The EKT ciphers the KMF selects from, in preference order: AESKW256 first, because RFC 8870
#: §6 wants the EKT key at least as long as the SRTP and DTLS keys (AES-256 profiles/suites).
EKT_CIPHER_PREFERENCE = (AESKW256, AESKW128)
#: D28: SPIs reserved per state write; the next block is asked for once half of one is used.
SPI_BLOCK = 256
#: Longest certificate common name kept as an audit row's name (D32).
MAX_NAME = 64
#: Upper bounds (seconds) of the join and rekey duration histograms (D34).
JOIN_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
REKEY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 60.0)
#: The rekey reason of an operator's kick (D33): immediate, past the rekey window.
KICK = "kick"
#: Datagrams one association may hold while its sequence ceiling is written (D29).
MAX_HELD = 64


def _profile_text(profiles: Sequence[int]) -> str:
    return ",".join(f"0x{p:04X}" for p in profiles) or "none"


def _alert_name(description: int) -> str:
    try:
        return AlertDescription(description).name
    except ValueError:
        return str(description)


# --- tunnels --------------------------------------------------------------------------------------


@attrs.frozen
class CloseTunnel:
    """Output: close the tunnel once what was queued before it is sent (close_notify)."""


TunnelOutput = TunnelMessage | CloseTunnel


class TunnelPhase(enum.Enum):
    EXPECT_PROFILES = "expect SupportedProfiles"
    UP = "up"
    CLOSED = "closed"


@attrs.define(eq=False)
class Tunnel:
    """One authenticated MDD tunnel as the engine sees it."""

    tunnel_id: int
    peer: str
    mdd_fingerprint: str
    tls: str = ""
    phase: TunnelPhase = TunnelPhase.EXPECT_PROFILES
    version: int | None = None
    protection_profiles: tuple[int, ...] = ()
    """Profiles the MDD can act as Media Distributor for (RFC 9185 §5.3; D18 picks from these)."""
    pending: int = 0
    """Associations this tunnel created that have not joined (or ended) yet."""
    pending_bound_hit: bool = False

    @property
    def is_up(self) -> bool:
        return self.phase is TunnelPhase.UP


@attrs.define
class TunnelStats:
    """Tunnel counters of the engine (all tunnels)."""

    tunnels_up: int = 0
    """Tunnels that sent a version 0 SupportedProfiles."""
    unsupported_version: int = 0
    protocol_errors: int = 0
    """Tunnels closed for breaking D2's rules."""
    dtls_in: int = 0
    disconnects_in: int = 0
    dropped_not_sent: int = 0
    """Messages the shell could not queue (tunnel closed or congested)."""


class TunnelServerEngine:
    """The server side of RFC 9185 tunnels, sans-IO; subclasses handle what the tunnels carry."""

    def __init__(self) -> None:
        self.tunnels: dict[int, Tunnel] = {}
        self.tunnel_stats = TunnelStats()
        self._out: list[tuple[int, TunnelOutput]] = []
        self._events: deque[Event] = deque()

    # --- shell -> engine ---------------------------------------------------------------------

    def tunnel_opened(
        self, tunnel_id: int, *, peer: str, mdd_fingerprint: str, tls: str = "", now: float
    ) -> None:
        """TLS accepted the MDD's certificate; the tunnel now waits for SupportedProfiles."""
        self.tunnels[tunnel_id] = Tunnel(tunnel_id, peer, mdd_fingerprint, tls)

    def receive_messages(
        self, tunnel_id: int, messages: Iterable[TunnelMessage], now: float
    ) -> None:
        """Messages the MDD sent on the tunnel, in order."""
        tunnel = self.tunnels.get(tunnel_id)
        for msg in messages:
            if tunnel is None or tunnel.phase is TunnelPhase.CLOSED:
                return  # after a close we read nothing more
            if tunnel.phase is TunnelPhase.EXPECT_PROFILES:
                self._hello(tunnel, msg, now)
            elif isinstance(msg, TunneledDtls):
                self.tunnel_stats.dtls_in += 1
                self.on_dtls(tunnel, msg.association_id, msg.dtls_message, now)
            elif isinstance(msg, EndpointDisconnect):
                self.tunnel_stats.disconnects_in += 1
                self._events.append(DisconnectFromMdd(msg.association_id, tunnel.peer))
                self.on_disconnect(tunnel, msg.association_id, now)
            elif isinstance(msg, SupportedProfiles):
                self._protocol_error(tunnel, "second SupportedProfiles on one tunnel", now)
            else:
                self._protocol_error(tunnel, f"{type(msg).__name__} is not sent by an MDD", now)

    def tunnel_closed(
        self, tunnel_id: int, reason: str, now: float, *, protocol_error: bool = False
    ) -> None:
        """The connection ended (the shell's reason: close_notify, reset...);
        ``protocol_error``: the shell's framer found bytes that break D2's rules."""
        tunnel = self.tunnels.pop(tunnel_id, None)
        if tunnel is None or tunnel.phase is TunnelPhase.CLOSED:
            return  # we closed it and said why
        if protocol_error:
            self.tunnel_stats.protocol_errors += 1
        was_up = tunnel.is_up
        tunnel.phase = TunnelPhase.CLOSED
        self._events.append(KmfTunnelDown(tunnel.peer, reason, tunnel=tunnel_id))
        if was_up:
            self.on_tunnel_down(tunnel, now)

    def message_not_sent(self, tunnel_id: int, message: TunnelMessage, now: float) -> None:
        """The shell could not queue ``message`` (tunnel closing, or a congested one dropped
        relayed DTLS); counted."""
        self.tunnel_stats.dropped_not_sent += 1

    # --- engine -> shell ---------------------------------------------------------------------

    def messages_to_send(self) -> list[tuple[int, TunnelOutput]]:
        out, self._out = self._out, []
        return out

    def next_event(self) -> Event | None:
        return self._events.popleft() if self._events else None

    def get_timer(self) -> float | None:
        return None

    def handle_timer(self, now: float) -> None:
        pass

    def send(self, tunnel_id: int, message: TunnelMessage) -> bool:
        """Queue ``message`` on an up tunnel; False (nothing queued) if it is not up."""
        tunnel = self.tunnels.get(tunnel_id)
        if tunnel is None or not tunnel.is_up:
            return False
        self._out.append((tunnel_id, message))
        return True

    # --- subclass hooks ----------------------------------------------------------------------

    def on_tunnel_up(self, tunnel: Tunnel, now: float) -> None:
        pass

    def on_dtls(self, tunnel: Tunnel, association_id: uuid.UUID, data: bytes, now: float) -> None:
        pass

    def on_disconnect(self, tunnel: Tunnel, association_id: uuid.UUID, now: float) -> None:
        pass

    def on_tunnel_down(self, tunnel: Tunnel, now: float) -> None:
        pass

    # --- rules -------------------------------------------------------------------------------

    def _hello(self, tunnel: Tunnel, msg: TunnelMessage, now: float) -> None:
        if not isinstance(msg, SupportedProfiles):
            self._protocol_error(
                tunnel, f"first message is {type(msg).__name__}, not SupportedProfiles", now
            )
            return
        if msg.version != TUNNEL_VERSION:
            # RFC 9185 §5.5: answer with our highest version and close.
            self.tunnel_stats.unsupported_version += 1
            self._out.append((tunnel.tunnel_id, UnsupportedVersion(TUNNEL_VERSION)))
            self._close(
                tunnel,
                f"unsupported tunnel version {msg.version}, "
                f"sent UnsupportedVersion({TUNNEL_VERSION})",
                refused=True,
            )
            return
        tunnel.phase = TunnelPhase.UP
        tunnel.version = msg.version
        tunnel.protection_profiles = tuple(msg.protection_profiles)
        self.tunnel_stats.tunnels_up += 1
        self._events.append(
            KmfTunnelUp(
                tunnel.peer,
                tunnel.mdd_fingerprint,
                tunnel=tunnel.tunnel_id,
                version=msg.version,
                profiles=list(msg.protection_profiles),
                tls=tunnel.tls,
            )
        )
        self.on_tunnel_up(tunnel, now)

    def _protocol_error(self, tunnel: Tunnel, text: str, now: float) -> None:
        self.tunnel_stats.protocol_errors += 1
        was_up = tunnel.is_up
        self._close(tunnel, f"protocol error (D2): {text}")
        if was_up:
            self.on_tunnel_down(tunnel, now)

    def _close(self, tunnel: Tunnel, reason: str, *, refused: bool = False) -> None:
        tunnel.phase = TunnelPhase.CLOSED
        self._out.append((tunnel.tunnel_id, CloseTunnel()))
        self._events.append(KmfTunnelDown(tunnel.peer, reason, refused, tunnel.tunnel_id))


class EchoEngine(TunnelServerEngine):
    """Sends every datagram back through its tunnel (bench/tunnel_relay.py and tests)."""

    def on_dtls(self, tunnel: Tunnel, association_id: uuid.UUID, data: bytes, now: float) -> None:
        self.send(tunnel.tunnel_id, TunneledDtls(association_id, data))


# --- persistence requests (D28, D32) ----------------------------------------------------------


@attrs.frozen
class ReserveSpis:
    """Write durably that the conference may hand out issue counters below ``ceiling`` (D28);
    the shell answers :meth:`KmfEngine.spis_reserved` once the write is on disk."""

    conference: str
    ceiling: int


@attrs.frozen
class AuditRecord:
    """Append one audit row (D32): ``event`` is join, leave, deny, rekey, kick, roster_add or
    roster_remove; never key material. The shell stamps the wall-clock time and writes it off
    the event loop."""

    event: str
    conference: str | None = None
    fingerprint: str | None = None
    name: str | None = None
    association_id: uuid.UUID | None = None
    spi: int | None = None
    mdd_fingerprint: str | None = None


@attrs.frozen
class RosterEdit:
    """Write a run-time roster change (D33): ``listed`` puts the fingerprint on the
    conference's roster, else takes it off (a ban); a restarted KMF applies it again."""

    conference: str
    fingerprint: str
    listed: bool
    name: str | None = None


@attrs.frozen
class SaveAssociation:
    """Store a joined association so a restarted KMF can resume it (D29): its facts, its
    exported record state (key material: the state seals it; empty without ``persist_keys``,
    when the row only names who was connected) and the ceiling ``next_seq + SEQ_BLOCK``; the
    shell answers :meth:`KmfEngine.seq_reserved` once it is on disk."""

    association_id: uuid.UUID
    mdd_fingerprint: str
    conference: str
    peer_fingerprint: str
    tls_id: str | None
    profile: int
    ekt_cipher: int
    record_state: bytes = attrs.field(repr=False)
    next_seq: int


@attrs.frozen
class ReserveSeq:
    """Raise the association's stored sequence ceiling to ``from_seq + SEQ_BLOCK`` (D29) and
    refresh its record state; answered with :meth:`KmfEngine.seq_reserved`."""

    association_id: uuid.UUID
    from_seq: int
    record_state: bytes = attrs.field(repr=False)


@attrs.frozen
class ForgetAssociation:
    """The association ended: delete its row (D29)."""

    association_id: uuid.UUID


@attrs.frozen
class SaveEktKey:
    """The conference's current EKTKey (D29); None: the conference has none any more."""

    conference: str
    key: EktKeyMaterial | None


PersistRequest = (
    ReserveSpis
    | AuditRecord
    | RosterEdit
    | SaveAssociation
    | ReserveSeq
    | ForgetAssociation
    | SaveEktKey
)


def _common_name(der: bytes) -> str | None:
    """The certificate's subject CN, as the audit row's name (D32), if it has one."""
    try:
        names = x509.load_der_x509_certificate(der).subject.get_attributes_for_oid(
            NameOID.COMMON_NAME
        )
    except ValueError:
        return None
    value = names[0].value if names else None
    if not isinstance(value, str):
        return None
    return value[:MAX_NAME]


def _failure(reason: str, closed: dtls_events.ConnectionClosed | None) -> str:
    """A short, bounded label for why a handshake ended without a join (D34 ``reason``)."""
    if closed is None:
        return "restarted" if reason.startswith("restarted") else "disconnected"
    if closed.alert is None:
        return "timeout"
    return _alert_name(closed.alert)


# --- keying ---------------------------------------------------------------------------------------


@attrs.define(eq=False)
class KmfAssociation:
    """One endpoint DTLS association at the KMF."""

    association_id: uuid.UUID
    tunnel: Tunnel
    """The tunnel of the latest datagram: where answers go."""
    client_random: bytes
    created: float
    ekt_cipher: int | None = None
    """The EKT cipher our ServerHello selected (the DTLS engine reports it to verify_peer)."""
    conference: Conference | None = None
    """Set when the roster admitted the endpoint (verify_peer)."""
    fingerprint: str | None = None
    name: str | None = None
    """The certificate's common name (for the audit log, D32)."""
    profile: int | None = None
    refusal: str | None = None
    """Why we refused it (reported when the association ends)."""
    spi: int | None = None
    """SPI of the EKTKey last sent."""
    joined: float | None = None
    charged: Tunnel | None = None
    """The tunnel whose pending budget this association uses until it joins or ends."""
    timer_at: float | None = None
    """The DTLS engine's deadline as recorded in the timer heap."""
    seq_ceiling: int | None = None
    """D29: epoch-1 record numbers below this may go out (durable, or no row can resume
    past it); None when the association is not stored."""
    seq_asked: int = 0
    """The highest ceiling asked of the state so far."""
    held: list[bytes] = attrs.Factory(list)
    """Datagrams waiting for a ceiling write (records at or past ``seq_ceiling``)."""
    stored: bool = False
    """Its row was asked for (D29): it is deleted when the association ends."""
    connection: DtlsConnection = attrs.field(init=False)
    """Set right after construction (its callbacks refer to this object)."""


@attrs.define
class Durations:
    """A histogram of durations in seconds, kept by the engine for its metrics (D34): a count
    per bucket (``counts[i]``: values <= ``bounds[i]``, above the previous bound; the last one
    is above every bound) and their sum. Observing costs a bisect and two additions."""

    bounds: tuple[float, ...]
    counts: list[int] = attrs.field(init=False)
    total: float = 0.0

    def __attrs_post_init__(self) -> None:
        self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(self.bounds, seconds)] += 1
        self.total += seconds


@attrs.define
class KeyingStats:
    """Counters of the KMF's keying; every drop has its counter."""

    associations_created: int = 0
    cookies_sent: int = 0
    """HelloVerifyRequests (ClientHellos without a valid cookie; no state kept)."""
    dropped_no_association: int = 0
    """Datagrams for an unknown id that are not a whole ClientHello (or not accepted by the
    gate without a reply)."""
    dropped_capacity: int = 0
    """New associations refused because max_associations were in use."""
    dropped_tunnel_pending: int = 0
    """New associations refused because their tunnel already had
    ``max_pending_associations`` not yet joined."""
    dropped_tunnel_send: int = 0
    """DTLS datagrams no tunnel took (closed or congested)."""
    restarts: int = 0
    """A known id sent a fresh ClientHello (restarted endpoint): connection replaced."""
    joined: int = 0
    refused: int = 0
    left: int = 0
    ended_by_mdd: int = 0
    """Associations removed on EndpointDisconnect from the MDD."""
    failed: int = 0
    """Associations that ended before joining for reasons other than a refusal (timeout,
    the endpoint's alert)."""
    media_keys_sent: int = 0
    media_keys_failed: int = 0
    """MediaKeys the carrying tunnel did not take (the association is then closed)."""
    ekt_keys_sent: int = 0
    ekt_keys_acknowledged: int = 0
    disconnects_sent: int = 0
    unknown_disconnects: int = 0
    """EndpointDisconnect for an id we do not have (D2: counted and ignored)."""
    dropped_wrong_mdd: int = 0
    """TunneledDtls or EndpointDisconnect naming an association that another MDD (another
    certificate) carries: ignored, so one MDD cannot divert or end another's endpoints."""
    timer_wakeups: int = 0
    rekeys: int = 0
    """Rekeys that fired (join, leave, TTL refresh or manual; each one new EKTKey, D22)."""
    joins_waited_for_rekey: int = 0
    """Joiners whose first EKTKey was a pending rekey's (never the key used before them)."""
    rekey_errors: int = 0
    """Rekeys that could not be made (a KeyingError, reported as RekeyFailed)."""
    ekt_key_retransmissions: int = 0
    """EKTKey messages sent again because their ACK had not come (D9)."""
    resumed: int = 0
    """Associations taken up from the state after a restart (D29)."""
    resume_dropped: int = 0
    """Stored associations that could not be resumed (no key, off the roster, unusable)."""
    held_for_ceiling: int = 0
    """Datagrams that waited for a sequence-ceiling write (D29)."""
    dropped_held: int = 0
    """Held datagrams dropped because too many waited (DTLS retransmits)."""


class KmfEngine(TunnelServerEngine):
    """The Key Distributor: DTLS server per association, rosters, rekeys, EKTKeys."""

    def __init__(
        self,
        config: KmfConfig,
        *,
        keylog: Callable[[str], None] | None = None,
        max_associations: int = MAX_ASSOCIATIONS,
        dtls_handshake_timeout: float = DTLS_HANDSHAKE_TIMEOUT,
        max_pending_per_tunnel: int | None = None,
        spi_starts: Mapping[str, int] | None = None,
        persistent: bool = False,
        roster_changes: Iterable[tuple[str, str, bool]] = (),
        resumable: bool = False,
    ) -> None:
        super().__init__()
        self.max_pending_per_tunnel = (
            max_pending_per_tunnel
            if max_pending_per_tunnel is not None
            else config.kmf.max_pending_associations
        )
        self.config = config
        self.state = KeyingState(config.conferences, spi_starts=spi_starts, durable_spis=persistent)
        #: D28/D32: the shell keeps a state; SPIs wait for reservations, audit rows are asked for
        self.persistent = persistent
        #: D29: associations and EKTKeys are stored so that a restart can resume them
        self.resumable = persistent and resumable
        #: conference -> MDD fingerprints whose resumed members wait for a resync rekey
        self._resync: dict[str, set[str]] = {}
        #: (conference, fingerprint) -> (association id, MDD fingerprint) of stored
        #: associations this process could not resume: ended at their MDD when the same
        #: endpoint joins again (it evidently moved to a new association)
        self._orphans: dict[tuple[str, str], list[tuple[uuid.UUID, str]]] = {}
        self._persist: list[PersistRequest] = []
        self._spi_requested: dict[str, int] = {}
        self.stats = KeyingStats()
        # For the metrics (D34): join = first ClientHello to handshake done; rekey = new
        # EKTKey sent to every member of the conference ACKed it (or left).
        self.join_seconds = Durations(JOIN_BUCKETS)
        self.rekey_seconds = Durations(REKEY_BUCKETS)
        self.handshakes: Counter[tuple[str, str]] = Counter()
        self.rekey_causes: Counter[tuple[str, str]] = Counter()
        self._rekey_waiting: dict[str, tuple[int, float, set[uuid.UUID]]] = {}
        self.associations: dict[uuid.UUID, KmfAssociation] = {}
        self.max_associations = max_associations
        self.tls_id = (config.kmf.tls_id or random_tls_id()).encode("ascii")
        self.profiles = tuple(config.kmf.profiles)
        self.gate = CookieGate() if config.kmf.dtls_cookies else None
        self._base = DtlsConfiguration(
            is_client=False,
            certificate=config.identity.certificate,
            private_key=config.identity.private_key,
            srtp_profiles=self.profiles,
            ekt_ciphers=EKT_CIPHER_PREFERENCE,
            require_ekt=True,
            tls_id=self.tls_id,
            handshake_timeout=dtls_handshake_timeout,
            keylog=keylog,
        )
        # Timer heap: (deadline, tie-breaker, association id or conference id); lazy deletion:
        # an entry is live only if it equals the deadline recorded for its owner.
        self._heap: list[tuple[float, int, uuid.UUID | str]] = []
        self.conference_timers: dict[str, float] = {}
        self._seq = itertools.count()
        for conf in self.state.conferences.values():
            self._want_spis(conf)
        # D33: run-time roster edits kept in the state, over the configuration's rosters
        for conference_id, fingerprint, listed in roster_changes:
            if conference_id in self.state.conferences:
                self.state.set_participant(conference_id, fingerprint, listed=listed)
        log.info(
            "KMF keying: tls-id=%s cookies=%s profiles=%s conferences=%s",
            self.tls_id.decode(),
            "on" if self.gate is not None else "off",
            _profile_text(self.profiles),
            ",".join(self.state.conferences),
        )

    # --- persistence (D28, D32) -------------------------------------------------------------

    def persistence_requests(self) -> list[PersistRequest]:
        """What to write, in order (empty unless ``persistent``)."""
        out, self._persist = self._persist, []
        return out

    def spis_reserved(self, conference_id: str, ceiling: int, now: float) -> None:
        """A :class:`ReserveSpis` write is durable: keys with counters below ``ceiling`` may go
        out; a rekey or first key held for it is due again (at the next timer)."""
        conf = self.state.conferences.get(conference_id)
        if conf is None:
            return
        conf.spis_reserved(ceiling)
        self._schedule_conference(conf)

    def seq_reserved(self, association_id: uuid.UUID, ceiling: int, now: float) -> None:
        """A :class:`SaveAssociation` or :class:`ReserveSeq` write is durable: records below
        ``ceiling`` may go out; datagrams held for it are released."""
        assoc = self.associations.get(association_id)
        if assoc is None or assoc.seq_ceiling is None:
            return
        assoc.seq_ceiling = max(assoc.seq_ceiling, ceiling)
        self._flush(assoc)

    def resume(
        self,
        rows: Iterable[AssociationRow],
        keys: Mapping[str, EktKeyMaterial],
        now: float,
    ) -> int:
        """Take up the associations and EKTKeys a previous process stored (D29); returns how
        many associations were resumed. Each goes on at its stored sequence ceiling (nothing
        is sent at or past it until the new ceiling is durable); rows that cannot be resumed
        (conference gone or without a key, fingerprint off the roster, no record state) are
        deleted. Members get a resync rekey once their MDD's tunnel is back up."""
        resumed: dict[str, list[Member]] = {}
        for row in rows:
            assoc = self._resume_one(row, keys, now) if self.resumable else None
            if assoc is None:
                self.stats.resume_dropped += 1
                self._persist.append(ForgetAssociation(row.association_id))
                orphan = (row.association_id, row.mdd_fingerprint)
                self._orphans.setdefault((row.conference, row.peer_fingerprint), []).append(orphan)
                continue
            conf = assoc.conference
            assert conf is not None  # set by _resume_one
            resumed.setdefault(conf.id, []).append(
                Member(
                    association_id=assoc.association_id,
                    fingerprint=assoc.fingerprint or "",
                    tls_id=None if row.tls_id is None else row.tls_id.encode("ascii", "replace"),
                    tunnel=assoc.tunnel,
                    profile=row.profile,
                    ekt_cipher=row.ekt_cipher,
                    joined=now,
                )
            )
            self._resync.setdefault(conf.id, set()).add(row.mdd_fingerprint)
        for conf_id, members in resumed.items():
            conf = self.state.conferences[conf_id]
            conf.restore(keys[conf_id], members)
            self.stats.resumed += len(members)
            self._schedule_conference(conf)
        for conf_id in keys:
            if conf_id not in resumed:
                self._persist.append(SaveEktKey(conf_id, None))
        return sum(len(m) for m in resumed.values())

    def _resume_one(
        self, row: AssociationRow, keys: Mapping[str, EktKeyMaterial], now: float
    ) -> KmfAssociation | None:
        conf = self.state.conferences.get(row.conference)
        key = keys.get(row.conference)
        if (
            conf is None
            or key is None
            or row.record_state is None
            or key.cipher != row.ekt_cipher
            or row.association_id in self.associations
        ):
            return None
        try:
            saved = decode_record_state(row.record_state)
            conn = DtlsConnection.resume(
                self._base,
                saved,
                next_sequence=row.seq_ceiling,
                cookie_identity=row.association_id.bytes,
            )
        except (RecordStateError, LocalProtocolError) as e:
            log.warning("association=%s not resumed: %s", row.association_id, e)
            return None
        n = saved.negotiated
        if self.state.admit(n.peer_fingerprint, n.peer_tls_id).conference is not conf:
            return None  # the roster changed while the KMF was down
        tunnel = Tunnel(-1, "(before restart)", row.mdd_fingerprint, phase=TunnelPhase.CLOSED)
        assoc = KmfAssociation(
            association_id=row.association_id,
            tunnel=tunnel,
            client_random=n.client_random,
            created=now,
            ekt_cipher=row.ekt_cipher,
            conference=conf,
            fingerprint=n.peer_fingerprint,
            name=_common_name(n.peer_certificate_der),
            profile=row.profile,
            spi=key.spi,
            joined=now,
            seq_ceiling=row.seq_ceiling,
        )
        assoc.connection = conn
        self.associations[row.association_id] = assoc
        self._save(assoc, row.conference)
        return assoc

    def _save(self, assoc: KmfAssociation, conference: str) -> None:
        """Ask for the association's row (D29), its ceiling one block past the next record."""
        conn = assoc.connection
        n = conn.negotiated
        if n is None or n.srtp_profile is None or n.ekt_cipher is None:
            return
        next_seq = conn.next_record_sequence
        assoc.stored = True
        record_state = b""
        if self.resumable:
            record_state = conn.export_record_state().encode()
            assoc.seq_asked = seq_ceiling_after(next_seq)
            if assoc.seq_ceiling is None:
                # A new row: no restart can resume it below this ceiling, so records below
                # it are safe before the write lands (if it never does, nothing is resumed).
                assoc.seq_ceiling = assoc.seq_asked
        self._persist.append(
            SaveAssociation(
                association_id=assoc.association_id,
                mdd_fingerprint=assoc.tunnel.mdd_fingerprint,
                conference=conference,
                peer_fingerprint=n.peer_fingerprint,
                tls_id=None if n.peer_tls_id is None else n.peer_tls_id.decode("ascii", "replace"),
                profile=n.srtp_profile,
                ekt_cipher=n.ekt_cipher,
                record_state=record_state,
                next_seq=next_seq,
            )
        )

    def _end_orphans(self, conference: str, fingerprint: str) -> None:
        """The endpoint joined again: its associations from before the restart that this
        process could not resume are dead; the MDD drops them (D3), freeing their SSRCs."""
        for aid, mdd in self._orphans.pop((conference, fingerprint), []):
            for tunnel in self.tunnels.values():
                if (
                    tunnel.is_up
                    and tunnel.mdd_fingerprint == mdd
                    and self.send(tunnel.tunnel_id, EndpointDisconnect(aid))
                ):
                    self.stats.disconnects_sent += 1

    def _want_seq(self, assoc: KmfAssociation) -> None:
        """Ask for the next block of record numbers once fewer than half a block is left."""
        conn = assoc.connection
        next_seq = conn.next_record_sequence
        if assoc.seq_asked - next_seq > SEQ_BLOCK // 2 or not conn.is_established:
            return
        start = max(assoc.seq_asked, next_seq)
        assoc.seq_asked = seq_ceiling_after(start)
        self._persist.append(
            ReserveSeq(assoc.association_id, start, conn.export_record_state().encode())
        )

    def _want_spis(self, conf: Conference) -> None:
        # Ask for the next block once fewer than half a block is reserved or asked for, so in a
        # steady state keys never wait for the disk (D28).
        if conf.spi_ceiling is None:
            return
        asked = max(self._spi_requested.get(conf.id, 0), conf.spi_ceiling)
        if asked - conf.spi_counter >= SPI_BLOCK // 2:
            return
        ceiling = conf.spi_counter + SPI_BLOCK
        self._spi_requested[conf.id] = ceiling
        self._persist.append(ReserveSpis(conf.id, ceiling))

    def _audit(self, record: AuditRecord) -> None:
        if self.persistent:
            self._persist.append(record)

    # --- timers ------------------------------------------------------------------------------

    def get_timer(self) -> float | None:
        heap = self._heap
        while heap:
            deadline, _, owner = heap[0]
            if self._live(deadline, owner):
                return deadline
            heapq.heappop(heap)
        return None

    def _live(self, deadline: float, owner: uuid.UUID | str) -> bool:
        if isinstance(owner, str):
            return self.conference_timers.get(owner) == deadline
        assoc = self.associations.get(owner)
        return assoc is not None and assoc.timer_at == deadline

    def handle_timer(self, now: float) -> None:
        self.stats.timer_wakeups += 1
        heap = self._heap
        due: list[KmfAssociation] = []
        due_conferences: list[Conference] = []
        while heap and heap[0][0] <= now:
            deadline, _, owner = heapq.heappop(heap)
            if not self._live(deadline, owner):
                continue
            if isinstance(owner, str):
                del self.conference_timers[owner]
                due_conferences.append(self.state.conferences[owner])
            else:
                assoc = self.associations[owner]
                assoc.timer_at = None
                due.append(assoc)
        for assoc in due:
            if self.associations.get(assoc.association_id) is not assoc:
                continue
            stats = assoc.connection.stats
            sent = stats.ekt_retransmissions
            assoc.connection.handle_timer(now)
            self.stats.ekt_key_retransmissions += stats.ekt_retransmissions - sent
            self._service(assoc, now)
        for conf in due_conferences:
            self._poll_conference(conf, now)

    def _push(self, deadline: float, owner: uuid.UUID | str) -> None:
        heap = self._heap
        heapq.heappush(heap, (deadline, next(self._seq), owner))
        if len(heap) > 2 * (len(self.associations) + len(self.conference_timers)) + 1024:
            # Too many stale entries: rebuild from the live deadlines.
            live: list[tuple[float, int, uuid.UUID | str]] = [
                (a.timer_at, next(self._seq), a.association_id)
                for a in self.associations.values()
                if a.timer_at is not None
            ]
            live.extend((t, next(self._seq), cid) for cid, t in self.conference_timers.items())
            heapq.heapify(live)
            self._heap = live

    def _schedule(self, assoc: KmfAssociation) -> None:
        deadline = assoc.connection.get_timer()
        if deadline == assoc.timer_at:
            return
        assoc.timer_at = deadline
        if deadline is not None:
            self._push(deadline, assoc.association_id)

    def _schedule_conference(self, conf: Conference) -> None:
        """Arm the conference's timer (pending rekey or TTL refresh) in the shared heap.

        A rekey due now is not run here but at the next :meth:`handle_timer`, so that it never
        runs inside the handling of one association's events."""
        self._want_spis(conf)
        deadline = conf.next_deadline()
        if deadline == self.conference_timers.get(conf.id):
            return
        if deadline is None:
            self.conference_timers.pop(conf.id, None)
            return
        self.conference_timers[conf.id] = deadline
        self._push(deadline, conf.id)

    # --- tunnels -----------------------------------------------------------------------------

    def on_tunnel_up(self, tunnel: Tunnel, now: float) -> None:
        # D29: members resumed after a restart may have missed a key the previous process
        # sent just before it died; once their MDD is back, one rekey puts everyone on the
        # same, newest key.
        for conf_id, mdds in list(self._resync.items()):
            if tunnel.mdd_fingerprint not in mdds:
                continue
            mdds.discard(tunnel.mdd_fingerprint)
            if not mdds:
                del self._resync[conf_id]
            conf = self.state.conferences[conf_id]
            if conf.current is None:
                continue
            try:
                conf.request_rekey(now, RESTART, immediate=True)
            except KeyingError as e:
                self._rekey_failed(conf, e)
                continue
            self._schedule_conference(conf)

    def on_dtls(self, tunnel: Tunnel, association_id: uuid.UUID, data: bytes, now: float) -> None:
        assoc = self.associations.get(association_id)
        if assoc is None:
            self._new_association(association_id, data, None, tunnel, now, old=None)
            return
        if tunnel.mdd_fingerprint != assoc.tunnel.mdd_fingerprint:
            # Association ids are the MDD's (RFC 9185 §5.3): another MDD naming one is
            # confused or hostile; it must not divert this endpoint's DTLS (or its keys).
            self.stats.dropped_wrong_mdd += 1
            return
        offer = client_offer_untrusted(data)
        if offer is not None and offer.client_random != assoc.client_random:
            # A restarted endpoint on the same 5-tuple (RFC 6347 §4.2.8).
            self._new_association(association_id, data, offer, tunnel, now, old=assoc)
            return
        assoc.tunnel = tunnel
        assoc.connection.receive_datagram(data, now)
        self._service(assoc, now)

    def on_disconnect(self, tunnel: Tunnel, association_id: uuid.UUID, now: float) -> None:
        assoc = self.associations.get(association_id)
        if assoc is None:
            self.stats.unknown_disconnects += 1
            return
        if tunnel.mdd_fingerprint != assoc.tunnel.mdd_fingerprint:
            self.stats.dropped_wrong_mdd += 1
            return
        del self.associations[association_id]
        self.stats.ended_by_mdd += 1
        # The endpoint is gone (D3): no close_notify to send, nothing to tell the MDD.
        self._end(assoc, "EndpointDisconnect from the MDD", now)

    def message_not_sent(self, tunnel_id: int, message: TunnelMessage, now: float) -> None:
        super().message_not_sent(tunnel_id, message, now)
        if isinstance(message, TunneledDtls):
            self.stats.dropped_tunnel_send += 1  # DTLS retransmits
        elif isinstance(message, MediaKeys):
            # The MDD cannot forward this endpoint's media: end the association (the endpoint
            # learns it from the fatal alert, through another tunnel of its MDD if one is up).
            assoc = self.associations.get(message.association_id)
            if assoc is not None:
                self.stats.media_keys_failed += 1
                assoc.refusal = f"MediaKeys not delivered: tunnel {assoc.tunnel.peer} closed"
                assoc.connection.abort(int(AlertDescription.internal_error), now)
                self._service(assoc, now)

    # --- rekeying (D22; the policy is perc.keying's) -----------------------------------------

    def rekey(self, conference_id: str, now: float) -> EktKeyMaterial | None:
        """A new EKTKey for the conference at once, sent to every member (a pending rekey
        fires now with it); None if the conference has no members."""
        conf = self.state.conferences[conference_id]
        if conf.current is None:
            return None
        try:
            conf.request_rekey(now, MANUAL, immediate=True)
        except KeyingError as e:
            self._rekey_failed(conf, e)
            return None
        return self._poll_conference(conf, now)

    def _rekey_failed(self, conf: Conference, error: KeyingError) -> None:
        # A local misuse the keying state refused (SPIs wrap, D28, so never for lack of them):
        # report it and stop this conference's timer rather than spin on a due deadline.
        self.stats.rekey_errors += 1
        self._events.append(RekeyFailed(conf.id, str(error)))
        self.conference_timers.pop(conf.id, None)

    def _poll_conference(self, conf: Conference, now: float) -> EktKeyMaterial | None:
        """Run the conference's timer if due (rekey or TTL refresh), then re-arm it."""
        try:
            rekey = conf.poll(now)
        except KeyingError as e:
            self._rekey_failed(conf, e)
            return None
        if rekey is not None:
            self._apply_rekey(conf, rekey, now)
        self._schedule_conference(conf)
        return rekey.key if rekey is not None else None

    def _apply_rekey(self, conf: Conference, rekey: Rekey, now: float) -> None:
        key = rekey.key
        self.stats.rekeys += 1
        self._new_key_event(conf, key, rekey.reason, len(rekey.members))
        log.debug(
            "rekey detail conference=%s spi=%d previous_spi=%s joins=%d leaves=%d",
            conf.id,
            key.spi,
            rekey.previous.spi if rekey.previous is not None else "-",
            rekey.joins,
            rekey.leaves,
        )
        # To every member; the DTLS engine retransmits until ACK.
        waiting: set[uuid.UUID] = set()
        self._rekey_waiting[conf.id] = (key.spi, now, waiting)
        for aid in list(conf.members):
            assoc = self.associations.get(aid)
            if assoc is not None and assoc.connection.is_established:
                waiting.add(aid)
                self._send_ekt_key(assoc, key, now)
                self._service(assoc, now)
        if not waiting:
            self._rekey_waiting.pop(conf.id, None)

    def _rekey_acked(self, conf_id: str, aid: uuid.UUID, spi: int | None, now: float) -> None:
        """A member ACKed ``spi`` (None: it left): the rekey is done once nobody is waited for."""
        waiting = self._rekey_waiting.get(conf_id)
        if waiting is None or (spi is not None and spi != waiting[0]) or aid not in waiting[2]:
            return
        waiting[2].discard(aid)
        if not waiting[2]:
            del self._rekey_waiting[conf_id]
            self.rekey_seconds.observe(now - waiting[1])

    def _new_key_event(
        self, conf: Conference, key: EktKeyMaterial, reason: str, members: int
    ) -> None:
        self.rekey_causes[conf.id, reason] += 1
        self._events.append(
            Rekeyed(
                conf.id,
                key.spi,
                reason,
                members,
                cipher=key.cipher,
                ttl=key.ttl,
                key=key_digest(key.key, key.salt),
            )
        )
        self._audit(AuditRecord("rekey", conference=conf.id, spi=key.spi))
        if self.resumable:
            self._persist.append(SaveEktKey(conf.id, key))

    def _send_ekt_key(self, assoc: KmfAssociation, key: EktKeyMaterial, now: float) -> None:
        assoc.connection.send_ekt_key(key.key, key.salt, key.spi, key.ttl, now)
        assoc.spi = key.spi
        self.stats.ekt_keys_sent += 1

    # --- associations ------------------------------------------------------------------------

    def _drop_unknown(self, association_id: uuid.UUID, tunnel: Tunnel) -> None:
        self.stats.dropped_no_association += 1
        # A few at INFO (an operator checking the relay sees them), the rest only counted.
        log.log(
            logging.INFO if self.stats.dropped_no_association <= LOGGED_DROPS else logging.DEBUG,
            "association seen association=%s peer=%s: not a ClientHello, dropped "
            "(no state before a ClientHello; the first %d are logged, all counted)",
            association_id,
            tunnel.peer,
            LOGGED_DROPS,
        )

    def _new_association(
        self,
        association_id: uuid.UUID,
        data: bytes,
        offer: ClientOffer | None,
        tunnel: Tunnel,
        now: float,
        *,
        old: KmfAssociation | None,
    ) -> None:
        if self.gate is not None:
            # The gate parses the ClientHello first; we parse it only once it passed.
            verdict = self.gate.check(data, association_id.bytes, now)
            if verdict.reply is not None:
                self.stats.cookies_sent += 1
                if not self.send(tunnel.tunnel_id, TunneledDtls(association_id, verdict.reply)):
                    self.stats.dropped_tunnel_send += 1
                return
            if not verdict.accepted:
                self._drop_unknown(association_id, tunnel)
                return
        if offer is None:
            offer = client_offer_untrusted(data)
            if offer is None:
                self._drop_unknown(association_id, tunnel)
                return
        if old is not None:
            self.stats.restarts += 1
            del self.associations[association_id]
            self._end(old, "restarted with a new ClientHello", now)
        elif len(self.associations) >= self.max_associations:
            self.stats.dropped_capacity += 1
            return
        if tunnel.pending >= self.max_pending_per_tunnel:
            self.stats.dropped_tunnel_pending += 1
            if not tunnel.pending_bound_hit:
                tunnel.pending_bound_hit = True
                log.warning(
                    "tunnel peer=%s holds %d associations that have not joined: new ones from "
                    "it are dropped until some join or end (logged once per tunnel, counted as "
                    "dropped_tunnel_pending)",
                    tunnel.peer,
                    tunnel.pending,
                )
            return
        assoc = KmfAssociation(
            association_id=association_id,
            tunnel=tunnel,
            client_random=offer.client_random,
            created=now,
            charged=tunnel,
        )
        tunnel.pending += 1
        config = attrs.evolve(
            self._base,
            inspect_client_offer=lambda offer: self._inspect_offer(assoc, offer),
            select_srtp_profile=lambda offered: self._select_profile(assoc, offered),
            verify_peer=lambda peer: self._verify_peer(assoc, peer),
        )
        assoc.connection = DtlsConnection(config, cookie_identity=association_id.bytes)
        self.associations[association_id] = assoc
        self.stats.associations_created += 1
        assoc.connection.receive_datagram(data, now)
        self._service(assoc, now)

    @staticmethod
    def _inspect_offer(assoc: KmfAssociation, offer: ClientOffer) -> int | None:
        # The DTLS engine refuses these offers at once (require_ekt, use_srtp: handshake_failure
        # before any server flight); say why when the association ends.
        if not offer.use_srtp:
            assoc.refusal = "the endpoint offered no use_srtp (D18)"
        elif not set(offer.ekt_ciphers) & set(EKT_CIPHER_PREFERENCE):
            assoc.refusal = "the endpoint offered no EKT cipher we support"
        return None

    def _select_profile(self, assoc: KmfAssociation, offered: Sequence[int]) -> int | None:
        mdd_profiles = assoc.tunnel.protection_profiles
        profile = choose_profile(self.profiles, offered, mdd_profiles)
        if profile is None:
            assoc.refusal = (
                f"no common SRTP profile (D18): endpoint offered {_profile_text(offered)}, "
                f"MDD lists {_profile_text(mdd_profiles)}, "
                f"KMF accepts {_profile_text(self.profiles)}"
            )
        assoc.profile = profile
        return profile

    def _verify_peer(self, assoc: KmfAssociation, peer: PeerIdentity) -> int | None:
        assoc.fingerprint = peer.fingerprint
        assoc.name = _common_name(peer.certificate_der)
        if peer.negotiated is not None:
            assoc.ekt_cipher = peer.negotiated.ekt_cipher
        admission = self.state.admit(peer.fingerprint, peer.tls_id)
        conf = admission.conference
        if conf is None:
            assoc.refusal = admission.reason
            return int(AlertDescription.access_denied)
        if assoc.ekt_cipher is None:
            assoc.refusal = f"conference={conf.id}: the endpoint offered no EKT cipher we support"
            return int(AlertDescription.handshake_failure)
        if not conf.accepts_cipher(assoc.ekt_cipher):
            assoc.refusal = (
                f"conference={conf.id}: EKT cipher {assoc.ekt_cipher} differs from the "
                f"conference's {conf.cipher} (one cipher per conference)"
            )
            return int(AlertDescription.handshake_failure)
        assoc.conference = conf
        return None

    def _service(self, assoc: KmfAssociation, now: float) -> None:
        """Send what the DTLS engine queued and act on its events; then re-arm its timer."""
        conn = assoc.connection
        while True:
            self._flush(assoc)
            event = conn.next_event()
            if event is None:
                break
            if isinstance(event, dtls_events.HandshakeCompleted):
                self._completed(assoc, event, now)
            elif isinstance(event, dtls_events.EktKeyAcknowledged):
                self.stats.ekt_keys_acknowledged += 1
                conf = assoc.conference
                if conf is not None:
                    self._rekey_acked(conf.id, assoc.association_id, event.spi, now)
                self._events.append(
                    EktKeyAcked(conf.id if conf else "", assoc.association_id, event.spi)
                )
            elif isinstance(event, dtls_events.ConnectionClosed):
                self._flush(assoc)
                if self.associations.get(assoc.association_id) is assoc:
                    del self.associations[assoc.association_id]
                    self._end(assoc, event.reason, now, closed=event)
                return
        self._schedule(assoc)

    def _route(self, assoc: KmfAssociation) -> list[Tunnel]:
        """Where to send for ``assoc``: its latest tunnel, or if that closed, the up tunnels
        of the same MDD (it reconnected; a joined endpoint sends no DTLS that would tell us
        which one, and an MDD runs one tunnel per conference, D1). A tunnel that does not
        know the association id counts and ignores what we send (D2)."""
        tunnel = assoc.tunnel
        if tunnel.is_up:
            return [tunnel]
        others = [
            t
            for t in self.tunnels.values()
            if t.is_up and t.mdd_fingerprint == tunnel.mdd_fingerprint
        ]
        if len(others) == 1:
            assoc.tunnel = others[0]
        return others

    def _flush(self, assoc: KmfAssociation) -> None:
        datagrams = assoc.connection.datagrams_to_send()
        if assoc.seq_ceiling is not None:
            datagrams = self._gate(assoc, datagrams)
        if not datagrams:
            return
        tunnels = self._route(assoc)
        aid = assoc.association_id
        for datagram in datagrams:
            if not tunnels:
                self.stats.dropped_tunnel_send += 1
            for tunnel in tunnels:
                self._out.append((tunnel.tunnel_id, TunneledDtls(aid, datagram)))

    def _gate(self, assoc: KmfAssociation, datagrams: list[bytes]) -> list[bytes]:
        """D29: hold what the DTLS engine produced while any of its records lies at or past
        the durable sequence ceiling; released by :meth:`seq_reserved`."""
        ceiling = assoc.seq_ceiling
        assert ceiling is not None  # callers check
        self._want_seq(assoc)
        if assoc.connection.next_record_sequence > ceiling:
            if datagrams:
                self.stats.held_for_ceiling += len(datagrams)
                assoc.held += datagrams
                excess = len(assoc.held) - MAX_HELD
                if excess > 0:
                    self.stats.dropped_held += excess
                    del assoc.held[:excess]
            return []
        if assoc.held:
            datagrams, assoc.held = assoc.held + datagrams, []
        return datagrams

    @staticmethod
    def _release(assoc: KmfAssociation) -> None:
        """The association no longer counts against its tunnel's pending bound."""
        if assoc.charged is not None:
            assoc.charged.pending -= 1
            assoc.charged = None

    def _completed(
        self, assoc: KmfAssociation, event: dtls_events.HandshakeCompleted, now: float
    ) -> None:
        self._release(assoc)
        conf = assoc.conference
        aid = assoc.association_id
        conn = assoc.connection
        if conf is None or event.ekt_cipher is None or event.srtp_profile is None:
            # verify_peer always runs before Finished; this is a safety net.
            assoc.refusal = assoc.refusal or "handshake completed without admission"
            conn.abort(int(AlertDescription.internal_error), now)
            return
        if not conf.accepts_cipher(event.ekt_cipher):
            # Another member fixed the conference's cipher while this handshake ran.
            assoc.refusal = (
                f"conference={conf.id}: EKT cipher {event.ekt_cipher} differs from the "
                f"conference's {conf.cipher} (one cipher per conference)"
            )
            # The same alert verify_peer would have sent had the cipher been fixed earlier.
            conn.abort(int(AlertDescription.handshake_failure), now)
            return
        try:
            ck, sk, cs, ss = outer_media_keys(event.srtp_profile, event.srtp_keying_material or b"")
        except SrtpError as e:
            assoc.refusal = f"cannot split the exporter output: {e}"
            conn.abort(int(AlertDescription.internal_error), now)
            return
        keys = MediaKeys(
            association_id=aid,
            protection_profile=event.srtp_profile,
            mki=b"",
            client_write_master_key=ck,
            server_write_master_key=sk,
            client_write_master_salt=cs,
            server_write_master_salt=ss,
        )
        # RFC 9185 §5.4: MediaKeys immediately after the handshake, to the MDD that carried it.
        if not self.send(assoc.tunnel.tunnel_id, keys):
            self.stats.media_keys_failed += 1
            assoc.refusal = f"MediaKeys not delivered: tunnel {assoc.tunnel.peer} closed"
            conn.abort(int(AlertDescription.internal_error), now)
            return
        self.stats.media_keys_sent += 1
        first = conf.current is None
        try:
            key = conf.join(
                Member(
                    association_id=aid,
                    fingerprint=event.peer_fingerprint,
                    tls_id=event.peer_tls_id,
                    tunnel=assoc.tunnel,
                    profile=event.srtp_profile,
                    ekt_cipher=event.ekt_cipher,
                    joined=now,
                ),
                now,
            )
        except KeyingError as e:
            assoc.refusal = str(e)
            conn.abort(int(AlertDescription.internal_error), now)
            return
        assoc.profile = event.srtp_profile
        assoc.joined = now
        self.stats.joined += 1
        self.handshakes["joined", "ok"] += 1
        self.join_seconds.observe(now - assoc.created)
        if self.persistent:
            self._save(assoc, conf.id)
        self._end_orphans(conf.id, event.peer_fingerprint)
        if key is not None:
            if first:
                self._new_key_event(conf, key, "first", len(conf.members))
            self._send_ekt_key(assoc, key, now)
        first_key = key
        if key is None:
            # Its first EKTKey is the pending rekey's (perc.keying: the joiner never holds a
            # key used before it joined); the conference timer sends it to everyone.
            self.stats.joins_waited_for_rekey += 1
            first_key = conf.pending
        self._events.append(
            Joined(
                conf.id,
                aid,
                event.peer_fingerprint,
                event.srtp_profile,
                event.ekt_cipher,
                tls_id=event.peer_tls_id.decode("ascii", "replace")
                if event.peer_tls_id is not None
                else None,
                spi=first_key.spi if first_key is not None else -1,
                mdd=assoc.tunnel.peer,
                members=len(conf.members),
                first_key="now" if key is not None else "at-rekey",
            )
        )
        self._audit(
            AuditRecord(
                "join",
                conference=conf.id,
                fingerprint=event.peer_fingerprint,
                name=assoc.name,
                association_id=aid,
                spi=first_key.spi if first_key is not None else None,
                mdd_fingerprint=assoc.tunnel.mdd_fingerprint,
            )
        )
        # The pending rekey's deadline, or (first member) the TTL refresh.
        self._schedule_conference(conf)

    def _end(
        self,
        assoc: KmfAssociation,
        reason: str,
        now: float,
        closed: dtls_events.ConnectionClosed | None = None,
    ) -> None:
        """Forget an association already removed from the table; tell the MDD if we ended it."""
        assoc.timer_at = None
        self._release(assoc)
        conf = assoc.conference
        aid = assoc.association_id
        if assoc.stored:
            assoc.stored = False
            assoc.seq_ceiling = None
            assoc.held.clear()
            self._persist.append(ForgetAssociation(aid))
        if assoc.joined is not None and conf is not None:
            try:
                conf.leave(aid, now)  # may request a rekey (D22: rekey_on_leave)
            except KeyingError as e:
                self._rekey_failed(conf, e)
            else:
                self._schedule_conference(conf)
            if self.resumable and conf.current is None:
                self._persist.append(SaveEktKey(conf.id, None))
            self.stats.left += 1
            self._rekey_acked(conf.id, aid, None, now)
            if assoc.refusal is not None:  # we ended a member (MediaKeys not delivered)
                reason = f"{assoc.refusal} ({reason})"
            self._events.append(
                Left(
                    conf.id,
                    aid,
                    assoc.fingerprint or "?",
                    reason,
                    profile=assoc.profile or 0,
                    spi=assoc.spi,
                    members=len(conf.members),
                )
            )
            self._audit(
                AuditRecord(
                    "leave",
                    conference=conf.id,
                    fingerprint=assoc.fingerprint,
                    name=assoc.name,
                    association_id=aid,
                    spi=assoc.spi,
                    mdd_fingerprint=assoc.tunnel.mdd_fingerprint,
                )
            )
        elif assoc.refusal is not None:
            self.stats.refused += 1
            alert = "-"
            if closed is not None and closed.alert is not None and not closed.sent_by_peer:
                alert = _alert_name(closed.alert)
            self.handshakes["refused", alert if alert != "-" else "refused"] += 1
            self._events.append(
                Denied(
                    aid,
                    assoc.fingerprint,
                    assoc.refusal,
                    alert,
                    conference=conf.id if conf is not None else None,
                    profile=assoc.profile,
                    ended=reason,
                )
            )
            self._audit(
                AuditRecord(
                    "deny",
                    conference=conf.id if conf is not None else None,
                    fingerprint=assoc.fingerprint,
                    name=assoc.name,
                    association_id=aid,
                    mdd_fingerprint=assoc.tunnel.mdd_fingerprint,
                )
            )
        else:
            self.stats.failed += 1
            self.handshakes["failed", _failure(reason, closed)] += 1
            self._events.append(HandshakeFailed(aid, assoc.fingerprint, reason))
        # RFC 9185 §5.4 / D3: the association ended on the DTLS side; tell the MDD.
        if closed is not None:
            for tunnel in self._route(assoc):
                if self.send(tunnel.tunnel_id, EndpointDisconnect(aid)):
                    self.stats.disconnects_sent += 1

    # --- admin operations (D33; perc.admin parses the requests) ---------------------------------

    def admin_answer(self, request: Request, now: float) -> dict[str, object]:
        """Run a KMF admin request; the answer's fields (``ok`` is the caller's). ``audit``
        is not here: it reads the state file (the shell's). AdminError for an unknown
        conference or member, a malformed fingerprint, or an op the KMF does not serve."""
        if isinstance(request, Conferences):
            return {"conferences": self.admin_conferences(now)}
        if isinstance(request, Members):
            return {"conference": request.conference,
                    "members": self.admin_members(request.conference, now)}  # fmt: skip
        if isinstance(request, Kick):
            return self.admin_kick(request.conference, request.who, now, ban=request.ban)
        if isinstance(request, RosterAdd | RosterRemove):
            add = isinstance(request, RosterAdd)
            name = request.name if isinstance(request, RosterAdd) else None
            return self.admin_roster(request.conference, request.fingerprint, now, add=add,
                                     name=name)  # fmt: skip
        if isinstance(request, admin.Rekey):
            return self.admin_rekey(request.conference, now)
        raise AdminError(f"op {request.op} is not served by the KMF (ops: {', '.join(KMF_OPS)})")

    def _admin_conference(self, conference_id: str) -> Conference:
        conf = self.state.conferences.get(conference_id)
        if conf is None:
            raise AdminError(
                f"unknown conference {conference_id[:64]!r}: "
                + (", ".join(self.state.conferences) or "none configured")
            )
        return conf

    def admin_conferences(self, now: float) -> list[dict[str, object]]:
        return [
            {
                "id": c.id,
                "members": len(c.members),
                "roster": len(c.participants),
                "spi": c.current.spi if c.current is not None else None,
                "cipher": c.cipher,
                "rekey_pending": c.pending is not None,
            }
            for c in self.state.conferences.values()
        ]

    def admin_members(self, conference_id: str, now: float) -> list[dict[str, object]]:
        conf = self._admin_conference(conference_id)
        out: list[dict[str, object]] = []
        for aid, member in conf.members.items():
            assoc = self.associations.get(aid)
            out.append(
                {
                    "name": assoc.name if assoc is not None else None,
                    "fingerprint": member.fingerprint,
                    "association": str(aid),
                    "spi": member.spi,
                    "joined_s": round(now - member.joined, 3),
                    "mdd": assoc.tunnel.peer if assoc is not None else None,
                }
            )
        return out

    def admin_kick(
        self, conference_id: str, who: str, now: float, *, ban: bool = False
    ) -> dict[str, object]:
        """Remove the members whose certificate name or fingerprint is ``who``: close_notify
        on each association (the endpoint's sign that the operator removed it, D33), then
        EndpointDisconnect to its MDD (as for any association we end, D3), then a new EKTKey
        for everyone else at once, past the rekey window. ``ban`` also takes the fingerprint
        off the roster (persisted as a :class:`RosterEdit`)."""
        conf = self._admin_conference(conference_id)
        try:
            fingerprint: str | None = parse_fingerprint(who)
        except IdentityError:
            fingerprint = None
        victims = [
            a
            for aid in list(conf.members)
            if (a := self.associations.get(aid)) is not None
            and (a.fingerprint == fingerprint if fingerprint is not None else a.name == who)
        ]
        if not victims:
            raise AdminError(f"conference {conf.id}: no member named {who[:100]!r}")
        kicked = []
        for assoc in victims:
            kicked.append(
                {
                    "name": assoc.name,
                    "fingerprint": assoc.fingerprint,
                    "association": str(assoc.association_id),
                }
            )
            self._events.append(
                Kicked(conf.id, assoc.association_id, assoc.fingerprint or "?", assoc.name, ban)
            )
            self._audit(
                AuditRecord(
                    "kick",
                    conference=conf.id,
                    fingerprint=assoc.fingerprint,
                    name=assoc.name,
                    association_id=assoc.association_id,
                    spi=assoc.spi,
                    mdd_fingerprint=assoc.tunnel.mdd_fingerprint,
                )
            )
            assoc.refusal = "kicked by the operator"
            assoc.connection.close(now)  # close_notify, then ConnectionClosed -> _end
            self._service(assoc, now)
        if ban:
            for fp in {a.fingerprint for a in victims if a.fingerprint is not None}:
                self._set_listed(conf, fp, False, None)
        spi = None
        if conf.current is not None and conf.members:
            try:
                conf.request_rekey(now, KICK, immediate=True)
            except KeyingError as e:
                self._rekey_failed(conf, e)
            else:
                key = self._poll_conference(conf, now)
                spi = key.spi if key is not None else None
        return {"conference": conf.id, "kicked": kicked, "banned": ban, "spi": spi,
                "persisted": self.persistent}  # fmt: skip

    def admin_roster(
        self, conference_id: str, fingerprint: str, now: float, *, add: bool,
        name: str | None = None,
    ) -> dict[str, object]:  # fmt: skip
        """Put a fingerprint on the roster or take it off (members stay until kicked)."""
        conf = self._admin_conference(conference_id)
        try:
            fp = parse_fingerprint(fingerprint)
        except IdentityError as e:
            raise AdminError(str(e)) from None
        self._set_listed(conf, fp, add, name)
        return {"conference": conf.id, "fingerprint": fp, "listed": add,
                "persisted": self.persistent}  # fmt: skip

    def _set_listed(self, conf: Conference, fp: str, listed: bool, name: str | None) -> None:
        self.state.set_participant(conf.id, fp, listed=listed)
        self._events.append(RosterChanged(conf.id, fp, listed, name))
        if self.persistent:
            self._persist.append(RosterEdit(conf.id, fp, listed, name))
        event = "roster_add" if listed else "roster_remove"
        self._audit(AuditRecord(event, conference=conf.id, fingerprint=fp, name=name))

    def admin_rekey(self, conference_id: str, now: float) -> dict[str, object]:
        conf = self._admin_conference(conference_id)
        if conf.current is None:
            raise AdminError(f"conference {conf.id} has no members: nothing to rekey")
        key = self.rekey(conf.id, now)
        return {"conference": conf.id, "spi": key.spi if key is not None else None}
