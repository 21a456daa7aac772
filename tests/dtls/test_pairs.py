"""Our client against our server, in memory, with injected time."""

from __future__ import annotations

import itertools
from typing import Any

import pytest

from perc.dtls import CookieGate, DtlsConnection, LocalProtocolError
from perc.dtls import handshake as hsmod
from perc.dtls.events import (
    AlertReceived,
    ApplicationDataReceived,
    ConnectionClosed,
    EktKeyAcknowledged,
    EktKeyReceived,
    HandshakeCompleted,
)
from perc.wire import dtls as w
from tests.dtls.helpers import Pair, ident, make_pair


def _completed(events: list[Any]) -> HandshakeCompleted:
    done = [e for e in events if isinstance(e, HandshakeCompleted)]
    assert len(done) == 1, events
    return done[0]


def _closed(events: list[Any]) -> ConnectionClosed:
    closed = [e for e in events if isinstance(e, ConnectionClosed)]
    assert len(closed) == 1, events
    return closed[0]


def _handshake(p: Pair) -> tuple[HandshakeCompleted, HandshakeCompleted]:
    p.client.connect(p.now)
    p.pump()
    return _completed(p.client_events), _completed(p.server_events)


@pytest.mark.parametrize(
    ("suite", "group", "cookies"),
    list(itertools.product((0xC02B, 0xC02C, 0xCCA9), (29, 23), (False, True))),
)
def test_every_suite_and_group(suite: int, group: int, cookies: bool) -> None:
    p = make_pair(
        cookies=cookies,
        client_kw={"cipher_suites": (suite,), "groups": (group, 23)},
        server_kw={"groups": (group, 23)},
    )
    c, s = _handshake(p)
    assert c.cipher_suite == s.cipher_suite == suite
    assert p.server is not None
    assert p.server.negotiated is not None and p.server.negotiated.named_group == group
    assert c.srtp_profile == s.srtp_profile == 0x0009
    assert c.ekt_cipher == s.ekt_cipher == 1
    assert c.srtp_keying_material == s.srtp_keying_material
    assert c.srtp_keying_material is not None and len(c.srtp_keying_material) == 112
    assert p.client.export_keying_material(b"x", 20) == p.server.export_keying_material(b"x", 20)
    # Mutual authentication (D17): each side saw the other's certificate.
    assert c.peer_fingerprint == ident("server").fingerprint
    assert s.peer_fingerprint == ident("client").fingerprint
    assert s.peer_certificate_der == ident("client").certificate_der
    # Application data both ways, in epoch 1.
    p.client.send_application_data(b"ping", p.now)
    p.server.send_application_data(b"pong", p.now)
    p.pump()
    assert ApplicationDataReceived(b"ping") in p.server_events
    assert ApplicationDataReceived(b"pong") in p.client_events


def test_cookie_exchange() -> None:
    p = make_pair(cookies=True)
    p.client.connect(0.0)
    first = p.client.datagrams_to_send()
    assert p.gate is not None
    verdict = p.gate.check(first[0], p.identity, 0.0)
    assert not verdict.accepted and verdict.reply is not None
    (rec,), _ = w.parse_datagram_untrusted(verdict.reply)
    assert rec.version == 0xFEFF and rec.sequence_number == 0
    p.c2s.extend(first)
    p.pump()
    c, s = _completed(p.client_events), _completed(p.server_events)
    assert c.srtp_keying_material == s.srtp_keying_material
    assert p.server is not None and p.server.cookie_identity == b"assoc-1"
    # The server answered CH#2 (record seq 1, message_seq 1) with ServerHello seq 1 / seq 1.
    assert p.server._hs._send_seq == 7  # SH 1 .. SHD 5, Finished 6


def test_cookie_gate_rules() -> None:
    gate = CookieGate(b"s" * 32, rotate_every=60.0)
    client = DtlsConnection(make_pair().client._config)
    client.connect(0.0)
    ch1 = client.datagrams_to_send()[0]
    hvr = gate.check(ch1, b"id", 10.0).reply
    assert hvr is not None
    client.receive_datagram(hvr, 0.0)
    ch2 = client.datagrams_to_send()[0]
    assert gate.check(ch2, b"id", 10.0).accepted
    assert gate.check(ch2, b"id", 100.0).accepted  # previous period still valid
    assert not gate.check(ch2, b"id", 130.0).accepted  # two periods later: stale
    assert not gate.check(ch2, b"other", 10.0).accepted  # bound to the identity
    assert not CookieGate(b"t" * 32).check(ch2, b"id", 10.0).accepted  # other secret
    assert gate.check(b"\x16garbage", b"id", 0.0) == gate.check(b"", b"id", 0.0)


def test_client_hello_flood_allocates_no_state() -> None:
    gate = CookieGate(b"s" * 32)
    p = make_pair()
    p.client.connect(0.0)
    ch = p.client.datagrams_to_send()[0]
    (rec,), _ = w.parse_datagram_untrusted(ch)
    (frag,) = w.parse_handshake_fragments_untrusted(rec.fragment)
    hello = w.ClientHello.decode(frag.body)
    for i in range(500):
        forged = w.ClientHello(
            hello.client_version,
            i.to_bytes(32, "big"),
            b"",
            bytes([i % 256]) * 17,
            hello.cipher_suites,
            hello.compression_methods,
            hello.extensions,
        )
        body = forged.encode()
        msg = w.encode_handshake(1, 0, body)
        dg = w.encode_record_header(22, 0xFEFD, 0, i, len(msg)) + msg
        verdict = gate.check(dg, i.to_bytes(4, "big"), float(i))
        assert not verdict.accepted and verdict.reply is not None
    assert len(gate._keys) <= 2  # the only state: two period keys
    assert not hasattr(gate, "__dict__")


def test_mtu_300_fragments_certificates() -> None:
    p = make_pair(client_kw={"mtu": 300}, server_kw={"mtu": 300})
    p.client.connect(0.0)
    sizes: list[int] = []
    frag_offsets: list[int] = []

    def spy(dg: bytes) -> bytes:
        sizes.append(len(dg))
        for rec in w.parse_datagram_untrusted(dg)[0]:
            if rec.content_type == 22 and rec.epoch == 0:
                frag_offsets.extend(
                    f.fragment_offset for f in w.parse_handshake_fragments_untrusted(rec.fragment)
                )
        return dg

    p.tamper_c2s = p.tamper_s2c = spy
    p.pump()
    c, s = _completed(p.client_events), _completed(p.server_events)
    assert c.srtp_keying_material == s.srtp_keying_material
    assert max(sizes) <= 300
    assert any(off > 0 for off in frag_offsets)


def test_reordered_fragments_and_ccs_after_finished() -> None:
    p = make_pair(client_kw={"mtu": 256}, server_kw={"mtu": 256})
    p.client.connect(0.0)
    p.pump(rounds=1)  # CH -> server, flight 4 queued at the server
    assert p.server is not None
    flight4 = p.server.datagrams_to_send()
    assert len(flight4) >= 3
    for dg in reversed(flight4):  # every datagram out of order
        p.client.receive_datagram(dg, 0.0)
    flight5 = p.client.datagrams_to_send()
    # Split flight 5 into single records and deliver the epoch-1 Finished before the CCS.
    records = [r for dg in flight5 for r in w.parse_datagram_untrusted(dg)[0]]
    records.sort(key=lambda r: (r.content_type != 22 or r.epoch != 0, -r.epoch))
    for r in records:
        p.server.receive_datagram(w.encode_record(r), 0.0)
    assert p.server.stats.future_records_buffered == 1
    p.pump()
    c, s = _completed(p.client_events), _completed(p.server_events)
    assert c.srtp_keying_material == s.srtp_keying_material


def _fail_case(p: Pair, code: int) -> None:
    p.client.connect(0.0)
    p.pump()
    c, s = _closed(p.client_events), _closed(p.server_events)
    assert c.alert == s.alert == code
    assert not any(isinstance(e, HandshakeCompleted) for e in p.client_events + p.server_events)
    return


def test_corrupted_finished(monkeypatch: pytest.MonkeyPatch) -> None:
    real = hsmod.Handshake._verify_data

    def bad(self: hsmod.Handshake, client: bool) -> bytes:
        vd = real(self, client)
        return bytes(12) if self.is_client and client else vd

    monkeypatch.setattr(hsmod.Handshake, "_verify_data", bad)
    p = make_pair()
    _fail_case(p, 51)
    assert _closed(p.server_events).sent_by_peer is False
    assert _closed(p.client_events).sent_by_peer is True


def test_bad_server_signature(monkeypatch: pytest.MonkeyPatch) -> None:
    real = hsmod.Handshake._sign

    def bad(self: hsmod.Handshake, scheme: int, data: bytes) -> bytes:
        return real(self, scheme, data + (b"" if self.is_client else b"x"))

    monkeypatch.setattr(hsmod.Handshake, "_sign", bad)
    p = make_pair()
    _fail_case(p, 51)
    assert _closed(p.client_events).sent_by_peer is False


def test_bad_client_signature(monkeypatch: pytest.MonkeyPatch) -> None:
    real = hsmod.Handshake._sign

    def bad(self: hsmod.Handshake, scheme: int, data: bytes) -> bytes:
        return real(self, scheme, data + (b"x" if self.is_client else b""))

    monkeypatch.setattr(hsmod.Handshake, "_sign", bad)
    p = make_pair()
    _fail_case(p, 51)
    assert _closed(p.server_events).sent_by_peer is False


def test_refused_fingerprint_by_server() -> None:
    seen: list[Any] = []

    def roster(peer: Any) -> int | None:
        seen.append(peer)
        return 49  # access_denied (D15)

    p = make_pair(client_kw={"tls_id": b"T" * 20}, server_kw={"verify_peer": roster})
    _fail_case(p, 49)
    assert seen[0].fingerprint == ident("client").fingerprint
    assert seen[0].tls_id == b"T" * 20


def test_refused_fingerprint_by_client() -> None:
    p = make_pair(client_kw={"verify_peer": lambda peer: 42})
    _fail_case(p, 42)


def test_accepting_policy_and_tls_ids() -> None:
    fps: list[str] = []
    p = make_pair(
        client_kw={
            "tls_id": b"c" * 20,
            "expected_peer_tls_id": b"k" * 20,
            "verify_peer": lambda peer: fps.append(peer.fingerprint),
        },
        server_kw={"tls_id": b"k" * 20},
    )
    c, s = _handshake(p)
    assert c.peer_tls_id == b"k" * 20 and s.peer_tls_id == b"c" * 20
    assert fps == [ident("server").fingerprint]


def test_wrong_server_tls_id() -> None:
    p = make_pair(
        client_kw={"tls_id": b"c" * 20, "expected_peer_tls_id": b"k" * 20},
        server_kw={"tls_id": b"z" * 20},
    )
    _fail_case(p, 47)


def test_no_common_srtp_profile() -> None:
    p = make_pair(client_kw={"srtp_profiles": (7,)}, server_kw={"srtp_profiles": (9, 10)})
    _fail_case(p, 40)


def test_select_srtp_profile_callback() -> None:
    offered: list[Any] = []

    def pick(profiles: Any) -> int | None:
        offered.append(tuple(profiles))
        return 10

    p = make_pair(server_kw={"select_srtp_profile": pick})
    c, s = _handshake(p)
    assert offered == [(9, 10)]
    assert c.srtp_profile == s.srtp_profile == 10
    assert c.srtp_keying_material is not None and len(c.srtp_keying_material) == 176
    p2 = make_pair(server_kw={"select_srtp_profile": lambda profiles: None})
    _fail_case(p2, 40)


def test_no_ekt_when_not_offered() -> None:
    p = make_pair(client_kw={"ekt_ciphers": ()})
    c, s = _handshake(p)
    assert c.ekt_cipher is None and s.ekt_cipher is None
    assert p.server is not None
    with pytest.raises(LocalProtocolError):
        p.server.send_ekt_key(bytes(16), bytes(12), 1, 86400, 0.0)


def test_keylog_lines_match() -> None:
    lines: list[str] = []
    p = make_pair(client_kw={"keylog": lines.append}, server_kw={"keylog": lines.append})
    _handshake(p)
    assert len(lines) == 2 and lines[0] == lines[1] and lines[0].startswith("CLIENT_RANDOM ")
    assert len(lines[0].split()[2]) == 96


def test_ekt_key_delivered_and_acknowledged() -> None:
    p = make_pair()
    _handshake(p)
    assert p.server is not None
    p.server.send_ekt_key(b"K" * 16, b"S" * 12, 0x0102, 86400, p.now)
    (dg,) = p.server.datagrams_to_send()
    (rec,), _ = w.parse_datagram_untrusted(dg)
    assert (rec.content_type, rec.epoch) == (22, 1)
    p.s2c.append(dg)
    p.pump()
    assert EktKeyReceived(b"K" * 16, b"S" * 12, 0x0102, 86400) in p.client_events
    assert EktKeyAcknowledged(0x0102) in p.server_events
    assert p.server.get_timer() is None
    # A second key uses the next message_seq (D23).
    p.server.send_ekt_key(b"L" * 16, b"S" * 12, 0x0103, 60, p.now)
    p.pump()
    assert EktKeyAcknowledged(0x0103) in p.server_events


def test_ekt_key_retransmitted_until_ack() -> None:
    p = make_pair()
    _handshake(p)
    assert p.server is not None
    p.server.send_ekt_key(b"K" * 16, b"S" * 12, 5, 86400, 0.0)
    p.server.datagrams_to_send()  # the first EKTKey is lost
    assert p.server.get_timer() == 1.0
    p.server.handle_timer(1.0)
    retrans = p.server.datagrams_to_send()
    assert len(retrans) == 1
    p.client.receive_datagram(retrans[0], 1.0)
    (ack,) = p.client.datagrams_to_send()  # this ACK is lost
    assert p.server.get_timer() == 3.0  # doubled
    p.server.handle_timer(3.0)
    p.client.receive_datagram(p.server.datagrams_to_send()[0], 3.0)
    p.server.receive_datagram(p.client.datagrams_to_send()[0], 3.0)
    p.drain()
    assert [e for e in p.client_events if isinstance(e, EktKeyReceived)] == [
        EktKeyReceived(b"K" * 16, b"S" * 12, 5, 86400)
    ]  # once, though ACKed twice
    assert EktKeyAcknowledged(5) in p.server_events
    # A stale ACK after acknowledgement is harmless.
    p.server.receive_datagram(ack, 3.5)
    assert p.server.is_established


def test_close_notify() -> None:
    p = make_pair()
    _handshake(p)
    p.client.close(p.now)
    p.pump()
    assert AlertReceived(1, 0) in p.server_events
    s, c = _closed(p.server_events), _closed(p.client_events)
    assert (s.alert, s.sent_by_peer, s.reason) == (0, True, "close_notify")
    assert (c.alert, c.sent_by_peer, c.reason) == (0, False, "close_notify")
    assert p.client.get_timer() is None


def test_lost_flights_recovered_by_timer() -> None:
    p = make_pair()
    p.client.connect(0.0)
    p.client.datagrams_to_send()  # CH lost
    p.client.handle_timer(1.0)
    p.now = 1.0
    p.pump(rounds=1)  # CH -> server
    assert p.server is not None
    p.server.datagrams_to_send()  # flight 4 lost
    p.server.handle_timer(2.0)
    p.now = 2.0
    p.client.receive_datagram(p.server.datagrams_to_send()[0], 2.0)
    flight5 = p.client.datagrams_to_send()
    p.server.receive_datagram(flight5[0], 2.0)
    p.server.datagrams_to_send()  # flight 6 lost: server done, client not
    p.drain()
    assert _completed(p.server_events)
    assert not any(isinstance(e, HandshakeCompleted) for e in p.client_events)
    t = p.client.get_timer()
    assert t == 3.0
    p.client.handle_timer(t)
    p.now = t
    p.pump()  # flight 5 again -> server answers with flight 6 on demand
    assert _completed(p.client_events)
    assert p.client.get_timer() is None
    assert p.server.stats.retransmissions >= 2


def test_vanished_peer_times_out() -> None:
    p = make_pair(client_kw={"handshake_timeout": 30.0})
    p.client.connect(0.0)
    sent = 0
    while (t := p.client.get_timer()) is not None:
        p.client.handle_timer(t)
        sent += len(p.client.datagrams_to_send())
        p.drain()
    closed = _closed(p.client_events)
    assert closed.reason == "timeout" and closed.alert is None
    assert 3 <= sent <= 6  # 1, 2, 4, 8, 16 s intervals inside 30 s


def test_robust_against_garbage_replays_and_wrong_epochs() -> None:
    p = make_pair()
    p.client.connect(0.0)
    captured: list[bytes] = []

    def keep(dg: bytes) -> bytes:
        captured.append(dg)
        return dg

    p.tamper_s2c = keep
    p.pump()
    _completed(p.client_events)
    assert p.server is not None
    before = p.client.stats.dropped_replay
    for dg in captured:  # replay the whole server side
        p.client.receive_datagram(dg, 5.0)
    assert p.client.stats.dropped_replay > before
    for junk in (
        b"",
        b"\x17",
        b"\x16\xfe\xfd" + bytes(10),
        b"\x17\xfe\xfd\x00\x02" + bytes(8) + b"\x00\x20" + bytes(32),
        bytes(range(256)),
    ):
        p.client.receive_datagram(junk, 5.0)
        p.server.receive_datagram(junk, 5.0)
    p.pump()
    p.drain()
    assert p.client.is_established and p.server.is_established
    assert not any(isinstance(e, ConnectionClosed) for e in p.client_events + p.server_events)


def test_local_misuse() -> None:
    p = make_pair()
    with pytest.raises(LocalProtocolError):
        p.client.send_ekt_key(bytes(16), bytes(12), 1, 1, 0.0)
    with pytest.raises(LocalProtocolError):
        p.client.export_keying_material(b"x", 8)
    with pytest.raises(LocalProtocolError):
        p.client.send_application_data(b"x", 0.0)
    server = DtlsConnection(p.server_config)
    with pytest.raises(LocalProtocolError):
        server.connect(0.0)
    p.client.connect(0.0)
    with pytest.raises(LocalProtocolError):
        p.client.connect(0.0)


def test_ekt_key_before_server_finished_is_acked_on_completion() -> None:
    p = make_pair()
    p.client.connect(0.0)
    p.pump(rounds=1)
    assert p.server is not None
    p.client.receive_datagram(p.server.datagrams_to_send()[0], 0.0)  # flight 4 (one datagram)
    p.server.receive_datagram(p.client.datagrams_to_send()[0], 0.0)  # flight 5
    flight6 = p.server.datagrams_to_send()
    p.drain()
    p.server.send_ekt_key(b"K" * 16, b"S" * 12, 9, 86400, 0.0)
    (ekt,) = p.server.datagrams_to_send()
    p.client.receive_datagram(ekt, 0.5)  # overtakes flight 6: buffered, flight 5 resent
    assert p.client.stats.future_records_buffered == 1
    for dg in flight6:
        p.client.receive_datagram(dg, 0.5)
    p.drain()
    assert EktKeyReceived(b"K" * 16, b"S" * 12, 9, 86400) in p.client_events
    for dg in p.client.datagrams_to_send():
        p.server.receive_datagram(dg, 0.5)
    p.drain()
    assert EktKeyAcknowledged(9) in p.server_events  # no retransmission was needed
    assert p.server.stats.retransmissions == 1  # flight 6 on demand only


def test_superseded_ekt_keys_any_message_seq() -> None:
    p = make_pair()
    _handshake(p)
    assert p.server is not None
    for spi in range(12):  # all lost
        p.server.send_ekt_key(b"K" * 16, b"S" * 12, spi, 86400, p.now)
        p.server.datagrams_to_send()
    p.server.send_ekt_key(b"N" * 16, b"S" * 12, 99, 86400, p.now)
    p.pump()
    assert [e.spi for e in p.client_events if isinstance(e, EktKeyReceived)] == [99]
    assert EktKeyAcknowledged(99) in p.server_events
    assert not any(isinstance(e, EktKeyAcknowledged) and e.spi != 99 for e in p.server_events)


def test_new_client_hello_on_live_association_is_not_a_retransmission() -> None:
    p = make_pair()
    _handshake(p)
    assert p.server is not None
    other = DtlsConnection(p.client._config)
    other.connect(5.0)
    p.server.receive_datagram(other.datagrams_to_send()[0], 5.0)
    assert p.server.datagrams_to_send() == []  # no flight 6 for a stranger
    assert p.server.stats.dropped_unexpected == 1 and p.server.is_established


def test_hello_verify_request_rules() -> None:
    gate = CookieGate(b"g" * 32)
    client = DtlsConnection(make_pair().client._config)
    client.connect(0.0)
    ch1 = client.datagrams_to_send()[0]
    client.handle_timer(1.0)  # CH#1 retransmitted: same message_seq 0, record seq 1
    client.handle_timer(3.0)  # record seq 2
    retrans = client.datagrams_to_send()
    assert len(retrans) == 2
    hvr = gate.check(retrans[-1], b"id", 3.0).reply
    assert hvr is not None
    (rec,), _ = w.parse_datagram_untrusted(hvr)
    assert rec.sequence_number == 2  # echoes the ClientHello's record sequence number
    client.receive_datagram(hvr, 3.0)
    client.receive_datagram(hvr, 3.0)  # a duplicate HVR is ignored (message_seq 0 < 1)
    (ch2,) = client.datagrams_to_send()
    assert gate.check(ch2, b"id", 3.0).accepted
    (rec2,), _ = w.parse_datagram_untrusted(ch2)
    assert rec2.sequence_number == 3
    server = DtlsConnection(make_pair().server_config, cookie_identity=b"id")
    server.receive_datagram(ch2, 3.0)
    first = w.parse_datagram_untrusted(server.datagrams_to_send()[0])[0][0]
    (sh,) = w.parse_handshake_fragments_untrusted(first.fragment)[:1]
    # ServerHello: record seq and message_seq echo the ClientHello's (SPEC-DTLS 1.5, 3.2).
    assert (first.sequence_number, sh.msg_type, sh.message_seq) == (3, 2, 1)
    assert ch1 != ch2


def test_hello_verify_request_loop_is_bounded() -> None:
    gate = CookieGate(b"g" * 32)
    client = DtlsConnection(make_pair().client._config)
    client.connect(0.0)
    for i in range(4):
        (ch,) = client.datagrams_to_send()
        # A server that never accepts: a fresh HVR each time (another identity each round).
        hvr = gate.check(ch, b"round-%d" % i, 0.0).reply
        assert hvr is not None
        client.receive_datagram(hvr, 0.0)
    events = []
    while (e := client.next_event()) is not None:
        events.append(e)
    assert events[-1] == ConnectionClosed(
        40, False, "alert sent: handshake_failure: too many HelloVerifyRequests"
    )


def test_lost_fatal_alert_is_regenerated() -> None:
    p = make_pair(server_kw={"verify_peer": lambda peer: 49})
    p.client.connect(0.0)
    p.pump(rounds=1)
    assert p.server is not None
    p.client.receive_datagram(p.server.datagrams_to_send()[0], 0.0)
    p.server.receive_datagram(p.client.datagrams_to_send()[0], 0.0)
    p.server.datagrams_to_send()  # the access_denied alert is lost
    p.drain()
    assert _closed(p.server_events).alert == 49
    p.client.handle_timer(1.0)  # client resends flight 5
    for dg in p.client.datagrams_to_send():
        p.server.receive_datagram(dg, 1.0)
    (alert,) = p.server.datagrams_to_send()
    p.client.receive_datagram(alert, 1.0)
    p.drain()
    closed = _closed(p.client_events)
    assert (closed.alert, closed.sent_by_peer) == (49, True)
    assert p.server.stats.alerts_repeated == 1


def _hold_flight6(p: Pair) -> list[bytes]:
    p.client.connect(0.0)
    p.pump(rounds=1)
    assert p.server is not None
    p.client.receive_datagram(p.server.datagrams_to_send()[0], 0.0)
    p.server.receive_datagram(p.client.datagrams_to_send()[0], 0.0)
    p.drain()
    return p.server.datagrams_to_send()


def test_superseding_ekt_key_overtakes_flight6() -> None:  # findings F3
    p = make_pair()
    flight6 = _hold_flight6(p)
    assert p.server is not None
    p.server.send_ekt_key(b"A" * 16, b"S" * 12, 1, 60, 0.0)
    p.server.datagrams_to_send()  # lost
    p.server.send_ekt_key(b"B" * 16, b"S" * 12, 2, 60, 0.0)  # message_seq + 1
    (ekt2,) = p.server.datagrams_to_send()
    p.client.receive_datagram(ekt2, 0.1)  # before flight 6
    for dg in flight6:
        p.client.receive_datagram(dg, 0.2)
    p.drain()
    assert [e.spi for e in p.client_events if isinstance(e, EktKeyReceived)] == [2]
    for dg in p.client.datagrams_to_send():
        p.server.receive_datagram(dg, 0.2)
    p.drain()
    assert EktKeyAcknowledged(2) in p.server_events


def test_forged_plaintext_ekt_key_before_completion_is_discarded() -> None:
    p = make_pair()
    flight6 = _hold_flight6(p)
    assert p.server is not None
    seq = p.server._hs._send_seq  # the message_seq the first real EKTKey will use
    body = w.EktKey(b"F" * 16, b"S" * 12, 66, 60).encode()
    # Plaintext EKTKeys never even reach the reassembler.
    for frag in (w.encode_handshake(26, seq, body), w.encode_handshake(26, seq + 1, body)):
        p.client.receive_datagram(w.encode_record(w.DtlsRecord(22, 0xFEFD, 0, 40, frag)), 0.1)
    assert p.client.stats.fragments_dropped == 2 and not p.client._reasm._slots
    # Plaintext messages of a type allowed in epoch 0, numbered where the real EKTKey goes (a
    # whole one and a partial one), wait in the reassembler while the handshake runs; they
    # must neither be delivered nor use up the EKTKey's message_seq when it completes.
    cert = w.Certificate((b"\x30" * 40,)).encode()
    for frag in (
        w.encode_handshake(11, seq, cert),
        w.encode_handshake_fragment(11, len(cert), seq + 1, 0, cert[:10]),
    ):
        p.client.receive_datagram(w.encode_record(w.DtlsRecord(22, 0xFEFD, 0, 50, frag)), 0.1)
    assert len(p.client._reasm._slots) == 2
    for dg in flight6:
        p.client.receive_datagram(dg, 0.2)
    p.drain()
    assert p.client.is_established
    p.server.send_ekt_key(b"R" * 16, b"S" * 12, 7, 60, 0.3)
    p.pump()
    assert [e.spi for e in p.client_events if isinstance(e, EktKeyReceived)] == [7]


def test_client_hello_record_sequence_near_limit() -> None:  # findings F2
    p = make_pair()
    p.client.connect(0.0)
    (ch,) = p.client.datagrams_to_send()
    (rec,), _ = w.parse_datagram_untrusted(ch)
    server = DtlsConnection(p.server_config)
    p.server = server
    for seq in ((1 << 48) - 1, (1 << 48) - 6):
        bogus = w.DtlsRecord(rec.content_type, rec.version, 0, seq, rec.fragment)
        server.receive_datagram(w.encode_record(bogus), 0.0)
    p.c2s.append(ch)
    p.pump()
    assert server.stats.internal_errors == 0
    _completed(p.client_events)
    _completed(p.server_events)


@pytest.mark.parametrize(("msg_type", "seq"), [(2, 0), (11, 1), (12, 2), (14, 4)])
def test_forged_partial_fragment_does_not_block_flight4(msg_type: int, seq: int) -> None:
    # findings F5: one plaintext partial fragment with a wrong total length before flight 4
    p = make_pair()
    p.client.connect(0.0)
    forged = w.encode_handshake_fragment(msg_type, 100, seq, 0, bytes(10))
    p.client.receive_datagram(w.encode_record(w.DtlsRecord(22, 0xFEFD, 0, 1000, forged)), 0.0)
    p.pump()
    c, s = _completed(p.client_events), _completed(p.server_events)
    assert c.srtp_keying_material == s.srtp_keying_material


def test_event_queue_bounded_against_data_flood() -> None:
    p = make_pair()
    _handshake(p)
    assert p.server is not None
    for _ in range(1100):
        p.server.send_application_data(b"x", 1.0)
    for dg in p.server.datagrams_to_send():
        p.client.receive_datagram(dg, 1.0)
    assert len(p.client._events) == 1024
    assert p.client.stats.events_dropped + p.server.stats.outgoing_discarded == 1100 - 1024


def test_x25519_only_client_still_lists_p256() -> None:
    p = make_pair(client_kw={"groups": (29,)})
    p.client.connect(0.0)
    (dg,) = p.client.datagrams_to_send()
    (rec,), _ = w.parse_datagram_untrusted(dg)
    (frag,) = w.parse_handshake_fragments_untrusted(rec.fragment)
    ch = w.ClientHello.decode(frag.body)
    assert w.decode_uint16_list(w.find_extension(ch.extensions, 10) or b"") == (29, 23)
    p.c2s.append(dg)
    p.pump()
    c, s = _completed(p.client_events), _completed(p.server_events)
    assert c.srtp_keying_material == s.srtp_keying_material
    assert (
        p.server is not None
        and p.server.negotiated is not None
        and p.server.negotiated.named_group == 29
    )


def test_abort_sends_fatal_alert_after_handshake() -> None:
    p = make_pair()
    _handshake(p)
    assert p.server is not None
    with pytest.raises(LocalProtocolError):
        p.server.abort(0, 1.0)
    p.server.abort(40, 1.0)
    p.server.abort(40, 1.0)  # idempotent
    p.pump()
    s, c = _closed(p.server_events), _closed(p.client_events)
    assert (s.alert, s.sent_by_peer) == (40, False) and "aborted" in s.reason
    assert (c.alert, c.sent_by_peer) == (40, True)
    with pytest.raises(LocalProtocolError):
        p.server.export_keying_material(b"x", 8)  # keys wiped
