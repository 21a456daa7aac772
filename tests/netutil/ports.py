"""Ports for tests that must bind a known port again later (a restarted KMF or MDD)."""

from __future__ import annotations

import random
import socket
from pathlib import Path

LOCAL = "127.0.0.1"


def unassigned_port(kind: socket.SocketKind = socket.SOCK_DGRAM, host: str = LOCAL) -> int:
    """A port free on ``host`` now and below the ephemeral range.

    The kernel never hands such a port to a connecting or port-0 socket, so once free it stays
    free for the process that will bind it, and again after that process is killed (only an
    explicit bind by another program could take it)."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    low = max(low, 2048)
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(1024 + (low - 1024) // 3, low)
        with socket.socket(socket.AF_INET, kind) as probe:
            try:
                probe.bind((host, port))
            except OSError:
                continue
        return port
    raise AssertionError(f"no free {kind.name} port below {low} on {host}")
