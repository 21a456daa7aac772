"""Hostile bytes against live connections: mutated, truncated, duplicated and replayed
datagrams at every stage of the handshake. Nothing may raise, and the internal-error safety
net of receive_datagram must never be what catches it (stats.internal_errors stays 0).

``PERC_SOAK=1`` in the environment multiplies the example counts by 25 for a soak run; the
default counts keep this file well under a second.
"""

from __future__ import annotations

import os
import random

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from perc.dtls import CookieGate
from perc.dtls.events import HandshakeCompleted
from perc.wire import dtls as w
from tests.dtls.helpers import make_pair

SOAK = 25 if os.environ.get("PERC_SOAK") == "1" else 1


def _deep(rng: random.Random, dg: bytes) -> bytes:
    """Flip bytes inside one plaintext handshake body, keeping every header consistent, so
    the mutation reaches the message decoders and the state machine."""
    records, _ = w.parse_datagram_untrusted(dg)
    out = []
    for rec in records:
        if rec.content_type == 22 and rec.epoch == 0 and rng.random() < 0.5:
            frags = w.parse_handshake_fragments_untrusted(rec.fragment)
            payload = b""
            for f in frags:
                body = bytearray(f.body)
                if body:
                    body[rng.randrange(len(body))] ^= rng.randint(1, 255)
                payload += w.encode_handshake_fragment(
                    f.msg_type, f.length, f.message_seq, f.fragment_offset, bytes(body)
                )
            out.append(
                w.encode_record(
                    w.DtlsRecord(
                        rec.content_type, rec.version, rec.epoch, rec.sequence_number, payload
                    )
                )
            )
        else:
            out.append(w.encode_record(rec))
    return b"".join(out)


def _mutate(rng: random.Random, dg: bytes) -> list[bytes]:
    kind = rng.choice(["keep", "keep", "flip", "truncate", "garbage", "dup", "deep", "deep"])
    if kind == "keep" or not dg:
        return [dg]
    if kind == "deep":
        return [_deep(rng, dg), dg]
    if kind == "flip":
        b = bytearray(dg)
        for _ in range(rng.randint(1, 3)):
            b[rng.randrange(len(b))] ^= rng.randint(1, 255)
        return [bytes(b), dg]
    if kind == "truncate":
        return [dg[: rng.randrange(len(dg))], dg]
    if kind == "garbage":
        return [dg + rng.randbytes(rng.randint(0, 40)), dg]
    return [dg, dg]


@settings(max_examples=200 * SOAK, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 2**32), st.booleans(), st.sampled_from([1200, 300]))
def test_mutated_traffic_never_crashes(seed: int, cookies: bool, mtu: int) -> None:
    # The engine's own randomness (keys, randoms) varies the sizes, so mutations come from a
    # seeded generator rather than from hypothesis draws.
    rng = random.Random(seed)
    p = make_pair(cookies=cookies, client_kw={"mtu": mtu}, server_kw={"mtu": mtu})
    p.client.connect(0.0)
    for step in range(40):
        for dg in p.client.datagrams_to_send():
            p.c2s.extend(_mutate(rng, dg))
        if p.server is not None:
            for dg in p.server.datagrams_to_send():
                p.s2c.extend(_mutate(rng, dg))
        while p.c2s:
            p._deliver_to_server(p.c2s.pop(0))
        while p.s2c:
            p.client.receive_datagram(p.s2c.pop(0), p.now)
        p.drain()
        if (
            p.server is not None
            and p.server.is_established
            and step % 7 == 0
            and p.server.negotiated is not None
            and p.server.negotiated.ekt_cipher is not None
        ):
            p.server.send_ekt_key(b"K" * 16, b"S" * 12, step, 60, p.now)
        p.now += 0.6
        for conn in (p.client, p.server):
            if conn is not None and (t := conn.get_timer()) is not None and t <= p.now:
                conn.handle_timer(p.now)
    assert p.client.stats.internal_errors == 0
    assert p.server is None or p.server.stats.internal_errors == 0
    # Completion agreement: if both completed, they derived the same keys.
    done_c = [e for e in p.client_events if isinstance(e, HandshakeCompleted)]
    done_s = [e for e in p.server_events if isinstance(e, HandshakeCompleted)]
    if done_c and done_s:
        assert done_c[0].srtp_keying_material == done_s[0].srtp_keying_material


@settings(max_examples=60 * SOAK, deadline=None)
@given(st.lists(st.binary(min_size=13, max_size=200), max_size=10))
def test_random_records_into_established_connection(junk: list[bytes]) -> None:
    p = make_pair()
    p.client.connect(0.0)
    p.pump()
    assert p.server is not None
    for j in junk:
        # Give the junk a plausible record header now and then.
        for conn in (p.client, p.server):
            conn.receive_datagram(j, 1.0)
            conn.receive_datagram(b"\x16\xfe\xfd\x00\x01" + j[5:], 1.0)
            conn.receive_datagram(b"\x16\xfe\xfd\x00\x00" + j[5:], 1.0)
    assert p.client.is_established and p.server.is_established
    assert p.client.stats.internal_errors == 0 and p.server.stats.internal_errors == 0


@settings(max_examples=150 * SOAK, deadline=None)
@given(
    random_bytes=st.binary(min_size=32, max_size=32),
    cookie=st.binary(max_size=255),
    suites=st.lists(st.integers(0, 0xFFFF), min_size=1, max_size=20),
    record_seq=st.integers(0, (1 << 48) - 1),
    message_seq=st.integers(0, 0xFFFF),
    identity=st.binary(max_size=40),
    now=st.floats(0, 1e9),
)
def test_cookie_gate_stateless_under_forged_client_hellos(
    random_bytes: bytes,
    cookie: bytes,
    suites: list[int],
    record_seq: int,
    message_seq: int,
    identity: bytes,
    now: float,
) -> None:
    gate = _GATE
    keys_before = len(gate._keys)
    ch = w.ClientHello(0xFEFD, random_bytes, b"", cookie, tuple(suites), b"\0", ())
    msg = w.encode_handshake(1, message_seq, ch.encode())
    dg = w.encode_record_header(22, 0xFEFD, 0, record_seq, len(msg)) + msg
    verdict = gate.check(dg, identity, now)
    assert not verdict.accepted  # a forged cookie never passes (2^-128)
    assert verdict.reply is not None
    (rec,), _ = w.parse_datagram_untrusted(verdict.reply)
    (frag,) = w.parse_handshake_fragments_untrusted(rec.fragment)
    assert (rec.sequence_number, frag.message_seq) == (record_seq, message_seq)
    # The reply's cookie is accepted for the same ClientHello, identity and time.
    hvr = w.HelloVerifyRequest.decode(frag.body)
    good = w.ClientHello(0xFEFD, random_bytes, b"", hvr.cookie, tuple(suites), b"\0", ())
    msg2 = w.encode_handshake(1, message_seq, good.encode())
    dg2 = w.encode_record_header(22, 0xFEFD, 0, record_seq, len(msg2)) + msg2
    assert gate.check(dg2, identity, now).accepted
    assert len(gate._keys) <= max(2, keys_before)  # only the two period keys, ever
    assert not hasattr(gate, "__dict__")


_GATE = CookieGate(b"p" * 32)
