"""Real audio and video through PyAV: Opus and VP8 codecs, file sources, a recorder, test media.

This module needs the optional extra ``perc[media]`` (PyAV, with FFmpeg's libopus and libvpx);
importing it without PyAV raises :class:`ImportError` naming ``pip install 'perc[media]'``.
Nothing else in perc imports it unless real media is asked for (D35); synthetic media keeps
working without it.

Theory of operation
-------------------
perc never implements a codec: PyAV (FFmpeg) encodes and decodes. This module only adapts it
to perc's terms:

- **Audio** is 48 kHz mono, signed 16-bit little-endian PCM, in 20 ms frames of 960 samples
  (1920 bytes): :class:`OpusEncoder` takes such frames and gives Opus packets, one per frame
  (RFC 7587 §4.2); :class:`OpusDecoder` gives them back. :class:`ToneGenerator` makes a sine
  tone frame by frame.
- **Video** is ``av.VideoFrame`` in yuv420p: :class:`Vp8Encoder` (realtime settings, no
  look-ahead, a configurable bitrate, frame rate and size, a key frame on request for PLI/FIR,
  RFC 4585 §6.3.1) gives encoded frames for :class:`perc.media.packetize.Vp8Packetizer`;
  :class:`Vp8Decoder` takes the frames :class:`~perc.media.packetize.Vp8FrameAssembler`
  releases. :class:`TestPattern` draws a moving bar, the sender's name and a clock.
- **Files in**: :class:`AudioFileSource` / :class:`VideoFileSource` read the first audio or
  video stream of anything FFmpeg reads, convert it (48 kHz mono s16; yuv420p at the target
  size and frame rate, dropping or repeating frames) and loop if asked. A missing file, an
  unreadable one, or one without the wanted stream raises :class:`MediaFileError` naming the
  file and the reason, when the source is made: before a conference is joined.
- **Files out**: :class:`Recorder` writes one peer's media, ``NAME.audio.ogg`` (the Opus
  packets as received, no re-encoding) and ``NAME.video.webm`` (the VP8 frames as received),
  with presentation times taken from the RTP timestamps (RFC 3550 §5.1: 48 kHz for Opus,
  RFC 7587 §4.1; 90 kHz for VP8, RFC 7741 §6.1), so gaps stay gaps. Before writing, it
  decodes each packet: a payload that does not decode is counted and skipped, and the video
  resumes at the next key frame.

Every class here is CPU-bound and synchronous (sans-IO apart from the files it was asked to
read or write). The trio shell must run encoding, decoding, file reading and recording
through ``trio.to_thread.run_sync`` wherever a call could block the event loop for more than
a fraction of a frame (VP8 at 640x360 takes milliseconds per frame; a file read can stall).
Each object is used by one thread at a time.
"""

from __future__ import annotations

import array
import math
import os
import re
import sys
import tempfile
from fractions import Fraction
from pathlib import Path
from typing import Any

import attrs

try:
    import av
    import av.error
    from av.audio.fifo import AudioFifo
    from av.audio.frame import AudioFrame
    from av.audio.resampler import AudioResampler
    from av.codec.context import CodecContext
    from av.container import InputContainer, OutputContainer
    from av.video.frame import PictureType, VideoFrame
except ImportError as exc:  # pragma: no cover - exercised in a subprocess by the tests
    raise ImportError(
        "real audio and video need PyAV, an optional extra: pip install 'perc[media]'"
    ) from exc

from perc.wire.vp8 import Vp8DecodeError, vp8_frame_is_keyframe, vp8_keyframe_size

__all__ = [
    "AUDIO_RATE",
    "FRAME_BYTES",
    "FRAME_SAMPLES",
    "AudioFileSource",
    "EncodedFrame",
    "MediaDecodeError",
    "MediaFileError",
    "OpusDecoder",
    "OpusEncoder",
    "Recorder",
    "RecorderStats",
    "TestPattern",
    "ToneGenerator",
    "VideoFileSource",
    "Vp8Decoder",
    "Vp8Encoder",
    "check_record_directory",
    "frame_from_yuv",
    "safe_file_name",
    "yuv_of_frame",
]

AUDIO_RATE = 48_000
FRAME_SAMPLES = 960  # 20 ms
FRAME_BYTES = 2 * FRAME_SAMPLES
VIDEO_CLOCK = 90_000  # RFC 7741 §6.1
_AUDIO_TB = Fraction(1, AUDIO_RATE)
_VIDEO_TB = Fraction(1, VIDEO_CLOCK)


class MediaFileError(Exception):
    """A media file cannot be used. ``str()`` is one line naming the file and the reason."""

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        super().__init__(f"{os.fspath(path)}: {reason}")
        self.path = os.fspath(path)
        self.reason = reason


class MediaDecodeError(Exception):
    """A received payload does not decode (valid SRTP, garbage inside): count it, go on."""


@attrs.frozen(slots=True)
class EncodedFrame:
    """One encoded frame. ``pts`` counts the codec's clock from the stream start: samples at
    48 kHz for Opus, frames for VP8 (multiply by 90000/fps for the RTP timestamp)."""

    data: bytes
    pts: int
    keyframe: bool


# --- audio -----------------------------------------------------------------------------------


def _pcm_frame(pcm: bytes, pts: int | None) -> AudioFrame:
    if len(pcm) % 2:
        raise ValueError("s16 PCM has an even number of bytes")
    frame = AudioFrame(format="s16", layout="mono", samples=len(pcm) // 2)
    frame.planes[0].update(pcm)
    frame.sample_rate = AUDIO_RATE
    frame.time_base = _AUDIO_TB
    frame.pts = pts
    return frame


class _ToS16:
    """Any decoded audio to 48 kHz mono s16 bytes."""

    def __init__(self) -> None:
        self._resampler = AudioResampler(format="s16", layout="mono", rate=AUDIO_RATE)

    def convert(self, frame: AudioFrame | None) -> bytes:
        out = self._resampler.resample(frame)
        return b"".join(_plane_bytes(f) for f in out)


def _plane_bytes(frame: AudioFrame) -> bytes:
    return bytes(frame.planes[0])[: frame.samples * 2]


class OpusEncoder:
    """20 ms frames of 48 kHz mono s16 PCM in, Opus packets out (libopus)."""

    def __init__(self, bitrate: int = 32_000, *, application: str = "audio") -> None:
        ctx = CodecContext.create("libopus", "w")
        ctx.sample_rate = AUDIO_RATE
        ctx.layout = "mono"
        ctx.format = "s16"
        ctx.bit_rate = bitrate
        ctx.time_base = _AUDIO_TB
        ctx.options = {"application": application, "frame_duration": "20"}
        self._ctx = ctx
        self._pts = 0

    def encode(self, pcm: bytes) -> list[EncodedFrame]:
        """One frame of exactly :data:`FRAME_BYTES` bytes; the packets that are ready."""
        if len(pcm) != FRAME_BYTES:
            raise ValueError(f"an Opus frame is {FRAME_BYTES} bytes of PCM, not {len(pcm)}")
        frame = _pcm_frame(pcm, self._pts)
        self._pts += FRAME_SAMPLES
        return self._out(self._ctx.encode(frame))

    def flush(self) -> list[EncodedFrame]:
        return self._out(self._ctx.encode(None))

    @staticmethod
    def _out(packets: list[av.Packet[Any]]) -> list[EncodedFrame]:
        return [EncodedFrame(bytes(p), int(p.pts or 0), True) for p in packets]


class OpusDecoder:
    """Opus packets in, 48 kHz mono s16 PCM out."""

    def __init__(self) -> None:
        ctx = CodecContext.create("libopus", "r")
        ctx.sample_rate = AUDIO_RATE
        ctx.layout = "mono"
        self._ctx = ctx
        self._convert = _ToS16()

    def decode(self, packet: bytes) -> bytes:
        """The PCM of one packet; raises :class:`MediaDecodeError` for an undecodable one."""
        if not packet:  # an empty packet would put the decoder into its end-of-stream state
            raise MediaDecodeError("empty Opus packet")
        try:
            frames = self._ctx.decode(av.Packet(packet))
        except av.error.FFmpegError as exc:
            raise MediaDecodeError(f"Opus packet does not decode: {exc}") from None
        return b"".join(self._convert.convert(f) for f in frames)


class ToneGenerator:
    """A continuous sine tone as 20 ms PCM frames."""

    def __init__(self, frequency: float, *, amplitude: float = 0.3) -> None:
        self.frequency = frequency
        self.amplitude = amplitude
        self._n = 0

    def next_frame(self) -> bytes:
        step = 2 * math.pi * self.frequency / AUDIO_RATE
        peak = self.amplitude * 32767
        start = self._n
        self._n += FRAME_SAMPLES
        samples = array.array(
            "h", (round(peak * math.sin(step * (start + i))) for i in range(FRAME_SAMPLES))
        )
        if sys.byteorder == "big":  # pragma: no cover - s16 PCM is little-endian
            samples.byteswap()
        return samples.tobytes()


# --- video -----------------------------------------------------------------------------------


def frame_from_yuv(data: bytes, width: int, height: int) -> VideoFrame:
    """A yuv420p frame from tightly packed planes (Y, then U, then V)."""
    if width % 2 or height % 2:
        raise ValueError("yuv420p needs an even width and height")
    if len(data) != width * height * 3 // 2:
        raise ValueError("yuv420p data does not match the size")
    frame = VideoFrame(width, height, "yuv420p")
    pos = 0
    for plane in frame.planes:
        w, h = plane.width, plane.height
        packed = data[pos : pos + w * h]
        pos += w * h
        if plane.line_size == w:
            plane.update(packed)
        else:
            pad = bytes(plane.line_size - w)
            plane.update(b"".join(packed[r * w : (r + 1) * w] + pad for r in range(h)))
    return frame


def yuv_of_frame(frame: VideoFrame) -> bytes:
    """Tightly packed yuv420p planes of a frame (converted if it is another format)."""
    if frame.format.name != "yuv420p":
        frame = frame.reformat(format="yuv420p")
    out = []
    for plane in frame.planes:
        raw = bytes(plane)
        w, stride = plane.width, plane.line_size
        out += [raw[r * stride : r * stride + w] for r in range(plane.height)]
    return b"".join(out)


class Vp8Encoder:
    """yuv420p frames in, VP8 frames out (libvpx, realtime: no look-ahead, no alt-ref)."""

    def __init__(
        self,
        width: int = 640,
        height: int = 360,
        *,
        fps: int = 30,
        bitrate: int = 800_000,
        keyframe_interval: float = 10.0,
        threads: int = 1,
    ) -> None:
        ctx = CodecContext.create("libvpx", "w")
        ctx.width = width
        ctx.height = height
        ctx.pix_fmt = "yuv420p"
        ctx.time_base = Fraction(1, fps)
        ctx.framerate = Fraction(fps)
        ctx.bit_rate = bitrate
        ctx.gop_size = max(1, round(keyframe_interval * fps))
        ctx.thread_count = threads
        ctx.options = {
            "deadline": "realtime",
            "cpu-used": "8",
            "lag-in-frames": "0",  # every frame out at once: no encoder delay
            "auto-alt-ref": "0",
            "error-resilient": "1",  # RFC 7741 §5: helps decoding after loss
        }
        self._ctx = ctx
        self.width, self.height, self.fps = width, height, fps
        self._pts = 0
        self._want_key = False

    def request_keyframe(self) -> None:
        """The next frame is a key frame (a PLI or FIR arrived)."""
        self._want_key = True

    def encode(self, frame: VideoFrame, *, keyframe: bool = False) -> list[EncodedFrame]:
        if (frame.width, frame.height) != (self.width, self.height):
            frame = frame.reformat(self.width, self.height, "yuv420p")
        elif frame.format.name != "yuv420p":
            frame = frame.reformat(format="yuv420p")
        frame.pts = self._pts
        frame.time_base = Fraction(1, self.fps)
        self._pts += 1
        frame.pict_type = PictureType.I if keyframe or self._want_key else PictureType.NONE
        self._want_key = False
        return self._out(self._ctx.encode(frame))

    def flush(self) -> list[EncodedFrame]:
        return self._out(self._ctx.encode(None))

    @staticmethod
    def _out(packets: list[av.Packet[Any]]) -> list[EncodedFrame]:
        return [EncodedFrame(bytes(p), int(p.pts or 0), p.is_keyframe) for p in packets]


class Vp8Decoder:
    """Whole VP8 frames in (from the assembler), decoded frames out."""

    def __init__(self) -> None:
        self._ctx = CodecContext.create("vp8", "r")

    def decode(self, data: bytes) -> list[VideoFrame]:
        """The pictures of one whole frame; raises :class:`MediaDecodeError` if it does not
        decode (garbage, or a delta frame whose references the decoder lacks)."""
        if not data:  # an empty packet would put the decoder into its end-of-stream state
            raise MediaDecodeError("empty VP8 frame")
        try:
            return list(self._ctx.decode(av.Packet(data)))
        except av.error.FFmpegError as exc:
            raise MediaDecodeError(f"VP8 frame does not decode: {exc}") from None


# A 3x5 pixel font for the test pattern: each glyph is five rows of three bits.
_FONT = {
    "0": "111101101101111", "1": "010110010010111", "2": "111001111100111",
    "3": "111001111001111", "4": "101101111001001", "5": "111100111001111",
    "6": "111100111101111", "7": "111001001001001", "8": "111101111101111",
    "9": "111101111001111", ":": "000010000010000", ".": "000000000000010",
    "-": "000000111000000", " ": "000000000000000",
    "A": "010101111101101", "B": "110101110101110", "C": "111100100100111",
    "D": "110101101101110", "E": "111100110100111", "F": "111100110100100",
    "G": "111100101101111", "H": "101101111101101", "I": "111010010010111",
    "J": "001001001101111", "K": "101101110101101", "L": "100100100100111",
    "M": "101111111101101", "N": "110101101101101", "O": "111101101101111",
    "P": "111101111100100", "Q": "111101101111001", "R": "110101110101101",
    "S": "111100111001111", "T": "111010010010010", "U": "101101101101111",
    "V": "101101101101010", "W": "101101111111101", "X": "101101010101101",
    "Y": "101101010010010", "Z": "111001010100111", "_": "000000000000111",
}  # fmt: skip


class TestPattern:
    """Generated video: a bar sweeping across, the sender's name and a clock, in yuv420p."""

    __test__ = False  # not a pytest class

    def __init__(self, name: str, width: int = 640, height: int = 360, fps: int = 30) -> None:
        if width % 2 or height % 2:
            raise ValueError("yuv420p needs an even width and height")
        self.name, self.width, self.height, self.fps = name, width, height, fps
        self._index = 0
        # A still background of graded squares: detail for the encoder to spend bits on.
        cell = max(4, width // 40)
        self._background = bytes(
            16 + ((x // cell) * 29 + (y // cell) * 53) % 160 + (x + y) % 7
            for y in range(height)
            for x in range(width)
        )
        # A colour per name, so two senders' pictures differ.
        self._chroma = (64 + sum(name.encode()) * 37 % 128, 64 + sum(name.encode()) * 91 % 128)

    def next_frame(self) -> VideoFrame:
        w, h = self.width, self.height
        i = self._index
        self._index += 1
        luma = bytearray(self._background)
        bar = max(2, w // 16)
        x0 = (i * max(1, w // (2 * self.fps))) % (w - bar)
        white = b"\xeb" * bar
        for y in range(h):
            luma[y * w + x0 : y * w + x0 + bar] = white
        seconds = i / self.fps
        text = f"{self.name.upper()} {int(seconds // 60):02d}:{seconds % 60:05.2f}"
        self._draw(luma, text, scale=max(1, h // 60))
        u, v = self._chroma
        chroma = bytes([u]) * (w * h // 4) + bytes([v]) * (w * h // 4)
        frame = frame_from_yuv(bytes(luma) + chroma, w, h)
        frame.pts = i
        return frame

    def _draw(self, luma: bytearray, text: str, scale: int) -> None:
        w, h = self.width, self.height
        x = y = 2 * scale
        for ch in text:
            glyph = _FONT.get(ch, _FONT[" "])
            if x + 3 * scale > w or y + 5 * scale > h:
                return
            for gy in range(5):
                for gx in range(3):
                    if glyph[gy * 3 + gx] == "1":
                        for dy in range(scale):
                            at = (y + gy * scale + dy) * w + x + gx * scale
                            luma[at : at + scale] = b"\xeb" * scale
            x += 4 * scale


# --- files in --------------------------------------------------------------------------------


def _open_input(path: str | os.PathLike[str]) -> InputContainer:
    if not os.path.exists(path):
        raise MediaFileError(path, "no such file")
    if os.path.isdir(path):
        raise MediaFileError(path, "is a directory")
    if not os.access(path, os.R_OK):
        raise MediaFileError(path, "permission denied")
    try:
        return av.open(os.fspath(path), "r")
    except (av.error.FFmpegError, OSError, UnicodeDecodeError) as exc:
        raise MediaFileError(path, f"unreadable: {_reason(exc)}") from None


def _reason(exc: BaseException) -> str:
    text = getattr(exc, "strerror", None) or str(exc)
    return str(text).split(":")[0].strip() or type(exc).__name__


class AudioFileSource:
    """The first audio stream of a file as 20 ms frames of 48 kHz mono s16 PCM."""

    def __init__(self, path: str | os.PathLike[str], *, loop: bool = False) -> None:
        self.path = path
        self.loop = loop
        self._container = self._open()
        self.loops = 0

    def _open(self) -> InputContainer:
        container = _open_input(self.path)
        if not container.streams.audio:
            container.close()
            raise MediaFileError(self.path, "no audio stream")
        self._stream = container.streams.audio[0]
        self._frames = container.decode(self._stream)
        self._convert = _ToS16()
        self._fifo = AudioFifo()
        self._ended = False
        self._pass_samples = 0
        return container

    def read(self) -> bytes | None:
        """The next 20 ms frame; ``None`` at the end (never, when looping)."""
        while True:
            if self._fifo.samples >= FRAME_SAMPLES:
                frame = self._fifo.read(FRAME_SAMPLES)
                if frame is not None:
                    return _plane_bytes(frame)
            if self._ended:
                rest = self._fifo.read(0, partial=True) if self._fifo.samples else None
                if rest is not None:
                    data = _plane_bytes(rest)
                    return data + bytes(FRAME_BYTES - len(data))
                if not self.loop:
                    return None
                if not self._pass_samples:
                    raise MediaFileError(self.path, "audio stream has no samples")
                self._container.close()
                self._container = self._open()
                self.loops += 1
                continue
            self._pull()

    def _pull(self) -> None:
        try:
            frame = next(self._frames, None)
        except av.error.FFmpegError as exc:
            raise MediaFileError(self.path, f"audio does not decode: {_reason(exc)}") from None
        pcm = self._convert.convert(frame)
        if frame is None:
            self._ended = True
        if pcm:
            self._pass_samples += len(pcm) // 2
            self._fifo.write(_pcm_frame(pcm, None))

    def close(self) -> None:
        self._container.close()


class VideoFileSource:
    """The first video stream of a file as yuv420p frames of one size at a fixed frame rate
    (source frames are repeated or dropped to keep the source's timing)."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        width: int = 640,
        height: int = 360,
        fps: int = 30,
        loop: bool = False,
    ) -> None:
        self.path = path
        self.width, self.height, self.fps, self.loop = width, height, fps, loop
        self.loops = 0
        self._index = 0  # output frames made
        self._offset = 0.0  # seconds added to source times (looping)
        self._prev: VideoFrame | None = None
        self._prev_time = 0.0
        self._container = self._open()

    def _open(self) -> InputContainer:
        container = _open_input(self.path)
        if not container.streams.video:
            container.close()
            raise MediaFileError(self.path, "no video stream")
        self._stream = container.streams.video[0]
        self._frames = container.decode(self._stream)
        self._pending: VideoFrame | None = None
        self._eof = False
        rate = self._stream.average_rate or self._stream.guessed_rate
        self._step = 1 / float(rate) if rate else 1 / self.fps
        return container

    def read(self) -> VideoFrame | None:
        """The next output frame; ``None`` at the end (never, when looping).

        Output slot k (time k/fps) shows the latest source frame whose time is at or before
        the slot; the last source frame lasts one source frame period."""
        slot = self._index / self.fps
        while True:
            if self._pending is None and not self._eof:
                self._pull()
            pending = self._pending
            if pending is not None:
                # A frame without a time follows the previous one by one source frame.
                if pending.pts is None:  # then it has no time either
                    t = self._prev_time + self._step if self._prev is not None else self._offset
                else:
                    t = self._offset + pending.time
                if self._prev is None or t <= slot:
                    self._prev, self._prev_time, self._pending = pending, t, None
                    continue
                return self._emit(self._prev)  # the next source frame is still to come
            if self._prev is None:
                raise MediaFileError(self.path, "video stream has no frames")
            end = self._prev_time + self._step  # the last frame lasts one source frame
            if slot < end - 1e-9:
                return self._emit(self._prev)
            if not self.loop:
                return None
            self._container.close()
            self._container = self._open()
            self._offset = end
            self.loops += 1

    def _pull(self) -> None:
        try:
            self._pending = next(self._frames, None)
        except av.error.FFmpegError as exc:
            raise MediaFileError(self.path, f"video does not decode: {_reason(exc)}") from None
        self._eof = self._pending is None

    def _emit(self, frame: VideoFrame) -> VideoFrame:
        out = frame.reformat(self.width, self.height, "yuv420p")
        out.pts = self._index
        self._index += 1
        return out

    def close(self) -> None:
        self._container.close()


# --- files out -------------------------------------------------------------------------------


def check_record_directory(path: str | os.PathLike[str]) -> Path:
    """Create the recording folder if needed and prove it is writable (before joining)."""
    folder = Path(path)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".perc-write-test-"):
            pass
    except OSError as exc:
        raise MediaFileError(path, f"cannot write: {exc.strerror or exc}") from None
    return folder


def safe_file_name(name: str) -> str:
    """A peer's name made safe as a file name: no separators, no leading dot."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]", "_", name).lstrip(".")
    return cleaned or "peer"


class _Unwrap:
    """RTP timestamps (32 bits, wrapping) to ticks since the first one (RFC 3550 §5.1)."""

    def __init__(self) -> None:
        self._first: int | None = None
        self._last = 0
        self._ext = 0

    def __call__(self, timestamp: int) -> int:
        if self._first is None:
            self._first = self._last = timestamp
            return 0
        delta = ((timestamp - self._last + 0x80000000) & 0xFFFFFFFF) - 0x80000000
        self._last = timestamp
        self._ext += delta
        return self._ext


@attrs.define
class RecorderStats:
    audio_packets: int = 0  # written
    video_frames: int = 0  # written
    audio_decode_errors: int = 0
    video_decode_errors: int = 0
    video_skipped: int = 0  # delta frames with no key frame before them (start, after errors)
    out_of_order: int = 0  # a timestamp not after the last one written: skipped


class Recorder:
    """One peer's received media into ``NAME.audio.ogg`` and ``NAME.video.webm`` (module doc).

    Files are created when the first packet of their kind arrives; ``close()`` finishes them.
    With ``validate`` (the default) each packet is decoded first and kept only if it decodes;
    a caller that decodes anyway passes ``validate=False``, gives only what decoded, and calls
    :meth:`skip_until_keyframe` when its decoder fails. The Ogg file's Opus header (OpusHead,
    RFC 7845 §5.1) comes from the local libopus, so its pre-skip is libopus's (312 samples).
    """

    def __init__(
        self, directory: str | os.PathLike[str], name: str, *, validate: bool = True
    ) -> None:
        folder = Path(directory)
        base = safe_file_name(name)
        self.audio_path = folder / f"{base}.audio.ogg"
        self.video_path = folder / f"{base}.video.webm"
        self.validate = validate
        self.stats = RecorderStats()
        self._audio: OutputContainer | None = None
        self._audio_stream: av.AudioStream | None = None
        self._audio_clock = _Unwrap()
        self._audio_last = -1
        self._audio_decoder = OpusDecoder() if validate else None
        self._video: OutputContainer | None = None
        self._video_stream: av.VideoStream | None = None
        self._video_clock = _Unwrap()
        self._video_last = -1
        self._video_decoder = Vp8Decoder() if validate else None
        self._need_key = True

    def add_audio(self, rtp_timestamp: int, payload: bytes) -> None:
        """One received Opus packet (the end-to-end plaintext payload)."""
        samples = FRAME_SAMPLES
        if self._audio_decoder is not None:
            try:
                samples = len(self._audio_decoder.decode(payload)) // 2
            except MediaDecodeError:
                self.stats.audio_decode_errors += 1
                return
        pts = self._audio_clock(rtp_timestamp)
        if pts <= self._audio_last:
            self.stats.out_of_order += 1
            return
        if self._audio is None:
            self._audio = self._open(self.audio_path, "ogg")
            stream = self._audio.add_stream("libopus", rate=AUDIO_RATE)
            stream.codec_context.layout = "mono"
            stream.codec_context.format = "s16"
            stream.codec_context.open()  # its OpusHead becomes the file's header
            self._audio_stream = stream
        self._mux(
            self._audio,
            self._audio_stream,
            payload,
            pts,
            _AUDIO_TB,
            duration=samples,
            keyframe=True,
        )
        self._audio_last = pts
        self.stats.audio_packets += 1

    def add_video(self, rtp_timestamp: int, frame: bytes) -> None:
        """One whole VP8 frame (from :class:`~perc.media.packetize.Vp8FrameAssembler`)."""
        try:
            keyframe = vp8_frame_is_keyframe(frame)
            size = vp8_keyframe_size(frame) if keyframe else None
        except Vp8DecodeError:
            self.stats.video_decode_errors += 1
            self._need_key = True
            return
        if self._need_key and not keyframe:
            self.stats.video_skipped += 1
            return
        if self._video_decoder is not None:
            try:
                self._video_decoder.decode(frame)
            except MediaDecodeError:
                self.stats.video_decode_errors += 1
                self._need_key = True
                return
        pts = self._video_clock(rtp_timestamp)
        if pts <= self._video_last:
            self.stats.out_of_order += 1
            return
        self._need_key = False
        if self._video is None:
            if size is None:  # pragma: no cover - a key frame always has a size
                return
            self._video = self._open(self.video_path, "webm")
            stream = self._video.add_stream("libvpx", rate=30)
            stream.width, stream.height = size
            stream.pix_fmt = "yuv420p"
            stream.time_base = _VIDEO_TB
            self._video_stream = stream
        self._mux(
            self._video,
            self._video_stream,
            frame,
            pts,
            _VIDEO_TB,
            duration=None,
            keyframe=keyframe,
        )
        self._video_last = pts
        self.stats.video_frames += 1

    def skip_until_keyframe(self) -> None:
        """The caller's own decoder failed on this peer's video (with ``validate=False``):
        write nothing more until the next key frame."""
        self._need_key = True

    def _open(self, path: Path, fmt: str) -> OutputContainer:
        try:
            return av.open(str(path), "w", format=fmt)
        except (av.error.FFmpegError, OSError) as exc:
            raise MediaFileError(path, f"cannot write: {_reason(exc)}") from None

    @staticmethod
    def _mux(
        container: OutputContainer,
        stream: av.AudioStream | av.VideoStream | None,
        data: bytes,
        pts: int,
        time_base: Fraction,
        *,
        duration: int | None,
        keyframe: bool,
    ) -> None:
        if stream is None:  # pragma: no cover - set together with the container
            return
        packet = av.Packet(data)
        packet.pts = packet.dts = pts
        packet.time_base = time_base
        if duration is not None:
            packet.duration = duration
        packet.is_keyframe = keyframe
        packet.stream = stream
        container.mux(packet)

    def close(self) -> None:
        """Finish both files (idempotent)."""
        for container in (self._audio, self._video):
            if container is not None:
                container.close()
        self._audio = self._video = None

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
