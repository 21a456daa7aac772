"""Tunnel TLS key log: with SSLKEYLOGFILE set, KMF and MDD append TLS 1.3 secrets (NSS lines)."""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import trio
from trio.testing import MockClock

from perc.keylog import ENV_VAR
from perc.roles import tunnel
from perc.roles.tunnel import make_tls_context, tunnel_keylog

from .helpers import RecordingEngine, mdd_config, until
from .test_tunnel import start_kmf, start_mdd

#: The secrets OpenSSL reports for a TLS 1.3 handshake, one line each per side.
LABELS = (
    "CLIENT_HANDSHAKE_TRAFFIC_SECRET",
    "SERVER_HANDSHAKE_TRAFFIC_SECRET",
    "CLIENT_TRAFFIC_SECRET_0",
    "SERVER_TRAFFIC_SECRET_0",
    "EXPORTER_SECRET",
)


@pytest.fixture
def keylog_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    path = tmp_path / "keys.log"
    monkeypatch.setenv(ENV_VAR, str(path))
    yield path
    # the writers are per process; a test must not leave its file open for the next one
    for writer in tunnel._tunnel_keylogs.values():
        writer.close()
    tunnel._tunnel_keylogs.clear()


async def test_kmf_and_mdd_log_every_tls13_secret(
    ids: SimpleNamespace, clock: MockClock, keylog_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    handler = RecordingEngine()
    with caplog.at_level(logging.WARNING, logger="perc.roles.tunnel"):
        async with trio.open_nursery() as nursery:
            server = await start_kmf(nursery, ids, handler)
            await start_mdd(nursery, mdd_config(ids.mdd, server.address, ids.kmf.fingerprint))
            await until(lambda: bool(handler.up))
            nursery.cancel_scope.cancel()
    lines = keylog_path.read_text().splitlines()
    by_label: dict[str, list[list[str]]] = {}
    for line in lines:
        parts = line.split(" ")
        assert len(parts) == 3, line
        by_label.setdefault(parts[0], []).append(parts)
    # both ends of the one connection log each secret: same client random, same secret
    for label in LABELS:
        entries = by_label.get(label, [])
        assert len(entries) == 2, (label, lines)
        assert entries[0] == entries[1]
        assert len(bytes.fromhex(entries[0][1])) == 32  # client random
        assert len(bytes.fromhex(entries[0][2])) in (32, 48)  # SHA-256 or SHA-384 secret
    assert set(by_label) == set(LABELS)
    assert stat.S_IMODE(os.stat(keylog_path).st_mode) == 0o600
    # one process, one writer, one warning, although two contexts were made
    warnings = [r for r in caplog.records if "tunnel TLS secrets" in r.getMessage()]
    assert len(warnings) == 1


def test_unset_means_no_keylog(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert tunnel_keylog() is None
    assert tunnel_keylog({ENV_VAR: ""}) is None


def test_explicit_writer_wins(ids: SimpleNamespace, keylog_path: Path) -> None:
    seen: list[str] = []
    make_tls_context(ids.kmf, server=True, is_trusted=lambda fp: True, keylog=seen.append)
    assert tunnel._tunnel_keylogs == {}
    assert not keylog_path.exists()
