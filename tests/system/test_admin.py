"""The admin socket (D33) with real processes: ``perc kmf``, ``perc mdd``, ``perc endpoint``
and ``perc admin``.

* ``perc admin kick demo carol``: carol's endpoint exits 10 saying the operator removed it; the
  others hold a new EKTKey within 1 s of the kick (times from the processes' own event logs);
  carol never received that key. That a member without the new EKTKey cannot read what is
  sent under it is proven in-process, where a test can hold the keys
  (tests/roles/test_admin_kick.py, as tests/roles/test_rekey.py does for a leaver); here the
  KMF's key digests (never keys) show which keys carol was given.
* ``--ban``: carol's rejoin is refused (``access_denied``, exit 3), also by a restarted KMF
  that reads the roster change back from its state; the audit log has the kick and the
  roster row, and its chain verifies.
* ``roster add`` lets a new identity in without a restart; ``roster remove`` plus ``kick``
  takes it out again.
* A bad socket path stops the role with exit 2 and one line; the MDD answers ``status`` and
  ``links``; protocol errors keep the connection.
"""

from __future__ import annotations

import json
import socket
import sys
from pathlib import Path
from typing import Any

import pytest
import trio

from perc.events import (
    Denied,
    EndpointEktKey,
    EndpointJoined,
    EndpointRejoin,
    Kicked,
    Listening,
    MddTunnelUp,
    Rekeyed,
)
from perc.roles.admin import call

from .conftest import Proc, System

pytestmark = pytest.mark.slow

FAST_REKEY = "rekey_window = 0.05\n"


async def admin(system: System, *args: str) -> dict[str, Any]:
    """``perc admin --socket kmf.sock --json ARGS`` as a process; its answer."""
    result = await trio.run_process(
        [sys.executable, "-m", "perc", "admin", "--socket", "kmf.sock", "--json", *args],
        cwd=system.folder,
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr.decode()
    answer: dict[str, Any] = json.loads(result.stdout)
    return answer


async def request(path: Path, **fields: Any) -> dict[str, Any]:
    line = (json.dumps(fields) + "\n").encode()
    return await trio.to_thread.run_sync(call, path, line)


async def start(
    system: System, people: list[str], roster: list[str] | None = None
) -> tuple[Proc, Proc, int]:
    """KMF (state on, admin socket kmf.sock) and MDD for ``demo``; endpoints ``people``."""
    config = system.kmf_config(
        conferences={"demo": roster if roster is not None else people},
        conference_extra=FAST_REKEY,
        kmf_extra='admin_socket = "kmf.sock"\n',
    )
    kmf, port = await system.start_kmf(config)
    await kmf.wait_event(Listening, what="admin")
    mdd, mdd_port = await system.start_mdd(system.mdd_config("mdd", port))
    for name in people:
        await endpoint(system, name, mdd_port)
    return kmf, mdd, mdd_port


async def endpoint(system: System, name: str, port: int) -> Proc:
    return await system.start_endpoint(name, port, "--media", "audio", "--join-timeout", "30")


def proc(system: System, name: str, index: int = -1) -> Proc:
    return [p for p in system.procs if p.name == name][index]


async def converged(system: System, people: list[Proc]) -> int:
    """Once every one of ``people`` joined: ``perc admin rekey demo``, and every one of them
    holds the new key; its SPI."""
    for p in people:
        await p.wait_event(EndpointJoined)
    answer = await admin(system, "rekey", "demo")
    for p in people:
        await p.wait_event(EndpointEktKey, spi=answer["spi"])
    spi: int = answer["spi"]
    return spi


def digests(p: Proc) -> set[str]:
    """The one-way digests of every EKTKey an endpoint was given."""
    return {e.ekt_key for e in p.find_events(EndpointJoined)} | {
        e.ekt_key for e in p.find_events(EndpointEktKey)
    }


async def test_kick_rekeys_the_others_and_ban_survives_a_restart(system: System) -> None:
    people = ["alice", "bob", "carol"]
    kmf, mdd, port = await start(system, people)
    alice, bob, carol = (proc(system, n) for n in people)
    await converged(system, [alice, bob, carol])

    answer = await admin(system, "kick", "demo", "carol", "--ban")
    assert answer["ok"] and answer["banned"] and answer["persisted"]
    assert [k["name"] for k in answer["kicked"]] == ["carol"]

    # carol: removed by the operator, exit 10, no rejoin.
    assert await carol.wait_exit() == 10
    assert "removed by the KMF operator" in carol.error_line
    assert not carol.find_events(EndpointRejoin)

    # The others: a new key at once (the kick bypasses the rekey window) ...
    kicked = await kmf.wait_event(Kicked, conference="demo")
    assert kicked.banned and kicked.fingerprint == system.fingerprint("carol")
    rekey = await kmf.wait_event(Rekeyed, where=lambda e: "kick" in e.reason)
    assert rekey.members == 2 and rekey.spi == answer["spi"]
    for p in (alice, bob):
        got = await p.wait_event(EndpointEktKey, spi=rekey.spi)
        assert p.time_of(got) - kmf.time_of(kicked) < 1.0
    # ... that carol was never given.
    assert rekey.key not in digests(carol)
    assert rekey.key in digests(alice) and rekey.key in digests(bob)

    # Banned: a new carol is refused ...
    again = await endpoint(system, "carol", port)
    assert await again.wait_exit() == 3
    assert "access_denied" in again.error_line
    await kmf.wait_event(Denied, alert="access_denied", fingerprint=system.fingerprint("carol"))

    # ... also by a restarted KMF, which reads the ban from its state (same port: the MDD
    # reconnects to it).
    assert await system.stop(kmf) == 0
    config = system.folder / "kmf.toml"
    port_line = f'listen = "127.0.0.1:{kmf.find_events(Listening, what="tunnel")[0].port}"'
    config.write_text(config.read_text().replace('listen = "127.0.0.1:0"', port_line))
    kmf2 = await system.start(config.stem, "kmf", "--config", str(config))
    await kmf2.wait_event(Listening, what="admin")
    await mdd.wait_event(MddTunnelUp, count=2)
    third = await endpoint(system, "carol", port)
    assert await third.wait_exit() == 3
    assert "access_denied" in third.error_line
    (conf,) = (await admin(system, "conferences"))["conferences"]
    assert conf["id"] == "demo" and conf["roster"] == 2

    audit = await admin(system, "audit", "--verify")
    assert audit["verdict"]["ok"]
    events = [r["event"] for r in audit["rows"]]
    assert "kick" in events and "roster_remove" in events
    kick_row = next(r for r in audit["rows"] if r["event"] == "kick")
    assert kick_row["name"] == "carol" and kick_row["fingerprint"] == system.fingerprint("carol")


async def test_roster_add_lets_a_new_identity_in_and_remove_plus_kick_takes_it_out(
    system: System,
) -> None:
    kmf, _, port = await start(system, ["alice"], roster=["alice"])
    alice = proc(system, "alice")
    await alice.wait_event(EndpointJoined)

    dave_fp = system.fingerprint("dave")
    refused = await endpoint(system, "dave", port)
    assert await refused.wait_exit() == 3  # not on the roster yet

    answer = await admin(system, "roster", "add", "demo", dave_fp, "--name", "dave")
    assert answer["listed"] and answer["fingerprint"] == dave_fp
    dave = await endpoint(system, "dave", port)
    await dave.wait_event(EndpointJoined)
    table = await trio.run_process(
        [sys.executable, "-m", "perc", "admin", "--socket", "kmf.sock", "members", "demo"],
        cwd=system.folder, capture_stdout=True,
    )  # fmt: skip
    head, *rows = table.stdout.decode().splitlines()
    assert head.split()[:3] == ["name", "fingerprint", "association"]
    assert sorted(r.split()[0] for r in rows) == ["alice", "dave"]
    members = (await admin(system, "members", "demo"))["members"]
    assert sorted(m["name"] for m in members) == ["alice", "dave"]
    assert all("key" not in k for m in members for k in m)  # no key material

    await admin(system, "roster", "remove", "demo", dave_fp)
    assert await admin(system, "kick", "demo", dave_fp)  # by fingerprint
    assert await dave.wait_exit() == 10
    again = await endpoint(system, "dave", port)
    assert await again.wait_exit() == 3
    assert kmf.find_events(Kicked, fingerprint=dave_fp)


async def test_errors_keep_the_connection_and_the_mdd_answers(system: System) -> None:
    config = system.kmf_config(
        conferences={"demo": ["alice"]}, kmf_extra='admin_socket = "kmf.sock"\n'
    )
    kmf, port = await system.start_kmf(config)
    await kmf.wait_event(Listening, what="admin")
    mdd_config = system.mdd_config("mdd", port, mdd_extra='admin_socket = "mdd.sock"\n')
    mdd, _ = await system.start_mdd(mdd_config)
    await mdd.wait_event(Listening, what="admin")
    path = system.folder / "kmf.sock"
    assert path.stat().st_mode & 0o777 == 0o600

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(path))
        answers = sock.makefile("rb")
        for line in (b"not json\n", b'{"op": "nope"}\n', b'{"op": "members", "conference": "x"}\n',
                     b'{"op": "kick", "conference": "demo", "who": "nobody"}\n',
                     b'{"op": "status"}\n'):  # fmt: skip
            sock.sendall(line)
            answer = json.loads(answers.readline())
            assert answer["ok"] is False and answer["error"], answer
        sock.sendall(b'{"op": "conferences"}\n')
        assert json.loads(answers.readline())["ok"] is True  # still open
        sock.sendall(b"x" * (70 * 1024))
        answer = json.loads(answers.readline())
        assert answer["ok"] is False and "longer than" in answer["error"]
        assert answers.readline() == b""  # closed

    status = await request(system.folder / "mdd.sock", op="status")
    (conf,) = status["conferences"]
    assert conf["id"] == "demo" and conf["tunnel_up"] is True and "counters" in conf
    links = await request(system.folder / "mdd.sock", op="links", conference="demo")
    assert links["links"] == []
    refused = await request(system.folder / "mdd.sock", op="kick", conference="demo", who="x")
    assert refused["ok"] is False

    # Another KMF on the live socket, or a regular file at the path: exit 2, one line.
    (system.folder / "file.sock").write_text("")
    for name, what in (("kmf.sock", "another process listens"), ("file.sock", "not a socket")):
        other = system.folder / "kmf2.toml"
        other.write_text(config.read_text().replace('"kmf.sock"', f'"{name}"'))
        done = await trio.run_process(
            [sys.executable, "-m", "perc", "kmf", "--config", str(other)],
            cwd=system.folder, capture_stdout=True, capture_stderr=True, check=False,
        )  # fmt: skip
        lines = done.stderr.decode().splitlines()
        assert done.returncode == 2 and len(lines) == 1 and what in lines[0], lines
