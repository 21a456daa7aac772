"""The KMF's state file with real processes (D28, D32): SIGKILL and restart, bad files, audit.

* A KMF killed with SIGKILL and started again on the same state hands out SPIs newer than
  every SPI it sent before (it resumes at the stored reservation ceiling), and its audit log
  verifies and holds both starts and the joins and rekeys after the restart.
* Each unusable state or state-key file stops ``perc kmf`` before it listens: exit 2 and one
  line naming the file and what is wrong; ``--reset-state`` starts afresh.

The restarted KMF listens on a new port (port 0), so a second MDD carries the later joiner.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import sys
from pathlib import Path

import pytest
import trio

from perc.events import Joined, KmfStateOpened, Listening, Rekeyed
from perc.kmf import SPI_BLOCK
from perc.state import spi_is_newer
from tests.system.conftest import WAIT, System

pytestmark = pytest.mark.slow

DURATION = "30"


async def _perc(folder: Path, *args: str) -> trio.CompletedProcess[bytes]:
    with trio.fail_after(WAIT):
        return await trio.run_process(
            [sys.executable, "-m", "perc", *args], cwd=folder, capture_stdout=True,
            capture_stderr=True, check=False,
        )  # fmt: skip


async def test_sigkill_and_restart_resume_after_every_spi_sent(system: System) -> None:
    cfg = system.kmf_config(
        trusted_mdds=("mdd", "mdd2"),
        conferences={"demo": ["alice", "bob", "carol"]},
        conference_extra="rekey_window = 0.05\n",
        # D28 alone: without stored keys the restarted KMF resumes nobody (D29 resumption is
        # tests/system/test_kmf_restart.py), so carol's key is the conference's first again.
        kmf_extra="persist_keys = false\n",
    )
    kmf, kmf_port = await system.start_kmf(cfg)
    _, mdd_port = await system.start_mdd(system.mdd_config("mdd", kmf_port))
    await system.start_endpoint("alice", mdd_port, "--duration", DURATION)
    await kmf.wait_event(Joined, conference="demo")
    await system.start_endpoint("bob", mdd_port, "--duration", DURATION)
    await kmf.wait_event(Rekeyed, reason="join")
    before = [e.spi for e in kmf.find_events(Rekeyed)]
    assert len(before) == 2
    assert await system.stop(kmf, signal.SIGKILL) == -signal.SIGKILL

    again, port2 = await system.start_kmf(cfg)
    opened = await again.wait_event(KmfStateOpened)
    assert opened.path == str(system.folder / "kmf-state.sqlite")
    _, mdd2_port = await system.start_mdd(system.mdd_config("mdd2", port2))
    carol = await system.start_endpoint("carol", mdd2_port, "--duration", "0.5")
    first = await again.wait_event(Rekeyed, reason="first")
    # D28: the first block was reserved before the first key; the restart resumes after it.
    assert first.spi == (before[0] + SPI_BLOCK) % 65536
    assert all(spi_is_newer(first.spi, s) for s in before)
    assert await carol.wait_exit() == 0, carol.text
    await again.wait_event(Joined, conference="demo")
    assert await system.stop(again) == 0  # SIGTERM: what is queued is written on the way out

    done = await _perc(system.folder, "kmf", "audit", "--state", "kmf-state.sqlite", "--verify")
    out = done.stdout.decode()
    assert done.returncode == 0, out + done.stderr.decode()
    assert out.splitlines()[-1].startswith("audit chain ok")
    rows = [line.split() for line in out.splitlines()[1:-1]]
    events = [row[2] for row in rows]
    assert events.count("kmf_start") == 2
    # Everything from the second start on was written (the first life's last rows may have
    # died with it: SIGKILL before their commit).
    after = events[events.index("kmf_start", 1) :]
    assert after[:1] == ["kmf_start"] and "join" in after and "rekey" in after
    assert str(first.spi) in out and "carol" in out
    for proc in system.procs:
        assert "Traceback" not in proc.text


def _break_schema(path: Path) -> None:
    with sqlite3.connect(path) as db:
        db.execute("UPDATE meta SET value = 99 WHERE name = 'schema'")
    db.close()


async def test_bad_state_and_key_files_exit_2_with_one_line(system: System) -> None:
    folder = system.folder
    cfg = system.kmf_config()
    state, key = folder / "kmf-state.sqlite", folder / "kmf-state.key"
    # A first run creates both (the key mode 0600).
    kmf, _ = await system.start_kmf(cfg)
    await kmf.wait_event(KmfStateOpened)
    assert await system.stop(kmf) == 0
    assert key.stat().st_mode & 0o777 == 0o600
    good_state, good_key = state.read_bytes(), key.read_bytes()

    def restore() -> None:
        state.write_bytes(good_state)
        key.write_bytes(good_key)
        key.chmod(0o600)

    cases = [
        ("garbage", lambda: state.write_bytes(b"\x00garbage" * 100),
         f"state file {state}: not a SQLite database (corrupt or another kind of file)"),
        ("truncated", lambda: state.write_bytes(good_state[:4096]),
         f"state file {state}: truncated (4096 bytes, its header says {len(good_state)})"),
        ("schema", lambda: _break_schema(state),
         f"state file {state}: schema version 99, this perc reads 1"),
        ("other key", lambda: key.write_bytes(os.urandom(32)),
         f"state file {state}: sealed under another state key"),
        ("short key", lambda: key.write_bytes(b"short"),
         f"state key {key}: 5 bytes, expected 32 bytes"),
        ("open key", lambda: key.chmod(0o644),
         f"state key {key}: accessible by group or others (mode 0644); run chmod 600 on it"),
    ]  # fmt: skip
    for what, damage, line in cases:
        restore()
        damage()
        damaged = (state.read_bytes(), key.read_bytes())
        done = await _perc(folder, "kmf", "--config", str(cfg))
        assert (done.returncode, done.stderr.decode()) == (2, f"perc: error: {line}\n"), what
        assert (state.read_bytes(), key.read_bytes()) == damaged, what  # nothing overwritten
    key.unlink()
    key.mkdir(mode=0o700)  # unreadable as a key file (we may run as root: no chmod 000)
    done = await _perc(folder, "kmf", "--config", str(cfg))
    assert done.returncode == 2
    assert done.stderr.decode() == f"perc: error: state key {key}: cannot read: Is a directory\n"
    key.rmdir()

    restore()
    state.write_bytes(b"\x00garbage" * 100)
    kmf = await system.start(cfg.stem, "kmf", "--config", str(cfg), "--reset-state")
    await kmf.wait_event(Listening)
    opened = kmf.find_events(KmfStateOpened)
    assert opened and opened[0].audit_rows == 0 and opened[0].resumed == {}
    assert await system.stop(kmf) == 0
    done = await _perc(folder, "kmf", "audit", "--state", str(state), "--verify")
    assert done.returncode == 0 and b"kmf_start" in done.stdout


async def test_audit_verify_names_the_first_bad_row(system: System) -> None:
    cfg = system.kmf_config()
    kmf, _ = await system.start_kmf(cfg)
    await kmf.wait_event(KmfStateOpened)
    assert await system.stop(kmf) == 0
    kmf, _ = await system.start_kmf(cfg)
    assert await system.stop(kmf) == 0
    state = system.folder / "kmf-state.sqlite"
    ok = await _perc(system.folder, "kmf", "audit", "--state", str(state), "--verify")
    assert ok.returncode == 0 and ok.stdout.decode().count("kmf_start") == 2
    with sqlite3.connect(state) as db:
        db.execute("DROP TRIGGER audit_no_update")
        db.execute("UPDATE audit SET time = '2000-01-01T00:00:00.000000Z' WHERE seq = 1")
    db.close()
    bad = await _perc(system.folder, "kmf", "audit", "--state", str(state), "--verify")
    assert bad.returncode == 1
    assert "audit chain broken at row 2" in bad.stdout.decode()
    assert bad.stderr.decode().startswith("perc: error: audit chain broken at row 2")
