"""Export and resume of an established server association (D29, perc.dtls.resume)."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from perc.dtls import (
    DtlsConnection,
    LocalProtocolError,
    RecordStateError,
    decode_record_state,
)
from perc.dtls.events import (
    ConnectionClosed,
    EktKeyAcknowledged,
    EktKeyReceived,
    HandshakeCompleted,
)
from perc.wire import dtls as w
from tests.dtls.helpers import Pair, make_pair


def _established(suite: int = 0xC02B) -> Pair:
    p = make_pair(client_kw={"cipher_suites": (suite,)}, server_kw={"cipher_suites": (suite,)})
    p.client.connect(p.now)
    p.pump()
    assert p.server is not None and p.server.is_established
    return p


def _records(datagrams: list[bytes]) -> list[tuple[int, int]]:
    out = []
    for dg in datagrams:
        records, _ = w.parse_datagram_untrusted(dg)
        out += [(r.epoch, r.sequence_number) for r in records]
    return out


@pytest.mark.parametrize("suite", [0xC02B, 0xC02C, 0xCCA9])
def test_resumed_server_keeps_sending_ekt_keys_and_reads_the_client(suite: int) -> None:
    p = _established(suite)
    old = p.server
    assert old is not None
    old.send_ekt_key(b"K" * 16, b"S" * 12, 7, 86400, p.now)
    p.pump()
    assert EktKeyAcknowledged(7) in p.server_events
    blob = old.export_record_state().encode()
    state = decode_record_state(blob)
    assert state.negotiated == old.negotiated
    sent_before = old.next_record_sequence
    ceiling = state.write_seq + 1024
    # The old process sends more after the export (and then dies).
    old.send_ekt_key(b"L" * 16, b"S" * 12, 8, 86400, p.now)
    old.datagrams_to_send()
    new = DtlsConnection.resume(p.server_config, state, next_sequence=ceiling)
    assert new.is_established and new.negotiated == old.negotiated
    assert new.next_record_sequence == ceiling > sent_before
    assert new.next_event() is None  # no second HandshakeCompleted
    with pytest.raises(LocalProtocolError):
        new.export_keying_material(b"EXTRACTOR-dtls_srtp", 16)
    p.server = new
    new.send_ekt_key(b"M" * 16, b"S" * 12, 9, 86400, p.now)
    out = new.datagrams_to_send()
    assert all(seq >= ceiling for epoch, seq in _records(out) if epoch == 1)
    p.s2c += out
    p.pump()
    assert EktKeyReceived(b"M" * 16, b"S" * 12, 9, 86400) in p.client_events
    assert EktKeyAcknowledged(9) in p.server_events
    # The client's close_notify ends the resumed association.
    p.client.close(p.now)
    p.pump()
    closed = [e for e in p.server_events if isinstance(e, ConnectionClosed)]
    assert closed and closed[-1].reason == "close_notify"
    assert not any(isinstance(e, HandshakeCompleted) for e in p.server_events[2:])


def test_resume_refuses_numbers_below_the_export_and_clients() -> None:
    p = _established()
    assert p.server is not None
    state = p.server.export_record_state()
    with pytest.raises(LocalProtocolError):
        DtlsConnection.resume(p.server_config, state, next_sequence=state.write_seq - 1)
    with pytest.raises(LocalProtocolError):
        DtlsConnection.resume(
            p.server_config, state, next_sequence=state.write_seq + 0x10000 - state.message_seq
        )
    with pytest.raises(LocalProtocolError):
        p.client.export_record_state()


def test_replayed_client_records_before_the_export_are_dropped() -> None:
    p = _established()
    assert p.server is not None
    p.server.send_ekt_key(b"K" * 16, b"S" * 12, 7, 86400, p.now)
    for dg in p.server.datagrams_to_send():
        p.client.receive_datagram(dg, p.now)
    acks = p.client.datagrams_to_send()
    for dg in acks:
        p.server.receive_datagram(dg, p.now)
    state = p.server.export_record_state()
    new = DtlsConnection.resume(p.server_config, state, next_sequence=state.write_seq + 10)
    for dg in acks:
        new.receive_datagram(dg, p.now)
    assert new.stats.dropped_replay == len(acks)


def test_every_truncation_and_garbage_is_one_error() -> None:
    p = _established()
    assert p.server is not None
    blob = p.server.export_record_state().encode()
    for n in range(len(blob)):
        with pytest.raises(RecordStateError):
            decode_record_state(blob[:n])
    for key, value in itertools.product(
        (b'"write_seq"', b'"suite"', b'"write_key"', b'"v"'), (b"-5", b'"zz"', b"null")
    ):
        i = blob.index(key) + len(key) + 1
        j = min(x for x in (blob.find(b",", i), blob.find(b"}", i)) if x >= 0)
        with pytest.raises(RecordStateError):
            decode_record_state(blob[:i] + value + blob[j:])


@given(st.binary(max_size=300))
def test_garbage_never_raises_anything_else(data: bytes) -> None:
    with pytest.raises(RecordStateError):
        decode_record_state(data)
