"""The Media Distributor (MDD) role: DTLS relay to the KMF over the tunnel (RFC 9185 §5.3).

Theory of operation
-------------------
Per configured conference (D1) a :class:`ConferenceRelay` runs three tasks:

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
  fresh version 4 UUID, RFC 9185 §5.3); 128-191 is SRTP/SRTCP, dropped and counted until the
  media issue; anything else is dropped and counted (RFC 7983: MUST drop). DTLS arriving while
  the tunnel is down is dropped and counted, not buffered (the endpoint retransmits).
* **Idle sweep**: an association whose endpoint has sent nothing for ``idle_timeout`` (D3,
  default 10 s) is dropped and ``EndpointDisconnect`` sent to the KMF.

From the KMF: ``TunneledDtls`` becomes one UDP datagram to the association's endpoint;
``EndpointDisconnect`` drops the association and its keys (D3); ``MediaKeys`` is checked and
stored on it as :class:`HopKeys` (the profile and the four outer values, D4; the media issue
turns them into SRTP contexts). ``MediaKeys`` is the MDD's only source of keys: it never sees
an EKTKey or an end-to-end key (RFC 8871 §3.1). SRTP that arrives before its association's
keys is dropped and counted (``dropped_srtp_no_keys``) until the forwarding core, which holds
up to 64 such packets per association (D5), is wired in by the media issue. A message naming
an unknown association id is counted and ignored (D2). The association table is bounded
(``max_associations`` per conference).

API::

    serve(config: MddConfig, *, task_status=trio.TASK_STATUS_IGNORED)   # started(MddServer)
    MddServer.conferences: dict[str, ConferenceRelay]
    ConferenceRelay: .address (UDP), .stats: RelayStats, .associations: dict[UUID, Association],
                     .tunnel_is_up, .tunnel_stats, .kmf_highest_version, wait_changed()
    Association: association_id, conference, address, created, last_seen, keys: HopKeys | None,
                 media_keys, counters
    HopKeys: profile, client_key, server_key, client_salt, server_salt (repr hides them)
"""

from __future__ import annotations

import logging
import socket
import uuid
from typing import Any

import attrs
import trio

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
    "MDD_PROFILES",
    "Association",
    "ConferenceRelay",
    "HopKeys",
    "MddServer",
    "RelayStats",
    "serve",
]

log = logging.getLogger(__name__)

#: The profiles an MDD can act as Media Distributor for: the DOUBLE profiles (D18).
MDD_PROFILES = (0x0009, 0x000A)
#: A tunnel that stayed up this long (seconds) resets the reconnect backoff.
STABLE_AFTER = 5.0
#: Datagrams handled per receive batch before yielding to other tasks.
UDP_BATCH = 256
_UDP_MAX = 65535
_CONNECT_TIMEOUT = 10.0


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
    counters. The media issue adds the SRTP state (perc.forwarding)."""

    association_id: uuid.UUID
    conference: str
    address: tuple[Any, ...]
    """The endpoint's socket address as recvfrom gave it ((host, port), or the 4-tuple of
    IPv6); with the conference's socket, the 5-tuple."""
    created: float
    last_seen: float
    keys: HopKeys | None = None
    """The hop-by-hop keys (outer halves, D4) from the KMF's MediaKeys, once received."""
    media_keys: MediaKeys | None = None
    """The MediaKeys message ``keys`` came from."""
    dtls_in: int = 0
    """DTLS datagrams from the endpoint."""
    dtls_out: int = 0
    """DTLS datagrams sent to the endpoint."""
    srtp_in: int = 0
    """SRTP/SRTCP packets from the endpoint (dropped until the media issue)."""
    srtp_no_keys: int = 0
    """Of those, packets that arrived before the association's MediaKeys."""


@attrs.define
class RelayStats:
    """Counters of one conference relay; every drop has its counter."""

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
    dropped_srtp: int = 0
    """SRTP/SRTCP (first byte 128-191): dropped until the media issue (all of them)."""
    dropped_srtp_no_keys: int = 0
    """Of those, packets whose association had no keys yet (or no association); D5 will hold
    up to 64 of these per association once the forwarding core is wired in."""
    dropped_other: int = 0
    """Datagrams that are neither DTLS nor SRTP (RFC 7983 §7: drop), including empty ones."""
    dropped_unknown_association: int = 0
    """Messages from the KMF naming an association we do not have (D2: count and ignore)."""
    dropped_udp_send: int = 0
    """DTLS for an endpoint that the socket refused."""
    udp_receive_errors: int = 0


class ConferenceRelay:
    """One conference: its UDP socket, its tunnel to the KMF and its association table."""

    def __init__(self, conference: MddConference, config: MddConfig) -> None:
        self.conference = conference
        self.id = conference.id
        self.settings = config.mdd
        self.stats = RelayStats()
        self.associations: dict[uuid.UUID, Association] = {}
        self._by_address: dict[tuple[Any, ...], Association] = {}
        self.address: tuple[str, int] = ("", 0)
        #: Highest tunnel version the KMF said it supports (RFC 9185 §5.5), if it ever did.
        self.kmf_highest_version: int | None = None
        self._tunnel: TunnelConnection | None = None
        self._sock: socket.socket | None = None
        self._changed = trio.Event()
        self._version_refused = False
        expected = conference.kmf_fingerprint
        self._context = make_tls_context(
            config.identity,
            server=False,
            is_trusted=lambda fp: fingerprint_matches(fp, expected),
        )

    # --- observation -------------------------------------------------------------------------

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
            # Room for bursts between two drains (the kernel caps this at rmem_max).
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
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
                task_status.started(self)
        finally:
            trio.lowlevel.notify_closing(sock)
            sock.close()

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
                self.stats.connect_failures += 1
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
                self.stats.protocol_errors += 1
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
        self.stats.tunnels_up += 1
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
                elif not self._control(msg, conn):
                    return

    def _control(self, msg: TunnelMessage, conn: TunnelConnection) -> bool:
        """Handle a non-DTLS message from the KMF; False ends the session."""
        if isinstance(msg, EndpointDisconnect):
            assoc = self.associations.get(msg.association_id)
            if assoc is None:
                self.stats.dropped_unknown_association += 1
                return True
            self.stats.associations_ended_by_kmf += 1
            self._drop(assoc)
            log.info(
                "association ended by KMF conference=%s association=%s peer=%s",
                self.id,
                assoc.association_id,
                format_address(assoc.address),
            )
            return True
        if isinstance(msg, MediaKeys):
            assoc = self.associations.get(msg.association_id)
            if assoc is None:
                self.stats.dropped_unknown_association += 1
                return True
            keys = HopKeys.from_media_keys(msg)
            if keys is None:
                self.stats.media_keys_rejected += 1
                log.warning(
                    "media keys rejected conference=%s association=%s profile=0x%04X: "
                    "profile, MKI or key/salt lengths do not fit D4/D18",
                    self.id,
                    assoc.association_id,
                    msg.protection_profile,
                )
                return True
            self.stats.media_keys += 1
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
            self._notify()
            return True
        if isinstance(msg, UnsupportedVersion):
            # RFC 9185 §5.5: remember it, discard the rest, close.
            self.stats.unsupported_version += 1
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

    async def _to_endpoint(self, msg: TunneledDtls) -> None:
        assoc = self.associations.get(msg.association_id)
        sock = self._sock
        if assoc is None or sock is None:
            self.stats.dropped_unknown_association += 1
            return
        try:
            sock.sendto(msg.dtls_message, assoc.address)
        except BlockingIOError:
            # Wait only on EAGAIN (STYLE practice 11), then try once more.
            await trio.lowlevel.wait_writable(sock)
            try:
                sock.sendto(msg.dtls_message, assoc.address)
            except OSError:
                self.stats.dropped_udp_send += 1
                return
        except OSError as e:
            self.stats.dropped_udp_send += 1
            log.debug(
                "udp send failed conference=%s association=%s peer=%s: %s",
                self.id,
                assoc.association_id,
                format_address(assoc.address),
                e,
            )
            return
        assoc.dtls_out += 1
        self.stats.dtls_to_endpoint += 1

    # --- UDP ---------------------------------------------------------------------------------

    async def _udp_loop(self, sock: socket.socket) -> None:
        buf = bytearray(_UDP_MAX)
        view = memoryview(buf)
        recv = sock.recvfrom_into
        while True:
            await trio.lowlevel.wait_readable(sock)
            now = trio.current_time()
            for _ in range(UDP_BATCH):
                try:
                    n, addr = recv(buf)
                except BlockingIOError:
                    break
                except OSError as e:
                    self.stats.udp_receive_errors += 1
                    log.debug("udp receive error conference=%s: %s", self.id, e)
                    continue
                self._from_endpoint(bytes(view[:n]), addr, now)
            else:
                # A full batch: let other tasks (the tunnel writer) run before draining more.
                await trio.lowlevel.checkpoint()

    def _from_endpoint(self, data: bytes, addr: tuple[Any, ...], now: float) -> None:
        self.stats.datagrams_in += 1
        first = data[0] if data else -1
        assoc = self._by_address.get(addr)
        if 20 <= first <= 63:  # DTLS (RFC 7983 §7)
            tunnel = self._tunnel
            if assoc is None:
                if tunnel is None or not tunnel.is_open:
                    self.stats.dropped_no_tunnel += 1
                    return
                if len(self.associations) >= self.conference.max_associations:
                    self.stats.dropped_table_full += 1
                    return
                assoc = self._create(addr, now)
            assoc.last_seen = now
            assoc.dtls_in += 1
            if tunnel is None:
                self.stats.dropped_no_tunnel += 1
            elif tunnel.send_encoded(
                encode_message(TunneledDtls(assoc.association_id, data)), droppable=True
            ):
                self.stats.dtls_to_kmf += 1
            elif tunnel.is_open:
                self.stats.dropped_backpressure += 1
            else:
                self.stats.dropped_no_tunnel += 1
        elif 128 <= first <= 191:  # SRTP/SRTCP: the media issue forwards these
            if assoc is not None:
                assoc.last_seen = now
                assoc.srtp_in += 1
                if assoc.keys is None:
                    assoc.srtp_no_keys += 1
                    self.stats.dropped_srtp_no_keys += 1
            else:
                self.stats.dropped_srtp_no_keys += 1
            self.stats.dropped_srtp += 1
        else:
            self.stats.dropped_other += 1

    def _create(self, addr: tuple[Any, ...], now: float) -> Association:
        # RFC 9185 §5.3: a version 4 (random) UUID per association.
        assoc = Association(
            association_id=uuid.uuid4(),
            conference=self.id,
            address=addr,
            created=now,
            last_seen=now,
        )
        self.associations[assoc.association_id] = assoc
        self._by_address[addr] = assoc
        self.stats.associations_created += 1
        log.info(
            "association new conference=%s association=%s peer=%s",
            self.id,
            assoc.association_id,
            format_address(addr),
        )
        self._notify()
        return assoc

    def _drop(self, assoc: Association) -> None:
        # D3: the association's keys go with it.
        assoc.keys = None
        assoc.media_keys = None
        self.associations.pop(assoc.association_id, None)
        if self._by_address.get(assoc.address) is assoc:
            del self._by_address[assoc.address]
        self._notify()

    # --- idle timeout (D3) -------------------------------------------------------------------

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
        self.stats.associations_idle += 1
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
        async with trio.open_nursery() as nursery:
            for relay in self.conferences.values():
                await nursery.start(relay.run)
            task_status.started(self)


async def serve(
    config: MddConfig, *, task_status: trio.TaskStatus[MddServer] = trio.TASK_STATUS_IGNORED
) -> None:
    """Run the MDD until cancelled; ``task_status.started(MddServer)`` once every conference's
    UDP socket is bound (the tunnels connect in the background)."""
    await MddServer(config).serve(task_status=task_status)
