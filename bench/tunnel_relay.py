"""Tunnel relay rate: endpoint UDP -> MDD -> TLS tunnel -> KMF (echo) -> MDD -> endpoint UDP.

Run: ``.venv/bin/python bench/tunnel_relay.py`` (or ``bash dev.sh bench tunnel_relay``).
Options: ``--seconds S`` (per row, default 3), ``--warmup S`` (before each row, default 0.5),
``--window W`` (datagrams in flight per endpoint, default 32), ``--endpoints E`` (default 4),
``--sizes 100,500,1200`` (datagram bytes), ``--mode both|split|inproc`` (default both),
``--quick`` (one 100-byte size, 1 endpoint x 4 in flight, 0.3 s rows: a smoke run).

A stand-in endpoint keeps W DTLS-looking datagrams (first byte 22) in flight per endpoint
socket and counts the echoes that come back in S seconds (after the warm-up). Each
round trip is two TunneledDtls messages over real loopback TLS 1.3 (one each way) and two
UDP datagrams; the KMF runs perc.roles.kmf.serve with perc.kmf.EchoEngine (sends every
datagram back through the tunnel it came on), the MDD runs perc.roles.mdd.serve unchanged.

Modes: "split" runs the KMF and the MDD in their own processes (the deployment shape; with
the load generator that is three processes on this machine's cores); "inproc" runs KMF, MDD
and generator in one trio process on one core. Baseline measured in the same run: the same
generator against a plain UDP echo task (one trio process, same drain-until-EAGAIN loop), the
floor that any Python UDP relay pays.

The in-process row also shows how many tunnel messages the MDD's writer put into each TLS
write on average ("N/write"): the batching of STYLE practice 11.

Rows: round trips/s, and relayed datagrams/s = 2 x round trips (endpoint->KMF and back), and
the relay's share of the baseline, again after the table (bench/harness.py) as the lines
``ratio relay split|inproc <size> B / UDP echo``. Lost datagrams (a full queue or socket
buffer) are refilled after 200 ms of silence and reported.
"""

from __future__ import annotations

import argparse
import logging
import math
import multiprocessing
import socket
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import harness
import trio

from perc.config import load_kmf_config, load_mdd_config
from perc.demo import DemoFiles, make_demo_files, write_mdd_config
from perc.kmf import EchoEngine
from perc.roles import kmf, mdd

LOCAL = "127.0.0.1"
#: MDD->KMF tunnel messages per TLS write in the in-process rows (STYLE practice 11).
BATCHING: list[float] = []
#: (round trips completed while measuring, refills after losses)
Result = tuple[int, int]


# --- the load generator --------------------------------------------------------------------------


async def _generator(target: tuple[str, int], payload: bytes, args: argparse.Namespace) -> Result:
    """Round trips completed in ``args.seconds`` (after ``args.warmup``), refills after losses."""
    seconds, window, endpoints = args.seconds, args.window, args.endpoints
    counts = {"done": 0, "refills": 0}
    measuring = False

    async def one(sock: socket.socket) -> None:
        for _ in range(window):
            sock.sendto(payload, target)
        while True:
            with trio.move_on_after(0.2) as scope:
                await trio.lowlevel.wait_readable(sock)
            if scope.cancelled_caught:
                counts["refills"] += 1
                for _ in range(window):
                    sock.sendto(payload, target)
                continue
            n = 0
            while True:
                try:
                    sock.recv(65536)
                except BlockingIOError:
                    break
                n += 1
                try:
                    sock.sendto(payload, target)
                except BlockingIOError:
                    pass
            if measuring:
                counts["done"] += n

    socks = []
    for _ in range(endpoints):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setblocking(False)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        s.bind((LOCAL, 0))
        socks.append(s)
    try:
        async with trio.open_nursery() as nursery:
            for s in socks:
                nursery.start_soon(one, s)
            await trio.sleep(args.warmup)
            measuring = True
            counts["refills"] = 0
            await trio.sleep(seconds)
            measuring = False
            nursery.cancel_scope.cancel()
    finally:
        for s in socks:
            trio.lowlevel.notify_closing(s)
            s.close()
    return counts["done"], counts["refills"]


async def _udp_echo(task_status: trio.TaskStatus[tuple[str, int]]) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setblocking(False)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    sock.bind((LOCAL, 0))
    task_status.started(sock.getsockname())
    try:
        while True:
            await trio.lowlevel.wait_readable(sock)
            for _ in range(256):
                try:
                    data, addr = sock.recvfrom(65536)
                except BlockingIOError:
                    break
                try:
                    sock.sendto(data, addr)
                except BlockingIOError:
                    pass
            else:
                await trio.lowlevel.checkpoint()
    finally:
        trio.lowlevel.notify_closing(sock)
        sock.close()


# --- configs and role processes -------------------------------------------------------------------


def _quiet() -> None:
    # Connection warnings while the roles start and stop are not results.
    logging.getLogger("perc").setLevel(logging.ERROR)


def _run_kmf(path: Path, conn: Any) -> None:
    """The KMF process: serve with the echo handler; send its TCP port through ``conn``."""
    _quiet()
    config = load_kmf_config(path)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            server: kmf.KmfServer = await nursery.start(
                lambda task_status: kmf.serve(
                    config, engine=EchoEngine(), task_status=task_status
                )
            )
            conn.send(server.address[1])

    trio.run(main)


async def _wait_tunnel(relay: mdd.ConferenceRelay) -> None:
    with trio.fail_after(10):
        while not relay.tunnel_is_up:
            await relay.wait_changed()


# --- the rows -------------------------------------------------------------------------------------


async def baseline(payload: bytes, args: argparse.Namespace) -> Result:
    async with trio.open_nursery() as nursery:
        address = await nursery.start(_udp_echo)
        result = await _generator(address, payload, args)
        nursery.cancel_scope.cancel()
    return result


async def inproc(payload: bytes, args: argparse.Namespace) -> Result:
    with tempfile.TemporaryDirectory() as tmp:
        files = make_demo_files(Path(tmp))
        kmf_config = load_kmf_config(files.kmf_config)
        async with trio.open_nursery() as nursery:
            kmf_server: kmf.KmfServer = await nursery.start(
                lambda task_status: kmf.serve(
                    kmf_config, engine=EchoEngine(), task_status=task_status
                )
            )
            mdd_config = load_mdd_config(write_mdd_config(files, kmf_server.address[1]))
            mdd_server: mdd.MddServer = await nursery.start(
                lambda task_status: mdd.serve(mdd_config, task_status=task_status)
            )
            relay = mdd_server.conferences["demo"]
            await _wait_tunnel(relay)
            result = await _generator(relay.address, payload, args)
            stats = relay.tunnel_stats
            if stats is not None and stats.batches_out:
                BATCHING.append(stats.messages_out / stats.batches_out)
            nursery.cancel_scope.cancel()
    return result


def split(payload: bytes, args: argparse.Namespace) -> Result:
    ctx = multiprocessing.get_context("spawn")
    procs: list[Any] = []
    with tempfile.TemporaryDirectory() as tmp:
        files: DemoFiles = make_demo_files(Path(tmp))
        try:
            kmf_parent, kmf_child = ctx.Pipe()
            kmf_args = (files.kmf_config, kmf_child)
            procs.append(ctx.Process(target=_run_kmf, args=kmf_args, daemon=True))
            procs[-1].start()
            if not kmf_parent.poll(30):
                raise RuntimeError("the KMF did not start listening")
            mdd_path = write_mdd_config(files, kmf_parent.recv())
            parent, child = ctx.Pipe()
            procs.append(ctx.Process(target=_run_mdd_forever, args=(mdd_path, child), daemon=True))
            procs[-1].start()
            if not parent.poll(30):
                raise RuntimeError("the MDD's tunnel did not come up")
            address = parent.recv()
            return trio.run(_generator, address, payload, args)
        finally:
            for p in reversed(procs):
                p.terminate()
                p.join(5)


def _run_mdd_forever(path: Path, conn: Any) -> None:
    _quiet()
    config = load_mdd_config(path)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            server: mdd.MddServer = await nursery.start(
                lambda task_status: mdd.serve(config, task_status=task_status)
            )
            relay = server.conferences["demo"]
            await _wait_tunnel(relay)
            conn.send(relay.address)

    trio.run(main)


def main(argv: list[str] | None = None) -> int:
    parser = harness.parser(__doc__)
    parser.add_argument("--seconds", type=float, default=3.0, help="measured time per row")
    parser.add_argument("--warmup", type=float, default=0.5, help="seconds before each row")
    parser.add_argument("--window", type=int, default=32, help="datagrams in flight per endpoint")
    parser.add_argument("--endpoints", type=int, default=4)
    parser.add_argument("--sizes", default="100,500,1200")
    parser.add_argument("--mode", choices=["both", "split", "inproc"], default="both")
    args = harness.parse(
        parser,
        argv,
        quick={"seconds": 0.3, "warmup": 0.1, "window": 4, "endpoints": 1, "sizes": "100"},
    )
    sizes = [int(s) for s in args.sizes.split(",")]
    modes = ["split", "inproc"] if args.mode == "both" else [args.mode]

    harness.print_machine()
    print(
        f"tunnel relay: {args.endpoints} endpoints x {args.window} in flight, "
        f"{args.seconds:g} s per row after {args.warmup:g} s warm-up; loopback TLS 1.3"
    )
    table = harness.Table(
        ("row", "<34"),
        ("bytes", ">6"),
        ("round trips/s", ">14,.0f"),
        ("datagrams/s", ">12,.0f"),
        ("vs baseline", ">12"),
        ("refills", ">8"),
    )
    table.header()
    ratios: list[tuple[str, float]] = []
    for size in sizes:
        payload = b"\x16" + bytes(size - 1)
        done, refills = trio.run(baseline, payload, args)
        base = done / args.seconds
        table.row("baseline: UDP echo", size, base, 2 * base, "1.00x", refills)
        for mode in modes:
            if mode == "split":
                done, refills = split(payload, args)
                name = "relay, KMF+MDD processes"
            else:
                done, refills = trio.run(inproc, payload, args)
                name = "relay, one process"
            rate = done / args.seconds
            share = rate / base if base else math.nan
            if mode == "inproc" and BATCHING:
                name += f" ({BATCHING[-1]:.0f}/write)"
            table.row(name, size, rate, 2 * rate, f"{share:.2f}x", refills)
            ratios.append((f"relay {mode} {size} B", share))
    print()
    for name, share in ratios:
        harness.ratio(name, "UDP echo", share, note="(round trips/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
