"""The Media Distributor (MDD) role: DTLS relay to the KMF over the tunnel (RFC 9185 §5.3).

Theory of operation
-------------------
Per configured conference (D1) a :class:`ConferenceRelay` runs four tasks:

* **Tunnel** (TLS client): connects to the conference's KMF, pins its certificate
  fingerprint (a different KMF fails the handshake), sends ``SupportedProfiles(0, [0x0009,
  0x000A])`` first (D18), then reads. When the tunnel ends it reconnects after a capped
  exponential backoff (``reconnect_min`` doubling up to ``reconnect_max``; reset once a tunnel
  stayed up or carried a message). An ``UnsupportedVersion`` answer is remembered
  (RFC 9185 §5.5) and logged; perc speaks only version 0, so the next attempt still uses the
  lower of 0 and the remembered version, after the longest backoff.
* **UDP** (endpoint side): one socket on ``listen``. The receive loop drains the non-blocking
  socket until it would block, then waits for readability (STYLE practice 11), and
  demultiplexes on the first byte (RFC 7983 §7, SPEC 2.8): 20-63 is DTLS and goes to the KMF
  as ``TunneledDtls`` with the association id of the sender's 5-tuple (a new 5-tuple gets a
  fresh version 4 UUID, RFC 9185 §5.3); 128-191 is SRTP/SRTCP and goes to the conference's
  :class:`perc.forwarding.ForwardingTable` (below); anything else is dropped and counted
  (RFC 7983: MUST drop). DTLS arriving while the tunnel is down is dropped and counted, not
  buffered (the endpoint retransmits, and a joining endpoint times out with its own message).
* **Idle sweep**, and **upkeep and counters**: an association whose endpoint has sent nothing for
  ``idle_timeout`` (D3, default 10 s) is dropped and ``EndpointDisconnect`` sent to the KMF.
  Every ~250 ms the table's ``tick`` keeps the last_n ranking fresh; every ``stats_interval``
  (default 10 s) the per-association forwarding counters that changed are logged (INFO,
  ``counters conference=<id> association=<uuid> in=... out=... drops: ...``), and all of them
  when an association ends and at exit.

**Forwarding** (RFC 8723 §5.2, SPEC 4.5, 4.7). One :class:`~perc.forwarding.ForwardingTable`
per conference (``last_n``, ``video_payload_types``, ``max_associations`` from the config)
holds one forwarding association per MDD association, under the same association id: added
with the association, given its hop-by-hop keys on ``MediaKeys`` (``install_keys``; what it
returns is the D5 hold of up to 64 datagrams that arrived before the keys, sent at once) and
removed with it (``EndpointDisconnect`` either way, idle timeout). Every SRTP/SRTCP datagram
goes through ``handle_datagram`` and every ``(address, datagram)`` it returns is sent with the
non-blocking ``sendto``; only on EAGAIN does the loop wait for writability, then retries
(a bounded wait: a receiver whose socket stays full loses that datagram, counted in
``dropped_udp_send``). Each receive batch shares one ``now``; a full batch checkpoints so
the tunnel tasks run (STYLE practice 11). The per-delivery work is the table's (one AES-GCM
seal) plus one ``sendto`` system call. Measured (bench/forwarding.py, 2-core machine, 160-byte
audio to 10 receivers): about 5.8 us of CPU per delivery, of which ``sendto`` (the kernel's
loopback path) is about 3.7 us, the forwarding core about 1.5 us and this loop well under
0.2 us; a plain Python relay without crypto spends about 3.7 us.

**The tunnel going down changes nothing for media.** The keys live in the table, not in the
tunnel: while the tunnel is down and reconnecting, joined endpoints keep talking; only DTLS
(new joins, rekeys) is dropped. A KMF that comes back knows none of the old associations (it
ignores their DTLS, and never sends them ``EndpointDisconnect``), so they keep their keys until
they leave or go idle.

**Key isolation** (RFC 8871 §3.1, §4.1). ``MediaKeys`` is the MDD's only source of keys and
carries only the outer halves (D4); the process never imports the code that unwraps EKT tags
or removes the inner layer. At exit the MDD logs which of :data:`E2E_MODULES` are loaded in
the process (``key isolation: end-to-end modules loaded: none``; a WARNING naming them otherwise)
so a system test can check it on a real ``perc mdd`` process.

From the KMF: ``TunneledDtls`` becomes one UDP datagram to the association's endpoint;
``EndpointDisconnect`` drops the association and its keys (D3); ``MediaKeys`` is checked and
stored on it as :class:`HopKeys` (the profile and the four outer values, D4) and installed in
the forwarding table. A message naming an unknown association id is counted and ignored (D2).
The association table is bounded (``max_associations`` per conference).

API::

    serve(config: MddConfig, *, task_status=trio.TASK_STATUS_IGNORED)   # started(MddServer)
    MddServer.conferences: dict[str, ConferenceRelay]
    ConferenceRelay: .address (UDP), .stats: RelayStats, .associations: dict[UUID, Association],
                     .table: ForwardingTable, .tunnel_is_up, .tunnel_stats,
                     .kmf_highest_version, wait_changed(), log_counters(changed_only)
    Association: association_id, conference, address, created, last_seen, keys: HopKeys | None,
                 media_keys, media (the forwarding core's association; .counters), dtls_in,
                 dtls_out, srtp_in, srtp_no_keys
    loaded_e2e_modules() -> list[str]   # which of E2E_MODULES this process has imported
    HopKeys: profile, client_key, server_key, client_salt, server_salt (repr hides them)
"""

from __future__ import annotations

import logging
import socket
import sys
import uuid
from typing import Any

import attrs
import trio

from perc import forwarding
from perc.config import MddConference, MddConfig
from perc.identity import fingerprint_matches
from perc.keying import key_digest
from perc.roles.tunnel import (
    TunnelConnection,
    TunnelError,
    TunnelProtocolError,
    TunnelStats,
    format_address,
    make_tls_context,
)
from perc.wire.tunnel import (
    TUNNEL_VERSION,
    EndpointDisconnect,
    MediaKeys,
    SupportedProfiles,
    TunneledDtls,
    TunnelMessage,
    UnsupportedVersion,
    encode_message,
)

__all__ = [
    "E2E_MODULES",
    "MDD_PROFILES",
    "Association",
    "ConferenceRelay",
    "HopKeys",
    "MddServer",
    "RelayStats",
    "loaded_e2e_modules",
    "serve",
]

log = logging.getLogger(__name__)

#: The profiles an MDD can act as Media Distributor for: the DOUBLE profiles (D18).
MDD_PROFILES = (0x0009, 0x000A)
#: A tunnel that stayed up this long (seconds) resets the reconnect backoff.
STABLE_AFTER = 5.0
#: Datagrams handled per receive batch before yielding to other tasks (STYLE practice 11).
UDP_BATCH = 256
#: Seconds between the forwarding table's ``tick`` (last_n ranking upkeep).
TICK_INTERVAL = 0.25
#: SO_RCVBUF of the endpoint-facing socket (bytes; capped by the kernel at net.core.rmem_max).
RECEIVE_BUFFER = 4 << 20
#: Longest wait for a full socket send buffer before the datagram is dropped (seconds).
SEND_WAIT = 0.05
_UDP_MAX = 65535
_CONNECT_TIMEOUT = 10.0
#: Code that only an endpoint may run: EKT tag unwrapping and the inner (end-to-end) layer.
#: The MDD never imports them (RFC 8871 §4.1); checked at exit (loaded_e2e_modules).
E2E_MODULES = (
    "perc.srtp.ekt",
    "perc.srtp.double",
    "cryptography.hazmat.primitives.keywrap",
)

Address = tuple[Any, ...]


def loaded_e2e_modules() -> list[str]:
    """Which of :data:`E2E_MODULES` this process has imported (an MDD: none)."""
    return [name for name in E2E_MODULES if name in sys.modules]


#: Outer (HBH) key length per DOUBLE profile (D4: half of the profile's key); salts are 12.
_HALF_KEY_LENGTH = {0x0009: 16, 0x000A: 32}
_HALF_SALT_LENGTH = 12


@attrs.frozen(repr=False)
class HopKeys:
    """The hop-by-hop keys of one association, from ``MediaKeys`` (RFC 9185 §6.4, D4).

    ``client_*`` decrypt what the endpoint sends; ``server_*`` encrypt what the MDD sends to
    it. For a DOUBLE profile these are the outer halves, run with the single AES-GCM transform
    of the same key size (D18).
    """

    profile: int
    client_key: bytes
    server_key: bytes
    client_salt: bytes
    server_salt: bytes

    def __repr__(self) -> str:  # never print key material
        return f"HopKeys(profile=0x{self.profile:04X})"

    @classmethod
    def from_media_keys(cls, msg: MediaKeys) -> HopKeys | None:
        """The keys if ``msg`` fits perc's profiles (D4, D18), else None."""
        key_length = _HALF_KEY_LENGTH.get(msg.protection_profile)
        if (
            key_length is None
            or msg.mki
            or len(msg.client_write_master_key) != key_length
            or len(msg.server_write_master_key) != key_length
            or len(msg.client_write_master_salt) != _HALF_SALT_LENGTH
            or len(msg.server_write_master_salt) != _HALF_SALT_LENGTH
        ):
            return None
        return cls(
            profile=msg.protection_profile,
            client_key=msg.client_write_master_key,
            server_key=msg.server_write_master_key,
            client_salt=msg.client_write_master_salt,
            server_salt=msg.server_write_master_salt,
        )


@attrs.define(eq=False)
class Association:
    """One endpoint DTLS association as the MDD sees it: address, keys (from MediaKeys only),
    DTLS counters, and its forwarding-core twin (``media``: SRTP state and counters)."""

    association_id: uuid.UUID
    conference: str
    address: Address
    """The endpoint's socket address as recvfrom gave it ((host, port), or the 4-tuple of
    IPv6); with the conference's socket, the 5-tuple."""
    created: float
    media: forwarding.Association[Address]
    """The forwarding table's association (same id): SRTP sessions, routes, counters."""
    keys: HopKeys | None = None
    """The hop-by-hop keys (outer halves, D4) from the KMF's MediaKeys, once received."""
    media_keys: MediaKeys | None = None
    """The MediaKeys message ``keys`` came from."""
    dtls_in: int = 0
    """DTLS datagrams from the endpoint."""
    dtls_out: int = 0
    """DTLS datagrams sent to the endpoint."""

    @property
    def last_seen(self) -> float:
        """When the endpoint last sent anything (DTLS or SRTP; D3 idle timeout)."""
        return self.media.last_seen

    @last_seen.setter
    def last_seen(self, now: float) -> None:
        self.media.last_seen = now

    @property
    def srtp_in(self) -> int:
        """SRTP/SRTCP datagrams from the endpoint (held ones counted once)."""
        c = self.media.counters
        return c.received  # the table counts a held datagram once (on arrival)

    @property
    def srtp_no_keys(self) -> int:
        """Of those, datagrams that arrived before the association's MediaKeys: held (D5) or,
        beyond 64, dropped (``media.counters.drop_queue_full``)."""
        c = self.media.counters
        return c.held + c.drop_queue_full


@attrs.define
class RelayStats:
    """Counters of one conference relay; every drop has its counter.

    The SRTP fields (``datagrams_in`` includes SRTP) are computed from the forwarding table
    when :attr:`ConferenceRelay.stats` is read; the per-association detail is in
    ``Association.media.counters`` and in the ``counters`` log lines.
    """

    datagrams_in: int = 0
    dtls_to_kmf: int = 0
    dtls_to_endpoint: int = 0
    associations_created: int = 0
    associations_idle: int = 0
    """Associations dropped after idle_timeout (EndpointDisconnect sent when the tunnel was up)."""
    associations_ended_by_kmf: int = 0
    media_keys: int = 0
    """MediaKeys installed on an association."""
    media_keys_rejected: int = 0
    """MediaKeys whose profile, MKI or lengths do not fit D4/D18 (logged, ignored)."""
    tunnels_up: int = 0
    connect_failures: int = 0
    unsupported_version: int = 0
    protocol_errors: int = 0
    dropped_no_tunnel: int = 0
    """DTLS from an endpoint while the tunnel was down."""
    dropped_backpressure: int = 0
    """DTLS for the KMF dropped because the tunnel's send queue was full."""
    dropped_table_full: int = 0
    """DTLS from a new 5-tuple while max_associations were in use."""
    srtp_in: int = 0
    """SRTP/SRTCP datagrams received (first byte 128-191)."""
    srtp_out: int = 0
    """SRTP/SRTCP datagrams the forwarding table produced for receivers (sent or dropped)."""
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
    dropped_other: int = 0
    """Datagrams that are neither DTLS nor SRTP (RFC 7983 §7: drop), including empty ones."""
    dropped_unknown_association: int = 0
    """Messages from the KMF naming an association we do not have (D2: count and ignore)."""
    dropped_udp_send: int = 0
    """Datagrams (DTLS or SRTP) for an endpoint that the socket refused."""
    send_waits: int = 0
    """Times a send found the socket buffer full (EAGAIN) and waited for it to drain."""
    udp_receive_errors: int = 0


#: Forwarding counters summed into RelayStats.dropped_srtp (drop_last_n is per receiver).
_PACKET_DROPS = (
    "drop_auth",
    "drop_replay",
    "drop_malformed",
    "drop_queue_full",
    "drop_no_keys",
    "drop_ssrc_conflict",
    "drop_limit",
)


class ConferenceRelay:
    """One conference: its UDP socket, its tunnel to the KMF and its association table."""

    def __init__(self, conference: MddConference, config: MddConfig) -> None:
        self.conference = conference
        self.id = conference.id
        self.settings = config.mdd
        self._stats = RelayStats()
        self.associations: dict[uuid.UUID, Association] = {}
        self._by_address: dict[Address, Association] = {}
        self.table: forwarding.ForwardingTable[Address] = forwarding.ForwardingTable(
            forwarding.ForwardingConfig(
                last_n=conference.last_n,
                video_payload_types=frozenset(conference.video_payload_types),
                max_associations=conference.max_associations,
            )
        )
        #: Forwarding counters of associations that ended, summed (for the conference totals).
        self._retired: dict[str, int] = {}
        #: The counters last logged per association (periodic logs show only what changed).
        self._logged: dict[uuid.UUID, dict[str, int]] = {}
        self.address: tuple[str, int] = ("", 0)
        #: Highest tunnel version the KMF said it supports (RFC 9185 §5.5), if it ever did.
        self.kmf_highest_version: int | None = None
        self._tunnel: TunnelConnection | None = None
        self._sock: socket.socket | None = None
        self._changed = trio.Event()
        self._version_refused = False
        #: Datagrams received that were not SRTP/SRTCP (those are counted by the table).
        self._other_in = 0
        #: One task at a time waits for the socket to become writable (see _wait_writable).
        self._write_lock = trio.Lock()
        expected = conference.kmf_fingerprint
        self._context = make_tls_context(
            config.identity,
            server=False,
            is_trusted=lambda fp: fingerprint_matches(fp, expected),
        )

    # --- observation -------------------------------------------------------------------------

    @property
    def stats(self) -> RelayStats:
        """The relay's counters, SRTP fields brought up to date from the forwarding table."""
        st = self._stats
        totals = dict(self._retired)
        for name, value in self.table.snapshot(trio.current_time()).totals().items():
            totals[name] = totals.get(name, 0) + value
        unknown = self.table.stats.unknown_source
        held = totals.get("held", 0)
        received = totals.get("received", 0)  # held datagrams counted once (on arrival)
        st.srtp_in = unknown + received
        st.datagrams_in = self._other_in + st.srtp_in
        st.srtp_out = totals.get("packets_out", 0)
        st.dropped_srtp = unknown + sum(totals.get(k, 0) for k in _PACKET_DROPS)
        st.srtp_held = held
        st.dropped_srtp_no_keys = unknown + held + totals.get("drop_queue_full", 0)
        return st

    @property
    def tunnel_is_up(self) -> bool:
        return self._tunnel is not None and self._tunnel.is_open

    @property
    def tunnel_stats(self) -> TunnelStats | None:
        """Counters of the current tunnel connection (None while it is down)."""
        return self._tunnel.stats if self._tunnel is not None else None

    async def wait_changed(self) -> None:
        """Wait for the next tunnel up/down or association table change."""
        await self._changed.wait()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    @property
    def version(self) -> int:
        """The tunnel version we send: ours, lowered to the KMF's answer if it gave one (§5.5)."""
        if self.kmf_highest_version is None:
            return TUNNEL_VERSION
        return min(TUNNEL_VERSION, self.kmf_highest_version)

    # --- lifetime ----------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[ConferenceRelay]) -> None:
        listen = self.conference.listen
        infos = socket.getaddrinfo(listen.host, listen.port, type=socket.SOCK_DGRAM)
        family, _, _, _, sockaddr = infos[0]
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            sock.bind(sockaddr)
            # Room for bursts between two drains, and for the times this process is not
            # scheduled (the kernel caps this at net.core.rmem_max).
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
            name = sock.getsockname()
            self.address = (str(name[0]), int(name[1]))
            self._sock = sock
            log.info(
                "conference=%s listening on udp %s kmf=%s",
                self.id,
                format_address(self.address),
                self.conference.kmf,
            )
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._tunnel_loop)
                nursery.start_soon(self._udp_loop, sock)
                nursery.start_soon(self._idle_loop)
                nursery.start_soon(self._housekeeping_loop)
                task_status.started(self)
        finally:
            trio.lowlevel.notify_closing(sock)
            sock.close()
            self._log_exit()

    # --- tunnel ------------------------------------------------------------------------------

    async def _tunnel_loop(self) -> None:
        delay = self.settings.reconnect_min
        kmf = self.conference.kmf
        peer = str(kmf)
        while True:
            conn: TunnelConnection | None = None
            try:
                with trio.fail_after(_CONNECT_TIMEOUT):
                    stream = await trio.open_tcp_stream(kmf.host, kmf.port)
                conn = TunnelConnection(stream, self._context, server=False, peer=peer)
                await conn.handshake(self.settings.handshake_timeout)
                # TLS 1.3: the KMF checks our certificate after our handshake has ended.
                await conn.wait_accepted(self.settings.handshake_timeout)
            except BaseException as e:
                if conn is not None:
                    await conn.aclose()
                if not isinstance(e, (OSError, trio.TooSlowError, TunnelError)):
                    raise
                self._stats.connect_failures += 1
                log.warning(
                    "tunnel connect failed conference=%s peer=%s: %s; retry in %.3g s",
                    self.id,
                    peer,
                    e or type(e).__name__,
                    delay,
                )
                await trio.sleep(delay)
                delay = min(delay * 2, self.settings.reconnect_max)
                continue
            started = trio.current_time()
            self._version_refused = False
            try:
                await conn.run(self._session)
                reason = "closed"
            except TunnelProtocolError as e:
                self._stats.protocol_errors += 1
                reason = f"protocol error (D2): {e}"
            except TunnelError as e:
                reason = str(e)
            finally:
                if self._tunnel is conn:
                    self._tunnel = None
                    self._notify()
            if self._version_refused:
                reason = "KMF answered UnsupportedVersion"
                delay = self.settings.reconnect_max
            elif trio.current_time() - started >= STABLE_AFTER or conn.stats.messages_in:
                delay = self.settings.reconnect_min
            log.warning(
                "tunnel down conference=%s peer=%s: %s; reconnect in %.3g s",
                self.id,
                peer,
                reason,
                delay,
            )
            await trio.sleep(delay)
            delay = min(delay * 2, self.settings.reconnect_max)

    async def _session(self, conn: TunnelConnection) -> None:
        # RFC 9185 §5.3: SupportedProfiles first on every connection.
        conn.send(SupportedProfiles(version=self.version, protection_profiles=MDD_PROFILES))
        self._tunnel = conn
        self._stats.tunnels_up += 1
        self._notify()
        log.info(
            "tunnel up conference=%s peer=%s kmf=%s version=%d tls=%s",
            self.id,
            conn.peer,
            conn.peer_fingerprint,
            self.version,
            conn.tls_version,
        )
        while True:
            for msg in await conn.receive_messages():
                if isinstance(msg, TunneledDtls):
                    await self._to_endpoint(msg)
                elif isinstance(msg, MediaKeys):
                    await self._send_media(self._install(msg))
                elif not self._control(msg, conn):
                    return

    def _control(self, msg: TunnelMessage, conn: TunnelConnection) -> bool:
        """Handle a non-DTLS message from the KMF; False ends the session."""
        if isinstance(msg, EndpointDisconnect):
            assoc = self.associations.get(msg.association_id)
            if assoc is None:
                self._stats.dropped_unknown_association += 1
                return True
            self._stats.associations_ended_by_kmf += 1
            self._drop(assoc)
            log.info(
                "association ended by KMF conference=%s association=%s peer=%s",
                self.id,
                assoc.association_id,
                format_address(assoc.address),
            )
            return True
        if isinstance(msg, UnsupportedVersion):
            # RFC 9185 §5.5: remember it, discard the rest, close.
            self._stats.unsupported_version += 1
            self._version_refused = True
            self.kmf_highest_version = msg.highest_version
            log.error(
                "tunnel refused conference=%s peer=%s: KMF does not support tunnel version %d "
                "(its highest is %d; perc speaks only version %d)",
                self.id,
                conn.peer,
                self.version,
                msg.highest_version,
                TUNNEL_VERSION,
            )
            return False
        raise TunnelProtocolError(f"{type(msg).__name__} is not sent by a KMF")

    def _install(self, msg: MediaKeys) -> list[tuple[Address, bytes]]:
        """MediaKeys: check, store, install in the forwarding table; returns the D5 release."""
        assoc = self.associations.get(msg.association_id)
        if assoc is None:
            self._stats.dropped_unknown_association += 1
            return []
        keys = HopKeys.from_media_keys(msg)
        released: list[tuple[Address, bytes]] = []
        if keys is not None:
            try:
                released = self.table.install_keys(msg, trio.current_time())
            except forwarding.MediaKeysError as e:  # e.g. equal client/server keys (§5.2)
                log.warning("media keys unusable: %s", e)
                keys = None
        if keys is None:
            self._stats.media_keys_rejected += 1
            log.warning(
                "media keys rejected conference=%s association=%s profile=0x%04X: "
                "profile, MKI or key/salt lengths do not fit D4/D18",
                self.id,
                assoc.association_id,
                msg.protection_profile,
            )
            return []
        self._stats.media_keys += 1
        replaced = assoc.keys is not None
        assoc.keys = keys
        assoc.media_keys = msg
        log.info(
            "keys installed conference=%s association=%s peer=%s profile=0x%04X keys=%s%s",
            self.id,
            assoc.association_id,
            format_address(assoc.address),
            keys.profile,
            key_digest(keys.client_key, keys.server_key, keys.client_salt, keys.server_salt),
            " (replaced)" if replaced else "",
        )
        if released:
            log.debug(
                "keys released held media conference=%s association=%s datagrams_out=%d",
                self.id,
                assoc.association_id,
                len(released),
            )
        self._notify()
        return released

    async def _to_endpoint(self, msg: TunneledDtls) -> None:
        assoc = self.associations.get(msg.association_id)
        sock = self._sock
        if assoc is None or sock is None:
            self._stats.dropped_unknown_association += 1
            return
        try:
            sock.sendto(msg.dtls_message, assoc.address)
        except BlockingIOError:
            # Wait only on EAGAIN (STYLE practice 11), then try once more.
            await self._wait_writable(sock)
            try:
                sock.sendto(msg.dtls_message, assoc.address)
            except OSError:
                self._stats.dropped_udp_send += 1
                return
        except OSError as e:
            self._stats.dropped_udp_send += 1
            log.debug(
                "udp send failed conference=%s association=%s peer=%s: %s",
                self.id,
                assoc.association_id,
                format_address(assoc.address),
                e,
            )
            return
        assoc.dtls_out += 1
        self._stats.dtls_to_endpoint += 1

    async def _wait_writable(self, sock: socket.socket) -> None:
        """Wait (at most ``SEND_WAIT``) for room in the socket's send buffer. The UDP task and
        the tunnel task (DTLS to endpoints, D5 releases) both send: trio allows one waiter per
        socket, so they take turns."""
        self._stats.send_waits += 1
        async with self._write_lock:
            with trio.move_on_after(SEND_WAIT):
                await trio.lowlevel.wait_writable(sock)

    # --- UDP ---------------------------------------------------------------------------------

    async def _udp_loop(self, sock: socket.socket) -> None:
        # The hot path (STYLE practice 11): drain until EAGAIN, then one wait_readable; each
        # SRTP/SRTCP datagram goes through the table and out with non-blocking sendto calls.
        recv = sock.recvfrom
        sendto = sock.sendto
        handle = self.table.handle_datagram
        other = self._from_endpoint
        current_time = trio.current_time
        while True:
            await trio.lowlevel.wait_readable(sock)
            now = current_time()
            for _ in range(UDP_BATCH):
                try:
                    data, addr = recv(_UDP_MAX)
                except BlockingIOError:
                    break
                except OSError as e:
                    self._stats.udp_receive_errors += 1
                    log.debug("udp receive error conference=%s: %s", self.id, e)
                    continue
                if data and 128 <= data[0] <= 191:  # SRTP/SRTCP (RFC 7983 §7)
                    out = handle(addr, data, now)
                    if out:
                        datagram = b""
                        try:
                            for addr, datagram in out:
                                sendto(datagram, addr)
                        except OSError as e:
                            # Rare (EAGAIN or an ICMP error): find where we stopped, by identity.
                            index = next(i for i, o in enumerate(out) if o[1] is datagram)
                            await self._send_failed(out, index, e)
                else:
                    other(data, addr, now)
            else:
                # A full batch: let other tasks (the tunnel writer) run before draining more.
                await trio.lowlevel.checkpoint()

    async def _send_media(self, out: list[tuple[Address, bytes]]) -> None:
        """Send forwarding output outside the receive loop (D5 datagrams released by keys)."""
        sock = self._sock
        if sock is None:
            self._stats.dropped_udp_send += len(out)
            return
        for index, (addr, data) in enumerate(out):
            try:
                sock.sendto(data, addr)
            except OSError as e:
                await self._send_failed(out, index, e)
                return

    async def _send_failed(
        self, out: list[tuple[Address, bytes]], index: int, error: OSError
    ) -> None:
        """``out[index]`` raised ``error``: on EAGAIN wait (at most ``SEND_WAIT``) for room and
        retry once; any other error (or a second failure) drops that datagram, counted. Then
        go on with the rest of ``out``."""
        sock = self._sock
        if sock is None:
            self._stats.dropped_udp_send += len(out) - index
            return
        while True:
            addr, data = out[index]
            if isinstance(error, BlockingIOError):
                await self._wait_writable(sock)
                try:
                    sock.sendto(data, addr)
                except OSError:
                    self._stats.dropped_udp_send += 1
            else:
                self._stats.dropped_udp_send += 1
                log.debug(
                    "udp send failed conference=%s peer=%s: %s",
                    self.id,
                    format_address(addr),
                    error,
                )
            index += 1
            while index < len(out):
                addr, data = out[index]
                try:
                    sock.sendto(data, addr)
                except OSError as e:
                    error = e
                    break
                index += 1
            else:
                return

    def _from_endpoint(self, data: bytes, addr: Address, now: float) -> None:
        """Everything that is not SRTP/SRTCP: DTLS to the KMF, the rest dropped."""
        self._other_in += 1
        first = data[0] if data else -1
        if not 20 <= first <= 63:  # not DTLS (RFC 7983 §7: MUST drop)
            self._stats.dropped_other += 1
            return
        assoc = self._by_address.get(addr)
        tunnel = self._tunnel
        if assoc is None:
            if tunnel is None or not tunnel.is_open:
                self._stats.dropped_no_tunnel += 1
                return
            if len(self.associations) >= self.conference.max_associations:
                self._stats.dropped_table_full += 1
                return
            try:
                assoc = self._create(addr, now)
            except forwarding.ForwardingUsageError:
                # Not expected: both tables have the same members and bound. Counted, not
                # raised: one datagram must never end the receive loop.
                self._stats.dropped_table_full += 1
                return
        assoc.last_seen = now
        assoc.dtls_in += 1
        if tunnel is None:
            self._stats.dropped_no_tunnel += 1
        elif tunnel.send_encoded(
            encode_message(TunneledDtls(assoc.association_id, data)), droppable=True
        ):
            self._stats.dtls_to_kmf += 1
        elif tunnel.is_open:
            self._stats.dropped_backpressure += 1
        else:
            self._stats.dropped_no_tunnel += 1

    def _create(self, addr: Address, now: float) -> Association:
        # RFC 9185 §5.3: a version 4 (random) UUID per association; the forwarding table's
        # association has the same id.
        aid = uuid.uuid4()
        assoc = Association(
            association_id=aid,
            conference=self.id,
            address=addr,
            created=now,
            media=self.table.add(aid, addr, now),
        )
        self.associations[aid] = assoc
        self._by_address[addr] = assoc
        self._stats.associations_created += 1
        log.info(
            "association new conference=%s association=%s peer=%s",
            self.id,
            aid,
            format_address(addr),
        )
        self._notify()
        return assoc

    def _drop(self, assoc: Association) -> None:
        # D3: the association's keys go with it, in the table too (no forwarding to or from
        # it from now on); its final counters are logged and kept in the conference totals.
        assoc.keys = None
        assoc.media_keys = None
        self.associations.pop(assoc.association_id, None)
        if self._by_address.get(assoc.address) is assoc:
            del self._by_address[assoc.address]
        if self.table.remove(assoc.association_id):
            counters = assoc.media.counters.as_dict()
            for name, value in counters.items():
                self._retired[name] = self._retired.get(name, 0) + value
            self._logged.pop(assoc.association_id, None)
            log.info(
                "counters conference=%s %s (final)",
                self.id,
                _counter_line(assoc.association_id, counters),
            )
        self._notify()

    # --- idle timeout (D3), table upkeep and counter logs ------------------------------------

    async def _idle_loop(self) -> None:
        timeout = self.settings.idle_timeout
        while True:
            now = trio.current_time()
            next_check = now + timeout
            for assoc in list(self.associations.values()):
                expires = assoc.last_seen + timeout
                if expires <= now:
                    self._expire(assoc)
                else:
                    next_check = min(next_check, expires)
            # Coalesce wake-ups: at most ~8 sweeps per timeout period.
            await trio.sleep_until(max(next_check, now + timeout / 8))

    def _expire(self, assoc: Association) -> None:
        self._stats.associations_idle += 1
        self._drop(assoc)
        tunnel = self._tunnel
        sent = tunnel is not None and tunnel.send(
            EndpointDisconnect(association_id=assoc.association_id)
        )
        log.info(
            "association idle conference=%s association=%s peer=%s: dropped, EndpointDisconnect %s",
            self.id,
            assoc.association_id,
            format_address(assoc.address),
            "sent" if sent else "not sent (tunnel down)",
        )

    async def _housekeeping_loop(self) -> None:
        interval = self.settings.stats_interval
        next_log = trio.current_time() + interval
        while True:
            await trio.sleep(TICK_INTERVAL)
            now = trio.current_time()
            self.table.tick(now)
            if now >= next_log:
                next_log = now + interval
                self.log_counters(changed_only=True)

    def log_counters(self, *, changed_only: bool) -> int:
        """Log one ``counters`` line per association (only those whose counters changed since
        they were last logged, if ``changed_only``); returns how many lines were logged."""
        snapshot = self.table.snapshot(trio.current_time())
        logged = 0
        for aid, counters in snapshot.associations.items():
            last = self._logged.get(aid)
            if changed_only and (counters == last or (last is None and not any(counters.values()))):
                continue  # unchanged (a new association with nothing counted yet included)
            self._logged[aid] = counters
            log.info("counters conference=%s %s", self.id, _counter_line(aid, counters))
            logged += 1
        return logged

    def _log_exit(self) -> None:
        self.log_counters(changed_only=False)
        st = self.stats
        log.info(
            "totals conference=%s associations=%d created=%d srtp_in=%d srtp_out=%d "
            "dropped_srtp=%d held=%d unknown_source=%d send_waits=%d dropped_udp_send=%d "
            "dtls_to_kmf=%d dtls_to_endpoint=%d dropped_no_tunnel=%d",
            self.id,
            len(self.associations),
            st.associations_created,
            st.srtp_in,
            st.srtp_out,
            st.dropped_srtp,
            st.srtp_held,
            self.table.stats.unknown_source,
            st.send_waits,
            st.dropped_udp_send,
            st.dtls_to_kmf,
            st.dtls_to_endpoint,
            st.dropped_no_tunnel,
        )


def _counter_line(aid: uuid.UUID, c: dict[str, int]) -> str:
    drops = " ".join(f"{k[5:]}={v}" for k, v in c.items() if k.startswith("drop_") and v)
    return (
        f"association={aid} in={c['packets_in']}/{c['bytes_in']}B "
        f"out={c['packets_out']}/{c['bytes_out']}B rtcp={c['rtcp_in']}/{c['rtcp_out']} "
        f"held={c['held']} drops: {drops or 'none'}"
    )


def _log_key_isolation() -> None:
    loaded = loaded_e2e_modules()
    if loaded:
        # An MDD process never imports these; a test process that also runs endpoints does.
        log.warning("key isolation: end-to-end modules loaded: %s", ",".join(loaded))
    else:
        log.info(
            "key isolation: end-to-end modules loaded: none (checked %s)", ",".join(E2E_MODULES)
        )


class MddServer:
    """The running MDD: one :class:`ConferenceRelay` per configured conference."""

    def __init__(self, config: MddConfig) -> None:
        self.config = config
        self.conferences = {c.id: ConferenceRelay(c, config) for c in config.conferences}

    async def serve(self, *, task_status: trio.TaskStatus[MddServer]) -> None:
        log.info(
            "MDD starting fingerprint=%s conferences=%s",
            self.config.identity.fingerprint,
            ",".join(self.conferences),
        )
        try:
            async with trio.open_nursery() as nursery:
                for relay in self.conferences.values():
                    await nursery.start(relay.run)
                task_status.started(self)
        finally:
            _log_key_isolation()


async def serve(
    config: MddConfig, *, task_status: trio.TaskStatus[MddServer] = trio.TASK_STATUS_IGNORED
) -> None:
    """Run the MDD until cancelled; ``task_status.started(MddServer)`` once every conference's
    UDP socket is bound (the tunnels connect in the background)."""
    await MddServer(config).serve(task_status=task_status)
