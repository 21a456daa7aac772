"""D36 through the MDD's I/O shell over real loopback UDP: a NACK is answered from the repair
cache with datagrams byte-identical, at the receiver's socket, to the first ones."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import trio
from trio.testing import MockClock

from perc import identity
from perc.config import ConfigError, build_mdd_config
from perc.roles import mdd
from perc.srtp.context import SrtpSession
from perc.wire.rtcp import Nack, ReceiverReport, serialize_rtcp

from .helpers import until
from .test_mdd_forwarding import Conference, _mdd_data, association_of, people, rtp

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


def test_repair_options_reach_the_table(ids: SimpleNamespace, tmp_path: Path) -> None:
    data = _mdd_data(
        tmp_path,
        ids,
        repair=False,
        repair_cache_ms=500,
        repair_cache_packets=64,
        repair_rate=100.0,
        frame_marking_id=0,
        keyframe_wait=0.25,
    )
    config = build_mdd_config(data, base=tmp_path)
    table = mdd.ConferenceRelay(config.conferences[0], config).engine.table
    cfg = table.config
    assert (cfg.repair, cfg.repair_cache_time, cfg.repair_cache_packets) == (False, 0.5, 64)
    assert (cfg.repair_rate, cfg.frame_marking_id, cfg.keyframe_wait) == (100.0, None, 0.25)
    defaults = build_mdd_config(_mdd_data(tmp_path, ids), base=tmp_path)
    cfg = mdd.ConferenceRelay(defaults.conferences[0], defaults).engine.table.config
    assert (cfg.repair, cfg.repair_cache_time, cfg.repair_cache_packets) == (True, 1.0, 512)
    assert (cfg.frame_marking_id, cfg.keyframe_wait, cfg.pli_rate) == (4, 0.1, 2.0)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"frame_marking_id": 15}, "conference[0].frame_marking_id: must be 0..14"),
        ({"repair_cache_packets": 0}, "conference[0].repair_cache_packets: must be >= 1"),
        ({"repair_cache_ms": 0}, "conference[0].repair_cache_ms: must be >= 1"),
        ({"repair_rate": 0}, "conference[0].repair_rate: must be a positive number"),
        ({"keyframe_wait": -1.0}, "conference[0].keyframe_wait: must be >= 0"),
        ({"repair": "yes"}, "conference[0].repair"),
    ],
)
def test_bad_repair_options_are_refused(
    ids: SimpleNamespace, tmp_path: Path, extra: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        build_mdd_config(_mdd_data(tmp_path, ids, **extra), base=tmp_path)
