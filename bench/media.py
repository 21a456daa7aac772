"""Packets/s of perc's endpoint media engine (perc.media.endpoint.EndpointMedia).

Run: ``.venv/bin/python bench/media.py`` (or ``bash dev.sh bench media``). Options: ``--count N``
(audio packets, and 3x the video frames, per run; default 6000), ``--repeats R`` (best of R,
default 3), ``--quick`` (30 packets, 1 repeat: a smoke run).

Rows (each the best of ``--repeats`` runs, packets per second of one core; bench/harness.py
times only the runs, garbage collector off, not the set-up of the objects):

- *produce*: ``EndpointMedia.handle_timer`` + ``datagrams_to_send`` on the audio (160-byte) and
  video (about 700-byte packets, 500 kbit/s at 30 fps) timetables, the clock advanced one
  packet slot per call: payload generation, RTP header, double encryption, EKT field, queue.
- *consume*: ``EndpointMedia.receive`` on the same packets after a Media Distributor hop
  (outer layer re-encrypted for the receiver): EKT processing, both layers, payload
  verification, RFC 3550 statistics.

Baseline measured in the same run: the SRTP layer alone on the same packets
(``DoubleSender.protect`` on pre-built RTP packets; ``DoubleReceiver.unprotect``), so the
ratio shows what the media layer (payloads, verification, statistics) adds on top; the lines
``ratio produce|consume audio|video / SRTP layer`` give it again after the table.

**Real media** (D35, needs PyAV: ``perc[media]``; skipped with a note without it): the CPU one
endpoint spends per stream, in milliseconds of one core per second of media (10 ms/s = 1 %
of a core), for Opus (48 kHz mono, 20 ms) and VP8 (640x360 at 30 fps, 500 kbit/s, a moving
test pattern), over ``--seconds`` of media (default 3):

- *send*: PyAV encodes, then ``RealSource.push`` and ``EndpointMedia.handle_timer`` packetize
  (RFC 7741 descriptor, frame marking, identity padding), double-encrypt and queue;
- *receive*: ``EndpointMedia.receive`` on what a Media Distributor hop forwarded (both
  layers, identity, NACK tracking, frame assembly), then ``MediaSink`` decodes with PyAV.

These rows are CPU time of the process (``time.process_time``, all threads), best of
``--repeats``, not wall time.

Baseline in the same run: PyAV alone encoding the same pictures or PCM (*send*) and decoding
its own output (*receive*). The ratio perc / PyAV alone shows perc's own overhead per stream;
``ratio real opus|vp8 send+receive / PyAV alone`` repeat it after the table. The raw pictures
and PCM are made before the timed runs (a camera or a file would supply them).
"""

from __future__ import annotations

import gc
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import harness
from harness import Runner

from perc.media.endpoint import EndpointMedia, is_rtcp
from perc.media.sources import VideoSettings
from perc.srtp.context import SrtpSession
from perc.srtp.double import DoubleReceiver, DoubleSender
from perc.srtp.ekt import EktCipher, EktParameterSet
from perc.srtp.hop import MediaDistributorHop
from perc.srtp.keys import KeyingMaterial, SrtpProfile, exporter_length, split_exporter


def keying() -> KeyingMaterial:
    p = SrtpProfile.DOUBLE_AEAD_AES_128_GCM
    return split_exporter(p, os.urandom(exporter_length(p)))


def scenario(media: str, count: int, repeats: int) -> list[tuple[str, float, float]]:
    """(row, packets/s of EndpointMedia, packets/s of the SRTP layer alone) for produce and
    consume of ``media``; the pairs are timed alternately (:func:`harness.best_of`)."""
    ekt = EktParameterSet(1, EktCipher.AESKW_128, os.urandom(16), os.urandom(12))
    step = 0.02 if media == "audio" else 1 / 30
    video = VideoSettings()
    frames = count if media == "audio" else max(1, count // 3)

    # produce --------------------------------------------------------------------------
    def produce() -> Runner:
        sender = EndpointMedia("alice", media, keying(), ekt, 0.0, video=video)

        def run() -> list[bytes]:
            out: list[bytes] = []
            now = 0.0
            for _ in range(frames):
                sender.handle_timer(now)
                out += sender.datagrams_to_send()
                now += step
            return out

        return run

    produced = sum(not is_rtcp(d) for d in produce()())
    # the same RTP packets, plain, for the baseline sender
    plain: list[bytes] = []
    src = EndpointMedia("alice", media, keying(), ekt, 0.0, video=video)
    now = 0.0
    for _ in range(frames):
        for s in src._sources:
            plain.extend(p.rtp for p in s.packets_due(now))
        now += step

    def base_produce() -> Runner:
        k = keying().outer()
        tx = DoubleSender(k.client_key, k.client_salt, ekt)

        def run() -> None:
            t = 0.0
            for p in plain:
                tx.protect(p, t)
                t += 0.001

        return run

    # consume --------------------------------------------------------------------------
    k_a, k_b = keying(), keying()
    a_out, b_out = k_a.outer(), k_b.outer()
    hop = MediaDistributorHop(SrtpSession(a_out.client_key, a_out.client_salt))
    to_b = SrtpSession(b_out.server_key, b_out.server_salt)
    sender = EndpointMedia("alice", media, k_a, ekt, 0.0, video=video)
    t = 0.0
    delivered: list[bytes] = []
    for _ in range(frames):
        sender.handle_timer(t)
        for d in sender.datagrams_to_send():
            if not is_rtcp(d):
                delivered.append(hop.encrypt_for(to_b, hop.decrypt(d)))
        t += step

    def consume() -> Runner:
        rx = EndpointMedia("bob", "none", k_b, ekt, 0.0)

        def run() -> EndpointMedia:
            now = 0.0
            for d in delivered:
                rx.receive(d, now)
                now += 0.001
            return rx

        return run

    rx = consume()()  # the receiver verifies every payload (untimed check)
    verified = sum(s.verified for s in rx.streams.values())
    if not rx.streams or verified != len(delivered):
        raise SystemExit(f"consume {media}: {verified} of {len(delivered)} packets verified")

    def base_consume() -> Runner:
        rx = DoubleReceiver(SrtpSession(b_out.server_key, b_out.server_salt))
        rx.add_parameter_set(ekt)

        def run() -> None:
            now = 0.0
            for d in delivered:
                rx.unprotect(d, now)
                now += 0.001

        return run

    best = harness.best_of(
        {"tx": produce, "base tx": base_produce, "rx": consume, "base rx": base_consume},
        repeats,
    )
    return [
        (
            f"produce {media}",
            harness.per_second(best["tx"], produced),
            harness.per_second(best["base tx"], len(plain)),
        ),
        (
            f"consume {media}",
            harness.per_second(best["rx"], len(delivered)),
            harness.per_second(best["base rx"], len(delivered)),
        ),
    ]


def cpu_best_of(factories: dict[str, Any], repeats: int) -> dict[str, float]:
    """As :func:`harness.best_of`, but in CPU seconds of this process (``time.process_time``,
    every thread, the codecs' included): on a machine shared with other work, wall time
    would count their share too."""
    best = dict.fromkeys(factories, float("inf"))
    for _ in range(max(1, repeats)):
        for name, factory in factories.items():
            runner = factory()
            gc.collect()
            gc.disable()
            try:
                t0 = time.process_time()
                runner()
                best[name] = min(best[name], time.process_time() - t0)
            finally:
                gc.enable()
    return best


def real_rows(seconds: float, repeats: int) -> list[tuple[str, float, float]] | None:
    """(row, perc ms/s, PyAV-alone ms/s) for Opus and VP8 send and receive; None without
    PyAV. ms/s: milliseconds of one core per second of media."""
    try:
        from perc.media.codecs import (
            OpusDecoder,
            OpusEncoder,
            TestPattern,
            ToneGenerator,
            Vp8Decoder,
            Vp8Encoder,
        )
        from perc.media.pipeline import MediaSink
        from perc.media.real import RealSettings, RealSource
    except ImportError:
        return None
    ekt = EktParameterSet(1, EktCipher.AESKW_128, os.urandom(16), os.urandom(12))
    rows: list[tuple[str, float, float]] = []
    for kind, rate in (("opus", 50), ("vp8", 30)):
        count = max(2, round(seconds * rate))
        media = "audio" if kind == "opus" else "video"
        raw: list[Any]
        if kind == "opus":
            tone = ToneGenerator(440.0)
            raw = [tone.next_frame() for _ in range(count)]
        else:
            pattern = TestPattern("alice", 640, 360, 30)
            raw = [pattern.next_frame() for _ in range(count)]

        def encoder(kind: str = kind) -> Any:
            return OpusEncoder() if kind == "opus" else Vp8Encoder(640, 360, fps=30)

        def decoder(kind: str = kind) -> Any:
            return OpusDecoder() if kind == "opus" else Vp8Decoder()

        k_a, k_b = keying(), keying()
        a_out, b_out = k_a.outer(), k_b.outer()

        def send_engine(media: str = media, k_a: KeyingMaterial = k_a) -> EndpointMedia:
            return EndpointMedia("alice", media, k_a, ekt, 0.0, real=RealSettings())

        def perc_send(raw: list[Any] = raw, kind: str = kind) -> Runner:
            engine, enc = send_engine(), encoder()
            source = engine.audio if kind == "opus" else engine.video
            assert isinstance(source, RealSource)

            def run() -> list[bytes]:
                out: list[bytes] = []
                for i, item in enumerate(raw):
                    source.push(i, [(f.data, f.keyframe) for f in enc.encode(item)])
                    engine.handle_timer(source.due(i))
                    out += engine.datagrams_to_send()
                return out

            return run

        def pyav_send(raw: list[Any] = raw) -> Runner:
            enc = encoder()

            def run() -> None:
                for item in raw:
                    enc.encode(item)

            return run

        # What a Media Distributor forwards to the receiver (untimed), and PyAV's own output.
        hop = MediaDistributorHop(SrtpSession(a_out.client_key, a_out.client_salt))
        to_b = SrtpSession(b_out.server_key, b_out.server_salt)
        delivered = [hop.encrypt_for(to_b, hop.decrypt(d)) for d in perc_send()() if not is_rtcp(d)]
        enc = encoder()
        encoded = [f.data for item in raw for f in enc.encode(item)]

        def perc_receive(delivered: list[bytes] = delivered, k_b: KeyingMaterial = k_b) -> Runner:
            engine = EndpointMedia("bob", "none", k_b, ekt, 0.0, collect_media=True)
            sink = MediaSink()

            def run() -> MediaSink:
                for i, d in enumerate(delivered):
                    engine.receive(d, i * 0.001)
                    sink.process(engine.take_received_media())
                return sink

            return run

        def pyav_receive(encoded: list[bytes] = encoded) -> Runner:
            dec = decoder()

            def run() -> None:
                for data in encoded:
                    dec.decode(data)

            return run

        done = perc_receive()().report().get("alice", {})  # untimed check: all decoded
        got = done.get("audio_packets" if kind == "opus" else "video_frames", 0)
        if got != len(encoded):
            raise SystemExit(f"real {kind}: {got} of {len(encoded)} frames decoded")
        best = cpu_best_of(
            {"send": perc_send, "base send": pyav_send,
             "receive": perc_receive, "base receive": pyav_receive},
            repeats,
        )  # fmt: skip
        media_seconds = count / rate
        for row in ("send", "receive"):
            rows.append(
                (
                    f"real {kind} {row}",
                    best[row] / media_seconds * 1000,
                    best[f"base {row}"] / media_seconds * 1000,
                )
            )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = harness.parser(__doc__, repeats=3)
    parser.add_argument(
        "--count", type=int, default=6000, help="audio packets / 3x video frames per run"
    )
    parser.add_argument(
        "--seconds", type=float, default=3.0, help="seconds of real media per run (PyAV rows)"
    )
    args = harness.parse(parser, argv, quick={"count": 30, "seconds": 0.2})
    rows = []
    for media in ("audio", "video"):
        rows += scenario(media, args.count, args.repeats)
    real = real_rows(args.seconds, args.repeats)
    harness.print_machine()
    print(f"best of {args.repeats} runs; packets per second of one core")
    table = harness.Table(
        ("row", "<16"),
        ("EndpointMedia pkt/s", ">20,.0f"),
        ("SRTP layer only", ">16,.0f"),
        ("ratio", ">6.2f"),
    )
    table.header()
    for name, ours, base in rows:
        table.row(name, ours, base, ours / base)
    print()
    for name, ours, base in rows:
        harness.ratio(name, "SRTP layer only", ours / base, note="(packets/s)")
    print()
    if real is None:
        print("real media rows skipped: PyAV is not installed (pip install 'perc[media]')")
        return 0
    print(
        f"real media, {args.seconds:g} s per run: CPU ms of one core per second of media "
        "(10 = 1 % of a core); Opus 20 ms, VP8 640x360 30 fps 500 kbit/s"
    )
    table = harness.Table(
        ("row", "<18"), ("perc ms/s", ">10.2f"), ("PyAV alone ms/s", ">16.2f"), ("ratio", ">6.2f")
    )
    table.header()
    for name, ours, base in real:
        table.row(name, ours, base, ours / base)
    print()
    for kind in ("opus", "vp8"):
        ours = sum(o for n, o, _ in real if n.startswith(f"real {kind} "))
        base = sum(b for n, _, b in real if n.startswith(f"real {kind} "))
        harness.ratio(f"real {kind} send+receive", "PyAV alone", ours / base, note="(CPU)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
