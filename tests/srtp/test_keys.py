"""KDF vectors (RFC 3711 B.3, RFC 6188 §7.2, SPEC 8.4/9.1) and the key-material splits."""

import pytest

from perc.srtp.errors import SrtpUsageError
from perc.srtp.keys import (
    LABEL_RTCP_ENCRYPTION,
    LABEL_RTCP_SALT,
    LABEL_RTP_AUTH,
    LABEL_RTP_ENCRYPTION,
    LABEL_RTP_SALT,
    SrtpProfile,
    derive_session_keys,
    exporter_length,
    outer_media_keys,
    split_exporter,
    srtp_kdf,
)

h = bytes.fromhex


def test_rfc3711_b3_aes_cm_prf() -> None:
    key = h("E1F97A0D3E018BE0D64FA32C06DE4139")
    salt = h("0EC675AD498AFEEBB6960B3AABE6")
    assert srtp_kdf(key, salt, LABEL_RTP_ENCRYPTION, 16) == h("C61E7A93744F39EE10734AFE3FF7A087")
    assert srtp_kdf(key, salt, LABEL_RTP_SALT, 14) == h("30CBBC08863D8C85D49DB34A9AE1")
    auth = h(
        "CEBE321F6FF7716B6FD4AB49AF256A15"
        "6D38BAA48F0A0ACF3C34E2359E6CDBCE"
        "E049646C43D9327AD175578EF7227098"
        "6371C10C9A369AC2F94A8C5FBCDDDC25"
        "6D6E919A48B610EF17C2041E47403576"
        "6B68642C59BBFC2F34DB60DBDFB2"
    )
    assert srtp_kdf(key, salt, LABEL_RTP_AUTH, 94) == auth


def test_rfc6188_aes256_cm_prf() -> None:
    key = h("f0f04914b513f2763a1b1fa130f10e2998f6f6e43e4309d1e622a0e332b9f1b6")
    salt = h("3b04803de51ee7c96423ab5b78d2")
    assert srtp_kdf(key, salt, LABEL_RTP_ENCRYPTION, 32) == h(
        "5ba1064e30ec51613cad926c5a28ef731ec7fb397f70a960653caf06554cd8c4"
    )
    assert srtp_kdf(key, salt, LABEL_RTP_SALT, 14) == h("fa31791685ca444a9e07c6c64e93")
    assert srtp_kdf(key, salt, LABEL_RTP_AUTH, 20) == h("fd9c32d39ed5fbb5a9dc96b30818454d1313dc05")


def test_spec_9_1_kdf_with_96_bit_salt() -> None:
    keys = derive_session_keys(h("000102030405060708090a0b0c0d0e0f"), h("517569642070726f2071756f"))
    assert keys.rtp_key == h("b1bb5ee1803c7cb022c25343feb23261")
    assert keys.rtp_salt == h("52fa33dcddd7c677e513ce75")
    assert keys.rtcp_key == h("02657506d1e93c6639357fb793c2b082")
    assert keys.rtcp_salt == h("6f09033e2235e99cc6537c7a")
    # The labels agree with the generic function.
    key, salt = h("000102030405060708090a0b0c0d0e0f"), h("517569642070726f2071756f")
    assert srtp_kdf(key, salt, LABEL_RTCP_ENCRYPTION, 16) == keys.rtcp_key
    assert srtp_kdf(key, salt, LABEL_RTCP_SALT, 12) == keys.rtcp_salt
    assert "b1bb" not in repr(keys)


def test_kdf_rejects_bad_lengths() -> None:
    with pytest.raises(SrtpUsageError):
        srtp_kdf(bytes(15), bytes(12), 0, 16)
    with pytest.raises(SrtpUsageError):
        srtp_kdf(bytes(16), bytes(13), 0, 16)
    with pytest.raises(SrtpUsageError):
        srtp_kdf(bytes(16), bytes(12), 256, 16)


def test_kdr_nonzero() -> None:
    # r = index DIV kdr is XORed into the low 48 bits of x (RFC 3711 §4.3.1).
    key, salt = bytes(16), bytes(14)
    a = srtp_kdf(key, salt, 0, 16, index=5, kdr=2)
    b = srtp_kdf(key, (2).to_bytes(14, "big"), 0, 16)
    assert a == b


@pytest.mark.parametrize(
    ("profile", "key", "salt", "double"),
    [
        (SrtpProfile.AEAD_AES_128_GCM, 16, 12, False),
        (SrtpProfile.AEAD_AES_256_GCM, 32, 12, False),
        (SrtpProfile.DOUBLE_AEAD_AES_128_GCM, 32, 24, True),
        (SrtpProfile.DOUBLE_AEAD_AES_256_GCM, 64, 24, True),
    ],
)
def test_profile_lengths(profile: SrtpProfile, key: int, salt: int, double: bool) -> None:
    assert profile.key_length == key
    assert profile.salt_length == salt
    assert profile.is_double is double
    assert exporter_length(profile) == exporter_length(int(profile)) == 2 * (key + salt)
    assert profile.half_key_length == (key // 2 if double else key)
    assert profile.half_salt_length == 12


def test_split_single() -> None:
    material = bytes(range(56))
    km = split_exporter(SrtpProfile.AEAD_AES_128_GCM, material)
    assert km.client_key == material[0:16]
    assert km.server_key == material[16:32]
    assert km.client_salt == material[32:44]
    assert km.server_salt == material[44:56]
    with pytest.raises(SrtpUsageError):
        km.inner()
    assert outer_media_keys(SrtpProfile.AEAD_AES_128_GCM, material) == (
        km.client_key,
        km.server_key,
        km.client_salt,
        km.server_salt,
    )
    assert "client" not in repr(km)


def test_split_double_128_layout() -> None:
    # SPEC 7.2: c_k_in | c_k_out | s_k_in | s_k_out | c_s_in | c_s_out | s_s_in | s_s_out
    sizes = [16, 16, 16, 16, 12, 12, 12, 12]
    names = ["cki", "cko", "ski", "sko", "csi", "cso", "ssi", "sso"]
    parts = {n: bytes([i + 1]) * s for i, (n, s) in enumerate(zip(names, sizes, strict=True))}
    material = b"".join(parts[n] for n in names)
    assert len(material) == 112
    km = split_exporter(SrtpProfile.DOUBLE_AEAD_AES_128_GCM, material)
    inner, outer = km.inner(), km.outer()
    assert inner.profile is SrtpProfile.AEAD_AES_128_GCM
    assert outer.profile is SrtpProfile.AEAD_AES_128_GCM
    assert (inner.client_key, inner.server_key) == (parts["cki"], parts["ski"])
    assert (inner.client_salt, inner.server_salt) == (parts["csi"], parts["ssi"])
    assert (outer.client_key, outer.server_key) == (parts["cko"], parts["sko"])
    assert (outer.client_salt, outer.server_salt) == (parts["cso"], parts["sso"])
    assert outer_media_keys(SrtpProfile.DOUBLE_AEAD_AES_128_GCM, material) == (
        parts["cko"],
        parts["sko"],
        parts["cso"],
        parts["sso"],
    )


def test_split_double_256_layout() -> None:
    material = bytes(range(176))
    km = split_exporter(SrtpProfile.DOUBLE_AEAD_AES_256_GCM, material)
    ck, sk, cs, ss = outer_media_keys(SrtpProfile.DOUBLE_AEAD_AES_256_GCM, material)
    assert ck == material[32:64]
    assert sk == material[96:128]
    assert cs == material[140:152]
    assert ss == material[164:176]
    assert km.inner().client_key == material[0:32]
    assert km.inner().server_salt == material[152:164]
    assert km.outer().profile is SrtpProfile.AEAD_AES_256_GCM


def test_split_rejects_wrong_length_and_profile() -> None:
    with pytest.raises(SrtpUsageError):
        split_exporter(SrtpProfile.DOUBLE_AEAD_AES_128_GCM, bytes(56))
    with pytest.raises(SrtpUsageError):
        split_exporter(1, bytes(60))
    assert split_exporter(7, bytes(56)).profile is SrtpProfile.AEAD_AES_128_GCM
