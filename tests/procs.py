"""The one harness for tests that run real ``perc`` processes.

:class:`Proc` starts ``python -m perc --log-format json ...`` and keeps what it logs:

* ``events``: the typed events (:mod:`perc.events`) it reported, in order; tests wait on
  these with :meth:`Proc.wait_event`, which is what a program should read;
* ``event_times``: parallel to ``events``, when each was logged (the JSON record's ``ts``,
  the process's own clock, as seconds since the epoch): compare the times of two events with
  these, so that a slow test process does not skew them (:meth:`Proc.time_of`);
* ``lines``: every log record rendered as the human one-line format
  (``<ts> <LEVEL> <logger>: <message>``) plus any non-JSON output (``perc: error:`` lines),
  for :meth:`Proc.wait_for` (a regex) and for failure messages.

Waiting is event-driven: each chunk of output wakes the waiters; there is no polling and no
sleep, and every wait has a deadline so a hang fails the test instead of the suite. Callers
kill and reap what they start (:meth:`Proc.kill_and_reap`); the system fixture does it for
every process of a test.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import trio

from perc import events

#: Upper bound on any single wait (a hang fails the test instead of the suite).
WAIT = 20.0

E = TypeVar("E", bound=events.Event)


class Proc:
    """One perc subprocess and what it logged (stderr) and printed (stdout)."""

    def __init__(self, name: str, process: trio.Process) -> None:
        self.name = name
        self.process = process
        self.lines: list[str] = []
        self.events: list[events.Event] = []
        self.event_times: list[float] = []
        self.stdout = ""
        self._partial = b""
        self.stderr_bytes = 0
        """Bytes of log (stderr) received so far."""
        self._changed = trio.Event()
        self._eof = False

    @classmethod
    async def start(
        cls,
        nursery: trio.Nursery,
        name: str,
        *args: str,
        cwd: Path | None = None,
        env: Mapping[str, str] | None = None,
        debug: bool = True,
    ) -> Proc:
        """Start ``perc [--log-level debug] --log-format json ARGS`` with its output pumped."""
        cmd = [sys.executable, "-m", "perc", "--log-format", "json"]
        if debug:
            cmd += ["--log-level", "debug"]
        environ = dict(os.environ)
        environ.pop("SSLKEYLOGFILE", None)
        environ.update(env or {})
        process = await trio.lowlevel.open_process(
            [*cmd, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=cwd,
            env=environ,
        )
        proc = cls(name, process)
        nursery.start_soon(proc.pump_stderr)
        nursery.start_soon(proc.pump_stdout)
        return proc

    # --- output --------------------------------------------------------------------------------

    def _add_line(self, raw: bytes) -> None:
        line = raw.decode(errors="replace")
        text, event = events.split_record(line)
        self.lines.append(text)
        if event is not None:
            self.events.append(event)
            self.event_times.append(record_time(line))

    async def pump_stderr(self) -> None:
        stream = self.process.stderr
        assert stream is not None
        async for chunk in stream:
            self.stderr_bytes += len(chunk)
            *complete, self._partial = (self._partial + chunk).split(b"\n")
            for raw in complete:
                self._add_line(raw)
            self._wake()
        if self._partial:
            self._add_line(self._partial)
        self._eof = True
        self._wake()

    async def pump_stdout(self) -> None:
        stream = self.process.stdout
        if stream is None:
            return
        async for chunk in stream:
            self.stdout += chunk.decode(errors="replace")

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    @property
    def text(self) -> str:
        return "\n".join(self.lines)

    @property
    def error_line(self) -> str:
        """The last ``perc: error:`` line (what a user sees when the process fails)."""
        errors = [line for line in self.lines if line.startswith("perc: error: ")]
        return errors[-1] if errors else ""

    # --- waiting -------------------------------------------------------------------------------

    async def _wait(self, found: Callable[[], Sequence[Any]], count: int, what: str) -> Any:
        while True:
            items = found()
            if len(items) >= count:
                return items[count - 1]
            if self._eof:
                raise AssertionError(
                    f"perc {self.name} ended (status {self.process.returncode}) before "
                    f"logging {what}:\n{self.text}"
                )
            await self._changed.wait()

    def find(self, pattern: str) -> list[re.Match[str]]:
        """Every match of ``pattern`` (a regex) in the human log, one per line, in order."""
        rx = re.compile(pattern)
        return [m for line in self.lines if (m := rx.search(line)) is not None]

    async def wait_for(self, pattern: str, timeout: float = WAIT, count: int = 1) -> re.Match[str]:
        """The ``count``-th log line matching ``pattern``; fails if the process exits first."""
        with trio.fail_after(timeout):
            match: re.Match[str] = await self._wait(lambda: self.find(pattern), count, pattern)
            return match

    def find_events(
        self, kind: type[E], *, where: Callable[[E], bool] | None = None, **fields: object
    ) -> list[E]:
        """Every event of class ``kind`` whose attributes equal ``fields`` (and for which
        ``where``, if given, is true), in order."""
        return [
            e
            for e in self.events
            if isinstance(e, kind)
            and all(getattr(e, k) == v for k, v in fields.items())
            and (where is None or where(e))
        ]

    async def wait_event(
        self,
        kind: type[E],
        timeout: float = WAIT,
        count: int = 1,
        *,
        where: Callable[[E], bool] | None = None,
        **fields: object,
    ) -> E:
        """The ``count``-th event of class ``kind`` matching ``fields`` and ``where``."""
        what = f"{kind.kind or kind.__name__} {fields}" + (" (and a condition)" if where else "")
        with trio.fail_after(timeout):
            event: E = await self._wait(
                lambda: self.find_events(kind, where=where, **fields), count, what
            )
            return event

    def time_of(self, event: events.Event) -> float:
        """When ``event`` (one of :attr:`events`, the object itself) was logged: seconds since
        the epoch by the process's clock."""
        for e, t in zip(self.events, self.event_times, strict=True):
            if e is event:
                return t
        raise AssertionError(f"{event!r} is not an event of perc {self.name}")

    async def wait_exit(self, timeout: float = WAIT) -> int:
        with trio.fail_after(timeout):
            code = await self.process.wait()
            while not self._eof:
                await self._changed.wait()
            return code

    # --- control -------------------------------------------------------------------------------

    def signal(self, signum: int) -> None:
        if self.process.returncode is None:
            self.process.send_signal(signum)

    async def kill_and_reap(self, timeout: float = WAIT) -> None:
        """Kill the process if it still runs and wait for it (shielded from cancellation)."""
        with trio.CancelScope(shield=True):
            if self.process.returncode is None:
                self.process.kill()
            with trio.move_on_after(timeout):
                await self.process.wait()


def record_time(line: str) -> float:
    """The ``ts`` of one ``--log-format json`` record (perc.logsetup: UTC, milliseconds) as
    seconds since the epoch."""
    stamp = json.loads(line)["ts"]
    when = datetime.datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S.%fZ")
    return when.replace(tzinfo=datetime.UTC).timestamp()
