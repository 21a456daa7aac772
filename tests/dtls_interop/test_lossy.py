"""perc client and server (with EKTKey and its ACK) over a seeded lossy network, fake clock.

100 of 100 seeded handshakes complete, EKTKey delivered and acknowledged, with 10%
drop + 10% duplication + 10% reordering/delay in both directions, and again with 30% drop; a
handshake whose peer vanishes ends with ConnectionClosed(reason "timeout"), not a hang.
Seeded loops (no hypothesis): a failure names its seed, and rerunning that seed replays it.
"""

from __future__ import annotations

from typing import Any

import pytest

from perc.identity import Identity
from tests.dtls_interop.engine import (
    EKT_KEY,
    EKT_SALT,
    EKT_SPI,
    EKT_TTL,
    GatedServer,
    client_peer,
    ekt_server_peer,
)
from tests.dtls_interop.harness import assert_no_internal_errors, describe
from tests.dtls_interop.netsim import Link, Network, RunResult

RUNS = 100
MODERATE = Link(drop=0.10, duplicate=0.10, reorder=0.10)
HEAVY = Link(drop=0.30)
HEAVY_MIXED = Link(drop=0.30, duplicate=0.10, reorder=0.10)
# Fake-clock budget of one run, and the handshake deadline for the 30% cases. With 30% loss
# each way a flight round trip fails about half the time and the retransmission timer doubles
# from 1 s, so six lost round trips in a row (1+2+4+8+16+32 = 63 s > the default 60 s
# deadline) happen to about 1 in 70 exchanges: with the cookie round (4 exchanges), seeds 12
# and 27 of 0..99 lose the ClientHello/HelloVerifyRequest exchange six times. That is the
# protocol, not the engine, so the 30% runs raise the deadline; the 10% runs keep the default.
MAX_TIME = 900.0
HEAVY_HANDSHAKE_TIMEOUT = 600.0


def ekt_done(client: Any, server: Any) -> bool:
    return bool(client.has("EktKeyReceived") and server.has("EktKeyAcknowledged"))


def run_seed(
    seed: int,
    link: Link,
    client_identity: Identity,
    server_identity: Identity,
    *,
    gated: bool,
    handshake_timeout: float = 60.0,
    mtu: int = 1200,
) -> tuple[RunResult, Any, Any]:
    options = {"handshake_timeout": handshake_timeout, "mtu": mtu}
    client = client_peer(client_identity, **options)
    server: Any
    if gated:
        server = GatedServer(
            server_identity, cookie_identity=b"assoc-%d" % seed, send_ekt=True, **options
        )
    else:
        server = ekt_server_peer(server_identity, **options)
    client.connect(0.0)
    network = Network.symmetric(seed, link)
    largest = 0

    def tap(direction: str, datagram: bytes, now: float) -> None:
        nonlocal largest
        largest = max(largest, len(datagram))

    result = network.run(
        client, server, until=lambda: ekt_done(client, server), max_time=MAX_TIME, tap=tap
    )
    # retransmissions too stay within the MTU (RFC 6347 §4.1.1: records never span datagrams)
    assert largest <= mtu, f"seed {seed}: a {largest}-byte datagram with MTU {mtu}"
    return result, client, server


def check_run(result: RunResult, client: Any, server: Any, seed: int) -> None:
    context = (
        f"seed {seed}: {result.outcome} at t={result.now:.1f}: "
        f"{describe(client)} / {describe(server)}"
    )
    assert result.done, context
    assert client.failed is None and server.failed is None, context
    assert_no_internal_errors(client, server)
    ours, theirs = client.completed, server.completed
    assert ours.srtp_keying_material == theirs.srtp_keying_material, context
    assert ours.srtp_profile == theirs.srtp_profile == 0x0009, context
    assert ours.ekt_cipher == theirs.ekt_cipher is not None, context
    received = client.first("EktKeyReceived")
    assert (received.key, received.salt, received.spi, received.ttl) == (
        EKT_KEY,
        EKT_SALT,
        EKT_SPI,
        EKT_TTL,
    ), context
    assert server.first("EktKeyAcknowledged").spi == EKT_SPI, context
    # duplicates and retransmissions never produce a second event
    assert sum(type(e).__name__ == "EktKeyReceived" for e in client.events) == 1, context
    assert sum(type(e).__name__ == "HandshakeCompleted" for e in client.events) == 1, context
    assert sum(type(e).__name__ == "HandshakeCompleted" for e in server.events) == 1, context


@pytest.mark.parametrize(
    "link, gated, handshake_timeout, mtu",
    [
        pytest.param(MODERATE, False, 60.0, 1200, id="10drop-10dup-10reorder"),
        pytest.param(MODERATE, True, 60.0, 1200, id="10drop-10dup-10reorder-cookie"),
        pytest.param(MODERATE, True, 60.0, 300, id="10drop-10dup-10reorder-cookie-mtu300"),
        pytest.param(HEAVY, False, HEAVY_HANDSHAKE_TIMEOUT, 1200, id="30drop"),
        pytest.param(HEAVY, True, HEAVY_HANDSHAKE_TIMEOUT, 1200, id="30drop-cookie"),
        pytest.param(
            HEAVY_MIXED, True, HEAVY_HANDSHAKE_TIMEOUT, 1200, id="30drop-10dup-10reorder-cookie"
        ),
        pytest.param(
            HEAVY_MIXED,
            True,
            HEAVY_HANDSHAKE_TIMEOUT,
            300,
            id="30drop-10dup-10reorder-cookie-mtu300",
        ),
    ],
)
def test_hundred_seeded_handshakes_with_ekt(
    client_identity: Identity,
    server_identity: Identity,
    link: Link,
    gated: bool,
    handshake_timeout: float,
    mtu: int,
) -> None:
    failures = []
    for seed in range(RUNS):
        result, client, server = run_seed(
            seed,
            link,
            client_identity,
            server_identity,
            gated=gated,
            handshake_timeout=handshake_timeout,
            mtu=mtu,
        )
        try:
            check_run(result, client, server, seed)
        except AssertionError as e:
            failures.append(str(e))
    assert not failures, f"{len(failures)} of {RUNS} failed:\n" + "\n".join(failures[:5])


def test_clean_network_needs_no_retransmission(
    client_identity: Identity, server_identity: Identity
) -> None:
    result, client, server = run_seed(0, Link(), client_identity, server_identity, gated=True)
    check_run(result, client, server, 0)
    assert result.client_timer_fires == 0
    assert result.server_timer_fires == 0


# --- vanishing peers ---------------------------------------------------------------------------


class Vanishing:
    """Forwards to a peer until it has received ``after`` datagrams, then is gone for good."""

    def __init__(self, inner: Any, after: int) -> None:
        self.inner = inner
        self.after = after
        self.received = 0
        self.is_client = inner.is_client

    @property
    def gone(self) -> bool:
        return self.received >= self.after

    def receive_datagram(self, data: bytes, now: float) -> None:
        if not self.gone:
            self.received += 1
            self.inner.receive_datagram(data, now)

    def datagrams_to_send(self) -> list[bytes]:
        out = self.inner.datagrams_to_send()
        return [] if self.gone else out

    def get_timer(self) -> float | None:
        return None if self.gone else self.inner.get_timer()

    def handle_timer(self, now: float) -> None:
        if not self.gone:
            self.inner.handle_timer(now)

    @property
    def handshake_complete(self) -> bool:
        return bool(self.inner.handshake_complete)


def assert_timed_out(peer: Any, result: RunResult, deadline: float) -> None:
    closed = peer.first("ConnectionClosed")
    assert closed is not None, f"{result.outcome} at t={result.now}: {describe(peer)}"
    assert closed.reason == "timeout"
    assert closed.alert is None
    assert not peer.handshake_complete
    # gave up at its deadline (give or take one retransmission interval), then went quiet
    assert deadline - 1 <= result.now <= deadline + 61
    assert peer.get_timer() is None


@pytest.mark.parametrize("server_hears", [0, 1, 2])
def test_client_whose_server_vanishes_times_out(
    client_identity: Identity, server_identity: Identity, server_hears: int
) -> None:
    # 0: no server at all; 1: the server answered flight 1 then vanished; 2: it got flight 5
    client = client_peer(client_identity)
    server = Vanishing(ekt_server_peer(server_identity), after=server_hears)
    client.connect(0.0)
    result = Network(1).run(
        client, server, until=lambda: client.failed is not None, max_time=MAX_TIME
    )
    assert_timed_out(client, result, 60.0)


def test_server_whose_client_vanishes_times_out(
    client_identity: Identity, server_identity: Identity
) -> None:
    client = Vanishing(client_peer(client_identity), after=1)  # got flight 4, then gone
    server = ekt_server_peer(server_identity, handshake_timeout=30.0)
    client.inner.connect(0.0)
    result = Network(1).run(
        client, server, until=lambda: server.failed is not None, max_time=MAX_TIME
    )
    assert_timed_out(server, result, 30.0)


def test_ekt_to_vanished_client_does_not_retransmit_forever(
    client_identity: Identity, server_identity: Identity
) -> None:
    # the client completes, then vanishes before the EKTKey: the server must not keep a timer
    # armed forever (SPEC-DTLS 3.7: give up after ~6 retransmissions)
    inner = client_peer(client_identity)
    client = Vanishing(inner, after=2)  # flight 4 and flight 6, then gone
    server = ekt_server_peer(server_identity)
    inner.connect(0.0)
    result = Network(1).run(client, server, until=lambda: False, max_time=3600.0)
    assert inner.handshake_complete and server.handshake_complete
    assert not server.has("EktKeyAcknowledged")
    assert result.outcome == "stalled", f"server still retransmitting at t={result.now}"
    assert server.has("ConnectionClosed")


def test_early_and_repeated_timer_calls_change_nothing(
    client_identity: Identity, server_identity: Identity
) -> None:
    """handle_timer(now) before the timer is due (a shell may wake early or twice) must not
    retransmit or disturb the handshake: a clean run with extra calls everywhere sends exactly
    the datagrams of a clean run."""

    def run(extra_calls: bool) -> tuple[RunResult, Any, Any]:
        client = client_peer(client_identity)
        server = ekt_server_peer(server_identity)

        def tap(direction: str, datagram: bytes, now: float) -> None:
            if extra_calls:
                for peer in (client, server, client, server):
                    peer.handle_timer(now)

        client.connect(0.0)
        result = Network(2).run(
            client, server, until=lambda: ekt_done(client, server), max_time=60.0, tap=tap
        )
        return result, client, server

    plain, _, _ = run(False)
    poked, client, server = run(True)
    check_run(poked, client, server, 2)
    assert (poked.c2s.sent, poked.s2c.sent) == (plain.c2s.sent, plain.s2c.sent)
    assert client.connection.stats.retransmissions == 0
    assert server.connection.stats.retransmissions == 0


def run_and_close(
    client_identity: Identity, server_identity: Identity, seed: int, closer: str
) -> None:
    client = client_peer(client_identity)
    server = ekt_server_peer(server_identity)
    target = client if closer == "client" else server
    close_at = 0.05 + (seed % 20) * 0.1
    closed = False

    def tap(direction: str, datagram: bytes, now: float) -> None:
        nonlocal closed
        if not closed and now >= close_at:
            closed = True
            target.close(now)

    client.connect(0.0)
    result = Network.symmetric(seed, MODERATE).run(
        client, server, until=lambda: False, max_time=3000.0, tap=tap
    )
    context = (
        f"seed {seed}: {result.outcome} at {result.now}: {describe(client)} / {describe(server)}"
    )
    assert result.outcome == "stalled", context
    assert client.get_timer() is None and server.get_timer() is None, context
    assert_no_internal_errors(client, server)
    if closed:
        assert target.has("ConnectionClosed"), context


@pytest.mark.parametrize("closer", ["client", "server"])
def test_close_at_any_moment_leaves_no_timer(
    client_identity: Identity, server_identity: Identity, closer: str
) -> None:
    """close() during or after the handshake (EKTKey in flight, retransmissions pending),
    under loss: nothing raises, and both peers eventually go quiet with no timer armed."""
    for seed in range(50):
        run_and_close(client_identity, server_identity, seed, closer)
