"""Typed events shared by every role: what programs read, where people read log lines.

Theory of operation
-------------------
A role reports something a program may act on (an association was created, an endpoint
joined, a key changed, a process is listening on a port) as an :class:`Event`: a frozen attrs
class with a registered ``kind``. :func:`emit` logs it through the standard ``logging``
machinery:

* with the human format (the default, ``--log-format human``) the record is one short line,
  the event's :meth:`Event.describe` text, as before;
* with ``--log-format json`` every record is one JSON object per line (see
  :class:`perc.logsetup.JsonFormatter`); a record made by :func:`emit` carries ``"event":
  kind`` and ``"data": {...}`` with the event's fields, turned into JSON by cattrs.

Programs (``perc demo``, the tests, operator tools) run the roles with ``--log-format json``
and read events back with :func:`parse_line`, which turns a JSON line into the same attrs
class again. The text of a human log line is for people only and may change at any time.

Every event class lives in this module, so that a reader of a log needs only this module to
parse it. Adding a field with a default is compatible; renaming or removing one is not.
"""

from __future__ import annotations

import json
import logging
import uuid
from typing import Any, ClassVar, TypeVar

import attrs
import cattrs

from perc.logsetup import RECORD_KEY, format_address

__all__ = [
    "Event",
    "EventError",
    "emit",
    "event_kinds",
    "from_json",
    "parse_line",
    "register",
    "split_record",
    "to_json",
]


_converter = cattrs.Converter()
_converter.register_unstructure_hook(uuid.UUID, str)
_converter.register_structure_hook(uuid.UUID, lambda v, _: uuid.UUID(str(v)))
_converter.register_unstructure_hook(bytes, lambda b: b.hex())
_converter.register_structure_hook(bytes, lambda v, _: bytes.fromhex(str(v)))

_KINDS: dict[str, type[Event]] = {}

E = TypeVar("E", bound="Event")


class EventError(Exception):
    """A JSON event line that does not parse into its registered class."""


@attrs.frozen
class Event:
    """Base of every event. Subclasses set ``kind`` and are decorated with :func:`register`."""

    kind: ClassVar[str] = ""

    def to_json(self) -> dict[str, Any]:
        """``{"event": kind, "data": {field: value}}`` (see :func:`to_json`)."""
        return to_json(self)

    def describe(self) -> str:
        """The human log line: ``kind key=value ...`` unless a subclass says it better."""
        fields = " ".join(
            f"{k}={v}" for k, v in to_json(self)["data"].items() if v is not None and v != ""
        )
        return f"{self.kind.replace('_', ' ')} {fields}".rstrip()


def register(cls: type[E]) -> type[E]:
    """Class decorator: make ``cls`` known to :func:`parse_line` under ``cls.kind``."""
    if not cls.kind:
        raise TypeError(f"{cls.__name__} has no kind")
    known = _KINDS.get(cls.kind)
    if known is not None and known is not cls:
        raise TypeError(f"event kind {cls.kind!r} registered twice")
    _KINDS[cls.kind] = cls
    return cls


def event_kinds() -> dict[str, type[Event]]:
    """Every registered kind and its class."""
    return dict(_KINDS)


def to_json(event: Event) -> dict[str, Any]:
    """``{"event": kind, "data": {field: value}}`` with JSON-safe values."""
    return {"event": event.kind, "data": _converter.unstructure(event)}


def from_json(obj: dict[str, Any]) -> Event:
    """The event a :func:`to_json` object (or a JSON log record) describes."""
    kind = obj.get("event")
    cls = _KINDS.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise EventError(f"unknown event kind {kind!r}")
    try:
        return _converter.structure(obj.get("data") or {}, cls)
    except Exception as e:  # cattrs raises its own exception groups
        raise EventError(f"event {kind!r} does not parse: {e}") from None


def parse_line(line: str) -> Event | None:
    """The event in one ``--log-format json`` line, or None for any other line.

    A plain log record (no ``event`` key), a human-format line or a partial line gives None;
    a line naming a known kind with fields that do not fit raises :class:`EventError`.
    """
    line = line.strip()
    if not line.startswith("{"):
        return None
    try:
        obj = json.loads(line)
    except ValueError:
        return None
    if not isinstance(obj, dict) or "event" not in obj:
        return None
    return from_json(obj)


def split_record(line: str) -> tuple[str, Event | None]:
    """One line of a role's output as (human text, event or None).

    A ``--log-format json`` record becomes ``<ts> <LEVEL> <logger>: <msg>`` (the human
    format) and its event; any other line (``perc: error: ...``, a human-format record) is
    returned as it is, with no event. A JSON record whose event does not parse raises
    :class:`EventError`.
    """
    text = line.rstrip("\r\n")
    if not text.startswith("{"):
        return text, None
    try:
        obj = json.loads(text)
    except ValueError:
        return text, None
    if not isinstance(obj, dict) or "msg" not in obj:
        return text, None
    human = f"{obj.get('ts', '')} {obj.get('level', '')} {obj.get('logger', '')}: {obj['msg']}"
    if obj.get("exc"):
        human += " | " + str(obj["exc"]).replace("\n", " | ")
    return human, (from_json(obj) if "event" in obj else None)


def emit(logger: logging.Logger, event: Event, level: int = logging.INFO) -> None:
    """Log ``event``: its :meth:`~Event.describe` text for people, its fields for programs."""
    if logger.isEnabledFor(level):
        logger.log(level, "%s", event.describe(), extra={RECORD_KEY: event})


# --- process events (every role) ----------------------------------------------------------------


@register
@attrs.frozen
class Listening(Event):
    """A role bound a socket: ``what`` is e.g. ``tunnel``, ``conference``, ``metrics``."""

    kind: ClassVar[str] = "listening"
    what: str
    host: str
    port: int
    conference: str | None = None

    def describe(self) -> str:
        if self.what == "tunnel":
            # The KMF's line, as people and older tools know it.
            host = f"[{self.host}]" if ":" in self.host else self.host
            return f"KMF listening on {host}:{self.port}"
        return super().describe()


# --- MDD events ---------------------------------------------------------------------------------
# Emitted by the MDD (its engine, perc.mdd, decides; its shell, perc.roles.mdd, logs).
# ``association`` is the RFC 9185 association id; ``peer`` an endpoint's ``host:port``; ``kmf``
# the KMF's tunnel address as configured. Each ``describe()`` is the MDD's human log line.


@attrs.frozen
class ConferenceListening(Listening):
    """:class:`Listening` with ``what="conference"``: the MDD bound a conference's UDP port.

    Not registered on its own: it has the kind ``listening`` and the same fields, so a JSON
    line parses back as :class:`Listening`; only its human line is the MDD's."""

    def describe(self) -> str:
        address = format_address((self.host, self.port))
        return f"conference={self.conference} listening on udp {address}"


@register
@attrs.frozen
class MddTunnelUp(Event):
    """The MDD's tunnel to the KMF for one conference is up (SupportedProfiles sent)."""

    kind: ClassVar[str] = "mdd_tunnel_up"
    conference: str
    kmf: str
    fingerprint: str = ""
    """The KMF's certificate fingerprint (pinned, D20)."""
    version: int = 0
    """The tunnel protocol version offered in SupportedProfiles (RFC 9185 §6.2)."""
    tls: str = ""

    def describe(self) -> str:
        return (
            f"tunnel up conference={self.conference} peer={self.kmf} kmf={self.fingerprint} "
            f"version={self.version} tls={self.tls}"
        )


@register
@attrs.frozen
class MddTunnelDown(Event):
    """The tunnel went down (``connected`` False: a connection attempt failed); the MDD tries
    again in ``retry_in`` seconds."""

    kind: ClassVar[str] = "mdd_tunnel_down"
    conference: str
    reason: str
    connected: bool = True
    kmf: str = ""
    retry_in: float | None = None

    def describe(self) -> str:
        what = "tunnel down" if self.connected else "tunnel connect failed"
        text = f"{what} conference={self.conference} peer={self.kmf}: {self.reason}"
        if self.retry_in is not None:
            text += f"; {'reconnect' if self.connected else 'retry'} in {self.retry_in:.3g} s"
        return text


@register
@attrs.frozen
class MddTunnelRefused(Event):
    """The KMF answered UnsupportedVersion (RFC 9185 §5.5): the MDD closes this tunnel and
    offers at most ``highest_version`` on the next one."""

    kind: ClassVar[str] = "mdd_tunnel_refused"
    conference: str
    kmf: str
    version: int
    highest_version: int

    def describe(self) -> str:
        return (
            f"tunnel refused conference={self.conference} peer={self.kmf}: KMF does not support "
            f"tunnel version {self.version} (its highest is {self.highest_version})"
        )


@register
@attrs.frozen
class AssociationCreated(Event):
    """A new endpoint address got an association id (its first DTLS record)."""

    kind: ClassVar[str] = "mdd_association_created"
    conference: str
    association: uuid.UUID
    peer: str

    def describe(self) -> str:
        return (
            f"association new conference={self.conference} association={self.association} "
            f"peer={self.peer}"
        )


@register
@attrs.frozen
class AssociationKeyed(Event):
    """MediaKeys arrived for an association: the MDD forwards its media from now on.

    ``keys`` is a one-way digest of the four outer values (:func:`perc.keying.key_digest`),
    never the keys; ``replaced``: the association had keys before; ``released``: datagrams
    held for these keys (D5) that went out at once."""

    kind: ClassVar[str] = "mdd_association_keyed"
    conference: str
    association: uuid.UUID
    profile: int
    peer: str = ""
    keys: str = ""
    replaced: bool = False
    released: int = 0

    def describe(self) -> str:
        return (
            f"keys installed conference={self.conference} association={self.association} "
            f"peer={self.peer} profile=0x{self.profile:04X} keys={self.keys}"
            + (" (replaced)" if self.replaced else "")
            + (f" released={self.released}" if self.released else "")
        )


@register
@attrs.frozen
class MediaKeysRejected(Event):
    """MediaKeys the MDD cannot use (profile, MKI or key/salt lengths outside D4/D18, or equal
    client and server keys): ignored, the association stays without keys."""

    kind: ClassVar[str] = "mdd_media_keys_rejected"
    conference: str
    association: uuid.UUID
    profile: int
    reason: str

    def describe(self) -> str:
        return (
            f"media keys rejected conference={self.conference} association={self.association} "
            f"profile=0x{self.profile:04X}: {self.reason}"
        )


@register
@attrs.frozen
class AssociationEnded(Event):
    """An association is gone: ``reason`` is ``kmf`` (EndpointDisconnect), ``idle``,
    ``tunnel_down``, ``dropped`` (a misbehaving peer) or ``shutdown``. For ``idle``,
    ``disconnect_sent`` says whether EndpointDisconnect went to the KMF (D3; not while the
    tunnel is down)."""

    kind: ClassVar[str] = "mdd_association_ended"
    conference: str
    association: uuid.UUID
    reason: str
    peer: str = ""
    disconnect_sent: bool | None = None

    def describe(self) -> str:
        ids = f"conference={self.conference} association={self.association} peer={self.peer}"
        if self.reason == "kmf":
            return f"association ended by KMF {ids}"
        if self.reason == "idle":
            sent = "sent" if self.disconnect_sent else "not sent (tunnel down)"
            return f"association idle {ids}: dropped, EndpointDisconnect {sent}"
        return f"association ended {ids} reason={self.reason}"


@register
@attrs.frozen
class MddAdmission(Event):
    """MDD admission counters of one conference (:class:`perc.mdd.AdmissionStats` as a dict,
    cumulative) and the pending associations now: at most once per ``summary_interval`` while
    they change, so a flood of new addresses costs one line per interval instead of one per
    address. ``suppressed`` counts the per-address AssociationCreated/AssociationEnded events
    left out since the previous summary (rate-limited, STYLE 17)."""

    kind: ClassVar[str] = "mdd_admission"
    conference: str
    pending: int
    counters: dict[str, int]
    suppressed: int = 0

    def describe(self) -> str:
        fields = " ".join(f"{k}={v}" for k, v in self.counters.items() if v)
        return (
            f"admission conference={self.conference} pending={self.pending} "
            f"suppressed_events={self.suppressed} {fields or 'none'}"
        )


@register
@attrs.frozen
class MddCounters(Event):
    """Per-association forwarding counters (:class:`perc.forwarding.AssociationCounters` as a
    dict): periodic (only those that changed), at exit, and ``final`` when the association
    ended (just before its :class:`AssociationEnded`)."""

    kind: ClassVar[str] = "mdd_counters"
    conference: str
    association: uuid.UUID
    counters: dict[str, int]
    final: bool = False

    def describe(self) -> str:
        c = self.counters
        drops = " ".join(f"{k[5:]}={v}" for k, v in c.items() if k.startswith("drop_") and v)
        return (
            f"counters conference={self.conference} association={self.association} "
            f"in={c.get('packets_in', 0)}/{c.get('bytes_in', 0)}B "
            f"out={c.get('packets_out', 0)}/{c.get('bytes_out', 0)}B "
            f"rtcp={c.get('rtcp_in', 0)}/{c.get('rtcp_out', 0)} held={c.get('held', 0)} "
            f"drops: {drops or 'none'}" + (" (final)" if self.final else "")
        )


@register
@attrs.frozen
class MddTotals(Event):
    """Forwarding totals of one conference (at exit)."""

    kind: ClassVar[str] = "mdd_totals"
    conference: str
    totals: dict[str, int]

    def describe(self) -> str:
        fields = " ".join(f"{k}={v}" for k, v in self.totals.items())
        return f"totals conference={self.conference} {fields}"


@register
@attrs.frozen
class KeyIsolation(Event):
    """Which end-to-end modules the MDD process has loaded (``loaded`` empty: none) of those
    it ``checked`` (RFC 8871 §4.1: an MDD never can read media)."""

    kind: ClassVar[str] = "mdd_key_isolation"
    loaded: list[str]
    checked: list[str] = attrs.field(factory=list)

    def describe(self) -> str:
        if self.loaded:
            return f"key isolation: end-to-end modules loaded: {','.join(self.loaded)}"
        return f"key isolation: end-to-end modules loaded: none (checked {','.join(self.checked)})"


# --- KMF events ---------------------------------------------------------------------------------
# Emitted by the KMF (its engine, perc.kmf, decides; its shell logs). ``fingerprint`` is an
# endpoint's certificate fingerprint (D20 text); ``profile`` an SRTP protection profile number.
# Each describe() is the KMF's human log line (key=value fields, read by people and by older
# tests and tools; the JSON form is the API).


def _hex_profile(profile: int | None) -> str:
    return f"0x{profile:04X}" if profile is not None else "-"


@register
@attrs.frozen
class KmfTunnelUp(Event):
    """An MDD's tunnel was accepted (pinned certificate, version agreed)."""

    kind: ClassVar[str] = "kmf_tunnel_up"
    peer: str
    fingerprint: str
    tunnel: int = 0
    version: int = 0
    profiles: list[int] = attrs.field(factory=list)
    tls: str = ""

    def describe(self) -> str:
        profiles = ",".join(_hex_profile(p) for p in self.profiles)
        return (
            f"tunnel up peer={self.peer} mdd={self.fingerprint} version={self.version} "
            f"profiles={profiles} tls={self.tls}"
        )


@register
@attrs.frozen
class KmfTunnelDown(Event):
    """An MDD's tunnel ended (``refused``: it never got past TLS or the version check)."""

    kind: ClassVar[str] = "kmf_tunnel_down"
    peer: str
    reason: str
    refused: bool = False
    tunnel: int = 0

    def describe(self) -> str:
        return f"tunnel {'refused' if self.refused else 'closed'} peer={self.peer}: {self.reason}"


@register
@attrs.frozen
class KmfConnections(Event):
    """Totals of the KMF's tunnel connections, logged at most once a second while they change
    (connections dropped before their tunnel is up are logged one by one only up to a rate).

    ``handshaking``/``tunnels``: now; the rest count since start: ``accepted`` TCP
    connections, and of those closed before their tunnel was up: ``reset`` (by the peer, or
    gone before it was read), ``timeout`` (TLS handshake deadline), ``tls_failed`` (a TLS
    error or a refused certificate), ``evicted`` (closed for a newer connection: the
    handshake budget or its source address's share was full), ``capacity`` (all tunnels in
    use); ``message_timeout``: tunnels closed because a partly received message stalled;
    ``unlogged``: drops counted here but not logged one by one."""

    kind: ClassVar[str] = "kmf_connections"
    handshaking: int
    tunnels: int
    accepted: int = 0
    reset: int = 0
    timeout: int = 0
    tls_failed: int = 0
    evicted: int = 0
    capacity: int = 0
    message_timeout: int = 0
    unlogged: int = 0

    def describe(self) -> str:
        return (
            f"connections handshaking={self.handshaking} tunnels={self.tunnels} "
            f"accepted={self.accepted} reset={self.reset} timeout={self.timeout} "
            f"tls_failed={self.tls_failed} evicted={self.evicted} capacity={self.capacity} "
            f"message_timeout={self.message_timeout} unlogged={self.unlogged}"
        )


@register
@attrs.frozen
class Joined(Event):
    """An endpoint completed its DTLS handshake and was admitted to a conference.

    ``spi`` is its first EKTKey's (``first_key``: ``now``, or ``at-rekey`` when that key is
    the pending rekey's, -1 until then); ``mdd`` the carrying tunnel's peer."""

    kind: ClassVar[str] = "kmf_joined"
    conference: str
    association: uuid.UUID
    fingerprint: str
    profile: int
    ekt_cipher: int
    tls_id: str | None = None
    spi: int = -1
    mdd: str = ""
    members: int = 0
    first_key: str = "now"

    def describe(self) -> str:
        return (
            f"joined conference={self.conference} association={self.association} "
            f"fingerprint={self.fingerprint} profile={_hex_profile(self.profile)} "
            f"spi={self.spi} ekt_cipher={self.ekt_cipher} mdd={self.mdd} "
            f"members={self.members} first_key={self.first_key}"
        )


@register
@attrs.frozen
class Denied(Event):
    """A join was refused; ``alert`` is the DTLS alert sent (e.g. ``access_denied``).

    ``ended`` is how the association then ended (the DTLS engine's close reason)."""

    kind: ClassVar[str] = "kmf_denied"
    association: uuid.UUID
    fingerprint: str | None
    reason: str
    alert: str
    conference: str | None = None
    profile: int | None = None
    ended: str = ""

    def describe(self) -> str:
        return (
            f"refused association={self.association} fingerprint={self.fingerprint or '?'} "
            f"conference={self.conference or '-'} profile={_hex_profile(self.profile)}: "
            f"{self.reason} ({self.ended or self.alert})"
        )


@register
@attrs.frozen
class HandshakeFailed(Event):
    """An association ended before joining without a refusal (timeout, the endpoint's alert,
    EndpointDisconnect from the MDD mid-handshake)."""

    kind: ClassVar[str] = "kmf_handshake_failed"
    association: uuid.UUID
    fingerprint: str | None
    reason: str

    def describe(self) -> str:
        return (
            f"handshake ended association={self.association} "
            f"fingerprint={self.fingerprint or '?'}: {self.reason}"
        )


@register
@attrs.frozen
class Left(Event):
    """A member's association ended (``reason``: close_notify, alert, timeout, disconnect, ...)."""

    kind: ClassVar[str] = "kmf_left"
    conference: str
    association: uuid.UUID
    fingerprint: str
    reason: str
    profile: int = 0
    spi: int | None = None
    members: int = 0

    def describe(self) -> str:
        return (
            f"left conference={self.conference} association={self.association} "
            f"fingerprint={self.fingerprint} profile={_hex_profile(self.profile)} "
            f"spi={self.spi} members={self.members} reason={self.reason}"
        )


@register
@attrs.frozen
class Kicked(Event):
    """The operator removed a member (D33): close_notify to it, a new key for the others;
    ``banned``: its fingerprint also left the roster."""

    kind: ClassVar[str] = "kmf_kicked"
    conference: str
    association: uuid.UUID
    fingerprint: str
    name: str | None = None
    banned: bool = False


@register
@attrs.frozen
class RosterChanged(Event):
    """The operator put a fingerprint on a conference's roster or took it off (D33)."""

    kind: ClassVar[str] = "kmf_roster_changed"
    conference: str
    fingerprint: str
    listed: bool
    name: str | None = None


@register
@attrs.frozen
class Rekeyed(Event):
    """A conference has a new EKTKey (``reason``: first, join, leave, ttl, manual, kick, or
    coalesced ones such as ``join+leave``). ``key`` is a one-way digest, never the key."""

    kind: ClassVar[str] = "kmf_rekeyed"
    conference: str
    spi: int
    reason: str
    members: int
    cipher: int = 0
    ttl: int = 0
    key: str = ""

    def describe(self) -> str:
        return (
            f"ektkey conference={self.conference} spi={self.spi} cipher={self.cipher} "
            f"ttl={self.ttl} key={self.key} reason={self.reason} members={self.members}"
        )


@register
@attrs.frozen
class RekeyFailed(Event):
    """A conference's rekey could not be made (the keying state refused it); no more rekeys."""

    kind: ClassVar[str] = "kmf_rekey_failed"
    conference: str
    reason: str

    def describe(self) -> str:
        return f"rekey failed conference={self.conference}: {self.reason} (no more rekeys for it)"


@register
@attrs.frozen
class KmfStateOpened(Event):
    """The KMF opened its state (D28): ``path`` ("" in memory), the conferences' resumed SPI
    counters (a restarted KMF hands out SPIs from these on), audit rows so far."""

    kind: ClassVar[str] = "kmf_state_opened"
    path: str
    resumed: dict[str, int] = attrs.field(factory=dict)
    audit_rows: int = 0
    #: associations of members who joined before a restart, taken up again (D29)
    associations: int = 0

    def describe(self) -> str:
        where = self.path or "memory only"
        resumed = ",".join(f"{c}@{n}" for c, n in sorted(self.resumed.items())) or "none"
        return (
            f"state {where} resumed_spi_counters={resumed} audit_rows={self.audit_rows} "
            f"associations={self.associations}"
        )


@register
@attrs.frozen
class KmfStateWriteFailed(Event):
    """A state write failed while running (disk full, locked; D28): logged once until a
    write succeeds again; the conference goes on in memory while reserved SPIs last."""

    kind: ClassVar[str] = "kmf_state_write_failed"
    reason: str
    failures: int
    pending: int

    def describe(self) -> str:
        return (
            f"state write failed: {self.reason} (failures={self.failures}, changes pending="
            f"{self.pending}; retried, logged again only after a write succeeds)"
        )


@register
@attrs.frozen
class KmfStateCaughtUp(Event):
    """The state is written again after failures: ``written`` pending changes caught up."""

    kind: ClassVar[str] = "kmf_state_caught_up"
    written: int
    failures: int

    def describe(self) -> str:
        return f"state written again: {self.written} pending changes caught up"


@register
@attrs.frozen
class EktKeyAcked(Event):
    """A member acknowledged the EKTKey with ``spi``."""

    kind: ClassVar[str] = "kmf_ektkey_acked"
    conference: str
    association: uuid.UUID
    spi: int

    def describe(self) -> str:
        return f"EKTKey acknowledged association={self.association} spi={self.spi}"


@register
@attrs.frozen
class DisconnectFromMdd(Event):
    """An MDD said an association is gone (EndpointDisconnect)."""

    kind: ClassVar[str] = "kmf_disconnect_from_mdd"
    association: uuid.UUID
    peer: str = ""

    def describe(self) -> str:
        return f"endpoint disconnect from MDD association={self.association} peer={self.peer}"


# --- endpoint events ----------------------------------------------------------------------------
# Emitted by ``perc endpoint``; ``name`` is its ``--name``. Key material never appears: ``ekt_key``
# and ``hbh_keys`` are one-way digests (for matching a KMF's line to an endpoint's, not secrets).


@register
@attrs.frozen
class EndpointJoined(Event):
    """The join completed: DTLS done, first EKTKey received."""

    kind: ClassVar[str] = "endpoint_joined"
    name: str
    profile: int
    ekt_cipher: int
    spi: int
    profile_name: str = ""
    ekt_cipher_name: str = ""
    mdd: str = ""
    local: str = ""
    kmf: str = ""
    kmf_tls_id: str = ""
    tls_id: str = ""
    cipher_suite: int = 0
    ekt_ttl: int = 0
    ekt_key: str = ""
    hbh_keys: str = ""
    join_ms: float = 0.0

    def describe(self) -> str:
        return (
            f"joined name={self.name} mdd={self.mdd} local={self.local} kmf={self.kmf} "
            f"kmf_tls_id={self.kmf_tls_id} tls_id={self.tls_id} "
            f"profile={self.profile_name}(0x{self.profile:04X}) "
            f"cipher_suite=0x{self.cipher_suite:04X} ekt_cipher={self.ekt_cipher_name} "
            f"spi={self.spi} ekt_ttl={self.ekt_ttl} ekt_key={self.ekt_key} "
            f"hbh_keys={self.hbh_keys} join_ms={self.join_ms:.1f}"
        )


@register
@attrs.frozen
class EndpointEktKey(Event):
    """A later EKTKey arrived (a rekey); the endpoint switches its E2E keys."""

    kind: ClassVar[str] = "endpoint_ektkey"
    name: str
    spi: int
    reason: str = "rekey"
    ekt_ttl: int = 0
    ekt_key: str = ""

    def describe(self) -> str:
        return (
            f"ektkey name={self.name} spi={self.spi} ekt_ttl={self.ekt_ttl} "
            f"ekt_key={self.ekt_key} ({self.reason})"
        )


@register
@attrs.frozen
class EndpointMediaStarted(Event):
    """Media started after the join: what the endpoint sends and under which SSRCs."""

    kind: ClassVar[str] = "endpoint_media"
    name: str
    media: str
    ssrcs: list[int]
    spi: int

    def describe(self) -> str:
        ssrcs = ",".join(str(s) for s in self.ssrcs)
        return f"media name={self.name} media={self.media} ssrcs={ssrcs} spi={self.spi}"


@register
@attrs.frozen
class EndpointLeft(Event):
    """The endpoint left: BYE and close_notify sent."""

    kind: ClassVar[str] = "endpoint_left"
    name: str
    local: str
    reason: str

    def describe(self) -> str:
        return f"left name={self.name} local={self.local} reason={self.reason} (close_notify sent)"


@register
@attrs.frozen
class EndpointMediaSummary(Event):
    """What the endpoint sent, received and verified, at exit. ``peers`` maps a peer's name to
    its counters (received, verified, e2e_failures, hbh_failures, payload_failures, key_wait,
    lost); ``unattributed`` counts packets from SSRCs no peer was verified on."""

    kind: ClassVar[str] = "endpoint_media_summary"
    name: str
    sent: int
    spis: list[int]
    peers_verified: int
    expect_peers: int
    peers: dict[str, dict[str, int]]
    unattributed: dict[str, int] = attrs.field(factory=dict)
    final: bool = True

    def describe(self) -> str:
        peers = " ".join(
            f"{name}(received={p.get('received', 0)} verified={p.get('verified', 0)} "
            f"e2e_failures={p.get('e2e_failures', 0)} hbh_failures={p.get('hbh_failures', 0)} "
            f"payload_failures={p.get('payload_failures', 0)} key_wait={p.get('key_wait', 0)} "
            f"lost={p.get('lost', 0)})"
            for name, p in self.peers.items()
        )
        un = self.unattributed
        return (
            f"media summary name={self.name} sent={self.sent} "
            f"spis={','.join(map(str, self.spis))} "
            f"peers_verified={self.peers_verified} expect_peers={self.expect_peers} "
            f"unattributed_e2e_failures={un.get('e2e_failures', 0)} "
            f"unattributed_received={un.get('received', 0)} pre_join={un.get('pre_join', 0)} "
            f"peers: {peers or 'none'}"
        )


@register
@attrs.frozen
class EndpointRejoin(Event):
    """The endpoint starts a new join by itself (D30: its keys are stale or its association is
    gone). ``reason``: ``stale_spi`` (peers' media under a newer EKT SPI for over 1 s),
    ``ekt_expired`` (the EKTKey's ekt_ttl ran out), ``silence`` (nothing from the MDD for
    ``--rejoin-silence`` seconds), ``ended`` (the KMF or MDD ended the association) or
    ``retry`` (the previous rejoin attempt failed). ``attempt`` counts attempts since the
    last join that verified media; ``delay`` is the back-off before this attempt starts."""

    kind: ClassVar[str] = "endpoint_rejoin"
    name: str
    reason: str
    attempt: int
    delay: float = 0.0
    detail: str = ""

    def describe(self) -> str:
        text = (
            f"rejoin name={self.name} reason={self.reason} attempt={self.attempt} "
            f"delay={self.delay:g}s"
        )
        return f"{text} ({self.detail})" if self.detail else text


@register
@attrs.frozen
class EndpointPeerVerified(Event):
    """A peer's media verified end to end for the first time since the endpoint's last
    (re)join: ``rejoins`` is how many rejoins came before, so 0 is the first join."""

    kind: ClassVar[str] = "endpoint_peer_verified"
    name: str
    peer: str
    rejoins: int = 0

    def describe(self) -> str:
        return f"peer verified name={self.name} peer={self.peer} rejoins={self.rejoins}"


@register
@attrs.frozen
class EndpointPeersSilent(Event):
    """At exit: peers whose verified media stopped for longer than ``--silence-limit``
    without an RTCP BYE or a rekey to explain it. ``peers`` maps each to the seconds since
    the start when its media last verified."""

    kind: ClassVar[str] = "endpoint_peers_silent"
    name: str
    peers: dict[str, float]
    limit: float

    def describe(self) -> str:
        who = ", ".join(f"{p} (last verified at {t:.1f} s)" for p, t in self.peers.items())
        return f"peers silent name={self.name} limit={self.limit:g}s: {who}"


# --- MDD cascade link events (D25, D26) ---------------------------------------------------------
# ``link`` names a cascade link (its peer's address unless named otherwise); ``peer`` is the
# other MDD's conference UDP address.


@register
@attrs.frozen
class LinkUp(Event):
    """A cascade link to another MDD is keyed (its DTLS handshake completed): media crosses it.
    ``keys`` is a one-way digest of the link's SRTP keys (the same on both MDDs);
    ``replaced``: a new handshake replaced a live association (a peer restart)."""

    kind: ClassVar[str] = "mdd_link_up"
    conference: str
    link: str
    peer: str
    fingerprint: str
    profile: int
    role: str
    keys: str = ""
    replaced: bool = False

    def describe(self) -> str:
        return (
            f"link up conference={self.conference} link={self.link} peer={self.peer} "
            f"mdd={self.fingerprint} profile=0x{self.profile:04X} role={self.role} "
            f"keys={self.keys}" + (" (replaced)" if self.replaced else "")
        )


@register
@attrs.frozen
class LinkDown(Event):
    """A cascade link went down (its peer closed, or went silent); the dialing side tries
    again in ``retry_in`` seconds (None on the listening side, which waits and pokes)."""

    kind: ClassVar[str] = "mdd_link_down"
    conference: str
    link: str
    peer: str
    reason: str
    retry_in: float | None = None

    def describe(self) -> str:
        text = (
            f"link down conference={self.conference} link={self.link} peer={self.peer}: "
            f"{self.reason}"
        )
        if self.retry_in is not None:
            text += f"; retry in {self.retry_in:.3g} s"
        return text


@register
@attrs.frozen
class LinkRefused(Event):
    """A handshake from a link's peer address showed another certificate: refused with a
    fatal alert (counted; logged once per link)."""

    kind: ClassVar[str] = "mdd_link_refused"
    conference: str
    link: str
    peer: str
    fingerprint: str
    expected: str

    def describe(self) -> str:
        return (
            f"link refused conference={self.conference} link={self.link} peer={self.peer}: "
            f"certificate {self.fingerprint} is not {self.expected}"
        )


@register
@attrs.frozen
class LinkCounters(Event):
    """One link's counters: forwarding (packets/bytes in and out, drops by reason, summed
    over the link's associations) and the link's own (handshakes, refusals, pokes, media
    before keys). Periodic while they change, and ``final`` at exit."""

    kind: ClassVar[str] = "mdd_link_counters"
    conference: str
    link: str
    state: str
    counters: dict[str, int]
    final: bool = False

    def describe(self) -> str:
        c = self.counters
        drops = " ".join(
            f"{k}={v}" for k, v in c.items() if k.startswith(("drop", "refused")) and v
        )
        return (
            f"link counters conference={self.conference} link={self.link} state={self.state} "
            f"in={c.get('packets_in', 0)}/{c.get('bytes_in', 0)}B "
            f"out={c.get('packets_out', 0)}/{c.get('bytes_out', 0)}B "
            f"handshakes={c.get('handshakes', 0)} drops: {drops or 'none'}"
            + (" (final)" if self.final else "")
        )


@register
@attrs.frozen
class SsrcLoop(Event):
    """One SSRC arrived from two directions (a cycle in the links, or a link bringing an SSRC
    a local endpoint sends): the later direction's packets are dropped (``drop_loop``).
    Logged once per SSRC. A direction is ``link <name>`` or ``endpoint <address>``."""

    kind: ClassVar[str] = "mdd_ssrc_loop"
    conference: str
    ssrc: int
    owner: str
    refused: str

    def describe(self) -> str:
        return (
            f"ssrc loop conference={self.conference} ssrc={self.ssrc}: owned by {self.owner}, "
            f"dropped from {self.refused}"
        )


# --- MDD workers (D27) ------------------------------------------------------------------------
# Emitted by the supervising ``perc mdd`` (perc.roles.workers).


@register
@attrs.frozen
class WorkerStarted(Event):
    """The supervisor started worker ``index`` of ``count`` (``restarts``: how often that
    worker was restarted before)."""

    kind: ClassVar[str] = "mdd_worker_started"
    index: int
    count: int
    pid: int
    restarts: int = 0

    def describe(self) -> str:
        return f"worker {self.index} of {self.count} started pid={self.pid}" + (
            f" (restart {self.restarts})" if self.restarts else ""
        )


@register
@attrs.frozen
class WorkerExited(Event):
    """Worker ``index`` exited: ``status`` is its exit status, or ``-N`` for signal N;
    ``restart_in``: seconds until it is restarted (None: it is not, the supervisor stops)."""

    kind: ClassVar[str] = "mdd_worker_exited"
    index: int
    pid: int
    status: int
    restart_in: float | None = None

    def describe(self) -> str:
        how = f"signal {-self.status}" if self.status < 0 else f"status {self.status}"
        then = "not restarted" if self.restart_in is None else f"restart in {self.restart_in:g}s"
        return f"worker {self.index} exited pid={self.pid} with {how}: {then}"
