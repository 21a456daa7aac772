"""One conference over cascaded MDDs (D25, D26), with real processes.

Three ``perc mdd`` processes in a chain A - B - C (A dials B, B dials C), one ``perc kmf``
that trusts all three, two ``perc endpoint`` processes on each MDD. The MDDs listen on fixed
UDP ports (each config names its peers' addresses); everything else is as in
test_conference.py: the endpoints' JSON reports, exit statuses and typed events, the MDDs'
:class:`~perc.events.LinkUp`, :class:`~perc.events.LinkCounters` (every ``stats_interval``
while they change) and :class:`~perc.events.KeyIsolation`.

The same chain also runs with each MDD in its own network namespace, the namespaces joined by
veth pairs with 20 ms delay and 1% loss (netem), when the test runs as root (CI does); as
another user that test fails and says why. On a kernel without sch_netem the veth pairs stay
unimpaired (the test prints so).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
import trio

from perc.events import (
    AssociationKeyed,
    EndpointEktKey,
    EndpointLeft,
    EndpointMediaStarted,
    EndpointPeerVerified,
    EndpointRejoin,
    KeyIsolation,
    LinkCounters,
    LinkUp,
    Listening,
    MddCounters,
    MddTunnelUp,
    Rekeyed,
)
from tests.netutil.ports import unassigned_port

from .conftest import LOCAL, WAIT, Proc, System
from .test_conference import FAST_REKEY, JOIN_REKEY, NO_REKEY, assert_clean, report

pytestmark = pytest.mark.slow

STATS_INTERVAL = 0.1
CHAIN = ("mdd-a", "mdd-b", "mdd-c")


class Cascade:
    """The KMF, the MDDs of a chain and their endpoints (see the module docstring)."""

    def __init__(self, system: System, hosts: Sequence[str] | None = None) -> None:
        self.system = system
        self.hosts = list(hosts or [LOCAL] * len(CHAIN))
        self.ports = {name: unassigned_port() for name in CHAIN}
        self.mdds: dict[str, Proc] = {}
        self.configs: dict[str, Path] = {}
        self.kmf: Proc | None = None
        self.kmf_port = 0
        self.kmf_host = LOCAL

    def address(self, name: str) -> str:
        return f"{self.hosts[CHAIN.index(name)]}:{self.ports[name]}"

    async def start_kmf(self, people: Sequence[str], kmf_extra: str, host: str = LOCAL) -> None:
        system = self.system
        self.kmf_host = host
        config = system.kmf_config(
            conferences={"demo": list(people)}, trusted_mdds=CHAIN, conference_extra=kmf_extra
        )
        if host != LOCAL:
            config.write_text(config.read_text().replace(f'"{LOCAL}:0"', f'"{host}:0"'))
        self.kmf, self.kmf_port = await system.start_kmf(config)

    def mdd_config(self, name: str, conference_extra: str = "") -> Path:
        system = self.system
        i = CHAIN.index(name)
        links = ""
        for j in (i - 1, i + 1):
            if 0 <= j < len(CHAIN):
                peer = CHAIN[j]
                links += (
                    f'[[conference.link]]\npeer = "{self.address(peer)}"\n'
                    f'fingerprint = "{system.fingerprint(peer)}"\n'
                    f"connect = {'true' if j > i else 'false'}\n"
                )
        path = system.mdd_config(
            name,
            self.kmf_port,
            mdd_extra=f"stats_interval = {STATS_INTERVAL}\n",
            conference_extra=conference_extra + links,
        )
        text = path.read_text()
        text = text.replace(f'listen = "{LOCAL}:0"', f'listen = "{self.address(name)}"')
        text = text.replace(f'kmf = "{LOCAL}:', f'kmf = "{self.kmf_host}:')
        path.write_text(text)
        self.configs[name] = path
        return path

    async def start_mdd(self, name: str) -> Proc:
        mdd = await self.system.start(name, "mdd", "--config", str(self.configs[name]))
        await mdd.wait_event(Listening, what="conference")
        await mdd.wait_event(MddTunnelUp, conference="demo")
        self.mdds[name] = mdd
        return mdd

    async def start(
        self, people: Sequence[str], *, kmf_extra: str = JOIN_REKEY, c_extra: str = ""
    ) -> None:
        await self.start_kmf(people, kmf_extra)
        for name in CHAIN:
            self.mdd_config(name, c_extra if name == "mdd-c" else "")
        for name in CHAIN:
            await self.start_mdd(name)
        await self.links_up()

    async def links_up(self, count: int = 1) -> None:
        """Every link of the chain is up (``count``: the how-many-th LinkUp on each side)."""
        for i, name in enumerate(CHAIN):
            for j in (i - 1, i + 1):
                if 0 <= j < len(CHAIN):
                    await self.mdds[name].wait_event(
                        LinkUp, WAIT, count, link=self.address(CHAIN[j])
                    )

    async def endpoint(self, name: str, mdd: str, *args: str, report: str | None = None) -> Proc:
        port = self.ports[mdd]
        return await self.system.start_endpoint(
            name, port, "--report", f"{report or name}.json", "--join-timeout", "40", *args
        )

    async def stop_all(self) -> None:
        for mdd in self.mdds.values():
            await self.system.stop(mdd)
        if self.kmf is not None:
            await self.system.stop(self.kmf)
        for proc in self.system.procs:  # kept beside the reports, for a failure's post-mortem
            (self.system.folder / f"{proc.name}.{proc.process.pid}.log").write_text(proc.text)


def assert_isolated(mdd: Proc) -> None:
    """The MDD, with links configured, never loaded end-to-end code (RFC 8871 §4.1)."""
    (isolation,) = mdd.find_events(KeyIsolation)
    assert isolation.loaded == [], (mdd.name, isolation)
    assert "perc.srtp.ekt" in isolation.checked


def link_in(mdd: Proc, link: str) -> list[tuple[float, int]]:
    """(time, RTP+RTCP packets received over ``link``) from each LinkCounters event."""
    return [
        (mdd.time_of(e), e.counters.get("packets_in", 0))
        for e in mdd.find_events(LinkCounters, link=link)
    ]


PEOPLE = {"mdd-a": ("alice", "bob"), "mdd-b": ("carol", "dave"), "mdd-c": ("erin", "frank")}
EVERYONE = [p for pair in PEOPLE.values() for p in pair]


async def test_three_mdds_in_a_chain_everyone_verifies_everyone(system: System) -> None:
    cascade = Cascade(system)
    # Each join rekeys (as in test_conference.py): every sender announces a new key in Full EKT
    # tags, video included, so a joiner never waits for a key frame. The endpoints join one
    # after another, each once the previous one sends, so the rekeys do not pile up.
    await cascade.start(EVERYONE, kmf_extra=JOIN_REKEY)
    procs = []
    for mdd, pair in PEOPLE.items():
        for name in pair:
            proc = await cascade.endpoint(
                name, mdd, "--media", "both", "--video-fps", "15", "--video-bitrate", "150000",
                "--expect-peers", "5",
            )  # fmt: skip
            await proc.wait_event(EndpointMediaStarted, WAIT * 2, name=name)
            procs.append(proc)
    for proc in procs:  # each verified all five others, across the links
        for other in set(EVERYONE) - {proc.name}:
            await proc.wait_event(EndpointPeerVerified, WAIT * 2, name=proc.name, peer=other)
    # A little longer, for every video stream to reach a key frame everywhere: until about
    # 300 more packets crossed each end of the chain.
    for mdd, link in (("mdd-a", "mdd-b"), ("mdd-c", "mdd-b")):
        proc = cascade.mdds[mdd]
        before = link_in(proc, cascade.address(link))[-1][1]
        await proc.wait_event(
            LinkCounters, WAIT * 2, link=cascade.address(link),
            where=lambda e, b=before: e.counters["packets_in"] > b + 300,  # type: ignore[misc]
        )  # fmt: skip
    for proc in procs:
        assert await system.stop(proc, signal.SIGTERM) == 0, proc.text[-3000:]
    await cascade.stop_all()
    for name in EVERYONE:
        rep = report(system, name)
        assert_clean(rep, set(EVERYONE) - {name}, joiner=True)
        for other, peer in rep["peers"].items():
            kinds = {s["kind"] for s in peer["streams"].values() if s["verified"] > 0}
            assert kinds == {"audio", "video"}, (name, other, peer["streams"])
    for mdd in cascade.mdds.values():
        assert_isolated(mdd)
        # Every link carried media both ways and dropped nothing as a loop.
        for e in mdd.find_events(LinkCounters, final=True):
            assert e.counters["packets_in"] > 0 and e.counters["packets_out"] > 0, e
            assert e.counters["drop_loop"] == 0 and e.counters["refused"] == 0, e


async def test_a_leave_on_c_rekeys_every_stayer_on_every_mdd_within_a_second(
    system: System,
) -> None:
    cascade = Cascade(system)
    await cascade.start(EVERYONE, kmf_extra="")  # the default rekey policy
    stay = []
    for mdd, pair in PEOPLE.items():
        for name in pair:
            if name != "frank":
                stay.append(await cascade.endpoint(name, mdd, "--expect-peers", "4"))
    for proc in stay:
        await proc.wait_event(EndpointMediaStarted, WAIT * 2)
    frank = await cascade.endpoint("frank", "mdd-c", "--duration", "3", "--expect-peers", "5")
    assert await frank.wait_exit(60) == 0, frank.text  # heard everyone, across both links
    (left,) = frank.find_events(EndpointLeft, name="frank")
    left_at = frank.time_of(left)
    assert cascade.kmf is not None
    leave = await cascade.kmf.wait_event(Rekeyed, conference="demo", reason="leave", members=5)
    for proc in stay:
        got = await proc.wait_event(EndpointEktKey, spi=leave.spi, reason="rekey")
        assert proc.time_of(got) - left_at <= 1.0, (proc.name, got)
    for proc in stay:
        assert await system.stop(proc, signal.SIGTERM) == 0, proc.text
    await cascade.stop_all()
    for proc in stay:
        rep = report(system, proc.name)
        assert_clean(rep, set(EVERYONE) - {proc.name}, joiner=True)
        assert leave.spi in rep["spis"]
    assert leave.spi not in report(system, "frank")["spis"]  # the leaver never got it


async def test_b_killed_and_restarted_cross_mdd_media_resumes(system: System) -> None:
    cascade = Cascade(system)
    await cascade.start(EVERYONE, kmf_extra=FAST_REKEY)
    args = ("--media", "audio", "--expect-peers", "5", "--silence-limit", "0")
    procs = {
        name: await cascade.endpoint(name, mdd, *args)
        for mdd, pair in PEOPLE.items()
        for name in pair
    }
    a, b, c = (cascade.mdds[n] for n in CHAIN)
    link_cb = cascade.address("mdd-b")
    # Media crosses the chain: C hears A's endpoints over the link to B.
    await c.wait_event(LinkCounters, WAIT * 2, link=link_cb, where=lambda e: (
        e.counters["packets_in"] > 200
    ))  # fmt: skip
    before_kill = {mdd.name: _sent_to_endpoints(mdd) for mdd in (a, c)}
    b.signal(signal.SIGKILL)
    await b.wait_exit()
    # A's and C's local media goes on: each MDD keeps sending its endpoints their local peer's
    # media (counted per association), and their links to B go down.
    for mdd in (a, c):
        last = before_kill[mdd.name]
        await mdd.wait_event(
            MddCounters,
            WAIT,
            where=lambda e, last=last: (
                e.association in last  # type: ignore[misc]
                and e.counters["packets_out"] > last[e.association] + 100
            ),
        )
        await mdd.wait_event(LinkCounters, WAIT, link=link_cb, state="down")
    # B comes back on the same port: the links re-handshake, B's endpoints rejoin (D30).
    restarted = await system.start("mdd-b", "mdd", "--config", str(cascade.configs["mdd-b"]))
    listening = await restarted.wait_event(Listening, what="conference")
    listening_at = restarted.time_of(listening)
    before = link_in(c, link_cb)[-1][1]
    resumed = await c.wait_event(
        LinkCounters, WAIT * 2, link=link_cb, where=lambda e: e.counters["packets_in"] > before + 20
    )
    assert c.time_of(resumed) - listening_at <= 3.0, (c.time_of(resumed), listening_at)
    a_before = link_in(a, cascade.address("mdd-b"))[-1][1]
    resumed_a = await a.wait_event(
        LinkCounters, WAIT * 2, link=cascade.address("mdd-b"),
        where=lambda e: e.counters["packets_in"] > a_before + 20,
    )  # fmt: skip
    assert a.time_of(resumed_a) - listening_at <= 3.0
    # B's endpoints rejoined by themselves (D30) through the restarted B.
    await restarted.wait_event(AssociationKeyed, WAIT * 2, 2)
    for name in PEOPLE["mdd-b"]:
        assert procs[name].find_events(EndpointRejoin, name=name), procs[name].text
    # Nobody was restarted: every endpoint process is the first one and still running.
    for proc in procs.values():
        assert proc.process.returncode is None, proc.text
    for proc in procs.values():
        assert await system.stop(proc, signal.SIGTERM) == 0, proc.text
    cascade.mdds["mdd-b"] = restarted
    await cascade.stop_all()


def _sent_to_endpoints(mdd: Proc) -> dict[object, int]:
    """The latest packets_out per endpoint association (MddCounters)."""
    return {e.association: e.counters["packets_out"] for e in mdd.find_events(MddCounters)}


async def test_last_n_1_on_c_gets_the_latest_video_from_any_mdd(system: System) -> None:
    """last_n = 1 on C only: erin on C receives alice's video (from A, two links away), then
    bob's (from B, more recent), then alice's again once bob left. C renumbers the resumed
    stream (the first change, recorded in the OHB): erin sees contiguous SEQ and verifies
    every packet."""
    cascade = Cascade(system)
    people = ["alice", "bob", "erin"]
    await cascade.start(people, kmf_extra=NO_REKEY, c_extra="last_n = 1\n")
    video = ("--media", "video", "--video-fps", "30", "--video-bitrate", "300000")
    erin = await cascade.endpoint("erin", "mdd-c", "--media", "none", "--expect-peers", "2")
    await erin.wait_event(EndpointMediaStarted, name="erin")
    c = cascade.mdds["mdd-c"]
    link_cb = cascade.address("mdd-b")
    alice = await cascade.endpoint("alice", "mdd-a", *video, "--expect-peers", "1")
    await alice.wait_event(EndpointMediaStarted, name="alice")
    await c.wait_event(LinkCounters, WAIT, link=link_cb, where=lambda e: (
        e.counters["packets_in"] > 40
    ))  # fmt: skip
    bob = await cascade.endpoint("bob", "mdd-b", *video, "--duration", "2", "--expect-peers", "1")
    assert await bob.wait_exit(60) == 0, bob.text
    before = link_in(c, link_cb)[-1][1]
    await c.wait_event(LinkCounters, WAIT, link=link_cb, where=lambda e: (
        e.counters["packets_in"] > before + 100
    ))  # fmt: skip  # alice's video again, past C's last_n_idle (2 s) for bob's stream
    assert await system.stop(erin) == 0, erin.text
    assert await system.stop(alice) == 0, alice.text
    await cascade.stop_all()
    rep = report(system, "erin")
    assert_clean(rep, {"alice", "bob"})
    for name in ("alice", "bob"):
        peer = rep["peers"][name]
        assert peer["expected"] == peer["received"] == peer["verified"], (name, peer)
        assert peer["lost"] == 0 and peer["reordered"] == 0, (name, peer)
    alice_sent = report(system, "alice")["streams"]["video"]["sent"]
    assert rep["peers"]["alice"]["verified"] < alice_sent - 20  # withheld while bob was on
    (final,) = c.find_events(LinkCounters, link=link_cb, final=True)
    assert final.counters["drop_last_n"] > 20  # applied at C, to what the link carried


# --- network namespaces -------------------------------------------------------------------------


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@pytest.fixture
def namespaces() -> Iterator[list[str]]:
    """Four namespaces (the KMF's and one per MDD of the chain): the KMF's namespace has a veth
    to each MDD's; A-B and B-C have their own veth pairs with netem (20 ms, 1% loss each way;
    unimpaired, and printed, on a kernel without sch_netem). Yields the namespaces' names."""
    if os.geteuid() != 0:
        pytest.fail("the network-namespace cascade test needs root (ip netns, tc netem); CI "
                    "runs it as root")  # fmt: skip
    if shutil.which("ip") is None or shutil.which("tc") is None:
        pytest.fail("the network-namespace cascade test needs iproute2 (ip, tc): bash dev.sh")
    tag = f"pc{os.getpid() % 100000}"
    ns = {n: f"{tag}{n}" for n in ("k", "a", "b", "c")}
    try:
        for name in ns.values():
            _ip("netns", "add", name)
            _ip("-n", name, "link", "set", "lo", "up")
        # KMF <-> each MDD (tunnels): 10.77.<i>.0/24, no impairment.
        for i, m in enumerate(("a", "b", "c"), start=1):
            k_if, m_if = f"{tag}k{m}", f"{tag}{m}k"
            _ip("link", "add", k_if, "netns", ns["k"], "type", "veth", "peer", "name", m_if,
                "netns", ns[m])  # fmt: skip
            _ip("-n", ns["k"], "addr", "add", f"10.77.{i}.1/24", "dev", k_if)
            _ip("-n", ns[m], "addr", "add", f"10.77.{i}.2/24", "dev", m_if)
            _ip("-n", ns["k"], "link", "set", k_if, "up")
            _ip("-n", ns[m], "link", "set", m_if, "up")
        # The chain links: A-B 10.78.1.0/24, B-C 10.78.2.0/24, netem both ways.
        for i, (x, y) in enumerate((("a", "b"), ("b", "c")), start=1):
            x_if, y_if = f"{tag}{x}{y}", f"{tag}{y}{x}"
            _ip("link", "add", x_if, "netns", ns[x], "type", "veth", "peer", "name", y_if,
                "netns", ns[y])  # fmt: skip
            _ip("-n", ns[x], "addr", "add", f"10.78.{i}.1/24", "dev", x_if)
            _ip("-n", ns[y], "addr", "add", f"10.78.{i}.2/24", "dev", y_if)
            for n, dev in ((ns[x], x_if), (ns[y], y_if)):
                _ip("-n", n, "link", "set", dev, "up")
                netem = subprocess.run(
                    ["ip", "netns", "exec", n, "tc", "qdisc", "add", "dev", dev, "root",
                     "netem", "delay", "20ms", "loss", "1%"],
                    check=False, capture_output=True, text=True,
                )  # fmt: skip
                if netem.returncode != 0:
                    if "qdisc kind is unknown" not in netem.stderr:
                        pytest.fail(f"tc netem failed: {netem.stderr.strip()}")
                    # A kernel built without sch_netem (e.g. a minimal VM kernel): the chain
                    # still runs in namespaces over veth pairs, unimpaired; said in the output.
                    print(f"tc netem unavailable ({netem.stderr.strip()}): veth unimpaired")
        yield [ns["k"], ns["a"], ns["b"], ns["c"]]
    finally:
        for name in ns.values():
            subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True)


async def start_in(system: System, netns: str, name: str, *args: str) -> Proc:
    """``ip netns exec NETNS python -m perc ARGS`` under the same harness as System.start."""
    cmd = ["ip", "netns", "exec", netns, sys.executable, "-m", "perc", "--log-format", "json"]
    environ = dict(os.environ)
    environ.pop("SSLKEYLOGFILE", None)
    process = await trio.lowlevel.open_process(
        [*cmd, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=system.folder,
        env=environ,
    )
    proc = Proc(name, process)
    system.nursery.start_soon(proc.pump_stderr)
    system.nursery.start_soon(proc.pump_stdout)
    system.procs.append(proc)
    return proc


async def test_the_chain_in_network_namespaces_with_delay_and_loss(
    system: System, namespaces: list[str]
) -> None:
    """Each MDD in its own namespace, A - B and B - C over veth pairs with netem 20 ms delay
    and 1% loss each way; the KMF in a fourth namespace; the endpoints beside their MDD."""
    ns_kmf, *ns_mdd = namespaces
    port = 5004  # every MDD on the same port: each namespace has its own
    chain_side = {  # each MDD's address as its chain neighbours see it
        ("mdd-a", "mdd-b"): "10.78.1.2", ("mdd-b", "mdd-a"): "10.78.1.1",
        ("mdd-b", "mdd-c"): "10.78.2.2", ("mdd-c", "mdd-b"): "10.78.2.1",
    }  # fmt: skip
    config = system.kmf_config(
        conferences={"demo": EVERYONE}, trusted_mdds=CHAIN, conference_extra=JOIN_REKEY
    )
    config.write_text(config.read_text().replace(f'"{LOCAL}:0"', '"0.0.0.0:0"'))
    kmf = await start_in(system, ns_kmf, "kmf", "kmf", "--config", str(config))
    kmf_port = (await kmf.wait_event(Listening, what="tunnel")).port
    mdds = {}
    for i, name in enumerate(CHAIN):
        links = ""
        for j in (i - 1, i + 1):
            if 0 <= j < len(CHAIN):
                peer = CHAIN[j]
                links += (
                    f'[[conference.link]]\npeer = "{chain_side[(name, peer)]}:{port}"\n'
                    f'fingerprint = "{system.fingerprint(peer)}"\n'
                    f"connect = {'true' if j > i else 'false'}\n"
                )
        path = system.mdd_config(
            name, kmf_port, mdd_extra=f"stats_interval = {STATS_INTERVAL}\n",
            conference_extra=links,
        )  # fmt: skip
        text = path.read_text().replace(f'listen = "{LOCAL}:0"', f'listen = "0.0.0.0:{port}"')
        text = text.replace(f'kmf = "{LOCAL}:', f'kmf = "10.77.{i + 1}.1:')
        path.write_text(text)
        mdds[name] = await start_in(system, ns_mdd[i], name, "mdd", "--config", str(path))
    for mdd in mdds.values():
        await mdd.wait_event(MddTunnelUp, WAIT * 2, conference="demo")
    for i, name in enumerate(CHAIN):
        for j in (i - 1, i + 1):
            if 0 <= j < len(CHAIN):
                await mdds[name].wait_event(LinkUp, WAIT * 2)
    procs = []
    for i, (mdd, pair) in enumerate(PEOPLE.items()):
        del mdd
        for name in pair:
            system.identity(name)
            args = [
                "endpoint", "--mdd", f"127.0.0.1:{port}",
                "--cert", f"{name}.crt", "--key", f"{name}.key",
                "--kmf-fingerprint", system.fingerprint("kmf"), "--report", f"{name}.json",
                "--join-timeout", "40", "--media", "both", "--video-fps", "15",
                "--video-bitrate", "150000", "--expect-peers", "5",
            ]  # fmt: skip
            proc = await start_in(system, ns_mdd[i], name, *args)
            await proc.wait_event(EndpointMediaStarted, WAIT * 2, name=name)
            procs.append(proc)
    for proc in procs:
        for other in set(EVERYONE) - {proc.name}:
            await proc.wait_event(EndpointPeerVerified, WAIT * 3, name=proc.name, peer=other)
    for proc in procs:
        assert await system.stop(proc, signal.SIGTERM) == 0, proc.text[-3000:]
    for mdd in mdds.values():
        await system.stop(mdd)
    await system.stop(kmf)
    for name in EVERYONE:
        assert_clean(report(system, name), set(EVERYONE) - {name}, joiner=True, lossy=True)
    for mdd in mdds.values():
        assert_isolated(mdd)
        for e in mdd.find_events(LinkCounters, final=True):
            assert e.counters["packets_in"] > 0 and e.counters["drop_loop"] == 0, e


async def test_perc_demo_with_two_mdds_passes(system: System) -> None:
    """``perc demo --mdds 2``: the endpoints spread over two chained MDDs, everyone verifies
    everyone across the link, both rekeys adopted: exit 0, and the table shows the MDDs."""
    result = await trio.run_process(
        [sys.executable, "-m", "perc", "demo", "--mdds", "2", "--participants", "3"],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
        cwd=system.folder,
    )
    out = result.stdout.decode()
    assert result.returncode == 0, out + result.stderr.decode()
    assert "2 MDDs (media distributors) in a chain of cascade links" in out
    assert "mdd1  alice" in out and "mdd2  bob" in out
    assert "PASS: every endpoint verified every other" in out
