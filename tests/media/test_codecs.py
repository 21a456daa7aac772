"""PyAV codecs end to end: Opus tones and VP8 pictures through packetization, loss and files."""

from __future__ import annotations

import itertools
import math
import random
import struct
import subprocess
import sys
import wave
from pathlib import Path

import av
import pytest

from perc.media.codecs import (
    FRAME_BYTES,
    FRAME_SAMPLES,
    AudioFileSource,
    MediaDecodeError,
    MediaFileError,
    OpusDecoder,
    OpusEncoder,
    Recorder,
    TestPattern,
    ToneGenerator,
    VideoFileSource,
    Vp8Decoder,
    Vp8Encoder,
    check_record_directory,
    frame_from_yuv,
    safe_file_name,
    yuv_of_frame,
)
from perc.media.packetize import (
    OPUS_PT,
    VP8_PT,
    AssembledFrame,
    OpusPacketizer,
    RtpSequencer,
    Vp8FrameAssembler,
    Vp8Packetizer,
)
from perc.wire.rtp import RtpPacket

TONES = (440.0, 660.0, 880.0)
SEGMENT_FRAMES = 34  # 0.68 s each, about 2 s in all


def tone_pcm(frequencies: tuple[float, ...] = TONES) -> list[bytes]:
    frames = []
    for f in frequencies:
        gen = ToneGenerator(f)
        frames += [gen.next_frame() for _ in range(SEGMENT_FRAMES)]
    return frames


def samples_of(pcm: bytes) -> tuple[int, ...]:
    return struct.unpack(f"<{len(pcm) // 2}h", pcm)


def frequency(samples: tuple[int, ...], rate: int = 48_000) -> float:
    """Frequency from rising zero crossings, interpolated between samples."""
    times = []
    for i in range(1, len(samples)):
        a, b = samples[i - 1], samples[i]
        if a < 0 <= b:
            times.append(i - 1 + (-a) / (b - a))
    assert len(times) > 10
    return (len(times) - 1) * rate / (times[-1] - times[0])


def check_tones(pcm: bytes, offset: int = 0) -> None:
    samples = samples_of(pcm)
    seg = SEGMENT_FRAMES * FRAME_SAMPLES
    for k, f in enumerate(TONES):
        start = offset + k * seg + seg // 5  # skip the edges of each segment
        measured = frequency(samples[start : start + seg * 3 // 5])
        assert abs(measured - f) / f < 0.02, (f, measured)


def test_importing_without_pyav_names_the_extra() -> None:
    code = "import sys; sys.modules['av'] = None; import perc.media.codecs"
    proc = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True)
    assert proc.returncode == 1
    assert "pip install 'perc[media]'" in proc.stderr


def test_opus_tone_sequence_survives_packetization_and_decoding() -> None:
    encoder = OpusEncoder()
    packets = []
    for pcm in tone_pcm():
        packets += encoder.encode(pcm)
    packets += encoder.flush()
    assert len(packets) == 3 * SEGMENT_FRAMES + 1
    packetizer = OpusPacketizer()
    rtp = RtpSequencer(0x51, OPUS_PT, sequence_number=0xFFF0, timestamp_base=12345)
    wire = [rtp.packets(packetizer.packetize(p.data), p.pts)[0] for p in packets]
    decoder = OpusDecoder()
    parsed = [RtpPacket.parse(w) for w in wire]
    assert all(p.payload_type == OPUS_PT for p in parsed)
    steps = {(b.timestamp - a.timestamp) & 0xFFFFFFFF for a, b in itertools.pairwise(parsed)}
    assert steps == {FRAME_SAMPLES}
    pcm = b"".join(decoder.decode(p.payload) for p in parsed)
    assert len(pcm) == len(packets) * FRAME_BYTES
    check_tones(pcm)
    with pytest.raises(MediaDecodeError):
        decoder.decode(b"\x03")
    with pytest.raises(MediaDecodeError):
        decoder.decode(b"")
    assert len(decoder.decode(parsed[5].payload)) == FRAME_BYTES  # still usable
    with pytest.raises(ValueError):
        encoder.encode(b"\x00" * 10)


def encode_pattern(
    count: int = 30, key_at: int = 15
) -> tuple[list[bytes], list[bytes], list[bool]]:
    pattern = TestPattern("alice", 320, 240, fps=30)
    encoder = Vp8Encoder(320, 240, fps=30, bitrate=1_500_000, keyframe_interval=100)
    sources, frames, keys = [], [], []
    for i in range(count):
        picture = pattern.next_frame()
        sources.append(yuv_of_frame(picture))
        if i == key_at:
            encoder.request_keyframe()
        out = encoder.encode(picture)
        assert len(out) == 1  # realtime settings: no look-ahead, one frame out per frame in
        frames.append(out[0].data)
        keys.append(out[0].keyframe)
    assert encoder.flush() == []
    return sources, frames, keys


def test_vp8_frames_through_a_lossy_path_decode_exactly_when_whole() -> None:
    sources, frames, keys = encode_pattern()
    assert [i for i, k in enumerate(keys) if k] == [0, 15]
    packetizer = Vp8Packetizer(1200)
    rtp = RtpSequencer(0x77, VP8_PT, sequence_number=0xFFFA, timestamp_base=0, frame_marking_id=4)
    sent: list[tuple[int, list[bytes]]] = []
    for i, frame in enumerate(frames):
        sent.append((i, rtp.packets(packetizer.packetize(frame), i * 3000)))
    assert max(len(p) for _, p in sent) > 1  # key frames span several packets
    rng = random.Random(2)
    lost_frames = set()
    assembler = Vp8FrameAssembler(max_wait=0.1)  # no repair here: give a gap up after 0.1 s
    decoder = Vp8Decoder()
    decoded = []

    def decode(frames: list[AssembledFrame]) -> None:
        for frame in frames:
            pictures = decoder.decode(frame.data)
            assert len(pictures) == 1
            decoded.append((frame.timestamp // 3000, pictures[0]))

    for i, packets in sent:
        for packet in packets:
            if rng.random() < 0.05:
                lost_frames.add(i)
                continue
            p = RtpPacket.parse(packet)
            assert len(p.payload) <= 1200
            decode(assembler.push(p.sequence_number, p.timestamp, p.marker, p.payload, i / 30))
    decode(assembler.poll(10.0))
    assert lost_frames  # the seed loses something
    expected, chain = [], True  # a frame decodes if it is whole and so is its chain back
    for i in range(30):
        whole = i not in lost_frames
        chain = (chain or keys[i]) and whole
        if chain:
            expected.append(i)
    assert expected != list(range(30)) and expected[-1] == 29  # lost some, recovered at 15
    assert [i for i, _ in decoded] == expected
    for i, picture in decoded[:3]:  # the pictures are the pattern, give or take the codec
        got, want = yuv_of_frame(picture), sources[i]
        luma = len(want) * 2 // 3
        diff = sum(abs(a - b) for a, b in zip(got[:luma:7], want[:luma:7], strict=True))
        assert diff / (luma / 7) < 6
    with pytest.raises(MediaDecodeError):
        Vp8Decoder().decode(frames[1])  # a delta frame with no key frame before it
    with pytest.raises(MediaDecodeError):
        decoder.decode(b"")


def test_yuv_helpers_round_trip_and_check_sizes() -> None:
    data = bytes(range(256)) * (34 * 18 * 3 // 2 // 256) + bytes(34 * 18 * 3 // 2 % 256)
    assert yuv_of_frame(frame_from_yuv(data, 34, 18)) == data  # padded line size
    with pytest.raises(ValueError):
        frame_from_yuv(data, 33, 18)
    with pytest.raises(ValueError):
        frame_from_yuv(data[:-1], 34, 18)
    rgb = av.VideoFrame(16, 16, "rgb24")
    assert len(yuv_of_frame(rgb)) == 16 * 16 * 3 // 2


def test_recorder_writes_playable_files_with_rtp_timing(tmp_path: Path) -> None:
    encoder = OpusEncoder()
    audio = []
    for pcm in tone_pcm():
        audio += encoder.encode(pcm)
    _, frames, _ = encode_pattern()
    folder = check_record_directory(tmp_path / "rec")
    base_audio, base_video = 0xFFFFF000, 0xFFFF0000  # both wrap
    with Recorder(folder, "../bob") as recorder:
        for i, packet in enumerate(audio):
            if 40 <= i < 45:
                continue  # lost: the gap stays in the timeline
            recorder.add_audio((base_audio + packet.pts) & 0xFFFFFFFF, packet.data)
        recorder.add_audio(base_audio, audio[0].data)  # late: skipped
        recorder.add_audio(base_audio, b"\x03")  # garbage
        recorder.add_video(base_video, frames[1])  # a delta frame before any key frame
        for i, frame in enumerate(frames):
            recorder.add_video((base_video + 3000 * i) & 0xFFFFFFFF, frame)
        recorder.add_video(base_video + 3000 * 40, b"\x50\x00\x00garbage")
    stats = recorder.stats
    assert (stats.audio_packets, stats.audio_decode_errors) == (len(audio) - 5, 1)
    assert (stats.video_frames, stats.video_skipped, stats.video_decode_errors) == (30, 1, 1)
    assert stats.out_of_order == 1
    assert recorder.audio_path == folder / "_bob.audio.ogg"
    assert recorder.video_path == folder / "_bob.video.webm"
    with av.open(str(recorder.audio_path)) as container:
        stream = container.streams.audio[0]
        assert stream.codec_context.name == "opus"
        decoder = OpusDecoder()
        pcm = b"".join(decoder.decode(bytes(p)) for p in container.demux(stream) if p.size)
        assert container.duration is not None
        seconds = container.duration / 1_000_000
    assert abs(seconds - len(audio) * 0.02) < 0.02 * len(audio) * 0.02
    assert len(pcm) == (len(audio) - 5) * FRAME_BYTES
    with av.open(str(recorder.video_path)) as container:
        stream = container.streams.video[0]
        assert (stream.codec_context.name, stream.width, stream.height) == ("vp8", 320, 240)
        pictures = list(container.decode(stream))
        assert len(pictures) == 30
        times = [p.time for p in pictures]
    assert times[0] == 0 and times[-1] == pytest.approx(29 / 30, abs=0.002)
    recorder.close()  # again: harmless


def test_record_directory_that_cannot_be_written(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(MediaFileError, match="cannot write"):
        check_record_directory(blocker / "sub")
    assert safe_file_name("../a b/é") == "_a_b__" and safe_file_name("..") == "peer"


def write_wav(path: Path, seconds: float, rate: int = 44_100) -> None:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(2)
        w.setsampwidth(2)
        w.setframerate(rate)
        frames = bytearray()
        for i in range(int(seconds * rate)):
            v = round(9000 * math.sin(2 * math.pi * 660 * i / rate))
            frames += struct.pack("<hh", v, v)
        w.writeframes(bytes(frames))


def test_audio_file_source_resamples_and_loops(tmp_path: Path) -> None:
    path = tmp_path / "tone.wav"
    write_wav(path, 0.5)
    source = AudioFileSource(path)
    frames = []
    while (frame := source.read()) is not None:
        frames.append(frame)
    assert all(len(f) == FRAME_BYTES for f in frames)
    assert len(frames) in (25, 26)
    assert abs(frequency(samples_of(b"".join(frames[2:20]))) - 660) < 660 * 0.02
    source.close()
    looping = AudioFileSource(path, loop=True)
    assert all(looping.read() is not None for _ in range(60)) and looping.loops == 2
    looping.close()


def test_video_file_source_converts_size_rate_and_loops(tmp_path: Path) -> None:
    path = tmp_path / "clip.webm"
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libvpx", rate=15)
        stream.width, stream.height, stream.pix_fmt = 96, 64, "yuv420p"
        pattern = TestPattern("x", 96, 64, fps=15)
        for _ in range(15):
            for packet in stream.encode(pattern.next_frame()):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    source = VideoFileSource(path, width=64, height=48, fps=30)
    frames = []
    while (frame := source.read()) is not None:
        frames.append(frame)
    assert len(frames) == 30  # 1 s at 15 fps shown at 30 fps
    assert {(f.width, f.height, f.format.name) for f in frames} == {(64, 48, "yuv420p")}
    assert [f.pts for f in frames] == list(range(30))
    source.close()
    looping = VideoFileSource(path, width=64, height=48, fps=30, loop=True)
    assert all(looping.read() is not None for _ in range(70)) and looping.loops == 2
    looping.close()
    with pytest.raises(MediaFileError, match="no audio stream"):
        AudioFileSource(path)


def test_bad_input_files_name_the_file_and_the_reason(tmp_path: Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("not media at all\n" * 10)
    wav = tmp_path / "a.wav"
    write_wav(wav, 0.1)
    cases = [
        (tmp_path / "missing.webm", "no such file"),
        (tmp_path, "is a directory"),
        (text, "unreadable"),
    ]
    for path, reason in cases:
        with pytest.raises(MediaFileError) as info:
            VideoFileSource(path)
        assert str(info.value).startswith(f"{path}: {reason}")
        assert "\n" not in str(info.value)
    with pytest.raises(MediaFileError, match="no video stream"):
        VideoFileSource(wav)


def test_test_pattern_and_tone_are_what_they_say() -> None:
    alice, bob = TestPattern("alice", 64, 48, fps=10), TestPattern("bob", 64, 48, fps=10)
    a0, a1, b0 = (
        yuv_of_frame(f) for f in (alice.next_frame(), alice.next_frame(), bob.next_frame())
    )
    assert a0 != a1  # the bar moves and the clock runs
    assert a0[: 64 * 48] != b0[: 64 * 48]  # the names differ
    assert a0[64 * 48 :] != b0[64 * 48 :]  # and so do the colours
    with pytest.raises(ValueError):
        TestPattern("x", 63, 48)
    tone = ToneGenerator(1000.0)
    pcm = tone.next_frame() + tone.next_frame()
    assert abs(frequency(samples_of(pcm)) - 1000) < 1  # continuous across frames
    assert max(samples_of(pcm)) == round(0.3 * 32767)


def test_recorder_without_validation_follows_the_callers_decoder(tmp_path: Path) -> None:
    _, frames, _ = encode_pattern()
    with Recorder(tmp_path, "carol", validate=False) as recorder:
        for i, frame in enumerate(frames):
            if i == 5:
                recorder.skip_until_keyframe()  # the caller's decoder failed here
            recorder.add_video(3000 * i, frame)
    assert (recorder.stats.video_frames, recorder.stats.video_skipped) == (20, 10)
    with av.open(str(recorder.video_path)) as container:
        assert sum(1 for _ in container.decode(video=0)) == 20
    assert not recorder.audio_path.exists()  # no audio came: no file


def test_an_empty_audio_file_does_not_loop_forever(tmp_path: Path) -> None:
    path = tmp_path / "empty.wav"
    write_wav(path, 0.0)
    assert AudioFileSource(path).read() is None
    with pytest.raises(MediaFileError, match="no samples"):
        AudioFileSource(path, loop=True).read()
