"""The Media Distributor (MDD) role: the trio shell around :class:`perc.mdd.MddEngine`.

Theory of operation
-------------------
Every decision about associations, keys, demultiplexing, idle expiry and counters is the
engine's (:mod:`perc.mdd`, sans-IO). Per configured conference (D1) a :class:`ConferenceRelay`
owns what the engine cannot: one UDP socket, the TLS tunnel to the KMF
(:mod:`perc.roles.tunnel`), the clock and three tasks. After each input it gives the engine,
it sends what the engine queued and logs the engine's events (:func:`perc.events.emit`).

* **UDP**, the hot path (STYLE practice 11): drain the non-blocking socket until it would
  block, then one ``wait_readable``; every datagram goes to ``engine.receive_datagram`` with
  the batch's ``now``, and what that produced goes out at once with non-blocking ``sendto``.
  Only on EAGAIN does a send wait for writability (at most ``SEND_WAIT``) and retry once; a
  receiver whose socket stays full loses that datagram, counted. A full batch checkpoints.
  A D27 worker's mesh socket receives with ``UDP_GRO`` (several datagrams of one sender per
  receive, split by :func:`perc.workers.gro_segments`), and what the worker holds back for
  its mesh peers goes out when the batch ends (:meth:`ConferenceRelay._flush`, in ``_pump``).
* **Tunnel** (TLS client, the KMF pinned by fingerprint): on connect the engine queues
  ``SupportedProfiles`` (RFC 9185 §5.3), then gets every message read. When the tunnel ends,
  or the engine wants it closed (``UnsupportedVersion``, D2), reconnect after a capped
  exponential backoff (``reconnect_min`` doubling to ``reconnect_max``; reset once a tunnel
  stayed up ``STABLE_AFTER`` or carried a message; the longest after ``UnsupportedVersion``).
* **Timer**: sleep until ``engine.get_timer()``, then ``engine.handle_timer(now)``, and send
  what that queued (cascade links' handshakes, retries and keepalives).
* **Links** (D25): at start each ``[[conference.link]]`` peer is resolved (``getaddrinfo``,
  the socket's family) to the address ``recvfrom`` will report and handed to
  ``engine.add_link``; at exit every link gets a close_notify before the socket closes, so
  the peer MDDs notice at once.

At exit each relay logs every association's counters and the totals, and the server which
end-to-end modules the process loaded (key isolation, RFC 8871 §4.1).

API::

    serve(config: MddConfig, *, task_status=trio.TASK_STATUS_IGNORED)   # started(MddServer)
    MddServer.conferences: dict[str, ConferenceRelay]
    ConferenceRelay: .engine, .address (UDP), .io (IoStats), .forwarding_cpu (s), .tunnel_stats,
                     .changed (trio_util.AsyncValue), wait_changed(), and the engine's .stats,
                     .associations, .kmf_highest_version, .tunnel_is_up
"""

from __future__ import annotations

import gc
import logging
import socket
import uuid
from collections.abc import Callable
from functools import partial
from time import thread_time
from typing import TYPE_CHECKING, Any

import attrs
import trio
from trio_util import AsyncValue

from perc import events, forwarding
from perc.admin import MDD_OPS, AdminError, Links, Request
from perc.config import MddConference, MddConfig
from perc.identity import fingerprint_matches
from perc.links import LinkSpec
from perc.mdd import Address, MddEngine, MddStats, key_isolation
from perc.roles.admin import serve_admin
from perc.roles.metrics import serving as serving_metrics
from perc.roles.tunnel import (
    TunnelConnection,
    TunnelError,
    TunnelProtocolError,
    TunnelStats,
    make_tls_context,
    tunnel_keylog,
)
from perc.workers import MESH_BATCH, gro_segments

if TYPE_CHECKING:
    from prometheus_client.registry import Collector

__all__ = ["ConferenceRelay", "IoStats", "MddServer", "serve"]

log = logging.getLogger(__name__)

#: A tunnel that stayed up this long (seconds) resets the reconnect backoff.
STABLE_AFTER = 5.0
#: Datagrams handled per receive batch before yielding to other tasks (STYLE practice 11).
UDP_BATCH = 256
#: SO_RCVBUF of the endpoint-facing socket (bytes; capped by the kernel at net.core.rmem_max).
RECEIVE_BUFFER = 4 << 20
#: Longest wait for a full socket send buffer before the datagram is dropped (seconds).
SEND_WAIT = 0.05
_UDP_MAX = 65535
#: Room for the UDP_GRO control message (an int) of one coalesced receive.
_GRO_CMSG_SPACE = socket.CMSG_SPACE(4)
_CONNECT_TIMEOUT = 10.0
#: Log levels of the events that are not plain INFO.
_LEVELS: dict[type[events.Event], int] = {
    events.MddTunnelDown: logging.WARNING,
    events.MediaKeysRejected: logging.WARNING,
    events.MddTunnelRefused: logging.ERROR,
}


@attrs.define
class IoStats:
    """What only the shell sees: socket and tunnel-queue failures."""

    dropped_udp_send: int = 0
    """Datagrams (DTLS or SRTP) for an endpoint that the socket refused."""
    send_waits: int = 0
    """Times a send found the socket buffer full (EAGAIN) and waited for it to drain."""
    dropped_tunnel_send: int = 0
    """Messages for the KMF the tunnel connection refused (its queue full, or closing)."""
    udp_receive_errors: int = 0


class ConferenceRelay:
    """One conference: its UDP socket, its tunnel to the KMF and its engine."""

    def __init__(self, conference: MddConference, config: MddConfig) -> None:
        self.conference = conference
        self.id = conference.id
        self.settings = config.mdd
        self.engine = MddEngine.from_config(
            conference,
            config.mdd,
            identity=config.identity,
            # D21: link DTLS secrets go to SSLKEYLOGFILE too (the tunnel's writer, one file).
            keylog=tunnel_keylog() if conference.link else None,
        )
        self.io = IoStats()
        #: CPU seconds of this thread spent in the UDP loop's batches (D34 metrics).
        self.forwarding_cpu = 0.0
        self.address: tuple[str, int] = ("", 0)
        #: Counts the engine's events: in-process programs wait on it for any change.
        self.changed = AsyncValue(0)
        self._tunnel: TunnelConnection | None = None
        self._sock: socket.socket | None = None
        #: How datagrams leave; run() sets the bound socket's own sendto (see _sender).
        self._sendto: Callable[[bytes, Address], int] = self._send_on_socket
        #: Addresses whose datagrams the hot loops hand to :meth:`_hold` instead of sending
        #: them from the conference socket (a D27 worker's mesh peers; empty otherwise).
        self._held_peers: frozenset[Address] | set[Address] = frozenset()
        #: One task at a time waits for the socket to become writable (see _wait_writable).
        self._write_lock = trio.Lock()
        expected = conference.kmf_fingerprint
        self._context = make_tls_context(
            config.identity,
            server=False,
            is_trusted=lambda fp: fingerprint_matches(fp, expected),
        )

    # --- observation (the engine's state) ------------------------------------------------------

    @property
    def stats(self) -> MddStats:
        return self.engine.stats

    @property
    def associations(self) -> dict[uuid.UUID, forwarding.Association[Address]]:
        return self.engine.associations

    @property
    def kmf_highest_version(self) -> int | None:
        return self.engine.kmf_highest_version

    @property
    def tunnel_is_up(self) -> bool:
        return self.engine.tunnel_is_up

    @property
    def tunnel_stats(self) -> TunnelStats | None:
        """Counters of the current tunnel connection (None while it is down)."""
        return self._tunnel.stats if self._tunnel is not None else None

    async def wait_changed(self) -> None:
        """Wait for the engine's next event (tunnel up/down, association changes, counters)."""
        await self.changed.wait_transition()

    # --- the engine's outputs ------------------------------------------------------------------

    def _pump(self) -> None:
        """Send what the relay held back (:meth:`_flush`), hand the engine's tunnel messages
        to the tunnel and log its events (no waiting)."""
        self._flush()
        engine = self.engine
        messages = engine.tunnel_messages_to_send()
        if messages:
            tunnel = self._tunnel
            for msg in messages:
                if tunnel is None or not tunnel.send(msg):
                    self.io.dropped_tunnel_send += 1
        logged = 0
        while (event := engine.next_event()) is not None:
            events.emit(log, event, _LEVELS.get(type(event), logging.INFO))
            logged += 1
        if logged:
            self.changed.value += logged

    # --- lifetime ------------------------------------------------------------------------------

    def _open_socket(self) -> socket.socket:
        """The conference's UDP socket, bound (a D27 worker adopts its supervisor's)."""
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
        except BaseException:
            sock.close()
            raise
        return sock

    def _send_on_socket(self, data: bytes, addr: Address) -> int:
        if self._sock is None:
            raise OSError("the conference socket is not bound")
        return self._sock.sendto(data, addr)

    def _sender(self, sock: socket.socket) -> Callable[[bytes, Address], int]:
        """How datagrams leave (a D27 worker sends to its mesh peers from another socket)."""
        return sock.sendto

    def _sendto_plain(self) -> Callable[[bytes, Address], int]:
        """The conference socket's own sendto (for every address but :attr:`_held_peers`)."""
        return self._sock.sendto if self._sock is not None else self._send_on_socket

    def _more_sockets(self) -> list[socket.socket]:
        """Further sockets whose datagrams go to the engine (a D27 worker's mesh socket)."""
        return []

    def _coalesced(self, sock: socket.socket) -> bool:
        """Whether ``sock`` hands datagrams coalesced (``UDP_GRO``, a D27 worker's mesh)."""
        return False

    def _hold(self, data: bytes, addr: Address) -> None:
        """A datagram for one of :attr:`_held_peers` (sent now or held until :meth:`_flush`)."""
        self._sendto(data, addr)

    def _flush(self) -> None:
        """Send what the sender held back during a batch (a D27 worker's mesh datagrams)."""

    async def run(self, *, task_status: trio.TaskStatus[ConferenceRelay]) -> None:
        sock = self._open_socket()
        try:
            name = sock.getsockname()
            host, port = self.address = (str(name[0]), int(name[1]))
            self._sock = sock
            self._sendto = self._sender(sock)
            events.emit(log, events.ConferenceListening("conference", host, port, self.id))
            self._add_links(sock.family)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._tunnel_loop)
                nursery.start_soon(self._udp_loop, sock)
                for more in self._more_sockets():
                    loop = self._coalesced_loop if self._coalesced(more) else self._udp_loop
                    nursery.start_soon(loop, more)
                nursery.start_soon(self._timer_loop)
                task_status.started(self)
        finally:
            self._close_links(sock)
            trio.lowlevel.notify_closing(sock)
            sock.close()
            self.engine.close(trio.current_time(), attrs.asdict(self.io))
            self._pump()

    def _add_links(self, family: int) -> None:
        """D25: each configured link, its peer resolved as recvfrom will report it."""
        now = trio.current_time()
        for link in self.conference.link:
            infos = socket.getaddrinfo(
                link.peer.host, link.peer.port, family=family, type=socket.SOCK_DGRAM
            )
            peer = tuple(infos[0][4])
            self.engine.add_link(
                LinkSpec(
                    peer=peer, fingerprint=link.fingerprint, connect=link.connect,
                    name=str(link.peer),
                ),
                now,
            )  # fmt: skip
        self._send_queued()

    def _send_queued(self) -> None:
        """Send what the engine queued outside the UDP loop (the links' first handshakes) at
        once, without waiting: a datagram the socket refuses is counted; DTLS retransmits."""
        for addr, data in self.engine.datagrams_to_send():
            try:
                self._sendto(data, addr)
            except OSError:
                self.io.dropped_udp_send += 1
        self._pump()

    def _close_links(self, sock: socket.socket) -> None:
        """At exit: close_notify to every linked MDD (best effort), so it notices at once."""
        lm = self.engine.link_manager
        if lm is None or not lm.links:
            return
        lm.close(trio.current_time())
        for addr, data in lm.datagrams_to_send():
            try:
                self._sendto(data, addr)
            except OSError:
                self.io.dropped_udp_send += 1

    async def _timer_loop(self) -> None:
        engine = self.engine
        while True:
            await trio.sleep_until(engine.get_timer())
            engine.handle_timer(trio.current_time())
            out = engine.datagrams_to_send()
            if out:
                await self._send(out)
            self._pump()

    # --- tunnel --------------------------------------------------------------------------------

    async def _tunnel_loop(self) -> None:
        engine, settings = self.engine, self.settings
        delay = settings.reconnect_min
        while True:
            try:
                conn = await self._connect()
            except (OSError, trio.TooSlowError, TunnelError) as e:
                reason = str(e) or type(e).__name__
                engine.tunnel_connect_failed(trio.current_time(), reason=reason, retry_in=delay)
            else:
                started = trio.current_time()
                protocol_error = False
                try:
                    await conn.run(self._session)
                    reason = "closed"
                except TunnelProtocolError as e:
                    protocol_error = True
                    reason = f"protocol error (D2): {e}"
                except TunnelError as e:
                    reason = str(e)
                finally:
                    self._tunnel = None
                now = trio.current_time()
                if engine.version_refused:
                    delay = settings.reconnect_max
                elif now - started >= STABLE_AFTER or conn.stats.messages_in:
                    delay = settings.reconnect_min
                engine.tunnel_down(
                    now, reason=reason, retry_in=delay, protocol_error=protocol_error
                )
            self._pump()
            await trio.sleep(delay)
            delay = min(delay * 2, settings.reconnect_max)

    async def _connect(self) -> TunnelConnection:
        kmf, timeout = self.conference.kmf, self.settings.handshake_timeout
        with trio.fail_after(_CONNECT_TIMEOUT):
            stream = await trio.open_tcp_stream(kmf.host, kmf.port)
        conn = TunnelConnection(stream, self._context, server=False, peer=str(kmf))
        try:
            await conn.handshake(timeout)
            # TLS 1.3: the KMF checks our certificate after our handshake has ended.
            await conn.wait_accepted(timeout)
        except BaseException:
            await conn.aclose()
            raise
        return conn

    async def _session(self, conn: TunnelConnection) -> None:
        engine = self.engine
        self._tunnel = conn
        engine.tunnel_up(
            trio.current_time(), fingerprint=conn.peer_fingerprint or "", tls=conn.tls_version
        )
        self._pump()
        while True:
            for msg in await conn.receive_messages():
                engine.receive_tunnel_message(msg, trio.current_time())
                out = engine.datagrams_to_send()
                if out:
                    await self._send(out)
            self._pump()
            if engine.tunnel_close_reason is not None:
                return  # the engine is done with this tunnel: flush, close_notify, close

    # --- UDP -----------------------------------------------------------------------------------

    async def _udp_loop(self, sock: socket.socket) -> None:
        recv = sock.recvfrom
        # The hot path: the conference socket's own sendto, and the few held peers checked
        # inline (a call per delivery through a router costs more than the check).
        sendto, peers, hold = self._sendto_plain(), self._held_peers, self._hold
        receive = self.engine.receive_datagram
        to_send = self.engine.datagrams_to_send
        current_time = trio.current_time
        while True:
            await trio.lowlevel.wait_readable(sock)
            now = current_time()
            cpu = thread_time()
            for _ in range(UDP_BATCH):
                try:
                    data, addr = recv(_UDP_MAX)
                except BlockingIOError:
                    break
                except OSError as e:
                    self._receive_error(e)
                    continue
                receive(data, addr, now)
                out = to_send()
                if out:
                    datagram = b""
                    try:
                        for addr, datagram in out:
                            if peers and addr in peers:
                                hold(datagram, addr)
                            else:
                                sendto(datagram, addr)
                    except OSError as e:
                        # Rare (EAGAIN or an ICMP error): find where we stopped, by identity.
                        index = next(i for i, o in enumerate(out) if o[1] is datagram)
                        await self._send(out, index, e)
            else:
                # A full batch: let other tasks (the tunnel writer) run before draining more.
                self._batch_done(cpu)
                await trio.lowlevel.checkpoint()
                continue
            self._batch_done(cpu)

    async def _coalesced_loop(self, sock: socket.socket) -> None:
        """:meth:`_udp_loop` for a socket with ``UDP_GRO``: one receive may bring several
        datagrams of one sender (:func:`perc.workers.gro_segments`)."""
        recvmsg = sock.recvmsg
        receive = self.engine.receive_datagrams
        to_send = self.engine.datagrams_to_send
        sendto, peers, hold = self._sendto_plain(), self._held_peers, self._hold
        current_time = trio.current_time
        while True:
            await trio.lowlevel.wait_readable(sock)
            now = current_time()
            cpu = thread_time()
            for _ in range(UDP_BATCH // MESH_BATCH):
                try:
                    data, ancillary, _, addr = recvmsg(_UDP_MAX, _GRO_CMSG_SPACE)
                except BlockingIOError:
                    break
                except OSError as e:
                    self._receive_error(e)
                    continue
                receive(gro_segments(data, ancillary), addr, now)
                out = to_send()
                # The send block of _udp_loop, kept inline in both loops: as a method called
                # once per receive it cost 1% more instructions per delivery (callgrind).
                if out:
                    datagram = b""
                    try:
                        for dest, datagram in out:
                            if peers and dest in peers:
                                hold(datagram, dest)
                            else:
                                sendto(datagram, dest)
                    except OSError as e:
                        index = next(i for i, o in enumerate(out) if o[1] is datagram)
                        await self._send(out, index, e)
            else:
                self._batch_done(cpu)
                await trio.lowlevel.checkpoint()
                continue
            self._batch_done(cpu)

    def _receive_error(self, error: OSError) -> None:
        self.io.udp_receive_errors += 1
        log.debug("udp receive error conference=%s: %s", self.id, error)

    def _batch_done(self, cpu: float) -> None:
        """The end of a receive batch: hand on what it produced (:meth:`_pump`) and add its
        CPU time (since ``cpu``, this thread's) to :attr:`forwarding_cpu`."""
        self._pump()
        self.forwarding_cpu += thread_time() - cpu

    async def _send(
        self, out: list[tuple[Address, bytes]], index: int = 0, error: OSError | None = None
    ) -> None:
        """Send ``out[index:]`` (``error``: what ``out[index]`` already raised). On EAGAIN wait
        (at most ``SEND_WAIT``) for room and retry once; any other error, or a second failure,
        drops that datagram, counted; then go on with the rest."""
        sock = self._sock
        if sock is None:
            self.io.dropped_udp_send += len(out) - index
            return
        while index < len(out):
            addr, data = out[index]
            index += 1
            if error is None:
                try:
                    self._sendto(data, addr)
                    continue
                except OSError as e:
                    error = e
            if isinstance(error, BlockingIOError):
                await self._wait_writable(sock)
                try:
                    self._sendto(data, addr)
                except OSError:
                    self.io.dropped_udp_send += 1
            else:
                self.io.dropped_udp_send += 1
                log.debug("udp send failed conference=%s peer=%s: %s", self.id, addr, error)
            error = None

    async def _wait_writable(self, sock: socket.socket) -> None:
        """Wait (at most ``SEND_WAIT``) for room in the socket's send buffer. The UDP task and
        the tunnel task (DTLS to endpoints, D5 releases) both send: trio allows one waiter per
        socket, so they take turns."""
        self.io.send_waits += 1
        async with self._write_lock:
            with trio.move_on_after(SEND_WAIT):
                await trio.lowlevel.wait_writable(sock)


class MddServer:
    """The running MDD: one :class:`ConferenceRelay` per configured conference."""

    def __init__(
        self,
        config: MddConfig,
        relay: Callable[[MddConference, MddConfig], ConferenceRelay] | None = None,
        *,
        freeze_heap: bool = False,
    ) -> None:
        self.config = config
        self.freeze_heap = freeze_heap
        make = relay if relay is not None else ConferenceRelay
        self.conferences = {c.id: make(c, config) for c in config.conferences}

    async def admin(self, request: Request) -> dict[str, Any]:
        """Answer one admin request (D33): ``status`` or ``links``; the engines' data."""
        if isinstance(request, Links):
            relay = self.conferences.get(request.conference)
            if relay is None:
                raise AdminError(f"unknown conference {request.conference[:64]!r}")
            return {"conference": relay.id, "links": relay.engine.admin_links()}
        return {"conferences": [r.engine.admin_status() for r in self.conferences.values()]}

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
                if self.config.mdd.admin_socket is not None:
                    await nursery.start(partial(serve_admin, ops=MDD_OPS),
                                        self.config.mdd.admin_socket, self.admin)  # fmt: skip
                if self.freeze_heap:
                    freeze_heap()
                task_status.started(self)
        finally:
            # An MDD process never imports end-to-end code; a test process that also runs
            # endpoints does (then this is a WARNING naming the modules).
            report = key_isolation()
            events.emit(log, report, logging.WARNING if report.loaded else logging.INFO)


def freeze_heap() -> None:
    """Take everything start-up made (imported modules, configuration, identity) out of the
    cyclic garbage collector's reach for good (``gc.freeze``).

    Forwarding allocates and frees objects all the time, which now and then triggers a full
    collection; a full collection walks every tracked object, and the start-up heap of an MDD
    is tens of thousands of them: a pause of milliseconds in the middle of forwarding, the
    largest part of a link hop's 99th-percentile latency. Frozen, those objects are never
    walked again; what forwarding makes is collected as before. A process role only: a test
    process that runs an MDD in memory keeps its collector as it is."""
    gc.collect()
    gc.freeze()


async def serve(
    config: MddConfig,
    *,
    freeze_heap: bool = False,
    task_status: trio.TaskStatus[MddServer] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the MDD until cancelled; ``task_status.started(MddServer)`` once every conference's
    UDP socket is bound (the tunnels connect in the background); with ``[mdd] metrics`` it
    serves ``GET /metrics`` too (bound first: :class:`~perc.roles.metrics.MetricsError`).
    ``freeze_heap``: the ``perc mdd`` process freezes its start-up heap (:func:`freeze_heap`)."""
    server = MddServer(config, freeze_heap=freeze_heap)
    async with serving_metrics(config.mdd.metrics, partial(_collector, server)):
        await server.serve(task_status=task_status)


def _collector(server: MddServer) -> Collector:
    from perc.metrics import MddCollector

    return MddCollector(server.conferences.values)
