"""Flight layer: fragmentation to the MTU, bounded reassembly, retransmission timer.

Theory of operation
-------------------
Outgoing (RFC 6347 §4.2.3, §4.2.4): a *flight* is a list of whole handshake messages (with
their message_seq and epoch) and ChangeCipherSpec markers. ``packetize`` turns it into
datagrams no larger than the MTU: records are packed back to back, a message that does not fit
the rest of a datagram is split into fragments (each in its own record) that fill it. A
retransmission re-runs ``packetize`` on the same messages, so every record gets a fresh
sequence number and GCM nonce (never resend cached ciphertext: the peer's replay window would
drop it, RFC 6347 §4.2.4).

Incoming (RFC 6347 §4.2.3): the ``Reassembler`` keeps one slot per message_seq, tolerates
duplicates, overlaps and any order, and hands out complete messages in message_seq order.
Bounds: per-type maximum body, messages at most ``MAX_AHEAD`` ahead, an aggregate byte budget,
a fragment-count cap per message. Lower message_seq values are reported as retransmissions.
After the handshake (D23) it runs in *any-order* mode: any complete message with a message_seq
not yet processed is delivered, and the next expected value jumps past it.

``RetransmitTimer``: 1 s initial, doubling on each expiry, capped at 60 s (RFC 6347 §4.2.4.1,
D9).
"""

from __future__ import annotations

from collections.abc import Callable

import attrs

from perc.wire.dtls import (
    HANDSHAKE_HEADER_SIZE,
    RECORD_HEADER_SIZE,
    ContentType,
    HandshakeFragment,
    HandshakeType,
    encode_handshake_fragment,
)

INITIAL_TIMEOUT = 1.0
MAX_TIMEOUT = 60.0
MAX_AHEAD = 10  # messages buffered beyond next_receive_seq (OpenSSL uses the same look-ahead)
MAX_BUFFERED_BYTES = 65536  # aggregate reassembly memory per association
MAX_FRAGMENTS_PER_MESSAGE = 256
MAX_SLOTS = 16  # incomplete messages held at once
# Below this many bytes of room, start a new datagram rather than cut a tiny fragment.
_MIN_FRAGMENT = 64

_MAX_BODY: dict[int, int] = {
    HandshakeType.CLIENT_HELLO: 2048,
    HandshakeType.SERVER_HELLO: 2048,
    HandshakeType.CERTIFICATE: 16384,
}
_DEFAULT_MAX_BODY = 1024


@attrs.frozen(slots=True)
class OutgoingMessage:
    epoch: int
    msg_type: int
    message_seq: int
    body: bytes


@attrs.frozen(slots=True)
class OutgoingCcs:
    epoch: int = 0


FlightItem = OutgoingMessage | OutgoingCcs


def packetize(
    items: list[FlightItem],
    *,
    seal: Callable[[int, bytes, int], bytes],
    overhead: Callable[[int], int],
    next_sequence: Callable[[int], int],
    mtu: int,
    record_numbers: list[tuple[int, int]] | None = None,
) -> list[bytes]:
    """Datagrams (each <= mtu) carrying ``items`` as fresh records.

    ``seal(content_type, payload, epoch)`` protects one record; when ``record_numbers`` is given
    the (epoch, seq) of every handshake record is appended to it (for EKTKey ACK matching).
    """
    datagrams: list[bytes] = []
    current = bytearray()
    for item in items:
        if isinstance(item, OutgoingCcs):
            size = RECORD_HEADER_SIZE + 1 + overhead(item.epoch)
            if current and len(current) + size > mtu:
                datagrams.append(bytes(current))
                current = bytearray()
            current += seal(ContentType.CHANGE_CIPHER_SPEC, b"\x01", item.epoch)
            continue
        body = item.body
        total = len(body)
        per_record = RECORD_HEADER_SIZE + HANDSHAKE_HEADER_SIZE + overhead(item.epoch)
        off = 0
        while True:
            space = mtu - len(current) - per_record
            remaining = total - off
            if current and space < remaining and space < _MIN_FRAGMENT:
                datagrams.append(bytes(current))
                current = bytearray()
                continue
            chunk = body[off : off + max(0, min(space, remaining))]
            if not chunk and remaining:
                raise ValueError(f"MTU {mtu} too small for a handshake fragment")
            fragment = encode_handshake_fragment(item.msg_type, total, item.message_seq, off, chunk)
            if record_numbers is not None:
                record_numbers.append((item.epoch, next_sequence(item.epoch)))
            current += seal(ContentType.HANDSHAKE, fragment, item.epoch)
            off += len(chunk)
            if off >= total:
                break
    if current:
        datagrams.append(bytes(current))
    return datagrams


class RetransmitTimer:
    __slots__ = ("deadline", "interval")

    def __init__(self) -> None:
        self.interval = INITIAL_TIMEOUT
        self.deadline: float | None = None

    def start(self, now: float) -> None:
        """A new flight went out: reset the interval and arm."""
        self.interval = INITIAL_TIMEOUT
        self.deadline = now + self.interval

    def backoff(self, now: float) -> None:
        """The timer fired and the flight was retransmitted: double (capped) and re-arm."""
        self.interval = min(self.interval * 2, MAX_TIMEOUT)
        self.deadline = now + self.interval

    def stop(self) -> None:
        self.deadline = None


class _Slot:
    __slots__ = ("body", "count", "epoch", "length", "msg_type", "ranges")

    def __init__(self, msg_type: int, length: int, epoch: int) -> None:
        self.msg_type = msg_type
        self.length = length
        self.epoch = epoch
        self.body = bytearray(length)
        self.ranges: list[list[int]] = []  # sorted, merged [start, end)
        self.count = 0

    def add(self, offset: int, data: bytes) -> None:
        end = offset + len(data)
        self.body[offset:end] = data
        self.count += 1
        merged: list[list[int]] = []
        placed = False
        for r in self.ranges:
            if r[1] < offset:
                merged.append(r)
            elif r[0] > end:
                if not placed:
                    merged.append([offset, end])
                    placed = True
                merged.append(r)
            else:
                offset = min(offset, r[0])
                end = max(end, r[1])
        if not placed:
            merged.append([offset, end])
            merged.sort()
        self.ranges = merged

    @property
    def complete(self) -> bool:
        return self.length == 0 or (
            len(self.ranges) == 1 and self.ranges[0][0] == 0 and self.ranges[0][1] == self.length
        )


@attrs.frozen(slots=True)
class ReceivedMessage:
    msg_type: int
    message_seq: int
    body: bytes
    epoch: int = 0  # of every fragment it was built from


# Results of Reassembler.add besides the delivered messages.
ADDED = 0
OLD = 1  # message_seq already processed: a retransmission by the peer
DROPPED = 2


class Reassembler:
    def __init__(self) -> None:
        self.next_seq = 0
        self.any_order = False
        self._slots: dict[int, _Slot] = {}
        self._buffered = 0

    def reset_to(self, seq: int) -> None:
        """Expect ``seq`` next (client: the ServerHello's message_seq; server: the first CH)."""
        self.next_seq = seq
        for s in [s for s in self._slots if s < seq]:
            self._buffered -= self._slots.pop(s).length

    def add(self, frag: HandshakeFragment, out: list[ReceivedMessage], epoch: int = 0) -> int:
        """Take one fragment that arrived in ``epoch``; complete messages go to ``out``.

        A message is built from fragments of one epoch only: an epoch-1 (authenticated)
        fragment evicts a partial epoch-0 slot for the same message_seq, and an epoch-0
        fragment never joins an epoch-1 slot, so forged plaintext cannot become part of, or
        block, a protected message.
        """
        seq = frag.message_seq
        if seq < self.next_seq:
            return OLD
        if seq > self.next_seq + MAX_AHEAD and not self.any_order:
            # After the handshake any unprocessed message_seq is fine (D23): the server may
            # have superseded EKTKeys we never saw. Memory stays bounded by the caps below.
            return DROPPED
        if frag.length > _MAX_BODY.get(frag.msg_type, _DEFAULT_MAX_BODY):
            return DROPPED
        slot = self._slots.get(seq)
        if slot is not None and (
            slot.epoch < epoch
            or (
                slot.epoch == epoch
                and (
                    slot.msg_type != frag.msg_type
                    or slot.length != frag.length
                    or slot.count >= MAX_FRAGMENTS_PER_MESSAGE
                )
            )
        ):
            # Start the slot over: a protected fragment beats plaintext, and a fragment that
            # contradicts a partial slot (type, total length) or a slot flooded with fragments
            # wins over it. Honest retransmissions never contradict (RFC 9147 §5.5), so this
            # only discards forged or corrupted plaintext, which must not block the real
            # message until the handshake times out.
            del self._slots[seq]
            self._buffered -= slot.length
            slot = None
        if slot is None:
            if frag.is_whole and (seq == self.next_seq or self.any_order):
                # Fast path: a whole message in order, nothing to copy.
                out.append(ReceivedMessage(frag.msg_type, seq, frag.body, epoch))
                self.reset_to(seq + 1)
                self._drain(out)
                return ADDED
            if self._buffered + frag.length > MAX_BUFFERED_BYTES or len(self._slots) >= MAX_SLOTS:
                return DROPPED
            slot = self._slots[seq] = _Slot(frag.msg_type, frag.length, epoch)
            self._buffered += frag.length
        elif slot.epoch != epoch:
            return DROPPED  # plaintext never joins a protected message
        slot.add(frag.fragment_offset, frag.body)
        if self.any_order and slot.complete:
            del self._slots[seq]
            self._buffered -= slot.length
            out.append(ReceivedMessage(slot.msg_type, seq, bytes(slot.body), slot.epoch))
            self.reset_to(seq + 1)
        self._drain(out)
        return ADDED

    def switch_to_any_order(self, out: list[ReceivedMessage]) -> None:
        """Enter post-handshake mode (D23) and hand out complete messages that were held
        behind a message_seq the peer abandoned (e.g. an EKTKey that overtook flight 6 while
        the EKTKey it superseded was lost)."""
        self.any_order = True
        for seq in sorted(self._slots):
            slot = self._slots[seq]
            if slot.epoch == 0:
                # Only protected messages follow the handshake: plaintext leftovers are forged.
                del self._slots[seq]
                self._buffered -= slot.length
            elif seq >= self.next_seq and slot.complete:
                del self._slots[seq]
                self._buffered -= slot.length
                out.append(ReceivedMessage(slot.msg_type, seq, bytes(slot.body), slot.epoch))
                self.reset_to(seq + 1)

    def _drain(self, out: list[ReceivedMessage]) -> None:
        while True:
            if not self.any_order and out and out[-1].epoch > 0:
                # An epoch-1 message (a Finished) ends the in-order phase: what follows is
                # handed out by switch_to_any_order once the handshake has completed, so a
                # plaintext message waiting at the next message_seq cannot consume it.
                return
            slot = self._slots.get(self.next_seq)
            if slot is None or not slot.complete:
                return
            del self._slots[self.next_seq]
            self._buffered -= slot.length
            out.append(ReceivedMessage(slot.msg_type, self.next_seq, bytes(slot.body), slot.epoch))
            self.next_seq += 1
