"""perc.roles.kmf.StateWriter and open_state: the KMF's state written off the event loop (D28).

A real :class:`perc.state.KmfState` in ``tmp_path``; a second SQLite connection holding the
write lock plays "the database is locked" (the state's busy timeout is shortened so that a
failed write costs milliseconds). No wall-clock sleeps: the tests call ``flush`` themselves.
"""

from __future__ import annotations

import sqlite3
import uuid
from pathlib import Path
from types import SimpleNamespace

import attrs
import pytest
import trio
from trio.testing import MockClock

from perc.config import build_kmf_config
from perc.events import Event, KmfStateCaughtUp, KmfStateWriteFailed
from perc.kmf import AuditRecord, ReserveSpis
from perc.roles.kmf import StateWriter, open_state
from perc.state import KmfState, StateError, load_state_key


def _state(tmp_path: Path, **kw: object) -> KmfState:
    key = load_state_key(tmp_path / "kmf-state.key")
    return KmfState(tmp_path / "kmf-state.sqlite", key, **kw)  # type: ignore[arg-type]


async def test_writer_confirms_reservations_only_after_commit_and_catches_up(
    tmp_path: Path,
) -> None:
    state = _state(tmp_path, busy_timeout=0.01)
    reserved: list[tuple[str, int]] = []
    reports: list[Event] = []
    writer = StateWriter(state, lambda c, n: reserved.append((c, n)), reports.append)
    aid = uuid.uuid4()
    writer.submit([ReserveSpis("demo", 300), AuditRecord("kmf_start", fingerprint="fp-kmf")])
    await writer.flush()
    assert reserved == [("demo", 300)] and writer.commits == 1
    assert state.spi_counter("demo") == 299

    # Another process holds the write lock: the write fails, is reported once, nothing is
    # confirmed; the changes stay pending.
    blocker = sqlite3.connect(tmp_path / "kmf-state.sqlite", isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    writer.submit([ReserveSpis("demo", 556), AuditRecord("join", "demo", "fp-a", "a", aid, 7)])
    await writer.flush()
    writer.submit([AuditRecord("rekey", "demo", spi=8)])
    await writer.flush()
    assert reserved == [("demo", 300)] and writer.failing and writer.failures == 2
    (failed,) = reports
    assert isinstance(failed, KmfStateWriteFailed) and "locked" in failed.reason
    assert failed.failures == 1 and failed.pending > 0

    blocker.execute("ROLLBACK")
    blocker.close()
    await writer.flush()  # nothing new queued: the retry writes what is pending
    assert reserved == [("demo", 300), ("demo", 556)] and not writer.failing
    caught = reports[-1]
    assert isinstance(caught, KmfStateCaughtUp) and caught.failures == 2
    await writer.aclose()

    with _state(tmp_path) as again:
        assert again.spi_counter("demo") == 555  # a restart resumes at 556
        rows = list(again.audit_rows())
        assert [r.event for r in rows] == ["kmf_start", "join", "rekey"]
        assert rows[1].association_id == str(aid) and rows[1].name == "a"
        assert again.verify_audit().ok


async def test_writer_task_retries_by_itself(tmp_path: Path, autojump_clock: MockClock) -> None:
    state = _state(tmp_path, busy_timeout=0.01)
    reserved: list[tuple[str, int]] = []
    writer = StateWriter(state, lambda c, n: reserved.append((c, n)), retry=5.0)
    blocker = sqlite3.connect(tmp_path / "kmf-state.sqlite", isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(writer.run)
        writer.submit([ReserveSpis("demo", 256)])
        while writer.failures < 2:  # the writer retries on the (mock) clock
            await trio.sleep(1.0)
        assert reserved == []
        blocker.execute("ROLLBACK")
        blocker.close()
        while not reserved:
            await trio.sleep(1.0)
        nursery.cancel_scope.cancel()
    assert reserved == [("demo", 256)]
    await writer.aclose()


def _config(ids: SimpleNamespace, tmp_path: Path, extra: str = "") -> object:
    from perc import identity

    identity.write(ids.kmf, tmp_path, "kmf")
    data = {
        "kmf": {
            "listen": "127.0.0.1:0",
            "cert": "kmf.crt",
            "key": "kmf.key",
            "trusted_mdds": [],
        },
        "conference": [{"id": "demo", "participants": []}],
    }
    if extra:
        data["kmf"][extra] = ""  # type: ignore[index]
    return build_kmf_config(data, base=tmp_path)


def test_config_defaults_put_the_state_beside_the_file(
    ids: SimpleNamespace, tmp_path: Path
) -> None:
    cfg = _config(ids, tmp_path)
    assert cfg.kmf.state == tmp_path / "kmf-state.sqlite"  # type: ignore[attr-defined]
    assert cfg.kmf.state_key == tmp_path / "kmf-state.key"  # type: ignore[attr-defined]
    memory = _config(ids, tmp_path, "state")
    assert memory.kmf.state is None  # type: ignore[attr-defined]
    assert open_state(memory) is None  # type: ignore[arg-type]
    state = open_state(cfg)  # type: ignore[arg-type]
    assert state is not None
    state.close()
    assert (tmp_path / "kmf-state.key").stat().st_mode & 0o777 == 0o600
    (tmp_path / "kmf-state.sqlite").write_bytes(b"not a database at all, not at all" * 10)
    with pytest.raises(StateError, match=r"kmf-state\.sqlite: not a SQLite database"):
        open_state(cfg)  # type: ignore[arg-type]
    fresh = open_state(cfg, reset=True)  # type: ignore[arg-type]
    assert fresh is not None and fresh.spi_counters() == {}
    fresh.close()
    bad_key = attrs.evolve(cfg, kmf=attrs.evolve(cfg.kmf, state_key=tmp_path))  # type: ignore
    with pytest.raises(StateError, match=r"state key .*: cannot read"):
        open_state(bad_key)


@pytest.mark.parametrize(
    ("key", "value", "problem"),
    [
        ("state", 5, "kmf.state: expected a file path string, got integer"),
        ("state_key", "", "kmf.state_key: expected a file path string, got string"),
        ("persist_keys", "yes", "kmf.persist_keys: expected true or false, got string"),
    ],
)
def test_bad_state_settings_are_config_errors(
    ids: SimpleNamespace, tmp_path: Path, key: str, value: object, problem: str
) -> None:
    from perc.config import ConfigError

    identity_files = _config(ids, tmp_path)  # writes kmf.crt / kmf.key
    assert identity_files is not None
    data = {
        "kmf": {"listen": "127.0.0.1:0", "cert": "kmf.crt", "key": "kmf.key",
                "trusted_mdds": [], key: value},
        "conference": [{"id": "demo", "participants": []}],
    }  # fmt: skip
    with pytest.raises(ConfigError) as e:
        build_kmf_config(data, base=tmp_path)
    assert str(e.value) == problem
