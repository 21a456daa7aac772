"""Harness self-check: pyOpenSSL client <-> pyOpenSSL server through the adapter and pump.

If these fail, the interop tests against perc's engine prove nothing; they stay as a check of
the adapter (memory BIOs, record splitting, MTU, cookies, exporter, key log).
"""

from __future__ import annotations

import pytest

from perc.identity import Identity
from tests.dtls_interop.harness import pump
from tests.dtls_interop.openssl_peer import (
    EXPORTER_LABEL,
    SRTP_EXPORTER_LENGTH,
    OpensslPeer,
    pack_records,
    split_records,
)

PROFILES = (0x0007, 0x0008, 0x0009, 0x000A)
SUITES = (0xC02B, 0xC02C, 0xCCA9)


def handshake(
    client_identity: Identity, server_identity: Identity, **server_options: object
) -> tuple[OpensslPeer, OpensslPeer, list[tuple[str, bytes]]]:
    mtu = server_options.get("mtu", 1200)
    client = OpensslPeer(is_client=True, identity=client_identity, mtu=mtu)  # type: ignore[arg-type]
    server = OpensslPeer(is_client=False, identity=server_identity, **server_options)  # type: ignore[arg-type]
    wire: list[tuple[str, bytes]] = []
    client.connect(0.0)
    pump(client, server, tap=lambda direction, datagram: wire.append((direction, datagram)))
    assert client.failed is None and server.failed is None
    return client, server, wire


@pytest.mark.parametrize("profile", PROFILES)
def test_openssl_pair_each_profile(
    client_identity: Identity, server_identity: Identity, profile: int
) -> None:
    client, server, _ = handshake(client_identity, server_identity, srtp_profiles=(profile,))
    assert client.srtp_profile == server.srtp_profile == profile
    material = client.srtp_keying_material
    assert material is not None and len(material) == SRTP_EXPORTER_LENGTH[profile]
    assert material == server.srtp_keying_material
    assert client.export_keying_material(EXPORTER_LABEL, 8) == material[:8]
    # mutual authentication: each side holds the other's certificate
    assert client.peer_certificate_der == server_identity.certificate_der
    assert server.peer_certificate_der == client_identity.certificate_der
    assert len(client.keylog_lines) == 1
    assert client.keylog_lines == server.keylog_lines
    assert client.keylog_lines[0].startswith("CLIENT_RANDOM ")


@pytest.mark.parametrize("suite", SUITES)
def test_openssl_pair_each_suite(
    client_identity: Identity, server_identity: Identity, suite: int
) -> None:
    client, server, _ = handshake(client_identity, server_identity, cipher_suites=(suite,))
    assert client.cipher_suite == server.cipher_suite == suite


@pytest.mark.parametrize("group, name", [(29, "x25519"), (23, "secp256r1")])
def test_openssl_pair_each_group(
    client_identity: Identity, server_identity: Identity, group: int, name: str
) -> None:
    # Both groups stay offered: an ECDSA P-256 certificate needs secp256r1 in supported_groups
    # (RFC 8422 §5.1.1; SPEC-DTLS 10.12); the server follows the client's preference.
    client = OpensslPeer(is_client=True, identity=client_identity, groups=(group, 29 + 23 - group))
    server = OpensslPeer(is_client=False, identity=server_identity)
    client.connect(0.0)
    pump(client, server)
    assert client.group_name == server.group_name == name


def test_openssl_pair_cookie_exchange(client_identity: Identity, server_identity: Identity) -> None:
    client, server, wire = handshake(client_identity, server_identity, cookie_exchange=True)
    assert server.cookies_generated == 1
    assert server.cookies_verified >= 1
    # flight 2 is a lone HelloVerifyRequest (handshake type 3)
    direction, hvr = wire[1]
    assert direction == "b->a"
    assert hvr[0] == 22 and hvr[13] == 3
    assert client.srtp_keying_material == server.srtp_keying_material


def test_openssl_pair_small_mtu_fragments_certificates(
    client_identity: Identity, server_identity: Identity
) -> None:
    _client, _server, wire = handshake(client_identity, server_identity, mtu=300)
    assert max(len(d) for _, d in wire) <= 300
    # some Certificate (type 11) fragment does not start at offset 0
    offsets = [
        int.from_bytes(r[13 + 6 : 13 + 9], "big")
        for _, d in wire
        for r in split_records(d)
        if r[0] == 22 and r[3:5] == b"\x00\x00" and r[13] == 11
    ]
    assert any(offsets), offsets


def test_split_and_pack_records() -> None:
    records = [
        bytes([22, 0xFE, 0xFD]) + bytes(8) + len(b).to_bytes(2, "big") + b
        for b in (b"a" * 10, b"b" * 100, b"c" * 3)
    ]
    assert split_records(b"".join(records)) == records
    assert pack_records(records, 1200) == [b"".join(records)]
    assert pack_records(records, 130) == [records[0], records[1] + records[2]]
    assert pack_records(records, 10) == records
