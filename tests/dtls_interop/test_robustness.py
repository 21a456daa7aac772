"""Hostile input to perc's DTLS client, server and CookieGate.

* Nothing a peer sends makes ``receive_datagram`` raise: random bytes, structured records with
  random fields, and mutated real records, fed to both sides at every handshake stage.
* Junk that is invalid at the record layer (RFC 6347 §4.1.2.7: silently discarded) does not stop
  a handshake (with EKTKey and ACK) from completing when interleaved with the real traffic:
  short and overlong records, unknown content types and versions, epochs not in use, epoch-1
  records that fail authentication, truncated datagrams, replays, real records moved to a wrong
  epoch.
* A ClientHello flood without valid cookies through CookieGate leaves no per-client state.
"""

from __future__ import annotations

import gc
import os
import random
import struct
import tracemalloc
from collections.abc import Callable
from typing import Any

import attrs
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from perc.dtls import CookieGate
from perc.identity import Identity
from perc.wire.dtls import (
    ClientHello,
    EktKey,
    encode_handshake,
    parse_datagram_untrusted,
    parse_handshake_fragments_untrusted,
)
from tests.dtls_interop.engine import (
    EKT_KEY,
    GatedServer,
    client_peer,
    ekt_server_peer,
    server_peer,
)
from tests.dtls_interop.harness import EnginePeer, assert_no_internal_errors, describe, pump
from tests.dtls_interop.netsim import Network
from tests.dtls_interop.openssl_peer import OpensslPeer, split_records

SETTINGS = settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

CONTENT_TYPES = (20, 21, 22, 23, 26)


def record(ctype: int, version: int, epoch: int, seq: int, body: bytes) -> bytes:
    return struct.pack("!BHHHIH", ctype, version, epoch, seq >> 32, seq & 0xFFFFFFFF, len(body)) + (
        body
    )


def with_epoch(rec: bytes, epoch: int) -> bytes:
    return rec[:3] + epoch.to_bytes(2, "big") + rec[5:]


def epoch_of(rec: bytes) -> int:
    return int.from_bytes(rec[3:5], "big")


# --- strategies ------------------------------------------------------------------------------

structured_records = st.builds(
    record,
    st.one_of(st.sampled_from(CONTENT_TYPES), st.integers(0, 255)),
    st.one_of(st.sampled_from((0xFEFD, 0xFEFF)), st.integers(0, 0xFFFF)),
    st.one_of(st.sampled_from((0, 1, 2, 0xFFFF)), st.integers(0, 0xFFFF)),
    st.integers(0, 2**48 - 1),
    st.one_of(
        st.binary(max_size=300),
        # a handshake fragment header with random fields in front of random bytes
        st.builds(
            lambda t, ln, s, off, body: (
                struct.pack("!I H I I", (t << 24) | ln, s, off >> 8 if off else 0, len(body))[:12]
                + body
            ),
            st.integers(0, 255),
            st.integers(0, 0xFFFFFF),
            st.integers(0, 0xFFFF),
            st.integers(0, 0xFFFFFF),
            st.binary(max_size=200),
        ),
    ),
)
datagrams = st.one_of(
    st.binary(max_size=1500),
    st.lists(structured_records, min_size=1, max_size=4).map(b"".join),
)


# --- never raises ----------------------------------------------------------------------------


@SETTINGS
@given(junk=st.lists(datagrams, min_size=1, max_size=8))
def test_fresh_peers_never_raise(
    client_identity: Identity, server_identity: Identity, junk: list[bytes]
) -> None:
    client = client_peer(client_identity)
    client.connect(0.0)
    server = server_peer(server_identity)
    for i, datagram in enumerate(junk):
        client.receive_datagram(datagram, float(i))
        server.receive_datagram(datagram, float(i))
        client.datagrams_to_send()
        server.datagrams_to_send()
    assert_no_internal_errors(client, server)


class Mutator:
    """Junk derived from the real traffic seen so far (replays, truncations, epoch moves)."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.history: list[tuple[str, bytes]] = []

    def pick(self) -> tuple[str, bytes] | None:
        return self.rng.choice(self.history) if self.history else None

    def truncated(self) -> bytes | None:
        seen = self.pick()
        if seen is None:
            return None
        datagram = seen[1]
        return datagram[: self.rng.randrange(len(datagram))]

    def replayed(self) -> bytes | None:
        seen = self.pick()
        return None if seen is None else seen[1]

    def wrong_epoch(self, epochs: tuple[int, ...]) -> bytes | None:
        seen = self.pick()
        if seen is None:
            return None
        records = split_records(seen[1])
        rec = self.rng.choice(records)
        choices = [e for e in epochs if e != epoch_of(rec)]
        return with_epoch(rec, self.rng.choice(choices))

    def bit_flipped(self) -> bytes | None:
        seen = self.pick()
        if seen is None:
            return None
        data = bytearray(seen[1])
        data[self.rng.randrange(len(data))] ^= 1 << self.rng.randrange(8)
        return bytes(data)


@SETTINGS
@given(
    seed=st.integers(0, 2**32 - 1),
    rate=st.floats(0.05, 1.0),
    gated=st.booleans(),
)
def test_mutated_traffic_at_every_stage_never_raises(
    client_identity: Identity, server_identity: Identity, seed: int, rate: float, gated: bool
) -> None:
    """Before real deliveries, feed either side (the intended receiver or the sender) replays,
    reflections, truncations, bit flips and epoch moves of the traffic so far. The handshake may
    fail (a bit-flipped plaintext message is a real protocol error), but nothing may raise."""
    rng = random.Random(seed)
    mutator = Mutator(rng)
    client = client_peer(client_identity, handshake_timeout=20.0)
    server: Any = (
        GatedServer(server_identity, send_ekt=True, handshake_timeout=20.0)
        if gated
        else ekt_server_peer(server_identity, handshake_timeout=20.0)
    )
    makers: list[Callable[[], bytes | None]] = [
        mutator.truncated,
        mutator.replayed,
        mutator.bit_flipped,
        lambda: mutator.wrong_epoch((0, 1, 2, 0xFFFF)),
    ]

    def tap(direction: str, datagram: bytes, now: float) -> None:
        mutator.history.append((direction, datagram))
        for _ in range(3):
            if rng.random() >= rate:
                break
            junk = rng.choice(makers)()
            if junk is not None:
                rng.choice((client, server)).receive_datagram(junk, now)

    client.connect(0.0)
    Network(seed).run(client, server, until=lambda: False, max_time=60.0, tap=tap)
    assert_no_internal_errors(client, server)


# --- record-layer junk does not stop the handshake -------------------------------------------


class RecordJunk:
    """Junk every DTLS receiver must silently discard (RFC 6347 §4.1.2.7), built around the
    real traffic: it goes to the intended receiver of the datagram it is derived from."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.mutator = Mutator(rng)

    def random_body(self, low: int = 0, high: int = 200) -> bytes:
        return self.rng.randbytes(self.rng.randint(low, high))

    def make(self, kind: str) -> bytes | None:
        rng = self.rng
        seq = rng.randrange(2**48)
        if kind == "short":
            return self.random_body(0, 12)
        if kind == "overlong":  # header claims more bytes than the datagram has
            body = self.random_body(0, 50)
            ctype = rng.choice(CONTENT_TYPES)
            return (
                record(ctype, 0xFEFD, 0, seq, body)[:11]
                + (len(body) + 1 + rng.randrange(100)).to_bytes(2, "big")
                + body
            )
        if kind == "unknown_type":
            ctype = rng.choice([t for t in range(256) if t not in CONTENT_TYPES])
            return record(ctype, 0xFEFD, rng.choice((0, 1)), seq, self.random_body())
        if kind == "bad_version":
            version = rng.choice((0x0303, 0x0000, 0xFFFF, 0x0302))
            return record(
                rng.choice(CONTENT_TYPES), version, rng.choice((0, 1)), seq, self.random_body()
            )
        if kind == "unused_epoch":
            epoch = rng.choice((2, 3, 0x100, 0xFFFF))
            return record(rng.choice(CONTENT_TYPES), 0xFEFD, epoch, seq, self.random_body())
        if kind == "forged_epoch1":  # fails AEAD authentication (or has no keys yet)
            ctype = rng.choice((21, 22, 23, 26))
            return record(ctype, 0xFEFD, 1, rng.randrange(64), self.random_body(24, 120))
        if kind == "truncated":
            return self.mutator.truncated()
        if kind == "replayed":
            return self.mutator.replayed()
        if kind == "moved_epoch":
            return self.mutator.wrong_epoch((2, 0xFFFF))
        if kind == "flipped_protected":  # a real epoch-1 record with one bit flipped
            protected = [
                rec
                for _, datagram in self.mutator.history
                for rec in split_records(datagram)
                if epoch_of(rec) == 1
            ]
            if not protected:
                return None
            data = bytearray(rng.choice(protected))
            # anywhere but the epoch field (moving epochs is "moved_epoch") and the length
            # (which would only make the record run past the datagram: "overlong")
            position = rng.choice([0, 1, 2, *range(5, 11), *range(13, len(data))])
            data[position] ^= 1 << rng.randrange(8)
            return bytes(data)
        raise AssertionError(kind)


JUNK_KINDS = (
    "short",
    "overlong",
    "unknown_type",
    "bad_version",
    "unused_epoch",
    "forged_epoch1",
    "truncated",
    "replayed",
    "moved_epoch",
    "flipped_protected",
)


def run_with_junk(
    client_identity: Identity,
    server_identity: Identity,
    *,
    seed: int,
    kinds: tuple[str, ...],
    per_delivery: int,
    gated: bool,
) -> tuple[Any, Any, Any]:
    rng = random.Random(seed)
    junk = RecordJunk(rng)
    client = client_peer(client_identity)
    server: Any = (
        GatedServer(server_identity, send_ekt=True) if gated else ekt_server_peer(server_identity)
    )
    injected: list[str] = []

    # the mutator derives junk only from traffic towards the same receiver
    history: dict[str, list[tuple[str, bytes]]] = {"c2s": [], "s2c": []}

    def tap_with_history(direction: str, datagram: bytes, now: float) -> None:
        history[direction].append((direction, datagram))
        junk.mutator.history = list(history[direction])
        target = server if direction == "c2s" else client
        for _ in range(per_delivery):
            kind = rng.choice(kinds)
            data = junk.make(kind)
            if data is not None:
                injected.append(kind)
                target.receive_datagram(data, now)

    client.connect(0.0)
    result = Network(seed).run(
        client,
        server,
        until=lambda: client.has("EktKeyReceived") and server.has("EktKeyAcknowledged"),
        max_time=120.0,
        tap=tap_with_history,
    )
    context = f"seed {seed}, injected {injected}: {describe(client)} / {describe(server)}"
    assert result.done, context
    assert client.failed is None and server.failed is None, context
    assert client.completed.srtp_keying_material == server.completed.srtp_keying_material
    assert_no_internal_errors(client, server)
    return client, server, result


@SETTINGS
@given(
    seed=st.integers(0, 2**32 - 1),
    kinds=st.lists(st.sampled_from(JUNK_KINDS), min_size=1, max_size=4, unique=True).map(tuple),
    per_delivery=st.integers(1, 3),
    gated=st.booleans(),
)
def test_handshake_completes_through_record_layer_junk(
    client_identity: Identity,
    server_identity: Identity,
    seed: int,
    kinds: tuple[str, ...],
    per_delivery: int,
    gated: bool,
) -> None:
    run_with_junk(
        client_identity,
        server_identity,
        seed=seed,
        kinds=kinds,
        per_delivery=per_delivery,
        gated=gated,
    )


def test_every_junk_kind_before_every_delivery(
    client_identity: Identity, server_identity: Identity
) -> None:
    """Deterministic sweep: each kind of junk before every delivery, both peers, EKT included."""
    for kind in JUNK_KINDS:
        for gated in (False, True):
            run_with_junk(
                client_identity,
                server_identity,
                seed=7,
                kinds=(kind,),
                per_delivery=2,
                gated=gated,
            )


def test_all_wrong_epoch_copies_of_all_records_at_every_stage(
    client_identity: Identity, server_identity: Identity
) -> None:
    """Before every delivery, the receiver gets every record seen so far in its direction moved
    to each epoch it is not in (epoch 0 <-> 1, and 2): all must be dropped."""
    client = client_peer(client_identity)
    server = ekt_server_peer(server_identity)
    seen: dict[str, list[bytes]] = {"c2s": [], "s2c": []}
    moved = 0

    def tap(direction: str, datagram: bytes, now: float) -> None:
        nonlocal moved
        seen[direction].extend(split_records(datagram))
        target = server if direction == "c2s" else client
        for rec in seen[direction]:
            for epoch in (0, 1, 2):
                if epoch != epoch_of(rec) and not (epoch == 0 and rec[0] != 22):
                    moved += 1
                    target.receive_datagram(with_epoch(rec, epoch), now)

    client.connect(0.0)
    result = Network(3).run(
        client,
        server,
        until=lambda: client.has("EktKeyReceived") and server.has("EktKeyAcknowledged"),
        max_time=120.0,
        tap=tap,
    )
    assert result.done, f"{describe(client)} / {describe(server)}"
    assert moved > 50
    assert_no_internal_errors(client, server)


# --- CookieGate: no state before a valid cookie ----------------------------------------------


def first_client_hello(client_identity: Identity) -> tuple[int, ClientHello]:
    """The record sequence number and decoded ClientHello of a fresh client's flight 1."""
    client = client_peer(client_identity)
    client.connect(0.0)
    [datagram] = client.datagrams_to_send()
    records, rest = parse_datagram_untrusted(datagram)
    assert rest == 0 and len(records) == 1
    [fragment] = parse_handshake_fragments_untrusted(records[0].fragment)
    return records[0].sequence_number, ClientHello.decode(fragment.body)


def hello_datagram(hello: ClientHello, message_seq: int = 0, record_seq: int = 0) -> bytes:
    return record(22, 0xFEFD, 0, record_seq, encode_handshake(1, message_seq, hello.encode()))


def containers(obj: Any) -> dict[str, int]:
    """Sizes of every container reachable from the gate's attributes (one level deep)."""
    sizes: dict[str, int] = {}
    names = list(getattr(obj, "__dict__", {})) + list(getattr(type(obj), "__slots__", ()))
    for name in names:
        value = getattr(obj, name, None)
        if hasattr(value, "__len__") and not isinstance(value, bytes | str):
            sizes[name] = len(value)
    return sizes


@SETTINGS
@given(junk=st.lists(datagrams, min_size=1, max_size=10), identity=st.binary(max_size=40))
def test_gate_never_raises_or_accepts_garbage(junk: list[bytes], identity: bytes) -> None:
    gate = CookieGate(secret=b"k" * 32)
    for i, datagram in enumerate(junk):
        verdict = gate.check(datagram, identity, float(i))
        assert not verdict.accepted


def test_gate_accepts_only_its_cookie_for_the_same_identity(client_identity: Identity) -> None:
    gate = CookieGate()
    seq, hello = first_client_hello(client_identity)
    verdict = gate.check(hello_datagram(hello, 0, seq), b"assoc-A", 0.0)
    assert not verdict.accepted and verdict.reply is not None
    records, _ = parse_datagram_untrusted(verdict.reply)
    [fragment] = parse_handshake_fragments_untrusted(records[0].fragment)
    assert fragment.msg_type == 3
    cookie = fragment.body[3 : 3 + fragment.body[2]]
    with_cookie = attrs.evolve(hello, cookie=cookie)
    assert gate.check(hello_datagram(with_cookie, 1, 1), b"assoc-A", 1.0).accepted
    # the same cookie for another association id, or a changed random, is refused
    assert not gate.check(hello_datagram(with_cookie, 1, 1), b"assoc-B", 1.0).accepted
    other_random = attrs.evolve(with_cookie, random=os.urandom(32))
    assert not gate.check(hello_datagram(other_random, 1, 1), b"assoc-A", 1.0).accepted


def test_client_hello_flood_leaves_no_state(client_identity: Identity) -> None:
    # a short rotation period so that the flood also crosses hundreds of secret rotations
    gate = CookieGate(rotate_every=1.0)
    _, hello = first_client_hello(client_identity)
    rng = random.Random(5)

    def flood(count: int, start: int) -> int:
        replies = 0
        for i in range(start, start + count):
            cookie = rng.randbytes(rng.choice((0, 16, 17, 32, 255)))
            forged = attrs.evolve(hello, random=rng.randbytes(32), cookie=cookie)
            datagram = hello_datagram(forged, rng.randrange(3), rng.randrange(2**48))
            verdict = gate.check(datagram, b"assoc-%d" % i, i / 20)
            assert not verdict.accepted
            replies += verdict.reply is not None
        return replies

    flood(1000, 0)  # warm caches (hmac objects, secrets, interned ints)
    before = containers(gate)
    gc.collect()
    tracemalloc.start()
    try:
        snapshot_before = tracemalloc.take_snapshot()
        replies = flood(5000, 1000)
        gc.collect()
        snapshot_after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    assert replies == 5000  # every cookieless/forged hello gets a HelloVerifyRequest
    assert containers(gate) == before
    perc_filter = [tracemalloc.Filter(True, "*/perc/*")]
    growth = sum(
        stat.size_diff
        for stat in snapshot_after.filter_traces(perc_filter).compare_to(
            snapshot_before.filter_traces(perc_filter), "filename"
        )
    )
    assert growth < 16 * 1024, f"perc allocations grew by {growth} bytes over 5000 hellos"


# --- bounded memory under floods -------------------------------------------------------------


def fragment(msg_type: int, length: int, message_seq: int, offset: int, body: bytes) -> bytes:
    return (
        bytes([msg_type])
        + length.to_bytes(3, "big")
        + message_seq.to_bytes(2, "big")
        + offset.to_bytes(3, "big")
        + len(body).to_bytes(3, "big")
        + body
    )


def traced_growth(peer: Any, datagrams: list[bytes]) -> int:
    """Bytes still allocated by perc after feeding ``datagrams`` (garbage collected)."""
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        for datagram in datagrams:
            peer.receive_datagram(datagram, 0.0)
            peer.datagrams_to_send()
        gc.collect()
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    perc_only = [tracemalloc.Filter(True, "*/perc/*")]
    return sum(
        stat.size_diff
        for stat in after.filter_traces(perc_only).compare_to(
            before.filter_traces(perc_only), "filename"
        )
    )


def test_fragment_and_future_epoch_floods_stay_bounded(
    client_identity: Identity, server_identity: Identity
) -> None:
    """Reassembly slots and the buffer of early epoch-1 records are bounded (SPEC-DTLS 1.4,
    3.3): thousands of partial messages of the maximum size, in every message_seq slot the
    look-ahead allows, or of unverifiable epoch-1 records, leave at most a few hundred KiB."""
    rng = random.Random(11)
    count = 2000
    floods = {
        "certificate fragments": [
            record(
                22,
                0xFEFD,
                0,
                i,
                fragment(
                    rng.choice((2, 11, 12, 13, 14)),
                    16384,
                    rng.randrange(12),
                    rng.randrange(16000),
                    rng.randbytes(300),
                ),
            )
            for i in range(count)
        ],
        "huge declared lengths": [
            record(
                22,
                0xFEFD,
                0,
                i,
                fragment(11, 0xFFFFFF, rng.randrange(12), rng.randrange(0xFFFF00), b"x" * 200),
            )
            for i in range(count)
        ],
        "early epoch-1 records": [
            record(rng.choice((21, 22, 23, 26)), 0xFEFD, 1, i, rng.randbytes(1000))
            for i in range(count)
        ],
    }
    for name, datagrams in floods.items():
        for make in ("client", "server"):
            if make == "client":
                peer = client_peer(client_identity)
                peer.connect(0.0)
                peer.datagrams_to_send()
            else:
                peer = server_peer(server_identity)
            growth = traced_growth(peer, datagrams)
            assert growth < 512 * 1024, f"{make}, {name}: {growth} bytes kept"
            assert_no_internal_errors(peer)


# --- junk while talking to OpenSSL -------------------------------------------------------------


@pytest.mark.parametrize("ours_is_client", [True, False], ids=["our-client", "our-server"])
@pytest.mark.parametrize("kind", JUNK_KINDS)
def test_record_layer_junk_against_openssl(
    client_identity: Identity, server_identity: Identity, kind: str, ours_is_client: bool
) -> None:
    """Our side of an OpenSSL handshake gets junk of one kind before every real delivery;
    OpenSSL gets only the real traffic (no loss: OpenSSL's timers read the wall clock)."""
    rng = random.Random(kind)
    junk = RecordJunk(rng)
    ours: Any
    if ours_is_client:
        ours = client_peer(client_identity)
        theirs = OpensslPeer(is_client=False, identity=server_identity)
        ours.connect(0.0)
    else:
        ours = server_peer(server_identity)
        theirs = OpensslPeer(is_client=True, identity=client_identity)
        theirs.connect(0.0)
    towards_us: list[tuple[str, bytes]] = []
    injected = 0

    def tap(direction: str, datagram: bytes) -> None:
        nonlocal injected
        if direction == "a->b":  # theirs -> ours
            towards_us.append((direction, datagram))
            junk.mutator.history = towards_us
            for _ in range(2):
                data = junk.make(kind)
                if data is not None:
                    injected += 1
                    ours.receive_datagram(data, 0.0)

    pump(theirs, ours, tap=tap)
    assert injected >= 2  # flipped_protected: only flight 6 (or 5) has an epoch-1 record
    assert_no_internal_errors(ours)
    assert ours.completed.srtp_keying_material == theirs.srtp_keying_material


# --- record sequence numbers near the end of the space (findings F2) --------------------------

MAX_SEQ = 2**48 - 1


def with_sequence_number(datagram: bytes, seq: int) -> bytes:
    return b"".join(r[:5] + seq.to_bytes(6, "big") + r[11:] for r in split_records(datagram))


@pytest.mark.parametrize("seq", [MAX_SEQ, MAX_SEQ - 1, MAX_SEQ - 5, MAX_SEQ - 20])
def test_client_hello_near_the_last_record_sequence_number(
    client_identity: Identity, server_identity: Identity, seq: int
) -> None:
    """A stateless server echoes the ClientHello's record sequence number (RFC 6347 §4.2.1);
    a (spoofed or broken) ClientHello numbered near 2^48 - 1 must not push the server's own
    counter past the end (SPEC-DTLS 1.5): no internal error, and the genuine handshake that
    follows still completes."""
    client = client_peer(client_identity)
    server = ekt_server_peer(server_identity)
    client.connect(0.0)
    first = True

    def tap(direction: str, datagram: bytes) -> None:
        nonlocal first
        if first:
            first = False
            server.receive_datagram(with_sequence_number(datagram, seq), 0.0)

    pump(
        client,
        server,
        tap=tap,
        until=lambda: client.has("EktKeyReceived") and server.has("EktKeyAcknowledged"),
    )
    assert_no_internal_errors(client, server)


# --- forged plaintext post-handshake messages --------------------------------------------------

FORGED_KEY = b"\xee" * 16


def forged_plaintext_ekt_keys(record_seq: int, message_seqs: range) -> bytes:
    """Plaintext (epoch 0) EKTKey records, one per message_seq."""
    body = EktKey(FORGED_KEY, b"\xee" * 14, 0xBEEF, 1).encode()
    return b"".join(
        record(22, 0xFEFD, 0, record_seq + i, encode_handshake(26, seq, body))
        for i, seq in enumerate(message_seqs)
    )


@pytest.mark.parametrize("gated", [False, True])
def test_plaintext_ekt_key_is_never_accepted(
    client_identity: Identity, server_identity: Identity, gated: bool
) -> None:
    """EKTKey carries the end-to-end group key: only an epoch-1 (authenticated) EKTKey may
    become EktKeyReceived (D9). Forged epoch-0 EKTKeys numbered after the server's Finished (so
    they wait in the reassembler as future messages, where the real EKTKey will go) are fed to
    the client before every delivery; after completion, forged EKTKeys with every message_seq
    follow. (An in-sequence forged plaintext message during the handshake is a plain protocol
    error, unexpected_message, and not what this test is about.)"""
    client = client_peer(client_identity)
    server: Any = (
        GatedServer(server_identity, send_ekt=True) if gated else ekt_server_peer(server_identity)
    )
    finished_seq = 6 if gated else 5  # server messages: [HVR] SH Cert SKE CR SHD Finished
    future = range(finished_seq + 1, finished_seq + 7)
    forged = 0

    def tap(direction: str, datagram: bytes, now: float) -> None:
        nonlocal forged
        if direction == "s2c":
            forged += 1
            client.receive_datagram(forged_plaintext_ekt_keys(1000 + 20 * forged, future), now)

    client.connect(0.0)
    result = Network(4).run(
        client,
        server,
        until=lambda: client.has("EktKeyReceived") and server.has("EktKeyAcknowledged"),
        max_time=60.0,
        tap=tap,
    )
    assert result.done, f"{describe(client)} / {describe(server)}"
    for i in range(3):
        client.receive_datagram(forged_plaintext_ekt_keys(5000 + 20 * i, range(13)), result.now)
    keys = [e.key for e in client.events if type(e).__name__ == "EktKeyReceived"]
    assert keys == [EKT_KEY]
    assert forged >= 3
    assert_no_internal_errors(client, server)
    assert not client.has("ConnectionClosed")


# --- a forged partial fragment must not hold a reassembly slot (findings F5) ---------------


@pytest.mark.parametrize(
    "msg_type, message_seq, length",
    [(2, 0, 100), (11, 1, 100), (11, 1, 5000), (12, 2, 60), (14, 4, 20)],
)
def test_forged_partial_fragment_does_not_stall_the_client(
    client_identity: Identity,
    server_identity: Identity,
    msg_type: int,
    message_seq: int,
    length: int,
) -> None:
    """A plaintext fragment of a flight-4 message with a wrong total length, sent to the client
    before the real flight 4, must not hold the reassembly slot against the real message: the
    handshake (with EKTKey) completes through the first real flight or its retransmission."""
    client = client_peer(client_identity)
    server = ekt_server_peer(server_identity)
    client.connect(0.0)
    client.receive_datagram(
        record(22, 0xFEFD, 0, 1000, fragment(msg_type, length, message_seq, 0, b"\x00" * 10)),
        0.0,
    )
    result = Network(1).run(
        client,
        server,
        until=lambda: client.has("EktKeyReceived") and server.has("EktKeyAcknowledged"),
        max_time=60.0,
    )
    assert result.done and result.now < 10.0, f"{describe(client)} / {describe(server)}"
    assert_no_internal_errors(client, server)


# --- every drop is counted (HELPERS: "every buffer bounded, every drop counted") ---------------


def drop_counters(peer: EnginePeer) -> int:
    """Records dropped, plus early epoch-1 records held in the bounded buffer (which are
    counted as dropped later if they never open)."""
    stats = attrs.asdict(peer.connection.stats)
    return sum(
        v
        for k, v in stats.items()
        if k.startswith("dropped") or k in ("fragments_dropped", "future_records_buffered")
    )


@pytest.mark.parametrize("side", ["client", "server"])
@pytest.mark.parametrize(
    "kind, stage",
    [
        (kind, stage)
        for kind in JUNK_KINDS
        for stage in ("mid-handshake", "after-handshake")
        # before flight 6 the client has seen no protected record to flip
        if not (kind == "flipped_protected" and stage == "mid-handshake")
    ],
)
def test_every_junk_datagram_is_counted(
    client_identity: Identity, server_identity: Identity, kind: str, stage: str, side: str
) -> None:
    client = client_peer(client_identity)
    server = ekt_server_peer(server_identity)
    history: list[tuple[str, bytes]] = []
    client.connect(0.0)
    if stage == "after-handshake":
        pump(
            client,
            server,
            until=lambda: client.has("EktKeyReceived") and server.has("EktKeyAcknowledged"),
            tap=lambda direction, datagram: history.append((direction, datagram)),
        )
    elif side == "client":  # the client has flight 4 and sent flight 5; no answer yet
        for datagram in client.datagrams_to_send():
            server.receive_datagram(datagram, 0.0)
        for datagram in server.datagrams_to_send():
            history.append(("b->a", datagram))
            client.receive_datagram(datagram, 0.0)
        client.datagrams_to_send()
    else:  # the server has the ClientHello and sent flight 4; no answer yet
        for datagram in client.datagrams_to_send():
            history.append(("a->b", datagram))
            server.receive_datagram(datagram, 0.0)
        server.datagrams_to_send()
    target = client if side == "client" else server
    towards = "b->a" if side == "client" else "a->b"
    junk = RecordJunk(random.Random(kind))
    junk.mutator.history = [h for h in history if h[0] == towards]
    before = drop_counters(target)
    injected = 0
    for _ in range(20):
        data = junk.make(kind)
        if data:  # an empty datagram holds nothing to drop
            injected += 1
            target.receive_datagram(data, 0.5)
    assert injected >= 10
    assert drop_counters(target) - before >= injected
    assert not target.has("ConnectionClosed")
    assert_no_internal_errors(target)
