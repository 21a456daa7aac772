"""Tunnel relay rate: endpoint UDP -> MDD -> TLS tunnel -> KMF (echo) -> MDD -> endpoint UDP.

Usage: .venv/bin/python bench/tunnel_relay.py [--seconds S] [--window W] [--endpoints E]
                                              [--sizes 100,500,1200] [--mode both|split|inproc]

A stand-in endpoint keeps W DTLS-looking datagrams (first byte 22) in flight per endpoint
socket and counts the echoes that come back in S seconds (after 0.5 s warm-up). Each
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
the relay's share of the baseline. Lost datagrams (a full queue or socket buffer) are refilled
after 200 ms of silence and reported.
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import socket
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import trio

from perc.config import load_kmf_config, load_mdd_config
from perc.kmf import EchoEngine
from perc.roles import kmf, mdd
from perc.roles.demo import make_demo_files

LOCAL = "127.0.0.1"
WARMUP = 0.5
#: MDD->KMF tunnel messages per TLS write in the in-process rows (STYLE practice 11).
BATCHING: list[float] = []


# --- the load generator --------------------------------------------------------------------------


async def _generator(
    target: tuple[str, int], payload: bytes, seconds: float, window: int, endpoints: int
) -> tuple[int, int]:
    """Round trips completed in ``seconds`` (after warm-up) and refills after losses."""
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
            await trio.sleep(WARMUP)
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


def _configs(folder: Path) -> tuple[Path, Path]:
    """Throwaway identities and kmf.toml / mdd.toml (the demo's files) in ``folder``."""
    files = make_demo_files(folder)
    return files.kmf_config, files.mdd_config


def _quiet() -> None:
    # The MDD may start before the KMF listens; its reconnect warnings are not results.
    logging.getLogger("perc").setLevel(logging.ERROR)


def _run_kmf(path: Path) -> None:
    _quiet()
    config = load_kmf_config(path)
    trio.run(lambda: kmf.serve(config, engine=EchoEngine()))


async def _wait_tunnel(relay: mdd.ConferenceRelay) -> None:
    with trio.fail_after(10):
        while not relay.tunnel_is_up:
            await relay.wait_changed()


# --- the rows -------------------------------------------------------------------------------------


async def baseline(payload: bytes, args: argparse.Namespace) -> tuple[int, int]:
    async with trio.open_nursery() as nursery:
        address = await nursery.start(_udp_echo)
        result = await _generator(address, payload, args.seconds, args.window, args.endpoints)
        nursery.cancel_scope.cancel()
    return result


async def inproc(payload: bytes, args: argparse.Namespace) -> tuple[int, int]:
    with tempfile.TemporaryDirectory() as tmp:
        kmf_path, mdd_path = _configs(Path(tmp))
        kmf_config, mdd_config = load_kmf_config(kmf_path), load_mdd_config(mdd_path)
    async with trio.open_nursery() as nursery:
        await nursery.start(
            lambda task_status: kmf.serve(kmf_config, engine=EchoEngine(), task_status=task_status)
        )
        mdd_server: mdd.MddServer = await nursery.start(
            lambda task_status: mdd.serve(mdd_config, task_status=task_status)
        )
        relay = mdd_server.conferences["demo"]
        await _wait_tunnel(relay)
        result = await _generator(relay.address, payload, args.seconds, args.window, args.endpoints)
        stats = relay.tunnel_stats
        if stats is not None and stats.batches_out:
            BATCHING.append(stats.messages_out / stats.batches_out)
        nursery.cancel_scope.cancel()
    return result


def split(payload: bytes, args: argparse.Namespace) -> tuple[int, int]:
    ctx = multiprocessing.get_context("spawn")
    tmp = tempfile.TemporaryDirectory()
    kmf_path, mdd_path = _configs(Path(tmp.name))
    kmf_proc = ctx.Process(target=_run_kmf, args=(kmf_path,), daemon=True)
    kmf_proc.start()
    parent, child = ctx.Pipe()
    mdd_proc = ctx.Process(target=_run_mdd_forever, args=(mdd_path, child), daemon=True)
    mdd_proc.start()
    try:
        if not parent.poll(30):
            raise RuntimeError("the MDD's tunnel did not come up")
        address = parent.recv()
        return trio.run(_generator, address, payload, args.seconds, args.window, args.endpoints)
    finally:
        for p in (mdd_proc, kmf_proc):
            p.terminate()
            p.join(5)
        tmp.cleanup()


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--window", type=int, default=32, help="datagrams in flight per endpoint")
    parser.add_argument("--endpoints", type=int, default=4)
    parser.add_argument("--sizes", default="100,500,1200")
    parser.add_argument("--mode", choices=["both", "split", "inproc"], default="both")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    modes = ["split", "inproc"] if args.mode == "both" else [args.mode]

    print(
        f"tunnel relay: {args.endpoints} endpoints x {args.window} in flight, "
        f"{args.seconds:g} s per row after {WARMUP} s warm-up; loopback TLS 1.3"
    )
    print(
        f"{'row':<34}{'bytes':>7}{'round trips/s':>15}{'datagrams/s':>13}"
        f"{'vs baseline':>13}{'refills':>9}"
    )
    for size in sizes:
        payload = b"\x16" + bytes(size - 1)
        done, refills = trio.run(baseline, payload, args)
        base = done / args.seconds
        print(
            f"{'baseline: UDP echo':<34}{size:>7}{base:>15,.0f}{2 * base:>13,.0f}"
            f"{'1.00x':>13}{refills:>9}"
        )
        for mode in modes:
            if mode == "split":
                done, refills = split(payload, args)
                name = "relay, KMF+MDD processes"
            else:
                done, refills = trio.run(inproc, payload, args)
                name = "relay, one process"
            rate = done / args.seconds
            if mode == "inproc" and BATCHING:
                name += f" ({BATCHING[-1]:.0f}/write)"
            print(
                f"{name:<34}{size:>7}{rate:>15,.0f}{2 * rate:>13,.0f}"
                f"{rate / base if base else 0:>12.2f}x{refills:>9}"
            )


if __name__ == "__main__":
    main()
