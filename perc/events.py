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

from perc.logsetup import format_address

__all__ = [
    "Event",
    "EventError",
    "emit",
    "event_kinds",
    "from_json",
    "parse_line",
    "register",
    "to_json",
]

#: The ``extra`` key under which :func:`emit` attaches the event to a log record.
RECORD_KEY = "perc_event"

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
# Emitted by the KMF. ``fingerprint`` is an endpoint's certificate fingerprint (D20 text).


@register
@attrs.frozen
class KmfTunnelUp(Event):
    """An MDD's tunnel was accepted (pinned certificate, version agreed)."""

    kind: ClassVar[str] = "kmf_tunnel_up"
    peer: str
    fingerprint: str


@register
@attrs.frozen
class KmfTunnelDown(Event):
    """An MDD's tunnel ended (``refused``: it never got past TLS or the version check)."""

    kind: ClassVar[str] = "kmf_tunnel_down"
    peer: str
    reason: str
    refused: bool = False


@register
@attrs.frozen
class Joined(Event):
    """An endpoint completed its DTLS handshake and was admitted to a conference."""

    kind: ClassVar[str] = "kmf_joined"
    conference: str
    association: uuid.UUID
    fingerprint: str
    profile: int
    ekt_cipher: int
    tls_id: str | None = None


@register
@attrs.frozen
class Denied(Event):
    """A join was refused; ``alert`` is the DTLS alert sent (e.g. ``access_denied``)."""

    kind: ClassVar[str] = "kmf_denied"
    association: uuid.UUID
    fingerprint: str | None
    reason: str
    alert: str
    conference: str | None = None


@register
@attrs.frozen
class Left(Event):
    """A member's association ended (``reason``: close_notify, alert, timeout, disconnect, ...)."""

    kind: ClassVar[str] = "kmf_left"
    conference: str
    association: uuid.UUID
    fingerprint: str
    reason: str


@register
@attrs.frozen
class Rekeyed(Event):
    """A conference has a new EKTKey (``reason``: first, join, leave, ttl, manual, kick)."""

    kind: ClassVar[str] = "kmf_rekeyed"
    conference: str
    spi: int
    reason: str
    members: int


@register
@attrs.frozen
class EktKeyAcked(Event):
    """A member acknowledged the EKTKey with ``spi``."""

    kind: ClassVar[str] = "kmf_ektkey_acked"
    conference: str
    association: uuid.UUID
    spi: int


@register
@attrs.frozen
class DisconnectFromMdd(Event):
    """An MDD said an association is gone (EndpointDisconnect)."""

    kind: ClassVar[str] = "kmf_disconnect_from_mdd"
    association: uuid.UUID


# --- endpoint events ----------------------------------------------------------------------------
# Emitted by ``perc endpoint``; ``name`` is its ``--name``.


@register
@attrs.frozen
class EndpointJoined(Event):
    """The join completed: DTLS done, first EKTKey received."""

    kind: ClassVar[str] = "endpoint_joined"
    name: str
    profile: int
    ekt_cipher: int
    spi: int


@register
@attrs.frozen
class EndpointEktKey(Event):
    """A later EKTKey arrived (a rekey); the endpoint switches its E2E keys."""

    kind: ClassVar[str] = "endpoint_ektkey"
    name: str
    spi: int
    reason: str = "rekey"


@register
@attrs.frozen
class EndpointMediaSummary(Event):
    """What the endpoint sent, received and verified (periodic and ``final`` at exit)."""

    kind: ClassVar[str] = "endpoint_media_summary"
    name: str
    counts: dict[str, int]
    peers_verified: int
    final: bool = False
