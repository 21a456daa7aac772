"""Cascade links between MDDs (D25), sans-IO: the DTLS-SRTP associations of one conference's
links, their retries, liveness and keys.

API::

    manager = LinkManager(conference, certificate, private_key, keylog=None)
    manager.add(LinkSpec(peer=("192.0.2.7", 5004), fingerprint="sha-256 AB:...", connect=True),
                now)                              # from config or programmatically (D27)
    manager.remove(peer, now)
    manager.is_peer(addr)                         # DTLS from it is the link's, never the KMF's
    manager.receive(addr, data, now)              # DTLS from a link peer
    manager.media_before_keys(addr, now)          # SRTP from a peer whose link has no keys
    manager.datagrams_to_send() -> [(addr, bytes)]
    manager.next_change() -> LinkKeyed | LinkLost | None   # for the forwarding table
    manager.next_event() -> perc.events.Event | None       # for the log
    manager.get_timer() -> float;  manager.handle_timer(now)
    manager.close(now)                            # close_notify on every link
    manager.links -> dict[addr, Link]             # Link.state, .stats, .association

Theory of operation
-------------------
A *link* joins two MDDs that serve one conference (RFC 8871 §4.1, D16, D25). It is a DTLS 1.2
association between the two conference UDP ports, run by perc's own engine
(:class:`perc.dtls.DtlsConnection`) with this MDD's certificate; the peer's certificate must
have the configured fingerprint (D20), else the handshake ends with a fatal
``bad_certificate`` alert, counted and reported once per link (:class:`~perc.events.LinkRefused`).
It offers ``use_srtp`` with SRTP_AEAD_AES_128_GCM (0x0007) and SRTP_AEAD_AES_256_GCM (0x0008)
and no EKT; the SRTP master keys and salts come from the exporter (RFC 5764 §4.2): the client
sends with the client_write values. The KMF never sees any of it: link DTLS never enters a
tunnel, and the link keys never leave this module and the forwarding table.

*Who dials.* The side configured with ``connect = true`` is the DTLS client. It starts a
handshake at once, and after a failed attempt (no answer within :data:`ATTEMPT_TIMEOUT`, or
an alert) again after a backoff of :data:`RETRY_MIN` doubling to :data:`RETRY_MAX`. The other
side answers a whole ClientHello from the configured address with a stateless
HelloVerifyRequest cookie (D14) and one that returns the cookie with a new server connection;
the established one stays until the new handshake completes, then is replaced (so a forged
ClientHello, which cannot complete without the peer's key, changes nothing).

*Restarts.* A restarted listener cannot dial, so it *pokes* the dialer: an unprotected DTLS
HelloRequest (RFC 5246 §7.4.1.1, "please start a new handshake"), sent at start, on the
backoff schedule while the link is down, and whenever the peer sends it media or DTLS that no
connection can take (the dialer still thinks the link is up), at most once per
:data:`POKE_GAP`. A dialer answers a poke with a new attempt unless one started less than
:data:`POKE_GAP` ago; a forged poke costs at most that. Media from a link peer before its link
is keyed is dropped and counted (``dropped_not_keyed``) and triggers the same.

*Liveness.* Both sides send a DTLS application-data record every :data:`KEEPALIVE`; a link
that heard no authenticated record for :data:`DEAD_AFTER` is down (its table entry goes, its
SSRCs are free again) and the dialer retries. A peer's close_notify or fatal alert takes it
down at once.

*Routing records.* While a new handshake runs beside an established association, a datagram
whose first record is epoch 0 goes to the new one; any other goes to the established one
first and, if it does not open there, to the new one.

Time is injected and the manager wakes on a fixed :data:`TICK` while it has links, so new
input never makes :meth:`LinkManager.get_timer` earlier.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable
from typing import Any

import attrs
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from perc import events
from perc.dtls import CookieGate, DtlsConfiguration, DtlsConnection, PeerIdentity
from perc.dtls import events as dtls_events
from perc.dtls.errors import AlertDescription
from perc.dtls.offer import client_offer_untrusted
from perc.identity import fingerprint_matches
from perc.keying import key_digest
from perc.logsetup import format_address
from perc.srtp.keys import SrtpProfile, split_exporter
from perc.wire.dtls import (
    DTLS_1_2,
    ContentType,
    DtlsDecodeError,
    DtlsRecord,
    HandshakeType,
    encode_handshake,
    encode_record,
    parse_datagram_untrusted,
    parse_handshake_fragments_untrusted,
)

__all__ = [
    "ATTEMPT_TIMEOUT",
    "DEAD_AFTER",
    "KEEPALIVE",
    "LINK_PROFILES",
    "POKE_GAP",
    "RETRY_MAX",
    "RETRY_MIN",
    "TICK",
    "Link",
    "LinkKeyed",
    "LinkKeys",
    "LinkLost",
    "LinkManager",
    "LinkSpec",
    "LinkState",
    "LinkStats",
    "hello_request",
]

#: An MDD peer's UDP address as ``recvfrom`` gives it (opaque, hashable).
Address = tuple[Any, ...]

#: use_srtp profiles a link offers, in preference order (D25).
LINK_PROFILES = (int(SrtpProfile.AEAD_AES_128_GCM), int(SrtpProfile.AEAD_AES_256_GCM))
KEEPALIVE = 1.0
"""Seconds between keepalive records on an established link."""
DEAD_AFTER = 5.0
"""Seconds without an authenticated record after which a link is down."""
RETRY_MIN = 1.0
"""First retry delay of the dialing side (and poke interval of the other), doubling ..."""
RETRY_MAX = 30.0
"""... up to this (D25)."""
ATTEMPT_TIMEOUT = 5.0
"""Seconds one handshake attempt may take."""
POKE_GAP = 1.0
"""Least seconds between two pokes sent, and between two attempts started by pokes."""
TICK = 0.25
"""The manager's wake-up period while it has links (timers are served on these ticks)."""
_KEEPALIVE_RECORD = b"\x00"


def hello_request() -> bytes:
    """An unprotected DTLS HelloRequest (epoch 0, message_seq 0): the listener's poke."""
    body = encode_handshake(HandshakeType.HELLO_REQUEST, 0, b"")
    return encode_record(DtlsRecord(ContentType.HANDSHAKE, DTLS_1_2, 0, 0, body))


def _first_record(data: bytes) -> DtlsRecord | None:
    records, _ = parse_datagram_untrusted(data)
    return records[0] if records else None


def _is_hello_request(record: DtlsRecord) -> bool:
    if record.content_type != ContentType.HANDSHAKE or record.epoch != 0:
        return False
    try:
        fragments = parse_handshake_fragments_untrusted(record.fragment)
    except DtlsDecodeError:
        return False
    return fragments[0].msg_type == HandshakeType.HELLO_REQUEST


@attrs.frozen
class LinkSpec:
    """One link as configured (``[[conference.link]]``) or made by a supervisor (D27)."""

    peer: Address
    """The other MDD's conference UDP address, as ``recvfrom`` reports it."""
    fingerprint: str
    """The other MDD's certificate fingerprint (D20, canonical)."""
    connect: bool
    """This side dials (DTLS client); the other side has False."""
    name: str = ""
    """How events name the link (default: the peer's address)."""
    group: str | None = None
    """Split-horizon group: media from a link never goes to a link of the same group (D27's
    worker mesh); None: a group of its own (D26)."""

    @property
    def label(self) -> str:
        return self.name or format_address(self.peer)


@attrs.frozen(repr=False)
class LinkKeys:
    """A link's SRTP master keys and salts by direction (from the exporter)."""

    profile: int
    inbound: tuple[bytes, bytes]
    outbound: tuple[bytes, bytes]

    def __repr__(self) -> str:  # never print key material
        return f"LinkKeys(profile=0x{self.profile:04X})"

    @property
    def digest(self) -> str:
        """One-way digest for logs (the same on both sides: sorted by direction)."""
        a, b = sorted((self.inbound, self.outbound))
        return key_digest(a[0], b[0], a[1], b[1])


@attrs.frozen
class LinkKeyed:
    """For the forwarding table: ``link`` has (new) keys; replace its entry."""

    link: Link
    keys: LinkKeys


@attrs.frozen
class LinkLost:
    """For the forwarding table: ``link`` is down; remove its entry."""

    link: Link
    reason: str


class LinkState(enum.Enum):
    DOWN = "down"
    CONNECTING = "connecting"
    UP = "up"


@attrs.define
class LinkStats:
    """Counters of one link (its forwarding counters are the table entry's)."""

    attempts: int = 0
    """Handshakes started (dialing side) or answered (listening side)."""
    handshakes: int = 0
    """Handshakes completed (the link keyed, or re-keyed)."""
    failures: int = 0
    """Handshakes that ended without completing (timeout, alerts)."""
    refused: int = 0
    """Handshakes from the peer's address with another certificate (fatal alert sent)."""
    downs: int = 0
    pokes_sent: int = 0
    pokes_received: int = 0
    dropped_not_keyed: int = 0
    """SRTP/SRTCP from the peer while the link had no keys."""
    dropped_dtls: int = 0
    """DTLS from the peer that no connection took (a poke to a listener, a stray record)."""
    keepalives: int = 0


class Link:
    """One link's state (owned by :class:`LinkManager`; read-only for others)."""

    def __init__(self, spec: LinkSpec) -> None:
        self.spec = spec
        self.state = LinkState.DOWN
        self.stats = LinkStats()
        self.established: DtlsConnection | None = None
        self.pending: DtlsConnection | None = None
        self.pending_random = b""
        self.attempt_at = float("-inf")
        """When the last handshake attempt started."""
        self.backoff = RETRY_MIN
        self.next_try = 0.0
        """Dialer: next attempt; listener: next poke (while down)."""
        self.last_poke = float("-inf")
        self.last_heard = 0.0
        self.next_keepalive = 0.0
        self.keys: LinkKeys | None = None
        self.association: Any = None
        """The forwarding table's entry id while keyed (set by the MDD engine)."""
        self.refused_reported = False
        self.refused_fingerprint = ""
        self.profile = 0

    @property
    def peer(self) -> Address:
        return self.spec.peer

    @property
    def label(self) -> str:
        return self.spec.label


class LinkManager:
    """Every link of one conference (see the module docstring)."""

    def __init__(
        self,
        conference: str,
        certificate: x509.Certificate,
        private_key: ec.EllipticCurvePrivateKey,
        *,
        keylog: Callable[[str], None] | None = None,
    ) -> None:
        self.conference = conference
        self._certificate = certificate
        self._private_key = private_key
        self._keylog = keylog
        self.links: dict[Address, Link] = {}
        self._out: list[tuple[Address, bytes]] = []
        self._changes: deque[LinkKeyed | LinkLost] = deque()
        self._events: deque[events.Event] = deque()
        self._next_tick = float("inf")
        self._cookies = CookieGate()

    # --- configuration ---------------------------------------------------------------------

    def add(self, spec: LinkSpec, now: float) -> Link:
        if spec.peer in self.links:
            raise ValueError(f"a link to {spec.label} exists already")
        link = self.links[spec.peer] = Link(spec)
        if spec.connect:
            self._attempt(link, now)
        else:
            self._poke(link, now)
            link.next_try = now + link.backoff
        self._next_tick = min(self._next_tick, now + TICK)
        return link

    def remove(self, peer: Address, now: float) -> None:
        link = self.links.pop(peer, None)
        if link is None:
            return
        if link.established is not None:
            link.established.close(now)
            self._collect(link, link.established, now)
        if link.state is LinkState.UP:
            self._changes.append(LinkLost(link, "removed"))
        if not self.links:
            self._next_tick = float("inf")

    def is_peer(self, addr: Address) -> bool:
        return addr in self.links

    # --- outputs ---------------------------------------------------------------------------

    def datagrams_to_send(self) -> list[tuple[Address, bytes]]:
        out = self._out
        self._out = []
        return out

    def next_change(self) -> LinkKeyed | LinkLost | None:
        return self._changes.popleft() if self._changes else None

    def next_event(self) -> events.Event | None:
        return self._events.popleft() if self._events else None

    def get_timer(self) -> float:
        return self._next_tick

    # --- input -----------------------------------------------------------------------------

    def receive(self, addr: Address, data: bytes, now: float) -> None:
        """DTLS from a link peer (never raises on its content)."""
        link = self.links.get(addr)
        if link is None:
            return
        record = _first_record(data)
        if record is None:
            link.stats.dropped_dtls += 1
            return
        if _is_hello_request(record):
            link.stats.pokes_received += 1
            if link.spec.connect and now - link.attempt_at >= POKE_GAP:
                self._attempt(link, now)
            return
        if record.epoch == 0:
            offer = client_offer_untrusted(data) if not link.spec.connect else None
            est = link.established
            if (
                offer is not None
                and (link.pending is None or offer.client_random != link.pending_random)
                and not (
                    est is not None
                    and est.negotiated is not None
                    and est.negotiated.client_random == offer.client_random
                )  # a late copy of the live association's own ClientHello
            ):
                # A stateless cookie first (D14): a ClientHello with the peer's address forged
                # costs us neither state nor a signature.
                verdict = self._cookies.check(data, format_address(addr).encode(), now)
                if verdict.reply is not None:
                    self._out.append((addr, verdict.reply))
                    return
                if not verdict.accepted:
                    link.stats.dropped_dtls += 1
                    return
                self._answer(link, offer.client_random, now)
            if link.pending is not None:
                self._feed(link, link.pending, data, now)
            else:
                link.stats.dropped_dtls += 1
            return
        est = link.established
        if est is not None and self._feed(link, est, data, now):
            return
        if link.pending is not None:
            self._feed(link, link.pending, data, now)
            return
        if est is None:
            # Protected records and no association: the peer thinks the link is up.
            link.stats.dropped_dtls += 1
            self._stray(link, now)

    def media_before_keys(self, addr: Address, now: float) -> None:
        """SRTP/SRTCP from a peer whose link has no keys: dropped and counted."""
        link = self.links.get(addr)
        if link is None:
            return
        link.stats.dropped_not_keyed += 1
        self._stray(link, now)

    def handle_timer(self, now: float) -> None:
        if now < self._next_tick:
            return
        self._next_tick = now + TICK if self.links else float("inf")
        for link in list(self.links.values()):
            for conn in (link.pending, link.established):
                if conn is not None:
                    timer = conn.get_timer()
                    if timer is not None and timer <= now:
                        conn.handle_timer(now)
                        self._collect(link, conn, now)
            if link.state is LinkState.UP:
                if now - link.last_heard > DEAD_AFTER:
                    self._lost(link, f"no record for {DEAD_AFTER:g} s", now)
                elif (
                    now >= link.next_keepalive
                    and link.established is not None
                    and link.established.is_established
                ):
                    link.next_keepalive = now + KEEPALIVE
                    link.stats.keepalives += 1
                    link.established.send_application_data(_KEEPALIVE_RECORD, now)
                    self._collect(link, link.established, now)
            if link.state is not LinkState.UP and now >= link.next_try:
                if link.spec.connect:
                    if link.pending is None:
                        self._attempt(link, now)
                elif link.pending is None:
                    self._poke(link, now)
                    link.next_try = now + link.backoff
                    link.backoff = min(link.backoff * 2, RETRY_MAX)

    def close(self, now: float) -> None:
        """close_notify on every established link (at exit: the peers notice at once)."""
        for link in self.links.values():
            if link.established is not None:
                link.established.close(now)
                self._out += [(link.peer, d) for d in link.established.datagrams_to_send()]

    # --- internals -------------------------------------------------------------------------

    def _configuration(self, link: Link, *, client: bool) -> DtlsConfiguration:
        expected = link.spec.fingerprint

        def verify(peer: PeerIdentity) -> int | None:
            if fingerprint_matches(peer.fingerprint, expected):
                return None
            link.refused_fingerprint = peer.fingerprint
            return int(AlertDescription.bad_certificate)

        return DtlsConfiguration(
            is_client=client,
            certificate=self._certificate,
            private_key=self._private_key,
            srtp_profiles=LINK_PROFILES,
            ekt_ciphers=(),
            verify_peer=verify,
            handshake_timeout=ATTEMPT_TIMEOUT,
            keylog=self._keylog,
        )

    def _attempt(self, link: Link, now: float) -> None:
        """Dialer: a new handshake (replacing one in progress)."""
        conn = DtlsConnection(self._configuration(link, client=True))
        link.pending = conn
        link.attempt_at = now
        link.stats.attempts += 1
        link.next_try = float("inf")  # set again when this attempt fails
        if link.state is LinkState.DOWN:
            link.state = LinkState.CONNECTING
        conn.connect(now)
        self._collect(link, conn, now)

    def _answer(self, link: Link, client_random: bytes, now: float) -> None:
        """Listener: a new server connection for a new ClientHello from the peer."""
        link.pending = DtlsConnection(self._configuration(link, client=False))
        link.pending_random = client_random
        link.attempt_at = now
        link.stats.attempts += 1
        if link.state is LinkState.DOWN:
            link.state = LinkState.CONNECTING

    def _poke(self, link: Link, now: float) -> None:
        link.last_poke = now
        link.stats.pokes_sent += 1
        self._out.append((link.peer, hello_request()))

    def _stray(self, link: Link, now: float) -> None:
        """The peer sends as if the link were up while it has no keys here: a listener pokes,
        a dialer starts a handshake (each at most once per POKE_GAP)."""
        if link.state is LinkState.UP:
            return
        if link.spec.connect:
            if now - link.attempt_at >= POKE_GAP:
                self._attempt(link, now)
        elif now - link.last_poke >= POKE_GAP:
            self._poke(link, now)

    def _feed(self, link: Link, conn: DtlsConnection, data: bytes, now: float) -> bool:
        """Give ``data`` to ``conn``; False if its records did not open there."""
        st = conn.stats
        before = st.dropped_decrypt + st.dropped_epoch
        conn.receive_datagram(data, now)
        opened = st.dropped_decrypt + st.dropped_epoch == before
        self._collect(link, conn, now)
        return opened

    def _collect(self, link: Link, conn: DtlsConnection, now: float) -> None:
        """Send what ``conn`` queued and act on its events."""
        for d in conn.datagrams_to_send():
            self._out.append((link.peer, d))
        while (ev := conn.next_event()) is not None:
            if isinstance(ev, dtls_events.HandshakeCompleted):
                self._completed(link, conn, ev, now)
            elif isinstance(ev, dtls_events.ConnectionClosed):
                self._closed(link, conn, ev, now)
            elif isinstance(ev, dtls_events.ApplicationDataReceived) and conn is link.established:
                link.last_heard = now

    def _completed(
        self, link: Link, conn: DtlsConnection, ev: dtls_events.HandshakeCompleted, now: float
    ) -> None:
        material = ev.srtp_keying_material
        if conn is not link.pending or ev.srtp_profile not in LINK_PROFILES or material is None:
            conn.abort(int(AlertDescription.handshake_failure), now)
            return
        km = split_exporter(ev.srtp_profile, material)
        client = (km.client_key, km.client_salt)
        server = (km.server_key, km.server_salt)
        keys = LinkKeys(
            profile=ev.srtp_profile,
            inbound=server if link.spec.connect else client,
            outbound=client if link.spec.connect else server,
        )
        replaced = link.state is LinkState.UP
        link.established = conn
        link.pending = None
        link.pending_random = b""
        link.state = LinkState.UP
        link.keys = keys
        link.profile = ev.srtp_profile
        link.backoff = RETRY_MIN
        link.next_try = float("inf")
        link.last_heard = now
        link.next_keepalive = now + KEEPALIVE
        link.stats.handshakes += 1
        self._changes.append(LinkKeyed(link, keys))
        self._events.append(
            events.LinkUp(
                conference=self.conference,
                link=link.label,
                peer=format_address(link.peer),
                fingerprint=ev.peer_fingerprint,
                profile=ev.srtp_profile,
                role="client" if link.spec.connect else "server",
                keys=keys.digest,
                replaced=replaced,
            )
        )

    def _closed(
        self, link: Link, conn: DtlsConnection, ev: dtls_events.ConnectionClosed, now: float
    ) -> None:
        if conn is link.pending:
            link.pending = None
            link.pending_random = b""
            if link.refused_fingerprint:
                link.stats.refused += 1
                if not link.refused_reported:
                    link.refused_reported = True
                    self._events.append(
                        events.LinkRefused(
                            conference=self.conference,
                            link=link.label,
                            peer=format_address(link.peer),
                            fingerprint=link.refused_fingerprint,
                            expected=link.spec.fingerprint,
                        )
                    )
                link.refused_fingerprint = ""
            else:
                link.stats.failures += 1
            if link.state is LinkState.CONNECTING:
                link.state = LinkState.DOWN
            if link.spec.connect and link.state is not LinkState.UP:
                self._schedule_retry(link, now)
        elif conn is link.established:
            self._lost(link, ev.reason, now, closed=True)

    def _schedule_retry(self, link: Link, now: float) -> None:
        link.next_try = now + link.backoff
        link.backoff = min(link.backoff * 2, RETRY_MAX)

    def _lost(self, link: Link, reason: str, now: float, *, closed: bool = False) -> None:
        est = link.established
        link.established = None
        link.keys = None
        if est is not None and not closed:
            est.close(now)
            for d in est.datagrams_to_send():
                self._out.append((link.peer, d))
        link.state = LinkState.CONNECTING if link.pending is not None else LinkState.DOWN
        link.stats.downs += 1
        link.backoff = RETRY_MIN
        retry: float | None = None
        if link.pending is None:
            link.next_try = now + RETRY_MIN
            retry = RETRY_MIN
        self._changes.append(LinkLost(link, reason))
        self._events.append(
            events.LinkDown(
                conference=self.conference,
                link=link.label,
                peer=format_address(link.peer),
                reason=reason,
                retry_in=retry if link.spec.connect else None,
            )
        )
