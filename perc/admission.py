"""The KMF's connection admission, sans-IO: who may hold a TLS handshake open, and for how long.

Theory of operation
-------------------
A TCP connection to the KMF is not a tunnel until its TLS handshake has authenticated a
trusted MDD (D1). Until then it costs memory and, once its ClientHello is answered, an ECDHE
and a signature, so connections still in their handshake get their own budget
(``kmf.max_handshakes``) and a share per source address (``kmf.max_handshakes_per_ip``);
only authenticated tunnels count against the tunnel cap.

A new connection is never refused for lack of room (refusing would let whoever holds the
budget lock every MDD out). Instead :meth:`HandshakeTable.admit` picks a connection to close:
from the new connection's own address if that address is at its share, else from the address
with the most connections; among those, the one with the least progress (no ClientHello
answered yet first, then the one silent longest, :meth:`Handshaking.rank`). Idle or half-sent
connections held against the KMF therefore only push each other out, and a trusted MDD, whose
ClientHello arrives with its connection, finishes its handshake in one round trip.

:class:`DropLog` keeps the log readable under attack: at most ``per_second`` dropped
connections are logged one by one each second, the rest are only counted (STYLE 17).

The trio shell (:mod:`perc.roles.kmf`) owns the sockets, cancel scopes and clocks; it tells
the table what happened and closes what the table names.
"""

from __future__ import annotations

from collections.abc import Callable

import attrs

__all__ = ["DropLog", "HandshakeTable", "Handshaking", "KmfStats"]


@attrs.define
class KmfStats:
    """Counters of the KMF's connections (the engine counts the rest)."""

    connections: int = 0
    """TCP connections accepted."""
    refused: int = 0
    """Connections closed before their tunnel was up, for any reason below."""
    reset: int = 0
    """... reset or closed by the peer (or gone before they could be read)."""
    timeout: int = 0
    """... still in their TLS handshake at ``kmf.handshake_timeout``."""
    tls_failed: int = 0
    """... whose TLS handshake failed (a TLS error or alert, a refused certificate)."""
    evicted: int = 0
    """... closed for a newer connection (handshake budget or per-address share full)."""
    refused_capacity: int = 0
    """... authenticated while the tunnel cap was reached."""
    message_timeout: int = 0
    """Up tunnels closed because a partly received message stalled (``kmf.message_timeout``)."""
    unlogged: int = 0
    """Drops above the log rate (counted, not logged one by one)."""
    engine_errors: int = 0
    """Tunnels closed because the engine raised (a bug) while handling their messages."""
    task_errors: int = 0
    """Connection tasks that raised something unexpected (a bug; logged with its traceback)."""


@attrs.define(eq=False)
class Handshaking:
    """One connection in its TLS handshake."""

    ip: str
    accepted: float
    progress: Callable[[], tuple[int, float]] | None = None
    """Set by the shell once the TLS object exists: (handshake progress, time of the last)."""
    evicted: str = ""
    """Why it was chosen to be closed for a newer connection (empty: it was not)."""

    def rank(self) -> tuple[int, float]:
        """Lower is closed first under pressure: no answered ClientHello, then stalest."""
        if self.progress is None:
            return (0, self.accepted)
        steps, last = self.progress()
        return (int(steps >= 2), max(self.accepted, last))


class HandshakeTable:
    """The connections in their TLS handshake, by source address (see the module docstring).

    An address's entry goes with its last connection, so the table holds nothing after an
    attack.
    """

    def __init__(self, max_total: int, max_per_ip: int) -> None:
        self.max_total = max_total
        self.max_per_ip = max_per_ip
        self._by_ip: dict[str, list[Handshaking]] = {}
        self.count = 0

    def admit(self, ip: str, now: float) -> tuple[Handshaking, Handshaking | None]:
        """Register a new connection from ``ip``; also the one to close to make room, if any
        (already removed from the table, its ``evicted`` saying why)."""
        mine = self._by_ip.get(ip, [])
        victim = None
        if len(mine) >= self.max_per_ip:
            victim = self._evict(mine, f"{self.max_per_ip} connections from {ip} handshaking")
        elif self.count >= self.max_total:
            busiest = max(self._by_ip.values(), key=len)
            victim = self._evict(busiest, f"{self.max_total} connections handshaking")
        entry = Handshaking(ip, now)
        self._by_ip.setdefault(ip, []).append(entry)
        self.count += 1
        return entry, victim

    def _evict(self, candidates: list[Handshaking], why: str) -> Handshaking:
        victim = min(candidates, key=Handshaking.rank)
        victim.evicted = why
        self.forget(victim)
        return victim

    def forget(self, entry: Handshaking) -> None:
        """The connection is no longer handshaking (idempotent)."""
        mine = self._by_ip.get(entry.ip)
        if mine is None or entry not in mine:
            return
        mine.remove(entry)
        if not mine:
            del self._by_ip[entry.ip]
        self.count -= 1

    def addresses(self) -> int:
        """Source addresses with a connection in its handshake."""
        return len(self._by_ip)


class DropLog:
    """At most ``per_second`` log lines per second for dropped connections; the rest counted."""

    def __init__(self, per_second: int) -> None:
        self.per_second = per_second
        self._window = float("-inf")
        self._logged = 0

    def allow(self, now: float) -> bool:
        """True if a drop at ``now`` may be logged; False: only count it."""
        if now - self._window >= 1.0:
            self._window = now
            self._logged = 0
        if self._logged >= self.per_second:
            return False
        self._logged += 1
        return True
