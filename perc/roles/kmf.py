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
* Supervision (STYLE practice 9): one failing tunnel never stops the others or the process.
  An exception from the engine while handling a tunnel's messages is a bug: it is logged with
  its traceback, counted, and closes that tunnel only.

API::

    serve(config: KmfConfig, *, engine: TunnelServerEngine | None = None,
          task_status=trio.TASK_STATUS_IGNORED)       # started(KmfServer)
    KmfServer: .address (host, port), .stats: KmfStats, .engine, .connections,
               service(), send(tunnel_id, message) -> bool
"""

from __future__ import annotations

import itertools
import logging
import math
import operator
from collections.abc import Callable
from functools import partial
from typing import ParamSpec

import attrs
import trio
from trio_util import AsyncValue

from perc.config import KmfConfig
from perc.events import EktKeyAcked, Event, KmfTunnelDown, Listening, RekeyFailed, emit
from perc.identity import fingerprint_matches
from perc.keylog import keylog_from_env
from perc.kmf import CloseTunnel, KmfEngine, TunnelServerEngine
from perc.roles.tunnel import (
    TlsHandshakeError,
    TunnelClosed,
    TunnelConnection,
    TunnelProtocolError,
    format_address,
    make_tls_context,
)
from perc.wire.tunnel import TunnelMessage

__all__ = ["MAX_TUNNELS", "KmfServer", "KmfStats", "serve"]

log = logging.getLogger(__name__)

#: Bound on simultaneous tunnel connections (including ones still in their handshake).
MAX_TUNNELS = 256

P = ParamSpec("P")


@attrs.define
class KmfStats:
    """Counters of the shell (the engine counts the rest: ``engine.tunnel_stats``, ``.stats``)."""

    connections: int = 0
    """TCP connections accepted."""
    refused: int = 0
    """Connections whose TLS handshake failed (untrusted or missing certificate, timeout...)."""
    refused_capacity: int = 0
    """Connections closed at once because MAX_TUNNELS were open."""
    engine_errors: int = 0
    """Tunnels closed because the engine raised (a bug) while handling their messages."""


class _EngineFailed(Exception):
    pass


def _report(event: Event) -> None:
    level = logging.INFO
    if isinstance(event, EktKeyAcked):
        level = logging.DEBUG  # one per member per key: too many for INFO
    elif isinstance(event, RekeyFailed) or (isinstance(event, KmfTunnelDown) and event.refused):
        level = logging.WARNING
    emit(log, event, level)


class KmfServer:
    """The running KMF: bound address, counters, open tunnel connections, the engine."""

    def __init__(self, config: KmfConfig, engine: TunnelServerEngine) -> None:
        self.config = config
        self.engine = engine
        self.stats = KmfStats()
        self.connections: dict[int, TunnelConnection] = {}
        self.address: tuple[str, int] = ("", 0)
        self._ids = itertools.count(1)
        self._open = 0
        self._closing: set[int] = set()
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
            nursery.start_soon(self._timers)
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
        timer = engine.get_timer()
        self._deadline.value = math.inf if timer is None else timer

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

    # --- tunnels -----------------------------------------------------------------------------

    async def _guarded(self, stream: trio.SocketStream) -> None:
        # One bad peer never takes the nursery down (STYLE practice 9).
        peer = "?"
        try:
            peer = format_address(stream.socket.getpeername())
            await self._connection(stream, peer)
        except Exception:
            log.exception("tunnel task failed peer=%s", peer)
            await trio.aclose_forcefully(stream)

    async def _connection(self, stream: trio.SocketStream, peer: str) -> None:
        self.stats.connections += 1
        if self._open >= MAX_TUNNELS:
            self.stats.refused_capacity += 1
            _report(KmfTunnelDown(peer, f"{MAX_TUNNELS} tunnels already open", refused=True))
            await trio.aclose_forcefully(stream)
            return
        self._open += 1
        try:
            conn = TunnelConnection(stream, self._context, server=True, peer=peer)
            try:
                await conn.handshake(self.config.kmf.handshake_timeout)
            except TlsHandshakeError as e:
                self.stats.refused += 1
                _report(KmfTunnelDown(peer, str(e), refused=True))
                return
            try:
                await conn.run(self._session)
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


async def serve(
    config: KmfConfig,
    *,
    engine: TunnelServerEngine | None = None,
    task_status: trio.TaskStatus[KmfServer] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the KMF until cancelled; ``task_status.started(KmfServer)`` once listening.

    Without ``engine`` the KMF keys endpoints: :class:`perc.kmf.KmfEngine`, with
    ``SSLKEYLOGFILE`` honoured (D21; :class:`perc.keylog.KeyLogError` if it cannot be opened).
    """
    keylog = None
    if engine is None:
        keylog = keylog_from_env()
        engine = KmfEngine(config, keylog=keylog)
    server = KmfServer(config, engine)
    try:
        await server.serve(task_status=task_status)
    finally:
        if isinstance(engine, KmfEngine):
            # One line of counters on shutdown (every drop has its counter).
            log.info(
                "keying stats %s associations=%d",
                " ".join(f"{k}={v}" for k, v in attrs.asdict(engine.stats).items()),
                len(engine.associations),
            )
        if keylog is not None:
            keylog.close()
