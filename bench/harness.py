"""The one harness every benchmark in bench/ uses: options, the machine line, timing, output.

A bench script puts the repository on ``sys.path`` and imports this module (bench/ is already
on ``sys.path`` when a script in it runs):

    parser = harness.parser(__doc__, repeats=7, check=True)   # --quick, --repeats R, --check
    parser.add_argument("--packets", type=int, default=20000)
    args = harness.parse(parser, argv, quick={"packets": 50})  # --quick: these defaults
    harness.print_machine()                                    # "# machine: <cpu>, N cores ..."
    best = harness.best_of({"ours": f1, "baseline": f2}, args.repeats)   # seconds, alternating
    table = harness.Table(("row", "<20"), ("us", ">8.3f"), ("ratio", ">6.2f"))
    table.header()
    table.row("protect", harness.us_per(best["ours"], n), best["ours"] / best["baseline"])
    harness.ratio("perc", "pylibsrtp", best["ours"] / best["baseline"], at_most=1.3)

Common options: ``--quick`` (tiny parameters: every bench finishes in seconds; the smoke tests
in tests/bench run each bench this way, so a broken bench fails the test suite; the numbers
mean nothing), ``--repeats R`` (best of R timed runs) and ``--check`` (exit 1 if a target is
missed) where the bench has them. Explicit options win over the ``--quick`` values.

Timing (:func:`time_once`, :func:`best_of`): a *factory* builds fresh state (sessions, input
packets; both SRTP implementations refuse to protect an index twice, so state cannot be
reused) and returns a zero-argument *runner*; only the runner is timed, with
``time.perf_counter`` and the garbage collector off. :func:`best_of` runs the factories in
turn, ``repeats`` rounds, and keeps each one's minimum: load from other programs on a shared
machine then falls on every row alike, and the minimum is the run it disturbed least.

Output: :class:`Table` prints aligned columns from format specs; :func:`ratio` prints the line
``ratio X / Y  N.NN`` (optionally with the target and a verdict) that the smoke tests and
readers look for.

Role processes: :func:`start_roles` writes throwaway identities and kmf.toml / mdd.toml for one
conference and starts a real ``perc kmf`` and ``perc mdd`` (:class:`RoleProcess`, the commands
a user runs) on loopback; :func:`cpu_seconds` reads a process's CPU time.
"""

from __future__ import annotations

import argparse
import atexit
import gc
import os
import platform
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from perc import identity

Runner = Callable[[], object]
Factory = Callable[[], Runner]

# --- options -------------------------------------------------------------------------------------


def parser(
    doc: str | None, *, repeats: int | None = None, check: bool = False
) -> argparse.ArgumentParser:
    """An ArgumentParser described by the first line of ``doc`` with the common options:
    ``--quick`` always, ``--repeats R`` (default ``repeats``) if given, ``--check`` if asked."""
    p = argparse.ArgumentParser(description=next(iter((doc or "").strip().splitlines()), ""))
    p.add_argument(
        "--quick",
        action="store_true",
        help="tiny parameters (a smoke run that finishes in seconds; the numbers mean nothing)",
    )
    if repeats is not None:
        p.add_argument("--repeats", type=int, default=repeats, help="best of R timed runs")
    if check:
        p.add_argument("--check", action="store_true", help="exit 1 if a row misses its target")
    return p


def parse(
    p: argparse.ArgumentParser,
    argv: Sequence[str] | None = None,
    *,
    quick: Mapping[str, object] | None = None,
) -> argparse.Namespace:
    """Parse ``argv``; with ``--quick`` the ``quick`` values replace the defaults (options given
    explicitly still win), and ``repeats`` becomes 1 unless ``quick`` says otherwise."""
    args = p.parse_args(argv)
    if args.quick:
        tiny: dict[str, object] = {"repeats": 1} if hasattr(args, "repeats") else {}
        tiny.update(quick or {})
        p.set_defaults(**tiny)
        args = p.parse_args(argv)
    return args


# --- the machine ---------------------------------------------------------------------------------


def machine() -> str:
    """CPU model (from /proc/cpuinfo), cores this process may use, Python and OS."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return (
        f"{model}, {cores} cores, Python {platform.python_version()} "
        f"({platform.python_implementation()}), {platform.system()}"
    )


def print_machine() -> None:
    """The line every bench prints first: ``# machine: <cpu>, N cores, Python x.y.z ...``;
    at exit a last line says how busy the machine was meanwhile (:func:`machine_load`)."""
    print(f"# machine: {machine()}", flush=True)
    start = _cpu_times()
    atexit.register(lambda: print(machine_load(start), flush=True))


def _cpu_times() -> list[int]:
    """The host's CPU time counters (``/proc/stat``'s ``cpu`` line; empty elsewhere)."""
    try:
        with open("/proc/stat") as f:
            return [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return []


def machine_load(start: list[int]) -> str:
    """``# load: ...``: the load average now and the share of CPU time the hypervisor gave to
    other guests since ``start`` (*steal*, the 8th counter of ``/proc/stat``). On a virtual
    machine whose neighbours are busy, steal makes every timing of the run slower by about
    that much, and unevenly: compare runs only when it is low."""
    now = _cpu_times()
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    if len(start) < 8 or len(now) < 8:
        return f"# load: load average {load}"
    delta = [b - a for a, b in zip(start, now, strict=False)]
    total = sum(delta[:8]) or 1
    return f"# load: load average {load}; CPU steal during the run {100 * delta[7] / total:.1f}%"


# --- timing --------------------------------------------------------------------------------------


def time_once(factory: Factory) -> float:
    """Seconds the runner ``factory()`` takes, garbage collector off (building it untimed)."""
    runner = factory()
    gc.collect()
    gc.disable()
    try:
        t0 = time.perf_counter()
        runner()
        return time.perf_counter() - t0
    finally:
        gc.enable()


def best_of(factories: Mapping[str, Factory], repeats: int) -> dict[str, float]:
    """Best (minimum) seconds of each factory's runner over ``repeats`` rounds; within a round
    the factories run in the order given, so every row sees the same machine load."""
    best = dict.fromkeys(factories, float("inf"))
    for _ in range(max(1, repeats)):
        for name, factory in factories.items():
            best[name] = min(best[name], time_once(factory))
    return best


def us_per(seconds: float, ops: int) -> float:
    """Microseconds per operation."""
    return seconds / ops * 1e6 if ops else float("nan")


def per_second(seconds: float, ops: int) -> float:
    """Operations per second."""
    return ops / seconds if seconds > 0 else float("nan")


# --- output --------------------------------------------------------------------------------------

_WIDTH = re.compile(r"^(?:.?[<>^])?(\d+)")


class Table:
    """Aligned columns: each ``(title, spec)``, ``spec`` a format spec such as ``"<34"`` or
    ``">9,.0f"``; the title takes the spec's alignment and width. A cell that does not fit its
    column's number format (``"-"``, a verdict) is printed as text in the same width."""

    def __init__(self, *columns: tuple[str, str], sep: str = " ") -> None:
        self.columns = columns
        self.sep = sep

    def _plain(self, spec: str) -> str:
        m = _WIDTH.match(spec)
        align = "<" if spec.startswith("<") else ">"
        return f"{align}{m.group(1)}" if m else ""

    def header(self) -> None:
        """The titles and a rule under them."""
        line = self.sep.join(
            format(title, self._plain(spec)) for title, spec in self.columns
        ).rstrip()
        print(line)
        print("-" * len(line), flush=True)

    def row(self, *cells: object) -> None:
        """One line; extra cells (past the last column) are appended as text."""
        out = []
        for i, cell in enumerate(cells):
            if i >= len(self.columns):
                out.append(str(cell))
                continue
            spec = self.columns[i][1]
            try:
                out.append(format(cell, spec))
            except (TypeError, ValueError):
                out.append(format(str(cell), self._plain(spec)))
        print(self.sep.join(out).rstrip(), flush=True)


def ratio(
    ours: str,
    baseline: str,
    value: float,
    *,
    at_most: float | None = None,
    at_least: float | None = None,
    note: str = "",
) -> bool:
    """Print ``ratio OURS / BASELINE  N.NN`` (with the target and met/MISSED if one is given,
    then ``note``); returns whether the target is met (True without a target)."""
    line = f"ratio {ours} / {baseline}  {value:.2f}"
    ok = True
    if at_most is not None:
        ok = value <= at_most
        line += f"  (target <= {at_most:g}: {'met' if ok else 'MISSED'})"
    elif at_least is not None:
        ok = value >= at_least
        line += f"  (target >= {at_least:g}: {'met' if ok else 'MISSED'})"
    if note:
        line += f"  {note}"
    print(line, flush=True)
    return ok


# --- role processes ------------------------------------------------------------------------------


def cpu_seconds(pid: int | None = None) -> float:
    """User + system CPU seconds of process ``pid`` (Linux /proc), or of this process."""
    if pid is None:
        t = os.times()
        return t.user + t.system
    return sum(cpu_times(pid))


def cpu_times(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of process ``pid`` (Linux /proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


class RoleProcess:
    """A ``python -m perc ROLE ...`` subprocess in ``folder`` with its log in ``NAME.log``;
    ``profile``: run it under cProfile, statistics to ``NAME.prof``; ``log_level``: perc's
    ``--log-level`` (None: perc's default); ``log_format``: perc's ``--log-format`` ("json":
    one event per line, :mod:`perc.events`)."""

    def __init__(
        self,
        name: str,
        args: Sequence[str],
        folder: Path,
        *,
        profile: bool = False,
        log_level: str | None = None,
        log_format: str | None = None,
    ) -> None:
        self.name = name
        self.log = folder / f"{name}.log"
        self.profile = folder / f"{name}.prof" if profile else None
        prefix = ["-m", "cProfile", "-o", str(self.profile)] if self.profile else []
        level = ["--log-level", log_level] if log_level else []
        if log_format:
            level += ["--log-format", log_format]
        self._log = self.log.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, *prefix, "-m", "perc", *level, *args],
            cwd=folder,
            stdout=subprocess.DEVNULL,
            stderr=self._log,
            env={k: v for k, v in os.environ.items() if k != "SSLKEYLOGFILE"},
        )

    @property
    def pid(self) -> int:
        return self.process.pid

    def wait_for(self, pattern: str, timeout: float = 20.0) -> re.Match[str]:
        """The first match of the regular expression ``pattern`` in the log, polled until it
        appears; RuntimeError with the log's tail if the process exits or ``timeout`` passes."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = rx.search(self.log.read_text(errors="replace"))
            if m is not None:
                return m
            if self.process.poll() is not None:
                break
            time.sleep(0.02)
        tail = self.log.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"perc {self.name} did not log {pattern!r}:\n{tail}")

    def stop(self) -> int:
        """SIGTERM, then SIGKILL after 10 s; the exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = self.process.wait()
        self._log.close()
        return code


LOCAL = "127.0.0.1"


@dataclass
class PercRoles:
    """A running ``perc kmf`` and ``perc mdd`` serving one conference (:func:`start_roles`)."""

    kmf: RoleProcess
    mdd: RoleProcess
    #: The conference's UDP address at the MDD (where endpoints send).
    mdd_address: tuple[str, int]
    kmf_fingerprint: str

    def stop(self) -> tuple[int, int]:
        """Stop both (the MDD first); their exit statuses (kmf, mdd)."""
        mdd = self.mdd.stop()
        return self.kmf.stop(), mdd


def start_roles(
    folder: Path,
    participants: Sequence[str],
    *,
    conference: str,
    rekey: bool = False,
    idle_timeout: float | None = None,
    profile: str | None = None,
    log_level: str | None = None,
    log_format: str | None = None,
    rekey_window: float | None = None,
    mdd_extra: str = "",
    kmf_extra: str = "",
) -> PercRoles:
    """New KMF and MDD identities, kmf.toml and mdd.toml in ``folder``; start ``perc kmf``, then
    ``perc mdd`` once the KMF's port is known; return when the MDD's tunnel is up.

    ``participants``: the roster's certificate fingerprints; ``rekey``: the conference rekeys on
    join and leave; ``idle_timeout``: the MDD's (None: perc's default); ``profile``: "kmf" or
    "mdd" runs that role under cProfile; ``log_level``, ``log_format``: both roles'
    ``--log-level`` and ``--log-format``; ``rekey_window``: the conference's (None: perc's
    default, D22); ``mdd_extra``: more lines for the MDD's ``[mdd]`` table; ``kmf_extra``:
    more ``[kmf]`` lines (e.g. ``persist_keys = false``).
    """
    kmf_id, mdd_id = identity.generate("kmf"), identity.generate("mdd")
    identity.write(kmf_id, folder, "kmf")
    identity.write(mdd_id, folder, "mdd")
    roster = ", ".join(f'"{fp}"' for fp in participants)
    policy = "" if rekey else "rekey_on_join = false\nrekey_on_leave = false\n"
    if rekey_window is not None:
        policy += f"rekey_window = {rekey_window}\n"
    (folder / "kmf.toml").write_text(
        f'[kmf]\nlisten = "{LOCAL}:0"\ncert = "kmf.crt"\nkey = "kmf.key"\n'
        f'trusted_mdds = ["{mdd_id.fingerprint}"]\n{kmf_extra}\n'
        f'[[conference]]\nid = "{conference}"\nparticipants = [{roster}]\n{policy}'
    )
    kmf = RoleProcess(
        "kmf",
        ["kmf", "--config", "kmf.toml"],
        folder,
        profile=profile == "kmf",
        log_level=log_level,
        log_format=log_format,
    )
    try:
        kmf_port = int(kmf.wait_for(r"KMF listening on \S+:(\d+)").group(1))
        idle = "" if idle_timeout is None else f"idle_timeout = {idle_timeout}\n"
        (folder / "mdd.toml").write_text(
            f'[mdd]\ncert = "mdd.crt"\nkey = "mdd.key"\n{idle}{mdd_extra}\n'
            f'[[conference]]\nid = "{conference}"\nlisten = "{LOCAL}:0"\n'
            f'kmf = "{LOCAL}:{kmf_port}"\nkmf_fingerprint = "{kmf_id.fingerprint}"\n'
        )
        mdd = RoleProcess(
            "mdd",
            ["mdd", "--config", "mdd.toml"],
            folder,
            profile=profile == "mdd",
            log_level=log_level,
            log_format=log_format,
        )
        try:
            udp_port = int(mdd.wait_for(r"listening on udp \S+:(\d+)").group(1))
            mdd.wait_for(f"tunnel up conference={re.escape(conference)}")
        except BaseException:
            mdd.stop()
            raise
    except BaseException:
        kmf.stop()
        raise
    return PercRoles(kmf, mdd, (LOCAL, udp_port), kmf_id.fingerprint)
