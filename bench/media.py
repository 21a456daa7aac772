"""Packets/s of perc's endpoint media engine (perc.media.endpoint.EndpointMedia).

Run: ``.venv/bin/python bench/media.py [--count N] [--repeat R]`` (or ``bash dev.sh bench media``).

Rows (each the best of ``--repeat`` runs, packets per second of one core):

- *produce*: ``EndpointMedia.handle_timer`` + ``datagrams_to_send`` on the audio (160-byte) and
  video (about 700-byte packets, 500 kbit/s at 30 fps) timetables, the clock advanced one
  packet slot per call: payload generation, RTP header, double encryption, EKT field, queue.
- *consume*: ``EndpointMedia.receive`` on the same packets after a Media Distributor hop
  (outer layer re-encrypted for the receiver): EKT processing, both layers, payload
  verification, RFC 3550 statistics.

Baseline measured in the same run: the SRTP layer alone on the same packets
(``DoubleSender.protect`` on pre-built RTP packets; ``DoubleReceiver.unprotect``), so the
ratio shows what the media layer (payloads, verification, statistics) adds on top.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

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


def best(fn: Callable[[], int], repeat: int) -> float:
    rates = []
    for _ in range(repeat):
        t = time.perf_counter()
        n = fn()
        rates.append(n / (time.perf_counter() - t))
    return max(rates)


def scenario(media: str, count: int, repeat: int) -> list[tuple[str, float, float]]:
    ekt = EktParameterSet(1, EktCipher.AESKW_128, os.urandom(16), os.urandom(12))
    step = 0.02 if media == "audio" else 1 / 30
    video = VideoSettings()
    frames = count if media == "audio" else max(1, count // 3)

    # produce --------------------------------------------------------------------------
    made: list[bytes] = []
    plain: list[bytes] = []

    def produce() -> int:
        sender = EndpointMedia("alice", media, keying(), ekt, 0.0, video=video)
        out: list[bytes] = []
        now = 0.0
        for _ in range(frames):
            sender.handle_timer(now)
            out += sender.datagrams_to_send()
            now += step
        made[:] = [d for d in out if not is_rtcp(d)]
        return len(made)

    ours_tx = best(produce, repeat)
    # the same RTP packets, plain, for the baseline sender
    src = EndpointMedia("alice", media, keying(), ekt, 0.0, video=video)
    now = 0.0
    for _ in range(frames):
        for s in src._sources:
            plain.extend(p.rtp for p in s.packets_due(now))
        now += step

    def base_produce() -> int:
        k = keying().outer()
        tx = DoubleSender(k.client_key, k.client_salt, ekt)
        t = 0.0
        for p in plain:
            tx.protect(p, t)
            t += 0.001
        return len(plain)

    base_tx = best(base_produce, repeat)

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

    def consume() -> int:
        rx = EndpointMedia("bob", "none", k_b, ekt, 0.0)
        now = 0.0
        for d in delivered:
            rx.receive(d, now)
            now += 0.001
        assert rx.streams and all(s.verified for s in rx.streams.values())
        assert sum(s.verified for s in rx.streams.values()) == len(delivered)
        return len(delivered)

    ours_rx = best(consume, repeat)

    def base_consume() -> int:
        rx = DoubleReceiver(SrtpSession(b_out.server_key, b_out.server_salt))
        rx.add_parameter_set(ekt)
        now = 0.0
        for d in delivered:
            rx.unprotect(d, now)
            now += 0.001
        return len(delivered)

    base_rx = best(base_consume, repeat)
    return [
        (f"produce {media}", ours_tx, base_tx),
        (f"consume {media}", ours_rx, base_rx),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--count", type=int, default=6000, help="audio packets / 3x video frames")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    rows = []
    for media in ("audio", "video"):
        rows += scenario(media, args.count, args.repeat)
    print(f"{'row':<16} {'EndpointMedia pkt/s':>20} {'SRTP layer only':>16} {'ratio':>6}")
    for name, ours, base in rows:
        print(f"{name:<16} {ours:>20,.0f} {base:>16,.0f} {ours / base:>6.2f}")


if __name__ == "__main__":
    main()
