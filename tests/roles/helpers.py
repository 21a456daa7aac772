"""Helpers shared by the role tests."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

import attrs
import pytest
import trio

from perc import events
from perc.config import (
    Fingerprint,
    HostPort,
    KmfConference,
    KmfConfig,
    KmfSettings,
    MddConference,
    MddConfig,
    MddSettings,
)
from perc.identity import Identity
from perc.kmf import Tunnel, TunnelServerEngine
from perc.logsetup import RECORD_KEY
from perc.roles.tunnel import TunnelConnection, make_tls_context
from perc.wire.tunnel import TunneledDtls

LOCAL = "127.0.0.1"


def kmf_config(ident: Identity, trusted: Sequence[Identity], port: int = 0) -> KmfConfig:
    return KmfConfig(
        kmf=KmfSettings(
            listen=HostPort(LOCAL, port),
            cert=Path("unused.crt"),
            key=Path("unused.key"),
            trusted_mdds=tuple(Fingerprint(i.fingerprint) for i in trusted),
            handshake_timeout=5.0,
        ),
        conferences=(KmfConference(id="demo", participants=()),),
        identity=ident,
    )


def mdd_config(
    ident: Identity,
    kmf_address: tuple[str, int],
    kmf_fingerprint: str,
    *,
    idle_timeout: float = 10.0,
    conferences: Sequence[str] = ("demo",),
    max_associations: int = 10000,
    listen_host: str = LOCAL,
) -> MddConfig:
    return MddConfig(
        mdd=MddSettings(
            cert=Path("unused.crt"),
            key=Path("unused.key"),
            idle_timeout=idle_timeout,
            reconnect_min=0.05,
            reconnect_max=1.0,
            handshake_timeout=5.0,
        ),
        conferences=tuple(
            MddConference(
                id=cid,
                listen=HostPort(listen_host, 0),
                kmf=HostPort(kmf_address[0], kmf_address[1]),
                kmf_fingerprint=Fingerprint(kmf_fingerprint),
                max_associations=max_associations,
            )
            for cid in conferences
        ),
        identity=ident,
    )


async def until(predicate: Callable[[], bool], timeout: float = 30.0) -> None:
    """Wait (in virtual time) until ``predicate()`` holds.

    Each poll that finds nothing costs the mock clock's 30 ms of real idleness, so the poll
    interval grows (virtual 10 ms doubling to 1 s) to keep long virtual waits cheap.
    """
    step = 0.01
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(step)
            step = min(step * 2, 1.0)


async def open_raw_tunnel(
    address: tuple[str, int], ident: Identity, kmf_fingerprint: str
) -> TunnelConnection:
    """A bare tunnel client (no MDD logic) for protocol tests; handshake done and accepted."""
    ctx = make_tls_context(ident, server=False, is_trusted=lambda fp: fp == kmf_fingerprint)
    stream = await trio.open_tcp_stream(*address)
    conn = TunnelConnection(stream, ctx, server=False, peer="kmf")
    await conn.handshake(5.0)
    # An OpenSSL server sends session tickets once it accepted us: no timeout here.
    assert await conn.wait_accepted(5.0)
    return conn


@attrs.define
class Seen:
    association_id: uuid.UUID
    data: bytes
    tunnel: Tunnel


class RecordingEngine(TunnelServerEngine):
    """A KMF engine that records what the tunnels carry; optionally answers each datagram
    with ``reply(data)``. Its hooks get the shell's ``now`` (virtual time under MockClock)."""

    def __init__(self, reply: Callable[[bytes], bytes] | None = None) -> None:
        super().__init__()
        self.reply = reply
        self.seen: list[Seen] = []
        self.disconnected: list[uuid.UUID] = []
        self.disconnected_at: list[float] = []
        self.up: list[Tunnel] = []
        self.down: list[Tunnel] = []

    def on_tunnel_up(self, tunnel: Tunnel, now: float) -> None:
        self.up.append(tunnel)

    def on_tunnel_down(self, tunnel: Tunnel, now: float) -> None:
        self.down.append(tunnel)

    def on_dtls(self, tunnel: Tunnel, association_id: uuid.UUID, data: bytes, now: float) -> None:
        self.seen.append(Seen(association_id, data, tunnel))
        if self.reply is not None:
            self.send(tunnel.tunnel_id, TunneledDtls(association_id, self.reply(data)))

    def on_disconnect(self, tunnel: Tunnel, association_id: uuid.UUID, now: float) -> None:
        self.disconnected.append(association_id)
        self.disconnected_at.append(now)


E = TypeVar("E", bound=events.Event)


def logged_events(caplog: pytest.LogCaptureFixture, kind: type[E], **fields: object) -> list[E]:
    """The events of class ``kind`` (with attributes equal to ``fields``) logged so far, in
    order: perc.events.emit attaches each to its log record."""
    found = (getattr(r, RECORD_KEY, None) for r in caplog.records)
    return [
        e
        for e in found
        if isinstance(e, kind) and all(getattr(e, k) == v for k, v in fields.items())
    ]
