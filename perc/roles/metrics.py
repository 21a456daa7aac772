"""``GET /metrics`` over HTTP/1.1 from the role's own trio process (D34).

Theory of operation
-------------------
A small h11 server (h11's trio example, bounded): one task per connection in the role's event
loop, no thread. A request is read with a deadline (:data:`DEADLINE` for the whole
request-response cycle, and for an idle keep-alive connection to send its next request) and
at most :data:`MAX_REQUEST` bytes (head and body), so a slow or endless client cannot hold a
task; at most :data:`MAX_CONNECTIONS` connections are served at once, newer ones are closed
at once. ``GET /metrics`` answers the registry's text exposition (:mod:`perc.metrics`: the
collectors read the engine's counters at that moment); any other method or path is 404; a
request h11 cannot parse (or one too big) gets 400 and the connection is closed.

:func:`serving` binds the address before the role starts (a port in use raises
:class:`MetricsError`, which ``perc kmf``/``perc mdd`` report in one line with exit 2), emits
:class:`~perc.events.Listening` (``what="metrics"``) and serves until the role ends.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

import h11
import trio

from perc.config import ConfigError, HostPort
from perc.events import Listening, emit

if TYPE_CHECKING:
    from prometheus_client.registry import Collector, CollectorRegistry

__all__ = ["DEADLINE", "MAX_CONNECTIONS", "MAX_REQUEST", "MetricsError", "serving"]

log = logging.getLogger(__name__)

#: Seconds for one request-response cycle (and for an idle connection's next request).
DEADLINE = 5.0
#: Bytes of one request, head and body together; beyond it 400 and close.
MAX_REQUEST = 8192
#: Connections served at once; newer ones are closed unanswered.
MAX_CONNECTIONS = 32


_REASONS = {200: b"OK", 400: b"Bad Request", 404: b"Not Found"}


class MetricsError(ConfigError):
    """The metrics address could not be bound: the configuration cannot be used as it is
    (one line; ``perc kmf``/``perc mdd`` exit 2)."""


class _TooBig(Exception):
    pass


class _Server:
    def __init__(self, registry: CollectorRegistry) -> None:
        from perc.metrics import exposition

        self.registry = registry
        self.exposition = exposition
        self.open = 0

    async def handle(self, stream: trio.SocketStream) -> None:
        if self.open >= MAX_CONNECTIONS:
            await trio.aclose_forcefully(stream)
            return
        self.open += 1
        try:
            await self._connection(stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass  # the client went away
        except Exception:
            log.exception("metrics connection failed")
        finally:
            self.open -= 1
            await trio.aclose_forcefully(stream)

    async def _connection(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST)
        while True:
            with trio.move_on_after(DEADLINE):
                try:
                    request = await _read_request(conn, stream)
                except (h11.RemoteProtocolError, _TooBig):
                    await _respond(conn, stream, 400, b"bad request\n", close=True)
                    return
                if request is None:
                    return  # closed by the client
                target = request.target.split(b"?", 1)[0]
                if request.method == b"GET" and target == b"/metrics":
                    await _respond(conn, stream, 200, self.exposition(self.registry))
                else:
                    body = b"" if request.method == b"HEAD" else b"not found: GET /metrics\n"
                    await _respond(conn, stream, 404, body)
                if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                    return
                conn.start_next_cycle()
                continue
            return  # too slow


async def _read_request(conn: h11.Connection, stream: trio.SocketStream) -> h11.Request | None:
    """The next whole request (its body read and ignored); None if the client closed."""
    request: h11.Request | None = None
    received = 0
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            data = await stream.receive_some(4096)
            received += len(data)
            if received > MAX_REQUEST:
                raise _TooBig
            conn.receive_data(data)
        elif isinstance(event, h11.Request):
            request = event
        elif isinstance(event, h11.EndOfMessage):
            return request
        elif isinstance(event, h11.ConnectionClosed):
            return None


async def _respond(
    conn: h11.Connection,
    stream: trio.SocketStream,
    status: int,
    body: bytes,
    *,
    close: bool = False,
) -> None:
    from perc.metrics import CONTENT_TYPE

    content_type = CONTENT_TYPE if status == 200 else "text/plain; charset=utf-8"
    headers = [("content-type", content_type), ("content-length", str(len(body)))]
    if close:
        headers.append(("connection", "close"))
    try:
        data = b"".join(
            conn.send(event) or b""
            for event in (
                h11.Response(status_code=status, headers=headers, reason=_REASONS[status]),
                h11.Data(data=body),
                h11.EndOfMessage(),
            )
        )
    except h11.LocalProtocolError:
        return  # the request broke the exchange too early to answer (h11's state says so)
    if data:
        await stream.send_all(data)


@asynccontextmanager
async def serving(
    address: HostPort | None, collector: Callable[[], Collector]
) -> AsyncIterator[tuple[str, int] | None]:
    """Serve the metrics of ``collector()`` (and of the process: CPU, memory, files) at
    ``http://address/metrics`` while the block runs; yields the bound (host, port). With
    ``address`` None it serves nothing (and prometheus-client is not even imported)."""
    if address is None:
        yield None
        return
    from prometheus_client import ProcessCollector

    from perc.metrics import new_registry

    registry = new_registry(collector(), ProcessCollector(registry=None))
    try:
        listeners = await trio.open_tcp_listeners(address.port, host=address.host)
    except OSError as e:
        raise MetricsError(f"metrics on {address}: {e.strerror or e}") from None
    name = listeners[0].socket.getsockname()
    bound = (str(name[0]), int(name[1]))
    emit(log, Listening("metrics", bound[0], bound[1]))
    server = _Server(registry)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.serve_listeners, server.handle, listeners)
        try:
            yield bound
        finally:
            nursery.cancel_scope.cancel()
