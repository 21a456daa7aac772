"""SRTP speed: perc's AES-GCM SrtpSession against pylibsrtp (libsrtp) in the same run.

Run: ``.venv/bin/python bench/srtp.py`` (or ``bash dev.sh bench srtp``). Options:
``--packets N`` (per timed run, default 20000), ``--repeats R`` (best of R, default 7),
``--only TEXT[,TEXT]`` (rows whose name contains a TEXT), ``--check`` (exit 1 if a row misses
its target), ``--quick`` (50 packets, 1 repeat: a smoke run).

Method (bench/harness.py): every row has two factories, ``ours`` and ``baseline``. A factory
builds fresh state (sessions, input packets) and returns a zero-argument runner that processes
``N`` packets; only the runner is timed. Baseline and ours alternate, R times each, and the
best (minimum) time of each is reported per packet, with the ratio ours / baseline and the
row's target. Fresh state per run is needed because both implementations refuse to protect
the same index twice.

Adding rows (e.g. the double transform and the Media Distributor hop): put a module
``bench/srtp_rows_<name>.py`` next to this script defining ``rows(n: int) -> list[Row]``; this
script imports every such module and appends its rows. It can ``from srtp import Row,
rtp_packets, libsrtp_session`` (bench/ is on sys.path when a script in it runs).
"""

from __future__ import annotations

import importlib
import os
import pathlib
import struct
import sys
from dataclasses import dataclass

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

import harness
from harness import Factory, Runner
from pylibsrtp import Policy, Session

from perc.srtp.context import SrtpSession

PROFILES = {
    128: Policy.SRTP_PROFILE_AEAD_AES_128_GCM,
    256: Policy.SRTP_PROFILE_AEAD_AES_256_GCM,
}


@dataclass(frozen=True)
class Row:
    """One line of the table: ``ours`` against ``baseline`` at ``size`` payload bytes."""

    name: str
    size: int
    ours: Factory
    baseline: Factory
    target: float  # the largest acceptable ours / baseline ratio
    baseline_name: str = "pylibsrtp"


def rtp_packets(
    n: int,
    size: int,
    *,
    ssrc: int = 0x5501A0B2,
    first_seq: int = 1000,
    header_extension: bool = False,
) -> list[bytes]:
    """``n`` RTP packets with consecutive SEQs (wrapping past 65535) and ``size``-byte payloads."""
    out = []
    payload = bytes(range(256)) * (size // 256 + 1)
    payload = payload[:size]
    for i in range(n):
        seq = (first_seq + i) & 0xFFFF
        b0 = 0x90 if header_extension else 0x80
        hdr = struct.pack("!BBHII", b0, 96, seq, 160 * i & 0xFFFFFFFF, ssrc)
        if header_extension:
            hdr += b"\xbe\xde\x00\x01\x10\xaa\x00\x00"  # RFC 8285 one-byte form, one element
        out.append(hdr + payload)
    return out


def libsrtp_session(key: bytes, salt: bytes, *, outbound: bool) -> Session:
    """A pylibsrtp session for any SSRC; pylibsrtp's key is master key || 12-byte salt."""
    policy = Policy(
        key=key + salt,
        ssrc_type=Policy.SSRC_ANY_OUTBOUND if outbound else Policy.SSRC_ANY_INBOUND,
        srtp_profile=PROFILES[8 * len(key)],
    )
    return Session(policy)


def single_layer_rows(n: int) -> list[Row]:
    """Single-layer protect and unprotect, AES-128 and AES-256 GCM, 160 and 1200 bytes."""
    rows = []
    for bits in (128, 256):
        key = os.urandom(bits // 8)
        salt = os.urandom(12)
        for size in (160, 1200):
            plain = rtp_packets(n, size)
            ref = libsrtp_session(key, salt, outbound=True)
            protected = [ref.protect(p) for p in plain]

            def ours_protect(
                plain: list[bytes] = plain, key: bytes = key, salt: bytes = salt
            ) -> Runner:
                f = SrtpSession(key, salt).protect_rtp
                return lambda: [f(p) for p in plain]

            def lib_protect(
                plain: list[bytes] = plain, key: bytes = key, salt: bytes = salt
            ) -> Runner:
                f = libsrtp_session(key, salt, outbound=True).protect
                return lambda: [f(p) for p in plain]

            def ours_unprotect(
                data: list[bytes] = protected, key: bytes = key, salt: bytes = salt
            ) -> Runner:
                f = SrtpSession(key, salt).unprotect_rtp
                return lambda: [f(p) for p in data]

            def lib_unprotect(
                data: list[bytes] = protected, key: bytes = key, salt: bytes = salt
            ) -> Runner:
                f = libsrtp_session(key, salt, outbound=False).unprotect
                return lambda: [f(p) for p in data]

            rows.append(Row(f"SRTP protect AES-{bits}-GCM", size, ours_protect, lib_protect, 1.3))
            rows.append(
                Row(f"SRTP unprotect AES-{bits}-GCM", size, ours_unprotect, lib_unprotect, 1.3)
            )
    # SRTCP: shown for information, with the SRTP rows' target of 1.3.
    key, salt = os.urandom(16), os.urandom(12)
    rtcp = struct.pack("!BBHI", 0x80, 200, 6, 0x5501A0B2) + bytes(20)

    def ours_rtcp() -> Runner:
        f = SrtpSession(key, salt).protect_rtcp
        return lambda: [f(rtcp) for _ in range(n)]

    def lib_rtcp() -> Runner:
        f = libsrtp_session(key, salt, outbound=True).protect_rtcp
        return lambda: [f(rtcp) for _ in range(n)]

    ref = libsrtp_session(key, salt, outbound=True)
    srtcp = [ref.protect_rtcp(rtcp) for _ in range(n)]

    def ours_srtcp() -> Runner:
        f = SrtpSession(key, salt).unprotect_rtcp
        return lambda: [f(p) for p in srtcp]

    def lib_srtcp() -> Runner:
        f = libsrtp_session(key, salt, outbound=False).unprotect_rtcp
        return lambda: [f(p) for p in srtcp]

    rows.append(Row("SRTCP protect AES-128-GCM", len(rtcp) - 8, ours_rtcp, lib_rtcp, 1.3))
    rows.append(Row("SRTCP unprotect AES-128-GCM", len(rtcp) - 8, ours_srtcp, lib_srtcp, 1.3))
    return rows


def measure(row: Row, n: int, repeats: int) -> tuple[float, float]:
    """Best-of-``repeats`` microseconds per packet for (ours, baseline), runs alternating."""
    best = harness.best_of({"baseline": row.baseline, "ours": row.ours}, repeats)
    return harness.us_per(best["ours"], n), harness.us_per(best["baseline"], n)


def extra_rows(n: int) -> list[Row]:
    """Rows from ``bench/srtp_rows_*.py`` modules (each defines ``rows(n) -> list[Row]``)."""
    here = pathlib.Path(__file__).resolve().parent
    if str(here) not in sys.path:
        sys.path.insert(0, str(here))
    out: list[Row] = []
    for path in sorted(here.glob("srtp_rows_*.py")):
        module = importlib.import_module(path.stem)
        out.extend(module.rows(n))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = harness.parser(__doc__, repeats=7, check=True)
    parser.add_argument("--packets", type=int, default=20000)
    parser.add_argument("--only", default="")
    args = harness.parse(parser, argv, quick={"packets": 50})
    n = args.packets
    only = args.only.split(",")
    rows = [r for r in single_layer_rows(n) + extra_rows(n) if any(o in r.name for o in only)]
    harness.print_machine()
    print(f"best of {args.repeats} runs of {n} packets each; times in microseconds per packet")
    table = harness.Table(
        ("row", "<34"),
        ("bytes", ">5"),
        ("perc", ">8.3f"),
        ("baseline", ">9.3f"),
        ("ratio", ">6.2f"),
        ("target", ">6.2f"),
        (" ok", "<4"),
        ("baseline is", ""),
    )
    table.header()
    failed = 0
    for row in rows:
        ours, base = measure(row, n, args.repeats)
        ratio = ours / base
        ok = ratio <= row.target
        failed += not ok
        table.row(
            row.name,
            row.size,
            ours,
            base,
            ratio,
            row.target,
            " yes" if ok else " NO",
            row.baseline_name,
        )
    return 1 if (args.check and failed) else 0


if __name__ == "__main__":
    sys.exit(main())
