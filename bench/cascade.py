"""One conference over several MDD processes: ``perc mdd --workers 1`` vs ``--workers 2``, and
the latency a cascade link adds (D25-D27), real processes, same run.

Run: ``.venv/bin/python bench/cascade.py`` (or ``bash dev.sh bench cascade``).
Options: ``--seconds S`` per step (default 2), ``--senders K`` (4), ``--receivers R`` (10:
R + 1 endpoints), ``--size B`` (RTP payload bytes, 160), ``--rates 2000,4000,...`` (offered
packets/s per step), ``--size-start N`` (20), ``--size-step N`` (10), ``--size-max N`` (90),
``--size-seconds S`` (2), ``--video-pps P`` (100), ``--video-size B`` (1100),
``--latency-seconds S`` (3), ``--latency-rate P`` (packets/s of the
latency step; default: half the lossless load ``--workers 1`` carried in part a),
``--keep DIR``, ``--quick`` (3 endpoints, one short step each: a smoke run).

What happens (the load generator, the sink and the conference schedules are
bench/forwarding.py's; endpoints join for real through the KMF, so every MDD forwards on its
normal code path):

a. **Cost of splitting.** One KMF; one ``perc mdd`` with ``workers = 1`` and one with
   ``workers = 2`` (a supervisor and two workers sharing the conference port with
   SO_REUSEPORT, linked by their mesh). R + 1 endpoints join each. At every offered rate both
   get the same load in turn; the CPU per delivery is the relay's CPU time (summed over the
   two workers, /proc/<pid>/stat) over the datagrams the sink received; ``of sys`` is its
   kernel part (the system calls; the rest is user time, the relay's own Python). Two
   passes: *a1, floating*, every process free to run on any CPU, once per rate; *a2,
   placed* (``--placed-rounds K``, default 3; skipped on one CPU), the MDDs' processes on
   one CPU and the load generator and the sink on another, so that no instrument shares a
   core with what it measures (as on a machine with cores to spare), K alternating rounds
   over the rates and the median per rate. Target: the two workers together spend at most
   1.15x what one worker spends per delivery, at the highest rate both carried without loss
   (placed medians; floating on a one-CPU machine). Both passes' ratios are printed per rate.
   The load generator and the sink run SCHED_BATCH unless ``--instruments normal`` (see
   bench/forwarding.py).
b. **Largest lossless conference** for 1 and 2 workers (audio 50 pkt/s from everyone, video
   from five, as bench/forwarding.py): N grows by ``--size-step`` until a step misses a packet.
   Part a's ratio is printed again for each size both carried without loss.
c. **Latency per link hop.** Two ``perc mdd`` processes joined by a D25 link (the same
   conference, ``[[conference.link]]`` on both), four endpoints on each; one endpoint on the
   first MDD sends. Every packet reaches a receiver on the same MDD and a receiver across the
   link; the difference of the two arrival times (kernel timestamps), per packet, is what the
   hop added (the second MDD's work and the loopback hop; negative when the first MDD sent
   the link's copy before the local one). p50 and p99 over the step.

Then the per-delivery costs projected to a 4-core machine (two workers on two cores, the load
generator and the sink on the others). On a 2-core machine the two workers, the load
generator and the sink compete for the same cores, so the delivered rates of part b say
little about what two workers carry; their CPU cost per delivery does not depend on that.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import re
import select
import shutil
import socket
import statistics
import struct
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import forwarding as fwd
import harness
from forwarding import Endpoint, Setup, Step
from harness import RoleProcess

from perc import identity

LOCAL = "127.0.0.1"
CONFERENCE = "bench"
TARGET_RATIO = 1.15
TARGET_HOP_P99_MS = 2.0
#: Deliveries per second of a conference of n endpoints (audio from all, video from five).
AUDIO_PPS = 50


# --- processes -------------------------------------------------------------------------------


@dataclass
class Mdd:
    label: str
    process: RoleProcess
    address: tuple[str, int]
    pids: list[int]
    """The processes that forward (the MDD itself, or its workers)."""


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((LOCAL, 0))
        return int(s.getsockname()[1])


def wait_count(proc: RoleProcess, pattern: str, count: int, timeout: float = 60.0) -> list[str]:
    """Until ``pattern`` matched ``count`` lines of the log; the matches' first groups."""
    rx = re.compile(pattern)
    deadline = time.monotonic() + timeout
    while True:
        found = rx.findall(proc.log.read_text(errors="replace"))
        if len(found) >= count:
            return found
        if proc.process.poll() is not None or time.monotonic() > deadline:
            tail = proc.log.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"perc {proc.name}: {count} x {pattern!r} not logged:\n{tail}")
        time.sleep(0.05)


class Roles:
    """Identities, the KMF and the MDD processes of one run (all in ``folder``)."""

    def __init__(self, folder: Path, n_identities: int) -> None:
        self.folder = folder
        self.people = [identity.generate(f"ep{i}") for i in range(n_identities)]
        kmf_id, mdd_id = identity.generate("kmf"), identity.generate("mdd")
        identity.write(kmf_id, folder, "kmf")
        identity.write(mdd_id, folder, "mdd")
        self.kmf_fingerprint = kmf_id.fingerprint
        self.mdd_fingerprint = mdd_id.fingerprint
        roster = ", ".join(f'"{p.fingerprint}"' for p in self.people)
        (folder / "kmf.toml").write_text(
            f'[kmf]\nlisten = "{LOCAL}:0"\ncert = "kmf.crt"\nkey = "kmf.key"\nstate = ""\n'
            f'trusted_mdds = ["{mdd_id.fingerprint}"]\n\n'
            f'[[conference]]\nid = "{CONFERENCE}"\nparticipants = [{roster}]\n'
            "rekey_on_join = false\nrekey_on_leave = false\n"
        )
        self.kmf = RoleProcess("kmf", ["kmf", "--config", "kmf.toml"], folder, log_level="info")
        self.kmf_port = int(self.kmf.wait_for(r"KMF listening on \S+:(\d+)").group(1))
        self.mdds: list[Mdd] = []

    def start_mdd(self, name: str, *, workers: int = 1, port: int = 0, link: str = "") -> Mdd:
        """A ``perc mdd`` with ``workers``; ``link``: a [[conference.link]] table's lines."""
        (self.folder / f"{name}.toml").write_text(
            f'[mdd]\ncert = "mdd.crt"\nkey = "mdd.key"\nidle_timeout = 3600\n'
            f"workers = {workers}\n\n"
            f'[[conference]]\nid = "{CONFERENCE}"\nlisten = "{LOCAL}:{port}"\n'
            f'kmf = "{LOCAL}:{self.kmf_port}"\nkmf_fingerprint = "{self.kmf_fingerprint}"\n'
            + (f"[[conference.link]]\n{link}" if link else "")
        )
        proc = RoleProcess(name, ["mdd", "--config", f"{name}.toml"], self.folder, log_level="info")
        try:
            udp = int(proc.wait_for(r"listening on udp \S+:(\d+)", 60).group(1))
            wait_count(proc, f"tunnel up conference={CONFERENCE}", workers)
            pids = [proc.pid]
            if workers > 1:
                found = wait_count(proc, r"worker \d+ of \d+ started pid=(\d+)", workers)
                pids = [int(p) for p in found[:workers]]
                wait_count(proc, r"link up conference=", workers * (workers - 1))
        except BaseException:
            proc.stop()
            raise
        mdd = Mdd(name, proc, (LOCAL, udp), pids)
        self.mdds.append(mdd)
        return mdd

    def setup(self, mdd: Mdd) -> Setup:
        """What bench/forwarding.py's join_endpoints needs."""
        return Setup(
            self.folder, self.kmf, mdd.process, mdd.address, self.kmf_fingerprint, self.people
        )

    def stop_mdd(self, mdd: Mdd) -> None:
        mdd.process.stop()
        self.mdds.remove(mdd)

    def stop(self) -> None:
        for mdd in list(self.mdds):
            self.stop_mdd(mdd)
        self.kmf.stop()


def join(roles: Roles, mdd: Mdd, first: int, count: int) -> list[Endpoint]:
    return fwd.join_endpoints(roles.setup(mdd), first, count)


# --- part c: the hop's latency ---------------------------------------------------------------


#: SO_TIMESTAMPNS (Linux): the kernel stamps each datagram's arrival (SCM_TIMESTAMPNS).
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)


def timed_sink(
    socks: list[socket.socket], watched: list[int], until: float
) -> tuple[list[int], list[dict[int, float]]]:
    """bench/forwarding.py's sink, plus the kernel's arrival time (SO_TIMESTAMPNS, seconds) of
    every SRTP datagram by RTP SSRC and sequence number on the sockets ``watched`` (indexes
    into ``socks``): when the sink gets to read does not matter."""
    ep = select.epoll()
    index = {s.fileno(): i for i, s in enumerate(socks)}
    for s in socks:
        ep.register(s.fileno(), select.EPOLLIN)
    for w in watched:
        socks[w].setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
    counts = [0] * len(socks)
    times: list[dict[int, float]] = [{} for _ in watched]
    slot = {w: k for k, w in enumerate(watched)}
    buf = bytearray(65535)
    try:
        while (left := until - time.monotonic()) > 0:
            for fd, _ in ep.poll(min(left, 0.05)):
                i = index[fd]
                k = slot.get(i)
                if k is None:
                    recv = socks[i].recv_into
                    while True:
                        try:
                            n = recv(buf)
                        except BlockingIOError:
                            break
                        if n and 128 <= buf[0] <= 191:
                            counts[i] += 1
                    continue
                recvmsg = socks[i].recvmsg
                while True:
                    try:
                        data, anc, _, _ = recvmsg(65535, 64)
                    except BlockingIOError:
                        break
                    if len(data) < 12 or not 128 <= data[0] <= 191:
                        continue
                    counts[i] += 1
                    for level, kind, value in anc:
                        if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
                            sec, nsec = struct.unpack("qq", value[:16])
                            key = int.from_bytes(data[2:4]) | int.from_bytes(data[8:12]) << 16
                            times[k].setdefault(key, sec + nsec / 1e9)
    finally:
        ep.close()
        for w in watched:
            socks[w].setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 0)
    return counts, times


def hop_latency(
    near: list[Endpoint], far: list[Endpoint], rate: float, seconds: float, size: int
) -> tuple[list[float], int, int]:
    """The endpoints of ``near`` but ``near[1]`` send ``rate`` packets/s in turn; per packet,
    the arrival at ``far[0]`` minus the arrival at ``near[1]`` (ms). Returns the differences,
    packets sent, deliveries missing."""
    everyone = near + far
    socks = [e.sock for e in everyone]
    fwd.drain(socks)
    n = max(1, int(rate * seconds))
    senders = [k for k in range(len(near)) if k != 1]
    schedule = []
    for i in range(n):
        k = senders[i % len(senders)]
        schedule.append((i / rate, k, near[k].packet(fwd.AUDIO_PT, size)))
    start = time.monotonic() + 0.2
    ctx = multiprocessing.get_context("fork")
    load = ctx.Process(target=fwd.blast, args=(socks, schedule, start), daemon=True)
    load.start()
    counts, (t_near, t_far) = timed_sink(socks, [1, len(near)], start + seconds + fwd.GRACE)
    load.join(10)
    diffs = sorted(1000 * (t_far[s] - t_near[s]) for s in t_near.keys() & t_far.keys())
    missing = n * (len(everyone) - 1) - sum(counts)
    return diffs, n, missing


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


# --- reporting -------------------------------------------------------------------------------


def us_sink_load(step: Step) -> float:
    """CPU microseconds per delivery of the sink and the load generator together."""
    wall = step.seconds + fwd.GRACE + 0.2
    if not step.received:
        return float("nan")
    return 1e6 * (step.sink_cpu + step.load_cpu) * wall / step.received


def conference_deliveries(n: int, video_senders: int, video_pps: float) -> float:
    """Deliveries per second of part b's conference of ``n`` endpoints."""
    return (AUDIO_PPS * n + min(n, video_senders) * video_pps) * (n - 1)


def largest_for(deliveries: float, video_pps: float) -> int:
    n = 2
    while conference_deliveries(n + 1, 5, video_pps) <= deliveries:
        n += 1
    return n


def row(label: str, rate: float, step: Step, receivers: int) -> None:
    print(
        f"{label:<12} {rate:>8,.0f} pkt/s x{receivers:<3} {step.offered:>11,.0f} "
        f"{step.delivered:>11,.0f} {100 * step.loss:>7.2f}% {100 * step.cpu:>6.0f}% "
        f"{100 * step.sink_cpu:>5.0f}% {100 * step.load_cpu:>5.0f}% "
        f"{step.us_per_delivery:>8.2f} {step.us_system_per_delivery:>6.2f}",
        flush=True,
    )


def header() -> None:
    print(
        f"{'mdd':<12} {'offered':>19} {'offered/s':>11} {'delivered/s':>11} {'loss':>8} "
        f"{'cpu':>7} {'sink':>6} {'load':>6} {'us/dlv':>8} {'of sys':>6}"
    )


@dataclass
class Placed:
    steps: dict[str, list[Step]]
    ratios: list[tuple[float, float, bool]]
    """Per rate: the ratio of the median CPU per delivery, 2 workers / 1 worker, and whether
    every step of both at that rate was lossless."""


@contextlib.contextmanager
def placement(relays: list[int]) -> Iterator[bool]:
    """The relays' processes on the first CPU, this process (the sink) and the load generator
    it forks on the second; afterwards all may run anywhere again. False (nothing placed) on a
    machine with one CPU."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        yield False
        return
    try:
        for pid in relays:
            os.sched_setaffinity(pid, {cpus[0]})
        os.sched_setaffinity(0, {cpus[1]})
        yield True
    finally:
        for pid in relays:
            with contextlib.suppress(ProcessLookupError):
                os.sched_setaffinity(pid, cpus)
        os.sched_setaffinity(0, cpus)


def placed_rounds(
    args: argparse.Namespace,
    one: tuple[Mdd, list[Endpoint]],
    two: tuple[Mdd, list[Endpoint]],
    receivers: int,
) -> Placed:
    """Part a2: ``--placed-rounds`` alternating rounds over the rates with the MDDs' processes
    on one CPU and the instruments on another; per rate the median of each."""
    out = Placed({one[0].label: [], two[0].label: []}, [])
    if args.placed_rounds < 1:
        return out
    with placement(one[0].pids + two[0].pids) as placed:
        if not placed:
            print("# a2. placed: skipped, this machine has one CPU")
            return out
        print(
            f"# a2. placed: the MDDs' processes on one CPU, the load generator and the sink on "
            f"another (no instrument shares\n#     a core with what it measures, as on a machine "
            f"with cores for them); {args.placed_rounds} alternating round(s), medians below"
        )
        header()
        for _ in range(args.placed_rounds):
            for rate in args.rates:
                for mdd, eps in (one, two):
                    schedule = fwd.flat_schedule(eps, args.senders, rate, args.seconds, args.size)
                    step = fwd.run_step(eps, schedule, args.seconds, mdd.pids)
                    out.steps[mdd.label].append(step)
                    row(mdd.label, rate, step, receivers)
    n = len(args.rates)
    for i, rate in enumerate(args.rates):
        pair = [out.steps[mdd.label][i::n] for mdd in (one[0], two[0])]
        if all(s.received for side in pair for s in side):
            m1, m2 = (statistics.median(s.us_per_delivery for s in side) for side in pair)
            lossless = all(s.received == s.expected for side in pair for s in side)
            out.ratios.append((rate, m2 / m1, lossless))
    return out


def size_search(
    roles: Roles, mdd: Mdd, endpoints: list[Endpoint], args: argparse.Namespace
) -> tuple[int, list[Endpoint], dict[int, Step]]:
    """Part b for one MDD: the largest N without a missing packet, the endpoints, the steps
    by N."""
    n, best = len(endpoints), 0
    steps: dict[int, Step] = {}
    target = max(args.size_start, n)
    while target <= args.size_max:
        if target > n:
            endpoints += join(roles, mdd, n, target - n)
            n = len(endpoints)
        schedule = fwd.conference_schedule(
            endpoints, args.size_seconds, args.size, args.video_pps, args.video_size
        )
        step = fwd.run_step(endpoints, schedule, args.size_seconds, mdd.pids)
        steps[n] = step
        lost = step.expected - step.received
        print(
            f"{mdd.label:<12} {n:>9} {step.offered:>13,.0f} {step.received:>10,} {lost:>8,} "
            f"{100 * step.cpu:>5.0f}% {100 * step.sink_cpu:>5.0f}% {100 * step.load_cpu:>5.0f}% "
            f"{step.us_per_delivery:>8.2f}",
            flush=True,
        )
        if lost:
            break
        best = n
        target += args.size_step
    return best, endpoints, steps


# --- main ------------------------------------------------------------------------------------


def main() -> int:
    ap = harness.parser(__doc__)
    fwd.load_options(
        ap, rates=[2000.0, 4000.0, 6000.0, 8000.0], size_step=10, size_max=90, size_seconds=2.0
    )
    ap.add_argument("--placed-rounds", type=int, default=3)
    ap.add_argument("--latency-seconds", type=float, default=3.0)
    ap.add_argument("--latency-rate", type=float, default=None)
    quick = {"seconds": 0.3, "senders": 1, "receivers": 2, "rates": [500.0], "placed_rounds": 1}
    quick |= {"size_start": 3, "size_max": 3, "size_seconds": 0.3}
    quick |= {"latency_seconds": 0.3, "latency_rate": 200.0}
    args = harness.parse(ap, quick=quick)
    fwd.INSTRUMENTS = args.instruments

    folder = Path(tempfile.mkdtemp(prefix="perc-bench-cascade-"))
    members = args.receivers + 1
    harness.print_machine()
    print(
        f"# cascade: {members} endpoints, {args.senders} senders, {args.size} B payload, "
        f"{args.seconds:g} s per step, {os.cpu_count()} CPUs, {fwd.instruments_note()}"
    )
    roles = Roles(folder, n_identities=8)
    all_eps: list[Endpoint] = []
    try:
        one = roles.start_mdd("workers1", workers=1)
        two = roles.start_mdd("workers2", workers=2)
        eps1 = join(roles, one, 0, members)
        eps2 = join(roles, two, 0, members)
        all_eps += eps1 + eps2
        ok1, ok2 = fwd.verify_path(eps1, args.size), fwd.verify_path(eps2, args.size)
        print(
            f"# {members} endpoints joined each MDD; end-to-end check: {ok1}/20 (1 worker), "
            f"{ok2}/20 (2 workers, pids {','.join(map(str, two.pids))}) warm-up packets verified"
        )

        # --- a: the same load on 1 and 2 workers ----------------------------------------------
        print()
        print("# a. the forwarding bench's load, alternating (cpu: summed over the workers)")
        print("# a1. floating: every process may run on any CPU")
        header()
        steps: dict[str, list[Step]] = {one.label: [], two.label: []}
        floating: list[tuple[float, float, bool]] = []  # rate, ratio, both lossless
        for rate in args.rates:
            pair = []
            for mdd, eps in ((one, eps1), (two, eps2)):
                schedule = fwd.flat_schedule(eps, args.senders, rate, args.seconds, args.size)
                step = fwd.run_step(eps, schedule, args.seconds, mdd.pids)
                steps[mdd.label].append(step)
                row(mdd.label, rate, step, members - 1)
                pair.append(step)
            if all(s.received for s in pair):
                value = pair[1].us_per_delivery / pair[0].us_per_delivery
                floating.append((rate, value, all(s.received == s.expected for s in pair)))
        placed = placed_rounds(args, (one, eps1), (two, eps2), members - 1)
        for label, more in placed.steps.items():
            steps[label] += more
        us1 = min(s.us_per_delivery for s in steps[one.label] if s.received)
        us2 = min(s.us_per_delivery for s in steps[two.label] if s.received)
        lossless1 = [s.delivered for s in steps[one.label] if s.received == s.expected]
        sink_load = min(us_sink_load(s) for s in steps[one.label] + steps[two.label])
        print()
        print(f"{'result':<46} {'value':>10}  target")
        print(f"{'1 worker CPU us per delivery (best step)':<46} {us1:>10.2f}")
        print(f"{'2 workers CPU us per delivery, summed (best)':<46} {us2:>10.2f}")
        # The same offered load: the highest rate both carried without loss (else any); the
        # placed medians when the machine has the CPUs to place them.
        ratios = placed.ratios or floating
        same = [r for r in ratios if r[2]] or ratios
        if same:
            rate, value, clean = same[-1]
            how = "placed, median" if placed.ratios else "floating"
            harness.ratio(
                "2 workers",
                f"1 worker (CPU per delivery, {how})",
                value,
                at_most=TARGET_RATIO,
                note=f"at {rate:,.0f} pkt/s{'' if clean else ' (with loss)'}",
            )
        for how, values in (("placed", placed.ratios), ("floating", floating)):
            if values:
                print(f"{'per-rate ratios, ' + how:<46} "
                      + " ".join(f"{r:,.0f}:{v:.2f}" for r, v, _ in values))  # fmt: skip
        print(f"{'load generator + sink CPU us per delivery':<46} {sink_load:>10.2f}")

        # --- b: the largest lossless conference -----------------------------------------------
        print()
        print(
            f"# b. largest conference without loss: audio 50 pkt/s x {args.size} B from all, "
            f"video {args.video_pps:g} pkt/s x {args.video_size} B from 5, "
            f"{args.size_seconds:g} s per step"
        )
        print(
            f"{'mdd':<12} {'endpoints':>9} {'deliveries/s':>13} {'received':>10} "
            f"{'missing':>8} {'cpu':>6} {'sink':>6} {'load':>6} {'us/dlv':>8}"
        )
        best1, eps1, more1 = size_search(roles, one, eps1, args)
        best2, eps2, more2 = size_search(roles, two, eps2, args)
        all_eps = eps1 + eps2
        print(f"largest lossless conference: 1 worker {best1}, 2 workers {best2} endpoints "
              f"(step {args.size_step}, up to {args.size_max})")  # fmt: skip
        # The same comparison as part a's, at each conference size both carried without loss.
        pairs = [(n, a, more2[n]) for n, a in more1.items() if n in more2]
        by_size = [
            f"{n}:{b.us_per_delivery / a.us_per_delivery:.2f}"
            for n, a, b in pairs
            if a.received == a.expected and b.received == b.expected and a.received
        ]
        print(f"{'per-size ratios, 2 workers / 1 worker':<46} "
              + (" ".join(by_size) or "(no size both carried without loss)"))  # fmt: skip
        for e in all_eps:
            e.sock.close()
        all_eps = []
        roles.stop_mdd(one)
        roles.stop_mdd(two)

        # --- c: latency per link hop -----------------------------------------------------------
        print()
        port_a, port_b = free_udp_port(), free_udp_port()
        fp = roles.mdd_fingerprint
        a = roles.start_mdd(
            "linkA",
            port=port_a,
            link=f'peer = "{LOCAL}:{port_b}"\nfingerprint = "{fp}"\nconnect = true\n',
        )
        b = roles.start_mdd(
            "linkB",
            port=port_b,
            link=f'peer = "{LOCAL}:{port_a}"\nfingerprint = "{fp}"\nconnect = false\n',
        )
        wait_count(a.process, "link up conference=", 1)
        wait_count(b.process, "link up conference=", 1)
        near, far = join(roles, a, 0, 4), join(roles, b, 4, 4)
        all_eps = near + far
        receivers = len(all_eps) - 1
        rate = args.latency_rate
        if rate is None:
            half = 0.5 * (max(lossless1) if lossless1 else 10_000.0)
            rate = max(50.0, half / receivers)
        diffs, sent, missing = hop_latency(near, far, rate, args.latency_seconds, args.size)
        p50, p99 = percentile(diffs, 0.5), percentile(diffs, 0.99)
        print(
            f"# c. one link hop: 2 MDDs linked, 4 endpoints on each, 3 senders at "
            f"{rate:,.0f} pkt/s ({rate * receivers:,.0f} deliveries/s; half the lossless load "
            f"of part a unless --latency-rate), {args.latency_seconds:g} s"
        )
        print(
            f"hop latency: {len(diffs)} of {sent} packets seen on both sides, missing "
            f"deliveries {missing}; p50 {p50:.3f} ms, p99 {p99:.3f} ms "
            f"(target p99 <= {TARGET_HOP_P99_MS} ms)"
        )

        # --- projection ------------------------------------------------------------------------
        print()
        # The cheapest lossless step of parts a and b: per-wakeup costs amortised best.
        b1, b2 = list(more1.values()), list(more2.values())
        lossless = [s for s in steps[one.label] + b1 if s.received == s.expected] or b1
        p1 = min(s.us_per_delivery for s in lossless if s.received)
        lossless = [s for s in steps[two.label] + b2 if s.received == s.expected] or b2
        p2 = min(s.us_per_delivery for s in lossless if s.received)
        d1, d2 = 1e6 / p1, 2e6 / p2
        print(
            f"# projection to a 4-core machine (each worker a core of its own, the load generator"
            f"\n# and the sink on the others) from the CPU per delivery of the cheapest lossless"
            f"\n# step of parts a and b: {p1:.2f} us for 1 worker, {p2:.2f} us summed for 2"
        )
        print(
            f"1 worker: {d1:,.0f} deliveries/s = a conference of {largest_for(d1, args.video_pps)}"
        )
        print(
            f"2 workers: {d2:,.0f} deliveries/s = a conference of "
            f"{largest_for(d2, args.video_pps)} (load generator + sink need "
            f"{d2 * sink_load / 1e6:.1f} cores for it)"
        )
    finally:
        for e in all_eps:
            e.sock.close()
        roles.stop()
        print()
        for log in sorted(folder.glob("*.log")):
            for line in log.read_text(errors="replace").splitlines():
                if "key isolation" in line and "none" not in line:
                    print(f"# {log.stem}: " + line.split(": ", 1)[-1])
        if args.keep is not None:
            shutil.copytree(folder, args.keep, dirs_exist_ok=True)
        shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
