"""The endpoint role's I/O: one connected UDP socket to the MDD, trio timers, the report file.

The protocol (join, keys, keepalive, leaving, the media run's report and exit status) lives
in :mod:`perc.endpoint`, sans-IO; this module moves datagrams between one non-blocking UDP
socket connected to the MDD (one 5-tuple = one association at the MDD) and those objects,
and sleeps until their next timer. ICMP port-unreachable errors on the connected socket are
counted and named in a timeout message.

API::

    await join(settings, *, keylog=None) -> JoinResult
    await stay(result, *, duration=None, media=None, keepalive=3.0)  # raises AssociationEnded
    await run(settings, *, duration=None, keylog=None, media=None, keepalive=3.0)
    MediaRun(settings, options): await .run(duration=, keylog=, keepalive=);
        .finish(error_or_None) -> (ExitCode, message | None); .abandon(code); .report()

Self-healing (D30) is decided in :class:`perc.endpoint.Healer`; when the session raises
:class:`perc.endpoint.RejoinNeeded`, ``MediaRun`` gives the old association up (close_notify,
no BYE), waits the back-off the healer says and runs :func:`join` again on a new socket (a new
association at the MDD), then stays with the same media engine.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from collections.abc import Callable
from typing import Any

import attrs
import trio

from perc.config import EndpointConfig, default
from perc.endpoint import (
    AssociationEnded,
    EndpointStats,
    ExitCode,
    Joiner,
    JoinError,
    JoinFailed,
    JoinRefused,
    JoinSettings,
    JoinTimeout,
    MediaEngine,
    MediaOptions,
    MediaStatus,
    PeersMissing,
    RejoinNeeded,
    Session,
    WrongKmf,
    dtls_configuration,
    format_address,
    hbh_digest,
    log_joined,
)
from perc.keying import key_digest
from perc.media.endpoint import EndpointMedia
from perc.media.real import RealSource
from perc.tlsid import check_tls_id
from perc.tlsid import random_tls_id as new_tls_id

# Besides join/stay/run/MediaRun, this module still exports the names that moved to
# perc.endpoint and perc.tlsid, because bench/ and older tests import them from here.
__all__ = [
    "AssociationEnded",
    "ExitCode",
    "JoinError",
    "JoinFailed",
    "JoinRefused",
    "JoinResult",
    "JoinSettings",
    "JoinTimeout",
    "MediaOptions",
    "MediaRun",
    "PeersMissing",
    "WrongKmf",
    "check_tls_id",
    "dtls_configuration",
    "hbh_digest",
    "join",
    "key_digest",
    "new_tls_id",
    "run",
    "stay",
]

log = logging.getLogger(__name__)

#: Datagrams read per wake-up before yielding to other tasks (STYLE practice 11).
RECV_BATCH = 64
_UDP_MAX = 65535
#: On leaving, read at most this many RECV_BATCH batches of what already arrived.
_DRAIN_BATCHES = 16
KEEPALIVE: float = default(EndpointConfig, "keepalive")
#: Real media (D35): a frame is read and encoded this long before its slot.
ENCODE_AHEAD = 0.04
#: Real media: received packets and frames go to the decoders this often.
DECODE_INTERVAL = 0.02


@attrs.define(eq=False, repr=False)
class JoinResult(Session):
    """A joined endpoint (:class:`perc.endpoint.Session`) and its socket, which it owns."""

    socket: socket.socket = attrs.field(kw_only=True)
    """Non-blocking UDP socket connected to the MDD."""


MediaFactory = Callable[[JoinResult, float], MediaEngine]


class _Link:
    """One connected non-blocking UDP socket to the MDD; its errors are counted."""

    def __init__(self, sock: socket.socket, stats: EndpointStats) -> None:
        self.sock = sock
        self.stats = stats

    def send(self, datagrams: list[bytes]) -> None:
        for dg in datagrams:
            try:
                self.sock.send(dg)
            except ConnectionRefusedError:
                # The error of an earlier datagram (ICMP port unreachable), reported now.
                self.stats.icmp_unreachable += 1
                self.stats.dropped_send += 1
            except OSError:
                # Full buffer or a transient error: loss, which DTLS retransmission covers.
                self.stats.dropped_send += 1
            else:
                self.stats.datagrams_out += 1

    def receive(self) -> list[bytes]:
        """What the socket holds now (at most RECV_BATCH datagrams)."""
        out: list[bytes] = []
        for _ in range(RECV_BATCH):
            try:
                data = self.sock.recv(_UDP_MAX)
            except BlockingIOError:
                break
            except ConnectionRefusedError:
                self.stats.icmp_unreachable += 1
                continue
            except OSError:
                self.stats.receive_errors += 1
                continue
            self.stats.datagrams_in += 1
            out.append(data)
        return out

    async def wait(self, deadline: float | None) -> None:
        """Until the socket is readable or ``deadline`` (trio time) passes."""
        with trio.move_on_at(float("inf") if deadline is None else deadline):
            await trio.lowlevel.wait_readable(self.sock)


async def _open_socket(address: tuple[str, int]) -> socket.socket:
    infos = await trio.socket.getaddrinfo(address[0], address[1], type=socket.SOCK_DGRAM)
    family, kind, proto, _, sockaddr = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setblocking(False)
        sock.connect(sockaddr)
    except BaseException:
        sock.close()
        raise
    return sock


async def join(
    settings: JoinSettings,
    *,
    keylog: Callable[[str], None] | None = None,
    rejoin: bool = False,
) -> JoinResult:
    """Join the conference behind the MDD at ``settings.mdd`` (:class:`perc.endpoint.Joiner`).

    ``rejoin``: a rejoin attempt (D30), which gives up as soon as nothing listens there.

    Raises a :class:`JoinError` subclass when the join cannot complete (the socket is closed
    then) and OSError when the MDD's address does not resolve. On success the caller owns
    ``result.socket`` (close it, e.g. through :func:`stay`).
    """
    sock = await _open_socket(settings.mdd)
    log.info(
        "joining name=%s mdd=%s local=%s fingerprint=%s kmf=%s",
        settings.name,
        format_address(settings.mdd),
        format_address(sock.getsockname()),
        settings.identity.fingerprint,
        settings.kmf_fingerprint,
    )
    try:
        return await _join_on(settings, sock, keylog, rejoin)
    except BaseException:
        sock.close()
        raise


async def _join_on(
    settings: JoinSettings,
    sock: socket.socket,
    keylog: Callable[[str], None] | None,
    rejoin: bool = False,
) -> JoinResult:
    j = Joiner(settings, keylog, rejoin=rejoin)
    link = _Link(sock, j.stats)
    j.start(trio.current_time())
    link.send(j.datagrams_to_send())
    try:
        while not j.done:
            now = trio.current_time()
            for data in link.receive():
                j.receive_datagram(data, now)
            j.handle_timer(now)
            link.send(j.datagrams_to_send())
            if not j.done:
                await link.wait(j.get_timer())
    except JoinError:
        link.send(j.datagrams_to_send())  # our fatal alert or close_notify, if any
        raise
    except trio.Cancelled:
        j.cancel(trio.current_time())
        link.send(j.datagrams_to_send())
        raise
    name, peer = sock.getsockname(), sock.getpeername()
    result = JoinResult(
        **j.session_fields(trio.current_time()),
        local_address=(str(name[0]), int(name[1])),
        mdd_address=(str(peer[0]), int(peer[1])),
        socket=sock,
    )
    log_joined(result)
    return result


async def stay(
    result: JoinResult,
    *,
    duration: float | None = None,
    media: MediaEngine | None = None,
    keepalive: float | None = KEEPALIVE,
) -> None:
    """Keep the association until cancelled or ``duration`` passes, then leave cleanly.

    ``keepalive``: after this many seconds without sending, send an empty DTLS
    application-data record (None: never); see :class:`perc.endpoint.Session`. Raises
    :class:`AssociationEnded` when the association ends from the other side, and
    :class:`RejoinNeeded` when the session's watchdog wants a new join. Always closes
    ``result.socket``; on the way out (cancellation included) it sends the media engine's BYE
    and the DTLS close_notify first (for a rejoin only the close_notify: media goes on).
    """
    link = _Link(result.socket, result.stats)
    now = trio.current_time()
    end = None if duration is None else now + duration
    reason = "duration elapsed"
    try:
        result.start(now, media, keepalive)
        link.send(result.datagrams_to_send(now))
        while True:
            now = trio.current_time()
            for data in link.receive():
                result.receive_datagram(data, now)
            result.handle_timer(now)
            link.send(result.datagrams_to_send(now))
            result.process_events(now)
            if end is not None and now >= end:
                break
            deadlines = [t for t in (result.get_timer(), end) if t is not None]
            await link.wait(min(deadlines, default=None))
    except trio.Cancelled:
        reason = "stopped"
        raise
    except AssociationEnded as e:
        reason = str(e)
        raise
    except RejoinNeeded:
        reason = ""
        raise
    finally:
        if reason:
            _leave(result, link, reason)
        else:
            _abandon(result, link)


def _abandon(result: JoinResult, link: _Link) -> None:
    """close_notify (no BYE), close the socket: the association is given up for a new one."""
    try:
        result.abandon(trio.current_time())
        link.send(result.datagrams_to_send(trio.current_time()))
    finally:
        result.socket.close()


def _leave(result: JoinResult, link: _Link, reason: str) -> None:
    """BYE, close_notify, close the socket: synchronous, so it runs even when cancelled."""
    now = trio.current_time()
    try:
        if result.media is not None:
            # What already arrived is counted before the report is final (bounded: the socket
            # buffer, read in RECV_BATCH steps).
            for _ in range(_DRAIN_BATCHES):
                batch = link.receive()
                for data in batch:
                    result.drain_media(data, now)
                if len(batch) < RECV_BATCH:
                    break
        result.leave(now, reason)
        link.send(result.datagrams_to_send(now))
    finally:
        result.socket.close()


async def run(
    settings: JoinSettings,
    *,
    duration: float | None = None,
    keylog: Callable[[str], None] | None = None,
    media: MediaFactory | None = None,
    keepalive: float | None = KEEPALIVE,
) -> None:
    """Join, then stay joined (what ``perc endpoint`` runs under ``run_until_signal``)."""
    result = await join(settings, keylog=keylog)
    engine = media(result, trio.current_time()) if media is not None else None
    await stay(result, duration=duration, media=engine, keepalive=keepalive)


class MediaRun(MediaStatus):
    """One ``perc endpoint`` run with media: join, send and verify, report, exit status.

    :meth:`run` is the async part (under ``run_until_signal``); :meth:`finish` is called
    after it, however it ended (returned, cancelled by a signal, or a :class:`JoinError`),
    and writes the last report, logs the summary line and gives the exit status. The report
    (:meth:`perc.endpoint.MediaStatus.report`) is written to a temporary file and renamed
    over ``report``, so a reader never sees half a file.
    """

    def __init__(self, settings: JoinSettings, options: MediaOptions, pipeline: Any = None) -> None:
        super().__init__(settings, options)
        #: real media's codecs (a perc.media.pipeline.Pipeline, PyAV), run off the event loop
        self.pipeline = pipeline
        self.collect_media = pipeline is not None
        self.report_errors = 0
        #: the end of :meth:`run` on trio's clock (the verdict's "now")
        self.ended_at: float | None = None

    async def run(
        self,
        *,
        duration: float | None = None,
        keylog: Callable[[str], None] | None = None,
        keepalive: float | None = KEEPALIVE,
    ) -> None:
        """Join, then stay; when the session's healer asks for it (D30), join again and go
        on with the same media engine. ``duration`` counts from the first join."""
        self.write_report()
        try:
            result = await join(self.settings, keylog=keylog)
            now = trio.current_time()
            engine = self.make_engine(result, now, time.time())
            end = None if duration is None else now + duration
            self.write_report(now=now)
            async with trio.open_nursery() as nursery:
                if self.options.report is not None:
                    nursery.start_soon(self._report_loop)
                if self.pipeline is not None:
                    self._start_pipeline(nursery, engine)
                while True:
                    left = None if end is None else max(0.0, end - trio.current_time())
                    try:
                        await stay(result, duration=left, media=engine, keepalive=keepalive)
                        break
                    except RejoinNeeded as why:
                        with trio.move_on_at(float("inf") if end is None else end):
                            result = await self._rejoin(why, keylog)
                        if end is not None and trio.current_time() >= end:
                            break
                nursery.cancel_scope.cancel()
        finally:
            self.ended_at = trio.current_time()
            if self.pipeline is not None:
                # What arrived is decoded and every recording finished, even when cancelled.
                if self.engine is not None:
                    self.pipeline.sink.process(self.engine.take_received_media())
                self.pipeline.close()

    def _start_pipeline(self, nursery: trio.Nursery, engine: EndpointMedia) -> None:
        pipeline = self.pipeline
        for source, producer in ((engine.audio, pipeline.audio), (engine.video, pipeline.video)):
            if isinstance(source, RealSource) and producer is not None:
                nursery.start_soon(self._produce, source, producer)
        nursery.start_soon(self._decode, engine)

    @staticmethod
    async def _produce(source: RealSource, producer: Any) -> None:
        """Read and encode each frame in a thread just before its slot (the engine sends it)."""
        index = 0
        while True:
            index = max(index, source.slot)  # slots the encoder missed are gone
            await trio.sleep_until(source.due(index) - ENCODE_AHEAD)
            key = source.take_keyframe_request(trio.current_time())
            frames = await trio.to_thread.run_sync(producer.make, key)
            if frames is None:
                source.end(index)
                return
            source.push(index, frames)
            index += 1

    async def _decode(self, engine: EndpointMedia) -> None:
        """Decode (and record) what the engine received, in a thread."""
        while True:
            await trio.sleep(DECODE_INTERVAL)
            items = engine.take_received_media()
            if items:
                await trio.to_thread.run_sync(self.pipeline.sink.process, items)

    def report(self, exit_status: int | None = None, now: float | None = None) -> dict[str, Any]:
        data = super().report(exit_status, now)
        if self.pipeline is not None:
            data.update(self.pipeline.report())
        return data

    async def _rejoin(self, why: RejoinNeeded, keylog: Callable[[str], None] | None) -> JoinResult:
        """Join again until it works; the healer says when (back-off) and what is fatal."""
        at = self.rejoining(why, trio.current_time())
        while True:
            await trio.sleep_until(at)
            try:
                result = await join(self.settings, keylog=keylog, rejoin=True)
            except JoinError as e:
                at = self.healer.failed(e, trio.current_time())
                continue
            self.rejoined(result, trio.current_time())
            return result

    async def _report_loop(self) -> None:
        while True:
            await trio.sleep(self.options.report_interval)
            self.write_report(now=trio.current_time())

    def write_report(self, exit_status: int | None = None, now: float | None = None) -> None:
        """Write the report file atomically (if ``--report`` was given); never raises."""
        path = self.options.report
        if path is None:
            return
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            tmp.write_text(json.dumps(self.report(exit_status, now), indent=1) + "\n")
            os.replace(tmp, path)
        except OSError as e:
            self.report_errors += 1
            if self.report_errors == 1:  # once: a full disk must not flood the log
                log.warning("cannot write the report %s: %s", path, e.strerror or e)

    def finish(self, error: JoinError | None = None) -> tuple[ExitCode, str | None]:
        """After :meth:`run`: the exit status and, for a failure, its one-line message."""
        code, message = self.outcome(error, self.ended_at)
        self.write_report(int(code), self.ended_at)
        return code, message

    def abandon(self, code: ExitCode) -> None:
        """The run failed outside the join (e.g. a local error): last report, no summary."""
        self.abandoned()
        self.write_report(int(code))
