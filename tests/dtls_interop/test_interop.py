"""perc's DTLS 1.2 engine against OpenSSL (pyOpenSSL over memory BIOs), both directions.

OpenSSL is the independent referee (issue 6): the handshake completes, both sides agree on
cipher suite, group and SRTP profile, the RFC 5705 exporter output is byte-identical, and the
key-log lines (master secret) match. Clean in-memory network: OpenSSL's timers read the real
clock, so nothing is lost or delayed here (lossy runs are in test_lossy.py, engine only).
"""

from __future__ import annotations

import datetime
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from OpenSSL import SSL

from perc.dtls import LocalProtocolError
from perc.identity import Identity, fingerprint_of
from tests.dtls_interop.engine import GatedServer, client_peer, server_peer
from tests.dtls_interop.harness import EnginePeer, assert_no_internal_errors, pump
from tests.dtls_interop.openssl_peer import (
    DTLS1_2_VERSION,
    EXPORTER_LABEL,
    SRTP_EXPORTER_LENGTH,
    OpensslPeer,
    build_context,
    split_records,
)

PROFILES = (0x0007, 0x0008, 0x0009, 0x000A)
SUITES = (0xC02B, 0xC02C, 0xCCA9)
GROUPS = {29: "x25519", 23: "secp256r1"}

CERTIFICATE = 11


class Wire:
    """Every datagram of a pumped pair, by direction."""

    def __init__(self) -> None:
        self.datagrams: list[tuple[str, bytes]] = []

    def tap(self, direction: str, datagram: bytes) -> None:
        self.datagrams.append((direction, datagram))

    def sent_by(self, direction: str) -> list[bytes]:
        return [d for dirn, d in self.datagrams if dirn == direction]

    def certificate_fragments(self, direction: str) -> list[tuple[int, int]]:
        """(fragment_offset, fragment_length) of each plaintext Certificate fragment."""
        out = []
        for datagram in self.sent_by(direction):
            for record in split_records(datagram):
                if record[0] == 22 and record[3:5] == b"\x00\x00" and record[13] == CERTIFICATE:
                    out.append(
                        (
                            int.from_bytes(record[19:22], "big"),
                            int.from_bytes(record[22:25], "big"),
                        )
                    )
        return out


def check_agreement(ours: Any, theirs: OpensslPeer, *, profile: int | None = None) -> None:
    assert_no_internal_errors(ours)
    assert ours.failed is None, ours.failed
    assert theirs.failed is None, theirs.failed
    event = ours.completed
    assert event.srtp_profile == theirs.srtp_profile
    if profile is not None:
        assert event.srtp_profile == profile
    assert event.cipher_suite == theirs.cipher_suite
    material = event.srtp_keying_material
    assert material is not None
    assert len(material) == SRTP_EXPORTER_LENGTH[event.srtp_profile]
    assert material == theirs.srtp_keying_material
    # an arbitrary other exporter length, through the engine's own exporter
    assert ours.export_keying_material(EXPORTER_LABEL, 100) == theirs.export_keying_material(
        EXPORTER_LABEL, 100
    )
    # mutual authentication: each side saw the other's certificate
    assert event.peer_certificate_der == theirs.identity.certificate_der
    assert event.peer_fingerprint == fingerprint_of(theirs.identity.certificate)
    assert theirs.peer_certificate_der is not None
    # OpenSSL knows neither EKT nor external_session_id: nothing negotiated
    assert event.ekt_cipher is None
    assert event.peer_tls_id is None
    # What our engine reports it negotiated is what OpenSSL says it negotiated.
    n = event.negotiated
    assert (n.client_random, n.server_random) == (theirs.client_random, theirs.server_random)
    assert len(n.client_random) == len(n.server_random) == 32
    assert n.srtp_profile == theirs.srtp_profile and n.cipher_suite == theirs.cipher_suite
    assert GROUPS[n.named_group] == theirs.group_name
    assert n.peer_certificate_der == theirs.identity.certificate_der
    assert n.peer_fingerprint == fingerprint_of(theirs.identity.certificate)
    assert n.ekt_cipher is None and n.peer_tls_id is None
    engine = ours.peer if isinstance(ours, GatedServer) else ours
    assert engine.connection.negotiated == n


def ours_client(
    client_identity: Identity, server_identity: Identity, *, mtu: int = 1200, **options: Any
) -> tuple[EnginePeer, OpensslPeer, Wire, list[str]]:
    """Our client against an OpenSSL server (options: ours=..., openssl=...)."""
    keylog: list[str] = []
    client = client_peer(client_identity, mtu=mtu, keylog=keylog.append, **options.get("ours", {}))
    server = OpensslPeer(
        is_client=False, identity=server_identity, mtu=mtu, **options.get("openssl", {})
    )
    wire = Wire()
    client.connect(0.0)
    pump(client, server, tap=wire.tap)
    return client, server, wire, keylog


def ours_server(
    client_identity: Identity,
    server_identity: Identity,
    *,
    mtu: int = 1200,
    gated: bool = False,
    **options: Any,
) -> tuple[Any, OpensslPeer, Wire, list[str]]:
    """An OpenSSL client against our server (options: ours=..., openssl=...)."""
    keylog: list[str] = []
    ours_options = {"mtu": mtu, "keylog": keylog.append, **options.get("ours", {})}
    server: Any
    if gated:
        server = GatedServer(server_identity, **ours_options)
    else:
        server = server_peer(server_identity, **ours_options)
    client = OpensslPeer(
        is_client=True, identity=client_identity, mtu=mtu, **options.get("openssl", {})
    )
    wire = Wire()
    client.connect(0.0)
    pump(client, server, tap=wire.tap)
    return server, client, wire, keylog


# --- SRTP profiles ---------------------------------------------------------------------------


@pytest.mark.parametrize("profile", PROFILES)
def test_our_client_openssl_server_profile(
    client_identity: Identity, server_identity: Identity, profile: int
) -> None:
    client, server, _, keylog = ours_client(
        client_identity, server_identity, ours={"srtp_profiles": (profile,)}
    )
    check_agreement(client, server, profile=profile)
    assert server.peer_certificate_der == client_identity.certificate_der
    assert keylog == server.keylog_lines
    assert len(keylog) == 1


@pytest.mark.parametrize("profile", PROFILES)
def test_openssl_client_our_server_profile(
    client_identity: Identity, server_identity: Identity, profile: int
) -> None:
    server, client, _, keylog = ours_server(
        client_identity, server_identity, ours={"srtp_profiles": (profile,)}
    )
    check_agreement(server, client, profile=profile)
    assert client.peer_certificate_der == server_identity.certificate_der
    assert keylog == client.keylog_lines
    assert len(keylog) == 1


def test_our_server_picks_its_first_profile_the_client_offers(
    client_identity: Identity, server_identity: Identity
) -> None:
    # OpenSSL offers 7, 8, 9, 10; our default server list is (9, 10)
    server, client, _, _ = ours_server(client_identity, server_identity)
    check_agreement(server, client, profile=0x0009)


def test_our_client_offers_in_order_openssl_server_picks(
    client_identity: Identity, server_identity: Identity
) -> None:
    client, server, _, _ = ours_client(
        client_identity, server_identity, ours={"srtp_profiles": (0x000A, 0x0008)}
    )
    assert client.completed.srtp_profile in (0x000A, 0x0008)
    check_agreement(client, server)


# --- cipher suites and groups ----------------------------------------------------------------


@pytest.mark.parametrize("group", sorted(GROUPS))
@pytest.mark.parametrize("suite", SUITES)
def test_our_client_openssl_server_suite(
    client_identity: Identity, server_identity: Identity, suite: int, group: int
) -> None:
    client, server, _, keylog = ours_client(
        client_identity,
        server_identity,
        openssl={"cipher_suites": (suite,)},
        ours={"groups": (group, 29 + 23 - group)},
    )
    assert client.completed.cipher_suite == suite
    assert server.group_name == GROUPS[group]
    check_agreement(client, server)
    assert keylog == server.keylog_lines


@pytest.mark.parametrize("group", sorted(GROUPS))
@pytest.mark.parametrize("suite", SUITES)
def test_openssl_client_our_server_suite(
    client_identity: Identity, server_identity: Identity, suite: int, group: int
) -> None:
    server, client, _, keylog = ours_server(
        client_identity,
        server_identity,
        ours={"cipher_suites": (suite,), "groups": (group, 29 + 23 - group)},
    )
    assert server.completed.cipher_suite == suite
    assert client.group_name == GROUPS[group]
    check_agreement(server, client)
    assert keylog == client.keylog_lines


@pytest.mark.parametrize("group", sorted(GROUPS))
def test_our_client_openssl_server_group(
    client_identity: Identity, server_identity: Identity, group: int
) -> None:
    # keep both groups offered (an ECDSA P-256 certificate needs secp256r1 listed, RFC 8422
    # §5.1.1); the client's first choice wins with OpenSSL
    client, server, _, _ = ours_client(
        client_identity, server_identity, ours={"groups": (group, 29 + 23 - group)}
    )
    check_agreement(client, server)
    assert server.group_name == GROUPS[group]


@pytest.mark.parametrize("group", sorted(GROUPS))
def test_openssl_client_our_server_group(
    client_identity: Identity, server_identity: Identity, group: int
) -> None:
    # our server picks by its own preference among the groups OpenSSL offers (both)
    server, client, _, _ = ours_server(
        client_identity, server_identity, ours={"groups": (group, 29 + 23 - group)}
    )
    check_agreement(server, client)
    assert client.group_name == GROUPS[group]


# --- cookies ---------------------------------------------------------------------------------


@pytest.mark.parametrize("mtu", [1200, 300])
def test_our_client_openssl_server_cookie(
    client_identity: Identity, server_identity: Identity, mtu: int
) -> None:
    client, server, wire, keylog = ours_client(
        client_identity, server_identity, mtu=mtu, openssl={"cookie_exchange": True}
    )
    check_agreement(client, server)
    assert server.cookies_generated == 1
    assert server.cookies_verified >= 1
    # the HVR is answered by a second ClientHello (message_seq 1)
    hellos = [d for d in wire.sent_by("a->b") if d[0] == 22 and d[13] == 1]
    assert [int.from_bytes(h[17:19], "big") for h in hellos] == [0, 1]
    assert keylog == server.keylog_lines


@pytest.mark.parametrize("mtu", [1200, 300])
def test_openssl_client_our_cookie_gate(
    client_identity: Identity, server_identity: Identity, mtu: int
) -> None:
    server, client, wire, keylog = ours_server(
        client_identity, server_identity, mtu=mtu, gated=True
    )
    check_agreement(server, client)
    assert server.hello_verify_requests == 1
    # flight 2 is a lone HelloVerifyRequest
    direction, hvr = wire.datagrams[1]
    assert direction == "b->a"
    assert hvr[0] == 22 and hvr[13] == 3
    assert keylog == client.keylog_lines


# --- small MTU: fragmented certificates ------------------------------------------------------


def test_our_client_openssl_server_mtu_300(
    client_identity: Identity, server_identity: Identity
) -> None:
    client, server, wire, _ = ours_client(client_identity, server_identity, mtu=300)
    check_agreement(client, server)
    assert max(map(len, wire.sent_by("a->b"))) <= 300
    # both certificates travel in several fragments
    assert len(wire.certificate_fragments("a->b")) > 1
    assert len(wire.certificate_fragments("b->a")) > 1


def test_openssl_client_our_server_mtu_300(
    client_identity: Identity, server_identity: Identity
) -> None:
    server, client, wire, _ = ours_server(client_identity, server_identity, mtu=300)
    check_agreement(server, client)
    assert max(map(len, wire.sent_by("b->a"))) <= 300
    assert len(wire.certificate_fragments("a->b")) > 1
    assert len(wire.certificate_fragments("b->a")) > 1


def test_openssl_one_record_per_datagram_to_our_client(
    client_identity: Identity, server_identity: Identity
) -> None:
    # every fragment alone in its own datagram, as a UDP sender that never packs would do
    client, server, _, _ = ours_client(
        client_identity, server_identity, mtu=300, openssl={"one_record_per_datagram": True}
    )
    check_agreement(client, server)


# --- after the handshake: application data, close_notify -------------------------------------


def test_application_data_and_close_our_client(
    client_identity: Identity, server_identity: Identity
) -> None:
    client, server, _, _ = ours_client(client_identity, server_identity)
    client.connection.send_application_data(b"hello openssl", 1.0)
    server.send_application_data(b"hello perc")
    pump(
        client,
        server,
        until=lambda: bool(server.application_data) and client.has("ApplicationDataReceived"),
    )
    assert server.application_data == [b"hello openssl"]
    assert client.first("ApplicationDataReceived").data == b"hello perc"
    client.close(2.0)
    pump(client, server, until=lambda: server.peer_closed)
    closed = client.first("ConnectionClosed")
    assert closed is not None and closed.sent_by_peer is False


def test_openssl_close_notify_reaches_our_server(
    client_identity: Identity, server_identity: Identity
) -> None:
    server, client, _, _ = ours_server(client_identity, server_identity)
    client.connection.shutdown()
    pump(client, server, until=lambda: server.has("ConnectionClosed"))
    closed = server.first("ConnectionClosed")
    assert closed.sent_by_peer is True
    assert closed.alert == 0  # close_notify


# --- refusals carry the right alert to OpenSSL -----------------------------------------------


def pump_to_end(a: Any, b: Any) -> None:
    pump(a, b, stop_when_quiet=True, until=lambda: False)


def test_our_server_refuses_fingerprint_access_denied(
    client_identity: Identity, server_identity: Identity
) -> None:
    server = server_peer(server_identity, verify_peer=lambda identity: 49)
    client = OpensslPeer(is_client=True, identity=client_identity)
    client.connect(0.0)
    pump_to_end(client, server)
    closed = server.first("ConnectionClosed")
    assert closed is not None and closed.alert == 49 and closed.sent_by_peer is False
    assert not server.handshake_complete
    assert client.failed is not None and "access denied" in str(client.failed)


def test_our_client_refuses_fingerprint_bad_certificate(
    client_identity: Identity, server_identity: Identity
) -> None:
    client = client_peer(client_identity, verify_peer=lambda identity: 42)
    server = OpensslPeer(is_client=False, identity=server_identity)
    client.connect(0.0)
    pump_to_end(client, server)
    closed = client.first("ConnectionClosed")
    assert closed is not None and closed.alert == 42 and closed.sent_by_peer is False
    assert server.failed is not None and "bad certificate" in str(server.failed)


def test_no_common_profile_handshake_failure(
    client_identity: Identity, server_identity: Identity
) -> None:
    server = server_peer(server_identity, srtp_profiles=(0x0009, 0x000A))
    client = OpensslPeer(is_client=True, identity=client_identity, srtp_profiles=(0x0007,))
    client.connect(0.0)
    pump_to_end(client, server)
    closed = server.first("ConnectionClosed")
    assert closed is not None and closed.alert == 40
    assert client.failed is not None and "handshake failure" in str(client.failed)


@pytest.mark.parametrize("use_srtp", [False, True])
def test_openssl_client_refused_at_its_client_hello(
    client_identity: Identity, server_identity: Identity, use_srtp: bool
) -> None:
    # Without use_srtp, or (require_ekt) without supported_ekt_ciphers, which OpenSSL never
    # sends: our server answers the ClientHello with one handshake_failure alert and no flight.
    ctx = SSL.Context(SSL.DTLS_METHOD)
    ctx.set_min_proto_version(DTLS1_2_VERSION)
    ctx.set_max_proto_version(DTLS1_2_VERSION)
    ctx.set_cipher_list(b"ECDHE-ECDSA-AES128-GCM-SHA256")
    if use_srtp:
        ctx.set_tlsext_use_srtp(b"SRTP_DOUBLE_AEAD_AES_128_GCM_AEAD_AES_128_GCM")
    ctx.use_certificate(client_identity.certificate)
    ctx.use_privatekey(client_identity.private_key)
    ctx.set_verify(SSL.VERIFY_PEER, lambda *args: True)
    ctx.set_options(SSL.OP_NO_QUERY_MTU)
    ctx.set_keylog_callback(lambda conn, line: None)
    server = server_peer(server_identity, require_ekt=True)
    client = OpensslPeer(is_client=True, identity=client_identity, context=ctx)
    wire = Wire()
    client.connect(0.0)
    pump(client, server, tap=wire.tap, stop_when_quiet=True)
    answers = wire.sent_by("b->a")
    assert len(answers) == 1 and answers[0][0] == 21  # one alert record, no ServerHello
    offer = server.first("ClientHelloReceived").offer
    assert offer.use_srtp is use_srtp and not offer.supported_ekt_ciphers
    assert len(offer.client_random) == 32
    closed = server.first("ConnectionClosed")
    assert closed is not None and closed.alert == 40 and not closed.sent_by_peer
    assert client.failed is not None and "handshake failure" in str(client.failed)


def test_openssl_refusal_reaches_our_client_as_alert(
    client_identity: Identity, server_identity: Identity
) -> None:
    # OpenSSL server with only AEAD_AES_128_GCM, our client offers only DOUBLE: OpenSSL goes on
    # without use_srtp (RFC 5764 §4.1.1), and our client, which requires a profile, must end
    # the handshake with an alert rather than complete without SRTP keys.
    client = client_peer(client_identity, srtp_profiles=(0x0009,))
    server = OpensslPeer(is_client=False, identity=server_identity, srtp_profiles=(0x0007,))
    client.connect(0.0)
    pump_to_end(client, server)
    assert not client.handshake_complete
    closed = client.first("ConnectionClosed")
    assert closed is not None and closed.alert is not None
    assert not server.handshake_complete


# --- perc extensions OpenSSL does not know -----------------------------------------------------


def test_our_client_tls_id_is_ignored_by_openssl(
    client_identity: Identity, server_identity: Identity
) -> None:
    # external_session_id (56) and supported_ekt_ciphers (39) offered: OpenSSL ignores both
    client, server, _, _ = ours_client(client_identity, server_identity, ours={"tls_id": b"e" * 16})
    check_agreement(client, server)


def test_our_server_sends_no_unsolicited_extensions(
    client_identity: Identity, server_identity: Identity
) -> None:
    # our server has a tls-id and EKT ciphers, OpenSSL offered neither: sending ext 56 or 39
    # would make OpenSSL abort with unsupported_extension (RFC 5246 §7.4.1.4)
    server, client, _, _ = ours_server(
        client_identity, server_identity, ours={"tls_id": b"k" * 16, "ekt_ciphers": (1, 2)}
    )
    check_agreement(server, client)


def test_our_client_requires_tls_id_openssl_cannot_send(
    client_identity: Identity, server_identity: Identity
) -> None:
    client = client_peer(client_identity, expected_peer_tls_id=b"k" * 16)
    server = OpensslPeer(is_client=False, identity=server_identity)
    client.connect(0.0)
    pump_to_end(client, server)
    closed = client.first("ConnectionClosed")
    assert closed is not None and closed.alert == 47  # illegal_parameter
    assert server.failed is not None and "illegal parameter" in str(server.failed)


# --- renegotiation is refused without harm (D17, SPEC-DTLS 3.9) --------------------------------


def renegotiate(peer: OpensslPeer) -> None:
    assert peer.connection.renegotiate()
    try:
        peer.connection.do_handshake()
    except SSL.WantReadError:
        pass


def test_openssl_client_renegotiation_is_refused(
    client_identity: Identity, server_identity: Identity
) -> None:
    server, client, _, _ = ours_server(client_identity, server_identity)
    before = server.export_keying_material(EXPORTER_LABEL, 56)
    renegotiate(client)  # a ClientHello in epoch 1
    pump_to_end(client, server)
    assert_no_internal_errors(server)
    assert not server.has("ConnectionClosed")
    assert [type(e).__name__ for e in server.events].count("HandshakeCompleted") == 1
    # the association and its keys are unchanged on our side
    assert server.export_keying_material(EXPORTER_LABEL, 56) == before


def test_openssl_server_hello_request_is_refused(
    client_identity: Identity, server_identity: Identity
) -> None:
    client, server, _, _ = ours_client(client_identity, server_identity)
    renegotiate(server)  # a HelloRequest in epoch 1
    pump_to_end(client, server)
    assert_no_internal_errors(client)
    assert not client.has("ConnectionClosed")
    assert [type(e).__name__ for e in client.events].count("HandshakeCompleted") == 1


# --- certificates outside perc's profile (D17: one self-signed ECDSA P-256 certificate) --------


def self_signed(key: Any) -> Identity:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "other")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    return Identity(certificate=cert, private_key=key)


def test_openssl_client_with_p384_certificate_is_refused(
    client_identity: Identity, server_identity: Identity
) -> None:
    server = server_peer(server_identity)
    client = OpensslPeer(
        is_client=True, identity=self_signed(ec.generate_private_key(ec.SECP384R1()))
    )
    client.connect(0.0)
    pump_to_end(client, server)
    closed = server.first("ConnectionClosed")
    assert closed is not None and closed.alert == 43  # unsupported_certificate
    assert client.failed is not None and "unsupported certificate" in str(client.failed)


def test_openssl_client_without_certificate_is_refused(
    client_identity: Identity, server_identity: Identity
) -> None:
    # a client context with no certificate sends an empty Certificate: mutual authentication
    # is mandatory (D17), so our server must not complete
    bare = SSL.Context(SSL.DTLS_METHOD)
    bare.set_min_proto_version(DTLS1_2_VERSION)
    bare.set_max_proto_version(DTLS1_2_VERSION)
    bare.set_cipher_list(b"ECDHE-ECDSA-AES128-GCM-SHA256")
    bare.set_tlsext_use_srtp(b"SRTP_DOUBLE_AEAD_AES_128_GCM_AEAD_AES_128_GCM")
    bare.set_verify(SSL.VERIFY_PEER, lambda *args: True)
    bare.set_options(SSL.OP_NO_QUERY_MTU)
    bare.set_keylog_callback(lambda conn, line: None)
    server = server_peer(server_identity)
    client = OpensslPeer(is_client=True, identity=client_identity, context=bare)
    client.connect(0.0)
    pump_to_end(client, server)
    assert not server.handshake_complete
    closed = server.first("ConnectionClosed")
    assert closed is not None and closed.alert == 40  # handshake_failure
    assert client.failed is not None


@pytest.mark.parametrize(
    "key",
    [
        pytest.param(lambda: ec.generate_private_key(ec.SECP384R1()), id="p384"),
        pytest.param(
            lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048), id="rsa"
        ),
    ],
)
def test_openssl_server_outside_the_profile_gets_no_handshake(
    client_identity: Identity, key: Any
) -> None:
    # our client offers only ECDSA suites with P-256 signatures: OpenSSL finds no shared cipher
    client = client_peer(client_identity)
    server = OpensslPeer(is_client=False, identity=self_signed(key()))
    client.connect(0.0)
    pump_to_end(client, server)
    assert not client.handshake_complete
    closed = client.first("ConnectionClosed")
    assert closed is not None and closed.alert == 40 and closed.sent_by_peer
    assert server.failed is not None and "no shared cipher" in str(server.failed)


def test_extra_chain_certificates_are_tolerated_leaf_is_reported(
    client_identity: Identity, server_identity: Identity
) -> None:
    server_context = build_context(server_identity)
    server_context.add_extra_chain_cert(client_identity.certificate)
    client = client_peer(client_identity)
    server = OpensslPeer(is_client=False, identity=server_identity, context=server_context)
    client.connect(0.0)
    pump(client, server)
    assert client.completed.peer_certificate_der == server_identity.certificate_der
    assert client.completed.srtp_keying_material == server.srtp_keying_material


# --- OpenSSL's signatures are really verified --------------------------------------------------


class Tampering:
    """Wraps an OpenSSL peer and flips the last byte of the first plaintext handshake record
    carrying ``msg_type`` it sends (the last byte of the ECDSA signature's ``s``: the DER stays
    valid, the signature does not)."""

    def __init__(self, inner: OpensslPeer, msg_type: int) -> None:
        self.inner = inner
        self.msg_type = msg_type
        self.tampered = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def receive_datagram(self, data: bytes, now: float) -> None:
        self.inner.receive_datagram(data, now)

    def datagrams_to_send(self) -> list[bytes]:
        out = []
        for datagram in self.inner.datagrams_to_send():
            records = split_records(datagram)
            for i, rec in enumerate(records):
                if (
                    not self.tampered
                    and rec[0] == 22
                    and rec[3:5] == b"\x00\x00"
                    and rec[13] == self.msg_type
                ):
                    records[i] = rec[:-1] + bytes([rec[-1] ^ 0x01])
                    self.tampered = True
            out.append(b"".join(records))
        return out


def test_our_client_rejects_a_bad_server_key_exchange_signature(
    client_identity: Identity, server_identity: Identity
) -> None:
    client = client_peer(client_identity)
    server = Tampering(OpensslPeer(is_client=False, identity=server_identity), 12)
    client.connect(0.0)
    pump_to_end(client, server)
    assert server.tampered
    assert not client.handshake_complete
    closed = client.first("ConnectionClosed")
    assert closed is not None and closed.alert == 51  # decrypt_error
    assert_no_internal_errors(client)


def test_our_server_rejects_a_bad_certificate_verify_signature(
    client_identity: Identity, server_identity: Identity
) -> None:
    server = server_peer(server_identity)
    client = Tampering(OpensslPeer(is_client=True, identity=client_identity), 15)
    client.connect(0.0)
    pump_to_end(client, server)
    assert client.tampered
    assert not server.handshake_complete
    closed = server.first("ConnectionClosed")
    assert closed is not None and closed.alert == 51  # decrypt_error
    assert_no_internal_errors(server)


@pytest.mark.parametrize("suite, overhead", [(0xC02B, 24), (0xC02C, 24), (0xCCA9, 16)])
def test_largest_application_data_fits_the_mtu_and_reaches_openssl(
    client_identity: Identity, server_identity: Identity, suite: int, overhead: int
) -> None:
    # record header 13 + AEAD expansion (GCM: 8-byte explicit nonce + 16-byte tag; ChaCha20:
    # tag only, RFC 7905) must fit the 300-byte MTU with the data
    client, server, _, _ = ours_client(
        client_identity, server_identity, mtu=300, openssl={"cipher_suites": (suite,)}
    )
    largest = 300 - 13 - overhead
    client.connection.send_application_data(b"x" * largest, 1.0)
    [datagram] = client.datagrams_to_send()
    assert len(datagram) == 300
    server.receive_datagram(datagram, 1.0)
    assert server.application_data == [b"x" * largest]
    with pytest.raises(LocalProtocolError):
        client.connection.send_application_data(b"x" * (largest + 1), 1.0)
