"""The admin protocol of the KMF and the MDD (D33), sans-IO: lines in, typed requests, lines out.

Theory of operation
-------------------
An operator tool talks to a running KMF or MDD over a Unix socket (:mod:`perc.roles.admin`
owns the socket; the file's mode 0600 is the access control). The protocol is JSON lines,
one object per line each way:

* request ``{"op": OP, ...fields}``; answer ``{"ok": true, ...}`` or
  ``{"ok": false, "error": "one line"}``;
* a line that is not JSON, not an object, names no or an unknown op, has a field of the wrong
  type or a field the op does not take is answered with an error and the connection stays
  open; so is an unknown conference or member (the role's answer);
* a line longer than :data:`MAX_LINE` (64 KiB) without its newline gets an error and the
  connection is closed (:class:`LineBuffer` raises :class:`LineTooLong`): the reader never
  buffers more than that.

Operations (D33). KMF: ``conferences``, ``members`` (conference), ``kick`` (conference, who,
ban), ``roster_add`` (conference, fingerprint, name), ``roster_remove`` (conference,
fingerprint), ``rekey`` (conference), ``audit`` (verify, limit). MDD: ``status``, ``links``
(conference). The answers are built field by field from counters and identities: no answer
carries key material (the KMF engine hands out one-way digests at most).

The KMF engine runs its requests (:meth:`perc.kmf.KmfEngine.admin_answer`); ``audit`` needs
the state file and is the shell's (:func:`audit_answer`). :func:`render` turns an answer into the
plain table ``perc admin`` prints (``--json`` prints the answer itself).

API::

    MAX_LINE; AdminError (one line); LineTooLong(AdminError)
    LineBuffer().feed(chunk) -> [bytes]            # complete lines, LineTooLong past MAX_LINE
    parse_request(line, ops=None) -> Request        # AdminError for anything malformed
    request_line(op, **fields) -> bytes             # what the client sends
    ok_line(**fields) -> bytes; error_line(text) -> bytes
    parse_answer(line: bytes) -> dict               # AdminError if not an answer object
    audit_answer(request, state) -> dict            # audit (blocking: SQLite)
    render(op, answer) -> [str]                     # human table lines
    check_socket_path(path) -> bool                 # True: a socket file is there (stale?)
    Conferences, Members, Kick, RosterAdd, RosterRemove, Rekey, Audit, Status, Links
"""

from __future__ import annotations

import json
import os
import stat
from collections import deque
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs

from perc.config import one_line

if TYPE_CHECKING:
    from perc.state import KmfState

__all__ = [
    "KMF_OPS",
    "MAX_LINE",
    "MDD_OPS",
    "AdminError",
    "Audit",
    "Conferences",
    "Kick",
    "LineBuffer",
    "LineTooLong",
    "Links",
    "Members",
    "Rekey",
    "Request",
    "RosterAdd",
    "RosterRemove",
    "Status",
    "audit_answer",
    "check_socket_path",
    "error_line",
    "ok_line",
    "parse_answer",
    "parse_request",
    "render",
    "request_line",
]

#: Longest request or answer line read (bytes, without its newline).
MAX_LINE = 64 * 1024
#: Longest path a Unix socket can bind (sun_path is 108 bytes with its NUL on Linux).
MAX_SOCKET_PATH = 107
#: Audit rows an ``audit`` answer carries by default (the newest).
AUDIT_ROWS = 100


class AdminError(Exception):
    """A request that cannot be served; its text (one line) is the answer's ``error``."""

    def __init__(self, message: str) -> None:
        super().__init__(one_line(message))


class LineTooLong(AdminError):
    """More than :data:`MAX_LINE` bytes without a newline: answered, then the connection ends."""


class LineBuffer:
    """Splits a byte stream into lines; holds at most :data:`MAX_LINE` bytes of a partial one."""

    def __init__(self, limit: int = MAX_LINE) -> None:
        self.limit = limit
        self._partial = b""

    def feed(self, chunk: bytes) -> list[bytes]:
        *lines, self._partial = (self._partial + chunk).split(b"\n")
        if len(self._partial) > self.limit or any(len(line) > self.limit for line in lines):
            self._partial = b""
            raise LineTooLong(f"line longer than {self.limit} bytes: closing the connection")
        return [line for line in lines if line.strip()]


# --- requests ------------------------------------------------------------------------------------


@attrs.frozen
class Conferences:
    op = "conferences"


@attrs.frozen
class Members:
    conference: str
    op = "members"


@attrs.frozen
class Kick:
    conference: str
    who: str
    ban: bool = False
    op = "kick"


@attrs.frozen
class RosterAdd:
    conference: str
    fingerprint: str
    name: str | None = None
    op = "roster_add"


@attrs.frozen
class RosterRemove:
    conference: str
    fingerprint: str
    op = "roster_remove"


@attrs.frozen
class Rekey:
    conference: str
    op = "rekey"


@attrs.frozen
class Audit:
    verify: bool = False
    limit: int = AUDIT_ROWS
    op = "audit"


@attrs.frozen
class Status:
    op = "status"


@attrs.frozen
class Links:
    conference: str
    op = "links"


Request = Conferences | Members | Kick | RosterAdd | RosterRemove | Rekey | Audit | Status | Links
_CLASSES: tuple[type[Request], ...] = (
    Conferences, Members, Kick, RosterAdd, RosterRemove, Rekey, Audit, Status, Links,
)  # fmt: skip
_BY_OP: dict[str, type[Request]] = {cls.op: cls for cls in _CLASSES}
KMF_OPS = ("conferences", "members", "kick", "roster_add", "roster_remove", "rekey", "audit")
MDD_OPS = ("status", "links")
#: field -> the JSON types it takes (bool is not an int here)
_TYPES: dict[str, tuple[type, ...]] = {
    "conference": (str,),
    "who": (str,),
    "fingerprint": (str,),
    "name": (str, type(None)),
    "ban": (bool,),
    "verify": (bool,),
    "limit": (int,),
}
_TYPE_NAMES = {str: "a string", bool: "true or false", int: "an integer", type(None): "null"}


def parse_request(line: bytes, ops: Sequence[str] | None = None) -> Request:
    """One request line as a typed request; :class:`AdminError` says what is wrong.
    ``ops``: the ops this role serves (others are an error too)."""
    try:
        data = json.loads(line)
    except (ValueError, UnicodeDecodeError) as e:
        raise AdminError(f"malformed request: not JSON ({e})") from None
    if not isinstance(data, dict):
        raise AdminError('malformed request: expected a JSON object {"op": ...}')
    op = data.pop("op", None)
    if not isinstance(op, str):
        raise AdminError('malformed request: no "op" string')
    cls = _BY_OP.get(op)
    if cls is None or (ops is not None and op not in ops):
        known = ", ".join(ops if ops is not None else _BY_OP)
        raise AdminError(f"unknown op {op[:40]!r} here: one of {known}")
    fields = {f.name: f for f in attrs.fields(cls)}
    for key, value in data.items():
        if key not in fields:
            raise AdminError(f"op {op}: unknown field {str(key)[:40]!r}")
        types = _TYPES[key]
        if type(value) not in types:
            want = " or ".join(_TYPE_NAMES[t] for t in types)
            raise AdminError(f"op {op}: field {key!r} must be {want}")
    missing = [n for n, f in fields.items() if f.default is attrs.NOTHING and n not in data]
    if missing:
        raise AdminError(f"op {op}: missing field " + ", ".join(repr(m) for m in missing))
    if isinstance(data.get("limit"), int) and data["limit"] < 0:
        raise AdminError(f"op {op}: field 'limit' must be >= 0")
    return cls(**data)


def _line(obj: Mapping[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8") + b"\n"


def request_line(op: str, **fields: Any) -> bytes:
    """The line a client sends (fields that are None are left out)."""
    return _line({"op": op, **{k: v for k, v in fields.items() if v is not None}})


def ok_line(**fields: Any) -> bytes:
    return _line({"ok": True, **fields})


def error_line(text: str) -> bytes:
    return _line({"ok": False, "error": one_line(text)})


def parse_answer(line: bytes) -> dict[str, Any]:
    """An answer line from a KMF or MDD; AdminError if it is not one."""
    try:
        data = json.loads(line)
    except (ValueError, UnicodeDecodeError) as e:
        raise AdminError(f"malformed answer: not JSON ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("ok"), bool):
        raise AdminError('malformed answer: expected a JSON object with "ok"')
    return data


# --- the KMF's operations ------------------------------------------------------------------------


def audit_answer(request: Audit, state: KmfState) -> dict[str, Any]:
    """``audit``: the newest ``limit`` rows of the state's audit log (D32) and, with
    ``verify``, the chain's verdict. Blocking (SQLite): the shell runs it off the event loop."""
    rows = deque(state.audit_rows(), maxlen=request.limit)
    verdict = state.verify_audit() if request.verify else None
    return {
        "rows": [attrs.asdict(r) for r in rows],
        "total": state.audit_seq,
        "verdict": None if verdict is None else {**attrs.asdict(verdict), "text": str(verdict)},
    }


# --- the socket's path ---------------------------------------------------------------------------


def check_socket_path(path: Path) -> bool:
    """D33: may an admin socket be created at ``path``? True if a socket file is already
    there (the caller checks that nobody listens on it, then replaces it).

    AdminError (one line) when the path is too long for a Unix socket, its folder does not
    exist or others can write to it (they could put their own socket in its place), or
    something that is not a socket is there."""
    size = len(os.fsencode(path))
    if size > MAX_SOCKET_PATH:
        raise AdminError(
            f"admin socket {path}: path too long for a Unix socket "
            f"({size} bytes, at most {MAX_SOCKET_PATH})"
        )
    folder = path.parent
    try:
        info = folder.stat()
    except OSError as e:
        raise AdminError(f"admin socket {path}: folder {folder}: {e.strerror or e}") from None
    if not stat.S_ISDIR(info.st_mode):
        raise AdminError(f"admin socket {path}: {folder} is not a folder")
    if info.st_mode & stat.S_IWOTH:
        raise AdminError(
            f"admin socket {path}: others can write to its folder {folder} "
            f"(mode {stat.S_IMODE(info.st_mode):04o}); use a folder only its owner can write"
        )
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return False
    except OSError as e:
        raise AdminError(f"admin socket {path}: {e.strerror or e}") from None
    if not stat.S_ISSOCK(mode):
        raise AdminError(f"admin socket {path}: exists and is not a socket; not replacing it")
    return True


# --- human tables --------------------------------------------------------------------------------


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.1f}"
    return one_line(str(value))


def table(head: Sequence[str], rows: Sequence[Sequence[object]]) -> list[str]:
    """Plain aligned columns (two spaces apart), a header line first."""
    cells = [list(head)] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(head))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]


def _rows(items: object, keys: Sequence[str]) -> list[list[object]]:
    if not isinstance(items, list):
        return []
    return [[i.get(k) if isinstance(i, dict) else None for k in keys] for i in items]


def render(op: str, answer: Mapping[str, Any]) -> list[str]:
    """What ``perc admin OP`` prints for a successful answer (plain text)."""
    keys: Sequence[str]
    if op == "conferences":
        keys = ("id", "members", "roster", "spi", "cipher", "rekey_pending")
        return table(keys, _rows(answer.get("conferences"), keys))
    if op == "members":
        keys = ("name", "fingerprint", "association", "spi", "joined_s", "mdd")
        return table(keys, _rows(answer.get("members"), keys))
    if op == "kick":
        keys = ("name", "fingerprint", "association")
        out = table(keys, _rows(answer.get("kicked"), keys))
        out.append(
            f"kicked {len(_rows(answer.get('kicked'), keys))} from {answer.get('conference')}; "
            f"banned: {_cell(answer.get('banned'))}; new spi: {_cell(answer.get('spi'))}"
        )
        return out
    if op in ("roster_add", "roster_remove"):
        verb = "added to" if op == "roster_add" else "removed from"
        return [
            f"{answer.get('fingerprint')} {verb} the roster of {answer.get('conference')}"
            f" (persisted: {_cell(answer.get('persisted'))})"
        ]
    if op == "rekey":
        return [f"conference {answer.get('conference')}: new spi {_cell(answer.get('spi'))}"]
    if op == "audit":
        keys = ("seq", "time", "event", "conference", "name", "fingerprint", "association_id",
                "spi", "mdd_fingerprint")  # fmt: skip
        out = table(keys, _rows(answer.get("rows"), keys))
        verdict = answer.get("verdict")
        if isinstance(verdict, dict):
            out.append(str(verdict.get("text")))
        return out
    if op == "status":
        keys = ("id", "tunnel_up", "associations", "pending", "links")
        out = table(keys, _rows(answer.get("conferences"), keys))
        for conf in answer.get("conferences") or []:
            counters = conf.get("counters") if isinstance(conf, dict) else None
            if isinstance(counters, dict):
                text = " ".join(f"{k}={v}" for k, v in counters.items() if v)
                out.append(f"{conf.get('id')}: {text or 'no counters yet'}")
        return out
    if op == "links":
        links = answer.get("links")
        keys = ("name", "peer", "connect", "state", "profile", "group")
        if not links:
            return ["no links"]
        out = table(keys, _rows(links, keys))
        for link in links if isinstance(links, list) else []:
            counters = link.get("counters") if isinstance(link, dict) else None
            if isinstance(counters, dict):
                text = " ".join(f"{k}={v}" for k, v in counters.items() if v)
                out.append(f"{link.get('name')}: {text or 'no counters yet'}")
        return out
    return [json.dumps(dict(answer))]
