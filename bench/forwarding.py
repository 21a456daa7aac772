"""MDD forwarding speed: a real ``perc mdd`` process against a plain Python UDP relay, same run.

Run: ``.venv/bin/python bench/forwarding.py`` (or ``bash dev.sh bench forwarding``).
Options: ``--seconds S`` per step (default 2), ``--senders K`` (default 4), ``--receivers R``
(deliveries per packet, default 10: a conference of R + 1 endpoints), ``--size B`` (RTP
payload bytes, default 160), ``--rates 5000,10000,...`` (offered packets/s per step),
``--size-search`` / ``--no-size-search`` (default on), ``--size-start N`` (20),
``--size-step N`` (5), ``--size-max N`` (150), ``--size-seconds S`` (3), ``--video-pps P``
(100), ``--video-size B`` (1100), ``--keep DIR`` (keep configs and logs), ``--profile`` (run
the MDD under cProfile and print its top functions: where the time goes), ``--quick`` (3
endpoints, 1 sender, one 0.3 s step at 1000 packets/s, a one-step size search: a smoke run).

What happens:

1. **Set-up, the honest way.** Throwaway identities and TOML configs; a real ``perc kmf`` and a
   real ``perc mdd`` process (``python -m perc``, log level INFO; rekey on join/leave off, as
   keying is not what is measured). The endpoints join through the MDD with perc's endpoint
   DTLS client (:func:`perc.roles.endpoint.join`): so the MDD got its keys in ``MediaKeys``
   from the KMF, exactly as in a conference, and runs its normal code path.
2. **Pre-encrypted media.** Each sending endpoint's packets are made once with a
   :class:`~perc.srtp.double.DoubleSender` from the keys its join gave it (inner E2E layer,
   OHB, outer HBH layer, EKT tags on the RFC 8870 §4.6 schedule) before a step starts. One
   receiver decrypts a warm-up burst end to end to prove the path is real.
3. **Load.** A forked *load* process sends the packets from the senders' own sockets, paced to
   the offered rate (K senders round-robin). The bench process is the *sink*: it drains every
   endpoint socket (epoll, non-blocking ``recv_into`` until EAGAIN) and counts SRTP datagrams.
   Both run SCHED_BATCH (``--instruments batch``, the default; ``normal`` for SCHED_OTHER):
   they get their fair share of the CPU, but their wake-ups never preempt the relay on its
   core, which would charge the relay for cache refills it did not cause.
   Every packet is forwarded to every other endpoint, so offered deliveries/s = packets/s x R.
4. **Baselines, same harness.** A plain Python UDP relay in its own process (blocking
   ``recvfrom``, then ``sendto`` of the same bytes to the R other members; no crypto, no
   parsing), the same sockets' shape, the same packets, the same pacing and the same sink.
   And a *libsrtp relay* in its own process: the MDD's outer-layer work with pylibsrtp
   (libsrtp, C) for the cryptography: strip the EKT field (last-byte rule, RFC 8870 §4.3.2),
   one ``unprotect`` with the sender's hop key, one ``protect`` per receiver with that
   receiver's key, the EKT field re-appended, ``sendto``. Its endpoints send the same kind of
   double-encrypted packets (a :class:`~perc.srtp.double.DoubleSender` per endpoint with keys
   the relay is given at start). It is the speed of a Python MDD whose cryptography is C, so
   ``ratio mdd / libsrtp relay`` does not depend on how AES-GCM compares with ``sendto`` on a
   given machine, as ``ratio mdd / python relay`` does.
5. **Largest conference** one MDD process carries without loss: N endpoints all sending audio
   (50 packets/s, ``--size`` bytes) and 5 of them video (``--video-pps``, ``--video-size``),
   each endpoint at a random phase; N grows by ``--size-step`` (more endpoints join) until a
   step misses a packet. Lossless means: every endpoint received every other's every packet
   within 0.4 s after the last one was sent (a relay that falls behind, its backlog growing in
   its socket buffer, does not carry the load even if the kernel has not dropped yet:
   ``missing`` counts lost and late together; ``rcvbuf-drops`` the kernel's drops).

Rows: offered and delivered deliveries/s, loss, and per step the CPU use (1 core = 100%) of
the relay (from /proc/<pid>/stat), the sink and the load process, the kernel's receive-buffer
drops (/proc/net/snmp, whole host) and the relay's CPU microseconds per delivery; the rates are
run alternately on both relays. Then each relay's best delivered rate and the ratio
MDD/baseline, and the CPU cost per delivery of each (what a relay would do on a core of its
own: on a shared 2-core machine the delivered rate is bounded by the CPU the relay gets).
Targets: >= 150,000 deliveries/s by one MDD process, >= 0.6 of the plain relay, >= 0.9 of the
libsrtp relay. On a 2-core machine the relay, the load process and the sink share the cores
(the sink alone costs about as much CPU per datagram as the plain relay), so every relay is
measured under the same handicap; on a machine shared with other work the delivered rates
swing with the CPU each relay happens to get, and the CPU cost per delivery is the steadier
comparison.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import multiprocessing
import os
import random
import resource
import select
import shutil
import socket
import struct
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import harness
import trio
from harness import RoleProcess, cpu_seconds, cpu_times
from pylibsrtp import Error as LibsrtpError
from pylibsrtp import Policy, Session

from perc import identity
from perc.roles.endpoint import JoinResult, JoinSettings, join
from perc.srtp.double import DoubleReceiver, DoubleSender
from perc.srtp.ekt import EktCipher, EktParameterSet
from perc.wire.ekt import EktDecodeError, ekt_field_length_untrusted

LOCAL = "127.0.0.1"
AUDIO_PT = 111
VIDEO_PT = 96
TARGET = 150_000
TARGET_RATIO = 0.6
TARGET_LIBSRTP_RATIO = 0.9
#: Receive buffer of every endpoint socket (the kernel caps it at net.core.rmem_max).
RCVBUF = 4 << 20
#: After the last packet is sent, how long the sink keeps counting (seconds).
GRACE = 0.4
#: The baseline relay's SO_RCVBUF: the same as the MDD's (perc.roles.mdd.RECEIVE_BUFFER).
MDD_RECEIVE_BUFFER = 4 << 20

# --- processes -------------------------------------------------------------------------------


@dataclass
class Setup:
    folder: Path
    kmf: RoleProcess
    mdd: RoleProcess
    mdd_addr: tuple[str, int]
    kmf_fingerprint: str
    identities: list[identity.Identity]


def start_perc(folder: Path, n_identities: int, *, profile: bool = False) -> Setup:
    people = [identity.generate(f"ep{i}") for i in range(n_identities)]
    roles = harness.start_roles(
        folder,
        [p.fingerprint for p in people],
        conference="bench",
        idle_timeout=3600.0,
        profile="mdd" if profile else None,
        log_level="info",
    )
    return Setup(folder, roles.kmf, roles.mdd, roles.mdd_address, roles.kmf_fingerprint, people)


# --- endpoints -------------------------------------------------------------------------------


@dataclass
class Endpoint:
    sock: socket.socket
    sender: DoubleSender | None = None
    result: JoinResult | None = None
    ssrc: int = field(default_factory=lambda: random.getrandbits(32))
    seq: int = field(default_factory=lambda: random.getrandbits(15))
    t: float = 0.0  # media clock of the pre-encryption (EKT Full tag schedule)

    def packet(self, pt: int, size: int, *, marker: bool = False, keyframe: bool = False) -> bytes:
        header = struct.pack(
            "!BBHII",
            0x80,
            (0x80 if marker else 0) | pt,
            self.seq & 0xFFFF,
            self.seq * 160,
            self.ssrc,
        )
        self.seq += 1
        self.t += 0.02
        payload = bytes(size)
        if self.sender is None:  # baseline: no crypto, same size as the MDD's input
            return header + payload + bytes(16 + 1 + 16 + 1)
        return self.sender.protect(header + payload, self.t, keyframe=keyframe)


def _tune(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, RCVBUF)
    sock.setblocking(False)


def join_endpoints(setup: Setup, first: int, count: int) -> list[Endpoint]:
    """Join ``count`` endpoints through the MDD (10 at a time), perc's endpoint DTLS client."""

    async def run() -> list[JoinResult]:
        results: list[JoinResult] = []

        async def one(i: int) -> None:
            ident = setup.identities[i % len(setup.identities)]
            settings = JoinSettings(
                mdd=setup.mdd_addr,
                identity=ident,
                kmf_fingerprint=setup.kmf_fingerprint,
                name=f"ep{i}",
                join_timeout=20.0,
            )
            results.append(await join(settings))

        for start in range(first, first + count, 10):
            async with trio.open_nursery() as nursery:
                for i in range(start, min(start + 10, first + count)):
                    nursery.start_soon(one, i)
        return results

    endpoints = []
    for r in trio.run(run):
        _tune(r.socket)
        ep = Endpoint(r.socket, DoubleSender.for_endpoint(r.keying, r.ekt_parameters()), r)
        endpoints.append(ep)
    return endpoints


def plain_endpoints(relay: tuple[str, int], count: int) -> list[Endpoint]:
    out = []
    for _ in range(count):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind((LOCAL, 0))
        sock.connect(relay)
        _tune(sock)
        out.append(Endpoint(sock))
    return out


# --- the plain relay (baseline) --------------------------------------------------------------


def plain_relay(sock: socket.socket) -> None:
    """Blocking recvfrom, then sendto of the same bytes to every other member (no crypto)."""
    sock.setblocking(True)
    recvfrom, sendto = sock.recvfrom, sock.sendto
    members: list[tuple[str, int]] = []
    routes: dict[tuple[str, int], list[tuple[str, int]]] = {}
    while True:
        data, addr = recvfrom(65535)
        dests = routes.get(addr)
        if dests is None:  # a new member: every route list gets it
            members.append(addr)
            routes = {m: [o for o in members if o != m] for m in members}
            dests = routes[addr]
        for d in dests:
            sendto(data, d)


# --- the libsrtp relay (baseline) ------------------------------------------------------------

#: Master key + salt length of the outer layer (AEAD_AES_128_GCM, as the MDD's default profile).
_LIB_KEY = 16 + 12


def libsrtp_endpoints(relay: tuple[str, int], count: int) -> tuple[list[Endpoint], list[bytes]]:
    """``count`` endpoints of the libsrtp relay, each with its own outer (hop) key and a
    DoubleSender, as a joined endpoint has; returns them and their key || salt."""
    params = EktParameterSet(1, EktCipher.AESKW_128, os.urandom(16), os.urandom(12))
    out, keys = [], []
    for _ in range(count):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind((LOCAL, 0))
        sock.connect(relay)
        _tune(sock)
        key = os.urandom(_LIB_KEY)
        out.append(Endpoint(sock, DoubleSender(key[:16], key[16:], params)))
        keys.append(key)
    return out, keys


def libsrtp_relay(sock: socket.socket, members: dict[tuple[str, int], bytes]) -> None:
    """The MDD's outer-layer work with libsrtp: EKT field off, one unprotect with the sender's
    hop key, one protect per receiver, EKT field back on, sendto (RFC 8723 §5.2)."""
    sock.setblocking(True)
    recvfrom, sendto = sock.recvfrom, sock.sendto
    profile = Policy.SRTP_PROFILE_AEAD_AES_128_GCM

    def session(key: bytes, ssrc_type: int) -> Session:
        return Session(Policy(key=key, ssrc_type=ssrc_type, srtp_profile=profile))

    inbound = {a: session(k, Policy.SSRC_ANY_INBOUND).unprotect for a, k in members.items()}
    outbound = {a: session(os.urandom(_LIB_KEY), Policy.SSRC_ANY_OUTBOUND).protect for a in members}
    routes = {a: [(d, outbound[d]) for d in members if d != a] for a in members}
    while True:
        data, addr = recvfrom(65535)
        dests = routes.get(addr)
        if dests is None:
            continue
        n = len(data)
        try:
            cut = n - 1 if data[n - 1] == 0 else n - ekt_field_length_untrusted(data)
            plain = inbound[addr](data[:cut])
        except (EktDecodeError, LibsrtpError, IndexError):
            continue
        ekt = data[cut:]
        for d, protect in dests:
            sendto(protect(plain) + ekt, d)


# --- load and sink ---------------------------------------------------------------------------

Schedule = list[tuple[float, int, bytes]]  # (send time from start, endpoint index, datagram)


def blast(socks: list[socket.socket], schedule: Schedule, start: float) -> None:
    """The load process: send each datagram at its time (a late sender catches up at once)."""
    sends = [s.send for s in socks]
    i, n = 0, len(schedule)
    while i < n:
        now = time.monotonic() - start
        while i < n and schedule[i][0] <= now:
            _, k, data = schedule[i]
            try:
                sends[k](data)
            except BlockingIOError:
                pass  # our own socket buffer: counted as loss by the sink
            i += 1
        if i < n:
            # Sleep at least 1 ms (bursts of what fell due meanwhile): spinning would take CPU
            # from the relay on a small machine.
            ahead = schedule[i][0] - (time.monotonic() - start)
            time.sleep(min(max(ahead, 0.001), 0.01))


def sink(socks: list[socket.socket], until: float) -> list[int]:
    """Count SRTP datagrams (first byte 128-191) per socket until ``until`` (monotonic)."""
    ep = select.epoll()
    index = {s.fileno(): i for i, s in enumerate(socks)}
    for s in socks:
        ep.register(s.fileno(), select.EPOLLIN)
    counts = [0] * len(socks)
    buf = bytearray(65535)
    recvs = {s.fileno(): s.recv_into for s in socks}
    try:
        while (left := until - time.monotonic()) > 0:
            for fd, _ in ep.poll(min(left, 0.05)):
                recv = recvs[fd]
                got = 0
                while True:
                    try:
                        n = recv(buf)
                    except BlockingIOError:
                        break
                    if n and 128 <= buf[0] <= 191:
                        got += 1
                counts[index[fd]] += got
    finally:
        ep.close()
    return counts


def drain(socks: list[socket.socket]) -> None:
    sink(socks, time.monotonic() + 0.2)


def rcvbuf_errors() -> int:
    """UDP datagrams the kernel dropped for a full receive buffer (whole host)."""
    lines = [
        ln.split()
        for ln in Path("/proc/net/snmp").read_text().splitlines()
        if ln.startswith("Udp:")
    ]
    return int(lines[1][lines[0].index("RcvbufErrors")])


def step_wall(seconds: float) -> float:
    """The wall time over which a step's CPU is measured: the 0.2 s lead before the load
    starts, the ``seconds`` of load and the sink's ``GRACE``."""
    return seconds + GRACE + 0.2


@dataclass
class Step:
    offered: float  # deliveries/s
    delivered: float
    expected: int
    received: int
    cpu: float  # relay CPU share (1.0 = one core) during the step
    seconds: float
    kernel_drops: int = 0  # receive-buffer overflows (relay input or sink sockets)
    sink_cpu: float = 0.0
    load_cpu: float = 0.0
    system_cpu: float = 0.0  # the relay's share of ``cpu`` spent in the kernel

    @property
    def us_system_per_delivery(self) -> float:
        """The kernel's part of :attr:`us_per_delivery` (system calls: the relay's sendto
        delivers each datagram on loopback); the rest is user time, the relay's own code."""
        wall = step_wall(self.seconds)
        return 1e6 * self.system_cpu * wall / self.received if self.received else math.nan

    @property
    def us_per_delivery(self) -> float:
        """Relay CPU time per delivery (independent of how much CPU it was given); NaN if the
        step received nothing or was too short for one tick of /proc's CPU clock."""
        wall = step_wall(self.seconds)
        return 1e6 * self.cpu * wall / self.received if self.received and self.cpu else math.nan

    @property
    def loss(self) -> float:
        return 1 - self.received / self.expected if self.expected else 0.0


#: How the load generator and the sink are scheduled: ``batch`` (SCHED_BATCH, the default) or
#: ``normal`` (SCHED_OTHER; ``--instruments normal``). They are instruments: as SCHED_BATCH
#: tasks they still get their fair share of the CPU, but their wake-ups never preempt a relay
#: process on its core (Linux skips wake-up preemption for SCHED_BATCH), so the relay's CPU
#: time does not include the cost of being thrown off its core at every packet the sink is
#: woken for, a cost that depends on how many processes share the cores, not on the relay.
INSTRUMENTS = "batch"


@contextlib.contextmanager
def instruments_policy() -> Iterator[None]:
    """This process (the sink) and what it forks meanwhile (the load generator) run with the
    :data:`INSTRUMENTS` policy."""
    if INSTRUMENTS != "batch":
        yield
        return
    policy, param = os.sched_getscheduler(0), os.sched_getparam(0)
    os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
    try:
        yield
    finally:
        os.sched_setscheduler(0, policy, param)


def instruments_note() -> str:
    policy = "SCHED_BATCH" if INSTRUMENTS == "batch" else "SCHED_OTHER"
    return f"load generator and sink {policy} (--instruments {INSTRUMENTS})"


def run_step(
    endpoints: list[Endpoint], schedule: Schedule, seconds: float, relay_pid: int | list[int]
) -> Step:
    """One step; ``relay_pid``: the relay's process, or its processes (CPU summed)."""
    pids = [relay_pid] if isinstance(relay_pid, int) else relay_pid
    socks = [e.sock for e in endpoints]
    drain(socks)
    start = time.monotonic() + 0.2
    ctx = multiprocessing.get_context("fork")
    load = ctx.Process(target=blast, args=(socks, schedule, start), daemon=True)
    cpu0 = sum(cpu_seconds(p) for p in pids)
    sys0 = sum(cpu_times(p)[1] for p in pids)
    drops0 = rcvbuf_errors()
    self0 = resource.getrusage(resource.RUSAGE_SELF)
    child0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    with instruments_policy():
        load.start()
        counts = sink(socks, start + seconds + GRACE)
        load.join(10)
    wall = step_wall(seconds)
    cpu = (sum(cpu_seconds(p) for p in pids) - cpu0) / wall
    system = (sum(cpu_times(p)[1] for p in pids) - sys0) / wall
    self1 = resource.getrusage(resource.RUSAGE_SELF)
    child1 = resource.getrusage(resource.RUSAGE_CHILDREN)

    def used(a: resource.struct_rusage, b: resource.struct_rusage) -> float:
        return (b.ru_utime + b.ru_stime - a.ru_utime - a.ru_stime) / wall

    expected = len(schedule) * (len(endpoints) - 1)
    received = sum(counts)
    return Step(
        expected / seconds,
        received / seconds,
        expected,
        received,
        cpu,
        seconds,
        rcvbuf_errors() - drops0,
        used(self0, self1),
        used(child0, child1),
        system,
    )


def flat_schedule(
    endpoints: list[Endpoint], senders: int, rate: float, seconds: float, size: int
) -> Schedule:
    """``rate`` packets/s in total, round-robin over the first ``senders`` endpoints."""
    n = int(rate * seconds)
    return [
        (i / rate, i % senders, endpoints[i % senders].packet(AUDIO_PT, size)) for i in range(n)
    ]


def conference_schedule(
    endpoints: list[Endpoint], seconds: float, size: int, video_pps: float, video_size: int
) -> Schedule:
    """Audio from everyone (50/s), video from the first 5 (``video_pps``), random phases."""
    events: list[tuple[float, int, int]] = []  # time, endpoint, kind (0 audio, 1 video)
    rng = random.Random(1)
    for k in range(len(endpoints)):
        phase = rng.random() * 0.02
        events += [(phase + j * 0.02, k, 0) for j in range(int(seconds * 50))]
        if k < 5:
            vphase = rng.random() / video_pps
            events += [(vphase + j / video_pps, k, 1) for j in range(int(seconds * video_pps))]
    events.sort()
    out: Schedule = []
    frame = [0] * len(endpoints)
    for t, k, kind in events:
        ep = endpoints[k]
        if kind == 0:
            out.append((t, k, ep.packet(AUDIO_PT, size)))
        else:
            frame[k] += 1  # ~5 packets per frame, a keyframe every 150 packets
            out.append(
                (
                    t,
                    k,
                    ep.packet(
                        VIDEO_PT,
                        video_size,
                        marker=frame[k] % 5 == 0,
                        keyframe=frame[k] % 150 == 1,
                    ),
                )
            )
    return out


def verify_path(endpoints: list[Endpoint], size: int) -> int:
    """Warm-up: endpoint 0 sends 20 packets; endpoint 1 decrypts them end to end."""
    rx = endpoints[1].result
    assert rx is not None
    receiver = DoubleReceiver.for_endpoint(rx.keying)
    receiver.add_parameter_set(rx.ekt_parameters())
    drain([e.sock for e in endpoints])
    for _ in range(20):
        endpoints[0].sock.send(endpoints[0].packet(AUDIO_PT, size))
    verified = 0
    deadline = time.monotonic() + 2.0
    while verified < 20 and time.monotonic() < deadline:
        try:
            data = endpoints[1].sock.recv(65535)
        except BlockingIOError:
            time.sleep(0.001)
            continue
        if 128 <= data[0] <= 191 and receiver.unprotect(data, 0.0).payload == bytes(size):
            verified += 1
    drain([e.sock for e in endpoints])
    return verified


# --- main ------------------------------------------------------------------------------------


def ladder(
    relays: list[tuple[str, list[Endpoint], int]], args: argparse.Namespace
) -> list[list[Step]]:
    """Each offered rate on every relay in turn (alternating, so that the load other programs
    put on a shared machine falls on both alike); one list of steps per relay."""
    steps: list[list[Step]] = [[] for _ in relays]
    for rate in args.rates:
        for (label, endpoints, pid), mine in zip(relays, steps, strict=True):
            schedule = flat_schedule(endpoints, args.senders, rate, args.seconds, args.size)
            step = run_step(endpoints, schedule, args.seconds, pid)
            mine.append(step)
            print(
                f"{label:<14} {rate:>8,.0f} pkt/s x{len(endpoints) - 1:<3} {step.offered:>12,.0f} "
                f"{step.delivered:>12,.0f} {100 * step.loss:>7.2f}% {100 * step.cpu:>6.0f}% "
                f"{100 * step.sink_cpu:>5.0f}% {100 * step.load_cpu:>5.0f}% "
                f"{step.kernel_drops:>9,} {step.us_per_delivery:>8.2f}",
                flush=True,
            )
    return steps


def load_options(
    ap: argparse.ArgumentParser,
    *,
    rates: list[float],
    size_step: int,
    size_max: int,
    size_seconds: float,
) -> None:
    """The load and conference-size options of this bench, shared with bench/cascade.py
    (its defaults differ where the arguments say)."""
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--senders", type=int, default=4)
    ap.add_argument("--receivers", type=int, default=10)
    ap.add_argument("--size", type=int, default=160)
    ap.add_argument("--rates", type=lambda s: [float(x) for x in s.split(",")], default=rates)
    ap.add_argument("--size-step", type=int, default=size_step)
    ap.add_argument("--size-start", type=int, default=20)
    ap.add_argument("--size-max", type=int, default=size_max)
    ap.add_argument("--size-seconds", type=float, default=size_seconds)
    ap.add_argument("--video-pps", type=float, default=100.0)
    ap.add_argument("--video-size", type=int, default=1100)
    ap.add_argument("--keep", type=Path, default=None, help="keep configs and logs here")
    ap.add_argument(
        "--instruments",
        choices=["batch", "normal"],
        default=INSTRUMENTS,
        help="scheduling policy of the load generator and the sink (see INSTRUMENTS)",
    )


def main() -> int:
    ap = harness.parser(__doc__)
    load_options(
        ap,
        rates=[5000.0, 10000.0, 15000.0, 20000.0, 25000.0, 30000.0],
        size_step=5,
        size_max=150,
        size_seconds=3.0,
    )
    ap.add_argument("--size-search", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument(
        "--profile", action="store_true", help="run the MDD under cProfile; print its top 25"
    )
    quick = {"seconds": 0.3, "senders": 1, "receivers": 2, "rates": [1000.0]}
    quick |= {"size_start": 3, "size_max": 3, "size_seconds": 0.3}
    args = harness.parse(ap, quick=quick)
    global INSTRUMENTS
    INSTRUMENTS = args.instruments

    folder = Path(tempfile.mkdtemp(prefix="perc-bench-fwd-"))
    members = args.receivers + 1
    harness.print_machine()
    print(
        f"# forwarding: {members} endpoints, {args.senders} senders, {args.size} B payload, "
        f"{args.seconds:g} s per step, {os.cpu_count()} CPUs, {instruments_note()}"
    )
    header = (
        f"{'relay':<14} {'offered':>19} {'offered dlv/s':>12} {'delivered/s':>12} "
        f"{'loss':>8} {'cpu':>7} {'sink':>6} {'load':>6} {'rcvbuf-drops':>9} {'cpu us/dlv':>8}"
    )
    setup = start_perc(folder, n_identities=8, profile=args.profile)
    baseline_proc = lib_proc = None
    endpoints: list[Endpoint] = []
    try:
        endpoints = join_endpoints(setup, 0, members)
        verified = verify_path(endpoints, args.size)
        print(
            f"# {len(endpoints)} endpoints joined through perc mdd; end-to-end check: "
            f"{verified}/20 warm-up packets verified by a receiver"
        )
        relay_sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        relay_sock.bind((LOCAL, 0))
        relay_sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, MDD_RECEIVE_BUFFER)
        ctx = multiprocessing.get_context("fork")
        baseline_proc = ctx.Process(target=plain_relay, args=(relay_sock,), daemon=True)
        baseline_proc.start()
        relay_addr = relay_sock.getsockname()
        relay_sock.close()
        plain = plain_endpoints(relay_addr, members)
        for e in plain:  # membership: each endpoint says hello once (not counted)
            e.sock.send(b"\x00hello")
            time.sleep(0.01)
        drain([e.sock for e in plain])
        assert baseline_proc.pid is not None
        lib_sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        lib_sock.bind((LOCAL, 0))
        lib_sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, MDD_RECEIVE_BUFFER)
        lib_eps, lib_keys = libsrtp_endpoints(lib_sock.getsockname(), members)
        lib_members = {e.sock.getsockname(): k for e, k in zip(lib_eps, lib_keys, strict=True)}
        lib_proc = ctx.Process(target=libsrtp_relay, args=(lib_sock, lib_members), daemon=True)
        lib_proc.start()
        lib_sock.close()
        assert lib_proc.pid is not None
        print(header)
        mdd_steps, base_steps, lib_steps = ladder(
            [
                ("perc mdd", endpoints, setup.mdd.process.pid),
                ("python relay", plain, baseline_proc.pid),
                ("libsrtp relay", lib_eps, lib_proc.pid),
            ],
            args,
        )
        for e in plain + lib_eps:
            e.sock.close()

        best_mdd = max(s.delivered for s in mdd_steps)
        best_base = max(s.delivered for s in base_steps)
        ratio = best_mdd / best_base if best_base else 0.0
        lossless = [s.delivered for s in mdd_steps if s.received == s.expected]
        print()
        print(f"{'result':<38} {'value':>12}  target")
        print(f"{'perc mdd best delivered/s':<38} {best_mdd:>12,.0f}  >= {TARGET:,}")
        print(
            f"{'perc mdd best lossless delivered/s':<38} "
            f"{(max(lossless) if lossless else 0):>12,.0f}"
        )
        print(f"{'python relay best delivered/s':<38} {best_base:>12,.0f}")
        print(f"{'ratio mdd / python relay':<38} {ratio:>12.2f}  >= {TARGET_RATIO}")
        best_lib = max(s.delivered for s in lib_steps)
        print(f"{'libsrtp relay best delivered/s':<38} {best_lib:>12,.0f}")
        lib_ratio = best_mdd / best_lib if best_lib else 0.0
        print(f"{'ratio mdd / libsrtp relay':<38} {lib_ratio:>12.2f}  >= {TARGET_LIBSRTP_RATIO}")
        # CPU per delivery does not depend on how much CPU the shared machine gave each relay.
        us_mdd = min(s.us_per_delivery for s in mdd_steps if s.received)
        us_base = min(s.us_per_delivery for s in base_steps if s.received)
        print(
            f"{'perc mdd CPU us per delivery':<38} {us_mdd:>12.2f}  "
            f"(one full core: {1e6 / us_mdd:,.0f} deliveries/s)"
        )
        print(
            f"{'python relay CPU us per delivery':<38} {us_base:>12.2f}  "
            f"(one full core: {1e6 / us_base:,.0f} deliveries/s)"
        )
        print(f"{'CPU cost ratio relay / mdd':<38} {us_base / us_mdd:>12.2f}")
        us_lib = min(s.us_per_delivery for s in lib_steps if s.received)
        print(
            f"{'libsrtp relay CPU us per delivery':<38} {us_lib:>12.2f}  "
            f"(one full core: {1e6 / us_lib:,.0f} deliveries/s)"
        )
        print(f"{'CPU cost ratio libsrtp relay / mdd':<38} {us_lib / us_mdd:>12.2f}")

        if args.size_search:
            print()
            print(
                f"# largest conference without loss: audio 50 pkt/s x {args.size} B from all, "
                f"video {args.video_pps:g} pkt/s x {args.video_size} B from 5, "
                f"{args.size_seconds:g} s per step"
            )
            print(
                f"{'endpoints':>9} {'pkt/s in':>9} {'deliveries/s':>13} {'received':>10} "
                f"{'missing':>8} {'cpu':>6} {'sink':>6} {'rcvbuf-drops':>12}"
            )
            n = len(endpoints)
            best = 0
            target_n = max(args.size_start, n)
            while target_n <= args.size_max:
                if target_n > n:
                    endpoints += join_endpoints(setup, n, target_n - n)
                    n = len(endpoints)
                schedule = conference_schedule(
                    endpoints, args.size_seconds, args.size, args.video_pps, args.video_size
                )
                step = run_step(endpoints, schedule, args.size_seconds, setup.mdd.process.pid)
                lost = step.expected - step.received
                print(
                    f"{n:>9} {len(schedule) / args.size_seconds:>9,.0f} "
                    f"{step.offered:>13,.0f} {step.received:>10,} {lost:>8,} "
                    f"{100 * step.cpu:>5.0f}% {100 * step.sink_cpu:>5.0f}% {step.kernel_drops:>12,}"
                )
                if lost:
                    break
                best = n
                target_n += args.size_step
            print(
                f"largest lossless conference: {best} endpoints "
                f"(step {args.size_step}; first loss at {n if best != n else '-'})"
            )
    finally:
        for e in endpoints:
            e.sock.close()
        for proc in (baseline_proc, lib_proc):
            if proc is not None and proc.pid is not None:
                proc.kill()
                proc.join(5)
        setup.mdd.stop()
        setup.kmf.stop()
        print()
        for line in setup.mdd.log.read_text().splitlines():
            if "totals conference=" in line or "key isolation" in line:
                print("# mdd: " + line.split(": ", 1)[-1])
        if setup.mdd.profile is not None and setup.mdd.profile.exists():
            import pstats

            print("# MDD profile (cProfile, by own time):")
            pstats.Stats(str(setup.mdd.profile)).sort_stats("tottime").print_stats(25)
        if args.keep is not None:
            shutil.copytree(folder, args.keep, dirs_exist_ok=True)
        shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
