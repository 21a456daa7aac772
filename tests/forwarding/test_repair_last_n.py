"""D36 under last_n: NACKs name the receiver's renumbered SEQs; the MDD answers with exactly
the bytes that feed sent (OHB rewrite included), and asks the sender with the sender's SEQs."""

from __future__ import annotations

import random

from perc.forwarding import ForwardingConfig, ForwardingTable
from perc.wire.rtcp import Nack

from .helpers import Address, Endpoint, conference
from .test_repair import nack

STEP = 0.01


def test_last_n_feeds_are_repaired_byte_identically_and_uncached_nacks_use_sender_seqs() -> None:
    rng = random.Random(3)
    table: ForwardingTable[Address] = ForwardingTable(ForwardingConfig(last_n=1))
    a, b, c = eps = conference(table, 3)
    by_address = {ep.address: ep for ep in eps}
    first: dict[tuple[int, int], bytes] = {}  # (SSRC, SEQ c got) -> bytes c got
    when: dict[tuple[int, int], float] = {}  # ... and when
    sent_by: dict[int, Endpoint] = {a.ssrc: a, b.ssrc: b}
    answered = renumbered = forwarded = 0
    counts = {a.ssrc: 0, b.ssrc: 0}

    def send(ep: Endpoint, now: float) -> None:
        k = counts[ep.ssrc]
        counts[ep.ssrc] = k + 1
        data = ep.send(now, pt=96, marker=k % 3 == 2, keyframe=True)
        for address, out in table.handle_datagram(ep.address, data, now):
            if address == c.address and not 192 <= out[1] <= 223:
                key = (int.from_bytes(out[8:12], "big"), out[2] << 8 | out[3])
                first.setdefault(key, out)
                when.setdefault(key, now)
                c.deliver(out, now)
            elif 192 <= out[1] <= 223:
                by_address[address].deliver(out, now)

    now = 0.0
    step = 0
    while now < 7.5:
        now = step * STEP
        step += 1
        a_on = now < 1.0 or 3.5 <= now < 4.0
        if a_on:
            send(a, now)
        if step > 1:
            send(b, now)
        if step % 10 == 0 and c.got:
            # c NACKs some SEQs it got lately (in its own numbering) and an old one.
            for ssrc in (a.ssrc, b.ssrc):
                mine = [p for p in c.got if p.ssrc == ssrc]
                age = {p.sequence_number: now - when[(ssrc, p.sequence_number)] for p in mine}
                recent = [p.sequence_number for p in mine if age[p.sequence_number] < 0.5]
                asked = rng.sample(recent, min(4, len(recent)))
                old = [p for p in mine if age[p.sequence_number] > 1.5]
                stale = rng.choice(old) if old else None
                if not asked and stale is None:
                    continue
                if stale is not None:
                    asked.append(stale.sequence_number)
                owner = sent_by[ssrc]
                before = len(owner.rtcp)
                for address, out in table.handle_datagram(c.address, nack(c, ssrc, asked), now):
                    if address == c.address:
                        key = (ssrc, out[2] << 8 | out[3])
                        assert out == first[key], "a repair that is not a copy"
                        answered += 1
                        got = next(p for p in mine if p.sequence_number == key[1])
                        renumbered += got.original_sequence_number != got.sequence_number
                    else:
                        by_address[address].deliver(out, now)
                for compound in owner.rtcp[before:]:
                    for p in compound:
                        if isinstance(p, Nack) and stale is not None:
                            # Only the stale SEQ went on, as the sender numbered it.
                            assert p.lost() == (stale.original_sequence_number,)
                            forwarded += 1
    assert answered > 50 and renumbered > 0 and forwarded > 0
    counters = table.associations[c.association_id].counters
    assert counters.nack_answered == answered
    assert counters.nack_forwarded == forwarded
