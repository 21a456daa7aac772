"""perc.keying: roster (D15), profile choice (D18), EKTKey generation (D10), rekey hooks (D22)."""

from __future__ import annotations

import hashlib
import uuid

import pytest
from hypothesis import given
from hypothesis import strategies as st

from perc.config import Fingerprint, KmfConference
from perc.keying import (
    AESKW128,
    AESKW256,
    Conference,
    KeyingError,
    KeyingState,
    Member,
    choose_profile,
    key_digest,
)

FP_A = Fingerprint("sha-256 " + ":".join(["AA"] * 32))
FP_B = Fingerprint("sha-256 " + ":".join(["BB"] * 32))
FP_C = Fingerprint("sha-256 " + ":".join(["CC"] * 32))
TLS_A = "tls-id-of-alice-0123456789"


def conference(cid: str = "demo", **kw: object) -> KmfConference:
    kw.setdefault("participants", (FP_A, FP_B))
    return KmfConference(id=cid, **kw)  # type: ignore[arg-type]


def member(aid: uuid.UUID | None = None, fp: str = FP_A) -> Member:
    return Member(
        association_id=aid or uuid.uuid4(),
        fingerprint=fp,
        tls_id=None,
        tunnel=None,
        profile=0x0009,
        ekt_cipher=AESKW256,
        joined=0.0,
    )


# --- roster (D15) --------------------------------------------------------------------------


def test_roster_admits_listed_fingerprints_only() -> None:
    state = KeyingState([conference()])
    assert state.admit(FP_A, None).conference is state.conferences["demo"]
    assert state.admit(FP_B, b"anything-at-all-12345").conference is state.conferences["demo"]
    refused = state.admit(FP_C, None)
    assert refused.conference is None
    assert refused.reason == "fingerprint on no roster"


def test_roster_checks_tls_id_when_the_conference_names_one() -> None:
    state = KeyingState([conference(tls_ids={FP_A: TLS_A})])
    assert state.admit(FP_A, TLS_A.encode()).conference is not None
    for wrong in (None, b"another-tls-id-0123456789", TLS_A.encode() + b"x"):
        admission = state.admit(FP_A, wrong)
        assert admission.conference is None
        assert admission.reason == "tls-id does not match the roster"
    # B has no expected tls-id: any (or none) is fine
    assert state.admit(FP_B, None).conference is not None


def test_roster_picks_the_first_conference_that_matches() -> None:
    first = conference("first", participants=(FP_A,), tls_ids={FP_A: TLS_A})
    second = conference("second", participants=(FP_A,))
    state = KeyingState([first, second])
    assert state.admit(FP_A, TLS_A.encode()).conference is state.conferences["first"]
    # the tls-id does not fit "first", so "second" (no tls-id constraint) takes it
    assert state.admit(FP_A, b"other-tls-id-0123456789").conference is state.conferences["second"]


# --- profile choice (D18) ------------------------------------------------------------------


def test_choose_profile_follows_kmf_preference() -> None:
    assert choose_profile((9, 10), (10, 9), (9, 10)) == 9
    assert choose_profile((10, 9), (9, 10), (9, 10)) == 10
    assert choose_profile((9, 10), (10,), (9, 10)) == 10
    assert choose_profile((9, 10), (9,), (10,)) is None  # MDD cannot relay what was offered
    assert choose_profile((9,), (10,), (9, 10)) is None
    assert choose_profile((9, 10), (), (9, 10)) is None


@given(
    pref=st.lists(st.integers(0, 20), unique=True, max_size=6),
    offered=st.lists(st.integers(0, 20), max_size=6),
    mdd=st.lists(st.integers(0, 20), max_size=6),
)
def test_choose_profile_property(pref: list[int], offered: list[int], mdd: list[int]) -> None:
    chosen = choose_profile(pref, offered, mdd)
    common = [p for p in pref if p in offered and p in mdd]
    assert chosen == (common[0] if common else None)


# --- EKTKey (D10) --------------------------------------------------------------------------


@pytest.mark.parametrize(("cipher", "length"), [(AESKW128, 16), (AESKW256, 32)])
def test_key_lengths_salt_ttl(cipher: int, length: int) -> None:
    conf = Conference(conference(ekt_ttl=3600))
    key = conf.key_for(cipher, now=5.0)
    assert len(key.key) == length
    assert len(key.salt) == 12
    assert key.ttl == 3600
    assert key.cipher == cipher
    assert key.created == 5.0
    assert 0 <= key.spi < 1 << 16
    assert conf.cipher == cipher
    # the same key while it is current
    assert conf.key_for(cipher, now=6.0) is key
    assert key.key.hex() not in repr(key) and key.salt.hex() not in repr(key)
    assert key.same_key(key.key, key.salt, key.spi)
    assert not key.same_key(key.key, key.salt, (key.spi + 1) & 0xFFFF)


def test_unknown_cipher_is_local_misuse() -> None:
    conf = Conference(conference())
    with pytest.raises(KeyingError):
        conf.key_for(3, now=0.0)
    assert not conf.accepts_cipher(None)
    assert not conf.accepts_cipher(0)


def test_one_cipher_per_conference() -> None:
    conf = Conference(conference())
    assert conf.accepts_cipher(AESKW128) and conf.accepts_cipher(AESKW256)
    conf.key_for(AESKW256, now=0.0)
    assert conf.accepts_cipher(AESKW256)
    assert not conf.accepts_cipher(AESKW128)
    with pytest.raises(KeyingError, match="uses EKT cipher 2"):
        conf.key_for(AESKW128, now=0.0)


def test_rekey_makes_fresh_key_and_new_spi() -> None:
    conf = Conference(conference())
    with pytest.raises(KeyingError):
        conf.rekey(now=0.0)  # nobody holds a key yet
    first = conf.key_for(AESKW128, now=0.0)
    seen = {first.spi}
    previous = first
    for i in range(1, 50):
        key = conf.rekey(now=float(i))
        assert key is conf.current
        assert key.cipher == AESKW128
        assert key.spi == (previous.spi + 1) & 0xFFFF
        assert key.key != previous.key and key.salt != previous.salt
        seen.add(key.spi)
        previous = key
    assert len(seen) == 50
    assert conf.keys_issued == 50


def test_spis_of_two_conferences_are_independent() -> None:
    a = Conference(conference("a"))
    b = Conference(conference("b"))
    ka, kb = a.key_for(AESKW128, 0.0), b.key_for(AESKW128, 0.0)
    assert ka.key != kb.key


# --- members and D22 hooks -----------------------------------------------------------------


def test_members_join_leave_and_last_leave_retires_the_key() -> None:
    conf = Conference(conference())
    key = conf.key_for(AESKW256, now=0.0)
    m1, m2 = member(), member(fp=FP_B)
    conf.join(m1, now=0.0)
    conf.join(m2, now=0.0)
    assert list(conf.members) == [m1.association_id, m2.association_id]
    assert conf.leave(m1.association_id, now=1.0) is m1
    assert conf.current is key  # still members
    assert conf.leave(uuid.uuid4(), now=1.0) is None
    assert conf.leave(m2.association_id, now=2.0) is m2
    assert conf.current is None
    assert conf.cipher is None
    # the next member may start the conference with the other cipher
    assert conf.accepts_cipher(AESKW128)


def test_member_bound() -> None:
    conf = Conference(conference(), max_members=2)
    m1, m2 = member(), member()
    conf.join(m1, 0.0)
    conf.join(m2, 0.0)
    conf.join(m1, 0.0)  # re-joining the same association is not a new member
    with pytest.raises(KeyingError, match="full"):
        conf.join(member(), 0.0)


def test_rekey_request_window() -> None:
    conf = Conference(conference(rekey_window=0.5))
    conf.key_for(AESKW128, now=0.0)
    assert not conf.needs_rekey(10.0)
    conf.request_rekey(now=1.0)
    conf.request_rekey(now=1.3)  # coalesced: the window runs from the first request
    assert not conf.needs_rekey(1.4)
    assert conf.needs_rekey(1.5)
    conf.rekey(now=1.5)
    assert conf.rekey_pending_since is None
    assert not conf.needs_rekey(5.0)


def test_state_finds_members() -> None:
    state = KeyingState([conference("a"), conference("b")])
    m = member()
    state.conferences["b"].join(m, 0.0)
    found = state.find_member(m.association_id)
    assert found is not None and found[0] is state.conferences["b"] and found[1] is m
    assert state.find_member(uuid.uuid4()) is None


def test_key_digest_is_short_and_one_way() -> None:
    digest = key_digest(b"\x01" * 16, b"\x02" * 12)
    assert digest == hashlib.sha256(b"\x01" * 16 + b"\x02" * 12).hexdigest()[:16]
    assert len(digest) == 16
    assert key_digest(b"\x01" * 16, b"\x02" * 12) != key_digest(b"\x01" * 16, b"\x03" * 12)


def test_spi_is_never_reused_in_one_process() -> None:
    conf = Conference(conference())
    conf.key_for(AESKW128, now=0.0)
    conf.keys_issued = 1 << 16  # as if 65536 keys had been made
    with pytest.raises(KeyingError, match="SPI space exhausted"):
        conf.rekey(now=1.0)


def test_expired_key_is_replaced_on_next_use() -> None:
    conf = Conference(conference(ekt_ttl=100))
    first = conf.key_for(AESKW128, now=0.0)
    assert conf.key_for(AESKW128, now=99.9) is first
    assert not conf.expired(99.9)
    assert conf.expired(100.0)
    second = conf.key_for(AESKW128, now=100.0)
    assert second is not first and second.spi == (first.spi + 1) & 0xFFFF
    assert second.created == 100.0 and not conf.expired(150.0)
