"""Metrics (D34) of real ``perc kmf`` and ``perc mdd`` processes during a 3-endpoint conference.

Both roles run with ``metrics = "127.0.0.1:0"``; the test reads the bound ports from their
``listening`` events (``what="metrics"``), scrapes ``GET /metrics`` over plain HTTP/1.1 and
parses the text with prometheus-client's parser, as Prometheus would.

**The MDD's packet counters against the endpoints' reports.** A counter scraped while media
flows is behind by whatever arrived since; so the exact comparison is made on a scrape taken
after every endpoint exited and the MDD ended each association (its final
:class:`~perc.events.MddCounters`): RTP in equals the sum of what the endpoints say they sent
(loopback does not lose), and the scrape equals the sum of the MDD's own final counters. RTP
out may exceed what the receivers counted by what the MDD forwarded to an endpoint after it
stopped reading (it drains its socket, then closes); the test allows one scrape interval
(:data:`SCRAPE_INTERVAL`) of the conference's forwarding rate for that. A scrape taken during
the conference must be at most the final one (counters never go back).
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
from typing import Any

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from perc.events import AssociationEnded, EndpointJoined, Joined, Listening, MddCounters

from .conftest import LOCAL, System

pytestmark = pytest.mark.slow

METRICS = f'metrics = "{LOCAL}:0"\n'
#: How often Prometheus would scrape (seconds): the tolerance of the RTP-out comparison.
SCRAPE_INTERVAL = 1.0
#: Rekey on join only (every endpoint leaves at the end; see tests/system/test_conference.py).
JOIN_REKEY = "rekey_window = 0.05\nrekey_on_leave = false\n"
DURATION = 3.0

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


async def http(port: int, request: bytes) -> bytes:
    stream = await trio.open_tcp_stream(LOCAL, port)
    async with stream:
        await stream.send_all(request)
        out = b""
        while chunk := await stream.receive_some(65536):
            out += chunk
        return out


async def scrape(port: int) -> Samples:
    response = await http(port, b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    head, body = response.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 200 "), head
    out: Samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            out[s.name, tuple(sorted(s.labels.items()))] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[name, tuple(sorted(labels.items()))]


def report(system: System, name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((system.folder / f"{name}.json").read_text())
    return data


async def test_metrics_of_a_three_endpoint_conference(system: System) -> None:
    people = ["alice", "bob", "carol"]
    kmf_config = system.kmf_config(
        conferences={"demo": people}, conference_extra=JOIN_REKEY, kmf_extra=METRICS
    )
    kmf, kmf_port = await system.start_kmf(kmf_config)
    kmf_metrics = (await kmf.wait_event(Listening, what="metrics")).port
    mdd, port = await system.start_mdd(
        system.mdd_config("mdd", kmf_port, mdd_extra="stats_interval = 0.1\n" + METRICS)
    )
    mdd_metrics = (await mdd.wait_event(Listening, what="metrics")).port
    args = ("--join-timeout", "30", "--duration", str(DURATION), "--expect-peers", "2")
    procs = [
        await system.start_endpoint(name, port, "--report", f"{name}.json", *args)
        for name in people
    ]

    # During the conference: everyone joined and media flows through the MDD.
    await kmf.wait_event(Joined, count=3)
    for proc in procs:
        await proc.wait_event(EndpointJoined)
    await mdd.wait_event(MddCounters, where=lambda e: e.counters["packets_out"] > 0)
    k = await scrape(kmf_metrics)
    during = await scrape(mdd_metrics)
    assert value(k, "perc_kmf_tunnels_up") == 1
    assert value(k, "perc_kmf_members", conference="demo") == 3
    assert value(k, "perc_kmf_handshakes_total", result="joined", reason="ok") == 3
    assert value(k, "perc_kmf_join_duration_seconds_count") == 3
    assert value(k, "perc_kmf_rekeys_total", conference="demo", cause="first") == 1
    assert value(k, "process_cpu_seconds_total") > 0
    assert value(during, "perc_mdd_tunnel_up", conference="demo") == 1
    assert value(during, "perc_mdd_associations", conference="demo") == 3
    assert value(during, "perc_mdd_links_up", conference="demo") == 0
    assert value(during, "perc_mdd_packets_in_total", conference="demo", kind="rtp") > 0

    # A request that is not HTTP gets 400, and the role goes on.
    assert (await http(mdd_metrics, b"\x16\x03\x01 hello\r\n\r\n")).startswith(b"HTTP/1.1 400 ")

    for proc in procs:
        assert await proc.wait_exit() == 0, proc.text
    await mdd.wait_event(AssociationEnded, count=3)
    k = await scrape(kmf_metrics)
    end = await scrape(mdd_metrics)

    reports = [report(system, n) for n in people]
    sent = sum(r["sent"] for r in reports)
    received = sum(p["received"] for r in reports for p in r["peers"].values())
    rtp_in = value(end, "perc_mdd_packets_in_total", conference="demo", kind="rtp")
    rtp_out = value(end, "perc_mdd_packets_out_total", conference="demo", kind="rtp")
    assert rtp_in == sent > 0
    assert received <= rtp_out <= received + rtp_out / DURATION * SCRAPE_INTERVAL
    # The scrape is the MDD's own counters: the sums of its final per-association reports.
    finals = mdd.find_events(MddCounters, final=True)
    assert rtp_in == sum(e.counters["packets_in"] - e.counters["rtcp_in"] for e in finals)
    assert rtp_out == sum(e.counters["packets_out"] - e.counters["rtcp_out"] for e in finals)
    assert value(end, "perc_mdd_bytes_in_total", conference="demo") == sum(
        e.counters["bytes_in"] for e in finals
    )
    for key, v in during.items():
        if key[0].endswith("_total"):
            assert end[key] >= v, key
    assert value(end, "perc_mdd_associations", conference="demo") == 0
    assert value(end, "perc_mdd_forwarding_cpu_seconds_total", conference="demo") > 0
    assert value(end, "perc_mdd_dropped_total", conference="demo", reason="auth") == 0

    # The KMF: every member left (close_notify); the key in use is the last rekey's.
    assert value(k, "perc_kmf_members", conference="demo") == 0
    assert value(k, "perc_kmf_handshakes_total", result="joined", reason="ok") == 3
    rekeys = sum(v for (n, _), v in k.items() if n == "perc_kmf_rekeys_total")
    assert 2 <= rekeys <= 3  # the first key, then one or two join rekeys (D31 may coalesce)
    assert 1 <= value(k, "perc_kmf_rekey_duration_seconds_count") <= rekeys - 1
    assert value(k, "perc_kmf_ekt_keys_acknowledged_total") >= 3


@pytest.mark.parametrize("role", ["kmf", "mdd"])
async def test_a_metrics_port_in_use_is_one_line_and_exit_2(system: System, role: str) -> None:
    with socket.socket() as taken:
        taken.bind((LOCAL, 0))
        taken.listen()
        busy = taken.getsockname()[1]
        # (The MDD's KMF port 9 is never tried: the MDD stops first.)
        config = system.kmf_config() if role == "kmf" else system.mdd_config("mdd", 9)
        proc = await system.start(
            role, role, "--config", str(config), "--metrics", f"{LOCAL}:{busy}"
        )
        assert await proc.wait_exit() == 2
    assert proc.error_line.startswith(f"perc: error: metrics on {LOCAL}:{busy}: "), proc.text
    assert proc.find_events(Listening, what="tunnel") == []  # nothing else was started
    assert proc.find_events(Listening, what="conference") == []


async def test_demo_metrics_prints_two_urls_that_answer_while_it_runs() -> None:
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "perc", "demo", "--metrics", "--duration", "6"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    assert process.stdout is not None
    out = b""
    urls: dict[str, tuple[str, int]] = {}
    try:
        with trio.fail_after(60):
            async for chunk in process.stdout:
                out += chunk
                found = re.findall(
                    rb"(KMF|MDD) metrics \(Prometheus, until the demo ends\): "
                    rb"http://([\d.]+):(\d+)/metrics",
                    out,
                )
                urls = {role.decode(): (host.decode(), int(port)) for role, host, port in found}
                if len(urls) == 2:
                    break
            assert set(urls) == {"KMF", "MDD"}, out.decode()
            assert all(host == LOCAL for host, _ in urls.values())
            kmf = await scrape(urls["KMF"][1])
            mdd = await scrape(urls["MDD"][1])
            assert value(kmf, "perc_kmf_tunnels_up") == 1
            assert value(mdd, "perc_mdd_tunnel_up", conference="demo") == 1
            async for chunk in process.stdout:
                out += chunk
            code = await process.wait()
    finally:
        with trio.CancelScope(shield=True):
            if process.returncode is None:
                process.kill()
                await process.wait()
    # The verdict is test_demo.py's (a loaded machine can make a rejoin late); here: it ran
    # to its end (not a usage error, not interrupted) with the URLs answering meanwhile.
    assert code in (0, 1), out.decode()
    assert b"what each endpoint verified end to end" in out, out.decode()
    # The demo stopped its KMF and MDD: nothing answers there any more.
    for _, port in urls.values():
        with pytest.raises(OSError):
            await trio.open_tcp_stream(LOCAL, port)
