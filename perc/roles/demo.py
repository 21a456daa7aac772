"""``perc demo``'s processes: start the roles, follow their logs, stop them, show the result.

The plan, the files and the settings are :mod:`perc.demo`; the table, the summary and the
verdict are :mod:`perc.demo_report`. This module runs the children (``sys.executable -m perc
...``) under trio, reads their logs and reports, and reaps every child on every path
(``finally``, shielded from cancellation): SIGTERM, a grace period, then SIGKILL.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO, TypeVar

import attrs
import trio

from perc import events
from perc.demo import (
    DEFAULT_DURATION,
    DEFAULT_MEDIA,
    DEFAULT_PARTICIPANTS,
    MEDIA_CHOICES,
    MEDIA_TEXT,
    MIN_REJOIN_STAY,
    NAMES,
    OVERALL_SLACK,
    REFRESH,
    REKEY_TIMEOUT,
    START_TIMEOUT,
    STOP_GRACE,
    DemoFiles,
    check_arguments,
    endpoint_arguments,
    join_names,
    make_demo_files,
    write_mdd_config,
)
from perc.demo_report import (
    HEADER,
    HEADER_MDD,
    EndpointOutcome,
    RoleOutcome,
    Screen,
    endpoint_summary,
    fail_lines,
    pass_line,
    plural,
    strip_error,
    table_row,
    verdict,
)

__all__ = [
    "DEFAULT_DURATION",
    "DEFAULT_MEDIA",
    "DEFAULT_PARTICIPANTS",
    "MEDIA_CHOICES",
    "NAMES",
    "DemoFiles",
    "main",
    "make_demo_files",
    "write_mdd_config",
]

_MAX_LOG_LINES = 50_000
E = TypeVar("E", bound=events.Event)


# --- children ---------------------------------------------------------------------------------


class _Child:
    """One perc process: its merged stdout/stderr is kept (bounded) and written to a log file."""

    def __init__(self, label: str, process: trio.Process, log_path: Path, started: float) -> None:
        self.label = label
        self.process = process
        self.log_path = log_path
        self.started = started
        self.lines: list[str] = []
        self.events: list[events.Event] = []
        self.dropped_lines = 0
        self.eof = trio.Event()

    @property
    def running(self) -> bool:
        return self.process.returncode is None

    @property
    def returncode(self) -> int | None:
        return self.process.returncode

    async def pump(self, changed: Callable[[], None]) -> None:
        """Read the child's JSON log: keep its events, write its human lines to the log file."""
        stream = self.process.stdout
        try:
            if stream is None:
                return
            pending = b""
            with self.log_path.open("a", encoding="utf-8") as log:
                async for chunk in stream:
                    pending += chunk
                    *complete, pending = pending.split(b"\n")
                    for raw in complete:
                        self._add(raw, log)
                    changed()
                if pending:
                    self._add(pending, log)
        except (trio.ClosedResourceError, trio.BrokenResourceError, OSError):
            pass
        finally:
            self.eof.set()
            changed()

    def _add(self, raw: bytes, log: TextIO) -> None:
        try:
            text, event = events.split_record(raw.decode(errors="replace"))
        except events.EventError as e:
            text, event = f"(unreadable event: {e})", None
        log.write(text + "\n")
        if event is not None and len(self.events) < _MAX_LOG_LINES:
            self.events.append(event)
        if len(self.lines) < _MAX_LOG_LINES:
            self.lines.append(text)
        else:
            self.dropped_lines += 1

    def last_event(self, kind: type[E], **fields: object) -> E | None:
        """The latest event of class ``kind`` whose attributes equal ``fields``."""
        return next(
            (
                e
                for e in reversed(self.events)
                if isinstance(e, kind) and all(getattr(e, k) == v for k, v in fields.items())
            ),
            None,
        )

    def find(self, text: str, start: int = 0) -> str | None:
        """The first log line from index ``start`` on that contains ``text``."""
        return next((x for x in self.lines[start:] if text in x), None)

    def error_line(self) -> str | None:
        """The ``perc: error:`` line a failed perc process prints."""
        line = self.find("perc: error:")
        return line[line.index("perc: error:") :] if line else None

    def tail(self, n: int = 4) -> list[str]:
        return self.lines[-n:]


@attrs.define
class _Endpoint:
    """One endpoint *process* (a rejoin is a new one with the same name)."""

    name: str
    life: int
    child: _Child
    report_path: Path
    stays: bool
    """Leaves by itself (--duration); False: the demo sends SIGTERM."""
    state: str = "joining"
    report: dict[str, Any] | None = None

    @property
    def label(self) -> str:
        return self.name if self.life == 1 else f"{self.name}#{self.life}"

    def joined(self) -> events.EndpointJoined | None:
        return self.child.last_event(events.EndpointJoined, name=self.name)

    def current_spi(self) -> int | None:
        """The SPI of the EKTKey it uses now (its join's, or its latest rekey's)."""
        for e in reversed(self.child.events):
            if isinstance(e, events.EndpointJoined | events.EndpointEktKey):
                return e.spi
        return None

    def read_report(self) -> dict[str, Any] | None:
        try:
            data = json.loads(self.report_path.read_text())
        except (OSError, ValueError):
            return self.report
        if isinstance(data, dict):
            self.report = data
        return self.report


# --- the run ----------------------------------------------------------------------------------


class _Failed(Exception):
    """A step of the demo could not complete; the message says why."""


class _Demo:
    def __init__(self, files: DemoFiles, *, duration: float, media: str, screen: Screen) -> None:
        self.files = files
        self.duration = duration
        self.media = media
        self.screen = screen
        self.children: list[_Child] = []
        self.endpoints: list[_Endpoint] = []
        self.kmf: _Child | None = None
        self.mdd: _Child | None = None
        #: every MDD, in chain order (``--mdds``; the first is ``mdd``), and their UDP ports
        self.mdds: list[_Child] = []
        self.mdd_ports: list[int] = []
        self.failures: list[str] = []
        self.step = "starting"
        self.interrupted = False
        self._changed = trio.Event()
        self.refresher = trio.CancelScope()
        self.mdd_port: int | None = None
        self.leaver = files.names[-1]
        self.rekeys: dict[str, int] = {}
        """'leave' / 'rejoin' -> the SPI of the KMF's new EKTKey."""

    # --- plumbing -------------------------------------------------------------------------

    def changed(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def until(self, ready: Callable[[], bool], timeout: float) -> bool:
        """Wait until ``ready()`` (checked on every log line and child exit, and every 0.2 s)."""
        with trio.move_on_after(timeout):
            while not ready():
                with trio.move_on_after(0.2):
                    await self._changed.wait()
            return True
        return ready()

    async def start(self, nursery: trio.Nursery, label: str, args: list[str]) -> _Child:
        cmd = [sys.executable, "-m", "perc", "--log-level", "info", "--log-format", "json", *args]
        process = await trio.lowlevel.open_process(
            cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        child = _Child(label, process, self.files.folder / f"{label}.log", time.monotonic())
        self.children.append(child)
        nursery.start_soon(child.pump, self.changed)
        nursery.start_soon(self._watch_exit, child)
        return child

    async def _watch_exit(self, child: _Child) -> None:
        await child.process.wait()
        self.changed()

    def refresh(self) -> None:
        others = len(self.files.names) - 1
        current: dict[str, _Endpoint] = {ep.name: ep for ep in self.endpoints}
        chain = len(self.mdds) > 1
        rows = [HEADER_MDD if chain else HEADER]
        for ep in self.endpoints:
            self._update_state(ep)
        mdd_names = self.files.mdd_names
        rows += [
            table_row(
                ep.label, ep.state, ep.read_report(), ep.current_spi(), others,
                mdd=mdd_names[self.files.mdd_of(ep.name)] if chain else None,
            )
            for ep in current.values()
        ]  # fmt: skip
        self.screen.table(rows)

    def _update_state(self, ep: _Endpoint) -> None:
        code = ep.child.returncode
        if code is None:
            if ep.joined() is not None:
                ep.state = "rejoined" if ep.life > 1 else "joined"
        elif ep.state not in ("left", "failed", "done"):
            ep.state = "done" if code == 0 and ep.joined() is not None else "failed"

    async def _refresher(self, scope: trio.CancelScope) -> None:
        with scope:
            while True:
                await trio.sleep(REFRESH)
                self.refresh()

    # --- steps ----------------------------------------------------------------------------

    async def run(self, nursery: trio.Nursery) -> None:
        f = self.files
        say = self.screen.say
        self.step = "starting the KMF"
        self.kmf = await self.start(nursery, "kmf", ["kmf", "--config", str(f.kmf_config)])
        listening = await self._wait_event(
            self.kmf, events.Listening, "the KMF did not start", what="tunnel"
        )
        kmf_port = listening.port
        roster = ", ".join(f.on_roster) or "nobody"
        say(
            f"KMF listening on 127.0.0.1:{kmf_port} (TLS 1.3 tunnel server; roster of "
            f"conference 'demo': {roster}; new EKTKey on every join and leave)",
            stamp=True,
        )
        await self._start_mdds(nursery, kmf_port)

        self.step = "joining"
        mark = len(self.kmf.events)
        for name in f.names:
            stays = name != self.leaver
            await self._start_endpoint(nursery, name, 1, self.duration if stays else None)
        await self._wait_joins(self.endpoints)
        # The stayers leave --duration after their joins: about now + duration.
        end_at = time.monotonic() + self.duration
        spi = await self._same_key("after the joins")
        keys = ", ".join(
            f"SPI {k.spi} ({k.reason}, {plural(k.members, 'member')})" for k in self._kmf_keys(mark)
        )
        joined = [ep.name for ep in self.endpoints if ep.joined() is not None]
        if spi is not None:
            say(
                f"KMF EKTKeys so far: {keys}; {join_names(joined)} hold SPI {spi}",
                stamp=True,
            )
        say(
            "the table: peers = participants whose media this endpoint verified end to end; "
            "sent/received/verified = RTP packets; hbh-fail/e2e-fail = packets that failed the "
            "hop-by-hop (MDD) or end-to-end (sender's) check; spi = the EKTKey it uses now"
        )
        nursery.start_soon(self._refresher, self.refresher)

        self.step = "talking"
        half = end_at - self.duration / 2
        await trio.sleep_until(_trio_time(half))
        leaver = next(ep for ep in self.endpoints if ep.name == self.leaver)
        if leaver.child.running and leaver.joined() is not None:
            await self._leave_and_rejoin(nursery, leaver, end_at)
        else:
            self._fail(f"{self.leaver} was not in the conference at half time: no leave/rejoin")

        self.step = "waiting for the endpoints to finish"
        stayers = [ep for ep in self.endpoints if ep.stays]
        last = max(end_at, *(ep.child.started + self.duration for ep in stayers)) + 2.0
        if not await self.until(
            lambda: all(not ep.child.running for ep in stayers),
            max(0.0, last - time.monotonic()) + START_TIMEOUT,
        ):
            self._fail("some endpoints did not leave after --duration: stopped them")
        for ep in stayers:
            self._update_state(ep)
        self.refresh()
        self.refresher.cancel()
        done = ", ".join(f"{ep.label} (exit {ep.child.returncode})" for ep in stayers)
        say(
            f"endpoints left after their --duration (BYE, close_notify; each leave rekeyed "
            f"those still there): {done}",
            stamp=True,
        )

    async def _start_mdds(self, nursery: trio.Nursery, kmf_port: int) -> None:
        """One MDD, or ``--mdds`` of them in a chain joined by cascade links (D25)."""
        f = self.files
        say = self.screen.say
        names = f.mdd_names
        chain = len(names) > 1
        ports = _free_udp_ports(len(names)) if chain else []
        for i, name in enumerate(names):
            self.step = f"starting {name}"
            config = write_mdd_config(f, kmf_port, i, ports)
            child = await self.start(nursery, name, ["mdd", "--config", str(config)])
            self.mdds.append(child)
        self.mdd = self.mdds[0]
        for child in self.mdds:
            await self._wait_event(
                child, events.MddTunnelUp, f"{child.label}'s tunnel to the KMF did not come up"
            )
            udp = child.last_event(events.Listening, what="conference")
            if udp is None:
                raise _Failed(f"{child.label} did not say which UDP port it listens on")
            self.mdd_ports.append(udp.port)
        self.mdd_port = self.mdd_ports[0]
        if not chain:
            say(
                f"MDD up: endpoints send to udp 127.0.0.1:{self.mdd_port}; its TLS tunnel to "
                "the KMF is up (each side pinned the other's certificate fingerprint)",
                stamp=True,
            )
            return
        self.step = "linking the MDDs"
        for i, child in enumerate(self.mdds):
            neighbours = (i > 0) + (i < len(self.mdds) - 1)

            def linked(c: _Child = child, n: int = neighbours) -> bool:
                return sum(1 for e in c.events if isinstance(e, events.LinkUp)) >= n

            def settled(c: _Child = child) -> bool:
                return linked(c) or not c.running

            await self.until(settled, START_TIMEOUT)
            if not linked():
                why = f"{child.label}'s cascade links did not come up"
                raise _Failed(self._with_cause(why, child))
        hops = " - ".join(f"{n} (udp {p})" for n, p in zip(names, self.mdd_ports, strict=True))
        say(
            f"{len(names)} MDDs up, each with its TLS tunnel to the KMF, chained by cascade "
            f"links (DTLS-SRTP between MDDs, certificates pinned; the KMF never sees their "
            f"keys): {hops}",
            stamp=True,
        )

    async def _wait_event(self, child: _Child, kind: type[E], failure: str, **fields: object) -> E:
        def seen() -> bool:
            return child.last_event(kind, **fields) is not None or not child.running

        await self.until(seen, START_TIMEOUT)
        event = child.last_event(kind, **fields)
        if event is None:
            raise _Failed(self._with_cause(failure, child))
        return event

    def _with_cause(self, text: str, child: _Child) -> str:
        if child.running:
            return f"{text} within {START_TIMEOUT:g} s"
        why = child.error_line() or " | ".join(child.tail(2)) or "no output"
        return f"{text}: exit status {child.returncode}: {why}"

    async def _start_endpoint(
        self, nursery: trio.Nursery, name: str, life: int, duration: float | None
    ) -> _Endpoint:
        f = self.files
        stem = name if life == 1 else f"{name}-{life}"
        report = f.folder / f"{stem}.json"
        args = endpoint_arguments(
            f,
            name,
            mdd_port=self.mdd_ports[f.mdd_of(name)] if self.mdd_ports else 0,
            media=self.media,
            report=report,
            duration=duration,
        )
        child = await self.start(nursery, stem, args)
        ep = _Endpoint(name, life, child, report, stays=duration is not None)
        self.endpoints.append(ep)
        return ep

    async def _wait_joins(self, endpoints: list[_Endpoint]) -> None:
        def settled() -> bool:
            return all(ep.joined() is not None or not ep.child.running for ep in endpoints)

        await self.until(settled, START_TIMEOUT)

        def joined_at(ep: _Endpoint) -> float:
            j = ep.joined()
            return ep.child.started + j.join_ms / 1000 if j is not None else float("inf")

        # In the order they joined.
        for ep in sorted(endpoints, key=joined_at):
            joined = ep.joined()
            self._update_state(ep)
            if joined is None:
                why = (
                    f"no join within {START_TIMEOUT:g} s"
                    if ep.child.running
                    else f"exit status {ep.child.returncode}: {ep.child.error_line() or 'no error'}"
                )
                ep.state = "failed"
                self.screen.say(f"{ep.label} did not join: {why}", stamp=True)
                continue
            again = " again (a new process, same identity)" if ep.life > 1 else ""
            self.screen.say(
                f"{ep.name} joined{again} in {joined.join_ms:.1f} ms: DTLS-SRTP with the "
                f"KMF through the MDD, {joined.profile_name}, EKTKey SPI "
                f"{joined.spi}; it sends {MEDIA_TEXT[self.media]}, double-encrypted",
                stamp=True,
            )

    def _kmf_keys(self, start: int = 0) -> list[events.Rekeyed]:
        """The KMF's new EKTKeys for the demo conference, from its event ``start`` on."""
        kmf = self.kmf
        if kmf is None:
            return []
        keys = kmf.events[start:]
        return [e for e in keys if isinstance(e, events.Rekeyed) and e.conference == "demo"]

    async def _same_key(self, when: str) -> int | None:
        """Wait until every running, joined endpoint holds the KMF's latest EKTKey."""

        def same() -> bool:
            keys = self._kmf_keys()
            if not keys:
                return False
            want = keys[-1].spi
            live = [ep for ep in self.endpoints if ep.child.running and ep.joined()]
            return bool(live) and all(ep.current_spi() == want for ep in live)

        if not await self.until(same, REKEY_TIMEOUT):
            self._fail(f"the endpoints did not all hold the KMF's latest EKTKey {when}")
            return None
        keys = self._kmf_keys()
        return keys[-1].spi if keys else None

    async def _leave_and_rejoin(
        self, nursery: trio.Nursery, leaver: _Endpoint, end_at: float
    ) -> None:
        say = self.screen.say
        kmf = self.kmf
        if kmf is None:  # pragma: no cover - run() starts it first
            raise _Failed("no KMF")
        others = [ep for ep in self.endpoints if ep is not leaver and ep.child.running]
        names = join_names([ep.name for ep in others])

        # The leave: SIGTERM -> RTCP BYE + close_notify; the KMF rekeys for the others only.
        self.step = f"{leaver.name} leaving"
        mark = len(kmf.events)
        say(f"{leaver.name} leaves (SIGTERM: RTCP BYE, then DTLS close_notify)", stamp=True)
        left_at = time.monotonic()
        code = await _stop(leaver.child)
        leaver.state = "left"
        say(f"{leaver.name}'s process exited with status {code}", stamp=True)
        spi = await self._new_key(mark, others, "leave")
        if spi is not None:
            self.rekeys["leave"] = spi
            say(
                f"KMF rekey after the leave: new EKTKey SPI {spi}, sent to {names} only, who "
                f"switched to it within {time.monotonic() - left_at:.1f} s (what they send from "
                f"now on, {leaver.name}'s keys cannot read)",
                stamp=True,
            )

        # The rejoin: a new process with the same identity.
        self.step = f"{leaver.name} rejoining"
        mark = len(kmf.events)
        stay = max(MIN_REJOIN_STAY, end_at - time.monotonic())
        say(f"{leaver.name} rejoins: a new process with the same identity", stamp=True)
        again = await self._start_endpoint(nursery, leaver.name, 2, stay)
        await self._wait_joins([again])
        spi = await self._new_key(mark, [*others, again], "join")
        if spi is not None:
            self.rekeys["rejoin"] = spi
            say(
                f"KMF rekey for the rejoin: new EKTKey SPI {spi}; {leaver.name} (its first key: "
                f"never one that protected earlier media) and {names} are all on it",
                stamp=True,
            )

    async def _new_key(self, mark: int, holders: list[_Endpoint], reason: str) -> int | None:
        """The KMF's next EKTKey after log line ``mark`` (for ``reason``), once ``holders``
        (those still running) all hold it."""

        def done() -> bool:
            keys = [k for k in self._kmf_keys(mark) if reason in k.reason]
            if not keys:
                return False
            want = keys[-1].spi
            live = [ep for ep in holders if ep.child.running]
            return all(ep.current_spi() == want for ep in live)

        ok = await self.until(done, REKEY_TIMEOUT)
        keys = [k for k in self._kmf_keys(mark) if reason in k.reason]
        if not keys:
            self._fail(f"the KMF made no new EKTKey for the {reason} within {REKEY_TIMEOUT:g} s")
            return None
        spi = keys[-1].spi
        if not ok:
            late = [
                f"{ep.label} (spi {ep.current_spi()})"
                for ep in holders
                if ep.child.running and ep.current_spi() != spi
            ]
            self._fail(
                f"after the {reason}, not every endpoint switched to the KMF's new SPI {spi} "
                f"within {REKEY_TIMEOUT:g} s: {', '.join(late)}"
            )
            return None
        return spi

    def _fail(self, reason: str) -> None:
        if reason not in self.failures:
            self.failures.append(reason)

    # --- the end --------------------------------------------------------------------------

    async def stop_all(self) -> None:
        """SIGTERM every child still running, endpoints first, then the MDD, then the KMF."""
        order = [c for c in self.children if c is not self.kmf and c not in self.mdds]
        order += [*self.mdds, *([self.kmf] if self.kmf is not None else [])]
        for child in order:
            if child.running:
                await _stop(child)

    def outcomes(self) -> list[EndpointOutcome]:
        """What each endpoint process's log, exit status and report say, for the verdict."""
        return [
            EndpointOutcome(
                name=ep.name,
                life=ep.life,
                stays=ep.stays,
                joined=ep.joined() is not None,
                exit_code=ep.child.returncode,
                error=strip_error(ep.child.error_line()),
                report=ep.read_report(),
            )
            for ep in self.endpoints
        ]

    def judge(self) -> None:
        """Collect every reason the run is not a success (:func:`perc.demo_report.verdict`)."""
        roles = [
            RoleOutcome(c.label, c.returncode, strip_error(c.error_line()))
            for c in (self.kmf, *self.mdds)
            if c is not None
        ]
        isolation = self._isolation()
        for reason in verdict(
            self.files.names,
            self.outcomes(),
            leaver=self.leaver,
            rekeys=self.rekeys,
            interrupted=self.interrupted,
            roles=roles,
            isolation=isolation,
        ):
            self._fail(reason)

    def _isolation(self) -> str | None:
        """The MDD's key-isolation report as text (``... loaded: none``), None if not seen."""
        reports = [c.last_event(events.KeyIsolation) for c in self.mdds]
        if not reports or any(r is None for r in reports):
            return None
        loaded = sorted({m for r in reports if r is not None for m in r.loaded})
        return f"key isolation: end-to-end modules loaded: {', '.join(loaded) or 'none'}"

    def summary(self) -> list[str]:
        """What the reports and the MDD's exit log say, for the newcomer."""
        out = [endpoint_summary(ep) for ep in self.outcomes()]
        for mdd in self.mdds:
            totals = mdd.last_event(events.MddTotals, conference="demo")
            label = "MDD" if len(self.mdds) == 1 else mdd.label
            if totals is not None:
                t = totals.totals
                out.append(
                    f"  {label:<9} forwarded: in {t.get('srtp_in', '?')} SRTP packets, out "
                    f"{t.get('srtp_out', '?')} (one copy per receiver), dropped "
                    f"{t.get('dropped_srtp', '?')}; it held hop-by-hop keys only"
                )
        if self.mdd is not None:
            isolation = self._isolation()
            if isolation is not None and "loaded: none" in isolation:
                what = "the MDD process" if len(self.mdds) == 1 else "any MDD process"
                out.append(
                    f"  MDD       no end-to-end code was ever loaded in {what} "
                    "(perc.srtp.ekt, perc.srtp.double, AES key wrap): it could not read the media"
                )
        return out


def _free_udp_ports(count: int) -> list[int]:
    """Ports the kernel reports free on 127.0.0.1 (the chained MDDs must know each other's
    ports before they start; a port taken meanwhile makes that MDD fail with its message)."""
    socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(count)]
    try:
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in socks]
    finally:
        for sock in socks:
            sock.close()


def _trio_time(monotonic: float) -> float:
    """A time.monotonic() instant as trio's clock (the same clock, different origin)."""
    return trio.current_time() + (monotonic - time.monotonic())


async def _stop(child: _Child) -> int:
    """SIGTERM, wait STOP_GRACE, then SIGKILL; the exit status (-9 when killed).
    Shielded: it runs to the end even while the demo is being cancelled."""
    code: int | None = None
    with trio.CancelScope(shield=True):
        if child.running:
            try:
                child.process.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
        with trio.move_on_after(STOP_GRACE):
            code = await child.process.wait()
        if code is None:
            child.process.kill()
            code = await child.process.wait()
    return -1 if code is None else code


async def _watch_signals(demo: _Demo, scope: trio.CancelScope) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            demo.interrupted = True
            demo._fail(f"interrupted by {signal.Signals(signum).name} while {demo.step}")
            scope.cancel()
            return


async def _main(demo: _Demo) -> None:
    overall = demo.duration + OVERALL_SLACK
    # The nursery holds the log pumps, the exit watchers, the table refresher and the signal
    # watcher; only demo.run() is under the deadline, so the pumps keep reading while the
    # children are stopped (their exit logs: MDD totals and key isolation).
    async with trio.open_nursery() as nursery:
        run_scope = trio.CancelScope(deadline=trio.current_time() + overall)
        nursery.start_soon(_watch_signals, demo, run_scope)
        try:
            with run_scope:
                await demo.run(nursery)
            if run_scope.cancelled_caught and not demo.interrupted:
                demo._fail(f"the demo did not finish within {overall:g} s (while {demo.step})")
        except _Failed as e:
            demo._fail(str(e))
        finally:
            demo.refresher.cancel()
            with trio.CancelScope(shield=True):
                await demo.stop_all()
                for child in demo.children:
                    # The rest of the log (the MDD's totals, ...), then close the pipe.
                    with trio.move_on_after(2.0):
                        await child.eof.wait()
                    if child.process.stdout is not None:
                        await child.process.stdout.aclose()
            nursery.cancel_scope.cancel()


def main(
    participants: int = DEFAULT_PARTICIPANTS,
    duration: float = DEFAULT_DURATION,
    media: str = DEFAULT_MEDIA,
    *,
    mdds: int = 1,
    keep: bool | None = None,
    fault: str | None = None,
    out: TextIO | None = None,
) -> int:
    """Run the demo; 0 if every endpoint verified every other (see the module docstring)."""
    out = out if out is not None else sys.stdout
    if keep is None:
        keep = os.environ.get("PERC_DEMO_KEEP", "") not in ("", "0")
    if fault is None:
        fault = os.environ.get("PERC_DEMO_FAULT") or None
    problem = check_arguments(participants, duration, media, fault, mdds)
    if problem is not None:
        print(f"perc: error: {problem}", file=sys.stderr)
        return 2
    names = NAMES[:participants]
    outsiders = names[:1] if fault == "outsider" else ()
    tty = out.isatty() and os.environ.get("TERM", "") != "dumb"
    screen = Screen(out, tty, time.monotonic())
    say = screen.say
    say(
        "perc demo: a PERC conference (RFC 8871) on this machine: one KMF (key distributor), "
        + (
            "one MDD (media distributor), "
            if mdds == 1
            else f"{mdds} MDDs (media distributors) in a chain of cascade links, "
        )
        + f"{participants} endpoints ({join_names(list(names))}) "
        f"sending {MEDIA_TEXT[media]} for {duration:g} s; {names[-1]} leaves halfway and rejoins."
    )
    folder = Path(tempfile.mkdtemp(prefix="perc-demo-"))
    try:
        files = make_demo_files(folder, names, outsiders=outsiders, mdds=mdds)
        say(
            f"throwaway identities and configs in {folder}: kmf.toml, mdd.toml, "
            f"{', '.join(f'{n}.crt' for n in ('kmf', *files.mdd_names, *names))}"
        )
        if outsiders:
            say(
                f"fault injected (PERC_DEMO_FAULT=outsider): {outsiders[0]}'s certificate is "
                "NOT on the KMF's roster"
            )
        demo = _Demo(files, duration=duration, media=media, screen=screen)
        trio.run(_main, demo)
        screen.freeze()
        demo.judge()
        say()
        say("what each endpoint verified end to end (from its --report):")
        for line in demo.summary():
            say(line)
        say()
        if demo.failures:
            for line in fail_lines(demo.failures):
                say(line)
            for child in demo.children:
                if child.returncode not in (0, None) and not child.error_line():
                    say(f"  last lines of {child.label}'s log:")
                    for line in child.tail(3):
                        say(f"    {line}")
            if not keep:
                say("(to keep the configs, reports and logs, run it again with --keep)")
        else:
            say(pass_line(names[-1], demo.rekeys))
        if keep:
            say(f"kept {folder} (configs, identities, reports *.json, logs *.log)")
        if demo.interrupted:
            return 130
        return 1 if demo.failures else 0
    finally:
        if not keep:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
