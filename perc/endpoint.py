"""The endpoint's protocol logic: join a conference, stay in it, report (sans-IO).

Theory of operation
-------------------
An endpoint is the DTLS **client** of the Key Distributor (RFC 8871 §4.5.1); it does not know
(and need not know, RFC 9185 §5.1) that its DTLS travels through the MDD's tunnel. This module
holds everything it decides; :mod:`perc.roles.endpoint` only moves datagrams between one
connected UDP socket and the objects here and sleeps until their next timer.

* :class:`Joiner` runs the join. The ClientHello offers both DOUBLE profiles (D18), both EKT
  ciphers (aeskw_128, aeskw_256, D6) and ``external_session_id`` with our tls-id (D15: random
  per session unless given, :mod:`perc.tlsid`). :class:`KmfCheck` accepts the server only if
  its certificate fingerprint is the configured KMF's (else fatal ``bad_certificate``) and,
  when a KMF tls-id is given, its ``external_session_id`` equals it (else fatal
  ``illegal_parameter``, RFC 8844 §4.3, RFC 9185 §5.1); RFC 8871 §5 leaves the
  KD-authentication mechanism open and perc pins the fingerprint, as SDP ``a=fingerprint``
  would. The join is complete when the handshake completed with a DOUBLE profile and an EKT
  cipher **and** the first ``EKTKey`` arrived (the DTLS engine ACKs it, D9).
* :class:`Session` is a joined endpoint: the DTLS-SRTP exporter output split per RFC 5764 §4.2
  (``keying``; its ``outer()`` halves are the hop-by-hop keys shared with the MDD, RFC 8723 §3),
  the conference's EKTKey (the inner key itself is the sender's own random key, RFC 8870 §6),
  the live DTLS association (later EKTKeys, D22, are ACKed and handed to the media engine), a
  keepalive (an empty application-data record after ``keepalive`` seconds without sending,
  so the MDD does not declare us idle, D3) and the way out (RTCP BYE, then close_notify, so the
  KMF ends the association at once instead of waiting for the MDD's idle timeout).
* Incoming datagrams are demultiplexed on the first byte (RFC 7983 §7): 20-63 DTLS, 128-191
  SRTP/SRTCP (held for the media engine until it exists, bounded, drops counted), anything
  else dropped and counted.
* :class:`MediaStatus` is the media side of ``perc endpoint``: the media engine built from the
  join, the JSON report (``EndpointMedia.report()`` plus ``state``, ``local`` and, at the end,
  ``exit_status``), the ``media summary`` line and ``--expect-peers`` turned into the exit
  status.

**Failures** are one typed :class:`JoinError` whose text is one line and whose ``exit_code``
is the process exit status (:class:`ExitCode`). A method that raises one may have queued a
last datagram (our fatal alert, a close_notify): the caller sends :meth:`datagrams_to_send`
before it lets the error go.

**Key digests in logs.** The ``joined`` and ``ektkey`` lines carry
:func:`perc.keying.key_digest` values (first 16 hex digits of a SHA-256 over the key
material), the same digests the MDD logs for its ``MediaKeys`` and the KMF for each EKTKey:
one-way, so safe to log, yet enough to check that all three hold the same keys.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import attrs

from perc import config
from perc.config import EndpointConfig
from perc.dtls import DtlsConfiguration, DtlsConnection, PeerIdentity
from perc.dtls.errors import AlertDescription
from perc.dtls.events import (
    AlertReceived,
    ConnectionClosed,
    EktKeyReceived,
    Event,
    HandshakeCompleted,
)
from perc.events import (
    EndpointEktKey,
    EndpointJoined,
    EndpointLeft,
    EndpointMediaStarted,
    EndpointMediaSummary,
    emit,
)
from perc.identity import Identity, fingerprint_matches
from perc.keying import key_digest
from perc.media.endpoint import EndpointMedia
from perc.media.sources import VideoSettings
from perc.srtp.ekt import EktCipher, EktParameterSet
from perc.srtp.keys import KeyingMaterial, SrtpProfile, split_exporter
from perc.tlsid import random_tls_id

__all__ = [
    "EKT_CIPHERS",
    "AssociationEnded",
    "EndpointStats",
    "ExitCode",
    "JoinError",
    "JoinFailed",
    "JoinRefused",
    "JoinSettings",
    "JoinTimeout",
    "Joiner",
    "KmfCheck",
    "MediaEngine",
    "MediaOptions",
    "MediaStatus",
    "PeersMissing",
    "Session",
    "WrongKmf",
    "dtls_configuration",
    "format_address",
    "hbh_digest",
    "is_dtls",
    "is_media",
]

log = logging.getLogger(__name__)

#: aeskw_128, aeskw_256 (the TLS enum of RFC 8870 §5.2.1, D6), offered in this order.
EKT_CIPHERS = tuple(int(c) for c in EktCipher)
#: SRTP/SRTCP that arrives before the join completes is held for the media engine, up to this
#: many datagrams (the same bound as the MDD's D5 hold); later ones are dropped and counted.
MAX_HELD_MEDIA = 64
#: NTP time (RFC 3550 §4: seconds since 1900) minus Unix time.
NTP_UNIX_OFFSET = 2208988800
#: Seconds between two report writes while running.
REPORT_INTERVAL = 1.0


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


def hbh_digest(material: KeyingMaterial) -> str:
    """:func:`key_digest` of hop-by-hop material in MediaKeys order (RFC 9185 §6.4)."""
    return key_digest(
        material.client_key, material.server_key, material.client_salt, material.server_salt
    )


def alert_name(code: int | None) -> str:
    if code is None:
        return "none"
    try:
        return AlertDescription(code).name
    except ValueError:
        return f"alert {code}"


def ekt_cipher_name(code: int | None) -> str:
    """``aeskw_128``, ``aeskw_256``, or the number of a cipher perc does not know."""
    try:
        return EktCipher(code).name.lower() if code is not None else "none"
    except ValueError:
        return str(code)


def format_address(addr: Any) -> str:
    host, port = addr[0], addr[1]
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"


def is_dtls(data: bytes) -> bool:
    """RFC 7983 §7: a first byte of 20-63 is DTLS."""
    return bool(data) and 20 <= data[0] <= 63


def is_media(data: bytes) -> bool:
    """RFC 7983 §7: a first byte of 128-191 is RTP/RTCP (here always SRTP/SRTCP)."""
    return bool(data) and 128 <= data[0] <= 191


@attrs.frozen
class JoinSettings:
    """What an endpoint needs to join (the CLI's options, identity loaded)."""

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
    join_timeout: float = config.default(EndpointConfig, "join_timeout")
    mtu: int | None = None
    """Largest datagram we send; None: the DTLS engine's default."""

    @classmethod
    def from_config(cls, cfg: EndpointConfig, ident: Identity) -> JoinSettings:
        return cls(
            mdd=(cfg.mdd.host, cfg.mdd.port),
            identity=ident,
            kmf_fingerprint=cfg.kmf_fingerprint,
            tls_id=cfg.tls_id,
            kmf_tls_id=cfg.kmf_tls_id,
            name=cfg.name if cfg.name is not None else cfg.cert.stem,
            join_timeout=cfg.join_timeout,
        )


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


# --- joining -----------------------------------------------------------------------------------


class KmfCheck:
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
    cfg = DtlsConfiguration(
        is_client=True,
        certificate=settings.identity.certificate,
        private_key=settings.identity.private_key,
        srtp_profiles=tuple(int(p) for p in config.DOUBLE_PROFILES),
        ekt_ciphers=EKT_CIPHERS,
        tls_id=tls_id.encode(),
        verify_peer=check,
        # Our own deadline (join_timeout) rules; the engine's is a backstop just after it.
        handshake_timeout=settings.join_timeout + 1.0,
        keylog=keylog,
    )
    return cfg if settings.mtu is None else attrs.evolve(cfg, mtu=settings.mtu)


_REFUSAL_HINTS: dict[int, str] = {
    AlertDescription.access_denied: "is this endpoint's certificate on the conference roster?",
    AlertDescription.handshake_failure: "no SRTP profile or cipher in common with the KMF?",
    AlertDescription.bad_certificate: "the KMF did not accept our certificate",
    AlertDescription.illegal_parameter: "does our tls-id match the roster's tls_ids?",
}


class Joiner:
    """The join state machine: datagrams and time in, datagrams out, :class:`Session` or a
    :class:`JoinError` at the end.

    ``start(now)``, then ``receive_datagram``/``handle_timer`` until :attr:`done`; send
    :meth:`datagrams_to_send` after each call (and before letting a JoinError go); sleep
    until :meth:`get_timer`.
    """

    def __init__(self, settings: JoinSettings, keylog: Callable[[str], None] | None = None) -> None:
        self.settings = settings
        self.tls_id = settings.tls_id if settings.tls_id is not None else random_tls_id()
        self.check = KmfCheck(settings.kmf_fingerprint, settings.kmf_tls_id)
        self.conn = DtlsConnection(dtls_configuration(settings, self.tls_id, self.check, keylog))
        self.stats = EndpointStats()
        self.held: list[bytes] = []
        self.completed: HandshakeCompleted | None = None
        self.ekt: EktKeyReceived | None = None
        self.ekt_at = 0.0
        self.alerts: list[int] = []
        self.started = 0.0
        self.deadline = settings.join_timeout

    @property
    def mdd_text(self) -> str:
        return format_address(self.settings.mdd)

    @property
    def done(self) -> bool:
        """The handshake completed and the first EKTKey arrived."""
        return self.completed is not None and self.ekt is not None

    def start(self, now: float) -> None:
        self.started = now
        self.deadline = now + self.settings.join_timeout
        self.conn.connect(now)

    def datagrams_to_send(self) -> list[bytes]:
        return self.conn.datagrams_to_send()

    def get_timer(self) -> float:
        timer = self.conn.get_timer()
        return self.deadline if timer is None else min(timer, self.deadline)

    def receive_datagram(self, data: bytes, now: float) -> None:
        """One datagram from the socket; raises JoinError when the join cannot complete."""
        if is_dtls(data):
            self.stats.dtls_in += 1
            self.conn.receive_datagram(data, now)
        elif is_media(data):
            self.stats.media_in += 1
            if len(self.held) < MAX_HELD_MEDIA:
                self.held.append(data)
                self.stats.media_held += 1
            else:
                self.stats.dropped_media += 1
        else:
            self.stats.dropped_other += 1
        self._events(now)

    def handle_timer(self, now: float) -> None:
        """DTLS retransmission, and the join deadline (JoinTimeout after a close_notify)."""
        timer = self.conn.get_timer()
        if timer is not None and now >= timer:
            self.conn.handle_timer(now)
        self._events(now)
        if not self.done and now >= self.deadline:
            self.conn.close(now)  # close_notify: let the KMF drop its half-open state at once
            raise self.timeout()

    def cancel(self, now: float) -> None:
        """Stopped mid-join (SIGINT/SIGTERM): tell the KMF, as a joined endpoint would."""
        if not self.conn.is_closed:
            self.conn.close(now)

    def _events(self, now: float) -> None:
        while (event := self.conn.next_event()) is not None:
            self._event(event, now)

    def _event(self, event: Event, now: float) -> None:
        if isinstance(event, HandshakeCompleted):
            self.completed = event
            if (
                event.srtp_profile not in config.DOUBLE_PROFILES
                or event.srtp_keying_material is None
            ):
                self._abort(
                    f"the KMF chose SRTP profile {event.srtp_profile}, not a DOUBLE one", now
                )
            if event.ekt_cipher is None:
                self._abort("the KMF did not negotiate EKT (no supported_ekt_ciphers)", now)
            log.debug(
                "handshake complete name=%s profile=0x%04X ekt_cipher=%s",
                self.settings.name,
                event.srtp_profile,
                ekt_cipher_name(event.ekt_cipher),
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
                alert_name(event.description),
            )
        elif isinstance(event, ConnectionClosed):
            self._closed(event)

    def _abort(self, why: str, now: float) -> None:
        self.conn.close(now)
        raise JoinFailed(f"join failed: {why}")

    def _closed(self, event: ConnectionClosed) -> None:
        if event.sent_by_peer:
            name = alert_name(event.alert)
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

    def session_fields(self, now: float) -> dict[str, Any]:
        """The :class:`Session` fields of a completed join (log it with :func:`log_joined`)."""
        done, ekt = self.completed, self.ekt
        if (
            done is None
            or ekt is None
            or done.srtp_profile is None
            or done.srtp_keying_material is None
            or done.ekt_cipher is None
        ):  # pragma: no cover - checked in _event
            raise JoinFailed("join failed: internal error (the join is not complete)")
        profile = SrtpProfile(done.srtp_profile)
        keying = split_exporter(profile, done.srtp_keying_material)
        return {
            "connection": self.conn,
            "profile": profile,
            "keying": keying,
            "hbh": keying.outer(),
            "ekt": ekt,
            "ekt_cipher": done.ekt_cipher,
            "cipher_suite": done.cipher_suite,
            "tls_id": self.tls_id,
            "kmf_tls_id": (done.peer_tls_id.decode(errors="replace") if done.peer_tls_id else None),
            "kmf_fingerprint": done.peer_fingerprint,
            "started": self.started,
            "joined_at": now,
            "ekt_received_at": self.ekt_at,
            "name": self.settings.name,
            "stats": self.stats,
            "held_media": self.held,
        }


# --- staying joined ----------------------------------------------------------------------------


@attrs.define(eq=False, repr=False)
class Session:
    """A joined endpoint: the live DTLS association and the keys it gave (sans-IO).

    The shell feeds it with :meth:`receive_datagram`, calls :meth:`handle_timer` and
    :meth:`process_events` (which raises :class:`AssociationEnded`), sends
    :meth:`datagrams_to_send` and sleeps until :meth:`get_timer`; :meth:`leave` ends it.
    """

    connection: DtlsConnection
    profile: SrtpProfile
    keying: KeyingMaterial
    """The whole DOUBLE exporter split (what ``EndpointMedia`` takes); inner halves unused."""
    hbh: KeyingMaterial
    """Outer halves: our hop-by-hop keys, the ones the MDD gets in MediaKeys (D4)."""
    ekt: EktKeyReceived
    """The latest EKTKey (replaced on each rekey)."""
    ekt_cipher: int
    cipher_suite: int
    tls_id: str
    kmf_tls_id: str | None
    kmf_fingerprint: str
    started: float
    joined_at: float
    ekt_received_at: float
    local_address: tuple[str, int] = ("", 0)
    mdd_address: tuple[str, int] = ("", 0)
    name: str = "endpoint"
    stats: EndpointStats = attrs.Factory(EndpointStats)
    held_media: list[bytes] = attrs.Factory(list)
    """SRTP/SRTCP that arrived before the media engine existed (oldest first, bounded)."""
    media: MediaEngine | None = None
    keepalive: float | None = None
    """Seconds without sending after which an empty record goes out (None: never)."""
    last_send: float = 0.0
    """When :meth:`datagrams_to_send` last returned something (the keepalive's silence)."""
    outbox: list[bytes] = attrs.Factory(list)
    """Media datagrams waiting for :meth:`datagrams_to_send`."""

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
            f"<{type(self).__name__} {self.name} local={format_address(self.local_address)} "
            f"profile={self.profile.name} spi={self.ekt.spi}>"
        )

    def start(self, now: float, media: MediaEngine | None, keepalive: float | None) -> None:
        """Begin staying: the media engine gets what was held for it (or it is dropped)."""
        self.media, self.keepalive, self.last_send = media, keepalive, now
        held, self.held_media = self.held_media, []
        if media is not None:
            for data in held:
                media.receive(data, now)
            self.outbox = media.datagrams_to_send()
            if self.outbox:
                self.last_send = now
        else:
            self.stats.dropped_media += len(held)

    def receive_datagram(self, data: bytes, now: float) -> None:
        stats = self.stats
        if is_dtls(data):
            stats.dtls_in += 1
            self.connection.receive_datagram(data, now)
        elif is_media(data):
            stats.media_in += 1
            if self.media is not None:
                self.media.receive(data, now)
            else:
                stats.dropped_media += 1
        else:
            stats.dropped_other += 1

    def handle_timer(self, now: float) -> None:
        """DTLS and media timers that are due; the keepalive after ``keepalive`` of silence."""
        conn, media = self.connection, self.media
        timer = conn.get_timer()
        if timer is not None and now >= timer:
            conn.handle_timer(now)
        if media is not None:
            mt = media.timer()
            if mt is not None and now >= mt:
                media.handle_timer(now)
            self.outbox += media.datagrams_to_send()
            if self.outbox:
                self.last_send = now
        if self.keepalive is not None and now - self.last_send >= self.keepalive:
            conn.send_application_data(b"", now)
            self.stats.keepalives += 1

    def datagrams_to_send(self, now: float) -> list[bytes]:
        """Media first (produced by :meth:`handle_timer`), then DTLS."""
        out, self.outbox = self.outbox, []
        dtls = self.connection.datagrams_to_send()
        if dtls:
            self.last_send = now
        return out + dtls

    def get_timer(self) -> float | None:
        deadlines = [self.connection.get_timer()]
        if self.keepalive is not None:
            deadlines.append(self.last_send + self.keepalive)
        if self.media is not None:
            deadlines.append(self.media.timer())
        return min((t for t in deadlines if t is not None), default=None)

    def process_events(self, now: float) -> None:
        """Rekeys go to the media engine; raises AssociationEnded when the KMF ended it."""
        while (event := self.connection.next_event()) is not None:
            self._event(event, now)

    def _event(self, event: Event, now: float) -> None:
        if isinstance(event, EktKeyReceived):
            new = event.spi != self.ekt.spi or event.key != self.ekt.key
            self.ekt = event
            self.ekt_received_at = now
            if not new:
                return
            self.stats.ekt_keys += 1
            emit(
                log,
                EndpointEktKey(
                    self.name,
                    event.spi,
                    ekt_ttl=event.ttl,
                    ekt_key=key_digest(event.key, event.salt),
                ),
            )
            if self.media is not None:
                self.media.rekey(self.ekt_parameters(now), now)
        elif isinstance(event, AlertReceived):
            log.debug(
                "alert received name=%s level=%d alert=%s",
                self.name,
                event.level,
                alert_name(event.description),
            )
        elif isinstance(event, ConnectionClosed):
            who = "the KMF" if event.sent_by_peer else "we"
            raise AssociationEnded(
                f"association ended: {event.reason} ({who} ended it) "
                f"through the MDD at {format_address(self.mdd_address)}"
            )

    def drain_media(self, data: bytes, now: float) -> None:
        """On the way out: what already arrived still counts (DTLS no longer matters)."""
        if is_media(data) and self.media is not None:
            self.stats.media_in += 1
            self.media.receive(data, now)

    def leave(self, now: float, reason: str) -> None:
        """The media engine's BYE, then close_notify (send :meth:`datagrams_to_send` after)."""
        conn = self.connection
        if conn.is_closed:
            return
        if self.media is not None:
            self.media.bye(now)
            self.outbox += self.media.datagrams_to_send()
        conn.close(now)
        emit(log, EndpointLeft(self.name, format_address(self.local_address), reason))


def log_joined(r: Session) -> None:
    emit(
        log,
        EndpointJoined(
            r.name,
            int(r.profile.value),
            int(r.ekt_cipher),
            r.ekt.spi,
            profile_name=r.profile.name,
            ekt_cipher_name=ekt_cipher_name(r.ekt_cipher),
            mdd=format_address(r.mdd_address),
            local=format_address(r.local_address),
            kmf=r.kmf_fingerprint,
            kmf_tls_id=str(r.kmf_tls_id),
            tls_id=str(r.tls_id),
            cipher_suite=r.cipher_suite,
            ekt_ttl=r.ekt.ttl,
            ekt_key=key_digest(r.ekt.key, r.ekt.salt),
            hbh_keys=hbh_digest(r.hbh),
            join_ms=r.join_time * 1000,
        ),
    )


# --- media: what `perc endpoint` runs ----------------------------------------------------------


@attrs.frozen
class MediaOptions:
    """The media side of ``perc endpoint`` (``--media``, ``--expect-peers``, ``--report``...)."""

    media: str = config.default(EndpointConfig, "media")
    """``audio``, ``video``, ``both`` or ``none`` (receive only): a ``MediaChoice`` value."""
    expect_peers: int = config.default(EndpointConfig, "expect_peers")
    """Exit 0 only if at least this many peers' media was received and verified end to end."""
    report: Path | None = None
    """JSON report file, rewritten atomically every ``report_interval`` and at exit."""
    report_interval: float = REPORT_INTERVAL
    video: VideoSettings | None = None
    """Synthetic video parameters (None: perc.media's defaults)."""

    @classmethod
    def from_config(cls, cfg: EndpointConfig) -> MediaOptions:
        """Raises ``perc.media.sources.SourceUsageError`` for video settings out of range."""
        return cls(
            media=cfg.media,
            expect_peers=cfg.expect_peers,
            report=cfg.report,
            video=VideoSettings(fps=cfg.video_fps, bitrate=cfg.video_bitrate),
        )


class MediaStatus:
    """The media side of one ``perc endpoint`` run: engine, report, summary, exit status.

    ``state`` is ``joining``, ``joined``, ``left`` or ``failed``; :meth:`report` is what the
    report file holds; :meth:`outcome` turns the end of the run (an error or none) into the
    exit status and its one-line message.
    """

    def __init__(self, settings: JoinSettings, options: MediaOptions) -> None:
        self.settings = settings
        self.options = options
        self.engine: EndpointMedia | None = None
        self.result: Session | None = None
        self.state = "joining"

    def make_engine(self, result: Session, now: float, unix_time: float) -> EndpointMedia:
        """The media engine for a fresh join; ``unix_time`` is the wall clock at ``now``."""
        engine = EndpointMedia(
            result.name,
            self.options.media,
            result.keying,
            result.ekt_parameters(now),
            now,
            video=self.options.video,
            # RFC 3550 §6.4.1: SR NTP timestamps are wall-clock time; `now` is the shell's clock.
            ntp_offset=unix_time - now + NTP_UNIX_OFFSET,
        )
        self.result = result
        self.engine = engine
        self.state = "joined"
        emit(
            log,
            EndpointMediaStarted(
                result.name, str(engine.media.value), list(engine.our_ssrcs()), result.ekt.spi
            ),
        )
        return engine

    def report(self, exit_status: int | None = None) -> dict[str, Any]:
        if self.engine is not None:
            data = self.engine.report()
        else:
            data = {"name": self.settings.name, "ssrc": None, "sent": 0, "spis": [], "peers": {}}
        data["state"] = self.state
        if self.result is not None:
            data["local"] = format_address(self.result.local_address)
        if exit_status is not None:
            data["exit_status"] = exit_status
        return data

    def outcome(self, error: JoinError | None = None) -> tuple[ExitCode, str | None]:
        """The exit status and, for a failure, its one-line message; ends the state."""
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
            emit(log, self.summary_event())
        return code, message

    def abandoned(self) -> None:
        """The run failed outside the join (e.g. a local error): no summary."""
        self.state = "failed" if self.engine is None else "left"

    def summary_event(self) -> EndpointMediaSummary:
        """What we sent, and per peer what arrived and verified."""
        r = self.report()
        peer_keys = ("received", "verified", "e2e_failures", "hbh_failures", "payload_failures",
                     "key_wait", "lost")  # fmt: skip
        un = r.get("unattributed", {})
        return EndpointMediaSummary(
            name=r["name"],
            sent=r["sent"],
            spis=list(r["spis"]),
            peers_verified=sum(1 for p in r["peers"].values() if p["verified"]),
            expect_peers=self.options.expect_peers,
            peers={n: {k: int(p.get(k, 0)) for k in peer_keys} for n, p in r["peers"].items()},
            unattributed={k: int(un.get(k, 0)) for k in ("e2e_failures", "received", "pre_join")},
        )

    def summary(self) -> str:
        """One line: what we sent, and per peer what arrived and verified."""
        return self.summary_event().describe()
