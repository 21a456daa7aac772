"""The KMF's durable state: one SQLite file (D28), resumable associations (D29), audit log (D32).

Theory of operation
===================

The Key Distributor keeps in one SQLite database (WAL mode) the facts it must not forget across
a restart or a SIGKILL:

* **SPIs** (D28). Per conference an *issue counter*, a 64-bit integer that starts at a random
  value below 2^16 and grows by one per key; the SPI of a key is ``counter mod 2^16``. The
  counter is written (and the write made durable) before :meth:`KmfState.next_spi` returns,
  so a restart resumes after every SPI ever handed out. An SPI therefore comes round again
  exactly 65,536 issues later, i.e. after 65,535 newer keys; D28 asks for at least 32,768,
  which is what RFC 1982 serial-number comparison (:func:`spi_is_newer`) needs to tell a
  newer SPI from an older one, and a conference never runs out of SPIs.
* **Resumable associations** (D29). Per live association the non-secret facts (MDD,
  conference, peer fingerprint, tls-id, profile, EKT cipher), the epoch-1 record protection
  state (opaque bytes from the caller, sealed) and a *sequence ceiling*: every epoch-1 record
  number below the ceiling may be used, none at or above it. Before the KMF uses a number at
  or past the ceiling it calls :meth:`KmfState.reserve_seq`, which writes ``ceiling = next +
  1024`` first; after a restart sending resumes at the stored ceiling. Numbers between the
  last one really sent and the ceiling are skipped, never reused, so no (epoch, sequence)
  pair is protected twice under one key (RFC 6347 §4.1, the AEAD nonce of RFC 5288).
  Plus the current EKTKey of each conference (opaque bytes, sealed) and its SPI.
* **Roster changes** made at run time (admin socket, D33): the last add or remove per
  (conference, fingerprint).
* **Audit log** (D32): append-only rows, each carrying the SHA-256 of the previous row's
  canonical form (:func:`audit_canonical`). The newest row's hash and number are also kept
  sealed in ``meta`` (the *head*), so deleting the newest rows or rewriting the whole chain
  without the state key shows as well. Audit rows never hold key material.

Sealing (D28): AES-256-GCM (``cryptography``'s AESGCM) under the 32-byte state key, a fresh
random 12-byte nonce per seal (stored as ``nonce || ciphertext || tag``), and as associated
data the row's identity (table, column and key columns), so a sealed blob moved to another
row or column does not open. ``meta.key_check`` is a sealed constant: a state opened with
another key fails there, before anything else is read.

``persist_keys = False`` (D29) stores no key material: association rows keep their
non-secret columns and sequence ceiling with ``record_state`` NULL (so a restarted KMF knows
who was connected, but cannot resume them; recovery relies on endpoint rejoin, D30), no
EKTKey rows are written, and opening such a state deletes key material left by an earlier
``persist_keys = True`` run. SPI counters, roster changes and the audit log are kept.

Durability: ``synchronous = FULL``. In WAL mode NORMAL survives a process crash but may lose
the last commits on a power cut; a lost SPI or ceiling write would then let a restarted KMF
reuse an SPI or a DTLS sequence number, so every commit is fsynced. Writes are rare (one per
key, per 1024 records of an association, per audit event) and happen off the event loop.

Threading contract: the object is synchronous and not thread-safe. The trio shell calls it
through ``trio.to_thread.run_sync`` from ONE worker thread at a time (a CapacityLimiter of 1
or a dedicated thread); it may be opened on another thread (``check_same_thread=False``), but
no two calls may overlap. Nothing here imports trio.

Write failures while running (disk full, database locked by another process): every
mutating method first applies its change to the in-memory view, queues it in
:attr:`KmfState.pending`, then writes everything pending in one transaction. If that write
fails it raises :class:`StateWriteError` (``value`` carries the SPI or ceiling the caller may
use in memory) and the change stays pending; the next mutating call, or
:meth:`KmfState.catch_up`, writes it (latest SPI counters and ceilings, audit rows in order).
The KMF catches the error, logs it once, counts it and goes on in memory. A SIGKILL before
the catch-up loses the pending changes; that is the price of going on rather than stopping
the conference, and it is the caller's to decide (e.g. hold EKTKeys past an unwritten
ceiling).
"""

from __future__ import annotations

import contextlib
import datetime
import enum
import errno
import fcntl
import hashlib
import json
import os
import secrets
import sqlite3
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterator
from pathlib import Path

import attrs
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

__all__ = [
    "KEY_LENGTH",
    "SCHEMA_VERSION",
    "SEQ_BLOCK",
    "SEQ_LIMIT",
    "SPI_MODULUS",
    "SPI_REUSE_MIN",
    "AssociationRow",
    "AuditEvent",
    "AuditReport",
    "AuditRow",
    "AuditVerdict",
    "EktKeyRow",
    "KmfState",
    "RosterChange",
    "StateError",
    "StateWriteError",
    "audit_canonical",
    "audit_hash",
    "audit_report",
    "load_state_key",
    "seq_ceiling_after",
    "seq_needs_reservation",
    "spi_is_newer",
    "spi_of",
]

SCHEMA_VERSION = 1
#: ``PRAGMA application_id`` of a perc KMF state file ("PERC")
APPLICATION_ID = 0x50455243
KEY_LENGTH = 32
NONCE_LENGTH = 12
SPI_MODULUS = 1 << 16
#: D28: an SPI may come round again only after this many newer keys
SPI_REUSE_MIN = 1 << 15
#: D29: sequence numbers are reserved this many at a time
SEQ_BLOCK = 1024
#: DTLS 1.2 record sequence numbers are 48 bits (RFC 6347 §4.1)
SEQ_LIMIT = 1 << 48
GENESIS_HASH = "0" * 64
_KEY_CHECK = b"perc kmf state key check v1"
_SQLITE_MAGIC = b"SQLite format 3\x00"


class StateError(Exception):
    """The state file or state key cannot be used; the message is one line naming the file."""


class StateWriteError(StateError):
    """A write failed while running (disk full, locked); the change stays pending.

    ``value`` is the SPI (:meth:`KmfState.next_spi`) or ceiling (:meth:`KmfState.reserve_seq`)
    the call produced in memory, for a caller that goes on in memory; None for other calls.
    """

    def __init__(self, message: str, value: int | None = None) -> None:
        super().__init__(message)
        self.value = value


# --- pure arithmetic (D28 SPIs, D29 sequence ceilings) -------------------------------------


def spi_of(counter: int) -> int:
    """The SPI of the key issued at ``counter``: the counter modulo 2^16 (D28).

    Two counters give the same SPI only if they differ by a multiple of 65,536, so between two
    issues of one SPI there are at least 65,535 newer keys (>= ``SPI_REUSE_MIN``).
    """
    return counter % SPI_MODULUS


def spi_is_newer(candidate: int, reference: int) -> bool:
    """Whether SPI ``candidate`` is newer than ``reference`` (RFC 1982 serial arithmetic, 16 bits).

    True when ``candidate`` is 1..32,767 issues after ``reference``; this is why D28 wants an
    SPI to come round only after 32,768 newer keys.
    """
    return 0 < (candidate - reference) % SPI_MODULUS < SPI_REUSE_MIN


def seq_needs_reservation(next_seq: int, ceiling: int) -> bool:
    """Whether record number ``next_seq`` lies at or past the reserved ``ceiling`` (D29)."""
    return next_seq >= ceiling


def seq_ceiling_after(next_seq: int) -> int:
    """The ceiling to write before using ``next_seq``: ``next + 1024``, capped at 2^48 (D29)."""
    if not 0 <= next_seq < SEQ_LIMIT:
        raise ValueError(f"sequence number {next_seq} outside 0..2^48-1")
    return min(next_seq + SEQ_BLOCK, SEQ_LIMIT)


# --- the state key (D28) ---------------------------------------------------------------------


def load_state_key(path: str | os.PathLike[str]) -> bytes:
    """Read the 32-byte state key at ``path``; create it (random, mode 0600) if missing.

    Refused with a one-line :class:`StateError`: unreadable, not 32 bytes, or accessible by
    group or others (D28).
    """
    p = Path(path)
    if not os.path.lexists(p):
        _create_key_file(p)
    try:
        fd = os.open(p, os.O_RDONLY)
    except OSError as e:
        raise StateError(f"state key {p}: cannot read: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if st.st_mode & 0o077:
            raise StateError(
                f"state key {p}: accessible by group or others "
                f"(mode {st.st_mode & 0o777:04o}); run chmod 600 on it"
            )
        try:
            data = os.read(fd, KEY_LENGTH + 1)
        except OSError as e:
            raise StateError(f"state key {p}: cannot read: {e.strerror}") from None
    finally:
        os.close(fd)
    if len(data) != KEY_LENGTH:
        size = f"{len(data)} bytes" if len(data) <= KEY_LENGTH else "longer"
        raise StateError(f"state key {p}: {size}, expected {KEY_LENGTH} bytes")
    return data


def _create_key_file(p: Path) -> None:
    # Written whole under a temporary name, then linked into place: a kill or power cut never
    # leaves a short key file behind, and a concurrent creator's key wins (link fails on an
    # existing name). The directory is fsynced so the key outlives the state it seals.
    tmp = p.with_name(f".{p.name}.{secrets.token_hex(6)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as e:
        raise StateError(f"state key {p}: cannot create: {e.strerror}") from None
    try:
        try:
            os.write(fd, secrets.token_bytes(KEY_LENGTH))
            os.fsync(fd)
        finally:
            os.close(fd)
        with contextlib.suppress(FileExistsError):
            os.link(tmp, p)
        dir_fd = os.open(p.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as e:
        raise StateError(f"state key {p}: cannot create: {e.strerror}") from None
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def _aad(*identity: str | int) -> bytes:
    # JSON of the list is unambiguous (no separator games between table, column and keys).
    return json.dumps(["perc-kmf-state", SCHEMA_VERSION, *identity], separators=(",", ":")).encode()


class _Sealer:
    def __init__(self, key: bytes) -> None:
        self._aead = AESGCM(key)

    def seal(self, plaintext: bytes, *identity: str | int) -> bytes:
        nonce = secrets.token_bytes(NONCE_LENGTH)
        return nonce + self._aead.encrypt(nonce, plaintext, _aad(*identity))

    def open(self, blob: bytes, *identity: str | int) -> bytes | None:
        if len(blob) < NONCE_LENGTH + 16:
            return None
        try:
            return self._aead.decrypt(blob[:NONCE_LENGTH], blob[NONCE_LENGTH:], _aad(*identity))
        except InvalidTag:
            return None


# --- rows ------------------------------------------------------------------------------------


class AuditEvent(enum.StrEnum):
    JOIN = "join"
    LEAVE = "leave"
    DENY = "deny"
    REKEY = "rekey"
    KICK = "kick"
    ROSTER_ADD = "roster_add"
    ROSTER_REMOVE = "roster_remove"
    KMF_START = "kmf_start"


@attrs.frozen
class AuditRow:
    """One audit row (D32). ``seq`` counts from 1; ``prev`` is the previous row's hash."""

    seq: int
    time: str
    event: str
    conference: str | None
    fingerprint: str | None
    name: str | None
    association_id: str | None
    spi: int | None
    mdd_fingerprint: str | None
    prev: str


def audit_canonical(row: AuditRow) -> bytes:
    """The canonical form the chain hashes (D32).

    UTF-8 JSON of an object with exactly the keys ``association_id conference event
    fingerprint mdd_fingerprint name prev seq spi time``, sorted, separators ``,`` and ``:``
    with no spaces, non-ASCII characters as themselves; absent values are ``null``; ``time``
    is ISO 8601 UTC with microseconds (``2026-12-07T18:00:00.000000Z``).
    """
    return json.dumps(
        attrs.asdict(row), sort_keys=True, separators=(",", ":"), ensure_ascii=False
    ).encode("utf-8")


def audit_hash(row: AuditRow) -> str:
    """SHA-256 of the canonical form, lowercase hex: what the next row's ``prev`` holds."""
    return hashlib.sha256(audit_canonical(row)).hexdigest()


@attrs.frozen
class AuditVerdict:
    """Result of :meth:`KmfState.verify_audit`: ok, or the first bad row and why."""

    ok: bool
    rows: int
    bad_row: int | None = None
    reason: str | None = None

    def __str__(self) -> str:
        if self.ok:
            return f"audit chain ok ({self.rows} rows)"
        return f"audit chain broken at row {self.bad_row}: {self.reason}"


@attrs.frozen
class AssociationRow:
    """A live association the KMF can resume (D29). ``record_state`` is None without keys."""

    association_id: uuid.UUID
    mdd_fingerprint: str
    conference: str
    peer_fingerprint: str
    tls_id: str | None
    profile: int
    ekt_cipher: int
    record_state: bytes | None = attrs.field(repr=False)
    seq_ceiling: int


@attrs.frozen
class EktKeyRow:
    """A conference's current EKTKey (opaque bytes from the caller) and its SPI."""

    conference: str
    spi: int
    material: bytes = attrs.field(repr=False)


@attrs.frozen
class RosterChange:
    """The last run-time roster change for one (conference, fingerprint)."""

    conference: str
    fingerprint: str
    action: str  # "add" or "remove"
    name: str | None
    time: str


_SCHEMA = """
CREATE TABLE meta (name TEXT PRIMARY KEY, value BLOB NOT NULL);
CREATE TABLE spi (conference TEXT PRIMARY KEY, counter INTEGER NOT NULL CHECK (counter >= 0));
CREATE TABLE association (
    id TEXT PRIMARY KEY,
    mdd_fingerprint TEXT NOT NULL,
    conference TEXT NOT NULL,
    peer_fingerprint TEXT NOT NULL,
    tls_id TEXT,
    profile INTEGER NOT NULL,
    ekt_cipher INTEGER NOT NULL,
    record_state BLOB,
    seq_ceiling INTEGER NOT NULL
);
CREATE TABLE ekt_key (conference TEXT PRIMARY KEY, spi INTEGER NOT NULL, material BLOB NOT NULL);
CREATE TABLE roster (
    conference TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    action TEXT NOT NULL CHECK (action IN ('add', 'remove')),
    name TEXT,
    time TEXT NOT NULL,
    PRIMARY KEY (conference, fingerprint)
);
CREATE TABLE audit (
    seq INTEGER PRIMARY KEY,
    time TEXT NOT NULL,
    event TEXT NOT NULL,
    conference TEXT,
    fingerprint TEXT,
    name TEXT,
    association_id TEXT,
    spi INTEGER,
    mdd_fingerprint TEXT,
    prev TEXT NOT NULL
);
CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit
    BEGIN SELECT RAISE(ABORT, 'audit rows are append-only'); END;
CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit
    BEGIN SELECT RAISE(ABORT, 'audit rows are append-only'); END;
"""

_AUDIT_COLUMNS = (
    "seq, time, event, conference, fingerprint, name, association_id, spi, mdd_fingerprint, prev"
)
# Constant text, no values: the S608 warnings below are about f-strings over constants.
_AUDIT_INSERT = f"INSERT INTO audit ({_AUDIT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"  # noqa: S608
_AUDIT_LAST = f"SELECT {_AUDIT_COLUMNS} FROM audit ORDER BY seq DESC LIMIT 1"  # noqa: S608
_AUDIT_ALL = f"SELECT {_AUDIT_COLUMNS} FROM audit ORDER BY seq"  # noqa: S608

#: D32 rows queued while the disk refuses writes; beyond this they are dropped and counted
MAX_PENDING_AUDIT = 65536

_Op = Callable[[sqlite3.Connection], object]


def _iso(at: float) -> str:
    t = datetime.datetime.fromtimestamp(at, datetime.UTC)
    return t.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _now() -> str:
    return _iso(datetime.datetime.now(datetime.UTC).timestamp())


def _sqlite_reason(e: sqlite3.Error) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def _is_locked(e: sqlite3.Error) -> bool:
    code = getattr(e, "sqlite_errorcode", None)
    return code is not None and code & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)


def _precheck_file(path: Path) -> str | None:
    """What is wrong with a state file before SQLite sees it, if that can be told from bytes.

    The in-header page count (valid when its version-valid-for number equals the change
    counter) tells a truncated file; it is trusted only without a WAL, because a checkpoint
    cut short may leave the main file shorter than page 1 says until the WAL is replayed.
    """
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return None
    if size == 0:
        return None
    with path.open("rb") as f:
        head = f.read(100)
    if not head.startswith(_SQLITE_MAGIC[: len(head)]) or len(head) < len(_SQLITE_MAGIC):
        return "not a SQLite database (corrupt or another kind of file)"
    if len(head) < 100:
        return f"truncated ({size} bytes, shorter than the SQLite header)"
    wal = Path(str(path) + "-wal")
    if wal.exists() and wal.stat().st_size > 0:
        return None
    page_size = int.from_bytes(head[16:18], "big")
    page_size = 65536 if page_size == 1 else page_size
    pages = int.from_bytes(head[28:32], "big")
    if head[24:28] == head[92:96] and pages and size < pages * page_size:
        return f"truncated ({size} bytes, its header says {pages * page_size})"
    return None


class KmfState:
    """The open state database. See the module docstring for the contracts."""

    def __init__(
        self,
        path: str | os.PathLike[str] | None,
        key: bytes,
        *,
        persist_keys: bool = True,
        reset: bool = False,
        busy_timeout: float = 1.0,
        read_only: bool = False,
    ) -> None:
        """Open (or create) the state at ``path``; None keeps it in memory only.

        Raises :class:`StateError` with one line naming the file: not a database, truncated,
        corrupt, another schema, sealed under another key, locked by another process.
        Nothing is overwritten unless ``reset`` is true. ``read_only`` (for audit reports)
        opens an existing file without taking the owner lock and writes nothing.
        """
        if len(key) != KEY_LENGTH:
            raise ValueError(f"state key must be {KEY_LENGTH} bytes")
        self.path = Path(path) if path is not None else None
        self.persist_keys = persist_keys
        self.read_only = read_only
        self._sealer = _Sealer(key)
        self._label = f"state file {self.path}" if self.path else "state (memory)"
        #: changes not yet written, keyed by the fact they set (latest wins), in order
        self.pending: OrderedDict[tuple[object, ...], _Op] = OrderedDict()
        #: failed writes so far (each raised StateWriteError)
        self.write_errors = 0
        #: audit rows dropped because MAX_PENDING_AUDIT were already waiting
        self.audit_dropped = 0
        self._pending_audit = 0
        self._batch_depth = 0
        self._lock_fd: int | None = None
        self._spi: dict[str, int] = {}
        self._associations: dict[uuid.UUID, AssociationRow] = {}
        self._ekt: dict[str, EktKeyRow] = {}
        self._roster: dict[tuple[str, str], RosterChange] = {}
        self._audit_seq = 0
        self._audit_head = GENESIS_HASH
        try:
            self._conn = self._open(reset, busy_timeout)
        except BaseException:
            self._release_lock()
            raise

    # --- opening ----------------------------------------------------------------------------

    def _fail(self, what: str) -> StateError:
        return StateError(f"{self._label}: {what}")

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _take_lock(self, path: Path) -> None:
        # One KMF per state file: the SPI counters and ceilings live in its memory. The lock is
        # a flock on a sidecar file: a lock on the database file itself would be dropped (POSIX
        # fcntl semantics) when any descriptor of it closes, SQLite's own locks with it.
        lock_path = Path(str(path) + "-lock")
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as e:
            raise self._fail(f"cannot open lock file {lock_path}: {e.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise self._fail("locked by another process (another perc kmf?)") from None
            raise self._fail(f"cannot lock {lock_path}: {e.strerror}") from None
        self._lock_fd = fd

    def _precheck(self, path: Path) -> str | None:
        try:
            return _precheck_file(path)
        except OSError as e:
            raise self._fail(f"cannot read: {e.strerror}") from None

    def _open(self, reset: bool, busy_timeout: float) -> sqlite3.Connection:
        path = self.path
        if path is None:
            target = ":memory:"
        elif self.read_only:
            if not path.exists():
                raise self._fail("no such file")
            problem = self._precheck(path)
            if problem:
                raise self._fail(problem)
            target = f"file:{path}?mode=ro"
        else:
            self._take_lock(path)
            if reset:
                for suffix in ("", "-wal", "-shm"):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(str(path) + suffix)
            try:
                # The file holds sealed keys and who joined when: owner only.
                os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            except FileExistsError:
                pass
            except OSError as e:
                raise self._fail(f"cannot create: {e.strerror}") from None
            problem = self._precheck(path)
            if problem:
                raise self._fail(problem)
            target = str(path)
        try:
            conn = sqlite3.connect(
                target,
                timeout=busy_timeout,
                isolation_level=None,
                check_same_thread=False,
                uri=self.read_only,
            )
        except sqlite3.Error as e:
            raise self._fail(f"cannot open: {_sqlite_reason(e)}") from None
        try:
            self._prepare(conn)
            self._load(conn)
        except sqlite3.Error as e:
            conn.close()
            if _is_locked(e):
                raise self._fail("locked by another process") from None
            raise self._fail(f"corrupt: {_sqlite_reason(e)}") from None
        except BaseException:
            conn.close()
            raise
        return conn

    def _prepare(self, conn: sqlite3.Connection) -> None:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        app_id = conn.execute("PRAGMA application_id").fetchone()[0]
        if tables and (app_id != APPLICATION_ID or "meta" not in tables):
            raise self._fail("not a perc KMF state database")
        if not self.read_only:
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if self.path is not None and str(mode).lower() != "wal":
                raise self._fail(f"cannot switch to WAL mode (journal_mode is {mode})")
            # FULL: see the module docstring (power-cut safety of SPIs and ceilings).
            conn.execute("PRAGMA synchronous=FULL")
            # Deleted rows (ended associations, replaced EKTKeys) are zeroed, not left sealed
            # in free pages of the file.
            conn.execute("PRAGMA secure_delete=ON")
        if not tables:
            if self.read_only:
                raise self._fail("empty (not a perc KMF state database)")
            check = self._sealer.seal(_KEY_CHECK, "meta", "key_check")
            # One script, one transaction: a kill during creation leaves no tables at all,
            # which the next open treats as a new file.
            try:
                conn.executescript(
                    "BEGIN IMMEDIATE;"  # noqa: S608 (constants and our own hex only)
                    + _SCHEMA
                    + f"PRAGMA application_id={APPLICATION_ID};"
                    + f"INSERT INTO meta VALUES ('schema', {SCHEMA_VERSION});"  # noqa: S608
                    + f"INSERT INTO meta VALUES ('key_check', X'{check.hex()}');"  # noqa: S608
                    + "COMMIT;"
                )
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            return
        quick = conn.execute("PRAGMA quick_check").fetchone()[0]
        if quick != "ok":
            raise self._fail(f"corrupt: {str(quick).splitlines()[0]}")
        meta = dict(conn.execute("SELECT name, value FROM meta"))
        version = meta.get("schema")
        if version is None:
            raise self._fail("no schema version (not a perc KMF state database)")
        if version != SCHEMA_VERSION:
            raise self._fail(f"schema version {version}, this perc reads {SCHEMA_VERSION}")
        stored = meta.get("key_check")
        if (
            not isinstance(stored, bytes)
            or self._sealer.open(stored, "meta", "key_check") != _KEY_CHECK
        ):
            raise self._fail("sealed under another state key")

    def _load(self, conn: sqlite3.Connection) -> None:
        self._spi = dict(conn.execute("SELECT conference, counter FROM spi"))
        for row in conn.execute("SELECT * FROM association"):
            aid = uuid.UUID(row[0])
            sealed = row[7]
            state: bytes | None = None
            if sealed is not None and self.persist_keys:
                state = self._sealer.open(sealed, "association", "record_state", str(aid))
                if state is None:
                    raise self._fail(f"association {aid}: record state does not authenticate")
            self._associations[aid] = AssociationRow(
                aid, row[1], row[2], row[3], row[4], row[5], row[6], state, row[8]
            )
        for conference, spi, material in conn.execute("SELECT * FROM ekt_key"):
            if not self.persist_keys:
                continue
            plain = self._sealer.open(material, "ekt_key", "material", conference, spi)
            if plain is None:
                raise self._fail(f"EKTKey of conference {conference!r} does not authenticate")
            self._ekt[conference] = EktKeyRow(conference, spi, plain)
        for r in conn.execute("SELECT * FROM roster"):
            change = RosterChange(*r)
            self._roster[(change.conference, change.fingerprint)] = change
        last = conn.execute(_AUDIT_LAST)
        row = last.fetchone()
        head = conn.execute("SELECT value FROM meta WHERE name='audit_head'").fetchone()
        expected: list[object] = [0, GENESIS_HASH]
        if head is not None:
            opened = self._sealer.open(head[0], "meta", "audit_head")
            if opened is None and not self.read_only:
                raise self._fail("audit head does not authenticate")
            expected = json.loads(opened) if opened is not None else [None, None]
        if row is not None:
            self._audit_seq = row[0]
            self._audit_head = audit_hash(AuditRow(*row))
        # A writer must not extend a chain whose tail was cut or edited (its new head would
        # hide that); a read-only report opens anyway and lets verify_audit say what is wrong.
        if [self._audit_seq, self._audit_head] != expected and not self.read_only:
            raise self._fail(
                f"audit log ends at row {self._audit_seq} but its sealed head names row "
                f"{expected[0]} (rows deleted or edited)"
            )
        if not self.persist_keys and not self.read_only:
            # D29: persist_keys = false keeps no key material on disk, not even old key material.
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("UPDATE association SET record_state = NULL")
            conn.execute("DELETE FROM ekt_key")
            conn.execute("COMMIT")

    def close(self) -> None:
        """Close the database (pending changes are not written) and release the lock."""
        conn = getattr(self, "_conn", None)
        if conn is not None:
            conn.close()
        self._release_lock()

    def __enter__(self) -> KmfState:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- writing ----------------------------------------------------------------------------

    def _queue(self, key: tuple[object, ...], op: _Op) -> None:
        if self.read_only:
            raise self._fail("opened read-only")
        # Latest wins, and a re-set fact moves to the end so writes replay in causal order.
        self.pending.pop(key, None)
        self.pending[key] = op

    def _flush(self, value: int | None = None) -> None:
        if self._batch_depth or not self.pending:
            return
        conn = self._conn
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                for op in self.pending.values():
                    op(conn)
                conn.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
                raise
        except sqlite3.Error as e:
            self.write_errors += 1
            what = "locked by another process" if _is_locked(e) else _sqlite_reason(e)
            raise StateWriteError(
                f"{self._label}: cannot write ({what}); {len(self.pending)} changes pending",
                value,
            ) from None
        self.pending.clear()
        self._pending_audit = 0

    def catch_up(self) -> int:
        """Write every pending change; returns how many there were. Raises StateWriteError."""
        n = len(self.pending)
        self._flush()
        return n

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        """Group calls into one transaction, written when the outermost batch exits.

        Inside a batch nothing is durable yet: a value returned inside (an SPI, a ceiling)
        must not be used before the batch has exited without StateWriteError.
        """
        self._batch_depth += 1
        failed = False
        try:
            yield
        except BaseException:
            failed = True
            raise
        finally:
            self._batch_depth -= 1
            if self._batch_depth == 0:
                try:
                    self._flush()
                except StateWriteError:
                    if not failed:
                        raise

    @property
    def audit_seq(self) -> int:
        """Number of the newest audit row (0: none yet), written or pending."""
        return self._audit_seq

    # --- SPIs (D28) -------------------------------------------------------------------------

    def spi_counter(self, conference: str) -> int | None:
        """The issue counter of the last SPI handed out for ``conference``, if any."""
        return self._spi.get(conference)

    def spi_counters(self) -> dict[str, int]:
        """Every conference's last issue counter (a restarted KMF resumes after these)."""
        return dict(self._spi)

    def last_spi(self, conference: str) -> int | None:
        counter = self._spi.get(conference)
        return None if counter is None else spi_of(counter)

    def next_spi(self, conference: str) -> int:
        """Advance the conference's counter, make it durable, return the new SPI (D28).

        A conference seen for the first time starts at a random counter below 2^16.
        """
        last = self._spi.get(conference)
        counter = secrets.randbelow(SPI_MODULUS) if last is None else last + 1
        if counter >= 1 << 63:
            raise StateError(f"{self._label}: SPI counter of {conference!r} exhausted")
        self._spi[conference] = counter
        self._queue(
            ("spi", conference),
            lambda c: c.execute(
                "INSERT INTO spi VALUES (?, ?) ON CONFLICT(conference) "
                "DO UPDATE SET counter = max(counter, excluded.counter)",
                (conference, counter),
            ),
        )
        spi = spi_of(counter)
        self._flush(spi)
        return spi

    def reserve_spis(self, conference: str, ceiling: int) -> int:
        """Record durably that counters below ``ceiling`` may be handed out (D28, in blocks).

        The stored counter becomes ``ceiling - 1`` (it never goes down): "the last SPI issued"
        is then an upper bound, and a restarted KMF resumes at ``ceiling``, after every key
        the block may have produced. Returns ``ceiling``; StateWriteError leaves it pending.
        """
        if not 1 <= ceiling < 1 << 63:
            raise ValueError(f"SPI ceiling {ceiling} outside 1..2^63-1")
        counter = max(ceiling - 1, self._spi.get(conference, 0))
        self._spi[conference] = counter
        self._queue(
            ("spi", conference),
            lambda c: c.execute(
                "INSERT INTO spi VALUES (?, ?) ON CONFLICT(conference) "
                "DO UPDATE SET counter = max(counter, excluded.counter)",
                (conference, counter),
            ),
        )
        self._flush(ceiling)
        return ceiling

    # --- associations (D29) -----------------------------------------------------------------

    def associations(self) -> list[AssociationRow]:
        return list(self._associations.values())

    def association(self, association_id: uuid.UUID) -> AssociationRow | None:
        return self._associations.get(association_id)

    def add_association(
        self,
        association_id: uuid.UUID,
        *,
        mdd_fingerprint: str,
        conference: str,
        peer_fingerprint: str,
        tls_id: str | None,
        profile: int,
        ekt_cipher: int,
        record_state: bytes,
        next_seq: int,
    ) -> int:
        """Store a live association; returns its first ceiling (``next_seq + 1024``).

        ``record_state`` is the caller's serialized epoch-1 protection state (keys, IVs); it
        is sealed, or not stored at all without ``persist_keys``.
        """
        ceiling = seq_ceiling_after(next_seq)
        kept = record_state if self.persist_keys else None
        row = AssociationRow(
            association_id,
            mdd_fingerprint,
            conference,
            peer_fingerprint,
            tls_id,
            profile,
            ekt_cipher,
            kept,
            ceiling,
        )
        self._associations[association_id] = row
        aid = str(association_id)
        sealed = (
            None if kept is None else self._sealer.seal(kept, "association", "record_state", aid)
        )
        values = (aid, mdd_fingerprint, conference, peer_fingerprint, tls_id, profile,
                  ekt_cipher, sealed, ceiling)  # fmt: skip
        self._queue(
            ("association", association_id),
            lambda c: c.execute(
                "INSERT OR REPLACE INTO association VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", values
            ),
        )
        self._flush(ceiling)
        return ceiling

    def reserve_seq(
        self, association_id: uuid.UUID, next_seq: int, *, record_state: bytes | None = None
    ) -> int:
        """Make ``next_seq`` usable: returns the ceiling (exclusive) it now lies below (D29).

        Below the stored ceiling nothing is written. At or past it, ``next_seq + 1024`` is
        written (durably) before this returns, with ``record_state`` (if given: a fresher
        export, sealed like the first) in the same row. Ceilings only grow.
        """
        row = self._associations.get(association_id)
        if row is None:
            raise KeyError(f"unknown association {association_id}")
        if not seq_needs_reservation(next_seq, row.seq_ceiling):
            return row.seq_ceiling
        ceiling = seq_ceiling_after(next_seq)
        aid = str(association_id)
        kept = record_state if self.persist_keys and record_state is not None else None
        if kept is None:
            self._associations[association_id] = attrs.evolve(row, seq_ceiling=ceiling)
            self._queue(
                ("ceiling", association_id),
                lambda c: c.execute(
                    "UPDATE association SET seq_ceiling = max(seq_ceiling, ?) WHERE id = ?",
                    (ceiling, aid),
                ),
            )
        else:
            self._associations[association_id] = attrs.evolve(
                row, seq_ceiling=ceiling, record_state=kept
            )
            sealed = self._sealer.seal(kept, "association", "record_state", aid)
            self._queue(
                ("ceiling", association_id),
                lambda c: c.execute(
                    "UPDATE association SET seq_ceiling = max(seq_ceiling, ?), "
                    "record_state = ? WHERE id = ?",
                    (ceiling, sealed, aid),
                ),
            )
        self._flush(ceiling)
        return ceiling

    def remove_association(self, association_id: uuid.UUID) -> None:
        """Forget an association that ended (D29)."""
        if self._associations.pop(association_id, None) is None:
            return
        aid = str(association_id)
        self.pending.pop(("ceiling", association_id), None)
        self._queue(
            ("association", association_id),
            lambda c: c.execute("DELETE FROM association WHERE id = ?", (aid,)),
        )
        self._flush()

    # --- EKTKeys (D29) ----------------------------------------------------------------------

    def ekt_key(self, conference: str) -> EktKeyRow | None:
        return self._ekt.get(conference)

    def ekt_keys(self) -> list[EktKeyRow]:
        return list(self._ekt.values())

    def set_ekt_key(self, conference: str, spi: int, material: bytes) -> None:
        """Store the conference's current EKTKey (sealed; nothing without ``persist_keys``)."""
        if not 0 <= spi < SPI_MODULUS:
            raise ValueError(f"SPI {spi} outside 0..65535")
        if not self.persist_keys:
            return
        self._ekt[conference] = EktKeyRow(conference, spi, material)
        sealed = self._sealer.seal(material, "ekt_key", "material", conference, spi)
        self._queue(
            ("ekt_key", conference),
            lambda c: c.execute(
                "INSERT OR REPLACE INTO ekt_key VALUES (?, ?, ?)", (conference, spi, sealed)
            ),
        )
        self._flush()

    def remove_ekt_key(self, conference: str) -> None:
        if self._ekt.pop(conference, None) is None:
            return
        self._queue(
            ("ekt_key", conference),
            lambda c: c.execute("DELETE FROM ekt_key WHERE conference = ?", (conference,)),
        )
        self._flush()

    # --- roster changes (D33) ---------------------------------------------------------------

    def roster_changes(self) -> list[RosterChange]:
        """The last run-time change per (conference, fingerprint), to apply over the config."""
        return list(self._roster.values())

    def _set_roster(self, conference: str, fingerprint: str, action: str, name: str | None) -> None:
        change = RosterChange(conference, fingerprint, action, name, _now())
        self._roster[(conference, fingerprint)] = change
        values = attrs.astuple(change)
        self._queue(
            ("roster", conference, fingerprint),
            lambda c: c.execute("INSERT OR REPLACE INTO roster VALUES (?, ?, ?, ?, ?)", values),
        )
        self._flush()

    def roster_add(self, conference: str, fingerprint: str, name: str | None = None) -> None:
        self._set_roster(conference, fingerprint, "add", name)

    def roster_remove(self, conference: str, fingerprint: str) -> None:
        """Remove (ban) a fingerprint from a conference, persisted."""
        self._set_roster(conference, fingerprint, "remove", None)

    # --- audit log (D32) --------------------------------------------------------------------

    def append_audit(
        self,
        event: AuditEvent | str,
        *,
        conference: str | None = None,
        fingerprint: str | None = None,
        name: str | None = None,
        association_id: uuid.UUID | None = None,
        spi: int | None = None,
        mdd_fingerprint: str | None = None,
        at: float | None = None,
    ) -> int | None:
        """Append one row; returns its number, or None if it was dropped (queue full).

        ``at`` is a POSIX timestamp (default: now). Never pass key material here (D32).
        """
        event = AuditEvent(event)
        if self._pending_audit >= MAX_PENDING_AUDIT:
            self.audit_dropped += 1
            return None
        row = AuditRow(
            seq=self._audit_seq + 1,
            time=_iso(at) if at is not None else _now(),
            event=event.value,
            conference=conference,
            fingerprint=fingerprint,
            name=name,
            association_id=None if association_id is None else str(association_id),
            spi=spi,
            mdd_fingerprint=mdd_fingerprint,
            prev=self._audit_head,
        )
        self._audit_seq = row.seq
        self._audit_head = audit_hash(row)
        self._pending_audit += 1
        values = attrs.astuple(row)
        self._queue(
            ("audit", row.seq),
            lambda c: c.execute(_AUDIT_INSERT, values),
        )
        head = self._sealer.seal(
            json.dumps([row.seq, self._audit_head]).encode(), "meta", "audit_head"
        )
        self._queue(
            ("meta", "audit_head"),
            lambda c: c.execute("INSERT OR REPLACE INTO meta VALUES ('audit_head', ?)", (head,)),
        )
        self._flush()
        return row.seq

    def audit_rows(self) -> Iterator[AuditRow]:
        """The written audit rows, oldest first."""
        for r in self._conn.execute(_AUDIT_ALL):
            yield AuditRow(*r)

    def verify_audit(self) -> AuditVerdict:
        """Check the chain (D32): numbering, each ``prev``, events, and the sealed head."""
        expected_prev = GENESIS_HASH
        n = 0
        try:
            for row in self.audit_rows():
                n += 1
                if row.seq != n:
                    return AuditVerdict(False, n - 1, n, f"row numbered {row.seq} (rows missing)")
                if row.prev != expected_prev:
                    return AuditVerdict(
                        False, n - 1, n,
                        f"previous-row hash does not match row {n - 1} "
                        "(a row edited, deleted or reordered)",
                    )  # fmt: skip
                if row.event not in AuditEvent.__members__.values():
                    return AuditVerdict(False, n - 1, n, f"unknown event {row.event!r}")
                expected_prev = audit_hash(row)
            head = self._conn.execute("SELECT value FROM meta WHERE name='audit_head'").fetchone()
        except sqlite3.Error as e:
            return AuditVerdict(False, n, n + 1, f"unreadable: {_sqlite_reason(e)}")
        sealed: list[object] = [0, GENESIS_HASH]
        if head is not None:
            opened = self._sealer.open(head[0], "meta", "audit_head")
            if opened is None:
                return AuditVerdict(False, n, n, "sealed head does not authenticate")
            sealed = json.loads(opened)
        if sealed != [n, expected_prev]:
            return AuditVerdict(
                False, n, n or None,
                f"the sealed head names row {sealed[0]} (rows after {n} deleted, or row "
                f"{n} edited)",
            )  # fmt: skip
        return AuditVerdict(True, n)


@attrs.frozen
class AuditReport:
    """What ``perc kmf audit --state FILE [--verify]`` prints."""

    rows: list[AuditRow]
    verdict: AuditVerdict | None

    @property
    def ok(self) -> bool:
        return self.verdict is None or self.verdict.ok

    def lines(self) -> list[str]:
        out = []
        for r in self.rows:
            fields = [f"{r.seq:>6}", r.time, f"{r.event:<13}", r.conference or "-"]
            for label, value in (
                ("name", r.name),
                ("fp", r.fingerprint),
                ("assoc", r.association_id),
                ("spi", r.spi),
                ("mdd", r.mdd_fingerprint),
            ):
                if value is not None:
                    fields.append(f"{label}={value}")
            out.append(" ".join(fields))
        if self.verdict is not None:
            out.append(str(self.verdict))
        return out


def audit_report(
    path: str | os.PathLike[str], key_path: str | os.PathLike[str], verify: bool = True
) -> AuditReport:
    """Read (and with ``verify`` check) the audit log of a state file, read-only.

    Works while the KMF runs (WAL readers do not block the writer). Raises StateError.
    The key file must exist: a report never creates one.
    """
    if not Path(key_path).exists():
        raise StateError(f"state key {key_path}: no such file")
    key = load_state_key(key_path)
    with KmfState(path, key, read_only=True, persist_keys=False) as state:
        rows = list(state.audit_rows())
        verdict = state.verify_audit() if verify else None
    return AuditReport(rows, verdict)
