"""The KMF's conference state, sans-IO: roster, members, the EKTKey of each conference.

Theory of operation
-------------------
The Key Distributor decides who may join which conference (RFC 8871 §3.2.2, D15) and holds
one group key per conference, the EKTKey (RFC 8870 §5.2.2, D10). This module is that state
and nothing else: no DTLS, no trio, no clock (every method takes ``now``).

* **Roster** (:meth:`KeyingState.admit`): an endpoint is identified by its certificate
  fingerprint (D20) and the tls-id it sent in ``external_session_id`` (RFC 8844, RFC 9185
  §5.4). Conferences are tried in configuration order; the first one whose ``participants``
  lists the fingerprint admits it, unless that conference names an expected tls-id for the
  fingerprint (``tls_ids``) and the endpoint sent another (or none). A fingerprint on no roster
  is refused (the caller answers ``access_denied``, D15).
* **Profile** (:func:`choose_profile`, D18): the first profile in the KMF's preference order
  that the endpoint offered and the carrying MDD listed in its ``SupportedProfiles``.
* **EKTKey** (:class:`EktKeyMaterial`, D10): a fresh random key as long as the EKT cipher's key
  (AESKW128 -> 16 bytes, AESKW256 -> 32; RFC 8870 §4.4), a fresh random 12-byte SRTP master
  salt (RFC 7714 §12), a new SPI, and the conference's ``ekt_ttl``. Keys come from
  ``os.urandom``.
* **One EKT cipher per conference.** Every participant must unwrap every other participant's
  Full EKT tags, so all of them need the same (EKTKey, cipher) under one SPI (RFC 8870 §4.1:
  the SPI names key, salt and cipher). Keeping one key per (conference, cipher) would split
  the conference into groups that cannot read each other, so instead the conference's cipher
  is fixed by the first member (the KMF's DTLS server prefers AESKW256, which satisfies RFC
  8870 §6's key-length rule with every profile and cipher suite; perc endpoints offer both), and
  an endpoint that negotiated another cipher is refused (``handshake_failure``). When the last
  member leaves, the key is retired: the next member starts a new key (and may set the cipher).
* **SPI**: per conference, counting up from a random start (mod 2^16), so a new key never
  reuses the SPI of the key it replaces nor of the recent ones receivers may still hold, and a
  restarted KMF is unlikely to start where its predecessor was; the 65537th key of one
  conference in one process is refused rather than reuse an SPI (D8 would make receivers
  ignore it).
* **TTL**: a key that reached its ``ekt_ttl`` is replaced on the next join (``key_for``);
  refreshing it before the TTL in a conference nobody joins is a timer of the rekey policy.
* **Rekeying** (D22, issue 5): :meth:`Conference.rekey` makes and installs a new key for the
  conference's current cipher; :attr:`Conference.members` lists whom to send it to. The
  policy (rekey on join/leave, the coalescing window from ``rekey_window``) is the caller's;
  :attr:`Conference.rekey_pending_since` and :meth:`Conference.needs_rekey` are the hooks it
  can use without reshaping this state.

API::

    KeyingState(conferences: Sequence[KmfConference], *, max_members=65536)
    state.admit(fingerprint, tls_id: bytes | None) -> Admission   # .conference or .reason
    state.conferences: dict[str, Conference]
    Conference: .id, .config, .members: dict[UUID, Member], .current: EktKeyMaterial | None,
        .cipher, key_for(cipher, now) -> EktKeyMaterial, rekey(now) -> EktKeyMaterial,
        join(Member, now) -> None, leave(association_id, now) -> Member | None
    Member(association_id, fingerprint, tls_id, tunnel, profile, ekt_cipher, joined)
    EktKeyMaterial(key, salt, spi, ttl, cipher, created)      # repr hides key and salt
    choose_profile(preference, offered, mdd_profiles) -> int | None
    EKT_KEY_LENGTHS = {1: 16, 2: 32}

Errors: :class:`KeyingError` for local misuse (an unknown EKT cipher, a full conference).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import uuid
from collections.abc import Iterable, Sequence

import attrs

from perc.config import Fingerprint, KmfConference

__all__ = [
    "AESKW128",
    "AESKW256",
    "EKT_KEY_LENGTHS",
    "SALT_LENGTH",
    "Admission",
    "Conference",
    "EktKeyMaterial",
    "KeyingError",
    "KeyingState",
    "Member",
    "choose_profile",
    "key_digest",
]

#: EKT cipher code points on the wire (D6) and their key lengths (RFC 8870 §4.4).
AESKW128 = 1
AESKW256 = 2
EKT_KEY_LENGTHS = {AESKW128: 16, AESKW256: 32}
#: D10: the EKTKey's srtp_master_salt is 12 bytes (the GCM master salt, RFC 7714 §12).
SALT_LENGTH = 12


class KeyingError(Exception):
    """Local misuse of the keying state (an unknown cipher, a conference at its bound)."""


def key_digest(*parts: bytes) -> str:
    """A short one-way digest of key material for logs: tests and operators can check that
    two processes hold the same keys without the keys being printed.

    ``sha256(b"".join(parts)).hexdigest()[:16]``; the MDD logs it for its MediaKeys (client
    key, server key, client salt, server salt), the KMF for each EKTKey (key, salt).
    """
    return hashlib.sha256(b"".join(parts)).hexdigest()[:16]


def choose_profile(
    preference: Sequence[int], offered: Iterable[int], mdd_profiles: Iterable[int]
) -> int | None:
    """D18: the first profile of ``preference`` that both the endpoint and the MDD support."""
    offered_set = set(offered)
    mdd_set = set(mdd_profiles)
    return next((p for p in preference if p in offered_set and p in mdd_set), None)


@attrs.frozen(repr=False)
class EktKeyMaterial:
    """One EKTKey (RFC 8870 §5.2.2) as the KMF hands it out."""

    key: bytes
    salt: bytes
    spi: int
    ttl: int
    cipher: int
    created: float

    def __repr__(self) -> str:  # never print key material
        return f"EktKeyMaterial(spi={self.spi}, cipher={self.cipher}, ttl={self.ttl})"

    def same_key(self, key: bytes, salt: bytes, spi: int) -> bool:
        """Constant-time check that an endpoint holds this key (tests, diagnostics)."""
        return (
            spi == self.spi
            and hmac.compare_digest(key, self.key)
            and hmac.compare_digest(salt, self.salt)
        )


@attrs.define(eq=False)
class Member:
    """One joined endpoint (its DTLS association completed and was admitted)."""

    association_id: uuid.UUID
    fingerprint: str
    tls_id: bytes | None
    #: the tunnel (MDD connection) that carried its Finished (MediaKeys went there); opaque here
    tunnel: object
    profile: int
    ekt_cipher: int
    joined: float


@attrs.frozen
class Admission:
    """The roster's answer: a conference, or why not."""

    conference: Conference | None
    reason: str = ""


class Conference:
    """One conference: its configuration, members and current EKTKey."""

    def __init__(self, config: KmfConference, *, max_members: int = 65536) -> None:
        self.id = config.id
        self.config = config
        self.max_members = max_members
        self.members: dict[uuid.UUID, Member] = {}
        #: the EKTKey members hold now (None before the first join and after the last leave)
        self.current: EktKeyMaterial | None = None
        #: keys issued so far (each new key has a new SPI)
        self.keys_issued = 0
        #: when a join/leave asked for a rekey that has not happened yet (D22 coalescing hook)
        self.rekey_pending_since: float | None = None
        self._next_spi = int.from_bytes(os.urandom(2), "big")
        self._participants = frozenset(config.participants)

    def __repr__(self) -> str:
        return f"<Conference {self.id} members={len(self.members)} key={self.current!r}>"

    @property
    def cipher(self) -> int | None:
        """The conference's EKT cipher while it has a key (see the module docstring)."""
        return self.current.cipher if self.current is not None else None

    def lists(self, fingerprint: str) -> bool:
        return fingerprint in self._participants

    def expected_tls_id(self, fingerprint: str) -> str | None:
        return self.config.tls_ids.get(Fingerprint(fingerprint))

    def _new_key(self, cipher: int, now: float) -> EktKeyMaterial:
        length = EKT_KEY_LENGTHS.get(cipher)
        if length is None:
            raise KeyingError(f"unknown EKT cipher {cipher}")
        if self.keys_issued >= 1 << 16:
            # Never reuse an SPI with another key in one process (receivers would ignore the
            # new tags, D8); 65536 keys for one conference means a runaway rekey loop.
            raise KeyingError(f"conference {self.id}: SPI space exhausted")
        spi = self._next_spi
        self._next_spi = (spi + 1) & 0xFFFF
        self.keys_issued += 1
        self.rekey_pending_since = None
        self.current = EktKeyMaterial(
            key=os.urandom(length),
            salt=os.urandom(SALT_LENGTH),
            spi=spi,
            ttl=self.config.ekt_ttl,
            cipher=cipher,
            created=now,
        )
        return self.current

    def accepts_cipher(self, cipher: int | None) -> bool:
        """Can an endpoint that negotiated ``cipher`` join now (one cipher per conference)?"""
        if cipher not in EKT_KEY_LENGTHS:
            return False
        return self.current is None or self.current.cipher == cipher

    def key_for(self, cipher: int, now: float) -> EktKeyMaterial:
        """The current key, made on first use with ``cipher``; KeyingError on a mismatch.

        A key past its ``ekt_ttl`` must not be used any more (RFC 8870 §5.2.2), so an expired
        one is replaced here (the caller sends the new one to the other members too; compare
        :attr:`keys_issued` before and after).
        """
        if self.current is None:
            return self._new_key(cipher, now)
        if self.current.cipher != cipher:
            raise KeyingError(
                f"conference {self.id} uses EKT cipher {self.current.cipher}, not {cipher}"
            )
        if self.expired(now):
            return self._new_key(cipher, now)
        return self.current

    def expired(self, now: float) -> bool:
        """True when the current key has reached its TTL (a refresh is due, D10)."""
        key = self.current
        return key is not None and now >= key.created + key.ttl

    def rekey(self, now: float) -> EktKeyMaterial:
        """A new EKTKey (fresh key and salt, new SPI) for the conference's cipher (D22).

        The caller sends it to every member. Without a current key there is nobody to rekey:
        KeyingError.
        """
        if self.current is None:
            raise KeyingError(f"conference {self.id} has no key to replace")
        return self._new_key(self.current.cipher, now)

    def request_rekey(self, now: float) -> None:
        """Note that a join or leave asks for a rekey (the first request of a window counts)."""
        if self.rekey_pending_since is None:
            self.rekey_pending_since = now

    def needs_rekey(self, now: float) -> bool:
        """True once a requested rekey has waited ``rekey_window`` (D22 coalescing)."""
        since = self.rekey_pending_since
        return since is not None and now - since >= self.config.rekey_window

    def join(self, member: Member, now: float) -> None:
        if member.association_id not in self.members and len(self.members) >= self.max_members:
            raise KeyingError(f"conference {self.id} is full ({self.max_members} members)")
        self.members[member.association_id] = member

    def leave(self, association_id: uuid.UUID, now: float) -> Member | None:
        """Remove a member; the last one to leave retires the key. Returns the member."""
        member = self.members.pop(association_id, None)
        if member is not None and not self.members:
            self.current = None
            self.rekey_pending_since = None
        return member


class KeyingState:
    """All conferences of one KMF and the roster that maps endpoints to them (D15)."""

    def __init__(self, conferences: Sequence[KmfConference], *, max_members: int = 65536) -> None:
        self.conferences: dict[str, Conference] = {
            c.id: Conference(c, max_members=max_members) for c in conferences
        }
        # fingerprint -> conferences listing it, in configuration order
        self._roster: dict[str, list[Conference]] = {}
        for conf in self.conferences.values():
            for fp in conf.config.participants:
                self._roster.setdefault(fp, []).append(conf)

    def admit(self, fingerprint: str, tls_id: bytes | None) -> Admission:
        """Which conference an endpoint may join (D15, RFC 9185 §5.4), or why none."""
        candidates = self._roster.get(fingerprint)
        if not candidates:
            return Admission(None, "fingerprint on no roster")
        for conf in candidates:
            expected = conf.expected_tls_id(fingerprint)
            if expected is None:
                return Admission(conf)
            if tls_id is not None and hmac.compare_digest(tls_id, expected.encode("ascii")):
                return Admission(conf)
        return Admission(None, "tls-id does not match the roster")

    def find_member(self, association_id: uuid.UUID) -> tuple[Conference, Member] | None:
        for conf in self.conferences.values():
            member = conf.members.get(association_id)
            if member is not None:
                return conf, member
        return None
