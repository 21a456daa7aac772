"""What ``perc demo`` shows and how it judges: the live table, the summary and the verdict.

Sans-IO: everything here takes what the demo gathered (each endpoint's JSON ``--report``, exit
statuses, error lines) as plain values, so it is tested without processes.

**Verdict** (:func:`verdict`). The demo passes only if every endpoint process (the leaver's
first life and the rejoined process included) verified media from every other participant,
the others verified the rejoined process's new streams, no endpoint counted an end-to-end or
payload failure, the leave and the rejoin each produced a new EKTKey that every remaining
endpoint switched to, every process exited 0, and the MDD reported that no end-to-end code
was loaded in it. Every end-to-end failure counts, on named streams and on streams that never
verified ("unattributed") alike. What the reports keep apart from failures is shown, not
judged: ``pre_join`` (a (re)joiner by design cannot read media protected under keys from
before it joined, RFC 8871 §4.5.2), ``early`` (packets that overtook the EKT tag announcing
their key) and ``key_wait`` (packets that waited for an EKTKey that arrived late; RFC 8870
§4.3.2 drops them unchecked).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TextIO

import attrs

from perc.demo import join_names

__all__ = [
    "HEADER",
    "HEADER_MDD",
    "EndpointOutcome",
    "RoleOutcome",
    "Screen",
    "endpoint_summary",
    "fail_lines",
    "pass_line",
    "sums",
    "table_row",
    "verdict",
    "verified_peers",
]

Report = Mapping[str, Any]

HEADER = (
    f"{'endpoint':<10} {'state':<9} {'peers':>5} {'sent':>6} {'received':>8} {'verified':>8}"
    f" {'hbh-fail':>8} {'e2e-fail':>8} {'spi':>6}"
)
#: The header with the MDD column (``perc demo --mdds M``, M > 1).
HEADER_MDD = f"{'mdd':<5} " + HEADER


def as_int(value: object) -> int:
    """``value`` if it is an int (not a bool), else 0: reports are read, not trusted."""
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def int_or_none(text: str | None) -> int | None:
    return int(text) if text is not None and text.isdigit() else None


def plural(count: int | str | None, word: str) -> str:
    return f"{count} {word}" + ("" if str(count) == "1" else "s")


def strip_error(line: str | None) -> str | None:
    """The message of a ``perc: error:`` line."""
    return line.removeprefix("perc: error:").strip() if line else None


def peers(report: Report | None) -> dict[str, dict[str, Any]]:
    found = report.get("peers") if report else None
    if not isinstance(found, dict):
        return {}
    return {str(k): v for k, v in found.items() if isinstance(v, dict)}


def verified_peers(report: Report | None) -> set[str]:
    return {name for name, p in peers(report).items() if as_int(p.get("verified")) > 0}


def sums(report: Report | None) -> dict[str, int]:
    """Counters summed over the report's peers, plus the unattributed ones."""
    keys = ("received", "verified", "hbh_failures", "e2e_failures", "payload_failures", "key_wait")
    out = dict.fromkeys((*keys, "unattributed_e2e", "early", "pre_join"), 0)
    if report is None:
        return out
    for peer in peers(report).values():
        for k in keys:
            out[k] += as_int(peer.get(k))
    un = report.get("unattributed")
    if isinstance(un, dict):
        out["unattributed_e2e"] = as_int(un.get("e2e_failures"))
        out["key_wait"] += as_int(un.get("key_wait"))
        out["early"] = as_int(un.get("early"))
        out["pre_join"] = as_int(un.get("pre_join"))
    return out


def own_ssrcs(report: Report) -> set[str]:
    """The SSRCs an endpoint sent on (its 'streams' if it lists them, else its 'ssrc')."""
    streams = report.get("streams")
    out: set[str] = set()
    if isinstance(streams, dict):
        out = {str(s["ssrc"]) for s in streams.values() if isinstance(s, dict) and "ssrc" in s}
    if not out and "ssrc" in report:
        out = {str(report["ssrc"])}
    return out


def table_row(
    label: str,
    state: str,
    report: Report | None,
    spi: int | None,
    others: int,
    *,
    mdd: str | None = None,
) -> str:
    """One endpoint's row under :data:`HEADER` (with ``mdd``: under :data:`HEADER_MDD`, the
    endpoint's MDD first); ``spi`` None: the report's latest."""
    s = sums(report)
    if spi is None and report and isinstance(report.get("spis"), list) and report["spis"]:
        spi = as_int(report["spis"][-1])
    return (f"{mdd:<5} " if mdd is not None else "") + (
        f"{label:<10} {state:<9} {len(verified_peers(report)):>2}/{others:<2} "
        f"{as_int(report.get('sent')) if report else 0:>6} {s['received']:>8} {s['verified']:>8} "
        f"{s['hbh_failures']:>8} {s['e2e_failures']:>8} {spi if spi is not None else '-':>6}"
    )


@attrs.frozen
class EndpointOutcome:
    """One endpoint *process* at the end of the run (a rejoin is a new one, same name)."""

    name: str
    life: int
    stays: bool
    """It left by itself (--duration); False: the demo stopped it (the leaver)."""
    joined: bool
    exit_code: int | None
    error: str | None
    """Its ``perc: error:`` message, if it printed one."""
    report: Report | None

    @property
    def label(self) -> str:
        return self.name if self.life == 1 else f"{self.name}#{self.life}"


@attrs.frozen
class RoleOutcome:
    """The KMF or the MDD process at the end of the run."""

    label: str
    exit_code: int | None
    error: str | None


def _endpoint_problems(
    ep: EndpointOutcome, names: Sequence[str], rejoined: EndpointOutcome | None
) -> list[str]:
    code, error, report = ep.exit_code, ep.error, ep.report
    if not ep.joined:
        return [f"never joined (exit {code}: {error or 'no error line'})"]
    problems: list[str] = []
    missing = sorted(set(names) - {ep.name} - verified_peers(report))
    if report is None:
        problems.append("wrote no report")
    elif missing:
        problems.append(f"verified no media from {join_names(missing)}")
    s = sums(report)
    if s["e2e_failures"] or s["unattributed_e2e"]:
        problems.append(f"{s['e2e_failures'] + s['unattributed_e2e']} end-to-end failures")
    if s["payload_failures"]:
        problems.append(f"{s['payload_failures']} payload failures")
    if rejoined is not None and ep is not rejoined and ep.life == 1 and ep.stays:
        new_ssrcs = own_ssrcs(rejoined.report) if rejoined.report else set()
        streams = peers(report).get(rejoined.name, {}).get("streams", {})
        got = {
            str(k) for k, v in streams.items()
            if isinstance(v, dict) and as_int(v.get("verified")) > 0
        } if isinstance(streams, dict) else set()  # fmt: skip
        if new_ssrcs - got:
            problems.append(
                f"verified nothing from the rejoined {rejoined.name}'s stream(s) "
                + ", ".join(sorted(new_ssrcs - got))
            )
    # Exit 8 (too few peers verified) is already said by "verified no media".
    if code not in (0, None) and not (code == 8 and missing):
        problems.append(f"exit {code}: {error or 'no error line'}")
    return problems


def verdict(
    names: Sequence[str],
    endpoints: Sequence[EndpointOutcome],
    *,
    leaver: str,
    rekeys: Mapping[str, int],
    interrupted: bool,
    roles: Sequence[RoleOutcome] = (),
    isolation: str | None = None,
) -> list[str]:
    """Every reason the run is not a success (see the module docstring); [] is a pass.

    One line per endpoint process with everything wrong with it, then the rest. ``rekeys``
    maps ``leave``/``rejoin`` to the SPI of the KMF's new EKTKey; ``isolation`` is the MDD's
    ``key isolation: ...`` text (None: not seen).
    """
    failures: list[str] = []
    rejoined = next((ep for ep in endpoints if ep.life > 1), None)
    for ep in endpoints:
        problems = _endpoint_problems(ep, names, rejoined)
        if problems:
            failures.append(f"{ep.label}: " + "; ".join(problems))
    first_life = next((ep for ep in endpoints if ep.name == leaver), None)
    leave_spi = rekeys.get("leave")
    if first_life is not None and first_life.report is not None and leave_spi is not None:
        spis = first_life.report.get("spis")
        if isinstance(spis, list) and leave_spi in spis:
            failures.append(f"{leaver} left, yet holds the EKTKey made for its leave")
    if not interrupted:  # else the run stopped early: no news in these
        if rejoined is None:
            failures.append(f"{leaver} never rejoined")
        for what in ("leave", "rejoin"):
            if what not in rekeys:
                failures.append(f"no rekey was seen for the {what}")
    for role in roles:
        if role.exit_code not in (0, None):
            failures.append(
                f"perc {role.label} exited with status {role.exit_code}: "
                f"{role.error or 'no error line'}"
            )
    if isolation is not None and "loaded: none" not in isolation:
        failures.append(f"MDD: {isolation}")
    return failures


def endpoint_summary(ep: EndpointOutcome) -> str:
    """The summary line of one endpoint process: what it sent, verified and failed."""
    report = ep.report
    if not ep.joined or report is None:
        return f"  {ep.label:<9} never joined"
    parts = [
        f"{peer} {as_int(p.get('verified'))}/{as_int(p.get('received'))}"
        for peer, p in sorted(peers(report).items())
    ]
    s = sums(report)
    raw_spis = report.get("spis")
    spis = raw_spis if isinstance(raw_spis, list) else []
    extra = ""
    if s["unattributed_e2e"]:
        extra += f"; {s['unattributed_e2e']} e2e failures on streams that never verified"
    if s["key_wait"] or s["early"]:
        extra += (
            f"; {s['key_wait'] + s['early']} packets arrived before their key did "
            "(dropped unchecked, RFC 8870 §4.3.2)"
        )
    if s["pre_join"]:
        extra += f"; {s['pre_join']} packets sealed before it joined (unreadable by design)"
    return (
        f"  {ep.label:<9} sent {as_int(report.get('sent'))}; verified/received from "
        f"{', '.join(parts) or 'nobody'}; failures hbh {s['hbh_failures']} "
        f"e2e {s['e2e_failures']}; SPIs {' > '.join(str(x) for x in spis)}{extra}"
    )


def fail_lines(failures: Sequence[str]) -> list[str]:
    """``FAIL: first reason`` and the other reasons aligned under it."""
    return ["FAIL: " + failures[0], *("      " + reason for reason in failures[1:])]


def pass_line(leaver: str, rekeys: Mapping[str, int]) -> str:
    return (
        f"PASS: every endpoint verified every other end to end (the rejoined {leaver} too), "
        f"zero end-to-end failures; the leave and the rejoin each rekeyed (SPI "
        f"{rekeys['leave']}, then {rekeys['rejoin']}), every remaining endpoint switched, and "
        f"{leaver} never held the key made for its leave."
    )


class Screen:
    """Events as lines; the table redrawn in place on a terminal, printed as lines otherwise."""

    def __init__(
        self, out: TextIO, tty: bool, t0: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.out = out
        self.tty = tty
        self.t0 = t0
        self.clock = clock
        self.drawn = 0
        self.rows: list[str] = []
        self.header_shown = False

    def stamp(self) -> str:
        return f"[{self.clock() - self.t0:5.1f}s]"

    def _erase(self) -> None:
        if self.drawn:
            # Cursor up to the table's first line, clear to the end of the screen.
            self.out.write(f"\x1b[{self.drawn}F\x1b[J")
            self.drawn = 0

    def _draw(self) -> None:
        for row in self.rows:
            self.out.write(row + "\n")
        self.drawn = len(self.rows)

    def say(self, text: str = "", *, stamp: bool = False) -> None:
        if self.tty:
            self._erase()
        self.out.write((f"{self.stamp()} " if stamp else "") + text + "\n")
        if self.tty:
            self._draw()
        self.out.flush()

    def table(self, rows: list[str]) -> None:
        if self.tty:
            self._erase()
            self.rows = rows
            self._draw()
        else:
            stamp = self.stamp()
            if not self.header_shown:
                self.out.write(f"{' ' * len(stamp)} {rows[0]}\n")
                self.header_shown = True
            for row in rows[1:]:  # the header only once
                self.out.write(f"{stamp} {row}\n")
        self.out.flush()

    def freeze(self) -> None:
        """Leave the last table on the screen; later output goes below it."""
        self.drawn = 0
        self.rows = []
