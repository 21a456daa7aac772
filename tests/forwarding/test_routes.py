"""Incremental route upkeep equals a from-scratch computation, on random interleavings.

The table updates each sender's route lists in place on join (first keys), key replacement
and leave. These tests drive random sequences of ``add`` / ``install_keys`` (first and
replacement keys) / ``remove`` / audio and video media (last_n ranking changes and switches,
silence that prunes the ranking) / counter reads, and after every step compare the table's
routes, RTCP destinations, last_n feeds and their ``want`` with what the pre-incremental
``_rebuild`` computed from scratch, and every counter with a model of what was delivered.
"""

from __future__ import annotations

import random
import uuid

import attrs
import pytest

from perc.forwarding import Association, ForwardingConfig, ForwardingTable

from .helpers import Address, Endpoint, dispatch, new_params


def _reference_check(table: ForwardingTable[Address]) -> None:
    """The table's routes and feeds vs. a from-scratch computation on its current state."""
    cfg = table.config
    # Keyed associations in add order (the association dict keeps insertion order).
    keyed = [a for a in table.associations.values() if a.has_keys]
    for a in keyed:
        others = [b for b in keyed if b is not a]
        assert a._routes == [(b.address, b._protect_rtp) for b in others]
        assert all(
            x is y for x, y in zip(a._route_counters, [b._counters for b in others], strict=True)
        )
        assert len(a._route_counters) == len(others)
        assert [b.association_id for b in a._rtcp_routes] == [b.association_id for b in others]
        assert all(x is y for x, y in zip(a._rtcp_routes, others, strict=True))
    if cfg.last_n is None:
        return
    rank = table._rank
    assert len({id(vs) for vs in rank}) == len(rank)
    for ssrc, vs in table._video.items():
        assert vs.ssrc == ssrc and vs.owner.has_keys
        assert vs.ranked == (vs in rank)
        receivers = {b.association_id: b for b in keyed if b is not vs.owner}
        assert set(vs.feeds) == set(receivers)
        for aid, feed in vs.feeds.items():
            assert feed.session is receivers[aid].outbound_session
            assert feed.address == receivers[aid].address
            # Wanted: among the first last_n ranked streams this receiver does not send.
            mine = [w for w in rank if w.owner.association_id != aid][: cfg.last_n]
            assert feed.want == (vs in mine), (ssrc, aid)


class _Model:
    """Random operations on one table, with what every counter must read."""

    def __init__(self, rng: random.Random, last_n: int | None) -> None:
        self.rng = rng
        self.table: ForwardingTable[Address] = ForwardingTable(
            ForwardingConfig(last_n=last_n, last_n_idle=0.5, last_n_switch_timeout=0.2)
        )
        self.params = new_params()
        self.now = 0.0
        self.port = 7000
        self.ssrc = 0x5000
        self.live: dict[uuid.UUID, Endpoint] = {}  # current Endpoint (keys) per association
        self.all_eps: list[Endpoint] = []  # every Endpoint object ever (old keys included)
        self.received: dict[uuid.UUID, int] = {}
        self.delivered: dict[uuid.UUID, int] = {}
        self.video: set[uuid.UUID] = set()  # associations that send video (PT 96)

    def _assoc(self, aid: uuid.UUID) -> Association[Address]:
        return self.table.associations[aid]

    def add(self) -> None:
        self.port += 1
        self.ssrc += 1
        ep = Endpoint(f"e{self.port}", self.ssrc, self.params, port=self.port)
        self.table.add(ep.association_id, ep.address, self.now)
        self.live[ep.association_id] = ep
        self.all_eps.append(ep)
        self.received[ep.association_id] = 0
        self.delivered[ep.association_id] = 0
        if self.rng.random() < 0.4:
            self.video.add(ep.association_id)

    def keys(self, aid: uuid.UUID) -> None:
        ep = self.live[aid]
        if self._assoc(aid).has_keys:
            # Replacement keys (a new handshake on the same association id). The endpoint
            # starts a new SSRC (its E2E key is new too; RFC 3550 §8.1).
            self.ssrc += 1
            new = Endpoint(ep.name, self.ssrc, self.params, port=ep.address[1])
            new.association_id = aid
            new.media_keys = attrs.evolve(new.media_keys, association_id=aid)
            self.live[aid] = ep = new
            self.all_eps.append(new)
        self._deliver(self.table.install_keys(ep.media_keys, self.now))

    def remove(self, aid: uuid.UUID) -> None:
        assoc = self._assoc(aid)
        assert self.table.remove(aid)
        self._check_counters(aid, assoc)
        del self.live[aid]
        self.video.discard(aid)

    def send(self, aid: uuid.UUID) -> None:
        ep = self.live[aid]
        video = aid in self.video
        # Every packet a keyframe: a Full EKT tag, so receivers starting anywhere decrypt.
        data = ep.send(
            self.now, pt=96 if video else 111, marker=self.rng.random() < 0.3, keyframe=True
        )
        self.received[aid] += 1
        sender = self._assoc(aid)
        expected = None
        if sender.has_keys and not (video and self.table.config.last_n is not None):
            expected = [
                b.address
                for b in self.table.associations.values()
                if b.has_keys and b is not sender
            ]
        out = self.table.handle_datagram(ep.address, data, self.now)
        if expected is not None:
            assert [address for address, _ in out] == expected
        self._deliver(out)

    def _deliver(self, out: list[tuple[Address, bytes]]) -> None:
        by_address = {ep.address: aid for aid, ep in self.live.items()}
        for address, _ in out:
            self.delivered[by_address[address]] += 1
        # Verified end to end by the endpoint holding the association's current keys.
        dispatch(list(self.live.values()), out, self.now)

    def _check_counters(self, aid: uuid.UUID, assoc: Association[Address]) -> None:
        c = assoc.counters
        assert c.received == self.received[aid]  # a held datagram counts once
        assert c.packets_out == self.delivered[aid]
        drops = sum(v for k, v in c.as_dict().items() if k.startswith("drop_"))
        drops -= c.drop_last_n + c.drop_no_keys
        # Everything received was accepted, dropped, held (still), or dropped as no_keys.
        held_now = len(assoc.held)
        assert c.received == c.packets_in + drops + held_now + c.drop_no_keys

    def step(self) -> None:
        rng = self.rng
        self.now += rng.choice((0.01, 0.01, 0.05, 0.3))
        ids = list(self.live)
        unkeyed = [aid for aid in ids if not self._assoc(aid).has_keys]
        keyed = [aid for aid in ids if self._assoc(aid).has_keys]
        r = rng.random()
        if r < 0.15 or not ids:
            self.add()
        elif r < 0.30 and unkeyed:
            self.keys(rng.choice(unkeyed))
        elif r < 0.35 and keyed:
            self.keys(rng.choice(keyed))  # replacement
        elif r < 0.45:
            self.remove(rng.choice(ids))
        elif r < 0.50:
            self.table.tick(self.now)  # last_n ranking upkeep (silent streams leave)
        elif r < 0.55:
            for aid in ids:
                self._check_counters(aid, self._assoc(aid))
        else:
            # Media, mostly from keyed members, sometimes held (before keys, D5).
            pool = keyed if keyed and rng.random() < 0.9 else ids
            self.send(rng.choice(pool))
        _reference_check(self.table)


@pytest.mark.parametrize("last_n", [None, 1, 2])
@pytest.mark.parametrize("seed", range(8))
def test_routes_match_a_from_scratch_rebuild(seed: int, last_n: int | None) -> None:
    model = _Model(random.Random(seed * 31 + (last_n or 0)), last_n)
    for _ in range(160):
        model.step()
    for aid in list(model.live):
        model._check_counters(aid, model._assoc(aid))
    while model.live:
        model.remove(next(iter(model.live)))
        _reference_check(model.table)
    assert model.table._keyed == []


def test_leave_and_join_settle_pending_bulk_credits() -> None:
    """A receiver joining or leaving while senders have uncredited fan-out (see flush)."""
    model = _Model(random.Random(1), None)
    for _ in range(3):
        model.add()
    ids = list(model.live)
    for aid in ids:
        model.keys(aid)
    for aid in ids:
        model.send(aid)  # pending credits on every sender, nothing flushed yet
    model.add()
    newcomer = list(model.live)[-1]
    model.keys(newcomer)  # joins while the others' credits are pending
    model.remove(ids[1])  # leaves while they are pending: its final counters are exact
    for aid in model.live:
        model._check_counters(aid, model._assoc(aid))
    assert model._assoc(newcomer).counters.packets_out == 0
