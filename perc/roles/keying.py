"""The KMF's keying: one DTLS-SRTP server per tunneled association (RFC 9185 §5.4, RFC 8871).

Theory of operation
-------------------
:class:`KeyingHandler` is the :class:`perc.roles.kmf.AssociationHandler` that runs perc's
sans-IO DTLS engine. Every ``TunneledDtls`` names an association id (the MDD's UUID for one
endpoint 5-tuple, RFC 9185 §5.3); the handler keeps one ``DtlsConnection`` (server) per id and
answers through the tunnel that carried the latest datagram of that id (§5.3/§5.4 let an
association move to another tunnel, e.g. after the MDD reconnected). A joined endpoint sends
no DTLS after its EKTKey ACK, so when its tunnel has closed, what the KMF sends it (EKTKey
retransmissions, rekeys, EndpointDisconnect) goes to the open tunnels of the same MDD
certificate; the MDD that does not know the id counts and ignores it (D2).

Admission, in the order the handshake reaches each step:

1. **Cookie** (D14): a datagram for an unknown id must be a whole ClientHello; it goes to the
   stateless :class:`~perc.dtls.CookieGate` with the association id bytes as the identity (the
   KMF never sees endpoint addresses). A ClientHello without a valid cookie gets a
   HelloVerifyRequest and no state is kept; one with a valid cookie creates the association.
   ``kmf.dtls_cookies = false`` skips the gate (the ClientHello creates the association).
   Associations are bounded (``max_associations``); beyond it new ones are dropped, counted.
2. **Profile** (D18), at the ClientHello: the first profile of ``kmf.profiles`` that the
   endpoint offered and the carrying tunnel's ``SupportedProfiles`` listed; none ->
   ``handshake_failure``.
3. **Roster** (D15), when the client's certificate has been verified (``verify_peer``): the
   fingerprint and tls-id must map to a conference (:meth:`perc.keying.KeyingState.admit`),
   else ``access_denied`` (49). The EKT cipher the ServerHello selected (our preference
   AESKW256, AESKW128; the engine reports it in ``PeerIdentity.negotiated``) must be the
   conference's (one cipher per conference, see :mod:`perc.keying`), else ``handshake_failure``.
   A ClientHello without use_srtp or without an EKT cipher of ours is refused by the engine at
   once (``require_ekt``; ``handshake_failure`` before any server flight).
4. **Keys**, on ``HandshakeCompleted``: ``MediaKeys`` with the outer halves of the exporter
   output (D4) go at once to the MDD that carried the Finished; the endpoint is then a member
   of the conference, and its first EKTKey goes out with ``send_ekt_key`` (the engine
   retransmits it until the endpoint's ACK, D9): at once if it is the conference's first
   member (or ``rekey_on_join`` is off and no rekey is pending), else when the conference's
   pending rekey fires, together with every other member (the policy and why:
   :mod:`perc.keying`, "Rekey policy").

Rekeys (D22): a join or a leave asks the conference for a rekey; the conference's deadline
(the coalescing window's end, else its TTL refresh) lives in the same timer heap as the
associations' DTLS timers (no task per conference). When it fires the new key goes to every
member with ``send_ekt_key``; a newer EKTKey supersedes an unacknowledged older one in the
engine, so a slow member ends on the newest key too. A rekey that falls due while a datagram
is being handled runs from the timer task right after, never inside that handling.

Endings: when the engine reports ``ConnectionClosed`` (our fatal alert, the endpoint's alert or
close_notify, handshake or EKTKey timeout) the association is removed, its membership ends and
``EndpointDisconnect`` goes to the MDD (RFC 9185 §5.4: whoever ended it; D3), after the last
DTLS datagram (so the MDD still relays a fatal alert to the endpoint). ``EndpointDisconnect``
from the MDD removes it silently (the MDD already dropped its side). A fresh ClientHello (new
random) on a known id is a restarted endpoint (RFC 6347 §4.2.8): it passes the cookie gate
and replaces the old connection.

Timers: one task (:meth:`KeyingHandler.run`) sleeps until the earliest engine timer of all
associations, kept in a heap with lazy deletion (an entry is live only if it equals the
association's recorded deadline), so thousands of associations cost one task and one wake-up
per due timer. Handling a datagram that moves a deadline earlier wakes the task.

Logs (INFO, one line each): ``joined`` (``spi=`` is the first key's, ``first_key=now`` or
``at-rekey``), ``refused``, ``left`` with conference, association id, fingerprint, profile,
SPI and the reason; ``ektkey conference=<c> spi=<n> cipher=<1|2> ttl=<s> key=<digest>
reason=<first|join|leave|ttl|manual|join+leave...> members=<n>`` once per new key (so one
line per rekey). Key bytes are never logged. SSLKEYLOGFILE lines are
written through the ``keylog`` callback (D21, :mod:`perc.keylog`).

API::

    KeyingHandler(config: KmfConfig, *, keylog=None, max_associations=65536,
                  dtls_handshake_timeout=30.0)
    .state: perc.keying.KeyingState       .associations: dict[UUID, KmfAssociation]
    .stats: KeyingStats                   .tls_id: bytes (sent in every ServerHello)
    .rekey(conference_id) -> EktKeyMaterial | None   # new EKTKey to every member at once
    (join/leave/TTL rekeys are automatic, see perc.keying; stats.rekeys counts them)
"""

from __future__ import annotations

import base64
import heapq
import itertools
import logging
import math
import os
import uuid
from collections.abc import Callable, Sequence

import attrs
import trio

from perc.config import KmfConfig
from perc.dtls import (
    ClientOffer,
    CookieGate,
    DtlsConfiguration,
    DtlsConnection,
    PeerIdentity,
    client_offer_untrusted,
    events,
)
from perc.dtls.errors import AlertDescription
from perc.keying import (
    AESKW128,
    AESKW256,
    MANUAL,
    Conference,
    EktKeyMaterial,
    KeyingError,
    KeyingState,
    Member,
    Rekey,
    choose_profile,
    key_digest,
)
from perc.roles.kmf import KmfTunnel
from perc.srtp.errors import SrtpError
from perc.srtp.keys import outer_media_keys
from perc.wire.tunnel import MediaKeys

__all__ = [
    "DTLS_HANDSHAKE_TIMEOUT",
    "EKT_CIPHER_PREFERENCE",
    "MAX_ASSOCIATIONS",
    "KeyingHandler",
    "KeyingStats",
    "KmfAssociation",
    "random_tls_id",
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


def random_tls_id() -> str:
    """A fresh tls-id (RFC 8842 §4: 20-255 of A-Z a-z 0-9 + / - _): 32 url-safe base64 chars."""
    return base64.urlsafe_b64encode(os.urandom(24)).decode("ascii")


def _profile_text(profiles: Sequence[int]) -> str:
    return ",".join(f"0x{p:04X}" for p in profiles) or "none"


@attrs.define(eq=False)
class KmfAssociation:
    """One endpoint DTLS association at the KMF."""

    association_id: uuid.UUID
    tunnel: KmfTunnel
    """The tunnel of the latest datagram: where answers go."""
    client_random: bytes
    created: float
    ekt_cipher: int | None = None
    """The EKT cipher our ServerHello selected (the engine reports it to verify_peer)."""
    conference: Conference | None = None
    """Set when the roster admitted the endpoint (verify_peer)."""
    fingerprint: str = "?"
    profile: int | None = None
    refusal: str | None = None
    """Why we refused it (logged when the association ends)."""
    spi: int | None = None
    """SPI of the EKTKey last sent."""
    joined: float | None = None
    timer_at: float | None = None
    """The engine's deadline as recorded in the timer heap."""
    connection: DtlsConnection = attrs.field(init=False)
    """Set right after construction (its callbacks refer to this object)."""


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
    dropped_tunnel_send: int = 0
    """DTLS datagrams the tunnel did not take (closed or congested)."""
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
    """Rekeys that could not be made (SPI space exhausted: KeyingError, logged)."""


class KeyingHandler:
    """The KMF's AssociationHandler: DTLS server per association, roster, keys."""

    def __init__(
        self,
        config: KmfConfig,
        *,
        keylog: Callable[[str], None] | None = None,
        max_associations: int = MAX_ASSOCIATIONS,
        dtls_handshake_timeout: float = DTLS_HANDSHAKE_TIMEOUT,
    ) -> None:
        self.config = config
        self.state = KeyingState(config.conferences)
        self.stats = KeyingStats()
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
        # Open tunnels per MDD certificate fingerprint (a re-connected MDD, _route).
        self._open_tunnels: dict[str, list[KmfTunnel]] = {}
        # Timer heap: (deadline, tie-breaker, association id or conference id); lazy deletion:
        # an entry is live only if it equals the deadline recorded for its owner.
        self._heap: list[tuple[float, int, uuid.UUID | str]] = []
        self._conference_timers: dict[str, float] = {}
        self._seq = itertools.count()
        self._sleep_until = math.inf
        self._wake = trio.Event()
        log.info(
            "KMF keying: tls-id=%s cookies=%s profiles=%s conferences=%s",
            self.tls_id.decode(),
            "on" if self.gate is not None else "off",
            _profile_text(self.profiles),
            ",".join(self.state.conferences),
        )

    # --- AssociationHandler ------------------------------------------------------------------

    async def run(self) -> None:
        try:
            while True:
                now = trio.current_time()
                self._fire_due(now)
                deadline = self._heap[0][0] if self._heap else math.inf
                self._sleep_until = deadline
                self._wake = trio.Event()
                with trio.move_on_at(deadline):
                    await self._wake.wait()
                self.stats.timer_wakeups += 1
        finally:
            # One line of counters on shutdown (every drop has its counter).
            log.info(
                "keying stats %s associations=%d",
                " ".join(f"{k}={v}" for k, v in attrs.asdict(self.stats).items()),
                len(self.associations),
            )

    def on_tunnel_up(self, tunnel: KmfTunnel) -> None:
        self._open_tunnels.setdefault(tunnel.mdd_fingerprint, []).append(tunnel)

    def on_tunnel_down(self, tunnel: KmfTunnel) -> None:
        # Associations survive: the MDD reconnects and their datagrams come back (kmf.py).
        # Until one does, what we send them goes to that MDD's other tunnels (_route).
        same_mdd = self._open_tunnels.get(tunnel.mdd_fingerprint, [])
        if tunnel in same_mdd:
            same_mdd.remove(tunnel)
        if not same_mdd:
            self._open_tunnels.pop(tunnel.mdd_fingerprint, None)

    def on_datagram(self, association_id: uuid.UUID, data: bytes, tunnel: KmfTunnel) -> None:
        now = trio.current_time()
        assoc = self.associations.get(association_id)
        if assoc is not None:
            if tunnel.mdd_fingerprint != assoc.tunnel.mdd_fingerprint:
                # Association ids are the MDD's (RFC 9185 §5.3): another MDD naming one is
                # confused or hostile; it must not divert this endpoint's DTLS (or its keys).
                self.stats.dropped_wrong_mdd += 1
                return
            hello = client_offer_untrusted(data)
            if hello is not None and hello.client_random != assoc.client_random:
                # A restarted endpoint on the same 5-tuple (RFC 6347 §4.2.8).
                self._new_association(association_id, data, hello, tunnel, now, old=assoc)
                return
            assoc.tunnel = tunnel
            assoc.connection.receive_datagram(data, now)
            self._service(assoc, now)
            return
        hello = client_offer_untrusted(data)
        if hello is None:
            self._drop_unknown(association_id, tunnel)
            return
        self._new_association(association_id, data, hello, tunnel, now, old=None)

    def _drop_unknown(self, association_id: uuid.UUID, tunnel: KmfTunnel) -> None:
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

    def on_disconnect(self, association_id: uuid.UUID, tunnel: KmfTunnel) -> None:
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
        self._end(assoc, "EndpointDisconnect from the MDD", trio.current_time())

    # --- rekeying (D22; the policy is perc.keying's) --------------------------------------------

    def rekey(self, conference_id: str) -> EktKeyMaterial | None:
        """A new EKTKey for the conference at once, sent to every member (a pending rekey
        fires now with it); None if the conference has no members."""
        conf = self.state.conferences[conference_id]
        if conf.current is None:
            return None
        now = trio.current_time()
        try:
            conf.request_rekey(now, MANUAL, immediate=True)
        except KeyingError as e:
            self._rekey_failed(conf, e)
            return None
        return self._poll_conference(conf, now)

    def _rekey_failed(self, conf: Conference, error: KeyingError) -> None:
        # Only a runaway (65536 keys in one process for one conference, SPI space exhausted):
        # log it and stop this conference's timer rather than spin on a due deadline.
        self.stats.rekey_errors += 1
        log.warning("rekey failed conference=%s: %s (no more rekeys for it)", conf.id, error)
        self._conference_timers.pop(conf.id, None)

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
        # One line per new key (shape kept from the first-key line; reason says why).
        self._log_new_key(conf, key, rekey.reason, len(rekey.members))
        log.debug(
            "rekey detail conference=%s spi=%d previous_spi=%s joins=%d leaves=%d",
            conf.id,
            key.spi,
            rekey.previous.spi if rekey.previous is not None else "-",
            rekey.joins,
            rekey.leaves,
        )
        self._distribute(conf, key, now)

    def _distribute(
        self, conf: Conference, key: EktKeyMaterial, now: float, skip: uuid.UUID | None = None
    ) -> None:
        """Send ``key`` to every member (but ``skip``); the engine retransmits until ACK."""
        for aid in list(conf.members):
            assoc = self.associations.get(aid)
            if aid != skip and assoc is not None and assoc.connection.is_established:
                self._send_ekt_key(assoc, key, now)
                self._service(assoc, now)

    # --- associations ------------------------------------------------------------------------

    def _new_association(
        self,
        association_id: uuid.UUID,
        data: bytes,
        hello: ClientOffer,
        tunnel: KmfTunnel,
        now: float,
        *,
        old: KmfAssociation | None,
    ) -> None:
        if self.gate is not None:
            verdict = self.gate.check(data, association_id.bytes, now)
            if verdict.reply is not None:
                self.stats.cookies_sent += 1
                if not tunnel.send_dtls(association_id, verdict.reply):
                    self.stats.dropped_tunnel_send += 1
                return
            if not verdict.accepted:
                self._drop_unknown(association_id, tunnel)
                return
        if old is not None:
            self.stats.restarts += 1
            del self.associations[association_id]
            self._end(old, "restarted with a new ClientHello", now)
        elif len(self.associations) >= self.max_associations:
            self.stats.dropped_capacity += 1
            return
        assoc = KmfAssociation(
            association_id=association_id,
            tunnel=tunnel,
            client_random=hello.client_random,
            created=now,
        )
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
        # The engine refuses these offers at once (require_ekt, use_srtp); say why in our log.
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
        """Send what the engine queued and act on its events; then re-arm its timer."""
        conn = assoc.connection
        while True:
            self._flush(assoc)
            event = conn.next_event()
            if event is None:
                break
            if isinstance(event, events.HandshakeCompleted):
                self._completed(assoc, event, now)
            elif isinstance(event, events.EktKeyAcknowledged):
                self.stats.ekt_keys_acknowledged += 1
                log.debug(
                    "EKTKey acknowledged association=%s spi=%d",
                    assoc.association_id,
                    event.spi,
                )
            elif isinstance(event, events.ConnectionClosed):
                self._flush(assoc)
                if self.associations.get(assoc.association_id) is assoc:
                    del self.associations[assoc.association_id]
                    self._end(assoc, event.reason, now, closed=event)
                return
        self._schedule(assoc)

    def _route(self, assoc: KmfAssociation) -> list[KmfTunnel]:
        """Where to send for ``assoc``: its latest tunnel, or if that closed, the open tunnels
        of the same MDD (it reconnected; a joined endpoint sends no DTLS that would tell us
        which one, and an MDD runs one tunnel per conference, D1). A tunnel that does not
        know the association id counts and ignores what we send (D2)."""
        tunnel = assoc.tunnel
        if tunnel.is_open:
            return [tunnel]
        others = [t for t in self._open_tunnels.get(tunnel.mdd_fingerprint, ()) if t.is_open]
        if len(others) == 1:
            assoc.tunnel = others[0]
        return others

    def _flush(self, assoc: KmfAssociation) -> None:
        datagrams = assoc.connection.datagrams_to_send()
        if not datagrams:
            return
        tunnels = self._route(assoc)
        aid = assoc.association_id
        for datagram in datagrams:
            sent = False
            for tunnel in tunnels:
                sent = tunnel.send_dtls(aid, datagram) or sent
            if not sent:
                self.stats.dropped_tunnel_send += 1

    def _completed(
        self, assoc: KmfAssociation, event: events.HandshakeCompleted, now: float
    ) -> None:
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
        if not assoc.tunnel.send_media_keys(keys):
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
        if key is not None:
            if first:
                self._log_new_key(conf, key, "first", len(conf.members))
            self._send_ekt_key(assoc, key, now)
        first_key = key
        if key is None:
            # Its first EKTKey is the pending rekey's (perc.keying: the joiner never holds a
            # key used before it joined); the conference timer sends it to everyone.
            self.stats.joins_waited_for_rekey += 1
            first_key = conf.pending
        log.info(
            "joined conference=%s association=%s fingerprint=%s profile=0x%04X spi=%d "
            "ekt_cipher=%d mdd=%s members=%d first_key=%s",
            conf.id,
            aid,
            event.peer_fingerprint,
            event.srtp_profile,
            first_key.spi if first_key is not None else -1,
            event.ekt_cipher,
            assoc.tunnel.peer,
            len(conf.members),
            "now" if key is not None else "at-rekey",
        )
        # The pending rekey's deadline, or (first member) the TTL refresh.
        self._schedule_conference(conf)

    @staticmethod
    def _log_new_key(conf: Conference, key: EktKeyMaterial, reason: str, members: int) -> None:
        log.info(
            "ektkey conference=%s spi=%d cipher=%d ttl=%d key=%s reason=%s members=%d",
            conf.id,
            key.spi,
            key.cipher,
            key.ttl,
            key_digest(key.key, key.salt),
            reason,
            members,
        )

    def _send_ekt_key(self, assoc: KmfAssociation, key: EktKeyMaterial, now: float) -> None:
        assoc.connection.send_ekt_key(key.key, key.salt, key.spi, key.ttl, now)
        assoc.spi = key.spi
        self.stats.ekt_keys_sent += 1

    def _end(
        self,
        assoc: KmfAssociation,
        reason: str,
        now: float,
        closed: events.ConnectionClosed | None = None,
    ) -> None:
        """Forget an association already removed from the table; tell the MDD if we ended it."""
        assoc.timer_at = None
        conf = assoc.conference
        aid = assoc.association_id
        if assoc.joined is not None and conf is not None:
            try:
                conf.leave(aid, now)  # may request a rekey (D22: rekey_on_leave)
            except KeyingError as e:
                self._rekey_failed(conf, e)
            else:
                self._schedule_conference(conf)
            self.stats.left += 1
            log.info(
                "left conference=%s association=%s fingerprint=%s profile=0x%04X spi=%s "
                "members=%d reason=%s",
                conf.id,
                aid,
                assoc.fingerprint,
                assoc.profile or 0,
                assoc.spi,
                len(conf.members),
                reason,
            )
        elif assoc.refusal is not None:
            self.stats.refused += 1
            log.info(
                "refused association=%s fingerprint=%s conference=%s profile=%s: %s (%s)",
                aid,
                assoc.fingerprint,
                conf.id if conf is not None else "-",
                f"0x{assoc.profile:04X}" if assoc.profile is not None else "-",
                assoc.refusal,
                reason,
            )
        else:
            self.stats.failed += 1
            log.info(
                "handshake ended association=%s fingerprint=%s: %s",
                aid,
                assoc.fingerprint,
                reason,
            )
        # RFC 9185 §5.4 / D3: the association ended on the DTLS side; tell the MDD.
        if closed is not None:
            for tunnel in self._route(assoc):
                if tunnel.send_disconnect(aid):
                    self.stats.disconnects_sent += 1

    # --- timers ------------------------------------------------------------------------------

    def _push(self, deadline: float, owner: uuid.UUID | str) -> None:
        heap = self._heap
        heapq.heappush(heap, (deadline, next(self._seq), owner))
        if len(heap) > 2 * (len(self.associations) + len(self._conference_timers)) + 1024:
            # Too many stale entries: rebuild from the live deadlines.
            live: list[tuple[float, int, uuid.UUID | str]] = [
                (a.timer_at, next(self._seq), a.association_id)
                for a in self.associations.values()
                if a.timer_at is not None
            ]
            live.extend((t, next(self._seq), cid) for cid, t in self._conference_timers.items())
            heapq.heapify(live)
            self._heap = live
        if deadline < self._sleep_until:
            self._sleep_until = deadline
            self._wake.set()

    def _schedule(self, assoc: KmfAssociation) -> None:
        deadline = assoc.connection.get_timer()
        if deadline == assoc.timer_at:
            return
        assoc.timer_at = deadline
        if deadline is not None:
            self._push(deadline, assoc.association_id)

    def _schedule_conference(self, conf: Conference) -> None:
        """Arm the conference's timer (pending rekey or TTL refresh) in the shared heap.

        A rekey due now is not run here but by the timer task right away, so that it never
        runs inside the handling of one association's events."""
        deadline = conf.next_deadline()
        if deadline == self._conference_timers.get(conf.id):
            return
        if deadline is None:
            self._conference_timers.pop(conf.id, None)
            return
        self._conference_timers[conf.id] = deadline
        self._push(deadline, conf.id)

    def _fire_due(self, now: float) -> None:
        heap = self._heap
        due: list[KmfAssociation] = []
        due_conferences: list[Conference] = []
        while heap and heap[0][0] <= now:
            deadline, _, owner = heapq.heappop(heap)
            if isinstance(owner, str):
                if self._conference_timers.get(owner) == deadline:
                    del self._conference_timers[owner]
                    due_conferences.append(self.state.conferences[owner])
                continue
            assoc = self.associations.get(owner)
            if assoc is not None and assoc.timer_at == deadline:
                assoc.timer_at = None
                due.append(assoc)
        for assoc in due:
            if self.associations.get(assoc.association_id) is not assoc:
                continue
            assoc.connection.handle_timer(now)
            self._service(assoc, now)
        for conf in due_conferences:
            self._poll_conference(conf, now)
