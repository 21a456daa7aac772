"""A UDP impairment proxy for whole-system tests: loss and reordering between endpoint and MDD.

Clients send to the proxy's address; for each client address the proxy opens its own upstream
socket, so the upstream server (the MDD) sees one distinct 5-tuple per client, as it would
without the proxy. Each datagram, in each direction independently, is

* dropped with probability ``drop`` (``drop_to_server``/``drop_to_client``, when given,
  replace it for one direction: e.g. loss only on the MDD-to-client path);
* otherwise, with probability ``reorder``, held back for a random delay in
  ``[reorder_delay / 2, reorder_delay]`` so that datagrams sent after it overtake it;
* otherwise forwarded at once.

Decisions come from one seeded ``random.Random`` so a run is reproducible up to scheduling.
Only loopback addresses are used. Counters are exposed in :class:`ImpairStats`.
"""

from __future__ import annotations

import random
import socket

import attrs
import trio

Address = tuple[str, int]


@attrs.define
class ImpairStats:
    forwarded: int = 0
    dropped: int = 0
    reordered: int = 0


def _udp_socket(host: str) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setblocking(False)
    sock.bind((host, 0))
    return sock


async def _recv(sock: socket.socket) -> tuple[bytes, Address]:
    while True:
        try:
            return sock.recvfrom(65535)
        except BlockingIOError:
            await trio.lowlevel.wait_readable(sock)


class ImpairmentProxy:
    def __init__(
        self,
        upstream: Address,
        *,
        drop: float = 0.1,
        reorder: float = 0.1,
        reorder_delay: float = 0.03,
        seed: int = 0,
        host: str = "127.0.0.1",
        drop_to_server: float | None = None,
        drop_to_client: float | None = None,
    ) -> None:
        self.upstream = upstream
        self.drop = drop
        #: per direction (``None``: ``drop``); attributes, so a test may change them mid-run
        self.drop_to_server = drop_to_server
        self.drop_to_client = drop_to_client
        self.reorder = reorder
        self.reorder_delay = reorder_delay
        self.host = host
        self.rng = random.Random(seed)
        self.to_server = ImpairStats()
        self.to_client = ImpairStats()
        self.address: Address | None = None
        self._clients: dict[Address, socket.socket] = {}

    async def serve(
        self, *, task_status: trio.TaskStatus[Address] = trio.TASK_STATUS_IGNORED
    ) -> None:
        sock = _udp_socket(self.host)
        try:
            self.address = sock.getsockname()
            async with trio.open_nursery() as nursery:
                task_status.started(self.address)
                while True:
                    data, addr = await _recv(sock)
                    up = self._clients.get(addr)
                    if up is None:
                        up = _udp_socket(self.host)
                        self._clients[addr] = up
                        nursery.start_soon(self._pump_back, sock, up, addr, nursery)
                    self._impair(nursery, self.to_server, up, data, self.upstream)
        finally:
            sock.close()
            for up in self._clients.values():
                up.close()

    async def _pump_back(
        self, sock: socket.socket, up: socket.socket, client: Address, nursery: trio.Nursery
    ) -> None:
        while True:
            data, _ = await _recv(up)
            self._impair(nursery, self.to_client, sock, data, client)

    def _impair(
        self,
        nursery: trio.Nursery,
        stats: ImpairStats,
        sock: socket.socket,
        data: bytes,
        dest: Address,
    ) -> None:
        one_way = self.drop_to_server if stats is self.to_server else self.drop_to_client
        drop = self.drop if one_way is None else one_way
        roll = self.rng.random()
        if roll < drop:
            stats.dropped += 1
            return
        if roll < drop + self.reorder:
            stats.reordered += 1
            delay = self.rng.uniform(self.reorder_delay / 2, self.reorder_delay)
            nursery.start_soon(self._later, delay, stats, sock, data, dest)
            return
        stats.forwarded += 1
        _send(sock, data, dest)

    @staticmethod
    async def _later(
        delay: float, stats: ImpairStats, sock: socket.socket, data: bytes, dest: Address
    ) -> None:
        await trio.sleep(delay)
        stats.forwarded += 1
        _send(sock, data, dest)


def _send(sock: socket.socket, data: bytes, dest: Address) -> None:
    # Loopback UDP: a full send buffer is the only failure, and it is loss like any other.
    try:
        sock.sendto(data, dest)
    except (BlockingIOError, OSError):
        pass
