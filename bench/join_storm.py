"""Join storm: many endpoints joining through one real MDD to one real KMF (issue 4, Speed).

Run: ``.venv/bin/python bench/join_storm.py`` (or ``bash dev.sh bench join_storm``). Options:
``--seconds S`` (each saturation run, default 5), ``--concurrency C,C`` (default 16,64,256),
``--joins N`` (the 10-concurrent run, default 300), ``--identities K`` (default 1100),
``--baseline N`` (in-memory joins, default 200), ``--rekey``, ``--profile kmf|mdd``, ``--keep
DIR`` (keep configs and logs), ``--check`` (exit 1 if a target is missed), ``--quick`` (4
identities, 4 in flight for 0.3 s, 5 joins, 3 baseline joins: a smoke run). Join failures
always make the exit status 1.

Set-up: throwaway identities and configs in a temporary folder; ``perc kmf`` and ``perc mdd``
start as processes through the CLI (the commands a user runs) with their logs in that folder.
This script is the load generator: one process, one thread, one ``select.epoll`` over many
UDP sockets, each socket one endpoint running perc's sans-IO DTLS client
(:func:`perc.roles.endpoint.dtls_configuration`, exactly the endpoint's ClientHello: both
DOUBLE profiles, both EKT ciphers, a random tls-id). A join counts from ``connect()`` (the
first ClientHello) to the first ``EKTKey`` (after the cookie exchange, the full handshake
relayed through the tunnel, and the KMF's MediaKeys to the MDD); the joiner then sends the
EKTKey ACK and close_notify and closes its socket, so the KMF's leave path (EndpointDisconnect
to the MDD) is part of the load. ``K`` distinct endpoint identities (default 1100, more than
the engine's 1024-entry certificate-validation cache) are used round robin, so the KMF
verifies a certificate signature on (almost) every join, as it would with distinct users.

Rows:

* baseline: ``N`` perc DTLS clients and servers joined in memory in this process (no sockets,
  no MDD, no tunnel, no cookie), i.e. the crypto floor of one join on one core;
* saturation: ``C`` joiners always in flight for ``S`` seconds, for each ``C`` of
  ``--concurrency`` (default 16, 64, 256): joins/s through one KMF (the best row counts);
* 10 concurrent: 10 joiners always in flight for ``N`` joins: p50/p90/p99 join time.

Rekeying on join/leave (D22) is turned off by default (``--rekey`` turns the conference's
default policy on): with it, every join and leave costs one EKTKey per member, which measures
the rekey fan-out rather than joins.

Targets (issue 4, this 2-core machine, load generator included): >= 200 joins/s through one
KMF; p50 <= 50 ms with 10 concurrent joiners. After the table (bench/harness.py), the lines
``ratio 10 concurrent p50 / in-memory join`` and ``ratio saturation joins/s / in-memory
joins/s`` relate the system to its floor. The CPU seconds each process used during the
saturation run show which one limits the rate; ``--profile kmf`` (or ``mdd``) runs that
process under cProfile and prints where its time went.
"""

from __future__ import annotations

import os
import pstats
import select
import socket
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import harness
from harness import cpu_seconds

from perc import identity
from perc.dtls import DtlsConfiguration, DtlsConnection
from perc.dtls.events import ConnectionClosed, EktKeyReceived, HandshakeCompleted
from perc.endpoint import JoinSettings, dtls_configuration
from perc.identity import Identity
from perc.tlsid import random_tls_id

TARGET_RATE = 200.0
TARGET_P50_MS = 50.0
LOCAL = "127.0.0.1"


# --- processes ---------------------------------------------------------------------------------


#: (join times in seconds, failures, elapsed seconds)
Run = tuple[list[float], int, float]


# --- the load generator ------------------------------------------------------------------------


class Joiner:
    __slots__ = ("completed", "conn", "ekt", "sock", "started")

    def __init__(self, config: DtlsConfiguration, mdd: tuple[str, int], now: float) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setblocking(False)
        self.sock.connect(mdd)
        self.conn = DtlsConnection(config)
        self.started = now
        self.completed = False
        self.ekt = False
        self.conn.connect(now)
        self.flush()

    def flush(self) -> None:
        for dg in self.conn.datagrams_to_send():
            try:
                self.sock.send(dg)
            except OSError:
                pass  # loss: DTLS retransmits


class LoadGenerator:
    def __init__(self, mdd: tuple[str, int], endpoints: list[Identity], kmf_fp: str) -> None:
        self.mdd = mdd
        # One DtlsConfiguration per identity, built once (as an endpoint process would).
        self.configs = [
            dtls_configuration(
                JoinSettings(mdd=mdd, identity=e, kmf_fingerprint=kmf_fp, join_timeout=30.0),
                random_tls_id(),
                None,
            )
            for e in endpoints
        ]
        self._next_config = 0
        self.kmf_fp = kmf_fp

    def _config(self) -> DtlsConfiguration:
        c = self.configs[self._next_config % len(self.configs)]
        self._next_config += 1
        return c

    def run(
        self, concurrency: int, *, seconds: float | None = None, joins: int | None = None
    ) -> Run:
        """Keep ``concurrency`` joiners in flight; returns (join times, failures, elapsed)."""
        ep = select.epoll()
        active: dict[int, Joiner] = {}
        times: list[float] = []
        failures = 0
        started_total = 0
        t0 = time.monotonic()
        stop_at = t0 + seconds if seconds is not None else None

        def want_more() -> bool:
            if joins is not None:
                return started_total < joins
            return stop_at is not None and time.monotonic() < stop_at

        def launch() -> None:
            nonlocal started_total
            j = Joiner(self._config(), self.mdd, time.monotonic())
            active[j.sock.fileno()] = j
            ep.register(j.sock.fileno(), select.EPOLLIN)
            started_total += 1

        def finish(fd: int, j: Joiner) -> None:
            ep.unregister(fd)
            del active[fd]
            j.sock.close()

        while want_more() and len(active) < concurrency:
            launch()
        while active:
            now = time.monotonic()
            timers = [t for j in active.values() if (t := j.conn.get_timer()) is not None]
            timeout = max(0.0, min(timers) - now) if timers else 1.0
            ready = ep.poll(min(timeout, 1.0))
            now = time.monotonic()
            for fd, _ in ready:
                j = active.get(fd)
                if j is None:
                    continue
                while True:
                    try:
                        data = j.sock.recv(65535)
                    except BlockingIOError:
                        break
                    except OSError:
                        continue
                    j.conn.receive_datagram(data, now)
            for fd, j in list(active.items()):
                t = j.conn.get_timer()
                if t is not None and now >= t:
                    j.conn.handle_timer(now)
                done = False
                while (e := j.conn.next_event()) is not None:
                    if isinstance(e, HandshakeCompleted):
                        j.completed = True
                    elif isinstance(e, EktKeyReceived) and j.completed:
                        times.append(now - j.started)
                        done = True
                    elif isinstance(e, ConnectionClosed):
                        failures += 1
                        done = True
                        break
                if done and not j.conn.is_closed:
                    j.flush()  # the EKTKey ACK (D9)
                    j.conn.close(now)  # leave: close_notify, the KMF tells the MDD
                j.flush()
                if done:
                    finish(fd, j)
                    if want_more():
                        launch()
                elif now - j.started > 30.0:
                    failures += 1
                    finish(fd, j)
        ep.close()
        return times, failures, time.monotonic() - t0


# --- baseline ----------------------------------------------------------------------------------


def baseline(endpoints: list[Identity], kmf_fp_id: Identity, count: int) -> list[float]:
    """In-memory client+server join (handshake + EKTKey), this process, no network."""
    server_config = DtlsConfiguration(
        is_client=False, certificate=kmf_fp_id.certificate, private_key=kmf_fp_id.private_key
    )
    out = []
    for i in range(count):
        e = endpoints[i % len(endpoints)]
        client_config = dtls_configuration(
            JoinSettings(mdd=(LOCAL, 1), identity=e, kmf_fingerprint=kmf_fp_id.fingerprint),
            random_tls_id(),
            None,
        )
        t = time.perf_counter()
        client, server = DtlsConnection(client_config), DtlsConnection(server_config)
        client.connect(0.0)
        got = False
        for _ in range(20):
            for dg in client.datagrams_to_send():
                server.receive_datagram(dg, 0.0)
            while (ev := server.next_event()) is not None:
                if isinstance(ev, HandshakeCompleted):
                    server.send_ekt_key(os.urandom(16), os.urandom(12), 1, 86400, 0.0)
            for dg in server.datagrams_to_send():
                client.receive_datagram(dg, 0.0)
            while (ev := client.next_event()) is not None:
                got = got or isinstance(ev, EktKeyReceived)
            if got:
                break
        if not got:
            raise SystemExit("baseline join did not complete")
        out.append(time.perf_counter() - t)
    return out


# --- report ------------------------------------------------------------------------------------


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


TABLE = harness.Table(
    ("row", "<28"),
    ("joins", ">6"),
    ("failed", ">6"),
    ("elapsed s", ">9.2f"),
    ("joins/s", ">8.1f"),
    ("p50 ms", ">7.1f"),
    ("p90 ms", ">7.1f"),
    ("p99 ms", ">7.1f"),
    (" target", ""),
)


def row(name: str, times: list[float], failures: int, elapsed: float, target: str) -> None:
    rate = len(times) / elapsed if elapsed > 0 else 0.0
    TABLE.row(
        name,
        len(times),
        failures,
        elapsed,
        rate,
        pct(times, 0.5) * 1e3,
        pct(times, 0.9) * 1e3,
        pct(times, 0.99) * 1e3,
        f" {target}",
    )


def print_profile(path: Path, role: str, limit: int = 25) -> None:
    stats = pstats.Stats(str(path))
    stats.sort_stats("tottime")
    print(f"\n{role.upper()} profile (cProfile, top {limit} by own time):")
    stats.print_stats(limit)


def main(argv: list[str] | None = None) -> int:
    parser = harness.parser(__doc__, check=True)
    parser.add_argument("--seconds", type=float, default=5.0, help="saturation run length")
    parser.add_argument(
        "--concurrency",
        default="16,64,256",
        help="joiners in flight for the saturation runs, comma-separated (the best rate counts)",
    )
    parser.add_argument("--joins", type=int, default=300, help="joins in the 10-concurrent run")
    parser.add_argument("--identities", type=int, default=1100, help="distinct endpoint certs")
    parser.add_argument("--baseline", type=int, default=200, help="in-memory joins")
    parser.add_argument("--rekey", action="store_true", help="conference rekeys on join/leave")
    parser.add_argument(
        "--profile", choices=("kmf", "mdd"), default=None, help="run that role under cProfile"
    )
    parser.add_argument("--keep", type=Path, default=None, help="use (and keep) this folder")
    args = harness.parse(
        parser,
        argv,
        quick={"seconds": 0.3, "concurrency": "4", "joins": 5, "identities": 4, "baseline": 3},
    )

    endpoints = [identity.generate(f"ep{i}") for i in range(args.identities)]
    with tempfile.TemporaryDirectory(prefix="perc-join-storm-") as tmp:
        folder = Path(tmp) if args.keep is None else args.keep
        folder.mkdir(parents=True, exist_ok=True)
        roles = harness.start_roles(
            folder,
            [e.fingerprint for e in endpoints],
            conference="storm",
            rekey=args.rekey,
            profile=args.profile,
        )
        levels = [int(c) for c in args.concurrency.split(",")]
        saturation: list[tuple[int, Run, dict[str, float]]] = []
        try:
            gen = LoadGenerator(roles.mdd_address, endpoints, roles.kmf_fingerprint)
            # warm-up: imports, first tunnel writes, caches
            gen.run(4, joins=min(20, args.joins))
            latency = gen.run(10, joins=args.joins)
            pids = {"kmf": roles.kmf.pid, "mdd": roles.mdd.pid, "load generator": None}
            for level in levels:
                before = {n: cpu_seconds(p) for n, p in pids.items()}
                result = gen.run(level, seconds=args.seconds)
                cpu = {n: cpu_seconds(p) - before[n] for n, p in pids.items()}
                saturation.append((level, result, cpu))
        finally:
            codes = roles.stop()
        base = baseline(endpoints, identity.generate("kmf-baseline"), args.baseline)
        harness.print_machine()
        print(
            f"join storm: {args.identities} endpoint identities -> perc mdd -> perc kmf "
            f"(processes, loopback; rekey on join/leave: {'on' if args.rekey else 'off'}); "
            f"{os.cpu_count()} CPUs shared by all three"
        )
        TABLE.header()
        row("baseline: in-memory pair", base, 0, sum(base), "(floor: one core, no network)")
        rates = [len(r[0]) / r[2] for _, r, _ in saturation]
        best = max(rates)
        for (level, (times, failed, elapsed), _), rate in zip(saturation, rates, strict=True):
            note = ""
            if rate == best:
                note = f"saturation: >= {TARGET_RATE:.0f} joins/s: "
                note += "met" if rate >= TARGET_RATE else "MISSED"
            row(f"{level} in flight", times, failed, elapsed, note)
        times10, failed10, elapsed10 = latency
        p50 = pct(times10, 0.5) * 1e3
        row(
            "10 concurrent",
            times10,
            failed10,
            elapsed10,
            f"p50 <= {TARGET_P50_MS:.0f} ms: {'met' if p50 <= TARGET_P50_MS else 'MISSED'}",
        )
        print()
        base_p50_ms = pct(base, 0.5) * 1e3
        harness.ratio("10 concurrent p50", "in-memory join", p50 / base_p50_ms)
        harness.ratio("saturation joins/s", "in-memory joins/s", best * sum(base) / len(base))
        print("CPU per process during each saturation run (share of one core, ms per join):")
        for level, (times, _, elapsed), cpu in saturation:
            print(
                f"  {level:>4} in flight: "
                + ", ".join(
                    f"{n} {100 * c / elapsed:.0f}% {1e3 * c / max(1, len(times)):.2f} ms"
                    for n, c in cpu.items()
                )
            )
        if any(codes):
            print(f"warning: exit statuses kmf={codes[0]} mdd={codes[1]}")
        if args.profile:
            print_profile(folder / f"{args.profile}.prof", args.profile)
        failures = failed10 + sum(r[1] for _, r, _ in saturation)
        met = best >= TARGET_RATE and p50 <= TARGET_P50_MS
    if failures:
        print(f"{failures} joins failed")
        return 1
    return 1 if (args.check and not met) else 0


if __name__ == "__main__":
    sys.exit(main())
