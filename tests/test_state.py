"""perc.state: SPI and sequence arithmetic (D28, D29), the state key, opening and its errors,
resumable rows, persist_keys = false, the audit chain (D32), write failures and catch-up."""

from __future__ import annotations

import itertools
import os
import sqlite3
import threading
import uuid
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from perc.state import (
    SEQ_BLOCK,
    SEQ_LIMIT,
    SPI_MODULUS,
    SPI_REUSE_MIN,
    AuditRow,
    KmfState,
    StateError,
    StateWriteError,
    audit_canonical,
    audit_hash,
    audit_report,
    load_state_key,
    seq_ceiling_after,
    seq_needs_reservation,
    spi_is_newer,
    spi_of,
)

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))
AID = uuid.UUID("00000000-0000-4000-8000-000000000001")
AID2 = uuid.UUID("00000000-0000-4000-8000-000000000002")
SECRET = b"epoch-1 keys and IVs: SECRET-BYTES-0123456789"
EKT_SECRET = b"EKTKEY-SECRET-MATERIAL-abcdefgh"


def _add(state: KmfState, aid: uuid.UUID = AID, next_seq: int = 1) -> int:
    return state.add_association(
        aid,
        mdd_fingerprint="sha-256 MDD",
        conference="c",
        peer_fingerprint="sha-256 PEER",
        tls_id="tls-id-of-alice-0123456789",
        profile=9,
        ekt_cipher=1,
        record_state=SECRET,
        next_seq=next_seq,
    )


def _filled(path: Path, audit_rows: int = 3) -> None:
    with KmfState(path, KEY) as s:
        s.next_spi("c")
        _add(s)
        s.set_ekt_key("c", 7, EKT_SECRET)
        for i in range(audit_rows):
            s.append_audit("join", conference="c", name=f"member-{i}", at=1_700_000_000.0 + i)


def _raw(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("DROP TRIGGER IF EXISTS audit_no_update")
    conn.execute("DROP TRIGGER IF EXISTS audit_no_delete")
    return conn


def _open_error(path: Path, key: bytes = KEY, **kw: object) -> str:
    with pytest.raises(StateError) as info:
        KmfState(path, key, **kw)  # type: ignore[arg-type]
    message = str(info.value)
    assert "\n" not in message
    return message


# --- arithmetic ------------------------------------------------------------------------------


def test_spi_of_wraps_modulo_2_16() -> None:
    assert spi_of(0) == 0
    assert spi_of(65535) == 65535
    assert spi_of(65536) == 0
    assert spi_of(65536 * 5 + 17) == 17


@given(st.integers(0, 2**63 - SPI_MODULUS), st.integers(1, SPI_MODULUS - 1))
def test_an_spi_comes_round_only_after_65536_issues(counter: int, later: int) -> None:
    # A plain +1 counter: the same SPI again needs 65,536 issues, >= the 32,768 of D28.
    assert spi_of(counter + later) != spi_of(counter)
    assert spi_of(counter + SPI_MODULUS) == spi_of(counter)
    assert SPI_MODULUS - 1 >= SPI_REUSE_MIN


@given(st.integers(0, 2**40), st.integers(1, SPI_REUSE_MIN - 1))
def test_spi_is_newer_within_half_the_space(counter: int, later: int) -> None:
    old, new = spi_of(counter), spi_of(counter + later)
    assert spi_is_newer(new, old)
    assert not spi_is_newer(old, new)
    assert not spi_is_newer(old, old)


def test_spi_is_newer_across_the_wrap() -> None:
    assert spi_is_newer(0, 65535)
    assert spi_is_newer(5, 65000)
    assert not spi_is_newer(65000, 5)
    assert not spi_is_newer(SPI_REUSE_MIN, 0)  # exactly half way: neither is newer


def test_seq_arithmetic() -> None:
    assert seq_ceiling_after(1) == 1 + SEQ_BLOCK
    assert seq_ceiling_after(SEQ_LIMIT - 1) == SEQ_LIMIT
    assert seq_needs_reservation(1025, 1025)
    assert not seq_needs_reservation(1024, 1025)
    with pytest.raises(ValueError, match="outside"):
        seq_ceiling_after(SEQ_LIMIT)
    with pytest.raises(ValueError, match="outside"):
        seq_ceiling_after(-1)


# --- state key -------------------------------------------------------------------------------


def test_state_key_created_0600_and_reused(tmp_path: Path) -> None:
    path = tmp_path / "kmf-state.key"
    key = load_state_key(path)
    assert len(key) == 32
    assert path.stat().st_mode & 0o777 == 0o600
    assert load_state_key(path) == key


def test_state_key_wrong_length(tmp_path: Path) -> None:
    path = tmp_path / "k"
    path.write_bytes(b"x" * 31)
    path.chmod(0o600)
    with pytest.raises(StateError) as info:
        load_state_key(path)
    assert str(info.value) == f"state key {path}: 31 bytes, expected 32 bytes"
    path.write_bytes(b"x" * 33)
    with pytest.raises(StateError) as info:
        load_state_key(path)
    assert str(info.value) == f"state key {path}: longer, expected 32 bytes"


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o620, 0o660])
def test_state_key_accessible_by_others(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "k"
    path.write_bytes(b"x" * 32)
    path.chmod(mode)
    with pytest.raises(StateError) as info:
        load_state_key(path)
    assert str(info.value) == (
        f"state key {path}: accessible by group or others (mode {mode:04o}); run chmod 600 on it"
    )


def test_state_key_unreadable(tmp_path: Path) -> None:
    # Tests may run as root, which reads any mode: a directory and a dangling link are
    # unreadable for everyone.
    directory = tmp_path / "dir"
    directory.mkdir(mode=0o700)
    with pytest.raises(StateError) as info:
        load_state_key(directory)
    assert str(info.value) == f"state key {directory}: cannot read: Is a directory"
    dangling = tmp_path / "link"
    dangling.symlink_to(tmp_path / "nowhere" / "k")
    with pytest.raises(StateError) as info:
        load_state_key(dangling)
    assert str(info.value) == f"state key {dangling}: cannot read: No such file or directory"


def test_state_key_cannot_create(tmp_path: Path) -> None:
    path = tmp_path / "missing-dir" / "k"
    with pytest.raises(StateError) as info:
        load_state_key(path)
    assert str(info.value) == f"state key {path}: cannot create: No such file or directory"


# --- opening and its errors --------------------------------------------------------------------


def test_new_state_is_wal_0600_and_reopens(tmp_path: Path) -> None:
    db = tmp_path / "s.sqlite"
    _filled(db)
    assert db.stat().st_mode & 0o777 == 0o600
    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert dict(conn.execute("SELECT name, value FROM meta"))["schema"] == 1
    conn.close()
    with KmfState(db, KEY) as s:
        assert s.last_spi("c") is not None
        assert s.association(AID) is not None
        assert s.verify_audit().ok


def test_not_a_database(tmp_path: Path) -> None:
    db = tmp_path / "s.sqlite"
    db.write_bytes(os.urandom(4096))
    before = db.read_bytes()
    assert _open_error(db) == (
        f"state file {db}: not a SQLite database (corrupt or another kind of file)"
    )
    assert db.read_bytes() == before, "nothing overwritten without reset"


def test_truncated_file(tmp_path: Path) -> None:
    db = tmp_path / "s.sqlite"
    _filled(db, audit_rows=200)
    size = db.stat().st_size
    assert not (tmp_path / "s.sqlite-wal").exists()  # the last close checkpointed
    os.truncate(db, size // 2)
    assert _open_error(db) == (
        f"state file {db}: truncated ({size // 2} bytes, its header says {size})"
    )
    os.truncate(db, 60)
    assert _open_error(db) == (
        f"state file {db}: truncated (60 bytes, shorter than the SQLite header)"
    )
    assert db.stat().st_size == 60


def test_corrupt_page(tmp_path: Path) -> None:
    db = tmp_path / "s.sqlite"
    _filled(db, audit_rows=200)
    data = bytearray(db.read_bytes())
    page = int.from_bytes(data[16:18], "big")
    data[page * 3 : page * 3 + 64] = b"\xa5" * 64  # scribble over a b-tree page header
    db.write_bytes(bytes(data))
    assert _open_error(db).startswith(f"state file {db}: corrupt: ")


def test_other_schema_version(tmp_path: Path) -> None:
    db = tmp_path / "s.sqlite"
    _filled(db)
    with _raw(db) as conn:
        conn.execute("UPDATE meta SET value = 2 WHERE name = 'schema'")
    assert _open_error(db) == f"state file {db}: schema version 2, this perc reads 1"


def test_another_applications_database(tmp_path: Path) -> None:
    db = tmp_path / "s.sqlite"
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE t (x)")
    conn.commit()
    conn.close()
    assert _open_error(db) == f"state file {db}: not a perc KMF state database"


def test_sealed_under_another_key(tmp_path: Path) -> None:
    db = tmp_path / "s.sqlite"
    _filled(db)
    before = db.read_bytes()
    assert _open_error(db, OTHER_KEY) == f"state file {db}: sealed under another state key"
    assert db.read_bytes() == before


def test_reset_starts_afresh(tmp_path: Path) -> None:
    db = tmp_path / "s.sqlite"
    db.write_bytes(b"garbage" * 100)
    with KmfState(db, OTHER_KEY, reset=True) as s:
        assert s.associations() == []
        assert s.verify_audit().ok
    with KmfState(db, OTHER_KEY) as s:
        assert s.spi_counter("c") is None


def test_locked_by_another_owner(tmp_path: Path) -> None:
    db = tmp_path / "s.sqlite"
    with KmfState(db, KEY):
        assert _open_error(db) == (
            f"state file {db}: locked by another process (another perc kmf?)"
        )
        assert _open_error(db, reset=True).endswith("locked by another process (another perc kmf?)")
    with KmfState(db, KEY):  # released on close
        pass


def test_locked_by_a_sqlite_writer_while_creating(tmp_path: Path) -> None:
    db = tmp_path / "s.sqlite"
    db.touch(mode=0o600)
    other = sqlite3.connect(db, isolation_level=None)
    other.execute("PRAGMA journal_mode=WAL")
    other.execute("BEGIN EXCLUSIVE")
    try:
        assert _open_error(db, busy_timeout=0) == f"state file {db}: locked by another process"
    finally:
        other.execute("ROLLBACK")
        other.close()


def test_moved_sealed_blob_does_not_open(tmp_path: Path) -> None:
    db = tmp_path / "s.sqlite"
    with KmfState(db, KEY) as s:
        _add(s, AID)
        s.add_association(
            AID2,
            mdd_fingerprint="m",
            conference="c",
            peer_fingerprint="p",
            tls_id=None,
            profile=10,
            ekt_cipher=2,
            record_state=b"other",
            next_seq=1,
        )
    with _raw(db) as conn:
        conn.execute(
            "UPDATE association SET record_state = "
            "(SELECT record_state FROM association WHERE id = ?) WHERE id = ?",
            (str(AID), str(AID2)),
        )
    assert _open_error(db) == (
        f"state file {db}: association {AID2}: record state does not authenticate"
    )


def test_moved_ekt_key_does_not_open(tmp_path: Path) -> None:
    db = tmp_path / "s.sqlite"
    _filled(db)
    with _raw(db) as conn:
        conn.execute("UPDATE ekt_key SET spi = 8")  # the SPI is bound to the sealed key
    assert _open_error(db) == f"state file {db}: EKTKey of conference 'c' does not authenticate"


def test_memory_only_state() -> None:
    with KmfState(None, KEY) as s:
        spi = s.next_spi("c")
        assert s.next_spi("c") == (spi + 1) % SPI_MODULUS
        s.append_audit("kmf_start")
        assert s.verify_audit().ok


# --- SPIs, associations, EKTKeys, roster ---------------------------------------------------


def test_spis_resume_after_the_stored_one(tmp_path: Path) -> None:
    db = tmp_path / "s.sqlite"
    with KmfState(db, KEY) as s:
        issued = [s.next_spi("c") for _ in range(5)]
        counter = s.spi_counter("c")
    assert all(b == (a + 1) % SPI_MODULUS for a, b in itertools.pairwise(issued))
    with KmfState(db, KEY) as s:
        assert s.last_spi("c") == issued[-1]
        assert s.next_spi("c") == (issued[-1] + 1) % SPI_MODULUS
        assert s.spi_counter("c") == counter + 1  # type: ignore[operator]


def test_spi_counter_crosses_2_16(tmp_path: Path) -> None:
    db = tmp_path / "s.sqlite"
    with KmfState(db, KEY) as s:
        s.next_spi("c")
    with _raw(db) as conn:
        conn.execute("UPDATE spi SET counter = 65534")
    with KmfState(db, KEY) as s:
        assert [s.next_spi("c") for _ in range(3)] == [65535, 0, 1]
        assert s.spi_counter("c") == 65537


def test_association_rows_round_trip_and_ceilings_grow(tmp_path: Path) -> None:
    db = tmp_path / "s.sqlite"
    with KmfState(db, KEY) as s:
        assert _add(s, next_seq=3) == 3 + SEQ_BLOCK
        assert s.reserve_seq(AID, 500) == 3 + SEQ_BLOCK  # below the ceiling: no write
        assert s.reserve_seq(AID, 3 + SEQ_BLOCK) == 3 + 2 * SEQ_BLOCK
        with pytest.raises(KeyError):
            s.reserve_seq(AID2, 1)
    with KmfState(db, KEY) as s:
        row = s.association(AID)
        assert row is not None
        assert row.record_state == SECRET
        assert row.seq_ceiling == 3 + 2 * SEQ_BLOCK
        assert (row.conference, row.profile, row.ekt_cipher) == ("c", 9, 1)
        assert row.tls_id == "tls-id-of-alice-0123456789"
        assert "SECRET" not in repr(row)
        s.remove_association(AID)
        s.remove_association(AID)  # twice is harmless
    with KmfState(db, KEY) as s:
        assert s.associations() == []


def test_key_material_is_sealed_on_disk(tmp_path: Path) -> None:
    db = tmp_path / "s.sqlite"
    with KmfState(db, KEY) as s:
        _add(s)
        s.set_ekt_key("c", 7, EKT_SECRET)
        files = b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.is_file())
        assert SECRET not in files
        assert EKT_SECRET not in files
    with KmfState(db, KEY) as s:
        key = s.ekt_key("c")
        assert key is not None
        assert (key.spi, key.material) == (7, EKT_SECRET)
        assert s.ekt_keys() == [key]
        s.remove_ekt_key("c")
    with KmfState(db, KEY) as s:
        assert s.ekt_key("c") is None


def test_persist_keys_false_stores_no_key_material(tmp_path: Path) -> None:
    db = tmp_path / "s.sqlite"
    _filled(db)  # an earlier persist_keys = true run left sealed keys
    with KmfState(db, KEY, persist_keys=False) as s:
        assert s.ekt_keys() == []
        (row,) = s.associations()
        assert row.record_state is None
        _add(s, AID2)
        s.set_ekt_key("c", 9, EKT_SECRET)
        assert s.ekt_key("c") is None
        assert s.next_spi("c") is not None
    conn = sqlite3.connect(db)
    assert conn.execute("SELECT count(*) FROM ekt_key").fetchone()[0] == 0
    assert conn.execute(
        "SELECT count(*) FROM association WHERE record_state IS NOT NULL"
    ).fetchone() == (0,)
    assert conn.execute("SELECT count(*) FROM association").fetchone() == (2,)
    conn.close()


def test_roster_changes_persist(tmp_path: Path) -> None:
    db = tmp_path / "s.sqlite"
    with KmfState(db, KEY) as s:
        s.roster_add("c", "sha-256 AA", name="alice")
        s.roster_add("c", "sha-256 BB", name="bob")
        s.roster_remove("c", "sha-256 AA")
    with KmfState(db, KEY) as s:
        changes = {(r.conference, r.fingerprint): (r.action, r.name) for r in s.roster_changes()}
    assert changes == {("c", "sha-256 AA"): ("remove", None), ("c", "sha-256 BB"): ("add", "bob")}


def test_usable_from_one_worker_thread(tmp_path: Path) -> None:
    db = tmp_path / "s.sqlite"
    state = KmfState(db, KEY)
    results: list[object] = []
    worker = threading.Thread(target=lambda: results.append(state.next_spi("c")))
    worker.start()
    worker.join()
    assert isinstance(results[0], int)
    state.close()


def test_batch_is_one_transaction(tmp_path: Path) -> None:
    db = tmp_path / "s.sqlite"
    with KmfState(db, KEY) as s:
        with s.batch():
            spi = s.next_spi("c")
            s.set_ekt_key("c", spi, EKT_SECRET)
            s.append_audit("rekey", conference="c", spi=spi)
            assert len(s.pending) == 4  # spi, key, row, head: nothing written yet
        assert not s.pending
    with KmfState(db, KEY) as s:
        assert s.last_spi("c") == spi
        assert [r.spi for r in s.audit_rows()] == [spi]


# --- audit chain (D32) -----------------------------------------------------------------------


def test_audit_canonical_form() -> None:
    row = AuditRow(
        1, "2026-01-01T00:00:00.000000Z", "join", "c", "fp", "zoë", None, 3, None, "0" * 64
    )
    assert (
        audit_canonical(row)
        == (
            '{"association_id":null,"conference":"c","event":"join","fingerprint":"fp",'
            '"mdd_fingerprint":null,"name":"zoë","prev":"' + "0" * 64 + '","seq":1,"spi":3,'
            '"time":"2026-01-01T00:00:00.000000Z"}'
        ).encode()
    )
    assert len(audit_hash(row)) == 64


def test_audit_rows_chain_and_never_hold_keys(tmp_path: Path) -> None:
    db = tmp_path / "s.sqlite"
    with KmfState(db, KEY) as s:
        s.append_audit("kmf_start", at=0.0)
        s.append_audit(
            "join",
            conference="c",
            fingerprint="sha-256 AA",
            name="alice",
            association_id=AID,
            mdd_fingerprint="sha-256 MM",
            at=1.5,
        )
        s.append_audit("rekey", conference="c", spi=42)
        with pytest.raises(ValueError, match="not a valid AuditEvent"):
            s.append_audit("explode")
        rows = list(s.audit_rows())
        assert [r.event for r in rows] == ["kmf_start", "join", "rekey"]
        assert rows[0].time == "1970-01-01T00:00:00.000000Z"
        assert rows[1].prev == audit_hash(rows[0])
        assert rows[2].prev == audit_hash(rows[1])
        assert rows[1].association_id == str(AID)
        assert str(s.verify_audit()) == "audit chain ok (3 rows)"
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            s._conn.execute("DELETE FROM audit")


def _tampered(tmp_path: Path, *sql: str) -> KmfState:
    db = tmp_path / "s.sqlite"
    _filled(db, audit_rows=5)
    with _raw(db) as conn:
        for statement in sql:
            conn.execute(statement)
    return KmfState(db, KEY)


def test_audit_edited_row_shows(tmp_path: Path) -> None:
    with _tampered(tmp_path, "UPDATE audit SET name = 'mallory' WHERE seq = 2") as s:
        verdict = s.verify_audit()
    assert str(verdict) == (
        "audit chain broken at row 3: previous-row hash does not match row 2 "
        "(a row edited, deleted or reordered)"
    )


def test_audit_deleted_row_shows(tmp_path: Path) -> None:
    with _tampered(tmp_path, "DELETE FROM audit WHERE seq = 3") as s:
        verdict = s.verify_audit()
    assert (verdict.ok, verdict.bad_row) == (False, 3)
    assert verdict.reason == "row numbered 4 (rows missing)"


def test_audit_renumbered_after_delete_shows(tmp_path: Path) -> None:
    db = tmp_path / "s.sqlite"
    _filled(db, audit_rows=5)
    with _raw(db) as conn:
        conn.execute("DELETE FROM audit WHERE seq = 3")
        conn.execute("UPDATE audit SET seq = seq - 1 WHERE seq > 3")
    assert _open_error(db).endswith(
        "audit log ends at row 4 but its sealed head names row 5 (rows deleted or edited)"
    )
    verdict = audit_report(db, _key_file(tmp_path)).verdict
    assert verdict is not None
    assert (verdict.ok, verdict.bad_row) == (False, 3)


def test_audit_reordered_rows_show(tmp_path: Path) -> None:
    with _tampered(
        tmp_path,
        "UPDATE audit SET seq = 100 WHERE seq = 2",
        "UPDATE audit SET seq = 2 WHERE seq = 3",
        "UPDATE audit SET seq = 3 WHERE seq = 100",
    ) as s:
        verdict = s.verify_audit()
    assert (verdict.ok, verdict.bad_row) == (False, 2)


def test_audit_deleted_or_edited_last_row_refuses_to_open(tmp_path: Path) -> None:
    db = tmp_path / "s.sqlite"
    _filled(db, audit_rows=5)
    with _raw(db) as conn:
        conn.execute("DELETE FROM audit WHERE seq = 5")
    assert _open_error(db) == (
        f"state file {db}: audit log ends at row 4 but its sealed head names row 5 "
        "(rows deleted or edited)"
    )
    report = audit_report(db, _key_file(tmp_path))
    assert not report.ok
    assert str(report.verdict) == (
        "audit chain broken at row 4: the sealed head names row 5 "
        "(rows after 4 deleted, or row 4 edited)"
    )


def _key_file(tmp_path: Path) -> Path:
    path = tmp_path / "kmf-state.key"
    path.write_bytes(KEY)
    path.chmod(0o600)
    return path


def test_audit_report_reads_while_the_kmf_runs(tmp_path: Path) -> None:
    db = tmp_path / "s.sqlite"
    key_path = _key_file(tmp_path)
    with KmfState(db, KEY) as s:
        s.append_audit("kmf_start", at=0.0)
        s.append_audit("join", conference="c", name="alice", spi=3, association_id=AID, at=1.0)
        report = audit_report(db, key_path)
        assert report.ok
        assert report.lines() == [
            "     1 1970-01-01T00:00:00.000000Z kmf_start     -",
            f"     2 1970-01-01T00:00:01.000000Z join          c name=alice assoc={AID} spi=3",
            "audit chain ok (2 rows)",
        ]
        s.append_audit("leave", conference="c", name="alice")
        assert len(audit_report(db, key_path, verify=False).rows) == 3
        assert audit_report(db, key_path, verify=False).verdict is None


def test_audit_report_errors(tmp_path: Path) -> None:
    db = tmp_path / "s.sqlite"
    with pytest.raises(StateError) as info:
        audit_report(db, tmp_path / "k")
    assert str(info.value) == f"state key {tmp_path / 'k'}: no such file"
    with pytest.raises(StateError) as info:
        audit_report(db, _key_file(tmp_path))
    assert str(info.value) == f"state file {db}: no such file"
    _filled(db)
    (tmp_path / "kmf-state.key").write_bytes(OTHER_KEY)
    with pytest.raises(StateError) as info:
        audit_report(db, tmp_path / "kmf-state.key")
    assert str(info.value) == f"state file {db}: sealed under another state key"


# --- write failures while running --------------------------------------------------------------


def test_locked_while_running_goes_on_in_memory_and_catches_up(tmp_path: Path) -> None:
    db = tmp_path / "s.sqlite"
    state = KmfState(db, KEY, busy_timeout=0)
    first = state.next_spi("c")
    _add(state)
    other = sqlite3.connect(db, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    with pytest.raises(StateWriteError) as info:
        state.next_spi("c")
    assert str(info.value) == (
        f"state file {db}: cannot write (locked by another process); 1 changes pending"
    )
    assert info.value.value == (first + 1) % SPI_MODULUS  # usable in memory
    with pytest.raises(StateWriteError) as info:
        state.reserve_seq(AID, 5000)
    assert info.value.value == 5000 + SEQ_BLOCK
    with pytest.raises(StateWriteError):
        state.append_audit("rekey", conference="c")
    assert state.write_errors == 3
    assert state.last_spi("c") == (first + 1) % SPI_MODULUS
    other.execute("ROLLBACK")
    other.close()
    assert state.catch_up() == 4  # spi, ceiling, audit row, audit head
    assert state.catch_up() == 0
    state.close()
    with KmfState(db, KEY) as s:
        assert s.last_spi("c") == (first + 1) % SPI_MODULUS
        row = s.association(AID)
        assert row is not None and row.seq_ceiling == 5000 + SEQ_BLOCK
        assert s.verify_audit().ok
        assert len(list(s.audit_rows())) == 1


def test_disk_full_then_the_next_write_catches_up(tmp_path: Path) -> None:
    db = tmp_path / "s.sqlite"
    state = KmfState(db, KEY)
    conn = state._conn
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    conn.execute(f"PRAGMA max_page_count = {pages}")  # SQLITE_FULL from here on
    failures = 0
    for i in range(200):
        try:
            state.append_audit("join", conference="c", name=f"member-{i:04d}" * 8)
        except StateWriteError as e:
            failures += 1
            assert "database or disk is full" in str(e)
    assert failures > 0 and state.pending
    conn.execute("PRAGMA max_page_count = 1000000")
    state.next_spi("c")  # the next successful write carries everything pending
    assert not state.pending
    state.close()
    with KmfState(db, KEY) as s:
        assert s.verify_audit().rows == 200
        assert s.verify_audit().ok


def test_state_file_is_a_directory(tmp_path: Path) -> None:
    db = tmp_path / "s.sqlite"
    db.mkdir()
    assert _open_error(db) == f"state file {db}: cannot read: Is a directory"


def test_meta_without_schema_version(tmp_path: Path) -> None:
    db = tmp_path / "s.sqlite"
    _filled(db)
    with _raw(db) as conn:
        conn.execute("DELETE FROM meta WHERE name = 'schema'")
    assert _open_error(db) == (
        f"state file {db}: no schema version (not a perc KMF state database)"
    )


def test_state_key_creation_leaves_no_temporary_file(tmp_path: Path) -> None:
    load_state_key(tmp_path / "k")
    assert [p.name for p in tmp_path.iterdir()] == ["k"]


def test_audit_head_sealed_under_another_key_refuses_a_writer(tmp_path: Path) -> None:
    db = tmp_path / "s.sqlite"
    _filled(db)
    with KmfState(None, OTHER_KEY) as other:
        forged = other._sealer.seal(b'[3, "00"]', "meta", "audit_head")
    with _raw(db) as conn:
        conn.execute("UPDATE meta SET value = ? WHERE name = 'audit_head'", (forged,))
    assert _open_error(db) == f"state file {db}: audit head does not authenticate"
    verdict = audit_report(db, _key_file(tmp_path)).verdict
    assert str(verdict) == "audit chain broken at row 3: sealed head does not authenticate"
