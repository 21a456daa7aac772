"""TLS 1.2 key schedule for perc's DTLS suites (RFC 5246 §5, §6.3, §8.1; RFC 7627; RFC 5705).

* ``prf``: the TLS 1.2 P_hash construction over HMAC from ``cryptography``.
* ``extended_master_secret``: RFC 7627 §4 (the only master secret perc uses, D17).
* ``key_block`` split into client/server write keys and IVs (no MAC keys with AEAD suites;
  note server_random comes first in the key-expansion seed).
* ``finished_verify_data`` and the RFC 5705 exporter without context.
* ``CipherSuite`` parameters (RFC 5289, 7905) and SRTP profile key lengths (RFC 7714, RFC 8723).
"""

from __future__ import annotations

import attrs
from cryptography.hazmat.primitives import hashes, hmac
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

SHA256 = hashes.SHA256()
SHA384 = hashes.SHA384()


@attrs.frozen
class CipherSuite:
    code: int
    name: str
    prf_hash: hashes.HashAlgorithm
    key_length: int
    fixed_iv_length: int
    explicit_nonce_length: int  # 8 for GCM (RFC 5288 §3), 0 for ChaCha20 (RFC 7905 §2)
    is_chacha: bool

    @property
    def overhead(self) -> int:
        """Record expansion: explicit nonce + 16-byte tag."""
        return self.explicit_nonce_length + 16

    def aead(self, key: bytes) -> AESGCM | ChaCha20Poly1305:
        return ChaCha20Poly1305(key) if self.is_chacha else AESGCM(key)


CIPHER_SUITES: dict[int, CipherSuite] = {
    s.code: s
    for s in (
        CipherSuite(0xC02B, "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256", SHA256, 16, 4, 8, False),
        CipherSuite(0xC02C, "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384", SHA384, 32, 4, 8, False),
        CipherSuite(
            0xCCA9, "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256", SHA256, 32, 12, 0, True
        ),
    )
}


def _hmac(hash_alg: hashes.HashAlgorithm, key: bytes, data: bytes) -> bytes:
    h = hmac.HMAC(key, hash_alg)
    h.update(data)
    return h.finalize()


def prf(hash_alg: hashes.HashAlgorithm, secret: bytes, label: bytes, seed: bytes, n: int) -> bytes:
    """PRF(secret, label, seed)[0..n-1] = P_hash(secret, label + seed) (RFC 5246 §5)."""
    seed = label + seed
    out = bytearray()
    base = hmac.HMAC(secret, hash_alg)
    a = seed
    while len(out) < n:
        h = base.copy()
        h.update(a)
        a = h.finalize()  # A(i)
        h = base.copy()
        h.update(a + seed)
        out += h.finalize()
    return bytes(out[:n])


def digest(hash_alg: hashes.HashAlgorithm, data: bytes) -> bytes:
    h = hashes.Hash(hash_alg)
    h.update(data)
    return h.finalize()


def extended_master_secret(suite: CipherSuite, pre_master: bytes, session_hash: bytes) -> bytes:
    """RFC 7627 §4: PRF(pre_master, "extended master secret", session_hash)[0..47]."""
    return prf(suite.prf_hash, pre_master, b"extended master secret", session_hash, 48)


@attrs.frozen
class KeyBlock:
    client_write_key: bytes
    server_write_key: bytes
    client_write_iv: bytes
    server_write_iv: bytes


def key_block(
    suite: CipherSuite, master_secret: bytes, client_random: bytes, server_random: bytes
) -> KeyBlock:
    """RFC 5246 §6.3; seed is server_random + client_random; MAC keys are empty for AEAD."""
    k, iv = suite.key_length, suite.fixed_iv_length
    block = prf(
        suite.prf_hash, master_secret, b"key expansion", server_random + client_random, 2 * (k + iv)
    )
    return KeyBlock(block[:k], block[k : 2 * k], block[2 * k : 2 * k + iv], block[2 * k + iv :])


def finished_verify_data(
    suite: CipherSuite, master_secret: bytes, is_client: bool, transcript: bytes
) -> bytes:
    """RFC 5246 §7.4.9: PRF(master, label, Hash(handshake_messages))[0..11]."""
    label = b"client finished" if is_client else b"server finished"
    return prf(suite.prf_hash, master_secret, label, digest(suite.prf_hash, transcript), 12)


def export_keying_material(
    suite: CipherSuite,
    *,
    master_secret: bytes,
    client_random: bytes,
    server_random: bytes,
    label: bytes,
    length: int,
) -> bytes:
    """RFC 5705 §4 exporter, no context (the form DTLS-SRTP uses, RFC 5764 §4.2)."""
    return prf(suite.prf_hash, master_secret, label, client_random + server_random, length)


def keylog_line(client_random: bytes, master_secret: bytes) -> str:
    """NSS key log line for TLS/DTLS 1.2 (RFC 9850 §2.2; D21)."""
    return f"CLIENT_RANDOM {client_random.hex()} {master_secret.hex()}"
