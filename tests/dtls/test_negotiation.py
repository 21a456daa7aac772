"""Negotiation edge cases: a ClientHello rewritten before it is sent (so both transcripts
agree), epoch-0 alerts, renegotiation attempts, internal errors."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs
import pytest

from perc.dtls import DtlsConnection, LocalProtocolError
from perc.dtls import handshake as hsmod
from perc.dtls.events import AlertReceived, ConnectionClosed, HandshakeCompleted
from perc.wire import dtls as w
from tests.dtls.helpers import config, make_pair


def _rewrite_client_hello(
    monkeypatch: pytest.MonkeyPatch, fn: Callable[[w.ClientHello], w.ClientHello]
) -> None:
    real = hsmod.Handshake._message

    def message(self: hsmod.Handshake, msg: Any, epoch: int = 0, transcript: bool = True) -> Any:
        if isinstance(msg, w.ClientHello):
            msg = fn(msg)
        return real(self, msg, epoch, transcript)

    monkeypatch.setattr(hsmod.Handshake, "_message", message)


def _without(ch: w.ClientHello, *types: int) -> tuple[w.Extension, ...]:
    return tuple(e for e in ch.extensions or () if e.extension_type not in types)


def _run(p: Any) -> tuple[list[Any], list[Any]]:
    p.client.connect(0.0)
    p.pump()
    return p.client_events, p.server_events


def _alerts(events: list[Any]) -> list[int | None]:
    return [e.alert for e in events if isinstance(e, ConnectionClosed)]


def test_unknown_extensions_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    extra = (w.Extension(0x1234, b"whatever"), w.Extension(22, b""), w.Extension(35, b""))
    _rewrite_client_hello(
        monkeypatch, lambda ch: attrs.evolve(ch, extensions=(*(ch.extensions or ()), *extra))
    )
    c, s = _run(make_pair())
    assert any(isinstance(e, HandshakeCompleted) for e in c)
    assert any(isinstance(e, HandshakeCompleted) for e in s)


def test_scsv_honoured_instead_of_extension(monkeypatch: pytest.MonkeyPatch) -> None:
    _rewrite_client_hello(
        monkeypatch,
        lambda ch: attrs.evolve(
            ch, cipher_suites=(*ch.cipher_suites, 0x00FF), extensions=_without(ch, 0xFF01)
        ),
    )
    c, _s = _run(make_pair())
    # The client insists on renegotiation_info in the ServerHello: the SCSV made the server
    # send it (RFC 5746 §3.6).
    assert any(isinstance(e, HandshakeCompleted) for e in c)


def test_no_renegotiation_info_at_all(monkeypatch: pytest.MonkeyPatch) -> None:
    _rewrite_client_hello(monkeypatch, lambda ch: attrs.evolve(ch, extensions=_without(ch, 0xFF01)))
    c, s = _run(make_pair())
    assert _alerts(c) == _alerts(s) == [40]  # client: RFC 5746 §3.4 / RFC 9325 §3.5


@pytest.mark.parametrize(("ext", "code"), [(23, 40), (13, 40), (10, 40)])
def test_missing_required_extension(monkeypatch: pytest.MonkeyPatch, ext: int, code: int) -> None:
    _rewrite_client_hello(monkeypatch, lambda ch: attrs.evolve(ch, extensions=_without(ch, ext)))
    c, s = _run(make_pair())
    assert _alerts(c) == _alerts(s) == [code]


def test_client_without_p256_support(monkeypatch: pytest.MonkeyPatch) -> None:
    _rewrite_client_hello(
        monkeypatch,
        lambda ch: attrs.evolve(
            ch, extensions=(*_without(ch, 10), w.Extension(10, w.encode_uint16_list((29,))))
        ),
    )
    _c, s = _run(make_pair())
    assert _alerts(s) == [40]


def test_dtls_1_0_client_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    _rewrite_client_hello(monkeypatch, lambda ch: attrs.evolve(ch, client_version=0xFEFF))
    c, s = _run(make_pair())
    assert _alerts(c) == _alerts(s) == [70]


def test_no_common_suite(monkeypatch: pytest.MonkeyPatch) -> None:
    p = make_pair(client_kw={"cipher_suites": (0xCCA9,)}, server_kw={"cipher_suites": (0xC02B,)})
    c, s = _run(p)
    assert _alerts(c) == _alerts(s) == [40]


def test_server_without_srtp_config_client_requires_it() -> None:
    p = make_pair(server_kw={"srtp_profiles": ()})
    c, s = _run(p)
    assert _alerts(c) == _alerts(s) == [40]


def test_plain_dtls_without_srtp() -> None:
    p = make_pair(client_kw={"srtp_profiles": ()}, server_kw={"srtp_profiles": ()})
    c, _s = _run(p)
    done = [e for e in c if isinstance(e, HandshakeCompleted)]
    assert done and done[0].srtp_profile is None and done[0].srtp_keying_material is None


def test_epoch0_alert_ignored_after_handshake() -> None:
    p = make_pair()
    _run(p)
    forged = w.encode_record(w.DtlsRecord(21, 0xFEFD, 0, 99, w.Alert(2, 40).encode()))
    p.client.receive_datagram(forged, 1.0)
    assert p.client.is_established
    assert p.client.stats.dropped_unexpected == 1


def test_epoch0_fatal_alert_honoured_during_handshake() -> None:
    p = make_pair()
    p.client.connect(0.0)
    forged = w.encode_record(w.DtlsRecord(21, 0xFEFD, 0, 0, w.Alert(2, 40).encode()))
    p.client.receive_datagram(forged, 0.1)
    p.drain()
    assert AlertReceived(2, 40) in p.client_events
    closed = [e for e in p.client_events if isinstance(e, ConnectionClosed)]
    assert closed[0].alert == 40 and closed[0].sent_by_peer


def test_renegotiation_and_unexpected_messages_ignored_after_handshake() -> None:
    p = make_pair()
    _run(p)
    assert p.server is not None
    # An epoch-1 HelloRequest-like message from the server: the client ignores it (D17).
    hello_request = w.encode_handshake(0, p.client._reasm.next_seq, b"")
    p.client.receive_datagram(p.server._record.seal(22, hello_request), 1.0)
    assert p.client.is_established and p.client.stats.dropped_unexpected == 1


def test_unexpected_message_in_handshake_is_fatal() -> None:
    server = DtlsConnection(config(False))
    # A ServerHelloDone where a ClientHello must come: dropped before any state exists.
    shd = w.encode_handshake(14, 0, b"")
    server.receive_datagram(w.encode_record(w.DtlsRecord(22, 0xFEFD, 0, 0, shd)), 0.0)
    assert server.stats.fragments_dropped == 1 and not server.is_closed
    p = make_pair()
    p.client.connect(0.0)
    p.client.datagrams_to_send()
    # A plaintext Finished can only be forged: dropped without a word.
    fin = w.encode_handshake(20, 0, bytes(12))
    p.client.receive_datagram(w.encode_record(w.DtlsRecord(22, 0xFEFD, 0, 0, fin)), 0.0)
    assert p.client.stats.fragments_dropped == 1 and not p.client.is_closed
    # The client waits for a ServerHello: a CertificateRequest in its place is unexpected.
    cr = w.encode_handshake(13, 0, w.CertificateRequest(b"\x40", (0x0403,)).encode())
    p.client.receive_datagram(w.encode_record(w.DtlsRecord(22, 0xFEFD, 0, 1, cr)), 0.0)
    p.drain()
    assert _alerts(p.client_events) == [10]
    (dg,) = p.client.datagrams_to_send()
    assert dg[0] == 21  # the fatal alert went out


def test_internal_error_contained(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(peer: Any) -> int | None:
        raise RuntimeError("policy crashed")

    p = make_pair(server_kw={"verify_peer": boom})
    c, s = _run(p)
    assert _alerts(s) == [80] and _alerts(c) == [80]
    assert p.server is not None and p.server.stats.internal_errors == 1


def test_bad_configuration() -> None:
    with pytest.raises(LocalProtocolError):
        DtlsConnection(config(True, mtu=50))
    with pytest.raises(LocalProtocolError):
        DtlsConnection(config(True, cipher_suites=(0xC02F,)))
    with pytest.raises(LocalProtocolError):
        DtlsConnection(config(True, groups=(24,)))
    with pytest.raises(LocalProtocolError):
        DtlsConnection(config(True, tls_id=b"x" * 256))
