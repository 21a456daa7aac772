"""``perc demo``: a whole PERC conference on this machine, checked end to end.

Theory of operation
-------------------
The demo is an orchestrator: it runs no protocol code itself. It makes throwaway identities
and config files in a temporary folder (a KMF whose conference roster lists every
participant, rekey on join and on leave; an MDD with one UDP port and a tunnel to the KMF),
then starts every role as a separate process through the same CLI a user runs
(``sys.executable -m perc kmf|mdd|endpoint ...``):

1. ``perc kmf`` and ``perc mdd``; the MDD's TLS tunnel to the KMF comes up (pinned both ways).
2. N ``perc endpoint`` processes, each with ``--media``, ``--expect-peers N-1`` and
   ``--report FILE`` (a JSON report the endpoint rewrites every second and at exit). Each joins
   through the MDD (DTLS-SRTP with the KMF inside the tunnel), gets the conference's EKTKey and
   sends double-encrypted media that the MDD forwards to everyone else, touching only the
   hop-by-hop layer; every receiver verifies every packet end to end.
3. Halfway, the last endpoint gets SIGTERM: it sends RTCP BYE and DTLS close_notify, the KMF
   makes a new EKTKey (RFC 8871 §4.5.2, D22) for the others only, and they switch to it. Then
   a new process with the same identity rejoins; the KMF makes another key, sent to everyone.
4. At the end the endpoints leave (``--duration``), the MDD and the KMF get SIGTERM and log
   their exit counters; the demo judges from the endpoints' reports, the processes' exit
   statuses and their logs.

While it runs, a table (per endpoint: peers verified, packets sent / received / verified,
hop-by-hop and end-to-end failures, current EKT SPI) is redrawn about once a second on a
terminal; without one (CI) the same rows are printed as plain lines.

**Verdict.** Exit 0 only if every endpoint process (the leaver's first life and the rejoined
process included) verified media from every other participant, the others verified the
rejoined process's new streams, no endpoint counted an end-to-end or payload failure, the
leave and the rejoin each produced a new EKTKey that every remaining endpoint switched to,
every process exited 0, and the MDD reported that no end-to-end code was loaded in it.
Otherwise exit 1 with every reason listed. Every end-to-end failure counts, on named streams
and on streams that never verified ("unattributed") alike. What the endpoints' reports keep
apart from failures is shown, not judged: ``pre_join`` (a (re)joiner by design cannot read
media protected under keys from before it joined, RFC 8871 §4.5.2), ``early`` (packets that
overtook the EKT tag announcing their key) and ``key_wait`` (packets that waited for an
EKTKey that arrived late; RFC 8870 §4.3.2 drops them unchecked).

**Robustness.** Every child is reaped on every path (``finally``, shielded from
cancellation): SIGTERM, a grace period, then SIGKILL. Each step has a deadline and the whole
run has one, so the demo never hangs; SIGINT/SIGTERM to the demo stop it the same way
(exit 130). ``--keep`` (or ``PERC_DEMO_KEEP=1``) keeps the folder with the configs, the
reports and each process's log. ``PERC_DEMO_FAULT=outsider`` leaves the first participant's
certificate off the roster: the KMF refuses it (access_denied) and the demo must fail.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

import attrs
import trio

from perc import identity

__all__ = [
    "DEFAULT_DURATION",
    "DEFAULT_MEDIA",
    "DEFAULT_PARTICIPANTS",
    "MEDIA_CHOICES",
    "NAMES",
    "DemoFiles",
    "main",
    "make_demo_files",
]

DEFAULT_PARTICIPANTS = 3
DEFAULT_DURATION = 12.0
DEFAULT_MEDIA = "both"
MEDIA_CHOICES = ("audio", "video", "both")
#: Participant names, in order (one printable word each: they go into key=value log lines).
NAMES = (
    "alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi", "ivan", "judy",
    "kim", "leo", "mallory", "nick", "olivia", "peggy", "quinn", "rupert", "sybil", "trent",
    "uma", "victor", "walter", "xena", "yves", "zoe",
)  # fmt: skip
#: The shortest run in which the leave, the rekey and the rejoin still fit.
MIN_DURATION = 4.0
#: The conference's rekey window (D22): short, so a join takes ~0.2 s, yet a burst of joins
#: (all endpoints start together) still shares one new key.
REKEY_WINDOW = 0.2

#: Deadlines (seconds). A step that takes longer fails the demo with its reason.
START_TIMEOUT = 20.0
"""KMF listening, MDD tunnel up, every endpoint joined (Python start-up on a busy machine)."""
REKEY_TIMEOUT = 5.0
"""After a leave or rejoin: the KMF's new EKTKey and every remaining endpoint on it."""
STOP_GRACE = 5.0
"""After SIGTERM (or after an endpoint's --duration), before SIGKILL."""
MIN_REJOIN_STAY = 3.0
"""The rejoined endpoint stays at least this long (to verify everyone and be verified)."""
OVERALL_SLACK = 90.0
"""The whole run ends by duration + this, whatever happens."""
REFRESH = 1.0
_MEDIA_TEXT = {"audio": "audio", "video": "video", "both": "audio and video"}
"""Seconds between table refreshes."""
_MAX_LOG_LINES = 50_000


@attrs.frozen
class DemoFiles:
    """The temporary folder's contents."""

    folder: Path
    kmf_config: Path
    kmf_fingerprint: str
    mdd_fingerprint: str
    names: tuple[str, ...]
    on_roster: tuple[str, ...]


def make_demo_files(
    folder: Path, names: Sequence[str] = NAMES[:2], *, outsiders: Sequence[str] = ()
) -> DemoFiles:
    """Identities (kmf, mdd, each name) and kmf.toml for one loopback conference.

    Every name is on the conference roster except ``outsiders`` (their certificates exist,
    but the KMF does not know them). The KMF listens on port 0 (the kernel picks a free one:
    no race with other programs); :func:`write_mdd_config` is called once its port is known.
    """
    idents = {name: identity.generate(name) for name in ("kmf", "mdd", *names)}
    for name, ident in idents.items():
        identity.write(ident, folder, name)
    roster = tuple(n for n in names if n not in outsiders)
    participants = ",\n    ".join(f'"{idents[n].fingerprint}",  # {n}' for n in roster)
    kmf_toml = folder / "kmf.toml"
    kmf_toml.write_text(
        f"""# perc demo: the Key Distributor (throwaway identities, loopback only)
[kmf]
listen = "127.0.0.1:0"
cert = "kmf.crt"
key = "kmf.key"
trusted_mdds = ["{idents["mdd"].fingerprint}"]

[[conference]]
id = "demo"
participants = [
    {participants}
]
rekey_on_join = true
rekey_on_leave = true
rekey_window = {REKEY_WINDOW}
"""
    )
    return DemoFiles(
        folder=folder,
        kmf_config=kmf_toml,
        kmf_fingerprint=idents["kmf"].fingerprint,
        mdd_fingerprint=idents["mdd"].fingerprint,
        names=tuple(names),
        on_roster=roster,
    )


def write_mdd_config(files: DemoFiles, kmf_port: int) -> Path:
    """mdd.toml: one conference on a kernel-chosen UDP port, its tunnel to the KMF's port."""
    mdd_toml = files.folder / "mdd.toml"
    mdd_toml.write_text(
        f"""# perc demo: the Media Distributor
[mdd]
cert = "mdd.crt"
key = "mdd.key"
stats_interval = 5.0

[[conference]]
id = "demo"
listen = "127.0.0.1:0"
kmf = "127.0.0.1:{kmf_port}"
kmf_fingerprint = "{files.kmf_fingerprint}"
"""
    )
    return mdd_toml


def _port_after(line: str | None, text: str) -> int | None:
    """The port of the ``host:port`` right after ``text`` in a log line."""
    if line is None:
        return None
    m = re.search(re.escape(text) + r"\s*\S*:(\d+)", line)
    return int(m.group(1)) if m else None


def _fields(line: str) -> dict[str, str]:
    """The ``key=value`` fields of a log line."""
    return dict(re.findall(r"(\w+)=(\S+)", line))


def _latest_spi_line(lines: Sequence[str]) -> str | None:
    return next((x for x in reversed(lines) if "joined name=" in x or "ektkey name=" in x), None)


# --- children ---------------------------------------------------------------------------------


class _Child:
    """One perc process: its merged stdout/stderr is kept (bounded) and written to a log file."""

    def __init__(self, label: str, process: trio.Process, log_path: Path, started: float) -> None:
        self.label = label
        self.process = process
        self.log_path = log_path
        self.started = started
        self.lines: list[str] = []
        self.dropped_lines = 0
        self.eof = trio.Event()

    @property
    def running(self) -> bool:
        return self.process.returncode is None

    @property
    def returncode(self) -> int | None:
        return self.process.returncode

    async def pump(self, changed: Callable[[], None]) -> None:
        stream = self.process.stdout
        try:
            if stream is None:
                return
            pending = b""
            with self.log_path.open("ab") as log:
                async for chunk in stream:
                    log.write(chunk)
                    pending += chunk
                    *complete, pending = pending.split(b"\n")
                    for raw in complete:
                        if len(self.lines) < _MAX_LOG_LINES:
                            self.lines.append(raw.decode(errors="replace"))
                        else:
                            self.dropped_lines += 1
                    changed()
                if pending:
                    self.lines.append(pending.decode(errors="replace"))
        except (trio.ClosedResourceError, trio.BrokenResourceError, OSError):
            pass
        finally:
            self.eof.set()
            changed()

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

    def joined_line(self) -> str | None:
        return self.child.find(f"joined name={self.name} ")

    def current_spi(self) -> int | None:
        line = _latest_spi_line(self.child.lines)
        spi = _fields(line).get("spi") if line else None
        return int(spi) if spi is not None and spi.isdigit() else None

    def read_report(self) -> dict[str, Any] | None:
        try:
            data = json.loads(self.report_path.read_text())
        except (OSError, ValueError):
            return self.report
        if isinstance(data, dict):
            self.report = data
        return self.report


# --- output -----------------------------------------------------------------------------------


class _Screen:
    """Events as lines; the table redrawn in place on a terminal, printed as lines otherwise."""

    def __init__(self, out: TextIO, tty: bool, t0: float) -> None:
        self.out = out
        self.tty = tty
        self.t0 = t0
        self.drawn = 0
        self.rows: list[str] = []
        self.header_shown = False

    def stamp(self) -> str:
        return f"[{time.monotonic() - self.t0:5.1f}s]"

    def _erase(self) -> None:
        if self.drawn:
            # Cursor up to the table's first line, clear to the end of the screen.
            self.out.write(f"\x1b[{self.drawn}F\x1b[J")
            self.drawn = 0

    def _draw(self) -> None:
        for row in self.rows:
            self.out.write(row + "\n")
        self.drawn = len(self.rows)

    def say(self, text: str = "", *, stamp: bool = False) -> None:
        if self.tty:
            self._erase()
        self.out.write((f"{self.stamp()} " if stamp else "") + text + "\n")
        if self.tty:
            self._draw()
        self.out.flush()

    def table(self, rows: list[str]) -> None:
        if self.tty:
            self._erase()
            self.rows = rows
            self._draw()
        else:
            stamp = self.stamp()
            if not self.header_shown:
                self.out.write(f"{' ' * len(stamp)} {rows[0]}\n")
                self.header_shown = True
            for row in rows[1:]:  # the header only once
                self.out.write(f"{stamp} {row}\n")
        self.out.flush()

    def freeze(self) -> None:
        """Leave the last table on the screen; later output goes below it."""
        self.drawn = 0
        self.rows = []


_HEADER = (
    f"{'endpoint':<10} {'state':<9} {'peers':>5} {'sent':>6} {'received':>8} {'verified':>8}"
    f" {'hbh-fail':>8} {'e2e-fail':>8} {'spi':>6}"
)


def _sums(report: dict[str, Any] | None) -> dict[str, int]:
    keys = ("received", "verified", "hbh_failures", "e2e_failures", "payload_failures", "key_wait")
    out = dict.fromkeys((*keys, "key_wait", "unattributed_e2e", "early", "pre_join"), 0)
    if report is None:
        return out
    for peer in _peers(report).values():
        for k in keys:
            out[k] += _int(peer.get(k))
    un = report.get("unattributed")
    if isinstance(un, dict):
        out["unattributed_e2e"] = _int(un.get("e2e_failures"))
        out["key_wait"] += _int(un.get("key_wait"))
        out["early"] = _int(un.get("early"))
        out["pre_join"] = _int(un.get("pre_join"))
    return out


def _int(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _peers(report: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    peers = report.get("peers") if report else None
    if not isinstance(peers, dict):
        return {}
    return {str(k): v for k, v in peers.items() if isinstance(v, dict)}


def _verified_peers(report: dict[str, Any] | None) -> set[str]:
    return {name for name, p in _peers(report).items() if _int(p.get("verified")) > 0}


def _row(ep: _Endpoint, others: int) -> str:
    report = ep.read_report()
    s = _sums(report)
    spi = ep.current_spi()
    if spi is None and report and isinstance(report.get("spis"), list) and report["spis"]:
        spi = _int(report["spis"][-1])
    return (
        f"{ep.label:<10} {ep.state:<9} {len(_verified_peers(report)):>2}/{others:<2} "
        f"{_int(report.get('sent')) if report else 0:>6} {s['received']:>8} {s['verified']:>8} "
        f"{s['hbh_failures']:>8} {s['e2e_failures']:>8} {spi if spi is not None else '-':>6}"
    )


# --- the run ----------------------------------------------------------------------------------


class _Failed(Exception):
    """A step of the demo could not complete; the message says why."""


class _Demo:
    def __init__(self, files: DemoFiles, *, duration: float, media: str, screen: _Screen) -> None:
        self.files = files
        self.duration = duration
        self.media = media
        self.screen = screen
        self.children: list[_Child] = []
        self.endpoints: list[_Endpoint] = []
        self.kmf: _Child | None = None
        self.mdd: _Child | None = None
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
        cmd = [sys.executable, "-m", "perc", "--log-level", "info", *args]
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
        rows = [_HEADER]
        for ep in self.endpoints:
            self._update_state(ep)
        rows += [_row(ep, others) for ep in current.values()]
        self.screen.table(rows)

    def _update_state(self, ep: _Endpoint) -> None:
        code = ep.child.returncode
        if code is None:
            if ep.joined_line() is not None:
                ep.state = "rejoined" if ep.life > 1 else "joined"
        elif ep.state not in ("left", "failed", "done"):
            ep.state = "done" if code == 0 and ep.joined_line() is not None else "failed"

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
        line = await self._wait_line(self.kmf, "KMF listening on", "the KMF did not start")
        kmf_port = _port_after(line, "KMF listening on")
        if kmf_port is None:
            raise _Failed(f"no port in the KMF's log line: {line}")
        roster = ", ".join(f.on_roster) or "nobody"
        say(
            f"KMF listening on 127.0.0.1:{kmf_port} (TLS 1.3 tunnel server; roster of "
            f"conference 'demo': {roster}; new EKTKey on every join and leave)",
            stamp=True,
        )
        self.step = "starting the MDD"
        mdd_config = write_mdd_config(f, kmf_port)
        self.mdd = await self.start(nursery, "mdd", ["mdd", "--config", str(mdd_config)])
        await self._wait_line(self.mdd, "tunnel up", "the MDD's tunnel to the KMF did not come up")
        self.mdd_port = _port_after(self.mdd.find("listening on udp"), "listening on udp")
        if self.mdd_port is None:
            raise _Failed("no UDP port in the MDD's log")
        say(
            f"MDD up: endpoints send to udp 127.0.0.1:{self.mdd_port}; its TLS tunnel to the KMF "
            "is up (each side pinned the other's certificate fingerprint)",
            stamp=True,
        )

        self.step = "joining"
        mark = len(self.kmf.lines)
        for name in f.names:
            stays = name != self.leaver
            await self._start_endpoint(nursery, name, 1, self.duration if stays else None)
        await self._wait_joins(self.endpoints)
        # The stayers leave --duration after their joins: about now + duration.
        end_at = time.monotonic() + self.duration
        spi = await self._same_key("after the joins")
        keys = ", ".join(
            f"SPI {k.get('spi')} ({k.get('reason')}, {_plural(k.get('members'), 'member')})"
            for k in self._kmf_keys(mark)
        )
        joined = [ep.name for ep in self.endpoints if ep.joined_line() is not None]
        if spi is not None:
            say(
                f"KMF EKTKeys so far: {keys}; {_join_names(joined)} hold SPI {spi}",
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
        if leaver.child.running and leaver.joined_line() is not None:
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

    async def _wait_line(self, child: _Child, text: str, failure: str) -> str:
        await self.until(lambda: child.find(text) is not None or not child.running, START_TIMEOUT)
        line = child.find(text)
        if line is None:
            raise _Failed(self._with_cause(failure, child))
        return line

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
        args = [
            "endpoint",
            "--mdd", f"127.0.0.1:{self.mdd_port}",
            "--cert", str(f.folder / f"{name}.crt"),
            "--key", str(f.folder / f"{name}.key"),
            "--kmf-fingerprint", f.kmf_fingerprint,
            "--name", name,
            "--media", self.media,
            "--expect-peers", str(len(f.names) - 1),
            "--report", str(report),
            "--join-timeout", f"{START_TIMEOUT:g}",
        ]  # fmt: skip
        if duration is not None:
            args += ["--duration", f"{duration:.3f}"]
        child = await self.start(nursery, stem, args)
        ep = _Endpoint(name, life, child, report, stays=duration is not None)
        self.endpoints.append(ep)
        return ep

    async def _wait_joins(self, endpoints: list[_Endpoint]) -> None:
        def settled() -> bool:
            return all(ep.joined_line() is not None or not ep.child.running for ep in endpoints)

        await self.until(settled, START_TIMEOUT)
        # In the order they joined (log lines start with an ISO time stamp).
        for ep in sorted(endpoints, key=lambda e: e.joined_line() or "~"):
            line = ep.joined_line()
            self._update_state(ep)
            if line is None:
                why = (
                    f"no join within {START_TIMEOUT:g} s"
                    if ep.child.running
                    else f"exit status {ep.child.returncode}: {ep.child.error_line() or 'no error'}"
                )
                ep.state = "failed"
                self.screen.say(f"{ep.label} did not join: {why}", stamp=True)
                continue
            fl = _fields(line)
            again = " again (a new process, same identity)" if ep.life > 1 else ""
            self.screen.say(
                f"{ep.name} joined{again} in {fl.get('join_ms', '?')} ms: DTLS-SRTP with the "
                f"KMF through the MDD, {fl.get('profile', '?').split('(')[0]}, EKTKey SPI "
                f"{fl.get('spi', '?')}; it sends {_MEDIA_TEXT[self.media]}, double-encrypted",
                stamp=True,
            )

    def _kmf_keys(self, start: int = 0) -> list[dict[str, str]]:
        kmf = self.kmf
        if kmf is None:
            return []
        return [_fields(x) for x in kmf.lines[start:] if "ektkey conference=demo " in x]

    async def _same_key(self, when: str) -> int | None:
        """Wait until every running, joined endpoint holds the KMF's latest EKTKey."""

        def same() -> bool:
            keys = self._kmf_keys()
            if not keys:
                return False
            want = _int_or_none(keys[-1].get("spi"))
            live = [ep for ep in self.endpoints if ep.child.running and ep.joined_line()]
            return bool(live) and all(ep.current_spi() == want for ep in live)

        if not await self.until(same, REKEY_TIMEOUT):
            self._fail(f"the endpoints did not all hold the KMF's latest EKTKey {when}")
            return None
        keys = self._kmf_keys()
        return _int_or_none(keys[-1].get("spi")) if keys else None

    async def _leave_and_rejoin(
        self, nursery: trio.Nursery, leaver: _Endpoint, end_at: float
    ) -> None:
        say = self.screen.say
        kmf = self.kmf
        if kmf is None:  # pragma: no cover - run() starts it first
            raise _Failed("no KMF")
        others = [ep for ep in self.endpoints if ep is not leaver and ep.child.running]
        names = _join_names([ep.name for ep in others])

        # The leave: SIGTERM -> RTCP BYE + close_notify; the KMF rekeys for the others only.
        self.step = f"{leaver.name} leaving"
        mark = len(kmf.lines)
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
        mark = len(kmf.lines)
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
            keys = [k for k in self._kmf_keys(mark) if reason in k.get("reason", "")]
            if not keys:
                return False
            want = _int_or_none(keys[-1].get("spi"))
            live = [ep for ep in holders if ep.child.running]
            return all(ep.current_spi() == want for ep in live)

        ok = await self.until(done, REKEY_TIMEOUT)
        keys = [k for k in self._kmf_keys(mark) if reason in k.get("reason", "")]
        if not keys:
            self._fail(f"the KMF made no new EKTKey for the {reason} within {REKEY_TIMEOUT:g} s")
            return None
        spi = _int_or_none(keys[-1].get("spi"))
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
        order = [c for c in self.children if c not in (self.kmf, self.mdd)]
        order += [c for c in (self.mdd, self.kmf) if c is not None]
        for child in order:
            if child.running:
                await _stop(child)

    def judge(self) -> None:
        """Collect every reason the run is not a success (see the module docstring): one
        line per endpoint process with everything wrong with it, then the rest."""
        names = self.files.names
        rejoined = next((ep for ep in self.endpoints if ep.life > 1), None)
        new_ssrcs = _own_ssrcs(rejoined.report) if rejoined and rejoined.report else set()
        for ep in self.endpoints:
            problems: list[str] = []
            code = ep.child.returncode
            error = _strip_error(ep.child.error_line())
            report = ep.read_report()
            if ep.joined_line() is None:
                problems.append(f"never joined (exit {code}: {error or 'no error line'})")
            else:
                missing = sorted(set(names) - {ep.name} - _verified_peers(report))
                if report is None:
                    problems.append("wrote no report")
                elif missing:
                    problems.append(f"verified no media from {_join_names(missing)}")
                s = _sums(report)
                if s["e2e_failures"] or s["unattributed_e2e"]:
                    problems.append(
                        f"{s['e2e_failures'] + s['unattributed_e2e']} end-to-end failures"
                    )
                if s["payload_failures"]:
                    problems.append(f"{s['payload_failures']} payload failures")
                if rejoined is not None and ep is not rejoined and ep.life == 1 and ep.stays:
                    streams = _peers(report).get(rejoined.name, {}).get("streams", {})
                    got = {
                        str(k) for k, v in streams.items()
                        if isinstance(v, dict) and _int(v.get("verified")) > 0
                    } if isinstance(streams, dict) else set()  # fmt: skip
                    if new_ssrcs - got:
                        problems.append(
                            f"verified nothing from the rejoined {rejoined.name}'s stream(s) "
                            + ", ".join(sorted(new_ssrcs - got))
                        )
                # Exit 8 (too few peers verified) is already said by "verified no media".
                if code not in (0, None) and not (code == 8 and missing):
                    problems.append(f"exit {code}: {error or 'no error line'}")
            if problems:
                self._fail(f"{ep.label}: " + "; ".join(problems))
        first_life = next((ep for ep in self.endpoints if ep.name == self.leaver), None)
        leave_spi = self.rekeys.get("leave")
        if first_life is not None and first_life.report is not None and leave_spi is not None:
            spis = first_life.report.get("spis")
            if isinstance(spis, list) and leave_spi in spis:
                self._fail(f"{self.leaver} left, yet holds the EKTKey made for its leave")
        if not self.interrupted:  # else the run stopped early: no news in these
            if rejoined is None:
                self._fail(f"{self.leaver} never rejoined")
            for what in ("leave", "rejoin"):
                if what not in self.rekeys:
                    self._fail(f"no rekey was seen for the {what}")
        for child in (self.kmf, self.mdd):
            if child is not None and child.returncode not in (0, None):
                self._fail(
                    f"perc {child.label} exited with status {child.returncode}: "
                    f"{_strip_error(child.error_line()) or 'no error line'}"
                )
        if self.mdd is not None:
            isolation = self.mdd.find("key isolation:")
            if isolation is not None and "loaded: none" not in isolation:
                self._fail(f"MDD: {isolation[isolation.index('key isolation:') :]}")

    def summary(self) -> list[str]:
        """What the reports and the MDD's exit log say, for the newcomer."""
        out: list[str] = []
        for ep in self.endpoints:
            report = ep.report
            if ep.joined_line() is None or report is None:
                out.append(f"  {ep.label:<9} never joined")
                continue
            parts = [
                f"{peer} {_int(p.get('verified'))}/{_int(p.get('received'))}"
                for peer, p in sorted(_peers(report).items())
            ]
            s = _sums(report)
            raw_spis = report.get("spis")
            spis = raw_spis if isinstance(raw_spis, list) else []
            extra = ""
            if s["unattributed_e2e"]:
                extra += f"; {s['unattributed_e2e']} e2e failures on streams that never verified"
            if s["key_wait"] or s["early"]:
                extra += (
                    f"; {s['key_wait'] + s['early']} packets arrived before their key did "
                    "(dropped unchecked, RFC 8870 §4.3.2)"
                )
            if s["pre_join"]:
                extra += f"; {s['pre_join']} packets sealed before it joined (unreadable by design)"
            out.append(
                f"  {ep.label:<9} sent {_int(report.get('sent'))}; verified/received from "
                f"{', '.join(parts) or 'nobody'}; failures hbh {s['hbh_failures']} "
                f"e2e {s['e2e_failures']}; SPIs {' > '.join(str(x) for x in spis)}{extra}"
            )
        if self.mdd is not None:
            totals = self.mdd.find("totals conference=demo")
            if totals is not None:
                t = _fields(totals)
                out.append(
                    f"  MDD       forwarded: in {t.get('srtp_in', '?')} SRTP packets, out "
                    f"{t.get('srtp_out', '?')} (one copy per receiver), dropped "
                    f"{t.get('dropped_srtp', '?')}; it held hop-by-hop keys only"
                )
            isolation = self.mdd.find("key isolation:")
            if isolation is not None and "loaded: none" in isolation:
                out.append(
                    "  MDD       no end-to-end code was ever loaded in the MDD process "
                    "(perc.srtp.ekt, perc.srtp.double, AES key wrap): it could not read the media"
                )
        return out


def _own_ssrcs(report: dict[str, Any]) -> set[str]:
    """The SSRCs an endpoint sent on (its 'streams' if it lists them, else its 'ssrc')."""
    streams = report.get("streams")
    out: set[str] = set()
    if isinstance(streams, dict):
        out = {str(s["ssrc"]) for s in streams.values() if isinstance(s, dict) and "ssrc" in s}
    if not out and "ssrc" in report:
        out = {str(report["ssrc"])}
    return out


def _strip_error(line: str | None) -> str | None:
    return line.removeprefix("perc: error:").strip() if line else None


def _plural(count: str | None, word: str) -> str:
    return f"{count} {word}" + ("" if count == "1" else "s")


def _int_or_none(text: str | None) -> int | None:
    return int(text) if text is not None and text.isdigit() else None


def _join_names(names: list[str]) -> str:
    if len(names) <= 1:
        return "".join(names) or "nobody"
    return ", ".join(names[:-1]) + " and " + names[-1]


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
    problem = _check_arguments(participants, duration, media, fault)
    if problem is not None:
        print(f"perc: error: {problem}", file=sys.stderr)
        return 2
    names = NAMES[:participants]
    outsiders = names[:1] if fault == "outsider" else ()
    tty = out.isatty() and os.environ.get("TERM", "") != "dumb"
    screen = _Screen(out, tty, time.monotonic())
    say = screen.say
    say(
        f"perc demo: a PERC conference (RFC 8871) on this machine: one KMF (key distributor), "
        f"one MDD (media distributor), {participants} endpoints ({_join_names(list(names))}) "
        f"sending {_MEDIA_TEXT[media]} for {duration:g} s; {names[-1]} leaves halfway and rejoins."
    )
    folder = Path(tempfile.mkdtemp(prefix="perc-demo-"))
    try:
        files = make_demo_files(folder, names, outsiders=outsiders)
        say(
            f"throwaway identities and configs in {folder}: kmf.toml, mdd.toml, "
            f"{', '.join(f'{n}.crt' for n in ('kmf', 'mdd', *names))}"
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
            say("FAIL: " + demo.failures[0])
            for reason in demo.failures[1:]:
                say("      " + reason)
            for child in demo.children:
                if child.returncode not in (0, None) and not child.error_line():
                    say(f"  last lines of {child.label}'s log:")
                    for line in child.tail(3):
                        say(f"    {line}")
            if not keep:
                say("(to keep the configs, reports and logs, run it again with --keep)")
        else:
            say(
                f"PASS: every endpoint verified every other end to end (the rejoined "
                f"{names[-1]} too), zero end-to-end failures; the leave and the rejoin each "
                f"rekeyed (SPI {demo.rekeys['leave']}, then {demo.rekeys['rejoin']}), every "
                f"remaining endpoint switched, and {names[-1]} never held the key made for its "
                "leave."
            )
        if keep:
            say(f"kept {folder} (configs, identities, reports *.json, logs *.log)")
        if demo.interrupted:
            return 130
        return 1 if demo.failures else 0
    finally:
        if not keep:
            shutil.rmtree(folder, ignore_errors=True)


def _check_arguments(
    participants: int, duration: float, media: str, fault: str | None
) -> str | None:
    if not 2 <= participants <= len(NAMES):
        return f"--participants: a conference here has 2 to {len(NAMES)} participants"
    if not (math.isfinite(duration) and duration >= MIN_DURATION):
        return f"--duration: at least {MIN_DURATION:g} seconds (the leave and rejoin must fit)"
    if media not in MEDIA_CHOICES:
        return f"--media: one of {', '.join(MEDIA_CHOICES)}"
    if fault not in (None, "outsider"):
        return f"PERC_DEMO_FAULT: only 'outsider' is known, not {fault!r}"
    return None


if __name__ == "__main__":
    sys.exit(main())
