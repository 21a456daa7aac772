"""perc.keying: roster (D15), profile choice (D18), EKTKey generation (D10), rekey hooks (D22)."""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from perc.config import Fingerprint, KmfConference
from perc.keying import (
    AESKW128,
    AESKW256,
    Conference,
    EktKeyMaterial,
    KeyingError,
    KeyingState,
    Member,
    choose_profile,
    key_digest,
    refresh_lead,
)
from perc.srtp.context import SrtpSession
from perc.srtp.ekt import EktOutcome, EktParameterSet, EktReceiver, EktSender
from perc.wire.ekt import split_ekt_field

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
    # D31: the first request after a quiet period is due at once (leading edge) ...
    conf.request_rekey(now=1.0)
    assert conf.rekey_due() == 1.0 and conf.needs_rekey(1.0)
    conf.rekey(now=1.0)
    # ... and requests inside the window it opened wait for its end, coalesced (not sliding).
    conf.request_rekey(now=1.1)
    conf.request_rekey(now=1.3)
    assert conf.rekey_due() == 1.5
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


def test_spi_wraps_modulo_2_16() -> None:
    conf = Conference(conference())
    conf._next_spi = 0xFFFE
    conf.key_for(AESKW128, now=0.0)
    assert [conf.rekey(now=float(i)).spi for i in range(1, 4)] == [0xFFFF, 0, 1]


def test_expired_key_is_replaced_on_next_use() -> None:
    conf = Conference(conference(ekt_ttl=100))
    first = conf.key_for(AESKW128, now=0.0)
    assert conf.key_for(AESKW128, now=99.9) is first
    assert not conf.expired(99.9)
    assert conf.expired(100.0)
    second = conf.key_for(AESKW128, now=100.0)
    assert second is not first and second.spi == (first.spi + 1) & 0xFFFF
    assert second.created == 100.0 and not conf.expired(150.0)


# --- rekey policy (D22) --------------------------------------------------------------------


def joined(conf: Conference, now: float, fp: str = FP_A) -> tuple[Member, EktKeyMaterial | None]:
    m = member(fp=fp)
    return m, conf.join(m, now)


def test_first_member_gets_a_fresh_key_at_once() -> None:
    conf = Conference(conference())
    m, key = joined(conf, 0.0)
    assert key is not None and key is conf.current and m.spi == key.spi
    assert conf.pending is None and conf.rekey_due() is None
    assert conf.next_deadline() == key.created + key.ttl - refresh_lead(key.ttl)


def test_join_rekey_joiner_waits_and_everyone_ends_on_the_new_key() -> None:
    conf = Conference(conference(rekey_window=0.5))
    a, first = joined(conf, 0.0)
    assert first is not None
    b, key_b = joined(conf, 10.0, FP_B)
    # The joiner is never sent the key the others used before it joined.
    assert key_b is None and b.spi is None and conf.waiting() == [b]
    pending = conf.pending
    assert pending is not None and pending.spi == (first.spi + 1) & 0xFFFF
    assert conf.current is first  # the others keep it until the rekey fires
    # D31: after a quiet period the join's rekey is due at once (the engine's next timer).
    assert conf.rekey_due() == 10.0 and conf.next_deadline() == 10.0
    rekey = conf.poll(10.0)
    assert rekey is not None
    assert rekey.key.spi == pending.spi and rekey.key.key == pending.key
    assert rekey.key.created == 10.0  # its TTL runs from when it is handed out
    assert rekey.previous is first and rekey.reason == "join" and rekey.joins == 1
    assert set(rekey.members) == {a, b}
    assert a.spi == b.spi == rekey.key.spi and conf.current is rekey.key
    assert conf.pending is None and conf.waiting() == []
    assert conf.poll(11.0) is None


def test_a_single_join_after_a_quiet_period_rekeys_at_once() -> None:
    """D31: the joiner's first key is made for its join and due the moment it joins."""
    conf = Conference(conference(rekey_window=0.5))
    a, first = joined(conf, 0.0)
    b, key_b = joined(conf, 0.2, FP_B)  # the first key was no rekey: nothing to wait for
    assert key_b is None and conf.rekey_due() == 0.2
    rekey = conf.poll(0.2)
    assert rekey is not None and set(rekey.members) == {a, b}
    assert first is not None and rekey.key.spi != first.spi
    assert b.spi == rekey.key.spi  # never first.spi: the joiner never held the old key


@pytest.mark.parametrize("n", [2, 5, 20])
def test_a_burst_of_joins_makes_one_immediate_and_one_batched_rekey(n: int) -> None:
    """D31: N joins inside one window: the first rekeys at once, the rest share one rekey at
    the end of the window that rekey opened; no joiner ever gets a key used before it."""
    conf = Conference(conference(rekey_window=0.5))
    a, first = joined(conf, 0.0)
    assert first is not None
    held_before: dict[int, set[int]] = {}  # joiner index -> SPIs in use when it joined
    in_use = {first.spi}
    joiners = []
    rekeys = []
    for i in range(n):
        t = 10.0 + 0.01 * i
        m, key = joined(conf, t, f"{FP_B[:-2]}{i:02x}")
        assert key is None  # every joiner waits for a key made after it joined
        held_before[i] = set(in_use)
        joiners.append(m)
        # leading edge for the first, then batched to the end of the window it opened
        assert conf.rekey_due() == (t if i == 0 else 10.5)
        if (r := conf.poll(t)) is not None:  # the engine's next timer, at once
            rekeys.append(r)
            in_use.add(r.key.spi)
    assert conf.poll(10.49) is None
    batched = conf.poll(10.5)
    if n > 1:
        assert batched is not None
        rekeys.append(batched)
    assert len(rekeys) == (2 if n > 1 else 1)
    assert rekeys[0].joins == 1 and rekeys[0].key.created == 10.0
    if n > 1:
        assert rekeys[1].joins == n - 1 and rekeys[1].reason == "join"
    for i, m in enumerate(joiners):
        assert m.spi is not None and m.spi not in held_before[i]
    assert {m.spi for m in [a, *joiners]} == {rekeys[-1].key.spi}
    assert conf.poll(20.0) is None


def test_a_leave_after_a_quiet_period_rekeys_at_once() -> None:
    """D31: the leaver is locked out at once: the new key is due when it leaves, and it is
    not among the members the new key goes to."""
    conf = Conference(conference(rekey_window=0.5, rekey_on_join=False))
    a, first = joined(conf, 0.0)
    b, _ = joined(conf, 0.0, FP_B)
    c, _ = joined(conf, 0.0, FP_C)
    assert conf.leave(b.association_id, 7.0) is b
    assert conf.rekey_due() == 7.0
    rekey = conf.poll(7.0)
    assert rekey is not None and rekey.reason == "leave"
    assert set(rekey.members) == {a, c} and b not in rekey.members
    assert first is not None and rekey.key.spi != first.spi
    # A second leave inside the window is batched to its end.
    assert conf.leave(c.association_id, 7.1) is c
    assert conf.rekey_due() == 7.5 and conf.poll(7.4) is None
    again = conf.poll(7.5)
    assert again is not None and set(again.members) == {a}


def test_joins_and_leaves_in_one_window_make_one_rekey() -> None:
    conf = Conference(conference(rekey_window=0.5))
    a, _ = joined(conf, 0.0)
    b, _ = joined(conf, 0.1)
    conf.poll(0.1)  # D31 leading edge: b's join rekeys at once (key 2)
    c, _ = joined(conf, 0.2)
    assert conf.rekey_due() == 0.6  # inside the window key 2 opened
    conf.poll(0.6)  # everyone on key 3
    assert conf.keys_issued == 3
    d, _ = joined(conf, 5.0)
    conf.poll(5.0)  # quiet period over: at once (key 4); the window now runs to 5.5
    e, _ = joined(conf, 5.2)
    conf.leave(b.association_id, 5.3)
    conf.leave(e.association_id, 5.45)  # was waiting: held no key, asks for nothing more
    # Not sliding: the window runs from the last rekey (a stream of joins cannot postpone a
    # leave's rekey).
    assert conf.rekey_due() == 5.5
    assert conf.keys_issued == 5  # one key reserved for the rest of the window
    rekey = conf.poll(5.5)
    assert rekey is not None
    assert rekey.reason == "join+leave" and (rekey.joins, rekey.leaves) == (1, 1)
    assert set(rekey.members) == {a, c, d}
    assert conf.keys_issued == 5


@pytest.mark.parametrize("on", [True, False])
def test_rekey_on_join_switch(on: bool) -> None:
    conf = Conference(conference(rekey_on_join=on))
    _, first = joined(conf, 0.0)
    b, key = joined(conf, 1.0, FP_B)
    if on:
        assert key is None and conf.pending is not None
    else:
        assert key is first and b.spi == first.spi  # type: ignore[union-attr]
        assert conf.pending is None and conf.next_deadline() != 1.5


@pytest.mark.parametrize("on", [True, False])
def test_rekey_on_leave_switch(on: bool) -> None:
    conf = Conference(conference(rekey_on_join=False, rekey_on_leave=on))
    a, first = joined(conf, 0.0)
    b, _ = joined(conf, 0.0, FP_B)
    assert conf.leave(a.association_id, 2.0) is a
    if on:
        rekey = conf.poll(2.5)
        assert rekey is not None and rekey.reason == "leave" and rekey.leaves == 1
        assert rekey.members == (b,)  # the leaver is not sent the new key
        assert rekey.key.spi != first.spi  # type: ignore[union-attr]
    else:
        assert conf.pending is None and conf.poll(2.5) is None
        assert conf.current is first


def test_joiner_waits_for_a_pending_leave_rekey_even_without_join_rekeys() -> None:
    """It must never hold the key the leaver holds."""
    conf = Conference(conference(rekey_on_join=False))
    a, first = joined(conf, 0.0)
    b, _ = joined(conf, 0.0, FP_B)
    conf.leave(a.association_id, 1.0)
    c, key = joined(conf, 1.2)
    assert key is None and c.spi is None
    rekey = conf.poll(1.5)
    assert rekey is not None and rekey.reason == "leave" and set(rekey.members) == {b, c}
    assert c.spi == rekey.key.spi != first.spi  # type: ignore[union-attr]


def test_last_leave_cancels_the_pending_rekey() -> None:
    conf = Conference(conference())
    a, _ = joined(conf, 0.0)
    b, _ = joined(conf, 0.1)
    conf.leave(a.association_id, 0.2)
    conf.leave(b.association_id, 0.3)
    assert conf.current is None and conf.pending is None
    assert conf.next_deadline() is None and conf.poll(5.0) is None
    # the next member starts afresh, with a never-used SPI
    _, key = joined(conf, 6.0)
    assert key is not None and conf.keys_issued == 3


def test_zero_window_rekeys_at_once() -> None:
    conf = Conference(conference(rekey_window=0.0))
    joined(conf, 0.0)
    _, key = joined(conf, 3.0)
    assert key is None and conf.needs_rekey(3.0)
    assert conf.poll(3.0) is not None


def test_ttl_refresh_for_a_live_conference() -> None:
    conf = Conference(conference(ekt_ttl=100))
    a, first = joined(conf, 0.0)
    assert first is not None and conf.refresh_at() == 90.0
    assert conf.poll(89.9) is None
    rekey = conf.poll(90.0)
    assert rekey is not None and rekey.reason == "ttl" and rekey.members == (a,)
    assert rekey.key.created == 90.0 and conf.refresh_at() == 180.0
    assert not conf.expired(150.0)
    # long TTLs: refreshed at most 300 s early
    assert refresh_lead(86400) == 300.0 and refresh_lead(100) == 10.0


def test_joiner_finding_an_expired_key_waits_for_an_immediate_rekey() -> None:
    conf = Conference(conference(ekt_ttl=100, rekey_on_join=False))
    a, _ = joined(conf, 0.0)
    b, key = joined(conf, 100.0, FP_B)  # the refresh timer did not run (e.g. a stalled loop)
    assert key is None and conf.rekey_due() == 100.0
    rekey = conf.poll(100.0)
    assert rekey is not None and rekey.reason == "ttl" and set(rekey.members) == {a, b}


def test_manual_rekey_fires_a_pending_one_with_its_key() -> None:
    conf = Conference(conference())
    joined(conf, 0.0)
    joined(conf, 1.0)
    pending = conf.pending
    key = conf.rekey(1.2)
    assert pending is not None and key.spi == pending.spi and conf.pending is None
    assert conf.keys_issued == 2


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(["join", "leave", "wait"]), st.integers(0, 7)),
        max_size=40,
    ),
    st.booleans(),
    st.booleans(),
    st.sampled_from([0.0, 0.5, 2.0]),
)
def test_policy_properties(
    ops: list[tuple[str, int]], on_join: bool, on_leave: bool, window: float
) -> None:
    """Whatever the sequence: SPIs are never reused; after a rekey fires every member is on
    the newest key; with both switches on, a joiner never gets a key anyone held before it
    joined and a leaver never gets a key made after it left; a rekey fires within the window."""
    conf = Conference(
        conference(rekey_on_join=on_join, rekey_on_leave=on_leave, rekey_window=window)
    )
    now = 0.0
    held: dict[int, set[uuid.UUID]] = {}  # spi -> members that were handed it
    spis: list[int] = []
    left_at: dict[uuid.UUID, float] = {}
    slots: dict[int, Member] = {}

    def hand(key: EktKeyMaterial, to: Sequence[Member]) -> None:
        if key.spi not in held:
            assert key.spi not in spis
            spis.append(key.spi)
            held[key.spi] = set()
        for m in to:
            assert m.association_id not in left_at
            held[key.spi].add(m.association_id)

    def run_timer(until: float) -> None:
        while (deadline := conf.next_deadline()) is not None and deadline <= until:
            rekey = conf.poll(deadline)
            if rekey is not None:
                assert rekey.key.created == deadline
                hand(rekey.key, rekey.members)
                assert all(m.spi == rekey.key.spi for m in conf.members.values())

    for op, slot in ops:
        if op == "wait":
            now += 0.3
            run_timer(now)
            continue
        if op == "join" and slot not in slots:
            m = member(fp=FP_A)
            keyed_before = {aid for s in held.values() for aid in s} & set(conf.members)
            key = conf.join(m, now)
            slots[slot] = m
            if key is not None:
                if on_join and keyed_before:
                    raise AssertionError("joiner got the key of earlier members")
                if on_leave:  # never the key a leaver holds
                    assert not held.get(key.spi, set()) & set(left_at)
                hand(key, [m])
        elif op == "leave" and slot in slots:
            m = slots.pop(slot)
            conf.leave(m.association_id, now)
            left_at[m.association_id] = now
        due = conf.rekey_due()
        if due is not None:
            assert due <= now + window
    run_timer(now + 10 * window + 1.0)
    # (hand() checked that no key reached anyone after they left)
    if conf.members:
        assert conf.current is not None
        assert all(m.spi == conf.current.spi for m in conf.members.values())


def test_a_join_whose_key_cannot_be_made_leaves_no_trace(monkeypatch: pytest.MonkeyPatch) -> None:
    conf = Conference(conference())
    joined(conf, 0.0)

    def refuse(cipher: int, now: float) -> EktKeyMaterial:
        raise KeyingError("refused for the test")  # SPIs never run out (D28): simulate it

    monkeypatch.setattr(conf, "_make_key", refuse)
    m = member(fp=FP_B)
    with pytest.raises(KeyingError, match="refused for the test"):
        conf.join(m, 1.0)
    assert m.association_id not in conf.members and conf.pending is None


# --- SPIs wrap (D28) -----------------------------------------------------------------------


class _Speaker:
    """One sending endpoint: an EKT sender and its inner (E2E) SRTP context."""

    def __init__(self, ssrc: int, key: EktKeyMaterial) -> None:
        self.ssrc = ssrc
        self.seq = 0
        self.ekt: EktSender | None = None
        self.master = os.urandom(16)
        self.rekey(key)

    def rekey(self, key: EktKeyMaterial) -> None:
        # RFC 8871 §4.5.2: a new E2E master key for every new EKTKey.
        params = _params(key)
        self.master = os.urandom(16)
        if self.ekt is None:
            self.ekt = EktSender(params, self.master)
        else:
            self.ekt.change_key(self.master, params)
        self.inner = SrtpSession(self.master, key.salt)

    def packet(self, now: float) -> bytes:
        assert self.ekt is not None
        self.seq += 1
        header = bytes([0x80, 96]) + self.seq.to_bytes(2, "big") + bytes(4)
        header += self.ssrc.to_bytes(4, "big")
        body = self.inner.protect_rtp(header + b"media %d" % self.seq)
        return body + self.ekt.field(self.ssrc, 0, now, keyframe=True)


def _params(key: EktKeyMaterial) -> EktParameterSet:
    return EktParameterSet.from_ekt_key(
        key.key, key.salt, key.spi, key.ttl, key.created, cipher=key.cipher
    )


def _hears(rx: EktReceiver, speaker: _Speaker, now: float) -> EktOutcome:
    """The receiver processes one packet of ``speaker`` and verifies it (E2E layer)."""
    packet = speaker.packet(now)
    n, field = split_ekt_field(packet)
    outcome = rx.process(field, speaker.ssrc, now)
    newest = rx.keys(speaker.ssrc)[0]
    assert newest.session.unprotect_rtp(packet[:n]).endswith(b"media %d" % speaker.seq)
    return outcome


def test_spis_wrap_over_70000_keys_and_receivers_follow() -> None:
    """One member cycling join/leave burns two keys a cycle; 70,000 keys in one conference:
    every join still works, an SPI comes back only after 65,536 newer keys (D28 asks for more
    than 32,768), and a receiver that holds a stream's epoch under an SPI from 65,536 keys
    ago takes the new key under that SPI (D8) and verifies its media."""
    conf = Conference(conference(rekey_window=0.0))
    rx = EktReceiver(SrtpSession, master_key_length=16)
    stayer = member()
    assert conf.join(stayer, 0.0) is not None
    keys: list[EktKeyMaterial] = []
    last_index: dict[int, int] = {}

    def issued(key: EktKeyMaterial) -> None:
        previous = last_index.get(key.spi)
        if previous is not None:
            assert len(keys) - previous >= 1 << 16  # never within 32,768 (in fact 65,536)
        last_index[key.spi] = len(keys)
        keys.append(key)
        rx.add_parameter_set(_params(key))

    assert conf.current is not None
    issued(conf.current)
    # Two senders: one talks every 4,096 keys and around the wrap, one only at the first key
    # and at the key that reuses its SPI (the receiver still holds its epoch from then).
    chatty, quiet = _Speaker(0x1111, keys[0]), _Speaker(0x2222, keys[0])
    assert _hears(rx, chatty, 0.0) is EktOutcome.NEW_KEY
    assert _hears(rx, quiet, 0.0) is EktOutcome.NEW_KEY
    now = 0.0
    while len(keys) < 70_000:
        now += 0.001
        cycler = member(fp=FP_B)
        assert conf.join(cycler, now) is None  # waits for the join's rekey
        rekey = conf.poll(now)
        assert rekey is not None and cycler.spi == rekey.key.spi  # the join worked
        issued(rekey.key)
        conf.leave(cycler.association_id, now)
        rekey = conf.poll(now)
        assert rekey is not None
        issued(rekey.key)
        for index in (len(keys) - 2, len(keys) - 1):
            if index % 4096 == 0 or abs(index - (1 << 16)) <= 2:
                chatty.rekey(keys[index])
                assert _hears(rx, chatty, now) is EktOutcome.NEW_KEY
            if index == 1 << 16:
                assert keys[index].spi == keys[0].spi  # the SPI came round
                quiet.rekey(keys[index])
                assert _hears(rx, quiet, now) is EktOutcome.NEW_KEY
                assert _hears(rx, quiet, now) is EktOutcome.CACHED
    assert conf.keys_issued == len(keys) >= 70_000
    assert len(conf.members) == 1 and stayer.spi == keys[-1].spi
    assert rx.stats.ignored_epoch == 0 and rx.stats.unknown_spi == 0
