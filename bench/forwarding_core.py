"""Forwarding-core speed: deliveries/s of perc.forwarding against two baselines in the same run.

Run: ``.venv/bin/python bench/forwarding_core.py`` (or ``bash dev.sh bench forwarding_core``).
Options: ``--packets N`` (incoming packets per timed run, default 2000), ``--receivers R``
(default 10), ``--repeats K`` (best of K, default 7), ``--bits 128|256`` (outer key size,
default 128), ``--check`` (exit 1 if a core row misses the per-delivery target), ``--members
K,K`` (see below), ``--quick`` (40 packets, 3 receivers, 1 repeat, members 4: a smoke run).

What is timed: one sender's pre-encrypted double-encrypted SRTP (made by a real DoubleSender,
EKT tags on the RFC 8870 §4.6 schedule: Full on the first three packets and every 100 ms for
audio, on every keyframe for video) goes through ``ForwardingTable.handle_datagram`` of a
conference of ``1 + R`` endpoints; each incoming packet becomes ``R`` outgoing datagrams. A
*delivery* is one outgoing datagram. Rows:

- ``core audio``: 160-byte payload, PT 111 (always forwarded).
- ``core video``: 1200-byte payload, PT 96, last_n off.
- ``core video last_n=R``: the same with last_n on (every receiver wants the stream, so the
  last_n bookkeeping is paid but nothing is withheld or renumbered).
- ``core video renumbered``: last_n on and the stream resumed for every receiver after a
  pause, so every delivery is SEQ-rewritten with an OHB (the hop's ``rewrite``, then the
  receiver's seal).

- ``core audio over a worker mesh link``: the same packets through two tables joined by a
  D27 worker-mesh link, the sender and half the receivers on one, the rest on the other, so
  each packet is sealed once more for the link and opened and fanned out by the second
  table. Not held to the target: its ratio to ``core audio`` is what splitting a conference
  over two workers costs per delivery before any I/O (bench/cascade.py part a measures the
  processes).

Baselines per size, measured alternately with the core rows:

- ``python copy relay``: the per-delivery floor of any Python relay: for each incoming packet
  a Python loop builds ``(address, copy of the datagram)`` for R destinations.
- ``pylibsrtp 1 unprotect + R protect``: the crypto work a hop-by-hop relay must do (libsrtp,
  single-layer AES-GCM, no EKT, no OHB) with R outbound sessions.

Membership table (``--members K,K``, default 16,64,256): microseconds of table work per
join + leave of one endpoint (``add``, ``install_keys`` with its two SRTP sessions,
``remove``) in a conference of K keyed associations; baseline: the same table class with the
pre-incremental route upkeep (every route list rebuilt from scratch on each install_keys and
remove, O(K^2)), measured alternately in the same run.

Output (bench/harness.py): microseconds per delivery, deliveries/s, the core's cost relative
to each baseline, and per size the lines ``ratio core audio|video / python copy relay`` and
``ratio core audio|video / pylibsrtp`` (cost per delivery). Target (from the system goal of
150,000 deliveries/s for the whole MDD process, whose I/O shell costs at least as much again):
the core alone at <= 3 us per delivery.
Fresh state per timed run (a table refuses replays). The garbage collector is off while timing.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import struct
import sys
import uuid
from dataclasses import dataclass

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

import harness
from harness import Factory, Runner
from pylibsrtp import Policy, Session

from perc.forwarding import Association, ForwardingConfig, ForwardingTable
from perc.srtp.double import DoubleSender
from perc.srtp.ekt import EktCipher, EktParameterSet
from perc.srtp.keys import exporter_length, outer_media_keys, split_exporter
from perc.wire.tunnel import MediaKeys
from perc.workers import MESH_GROUP

Address = tuple[str, int]
TARGET_US = 3.0


@dataclass(frozen=True)
class Row:
    name: str
    size: int
    factory: Factory
    core: bool  # a perc row (checked against the target) or a baseline


def _rtp(i: int, size: int, pt: int, ssrc: int, *, marker: bool) -> bytes:
    payload = (bytes(range(256)) * (size // 256 + 1))[:size]
    return (
        struct.pack(
            "!BBHII",
            0x80,
            (0x80 if marker else 0) | pt,
            (1000 + i) & 0xFFFF,
            (160 * i) & 0xFFFFFFFF,
            ssrc,
        )
        + payload
    )


class Conference:
    """Keys for 1 sender + R receivers and the sender's pre-encrypted packets."""

    def __init__(self, n: int, size: int, pt: int, receivers: int, bits: int) -> None:
        profile = 0x0009 if bits == 128 else 0x000A
        cipher = EktCipher.AESKW_128 if bits == 128 else EktCipher.AESKW_256
        params = EktParameterSet(1, cipher, os.urandom(cipher.key_length), os.urandom(12))
        self.keys: list[MediaKeys] = []
        self.addresses: list[Address] = []
        sender: DoubleSender | None = None
        for i in range(1 + receivers):
            material = os.urandom(exporter_length(profile))
            ck, sk, cs, ss = outer_media_keys(profile, material)
            self.keys.append(MediaKeys(uuid.uuid4(), profile, b"", ck, sk, cs, ss))
            self.addresses.append(("10.0.0.1", 5000 + i))
            if i == 0:
                sender = DoubleSender.for_endpoint(split_exporter(profile, material), params)
        assert sender is not None
        video = pt == 96
        # Video: 5 packets per frame, marker on the last, a keyframe every 30 frames.
        self.packets = [
            sender.protect(
                _rtp(i, size, pt, 0x5501A0B2, marker=video and i % 5 == 4),
                i * 0.02,
                keyframe=video and i % 150 == 0,
            )
            for i in range(n)
        ]
        # The same packets as plain single-layer SRTP for the libsrtp baseline.
        self.key_bytes = bits // 8
        self.plain = [_rtp(i, size, pt, 0x5501A0B2, marker=False) for i in range(n)]

    def table(self, config: ForwardingConfig) -> ForwardingTable[Address]:
        table: ForwardingTable[Address] = ForwardingTable(config)
        for keys, address in zip(self.keys, self.addresses, strict=True):
            table.add(keys.association_id, address, 0.0)
            table.install_keys(keys, 0.0)
        return table


def core_factory(conf: Conference, config: ForwardingConfig, *, renumber: bool) -> Factory:
    def factory() -> Runner:
        table = conf.table(config)
        handle = table.handle_datagram
        src = conf.addresses[0]
        packets = conf.packets
        if renumber:
            # A stream that paused for everyone: run the first frames, force every feed off
            # (as a ranking change would), skip a frame's worth of input, then resume.
            for p in packets[:10]:
                handle(src, p, 0.0)
            for vs in table._video.values():
                for feed in vs.feeds.values():
                    feed.on = feed.want = False
            for p in packets[10:15]:
                handle(src, p, 0.0)
            for vs in table._video.values():
                for feed in vs.feeds.values():
                    feed.want = True
            packets = packets[15:]

        def run() -> object:
            for p in packets:
                handle(src, p, 0.0)
            return table

        return run

    return factory


#: The two workers of the mesh row, as each other's link peer.
_WORKER_A: Address = ("127.0.0.1", 40001)
_WORKER_B: Address = ("127.0.0.1", 40002)


def mesh_factory(conf: Conference, config: ForwardingConfig) -> Factory:
    """The same packets through two tables joined by a worker-mesh link (D27): the sender and
    the first half of the receivers on one, the other half on the other, so every packet
    crosses the link once (sealed for the link, then opened and fanned out by the second
    table). What a split conference costs beyond the deliveries, without any I/O."""

    def factory() -> Runner:
        a: ForwardingTable[Address] = ForwardingTable(config)
        b: ForwardingTable[Address] = ForwardingTable(config)
        half = 1 + (len(conf.keys) - 1) // 2
        for i, (keys, address) in enumerate(zip(conf.keys, conf.addresses, strict=True)):
            table = a if i < half else b
            table.add(keys.association_id, address, 0.0)
            table.install_keys(keys, 0.0)
        size = conf.key_bytes
        ab, ba = (os.urandom(size), os.urandom(12)), (os.urandom(size), os.urandom(12))
        a.add_link(uuid.uuid4(), _WORKER_B, 0.0, inbound=ba, outbound=ab, name="w1",
                   group=MESH_GROUP)  # fmt: skip
        b.add_link(uuid.uuid4(), _WORKER_A, 0.0, inbound=ab, outbound=ba, name="w0",
                   group=MESH_GROUP)  # fmt: skip
        handle_a, handle_b = a.handle_datagram, b.handle_datagram
        src = conf.addresses[0]
        packets = conf.packets

        def run() -> object:
            for p in packets:
                for dest, out in handle_a(src, p, 0.0):
                    if dest == _WORKER_B:
                        handle_b(_WORKER_A, out, 0.0)
            return a

        return run

    return factory


def copy_factory(conf: Conference) -> Factory:
    def factory() -> Runner:
        dests = conf.addresses[1:]
        packets = conf.packets

        def run() -> object:
            for p in packets:
                out = []
                append = out.append
                for address in dests:
                    append((address, memoryview(p).tobytes()))
            return None

        return run

    return factory


def libsrtp_factory(conf: Conference) -> Factory:
    profile = (
        Policy.SRTP_PROFILE_AEAD_AES_128_GCM
        if conf.key_bytes == 16
        else Policy.SRTP_PROFILE_AEAD_AES_256_GCM
    )

    def session(outbound: bool, key: bytes) -> Session:
        return Session(
            Policy(
                key=key,
                ssrc_type=Policy.SSRC_ANY_OUTBOUND if outbound else Policy.SSRC_ANY_INBOUND,
                srtp_profile=profile,
            )
        )

    in_key = os.urandom(conf.key_bytes + 12)
    ref = session(True, in_key)
    wire = [ref.protect(p) for p in conf.plain]
    n_out = len(conf.addresses) - 1

    def factory() -> Runner:
        unprotect = session(False, in_key).unprotect
        dests = [
            (a, session(True, os.urandom(conf.key_bytes + 12)).protect)
            for a in conf.addresses[1 : 1 + n_out]
        ]

        def run() -> object:
            for p in wire:
                plain = unprotect(p)
                out = []
                append = out.append
                for address, protect in dests:
                    append((address, protect(plain)))
            return None

        return run

    return factory


class RebuildingTable(ForwardingTable[Address]):
    """Baseline: the pre-incremental route upkeep (a full O(K^2) rebuild per change)."""

    def _rebuild(self) -> None:
        self.flush()
        keyed = [a for a in self._by_id.values() if a._protect_rtp is not None]
        for a in keyed:
            others = [b for b in keyed if b is not a]
            a._routes = [(b.address, b._protect_rtp) for b in others if b._protect_rtp]
            a._route_counters = [b._counters for b in others]
            a._rtcp_routes = others
        if self._last_n is not None:
            for vs in self._video.values():
                self._sync_feeds(vs)
            self._rerank(-1.0)

    def _join_routes(self, r: Association[Address]) -> None:
        self._rebuild()

    def _replace_routes(self, r: Association[Address]) -> None:
        self._rebuild()

    def _leave_routes(self, r: Association[Address]) -> None:
        self._rebuild()


def _media_keys(profile: int = 0x0009) -> MediaKeys:
    material = os.urandom(exporter_length(profile))
    ck, sk, cs, ss = outer_media_keys(profile, material)
    return MediaKeys(uuid.uuid4(), profile, b"", ck, sk, cs, ss)


def membership_factory(cls: type[ForwardingTable[Address]], members: int, joins: int) -> Factory:
    """``joins`` endpoints each join (keys) and leave a conference of ``members`` keyed ones."""
    base = [_media_keys() for _ in range(members)]
    extra = [_media_keys() for _ in range(joins)]

    def factory() -> Runner:
        table = cls(ForwardingConfig(max_associations=members + 1))
        for i, keys in enumerate(base):
            table.add(keys.association_id, ("10.0.0.1", 5000 + i), 0.0)
            table.install_keys(keys, 0.0)

        def run() -> object:
            for keys in extra:
                table.add(keys.association_id, ("10.0.0.2", 5000), 0.0)
                table.install_keys(keys, 0.0)
                table.remove(keys.association_id)
            return table

        return run

    return factory


def main(argv: list[str] | None = None) -> int:
    parser = harness.parser(__doc__, repeats=7, check=True)
    parser.add_argument("--packets", type=int, default=2000)
    parser.add_argument("--receivers", type=int, default=10)
    parser.add_argument("--bits", type=int, choices=(128, 256), default=128)
    parser.add_argument("--members", default="16,64,256", help="conference sizes, join+leave")
    args = harness.parse(parser, argv, quick={"packets": 40, "receivers": 3, "members": "4"})
    n, r = args.packets, args.receivers
    audio = Conference(n, 160, 111, r, args.bits)
    video = Conference(n, 1200, 96, r, args.bits)
    plain = ForwardingConfig()
    last_n = ForwardingConfig(last_n=r)
    groups: list[tuple[Conference, list[Row]]] = [
        (
            audio,
            [
                Row("core audio", 160, core_factory(audio, plain, renumber=False), True),
                Row("core audio over a worker mesh link", 160, mesh_factory(audio, plain), False),
                Row("python copy relay", 160, copy_factory(audio), False),
                Row(f"pylibsrtp 1 unprotect + {r} protect", 160, libsrtp_factory(audio), False),
            ],
        ),
        (
            video,
            [
                Row("core video", 1200, core_factory(video, plain, renumber=False), True),
                Row(
                    f"core video last_n={r}",
                    1200,
                    core_factory(video, last_n, renumber=False),
                    True,
                ),
                Row(
                    "core video renumbered (OHB)",
                    1200,
                    core_factory(video, last_n, renumber=True),
                    True,
                ),
                Row("python copy relay", 1200, copy_factory(video), False),
                Row(f"pylibsrtp 1 unprotect + {r} protect", 1200, libsrtp_factory(video), False),
            ],
        ),
    ]
    harness.print_machine()
    print(
        f"AES-{args.bits}-GCM, 1 sender -> {r} receivers, {n} incoming packets per run, "
        f"best of {args.repeats}; us = microseconds per delivery (one outgoing datagram)"
    )
    table = harness.Table(
        ("row", "<36"),
        ("bytes", ">5"),
        ("us", ">7.3f"),
        ("deliveries/s", ">13,.0f"),
        ("vs copy", ">8"),
        ("vs libsrtp", ">10"),
        (" target", ""),
    )
    table.header()
    failed = 0
    summary: list[tuple[str, float, float, float]] = []  # row, us, copy us, libsrtp us
    mesh_ratio = float("nan")
    for _conf, rows in groups:
        # rows alternate within each repeat
        best = harness.best_of({row.name: row.factory for row in rows}, args.repeats)
        deliveries = {}
        for row in rows:
            # The renumbered row runs 15 fewer input packets (its warm-up).
            count = (n - 15 if "renumbered" in row.name else n) * r
            deliveries[row.name] = harness.us_per(best[row.name], count)
        copy_us = next(v for k, v in deliveries.items() if k.startswith("python copy"))
        lib_us = next(v for k, v in deliveries.items() if k.startswith("pylibsrtp"))
        for row in rows:
            us = deliveries[row.name]
            verdict = ""
            if row.core:
                ok = us <= TARGET_US
                failed += not ok
                verdict = f"<= {TARGET_US:.1f} us {'yes' if ok else 'NO'}"
            table.row(
                row.name,
                row.size,
                us,
                1e6 / us,
                f"{us / copy_us:.1f}x",
                f"{us / lib_us:.2f}x",
                f" {verdict}",
            )
        core = rows[0]  # "core audio" / "core video": the plain forwarding row of the size
        summary.append((core.name, deliveries[core.name], copy_us, lib_us))
        mesh = next((k for k in deliveries if "mesh" in k), None)
        if mesh is not None:
            mesh_ratio = deliveries[mesh] / deliveries[core.name]
    print()
    for name, us, copy_us, lib_us in summary:  # cost per delivery
        harness.ratio(name, "python copy relay", us / copy_us)
        harness.ratio(name, "pylibsrtp", us / lib_us)
    # D27: the floor of what splitting one conference over two workers costs per delivery
    # (bench/cascade.py part a measures the same with the processes and their I/O).
    harness.ratio("core audio over a worker mesh link", "core audio", mesh_ratio)
    membership(args)
    return 1 if (args.check and failed) else 0


def membership(args: argparse.Namespace) -> None:
    joins = 50
    print()
    print(
        f"membership: {joins} endpoints join (install_keys) and leave (remove) a conference of "
        f"K keyed associations, best of {args.repeats}; us per join+leave"
    )
    table = harness.Table(
        ("K", ">5"), ("incremental", ">12.1f"), ("full rebuild", ">13.1f"), ("speed-up", ">9")
    )
    table.header()
    for k in (int(x) for x in args.members.split(",")):
        ours = membership_factory(ForwardingTable, k, joins)
        base = membership_factory(RebuildingTable, k, joins)
        best = harness.best_of({"ours": ours, "base": base}, args.repeats)
        us_ours, us_base = harness.us_per(best["ours"], joins), harness.us_per(best["base"], joins)
        table.row(k, us_ours, us_base, f"{us_base / us_ours:.1f}x")


if __name__ == "__main__":
    sys.exit(main())
