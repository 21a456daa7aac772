"""EKTKey rekeys (D9, D22): a newer EKTKey supersedes an older one, the newest key wins, and
the server counts a key as acknowledged only when the client delivered it (findings F3)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from perc.identity import Identity
from tests.dtls_interop.engine import EKT_SALT, client_peer, ekt_server_peer, server_peer
from tests.dtls_interop.harness import EnginePeer, assert_no_internal_errors, describe
from tests.dtls_interop.netsim import Link, Network


def deliver(datagrams: list[bytes], peer: EnginePeer, now: float) -> None:
    for datagram in datagrams:
        peer.receive_datagram(datagram, now)


@pytest.mark.parametrize("second_before_flight_6", [False, True])
def test_lost_ekt_key_superseded_by_a_newer_one(
    client_identity: Identity, server_identity: Identity, second_before_flight_6: bool
) -> None:
    """The server sends EKTKey spi=1 (lost), then a newer EKTKey spi=2, which supersedes it
    (D22). The client must deliver spi=2 to its application (EktKeyReceived) if it ACKs it:
    the server reports EktKeyAcknowledged(2) only for a key the endpoint has."""
    client = client_peer(client_identity)
    server = server_peer(server_identity)
    client.connect(0.0)
    deliver(client.datagrams_to_send(), server, 0.0)  # ClientHello
    deliver(server.datagrams_to_send(), client, 0.0)  # flight 4
    deliver(client.datagrams_to_send(), server, 0.0)  # flight 5
    assert server.handshake_complete
    flight_6 = server.datagrams_to_send()
    server.send_ekt_key(bytes([1]) * 16, EKT_SALT, 1, 100, 0.1)
    server.datagrams_to_send()  # EKTKey spi=1: lost
    server.send_ekt_key(bytes([2]) * 16, EKT_SALT, 2, 100, 0.2)
    second = server.datagrams_to_send()
    if second_before_flight_6:
        deliver(second, client, 0.3)
        deliver(flight_6, client, 0.4)
    else:
        deliver(flight_6, client, 0.3)
        deliver(second, client, 0.4)
    assert client.handshake_complete
    deliver(client.datagrams_to_send(), server, 0.5)  # the client's ACK(s), if any
    received = [e.spi for e in client.events if type(e).__name__ == "EktKeyReceived"]
    acknowledged = [e.spi for e in server.events if type(e).__name__ == "EktKeyAcknowledged"]
    assert_no_internal_errors(client, server)
    assert received == [2], (received, acknowledged)
    assert acknowledged == [2]


class WithActions:
    """A peer wrapper that also runs caller actions at fixed fake times (as timers)."""

    def __init__(self, inner: Any, actions: list[tuple[float, Callable[[float], None]]]) -> None:
        self.inner = inner
        self.actions = sorted(actions, key=lambda a: a[0])
        self.is_client = inner.is_client

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def receive_datagram(self, data: bytes, now: float) -> None:
        self.inner.receive_datagram(data, now)

    def datagrams_to_send(self) -> list[bytes]:
        return self.inner.datagrams_to_send()

    def get_timer(self) -> float | None:
        times = [t for t in (self.inner.get_timer(),) if t is not None]
        if self.actions:
            times.append(self.actions[0][0])
        return min(times) if times else None

    def handle_timer(self, now: float) -> None:
        while self.actions and self.actions[0][0] <= now:
            _, action = self.actions.pop(0)
            action(now)
        timer = self.inner.get_timer()
        if timer is not None and timer <= now:
            self.inner.handle_timer(now)


REKEY_LINK = Link(drop=0.10, duplicate=0.20, reorder=0.50, max_extra_delay=1.5)


def test_rekeys_under_loss_newest_key_wins(
    client_identity: Identity, server_identity: Identity
) -> None:
    failures = []
    for seed in range(200):
        client = client_peer(client_identity)
        server_peer = ekt_server_peer(server_identity)

        def rekey(spi: int, peer: Any = server_peer) -> Callable[[float], None]:
            def action(now: float) -> None:
                if peer.handshake_complete and not peer.failed:
                    peer.send_ekt_key(bytes([spi]) * 16, EKT_SALT, spi, 100, now)

            return action

        # the handshake's own EKTKey goes out at completion; two rekeys follow 1 s and 1.3 s later
        server = WithActions(server_peer, [])
        first_hook = server_peer.on_handshake_complete

        def schedule(
            peer: Any, now: float, server: WithActions = server, first_hook: Any = first_hook
        ) -> None:
            first_hook(peer, now)
            server.actions += [(now + 1.0, rekey(2)), (now + 1.3, rekey(3))]

        server_peer.on_handshake_complete = schedule
        client.connect(0.0)
        Network.symmetric(seed, REKEY_LINK).run(client, server, until=lambda: False, max_time=90.0)
        received = [e.spi for e in client.events if type(e).__name__ == "EktKeyReceived"]
        acked = [e.spi for e in server_peer.events if type(e).__name__ == "EktKeyAcknowledged"]
        assert_no_internal_errors(client, server_peer)
        if not server_peer.handshake_complete:
            failures.append(f"seed {seed}: no handshake {describe(server_peer)}")
            continue
        if not received or received[-1] != 3 or not acked or acked[-1] != 3:
            failures.append(f"seed {seed}: client received {received}, server acked {acked}")
    assert not failures, f"{len(failures)} of 200:\n" + "\n".join(failures[:8])
