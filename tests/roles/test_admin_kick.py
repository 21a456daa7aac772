"""A kick through the KMF's admin answer (D33), end to end in one process, under MockClock.

As tests/roles/test_rekey.py proves for a leaver: the KMF and a real MDD run here, the
endpoints' media go through a stand-in MDD with the real MDD's hop-by-hop keys, and a "spy"
holds a remaining member's outer keys but only the EKTKeys the kicked member was given. The
kick (``KmfServer.admin``, what the admin socket calls) closes the member's association with
a close_notify, and the spy reads nothing the others send 1 s after the kick's rekey, which
comes at once although a rekey just opened the coalescing window.
"""

from __future__ import annotations

from types import SimpleNamespace

import trio
from trio.testing import MockClock

from perc.admin import Kick, Rekey
from perc.dtls.errors import AlertDescription

from .helpers import until
from .test_rekey import (
    MediaSim,
    conference,
    conference_with,
    converged,
    join_and_serve,
    people,  # noqa: F401 - the fixture
    policy_config,
    spi_of,
    wait_time,
)


async def test_kicked_members_keys_read_nothing_after_the_kick(
    ids: SimpleNamespace,
    people: SimpleNamespace,  # noqa: F811 - the fixture
    clock: MockClock,
) -> None:
    a, b, c = people.members[:3]
    config = policy_config(ids, [a, b, c], rekey_window=5.0)
    async with conference_with(ids, config) as (setup, nursery, relay):
        ra, rb, rc = [await join_and_serve(setup, nursery, relay, x) for x in (a, b, c)]
        await converged(setup, [ra, rb, rc])
        sim = MediaSim(setup, relay)
        for name, r in (("a", ra), ("b", rb), ("c", rc)):
            sim.add(name, r)
        await setup.kmf.admin(Rekey("demo"))  # a rekey now: a leave would wait 5 s for the next
        await converged(setup, [ra, rb, rc])
        await sim.run(1.0)
        old = spi_of(rb)
        a_keys = len(ra.ekt_keys)

        kicked_at = trio.current_time()
        answer = await setup.kmf.admin(Kick("demo", a.fingerprint))
        assert [k["name"] for k in answer["kicked"]] == ["rk0"] and answer["spi"] is not None
        sim.remove("a")
        media_done = trio.Event()

        async def media() -> None:
            await sim.run(3.0)
            media_done.set()

        nursery.start_soon(media)
        got = await wait_time(lambda: spi_of(rb) != old and spi_of(rc) != old)
        assert got - kicked_at < 1.0
        await until(lambda: ra.closed is not None)
        assert ra.closed is not None and ra.closed.alert == AlertDescription.close_notify
        assert ra.closed.sent_by_peer
        rekeyed_at = conference(setup).current.created  # type: ignore[union-attr]
        assert rekeyed_at - kicked_at < 0.1  # at once, not at the window's end
        await media_done.wait()
        assert len(ra.ekt_keys) == a_keys  # a got no key after the kick
        seen = [(t, ok) for at in ("b", "c") for t, _, ok in sim.spy(at, ra)]
        assert sum(ok for t, ok in seen if t < kicked_at) > 40  # the spy can read ...
        late = [ok for t, ok in seen if t >= rekeyed_at + 1.0]
        assert len(late) > 100 and not any(late)  # ... nothing sent 1 s after the kick
        for at, peer in (("b", "c"), ("c", "b")):
            entry = sim.peer(at, peer)
            assert entry["e2e_failures"] == 0 and entry["hbh_failures"] == 0, entry
        await until(lambda: relay.stats.associations_ended_by_kmf == 1)  # the MDD was told
        nursery.cancel_scope.cancel()
