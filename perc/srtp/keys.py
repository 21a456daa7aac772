"""SRTP profiles, the SRTP key derivation function and the DTLS-SRTP key-material splits.

Theory of operation
-------------------
A DTLS-SRTP handshake exports ``2 * (key_length + salt_length)`` bytes (RFC 5764 §4.2) laid
out as ``client_key | server_key | client_salt | server_salt``. :func:`split_exporter` cuts
that into a :class:`KeyingMaterial`. For the DOUBLE profiles of RFC 8723 each of the four values
is itself ``inner || outer`` (RFC 8723 §3, RFC 5764 §4.2), so the whole export reads
``c_k_in | c_k_out | s_k_in | s_k_out | c_s_in | c_s_out | s_s_in | s_s_out``;
:meth:`KeyingMaterial.inner` and :meth:`KeyingMaterial.outer` give the two halves as
single-layer (AEAD_AES_128_GCM / AEAD_AES_256_GCM) material. :func:`outer_media_keys` gives the
four values a Key Distributor puts in ``MediaKeys`` (D4: the outer halves only).

A master key and 12-byte master salt become SRTP/SRTCP session keys through the RFC 3711 §4.3
KDF: ``x = (label << 48 | r) XOR master_salt`` (right-aligned, 112 bits), and the output is the
AES counter-mode keystream under the master key starting at the block ``x * 2^16``. AES-128
keys use the AES_CM PRF of RFC 3711 §4.3.3, AES-256 keys the AES_256_CM_PRF of RFC 6188 §3
(the same construction with a 256-bit AES key). RFC 7714 uses 96-bit salts but does not say how
they enter the 112-bit KDF; D13 (and libsrtp, pion) append two zero bytes. DTLS-SRTP uses a key
derivation rate of 0 (RFC 5764 §4.1.2), so ``r = 0`` and each master key is derived once.

For the GCM profiles only four labels are used (RFC 7714 §11): 0x00 SRTP key, 0x02 SRTP salt,
0x03 SRTCP key, 0x05 SRTCP salt; session keys are as long as the master key and session salts
are 12 bytes.

API
---
- ``SrtpProfile`` (IntEnum 7, 8, 9, 10) with ``key_length``, ``salt_length`` (full, i.e. both
  halves for DOUBLE), ``is_double``, ``half_key_length``, ``half_salt_length``,
  ``half_profile`` (the single-layer profile each DOUBLE half runs).
- ``split_exporter(profile, material) -> KeyingMaterial``; ``KeyingMaterial.inner()``,
  ``.outer()`` for DOUBLE; ``exporter_length(profile)``.
- ``outer_media_keys(profile, material) -> (client_key, server_key, client_salt, server_salt)``.
- ``srtp_kdf(master_key, master_salt, label, length, *, index=0, kdr=0) -> bytes``.
- ``derive_session_keys(master_key, master_salt) -> SessionKeys``.

Errors: :class:`perc.srtp.errors.SrtpUsageError` for key material of the wrong length (local
misuse: these values come from our own DTLS stack or tunnel decoder, already length-checked).
"""

from __future__ import annotations

import enum

import attrs
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from perc.srtp.errors import SrtpUsageError

# RFC 3711 §4.3.1 / §4.3.2 key derivation labels.
LABEL_RTP_ENCRYPTION = 0x00
LABEL_RTP_AUTH = 0x01
LABEL_RTP_SALT = 0x02
LABEL_RTCP_ENCRYPTION = 0x03
LABEL_RTCP_AUTH = 0x04
LABEL_RTCP_SALT = 0x05

#: RFC 7714 §11: GCM session salts are 96 bits.
GCM_SALT_LENGTH = 12
#: RFC 3711 §4.3: the KDF works on 112-bit master salts.
KDF_SALT_LENGTH = 14


class SrtpProfile(enum.IntEnum):
    """DTLS-SRTP protection profiles perc implements (RFC 7714 §14.2, RFC 8723 §10.1)."""

    AEAD_AES_128_GCM = 0x0007
    AEAD_AES_256_GCM = 0x0008
    DOUBLE_AEAD_AES_128_GCM = 0x0009  # DOUBLE_AEAD_AES_128_GCM_AEAD_AES_128_GCM
    DOUBLE_AEAD_AES_256_GCM = 0x000A  # DOUBLE_AEAD_AES_256_GCM_AEAD_AES_256_GCM

    @property
    def is_double(self) -> bool:
        return self in (SrtpProfile.DOUBLE_AEAD_AES_128_GCM, SrtpProfile.DOUBLE_AEAD_AES_256_GCM)

    @property
    def half_profile(self) -> SrtpProfile:
        """The single-layer profile one layer runs (itself for a single-layer profile)."""
        if self is SrtpProfile.DOUBLE_AEAD_AES_128_GCM:
            return SrtpProfile.AEAD_AES_128_GCM
        if self is SrtpProfile.DOUBLE_AEAD_AES_256_GCM:
            return SrtpProfile.AEAD_AES_256_GCM
        return self

    @property
    def half_key_length(self) -> int:
        """Master key length of one layer: 16 (AES-128) or 32 (AES-256)."""
        return 16 if self.half_profile is SrtpProfile.AEAD_AES_128_GCM else 32

    @property
    def half_salt_length(self) -> int:
        """Master salt length of one layer: always 12 (RFC 7714 §12)."""
        return GCM_SALT_LENGTH

    @property
    def key_length(self) -> int:
        """Master key length as DTLS-SRTP sees it (both halves for DOUBLE)."""
        return self.half_key_length * (2 if self.is_double else 1)

    @property
    def salt_length(self) -> int:
        """Master salt length as DTLS-SRTP sees it (both halves for DOUBLE)."""
        return GCM_SALT_LENGTH * (2 if self.is_double else 1)


def _as_profile(profile: SrtpProfile | int) -> SrtpProfile:
    try:
        return SrtpProfile(profile)
    except ValueError:
        raise SrtpUsageError(f"unsupported SRTP protection profile {profile!r}") from None


def exporter_length(profile: SrtpProfile | int) -> int:
    """Bytes to request from the EXTRACTOR-dtls_srtp exporter (RFC 5764 §4.2)."""
    p = _as_profile(profile)
    return 2 * (p.key_length + p.salt_length)


@attrs.frozen(repr=False)
class KeyingMaterial:
    """Client- and server-write master keys and salts of one DTLS-SRTP association.

    ``client_*`` protect what the DTLS client sends, ``server_*`` what the server side sends
    (in PERC: the Media Distributor, RFC 9185 §6.4).
    """

    profile: SrtpProfile
    client_key: bytes
    server_key: bytes
    client_salt: bytes
    server_salt: bytes

    def __repr__(self) -> str:  # never print key material
        return f"KeyingMaterial(profile={self.profile.name})"

    def _half(self, second: bool) -> KeyingMaterial:
        if not self.profile.is_double:
            raise SrtpUsageError(f"{self.profile.name} is not a DOUBLE profile")
        k = self.profile.half_key_length
        s = GCM_SALT_LENGTH
        ks = slice(k, 2 * k) if second else slice(0, k)
        ss = slice(s, 2 * s) if second else slice(0, s)
        return KeyingMaterial(
            profile=self.profile.half_profile,
            client_key=self.client_key[ks],
            server_key=self.server_key[ks],
            client_salt=self.client_salt[ss],
            server_salt=self.server_salt[ss],
        )

    def inner(self) -> KeyingMaterial:
        """The inner (end-to-end) halves: first half of each key and salt (RFC 8723 §3)."""
        return self._half(second=False)

    def outer(self) -> KeyingMaterial:
        """The outer (hop-by-hop) halves: second half of each key and salt (RFC 8723 §3)."""
        return self._half(second=True)


def split_exporter(profile: SrtpProfile | int, material: bytes) -> KeyingMaterial:
    """Cut DTLS-SRTP exporter output into keys and salts (RFC 5764 §4.2 layout)."""
    profile = _as_profile(profile)
    k, s = profile.key_length, profile.salt_length
    if len(material) != 2 * (k + s):
        raise SrtpUsageError(
            f"{profile.name} needs {2 * (k + s)} bytes of keying material, got {len(material)}"
        )
    return KeyingMaterial(
        profile=profile,
        client_key=material[0:k],
        server_key=material[k : 2 * k],
        client_salt=material[2 * k : 2 * k + s],
        server_salt=material[2 * k + s : 2 * k + 2 * s],
    )


def outer_media_keys(
    profile: SrtpProfile | int, material: bytes
) -> tuple[bytes, bytes, bytes, bytes]:
    """The four values of ``MediaKeys`` (RFC 9185 §5.4, D4).

    For a DOUBLE profile: the outer (HBH) halves only, half-length keys and 12-byte salts. For
    a single-layer profile (a D16 MDD-to-MDD hop): the whole keys and salts.
    Returns ``(client_key, server_key, client_salt, server_salt)``.
    """
    km = split_exporter(profile, material)
    if km.profile.is_double:
        km = km.outer()
    return km.client_key, km.server_key, km.client_salt, km.server_salt


def _check_master(master_key: bytes, master_salt: bytes) -> bytes:
    if len(master_key) not in (16, 32):
        raise SrtpUsageError(f"master key must be 16 or 32 bytes, got {len(master_key)}")
    if len(master_salt) == GCM_SALT_LENGTH:
        # D13: the 96-bit GCM salt is zero-extended to the KDF's 112 bits (as libsrtp, pion).
        return bytes(master_salt) + b"\x00\x00"
    if len(master_salt) == KDF_SALT_LENGTH:
        return bytes(master_salt)
    raise SrtpUsageError(f"master salt must be 12 or 14 bytes, got {len(master_salt)}")


def srtp_kdf(
    master_key: bytes,
    master_salt: bytes,
    label: int,
    length: int,
    *,
    index: int = 0,
    kdr: int = 0,
) -> bytes:
    """RFC 3711 §4.3.1 key derivation with the AES_CM PRF (§4.3.3) or AES_256_CM_PRF (RFC 6188).

    ``master_key`` of 16 bytes selects AES-128, 32 bytes AES-256. ``master_salt`` may be the
    full 14 bytes or a 12-byte GCM salt (zero-extended, D13). ``kdr`` is the key derivation
    rate (0 for DTLS-SRTP: r = 0).
    """
    salt14 = _check_master(master_key, master_salt)
    if not 0 <= label <= 0xFF:
        raise SrtpUsageError(f"label out of range: {label}")
    if length < 0 or length > 0xFFFF * 16:
        raise SrtpUsageError(f"derived length out of range: {length}")
    r = 0 if kdr == 0 else index // kdr  # RFC 3711 §4.3.1: r = index DIV kdr, 0 when kdr=0
    key_id = (label << 48) | (r & 0xFFFFFFFFFFFF)
    x = key_id ^ int.from_bytes(salt14, "big")
    # The PRF input block is x * 2^16: the 14-byte x followed by a 16-bit block counter.
    counter_block = (x << 16).to_bytes(16, "big")
    encryptor = Cipher(algorithms.AES(bytes(master_key)), modes.CTR(counter_block)).encryptor()
    return encryptor.update(bytes(length)) + encryptor.finalize()


@attrs.frozen(repr=False)
class SessionKeys:
    """The four session values an AES-GCM SRTP context needs (RFC 7714 §11)."""

    rtp_key: bytes
    rtp_salt: bytes
    rtcp_key: bytes
    rtcp_salt: bytes

    def __repr__(self) -> str:  # never print key material
        return f"SessionKeys(aes{8 * len(self.rtp_key)})"


def derive_session_keys(master_key: bytes, master_salt: bytes) -> SessionKeys:
    """Derive SRTP and SRTCP session keys and 12-byte salts from a GCM master key and salt."""
    n = len(master_key)
    return SessionKeys(
        rtp_key=srtp_kdf(master_key, master_salt, LABEL_RTP_ENCRYPTION, n),
        rtp_salt=srtp_kdf(master_key, master_salt, LABEL_RTP_SALT, GCM_SALT_LENGTH),
        rtcp_key=srtp_kdf(master_key, master_salt, LABEL_RTCP_ENCRYPTION, n),
        rtcp_salt=srtp_kdf(master_key, master_salt, LABEL_RTCP_SALT, GCM_SALT_LENGTH),
    )
