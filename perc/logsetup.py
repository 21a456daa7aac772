"""Logging for the perc processes: one line per event on stderr.

Roles log with ``logging.getLogger(__name__)`` and put the context of an event in the
message as ``key=value`` pairs (``conference=demo association=<uuid> peer=<host:port>``;
:func:`kv` formats them). :func:`setup` installs a formatter that keeps every record on one
line: newlines inside a message and a traceback's lines are folded into it, so that a log
can be read with ``grep`` and tests can wait for a line.

Line format: ``2026-11-27T11:50:00.123Z INFO perc.roles.mdd: tunnel up conference=demo ...``
"""

from __future__ import annotations

import datetime
import logging
import sys
from typing import TextIO

#: The ``--log-level`` choices, most verbose first.
LEVELS = ("debug", "info", "warning", "error")
#: The level when ``--log-level`` is not given.
DEFAULT_LEVEL = "info"


class OneLineFormatter(logging.Formatter):
    """UTC timestamp, level, logger name, message; never more than one line per record."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = datetime.datetime.fromtimestamp(record.created, datetime.UTC)
        text = (
            f"{stamp:%Y-%m-%dT%H:%M:%S}.{int(record.msecs):03d}Z "
            f"{record.levelname} {record.name}: {record.getMessage()}"
        )
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            text += " | " + record.exc_text
        if record.stack_info:
            text += " | " + self.formatStack(record.stack_info)
        return text.replace("\r", "").replace("\n", " | ")


def kv(**fields: object) -> str:
    """``key=value`` pairs for a log message, in the order given; ``None`` values left out."""
    return " ".join(f"{k}={v}" for k, v in fields.items() if v is not None)


def setup(level: str = DEFAULT_LEVEL, stream: TextIO | None = None) -> None:
    """Send perc's log records of ``level`` and above to ``stream`` (default stderr).

    Replaces handlers installed by an earlier call, so calling it twice is harmless.
    """
    if level.lower() not in LEVELS:
        raise ValueError(f"log level must be one of {', '.join(LEVELS)}, not {level!r}")
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(OneLineFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        if getattr(old, "_perc_handler", False):
            root.removeHandler(old)
    handler._perc_handler = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level.upper())
