"""Self-healing endpoints (D30) and their verdict, with real ``perc`` processes on loopback.

Three ``perc endpoint`` processes in one conference; the MDD is SIGKILLed under them. When it
comes back on the same port they must rejoin by themselves and verify each other again; when
it does not, each must end with exit status 9 and a line naming the peers that went silent.

Every wait is for an event (``endpoint_peer_verified``, ``endpoint_rejoin``) or a process
exit, each with a deadline; nothing sleeps. The MDD listens on a fixed UDP port, chosen free
below the kernel's ephemeral range so that no other socket can take it while the MDD is down
(the KMF keeps its port-0 listener: it is never restarted here).
"""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import pytest
import trio

from perc.events import EndpointPeerVerified, EndpointRejoin
from tests.netutil.ports import unassigned_port

from .conftest import LOCAL, WAIT, Proc, System

pytestmark = pytest.mark.slow

PEOPLE = ("alice", "bob", "carol")
#: the default rekey policy (on join and leave) with a short coalescing window
FAST_REKEY = "rekey_window = 0.05\n"
#: D30's promise, measured from the restarted MDD's "listening" line
HEAL_WITHIN = 5.0


async def conference(
    system: System, *extra: str, only: dict[str, tuple[str, ...]] | None = None
) -> tuple[Path, Proc, dict[str, Proc], int]:
    """KMF, MDD on a fixed port, and the three endpoints verifying each other (``extra``
    options for all, ``only[name]`` for one)."""
    kmf_config = system.kmf_config(conferences={"demo": list(PEOPLE)}, conference_extra=FAST_REKEY)
    _, kmf_port = await system.start_kmf(kmf_config)
    port = unassigned_port()
    mdd_config = system.mdd_config("mdd", kmf_port)
    text = mdd_config.read_text()
    assert f'listen = "{LOCAL}:0"' in text
    mdd_config.write_text(text.replace(f'listen = "{LOCAL}:0"', f'listen = "{LOCAL}:{port}"'))
    mdd, mdd_port = await system.start_mdd(mdd_config)
    assert mdd_port == port
    eps = {}
    for name in PEOPLE:
        eps[name] = await system.start_endpoint(
            name, port, "--report", f"{name}.json", "--expect-peers", "2",
            "--join-timeout", "30", *extra, *(only or {}).get(name, ()),
        )  # fmt: skip
    for name, ep in eps.items():
        for peer in PEOPLE:
            if peer != name:
                await ep.wait_event(EndpointPeerVerified, peer=peer, rejoins=0)
    return mdd_config, mdd, eps, port


def report(system: System, name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((system.folder / f"{name}.json").read_text())
    return data


async def verified_again(ep: Proc, peers: set[str]) -> None:
    """Until ``ep`` reported every one of ``peers`` verified after a rejoin."""

    def done() -> bool:
        again = {e.peer for e in ep.find_events(EndpointPeerVerified) if e.rejoins >= 1}
        return peers <= again

    while not done():
        seen = len(ep.find_events(EndpointPeerVerified))
        await ep.wait_event(EndpointPeerVerified, count=seen + 1)


async def test_endpoints_rejoin_by_themselves_when_the_mdd_restarts(system: System) -> None:
    mdd_config, mdd, eps, _ = await conference(system)
    mdd.process.kill()  # SIGKILL: the MDD forgets every association
    assert await mdd.wait_exit() == -signal.SIGKILL
    killed = trio.current_time()
    again = await system.start("mdd", "mdd", "--config", str(mdd_config))
    await again.wait_for(r"listening on udp")
    listening = trio.current_time()
    healed: dict[str, float] = {}
    with trio.fail_after(WAIT):
        for name, ep in eps.items():
            await verified_again(ep, set(PEOPLE) - {name})
            healed[name] = trio.current_time() - listening
    slowest = max(healed.values())
    each = ", ".join(f"{n} {t:.2f}" for n, t in healed.items())
    print(
        f"MDD down {listening - killed:.2f} s; all peers verified again "
        f"{slowest:.2f} s after it listened ({each})"
    )
    assert slowest <= HEAL_WITHIN, healed
    for ep in eps.values():
        first = ep.find_events(EndpointRejoin)[0]
        assert first.reason in ("silence", "ended") and first.attempt == 1, first
    for ep in eps.values():
        ep.signal(signal.SIGTERM)
    for name, ep in eps.items():
        assert await ep.wait_exit() == 0, ep.text
        rep = report(system, name)
        assert rep["exit_status"] == 0 and rep["state"] == "left"
        assert rep["rejoins"] >= 1 and rep["rejoins_completed"] >= 1, rep
        assert sum(rep["rejoin_reasons"].values()) == rep["rejoins"]
        assert rep["silent_peers"] == {}
        for peer in set(PEOPLE) - {name}:
            p = rep["peers"][peer]
            assert p["verified"] > 0 and p["silent_for"] < 2.0, p  # (a BYE as all stop)
        assert len(rep["spis"]) >= 2  # the new association brought a new EKTKey


async def test_endpoints_say_their_peers_went_silent_when_the_mdd_is_gone(
    system: System,
) -> None:
    """alice and bob do not heal (--no-rejoin); carol tries and cannot: all three exit 9."""
    no = ("--no-rejoin",)
    _, mdd, eps, _ = await conference(system, "--silence-limit", "2", only={"alice": no, "bob": no})
    mdd.process.kill()
    assert await mdd.wait_exit() == -signal.SIGKILL
    # carol's first rejoin comes after 3 s of silence (--rejoin-silence): by then every
    # endpoint's peers have been silent for longer than --silence-limit 2.
    await eps["carol"].wait_event(EndpointRejoin, reason="silence")
    for ep in eps.values():
        ep.signal(signal.SIGTERM)
    for name, ep in eps.items():
        assert await ep.wait_exit() == 9, ep.text
        peers = sorted(set(PEOPLE) - {name})
        assert ep.error_line.startswith("perc: error: peers went silent"), ep.error_line
        for peer in peers:
            assert f"{peer} since " in ep.error_line, ep.error_line
        rep = report(system, name)
        assert rep["exit_status"] == 9 and sorted(rep["silent_peers"]) == peers
        for peer in peers:
            assert rep["peers"][peer]["bye"] is False and rep["peers"][peer]["silent_for"] > 2.0
        assert (rep["rejoins"] > 0) == (name == "carol"), rep
