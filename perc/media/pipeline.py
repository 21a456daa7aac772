"""The codec side of a real-media endpoint: what the I/O shell runs off its event loop (D35).

Needs PyAV (``perc[media]``): importing this module without it raises the ImportError of
:mod:`perc.media.codecs`, which names ``pip install 'perc[media]'``.

Theory of operation
-------------------
:class:`Pipeline` holds one endpoint's codec objects, built before it joins (a missing,
unreadable or codec-less input file, or a record folder that cannot be written, raises
:class:`~perc.media.codecs.MediaFileError` then, naming the file and the reason):

- **producers** (:class:`AudioProducer`, :class:`VideoProducer`): each call of ``make(key)``
  reads or generates one frame (a file's next 20 ms or 1/fps, or a tone of the endpoint's own
  pitch and a test pattern with its name and a clock) and encodes it: Opus at 48 kHz in 20 ms
  frames; VP8 with a key frame when ``key`` is true (a PLI or FIR, RFC 4585 §6.3.1). It
  returns ``[(data, keyframe), ...]`` for :meth:`perc.media.real.RealSource.push`, or
  ``None`` when the input ended (never with ``loop``).
- **the sink** (:class:`MediaSink`): the Opus packets and whole VP8 frames the engine
  received (:class:`~perc.media.real.ReceivedMedia`) are decoded per sending SSRC and, with a
  record folder, written per peer name through :class:`~perc.media.codecs.Recorder`
  (``NAME.audio.ogg``, ``NAME.video.webm``, timed by the RTP timestamps). A payload that does
  not decode is counted as a decode error of that peer; that peer's video recording then
  waits for the next key frame. Nothing a peer sends can make the sink raise.

Every method is synchronous and CPU-bound; the shell calls them through
``trio.to_thread.run_sync``, one call at a time per object.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs

from perc.media.codecs import (
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
)
from perc.media.payload import StreamKind
from perc.media.real import RealSettings, ReceivedMedia, default_tone

__all__ = ["AudioProducer", "MediaFileError", "MediaSink", "Pipeline", "VideoProducer"]

Frames = list[tuple[bytes, bool]]


class AudioProducer:
    """20 ms of a file or of a tone, Opus-encoded, per call."""

    def __init__(self, settings: RealSettings, name: str) -> None:
        self.file = (
            None
            if settings.audio_file is None
            else AudioFileSource(settings.audio_file, loop=settings.loop)
        )
        self.tone = ToneGenerator(settings.tone or default_tone(name))
        self.encoder = OpusEncoder(settings.audio_bitrate)

    def make(self, key: bool = False) -> Frames | None:
        pcm = self.tone.next_frame() if self.file is None else self.file.read()
        if pcm is None:
            return None
        return [(f.data, True) for f in self.encoder.encode(pcm)]

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


class VideoProducer:
    """One frame of a file or of the test pattern, VP8-encoded, per call."""

    def __init__(self, settings: RealSettings, name: str) -> None:
        s = settings
        self.file = (
            None
            if s.video_file is None
            else VideoFileSource(
                s.video_file, width=s.width, height=s.height, fps=s.fps, loop=s.loop
            )
        )
        self.pattern = TestPattern(name, s.width, s.height, s.fps)
        self.encoder = Vp8Encoder(s.width, s.height, fps=s.fps, bitrate=s.bitrate)

    def make(self, key: bool = False) -> Frames | None:
        picture = self.pattern.next_frame() if self.file is None else self.file.read()
        if picture is None:
            return None
        return [(f.data, f.keyframe) for f in self.encoder.encode(picture, keyframe=key)]

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


@attrs.define
class PeerMediaStats:
    audio_packets: int = 0
    audio_decode_errors: int = 0
    video_frames: int = 0
    video_decode_errors: int = 0
    #: delta frames not decoded or recorded because the decoder waits for a key frame
    video_waiting_keyframe: int = 0


class _Peer:
    """One peer name: decoders per SSRC; one recording per run of its SSRCs.

    A peer that comes back as a new process has new SSRCs and a new RTP timestamp base, so
    its media goes to new files, ``NAME-2.audio.ogg`` and so on: one file's timing is one
    sender's clock (RFC 3550 §5.1)."""

    def __init__(self, name: str, record: Path | None) -> None:
        self.name = name
        self.record = record
        self.stats = PeerMediaStats()
        self.recorder = None if record is None else Recorder(record, name, validate=False)
        self.recordings: list[Recorder] = [] if self.recorder is None else [self.recorder]
        self.ssrcs: dict[StreamKind, int] = {}
        self.audio: dict[int, OpusDecoder] = {}
        self.video: dict[int, Vp8Decoder] = {}
        self.need_key: set[int] = set()

    def follow(self, kind: StreamKind, ssrc: int) -> None:
        """A new SSRC for a kind this recording already has: the next recording starts."""
        known = self.ssrcs.get(kind)
        if known == ssrc:
            return
        if known is not None and self.recorder is not None and self.record is not None:
            self.recorder.close()
            self.recorder = Recorder(
                self.record, f"{self.name}-{len(self.recordings) + 1}", validate=False
            )
            self.recordings.append(self.recorder)
            self.ssrcs = {}
        self.ssrcs[kind] = ssrc


class MediaSink:
    """Received real media decoded per SSRC and recorded per peer (module docstring)."""

    def __init__(self, record: Path | None = None, *, max_peers: int = 64) -> None:
        self.record = record
        self.max_peers = max_peers
        self.peers: dict[str, _Peer] = {}
        self.dropped = 0  # items of peers beyond max_peers
        self.record_errors = 0

    def process(self, items: list[ReceivedMedia]) -> None:
        for item in items:
            peer = self.peers.get(item.name)
            if peer is None:
                if len(self.peers) >= self.max_peers:
                    self.dropped += 1
                    continue
                peer = self.peers[item.name] = _Peer(item.name, self.record)
            try:
                peer.follow(item.kind, item.ssrc)
                if item.kind is StreamKind.AUDIO:
                    self._audio(peer, item)
                else:
                    self._video(peer, item)
            except (OSError, MediaFileError):
                # The disk filled up or the folder went away: decoding goes on.
                self.record_errors += 1
                peer.recorder = None

    def _audio(self, peer: _Peer, item: ReceivedMedia) -> None:
        decoder = peer.audio.get(item.ssrc)
        if decoder is None:
            decoder = peer.audio[item.ssrc] = OpusDecoder()
        try:
            decoder.decode(item.data)
        except MediaDecodeError:
            peer.stats.audio_decode_errors += 1
            return
        peer.stats.audio_packets += 1
        if peer.recorder is not None:
            peer.recorder.add_audio(item.timestamp, item.data)

    def _video(self, peer: _Peer, item: ReceivedMedia) -> None:
        decoder = peer.video.get(item.ssrc)
        if decoder is None:
            decoder = peer.video[item.ssrc] = Vp8Decoder()
            peer.need_key.add(item.ssrc)
        if item.ssrc in peer.need_key:
            if not item.keyframe:
                peer.stats.video_waiting_keyframe += 1
                return
            peer.need_key.discard(item.ssrc)
        try:
            decoder.decode(item.data)
        except MediaDecodeError:
            peer.stats.video_decode_errors += 1
            peer.need_key.add(item.ssrc)
            if peer.recorder is not None:
                peer.recorder.skip_until_keyframe()
            return
        peer.stats.video_frames += 1
        if peer.recorder is not None:
            peer.recorder.add_video(item.timestamp, item.data)

    def report(self) -> dict[str, Any]:
        """Per peer: what decoded, decode errors, and the recording's files."""
        out: dict[str, Any] = {}
        for name, peer in sorted(self.peers.items()):
            entry: dict[str, Any] = attrs.asdict(peer.stats)
            if peer.recordings:
                entry["files"] = [
                    str(path)
                    for rec in list(peer.recordings)
                    for path, n in (
                        (rec.audio_path, rec.stats.audio_packets),
                        (rec.video_path, rec.stats.video_frames),
                    )
                    if n
                ]
            out[name] = entry
        return out

    def close(self) -> None:
        """Finish every recording (idempotent)."""
        for peer in self.peers.values():
            for rec in peer.recordings:
                try:
                    rec.close()
                except (OSError, MediaFileError):
                    self.record_errors += 1


class Pipeline:
    """One endpoint's producers and sink; raises MediaFileError for bad inputs/outputs."""

    def __init__(self, settings: RealSettings, name: str, *, audio: bool, video: bool) -> None:
        self.settings = settings
        if settings.record is not None:
            check_record_directory(settings.record)
        self.audio = AudioProducer(settings, name) if audio else None
        try:
            self.video = VideoProducer(settings, name) if video else None
        except BaseException:
            if self.audio is not None:
                self.audio.close()
            raise
        self.sink = MediaSink(settings.record)

    def report(self) -> dict[str, Any]:
        return {"decoded": self.sink.report(), "record_errors": self.sink.record_errors}

    def close(self) -> None:
        for producer in (self.audio, self.video):
            if producer is not None:
                producer.close()
        self.sink.close()
