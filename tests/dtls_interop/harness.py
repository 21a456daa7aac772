"""Glue shared by the interop tests and ``bench/dtls_handshake.py``.

``EnginePeer`` wraps a :class:`perc.dtls.DtlsConnection` so that it has the same surface as
:class:`tests.dtls_interop.openssl_peer.OpensslPeer` (``handshake_complete``, ``failed``,
``srtp_keying_material`` ...) and keeps every event it emitted. ``pump`` joins any two such peers
with a clean in-memory network: it hands each side's datagrams to the other until both are done
or nothing moves any more.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol


class Peer(Protocol):
    handshake_complete: bool

    def receive_datagram(self, data: bytes, now: float) -> None: ...

    def datagrams_to_send(self) -> list[bytes]: ...


class PumpStalled(AssertionError):
    """The pair stopped exchanging datagrams before the goal was reached."""


def pump(
    a: Any,
    b: Any,
    *,
    now: float = 0.0,
    max_steps: int = 100,
    until: Callable[[], bool] | None = None,
    tap: Callable[[str, bytes], None] | None = None,
    stop_when_quiet: bool = False,
) -> int:
    """Exchange datagrams between ``a`` and ``b`` (no loss) until ``until()`` holds.

    The default goal is both handshakes complete. Each step delivers everything each side has
    queued. Returns the number of steps; raises PumpStalled if the pair goes quiet first or the
    step limit is hit (``stop_when_quiet``: a quiet pair just ends the pump). ``tap(direction,
    datagram)`` sees every datagram ("a->b" / "b->a").
    """
    if until is None:

        def until() -> bool:
            return bool(a.handshake_complete and b.handshake_complete)

    for step in range(max_steps):
        if until():
            return step
        out_a = a.datagrams_to_send()
        out_b = b.datagrams_to_send()
        if not out_a and not out_b:
            if stop_when_quiet:
                return step
            raise PumpStalled(f"pair went quiet after {step} steps: {describe(a)} / {describe(b)}")
        for datagram in out_a:
            if tap is not None:
                tap("a->b", datagram)
            b.receive_datagram(datagram, now)
        for datagram in out_b:
            if tap is not None:
                tap("b->a", datagram)
            a.receive_datagram(datagram, now)
    if until():
        return max_steps
    raise PumpStalled(f"step limit {max_steps} hit: {describe(a)} / {describe(b)}")


def describe(peer: Any) -> str:
    name = type(peer).__name__
    state = "complete" if peer.handshake_complete else "incomplete"
    failed = getattr(peer, "failed", None)
    extra = f", failed: {failed!r}" if failed is not None else ""
    events = getattr(peer, "events", None)
    if events is not None:
        extra += f", events: {[type(e).__name__ for e in events]}"
    return f"{name} ({'client' if peer.is_client else 'server'}) {state}{extra}"


class EnginePeer:
    """perc's DtlsConnection with the OpensslPeer surface; records every event."""

    def __init__(
        self,
        connection: Any,
        *,
        is_client: bool,
        on_handshake_complete: Callable[[EnginePeer, float], None] | None = None,
    ) -> None:
        self.connection = connection
        self.is_client = is_client
        self.events: list[Any] = []
        # called once, with the time, right after HandshakeCompleted is emitted
        self.on_handshake_complete = on_handshake_complete

    # -- sans-IO surface, forwarding and draining events ----------------------------------
    def connect(self, now: float) -> None:
        self.connection.connect(now)
        self._drain(now)

    def receive_datagram(self, data: bytes, now: float) -> None:
        self.connection.receive_datagram(data, now)
        self._drain(now)

    def datagrams_to_send(self) -> list[bytes]:
        return list(self.connection.datagrams_to_send())

    def get_timer(self) -> float | None:
        timer: float | None = self.connection.get_timer()
        return timer

    def handle_timer(self, now: float) -> None:
        self.connection.handle_timer(now)
        self._drain(now)

    def send_ekt_key(self, key: bytes, salt: bytes, spi: int, ttl: int, now: float) -> None:
        self.connection.send_ekt_key(key, salt, spi, ttl, now)
        self._drain(now)

    def export_keying_material(self, label: bytes, length: int) -> bytes:
        material: bytes = self.connection.export_keying_material(label, length)
        return material

    def close(self, now: float) -> None:
        self.connection.close(now)
        self._drain(now)

    def _drain(self, now: float) -> None:
        while (event := self.connection.next_event()) is not None:
            self.events.append(event)
            if type(event).__name__ == "HandshakeCompleted" and self.on_handshake_complete:
                self.on_handshake_complete(self, now)

    # -- results --------------------------------------------------------------------------
    def first(self, name: str) -> Any | None:
        for event in self.events:
            if type(event).__name__ == name:
                return event
        return None

    def has(self, name: str) -> bool:
        return self.first(name) is not None

    @property
    def completed(self) -> Any:
        event = self.first("HandshakeCompleted")
        if event is None:
            raise AssertionError(f"no HandshakeCompleted: {describe(self)}")
        return event

    @property
    def handshake_complete(self) -> bool:
        return self.has("HandshakeCompleted")

    @property
    def failed(self) -> Any | None:
        return self.first("ConnectionClosed")

    @property
    def srtp_profile(self) -> int | None:
        profile: int | None = self.completed.srtp_profile
        return profile

    @property
    def cipher_suite(self) -> int:
        suite: int = self.completed.cipher_suite
        return suite

    @property
    def srtp_keying_material(self) -> bytes | None:
        material: bytes | None = self.completed.srtp_keying_material
        return material

    @property
    def peer_certificate_der(self) -> bytes:
        der: bytes = self.completed.peer_certificate_der
        return der


def internal_errors(peer: Any) -> int:
    """Unexpected exceptions the engine contained as internal_error alerts (0 for non-engine
    peers). The engine never lets them escape, so tests must look here to see them."""
    inner = getattr(peer, "peer", peer)  # GatedServer -> its EnginePeer (or None)
    connection = getattr(inner, "connection", None)
    stats = getattr(connection, "stats", None)
    count = getattr(stats, "internal_errors", 0)
    closed = [e for e in getattr(inner, "events", ()) if type(e).__name__ == "ConnectionClosed"]
    return int(count) + sum(e.alert == 80 and not e.sent_by_peer for e in closed)


def assert_no_internal_errors(*peers: Any) -> None:
    for peer in peers:
        assert internal_errors(peer) == 0, f"internal error contained: {describe(peer)}"
