"""``perc demo``: its plan, its settings and its throwaway files (no processes, no trio).

Theory of operation
-------------------
The demo is an orchestrator: it runs no protocol code itself. It makes throwaway identities
and config files in a temporary folder (:func:`make_demo_files`: a KMF whose conference
roster lists every participant, rekey on join and on leave; :func:`write_mdd_config`: an MDD
with one UDP port and a tunnel to the KMF), then :mod:`perc.roles.demo` starts every role as
a separate process through the same CLI a user runs (``sys.executable -m perc ...``):

1. ``perc kmf`` and ``perc mdd``; the MDD's TLS tunnel to the KMF comes up (pinned both ways).
2. N ``perc endpoint`` processes, each with ``--media``, ``--expect-peers N-1`` and
   ``--report FILE`` (a JSON report the endpoint rewrites every second and at exit). Each joins
   through the MDD (DTLS-SRTP with the KMF inside the tunnel), gets the conference's EKTKey and
   sends double-encrypted media that the MDD forwards to everyone else, touching only the
   hop-by-hop layer; every receiver verifies every packet end to end.
3. Halfway, the last endpoint gets SIGTERM: it sends RTCP BYE and DTLS close_notify, the KMF
   makes a new EKTKey (RFC 8871 §4.5.2, D22) for the others only, and they switch to it. Then
   a new process with the same identity rejoins; the KMF makes another key, sent to everyone.
4. At the end the endpoints leave (``--duration``), the MDD and the KMF get SIGTERM and log
   their exit counters; the demo judges (:func:`perc.demo_report.verdict`) from the endpoints'
   reports, the processes' exit statuses and their logs.

**Robustness.** Every child is reaped on every path: SIGTERM, :data:`STOP_GRACE`, then
SIGKILL. Each step has a deadline and the whole run has one, so the demo never hangs;
SIGINT/SIGTERM to the demo stop it the same way (exit 130). ``--keep`` (or
``PERC_DEMO_KEEP=1``) keeps the folder with the configs, the reports and each process's log.
``PERC_DEMO_FAULT=outsider`` leaves the first participant's certificate off the roster: the
KMF refuses it (access_denied) and the demo must fail.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import attrs

from perc import identity

__all__ = [
    "DEFAULT_DURATION",
    "DEFAULT_MEDIA",
    "DEFAULT_PARTICIPANTS",
    "MEDIA_CHOICES",
    "MEDIA_TEXT",
    "NAMES",
    "DemoFiles",
    "check_arguments",
    "join_names",
    "make_demo_files",
    "mdd_names",
    "write_mdd_config",
]

DEFAULT_PARTICIPANTS = 3
DEFAULT_DURATION = 12.0
DEFAULT_MEDIA = "both"
MEDIA_CHOICES = ("audio", "video", "both")
MEDIA_TEXT = {"audio": "audio", "video": "video", "both": "audio and video"}
#: Participant names, in order (one printable word each: they go into key=value log lines).
NAMES = (
    "alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi", "ivan", "judy",
    "kim", "leo", "mallory", "nick", "olivia", "peggy", "quinn", "rupert", "sybil", "trent",
    "uma", "victor", "walter", "xena", "yves", "zoe",
)  # fmt: skip
#: The shortest run in which the leave, the rekey and the rejoin still fit.
MIN_DURATION = 4.0
#: The conference's rekey window (D22): short, so a join takes ~0.2 s, yet a burst of joins
#: (all endpoints start together) still shares one new key.
REKEY_WINDOW = 0.2
#: Most MDDs the demo chains (``--mdds``).
MAX_MDDS = 8
#: Known values of PERC_DEMO_FAULT.
FAULTS = ("outsider",)

#: Deadlines (seconds). A step that takes longer fails the demo with its reason.
START_TIMEOUT = 20.0
"""KMF listening, MDD tunnel up, every endpoint joined (Python start-up on a busy machine)."""
REKEY_TIMEOUT = 5.0
"""After a leave or rejoin: the KMF's new EKTKey and every remaining endpoint on it."""
STOP_GRACE = 5.0
"""After SIGTERM (or after an endpoint's --duration), before SIGKILL."""
MIN_REJOIN_STAY = 3.0
"""The rejoined endpoint stays at least this long (to verify everyone and be verified)."""
OVERALL_SLACK = 90.0
"""The whole run ends by duration + this, whatever happens."""
REFRESH = 1.0
"""Seconds between table refreshes."""


def check_arguments(
    participants: int, duration: float, media: str, fault: str | None, mdds: int = 1
) -> str | None:
    """The problem with the demo's arguments (one line naming the option), or None."""
    if not 1 <= mdds <= MAX_MDDS or mdds > participants:
        return f"--mdds: 1 to {MAX_MDDS} MDDs, at most one per participant"
    if not 2 <= participants <= len(NAMES):
        return f"--participants: a conference here has 2 to {len(NAMES)} participants"
    if not (math.isfinite(duration) and duration >= MIN_DURATION):
        return f"--duration: at least {MIN_DURATION:g} seconds (the leave and rejoin must fit)"
    if media not in MEDIA_CHOICES:
        return f"--media: one of {', '.join(MEDIA_CHOICES)}"
    if fault is not None and fault not in FAULTS:
        return f"PERC_DEMO_FAULT: only 'outsider' is known, not {fault!r}"
    return None


def join_names(names: Sequence[str]) -> str:
    """``a``, ``a and b``, ``a, b and c``; ``nobody`` for none."""
    if len(names) <= 1:
        return "".join(names) or "nobody"
    return ", ".join(names[:-1]) + " and " + names[-1]


@attrs.frozen
class DemoFiles:
    """The temporary folder's contents."""

    folder: Path
    kmf_config: Path
    kmf_fingerprint: str
    mdd_fingerprint: str
    names: tuple[str, ...]
    on_roster: tuple[str, ...]
    mdd_fingerprints: tuple[str, ...] = ()
    """Every MDD's, in chain order (the first is ``mdd_fingerprint``)."""

    @property
    def mdd_names(self) -> tuple[str, ...]:
        return mdd_names(max(1, len(self.mdd_fingerprints)))

    def mdd_of(self, name: str) -> int:
        """Which MDD (index in the chain) an endpoint uses: spread round robin."""
        return self.names.index(name) % max(1, len(self.mdd_fingerprints))


def mdd_names(mdds: int) -> tuple[str, ...]:
    """``mdd`` for one MDD; ``mdd1`` .. ``mddM`` for a chain of M (``--mdds``)."""
    return ("mdd",) if mdds == 1 else tuple(f"mdd{i}" for i in range(1, mdds + 1))


def make_demo_files(
    folder: Path,
    names: Sequence[str] = NAMES[:2],
    *,
    outsiders: Sequence[str] = (),
    mdds: int = 1,
) -> DemoFiles:
    """Identities (kmf, mdd, each name) and kmf.toml for one loopback conference.

    Every name is on the conference roster except ``outsiders`` (their certificates exist,
    but the KMF does not know them). The KMF listens on port 0 (the kernel picks a free one:
    no race with other programs); :func:`write_mdd_config` is called once its port is known.
    """
    chain = mdd_names(mdds)
    idents = {name: identity.generate(name) for name in ("kmf", *chain, *names)}
    for name, ident in idents.items():
        identity.write(ident, folder, name)
    roster = tuple(n for n in names if n not in outsiders)
    participants = ",\n    ".join(f'"{idents[n].fingerprint}",  # {n}' for n in roster)
    kmf_toml = folder / "kmf.toml"
    kmf_toml.write_text(
        f"""# perc demo: the Key Distributor (throwaway identities, loopback only)
[kmf]
listen = "127.0.0.1:0"
cert = "kmf.crt"
key = "kmf.key"
trusted_mdds = [{", ".join(f'"{idents[m].fingerprint}"' for m in chain)}]

[[conference]]
id = "demo"
participants = [
    {participants}
]
rekey_on_join = true
rekey_on_leave = true
rekey_window = {REKEY_WINDOW}
"""
    )
    return DemoFiles(
        folder=folder,
        kmf_config=kmf_toml,
        kmf_fingerprint=idents["kmf"].fingerprint,
        mdd_fingerprint=idents[chain[0]].fingerprint,
        names=tuple(names),
        on_roster=roster,
        mdd_fingerprints=tuple(idents[m].fingerprint for m in chain),
    )


def write_mdd_config(
    files: DemoFiles, kmf_port: int, index: int = 0, ports: Sequence[int] = ()
) -> Path:
    """mdd.toml: one conference on a kernel-chosen UDP port, its tunnel to the KMF's port.

    With several MDDs (``ports``: each one's UDP port, in chain order) MDD ``index`` listens
    on its port and has a cascade link (D25) to its neighbours in the chain, dialing the next.
    """
    name = files.mdd_names[index]
    mdd_toml = files.folder / f"{name}.toml"
    listen = ports[index] if ports else 0
    links = ""
    for j in (index - 1, index + 1):
        if ports and 0 <= j < len(ports):
            links += f"""
[[conference.link]]                # the next MDD of the chain
peer = "127.0.0.1:{ports[j]}"
fingerprint = "{files.mdd_fingerprints[j]}"
connect = {"true" if j > index else "false"}
"""
    mdd_toml.write_text(
        f"""# perc demo: the Media Distributor
[mdd]
cert = "{name}.crt"
key = "{name}.key"
stats_interval = 5.0

[[conference]]
id = "demo"
listen = "127.0.0.1:{listen}"
kmf = "127.0.0.1:{kmf_port}"
kmf_fingerprint = "{files.kmf_fingerprint}"
{links}"""
    )
    return mdd_toml


def endpoint_arguments(
    files: DemoFiles,
    name: str,
    *,
    mdd_port: int,
    media: str,
    report: Path,
    duration: float | None,
) -> list[str]:
    """``perc endpoint`` arguments of one participant's process."""
    args = [
        "endpoint",
        "--mdd", f"127.0.0.1:{mdd_port}",
        "--cert", str(files.folder / f"{name}.crt"),
        "--key", str(files.folder / f"{name}.key"),
        "--kmf-fingerprint", files.kmf_fingerprint,
        "--name", name,
        "--media", media,
        "--expect-peers", str(len(files.names) - 1),
        "--report", str(report),
        "--join-timeout", f"{START_TIMEOUT:g}",
    ]  # fmt: skip
    if duration is not None:
        args += ["--duration", f"{duration:.3f}"]
    return args
