"""EKT (RFC 8870): field codec, RFC 5649 vectors, sender schedule, receiver rules (§4.3.2, D8)."""

from __future__ import annotations

import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from perc.srtp.ekt import (
    EktCipher,
    EktOutcome,
    EktParameterSet,
    EktPlaintextError,
    EktReceiver,
    EktSender,
    EktStreamLimitError,
    EktUnwrapError,
    EktUsageError,
    UnknownSpiError,
    aes_kw_unwrap_with_padding,
    aes_kw_wrap_with_padding,
    ekt_ciphertext_length,
    ekt_unwrap,
    ekt_wrap,
)
from perc.wire.buffer import Buffer
from perc.wire.ekt import (
    SHORT,
    EktDecodeError,
    EktPlaintext,
    ExtensionEktField,
    FullEktField,
    decode_ekt_plaintext,
    ekt_field_length_untrusted,
    split_ekt_field,
)

# --- wire codec ----------------------------------------------------------------------------


def test_short_field() -> None:
    assert SHORT.encode() == b"\x00"
    assert split_ekt_field(b"\x80\x60abc\x00") == (5, SHORT)


def test_full_field_layout() -> None:
    f = FullEktField(bytes(range(40)), spi=0x0102, epoch=3)
    enc = f.encode()
    assert len(enc) == 47
    assert enc[-7:].hex() == "01020003002f02"
    assert split_ekt_field(b"srtp" + enc) == (4, f)
    assert ekt_field_length_untrusted(b"srtp" + enc) == 47


def test_extension_field() -> None:
    f = ExtensionEktField(0x04, b"hello")
    enc = f.encode()
    assert enc == b"hello\x00\x08\x04"
    assert split_ekt_field(b"xx" + enc) == (2, f)


def test_field_errors() -> None:
    for bad in (
        b"",
        b"\x01",  # legacy type 1
        b"\x02",  # no length
        b"\x00\x02",  # Full, too short for a length
        b"\x00\x07\x02",  # Full length below 8
        b"\x01\x03\x02",  # Full length above 258
        b"abc\x00\x30\x02",  # longer than the packet
        b"a\x00\x03\x05",  # extension length below 4
    ):
        with pytest.raises(EktDecodeError):
            split_ekt_field(bad)


def test_plaintext_codec() -> None:
    p = EktPlaintext(bytes(16), 0x11223344, 7)
    enc = p.encode()
    assert enc.hex() == "10" + "00" * 16 + "11223344" + "00000007"
    assert decode_ekt_plaintext(enc) == p
    for cut in range(len(enc)):
        with pytest.raises(EktDecodeError):
            decode_ekt_plaintext(enc[:cut])
    with pytest.raises(EktDecodeError):
        decode_ekt_plaintext(enc + b"\x00")
    with pytest.raises(EktDecodeError):
        decode_ekt_plaintext(b"\x00" + bytes(8))


fields = (
    st.just(SHORT)
    | st.builds(
        FullEktField,
        st.binary(min_size=1, max_size=251),
        st.integers(0, 0xFFFF),
        st.integers(0, 0xFFFF),
    )
    | st.builds(ExtensionEktField, st.integers(3, 255), st.binary(min_size=1, max_size=1024))
)


@given(fields, st.binary(max_size=30))
def test_field_round_trip_and_truncations(field: object, prefix: bytes) -> None:
    assert isinstance(field, FullEktField | ExtensionEktField | type(SHORT))
    enc = field.encode()
    assert split_ekt_field(prefix + enc) == (len(prefix), field)
    for cut in range(len(enc)):
        try:
            n, _ = split_ekt_field(enc[:cut])
        except EktDecodeError:
            continue
        assert 0 <= n <= cut


@given(st.binary(max_size=300))
def test_field_garbage(data: bytes) -> None:
    for cut in (len(data), len(data) // 2, max(0, len(data) - 1)):
        try:
            n, f = split_ekt_field(data[:cut])
        except EktDecodeError:
            continue
        assert data[n:cut] == f.encode()


@given(st.binary(max_size=300))
def test_plaintext_garbage(data: bytes) -> None:
    try:
        p = decode_ekt_plaintext(data)
    except EktDecodeError:
        return
    assert p.encode() == data


@given(st.binary(min_size=1, max_size=242), st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1))
def test_plaintext_round_trip(key: bytes, ssrc: int, roc: int) -> None:
    p = EktPlaintext(key, ssrc, roc)
    assert decode_ekt_plaintext(p.encode()) == p


# --- key wrap ------------------------------------------------------------------------------

KEK192 = bytes.fromhex("5840df6e29b02af1ab493b705bf16ea1ae8338f4dcc176a8")


def test_rfc5649_vectors() -> None:
    """SPEC 8.1 = RFC 5649 §6, both examples (multi-block and single-block path)."""
    key1 = bytes.fromhex("c37b7e6492584340bed12207808941155068f738")
    wrap1 = bytes.fromhex("138bdeaa9b8fa7fc61f97742e72248ee5ae6ae5360d1ae6a5f54f373fa543b6a")
    assert aes_kw_wrap_with_padding(KEK192, key1) == wrap1
    assert aes_kw_unwrap_with_padding(KEK192, wrap1) == key1
    key2 = bytes.fromhex("466f7250617369")
    wrap2 = bytes.fromhex("afbeb0f07dfbf5419200f2ccb50bb24f")
    assert aes_kw_wrap_with_padding(KEK192, key2) == wrap2
    assert aes_kw_unwrap_with_padding(KEK192, wrap2) == key2
    bad = bytearray(wrap1)
    bad[5] ^= 1
    with pytest.raises(EktUnwrapError):
        aes_kw_unwrap_with_padding(KEK192, bytes(bad))


@pytest.mark.parametrize(("m", "n"), [(25, 40), (41, 56), (7, 16), (8, 16), (9, 24)])
def test_ciphertext_length_d7(m: int, n: int) -> None:
    assert ekt_ciphertext_length(m) == n
    assert len(aes_kw_wrap_with_padding(bytes(16), bytes(m))) == n


@pytest.mark.parametrize("cipher", list(EktCipher))
def test_ekt_wrap_sizes(cipher: EktCipher) -> None:
    kek = os.urandom(cipher.key_length)
    for key_len, total in ((16, 47), (32, 63)):
        pt = EktPlaintext(os.urandom(key_len), 1, 2).encode()
        ct = ekt_wrap(cipher, kek, pt)
        assert len(FullEktField(ct, 1, 0).encode()) == total
        assert ekt_unwrap(cipher, kek, ct) == pt
    with pytest.raises(EktUsageError):
        ekt_wrap(cipher, bytes(24), b"x")
    assert int(EktCipher.AESKW_128) == 1 and int(EktCipher.AESKW_256) == 2  # D6


@pytest.mark.parametrize("length", [0, 1, 8, 15, 17, 39, 41])
def test_unwrap_impossible_lengths(length: int) -> None:
    with pytest.raises(EktUnwrapError):
        ekt_unwrap(EktCipher.AESKW_128, bytes(16), bytes(length))


# SPEC 9.4: the EKTKey body (key 16 B, salt 12 B, SPI 0x0102, TTL 86400 s).
SPEC_9_4_BODY = bytes.fromhex(
    "0010404142434445464748494a4b4c4d4e4f000cc0c1c2c3c4c5c6c7c8c9cacb0102015180"
)


def spec_9_4_params(now: float = 0.0) -> EktParameterSet:
    buf = Buffer(SPEC_9_4_BODY)
    key = buf.pull_vector(2, 1, 256)
    salt = buf.pull_vector(2, 1, 256)
    spi = buf.pull_uint16()
    ttl = buf.pull_uint24()
    buf.expect_end()
    return EktParameterSet.from_ekt_key(key, salt, spi, ttl, now)


def test_from_ekt_key_with_negotiated_cipher() -> None:
    p = EktParameterSet.from_ekt_key(bytes(32), bytes(12), 5, 10, 0.0, cipher=2)
    assert p.cipher is EktCipher.AESKW_256
    with pytest.raises(EktUsageError):
        EktParameterSet.from_ekt_key(bytes(16), bytes(12), 5, 10, 0.0, cipher=2)
    with pytest.raises(EktUsageError):
        EktParameterSet.from_ekt_key(bytes(16), bytes(12), 5, 10, 0.0, cipher=0)
    with pytest.raises(EktUsageError):
        EktParameterSet.from_ekt_key(bytes(16), bytes(12), 0x10000, 10, 0.0)


def test_spec_9_4_parameter_set() -> None:
    p = spec_9_4_params(now=100.0)
    assert p.spi == 0x0102
    assert p.cipher is EktCipher.AESKW_128
    assert p.key == bytes(range(0x40, 0x50))
    assert p.salt == bytes(range(0xC0, 0xCC))
    assert p.expires_at == 100.0 + 86400
    assert not p.expired(86499.0) and p.expired(86500.0)
    # A Full tag under it, for a 16-byte inner key: 40-byte ciphertext, 47-byte field.
    sender = EktSender(p, bytes(range(16)))
    field = sender.field(0xCAFEBABE, 0, now=100.0)
    assert len(field) == 47 and field[-7:].hex() == "01020000002f02"
    n, f = split_ekt_field(field)
    assert n == 0 and isinstance(f, FullEktField)
    assert decode_ekt_plaintext(ekt_unwrap(p.cipher, p.key, f.ciphertext)) == EktPlaintext(
        bytes(range(16)), 0xCAFEBABE, 0
    )


# --- sender schedule -----------------------------------------------------------------------


def params(spi: int = 1, cipher: EktCipher = EktCipher.AESKW_128) -> EktParameterSet:
    return EktParameterSet(spi, cipher, os.urandom(cipher.key_length), os.urandom(12))


def kinds(fields_: list[bytes]) -> str:
    return "".join("F" if f[-1] == 2 else "s" for f in fields_)


def test_sender_audio_schedule() -> None:
    s = EktSender(params(), os.urandom(16))
    out = [s.field(5, 0, now=i * 0.02) for i in range(12)]  # 20 ms packets
    # three Full, then Short until 100 ms after the last Full (t=0.04 -> 0.14 = packet 7)
    assert kinds(out) == "FFFssssFssss"
    assert s.stats.wraps == 1  # cached ciphertext
    assert s.stats.full_tags == 4


def test_sender_video_keyframes_and_roc_change() -> None:
    s = EktSender(params(), os.urandom(16), period=None)
    out = [s.field(5, 0, now=i * 0.01) for i in range(6)]
    out.append(s.field(5, 0, now=1.0, keyframe=True))
    out.append(s.field(5, 0, now=10.0))
    assert kinds(out) == "FFFsssFs"
    out2 = s.field(5, 1, now=11.0, keyframe=True)
    assert out2 != out[0] and s.stats.wraps == 2  # ROC changed: re-wrapped


def test_sender_key_change_epochs() -> None:
    p = params()
    s = EktSender(p, os.urandom(16))
    for i in range(5):
        s.field(5, 0, now=i * 0.02)
    s.change_key(os.urandom(16))
    out = [s.field(5, 0, now=0.1 + i * 0.001) for i in range(5)]
    assert kinds(out) == "FFFss"
    assert split_ekt_field(out[0])[1] == FullEktField(out[0][:40], p.spi, 1)
    # new SSRC under the same parameter set starts at epoch 0
    assert out[0][-5:-3] == b"\x00\x01"
    assert s.field(6, 0, now=0.2)[-5:-3] == b"\x00\x00"
    # new parameter set: epoch restarts at 0
    p2 = params(spi=2)
    s.change_key(os.urandom(16), p2)
    f = s.field(5, 0, now=0.3)
    assert f[-7:-3] == b"\x00\x02\x00\x00"
    with pytest.raises(EktUsageError):
        s.change_key(s.master_key)
    with pytest.raises(EktUsageError):
        EktSender(p, bytes(20))


def test_sender_expired_key() -> None:
    p = EktParameterSet(1, EktCipher.AESKW_128, bytes(16), bytes(12), expires_at=5.0)
    s = EktSender(p, os.urandom(16))
    s.field(1, 0, now=1.0)
    with pytest.raises(EktUsageError):
        s.field(2, 0, now=6.0)


# --- receiver ------------------------------------------------------------------------------


class FakeSession:
    """Stands in for an inner SrtpSession: records its key/salt and ROC seeds."""

    def __init__(self, key: bytes, salt: bytes) -> None:
        self.key = key
        self.salt = salt
        self.rocs: dict[int, int] = {}
        self.live: dict[int, int] = {}  # SSRC -> highest index, once a packet decrypted

    def unprotect_rtp(self, packet: bytes) -> bytes:
        return packet

    def receive_roc(self, ssrc: int) -> int | None:
        return self.rocs.get(ssrc)

    def receive_index(self, ssrc: int) -> int | None:
        return self.live.get(ssrc)

    def set_receive_roc(self, ssrc: int, roc: int) -> None:
        self.rocs[ssrc] = roc


def receiver(*sets: EktParameterSet, **kw: int) -> EktReceiver:
    r = EktReceiver(FakeSession, master_key_length=16, **kw)
    for p in sets:
        r.add_parameter_set(p)
    return r


def full(sender: EktSender, ssrc: int, roc: int, now: float) -> FullEktField:
    raw = sender.field(ssrc, roc, now, keyframe=True)
    f = split_ekt_field(raw)[1]
    assert isinstance(f, FullEktField)
    return f


def test_receiver_learns_key_salt_roc() -> None:
    p = params()
    p = EktParameterSet(p.spi, p.cipher, p.key, os.urandom(16))  # longer salt: truncated
    key = os.urandom(16)
    s = EktSender(p, key)
    r = receiver(p)
    assert r.process(SHORT, 7, 0.0) is EktOutcome.NONE
    assert r.process(full(s, 7, 3, 0.0), 7, 0.0) is EktOutcome.NEW_KEY
    (k,) = r.keys(7)
    assert (k.master_key, k.salt, k.roc, k.spi, k.epoch) == (key, p.salt[:12], 3, p.spi, 0)
    assert isinstance(k.session, FakeSession)
    assert k.session.key == key and k.session.salt == p.salt[:12] and k.session.rocs == {7: 3}
    # the same tag again is recognised from the cache without unwrapping
    assert r.process(full(s, 7, 3, 0.0), 7, 0.0) is EktOutcome.CACHED
    # same epoch, same key, new ROC: ROC updated (D8)
    assert r.process(full(s, 7, 4, 0.0), 7, 0.0) is EktOutcome.ROC_UPDATED
    assert k.roc == 4 and k.session.rocs[7] == 4  # no packet yet: the start ROC moves
    # a live stream keeps its own estimate; an older ROC never moves anything back
    k.session.live[7] = 4 << 16
    assert r.process(full(s, 7, 5, 0.0), 7, 0.0) is EktOutcome.ROC_UPDATED
    assert k.roc == 5 and k.session.rocs[7] == 4
    assert r.process(full(s, 7, 2, 0.0), 7, 0.0) is EktOutcome.ROC_UPDATED
    assert k.roc == 5
    assert r.stats.new_keys == 1 and r.stats.cached == 1 and r.stats.roc_updates == 3


def test_receiver_unknown_spi_is_authentication_failure() -> None:
    s = EktSender(params(spi=9), os.urandom(16))
    r = receiver(params(spi=1))
    with pytest.raises(UnknownSpiError) as exc:
        r.process(full(s, 7, 0, 0.0), 7, 0.0)
    from perc.srtp.errors import AuthenticationError

    assert isinstance(exc.value, AuthenticationError)
    assert r.stats.unknown_spi == 1 and r.keys(7) == []


def test_receiver_expired_spi() -> None:
    p = EktParameterSet(1, EktCipher.AESKW_128, bytes(16), bytes(12), expires_at=5.0)
    s = EktSender(p, os.urandom(16))
    r = receiver(p)
    f = full(s, 7, 0, 0.0)
    with pytest.raises(UnknownSpiError):
        r.process(f, 7, 5.0)


def test_receiver_corrupt_ciphertext_drops_packet() -> None:
    p = params()
    s = EktSender(p, os.urandom(16))
    r = receiver(p)
    f = full(s, 7, 0, 0.0)
    for i in range(len(f.ciphertext)):
        bad = bytearray(f.ciphertext)
        bad[i] ^= 0x40
        with pytest.raises(EktUnwrapError):
            r.process(FullEktField(bytes(bad), f.spi, f.epoch), 7, 0.0)
    assert r.stats.unwrap_failures == len(f.ciphertext)
    assert r.keys(7) == []


def test_receiver_wrong_ssrc_ignores_tag() -> None:
    p = params()
    s = EktSender(p, os.urandom(16))
    r = receiver(p)
    assert r.process(full(s, 7, 0, 0.0), 8, 0.0) is EktOutcome.IGNORED_SSRC
    assert r.keys(8) == [] and r.keys(7) == []
    assert r.stats.ignored_ssrc == 1


def test_receiver_bad_plaintext_and_key_length() -> None:
    p = params()
    r = receiver(p)
    ct = ekt_wrap(p.cipher, p.key, b"\x05garbage")
    with pytest.raises(EktPlaintextError):
        r.process(FullEktField(ct, p.spi, 0), 7, 0.0)
    ct = ekt_wrap(p.cipher, p.key, EktPlaintext(bytes(32), 7, 0).encode())
    with pytest.raises(EktPlaintextError):
        r.process(FullEktField(ct, p.spi, 0), 7, 0.0)
    assert r.stats.bad_plaintext == 2


def test_receiver_epoch_rule_d8() -> None:
    p = params()
    k0, k1 = os.urandom(16), os.urandom(16)
    s = EktSender(p, k0)
    r = receiver(p)
    f0 = full(s, 7, 0, 0.0)
    s.change_key(k1)
    f1 = full(s, 7, 0, 0.0)
    assert f1.epoch == 1
    assert r.process(f1, 7, 0.0) is EktOutcome.NEW_KEY
    # lower epoch (a replayed or late tag with the old key): ignored, packet goes on
    assert r.process(f0, 7, 0.0) is EktOutcome.IGNORED_EPOCH
    # same epoch with a different key: ignored
    forged = ekt_wrap(p.cipher, p.key, EktPlaintext(os.urandom(16), 7, 0).encode())
    assert r.process(FullEktField(forged, p.spi, 1), 7, 0.0) is EktOutcome.IGNORED_EPOCH
    assert [k.master_key for k in r.keys(7)] == [k1]
    assert r.stats.ignored_epoch == 2


def test_receiver_follows_rekey_and_keeps_old_keys() -> None:
    p1, p2 = params(spi=1), params(spi=2)
    k1, k2 = os.urandom(16), os.urandom(16)
    s = EktSender(p1, k1)
    r = receiver(p1, p2, keys_per_stream=2, old_key_lifetime=5.0)
    assert r.process(full(s, 7, 0, 0.0), 7, 0.0) is EktOutcome.NEW_KEY
    s.change_key(k2, p2)
    f = full(s, 7, 0, 1.0)
    assert (f.spi, f.epoch) == (2, 0)
    assert r.process(f, 7, 1.0) is EktOutcome.NEW_KEY
    keys = r.keys(7)
    assert [k.master_key for k in keys] == [k2, k1]
    assert keys[1].superseded_at == 1.0
    # the key that last worked is tried first
    r.mark_used(keys[1])
    assert [k.master_key for k in r.keys(7)] == [k1, k2]
    # old keys expire
    r.expire_old_keys(7.0)
    assert [k.master_key for k in r.keys(7)] == [k2]
    # a third key evicts beyond keys_per_stream
    s.change_key(os.urandom(16))
    r.process(full(s, 7, 0, 8.0), 7, 8.0)
    s.change_key(os.urandom(16))
    r.process(full(s, 7, 0, 8.1), 7, 8.1)
    assert len(r.keys(7)) == 2


def test_receiver_bounds() -> None:
    p = params()
    r = receiver(p, max_streams=2)
    s = EktSender(p, os.urandom(16))
    r.process(full(s, 1, 0, 0.0), 1, 0.0)
    r.process(full(s, 2, 0, 0.0), 2, 0.0)
    with pytest.raises(EktStreamLimitError):
        r.process(full(s, 3, 0, 0.0), 3, 0.0)
    assert r.stats.stream_limit == 1
    r.forget(1)
    assert r.process(full(s, 3, 0, 0.0), 3, 0.0) is EktOutcome.NEW_KEY
    # parameter sets are bounded too
    r2 = receiver(*(params(spi=i) for i in range(10)), max_parameter_sets=4)
    assert r2.parameter_set(0) is None and r2.parameter_set(9) is not None
    with pytest.raises(EktUsageError):
        r2.add_parameter_set(EktParameterSet(1, EktCipher.AESKW_128, bytes(16), bytes(8)))


def test_receiver_ignores_extension_type() -> None:
    r = receiver(params())
    assert r.process(ExtensionEktField(4, b"x"), 1, 0.0) is EktOutcome.IGNORED_TYPE


@given(st.binary(min_size=1, max_size=242), st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1))
def test_plaintext_every_truncation(key: bytes, ssrc: int, roc: int) -> None:
    enc = EktPlaintext(key, ssrc, roc).encode()
    for cut in range(len(enc)):
        with pytest.raises(EktDecodeError):
            decode_ekt_plaintext(enc[:cut])


@given(
    st.lists(
        st.tuples(st.integers(0, 3), st.integers(0, 5), st.integers(0, 2), st.integers(0, 2)),
        max_size=25,
    )
)
def test_receiver_never_rolls_back(tags: list[tuple[int, int, int, int]]) -> None:
    """Random Full tags (key index, epoch, ROC, SSRC choice): per SPI+SSRC the newest key's
    epoch only grows, a tag's key is only learnt at a higher epoch, and nothing but the
    documented outcomes happen."""
    p = params()
    keys = [bytes([k]) * 16 for k in range(4)]
    r = receiver(p)
    best: dict[int, int] = {}
    for key_i, epoch, roc, ssrc_choice in tags:
        ct = ekt_wrap(p.cipher, p.key, EktPlaintext(keys[key_i], 7, roc).encode())
        packet_ssrc = 7 if ssrc_choice else 8
        outcome = r.process(FullEktField(ct, p.spi, epoch), packet_ssrc, 0.0)
        if packet_ssrc == 8:
            assert outcome is EktOutcome.IGNORED_SSRC
            continue
        if outcome is EktOutcome.NEW_KEY:
            assert epoch > best.get(p.spi, -1)
            best[p.spi] = epoch
        known = r.keys(7)  # newest first (no key was marked used)
        if known:
            assert known[0].epoch == best[p.spi]
            assert [k.epoch for k in known] == sorted((k.epoch for k in known), reverse=True)
        assert len(known) <= 3
