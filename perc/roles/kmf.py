"""The Key Distributor (KMF) role: the TLS end of every MDD tunnel (RFC 9185 §5.4; D1-D3).

Theory of operation
-------------------
:func:`serve` listens for TLS 1.3 on ``config.kmf.listen``. Each TCP connection is one tunnel,
handled in its own task: the handshake requires a client certificate whose fingerprint is in
``trusted_mdds`` (else it fails, see :mod:`perc.roles.tunnel`); then the first message must be
``SupportedProfiles``. Version 0 is accepted and the MDD's profile list is remembered for the
tunnel's life; any other version gets ``UnsupportedVersion(highest_version=0)`` and the tunnel
is closed (RFC 9185 §5.5). Any rule break of D2 (framing error, unknown type, a message before
or a second ``SupportedProfiles``, a KMF-to-MDD message type arriving from the MDD) is logged
and closes that tunnel only. One failing tunnel never stops the others or the process.

Tunneled DTLS goes to one interface, :class:`AssociationHandler`, which the DTLS/join issue
implements with its engine. The handler sees every datagram with the :class:`KmfTunnel` that
carried it; it answers through that object (``send_dtls``, ``send_media_keys``,
``send_disconnect``), which writes to the same tunnel. RFC 9185 §5.3/§5.4 allow an
association's messages to arrive over different tunnels (an MDD that reconnected), so a
handler should answer through the tunnel of the latest datagram. Handler methods are
synchronous and must not block: the engine is sans-IO, and timers belong in
:meth:`AssociationHandler.run`, which :func:`serve` runs for its whole life.

Notes for the engine: the MDD keeps an association (and its id) per endpoint 5-tuple until
the endpoint is idle for ``idle_timeout`` or the KMF sends ``EndpointDisconnect``; so a fresh
ClientHello can arrive on an id the handler already knows (the endpoint restarted its
handshake, or the KMF restarted and lost its state). ``on_tunnel_down`` does not end the
associations it carried: the MDD reconnects and their datagrams come back on a new tunnel.
Send ``EndpointDisconnect`` (``send_disconnect``) when an association ends on the KMF side
(D3), ``MediaKeys`` right after its handshake (RFC 9185 §5.4), choosing the profile among
``tunnel.protection_profiles`` (D18).

:func:`serve` uses :class:`perc.roles.keying.KeyingHandler` (the DTLS engine, roster,
keys and the D22 rekey policy of :mod:`perc.keying`, whose timers share the handler's
:meth:`AssociationHandler.run` task) unless given another handler; :class:`LoggingHandler`
only logs and counts.

API::

    serve(config: KmfConfig, *, handler: AssociationHandler | None = None,
          task_status=trio.TASK_STATUS_IGNORED)       # started(KmfServer)
    KmfServer: .address (host, port), .stats: KmfStats, .tunnels: dict[int, KmfTunnel]
    KmfTunnel: .tunnel_id, .peer, .mdd_fingerprint, .version, .protection_profiles,
               .is_open, .stats, send_dtls(aid, data), send_media_keys(MediaKeys),
               send_disconnect(aid) -> bool
    AssociationHandler (Protocol): run(), on_tunnel_up(t), on_datagram(aid, data, t),
               on_disconnect(aid, t), on_tunnel_down(t)
    LoggingHandler, EchoHandler (bench/tests: sends each datagram back)
"""

from __future__ import annotations

import itertools
import logging
import uuid
from collections.abc import Callable
from typing import Protocol

import attrs
import trio

from perc.config import KmfConfig
from perc.identity import fingerprint_matches
from perc.roles.tunnel import (
    TlsHandshakeError,
    TunnelClosed,
    TunnelConnection,
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
    "MAX_TUNNELS",
    "AssociationHandler",
    "EchoHandler",
    "KmfServer",
    "KmfStats",
    "KmfTunnel",
    "LoggingHandler",
    "serve",
]

log = logging.getLogger(__name__)

#: Bound on simultaneous tunnel connections (including ones still in their handshake).
MAX_TUNNELS = 256


class KmfTunnel:
    """The KMF's view of one authenticated tunnel; what an :class:`AssociationHandler` sees."""

    def __init__(
        self,
        tunnel_id: int,
        connection: TunnelConnection,
        mdd_fingerprint: str,
        hello: SupportedProfiles,
    ) -> None:
        self.tunnel_id = tunnel_id
        self.peer = connection.peer
        self.mdd_fingerprint = mdd_fingerprint
        #: Tunnel protocol version the MDD sent (always 0 here, RFC 9185 §5.5).
        self.version = hello.version
        #: Profiles the MDD can act as Media Distributor for (RFC 9185 §5.3; D18 picks from these).
        self.protection_profiles = hello.protection_profiles
        self._connection = connection

    @property
    def is_open(self) -> bool:
        return self._connection.is_open

    @property
    def stats(self) -> TunnelStats:
        return self._connection.stats

    def send_dtls(self, association_id: uuid.UUID, data: bytes) -> bool:
        """Send one DTLS datagram for the endpoint ``association_id`` (RFC 9185 §5.4).

        Returns False if it was dropped (tunnel closed or congested; counted in ``stats``).
        """
        return self._connection.send_encoded(
            encode_message(TunneledDtls(association_id=association_id, dtls_message=data)),
            droppable=True,
        )

    def send_media_keys(self, keys: MediaKeys) -> bool:
        """Send the HBH keys of one association (RFC 9185 §5.4: right after its handshake)."""
        return self._connection.send(keys)

    def send_disconnect(self, association_id: uuid.UUID) -> bool:
        """Tell the MDD the association ended (D3)."""
        return self._connection.send(EndpointDisconnect(association_id=association_id))

    def __repr__(self) -> str:
        return f"<KmfTunnel {self.tunnel_id} peer={self.peer}>"


class AssociationHandler(Protocol):
    """Where tunneled DTLS arrives on the KMF: the DTLS engine's plug.

    Methods are called from the tunnel's reading task, synchronously, in arrival order; they
    must not block and should not raise (an exception is logged and closes that tunnel).
    """

    async def run(self) -> None:
        """Background work for the handler's whole life (DTLS timers). Cancelled at shutdown."""
        ...

    def on_tunnel_up(self, tunnel: KmfTunnel) -> None:
        """An MDD tunnel passed authentication and sent a version 0 SupportedProfiles."""
        ...

    def on_datagram(self, association_id: uuid.UUID, data: bytes, tunnel: KmfTunnel) -> None:
        """One endpoint DTLS datagram (TunneledDtls) of association ``association_id``."""
        ...

    def on_disconnect(self, association_id: uuid.UUID, tunnel: KmfTunnel) -> None:
        """The MDD says the endpoint has gone (EndpointDisconnect, D3)."""
        ...

    def on_tunnel_down(self, tunnel: KmfTunnel) -> None:
        """The tunnel closed; its ``send_*`` methods now return False."""
        ...


@attrs.define
class _AssociationCount:
    datagrams: int = 0
    bytes: int = 0


class LoggingHandler:
    """The default handler until the DTLS engine lands: logs and counts, answers nothing."""

    #: Bound on the per-association table (oldest entries are evicted beyond it).
    MAX_ASSOCIATIONS = 65536

    def __init__(self) -> None:
        self.associations: dict[uuid.UUID, _AssociationCount] = {}
        self.datagrams = 0
        self.disconnects = 0
        self.evicted = 0

    async def run(self) -> None:
        await trio.sleep_forever()

    def on_tunnel_up(self, tunnel: KmfTunnel) -> None:
        pass

    def on_datagram(self, association_id: uuid.UUID, data: bytes, tunnel: KmfTunnel) -> None:
        self.datagrams += 1
        entry = self.associations.get(association_id)
        if entry is None:
            if len(self.associations) >= self.MAX_ASSOCIATIONS:
                del self.associations[next(iter(self.associations))]
                self.evicted += 1
            entry = self.associations[association_id] = _AssociationCount()
            log.info(
                "association seen association=%s peer=%s (no DTLS engine yet: logged only)",
                association_id,
                tunnel.peer,
            )
        entry.datagrams += 1
        entry.bytes += len(data)
        log.debug(
            "tunneled DTLS association=%s peer=%s bytes=%d", association_id, tunnel.peer, len(data)
        )

    def on_disconnect(self, association_id: uuid.UUID, tunnel: KmfTunnel) -> None:
        self.disconnects += 1
        self.associations.pop(association_id, None)

    def on_tunnel_down(self, tunnel: KmfTunnel) -> None:
        pass


class EchoHandler(LoggingHandler):
    """Sends every datagram back through its tunnel (tests and bench/tunnel_relay.py)."""

    def on_datagram(self, association_id: uuid.UUID, data: bytes, tunnel: KmfTunnel) -> None:
        self.datagrams += 1
        tunnel.send_dtls(association_id, data)


@attrs.define
class KmfStats:
    """KMF counters (all tunnels)."""

    connections: int = 0
    """TCP connections accepted."""
    refused: int = 0
    """Connections whose TLS handshake failed (untrusted or missing certificate, timeout...)."""
    refused_capacity: int = 0
    """Connections closed at once because MAX_TUNNELS were open."""
    tunnels_up: int = 0
    """Tunnels that completed the handshake and a version 0 SupportedProfiles."""
    unsupported_version: int = 0
    protocol_errors: int = 0
    """Tunnels closed for breaking D2's rules."""
    handler_errors: int = 0
    """Tunnels closed because the AssociationHandler raised."""
    dtls_in: int = 0
    disconnects_in: int = 0


class _HandlerFailed(Exception):
    pass


class KmfServer:
    """The running KMF: bound address, counters, open tunnels."""

    def __init__(self, config: KmfConfig, handler: AssociationHandler) -> None:
        self.config = config
        self.handler = handler
        self.stats = KmfStats()
        self.tunnels: dict[int, KmfTunnel] = {}
        self.address: tuple[str, int] = ("", 0)
        self._ids = itertools.count(1)
        self._open = 0
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
        log.info(
            "KMF listening on %s fingerprint=%s trusted_mdds=%d",
            format_address(self.address),
            self.config.identity.fingerprint,
            len(self.config.kmf.trusted_mdds),
        )
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.handler.run)
            await nursery.start(trio.serve_listeners, self._guarded, listeners)
            task_status.started(self)

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
            log.warning("tunnel refused peer=%s: %d tunnels already open", peer, MAX_TUNNELS)
            await trio.aclose_forcefully(stream)
            return
        self._open += 1
        try:
            conn = TunnelConnection(stream, self._context, server=True, peer=peer)
            try:
                await conn.handshake(self.config.kmf.handshake_timeout)
            except TlsHandshakeError as e:
                self.stats.refused += 1
                log.warning("tunnel refused peer=%s: %s", peer, e)
                return
            try:
                await conn.run(self._session)
            except TunnelProtocolError as e:
                self.stats.protocol_errors += 1
                log.warning("tunnel closed peer=%s: protocol error (D2): %s", peer, e)
            except _HandlerFailed:
                self.stats.handler_errors += 1
                log.exception("tunnel closed peer=%s: association handler failed", peer)
            except TunnelClosed as e:
                log.info("tunnel closed peer=%s: %s", peer, e)
        finally:
            self._open -= 1

    async def _session(self, conn: TunnelConnection) -> None:
        msgs = await conn.receive_messages()
        hello = msgs[0]
        if not isinstance(hello, SupportedProfiles):
            raise TunnelProtocolError(
                f"first message is {type(hello).__name__}, not SupportedProfiles"
            )
        if hello.version != TUNNEL_VERSION:
            # RFC 9185 §5.5: answer with our highest version and close.
            self.stats.unsupported_version += 1
            log.warning(
                "tunnel closed peer=%s: unsupported tunnel version %d, sent UnsupportedVersion(%d)",
                conn.peer,
                hello.version,
                TUNNEL_VERSION,
            )
            conn.send(UnsupportedVersion(highest_version=TUNNEL_VERSION))
            return
        fingerprint = conn.peer_fingerprint or "?"
        tunnel = KmfTunnel(next(self._ids), conn, fingerprint, hello)
        self.tunnels[tunnel.tunnel_id] = tunnel
        self.stats.tunnels_up += 1
        log.info(
            "tunnel up peer=%s mdd=%s version=%d profiles=%s tls=%s",
            conn.peer,
            fingerprint,
            hello.version,
            ",".join(f"0x{p:04X}" for p in hello.protection_profiles),
            conn.tls_version,
        )
        self._call(self.handler.on_tunnel_up, tunnel)
        try:
            self._dispatch(tunnel, msgs[1:])
            while True:
                self._dispatch(tunnel, await conn.receive_messages())
        finally:
            del self.tunnels[tunnel.tunnel_id]
            conn.close_soon()  # from here on the handler's send_* calls return False
            try:
                self.handler.on_tunnel_down(tunnel)
            except Exception:
                log.exception("association handler failed in on_tunnel_down peer=%s", conn.peer)

    def _dispatch(self, tunnel: KmfTunnel, msgs: list[TunnelMessage]) -> None:
        handler = self.handler
        for msg in msgs:
            if isinstance(msg, TunneledDtls):
                self.stats.dtls_in += 1
                self._call(handler.on_datagram, msg.association_id, msg.dtls_message, tunnel)
            elif isinstance(msg, EndpointDisconnect):
                self.stats.disconnects_in += 1
                log.info(
                    "endpoint disconnect from MDD association=%s peer=%s",
                    msg.association_id,
                    tunnel.peer,
                )
                self._call(handler.on_disconnect, msg.association_id, tunnel)
            elif isinstance(msg, SupportedProfiles):
                raise TunnelProtocolError("second SupportedProfiles on one tunnel")
            else:
                raise TunnelProtocolError(f"{type(msg).__name__} is not sent by an MDD")

    @staticmethod
    def _call(fn: Callable[..., object], *args: object) -> None:
        try:
            fn(*args)
        except Exception as e:
            raise _HandlerFailed from e


async def serve(
    config: KmfConfig,
    *,
    handler: AssociationHandler | None = None,
    task_status: trio.TaskStatus[KmfServer] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the KMF until cancelled; ``task_status.started(KmfServer)`` once listening.

    Without ``handler`` the KMF keys endpoints: :class:`perc.roles.keying.KeyingHandler`,
    with ``SSLKEYLOGFILE`` honoured (D21; :class:`perc.keylog.KeyLogError` if it cannot be
    opened).
    """
    keylog = None
    if handler is None:
        from perc.keylog import keylog_from_env
        from perc.roles.keying import KeyingHandler

        keylog = keylog_from_env()
        handler = KeyingHandler(config, keylog=keylog)
    server = KmfServer(config, handler)
    try:
        await server.serve(task_status=task_status)
    finally:
        if keylog is not None:
            keylog.close()
