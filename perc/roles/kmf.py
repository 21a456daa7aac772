"""The Key Distributor (KMF) role: the trio shell around :class:`perc.kmf.KmfEngine`.

Theory of operation
-------------------
Everything the KMF decides (tunnel rules, DTLS per association, rosters, rekeys, EKTKeys)
is in the sans-IO engine :mod:`perc.kmf`; this module only does I/O for it:

* :func:`serve` listens for TLS 1.3 on ``config.kmf.listen`` (D1) and emits
  :class:`~perc.events.Listening` once bound. Each TCP connection is one tunnel in its own
  task: the TLS handshake requires a client certificate whose fingerprint is in
  ``trusted_mdds`` (:mod:`perc.roles.tunnel`); a refused one is reported
  (:class:`~perc.events.KmfTunnelDown`, ``refused``) and never reaches the engine.
* An accepted tunnel gets an id and is opened in the engine; every batch of messages read is
  handed to it, then :meth:`KmfServer.service` writes what the engine queued to the named
  tunnels (a message a tunnel does not take goes back as ``message_not_sent``), closes the
  tunnels it asked to close, logs its events with :func:`perc.events.emit` and publishes its
  next deadline.
* One timer task sleeps until that deadline (a :class:`trio_util.AsyncValue`, so an earlier
  deadline set while it sleeps wakes it) and calls ``handle_timer``: thousands of
  associations cost one task.
* Admission: a connection in its TLS handshake is not a tunnel yet and has its own budget
  (``kmf.max_handshakes``, and ``kmf.max_handshakes_per_ip`` per source address) and a short
  deadline (``kmf.handshake_timeout``); only authenticated tunnels count against
  :data:`MAX_TUNNELS`. A new connection is never refused for lack of room: the handshaking
  connection that shows the least progress (no complete ClientHello answered yet, then the
  longest silent) is closed instead, taken from the new connection's address if that is at
  its share, else from the address with the most. Idle or half-sent connections held
  against the KMF therefore only ever push each other out, and a trusted MDD, whose
  ClientHello arrives with its connection, finishes its handshake in one round trip.
* An up tunnel's reader has a deadline only while a message is partly received
  (``kmf.message_timeout``, :class:`~perc.roles.tunnel.TunnelStalled`).
* Errors are lines, not tracebacks: a reset (even before the connection could be read), a
  handshake timeout, a TLS failure, an eviction or a stalled message is one log line with
  its reason (at most :data:`LOGGED_PER_SECOND` a second; the rest only counted) and a
  counter; :class:`~perc.events.KmfConnections` reports the counters at most once a second
  while they change. Nothing is kept of a connection after it closed, and when the last
  handshaking connection of a wave is gone the freed heap goes back to the system
  (``malloc_trim``), so the KMF's memory returns to its baseline after an attack.
* State (D28, D32): with ``[kmf] state`` set, :func:`serve` opens the
  :class:`~perc.state.KmfState` before it listens (a :class:`~perc.state.StateError` ends it
  at once: ``perc kmf`` prints the one line and exits 2), builds the engine with each
  conference's stored SPI counter, and hands every persistence request of the engine
  (:class:`~perc.kmf.ReserveSpis`, :class:`~perc.kmf.AuditRecord`) to one
  :class:`StateWriter`: a task that writes them in batches, one transaction each, through
  ``trio.to_thread.run_sync`` on a single worker (a ``CapacityLimiter(1)``: the state is not
  thread-safe), so the event loop never waits for the disk. A reservation reaches the engine
  (``spis_reserved``) only once its transaction committed; until then the engine holds back
  any key whose SPI it does not cover. A failed write (disk full, locked) is one
  :class:`~perc.events.KmfStateWriteFailed` line per streak and a counter; the changes stay
  pending in the state and the writer retries every :data:`STATE_RETRY` seconds; the first
  write that succeeds catches them all up (:class:`~perc.events.KmfStateCaughtUp`). The
  conference goes on in memory meanwhile: keys whose SPIs were already reserved still go out
  (the engine asks for the next block half a block early), later ones wait.
* Resumption (D29): the writer also stores associations, their sequence ceilings (answered
  with ``seq_reserved`` once durable) and each conference's current EKTKey (sealed, its
  wall-clock age kept so the TTL carries over). On start :func:`serve` hands the stored rows
  and keys to :meth:`perc.kmf.KmfEngine.resume` before it listens.
* Supervision (STYLE practice 9): one failing tunnel never stops the others or the process.
  An exception from the engine while handling a tunnel's messages is a bug: it is logged with
  its traceback, counted, and closes that tunnel only.

API::

    serve(config: KmfConfig, *, engine: TunnelServerEngine | None = None,
          state: KmfState | None = None,
          task_status=trio.TASK_STATUS_IGNORED)       # started(KmfServer)
    open_state(config, *, reset=False) -> KmfState | None   # None: state = "" (memory)
    KmfServer: .address (host, port), .stats: KmfStats, .engine, .connections,
               service(), send(tunnel_id, message) -> bool,
               summary() -> perc.events.KmfConnections
"""

from __future__ import annotations

import ctypes
import gc
import itertools
import logging
import math
import operator
import time
import uuid
from collections.abc import Callable, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

import attrs
import trio
from trio_util import AsyncValue

from perc.admin import KMF_OPS, AdminError, Audit, Request, audit_answer
from perc.admission import DropLog, HandshakeTable, Handshaking, KmfStats
from perc.config import DEFAULT_STATE_KEY_FILE, KmfConfig
from perc.events import (
    EktKeyAcked,
    Event,
    KmfConnections,
    KmfStateCaughtUp,
    KmfStateOpened,
    KmfStateWriteFailed,
    KmfTunnelDown,
    Listening,
    RekeyFailed,
    emit,
)
from perc.identity import fingerprint_matches
from perc.keying import EktKeyMaterial, KeyingError
from perc.keylog import keylog_from_env
from perc.kmf import (
    AuditRecord,
    CloseTunnel,
    ForgetAssociation,
    KmfEngine,
    PersistRequest,
    ReserveSeq,
    ReserveSpis,
    RosterEdit,
    SaveAssociation,
    SaveEktKey,
    TunnelServerEngine,
)
from perc.roles.admin import serve_admin
from perc.roles.metrics import serving as serving_metrics
from perc.roles.tunnel import (
    TlsHandshakeError,
    TunnelClosed,
    TunnelConnection,
    TunnelProtocolError,
    TunnelStalled,
    format_address,
    make_tls_context,
)
from perc.state import KmfState, StateWriteError, load_state_key, seq_ceiling_after
from perc.wire.tunnel import TunnelMessage

if TYPE_CHECKING:
    from prometheus_client.registry import Collector

__all__ = ["MAX_TUNNELS", "KmfServer", "KmfStats", "StateWriter", "open_state", "serve"]

log = logging.getLogger(__name__)

#: Bound on simultaneous up tunnels (connections still in their handshake have their own
#: budget, ``kmf.max_handshakes``).
MAX_TUNNELS = 256
#: Connections dropped before their tunnel was up that are logged one by one, per second; the
#: rest are only counted (in :class:`~perc.events.KmfConnections`).
LOGGED_PER_SECOND = 10
#: Seconds between two :class:`~perc.events.KmfConnections` summaries (while they change).
SUMMARY_INTERVAL = 1.0

#: Seconds between retries of a failed state write (D28).
STATE_RETRY = 1.0

P = ParamSpec("P")
T = TypeVar("T")


def open_state(config: KmfConfig, *, reset: bool = False) -> KmfState | None:
    """Open the KMF's state file (D28) as the config says; None when ``state = ""``.

    Creates the state key (mode 0600) on first start. Raises :class:`perc.state.StateError`
    (one line naming the file and what is wrong). ``reset`` deletes the old state first.
    Synchronous: call it before trio starts or through ``trio.to_thread``.
    """
    path = config.kmf.state
    if path is None:
        return None
    key_path = config.kmf.state_key or path.with_name(DEFAULT_STATE_KEY_FILE)
    key = load_state_key(key_path)
    return KmfState(path, key, persist_keys=config.kmf.persist_keys, reset=reset)


class StateWriter:
    """Writes the engine's persistence requests to the state off the event loop (D28, D32).

    ``submit`` queues (never blocks); :meth:`run` writes each batch in one transaction on one
    worker thread; ``on_reserved(conference, ceiling)`` is called on the event loop once a
    reservation is durable. See the module docstring for failures.
    """

    def __init__(
        self,
        state: KmfState,
        on_reserved: Callable[[str, int], None],
        report: Callable[[Event], None] = lambda e: None,
        *,
        retry: float = STATE_RETRY,
        on_seq_reserved: Callable[[uuid.UUID, int], None] = lambda a, c: None,
    ) -> None:
        self.state = state
        self._on_reserved = on_reserved
        self._on_seq_reserved = on_seq_reserved
        # sequence ceilings submitted but not yet known to be on disk (association -> ceiling)
        self._unconfirmed_seq: dict[uuid.UUID, int] = {}
        self._report = report
        self._retry = retry
        self._queue: list[tuple[PersistRequest, float]] = []
        self._wake = trio.Event()
        self._limiter = trio.CapacityLimiter(1)
        # reservations submitted but not yet known to be on disk (conference -> ceiling)
        self._unconfirmed: dict[str, int] = {}
        #: writes that failed; batches committed
        self.failures = 0
        self.commits = 0
        self.failing = False

    def submit(self, requests: Sequence[PersistRequest]) -> None:
        """Queue requests (stamped with the wall-clock time now, for audit rows)."""
        if not requests:
            return
        stamp = time.time()
        self._queue.extend((r, stamp) for r in requests)
        self._wake.set()

    async def run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            await self.flush()
            if self.failing:
                await trio.sleep(self._retry)
                self._wake.set()

    async def flush(self) -> None:
        """Write what is queued (and anything pending from failed writes) once."""
        batch, self._queue = self._queue, []
        for request, _ in batch:
            if isinstance(request, ReserveSpis):
                old = self._unconfirmed.get(request.conference, 0)
                self._unconfirmed[request.conference] = max(old, request.ceiling)
            elif isinstance(request, SaveAssociation | ReserveSeq):
                if isinstance(request, SaveAssociation):
                    start = request.next_seq
                else:
                    start = request.from_seq
                aid = request.association_id
                ceiling = seq_ceiling_after(start)
                self._unconfirmed_seq[aid] = max(self._unconfirmed_seq.get(aid, 0), ceiling)
            elif isinstance(request, ForgetAssociation):
                self._unconfirmed_seq.pop(request.association_id, None)
        try:
            written = await trio.to_thread.run_sync(self._write, batch, limiter=self._limiter)
        except StateWriteError as e:
            self.failures += 1
            if not self.failing:
                self.failing = True
                self._report(KmfStateWriteFailed(str(e), self.failures, len(self.state.pending)))
            return
        self.commits += 1
        if self.failing:
            self.failing = False
            self._report(KmfStateCaughtUp(written, self.failures))
        confirmed, self._unconfirmed = self._unconfirmed, {}
        for conference, ceiling in confirmed.items():
            self._on_reserved(conference, ceiling)
        seqs, self._unconfirmed_seq = self._unconfirmed_seq, {}
        for aid, ceiling in seqs.items():
            self._on_seq_reserved(aid, ceiling)

    def _write(self, batch: list[tuple[PersistRequest, float]]) -> int:
        # Worker thread: the only code that touches the state while the KMF runs.
        state = self.state
        written = len(state.pending) + len(batch)
        with state.batch():
            for request, stamp in batch:
                if isinstance(request, ReserveSpis):
                    state.reserve_spis(request.conference, request.ceiling)
                elif isinstance(request, RosterEdit):  # D33
                    if request.listed:
                        state.roster_add(request.conference, request.fingerprint, request.name)
                    else:
                        state.roster_remove(request.conference, request.fingerprint)
                elif isinstance(request, SaveAssociation):
                    state.add_association(
                        request.association_id,
                        mdd_fingerprint=request.mdd_fingerprint,
                        conference=request.conference,
                        peer_fingerprint=request.peer_fingerprint,
                        tls_id=request.tls_id,
                        profile=request.profile,
                        ekt_cipher=request.ekt_cipher,
                        record_state=request.record_state,
                        next_seq=request.next_seq,
                    )
                elif isinstance(request, ReserveSeq):
                    if state.association(request.association_id) is not None:
                        state.reserve_seq(
                            request.association_id,
                            request.from_seq,
                            record_state=request.record_state,
                        )
                elif isinstance(request, ForgetAssociation):
                    state.remove_association(request.association_id)
                elif isinstance(request, SaveEktKey):
                    if request.key is None:
                        state.remove_ekt_key(request.conference)
                    else:
                        key = request.key
                        state.set_ekt_key(request.conference, key.spi, key.encode(stamp))
                else:
                    state.append_audit(
                        request.event,
                        conference=request.conference,
                        fingerprint=request.fingerprint,
                        name=request.name,
                        association_id=request.association_id,
                        spi=request.spi,
                        mdd_fingerprint=request.mdd_fingerprint,
                        at=stamp,
                    )
        return written

    async def read(self, fn: Callable[[KmfState], T]) -> T:
        """Run ``fn(state)`` on the writer's thread (the state is not thread-safe): D33 audit."""
        return await trio.to_thread.run_sync(fn, self.state, limiter=self._limiter)

    async def aclose(self) -> None:
        """Write what is left (one try), then close the state. Shielded from cancellation."""
        with trio.CancelScope(shield=True):
            await self.flush()
            await trio.to_thread.run_sync(self.state.close, limiter=self._limiter)


class _EngineFailed(Exception):
    pass


def _give_back_memory() -> None:
    """Return freed memory to the system once a wave of handshaking connections is gone.

    Each TLS connection's OpenSSL state is allocated with malloc; after a few hundred of them
    (an attack of half-open connections) glibc keeps the freed heap, so the process would
    stay that much bigger for good. ``malloc_trim`` gives it back (a no-op elsewhere)."""
    gc.collect()
    try:
        libc = ctypes.CDLL(None)
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return
    trim(0)


#: TlsHandshakeError.kind -> the KmfStats counter
_DROP_KINDS = {"timeout": "timeout", "reset": "reset", "tls": "tls_failed"}


def _report(event: Event) -> None:
    level = logging.INFO
    if isinstance(event, EktKeyAcked):
        level = logging.DEBUG  # one per member per key: too many for INFO
    elif isinstance(event, RekeyFailed) or (isinstance(event, KmfTunnelDown) and event.refused):
        level = logging.WARNING
    emit(log, event, level)


class KmfServer:
    """The running KMF: bound address, counters, open tunnel connections, the engine."""

    def __init__(
        self, config: KmfConfig, engine: TunnelServerEngine, state: KmfState | None = None
    ) -> None:
        self.config = config
        self.engine = engine
        self.writer: StateWriter | None = None
        if state is not None:
            self.writer = StateWriter(
                state, self._spis_reserved, _report, on_seq_reserved=self._seq_reserved
            )
        self.stats = KmfStats()
        self.connections: dict[int, TunnelConnection] = {}
        self.address: tuple[str, int] = ("", 0)
        self._ids = itertools.count(1)
        self._open = 0
        self._closing: set[int] = set()
        kmf = config.kmf
        self._handshaking = HandshakeTable(kmf.max_handshakes, kmf.max_handshakes_per_ip)
        self._scopes: dict[Handshaking, trio.CancelScope] = {}
        self._drop_log = DropLog(LOGGED_PER_SECOND)
        self._deadline = AsyncValue(math.inf)
        trusted = tuple(config.kmf.trusted_mdds)
        self._context = make_tls_context(
            config.identity,
            server=True,
            is_trusted=lambda fp: any(fingerprint_matches(fp, t) for t in trusted),
        )

    async def serve(self, *, task_status: trio.TaskStatus[KmfServer]) -> None:
        listen = self.config.kmf.listen
        listeners = await trio.open_tcp_listeners(listen.port, host=listen.host)
        sockname = listeners[0].socket.getsockname()
        self.address = (str(sockname[0]), int(sockname[1]))
        emit(log, Listening("tunnel", self.address[0], self.address[1]))
        log.info(
            "KMF fingerprint=%s trusted_mdds=%d",
            self.config.identity.fingerprint,
            len(self.config.kmf.trusted_mdds),
        )
        async with trio.open_nursery() as nursery:
            if self.writer is not None:
                nursery.start_soon(self.writer.run)
            nursery.start_soon(self._timers)
            nursery.start_soon(self._summaries)
            if self.config.kmf.admin_socket is not None:
                await nursery.start(partial(serve_admin, ops=KMF_OPS),
                                    self.config.kmf.admin_socket, self.admin)  # fmt: skip
            await nursery.start(trio.serve_listeners, self._guarded, listeners)
            task_status.started(self)

    # --- engine <-> I/O ----------------------------------------------------------------------

    def service(self) -> None:
        """Carry out what the engine asks: messages, closes, events, the next deadline."""
        engine = self.engine
        while out := engine.messages_to_send():
            for tunnel_id, msg in out:
                conn = self.connections.get(tunnel_id)
                if isinstance(msg, CloseTunnel):
                    self._closing.add(tunnel_id)
                    if conn is not None:
                        conn.close_soon()  # flushes what is queued, then close_notify
                elif conn is None or not conn.send(msg):
                    engine.message_not_sent(tunnel_id, msg, trio.current_time())
        while (event := engine.next_event()) is not None:
            _report(event)
        if isinstance(engine, KmfEngine):
            requests = engine.persistence_requests()
            if self.writer is not None:
                self.writer.submit(requests)
        timer = engine.get_timer()
        self._deadline.value = math.inf if timer is None else timer

    async def admin(self, request: Request) -> dict[str, Any]:
        """Answer one admin request (D33); changes are durable before the answer."""
        engine, writer = self.engine, self.writer
        if not isinstance(engine, KmfEngine):
            raise AdminError("this KMF keys no endpoints")
        if isinstance(request, Audit):
            if writer is None:
                raise AdminError('this KMF keeps no state (state = ""): no audit log')
            await writer.flush()  # rows asked for so far are in the log
            return await writer.read(partial(audit_answer, request))
        try:
            fields = engine.admin_answer(request, trio.current_time())
        finally:
            self.service()
        if writer is not None and "persisted" in fields:
            await writer.flush()
            fields["persisted"] = not writer.failing
        return fields

    def _spis_reserved(self, conference: str, ceiling: int) -> None:
        engine = self.engine
        if isinstance(engine, KmfEngine):
            engine.spis_reserved(conference, ceiling, trio.current_time())
            self.service()

    def _seq_reserved(self, association_id: uuid.UUID, ceiling: int) -> None:
        engine = self.engine
        if isinstance(engine, KmfEngine):
            engine.seq_reserved(association_id, ceiling, trio.current_time())
            self.service()

    def send(self, tunnel_id: int, message: TunnelMessage) -> bool:
        """Send one message outside the engine (tests, tools); False if not queued."""
        conn = self.connections.get(tunnel_id)
        return conn is not None and conn.send(message)

    def _call(self, fn: Callable[P, object], *args: P.args, **kwargs: P.kwargs) -> None:
        try:
            fn(*args, **kwargs)
        except Exception as e:
            raise _EngineFailed from e
        finally:
            self.service()

    async def _timers(self) -> None:
        deadline = self._deadline
        while True:
            due = deadline.value
            with trio.move_on_at(due):
                # Woken early when handling a message moved the deadline earlier.
                await deadline.wait_value(partial(operator.gt, due))  # due > new value
                continue
            # Not guarded: an engine failure here is a bug in state shared by every tunnel, so
            # it ends the KMF with its traceback rather than run on in an unknown state.
            self.engine.handle_timer(trio.current_time())
            self.service()

    # --- connection admission and accounting ------------------------------------------------

    def summary(self) -> KmfConnections:
        """The connection counters now (logged by :meth:`_summaries`)."""
        st = self.stats
        return KmfConnections(
            handshaking=self._handshaking.count,
            tunnels=self._open,
            accepted=st.connections,
            reset=st.reset,
            timeout=st.timeout,
            tls_failed=st.tls_failed,
            evicted=st.evicted,
            capacity=st.refused_capacity,
            message_timeout=st.message_timeout,
            unlogged=st.unlogged,
        )

    async def _summaries(self) -> None:
        last = self.summary()
        while True:
            await trio.sleep(SUMMARY_INTERVAL)
            now = self.summary()
            if now != last:
                if now.handshaking == 0 and last.handshaking > 0:
                    _give_back_memory()
                emit(log, now)
                last = now

    def _dropped(self, kind: str, peer: str, reason: str) -> None:
        """A connection closed before its tunnel was up: count it; log it within the rate."""
        self.stats.refused += 1
        setattr(self.stats, kind, getattr(self.stats, kind) + 1)
        if not self._drop_log.allow(trio.current_time()):
            self.stats.unlogged += 1
            return
        _report(KmfTunnelDown(peer, reason, refused=True))

    def _admit(self, ip: str) -> tuple[Handshaking, trio.CancelScope]:
        """Register a new handshaking connection; close the one the table evicts, if any."""
        entry, victim = self._handshaking.admit(ip, trio.current_time())
        if victim is not None:
            self._scopes[victim].cancel()
        scope = self._scopes[entry] = trio.CancelScope()
        return entry, scope

    # --- tunnels -----------------------------------------------------------------------------

    async def _guarded(self, stream: trio.SocketStream) -> None:
        # One bad peer never takes the nursery down (STYLE practice 9), and a network event
        # is never a traceback: only a bug gets one.
        peer = "?"
        try:
            try:
                address = stream.socket.getpeername()
            except OSError as e:
                # Reset between the kernel's accept and ours (ENOTCONN).
                self.stats.connections += 1
                self._dropped("reset", peer, f"connection gone before it was read ({e})")
                return
            peer = format_address(address)
            await self._connection(stream, peer, str(address[0]))
        except Exception:
            self.stats.task_errors += 1
            log.exception("tunnel task failed peer=%s", peer)
        finally:
            await trio.aclose_forcefully(stream)

    async def _connection(self, stream: trio.SocketStream, peer: str, ip: str) -> None:
        self.stats.connections += 1
        kmf = self.config.kmf
        entry, scope = self._admit(ip)
        conn = TunnelConnection(
            stream, self._context, server=True, peer=peer, message_timeout=kmf.message_timeout
        )
        entry.progress = lambda: (conn.handshake_progress, conn.last_progress)
        try:
            with scope:
                await conn.handshake(kmf.handshake_timeout)
        except TlsHandshakeError as e:
            self._dropped(_DROP_KINDS.get(e.kind, "tls_failed"), peer, str(e))
            return
        finally:
            self._handshaking.forget(entry)
            del self._scopes[entry]
            entry.progress = None
        if scope.cancelled_caught:
            await conn.aclose()
            self._dropped("evicted", peer, f"closed for a newer connection: {entry.evicted}")
            return
        if self._open >= MAX_TUNNELS:
            await conn.aclose()
            self._dropped("refused_capacity", peer, f"{MAX_TUNNELS} tunnels already up")
            return
        self._open += 1
        try:
            await conn.run(self._session)
        except TunnelStalled:
            self.stats.message_timeout += 1  # the engine reported it (KmfTunnelDown)
        except (TunnelClosed, TunnelProtocolError):
            pass  # the engine reported it (KmfTunnelDown)
        except _EngineFailed:
            self.stats.engine_errors += 1
            log.exception("tunnel closed peer=%s: the KMF engine failed", peer)
        finally:
            self._open -= 1

    async def _session(self, conn: TunnelConnection) -> None:
        tunnel_id = next(self._ids)
        engine = self.engine
        self.connections[tunnel_id] = conn
        reason = "closed by the KMF"
        try:
            self._call(
                engine.tunnel_opened,
                tunnel_id,
                peer=conn.peer,
                mdd_fingerprint=conn.peer_fingerprint or "?",
                tls=conn.tls_version,
                now=trio.current_time(),
            )
            while tunnel_id not in self._closing:
                msgs = await conn.receive_messages()
                self._call(engine.receive_messages, tunnel_id, msgs, trio.current_time())
        except TunnelProtocolError as e:
            reason = f"protocol error (D2): {e}"
            raise
        except TunnelClosed as e:
            reason = str(e)
            raise
        except _EngineFailed:
            reason = "the KMF engine failed"
            raise
        finally:
            # From here on, messages for this tunnel come back as message_not_sent.
            del self.connections[tunnel_id]
            self._closing.discard(tunnel_id)
            conn.close_soon()
            try:
                self._call(
                    engine.tunnel_closed,
                    tunnel_id,
                    reason,
                    trio.current_time(),
                    protocol_error=reason.startswith("protocol error"),
                )
            except _EngineFailed:
                log.exception("the KMF engine failed closing tunnel peer=%s", conn.peer)


def _collector(server: KmfServer) -> Collector:
    from perc.metrics import KmfCollector

    return KmfCollector(server.engine, server.stats)


def _stored_keys(state: KmfState) -> dict[str, EktKeyMaterial]:
    """Each conference's stored EKTKey (D29), its age carried over to the trio clock."""
    keys = {}
    for row in state.ekt_keys():
        try:
            key = EktKeyMaterial.decode(row.material, now=trio.current_time(), wall_now=time.time())
        except KeyingError as e:
            log.warning("conference=%s: stored EKTKey not resumed: %s", row.conference, e)
            continue
        keys[row.conference] = key
    return keys


async def serve(
    config: KmfConfig,
    *,
    engine: TunnelServerEngine | None = None,
    state: KmfState | None = None,
    task_status: trio.TaskStatus[KmfServer] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the KMF until cancelled; ``task_status.started(KmfServer)`` once listening.

    Without ``engine`` the KMF keys endpoints: :class:`perc.kmf.KmfEngine`, with
    ``SSLKEYLOGFILE`` honoured (D21; :class:`perc.keylog.KeyLogError` if it cannot be opened),
    and its state (D28): ``state`` if given (it is closed on the way out), else the file
    ``config.kmf.state`` names (:func:`open_state`; StateError before listening), else none.
    With ``[kmf] metrics`` it also serves ``GET /metrics`` (D34), bound before the tunnel
    listener (:class:`~perc.roles.metrics.MetricsError` when it cannot be).
    """
    keylog = None
    if engine is None:
        if state is None and config.kmf.state is not None:
            state = await trio.to_thread.run_sync(open_state, config)
        try:
            keylog = keylog_from_env()
        except BaseException:
            if state is not None:
                state.close()
            raise
        starts = None
        if state is not None:
            # D28: a restarted KMF resumes after everything the stored counters may cover.
            starts = {c: n + 1 for c, n in state.spi_counters().items()}
        roster = [(c.conference, c.fingerprint, c.action == "add")
                  for c in (state.roster_changes() if state is not None else ())]  # fmt: skip
        engine = KmfEngine(
            config,
            keylog=keylog,
            spi_starts=starts,
            persistent=state is not None,
            resumable=config.kmf.persist_keys,
            roster_changes=roster,
        )
        if state is not None:
            resumed = engine.resume(state.associations(), _stored_keys(state), trio.current_time())
            emit(
                log,
                KmfStateOpened(
                    str(state.path or ""), starts or {}, state.audit_seq, associations=resumed
                ),
            )
    server = KmfServer(config, engine, state if isinstance(engine, KmfEngine) else None)
    if server.writer is not None:
        server.writer.submit([AuditRecord("kmf_start", fingerprint=config.identity.fingerprint)])
        server.service()  # the engine's first SPI reservations
    try:
        async with serving_metrics(config.kmf.metrics, partial(_collector, server)):
            await server.serve(task_status=task_status)
    finally:
        writer = server.writer
        if writer is not None:
            await writer.aclose()
            log.info(
                "state stats commits=%d write_failures=%d audit_dropped=%d",
                writer.commits,
                writer.failures,
                writer.state.audit_dropped,
            )
        if isinstance(engine, KmfEngine):
            # One line of counters on shutdown (every drop has its counter).
            log.info(
                "keying stats %s associations=%d",
                " ".join(f"{k}={v}" for k, v in attrs.asdict(engine.stats).items()),
                len(engine.associations),
            )
        if keylog is not None:
            keylog.close()
