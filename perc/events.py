"""Typed events shared by every role: what programs read, where people read log lines.

Theory of operation
-------------------
A role reports something a program may act on (an association was created, an endpoint
joined, a key changed, a process is listening on a port) as an :class:`Event`: a frozen attrs
class with a registered ``kind``. :func:`emit` logs it through the standard ``logging``
machinery:

* with the human format (the default, ``--log-format human``) the record is one short line,
  the event's :meth:`Event.describe` text, as before;
* with ``--log-format json`` every record is one JSON object per line (see
  :class:`perc.logsetup.JsonFormatter`); a record made by :func:`emit` carries ``"event":
  kind`` and ``"data": {...}`` with the event's fields, turned into JSON by cattrs.

Programs (``perc demo``, the tests, operator tools) run the roles with ``--log-format json``
and read events back with :func:`parse_line`, which turns a JSON line into the same attrs
class again. The text of a human log line is for people only and may change at any time.

Every event class lives in this module, so that a reader of a log needs only this module to
parse it. Adding a field with a default is compatible; renaming or removing one is not.
"""

from __future__ import annotations

import json
import logging
import uuid
from typing import Any, ClassVar, TypeVar

import attrs
import cattrs

__all__ = [
    "Event",
    "EventError",
    "emit",
    "event_kinds",
    "from_json",
    "parse_line",
    "register",
    "to_json",
]

#: The ``extra`` key under which :func:`emit` attaches the event to a log record.
RECORD_KEY = "perc_event"

_converter = cattrs.Converter()
_converter.register_unstructure_hook(uuid.UUID, str)
_converter.register_structure_hook(uuid.UUID, lambda v, _: uuid.UUID(str(v)))
_converter.register_unstructure_hook(bytes, lambda b: b.hex())
_converter.register_structure_hook(bytes, lambda v, _: bytes.fromhex(str(v)))

_KINDS: dict[str, type[Event]] = {}

E = TypeVar("E", bound="Event")


class EventError(Exception):
    """A JSON event line that does not parse into its registered class."""


@attrs.frozen
class Event:
    """Base of every event. Subclasses set ``kind`` and are decorated with :func:`register`."""

    kind: ClassVar[str] = ""

    def describe(self) -> str:
        """The human log line: ``kind key=value ...`` unless a subclass says it better."""
        fields = " ".join(
            f"{k}={v}" for k, v in to_json(self)["data"].items() if v is not None and v != ""
        )
        return f"{self.kind.replace('_', ' ')} {fields}".rstrip()


def register(cls: type[E]) -> type[E]:
    """Class decorator: make ``cls`` known to :func:`parse_line` under ``cls.kind``."""
    if not cls.kind:
        raise TypeError(f"{cls.__name__} has no kind")
    known = _KINDS.get(cls.kind)
    if known is not None and known is not cls:
        raise TypeError(f"event kind {cls.kind!r} registered twice")
    _KINDS[cls.kind] = cls
    return cls


def event_kinds() -> dict[str, type[Event]]:
    """Every registered kind and its class."""
    return dict(_KINDS)


def to_json(event: Event) -> dict[str, Any]:
    """``{"event": kind, "data": {field: value}}`` with JSON-safe values."""
    return {"event": event.kind, "data": _converter.unstructure(event)}


def from_json(obj: dict[str, Any]) -> Event:
    """The event a :func:`to_json` object (or a JSON log record) describes."""
    kind = obj.get("event")
    cls = _KINDS.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise EventError(f"unknown event kind {kind!r}")
    try:
        return _converter.structure(obj.get("data") or {}, cls)
    except Exception as e:  # cattrs raises its own exception groups
        raise EventError(f"event {kind!r} does not parse: {e}") from None


def parse_line(line: str) -> Event | None:
    """The event in one ``--log-format json`` line, or None for any other line.

    A plain log record (no ``event`` key), a human-format line or a partial line gives None;
    a line naming a known kind with fields that do not fit raises :class:`EventError`.
    """
    line = line.strip()
    if not line.startswith("{"):
        return None
    try:
        obj = json.loads(line)
    except ValueError:
        return None
    if not isinstance(obj, dict) or "event" not in obj:
        return None
    return from_json(obj)


def emit(logger: logging.Logger, event: Event, level: int = logging.INFO) -> None:
    """Log ``event``: its :meth:`~Event.describe` text for people, its fields for programs."""
    if logger.isEnabledFor(level):
        logger.log(level, "%s", event.describe(), extra={RECORD_KEY: event})


# --- process events (every role) ----------------------------------------------------------------


@register
@attrs.frozen
class Listening(Event):
    """A role bound a socket: ``what`` is e.g. ``tunnel``, ``conference``, ``metrics``."""

    kind: ClassVar[str] = "listening"
    what: str
    host: str
    port: int
    conference: str | None = None


# --- MDD events ---------------------------------------------------------------------------------
# (the MDD engine's events: association created / keyed / expired / dropped, tunnel up/down,
# counters)


# --- KMF events ---------------------------------------------------------------------------------
# (the KMF engine's events: joined, left, denied with reason, rekeyed, tunnel up/down)


# --- endpoint events ----------------------------------------------------------------------------
# (the endpoint's events: joined, ektkey, rekey, media summary, report written)
