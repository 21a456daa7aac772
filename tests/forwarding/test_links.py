"""Forwarding over cascade links (D26), in memory: several ForwardingTables joined by links.

Each table is one MDD; a link is a table entry made by ``add_link`` with the single-layer
keys its DTLS would export (random here, mirrored on the two sides). :class:`Net` carries what
each table outputs: to a local endpoint (verified end to end) or over a link into the peer
table, with the sending MDD's address as the source.
"""

from __future__ import annotations

import os
import uuid

from perc.forwarding import ForwardingConfig, ForwardingTable
from perc.wire.rtcp import Pli, SenderReport

from .helpers import Address, Endpoint, conference, new_params

Keys = tuple[bytes, bytes]


def _keys() -> Keys:
    return os.urandom(16), os.urandom(12)


class Net:
    """MDDs (tables) by address, their endpoints, and the links between them."""

    def __init__(self) -> None:
        self.tables: dict[Address, ForwardingTable[Address]] = {}
        self.endpoints: dict[Address, Endpoint] = {}
        self.hops: list[tuple[Address, Address]] = []  # (from MDD, to MDD) per link datagram
        self.params = new_params()
        self.links: dict[tuple[Address, Address], uuid.UUID] = {}

    def mdd(self, n: int, config: ForwardingConfig | None = None) -> Address:
        addr = (f"10.0.0.{n}", 5004)
        self.tables[addr] = ForwardingTable(config)
        return addr

    def endpoints_on(self, mdd: Address, count: int, first_port: int) -> list[Endpoint]:
        eps = conference(
            self.tables[mdd], count, first_port=first_port, params=self.params,
            first_name=chr(ord("a") + first_port // 100 % 26),
        )  # fmt: skip
        for ep in eps:
            ep.ssrc = 0x10000 + first_port + eps.index(ep)
            self.endpoints[ep.address] = ep
        return eps

    def link(self, x: Address, y: Address, *, group: str | None = None) -> None:
        kxy, kyx = _keys(), _keys()
        for a, b, inbound, outbound in ((x, y, kyx, kxy), (y, x, kxy, kyx)):
            aid = uuid.uuid4()
            self.tables[a].add_link(
                aid, b, 0.0, inbound=inbound, outbound=outbound, name=f"{b[0]}", group=group
            )
            self.links[(a, b)] = aid

    def unlink(self, x: Address, y: Address) -> None:
        for a, b in ((x, y), (y, x)):
            self.tables[a].remove(self.links.pop((a, b)))

    def send(self, source: Address, data: bytes, now: float = 1.0) -> None:
        """``data`` arrives at the MDD ``mdd_of(source)`` from ``source``; run to quiescence."""
        pending = [(self.mdd_of(source), source, data)]
        while pending:
            mdd, src, datagram = pending.pop(0)
            for dest, out in self.tables[mdd].handle_datagram(src, datagram, now):
                if dest in self.tables:
                    self.hops.append((mdd, dest))
                    pending.append((dest, mdd, out))
                else:
                    self.endpoints[dest].deliver(out, now)

    def mdd_of(self, endpoint: Address) -> Address:
        for addr, table in self.tables.items():
            if table.association_for(endpoint) is not None:
                return addr
        raise AssertionError(endpoint)

    def counters(self, mdd: Address, peer: Address) -> dict[str, int]:
        return self.tables[mdd].associations[self.links[(mdd, peer)]].counters.as_dict()


def chain() -> tuple[Net, Address, Address, Address]:
    net = Net()
    a, b, c = net.mdd(1), net.mdd(2), net.mdd(3)
    net.link(a, b)
    net.link(b, c)
    return net, a, b, c


def test_media_crosses_the_chain_everywhere_and_never_goes_back() -> None:
    net, a, b, c = chain()
    (a1,) = net.endpoints_on(a, 1, 100)
    (b1,) = net.endpoints_on(b, 1, 200)
    (c1, c2) = net.endpoints_on(c, 2, 300)
    for _ in range(3):
        net.send(a1.address, a1.send(1.0))
    # a1's packets: A -> B (link), B -> b1 and B -> C, C -> c1, c2; never back over a link.
    assert net.hops.count((a, b)) == net.hops.count((b, c)) == 3
    assert (b, a) not in net.hops and (c, b) not in net.hops
    for ep in (b1, c1, c2):
        assert len(ep.got) == 3  # each verified end to end (deliver raises otherwise)
    assert not a1.got
    net.hops.clear()
    net.send(c1.address, c1.send(1.0))
    assert net.hops == [(c, b), (b, a)]
    assert len(a1.got) == len(b1.got) - 3 == len(c2.got) - 3 == 1
    # Per-link counters: what crossed each way.
    ab = net.counters(a, b)
    assert ab["packets_out"] == 3 and ab["packets_in"] == 1
    cb = net.counters(c, b)
    assert cb["packets_in"] == 3 and cb["packets_out"] == 1


def test_a_cycle_is_a_loop_the_later_direction_is_dropped() -> None:
    net, a, b, c = chain()
    net.link(c, a)  # not a tree: a1's SSRC reaches C from B and from A
    (a1,) = net.endpoints_on(a, 1, 100)
    (c1,) = net.endpoints_on(c, 1, 300)
    net.send(a1.address, a1.send(1.0))
    net.send(a1.address, a1.send(1.0))
    assert len(c1.got) == 2  # once per packet, never twice
    table = net.tables[c]
    # One direction owns a1's SSRC at C; the other's copies are counted as drop_loop.
    loops = net.counters(c, a)["drop_loop"] + net.counters(c, b)["drop_loop"]
    assert loops >= 2
    reports = [r for r in table.loop_reports if r[0] == a1.ssrc]
    assert len(reports) == 1  # one warning per SSRC
    _, owner, refused = reports[0]
    assert {owner.link, refused.link} == {"10.0.0.1", "10.0.0.2"}


def test_a_link_cannot_bring_an_ssrc_a_local_endpoint_owns() -> None:
    net = Net()
    b, d = net.mdd(2), net.mdd(4)
    (b1, b2) = net.endpoints_on(b, 2, 200)
    net.send(b1.address, b1.send(1.0))  # b1 owns its SSRC at B
    net.link(b, d)  # D has not seen b1's SSRC
    (d1,) = net.endpoints_on(d, 1, 400)
    before = len(b2.got)
    net.send(d1.address, d1.send(1.0, ssrc=b1.ssrc))  # d1 sends with b1's SSRC
    assert len(b2.got) == before  # B dropped it: the link may not introduce it
    assert net.counters(b, d)["drop_loop"] == 1
    ((ssrc, owner, refused),) = net.tables[b].loop_reports
    assert ssrc == b1.ssrc and owner.link is None and refused.link == "10.0.0.4"


def test_ownership_ends_when_the_link_goes_down() -> None:
    net, a, b, _ = chain()
    (a1,) = net.endpoints_on(a, 1, 100)
    (b1,) = net.endpoints_on(b, 1, 200)
    net.send(a1.address, a1.send(1.0))
    table = net.tables[b]
    assert table.associations[net.links[(b, a)]].ssrcs == {a1.ssrc}
    net.unlink(a, b)
    assert len(b1.got) == 1
    # The SSRC is free again: a new link (a peer restart) brings it back.
    net.link(a, b)
    net.send(a1.address, a1.send(1.0))
    assert len(b1.got) == 2
    assert table.associations[net.links[(b, a)]].ssrcs == {a1.ssrc}


def test_rtcp_sr_follows_media_and_feedback_goes_toward_the_owner() -> None:
    net, a, b, c = chain()
    (a1,) = net.endpoints_on(a, 1, 100)
    (b1,) = net.endpoints_on(b, 1, 200)
    (c1,) = net.endpoints_on(c, 1, 300)
    for ep in (a1, b1, c1):
        net.send(ep.address, ep.send(1.0))
    # SR from a1: everywhere its media goes.
    sr = SenderReport(a1.ssrc, 0, 0, 0, 0, ()).serialize()
    net.send(a1.address, a1.send_rtcp(sr))
    for ep in (b1, c1):
        assert any(isinstance(p, SenderReport) and p.ssrc == a1.ssrc for p in ep.rtcp[-1])
    # PLI from c1 about a1's SSRC: C -> B -> A -> a1 only (toward the owner, over links).
    net.hops.clear()
    b1.rtcp.clear()
    pli = SenderReport(c1.ssrc, 0, 0, 0, 0, ()).serialize() + Pli(c1.ssrc, a1.ssrc).serialize()
    net.send(c1.address, c1.send_rtcp(pli))
    got = [p for p in a1.rtcp[-1] if isinstance(p, Pli)]
    assert got and got[0].media_ssrc == a1.ssrc
    assert not any(isinstance(p, Pli) for comp in b1.rtcp for p in comp)


def test_last_n_is_applied_where_the_receiver_is_links_carry_every_stream() -> None:
    net = Net()
    a = net.mdd(1)
    c = net.mdd(3, ForwardingConfig(last_n=1))
    net.link(a, c)
    (a1, a2) = net.endpoints_on(a, 2, 100)
    (c1,) = net.endpoints_on(c, 1, 300)
    (c2,) = net.endpoints_on(c, 1, 400)
    # Two video senders on A: both cross the link; C's receiver gets only the most recent.
    for _ in range(5):
        net.send(a1.address, a1.send(1.0, pt=96, marker=True))
    for _ in range(5):
        net.send(a2.address, a2.send(1.1, pt=96, marker=True))
    for _ in range(3):  # a1 goes on, but a2 is now the most recently active stream
        net.send(a1.address, a1.send(1.2, pt=96, marker=True))
    assert net.counters(c, a)["packets_in"] == 13  # the link carried every stream
    ssrcs = [p.ssrc for p in c1.got]
    assert ssrcs.count(a2.ssrc) == 5 and ssrcs.count(a1.ssrc) < 8  # a1 stopped at a frame end
    assert net.counters(c, a)["drop_last_n"] > 0  # withheld at C, per receiver
    # C's own video sender: under C's last_n locally, but the link to A gets all of it.
    for _ in range(4):
        net.send(c2.address, c2.send(1.3, pt=96, marker=True))
    assert net.counters(c, a)["packets_out"] == 4
    assert sum(1 for p in a1.got if p.ssrc == c2.ssrc) == 4


def test_links_of_one_group_do_not_forward_to_each_other() -> None:
    """D27's worker mesh: what comes over a worker link goes to local receivers and to
    external links, never to another worker link."""
    net = Net()
    w1, w2, w3, x = net.mdd(1), net.mdd(2), net.mdd(3), net.mdd(9)
    net.link(w1, w2, group="workers")
    net.link(w1, w3, group="workers")
    net.link(w2, w3, group="workers")
    net.link(w1, x)
    (e2,) = net.endpoints_on(w2, 1, 200)
    (e1,) = net.endpoints_on(w1, 1, 100)
    (e3,) = net.endpoints_on(w3, 1, 300)
    (ex,) = net.endpoints_on(x, 1, 900)
    net.send(e2.address, e2.send(1.0))
    assert len(e1.got) == len(e3.got) == len(ex.got) == 1  # once each, no loop
    assert (w1, w3) not in net.hops and (w3, w1) not in net.hops
    assert (w1, x) in net.hops
    net.hops.clear()
    net.send(ex.address, ex.send(1.0))  # from the external link: to every worker
    assert len(e1.got) == len(e3.got) == 2 and len(e2.got) == 1
    assert sorted(net.hops) == sorted([(x, w1), (w1, w2), (w1, w3)])
    assert not any(t.loop_reports for t in net.tables.values())


def test_links_are_not_expired_as_idle_endpoints() -> None:
    net, a, b, _ = chain()
    (a1,) = net.endpoints_on(a, 1, 100)
    gone = net.tables[a].expire_idle(100.0, 10.0)
    assert gone == [a1.association_id]
    assert net.links[(a, b)] in net.tables[a].associations
