"""Logging for the perc processes: one line per event on stderr.

Roles log with ``logging.getLogger(__name__)`` and put the context of an event in the
message as ``key=value`` pairs (``conference=demo association=<uuid> peer=<host:port>``;
:func:`kv` formats them). :func:`setup` installs a formatter that keeps every record on one
line: newlines inside a message and a traceback's lines are folded into it, so that a log
can be read with ``grep`` and tests can wait for a line.

Line format: ``2026-11-27T11:50:00.123Z INFO perc.roles.mdd: tunnel up conference=demo ...``

``--log-format json`` (:class:`JsonFormatter`) writes one JSON object per record instead:
``{"ts": ..., "level": ..., "logger": ..., "msg": ...}``, plus ``"event"`` and ``"data"`` for a
record made by :func:`perc.events.emit`. Programs read those events with
:func:`perc.events.parse_line`; the human text is not an interface.
"""

from __future__ import annotations

import datetime
import json
import logging
import sys
from typing import Any, TextIO

#: The ``--log-level`` choices, most verbose first.
LEVELS = ("debug", "info", "warning", "error")
#: The level when ``--log-level`` is not given.
DEFAULT_LEVEL = "info"
#: The ``--log-format`` choices.
FORMATS = ("human", "json")
#: The format when ``--log-format`` is not given.
DEFAULT_FORMAT = "human"


#: The ``extra`` key under which :func:`perc.events.emit` attaches an event to a log record.
RECORD_KEY = "perc_event"


def _stamp(record: logging.LogRecord) -> str:
    stamp = datetime.datetime.fromtimestamp(record.created, datetime.UTC)
    return f"{stamp:%Y-%m-%dT%H:%M:%S}.{int(record.msecs):03d}Z"


class OneLineFormatter(logging.Formatter):
    """UTC timestamp, level, logger name, message; never more than one line per record."""

    def format(self, record: logging.LogRecord) -> str:
        text = f"{_stamp(record)} {record.levelname} {record.name}: {record.getMessage()}"
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            text += " | " + record.exc_text
        if record.stack_info:
            text += " | " + self.formatStack(record.stack_info)
        return text.replace("\r", "").replace("\n", " | ")


class JsonFormatter(logging.Formatter):
    """One JSON object per record; an event's kind and fields when it carries one."""

    def format(self, record: logging.LogRecord) -> str:
        obj: dict[str, object] = {
            "ts": _stamp(record),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        # An event (perc.events.emit) knows its JSON form; this module does not import
        # perc.events, which builds on it.
        event = getattr(record, RECORD_KEY, None)
        to_json = getattr(event, "to_json", None)
        if callable(to_json):
            obj.update(to_json())
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            obj["exc"] = record.exc_text
        return json.dumps(obj, separators=(",", ":"))


def kv(**fields: object) -> str:
    """``key=value`` pairs for a log message, in the order given; ``None`` values left out."""
    return " ".join(f"{k}={v}" for k, v in fields.items() if v is not None)


def setup(
    level: str = DEFAULT_LEVEL, stream: TextIO | None = None, fmt: str = DEFAULT_FORMAT
) -> None:
    """Send perc's log records of ``level`` and above to ``stream`` (default stderr).

    ``fmt`` is ``human`` (one line per record) or ``json`` (one JSON object per record).

    Replaces handlers installed by an earlier call, so calling it twice is harmless.
    """
    if level.lower() not in LEVELS:
        raise ValueError(f"log level must be one of {', '.join(LEVELS)}, not {level!r}")
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else OneLineFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        if getattr(old, "_perc_handler", False):
            root.removeHandler(old)
    handler._perc_handler = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level.upper())


def format_address(addr: Any) -> str:
    """``host:port`` for a socket address tuple (``[v6]:port`` for IPv6)."""
    if isinstance(addr, tuple) and len(addr) >= 2:
        host, port = addr[0], addr[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(addr)
