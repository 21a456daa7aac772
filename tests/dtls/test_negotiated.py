"""What the engine reports: ``Negotiated`` on completion, ``ClientOffer`` at the ClientHello,
and the server's early refusal of offers it cannot serve (before any server flight)."""

from __future__ import annotations

from typing import Any

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from perc.dtls import ClientOffer, DtlsConnection, PeerIdentity, client_offer_untrusted
from perc.dtls import handshake as hs
from perc.dtls.config import own_certificate_der
from perc.dtls.errors import AlertDescription as AD
from perc.dtls.errors import AlertError
from perc.dtls.events import (
    ClientHelloReceived,
    ConnectionClosed,
    HandshakeCompleted,
)
from perc.identity import fingerprint_of_der
from perc.wire import dtls as w
from tests.dtls.helpers import config, ident, make_pair


def _completed(events: list[Any]) -> HandshakeCompleted:
    done = [e for e in events if isinstance(e, HandshakeCompleted)]
    assert len(done) == 1
    return done[0]


@pytest.mark.parametrize("cookies", [False, True])
def test_both_sides_report_the_same_parameters(cookies: bool) -> None:
    p = make_pair(
        cookies=cookies,
        client_kw={"tls_id": b"client-tls-id", "srtp_profiles": (0x000A, 0x0009)},
        server_kw={"tls_id": b"server-tls-id", "groups": (23,)},
    )
    p.client.connect(0.0)
    p.pump()
    c = _completed(p.client_events).negotiated
    s = _completed(p.server_events).negotiated
    assert p.server is not None
    assert p.client.negotiated == c and p.server.negotiated == s
    assert c.cipher_suite == s.cipher_suite == 0xC02B
    assert c.named_group == s.named_group == 23
    assert c.srtp_profile == s.srtp_profile == 0x0009  # the server's preference (D18)
    assert c.ekt_cipher == s.ekt_cipher == 1
    assert len(c.client_random) == len(c.server_random) == 32
    assert (c.client_random, c.server_random) == (s.client_random, s.server_random)
    assert c.client_random != c.server_random
    assert (c.local_tls_id, c.peer_tls_id) == (b"client-tls-id", b"server-tls-id")
    assert (s.local_tls_id, s.peer_tls_id) == (b"server-tls-id", b"client-tls-id")
    client_der = own_certificate_der(ident("client").certificate)
    server_der = own_certificate_der(ident("server").certificate)
    assert c.peer_certificate_der == server_der and s.peer_certificate_der == client_der
    assert c.peer_fingerprint == fingerprint_of_der(server_der) == ident("server").fingerprint
    assert s.peer_fingerprint == ident("client").fingerprint
    # The older flat fields stay and agree with the value.
    done = _completed(p.client_events)
    assert (done.cipher_suite, done.srtp_profile, done.ekt_cipher) == (
        c.cipher_suite,
        c.srtp_profile,
        c.ekt_cipher,
    )
    assert done.peer_fingerprint == c.peer_fingerprint and done.peer_tls_id == c.peer_tls_id


def test_tls_ids_absent_and_server_answers_only_a_client_that_sent_one() -> None:
    p = make_pair(server_kw={"tls_id": b"server-tls-id"})
    p.client.connect(0.0)
    p.pump()
    c = _completed(p.client_events).negotiated
    s = _completed(p.server_events).negotiated
    # RFC 8844 §4: the server sends external_session_id only in answer to the client's.
    assert c.local_tls_id is c.peer_tls_id is s.local_tls_id is s.peer_tls_id is None


def test_server_reports_the_offer_first() -> None:
    p = make_pair(client_kw={"tls_id": b"abc", "ekt_ciphers": (2,)})
    p.client.connect(0.0)
    p.pump()
    first = p.server_events[0]
    assert isinstance(first, ClientHelloReceived)
    offer = first.offer
    assert offer == ClientOffer(
        client_random=_completed(p.client_events).negotiated.client_random,
        cipher_suites=(0xC02B, 0xC02C, 0xCCA9),
        use_srtp=True,
        srtp_profiles=(0x0009, 0x000A),
        srtp_mki=b"",
        supported_ekt_ciphers=True,
        ekt_ciphers=(2,),
        tls_id=b"abc",
        cookie=b"",
    )
    assert not any(isinstance(e, ClientHelloReceived) for e in p.client_events)


def test_verify_peer_sees_what_was_negotiated() -> None:
    seen: list[PeerIdentity] = []

    def verify(peer: PeerIdentity) -> int | None:
        seen.append(peer)
        return None

    p = make_pair(client_kw={"verify_peer": verify}, server_kw={"verify_peer": verify})
    p.client.connect(0.0)
    p.pump()
    assert len(seen) == 2
    by_side = {
        True: _completed(p.client_events).negotiated,
        False: _completed(p.server_events).negotiated,
    }
    client_seen, server_seen = seen  # the client verifies at ServerKeyExchange, first
    assert client_seen.negotiated == by_side[True]
    assert server_seen.negotiated == by_side[False]
    assert server_seen.negotiated is not None and server_seen.negotiated.ekt_cipher == 1


# --- early refusal: one alert instead of the server's flight --------------------------------


def _server_answer(client_kw: dict[str, Any], server_kw: dict[str, Any]) -> tuple[Any, Any]:
    """Run the ClientHello through a fresh server; return its only datagram and its events."""
    client = DtlsConnection(config(True, **client_kw))
    client.connect(0.0)
    (hello,) = client.datagrams_to_send()
    server = DtlsConnection(config(False, **server_kw))
    server.receive_datagram(hello, 0.0)
    out = server.datagrams_to_send()
    events = []
    while (e := server.next_event()) is not None:
        events.append(e)
    assert len(out) == 1
    records, trailing = w.parse_datagram_untrusted(out[0])
    assert trailing == 0 and len(records) == 1
    # Received by the client, the alert ends its handshake too.
    client.receive_datagram(out[0], 0.1)
    client_events = []
    while (e := client.next_event()) is not None:
        client_events.append(e)
    assert [e.alert for e in client_events if isinstance(e, ConnectionClosed)] == [
        w.Alert.decode(records[0].fragment).description
    ]
    return records[0], events


@pytest.mark.parametrize(
    ("client_kw", "server_kw", "why"),
    [
        ({"srtp_profiles": ()}, {}, "without use_srtp"),
        ({"srtp_profiles": (0x0007,)}, {}, "no common SRTP"),
        ({"ekt_ciphers": ()}, {"require_ekt": True}, "without supported_ekt_ciphers"),
        ({"ekt_ciphers": (1,)}, {"require_ekt": True, "ekt_ciphers": (2,)}, "no common EKT"),
    ],
)
def test_unservable_offer_refused_before_any_server_flight(
    client_kw: dict[str, Any], server_kw: dict[str, Any], why: str
) -> None:
    record, events = _server_answer(client_kw, server_kw)
    assert record.content_type == w.ContentType.ALERT and record.epoch == 0
    assert w.Alert.decode(record.fragment) == w.Alert(2, AD.handshake_failure)
    # The alert echoes the ClientHello's record number (stateless numbering, SPEC-DTLS 1.5).
    assert record.sequence_number == 0
    assert isinstance(events[0], ClientHelloReceived)
    (closed,) = [e for e in events if isinstance(e, ConnectionClosed)]
    assert closed.alert == AD.handshake_failure and why in closed.reason


def test_without_ekt_goes_on_unless_required() -> None:
    p = make_pair(client_kw={"ekt_ciphers": ()})
    p.client.connect(0.0)
    p.pump()
    assert _completed(p.server_events).negotiated.ekt_cipher is None


def test_client_requiring_ekt_refuses_a_server_without_it() -> None:
    p = make_pair(client_kw={"require_ekt": True}, server_kw={"ekt_ciphers": ()})
    p.client.connect(0.0)
    p.pump()
    assert [e.alert for e in p.client_events if isinstance(e, ConnectionClosed)] == [40]


def test_inspect_client_offer_refuses_with_the_callers_alert() -> None:
    offers: list[ClientOffer] = []

    def inspect(offer: ClientOffer) -> int | None:
        offers.append(offer)
        return int(AD.access_denied) if offer.tls_id != b"welcome" else None

    record, events = _server_answer({"tls_id": b"stranger"}, {"inspect_client_offer": inspect})
    assert w.Alert.decode(record.fragment) == w.Alert(2, AD.access_denied)
    assert offers[0].tls_id == b"stranger"
    assert [type(e) for e in events] == [ClientHelloReceived, ConnectionClosed]

    p = make_pair(client_kw={"tls_id": b"welcome"}, server_kw={"inspect_client_offer": inspect})
    p.client.connect(0.0)
    p.pump()
    assert any(isinstance(e, HandshakeCompleted) for e in p.server_events)


def test_refusal_after_cookie_echoes_the_second_hello() -> None:
    p = make_pair(cookies=True, client_kw={"srtp_profiles": ()})
    sent: list[bytes] = []

    def keep(dg: bytes) -> bytes:
        sent.append(dg)
        return dg

    p.tamper_c2s = keep
    p.client.connect(0.0)
    p.pump()
    assert [e.alert for e in p.client_events if isinstance(e, ConnectionClosed)] == [40]
    assert [e.alert for e in p.server_events if isinstance(e, ConnectionClosed)] == [40]
    # The alert answers the cookie-bearing ClientHello: same record number (SPEC-DTLS 1.5),
    # so the client's replay window does not take it for the HelloVerifyRequest's record.
    assert p.server is not None
    (second_hello,) = w.parse_datagram_untrusted(sent[1])[0]
    assert second_hello.sequence_number == 1
    assert p.server._record.next_sequence(0) == second_hello.sequence_number + 1


# --- the offer of a datagram, before any connection exists ---------------------------------


def test_client_offer_of_a_datagram() -> None:
    client = DtlsConnection(config(True, tls_id=b"id-1"))
    client.connect(0.0)
    (hello,) = client.datagrams_to_send()
    offer = client_offer_untrusted(hello)
    assert offer is not None
    assert (
        offer.tls_id == b"id-1"
        and offer.srtp_profiles == (9, 10)
        and offer.ekt_ciphers
        == (
            1,
            2,
        )
    )
    # Not a ClientHello: a HelloVerifyRequest, a truncated hello, an application record.
    assert client_offer_untrusted(hello[:-1]) is None
    assert client_offer_untrusted(b"\x17\xfe\xfd" + hello[3:]) is None
    assert client_offer_untrusted(b"") is None


@given(st.binary(max_size=300))
def test_client_offer_untrusted_never_raises(data: bytes) -> None:
    offer = client_offer_untrusted(data)
    assert offer is None or isinstance(offer, ClientOffer)


def test_negotiated_is_none_before_completion_and_frozen() -> None:
    p = make_pair()
    p.client.connect(0.0)
    assert p.client.negotiated is None
    p.pump()
    value = p.client.negotiated
    assert value is not None
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        value.srtp_profile = 1  # type: ignore[misc]


# --- the state table ---------------------------------------------------------------------


def test_state_table_shape() -> None:
    targets = {next_state for _, next_state in hs._TABLE.values()}
    sources = {state for state, _ in hs._TABLE}
    # Every state but the two starting ones is entered by some row; every state has a way on.
    assert set(hs.State) - targets == {
        hs.State.CLIENT_START,
        hs.State.SERVER_EXPECT_CLIENT_HELLO,
    }
    assert sources == set(hs.State)
    # The handshake keeps no reference to the connection (it returns Output values).
    shake = hs.Handshake(config(True))
    assert not any(isinstance(v, DtlsConnection) for v in vars(shake).values())


def test_input_outside_the_table_is_unexpected_message() -> None:
    shake = hs.Handshake(config(False))
    with pytest.raises(AlertError) as info:
        shake.handle_message(w.HandshakeType.FINISHED, 0, b"", 1, 0, out=hs.Output())
    assert info.value.description == AD.unexpected_message
    assert shake.state is hs.State.SERVER_EXPECT_CLIENT_HELLO
    assert shake.ccs_route() is hs.CcsRoute.DROP and not shake.can_start
