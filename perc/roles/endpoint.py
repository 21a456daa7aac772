"""The endpoint role: join a PERC conference through a Media Distributor (RFC 9185 §5.1).

Theory of operation
-------------------
An endpoint is the DTLS **client** of the Key Distributor (RFC 8871 §4.5.1); it does not know
(and need not know, RFC 9185 §5.1) that its DTLS travels through the MDD's tunnel. It sends
plain DTLS-SRTP datagrams to the MDD's UDP port from one connected UDP socket (one 5-tuple =
one association at the MDD) and gets the KMF's answers back on the same socket.

:func:`join` runs perc's sans-IO engine (:mod:`perc.dtls`) over that socket:

* ClientHello offers both DOUBLE profiles (D18), both EKT ciphers (aeskw_128, aeskw_256,
  D6) and ``external_session_id`` with our tls-id (D15: random per session unless given,
  20-255 characters of ``A-Z a-z 0-9 + / - _``, RFC 8842 §4).
* ``verify_peer`` accepts the server only if its certificate fingerprint is
  ``--kmf-fingerprint`` (else fatal ``bad_certificate``) and, when ``--kmf-tls-id`` is given,
  its ``external_session_id`` equals it (else fatal ``illegal_parameter``, RFC 8844 §4.3,
  RFC 9185 §5.1). RFC 8871 §5 leaves the KD-authentication mechanism open; perc pins the
  fingerprint, as SDP ``a=fingerprint`` would.
* The join is complete when the handshake completed with a DOUBLE profile and an EKT cipher
  **and** the first ``EKTKey`` arrived (the engine ACKs it, D9). The endpoint then holds its
  keying material (:class:`JoinResult`): the DTLS-SRTP exporter output split per RFC 5764 §4.2
  (``keying``; its ``outer()`` halves are the hop-by-hop keys it shares with the MDD, RFC 8723
  §3) and the conference's EKTKey (the end-to-end half; the inner key itself is the sender's
  own random key, RFC 8870 §6).
* Incoming datagrams are demultiplexed on the first byte (RFC 7983 §7): 20-63 DTLS to the
  engine, 128-191 SRTP/SRTCP (held for the media engine, bounded, drops counted), anything
  else dropped and counted. ICMP port-unreachable errors on the connected socket are counted
  and named in a timeout message.

:func:`stay` keeps the association after the join: the DTLS timers keep running, later
EKTKeys (rekeys, D22) are ACKed by the engine and logged, an empty application-data record
after a few seconds of silence keeps the MDD from declaring us idle (D3), and on the way out
(cancellation by SIGINT/SIGTERM, or ``duration`` elapsed) the endpoint sends close_notify, so
the KMF ends the association at once instead of waiting for the MDD's idle timeout.

**Media seam.** :class:`MediaEngine` is the sans-IO interface of the media issue's
``perc.media.endpoint.EndpointMedia`` (same method names): :func:`stay` feeds it every
SRTP/SRTCP datagram, drives its timer, sends what it produces, hands it each new EKTKey as an
``EktParameterSet`` and calls ``bye`` before leaving. :func:`run` takes a factory
``media(result, now) -> MediaEngine`` so the media issue plugs in without touching this
module's join logic.

**Media run** (``perc endpoint``). :class:`MediaRun` builds ``EndpointMedia`` from the join
(``--media``; ``ntp_offset`` maps trio's clock to wall-clock NTP time for sender reports),
runs :func:`stay` with it, rewrites the JSON report (``--report``: ``EndpointMedia.report()``
plus ``state``, ``local`` and, at the end, ``exit_status``; temp file + rename) every second,
and on the way out logs one ``media summary`` line and turns ``--expect-peers`` into the exit
status (:attr:`ExitCode.PEERS` when fewer peers verified end to end). On leaving, what already
sits in the socket is read and counted before the BYE, so the report's counts match what the
MDD sent up to the moment the endpoint stopped reading.

**Failures** end with one typed :class:`JoinError` whose text is one line and whose
``exit_code`` is the process exit status (:class:`ExitCode`): refused by the KMF (an alert
received, e.g. ``access_denied``), wrong KMF (we refused its certificate or tls-id), timeout
(no join within ``join_timeout``, with what was seen), a protocol failure (e.g. no EKT
negotiated), or an association that ended after the join.

**Key digests in logs.** The ``joined`` and ``ektkey`` lines carry
:func:`perc.keying.key_digest` values (first 16 hex digits of a SHA-256 over the concatenated
key material), the same digests the MDD logs for its ``MediaKeys`` and the KMF for each
conference EKTKey: one-way, so safe to log, yet enough for a test or an operator to check
that all three hold the same keys.

API::

    JoinSettings(mdd, identity, kmf_fingerprint, tls_id=None, kmf_tls_id=None, name=...,
                 join_timeout=10.0, mtu=1200)
    await join(settings, *, keylog=None) -> JoinResult
    await stay(result, *, duration=None, media=None, keepalive=3.0)  # raises AssociationEnded
    await run(settings, *, duration=None, keylog=None, media=None, keepalive=3.0)  # the CLI
    JoinResult: socket, connection, profile, keying (DOUBLE KeyingMaterial), hbh (outer
                halves), ekt (EktKeyReceived, latest), ekt_cipher, ekt_parameters(now),
                tls_id, kmf_tls_id, kmf_fingerprint, local_address, mdd_address, join_time,
                held_media, stats
    MediaEngine (Protocol: timer, handle_timer, receive, datagrams_to_send, rekey, bye)
    MediaOptions(media, expect_peers, report, report_interval, video)
    MediaRun(settings, options): await .run(duration=, keylog=, keepalive=);
        .finish(error_or_None) -> (ExitCode, message | None); .abandon(code); .report()
    ExitCode, JoinError (JoinRefused, WrongKmf, JoinTimeout, JoinFailed, AssociationEnded,
                         PeersMissing)
    new_tls_id(), check_tls_id(text), key_digest(*parts), hbh_digest(material),
    dtls_configuration(settings, tls_id, verify_peer, keylog)   # also bench/join_storm.py
"""

from __future__ import annotations

import enum
import json
import logging
import os
import re
import secrets
import socket
import string
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import attrs
import trio

from perc.dtls import DtlsConfiguration, DtlsConnection, PeerIdentity
from perc.dtls.errors import AlertDescription
from perc.dtls.events import (
    AlertReceived,
    ConnectionClosed,
    EktKeyReceived,
    Event,
    HandshakeCompleted,
)
from perc.identity import Identity, fingerprint_matches
from perc.keying import key_digest
from perc.media.endpoint import EndpointMedia
from perc.media.sources import VideoSettings
from perc.srtp.ekt import EktParameterSet
from perc.srtp.keys import KeyingMaterial, SrtpProfile, split_exporter

__all__ = [
    "DOUBLE_PROFILES",
    "EKT_CIPHERS",
    "AssociationEnded",
    "EndpointStats",
    "ExitCode",
    "JoinError",
    "JoinFailed",
    "JoinRefused",
    "JoinResult",
    "JoinSettings",
    "JoinTimeout",
    "MediaEngine",
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

#: Offered in this order (D18): DOUBLE_AEAD_AES_128_GCM_AEAD_AES_128_GCM, then the 256 variant.
DOUBLE_PROFILES = (SrtpProfile.DOUBLE_AEAD_AES_128_GCM, SrtpProfile.DOUBLE_AEAD_AES_256_GCM)
#: aeskw_128, aeskw_256 (the TLS enum of RFC 8870 §5.2.1, D6).
EKT_CIPHERS = (1, 2)
_EKT_CIPHER_NAMES = {1: "aeskw_128", 2: "aeskw_256"}

#: RFC 8842 §4: tls-id-value = 20*255(ALPHA / DIGIT / "+" / "/" / "-" / "_").
TLS_ID_ALPHABET = string.ascii_letters + string.digits + "+/-_"
_TLS_ID_RE = re.compile(r"^[A-Za-z0-9+/\-_]{20,255}$")
#: Length of a generated tls-id: 32 characters of a 66-letter alphabet, ~193 bits.
TLS_ID_LENGTH = 32

#: SRTP/SRTCP that arrives before the join completes is held for the media engine, up to this
#: many datagrams (the same bound as the MDD's D5 hold); later ones are dropped and counted.
MAX_HELD_MEDIA = 64
#: Seconds of silence after which a joined endpoint sends a keepalive (well under the MDD's
#: default 10 s idle timeout, D3, so two may be lost).
KEEPALIVE = 3.0
#: Datagrams read per wake-up before yielding to other tasks (STYLE practice 11).
RECV_BATCH = 64
_UDP_MAX = 65535
#: On leaving, read at most this many RECV_BATCH batches of what already arrived.
_DRAIN_BATCHES = 16


class ExitCode(enum.IntEnum):
    """Exit statuses of ``perc endpoint`` (documented in its ``--help``)."""

    OK = 0
    """Joined, then left on SIGINT/SIGTERM or after ``--duration``."""
    FAILURE = 1
    """A local runtime failure (the MDD's host name does not resolve, SSLKEYLOGFILE cannot be
    opened)."""
    USAGE = 2
    """Bad arguments or files (nothing was sent)."""
    REFUSED = 3
    """The KMF refused the join with a fatal alert (e.g. access_denied: not on the roster)."""
    WRONG_KMF = 4
    """The server's certificate fingerprint (or tls-id) is not the expected KMF's."""
    TIMEOUT = 5
    """No join within ``--join-timeout`` (MDD down, its tunnel down, packets lost...)."""
    ENDED = 6
    """Joined, but the association ended from the other side (alert, close_notify)."""
    PROTOCOL = 7
    """The handshake failed for a protocol reason on our side (e.g. no EKT negotiated)."""
    PEERS = 8
    """Fewer peers' media received and verified end to end than ``--expect-peers``."""


class JoinError(Exception):
    """A join that could not complete, or an association that ended; one line of text."""

    exit_code: ExitCode = ExitCode.PROTOCOL


class JoinRefused(JoinError):
    """The KMF sent a fatal alert (``alert`` is its code)."""

    exit_code = ExitCode.REFUSED

    def __init__(self, message: str, alert: int | None) -> None:
        super().__init__(message)
        self.alert = alert


class WrongKmf(JoinError):
    """We refused the server: not the configured KMF."""

    exit_code = ExitCode.WRONG_KMF


class JoinTimeout(JoinError):
    exit_code = ExitCode.TIMEOUT


class JoinFailed(JoinError):
    exit_code = ExitCode.PROTOCOL


class AssociationEnded(JoinError):
    """After the join: the KMF ended the association (or it died)."""

    exit_code = ExitCode.ENDED


class PeersMissing(JoinError):
    """The run ended with fewer peers verified end to end than expected."""

    exit_code = ExitCode.PEERS


def new_tls_id() -> str:
    """A fresh random tls-id (D15, RFC 8842 §4)."""
    return "".join(secrets.choice(TLS_ID_ALPHABET) for _ in range(TLS_ID_LENGTH))


def check_tls_id(text: str) -> str:
    """``text`` if it is a valid tls-id, else ValueError naming the rule."""
    if not _TLS_ID_RE.match(text):
        raise ValueError(
            f"bad tls-id {text!r}: 20 to 255 characters of A-Z a-z 0-9 + / - _ (RFC 8842 §4)"
        )
    return text


def hbh_digest(material: KeyingMaterial) -> str:
    """:func:`key_digest` of hop-by-hop material in MediaKeys order (RFC 9185 §6.4)."""
    return key_digest(
        material.client_key, material.server_key, material.client_salt, material.server_salt
    )


def _alert_name(code: int | None) -> str:
    if code is None:
        return "none"
    try:
        return AlertDescription(code).name
    except ValueError:
        return f"alert {code}"


def _format_address(addr: Any) -> str:
    host, port = addr[0], addr[1]
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"


@attrs.frozen
class JoinSettings:
    """What an endpoint needs to join (the CLI's options)."""

    mdd: tuple[str, int]
    """The MDD's UDP address for this conference."""
    identity: Identity
    kmf_fingerprint: str
    """The KMF's certificate fingerprint (canonical D20 text)."""
    tls_id: str | None = None
    """Our tls-id (external_session_id); None: a random one per session (D15)."""
    kmf_tls_id: str | None = None
    """The KMF's tls-id to require in its ServerHello; None: not checked."""
    name: str = "endpoint"
    join_timeout: float = 10.0
    mtu: int = 1200


@attrs.define
class EndpointStats:
    """Counters of one endpoint socket; every drop has its counter."""

    datagrams_in: int = 0
    dtls_in: int = 0
    datagrams_out: int = 0
    media_in: int = 0
    media_held: int = 0
    """SRTP/SRTCP kept for the media engine (arrived before it existed)."""
    dropped_media: int = 0
    """SRTP/SRTCP dropped: hold full, or no media engine."""
    dropped_other: int = 0
    """Neither DTLS nor SRTP (RFC 7983 §7: drop), including empty datagrams."""
    dropped_send: int = 0
    """Datagrams the socket refused (full buffer, ICMP error): DTLS retransmits."""
    icmp_unreachable: int = 0
    """ICMP port-unreachable reported on the connected socket (nobody at the MDD's port)."""
    receive_errors: int = 0
    ekt_keys: int = 0
    keepalives: int = 0
    """Empty DTLS application-data records sent to keep the MDD's association (D3) alive."""


class MediaEngine(Protocol):
    """The sans-IO media plug (``perc.media.endpoint.EndpointMedia`` has this shape)."""

    def timer(self) -> float | None: ...

    def handle_timer(self, now: float) -> None: ...

    def receive(self, datagram: bytes, now: float) -> None: ...

    def datagrams_to_send(self) -> list[bytes]: ...

    def rekey(self, params: EktParameterSet, now: float) -> object: ...

    def bye(self, now: float) -> object: ...


MediaFactory = Callable[["JoinResult", float], MediaEngine]


@attrs.define(eq=False, repr=False)
class JoinResult:
    """A joined endpoint: the socket, the live DTLS association and the keys it gave."""

    socket: socket.socket
    """Non-blocking UDP socket connected to the MDD."""
    connection: DtlsConnection
    profile: SrtpProfile
    keying: KeyingMaterial
    """The whole DOUBLE exporter split (what ``EndpointMedia`` takes); inner halves unused."""
    hbh: KeyingMaterial
    """Outer halves: our hop-by-hop keys, the ones the MDD gets in MediaKeys (D4)."""
    ekt: EktKeyReceived
    """The latest EKTKey (stay() replaces it on each rekey)."""
    ekt_cipher: int
    cipher_suite: int
    tls_id: str
    kmf_tls_id: str | None
    kmf_fingerprint: str
    local_address: tuple[str, int]
    mdd_address: tuple[str, int]
    started: float
    joined_at: float
    ekt_received_at: float
    name: str = "endpoint"
    stats: EndpointStats = attrs.Factory(EndpointStats)
    held_media: list[bytes] = attrs.Factory(list)
    """SRTP/SRTCP that arrived before the media engine existed (oldest first, bounded)."""

    @property
    def join_time(self) -> float:
        return self.joined_at - self.started

    def ekt_parameters(self, now: float | None = None) -> EktParameterSet:
        """The current EKTKey as the srtp layer's parameter set (TTL counted from receipt)."""
        e = self.ekt
        at = self.ekt_received_at if now is None else now
        return EktParameterSet.from_ekt_key(e.key, e.salt, e.spi, e.ttl, at, cipher=self.ekt_cipher)

    def __repr__(self) -> str:  # never print key material
        return (
            f"<JoinResult {self.name} local={_format_address(self.local_address)} "
            f"profile={self.profile.name} spi={self.ekt.spi}>"
        )


# --- the socket side ---------------------------------------------------------------------------


class _Link:
    """One connected non-blocking UDP socket to the MDD, with the demultiplexer (RFC 7983)."""

    def __init__(
        self,
        sock: socket.socket,
        stats: EndpointStats,
        clock: Callable[[], float] = trio.current_time,
    ) -> None:
        self.sock = sock
        self.stats = stats
        self.clock = clock
        #: time of the last send attempt (the keepalive measures silence from it)
        self.last_send = clock()

    def send(self, datagrams: list[bytes]) -> None:
        if datagrams:
            self.last_send = self.clock()
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
        if deadline is None:
            await trio.lowlevel.wait_readable(self.sock)
            return
        with trio.move_on_at(deadline):
            await trio.lowlevel.wait_readable(self.sock)


def _is_dtls(data: bytes) -> bool:
    return bool(data) and 20 <= data[0] <= 63


def _is_media(data: bytes) -> bool:
    return bool(data) and 128 <= data[0] <= 191


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


# --- joining -----------------------------------------------------------------------------------


class _KmfCheck:
    """``verify_peer``: the KMF by fingerprint (and tls-id); remembers why it refused."""

    def __init__(self, fingerprint: str, tls_id: str | None) -> None:
        self.fingerprint = fingerprint
        self.tls_id = tls_id
        self.refusal: str | None = None
        self.peer: PeerIdentity | None = None

    def __call__(self, peer: PeerIdentity) -> int | None:
        self.peer = peer
        if not fingerprint_matches(peer.fingerprint, self.fingerprint):
            self.refusal = (
                f"the server's certificate fingerprint {peer.fingerprint} is not the KMF's "
                f"({self.fingerprint}, --kmf-fingerprint): aborted the handshake "
                "(bad_certificate sent)"
            )
            return int(AlertDescription.bad_certificate)
        if self.tls_id is not None and peer.tls_id != self.tls_id.encode():
            got = "none" if peer.tls_id is None else repr(peer.tls_id.decode(errors="replace"))
            self.refusal = (
                f"the KMF's tls-id {got} is not {self.tls_id!r} (--kmf-tls-id): aborted the "
                "handshake (illegal_parameter sent, RFC 8844 §4.3)"
            )
            # RFC 8844 §4.3 / RFC 9185 §5.1: a mismatch terminates the association.
            return int(AlertDescription.illegal_parameter)
        return None


def dtls_configuration(
    settings: JoinSettings,
    tls_id: str,
    check: Callable[[PeerIdentity], int | None] | None,
    keylog: Callable[[str], None] | None = None,
) -> DtlsConfiguration:
    """The endpoint's DTLS client configuration (D17, D18, D15); also used by bench/."""
    return DtlsConfiguration(
        is_client=True,
        certificate=settings.identity.certificate,
        private_key=settings.identity.private_key,
        srtp_profiles=tuple(int(p) for p in DOUBLE_PROFILES),
        ekt_ciphers=EKT_CIPHERS,
        tls_id=tls_id.encode(),
        verify_peer=check,
        mtu=settings.mtu,
        # Our own deadline (join_timeout) rules; the engine's is a backstop just after it.
        handshake_timeout=settings.join_timeout + 1.0,
        keylog=keylog,
    )


_REFUSAL_HINTS: dict[int, str] = {
    AlertDescription.access_denied: "is this endpoint's certificate on the conference roster?",
    AlertDescription.handshake_failure: "no SRTP profile or cipher in common with the KMF?",
    AlertDescription.bad_certificate: "the KMF did not accept our certificate",
    AlertDescription.illegal_parameter: "does our tls-id match the roster's tls_ids?",
}


class _Joiner:
    """The join state machine over one socket (see :func:`join`)."""

    def __init__(
        self,
        settings: JoinSettings,
        sock: socket.socket,
        keylog: Callable[[str], None] | None,
        clock: Callable[[], float] = trio.current_time,
    ) -> None:
        self.settings = settings
        self.clock = clock
        self.tls_id = settings.tls_id if settings.tls_id is not None else new_tls_id()
        self.check = _KmfCheck(settings.kmf_fingerprint, settings.kmf_tls_id)
        self.conn = DtlsConnection(dtls_configuration(settings, self.tls_id, self.check, keylog))
        self.stats = EndpointStats()
        self.link = _Link(sock, self.stats, clock)
        self.held: list[bytes] = []
        self.completed: HandshakeCompleted | None = None
        self.ekt: EktKeyReceived | None = None
        self.ekt_at = 0.0
        self.alerts: list[int] = []

    @property
    def mdd_text(self) -> str:
        return _format_address(self.settings.mdd)

    def feed(self, data: bytes, now: float) -> None:
        if _is_dtls(data):
            self.stats.dtls_in += 1
            self.conn.receive_datagram(data, now)
        elif _is_media(data):
            self.stats.media_in += 1
            if len(self.held) < MAX_HELD_MEDIA:
                self.held.append(data)
                self.stats.media_held += 1
            else:
                self.stats.dropped_media += 1
        else:
            self.stats.dropped_other += 1

    def events(self, now: float) -> None:
        """Process the engine's events; raise a JoinError when the join cannot complete."""
        while (event := self.conn.next_event()) is not None:
            self._event(event, now)

    def _event(self, event: Event, now: float) -> None:
        if isinstance(event, HandshakeCompleted):
            self.completed = event
            if event.srtp_profile not in DOUBLE_PROFILES or event.srtp_keying_material is None:
                self._abort(f"the KMF chose SRTP profile {event.srtp_profile}, not a DOUBLE one")
            if event.ekt_cipher is None:
                self._abort("the KMF did not negotiate EKT (no supported_ekt_ciphers)")
            log.debug(
                "handshake complete name=%s profile=0x%04X ekt_cipher=%s",
                self.settings.name,
                event.srtp_profile,
                _EKT_CIPHER_NAMES.get(event.ekt_cipher or 0, event.ekt_cipher),
            )
        elif isinstance(event, EktKeyReceived):
            if self.ekt is None or event.spi != self.ekt.spi:
                self.stats.ekt_keys += 1
            self.ekt = event
            self.ekt_at = now
        elif isinstance(event, AlertReceived):
            self.alerts.append(event.description)
            log.debug(
                "alert received name=%s level=%d alert=%s",
                self.settings.name,
                event.level,
                _alert_name(event.description),
            )
        elif isinstance(event, ConnectionClosed):
            self._closed(event)

    def _abort(self, why: str) -> None:
        self.conn.close(self.clock())
        self.link.send(self.conn.datagrams_to_send())
        raise JoinFailed(f"join failed: {why}")

    def _closed(self, event: ConnectionClosed) -> None:
        self.link.send(self.conn.datagrams_to_send())  # our fatal alert, if any
        if event.sent_by_peer:
            name = _alert_name(event.alert)
            if event.alert == AlertDescription.close_notify:
                raise JoinRefused(
                    f"join refused: the KMF closed the association (close_notify) "
                    f"through the MDD at {self.mdd_text}",
                    event.alert,
                )
            hint = _REFUSAL_HINTS.get(event.alert) if event.alert is not None else None
            raise JoinRefused(
                f"join refused by the KMF: fatal alert {name}"
                + (f" ({hint})" if hint else "")
                + f"; our fingerprint is {self.settings.identity.fingerprint}",
                event.alert,
            )
        if self.check.refusal is not None:
            raise WrongKmf(f"wrong KMF: {self.check.refusal}")
        if event.alert is None:
            raise self.timeout()
        raise JoinFailed(f"join failed: {event.reason}")

    def timeout(self) -> JoinTimeout:
        s = self.settings
        if self.completed is not None:
            why = "the handshake completed but no EKTKey arrived"
        elif self.stats.dtls_in:
            why = (
                f"the handshake stalled in state {self.conn.state.name} after "
                f"{self.stats.dtls_in} DTLS datagrams from the KMF "
                f"({self.conn.stats.retransmissions} retransmissions)"
            )
        elif self.stats.icmp_unreachable:
            why = "nothing listens on the MDD's port (ICMP port unreachable)"
        else:
            why = (
                "no answer at all: is the MDD running, and is its tunnel to the KMF up "
                "(the MDD drops DTLS while it is down)?"
            )
        return JoinTimeout(
            f"join timed out after {s.join_timeout:g} s through the MDD at {self.mdd_text}: {why}"
        )


async def join(
    settings: JoinSettings, *, keylog: Callable[[str], None] | None = None
) -> JoinResult:
    """Join the conference behind the MDD at ``settings.mdd``; see the module docstring.

    Raises a :class:`JoinError` subclass when the join cannot complete (the socket is closed
    then) and OSError when the MDD's address does not resolve. On success the caller owns
    ``result.socket`` (close it, e.g. through :func:`stay`).
    """
    sock = await _open_socket(settings.mdd)
    log.info(
        "joining name=%s mdd=%s local=%s fingerprint=%s kmf=%s",
        settings.name,
        _format_address(settings.mdd),
        _format_address(sock.getsockname()),
        settings.identity.fingerprint,
        settings.kmf_fingerprint,
    )
    try:
        return await _join_on(settings, sock, keylog)
    except BaseException:
        sock.close()
        raise


async def _join_on(
    settings: JoinSettings, sock: socket.socket, keylog: Callable[[str], None] | None
) -> JoinResult:
    j = _Joiner(settings, sock, keylog)
    conn = j.conn
    started = trio.current_time()
    deadline = started + settings.join_timeout
    conn.connect(started)
    j.link.send(conn.datagrams_to_send())
    while True:
        now = trio.current_time()
        for data in j.link.receive():
            j.feed(data, now)
        timer = conn.get_timer()
        if timer is not None and now >= timer:
            conn.handle_timer(now)
        j.link.send(conn.datagrams_to_send())
        j.events(now)
        done, ekt = j.completed, j.ekt
        if done is not None and ekt is not None:
            return _joined(j, done, ekt, started)
        if now >= deadline:
            conn.close(now)  # close_notify: let the KMF drop its half-open state at once
            j.link.send(conn.datagrams_to_send())
            raise j.timeout()
        timer = conn.get_timer()
        try:
            await j.link.wait(deadline if timer is None else min(timer, deadline))
        except trio.Cancelled:
            # Stopped mid-join (SIGINT/SIGTERM): tell the KMF, as a joined endpoint would.
            if not conn.is_closed:
                conn.close(trio.current_time())
                j.link.send(conn.datagrams_to_send())
            raise


def _joined(
    j: _Joiner, done: HandshakeCompleted, ekt: EktKeyReceived, started: float
) -> JoinResult:
    settings, sock, conn = j.settings, j.link.sock, j.conn
    if (
        done.srtp_profile is None or done.srtp_keying_material is None or done.ekt_cipher is None
    ):  # pragma: no cover
        raise JoinFailed("join failed: internal error (checked in _Joiner._event)")
    profile = SrtpProfile(done.srtp_profile)
    keying = split_exporter(profile, done.srtp_keying_material)
    name = sock.getsockname()
    peer = sock.getpeername()
    result = JoinResult(
        socket=sock,
        connection=conn,
        profile=profile,
        keying=keying,
        hbh=keying.outer(),
        ekt=ekt,
        ekt_cipher=done.ekt_cipher,
        cipher_suite=done.cipher_suite,
        tls_id=j.tls_id,
        kmf_tls_id=done.peer_tls_id.decode(errors="replace") if done.peer_tls_id else None,
        kmf_fingerprint=done.peer_fingerprint,
        local_address=(str(name[0]), int(name[1])),
        mdd_address=(str(peer[0]), int(peer[1])),
        started=started,
        joined_at=trio.current_time(),
        ekt_received_at=j.ekt_at,
        name=settings.name,
        stats=j.stats,
        held_media=j.held,
    )
    _log_joined(result)
    return result


def _log_joined(r: JoinResult) -> None:
    log.info(
        "joined name=%s mdd=%s local=%s kmf=%s kmf_tls_id=%s tls_id=%s profile=%s(0x%04X) "
        "cipher_suite=0x%04X ekt_cipher=%s spi=%d ekt_ttl=%d ekt_key=%s hbh_keys=%s "
        "join_ms=%.1f",
        r.name,
        _format_address(r.mdd_address),
        _format_address(r.local_address),
        r.kmf_fingerprint,
        r.kmf_tls_id,
        r.tls_id,
        r.profile.name,
        r.profile.value,
        r.cipher_suite,
        _EKT_CIPHER_NAMES.get(r.ekt_cipher, r.ekt_cipher),
        r.ekt.spi,
        r.ekt.ttl,
        key_digest(r.ekt.key, r.ekt.salt),
        hbh_digest(r.hbh),
        r.join_time * 1000,
    )


# --- staying joined ----------------------------------------------------------------------------


async def stay(
    result: JoinResult,
    *,
    duration: float | None = None,
    media: MediaEngine | None = None,
    keepalive: float | None = KEEPALIVE,
) -> None:
    """Keep the association until cancelled or ``duration`` passes, then leave cleanly.

    ``keepalive``: after this many seconds without sending anything, send an empty DTLS
    application-data record (None: never). The MDD ends an association whose endpoint has
    been silent for its idle timeout (D3, default 10 s) and cannot see DTLS contents; an
    endpoint without media would otherwise be dropped while still joined. The KMF ignores
    application data; with media flowing the keepalive never fires.

    Raises :class:`AssociationEnded` when the association ends from the other side. Always
    closes ``result.socket``; on the way out (cancellation included) it sends the media
    engine's BYE and the DTLS close_notify first.
    """
    conn = result.connection
    link = _Link(result.socket, result.stats)
    end = None if duration is None else trio.current_time() + duration
    held, result.held_media = result.held_media, []
    reason = "duration elapsed"
    try:
        if media is not None:
            now = trio.current_time()
            for data in held:
                media.receive(data, now)
            link.send(media.datagrams_to_send())
        else:
            result.stats.dropped_media += len(held)
        while True:
            now = trio.current_time()
            for data in link.receive():
                _feed_joined(result, data, now, media)
            timer = conn.get_timer()
            if timer is not None and now >= timer:
                conn.handle_timer(now)
            if media is not None:
                mt = media.timer()
                if mt is not None and now >= mt:
                    media.handle_timer(now)
                link.send(media.datagrams_to_send())
            if keepalive is not None and now - link.last_send >= keepalive:
                conn.send_application_data(b"", now)
                result.stats.keepalives += 1
            link.send(conn.datagrams_to_send())
            while (event := conn.next_event()) is not None:
                _joined_event(result, event, now, media)
            if end is not None and now >= end:
                break
            ping = None if keepalive is None else link.last_send + keepalive
            deadlines = [t for t in (conn.get_timer(), end, ping) if t is not None]
            if media is not None and (mt := media.timer()) is not None:
                deadlines.append(mt)
            await link.wait(min(deadlines) if deadlines else None)
    except trio.Cancelled:
        reason = "stopped"
        raise
    except AssociationEnded as e:
        reason = str(e)
        raise
    finally:
        _leave(result, link, media, reason)


def _feed_joined(result: JoinResult, data: bytes, now: float, media: MediaEngine | None) -> None:
    stats = result.stats
    if _is_dtls(data):
        stats.dtls_in += 1
        result.connection.receive_datagram(data, now)
    elif _is_media(data):
        stats.media_in += 1
        if media is not None:
            media.receive(data, now)
        else:
            stats.dropped_media += 1
    else:
        stats.dropped_other += 1


def _joined_event(result: JoinResult, event: Event, now: float, media: MediaEngine | None) -> None:
    if isinstance(event, EktKeyReceived):
        new = event.spi != result.ekt.spi or event.key != result.ekt.key
        result.ekt = event
        result.ekt_received_at = now
        if not new:
            return
        result.stats.ekt_keys += 1
        log.info(
            "ektkey name=%s spi=%d ekt_ttl=%d ekt_key=%s (rekey)",
            result.name,
            event.spi,
            event.ttl,
            key_digest(event.key, event.salt),
        )
        if media is not None:
            media.rekey(result.ekt_parameters(now), now)
    elif isinstance(event, AlertReceived):
        log.debug(
            "alert received name=%s level=%d alert=%s",
            result.name,
            event.level,
            _alert_name(event.description),
        )
    elif isinstance(event, ConnectionClosed):
        who = "the KMF" if event.sent_by_peer else "we"
        raise AssociationEnded(
            f"association ended: {event.reason} ({who} ended it) "
            f"through the MDD at {_format_address(result.mdd_address)}"
        )


def _leave(result: JoinResult, link: _Link, media: MediaEngine | None, reason: str) -> None:
    """BYE, close_notify, close the socket: synchronous, so it runs even when cancelled."""
    now = trio.current_time()
    conn = result.connection
    try:
        if media is not None:
            # What already arrived is counted before the report is final (bounded: the socket
            # buffer, read in RECV_BATCH steps); DTLS in it no longer matters.
            for _ in range(_DRAIN_BATCHES):
                batch = link.receive()
                for data in batch:
                    if _is_media(data):
                        result.stats.media_in += 1
                        media.receive(data, now)
                if len(batch) < RECV_BATCH:
                    break
        if media is not None and not conn.is_closed:
            media.bye(now)
            link.send(media.datagrams_to_send())
        if not conn.is_closed:
            conn.close(now)
            link.send(conn.datagrams_to_send())
            log.info(
                "left name=%s local=%s reason=%s (close_notify sent)",
                result.name,
                _format_address(result.local_address),
                reason,
            )
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


# --- media: what `perc endpoint` runs ----------------------------------------------------------

#: NTP time (RFC 3550 §4: seconds since 1900) minus Unix time.
NTP_UNIX_OFFSET = 2208988800
#: Seconds between two report writes while running.
REPORT_INTERVAL = 1.0


@attrs.frozen
class MediaOptions:
    """The media side of ``perc endpoint`` (``--media``, ``--expect-peers``, ``--report``...)."""

    media: str = "audio"
    """``audio``, ``video``, ``both`` or ``none`` (receive only): a ``MediaChoice`` value."""
    expect_peers: int = 0
    """Exit 0 only if at least this many peers' media was received and verified end to end."""
    report: Path | None = None
    """JSON report file, rewritten atomically every ``report_interval`` and at exit."""
    report_interval: float = REPORT_INTERVAL
    video: VideoSettings | None = None
    """Synthetic video parameters (None: perc.media's defaults)."""


class MediaRun:
    """One ``perc endpoint`` run with media: join, send and verify, report, exit status.

    :meth:`run` is the async part (under ``run_until_signal``); :meth:`finish` is called
    after it, however it ended (returned, cancelled by a signal, or a :class:`JoinError`),
    and writes the last report, logs the summary line and gives the exit status. The report
    file carries :meth:`EndpointMedia.report` plus ``state`` (``joining``, ``joined``,
    ``left``, ``failed``), ``local`` (our address, what the MDD logs as ``peer=``) and, in the
    last write, ``exit_status``. It is written to a temporary file and renamed over
    ``report``, so a reader never sees half a file.
    """

    def __init__(self, settings: JoinSettings, options: MediaOptions) -> None:
        self.settings = settings
        self.options = options
        self.engine: EndpointMedia | None = None
        self.result: JoinResult | None = None
        self.state = "joining"
        self.report_errors = 0

    def make_engine(self, result: JoinResult, now: float) -> EndpointMedia:
        """The media engine for a fresh join (a :data:`MediaFactory`)."""
        engine = EndpointMedia(
            result.name,
            self.options.media,
            result.keying,
            result.ekt_parameters(now),
            now,
            video=self.options.video,
            # RFC 3550 §6.4.1: SR NTP timestamps are wall-clock time; `now` is trio's clock.
            ntp_offset=time.time() - now + NTP_UNIX_OFFSET,
        )
        self.result = result
        self.engine = engine
        self.state = "joined"
        log.info(
            "media name=%s media=%s ssrcs=%s spi=%d",
            result.name,
            engine.media.value,
            ",".join(str(s) for s in engine.our_ssrcs()),
            result.ekt.spi,
        )
        return engine

    async def run(
        self,
        *,
        duration: float | None = None,
        keylog: Callable[[str], None] | None = None,
        keepalive: float | None = KEEPALIVE,
    ) -> None:
        self.write_report()
        result = await join(self.settings, keylog=keylog)
        engine = self.make_engine(result, trio.current_time())
        self.write_report()
        async with trio.open_nursery() as nursery:
            if self.options.report is not None:
                nursery.start_soon(self._report_loop)
            await stay(result, duration=duration, media=engine, keepalive=keepalive)
            nursery.cancel_scope.cancel()

    async def _report_loop(self) -> None:
        while True:
            await trio.sleep(self.options.report_interval)
            self.write_report()

    def report(self, exit_status: int | None = None) -> dict[str, Any]:
        if self.engine is not None:
            data = self.engine.report()
        else:
            data = {"name": self.settings.name, "ssrc": None, "sent": 0, "spis": [], "peers": {}}
        data["state"] = self.state
        if self.result is not None:
            data["local"] = _format_address(self.result.local_address)
        if exit_status is not None:
            data["exit_status"] = exit_status
        return data

    def write_report(self, exit_status: int | None = None) -> None:
        """Write the report file atomically (if ``--report`` was given); never raises."""
        path = self.options.report
        if path is None:
            return
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            tmp.write_text(json.dumps(self.report(exit_status), indent=1) + "\n")
            os.replace(tmp, path)
        except OSError as e:
            self.report_errors += 1
            if self.report_errors == 1:  # once: a full disk must not flood the log
                log.warning("cannot write the report %s: %s", path, e.strerror or e)

    def finish(self, error: JoinError | None = None) -> tuple[ExitCode, str | None]:
        """After :meth:`run`: the exit status and, for a failure, its one-line message."""
        engine = self.engine
        if error is not None:
            code, message = error.exit_code, str(error)
        else:
            code, message = ExitCode.OK, None
            verified = engine.peers_verified() if engine is not None else set()
            if len(verified) < self.options.expect_peers:
                code = ExitCode.PEERS
                message = str(
                    PeersMissing(
                        f"media verified end to end from {len(verified)} peer(s) "
                        f"({', '.join(sorted(verified)) or 'none'}), fewer than "
                        f"--expect-peers {self.options.expect_peers}"
                    )
                )
        if self.state == "joined":
            self.state = "left"
        elif self.state == "joining":
            self.state = "failed"
        if engine is not None:
            log.info("%s", self.summary())
        self.write_report(int(code))
        return code, message

    def abandon(self, code: ExitCode) -> None:
        """The run failed outside the join (e.g. a local error): last report, no summary."""
        self.state = "failed" if self.engine is None else "left"
        self.write_report(int(code))

    def summary(self) -> str:
        """One line: what we sent, and per peer what arrived and verified."""
        r = self.report()
        peers = " ".join(
            f"{name}(received={p['received']} verified={p['verified']} "
            f"e2e_failures={p['e2e_failures']} hbh_failures={p['hbh_failures']} "
            f"payload_failures={p['payload_failures']} key_wait={p['key_wait']} "
            f"lost={p['lost']})"
            for name, p in r["peers"].items()
        )
        un = r.get("unattributed", {})
        verified = sum(1 for p in r["peers"].values() if p["verified"])
        return (
            f"media summary name={r['name']} sent={r['sent']} spis={','.join(map(str, r['spis']))} "
            f"peers_verified={verified} expect_peers={self.options.expect_peers} "
            f"unattributed_e2e_failures={un.get('e2e_failures', 0)} "
            f"unattributed_received={un.get('received', 0)} pre_join={un.get('pre_join', 0)} "
            f"peers: {peers or 'none'}"
        )
