"""``perc demo`` shows two real joins (the demo itself checks each step from the logs)."""

from __future__ import annotations

import sys

import pytest
import trio

pytestmark = pytest.mark.slow


async def test_demo_shows_two_endpoints_joining() -> None:
    result = await trio.run_process(
        [sys.executable, "-m", "perc", "demo"], capture_stdout=True, capture_stderr=True
    )
    out = result.stdout.decode()
    assert result.returncode == 0, out + result.stderr.decode()
    for name in ("alice", "bob"):
        assert f"OK: {name}'s DTLS reached the KMF through the tunnel" in out
    assert "alice and bob hold the conference's EKTKey" in out
    assert "the MDD installed exactly their hop-by-hop keys" in out
    assert "alice and bob left with close_notify" in out
    assert "FAILED" not in out
