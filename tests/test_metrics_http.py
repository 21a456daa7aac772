"""perc.roles.metrics: the h11 ``GET /metrics`` server in this trio process, on loopback.

What is served, what is refused (404 for anything but ``GET /metrics``, 400 and close for
what h11 cannot parse or what is too big), keep-alive, the bound on connections, the read
deadline (under trio's MockClock: a silent client is closed when the clock reaches it), and
the bind error that ``perc kmf``/``perc mdd`` turn into exit 2.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families

from perc.config import HostPort
from perc.roles import metrics as rm

LOCAL = "127.0.0.1"


class Fixed:
    """A collector with one gauge, counting its scrapes."""

    def __init__(self) -> None:
        self.scrapes = 0

    def collect(self) -> Iterator[Metric]:
        self.scrapes += 1
        g = GaugeMetricFamily("perc_test_scrapes", "scrapes so far")
        g.add_metric([], self.scrapes)
        yield g


@asynccontextmanager
async def server(collector: Fixed | None = None) -> AsyncIterator[tuple[int, Fixed]]:
    c = collector or Fixed()
    async with rm.serving(HostPort(LOCAL, 0), lambda: c) as bound:  # type: ignore[arg-type,return-value]
        assert bound is not None
        yield bound[1], c


async def exchange(port: int, request: bytes) -> bytes:
    """Send ``request`` and read until the server closes."""
    stream = await trio.open_tcp_stream(LOCAL, port)
    async with stream:
        await stream.send_all(request)
        out = b""
        while chunk := await stream.receive_some(65536):
            out += chunk
        return out


def status(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


async def test_get_metrics_is_the_text_exposition() -> None:
    async with server() as (port, collector):
        response = await exchange(
            port, b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
    head, body = response.split(b"\r\n\r\n", 1)
    assert status(response) == 200 and b"text/plain; version=0.0.4" in head
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    assert families["perc_test_scrapes"].samples[0].value == 1
    assert "process_cpu_seconds" in families  # the process collector comes along
    assert collector.scrapes == 1


async def test_keep_alive_serves_several_requests_on_one_connection() -> None:
    request = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"
    last = b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    async with server() as (port, collector):
        response = await exchange(port, request + request + last)
    assert response.count(b"HTTP/1.1 200") == 3 and collector.scrapes == 3


@pytest.mark.parametrize(
    "request_line",
    [b"GET / HTTP/1.1", b"GET /metricsx HTTP/1.1", b"POST /metrics HTTP/1.1", b"HEAD / HTTP/1.1"],
)
async def test_anything_but_get_metrics_is_404(request_line: bytes) -> None:
    async with server() as (port, collector):
        response = await exchange(
            port, request_line + b"\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        )
    assert status(response) == 404 and collector.scrapes == 0


@pytest.mark.parametrize(
    "garbage",
    [
        b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + bytes(40) + b"\r\n\r\n",  # TLS hello
        b"GET /metrics\r\n\r\n",  # HTTP/0.9
        b"GET /metrics HTTP/1.1\r\n\r\n",  # no Host (HTTP/1.1 requires it)
        b"GET /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
        b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Long: " + b"a" * 10000 + b"\r\n\r\n",
    ],
)
async def test_malformed_or_oversized_requests_get_400_and_close(garbage: bytes) -> None:
    async with server() as (port, collector):
        response = await exchange(port, garbage)
    assert status(response) == 400 and b"connection: close" in response.lower()
    assert collector.scrapes == 0


async def test_a_body_beyond_the_bound_is_400() -> None:
    body = b"x" * (rm.MAX_REQUEST + 1)
    head = b"GET /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body)
    async with server() as (port, collector):
        response = await exchange(port, head + body)
    assert status(response) == 400 and collector.scrapes == 0


async def test_a_silent_client_is_closed_at_the_deadline(
    mock_clock: trio.testing.MockClock,
) -> None:
    mock_clock.autojump_threshold = 0
    async with server() as (port, _):
        stream = await trio.open_tcp_stream(LOCAL, port)
        async with stream:
            started = trio.current_time()
            await stream.send_all(b"GET /metrics HTTP/1.1\r\n")  # and never the rest
            assert await stream.receive_some(100) == b""  # closed, unanswered
            assert trio.current_time() - started == pytest.approx(rm.DEADLINE)


async def test_connections_beyond_the_bound_are_closed_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(rm, "MAX_CONNECTIONS", 2)
    async with server() as (port, _):
        held = [await trio.open_tcp_stream(LOCAL, port) for _ in range(2)]
        # Both are being served (each sent a first byte the server has read) ...
        for s in held:
            await s.send_all(b"G")
        extra = await trio.open_tcp_stream(LOCAL, port)
        async with extra:
            try:
                closed = await extra.receive_some(100) == b""
            except trio.BrokenResourceError:  # reset rather than closed
                closed = True
        assert closed
        for s in held:
            await s.aclose()


async def test_a_port_in_use_is_a_metrics_error() -> None:
    with socket.socket() as taken:
        taken.bind((LOCAL, 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(rm.MetricsError, match=f"metrics on {LOCAL}:{port}: "):
            async with rm.serving(HostPort(LOCAL, port), Fixed):  # type: ignore[arg-type]
                pass


async def test_no_address_serves_nothing() -> None:
    async with rm.serving(None, Fixed) as bound:  # type: ignore[arg-type]
        assert bound is None
