"""D36 through the MDD's I/O shell over real loopback UDP: a NACK is answered from the repair
cache with datagrams byte-identical, at the receiver's socket, to the first ones."""

from __future__ import annotations

from types import SimpleNamespace

import trio
from trio.testing import MockClock

from perc import identity
from perc.srtp.context import SrtpSession
from perc.wire.rtcp import Nack, ReceiverReport, serialize_rtcp

from .helpers import until
from .test_mdd_forwarding import Conference, association_of, people, rtp

__all__ = ["people"]  # the module-scoped fixture, shared

VIDEO = 96


async def test_a_nack_is_answered_with_the_same_bytes_at_the_receivers_socket(
    ids: SimpleNamespace, people: list[identity.Identity], clock: MockClock
) -> None:
    conf = Conference(ids, people[:2])
    async with conf.running() as nursery:
        relay = await conf.start_mdd(nursery)
        a, b = [await conf.join_peer(n, m) for n, m in zip("ab", people, strict=False)]
        first: dict[int, bytes] = {}
        seqs = [(a.seq + i) & 0xFFFF for i in range(20)]
        for seq in seqs:
            packet = rtp(seq, a.ssrc, a.payload(seq), pt=VIDEO)
            await a.sock.sendto(a.sender.protect(packet, trio.current_time()), a.mdd_addr)
        with trio.fail_after(10):
            while len(first) < len(seqs):
                data, _ = await b.sock.recvfrom(65535)
                if 128 <= data[0] <= 191 and not 192 <= data[1] <= 223:
                    first[data[2] << 8 | data[3]] = data
        lost = [seqs[3], seqs[7], seqs[8]]
        ob = b.material.outer()
        b_rtcp = SrtpSession(ob.client_key, ob.client_salt)
        nack = serialize_rtcp([ReceiverReport(b.ssrc), Nack.from_lost(b.ssrc, a.ssrc, lost)])
        await b.sock.sendto(b_rtcp.protect_rtcp(nack), b.mdd_addr)
        again: list[bytes] = []
        with trio.fail_after(10):
            while len(again) < len(lost):
                data, _ = await b.sock.recvfrom(65535)
                if 128 <= data[0] <= 191 and not 192 <= data[1] <= 223:
                    again.append(data)
        assert again == [first[s] for s in lost]  # identical bytes, as asked
        await until(lambda: association_of(relay, b).counters.nack_answered == 3)
        counters = association_of(relay, b).counters
        assert (counters.nack_received, counters.nack_forwarded) == (3, 0)
        assert association_of(relay, a).counters.rtcp_out == 0  # the sender was not asked
        nursery.cancel_scope.cancel()
