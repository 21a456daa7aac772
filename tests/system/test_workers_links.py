"""MDD workers (D27) with an external cascade link (D25), real processes: MDD A runs two
workers and listens for a link from MDD B (one process, which dials); one KMF; three
endpoints on A (each on whichever worker the kernel's hash picks) and two on B.

One worker of A runs the link (the supervisor logs which); a BPF program on A's conference
port steers B's datagrams to it. Every endpoint verifies every other, across the mesh and the
link. Then the owner worker is SIGKILLed: the supervisor restarts it on the same socket, it
pokes B, B dials again and A's new worker accepts the handshake from the configured address;
media crosses the link again both ways. Every wait is for an event, with a deadline.
"""

from __future__ import annotations

import os
import signal

import pytest

from perc.events import (
    EndpointPeerVerified,
    LinkCounters,
    LinkUp,
    Listening,
    MddTunnelUp,
    WorkerExited,
    WorkerStarted,
)
from tests.netutil.ports import unassigned_port

from .conftest import LOCAL, WAIT, Proc, System

pytestmark = pytest.mark.slow

ON_A = ("alice", "bob", "carol")
ON_B = ("dave", "erin")
EVERYONE = ON_A + ON_B


def mdd_config(system: System, name: str, port: int, kmf_port: int, link: str) -> str:
    """An MDD's config on ``port`` with one link to ``link`` (the other MDD's name:port)."""
    peer, peer_port = link.split(":")
    workers, connect = ("workers = 2\n", "false") if name == "mdd-a" else ("", "true")
    path = system.mdd_config(
        name,
        kmf_port,
        mdd_extra=f"stats_interval = 0.1\n{workers}",
        conference_extra=(
            f'[[conference.link]]\npeer = "{LOCAL}:{peer_port}"\n'
            f'fingerprint = "{system.fingerprint(peer)}"\nconnect = {connect}\n'
        ),
    )
    path.write_text(path.read_text().replace(f'listen = "{LOCAL}:0"', f'listen = "{LOCAL}:{port}"'))
    return str(path)


def link_in(mdd: Proc, link: str) -> int:
    """The latest packets received over ``link`` (0 before any LinkCounters)."""
    counters = mdd.find_events(LinkCounters, link=link)
    return counters[-1].counters.get("packets_in", 0) if counters else 0


async def test_two_workers_run_an_external_link_and_its_owner_restarts(system: System) -> None:
    ports = {"mdd-a": unassigned_port(), "mdd-b": unassigned_port()}
    to_a, to_b = (f"{LOCAL}:{ports[n]}" for n in ("mdd-a", "mdd-b"))
    kmf_config = system.kmf_config(
        conferences={"demo": list(EVERYONE)}, trusted_mdds=("mdd-a", "mdd-b")
    )
    _, kmf_port = await system.start_kmf(kmf_config)
    b_config = mdd_config(system, "mdd-b", ports["mdd-b"], kmf_port, f"mdd-a:{ports['mdd-a']}")
    a_config = mdd_config(system, "mdd-a", ports["mdd-a"], kmf_port, f"mdd-b:{ports['mdd-b']}")
    b = await system.start("mdd-b", "mdd", "--config", b_config)
    a = await system.start("mdd-a", "mdd", "--config", a_config)
    await a.wait_event(Listening, what="conference")
    owner_line = await a.wait_for(rf"link {to_b} conference=demo: worker (\d) runs it")
    owner = int(owner_line.group(1))
    await a.wait_event(MddTunnelUp, 3 * WAIT, count=2)  # one tunnel per worker
    await a.wait_event(LinkUp, 3 * WAIT, link=to_b)
    await b.wait_event(LinkUp, 3 * WAIT, link=to_a)
    assert a.find(rf"\[w{owner}\]: link {to_b} conference=demo: this worker runs it")
    assert not a.find(rf"\[w{1 - owner}\]: link {to_b} conference=demo: this worker runs it")

    args = ("--media", "audio", "--expect-peers", str(len(EVERYONE) - 1))
    eps = {
        name: await system.start_endpoint(
            name, ports["mdd-a" if name in ON_A else "mdd-b"], *args,
            "--join-timeout", "30", "--rejoin-silence", "1",
        )
        for name in EVERYONE
    }  # fmt: skip
    for name, ep in eps.items():  # across A's mesh and the link, whichever worker
        for other in set(EVERYONE) - {name}:
            await ep.wait_event(EndpointPeerVerified, 3 * WAIT, name=name, peer=other)

    # SIGKILL the worker that runs the link: restarted on the same socket, it pokes B, which
    # dials again; A's new worker accepts the handshake from the configured address.
    started = {e.index: e.pid for e in a.find_events(WorkerStarted)}
    ups = len(a.find_events(LinkUp, link=to_b)), len(b.find_events(LinkUp, link=to_a))
    os.kill(started[owner], signal.SIGKILL)
    await a.wait_event(WorkerExited, index=owner)
    await a.wait_event(WorkerStarted, index=owner, restarts=1)
    up_a = await a.wait_event(LinkUp, 3 * WAIT, ups[0] + 1, link=to_b)
    up_b = await b.wait_event(LinkUp, 3 * WAIT, ups[1] + 1, link=to_a)
    assert up_a.keys == up_b.keys  # one association, both ends
    # Media crosses the new association both ways (the restarted worker's counters start at 0;
    # B's go on from where they were).
    b_before = link_in(b, to_a)
    await b.wait_event(LinkCounters, 3 * WAIT, link=to_a, where=lambda e: (
        e.counters.get("packets_in", 0) > b_before + 50
    ))  # fmt: skip
    await a.wait_event(LinkCounters, 3 * WAIT, link=to_b, where=lambda e: (
        a.time_of(e) > a.time_of(up_a) and e.counters.get("packets_in", 0) > 50
    ))  # fmt: skip
    assert not a.find(rf"worker {1 - owner} exited")

    for ep in eps.values():
        await system.stop(ep)
    assert await system.stop(a) == 0, a.text[-3000:]
    assert await system.stop(b) == 0, b.text[-3000:]
    (final,) = b.find_events(LinkCounters, link=to_a, final=True)
    assert final.counters["refused"] == 0 and final.counters["drop_loop"] == 0, final
