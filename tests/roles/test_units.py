"""Small units of the roles: runner signal handling, send-queue bounds, TLS refusals."""

from __future__ import annotations

import os
import signal
import uuid
from types import SimpleNamespace

import pytest
import trio
import trio.testing
from OpenSSL import SSL
from trio.testing import MockClock

from perc.roles import kmf
from perc.roles.runner import run_until_signal
from perc.roles.tunnel import (
    TlsHandshakeError,
    TunnelClosed,
    TunnelConnection,
    make_tls_context,
)
from perc.wire.tunnel import EndpointDisconnect, TunneledDtls

from .helpers import RecordingEngine, kmf_config, until


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_run_until_signal_returns_on_signal(signum: signal.Signals) -> None:
    cancelled = []

    async def role() -> None:
        try:
            os.kill(os.getpid(), signum)
            await trio.sleep_forever()
        except trio.Cancelled:
            cancelled.append(True)
            raise

    run_until_signal(role)
    assert cancelled == [True]


def test_run_until_signal_returns_when_the_role_returns() -> None:
    async def role(x: int) -> None:
        await trio.sleep(0)

    run_until_signal(role, 1)


def test_run_until_signal_raises_the_roles_error_unwrapped() -> None:
    async def role() -> None:
        raise OSError(98, "Address already in use")

    with pytest.raises(OSError, match="already in use"):
        run_until_signal(role)


def test_send_queue_drops_relayed_dtls_beyond_its_bound(ids: SimpleNamespace) -> None:
    ctx = make_tls_context(ids.mdd, server=False, is_trusted=lambda fp: True)
    left, _ = trio.testing.memory_stream_pair()
    conn = TunnelConnection(left, ctx, server=False, peer="x", max_pending=100)  # type: ignore[arg-type]
    aid = uuid.uuid4()
    assert conn.send(TunneledDtls(aid, bytes(60)))  # 81 bytes queued
    assert not conn.send(TunneledDtls(aid, bytes(60)))  # would exceed 100: dropped
    assert conn.stats.dropped_backpressure == 1
    assert conn.send(EndpointDisconnect(aid))  # control messages are always queued
    assert conn.pending == 81 + 19


async def test_client_without_certificate_is_refused(
    ids: SimpleNamespace, clock: MockClock
) -> None:
    handler = RecordingEngine()
    async with trio.open_nursery() as nursery:
        server = await nursery.start(
            lambda task_status: kmf.serve(
                kmf_config(ids.kmf, [ids.mdd]), engine=handler, task_status=task_status
            )
        )
        ctx = SSL.Context(SSL.TLS_METHOD)
        ctx.set_min_proto_version(SSL.TLS1_3_VERSION)
        ctx.set_verify(SSL.VERIFY_NONE)
        stream = await trio.open_tcp_stream(*server.address)
        conn = TunnelConnection(stream, ctx, server=False, peer="kmf")
        await conn.handshake(5.0)  # TLS 1.3: the client's part ends before the refusal
        with pytest.raises(TunnelClosed, match="certificate required"):
            await conn.wait_accepted(5.0)
        await conn.aclose()
        await until(lambda: server.stats.refused == 1)
        assert server.engine.tunnel_stats.tunnels_up == 0
        nursery.cancel_scope.cancel()


async def test_handshake_times_out(ids: SimpleNamespace, clock: MockClock) -> None:
    # A peer that accepts TCP and never speaks TLS.
    async def silent(stream: trio.SocketStream) -> None:
        await trio.sleep_forever()

    ctx = make_tls_context(ids.mdd, server=False, is_trusted=lambda fp: True)
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(trio.serve_tcp, silent, 0)
        stream = await trio.open_tcp_stream("127.0.0.1", listeners[0].socket.getsockname()[1])
        conn = TunnelConnection(stream, ctx, server=False, peer="silent")
        with pytest.raises(TlsHandshakeError, match="timed out"):
            await conn.handshake(3.0)
        nursery.cancel_scope.cancel()
