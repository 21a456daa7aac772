"""Real audio and video through real processes (D35, D36): files in, an MDD, a recorder out.

A sends a WAV with a known tone sequence and a short generated video (``--audio-file``,
``--video-file``); B is a recorder (``--media none --record DIR``). The recording B writes is
decoded here: its audio lasts what was sent (within 2 %) and plays the same tones (each within
2 %, by zero crossings), its video holds at least 99 % of the frames A sent. Bad input exits 2
with one line before joining; ``perc demo --media real`` exits 0 and prints its recordings.
"""

from __future__ import annotations

import math
import os
import re
import struct
import subprocess
import sys
import wave
from pathlib import Path
from typing import Any

import pytest

av = pytest.importorskip("av")

from perc.media.codecs import TestPattern  # noqa: E402

from .conftest import System  # noqa: E402
from .test_conference import NO_REKEY, conference, endpoint, report  # noqa: E402

pytestmark = pytest.mark.slow

RATE = 48_000
TONES = (440.0, 660.0, 880.0, 550.0, 770.0)  # one second each: 5 s
VIDEO_SECONDS = 3
FPS = 30


def write_tones(path: Path) -> None:
    samples = []
    for f in TONES:
        step = 2 * math.pi * f / RATE
        samples += [round(9000 * math.sin(step * i)) for i in range(RATE)]
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(RATE)
        w.writeframes(struct.pack(f"<{len(samples)}h", *samples))


def write_video(path: Path) -> None:
    pattern = TestPattern("clip", 320, 180, FPS)
    with av.open(str(path), "w", format="webm") as out:
        stream = out.add_stream("libvpx", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = 320, 180, "yuv420p"
        for _ in range(VIDEO_SECONDS * FPS):
            for packet in stream.encode(pattern.next_frame()):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)


def decoded_audio(path: Path) -> tuple[int, ...]:
    pcm = bytearray()
    with av.open(str(path)) as f:
        resampler = av.AudioResampler(format="s16", layout="mono", rate=RATE)
        for frame in f.decode(audio=0):
            for out in resampler.resample(frame):
                pcm += bytes(out.planes[0])[: out.samples * 2]
    return struct.unpack(f"<{len(pcm) // 2}h", pcm)


def frequency(samples: tuple[int, ...]) -> float:
    """From rising zero crossings, interpolated between samples."""
    times = [
        i - 1 + (-a) / (b - a)
        for i, (a, b) in enumerate(zip(samples, samples[1:], strict=False), start=1)
        if a < 0 <= b
    ]
    assert len(times) > 10
    return (len(times) - 1) * RATE / (times[-1] - times[0])


def video_frames(path: Path) -> int:
    with av.open(str(path)) as f:
        return sum(1 for p in f.demux(video=0) if p.size)


async def test_a_recorder_gets_the_tones_and_the_frames(system: System) -> None:
    write_tones(system.folder / "tones.wav")
    write_video(system.folder / "clip.webm")
    kmf, mdd, port = await conference(system, ["alice", "bob"], kmf_extra=NO_REKEY)
    rec = system.folder / "rec"
    bob = await endpoint(
        system, "bob", port, "--media", "none", "--record", str(rec), "--expect-peers", "1"
    )
    await bob.wait_for(r"joined")
    alice = await endpoint(
        system, "alice", port,
        "--audio-file", "tones.wav", "--video-file", "clip.webm", "--duration", "6.5",
    )  # fmt: skip
    assert await alice.wait_exit() == 0, alice.text
    assert await system.stop(bob) == 0, bob.text
    await system.stop(mdd)
    await system.stop(kmf)

    sent: dict[str, Any] = report(system, "alice")["streams"]
    got = report(system, "bob")
    assert got["decoded"]["alice"]["audio_decode_errors"] == 0
    assert got["decoded"]["alice"]["video_decode_errors"] == 0
    files = {Path(p).name for p in got["decoded"]["alice"]["files"]}
    assert files == {"alice.audio.ogg", "alice.video.webm"}

    samples = decoded_audio(rec / "alice.audio.ogg")
    assert abs(len(samples) / RATE - len(TONES)) / len(TONES) < 0.02, len(samples) / RATE
    for k, f in enumerate(TONES):
        middle = samples[k * RATE + RATE // 5 : (k + 1) * RATE - RATE // 5]
        measured = frequency(middle)
        assert abs(measured - f) / f < 0.02, (k, f, measured)

    # The file's timestamps are in milliseconds: its last frame may fill one more slot.
    assert VIDEO_SECONDS * FPS <= sent["video"]["frames"] <= VIDEO_SECONDS * FPS + 1
    assert video_frames(rec / "alice.video.webm") >= 0.99 * sent["video"]["frames"]
    video = got["peers"]["alice"]["video"]
    assert video["frames_complete"] >= 0.99 * sent["video"]["frames"]
