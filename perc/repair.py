"""The Media Distributor's repair cache (D36, RFC 8723 §7): NACKs answered with the same bytes.

Theory of operation
-------------------
An MD may answer a generic NACK (RFC 4585 §6.2.1) itself when it still has the packet. In
PERC the only safe answer is the packet *exactly as this receiver got it the first time*: the
receiver's outer key and the packet's outer index fix the AES-GCM nonce, so the same header
and outer plaintext under the same index give identical bytes and reveal nothing new, while
any other plaintext under that index would reuse a nonce (RFC 7714 §8.4). The MD never makes
new ciphertext for a repair; :meth:`perc.srtp.index.SrtpStream.reseal` refuses an index the
stream has not used.

**What is kept.** Per sending video SSRC (receivers NACK video only) one
:class:`RepairCache`: the last ``max_age`` seconds (at most ``max_packets``) of packets as
they were after the sender's outer layer came off (RTP header, outer plaintext = inner
ciphertext | inner tag | OHB, EKT field): the parts the forwarding table sealed for every
receiver. Insertion is one ``deque.append`` of a tuple (the ``maxlen`` bounds the count; the
age is checked every 32nd packet and at lookup); on the fan-out path the table adds a packet
only after every receiver's seal succeeded.

**Which index each receiver used.** The forwarding table seals a packet for every receiver
with the receiver's send stream of the SSRC, whose index follows from the SEQ by the RFC 3711
Appendix A guess against that stream's highest index. The cache keeps its own highest index
``hi`` and guesses the same way, so while every packet sealed for a receiver also went
through the cache (an *epoch*), the receiver's index of each cached packet is the cache's
index plus a constant ``base`` (a multiple of 2^16: receivers that joined later started their
streams at ROC 0). An epoch starts when the table (re)makes the SSRC's fan-out (the receivers
changed) and records each receiver's ``base`` from its stream's ``hi`` after the epoch's first
packet; a receiver for which that packet was not the new highest index (its stream predates
the epoch with other history) gets no base and is never answered from this epoch. An epoch
ends (the cache is emptied) when a seal was refused (the table's slow path), or when a SEQ
jumps by more than 2^14: the guess's ROC-0 special case (RFC 3711 Appendix A, as libsrtp) can
then make one side's index differ from the other's by other than ``base``. At answer time
the receiver's stream ``hi`` must still equal the cache's ``hi`` plus ``base`` (nothing else
moved it); otherwise the NACK goes on to the sender.

Only packets the receiver was sent are in its epoch: a receiver that joined later has no
``base`` in the epoch of packets sent before (the fan-out changed, a new epoch began), and a
packet is cached only when every receiver of the fan-out got it.

**last_n.** A ``last_n`` video stream has one cache too (its epoch tied to the stream, not to
a fan-out), and each feed keeps its last few on-periods (:class:`FeedPeriod`): the table
renumbers a resumed feed, so a NACK from a receiver names its own SEQs, which map back through
the period they fall in; the answer is rebuilt with the same OHB rewrite the first sending made
(deterministic) and sealed again under the receiver's same index.

API
---
``RepairCache(max_packets, max_age, fan, first_seq)``; ``add(seq, now, header, payload,
ekt) -> index``; ``start(receivers)`` with ``(receiver_id, stream)`` pairs after the first
packet; ``retransmit(receiver_id, seq, now) -> bytes | None``; ``find(seq, now)``,
``find_index(idx, now)``; ``end()``. ``FeedPeriod(cache, stream, delta, offset)``: one
``last_n`` on-period of a receiver's feed: ``locate(out_seq, now)``, ``index_of(out_seq)``,
``close()``.
"""

from __future__ import annotations

import uuid
from collections import deque

from perc.srtp.errors import SrtpError
from perc.srtp.index import SrtpStream, guess_index

__all__ = ["FeedPeriod", "RepairCache"]

#: A SEQ step larger than this (either way) ends the epoch (see the theory above).
MAX_JUMP = 1 << 14

#: (index in the cache's numbering, arrival time, RTP header, outer plaintext, EKT field)
_Entry = tuple[int, float, bytes, bytes, bytes]


class RepairCache:
    """The recent packets of one sending SSRC, and each receiver's index offset (one epoch)."""

    __slots__ = ("bases", "entries", "fan", "hi", "max_age")

    def __init__(self, max_packets: int, max_age: float, fan: object, first_seq: int) -> None:
        self.entries: deque[_Entry] = deque(maxlen=max_packets)
        self.max_age = max_age
        #: the forwarding table's fan-out this epoch belongs to (identity); None: ended
        self.fan: object | None = fan
        #: the cache's highest index (the first packet gets index ``first_seq``, ROC 0)
        self.hi = first_seq - 1
        #: receiver id -> (its send stream of this SSRC, its index minus the cache's index)
        self.bases: dict[uuid.UUID, tuple[SrtpStream, int]] = {}

    def add(self, seq: int, now: float, header: bytes, payload: bytes, ekt: bytes) -> int:
        """A packet every receiver of the fan-out was sent (the hot path: keep it short);
        returns its index in the cache's numbering (-1: a SEQ jump ended the epoch)."""
        idx = self.hi + 1
        if idx & 0xFFFF == seq:
            self.hi = idx
        else:
            idx = guess_index(self.hi, seq)
            if not -MAX_JUMP <= idx - self.hi <= MAX_JUMP:
                self.end()
                return -1
            self.hi = max(self.hi, idx)
        entries = self.entries
        entries.append((idx, now, header, payload, ekt))
        if not idx & 31 and entries[0][1] < now - self.max_age:
            # Age out every 32nd packet (maxlen bounds the rest; find checks ages anyway).
            limit = now - self.max_age
            while entries[0][1] < limit:
                entries.popleft()
        return idx

    def start(self, receivers: list[tuple[uuid.UUID, SrtpStream]]) -> None:
        """Record each receiver's base after the epoch's first packet (see the theory)."""
        first = self.hi
        for rid, stream in receivers:
            base = stream.hi - first
            if base >= 0 and base & 0xFFFF == 0:
                self.bases[rid] = (stream, base)

    def end(self) -> None:
        """Forget everything: the next packet starts a new epoch."""
        self.entries.clear()
        self.bases.clear()
        self.fan = None

    def find(self, seq: int, now: float) -> _Entry | None:
        """The cached packet with ``seq`` (not older than ``max_age``), or None."""
        return self.find_index(guess_index(self.hi, seq), now)

    def find_index(self, idx: int, now: float) -> _Entry | None:
        """The cached packet with index ``idx`` in the cache's numbering, or None."""
        entries = self.entries
        if not entries or self.fan is None:
            return None
        newest = entries[-1][0]
        i = len(entries) - 1 - (newest - idx)
        entry: _Entry | None = None
        if 0 <= i < len(entries) and entries[i][0] == idx:
            entry = entries[i]
        else:  # reordered arrivals: not where the arithmetic says
            for e in entries:
                if e[0] == idx:
                    entry = e
                    break
        if entry is None or entry[1] < now - self.max_age:
            return None
        return entry

    def retransmit(self, receiver: uuid.UUID, seq: int, now: float) -> bytes | None:
        """The packet with ``seq`` exactly as ``receiver`` was sent it, or None (not cached,
        not sent to it in this epoch, or its stream moved without the cache)."""
        if self.fan is None:
            return None
        known = self.bases.get(receiver)
        if known is None:
            return None
        stream, base = known
        if stream.hi - self.hi != base:
            return None
        entry = self.find(seq, now)
        if entry is None:
            return None
        idx, _, header, payload, ekt = entry
        try:
            return header + stream.reseal(idx + base, payload, header) + ekt
        except SrtpError:  # pragma: no cover - the epoch invariant makes the index a used one
            return None


class FeedPeriod:
    """One on-period of a ``last_n`` feed (one receiver, one SSRC, one SEQ offset).

    The forwarding table renumbers a resumed feed (``out_seq = seq - offset``), so the
    receiver's send stream sees its own SEQs; within one period its index of a packet is the
    cache's index minus ``delta`` (recorded at the period's first packet sealed for it, valid
    only when that packet became the stream's highest index). The period owns the receiver
    indexes ``first`` .. ``end`` (``end`` < 0: still open, the stream's ``hi``); the next
    period continues above them, so an index in that range that the stream used was used for
    a packet of this period, which is the cache's packet at ``index + delta``."""

    __slots__ = ("cache", "delta", "end", "first", "offset", "stream", "valid")

    def __init__(self, cache: RepairCache, stream: SrtpStream, delta: int, offset: int) -> None:
        self.cache = cache
        self.stream = stream
        self.delta = delta
        self.offset = offset
        self.first = stream.hi
        self.end = -1
        self.valid = True

    def close(self) -> None:
        if self.end < 0:
            self.end = self.stream.hi

    def index_of(self, out_seq: int) -> int:
        """The receiver's index of ``out_seq`` if it falls in this period, else -1."""
        stream = self.stream
        idx = guess_index(stream.hi, out_seq)
        end = stream.hi if self.end < 0 else self.end
        return idx if self.first <= idx <= end else -1

    def locate(self, out_seq: int, now: float) -> tuple[int, _Entry] | None:
        """``(receiver index, cached packet)`` of ``out_seq`` as sent in this period."""
        if not self.valid or self.cache.fan is None:
            return None
        idx = self.index_of(out_seq)
        if idx < 0:
            return None
        entry = self.cache.find_index(idx + self.delta, now)
        return None if entry is None else (idx, entry)
