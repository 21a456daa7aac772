"""A seeded, lossy, fake-clock datagram network joining two sans-IO peers.

Theory of operation
-------------------
Nothing here reads a clock. ``Network.run`` keeps a fake ``now`` and a heap of datagrams in
flight. Each turn it collects what both peers want to send and, per direction, decides with one
``random.Random(seed)`` whether each datagram is dropped, duplicated (a second copy with its own
delay) and/or delayed by a random extra amount (which reorders it behind later datagrams). Then it
jumps ``now`` to the earliest of (next delivery, client timer, server timer), delivers every
datagram due by then with ``receive_datagram(data, now)``, fires every expired timer with
``handle_timer(now)``, and checks the goal. Peers only need ``receive_datagram``,
``datagrams_to_send``, ``get_timer`` and ``handle_timer`` (perc's DtlsConnection surface, or the
``EnginePeer`` wrapper).

``run`` ends when ``until()`` holds (success), when nothing is in flight and no timer is armed
(``stalled``), or when the fake clock would pass ``max_time`` (``timed_out``), so a protocol that
never finishes cannot hang a test. The same seed always gives the same run.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Link:
    """Impairments of one direction. Probabilities are per datagram, in [0, 1]."""

    drop: float = 0.0
    duplicate: float = 0.0
    reorder: float = 0.0  # chance a datagram gets an extra random delay
    latency: float = 0.005  # every datagram's base one-way delay (seconds)
    max_extra_delay: float = 0.3  # extra delay drawn uniformly from [0, max_extra_delay]


@dataclass
class LinkStats:
    sent: int = 0
    dropped: int = 0
    duplicated: int = 0
    delayed: int = 0
    delivered: int = 0


@dataclass
class RunResult:
    outcome: str  # "done" | "stalled" | "timed_out"
    now: float
    turns: int
    c2s: LinkStats
    s2c: LinkStats
    client_timer_fires: int = 0
    server_timer_fires: int = 0
    trace: list[tuple[float, str, int]] = field(default_factory=list)

    @property
    def done(self) -> bool:
        return self.outcome == "done"


class Network:
    def __init__(
        self,
        seed: int,
        c2s: Link | None = None,
        s2c: Link | None = None,
        *,
        record_trace: bool = False,
    ) -> None:
        self.random = random.Random(seed)
        self.links = {"c2s": c2s or Link(), "s2c": s2c or Link()}
        self.stats = {"c2s": LinkStats(), "s2c": LinkStats()}
        self.record_trace = record_trace
        # heap of (deliver_at, tie-breaker, direction, datagram)
        self._in_flight: list[tuple[float, int, str, bytes]] = []
        self._counter = 0

    @classmethod
    def symmetric(cls, seed: int, link: Link, *, record_trace: bool = False) -> Network:
        return cls(seed, link, link, record_trace=record_trace)

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    def _schedule(self, direction: str, datagram: bytes, now: float) -> None:
        link = self.links[direction]
        stats = self.stats[direction]
        rng = self.random
        stats.sent += 1
        # Draw every decision for every datagram, so that the random stream (and with it the
        # whole run) depends only on the seed and the sequence of datagrams.
        drop = rng.random() < link.drop
        duplicate = rng.random() < link.duplicate
        copies = 2 if duplicate else 1
        delays = []
        for _ in range(copies):
            extra = rng.uniform(0.0, link.max_extra_delay) if rng.random() < link.reorder else 0.0
            delays.append(extra)
        if drop:
            stats.dropped += 1
            return
        if duplicate:
            stats.duplicated += 1
        for extra in delays:
            if extra:
                stats.delayed += 1
            self._counter += 1
            heapq.heappush(
                self._in_flight,
                (now + link.latency + extra, self._counter, direction, datagram),
            )

    def _collect(self, client: Any, server: Any, now: float) -> None:
        for datagram in client.datagrams_to_send():
            self._schedule("c2s", datagram, now)
        for datagram in server.datagrams_to_send():
            self._schedule("s2c", datagram, now)

    def run(
        self,
        client: Any,
        server: Any,
        *,
        until: Callable[[], bool],
        max_time: float = 300.0,
        now: float = 0.0,
        max_turns: int = 100_000,
        tap: Callable[[str, bytes, float], None] | None = None,
    ) -> RunResult:
        """Run the pair under this network from fake time ``now``; see the module docstring.

        ``tap(direction, datagram, now)`` runs just before each delivery (it may inject extra
        datagrams into the peers itself)."""
        result = RunResult("stalled", now, 0, self.stats["c2s"], self.stats["s2c"])
        for turn in range(max_turns):
            result.turns = turn
            self._collect(client, server, now)
            if until():
                result.outcome = "done"
                break
            candidates = []
            if self._in_flight:
                candidates.append(self._in_flight[0][0])
            client_timer = client.get_timer()
            server_timer = server.get_timer()
            if client_timer is not None:
                candidates.append(client_timer)
            if server_timer is not None:
                candidates.append(server_timer)
            if not candidates:
                result.outcome = "stalled"
                break
            # Never go back in time (a timer already in the past fires now).
            next_now = max(now, min(candidates))
            if next_now > max_time:
                result.outcome = "timed_out"
                break
            now = next_now
            while self._in_flight and self._in_flight[0][0] <= now:
                _, _, direction, datagram = heapq.heappop(self._in_flight)
                self.stats[direction].delivered += 1
                if self.record_trace:
                    result.trace.append((now, direction, len(datagram)))
                if tap is not None:
                    tap(direction, datagram, now)
                target = server if direction == "c2s" else client
                target.receive_datagram(datagram, now)
            if client_timer is not None and client_timer <= now:
                timer = client.get_timer()  # the delivery may have moved or cancelled it
                if timer is not None and timer <= now:
                    result.client_timer_fires += 1
                    client.handle_timer(now)
            if server_timer is not None and server_timer <= now:
                timer = server.get_timer()
                if timer is not None and timer <= now:
                    result.server_timer_fires += 1
                    server.handle_timer(now)
        else:
            result.outcome = "timed_out"
        result.now = now
        return result
