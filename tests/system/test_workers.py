"""MDD workers (D27) with real processes: ``perc mdd --workers 2`` serving one conference on
one UDP port, ten ``perc endpoint`` processes, and a worker SIGKILLed under them.

Every endpoint lands on whichever worker the kernel's SO_REUSEPORT hash picks for its
address; media between endpoints on different workers crosses the workers' mesh link. A
SIGKILLed worker is restarted by the supervisor on the same socket, so its endpoints' datagrams
reach it again; they notice the silence and join again (D30). Every wait is for an event
(``mdd_worker_started``, ``mdd_link_up``, ``endpoint_peer_verified``, ``endpoint_rejoin``) or
a process exit, each with a deadline; the healing time is measured between the supervisor's
and the endpoints' logged event times.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import trio

from perc.events import (
    EndpointPeerVerified,
    EndpointRejoin,
    LinkUp,
    Listening,
    MddTunnelUp,
    WorkerExited,
    WorkerStarted,
)

from .conftest import WAIT, Proc, System, any_event

pytestmark = pytest.mark.slow

PEOPLE = tuple(f"ep{i}" for i in range(10))
#: D27/D30's promise for a killed worker's endpoints: from the restarted worker listening
#: again (its start-up is the machine's, seconds under load) to the last of them verifying
#: every peer again.
HEAL_WITHIN = 5.0


async def wait_all_verified(ep: Proc, peers: set[str], *, rejoined: bool = False) -> None:
    """Until ``ep`` reported every one of ``peers`` verified (after a rejoin, if asked)."""

    def done() -> bool:
        seen = {e.peer for e in ep.find_events(EndpointPeerVerified) if e.rejoins >= int(rejoined)}
        return peers <= seen

    while not done():
        count = len(ep.find_events(EndpointPeerVerified))
        await ep.wait_event(EndpointPeerVerified, 3 * WAIT, count=count + 1)


async def start_conference(system: System) -> tuple[Proc, int, dict[str, Proc]]:
    kmf_config = system.kmf_config(
        conferences={"demo": list(PEOPLE)}, conference_extra="rekey_window = 0.05\n"
    )
    _, kmf_port = await system.start_kmf(kmf_config)
    mdd_config = system.mdd_config("mdd", kmf_port, mdd_extra="workers = 2\n")
    mdd = await system.start("mdd", "mdd", "--config", str(mdd_config))
    listening = await mdd.wait_event(Listening, what="conference")
    for i in range(2):
        await mdd.wait_event(WorkerStarted, index=i)
    # A worker's start-up (imports) takes seconds on a loaded machine.
    await mdd.wait_event(MddTunnelUp, 3 * WAIT, count=2)
    await mdd.wait_event(LinkUp, 3 * WAIT, link="worker0>worker1")
    await mdd.wait_event(LinkUp, 3 * WAIT, link="worker1>worker0")
    eps = {}
    for name in PEOPLE:
        eps[name] = await system.start_endpoint(
            name, listening.port, "--media", "audio", "--expect-peers", str(len(PEOPLE) - 1),
            "--join-timeout", "30", "--rejoin-silence", "1",
        )  # fmt: skip
    return mdd, listening.port, eps


async def test_two_workers_serve_one_conference_and_heal_a_killed_worker(
    system: System,
) -> None:
    mdd, _, eps = await start_conference(system)
    with trio.fail_after(3 * WAIT):
        for name, ep in eps.items():
            await wait_all_verified(ep, set(PEOPLE) - {name})
    started = {e.index: e.pid for e in mdd.find_events(WorkerStarted)}
    assert sorted(started) == [0, 1]
    # Each worker's records name it: kill the one that keyed more endpoints.
    keyed = [len(mdd.find(rf"\[w{i}\]: keys installed conference=demo")) for i in (0, 1)]
    assert sum(keyed) >= len(PEOPLE), keyed
    victim = keyed.index(max(keyed))
    assert started[victim] != mdd.process.pid
    os.kill(started[victim], signal.SIGKILL)
    exited = await mdd.wait_event(WorkerExited, index=victim)
    assert exited.status == -signal.SIGKILL and exited.restart_in is not None
    restarted = await mdd.wait_event(WorkerStarted, index=victim, restarts=1)
    assert not mdd.find(rf"worker {1 - victim} exited")
    assert restarted.pid != started[victim]
    # The restarted worker's conference socket is the one the supervisor kept: its line comes
    # after the supervisor's and the first two workers'.
    back = await mdd.wait_event(
        Listening, 3 * WAIT, where=lambda e: e.what == "conference", count=4
    )
    await mdd.wait_event(LinkUp, 3 * WAIT, link=f"worker{1 - victim}>worker{victim}", count=2)

    # The killed worker's endpoints go silent and rejoin (D30) from a new port, which lands on
    # either worker, and verify everyone again; the others never rejoin. A
    # rejoin comes 1 s (--rejoin-silence) after the kill, long before any rejoiner verified
    # all nine peers again, so once every rejoiner has, no other rejoin is still to come.
    listening = mdd.time_of(back)
    healed: dict[str, float] = {}
    with trio.fail_after(3 * WAIT):
        while True:
            seen = [(ep, len(ep.events)) for ep in eps.values()]
            rejoiners = [n for n, ep in eps.items() if ep.find_events(EndpointRejoin)]
            for name in rejoiners:
                ep = eps[name]
                again = [e for e in ep.find_events(EndpointPeerVerified) if e.rejoins >= 1]
                if {e.peer for e in again} >= set(PEOPLE) - {name}:
                    healed[name] = max(ep.time_of(e) for e in again) - listening
            if rejoiners and set(healed) == set(rejoiners):
                break
            await any_event(seen)
    each = ", ".join(f"{n} {t:.2f}" for n, t in sorted(healed.items()))
    boot = listening - mdd.time_of(restarted)
    print(
        f"worker {victim} restarted, listening {boot:.2f} s later; its endpoints verified "
        f"everyone again after (from listening): {each}"
    )
    assert max(healed.values()) <= HEAL_WITHIN, healed
    for name in rejoiners:
        first = eps[name].find_events(EndpointRejoin)[0]
        assert first.reason in ("silence", "ended"), first
    # The supervisor stops its workers on SIGTERM (each logs its totals) and exits 0.
    assert await system.stop(mdd) == 0, mdd.text
    workers = [e.pid for e in mdd.find_events(WorkerStarted)]
    assert len(workers) == 3
    assert len(mdd.find(r"\[w[01]\]: totals conference=demo")) == 2, mdd.text
    for pid in workers:
        assert not Path(f"/proc/{pid}").exists(), pid


async def test_workers_zero_is_a_usage_error(system: System) -> None:
    mdd_config = system.mdd_config("mdd", 4444)
    proc = await system.start("mdd", "mdd", "--config", str(mdd_config), "--workers", "0")
    assert await proc.wait_exit() == 2
    assert proc.error_line == "perc: error: --workers: must be >= 1, got 0", proc.error_line
