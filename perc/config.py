"""Configuration of the roles: attrs classes, loaded from TOML with cattrs for the KMF and MDD.

This module is the one place defaults live. Every setting is an attrs field whose
``metadata["doc"]`` says what it is; the CLI and the man page read them from here
(:func:`describe`).

Files (the optional keys have the defaults shown)::

    # kmf.toml
    [kmf]
    listen = "127.0.0.1:4444"         # TLS tunnel listener (TCP)
    cert = "kmf.crt"                   # also the KMF's DTLS certificate toward endpoints
    key = "kmf.key"
    trusted_mdds = ["sha-256 AB:..."]  # MDD certificate fingerprints allowed to connect
    dtls_cookies = true                # stateless HelloVerifyRequest cookies (D14)
    profiles = [0x0009, 0x000A]        # DOUBLE profiles in preference order (D18)
    handshake_timeout = 5.0            # seconds for a tunnel's TLS handshake
    # tls_id = "..."                   # the KMF's external_session_id (D15); random if unset
    state = "kmf-state.sqlite"         # D28 state file beside this file; "" = memory only
    state_key = "kmf-state.key"        # D28 state key (0600, created on first start)
    persist_keys = true                # D29 key material in the state
    # metrics = "127.0.0.1:9464"       # Prometheus GET /metrics (D34); unset: off
    # admin_socket = "kmf.sock"        # D33 admin socket (mode 0600); unset: none
    [[conference]]
    id = "demo"
    participants = ["sha-256 ..."]     # endpoint certificate fingerprints (D15)
    tls_ids = { "sha-256 ..." = "..." } # optional expected tls-id per participant (D15)
    rekey_on_join = true               # D22
    rekey_on_leave = true              # D22
    rekey_window = 0.05                # seconds; joins/leaves within it of a rekey share one (D31)
    ekt_ttl = 86400                    # EKTKey ekt_ttl in seconds (D10)

    # mdd.toml
    [mdd]
    cert = "mdd.crt"
    key = "mdd.key"
    idle_timeout = 10.0                # seconds of endpoint silence before EndpointDisconnect (D3)
    reconnect_min = 0.5                # first tunnel reconnect delay, doubling ... (D1)
    reconnect_max = 30.0               # ... up to this cap
    handshake_timeout = 10.0           # seconds for a tunnel's TLS handshake
    stats_interval = 10.0              # seconds between forwarding counter logs (when changed)
    max_pending = 1000                 # associations still before the KMF's ServerHello
    max_pending_per_ip = 64            # ... of them from one source IP address
    pending_timeout = 2.0              # seconds a pending association has to progress
    # metrics = "127.0.0.1:9465"       # Prometheus GET /metrics (D34); unset: off
    # admin_socket = "mdd.sock"        # D33 admin socket (mode 0600); unset: none
    workers = 1                        # worker processes under one supervisor (D27)
    [[conference]]
    id = "demo"
    listen = "127.0.0.1:5004"          # UDP port where endpoints of this conference send
    kmf = "127.0.0.1:4444"
    kmf_fingerprint = "sha-256 ..."
    # last_n = 4                       # forward only the last N active speakers (unset: all)
    video_payload_types = [96]         # RTP payload types that are video (subject to last_n)
    max_associations = 10000           # endpoints at once; new ones beyond are dropped
    pli_rate = 2.0                     # PLI/FIR per second per receiver toward one sender
    nack_rate = 1000.0                 # NACKed packets per second per receiver toward one sender
    repair = true                      # answer NACKs from a cache of recent packets (D36)
    repair_cache_ms = 1000             # ... kept per sending SSRC for this long
    repair_cache_packets = 512         # ... and at most this many
    repair_rate = 500.0                # retransmissions per second to one receiver
    frame_marking_id = 4               # RFC 9626 id: last_n feeds start at key frames (D35)
    keyframe_wait = 0.1                # seconds a last_n feed waits for a key frame before a PLI
    [[conference.link]]                # cascade link to another MDD of this conference (D25)
    peer = "192.0.2.7:5004"            # its UDP listen address for this conference
    fingerprint = "sha-256 ..."        # its certificate (D20); any other is refused
    connect = true                     # this side dials; the other side says false

Relative ``cert``/``key`` paths are relative to the folder of the config file. Loading also
loads both identities (:func:`perc.identity.load`) and canonicalises every fingerprint. Any
problem raises :class:`ConfigError` whose text is one line naming the key and the problem;
unknown keys are refused so that typos do not pass silently.

API::

    load_kmf_config(path) -> KmfConfig        # .kmf: KmfSettings, .conferences, .identity
    load_mdd_config(path) -> MddConfig        # .mdd: MddSettings, .conferences, .identity
    mdd_quick_config(kmf=, kmf_fingerprint=, listen=, cert=, key=, conference="demo")
    parse_host_port(text) -> HostPort         # HostPort(host, port); str() gives host:port
    describe(cls) -> list[Setting]            # key, type, default, doc for CLI/man page
    default(cls, key)                         # one key's default
    endpoint_config(mdd=, kmf_fingerprint=, cert=, key=, ...) -> EndpointConfig
                                              # perc endpoint's options, checked
    DOUBLE_PROFILES                           # the SrtpProfile members perc runs (D18)
    ConfigError
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NewType, TypeVar

import attrs
import cattrs
from cattrs.errors import ClassValidationError, ForbiddenExtraKeysError, IterableValidationError
from cattrs.gen import make_dict_structure_fn

from perc import identity as _identity
from perc.srtp.keys import SrtpProfile
from perc.tlsid import TLS_ID_RULE, is_tls_id

__all__ = [
    "DOUBLE_PROFILES",
    "ENDPOINT_CODECS",
    "ENDPOINT_MEDIA",
    "ConfigError",
    "EndpointConfig",
    "Fingerprint",
    "HostPort",
    "KmfConference",
    "KmfConfig",
    "KmfSettings",
    "MddConference",
    "MddConfig",
    "MddLink",
    "MddSettings",
    "Setting",
    "default",
    "describe",
    "endpoint_config",
    "load_kmf_config",
    "load_mdd_config",
    "mdd_quick_config",
    "parse_host_port",
]


class ConfigError(Exception):
    """A configuration is unusable. ``str(error)`` is one line naming the key and problem."""

    def __init__(self, message: str) -> None:
        # Values from the file (paths, names) may hold control characters: escape them so
        # the message stays one printable line.
        super().__init__(one_line(message))


def one_line(text: str) -> str:
    """``text`` with control characters escaped (``\\n``, ``\\x1b``...): one printable line."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


#: A certificate fingerprint in canonical D20 form (``sha-256 AB:CD:...``, uppercase).
Fingerprint = NewType("Fingerprint", str)

#: The DOUBLE profiles perc runs, in its preference order (D18): the 128-bit one first.
DOUBLE_PROFILES = tuple(p for p in SrtpProfile if p.is_double)


class _Invalid(ValueError):
    """A value has the right place but a bad form; its text is the problem, without the key."""


@attrs.frozen
class HostPort:
    """A ``host:port`` pair (``[v6addr]:port`` for IPv6 literals)."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_host_port(text: str) -> HostPort:
    """Parse ``host:port`` or ``[v6]:port``; port 0..65535. Raises ValueError."""
    host, sep, port_text = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise _Invalid(f"bad host:port {text!r}: write IPv6 addresses as [addr]:port")
    if not sep or not host or not port_text.isdigit() or int(port_text) > 65535:
        raise _Invalid(f"bad host:port {text!r}: expected HOST:PORT with PORT 0-65535")
    return HostPort(host=host, port=int(port_text))


def _doc(text: str) -> dict[str, str]:
    return {"doc": text}


# --- the schema (one source of defaults) -------------------------------------------------------

#: D28: the KMF's state file and state key, beside the config file unless set.
DEFAULT_STATE_FILE = "kmf-state.sqlite"
DEFAULT_STATE_KEY_FILE = "kmf-state.key"


@attrs.frozen
class KmfSettings:
    """The ``[kmf]`` table."""

    listen: HostPort = attrs.field(metadata=_doc("TLS tunnel listener (TCP host:port)"))
    cert: Path = attrs.field(
        metadata=_doc("certificate (PEM); also the KMF's DTLS certificate toward endpoints")
    )
    key: Path = attrs.field(metadata=_doc("private key of cert (PEM, ECDSA P-256)"))
    trusted_mdds: tuple[Fingerprint, ...] = attrs.field(
        metadata=_doc("MDD certificate fingerprints allowed to open a tunnel (D1, D20)")
    )
    dtls_cookies: bool = attrs.field(
        default=True, metadata=_doc("stateless DTLS HelloVerifyRequest cookies (D14)")
    )
    profiles: tuple[int, ...] = attrs.field(
        default=DOUBLE_PROFILES,
        metadata=_doc("SRTP DOUBLE profiles the KMF accepts, in preference order (D18)"),
    )
    tls_id: str | None = attrs.field(
        default=None,
        metadata=_doc("the KMF's tls-id sent in external_session_id (D15); random if unset"),
    )
    handshake_timeout: float = attrs.field(
        default=5.0, metadata=_doc("seconds allowed for a tunnel's TLS handshake")
    )
    max_handshakes: int = attrs.field(
        default=128,
        metadata=_doc(
            "TLS connections in their handshake at once (apart from up tunnels); beyond it "
            "the stalest is closed"
        ),
    )
    max_handshakes_per_ip: int = attrs.field(
        default=32, metadata=_doc("TLS connections in their handshake from one source address")
    )
    message_timeout: float = attrs.field(
        default=10.0,
        metadata=_doc("seconds a partly received tunnel message may wait for its rest"),
    )
    max_pending_associations: int = attrs.field(
        default=1024,
        metadata=_doc("DTLS associations not yet joined, per tunnel; beyond it new ones drop"),
    )
    state: Path | None = attrs.field(
        default=None,
        metadata=_doc(
            f"SQLite state file (D28: SPIs that survive restarts, the audit log of D32); in a "
            f'config file the default is {DEFAULT_STATE_FILE} beside it, and "" keeps '
            "everything in memory"
        ),
    )
    state_key: Path | None = attrs.field(
        default=None,
        metadata=_doc(
            f"32-byte key file sealing key material in the state (D28), created mode 0600 on "
            f"first start; in a config file the default is {DEFAULT_STATE_KEY_FILE} beside it"
        ),
    )
    persist_keys: bool = attrs.field(
        default=True,
        metadata=_doc(
            "keep key material in the state (D29); false stores none (this perc stores none "
            "yet either way: it does not resume associations across restarts)"
        ),
    )
    metrics: HostPort | None = attrs.field(
        default=None,
        metadata=_doc("serve Prometheus metrics at http://HOST:PORT/metrics (D34); unset: off"),
    )
    admin_socket: Path | None = attrs.field(
        default=None,
        metadata=_doc(
            "Unix socket of the admin interface (D33, perc admin), created mode 0600, "
            "relative to the config file's folder; unset: none"
        ),
    )


@attrs.frozen
class KmfConference:
    """One ``[[conference]]`` table of a KMF config."""

    id: str = attrs.field(metadata=_doc("conference name, unique in the file"))
    participants: tuple[Fingerprint, ...] = attrs.field(
        metadata=_doc("endpoint certificate fingerprints admitted to the conference (D15)")
    )
    tls_ids: Mapping[Fingerprint, str] = attrs.field(
        factory=dict,
        metadata=_doc("expected tls-id per participant fingerprint (D15); unset: any"),
    )
    rekey_on_join: bool = attrs.field(
        default=True,
        metadata=_doc(
            "new EKTKey when an endpoint joins a live conference (D22); the joiner's first "
            "EKTKey is then the new key, sent when the rekey fires (never the key used before "
            "it joined)"
        ),
    )
    rekey_on_leave: bool = attrs.field(
        default=True,
        metadata=_doc(
            "new EKTKey for the others when an endpoint leaves: DTLS close or alert, timeout, "
            "or the MDD's EndpointDisconnect (D3, D22)"
        ),
    )
    rekey_window: float = attrs.field(
        default=0.05,
        metadata=_doc(
            "a join/leave after a quiet period rekeys at once; joins/leaves within this "
            "many seconds of a rekey share one new EKTKey at the window's end (D22, D31)"
        ),
    )
    ekt_ttl: int = attrs.field(
        default=86400,
        metadata=_doc(
            "ekt_ttl of each EKTKey, seconds (D10); a live conference gets a new key "
            "min(ttl/10, 300 s) before it expires"
        ),
    )


@attrs.frozen
class MddSettings:
    """The ``[mdd]`` table."""

    cert: Path = attrs.field(metadata=_doc("certificate (PEM) presented to the KMF"))
    key: Path = attrs.field(metadata=_doc("private key of cert (PEM, ECDSA P-256)"))
    idle_timeout: float = attrs.field(
        default=10.0,
        metadata=_doc("seconds of endpoint silence before EndpointDisconnect is sent (D3)"),
    )
    reconnect_min: float = attrs.field(
        default=0.5, metadata=_doc("first tunnel reconnect delay in seconds, doubling (D1)")
    )
    reconnect_max: float = attrs.field(
        default=30.0, metadata=_doc("cap of the tunnel reconnect delay in seconds (D1)")
    )
    handshake_timeout: float = attrs.field(
        default=10.0, metadata=_doc("seconds allowed for a tunnel's TLS handshake")
    )
    stats_interval: float = attrs.field(
        default=10.0,
        metadata=_doc(
            "seconds between logs of the per-association forwarding counters (only those "
            "that changed; all of them again at exit)"
        ),
    )
    max_pending: int = attrs.field(
        default=1000,
        metadata=_doc(
            "pending associations per conference (a ClientHello relayed, no ServerHello "
            "from the KMF yet); beyond, the oldest pending one is dropped"
        ),
    )
    max_pending_per_ip: int = attrs.field(
        default=64,
        metadata=_doc("pending associations from one source IP; beyond, ClientHellos dropped"),
    )
    pending_timeout: float = attrs.field(
        default=2.0,
        metadata=_doc(
            "seconds a pending association has to get the KMF's ServerHello or MediaKeys"
        ),
    )
    metrics: HostPort | None = attrs.field(
        default=None,
        metadata=_doc("serve Prometheus metrics at http://HOST:PORT/metrics (D34); unset: off"),
    )
    admin_socket: Path | None = attrs.field(
        default=None,
        metadata=_doc(
            "Unix socket of the admin interface (D33, perc admin), created mode 0600, "
            "relative to the config file's folder; unset: none"
        ),
    )
    workers: int = attrs.field(
        default=1,
        metadata=_doc(
            "worker processes (D27): more than 1 runs them under one supervisor, each "
            "conference port shared with SO_REUSEPORT and the workers linked as a mesh"
        ),
    )


@attrs.frozen
class MddLink:
    """One ``[[conference.link]]`` table: a cascade link to another MDD of the conference (D25)."""

    peer: HostPort = attrs.field(
        metadata=_doc("the other MDD's UDP host:port for this conference (its listen address)")
    )
    fingerprint: Fingerprint = attrs.field(
        metadata=_doc("the other MDD's certificate fingerprint (D20); any other is refused")
    )
    connect: bool = attrs.field(
        metadata=_doc(
            "true: this side starts the DTLS handshake (the other side lists us with false)"
        )
    )


@attrs.frozen
class MddConference:
    """One ``[[conference]]`` table of an MDD config: one UDP port and one tunnel (D1)."""

    id: str = attrs.field(metadata=_doc("conference name, unique in the file"))
    listen: HostPort = attrs.field(
        metadata=_doc("UDP host:port where endpoints of this conference send")
    )
    kmf: HostPort = attrs.field(metadata=_doc("the KMF's tunnel address (TCP host:port)"))
    kmf_fingerprint: Fingerprint = attrs.field(
        metadata=_doc("the KMF's certificate fingerprint; any other KMF is refused (D1)")
    )
    last_n: int | None = attrs.field(
        default=None, metadata=_doc("forward only the last N active speakers; unset: all")
    )
    video_payload_types: tuple[int, ...] = attrs.field(
        default=(96,),
        metadata=_doc("RTP payload types that are video (last_n applies to them only)"),
    )
    max_associations: int = attrs.field(
        default=10000,
        metadata=_doc("most endpoint associations at once; new endpoints beyond are dropped"),
    )
    pli_rate: float = attrs.field(
        default=2.0,
        metadata=_doc("PLI/FIR per second one receiver may send toward one media sender (D36)"),
    )
    nack_rate: float = attrs.field(
        default=1000.0,
        metadata=_doc("packets per second one receiver may NACK toward one media sender"),
    )
    repair: bool = attrs.field(
        default=True,
        metadata=_doc("answer NACKs from a cache of recent packets, byte-identical (D36)"),
    )
    repair_cache_ms: int = attrs.field(
        default=1000,
        metadata=_doc("milliseconds of packets kept per sending SSRC for repair (D36)"),
    )
    repair_cache_packets: int = attrs.field(
        default=512, metadata=_doc("packets kept per sending SSRC for repair, at most (D36)")
    )
    repair_rate: float = attrs.field(
        default=500.0,
        metadata=_doc("packets per second the MDD retransmits to one receiver from its cache"),
    )
    frame_marking_id: int = attrs.field(
        default=4,
        metadata=_doc(
            "RFC 9626 frame marking extension id (1-14): last_n starts a feed at a key frame "
            "(D35); 0: ignore the extension"
        ),
    )
    keyframe_wait: float = attrs.field(
        default=0.1,
        metadata=_doc(
            "seconds a last_n feed waits for a key frame before the MDD sends the sender a PLI"
        ),
    )
    link: tuple[MddLink, ...] = attrs.field(
        default=(),
        metadata=_doc("cascade links to other MDDs serving this conference (D25)"),
    )


@attrs.frozen
class EndpointConfig:
    """``perc endpoint``'s settings: the one source of their defaults and help texts."""

    mdd: HostPort = attrs.field(metadata=_doc("the MDD's UDP address for the conference"))
    cert: Path = attrs.field(metadata=_doc("this endpoint's certificate (PEM)"))
    key: Path = attrs.field(metadata=_doc("private key of the certificate (PEM)"))
    kmf_fingerprint: Fingerprint = attrs.field(
        metadata=_doc(
            "the KMF's certificate fingerprint ('sha-256 AB:...'); any other server is refused"
        )
    )
    tls_id: str | None = attrs.field(
        default=None,
        metadata=_doc(
            "our tls-id (external_session_id, 20-255 of A-Z a-z 0-9 + / - _); random if unset"
        ),
    )
    kmf_tls_id: str | None = attrs.field(
        default=None,
        metadata=_doc("require the KMF to present this tls-id (RFC 9185 §5.1); unchecked if unset"),
    )
    name: str | None = attrs.field(
        default=None, metadata=_doc("name in logs (default: the certificate's file stem)")
    )
    join_timeout: float = attrs.field(
        default=10.0,
        metadata=_doc("seconds allowed for the whole join (DTLS handshake and first EKTKey)"),
    )
    duration: float | None = attrs.field(
        default=None,
        metadata=_doc(
            "leave (close_notify, exit 0) this many seconds after joining; default: stay "
            "until SIGINT/SIGTERM"
        ),
    )
    keepalive: float = attrs.field(
        default=3.0,
        metadata=_doc(
            "after this many seconds without sending, send an empty DTLS record so that the "
            "MDD does not drop us as idle (its idle_timeout); 0 disables"
        ),
    )
    media: str = attrs.field(
        default="audio",
        metadata=_doc(
            "what to send: synthetic audio (50 packets/s, 160 B, PT 111), video (PT 96), "
            "both, or none (receive only); everything received is verified end to end"
        ),
    )
    expect_peers: int = attrs.field(
        default=0,
        metadata=_doc(
            "exit 0 only if media from at least N peers was received and verified end to end"
        ),
    )
    report: Path | None = attrs.field(
        default=None,
        metadata=_doc(
            "write a JSON report (sent, SPIs, per peer received/verified/failures) to FILE, "
            "replaced atomically every second and once more at exit"
        ),
    )
    rejoin: bool = attrs.field(
        default=True,
        metadata=_doc(
            "heal by rejoining (a new DTLS handshake through the same MDD, same identity and "
            "name) when the keys are stale or the association is gone: media under a newer EKT "
            "SPI for over 1 s, ekt_ttl expired, --rejoin-silence, or the association ended by "
            "the other side (except access_denied); back-off 0.5 s doubling to 8 s"
        ),
    )
    rejoin_silence: float = attrs.field(
        default=3.0,
        metadata=_doc(
            "rejoin after this many seconds with nothing from the MDD while peers are expected "
            "(--expect-peers > 0) and one was heard; 0 disables"
        ),
    )
    silence_limit: float = attrs.field(
        default=5.0,
        metadata=_doc(
            "exit 9 if a peer's verified media stopped for longer than this (until the end) "
            "without an RTCP BYE from it or a rekey after it; 0 disables"
        ),
    )
    video_fps: float = attrs.field(
        default=30.0,
        metadata=_doc("video frame rate (with --media video or both; whole numbers for VP8)"),
    )
    video_bitrate: int = attrs.field(
        default=500_000,
        metadata=_doc(
            "video bit rate in bit/s (VP8's target; synthetic key frames are larger; with "
            "--media video or both)"
        ),
    )
    codec: str = attrs.field(
        default="synthetic",
        metadata=_doc(
            "what the payloads are: perc's verifiable synthetic payloads, or real Opus (PT 111, "
            "20 ms) and VP8 (PT 96) through PyAV (perc[media]); --audio-file/--video-file "
            "imply real"
        ),
    )
    audio_file: Path | None = attrs.field(
        default=None,
        metadata=_doc("send the audio of FILE (anything FFmpeg reads) instead of a tone"),
    )
    video_file: Path | None = attrs.field(
        default=None,
        metadata=_doc("send the video of FILE (scaled to 640x360) instead of a test pattern"),
    )
    loop: bool = attrs.field(
        default=False, metadata=_doc("start --audio-file/--video-file again at their end")
    )
    record: Path | None = attrs.field(
        default=None,
        metadata=_doc(
            "write the real media received from each peer to DIR/NAME.audio.ogg and "
            "DIR/NAME.video.webm (created if missing)"
        ),
    )
    repair: bool = attrs.field(
        default=True,
        metadata=_doc("NACK missing real video packets (PLI for lost frames is always sent)"),
    )


#: The values ``perc endpoint --media`` takes.
ENDPOINT_MEDIA = ("audio", "video", "both", "none")
#: The values ``perc endpoint --codec`` takes.
ENDPOINT_CODECS = ("synthetic", "real")


def default(cls: type[Any], key: str) -> Any:
    """The default of one documented key (e.g. ``default(EndpointConfig, "keepalive")``)."""
    return next(s for s in describe(cls) if s.key == key).default


@attrs.frozen
class KmfConfig:
    """A loaded KMF configuration: settings, conferences and the loaded identity."""

    kmf: KmfSettings
    conferences: tuple[KmfConference, ...]
    identity: _identity.Identity
    source: Path | None = None

    def conference(self, conference_id: str) -> KmfConference | None:
        return next((c for c in self.conferences if c.id == conference_id), None)


@attrs.frozen
class MddConfig:
    """A loaded MDD configuration: settings, conferences and the loaded identity."""

    mdd: MddSettings
    conferences: tuple[MddConference, ...]
    identity: _identity.Identity
    source: Path | None = None


@attrs.frozen
class _KmfFile:
    kmf: KmfSettings
    conference: tuple[KmfConference, ...] = ()


@attrs.frozen
class _MddFile:
    mdd: MddSettings
    conference: tuple[MddConference, ...] = ()


@attrs.frozen
class Setting:
    """One documented key, for the CLI's help and the man page."""

    key: str
    type: str
    default: object
    required: bool
    doc: str


def _describe_type(t: object) -> str:
    if t is Path:
        return "path"
    if t is HostPort:
        return "host:port"
    if t is Fingerprint:
        return "fingerprint"
    if isinstance(t, type):
        return {"str": "string", "int": "integer", "float": "number", "bool": "boolean"}.get(
            t.__name__, t.__name__
        )
    args: tuple[object, ...] = getattr(t, "__args__", ())
    if type(None) in args:
        return _describe_type(next(a for a in args if a is not type(None))) + " (optional)"
    if getattr(t, "__origin__", None) is tuple:
        return "array of " + _describe_type(args[0])
    if len(args) == 2:
        return f"table of {_describe_type(args[0])} = {_describe_type(args[1])}"
    return str(t)


def describe(cls: type[Any]) -> list[Setting]:
    """The documented keys of one schema class (e.g. ``describe(MddSettings)``)."""
    attrs.resolve_types(cls)
    out = []
    for f in attrs.fields(cls):
        required = f.default is attrs.NOTHING
        default: object = None
        if isinstance(f.default, attrs.Factory):  # type: ignore[arg-type]
            default = f.default.factory()
        elif not required:
            default = f.default
        out.append(
            Setting(
                key=f.name,
                type=_describe_type(f.type),
                default=default,
                required=required,
                doc=f.metadata.get("doc", ""),
            )
        )
    return out


# --- structuring: strict types, our messages ---------------------------------------------------

_T = TypeVar("_T")


def _type_name(value: object) -> str:
    return {
        bool: "boolean",
        int: "integer",
        float: "float",
        str: "string",
        list: "array",
        dict: "table",
    }.get(type(value), type(value).__name__)


def _strict(kind: type[_T], name: str) -> Callable[[object, object], _T]:
    def hook(value: object, _: object) -> _T:
        # TOML values are typed: refuse the coercions cattrs would do (bool("false") is True).
        if isinstance(value, bool) and kind is not bool:
            raise _Invalid(f"expected {name}, got boolean")
        if kind is float and isinstance(value, int):
            value = float(value)
        if not isinstance(value, kind):
            raise _Invalid(f"expected {name}, got {_type_name(value)}")
        return value

    return hook


def _host_port(value: object, _: object) -> HostPort:
    if not isinstance(value, str):
        raise _Invalid(f"expected a string 'host:port', got {_type_name(value)}")
    return parse_host_port(value)


def _fingerprint(value: object, _: object) -> Fingerprint:
    if not isinstance(value, str):
        raise _Invalid(f"expected a fingerprint string 'sha-256 AB:...', got {_type_name(value)}")
    try:
        return Fingerprint(_identity.parse_fingerprint(value))
    except _identity.IdentityError as e:
        raise _Invalid(str(e)) from None


def _path(value: object, _: object) -> Path:
    if not isinstance(value, str) or not value:
        raise _Invalid(f"expected a file path string, got {_type_name(value)}")
    if "\0" in value:
        raise _Invalid("a file path cannot contain a NUL character")
    return Path(value)


class _Located(Exception):
    """An error inside an array element or table entry: ``where`` is ``[i]`` or ``[key]``."""

    def __init__(self, where: str, error: BaseException) -> None:
        super().__init__(where)
        self.where = where
        self.error = error


def _make_converter() -> cattrs.Converter:
    conv = cattrs.Converter(forbid_extra_keys=True)
    conv.register_structure_hook(str, _strict(str, "a string"))
    conv.register_structure_hook(int, _strict(int, "an integer"))
    conv.register_structure_hook(float, _strict(float, "a number"))
    conv.register_structure_hook(bool, _strict(bool, "true or false"))
    conv.register_structure_hook(HostPort, _host_port)
    conv.register_structure_hook(Fingerprint, _fingerprint)
    conv.register_structure_hook(Path, _path)

    def table_hook(cl: Any) -> Callable[[object, object], object]:
        inner = make_dict_structure_fn(cl, conv, _cattrs_forbid_extra_keys=True)

        def hook(value: object, t: object) -> object:
            if not isinstance(value, dict):
                raise _Invalid(f"expected a table, got {_type_name(value)}")
            return inner(value, t)

        return hook

    conv.register_structure_hook_factory(attrs.has, table_hook)

    def is_homogeneous_tuple(t: Any) -> bool:
        args: tuple[Any, ...] = getattr(t, "__args__", ())
        return getattr(t, "__origin__", None) is tuple and args[1:] == (...,)

    def tuple_hook(t: Any) -> Callable[[object, object], tuple[object, ...]]:
        elem = t.__args__[0]
        structure = conv.get_structure_hook(elem)

        def hook(value: object, _: object) -> tuple[object, ...]:
            # Our own loop (not cattrs'): a string is not an array of characters, and an
            # element's error is reported at its index.
            if not isinstance(value, list):
                raise _Invalid(f"expected an array, got {_type_name(value)}")
            out = []
            for i, item in enumerate(value):
                try:
                    out.append(structure(item, elem))
                except Exception as e:
                    raise _Located(f"[{i}]", e) from None
            return tuple(out)

        return hook

    conv.register_structure_hook_factory(is_homogeneous_tuple, tuple_hook)

    def fingerprint_map(value: object, _: object) -> dict[Fingerprint, str]:
        if not isinstance(value, dict):
            raise _Invalid(f"expected a table, got {_type_name(value)}")
        out = {}
        for k, v in value.items():
            try:
                out[_fingerprint(k, None)] = _strict(str, "a string")(v, None)
            except Exception as e:
                raise _Located(f"[{k!r}]", e) from None
        return out

    conv.register_structure_hook_func(
        lambda t: t == Mapping[Fingerprint, str],
        fingerprint_map,
    )
    return conv


_CONVERTER = _make_converter()


def _key_path(path: str) -> str:
    # cattrs paths look like "$.conference[0].listen"; show "conference[0].listen".
    path = path.removeprefix("$").removeprefix(".")
    return path or "(top level)"


def _first_error(exc: BaseException, path: str = "$") -> tuple[str, str]:
    """Walk a cattrs exception tree to its first leaf: (key path, problem)."""
    if isinstance(exc, ForbiddenExtraKeysError):
        extra = sorted(exc.extra_fields)[0]
        where = _key_path(path)
        return (extra if where == "(top level)" else f"{where}.{extra}"), "unknown key (a typo?)"
    if isinstance(exc, _Located):
        return _first_error(exc.error, path + exc.where)
    if isinstance(exc, ClassValidationError):
        with_notes, others = exc.group_exceptions()
        if with_notes:
            sub, note = with_notes[0]
            return _first_error(sub, f"{path}.{note.name}")
        return _first_error(others[0], path)
    if isinstance(exc, IterableValidationError):
        with_index, rest = exc.group_exceptions()
        if with_index:
            item, inote = with_index[0]
            return _first_error(item, f"{path}[{inote.index!r}]")
        return _first_error(rest[0], path)
    if isinstance(exc, BaseExceptionGroup):
        return _first_error(exc.exceptions[0], path)
    if isinstance(exc, KeyError):
        return _key_path(path), "required key missing"
    if isinstance(exc, _Invalid):
        return _key_path(path), str(exc)
    return _key_path(path), f"invalid value ({exc})"


def _structure(data: dict[str, Any], cls: type[_T], rename: Callable[[str], str]) -> _T:
    try:
        return _CONVERTER.structure(data, cls)
    except Exception as e:
        key, problem = _first_error(e)
        raise ConfigError(f"{rename(key)}: {problem}") from None


# --- semantic checks and loading ---------------------------------------------------------------


def _check(ok: bool, key: str, problem: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {problem}")


def _check_positive(value: float, key: str) -> None:
    _check(math.isfinite(value) and value > 0, key, f"must be a positive number, got {value}")


def _check_unique_ids(ids: list[str], section: str) -> None:
    seen: set[str] = set()
    for i, cid in enumerate(ids):
        _check(bool(cid), f"{section}[{i}].id", "must not be empty")
        _check(cid not in seen, f"{section}[{i}].id", f"duplicate conference id {cid!r}")
        seen.add(cid)


def _check_role(data: dict[str, Any], own: str, other: str) -> None:
    # The likeliest mistake of all: the other role's file. Say so instead of "missing key".
    _check(
        own in data or other not in data,
        own,
        f"required key missing (this is {'an MDD' if other == 'mdd' else 'a KMF'} config: "
        f"it has [{other}])",
    )


#: Listen hosts that mean "every local address": a link to one of our own ports is refused.
_WILDCARD_HOSTS = frozenset({"0.0.0.0", "::", "", "*"})  # noqa: S104 - compared, not bound
_LOOPBACK_HOSTS = frozenset({"127.0.0.1", "::1", "localhost"})


def _check_links(c: MddConference, key: str) -> None:
    """D25: a link names another MDD (not this conference's own address), once."""
    seen: dict[tuple[str, int], int] = {}
    for j, link in enumerate(c.link):
        where = f"{key}.link[{j}].peer"
        peer = link.peer
        _check(peer.port != 0, where, f"bad host:port {str(peer)!r}: port 0")
        own = peer.port == c.listen.port and (
            peer.host.lower() == c.listen.host.lower()
            or (c.listen.host in _WILDCARD_HOSTS and peer.host.lower() in _LOOPBACK_HOSTS)
        )
        _check(not own, where, f"{peer} is this conference's own listen address")
        addr = (peer.host.lower(), peer.port)
        _check(
            addr not in seen,
            where,
            f"{peer} is already the peer of {key}.link[{seen.get(addr)}] (one link per peer)",
        )
        seen[addr] = j


def _load_identity(
    cert: Path, key: Path, base: Path, cert_key: str, key_key: str
) -> tuple[Path, Path, _identity.Identity]:
    cert = base / cert
    key = base / key
    try:
        _identity.load_certificate(cert)
    except _identity.IdentityError as e:
        raise ConfigError(f"{cert_key}: {e}") from None
    try:
        ident = _identity.load(cert, key)
    except _identity.IdentityError as e:
        raise ConfigError(f"{key_key}: {e}") from None
    return cert, key, ident


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None


def _in_file(path: Path) -> Callable[[str], str]:
    return lambda key: f"{path}: {key}"


def load_kmf_config(path: str | Path) -> KmfConfig:
    """Load and check a KMF config file (see the module docstring for the schema)."""
    path = Path(path)
    data = _read_toml(path)
    where = _in_file(path)
    try:
        return build_kmf_config(data, base=path.resolve().parent, source=path)
    except ConfigError as e:
        raise ConfigError(where(str(e))) from None


def build_kmf_config(data: dict[str, Any], *, base: Path, source: Path | None = None) -> KmfConfig:
    """A KmfConfig from already-parsed TOML data; relative paths are relative to ``base``."""
    _check_role(data, "kmf", "mdd")
    # D28: `state = ""` keeps everything in memory; no other key takes an empty path.
    table = data.get("kmf")
    memory = False
    if isinstance(table, dict) and table.get("state") == "":
        memory = True
        data = {**data, "kmf": {k: v for k, v in table.items() if k != "state"}}
    raw = _structure(data, _KmfFile, lambda k: k)
    kmf = raw.kmf
    _check(bool(raw.conference), "conference", "at least one [[conference]] table is required")
    _check_unique_ids([c.id for c in raw.conference], "conference")
    _check_positive(kmf.handshake_timeout, "kmf.handshake_timeout")
    _check_positive(kmf.message_timeout, "kmf.message_timeout")
    for key in ("max_handshakes", "max_handshakes_per_ip", "max_pending_associations"):
        _check(getattr(kmf, key) >= 1, f"kmf.{key}", "must be at least 1")
    _check(bool(kmf.profiles), "kmf.profiles", "must list at least one profile")
    for i, p in enumerate(kmf.profiles):
        _check(
            p in DOUBLE_PROFILES,
            f"kmf.profiles[{i}]",
            f"unsupported profile {p:#06x}: perc runs "
            + " and ".join(f"0x{d:04X}" for d in DOUBLE_PROFILES)
            + " (D18)",
        )
    _check(len(set(kmf.profiles)) == len(kmf.profiles), "kmf.profiles", "duplicate profile")
    if kmf.tls_id is not None:
        _check(
            is_tls_id(kmf.tls_id),
            "kmf.tls_id",
            f"must be {TLS_ID_RULE}",
        )
    for i, c in enumerate(raw.conference):
        key = f"conference[{i}]"
        for fp, tls_id in c.tls_ids.items():
            _check(
                fp in c.participants,
                f"{key}.tls_ids",
                f"{fp} is not in this conference's participants",
            )
            _check(
                is_tls_id(tls_id),
                f"{key}.tls_ids",
                f"tls-id of {fp} must be {TLS_ID_RULE}",
            )
        _check(
            math.isfinite(c.rekey_window) and c.rekey_window >= 0,
            f"{key}.rekey_window",
            f"must be a number >= 0, got {c.rekey_window}",
        )
        _check(
            0 < c.ekt_ttl < 1 << 24,
            f"{key}.ekt_ttl",
            f"must be 1..16777215 seconds (uint24, RFC 8870 §5.2.2), got {c.ekt_ttl}",
        )
    cert, key_path, ident = _load_identity(kmf.cert, kmf.key, base, "kmf.cert", "kmf.key")
    # D28: the state and its key live beside the config file unless the file says otherwise.
    state = None if memory else base / (kmf.state or DEFAULT_STATE_FILE)
    state_key = base / (kmf.state_key or DEFAULT_STATE_KEY_FILE)
    return KmfConfig(
        kmf=attrs.evolve(
            kmf,
            cert=cert,
            key=key_path,
            state=state,
            state_key=state_key,
            admin_socket=None if kmf.admin_socket is None else base / kmf.admin_socket,
        ),
        conferences=raw.conference,
        identity=ident,
        source=source,
    )


def load_mdd_config(path: str | Path) -> MddConfig:
    """Load and check an MDD config file (see the module docstring for the schema)."""
    path = Path(path)
    data = _read_toml(path)
    try:
        return build_mdd_config(data, base=path.resolve().parent, source=path)
    except ConfigError as e:
        raise ConfigError(_in_file(path)(str(e))) from None


def build_mdd_config(
    data: dict[str, Any],
    *,
    base: Path,
    source: Path | None = None,
    rename: Callable[[str], str] = lambda k: k,
) -> MddConfig:
    """An MddConfig from already-parsed TOML data; relative paths are relative to ``base``."""
    _check_role(data, "mdd", "kmf")
    try:
        raw = _structure(data, _MddFile, lambda k: k)
        mdd = raw.mdd
        _check(bool(raw.conference), "conference", "at least one [[conference]] table is required")
        _check_unique_ids([c.id for c in raw.conference], "conference")
        _check_positive(mdd.idle_timeout, "mdd.idle_timeout")
        _check_positive(mdd.reconnect_min, "mdd.reconnect_min")
        _check_positive(mdd.reconnect_max, "mdd.reconnect_max")
        _check_positive(mdd.handshake_timeout, "mdd.handshake_timeout")
        _check_positive(mdd.stats_interval, "mdd.stats_interval")
        _check_positive(mdd.pending_timeout, "mdd.pending_timeout")
        _check(mdd.max_pending > 0, "mdd.max_pending", f"must be >= 1, got {mdd.max_pending}")
        _check(
            mdd.max_pending_per_ip > 0,
            "mdd.max_pending_per_ip",
            f"must be >= 1, got {mdd.max_pending_per_ip}",
        )
        _check(
            mdd.reconnect_max >= mdd.reconnect_min,
            "mdd.reconnect_max",
            "must be >= mdd.reconnect_min",
        )
        _check_workers(mdd.workers, "mdd.workers")
        listens: dict[tuple[str, int], int] = {}
        for i, c in enumerate(raw.conference):
            key = f"conference[{i}]"
            _check(c.kmf.port != 0, f"{key}.kmf", f"bad host:port {str(c.kmf)!r}: port 0")
            _check(
                c.max_associations > 0,
                f"{key}.max_associations",
                f"must be >= 1, got {c.max_associations}",
            )
            _check_positive(c.pli_rate, f"{key}.pli_rate")
            _check_positive(c.nack_rate, f"{key}.nack_rate")
            _check_positive(c.repair_rate, f"{key}.repair_rate")
            _check(
                c.repair_cache_ms > 0,
                f"{key}.repair_cache_ms",
                f"must be >= 1, got {c.repair_cache_ms}",
            )
            _check(
                c.repair_cache_packets > 0,
                f"{key}.repair_cache_packets",
                f"must be >= 1, got {c.repair_cache_packets}",
            )
            _check(
                0 <= c.frame_marking_id <= 14,
                f"{key}.frame_marking_id",
                f"must be 0..14, got {c.frame_marking_id}",
            )
            _check(
                c.keyframe_wait >= 0 and math.isfinite(c.keyframe_wait),
                f"{key}.keyframe_wait",
                f"must be >= 0, got {c.keyframe_wait}",
            )
            if c.last_n is not None:
                _check(c.last_n > 0, f"{key}.last_n", f"must be >= 1, got {c.last_n}")
            for pt in c.video_payload_types:
                _check(
                    0 <= pt <= 127,
                    f"{key}.video_payload_types",
                    f"payload type {pt} outside 0..127",
                )
            addr = (c.listen.host, c.listen.port)
            if c.listen.port != 0:  # port 0: each conference gets its own ephemeral port
                _check(
                    addr not in listens,
                    f"{key}.listen",
                    f"{c.listen} is already the listen address of conference[{listens.get(addr)}]",
                )
                listens[addr] = i
            _check_links(c, key)
        cert, key_path, ident = _load_identity(mdd.cert, mdd.key, base, "mdd.cert", "mdd.key")
    except ConfigError as e:
        key, _, problem = str(e).partition(": ")
        raise ConfigError(f"{rename(key)}: {problem}") from None
    return MddConfig(
        mdd=attrs.evolve(
            mdd,
            cert=cert,
            key=key_path,
            admin_socket=None if mdd.admin_socket is None else base / mdd.admin_socket,
        ),
        conferences=raw.conference,
        identity=ident,
        source=source,
    )


def _check_workers(workers: int, key: str) -> None:
    # Any number of workers serves [[conference.link]] too: each link is run by one worker,
    # and its peer's datagrams are steered to it (perc.workers).
    _check(workers >= 1, key, f"must be >= 1, got {workers}")


def with_workers(cfg: MddConfig, workers: int, key: str = "--workers") -> MddConfig:
    """``cfg`` with ``[mdd] workers`` replaced (the ``--workers`` option); checked as the
    config file's value is (:class:`ConfigError` naming ``key``)."""
    _check_workers(workers, key)
    return attrs.evolve(cfg, mdd=attrs.evolve(cfg.mdd, workers=workers))


#: Config keys of the MDD quick form and the CLI options that set them.
_QUICK_OPTIONS = {
    "conference[0].kmf": "--kmf",
    "conference[0].kmf_fingerprint": "--kmf-fingerprint",
    "conference[0].listen": "--listen",
    "conference[0].id": "--conference",
    "mdd.cert": "--cert",
    "mdd.key": "--key",
    "mdd.idle_timeout": "--idle-timeout",
}


def mdd_quick_config(
    *,
    kmf: str,
    kmf_fingerprint: str,
    listen: str,
    cert: str | Path,
    key: str | Path,
    conference: str = "demo",
    idle_timeout: float | None = None,
    base: Path | None = None,
) -> MddConfig:
    """The MDD quick form: one conference from command-line values (errors name the option).

    ``perc mdd --kmf HOST:PORT --kmf-fingerprint FP --listen HOST:PORT --cert F --key F
    [--conference ID]``; relative paths are relative to ``base`` (default: the current folder).
    """
    mdd: dict[str, Any] = {"cert": str(cert), "key": str(key)}
    if idle_timeout is not None:
        mdd["idle_timeout"] = idle_timeout
    data = {
        "mdd": mdd,
        "conference": [
            {
                "id": conference,
                "listen": listen,
                "kmf": kmf,
                "kmf_fingerprint": kmf_fingerprint,
            }
        ],
    }
    return build_mdd_config(
        data,
        base=base if base is not None else Path.cwd(),
        rename=lambda k: _QUICK_OPTIONS.get(k, k),
    )


def _option_error(option: str) -> Callable[[str], ConfigError]:
    return lambda problem: ConfigError(f"{option}: {problem}")


def endpoint_config(*, mdd: str, kmf_fingerprint: str, **options: Any) -> EndpointConfig:
    """``perc endpoint``'s options checked into an :class:`EndpointConfig`.

    ``options`` are the other keys of :class:`EndpointConfig` (missing ones take its
    defaults). Any problem raises :class:`ConfigError` naming the option (``--mdd: ...``).
    """
    try:
        address = parse_host_port(mdd)
    except ValueError as e:
        raise _option_error("--mdd")(str(e)) from None
    if address.port == 0:
        raise _option_error("--mdd")(f"port 0 in {mdd!r} is not an address to send to")
    try:
        fingerprint = Fingerprint(_identity.parse_fingerprint(kmf_fingerprint))
    except _identity.IdentityError as e:
        raise _option_error("--kmf-fingerprint")(str(e)) from None
    for key in ("tls_id", "kmf_tls_id"):
        value = options.get(key)
        if value is not None and not is_tls_id(value):
            raise _option_error("--" + key.replace("_", "-"))(
                f"bad tls-id {value!r}: {TLS_ID_RULE}"
            )
    for key in ("join_timeout", "duration"):
        value = options.get(key)
        if value is not None and not 0 < value < 1e9:
            raise _option_error("--" + key.replace("_", "-"))(
                "must be a positive number of seconds"
            )
    for key in ("keepalive", "rejoin_silence", "silence_limit"):
        value = options.get(key)
        if value is not None and not 0 <= value < 1e9:
            raise _option_error("--" + key.replace("_", "-"))(
                "must be 0 (off) or a positive number of seconds"
            )
    name = options.get("name")
    if name is not None and (not name or not name.isprintable() or any(c.isspace() for c in name)):
        # It goes into key=value log lines: one printable word.
        raise _option_error("--name")(f"{name!r} must be one printable word (no spaces)")
    media = options.get("media")
    if media is not None and media not in ENDPOINT_MEDIA:
        raise _option_error("--media")(f"one of {', '.join(ENDPOINT_MEDIA)}, not {media!r}")
    expect = options.get("expect_peers")
    if expect is not None and expect < 0:
        raise _option_error("--expect-peers")(f"must be >= 0, got {expect}")
    codec = options.get("codec")
    if codec is not None and codec not in ENDPOINT_CODECS:
        raise _option_error("--codec")(f"one of {', '.join(ENDPOINT_CODECS)}, not {codec!r}")
    files = {k: options.get(f"{k}_file") is not None for k in ("audio", "video")}
    if any(files.values()):
        # An input file means real media, and, unless --media says, the kinds it names.
        if codec == "synthetic":
            raise _option_error("--codec")("synthetic payloads cannot come from a file")
        options["codec"] = "real"
        if media is None:
            both = all(files.values())
            options["media"] = "both" if both else ("audio" if files["audio"] else "video")
        else:
            for kind, named in files.items():
                if named and media not in (kind, "both"):
                    raise _option_error(f"--{kind}-file")(f"--media {media} sends no {kind}")
    for key in ("cert", "key", "report", "audio_file", "video_file", "record"):
        if options.get(key) is not None:
            options[key] = Path(options[key])
    given = {k: v for k, v in options.items() if v is not None}
    try:
        return EndpointConfig(mdd=address, kmf_fingerprint=fingerprint, **given)
    except TypeError as e:  # an unknown or missing key: a programming error, said plainly
        raise ConfigError(f"endpoint settings: {e}") from None
