"""Every benchmark in bench/ runs, with tiny parameters, as part of the test suite.

A bench that nobody runs rots (an API it calls changes, a config file it reads moves). Each
script runs here as a subprocess with ``--quick`` (bench/harness.py: tiny counts, short
steps), warnings as errors, and must exit 0, print the machine line, print no traceback, and
print its table's rows and its ``ratio X / Y  N.NN`` (or summary) lines. No timing is
asserted: on a loaded machine the numbers mean nothing, and that is not what is tested.

The benches that start real ``perc`` processes (cascade, forwarding, join_storm,
metrics_scrape, rekey, tunnel_relay) are marked slow like the other whole-system tests.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
#: Not a bench: the shared harness.
LIBRARIES = {"harness"}
RATIO = r"  \d+\.\d\d"  # the value on a ratio line
#: a ratio that is a difference of two noisy measurements: may come out negative, or nan
#: when a quick run has nothing to subtract from
SIGNED_RATIO = r"  (-?\d+\.\d\d|nan)"
NUMBER = r"\s+[\d.,]+"

#: bench name -> (extra arguments after --quick, lines that must appear (regular expressions))
EXPECTED: dict[str, tuple[list[str], list[str]]] = {
    "srtp": (
        [],
        [
            rf"^SRTP protect AES-128-GCM\s+160{NUMBER}",
            rf"^SRTP unprotect AES-256-GCM\s+1200{NUMBER}",
            rf"^SRTCP unprotect AES-128-GCM{NUMBER}",
            rf"^MD hop AES-128-GCM\s+160{NUMBER}",  # the rows of srtp_rows_double.py
            rf"^double sender AES-256-GCM\s+1200{NUMBER}",
        ],
    ),
    "srtp_rows_double": (
        ["--packets", "20"],
        [
            rf"^MD hop AES-128-GCM\s+160{NUMBER}",
            rf"^MD hop\+SEQ rewrite AES-256-GCM\s+1200{NUMBER}",
            rf"^double sender AES-128-GCM\s+160{NUMBER}",
        ],
    ),
    "forwarding_core": (
        [],
        [
            rf"^core video renumbered \(OHB\)\s+1200{NUMBER}",
            rf"^ratio core audio / python copy relay{RATIO}",
            rf"^ratio core audio / pylibsrtp{RATIO}",
            rf"^ratio core video / python copy relay{RATIO}",
            rf"^ratio core video / pylibsrtp{RATIO}",
            r"^membership: ",
            rf"^\s+4{NUMBER}{NUMBER}\s+[\d.]+x$",
        ],
    ),
    "media": (
        [],
        [
            *(
                rf"^ratio {row} {media} / SRTP layer only{RATIO}"
                for row in ("produce", "consume")
                for media in ("audio", "video")
            ),
            rf"^real vp8 receive{NUMBER}{NUMBER}",
            rf"^ratio real opus send\+receive / PyAV alone{RATIO}",
            rf"^ratio real vp8 send\+receive / PyAV alone{RATIO}",
        ],
    ),
    "dtls_handshake": (
        [],
        [
            rf"^ratio perc / pyOpenSSL{RATIO}",
            rf"^ratio perc new cert / pyOpenSSL{RATIO}",
            rf"^ratio perc / pyOpenSSL\+ctx{RATIO}",
            rf"^ratio perc cookie / pyOpenSSL cookie{RATIO}",
            r"^perc server handshakes/s: \d+",
        ],
    ),
    "tunnel_relay": (
        [],
        [
            rf"^baseline: UDP echo\s+100{NUMBER}",
            rf"^ratio relay split 100 B / UDP echo{RATIO}",
            rf"^ratio relay inproc 100 B / UDP echo{RATIO}",
        ],
    ),
    "join_storm": (
        [],
        [
            rf"^baseline: in-memory pair\s+3\s+0{NUMBER}",
            rf"^4 in flight\s+\d+\s+0{NUMBER}",
            rf"^10 concurrent\s+5\s+0{NUMBER}",
            rf"^ratio 10 concurrent p50 / in-memory join{RATIO}",
            rf"^ratio saturation joins/s / in-memory joins/s{RATIO}",
        ],
    ),
    "rekey": (
        [],
        [
            r"^media N=3: audio 50 pkt/s per member, 300 deliveries/s at the MDD; cores used",
            rf"^leave -> every stayer sends new SPI, N=3\s+1{NUMBER}",
            rf"^leave -> every stayer verifies all on new SPI, N=3\s+1{NUMBER}",
            rf"^  leave -> every stayer holds new key, N=3\s+1{NUMBER}",
            rf"^  kmf left->rekeyed, N=3\s+1{NUMBER}",
            rf"^join after quiet, N=3\s+1{NUMBER}",
            rf"^  join -> media both ways, N=3\s+1{NUMBER}",
            rf"^join, 10 concurrent\s+\d+{NUMBER}",
            rf"^join, 4 in flight\s+\d+{NUMBER}",
            r"^E2E failures at the members, N=3: 0 ",
            rf"^ratio leave -> every stayer sends new SPI p99 ms \(N=3\) / target ms{RATIO}",
            rf"^ratio join p50 ms \(10 concurrent\) / target ms{RATIO}",
            rf"^ratio joins/s at saturation / target joins/s{RATIO}",
        ],
    ),
    "forwarding": (
        [],
        [
            r"end-to-end check: 20/20 warm-up packets verified",
            rf"^perc mdd\s+1,000 pkt/s x2{NUMBER}",
            rf"^python relay\s+1,000 pkt/s x2{NUMBER}",
            r"^ratio mdd / python relay\s+\d+\.\d\d",
            r"^largest lossless conference: ",
        ],
    ),
    "metrics_scrape": (
        [],
        [
            r"end-to-end check: 20/20 warm-up packets verified",
            r"^# idle: 5 scrapes of [\d,]+ B, MDD CPU ",
            rf"^without{NUMBER}",
            rf"^with scraper{NUMBER}",
            rf"^ratio delivered/s with scraper / without{RATIO}",
            rf"^ratio cpu us per delivery with scraper / without{RATIO}",
            rf"^ratio loaded scrape CPU at 10 Hz / one core{SIGNED_RATIO}",
            rf"^ratio idle scrape CPU at 10 Hz / one core{RATIO}",
        ],
    ),
    "cascade": (
        [],
        [
            r"end-to-end check: 20/20 \(1 worker\), 20/20 \(2 workers",
            rf"^workers1\s+500 pkt/s x2{NUMBER}",
            rf"^workers2\s+500 pkt/s x2{NUMBER}",
            rf"^ratio 2 workers / 1 worker \(CPU per delivery, placed, median\){RATIO}",
            r"^per-rate ratios, placed\s+500:\d+\.\d\d",
            r"^per-rate ratios, floating\s+500:\d+\.\d\d",
            r"^largest lossless conference: 1 worker \d+, 2 workers \d+ endpoints",
            r"^per-size ratios, 2 workers / 1 worker\s+(3:\d+\.\d\d|\(no size)",
            r"^hop latency: \d+ of \d+ packets seen on both sides, .* p50 -?[\d.]+ ms, p99 ",
            r"^2 workers: [\d,]+ deliveries/s = a conference of \d+",
        ],
    ),
}
#: Benches that start perc role processes or a process of their own.
PROCESSES = {"cascade", "forwarding", "join_storm", "metrics_scrape", "rekey", "tunnel_relay"}


def _bench(name: str) -> pytest.ParameterSet:
    marks = [pytest.mark.slow] if name in PROCESSES else []
    return pytest.param(name, marks=marks, id=name)


def run(name: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "SSLKEYLOGFILE"}
    return subprocess.run(
        [sys.executable, "-W", "error", str(BENCH / f"{name}.py"), *args],
        capture_output=True,
        text=True,
        timeout=90,
        env=env,
        check=False,
    )


def test_every_bench_has_a_smoke_run() -> None:
    scripts = {p.stem for p in BENCH.glob("*.py")} - LIBRARIES
    assert scripts == set(EXPECTED)


@pytest.mark.parametrize("name", [_bench(n) for n in EXPECTED])
def test_bench_runs(name: str) -> None:
    extra, patterns = EXPECTED[name]
    result = run(name, "--quick", *extra)
    report = f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert result.returncode == 0, report
    assert "Traceback" not in result.stderr, report
    assert re.search(r"^# machine: .+, \d+ cores, Python ", result.stdout, re.M), report
    missing = [p for p in patterns if not re.search(p, result.stdout, re.M)]
    assert not missing, f"missing {missing}\n{report}"


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_docstring_lists_every_option(name: str) -> None:
    # --help is the parser's own account of the options; the module docstring must name each.
    result = run(name, "--help")
    assert result.returncode == 0, result.stderr
    options = set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", result.stdout)) - {"--help"}
    assert options, result.stdout
    source = (BENCH / f"{name}.py").read_text()
    docstring = source.split('"""')[1]
    unlisted = sorted(o for o in options if o not in docstring)
    assert not unlisted, f"bench/{name}.py docstring does not mention {unlisted}"
