"""Rekey latency (D22, D31): leave -> every stayer on the new SPI, and joins with rekey on.

Run: ``.venv/bin/python bench/rekey.py`` (or ``bash dev.sh bench rekey``). Options: ``--sizes
N,N`` (conference sizes, default 3,10,30), ``--leaves L`` (timed leaves per size, default 20),
``--joins J`` (the 10-concurrent join run, default 200), ``--seconds S`` (each saturation run,
default 4), ``--concurrency C,C`` (joiners in flight at saturation, default 16,64),
``--window W`` (the conference's ``rekey_window``, default 0.05, perc's default),
``--identities K`` (distinct joiner certificates, default 1100 as in join_storm, more than the
KMF's certificate-validation cache), ``--kmf-extra LINES`` (more ``[kmf]`` lines for the join
runs, e.g. ``persist_keys = false`` or ``state = ""`` to compare what the KMF's state costs),
``--keep DIR`` (keep configs and logs), ``--check`` (exit
1 if a target is missed), ``--quick`` (N=3, one leave, 5 joins, 4 in flight for 0.3 s, 4
identities: a smoke run).

Set-up: real ``perc kmf`` and ``perc mdd`` processes (bench/harness.py ``start_roles``, the
conference's default policy: rekey on join and leave, ``rekey_window`` 0.05 s unless
``--window``) with
``--log-format json``. The N members live in this process: one UDP socket each and perc's
sans-IO DTLS client (:func:`perc.endpoint.dtls_configuration`, the endpoint's ClientHello),
answering every EKTKey with its ACK (D9) as an endpoint does. They send no media: what is
measured is the key path (KMF -> tunnel -> MDD -> endpoint), not the media engine.

Leave rows (one per N): the members join and settle on one SPI; then, ``L`` times: wait a
quiet period (``rekey_window``, so D31's leading edge applies), one member sends close_notify
and closes its socket; the time counts from the KMF's ``kmf_left`` event for it (its
close_notify reaching the KMF; the event's timestamp, milliseconds, same host clock) until the
last stayer has processed an EKTKey with the new SPI (``EktKeyReceived``). ``kmf
left->rekeyed`` is the KMF's own share (its ``kmf_rekeyed`` event for the leave). After
another quiet period a fresh member joins in its place, so N stays N: ``join after quiet`` is
its join time (first ClientHello to first EKTKey, the key made for its join).

Join rows: :class:`join_storm.LoadGenerator` (bench/join_storm.py) against a second KMF+MDD
pair with rekey on: 10 joiners always in flight for ``J`` joins (p50), and ``C`` in flight for
``S`` seconds (joins/s). Each joiner leaves right after its first EKTKey, so joins and leaves
keep the conference rekeying: with D31 a join right after a rekey waits for the batched one at
the end of the window, which is what these rows show under continuous churn.

Targets (this 2-core machine, load generator included): leave -> new SPI p99 <= 300 ms at
N = 10; join p50 <= 50 ms at 10 concurrent joiners; >= 200 joins/s at saturation.
"""

from __future__ import annotations

import datetime
import json
import select
import socket
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import harness
import join_storm

from perc import identity
from perc.dtls import DtlsConfiguration, DtlsConnection
from perc.dtls.events import ConnectionClosed, EktKeyReceived, HandshakeCompleted
from perc.endpoint import JoinSettings, dtls_configuration
from perc.identity import Identity
from perc.tlsid import random_tls_id

TARGET_LEAVE_P99_MS = 300.0
TARGET_JOIN_P50_MS = join_storm.TARGET_P50_MS
TARGET_RATE = join_storm.TARGET_RATE
#: perc's default rekey_window (D22): a leave after this much quiet is D31's leading edge
WINDOW = 0.05
CONFERENCE = "rekey"


class Member:
    """One endpoint's key path: a UDP socket to the MDD and a sans-IO DTLS client."""

    def __init__(self, ident: Identity, config: DtlsConfiguration, mdd: tuple[str, int]) -> None:
        self.ident = ident
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setblocking(False)
        self.sock.connect(mdd)
        self.conn = DtlsConnection(config)
        self.started = time.time()
        self.joined = False
        #: (SPI, wall-clock time it was processed) of every EKTKey, in order
        self.keys: list[tuple[int, float]] = []
        self.conn.connect(time.monotonic())
        self.flush()

    @property
    def spi(self) -> int | None:
        return self.keys[-1][0] if self.keys else None

    def flush(self) -> None:
        for dg in self.conn.datagrams_to_send():
            try:
                self.sock.send(dg)
            except OSError:
                pass  # loss: DTLS retransmits


class Conference:
    """The members of one conference, driven by one epoll loop."""

    def __init__(self, mdd: tuple[str, int], kmf_fingerprint: str) -> None:
        self.mdd = mdd
        self.kmf_fingerprint = kmf_fingerprint
        self.ep = select.epoll()
        self.members: dict[int, Member] = {}

    def add(self, ident: Identity) -> Member:
        settings = JoinSettings(mdd=self.mdd, identity=ident, kmf_fingerprint=self.kmf_fingerprint)
        m = Member(ident, dtls_configuration(settings, random_tls_id(), None), self.mdd)
        self.members[m.sock.fileno()] = m
        self.ep.register(m.sock.fileno(), select.EPOLLIN)
        return m

    def remove(self, m: Member) -> None:
        """close_notify, then close the socket (the KMF's leave path, D3)."""
        m.conn.close(time.monotonic())
        m.flush()
        fd = m.sock.fileno()
        self.ep.unregister(fd)
        del self.members[fd]
        m.sock.close()

    def pump(self, until: float) -> None:
        """Run the members (datagrams, timers, events) for at most ``until - now`` seconds."""
        while (now := time.monotonic()) < until:
            timers = [t for m in self.members.values() if (t := m.conn.get_timer()) is not None]
            timeout = min([until, *timers]) - now
            for fd, _ in self.ep.poll(max(0.0, min(timeout, 0.05))):
                m = self.members.get(fd)
                while m is not None:
                    try:
                        data = m.sock.recv(65535)
                    except OSError:
                        break
                    m.conn.receive_datagram(data, time.monotonic())
            now = time.monotonic()
            for m in self.members.values():
                t = m.conn.get_timer()
                if t is not None and now >= t:
                    m.conn.handle_timer(now)
                while (e := m.conn.next_event()) is not None:
                    if isinstance(e, HandshakeCompleted):
                        m.joined = True
                    elif isinstance(e, EktKeyReceived):
                        m.keys.append((e.spi, time.time()))
                    elif isinstance(e, ConnectionClosed):
                        raise SystemExit(f"a member's association ended: {e}")
                m.flush()  # ACKs (D9)

    def wait(self, predicate: object, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():  # type: ignore[operator]
            if time.monotonic() > deadline:
                raise SystemExit("timed out waiting for the conference to settle")
            self.pump(time.monotonic() + 0.005)

    def settled(self) -> bool:
        spis = {m.spi for m in self.members.values()}
        return len(spis) == 1 and None not in spis


def moved_on(conf: Conference, stayers: list[Member], old: int | None) -> bool:
    """Every stayer holds a key newer than ``old`` and all hold the same one."""
    return all(m.spi not in (None, old) for m in stayers) and conf.settled()


def kmf_events(log: Path, kind: str) -> list[tuple[float, dict[str, object]]]:
    """(wall-clock time, data) of each ``kind`` event in a ``--log-format json`` log."""
    out = []
    for line in log.read_text(errors="replace").splitlines():
        if not line.startswith("{"):
            continue
        try:
            obj = json.loads(line)
        except ValueError:
            continue
        if obj.get("event") == kind:
            ts = datetime.datetime.strptime(obj["ts"], "%Y-%m-%dT%H:%M:%S.%fZ")
            out.append((ts.replace(tzinfo=datetime.UTC).timestamp(), obj["data"]))
    return out


def leave_run(
    folder: Path, n: int, leaves: int, window: float
) -> tuple[list[float], list[float], list[float]]:
    """N members, ``leaves`` timed leaves; (leave -> all stayers on the new SPI, KMF left ->
    rekeyed, the replacement's join after a quiet period), seconds each."""
    idents = [identity.generate(f"m{n}-{i}") for i in range(n + leaves)]
    roles = harness.start_roles(
        folder,
        [i.fingerprint for i in idents],
        conference=CONFERENCE,
        rekey=True,
        log_format="json",
        rekey_window=window,
    )
    conf = Conference(roles.mdd_address, roles.kmf_fingerprint)
    spare = iter(idents[n:])
    to_spi: list[float] = []
    kmf_share: list[float] = []
    joins: list[float] = []
    try:
        for ident in idents[:n]:
            conf.add(ident)
        conf.wait(lambda: conf.settled() and len(conf.members) == n)
        for r in range(leaves):
            conf.pump(time.monotonic() + window + 0.05)  # a quiet period: D31's leading edge
            conf.wait(conf.settled)
            members = list(conf.members.values())
            leaver = members[r % len(members)]
            old = leaver.spi
            conf.remove(leaver)
            stayers = list(conf.members.values())
            conf.wait(partial(moved_on, conf, stayers, old))
            new = stayers[0].spi
            done = max(next(t for spi, t in m.keys if spi == new) for m in stayers)
            fp = leaver.ident.fingerprint
            deadline = time.monotonic() + 5.0
            while True:
                lefts = kmf_events(roles.kmf.log, "kmf_left")
                left = [t for t, d in lefts if d["fingerprint"] == fp]
                if left or time.monotonic() > deadline:
                    break
                time.sleep(0.01)
            if not left:
                raise SystemExit(f"no kmf_left event for {fp}")
            rekeyed = [t for t, d in kmf_events(roles.kmf.log, "kmf_rekeyed") if d["spi"] == new]
            to_spi.append(done - left[-1])
            if rekeyed:
                kmf_share.append(rekeyed[-1] - left[-1])
            # Keep N members: after a quiet period a fresh member joins (D31: its join rekeys
            # at once), timed from its first ClientHello to its first EKTKey.
            conf.pump(time.monotonic() + window + 0.05)
            joiner = conf.add(next(spare))
            conf.wait(lambda: conf.settled() and len(conf.members) == n)
            joins.append(joiner.keys[0][1] - joiner.started)
    finally:
        for m in list(conf.members.values()):
            conf.remove(m)
        roles.stop()
    return to_spi, kmf_share, joins


TABLE = harness.Table(
    ("row", "<30"),
    ("count", ">6"),
    ("p50 ms", ">8.1f"),
    ("p99 ms", ">8.1f"),
    ("max ms", ">8.1f"),
    ("joins/s", ">8.1f"),
    (" target", ""),
)


def main(argv: list[str] | None = None) -> int:
    parser = harness.parser(__doc__, check=True)
    parser.add_argument("--sizes", default="3,10,30", help="conference sizes, comma-separated")
    parser.add_argument("--leaves", type=int, default=20, help="timed leaves per size")
    parser.add_argument("--joins", type=int, default=200, help="joins in the 10-concurrent run")
    parser.add_argument("--seconds", type=float, default=4.0, help="saturation run length")
    parser.add_argument("--concurrency", default="16,64", help="joiners in flight")
    parser.add_argument("--window", type=float, default=WINDOW, help="rekey_window, seconds")
    parser.add_argument("--identities", type=int, default=1100, help="distinct joiner certs")
    parser.add_argument("--keep", type=Path, default=None, help="use (and keep) this folder")
    parser.add_argument(
        "--kmf-extra", default="", help="more [kmf] lines for the join runs, e.g. 'state = \"\"'"
    )
    args = harness.parse(
        parser,
        argv,
        quick={
            "sizes": "3",
            "leaves": 1,
            "joins": 5,
            "seconds": 0.3,
            "concurrency": "4",
            "identities": 4,
        },
    )
    sizes = [int(s) for s in args.sizes.split(",")]
    levels = [int(c) for c in args.concurrency.split(",")]
    with tempfile.TemporaryDirectory(prefix="perc-rekey-") as tmp:
        root = Path(tmp) if args.keep is None else args.keep
        leave_rows = []
        for n in sizes:
            folder = root / f"leave-{n}"
            folder.mkdir(parents=True, exist_ok=True)
            leave_rows.append((n, *leave_run(folder, n, args.leaves, args.window)))
        folder = root / "joins"
        folder.mkdir(parents=True, exist_ok=True)
        joiners = [identity.generate(f"j{i}") for i in range(args.identities)]
        roles = harness.start_roles(
            folder,
            [j.fingerprint for j in joiners],
            conference="joins",
            rekey=True,
            rekey_window=args.window,
            kmf_extra=args.kmf_extra.replace("\\n", "\n") + "\n" if args.kmf_extra else "",
        )
        try:
            gen = join_storm.LoadGenerator(roles.mdd_address, joiners, roles.kmf_fingerprint)
            gen.run(4, joins=min(20, args.joins))  # warm-up
            latency = gen.run(10, joins=args.joins)
            saturation = [gen.run(c, seconds=args.seconds) for c in levels]
        finally:
            codes = roles.stop()

    harness.print_machine()
    print(
        "rekey: perc kmf + perc mdd (processes, loopback, rekey on join and leave, "
        f"rekey_window {args.window:g} s, D31 leading edge); members and joiners in this process "
        "(perc DTLS clients, no media)"
    )
    TABLE.header()
    met = True
    leave_p99: dict[int, float] = {}
    for n, to_spi, share, quiet_joins in leave_rows:
        p99 = join_storm.pct(to_spi, 0.99) * 1e3
        leave_p99[n] = p99
        note = ""
        if n == 10:
            ok = p99 <= TARGET_LEAVE_P99_MS
            met = met and ok
            note = f" p99 <= {TARGET_LEAVE_P99_MS:.0f} ms: {'met' if ok else 'MISSED'}"
        TABLE.row(
            f"leave -> new SPI, N={n}",
            len(to_spi),
            join_storm.pct(to_spi, 0.5) * 1e3,
            p99,
            max(to_spi) * 1e3,
            "-",
            note,
        )
        TABLE.row(
            f"  kmf left->rekeyed, N={n}",
            len(share),
            join_storm.pct(share, 0.5) * 1e3,
            join_storm.pct(share, 0.99) * 1e3,
            max(share, default=float("nan")) * 1e3,
            "-",
            "",
        )
        TABLE.row(
            f"join after quiet, N={n}",
            len(quiet_joins),
            join_storm.pct(quiet_joins, 0.5) * 1e3,
            join_storm.pct(quiet_joins, 0.99) * 1e3,
            max(quiet_joins, default=float("nan")) * 1e3,
            "-",
            " (D31 leading edge: handshake + rekey)",
        )
    times10, failed10, elapsed10 = latency
    p50 = join_storm.pct(times10, 0.5) * 1e3
    ok = p50 <= TARGET_JOIN_P50_MS and not failed10
    met = met and ok
    TABLE.row(
        "join, 10 concurrent",
        len(times10),
        p50,
        join_storm.pct(times10, 0.99) * 1e3,
        max(times10, default=float("nan")) * 1e3,
        len(times10) / elapsed10 if elapsed10 > 0 else 0.0,
        f" p50 <= {TARGET_JOIN_P50_MS:.0f} ms: {'met' if ok else 'MISSED'}",
    )
    rates = [len(t) / e if e > 0 else 0.0 for t, _, e in saturation]
    best = max(rates)
    for level, (times, _, _), rate in zip(levels, saturation, rates, strict=True):
        note = ""
        if rate == best:
            note = f" >= {TARGET_RATE:.0f} joins/s: {'met' if rate >= TARGET_RATE else 'MISSED'}"
        TABLE.row(
            f"join, {level} in flight",
            len(times),
            join_storm.pct(times, 0.5) * 1e3,
            join_storm.pct(times, 0.99) * 1e3,
            max(times, default=float("nan")) * 1e3,
            rate,
            note,
        )
    met = met and best >= TARGET_RATE
    print()
    for n, p99 in leave_p99.items():
        harness.ratio(
            f"leave -> new SPI p99 ms (N={n})",
            "target ms",
            p99 / TARGET_LEAVE_P99_MS,
            at_most=1.0 if n == 10 else None,
        )
    harness.ratio("join p50 ms (10 concurrent)", "target ms", p50 / TARGET_JOIN_P50_MS, at_most=1.0)
    harness.ratio("joins/s at saturation", "target joins/s", best / TARGET_RATE, at_least=1.0)
    if any(codes):
        print(f"warning: exit statuses kmf={codes[0]} mdd={codes[1]}")
    failures = failed10 + sum(r[1] for r in saturation)
    if failures:
        print(f"{failures} joins failed")
        return 1
    return 1 if (args.check and not met) else 0


if __name__ == "__main__":
    sys.exit(main())
