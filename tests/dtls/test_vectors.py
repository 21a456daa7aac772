"""Byte vectors of SPEC-DTLS.md (sections 2, 6, 7, 8) and SPEC.md 9.4 / D24."""

from __future__ import annotations

import hashlib

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, x25519

from perc.dtls import keys
from perc.dtls.flight import Reassembler, ReceivedMessage
from perc.dtls.handshake import ecdh
from perc.dtls.record import CipherState, RecordLayer
from perc.wire import dtls as w
from tests.dtls.trace import TRACE

H = bytes.fromhex
SHA256, SHA384 = keys.SHA256, keys.SHA384
SUITE = keys.CIPHER_SUITES


def test_prf_sha256() -> None:  # 8.1
    out = keys.prf(
        SHA256,
        H("9bbe436ba940f017b17652849a71db35"),
        b"test label",
        H("a0ba9f936cda311827a6f796ffd5198c"),
        100,
    )
    assert out == H(
        "e3f229ba727be17b8d122620557cd453c2aab21d07c3d495329b52d4e61edb5a"
        "6b301791e90d35c9c9a46b4e14baf9af0fa022f7077def17abfd3797c0564bab"
        "4fbc91666e9def9b97fce34f796789baa48082d122ee42c5a72e5a5110fff701"
        "87347b66"
    )


def test_prf_sha384() -> None:  # 8.2
    out = keys.prf(
        SHA384,
        H("b80b733d6ceefcdc71566ea48e5567df"),
        b"test label",
        H("cd665cf6a8447dd6ff8b27555edb7465"),
        148,
    )
    assert out == H(
        "7b0c18e9ced410ed1804f2cfa34a336a1c14dffb4900bb5fd7942107e81c83cd"
        "e9ca0faa60be9fe34f82b1233c9146a0e534cb400fed2700884f9dc236f80edd"
        "8bfa961144c9e8d792eca722a7b32fc3d416d473ebc2c5fd4abfdad05d918425"
        "9b5bf8cd4d90fa0d31e2dec479e4f1a26066f2eea9a69236a3e52655c9e9aee6"
        "91c8f3a26854308d5eaa3be85e0990703d73e56f"
    )


def test_ecdh_x25519() -> None:  # 8.3, RFC 7748 §6.1
    a = x25519.X25519PrivateKey.from_private_bytes(
        H("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
    )
    assert a.public_key().public_bytes_raw() == H(
        "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a"
    )
    b_pub = H("de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f")
    assert ecdh(29, a, b_pub) == H(
        "4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742"
    )


def test_ecdh_p256() -> None:  # 8.3, RFC 5903 §8.1
    i = ec.derive_private_key(
        int("C88F01F510D9AC3F70A292DAA2316DE544E9AAB8AFE84049C62A9C57862D1433", 16), ec.SECP256R1()
    )
    peer = b"\x04" + H(
        "D12DFB5289C8D4F81208B70270398C342296970A0BCCB74C736FC7554494BF63"
        "56FBF3CA366CC23E8157854C13C58D6AAC23F046ADA30F8353E74F33039872AB"
    )
    assert ecdh(23, i, peer) == H(
        "D6840F6B42F6EDAFD13116E0E12565202FEF8E9ECE7DCE03812464D04B9442DE"
    )


def test_ecdh_rejects_bad_points() -> None:
    from perc.dtls.errors import AlertError

    xk = x25519.X25519PrivateKey.generate()
    with pytest.raises(AlertError) as e:
        ecdh(29, xk, bytes(32))  # small order: all-zero shared secret
    assert e.value.description == 47
    pk = ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(AlertError):
        ecdh(23, pk, b"\x04" + bytes(64))  # not on the curve
    with pytest.raises(AlertError):
        ecdh(23, pk, b"\x02" + bytes(32))  # compressed


def test_key_schedule_pion() -> None:  # 8.4
    cr = H("000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f")
    sr = H("707172737475767778797a7b7c7d7e7f808182838485868788898a8b8c8d8e8f")
    priv = x25519.X25519PrivateKey.from_private_bytes(
        H("202122232425262728292a2b2c2d2e2f303132333435363738393a3b3c3d3e3f")
    )
    assert priv.public_key().public_bytes_raw() == H(
        "358072d6365880d1aeea329adf9121383851ed21a28e3b75e965d0d2cd166254"
    )
    pre = ecdh(29, priv, H("9fd7ad6dcff4298dd3f96d5b1b2af910a0535b1488d7f8fabb349a982880b615"))
    assert pre == H("df4a291baa1eb7cfa6934b29b474baad2697e29f1f920dcc77c8a0a088447624")
    master = keys.prf(SHA256, pre, b"master secret", cr + sr, 48)
    assert master == H(
        "916abf9da55973e13614ae0a3f5d3f37b023ba129aee02cc9134338127cd7049"
        "781c8e19fc1eb2a7387ac06ae237344c"
    )
    kb = keys.key_block(SUITE[0xC02B], master, cr, sr)
    assert kb.client_write_key == H("1b7d117c7d5f690bc263cae8ef60af0f")
    assert kb.server_write_key == H("1878acc22ad8bdd8c601a617126f6354")
    assert kb.client_write_iv == H("0eb20906")
    assert kb.server_write_iv == H("f781fad2")
    th = H("061dda04b3c2217ff73bd79b9cf88a2bb6ec505404aac8722db03ef417b54cb4")
    assert keys.prf(SHA256, master, b"client finished", th, 12) == H("cf919626f1360c536aaad73a")


# --- 8.5 / 8.6: the complete trace ----------------------------------------------------------

CLIENT_RANDOM = H("00000000a0a1a2a3a4a5a6a7a8a9aaabacadaeafb0b1b2b3b4b5b6b7b8b9babb")
SERVER_RANDOM = H("343067dd5fd64b9d74f9e58b9e186e5dc0c82168917d203770d3b85829d95419")
CLIENT_PRIV = H("404142434445464748494a4b4c4d4e4f505152535455565758595a5b5c5d5e5f")
MASTER = H(
    "1bb2b27619e34a7642aacf8505a597ae9c2c42d858045472904b58b37255d57a"
    "5e72affbe9a56d85a44242d6c7f428d9"
)


def _trace_records() -> list[tuple[str, w.DtlsRecord]]:
    out = []
    for direction, dg in TRACE:
        records, trailing = w.parse_datagram_untrusted(dg)
        assert trailing == 0
        for r in records:
            assert w.encode_record(r) in dg
            out.append((direction, r))
    return out


def _trace_messages() -> list[tuple[str, ReceivedMessage]]:
    """Every epoch-0 handshake message of the trace, reassembled per direction."""
    reasm = {"C->S": Reassembler(), "S->C": Reassembler()}
    for r in reasm.values():
        r.any_order = True
    out: list[tuple[str, ReceivedMessage]] = []
    for direction, rec in _trace_records():
        if rec.content_type != w.ContentType.HANDSHAKE or rec.epoch != 0:
            continue
        for frag in w.parse_handshake_fragments_untrusted(rec.fragment):
            msgs: list[ReceivedMessage] = []
            reasm[direction].add(frag, msgs)
            out += [(direction, m) for m in msgs]
    return out


def test_trace_record_headers() -> None:
    recs = _trace_records()
    assert len(recs) == 20
    _d, first = recs[0]
    assert (first.content_type, first.version, first.epoch, first.sequence_number) == (
        22,
        0xFEFD,
        0,
        0,
    )
    _, hvr = recs[1]
    assert hvr.version == 0xFEFF
    _, ch2 = recs[2]
    assert ch2.sequence_number == 1 and len(ch2.fragment) == 124
    assert w.encode_record_header(22, 0xFEFD, 0, 1, 0x7C) == H("16fefd0000000000000001007c")


def test_trace_messages_decode_and_reencode() -> None:
    msgs = _trace_messages()
    kinds = [(d, m.msg_type, m.message_seq) for d, m in msgs]
    assert kinds == [
        ("C->S", 1, 0),
        ("S->C", 3, 0),
        ("C->S", 1, 1),
        ("S->C", 2, 1),
        ("S->C", 11, 2),
        ("S->C", 12, 3),
        ("S->C", 13, 4),
        ("S->C", 14, 5),
        ("C->S", 11, 2),
        ("C->S", 16, 3),
        ("C->S", 15, 4),
    ]
    for _, m in msgs:
        decoded = w.decode_handshake_body_untrusted(m.msg_type, m.body)
        assert decoded.encode() == m.body  # byte-exact
    ch2 = w.ClientHello.decode(msgs[2][1].body)
    assert ch2.random == CLIENT_RANDOM and ch2.cookie == H(
        "4fb7e7d6579dd377d82bffb7581af3c7ffa87bc4"
    )
    assert ch2.cipher_suites == (0xC02B,)
    assert w.UseSrtp.decode(w.find_extension(ch2.extensions, 14) or b"").profiles == (7,)
    assert w.decode_uint16_list(w.find_extension(ch2.extensions, 13) or b"") == (
        0x0403,
        0x0503,
        0x0807,
        0x0804,
    )
    hvr = w.HelloVerifyRequest.decode(msgs[1][1].body)
    assert hvr.server_version == 0xFEFF and hvr.cookie == ch2.cookie
    sh = w.ServerHello.decode(msgs[3][1].body)
    assert sh.random == SERVER_RANDOM and len(sh.session_id) == 32 and sh.cipher_suite == 0xC02B
    assert w.decode_uint8_list(w.find_extension(sh.extensions, 11) or b"") == (0, 1, 2)
    cert = w.Certificate.decode(msgs[4][1].body)
    assert len(msgs[4][1].body) == 379 and len(cert.certificates) == 1
    ske = w.ServerKeyExchange.decode(msgs[5][1].body)
    assert ske.named_curve == 29 and ske.signature_scheme == 0x0403
    assert ske.public == H("712045bf032e2d20546ad4c6dd5d59f17a770c0efb0d969fb499492b50763340")
    cr = w.CertificateRequest.decode(msgs[6][1].body)
    assert cr.certificate_types == b"\x01\x02\x40" and len(cr.signature_algorithms) == 20
    cke = w.ClientKeyExchange.decode(msgs[9][1].body)
    assert (
        cke.public
        == x25519.X25519PrivateKey.from_private_bytes(CLIENT_PRIV).public_key().public_bytes_raw()
    )


def test_trace_signatures_verify() -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    msgs = _trace_messages()
    server_cert = x509.load_der_x509_certificate(
        w.Certificate.decode(msgs[4][1].body).certificates[0]
    )
    ske = w.ServerKeyExchange.decode(msgs[5][1].body)
    key = server_cert.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey)
    key.verify(ske.signature, CLIENT_RANDOM + SERVER_RANDOM + ske.params, ec.ECDSA(hashes.SHA256()))


def _transcript(upto: int) -> bytes:
    msgs = _trace_messages()[2:]  # CH#1 and HVR are not part of it (RFC 6347 §4.2.6)
    return b"".join(w.encode_handshake(m.msg_type, m.message_seq, m.body) for _, m in msgs[:upto])


def test_trace_master_secret_keys_and_finished() -> None:  # 8.5
    suite = SUITE[0xC02B]
    priv = x25519.X25519PrivateKey.from_private_bytes(CLIENT_PRIV)
    pre = ecdh(29, priv, H("712045bf032e2d20546ad4c6dd5d59f17a770c0efb0d969fb499492b50763340"))
    assert pre == H("35b288dc0a906aa851ceca69fda40ae94e95b729057d60d1a474599c5dc91c23")
    t_cke = _transcript(8)
    assert len(t_cke) == 1254
    session_hash = hashlib.sha256(t_cke).digest()
    assert session_hash == H("8ec5680feb80e7262e4b41eb0e6853c270d6bc7234b8aa7c007be22d73bc2cf2")
    assert keys.extended_master_secret(suite, pre, session_hash) == MASTER
    kb = keys.key_block(suite, MASTER, CLIENT_RANDOM, SERVER_RANDOM)
    assert kb == keys.KeyBlock(
        H("fda0307526136308a7cfbebd7c966efa"),
        H("a48a67e612035ac0830540523f9c545f"),
        H("55579b92"),
        H("2cee9b85"),
    )
    t_cv = _transcript(9)
    assert len(t_cv) == 1341
    client_vd = keys.finished_verify_data(suite, MASTER, True, t_cv)
    assert client_vd == H("e35e1b734dd060baed2cb23b")
    t_fin = t_cv + w.encode_handshake(20, 5, client_vd)
    assert len(t_fin) == 1365
    assert keys.finished_verify_data(suite, MASTER, False, t_fin) == H("d574ee01244b391f2a65c036")
    exporter = keys.export_keying_material(
        suite,
        master_secret=MASTER,
        client_random=CLIENT_RANDOM,
        server_random=SERVER_RANDOM,
        label=b"EXTRACTOR-dtls_srtp",
        length=56,
    )
    assert exporter == H(
        "12d962ee17691c11acfa1e17a775f189db35285f508c40364bf6f5e1ed15ef54"
        "8669bb52f601b3215bd6dc505f79bbb6703132851be12cad"
    )
    assert keys.keylog_line(CLIENT_RANDOM, MASTER) == (
        "CLIENT_RANDOM 00000000a0a1a2a3a4a5a6a7a8a9aaabacadaeafb0b1b2b3b4b5b6b7b8b9babb "
        "1bb2b27619e34a7642aacf8505a597ae9c2c42d858045472904b58b37255d57a5e72affbe9a56d85a44242"
        "d6c7f428d9"
    )


def test_trace_record_decryption() -> None:  # 2.4 and the rest of 8.6 epoch 1
    suite = SUITE[0xC02B]
    kb = keys.key_block(suite, MASTER, CLIENT_RANDOM, SERVER_RANDOM)
    server_side = RecordLayer()  # reads client records
    server_side.install_keys(
        suite, kb.server_write_key, kb.server_write_iv, kb.client_write_key, kb.client_write_iv
    )
    server_side.activate_read_epoch()
    client_side = RecordLayer()
    client_side.install_keys(
        suite, kb.client_write_key, kb.client_write_iv, kb.server_write_key, kb.server_write_iv
    )
    client_side.activate_read_epoch()
    plain = {}
    for direction, rec in _trace_records():
        if rec.epoch != 1:
            continue
        layer = server_side if direction == "C->S" else client_side
        pt, reason = layer.open(rec)
        assert reason == "" and pt is not None
        plain[(direction, rec.content_type)] = pt
    assert plain[("C->S", 22)] == H("1400000c000500000000000ce35e1b734dd060baed2cb23b")
    assert plain[("S->C", 22)] == H("1400000c000600000000000cd574ee01244b391f2a65c036")
    assert plain[("C->S", 23)] == b"hello\n"
    assert plain[("C->S", 21)] == b"\x01\x00"
    # Our sealing of the client Finished reproduces the trace record (nonce = epoch||seq).
    sender = RecordLayer()
    sender.install_keys(suite, kb.client_write_key, kb.client_write_iv, b"\0" * 16, b"\0" * 4)
    sender.activate_write_epoch()
    sealed = sender.seal(22, H("1400000c000500000000000ce35e1b734dd060baed2cb23b"), epoch=1)
    assert sealed == TRACE[7][1][-61:]


def test_replayed_record_dropped() -> None:
    suite = SUITE[0xC02B]
    kb = keys.key_block(suite, MASTER, CLIENT_RANDOM, SERVER_RANDOM)
    layer = RecordLayer()
    layer.install_keys(
        suite, kb.server_write_key, kb.server_write_iv, kb.client_write_key, kb.client_write_iv
    )
    layer.activate_read_epoch()
    rec = next(r for d, r in _trace_records() if d == "C->S" and r.epoch == 1)
    assert layer.open(rec)[1] == ""
    assert layer.open(rec) == (None, "replay")


@pytest.mark.parametrize(
    ("code", "server_random", "master", "cwk", "swk", "civ", "siv", "exporter"),
    [
        (
            0xC02C,
            "96336b0191a29659b6b9b1f12cc47e76c6a9ba9792f3a6d9a36a35da175edb1b",
            "30787338669b13fe4c98ea4d784ee822080da9ea44690f2ae4a162d17529611b"
            "2a868fd437a4d906f73b981c75881f8c",
            "cd2be02116f955290297bab5721cdec61e1e3a1c8b3565bfd20457b300570f55",
            "06f8eb5a1201ea4ef606fbbc77b67fa2cb0060896e1919ad295b161998151991",
            "fa6bc557",
            "bcc1f881",
            "6b925e80bf64c7df93c7ac5bdc69df2289533e64aee481d9a23754ea934ded0e"
            "04d1238e8390d0d4bb06180b39142a0da70b2a092c2fbaf0",
        ),
        (
            0xCCA9,
            "eafae00d6d5436fcb1b9d6e91814d1d26851ac9ce6316b069f1c4efd60c091d0",
            "2ec87ef31fadd0941f3c5277a410bb07b194a6346a4f56369b687164718c42d9"
            "4679eae5f30f608fc89c9d2c855cfab0",
            "b592415864ad583943c7e1d90edef50a465b439124f169150419dbf0957bd53c",
            "8f20c41b66cb8f8b4d994181696576d3e35ac3e0c11c79ead31f6f55b85db3f8",
            "53bc83af0b6eadd7abc07e32",
            "0b542c016d49457647752b4e",
            "da64b16a55a57fee24fe2a468b35bf3ac4c85a11371b3861b3e3ffc42c3b5ce3"
            "1ef8f653b171d90082594064d50b91dcc7a5dc8229766779",
        ),
    ],
)
def test_other_suites(
    code: int,
    server_random: str,
    master: str,
    cwk: str,
    swk: str,
    civ: str,
    siv: str,
    exporter: str,
) -> None:  # 8.7
    suite = SUITE[code]
    kb = keys.key_block(suite, H(master), CLIENT_RANDOM, H(server_random))
    assert kb == keys.KeyBlock(H(cwk), H(swk), H(civ), H(siv))
    out = keys.export_keying_material(
        suite,
        master_secret=H(master),
        client_random=CLIENT_RANDOM,
        server_random=H(server_random),
        label=b"EXTRACTOR-dtls_srtp",
        length=56,
    )
    assert out == H(exporter)


def test_chacha_nonce() -> None:  # 2.3
    state = CipherState(SUITE[0xCCA9], bytes(32), H("53bc83af0b6eadd7abc07e32"))
    assert state._nonce(H("0001000000000000")) == H("53bc83af0b6fadd7abc07e32")
    assert state._nonce(H("0001000000000001")) == H("53bc83af0b6fadd7abc07e33")


def test_aad_example() -> None:  # 2.1: epoch 1 seq 0, 24-byte plaintext
    layer = RecordLayer()
    layer.install_keys(SUITE[0xC02B], bytes(16), bytes(4), bytes(16), bytes(4))
    rec = layer.seal(22, bytes(24), epoch=1)
    assert rec[:13] == H("16fefd000100000000000000") + b"\x30"
    assert rec[13:21] == H("0001000000000000")  # nonce_explicit = epoch || seq


# --- SPEC.md 9.4, 3.8, D24; SPEC-DTLS 3.10 ---------------------------------------------------


def test_ekt_key_encoding() -> None:
    msg = w.EktKey(
        H("404142434445464748494a4b4c4d4e4f"), H("c0c1c2c3c4c5c6c7c8c9cacb"), 0x0102, 86400
    )
    body = msg.encode()
    assert body == H("0010404142434445464748494a4b4c4d4e4f000cc0c1c2c3c4c5c6c7c8c9cacb0102015180")
    assert len(body) == 37
    assert w.encode_handshake(26, 3, body) == H("1a0000250003000000000025") + body
    assert w.EktKey.decode(body) == msg


def test_supported_ekt_ciphers_encoding() -> None:  # D24
    assert w.encode_uint8_list((1, 2)) == H("020102")
    ext = w.Extension(39, w.encode_uint8_list((1, 2)))
    buf_ch = w.ClientHello(0xFEFD, bytes(32), b"", b"", (0xC02B,), b"\0", (ext,)).encode()
    assert buf_ch.endswith(H("000700270003020102"))
    sh = w.ServerHello(0xFEFD, bytes(32), b"", 0xC02B, 0, (w.Extension(39, b"\x01"),)).encode()
    assert sh.endswith(H("00050027000101"))
    assert w.decode_ekt_selected(b"\x01") == 1
    with pytest.raises(w.DtlsDecodeError):
        w.decode_ekt_selected(b"\x01\x02")


def test_ack_encoding() -> None:  # SPEC-DTLS 3.10
    ack = w.Ack(((1, 7),))
    assert ack.encode() == H("001000000000000000010000000000000007")
    assert w.Ack.decode(ack.encode()) == ack
