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
* **SPI** (D28): per conference, counting up by one from a random start, modulo 2^16,
  forever. An SPI comes round again only after 65,536 newer keys (D28 asks for at least
  32,768), so a new key never reuses the SPI of the key it replaces nor of any key a member
  may still hold: an endpoint keeps a handful of parameter sets and replaces the one cached
  under an SPI when a new EKTKey names it (:mod:`perc.srtp.ekt`). A conference never runs out
  of SPIs, so no join is ever refused for lack of one. Without a state the counter starts at
  random, so a restarted KMF is merely unlikely to begin where its predecessor was; with one it
  resumes after it (below).
* **Durable SPIs** (D28): with a state file the SPI counter is reserved in blocks, like a
  sequence ceiling: :attr:`Conference.spi_ceiling` is the exclusive bound written to disk,
  :meth:`Conference.spi_reservation_wanted` asks for the next block (``counter + block``) once
  half of the current one is used, and no key is handed out while a key made so far lies at
  or past the ceiling (:meth:`Conference.spis_covered`): a pending rekey then waits (its
  deadline is None), and a first member's key is held as a pending "first" key, until
  :meth:`Conference.spis_reserved` reports the write. A restarted KMF resumes at the stored
  ceiling, so every SPI it hands out is newer than every SPI sent before the restart.
* **TTL** (D10, RFC 8870 §5.2.2): a live conference's key is replaced
  :func:`refresh_lead` (a tenth of ``ekt_ttl``, at most 300 s) before it expires (reason
  ``ttl``, :meth:`Conference.poll`); a joiner that finds an expired key anyway waits for an
  immediate ``ttl`` rekey.

Rekey policy (D22, RFC 8871 §4.5.2, RFC 8870 §4.5)
--------------------------------------------------
Goal: a member that left cannot read media sent after it left, and a joiner cannot read media
sent before it joined. An endpoint's E2E master key is announced only in Full EKT tags under
the EKTKey it holds, and every endpoint makes a new E2E key on every new EKTKey; so the rule
is about EKTKeys: *a joiner never receives a key that anyone used before it joined, and after
a leave nobody keeps using a key the leaver holds.*

* **Leave** (``rekey_on_leave``, default on): an endpoint's DTLS close_notify or fatal alert,
  a handshake or EKTKey-retransmission timeout, the MDD's ``EndpointDisconnect`` (D3), or a
  restart on the same association (a new ClientHello) all end the membership
  (:meth:`Conference.leave`). If the leaver held a key and members remain, a rekey is
  requested. The leaver is no longer a member, so it never gets the new key. A member that
  leaves while still waiting for its first key held nothing: no rekey on its account. The last
  member to leave retires the key (and any pending rekey); the next joiner starts afresh.
* **Join** (``rekey_on_join``, default on): the first member of an empty conference gets a
  fresh key at once (there is no earlier media). A joiner of a conference whose members hold
  a key requests a rekey and **waits for it**: its first EKTKey is the new key, sent to it
  and to every existing member in the same moment when the rekey fires. It is never sent the
  current key (with it, it could unwrap the Full tags of the current E2E keys and read what
  was sent before it joined). The other ordering, the current key at once and the new one
  later, would give exactly that window, so it is not used. After a quiet period the rekey
  is due at once (D31, below), so the joiner gets the key made for its join as soon as its
  handshake completes; only a join inside the window of a recent rekey waits, at most
  ``rekey_window`` (the MDD already has its hop-by-hop keys).
  With ``rekey_on_join`` off the joiner gets the current key at once, unless a rekey (from a
  leave) is pending: then it also waits for that one, so it never holds the leaver's key.
* **Coalescing, leading edge** (D31; ``rekey_window``, default 0.05 s): the first request
  reserves the next key (fresh random key and salt, the next SPI) and fixes its deadline:
  *now* after a quiet period (no rekey fired within the last ``rekey_window``), so a lone
  join or leave costs no wait and a leaver is locked out at once; otherwise ``last rekey +
  rekey_window``, the end of the window the last rekey opened. The deadline never slides: a
  stream of joins cannot postpone a leave's rekey, and a burst of N changes costs two rekeys
  (one at once, one batched at the window's end), at most one per window after that. Joins
  and leaves until the deadline share that one key; the reasons are collected for the log
  line (e.g. ``join+leave``). (The first key of a conference is no rekey: it opens no
  window.) When it fires (:meth:`Conference.poll`) the key is installed as
  :attr:`Conference.current` (its TTL counts from then) and goes to every member then
  present (:attr:`Rekey.members`, waiting joiners included): everyone ends on the same,
  newest SPI and nobody is left on a stale key. The engine retransmits it until ACK, and a
  newer EKTKey supersedes an unacknowledged older one (D9, :mod:`perc.dtls`).
* **Ordering at the endpoints** (RFC 8870 §4.3.1, §4.6): an existing member switches to a new
  E2E key announced under the new SPI and keeps encrypting with its old E2E key for 250 ms; a
  member that got the new EKTKey reads both. A joiner cannot read those last 250 ms of
  old-key packets (nor anything it got before its first key): that is the pre-join media it
  must not read, not an E2E failure of the conference.
* **SPIs** are not reused while a member could still hold the earlier key of the same SPI
  (above), so an endpoint can tell an older key from a newer one.

The sans-IO conference is driven by its timer: :meth:`Conference.next_deadline` (the pending
rekey's deadline, else the TTL refresh) and :meth:`Conference.poll` (returns a
:class:`Rekey` to distribute, or None). The KMF's engine keeps these deadlines in its one
timer heap (:mod:`perc.kmf`).

API::

    KeyingState(conferences: Sequence[KmfConference], *, max_members=65536,
                spi_starts: Mapping[str, int] | None = None, durable_spis=False)
    state.admit(fingerprint, tls_id: bytes | None) -> Admission   # .conference or .reason
    state.set_participant(conference_id, fingerprint, listed=True|False)   # D33 roster edits
    state.conferences: dict[str, Conference]
    Conference: .id, .config, .members: dict[UUID, Member], .current, .pending
        (EktKeyMaterial | None), .cipher, .keys_issued, .rekey_pending_since
        join(Member, now) -> EktKeyMaterial | None     # None: first key comes with the rekey
        restore(key, members)                          # a restarted KMF (D29), no rekey
        leave(association_id, now) -> Member | None    # may request a rekey
        next_deadline() -> float | None; poll(now) -> Rekey | None
        request_rekey(now, reason="manual", *, immediate=False); needs_rekey(now) -> bool
        rekey(now) -> EktKeyMaterial                   # at once (manual hook)
        key_for(cipher, now) -> EktKeyMaterial          # low level, no policy
        refresh_at() -> float | None; rekey_due() -> float | None; waiting() -> [Member]
        .spi_counter, .spi_ceiling; spis_covered() -> bool; spis_reserved(ceiling)   # D28
    Rekey(key, previous, reasons, joins, leaves, members); .reason ("join+leave")
    Member(association_id, fingerprint, tls_id, tunnel, profile, ekt_cipher, joined, spi=None)
    EktKeyMaterial(key, salt, spi, ttl, cipher, created)      # repr hides key and salt
        .encode(wall_created) -> bytes; EktKeyMaterial.decode(data, now=, wall_now=)  # D29
    choose_profile(preference, offered, mdd_profiles) -> int | None
    EKT_KEY_LENGTHS = {1: 16, 2: 32}; JOIN, LEAVE, TTL, MANUAL; refresh_lead(ttl)

Errors: :class:`KeyingError` for local misuse (an unknown EKT cipher, a full conference, a
cipher that is not the conference's).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import uuid
from collections.abc import Iterable, Mapping, Sequence

import attrs

from perc.config import Fingerprint, KmfConference

__all__ = [
    "AESKW128",
    "AESKW256",
    "EKT_KEY_LENGTHS",
    "JOIN",
    "LEAVE",
    "MANUAL",
    "REFRESH_LEAD_MAX",
    "RESTART",
    "SALT_LENGTH",
    "TTL",
    "Admission",
    "Conference",
    "EktKeyMaterial",
    "KeyingError",
    "KeyingState",
    "Member",
    "Rekey",
    "choose_profile",
    "key_digest",
    "refresh_lead",
]

#: EKT cipher code points on the wire (D6) and their key lengths (RFC 8870 §4.4).
AESKW128 = 1
AESKW256 = 2
EKT_KEY_LENGTHS = {AESKW128: 16, AESKW256: 32}
#: D10: the EKTKey's srtp_master_salt is 12 bytes (the GCM master salt, RFC 7714 §12).
SALT_LENGTH = 12


class KeyingError(Exception):
    """Local misuse of the keying state (an unknown cipher, a conference at its bound)."""


#: Rekey reasons (D22 and the TTL refresh); the log line names them.
JOIN = "join"
LEAVE = "leave"
TTL = "ttl"
MANUAL = "manual"
#: a restarted KMF resynchronises the members it resumed (D29)
RESTART = "restart"
#: A live conference's key is replaced this long before its ekt_ttl ends, at most (seconds).
REFRESH_LEAD_MAX = 300.0


def refresh_lead(ttl: int) -> float:
    """How long before its TTL a key is refreshed: a tenth of the TTL, at most 300 s, so the
    new key reaches every member (retransmitted on the 1 s doubling timer, D9) while the old
    one is still valid; every endpoint counts the TTL from when it received the key."""
    return min(0.1 * ttl, REFRESH_LEAD_MAX)


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

    def encode(self, wall_created: float) -> bytes:
        """Serialized for the KMF's state (D29; key material: the state seals it).
        ``wall_created`` is the POSIX time the key was made (``created`` is monotonic)."""
        return json.dumps(
            [self.key.hex(), self.salt.hex(), self.spi, self.ttl, self.cipher, wall_created]
        ).encode()

    @classmethod
    def decode(cls, data: bytes, *, now: float, wall_now: float) -> EktKeyMaterial:
        """The key :meth:`encode` wrote, its age carried over to the monotonic ``now``;
        KeyingError if ``data`` is not one."""
        try:
            key_hex, salt_hex, spi, ttl, cipher, wall = json.loads(data)
            key, salt = bytes.fromhex(key_hex), bytes.fromhex(salt_hex)
            age = max(0.0, wall_now - float(wall))
        except (ValueError, TypeError, UnicodeDecodeError) as e:
            raise KeyingError(f"stored EKTKey unusable: {e}") from None
        if (
            len(key) != EKT_KEY_LENGTHS.get(cipher)
            or len(salt) != SALT_LENGTH
            or not isinstance(spi, int)
            or not 0 <= spi < 1 << 16
            or not isinstance(ttl, int)
            or not 0 <= ttl < 1 << 24
        ):
            raise KeyingError("stored EKTKey unusable: bad lengths or ranges")
        return cls(key=key, salt=salt, spi=spi, ttl=ttl, cipher=cipher, created=now - age)

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
    #: SPI of the last EKTKey handed to it; None while it waits for its first (a pending rekey)
    spi: int | None = None


@attrs.frozen
class Rekey:
    """A rekey that fired: the new key, whom to send it to, and why (for the log line)."""

    key: EktKeyMaterial
    #: the key it replaces (None only if the conference had none, which cannot happen here)
    previous: EktKeyMaterial | None
    #: what asked for it, in order of first request: "join", "leave", "ttl", "manual"
    reasons: tuple[str, ...]
    joins: int
    leaves: int
    #: every member at the time it fired (joiners waiting for their first key included)
    members: tuple[Member, ...]

    @property
    def reason(self) -> str:
        return "+".join(self.reasons)


@attrs.frozen
class Admission:
    """The roster's answer: a conference, or why not."""

    conference: Conference | None
    reason: str = ""


class Conference:
    """One conference: its configuration, members, current EKTKey and rekey policy (D22)."""

    def __init__(
        self,
        config: KmfConference,
        *,
        max_members: int = 65536,
        spi_start: int | None = None,
        spi_ceiling: int | None = None,
    ) -> None:
        self.id = config.id
        self.config = config
        self.max_members = max_members
        self.members: dict[uuid.UUID, Member] = {}
        #: the EKTKey members hold now (None before the first join and after the last leave)
        self.current: EktKeyMaterial | None = None
        #: the next key while a rekey is pending (its SPI is reserved; nobody holds it yet)
        self.pending: EktKeyMaterial | None = None
        #: keys issued so far, pending ones included (each new key takes the next SPI)
        self.keys_issued = 0
        #: when the first join/leave of the pending rekey asked for it (D22 coalescing)
        self.rekey_pending_since: float | None = None
        self._rekey_due: float | None = None
        #: when the last rekey fired: the D31 coalescing window runs from it
        self._last_rekey: float | None = None
        self._joins = 0
        self._leaves = 0
        self._reasons: list[str] = []
        #: issue counter of the next key (D28): its SPI is the counter modulo 2^16
        self._next_spi = int.from_bytes(os.urandom(2), "big") if spi_start is None else spi_start
        #: counters below this are durably reserved (None: no state to keep them in)
        self.spi_ceiling = spi_ceiling
        self._participants = frozenset(config.participants)

    def __repr__(self) -> str:
        return f"<Conference {self.id} members={len(self.members)} key={self.current!r}>"

    @property
    def cipher(self) -> int | None:
        """The conference's EKT cipher while it has a key (see the module docstring)."""
        key = self.current or self.pending
        return key.cipher if key is not None else None

    # --- SPI reservation (D28) -----------------------------------------------------------------

    @property
    def spi_counter(self) -> int:
        """The issue counter the next key takes (its SPI is the counter modulo 2^16)."""
        return self._next_spi

    def spis_covered(self) -> bool:
        """Whether every key made so far lies below the durable SPI ceiling (D28).

        A key is handed out only then: a restart resumes at the stored ceiling, so no SPI
        sent before it can come round again before 65,536 newer keys."""
        return self.spi_ceiling is None or self._next_spi <= self.spi_ceiling

    def spi_reservation_wanted(self, block: int) -> int | None:
        """The ceiling to reserve next (``counter + block``) once fewer than ``block // 2``
        reserved SPIs are left, else None. Without a state (no ceiling) never."""
        if self.spi_ceiling is None or self.spi_ceiling - self._next_spi >= block // 2:
            return None
        return self._next_spi + block

    def spis_reserved(self, ceiling: int) -> None:
        """A reservation up to ``ceiling`` (exclusive) is durable; ceilings only grow."""
        if self.spi_ceiling is not None:
            self.spi_ceiling = max(self.spi_ceiling, ceiling)

    def lists(self, fingerprint: str) -> bool:
        return fingerprint in self._participants

    @property
    def participants(self) -> frozenset[str]:
        """The roster: configured fingerprints with run-time edits (D33) applied."""
        return self._participants

    def expected_tls_id(self, fingerprint: str) -> str | None:
        return self.config.tls_ids.get(Fingerprint(fingerprint))

    # --- keys ----------------------------------------------------------------------------------

    def _make_key(self, cipher: int, now: float) -> EktKeyMaterial:
        """Fresh key and salt under the next SPI (reserved now; see SPI in the module doc)."""
        length = EKT_KEY_LENGTHS.get(cipher)
        if length is None:
            raise KeyingError(f"unknown EKT cipher {cipher}")
        counter = self._next_spi
        # D28: wraps modulo 2^16; the same SPI returns after 65,536 newer keys, far beyond the
        # few recent keys any member can still hold.
        spi = counter & 0xFFFF
        self._next_spi = counter + 1
        self.keys_issued += 1
        return EktKeyMaterial(
            key=os.urandom(length),
            salt=os.urandom(SALT_LENGTH),
            spi=spi,
            ttl=self.config.ekt_ttl,
            cipher=cipher,
            created=now,
        )

    def _clear_pending(self) -> None:
        self.pending = None
        self.rekey_pending_since = None
        self._rekey_due = None
        self._joins = self._leaves = 0
        self._reasons = []

    def _new_key(self, cipher: int, now: float) -> EktKeyMaterial:
        """Install a new key at once (a pending rekey is dropped: its SPI stays unused)."""
        key = self._make_key(cipher, now)
        self._clear_pending()
        self.current = key
        return key

    def accepts_cipher(self, cipher: int | None) -> bool:
        """Can an endpoint that negotiated ``cipher`` join now (one cipher per conference)?"""
        if cipher not in EKT_KEY_LENGTHS:
            return False
        return self.cipher is None or self.cipher == cipher

    def key_for(self, cipher: int, now: float) -> EktKeyMaterial:
        """The current key, made on first use with ``cipher``; KeyingError on a mismatch.

        A key past its ``ekt_ttl`` must not be used any more (RFC 8870 §5.2.2), so an expired
        one is replaced here. (Low-level: :meth:`join` applies the rekey policy instead.)
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

    def refresh_at(self) -> float | None:
        """When the current key is replaced for a live conference (TTL refresh), or None."""
        key = self.current
        if key is None or not self.members:
            return None
        return key.created + key.ttl - refresh_lead(key.ttl)

    # --- rekey policy (D22) ---------------------------------------------------------------------

    def request_rekey(self, now: float, reason: str = MANUAL, *, immediate: bool = False) -> None:
        """Ask for a rekey: the first request of a window reserves the next key and starts the
        window (``rekey_window`` from it, not sliding: a stream of joins cannot postpone it);
        later requests join it. ``immediate`` makes it due now (TTL, manual)."""
        if self.current is None:
            if self.pending is None:
                raise KeyingError(f"conference {self.id} has no key to replace")
        elif self.pending is None:
            self.pending = self._make_key(self.current.cipher, now)
            self.rekey_pending_since = now
            self._rekey_due = self._window_end(now)
        if immediate:
            self._rekey_due = now
        if reason not in self._reasons:
            self._reasons.append(reason)
        if reason == JOIN:
            self._joins += 1
        elif reason == LEAVE:
            self._leaves += 1

    def _window_end(self, now: float) -> float:
        """D31 leading edge: after a quiet period (no rekey within the last ``rekey_window``)
        a rekey is due at once; otherwise at the end of the window the last rekey opened, so
        every change inside it shares one batched rekey."""
        last = self._last_rekey
        if last is None or now >= last + self.config.rekey_window:
            return now
        return last + self.config.rekey_window

    def rekey_due(self) -> float | None:
        """When the pending rekey fires (None: none pending)."""
        return self._rekey_due

    def needs_rekey(self, now: float) -> bool:
        """True once a requested rekey has waited its window (D22 coalescing) and its SPI is
        durably reserved (D28)."""
        return self._rekey_due is not None and now >= self._rekey_due and self.spis_covered()

    def next_deadline(self) -> float | None:
        """The conference's next timer: the pending rekey, else the TTL refresh; None while
        the pending key waits for its SPI reservation (:meth:`spis_reserved` ends that)."""
        if self._rekey_due is not None:
            return self._rekey_due if self.spis_covered() else None
        return self.refresh_at()

    def poll(self, now: float) -> Rekey | None:
        """Run the conference's timer: the pending rekey if due, else a due TTL refresh.

        Returns the rekey to distribute (to every member in :attr:`Rekey.members`), or None.
        """
        if self.pending is None:
            refresh = self.refresh_at()
            if refresh is None or now < refresh:
                return None
            self.request_rekey(now, TTL, immediate=True)
        if not self.needs_rekey(now):
            return None
        return self._fire(now)

    def _fire(self, now: float) -> Rekey:
        pending = self.pending
        if pending is None:  # pragma: no cover - callers check needs_rekey first
            raise KeyingError(f"conference {self.id}: no rekey pending")
        # The key's lifetime starts when it is handed out, not when its SPI was reserved.
        key = attrs.evolve(pending, created=now)
        rekey = Rekey(
            key=key,
            previous=self.current,
            reasons=tuple(self._reasons) or (MANUAL,),
            joins=self._joins,
            leaves=self._leaves,
            members=tuple(self.members.values()),
        )
        if self.current is not None:  # a first key held for its SPIs (D28) is no rekey
            self._last_rekey = now
        self._clear_pending()
        self.current = key
        for member in rekey.members:
            member.spi = key.spi
        return rekey

    def rekey(self, now: float) -> EktKeyMaterial:
        """A new EKTKey at once (fresh key and salt, new SPI) for the conference's cipher.

        A pending rekey is fired now (same key). The caller sends the key to every member.
        Without a current key there is nobody to rekey: KeyingError.
        """
        self.request_rekey(now, MANUAL, immediate=True)
        if not self.spis_covered():
            raise KeyingError(f"conference {self.id}: its next SPI is not reserved yet (D28)")
        return self._fire(now).key

    # --- membership -----------------------------------------------------------------------------

    def join(self, member: Member, now: float) -> EktKeyMaterial | None:
        """Add a member; returns the key to send it now, or None when its first key is the
        pending rekey's (it gets it with everyone when the rekey fires, see the module
        docstring). KeyingError for a full conference or a cipher that is not the
        conference's."""
        aid = member.association_id
        if aid not in self.members and len(self.members) >= self.max_members:
            raise KeyingError(f"conference {self.id} is full ({self.max_members} members)")
        if self.current is None and self.pending is None:
            # The first member (of an empty conference) starts it with a fresh key: there is no
            # earlier media to protect, so no rekey.
            first = self._new_key(member.ekt_cipher, now)
            self.members[aid] = member
            if self.spis_covered():
                member.spi = first.spi
                return first
            # D28: its SPI is not durably reserved yet: hold the key as a pending "first" key,
            # handed out (to every member then present) once the reservation is written.
            self.current = None
            self.pending = first
            self.rekey_pending_since = now
            self._rekey_due = now
            self._reasons = ["first"]
            member.spi = None
            return None
        if self.cipher != member.ekt_cipher:
            raise KeyingError(
                f"conference {self.id} uses EKT cipher {self.cipher}, not {member.ekt_cipher}"
            )
        keyed = any(m.spi is not None for m in self.members.values() if m is not member)
        # Decide (and reserve a key, which may raise) before the member is added.
        key: EktKeyMaterial | None = None
        if self.current is None:
            pass  # the first key is still held for its SPI reservation: wait for it too
        elif self.pending is not None:
            # A rekey is coming within the window anyway: wait for it (the joiner never holds
            # the key that the others, or a leaver, used before).
            if self.config.rekey_on_join and keyed:
                self.request_rekey(now, JOIN)
        elif self.expired(now):
            self.request_rekey(now, TTL, immediate=True)
        elif self.config.rekey_on_join and keyed:
            self.request_rekey(now, JOIN)
        else:
            key = self.current
        member.spi = key.spi if key is not None else None
        self.members[aid] = member
        return key

    def restore(self, key: EktKeyMaterial, members: Iterable[Member]) -> None:
        """A restarted KMF takes up the conference as it was (D29): ``key`` is what the
        members hold; no rekey is requested (the shell asks for one once it can reach them)."""
        if self.members or self.current is not None or self.pending is not None:
            raise KeyingError(f"conference {self.id} is live: nothing to restore into")
        self.current = key
        for member in members:
            member.spi = key.spi
            self.members[member.association_id] = member

    def leave(self, association_id: uuid.UUID, now: float) -> Member | None:
        """Remove a member; returns it. The last one to leave retires the key (and any pending
        rekey); otherwise a member that held a key asks for a rekey (``rekey_on_leave``)."""
        member = self.members.pop(association_id, None)
        if member is None:
            return None
        if not self.members:
            self.current = None
            self._last_rekey = None
            self._clear_pending()
        elif member.spi is not None and self.config.rekey_on_leave:
            self.request_rekey(now, LEAVE)
        return member

    def waiting(self) -> list[Member]:
        """Members that joined but hold no key yet (their first key is the pending rekey's)."""
        return [m for m in self.members.values() if m.spi is None]


class KeyingState:
    """All conferences of one KMF and the roster that maps endpoints to them (D15)."""

    def __init__(
        self,
        conferences: Sequence[KmfConference],
        *,
        max_members: int = 65536,
        spi_starts: Mapping[str, int] | None = None,
        durable_spis: bool = False,
    ) -> None:
        """``spi_starts``: the issue counter each conference resumes at (D28: a restarted KMF
        resumes at its stored ceiling); others start at random. ``durable_spis``: no key is
        handed out before its SPI is reserved (:meth:`Conference.spis_reserved`)."""
        starts = spi_starts or {}
        self.conferences: dict[str, Conference] = {}
        for c in conferences:
            start = starts.get(c.id)
            if start is None:
                start = int.from_bytes(os.urandom(2), "big")
            self.conferences[c.id] = Conference(
                c,
                max_members=max_members,
                spi_start=start,
                spi_ceiling=start if durable_spis else None,
            )
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

    def set_participant(self, conference_id: str, fingerprint: str, *, listed: bool) -> None:
        """D33: put a fingerprint on a conference's roster or take it off, at run time (an
        expected tls-id from the configuration still applies to a listed one)."""
        conf = self.conferences[conference_id]
        confs = self._roster.setdefault(fingerprint, [])
        if listed:
            conf._participants |= {Fingerprint(fingerprint)}
            if conf not in confs:  # configuration order first, run-time additions after
                confs.append(conf)
        else:
            conf._participants -= {Fingerprint(fingerprint)}
            if conf in confs:
                confs.remove(conf)
        if not confs:
            del self._roster[fingerprint]

    def find_member(self, association_id: uuid.UUID) -> tuple[Conference, Member] | None:
        for conf in self.conferences.values():
            member = conf.members.get(association_id)
            if member is not None:
                return conf, member
        return None
