"""D27 workers without processes: the plan a worker gets, the mesh's links, which worker runs
each external link and the BPF program that steers its peer's datagrams there (run here by a
small classic-BPF interpreter, and once by the kernel on loopback sockets), the restart policy,
``[mdd] workers`` and ``--workers`` (config and usage errors exit 2)."""

from __future__ import annotations

import ipaddress
import select
import socket
import struct
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from perc import config, workers
from perc.cli import main
from perc.config import ConfigError
from perc.workers import (
    MESH_GROUP,
    RESTART_MAX,
    RESTART_MIN,
    SKF_NET_OFF,
    STABLE_AFTER,
    STEER_BY_HASH,
    ConferencePlan,
    ExternalLink,
    RestartPolicy,
    WorkerPlan,
    WorkerPlanError,
    link_owners,
    links_elsewhere,
    mesh_links,
    owned_links,
    steering_program,
)

from .test_config import ids, mdd_toml  # noqa: F401 (the fixture)

FP = "sha-256 " + ":".join(["AB"] * 32)


def plan(index: int = 0, count: int = 3) -> WorkerPlan:
    mesh = tuple(("127.0.0.1", 40000 + i) for i in range(count))
    return WorkerPlan(index, count, 3, {"demo": ConferencePlan(5, 6, mesh)})


LINKS = (
    ExternalLink(("192.0.2.7", 5004), FP, True, "192.0.2.7:5004", 0),
    ExternalLink(("2001:db8::7", 5004, 0, 0), FP, False, "[2001:db8::7]:5004", 1),
)


def test_a_plan_goes_through_json() -> None:
    p = plan(1)
    assert WorkerPlan.from_json(p.to_json()) == p
    mesh = p.conferences["demo"].mesh
    linked = WorkerPlan(1, 3, 3, {"demo": ConferencePlan(5, 6, mesh, LINKS)})
    assert WorkerPlan.from_json(linked.to_json()) == linked


@pytest.mark.parametrize(
    "text",
    [
        "",
        "[]",
        "{}",
        '{"index": 0, "count": 1, "parent_fd": 3, "conferences": []}',
        '{"index": "0", "count": 1, "parent_fd": 3, "conferences": {}}',
        '{"index": true, "count": 1, "parent_fd": 3, "conferences": {}}',
        '{"index": 1, "count": 1, "parent_fd": 3, "conferences": {}}',
        '{"index": 0, "count": 2, "parent_fd": 3, "conferences": {"d": '
        '{"listen_fd": 4, "mesh_fd": 5, "mesh": [["127.0.0.1", 1]]}}}',
        '{"index": 0, "count": 1, "parent_fd": 3, "conferences": {"d": '
        '{"listen_fd": 4, "mesh_fd": 5, "mesh": [1]}}}',
        *(
            '{"index": 0, "count": 1, "parent_fd": 3, "conferences": {"d": {"listen_fd": 4, '
            '"mesh_fd": 5, "mesh": [["127.0.0.1", 1]], "links": [' + link + "]}}}"
            for link in (
                '{"peer": ["192.0.2.7", 1], "fingerprint": "x", "connect": true, "name": "n", '
                '"owner": 1}',
                '{"peer": ["192.0.2.7", 1], "fingerprint": "x", "connect": 1, "name": "n", '
                '"owner": 0}',
                '{"peer": [7, 1], "fingerprint": "x", "connect": true, "name": "n", "owner": 0}',
                '{"peer": [], "fingerprint": "x", "connect": true, "name": "n", "owner": 0}',
                '{"peer": ["h"], "fingerprint": "x", "connect": true, "name": "n", "owner": 0}',
                '{"peer": ["192.0.2.7", 1], "connect": true, "name": "n", "owner": 0}',
            )
        ),
    ],
)
def test_a_bad_plan_is_one_error(text: str) -> None:
    with pytest.raises(WorkerPlanError) as e:
        WorkerPlan.from_json(text)
    assert str(e.value).startswith("bad worker plan: ")


def test_the_mesh_links_every_other_worker_once_and_the_lower_index_dials() -> None:
    for me in range(3):
        links = mesh_links(plan(me), "demo", FP)
        assert [link.peer for link in links] == [
            ("127.0.0.1", 40000 + j) for j in range(3) if j != me
        ]
        for link in links:
            j = link.peer[1] - 40000
            assert link.connect == (me < j)
            assert link.fingerprint == FP and link.group == MESH_GROUP
            assert link.name == f"worker{me}>worker{j}"


def test_each_external_link_has_one_owner_and_conferences_spread_theirs() -> None:
    assert link_owners(2, 3) == [0, 1, 0]
    assert link_owners(3, 2, first=2) == [2, 0]
    assert link_owners(1, 4, first=5) == [0, 0, 0, 0]
    with pytest.raises(ValueError):
        link_owners(0, 1)
    links = tuple(
        ExternalLink(("192.0.2.7", 5000 + k), FP, k % 2 == 0, f"peer{k}", owner)
        for k, owner in enumerate(link_owners(3, 5))
    )
    mesh = tuple(("127.0.0.1", 40000 + i) for i in range(3))
    runs: list[str] = []
    for me in range(3):
        specs = owned_links(WorkerPlan(me, 3, 3, {"demo": ConferencePlan(5, 6, mesh, links)}),
                            "demo")  # fmt: skip
        for spec in specs:
            link = next(x for x in links if x.name == spec.name)
            assert link.owner == me
            assert (spec.peer, spec.fingerprint, spec.connect) == (
                link.peer, link.fingerprint, link.connect,
            )  # fmt: skip
            assert spec.group is None  # not the mesh's group: mesh media goes out over it
        runs += [spec.name for spec in specs]
        plan = WorkerPlan(me, 3, 3, {"demo": ConferencePlan(5, 6, mesh, links)})
        others = links_elsewhere(plan, "demo")
        assert sorted(others) == sorted(x.peer for x in links if x.owner != me)
    assert sorted(runs) == sorted(x.name for x in links)  # every link, by exactly one worker


def test_dtls_from_a_link_another_worker_runs_is_dropped_not_relayed() -> None:
    # Steering missed (an IPv6 datagram with extension headers goes by the hash): the worker
    # that got the peer's ClientHello must not take it for an endpoint joining.
    from perc.forwarding import ForwardingConfig
    from perc.identity import generate
    from perc.mdd import MddEngine
    from tests.forwarding.helpers import client_hello

    peer = ("192.0.2.7", 5004)
    engine = MddEngine(
        "demo", kmf="127.0.0.1:4444", forwarding=ForwardingConfig(), idle_timeout=10.0,
        stats_interval=10.0, identity=generate("mdd"),
    )  # fmt: skip
    engine.link_elsewhere(peer)
    engine.receive_datagram(client_hello(), peer, 0.0)
    assert engine.stats.dropped_link_elsewhere == 1
    assert engine.tunnel_messages_to_send() == [] and engine.datagrams_to_send() == []
    # An endpoint's goes the usual way (no tunnel yet here: counted as such).
    engine.receive_datagram(client_hello(), ("192.0.2.8", 5004), 0.0)
    assert engine.stats.dropped_link_elsewhere == 1 and engine.stats.dropped_no_tunnel == 1


def test_an_external_link_on_one_worker_serves_every_worker() -> None:
    """D26/D27 in memory: MDD A's workers w0 and w1 (a mesh link, MESH_GROUP), w0 owns the
    external link to MDD B (no group). Each stream crosses the external link once, both ways,
    whichever worker its sender is on; feedback about B's SSRC goes w1 -> w0 -> B."""
    from perc.wire.rtcp import Pli, SenderReport

    from .forwarding.test_links import Net

    net = Net()
    w0, w1, b = net.mdd(1), net.mdd(2), net.mdd(9)
    net.link(w0, w1, group=MESH_GROUP)
    net.link(w0, b)
    (e0,) = net.endpoints_on(w0, 1, 100)
    (e1,) = net.endpoints_on(w1, 1, 200)
    (eb,) = net.endpoints_on(b, 1, 900)
    net.send(e1.address, e1.send(1.0))  # w1 -> mesh -> w0 -> link -> B
    assert net.hops == [(w1, w0), (w0, b)]
    assert len(e0.got) == len(eb.got) == 1
    net.hops.clear()
    net.send(eb.address, eb.send(1.0))  # B -> link -> w0 -> mesh -> w1
    assert net.hops == [(b, w0), (w0, w1)]
    assert len(e0.got) == 2 and len(e1.got) == 1  # e1's earlier packet and eb's
    net.hops.clear()
    net.send(e0.address, e0.send(1.0))  # the owner's own endpoint: to w1 and to B, once each
    assert sorted(net.hops) == sorted([(w0, w1), (w0, b)])
    net.hops.clear()
    pli = SenderReport(e1.ssrc, 0, 0, 0, 0, ()).serialize() + Pli(e1.ssrc, eb.ssrc).serialize()
    net.send(e1.address, e1.send_rtcp(pli))
    assert (w1, w0) in net.hops and (w0, b) in net.hops
    assert any(isinstance(p, Pli) and p.media_ssrc == eb.ssrc for p in eb.rtcp[-1])
    assert not any(t.loop_reports for t in net.tables.values())


# --- the steering program -----------------------------------------------------------------------


def run_cbpf(program: bytes, packet: bytes, payload_at: int) -> int:
    """A classic BPF interpreter for the instructions the steering program uses, as the kernel
    runs a reuseport program: offsets >= 0 are in the UDP payload (at ``payload_at`` in
    ``packet``), offsets from SKF_NET_OFF in the IP header (``packet`` starts there); a load
    out of the packet ends the program with 0."""
    insns = [struct.unpack("=HBBI", program[i : i + 8]) for i in range(0, len(program), 8)]
    a = x = 0
    mem = [0] * 16
    pc = 0

    def load(k: int, size: int) -> int | None:
        k = k - (1 << 32) if k >= 1 << 31 else k
        at = k - SKF_NET_OFF if SKF_NET_OFF <= k < 0 else payload_at + k if k >= 0 else -1
        if at < 0 or at + size > len(packet):
            return None
        return int.from_bytes(packet[at : at + size], "big")

    while True:
        code, jt, jf, k = insns[pc]
        pc += 1
        size = {0x00: 4, 0x08: 2, 0x10: 1}[code & 0x18]
        if code in (0x20, 0x28, 0x30, 0x48):  # ld [k] / ld [x + k]
            value = load(k + (x if code == 0x48 else 0), size)
            if value is None:
                return 0
            a = value
        elif code == 0x60:
            a = mem[k]
        elif code == 0x02:
            mem[k] = a
        elif code == 0x54:
            a &= k
        elif code == 0x64:
            a = (a << k) & 0xFFFFFFFF
        elif code == 0x74:
            a >>= k
        elif code == 0x07:
            x = a
        elif code == 0x87:
            a = x
        elif code == 0x05:
            pc += k
        elif code == 0x15:
            pc += jt if a == k else jf
        elif code == 0x06:
            return k
        else:  # pragma: no cover - the program uses nothing else
            raise AssertionError(f"opcode {code:#x}")


def udp_packet(
    src: str, sport: int, *, options: int = 0, next_header: int = 17
) -> tuple[bytes, int]:
    """An IP + UDP datagram from ``src``:``sport`` (IPv4 with ``options`` words of options,
    or IPv6 with ``next_header``) and where its payload starts."""
    ip = ipaddress.ip_address(src)
    udp = struct.pack("!HHHH", sport, 5004, 8 + 4, 0) + b"\x80abc"
    if ip.version == 4:
        ihl = 5 + options
        header = bytes([0x40 | ihl, 0]) + struct.pack("!HHHBBH", 20, 0, 0, 64, 17, 0)
        header += ip.packed + bytes([198, 51, 100, 1]) + b"\x01" * 4 * options
        return header + udp, 4 * ihl + 8
    header = b"\x60\x00\x00\x00" + struct.pack("!HBB", 12, next_header, 64)
    header += ip.packed + ipaddress.ip_address("2001:db8::1").packed
    return header + udp, 48


PEERS: Sequence[tuple[tuple[Any, ...], int]] = (
    (("192.0.2.7", 5004), 1),
    (("192.0.2.8", 6000), 0),
    (("2001:db8::7", 5004, 0, 0), 2),
    (("::ffff:203.0.113.9", 7000, 0, 0), 1),  # an IPv4 peer as an IPv6 socket reports it
)


@pytest.mark.parametrize(
    ("src", "sport", "options", "next_header", "expected"),
    [
        ("192.0.2.7", 5004, 0, 17, 1),
        ("192.0.2.7", 5004, 2, 17, 1),  # IPv4 options: the UDP header comes later
        ("192.0.2.8", 6000, 0, 17, 0),
        ("2001:db8::7", 5004, 0, 17, 2),
        ("203.0.113.9", 7000, 0, 17, 1),
        ("192.0.2.7", 5005, 0, 17, STEER_BY_HASH),  # the peer's host, another port
        ("192.0.2.9", 5004, 0, 17, STEER_BY_HASH),  # the peer's port, another host
        ("192.0.2.8", 5004, 0, 17, STEER_BY_HASH),  # one peer's host, another's port
        ("2001:db8::8", 5004, 0, 17, STEER_BY_HASH),
        ("2001:db8::7", 5004, 0, 0, STEER_BY_HASH),  # an extension header: the hash decides
        ("::ffff:192.0.2.7", 5004, 0, 17, STEER_BY_HASH),  # IPv6 on the wire is not IPv4
    ],
)
def test_the_program_steers_each_link_peer_to_its_owner_and_the_rest_to_the_hash(
    src: str, sport: int, options: int, next_header: int, expected: int
) -> None:
    program = steering_program(PEERS)
    packet, payload_at = udp_packet(src, sport, options=options, next_header=next_header)
    assert run_cbpf(program, packet, payload_at) == expected


def test_a_program_without_peers_steers_everything_to_the_hash() -> None:
    program = steering_program([])
    for src in ("192.0.2.7", "2001:db8::7"):
        assert run_cbpf(program, *udp_packet(src, 5004)) == STEER_BY_HASH
    # Neither IPv4 nor IPv6 (cannot happen on a UDP socket): the hash.
    assert run_cbpf(program, b"\x10" + bytes(60), 60) == STEER_BY_HASH


def test_a_program_refuses_a_host_name_and_too_many_peers() -> None:
    with pytest.raises(ValueError):
        steering_program([(("mdd.example", 5004), 0)])
    many = [((f"2001:db8::{i:x}", 5004, 0, 0), 0) for i in range(400)]
    with pytest.raises(ValueError, match="BPF instructions"):
        steering_program(many)


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.parametrize(
    ("listen", "sender"),
    [
        ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET, "127.0.0.1")),
        ((socket.AF_INET6, "::1"), (socket.AF_INET6, "::1")),
        ((socket.AF_INET6, "::"), (socket.AF_INET, "127.0.0.1")),  # dual stack: ::ffff:...
    ],
)
def test_the_kernel_runs_the_program_on_a_reuseport_group(
    listen: tuple[socket.AddressFamily, str], sender: tuple[socket.AddressFamily, str]
) -> None:
    """Two SO_REUSEPORT sockets and the program attached as the supervisor does: a peer's
    datagrams reach its owner's socket whichever owner it has, everyone else's are spread by
    the hash (both sockets get some of 32 senders)."""
    from perc.roles.workers import attach_steering

    if socket.AF_INET6 in (listen[0], sender[0]) and not _ipv6_loopback():
        pytest.skip("no IPv6 loopback here")
    for owner in (0, 1):
        group: list[socket.socket] = []
        senders = [socket.socket(sender[0], socket.SOCK_DGRAM) for _ in range(32)]
        try:
            for _ in range(2):
                sock = socket.socket(listen[0], socket.SOCK_DGRAM)
                group.append(sock)
                if listen[0] == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                sock.bind((listen[1], group[0].getsockname()[1] if len(group) > 1 else 0))
                sock.setblocking(False)
            for s in senders:
                s.bind((sender[1], 0))
            to = (sender[1], group[0].getsockname()[1])
            # The peer as recvfrom on the group reports it (the supervisor's getaddrinfo).
            peer = socket.getaddrinfo(
                *senders[5].getsockname()[:2], family=listen[0], type=socket.SOCK_DGRAM,
                flags=socket.AI_V4MAPPED,
            )[0][4]  # fmt: skip
            attach_steering(group[0], steering_program([(peer, owner)]))
            for _ in range(3):
                for s in senders:
                    s.sendto(b"x", to)
            got: list[set[tuple[Any, ...]]] = [set(), set()]
            count = 0
            while count < 3 * len(senders):
                ready, _, _ = select.select(group, [], [], 10.0)
                assert ready, f"{count} datagrams arrived"
                for sock in ready:
                    i = group.index(sock)
                    while True:
                        try:
                            got[i].add(sock.recvfrom(16)[1])
                        except BlockingIOError:
                            break
                        count += 1
            assert peer in got[owner] and peer not in got[1 - owner], (peer, got)
            assert got[0] and got[1] and not got[0] & got[1]  # the others: by the hash
        finally:
            for s in group + senders:
                s.close()


def linked_config(ids: dict[str, Any], workers: int) -> config.MddConfig:  # noqa: F811
    """Two conferences on ports the kernel picks, with 1 and 2 external links."""
    data = tomllib.loads(mdd_toml(ids))
    data["mdd"]["workers"] = workers
    first = dict(data["conference"][0], listen="127.0.0.1:0")
    first["link"] = [{"peer": "127.0.0.1:7000", "fingerprint": FP, "connect": True}]
    second = dict(first, id="other")
    second["link"] = [
        {"peer": "127.0.0.1:7001", "fingerprint": FP, "connect": False},
        {"peer": "localhost:7002", "fingerprint": FP, "connect": True},
    ]
    data["conference"] = [first, second]
    return config.build_mdd_config(data, base=ids["dir"])


def test_the_supervisor_plans_each_link_with_its_owner_and_steers_the_group(
    ids: dict[str, Any],  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import perc.roles.workers as roles

    attached: list[tuple[int, bytes]] = []
    monkeypatch.setattr(roles, "attach_steering", lambda sock, prog: attached.append(
        (sock.getsockname()[1], prog)
    ))  # fmt: skip
    sup = roles.Supervisor(linked_config(ids, 2), ["true"])
    try:
        sup.bind()
        demo = [p.conferences["demo"] for p in sup._plans]
        other = [p.conferences["other"] for p in sup._plans]
        # The links of both conferences spread over the workers, every plan knows them all.
        assert [x.owner for x in demo[0].links] == [0]
        assert [x.owner for x in other[0].links] == [1, 0]
        assert all(p.links == demo[0].links for p in demo)
        assert [x.peer for x in other[0].links] == [("127.0.0.1", 7001), ("127.0.0.1", 7002)]
        assert other[1].links[1].name == "localhost:7002"  # the config's words, resolved
        # One program per conference, on its group, in the config's order.
        assert [prog for _, prog in attached] == [
            steering_program([(("127.0.0.1", 7000), 0)]),
            steering_program([(("127.0.0.1", 7001), 1), (("127.0.0.1", 7002), 0)]),
        ]
        assert attached[0][0] != attached[1][0]
        for i in range(2):  # a worker's plan names its own links only, and survives JSON
            back = WorkerPlan.from_json(sup._plans[i].to_json())
            assert [s.peer for s in owned_links(back, "other")] == [
                x.peer for x in other[0].links if x.owner == i
            ]
    finally:
        sup.close()


def test_a_kernel_that_refuses_the_program_is_a_config_error(
    ids: dict[str, Any],  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import errno

    import perc.roles.workers as roles

    def refuse(sock: socket.socket, program: bytes) -> None:
        raise OSError(errno.ENOPROTOOPT, "Protocol not available")

    monkeypatch.setattr(roles, "attach_steering", refuse)
    sup = roles.Supervisor(linked_config(ids, 2), ["true"])
    try:
        with pytest.raises(ConfigError) as e:
            sup.bind()
    finally:
        sup.close()
    assert str(e.value) == (
        "conference demo: cannot steer its [[conference.link]] peers to one of 2 workers "
        "(SO_ATTACH_REUSEPORT_CBPF: Protocol not available); run it with workers = 1"
    )


def test_restarts_back_off_and_reset_after_a_stable_run() -> None:
    policy = RestartPolicy()
    policy.started(0, 0.0)
    delays = []
    now = 0.0
    for _ in range(10):
        delay = policy.exited(0, now, -9)
        assert delay is not None
        delays.append(delay)
        now += delay
        policy.started(0, now)
    assert delays[0] == RESTART_MIN and delays[1] == 2 * RESTART_MIN
    assert max(delays) == RESTART_MAX == delays[-1]
    assert policy.restarts(0) == 10 and policy.restarts(1) == 0
    # A worker that ran long enough starts over from the shortest delay.
    assert policy.exited(0, now + STABLE_AFTER, 1) == RESTART_MIN
    # Another worker has its own schedule; a refused configuration is not restarted.
    assert policy.exited(1, now, -9) == RESTART_MIN
    assert policy.exited(1, now, 2) is None


def test_workers_in_the_config(ids: dict[str, Any]) -> None:  # noqa: F811
    data = tomllib.loads(mdd_toml(ids))
    assert config.build_mdd_config(data, base=ids["dir"]).mdd.workers == 1
    data["mdd"]["workers"] = 4
    cfg = config.build_mdd_config(data, base=ids["dir"])
    assert cfg.mdd.workers == 4
    assert config.with_workers(cfg, 2).mdd.workers == 2


def test_workers_serve_a_conference_with_links(ids: dict[str, Any]) -> None:  # noqa: F811
    data = tomllib.loads(mdd_toml(ids))
    data["mdd"]["workers"] = 2
    data["conference"][0]["link"] = [{"peer": "127.0.0.1:7000", "fingerprint": FP, "connect": True}]
    cfg = config.build_mdd_config(data, base=ids["dir"])
    assert cfg.mdd.workers == 2 and len(cfg.conferences[0].link) == 1
    assert config.with_workers(cfg, 3).mdd.workers == 3


@pytest.mark.parametrize(
    ("workers", "message"),
    [(0, "mdd.workers: must be >= 1, got 0"), (-1, "mdd.workers: must be >= 1, got -1")],
)
def test_bad_workers(ids: dict[str, Any], workers: int, message: str) -> None:  # noqa: F811
    data = tomllib.loads(mdd_toml(ids))
    data["mdd"]["workers"] = workers
    with pytest.raises(ConfigError) as e:
        config.build_mdd_config(data, base=ids["dir"])
    assert str(e.value) == message


def _mdd_cli(
    ids: dict[str, Any],  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
    text: str | None = None,
) -> tuple[Path, list[Any]]:
    """An mdd.toml (``text``, else the usual one) and the list of what ``perc mdd`` would have
    run (``_run_role`` records its arguments instead)."""
    import perc.cli

    started: list[Any] = []
    monkeypatch.setattr(perc.cli, "_run_role", lambda *a: started.append(a))
    path = ids["dir"] / "mdd-workers.toml"
    path.write_text(mdd_toml(ids) if text is None else text)
    return path, started


@pytest.mark.parametrize("value", ["0", "-3"])
def test_workers_option_below_one_exits_2(
    ids: dict[str, Any],  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
    value: str,
) -> None:
    path, started = _mdd_cli(ids, monkeypatch)
    result = CliRunner().invoke(main, ["mdd", "--config", str(path), "--workers", value])
    assert result.exit_code == 2
    assert result.stderr == f"perc: error: --workers: must be >= 1, got {value}\n"
    assert started == []


def test_a_bad_worker_plan_exits_2(
    ids: dict[str, Any],  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    path, started = _mdd_cli(ids, monkeypatch)
    other = WorkerPlan(0, 1, 3, {"other": ConferencePlan(4, 5, (("127.0.0.1", 1),))})
    for text, error in (
        ("{", "bad worker plan: "),
        (other.to_json(), "bad worker plan: conferences demo, other do not match"),
    ):
        result = CliRunner().invoke(main, ["mdd", "--config", str(path), "--worker-plan", text])
        assert result.exit_code == 2
        assert result.stderr.startswith(f"perc: error: {error}"), result.stderr
    assert started == []


def test_one_worker_runs_the_mdd_itself(
    ids: dict[str, Any],  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """workers = 1 (the default) is the MDD as before: no supervisor."""
    from perc.roles import mdd

    path, started = _mdd_cli(ids, monkeypatch)
    result = CliRunner().invoke(main, ["mdd", "--config", str(path), "--workers", "1"])
    assert result.exit_code == 0, result.output
    assert started[0][0].func is mdd.serve  # functools.partial(serve, freeze_heap=True)


@pytest.mark.parametrize("extra", [["--metrics", "127.0.0.1:0"], []])
def test_workers_with_metrics_or_an_admin_socket_exit_2(
    ids: dict[str, Any],  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
    extra: list[str],
) -> None:
    """Every worker would bind the metrics port and the admin socket: refused, one line."""
    text = mdd_toml(ids)
    if not extra:
        text = text.replace("[mdd]\n", '[mdd]\nadmin_socket = "mdd.sock"\n', 1)
    path, started = _mdd_cli(ids, monkeypatch, text)
    result = CliRunner().invoke(main, ["mdd", "--config", str(path), "--workers", "2", *extra])
    assert result.exit_code == 2, result.output
    assert "cannot be combined with mdd.metrics or mdd.admin_socket" in result.stderr
    assert started == []


# --- mesh batches (UDP GSO/GRO) ------------------------------------------------------------------


def _cut(runs: list[tuple[bytes, int]]) -> list[bytes]:
    """What the kernel makes of GSO sends: each buffer cut into its segment size."""
    return [b[i : i + size] for b, size in runs for i in range(0, len(b), size)]


def test_gso_runs_keep_order_and_cut_back_into_the_same_datagrams() -> None:
    sizes = [200, 200, 200, 150, 200, 300, 300, 1200, 1200, 1199, 1200, 60, 60]
    datagrams = [bytes([i]) * n for i, n in enumerate(sizes)]
    runs = workers.gso_runs(datagrams)
    assert _cut(runs) == datagrams
    for buffer, size in runs:
        segments = [buffer[i : i + size] for i in range(0, len(buffer), size)]
        assert all(len(s) == size for s in segments[:-1]) and len(segments[-1]) <= size
    # A shorter datagram ends its run; a longer one starts a new run.
    assert [(len(b), s) for b, s in runs] == [
        (750, 200), (200, 200), (600, 300), (3599, 1200), (1260, 1200), (60, 60)
    ]  # fmt: skip


def test_gso_runs_respect_the_segment_and_byte_limits() -> None:
    runs = workers.gso_runs([b"x" * 100] * 40, max_segments=16)
    assert [len(b) // s for b, s in runs] == [16, 16, 8]
    big = workers.gso_runs([b"y" * 9000] * 10)
    assert all(len(b) <= workers.GSO_MAX_BYTES for b, _ in big)
    assert _cut(big) == [b"y" * 9000] * 10
    assert workers.gso_runs([]) == []


def test_gro_segments_split_by_the_size_the_kernel_reports() -> None:
    data = b"a" * 200 + b"b" * 200 + b"c" * 150
    control = [(workers.SOL_UDP, workers.UDP_GRO, struct.pack("=i", 200))]
    assert workers.gro_segments(data, control) == [b"a" * 200, b"b" * 200, b"c" * 150]
    assert workers.gro_segments(data, []) == [data]  # not coalesced: one datagram
    one = [(workers.SOL_UDP, workers.UDP_GRO, struct.pack("=i", 550))]
    assert workers.gro_segments(data, one) == [data]
    assert workers.gso_control(200) == (
        workers.SOL_UDP,
        workers.UDP_SEGMENT,
        struct.pack("=H", 200),
    )


def test_this_kernel_coalesces_a_gso_send_for_a_gro_socket() -> None:
    # What the mesh relies on, on the kernel at hand (loopback): one GSO send arrives as one
    # coalesced receive on a socket with UDP_GRO, and as separate datagrams on one without.
    datagrams = [bytes([i]) * 300 for i in range(5)] + [b"z" * 120]
    ((buffer, size),) = workers.gso_runs(datagrams)
    with (
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as tx,
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as gro,
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as plain,
    ):
        for s in (gro, plain):
            s.bind(("127.0.0.1", 0))
            s.settimeout(5)
        gro.setsockopt(workers.SOL_UDP, workers.UDP_GRO, 1)
        tx.sendmsg([buffer], [workers.gso_control(size)], 0, gro.getsockname())
        data, control, _, _ = gro.recvmsg(65535, socket.CMSG_SPACE(4))
        assert workers.gro_segments(data, control) == datagrams
        tx.sendmsg([buffer], [workers.gso_control(size)], 0, plain.getsockname())
        assert [plain.recv(65535) for _ in datagrams] == datagrams
