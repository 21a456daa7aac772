"""An in-process stand-in KMF for the endpoint's own tests: a DTLS server on plain UDP.

No MDD and no tunnel: the endpoint's role does not depend on them (RFC 9185 §5.1, it need not
know its DTLS is tunneled), so its join logic is tested against the engine's server directly.
One ``DtlsConnection`` per client address, cookies through a ``CookieGate`` (D14), a roster
check in ``verify_peer`` (access_denied, D15), and the EKTKey sent on ``HandshakeCompleted``.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from typing import Any

import attrs
import trio

from perc.dtls import CookieGate, DtlsConfiguration, DtlsConnection, PeerIdentity
from perc.dtls.events import ConnectionClosed, EktKeyAcknowledged, Event, HandshakeCompleted
from perc.identity import Identity

Address = tuple[str, int]


@attrs.define
class EktKey:
    key: bytes = attrs.Factory(lambda: os.urandom(16))
    salt: bytes = attrs.Factory(lambda: os.urandom(12))
    spi: int = 0x1234
    ttl: int = 86400


@attrs.define
class Peer:
    conn: DtlsConnection
    events: list[Event] = attrs.Factory(list)
    completed: HandshakeCompleted | None = None


class FakeKmf:
    def __init__(
        self,
        ident: Identity,
        roster: set[str] | None = None,
        *,
        ekt: EktKey | None = None,
        send_ekt: bool = True,
        tls_id: bytes | None = b"KMF-tls-id-0123456789",
        ekt_ciphers: tuple[int, ...] = (1, 2),
        cookies: bool = True,
        on_complete: Callable[[FakeKmf, Address, Peer], None] | None = None,
        drop_in: Callable[[bytes], bool] | None = None,
        drop_out: Callable[[bytes], bool] | None = None,
    ) -> None:
        self.ident = ident
        self.roster = roster
        self.ekt = ekt if ekt is not None else EktKey()
        self.send_ekt = send_ekt
        self.on_complete = on_complete
        #: incoming datagrams for which this returns True are dropped (simulated loss)
        self.drop_in = drop_in
        self.dropped_in = 0
        #: outgoing datagrams for which this returns True are not sent (simulated loss)
        self.drop_out = drop_out
        self.dropped_out = 0
        #: every datagram received, in order
        self.received: list[bytes] = []
        self.gate = CookieGate() if cookies else None
        self.peers: dict[Address, Peer] = {}
        self.address: Address = ("127.0.0.1", 0)
        self.sock: socket.socket | None = None
        self._wake = trio.Event()
        self.config = DtlsConfiguration(
            is_client=False,
            certificate=ident.certificate,
            private_key=ident.private_key,
            ekt_ciphers=ekt_ciphers,
            tls_id=tls_id,
            verify_peer=self._verify,
        )

    def _verify(self, peer: PeerIdentity) -> int | None:
        if self.roster is not None and peer.fingerprint not in self.roster:
            return 49  # access_denied (D15)
        return None

    def events(self, kind: type[Any]) -> list[Any]:
        return [e for p in self.peers.values() for e in p.events if isinstance(e, kind)]

    def send(self, addr: Address, data: bytes) -> None:
        assert self.sock is not None
        if self.drop_out is not None and self.drop_out(data):
            self.dropped_out += 1
            return
        self.sock.sendto(data, addr)

    def flush(self, addr: Address) -> None:
        for dg in self.peers[addr].conn.datagrams_to_send():
            self.send(addr, dg)

    async def serve(
        self, *, task_status: trio.TaskStatus[Address] = trio.TASK_STATUS_IGNORED
    ) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setblocking(False)
        sock.bind(("127.0.0.1", 0))
        self.sock = sock
        self.address = sock.getsockname()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._timers)
                task_status.started(self.address)
                while True:
                    await trio.lowlevel.wait_readable(sock)
                    while True:
                        try:
                            data, addr = sock.recvfrom(65535)
                        except BlockingIOError:
                            break
                        self._datagram(data, addr)
        finally:
            sock.close()

    def _datagram(self, data: bytes, addr: Address) -> None:
        now = trio.current_time()
        self.received.append(data)
        if self.drop_in is not None and self.drop_in(data):
            self.dropped_in += 1
            return
        peer = self.peers.get(addr)
        if peer is None:
            if self.gate is not None:
                verdict = self.gate.check(data, repr(addr).encode(), now)
                if verdict.reply is not None:
                    self.send(addr, verdict.reply)
                if not verdict.accepted:
                    return
            peer = self.peers[addr] = Peer(DtlsConnection(self.config))
        peer.conn.receive_datagram(data, now)
        self._drain(addr, peer, now)
        self._wake.set()

    def _drain(self, addr: Address, peer: Peer, now: float) -> None:
        while (e := peer.conn.next_event()) is not None:
            peer.events.append(e)
            if isinstance(e, HandshakeCompleted):
                peer.completed = e
                if self.on_complete is not None:
                    self.on_complete(self, addr, peer)
                if self.send_ekt and e.ekt_cipher is not None:
                    k = self.ekt
                    peer.conn.send_ekt_key(k.key, k.salt, k.spi, k.ttl, now)
        self.flush(addr)

    async def _timers(self) -> None:
        # Sleep until the earliest engine timer, or until a datagram may have changed it.
        while True:
            now = trio.current_time()
            for addr, peer in list(self.peers.items()):
                t = peer.conn.get_timer()
                if t is not None and t <= now:
                    peer.conn.handle_timer(now)
                    self._drain(addr, peer, now)
            timers = [t for p in self.peers.values() if (t := p.conn.get_timer()) is not None]
            self._wake = trio.Event()
            with trio.move_on_at(min(timers) if timers else now + 3600):
                await self._wake.wait()

    def acked(self) -> list[EktKeyAcknowledged]:
        return self.events(EktKeyAcknowledged)

    def closed(self) -> list[ConnectionClosed]:
        return self.events(ConnectionClosed)
