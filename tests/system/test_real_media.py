"""Real audio and video through real processes (D35, D36): files in, an MDD, a recorder out.

A sends a WAV with a known tone sequence and a short generated video (``--audio-file``,
``--video-file``); B is a recorder (``--media none --record DIR``). The recording B writes is
decoded here: its audio lasts what was sent (within 2 %) and plays the same tones (each within
2 %, by zero crossings), its video holds at least 99 % of the frames A sent. Bad input exits 2
with one line before joining; ``perc demo --media real`` exits 0 and prints its recordings.
"""

from __future__ import annotations

import itertools
import math
import os
import re
import shutil
import struct
import subprocess
import sys
import wave
from pathlib import Path
from typing import Any

import pytest
import trio

av = pytest.importorskip("av")

from perc import identity  # noqa: E402
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
        for i, (a, b) in enumerate(itertools.pairwise(samples), start=1)
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


def run_endpoint(folder: Path, *args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    """``perc endpoint`` toward a port where nothing listens: bad input must stop it first."""
    ident = identity.generate("alice")
    identity.write(ident, folder, "alice")
    proc = subprocess.run(
        [
            sys.executable, "-m", "perc", "endpoint",
            "--mdd", "127.0.0.1:9", "--cert", "alice.crt", "--key", "alice.key",
            "--kmf-fingerprint", ident.fingerprint, "--join-timeout", "30", *args,
        ],
        cwd=folder, capture_output=True, text=True, timeout=60, check=False,
        env={**os.environ, **(env or {})},
    )  # fmt: skip
    return proc.returncode, proc.stderr


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("--audio-file", "missing.wav"), r"missing\.wav: no such file"),
        (("--audio-file", "notes.txt"), r"notes\.txt: (unreadable|no audio stream)"),
        (("--video-file", "tones.wav"), r"tones\.wav: no video stream"),
        (("--media", "none", "--record", "notes.txt/rec"), r"notes\.txt/rec: cannot write"),
        (("--codec", "synthetic", "--audio-file", "tones.wav"), r"--codec: synthetic"),
        (("--media", "video", "--audio-file", "tones.wav"), r"--audio-file: --media video"),
        (("--codec", "real", "--video-fps", "0.3"), r"--video-fps/--video-bitrate: .*frame rate"),
    ],
)
def test_bad_media_input_exits_2_before_joining(
    tmp_path: Path, args: tuple[str, ...], expected: str
) -> None:
    (tmp_path / "notes.txt").write_text("not media\n")
    write_tones(tmp_path / "tones.wav")
    code, err = run_endpoint(tmp_path, *args)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("perc: error: "), err
    assert re.search(expected, lines[0]), lines[0]


def test_media_flags_without_pyav_name_the_install_command(tmp_path: Path) -> None:
    fake = tmp_path / "no-av"
    (fake / "av").mkdir(parents=True)
    (fake / "av" / "__init__.py").write_text("raise ImportError('PyAV is not installed')\n")
    for args in (("--codec", "real"), ("--media", "none", "--record", "rec")):
        code, err = run_endpoint(tmp_path, *args, env={"PYTHONPATH": str(fake)})
        assert code == 2, err
        assert err.strip().count("\n") == 0
        assert "pip install 'perc[media]'" in err, err
    # Synthetic media needs no PyAV: the same endpoint gets past its arguments (and then
    # finds nobody at the MDD's address, exit 5 after --join-timeout).
    code, err = run_endpoint(tmp_path, "--join-timeout", "0.5", env={"PYTHONPATH": str(fake)})
    assert code == 5, err


async def test_demo_with_real_media_records_and_says_where(tmp_path: Path) -> None:
    proc = await trio.run_process(
        [sys.executable, "-m", "perc", "demo", "--media", "real", "--participants", "2",
         "--duration", "20"],
        capture_stdout=True, capture_stderr=True, check=False, cwd=tmp_path,
    )  # fmt: skip
    out = proc.stdout.decode()
    assert proc.returncode == 0, out + proc.stderr.decode()
    assert "PASS" in out
    paths = [Path(p) for p in re.findall(r"^  (/\S+\.(?:ogg|webm))$", out, re.MULTILINE)]
    assert {p.name for p in paths} >= {"bob.audio.ogg", "bob.video.webm"}, out
    try:
        for path in paths:
            assert path.stat().st_size > 0
            with av.open(str(path)) as f:
                assert f.streams[0].codec_context.name in ("opus", "libopus", "vp8", "libvpx")
                assert any(p.size for p in f.demux())
    finally:
        for folder in {p.parent for p in paths}:
            shutil.rmtree(folder, ignore_errors=True)
