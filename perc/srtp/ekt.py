"""Encrypted Key Transport (RFC 8870): key wrap, sender state and receiver state.

This is the only module in perc that unwraps EKT ciphertexts. The Media Distributor must never
import it (nor anything that imports it): ``perc.srtp.hop`` treats EKT fields as opaque bytes
(D11), and only endpoints (``perc.srtp.double``) load this module.

Theory of operation
-------------------
A Key Distributor gives every endpoint of a conference the same **EKT parameter set**
(:class:`EktParameterSet`: SPI, cipher, EKTKey, conference SRTP master salt, lifetime), carried
in the DTLS ``EKTKey`` message (RFC 8870 §5.2.2). Each sender picks its own random end-to-end
(inner) SRTP master key and appends it to its packets wrapped under the EKTKey: a
*FullEKTField* (ciphertext, SPI, epoch). Other packets carry the one-byte *ShortEKTField*.

:class:`EktSender` decides per packet which field to append (RFC 8870 §4.6): a Full tag in
the first three packets of a stream, in the three packets after every key change, every
100 ms for audio (``period``) and on every key frame for video (the caller's ``keyframe``
flag); a Short tag otherwise. The ciphertext depends only on (key, SSRC, ROC), so it is cached
and re-wrapped only when one of them changes (§4.3.1 step 3). The epoch counts keys sent per
SSRC under one SPI and restarts at 0 with a new parameter set (§4.1).

:class:`EktReceiver` holds every parameter set it was given, indexed by SPI, and per SSRC the
keys it learned, newest first, each with an inner SRTP context built by a factory the caller
passes (so this module has no opinion on the SRTP transform). :meth:`EktReceiver.process`
applies RFC 8870 §4.3.2 with the epoch rule of D8:

* Short tag or an extension type: nothing to do;
* unknown (or expired) SPI: :class:`UnknownSpiError`, an authentication failure; the packet
  is dropped (§4.3.2 step 2);
* ciphertext that does not unwrap, or a plaintext that does not parse or has the wrong key
  length: :class:`EktUnwrapError` / :class:`EktPlaintextError`; the packet is dropped
  (steps 3 and 6);
* SSRC in the plaintext differs from the packet's: the tag is ignored, the packet is still
  processed (step 5);
* D8, for one SPI+SSRC: a higher epoch is a new key; the same epoch with the same key only
  updates the ROC (forward only; it seeds the key's inner context until that context has
  decrypted a packet, after which the context's own RFC 3711 estimate rules); a ciphertext
  identical to the cached one is skipped without unwrapping; the same or a lower epoch with
  a different key is ignored (the tag, not the packet).

Old keys of a stream stay usable for late packets after a rekey: up to ``keys_per_stream``
per SSRC, each for ``old_key_lifetime`` seconds after a newer one arrived. A sender keeps
encrypting with its old key for 250 ms after announcing a new one (§4.3.1, D22), so the
double receiver tries the key that last worked first and falls back to the others.

Every drop and ignored tag is counted in ``stats``.

API
---
- ``EktCipher`` (AESKW_128 = 1, AESKW_256 = 2, D6); ``ekt_wrap``/``ekt_unwrap`` and the
  plain RFC 5649 ``aes_kw_wrap_with_padding``/``aes_kw_unwrap_with_padding``;
  ``ekt_ciphertext_length(m)`` (D7).
- ``EktParameterSet(spi, cipher, key, salt, expires_at=None)``,
  ``EktParameterSet.from_ekt_key(key, salt, spi, ttl, now, *, cipher=None)``.
- ``EktSender(params, master_key, *, period=0.1, burst=3)``:
  ``field(ssrc, roc, now, keyframe=False) -> bytes``, ``change_key(master_key, params=None)``,
  ``ssrcs()``, ``stats``.
- ``EktReceiver(session_factory, *, master_key_length, salt_length=12, max_parameter_sets=8,
  max_streams=1024, keys_per_stream=3, old_key_lifetime=10.0)``: ``add_parameter_set``,
  ``remove_parameter_set``, ``parameter_set(spi)``, ``process(field, ssrc, now) ->
  EktOutcome``, ``keys(ssrc)``, ``mark_used(key)``, ``forget(ssrc)``,
  ``expire_old_keys(now)``, ``stats``.
- Errors (all :class:`~perc.srtp.errors.SrtpError`): ``UnknownSpiError`` and
  ``EktUnwrapError`` (also ``AuthenticationError``), ``EktPlaintextError``,
  ``EktStreamLimitError``, ``EktFieldError`` (also ``SrtpDecodeError``); local misuse
  ``EktUsageError`` (also ``ValueError``).
"""

from __future__ import annotations

import enum
import hmac
import math
from collections.abc import Callable
from typing import Protocol

import attrs
from cryptography.hazmat.primitives.keywrap import (
    InvalidUnwrap,
    aes_key_unwrap_with_padding,
    aes_key_wrap_with_padding,
)

from perc.srtp.errors import AuthenticationError, SrtpDecodeError, SrtpError
from perc.wire.ekt import (
    SHORT_EKT_FIELD,
    EktDecodeError,
    EktField,
    EktPlaintext,
    FullEktField,
    ShortEktField,
    decode_ekt_plaintext,
)

#: RFC 8870 §4.4: usage limit T of AESKW128/AESKW256 (encryptions per EKTKey).
EKT_MAX_ENCRYPTIONS = 1 << 48
#: RFC 8870 §4.6: Full tags in the first packets of a stream and after a key change.
FULL_TAG_BURST = 3
#: RFC 8870 §4.6: Full-tag period for audio-only senders.
AUDIO_FULL_TAG_PERIOD = 0.1
#: RFC 8870 §4.3.1, D22: keep sending with the old key this long after announcing a new one.
OLD_KEY_SEND_TIME = 0.25


class EktCipher(enum.IntEnum):
    """EKT cipher code points as sent on the wire (D6: the TLS enum of RFC 8870 §5.2.1)."""

    AESKW_128 = 1
    AESKW_256 = 2

    @property
    def key_length(self) -> int:
        return 16 if self is EktCipher.AESKW_128 else 32


class EktError(SrtpError):
    """Base of the EKT errors."""


class EktFieldError(EktError, SrtpDecodeError):
    """The EKT field at the end of a packet does not parse; the packet is dropped."""


class UnknownSpiError(EktError, AuthenticationError):
    """A Full tag names an SPI we hold no (unexpired) parameter set for (§4.3.2 step 2)."""


class EktUnwrapError(EktError, AuthenticationError):
    """The EKT ciphertext fails the key-wrap integrity check (§4.3.2 step 3)."""


class EktPlaintextError(EktError):
    """The unwrapped plaintext does not parse or has the wrong key length (§4.3.2 step 6)."""


class EktStreamLimitError(EktError):
    """A Full tag for a new SSRC arrived while the receiver tracks its maximum of SSRCs."""


class EktUsageError(EktError, ValueError):
    """Local misuse: bad parameter set, key length, expired or exhausted EKTKey for sending."""


def ekt_ciphertext_length(plaintext_length: int) -> int:
    """RFC 5649 output length for an M-byte plaintext: ``8*ceil(M/8) + 8`` (D7)."""
    return 8 * math.ceil(plaintext_length / 8) + 8


def aes_kw_wrap_with_padding(kek: bytes, plaintext: bytes) -> bytes:
    """RFC 5649 key wrap with padding (any AES key size), from ``cryptography``."""
    if len(kek) not in (16, 24, 32) or not plaintext:
        raise EktUsageError("RFC 5649 needs a 16/24/32-byte KEK and a non-empty plaintext")
    return aes_key_wrap_with_padding(kek, plaintext)


def aes_kw_unwrap_with_padding(kek: bytes, ciphertext: bytes) -> bytes:
    """RFC 5649 unwrap; any failure (integrity, impossible length) is EktUnwrapError."""
    if len(kek) not in (16, 24, 32):
        raise EktUsageError("RFC 5649 needs a 16/24/32-byte KEK")
    try:
        return aes_key_unwrap_with_padding(kek, ciphertext)
    except (InvalidUnwrap, ValueError) as exc:
        raise EktUnwrapError("EKT ciphertext does not unwrap") from exc


def ekt_wrap(cipher: EktCipher, ekt_key: bytes, plaintext: bytes) -> bytes:
    """EKTEncrypt: AES key wrap with padding (RFC 5649) under the EKTKey."""
    if len(ekt_key) != cipher.key_length:
        raise EktUsageError(f"{cipher.name} needs a {cipher.key_length}-byte EKTKey")
    return aes_kw_wrap_with_padding(ekt_key, plaintext)


def ekt_unwrap(cipher: EktCipher, ekt_key: bytes, ciphertext: bytes) -> bytes:
    """EKTDecrypt; any failure (integrity, impossible length) is :class:`EktUnwrapError`."""
    if len(ekt_key) != cipher.key_length:
        raise EktUsageError(f"{cipher.name} needs a {cipher.key_length}-byte EKTKey")
    return aes_kw_unwrap_with_padding(ekt_key, ciphertext)


@attrs.frozen
class EktParameterSet:
    """One EKT parameter set (RFC 8870 §4.1): what an ``EKTKey`` message delivers."""

    spi: int
    cipher: EktCipher
    key: bytes = attrs.field(repr=False)
    salt: bytes = attrs.field(repr=False)
    #: absolute time (the caller's clock) after which the EKTKey must not be used; None = never
    expires_at: float | None = None

    def __attrs_post_init__(self) -> None:
        if not 0 <= self.spi <= 0xFFFF:
            raise EktUsageError(f"SPI {self.spi} is not a 16-bit value")
        if len(self.key) != EktCipher(self.cipher).key_length:
            raise EktUsageError(f"{self.cipher!r} needs a {self.cipher.key_length}-byte key")
        if not self.salt:
            raise EktUsageError("empty SRTP master salt")

    @classmethod
    def from_ekt_key(
        cls,
        key: bytes,
        salt: bytes,
        spi: int,
        ttl: int,
        now: float,
        *,
        cipher: int | None = None,
    ) -> EktParameterSet:
        """From the fields of an EKTKey message received at ``now``.

        ``cipher`` is the EKT cipher the DTLS handshake negotiated (1 or 2, D6); without it
        the cipher follows from the key length. A key that does not fit the cipher is
        :class:`EktUsageError`.
        """
        if cipher is None:
            cipher = EktCipher.AESKW_128 if len(key) == 16 else EktCipher.AESKW_256
        try:
            chosen = EktCipher(cipher)
        except ValueError:
            raise EktUsageError(f"unknown EKT cipher {cipher}") from None
        return cls(spi, chosen, key, salt, now + ttl)

    def expired(self, now: float) -> bool:
        return self.expires_at is not None and now >= self.expires_at


# --- sender --------------------------------------------------------------------------------


@attrs.define
class EktSenderStats:
    full_tags: int = 0
    short_tags: int = 0
    wraps: int = 0


@attrs.define(slots=True)
class _OutStream:
    generation: int
    epoch: int = 0
    full_left: int = FULL_TAG_BURST
    last_full: float = -math.inf
    cached_roc: int = -1
    cached_field: bytes = b""


class EktSender:
    """Outbound EKT state: one parameter set, one E2E master key, any number of SSRCs.

    ``field(ssrc, roc, now, keyframe=...)`` returns the bytes to append to the protected packet.
    ``period`` is the Full-tag period (100 ms for audio, RFC 8870 §4.6); pass ``None`` for a
    video sender, which instead passes ``keyframe=True`` on key-frame packets.
    """

    def __init__(
        self,
        params: EktParameterSet,
        master_key: bytes,
        *,
        period: float | None = AUDIO_FULL_TAG_PERIOD,
        burst: int = FULL_TAG_BURST,
    ) -> None:
        self._check_key(master_key)
        self._params = params
        self._key = master_key
        self._generation = 0
        self._period = period
        self._burst = burst
        self._encryptions = 0
        self._streams: dict[int, _OutStream] = {}
        self.stats = EktSenderStats()

    @staticmethod
    def _check_key(master_key: bytes) -> None:
        if len(master_key) not in (16, 32):
            raise EktUsageError(f"E2E master key of {len(master_key)} bytes, need 16 or 32")

    @property
    def params(self) -> EktParameterSet:
        return self._params

    @property
    def master_key(self) -> bytes:
        return self._key

    def ssrcs(self) -> list[int]:
        """SSRCs that have had a field since the last parameter-set change."""
        return list(self._streams)

    def change_key(self, master_key: bytes, params: EktParameterSet | None = None) -> None:
        """Announce a new E2E master key, optionally under a new parameter set (rekey).

        With a new parameter set (new SPI) every stream's epoch restarts at 0 (RFC 8870 §4.1);
        with the same one the epoch of each stream goes up by one. Either way the next
        ``burst`` packets of every stream carry Full tags (§4.6).
        """
        self._check_key(master_key)
        if hmac.compare_digest(master_key, self._key):
            # §6: master keys MUST NOT be reused; announcing the same key again is misuse.
            raise EktUsageError("the new E2E master key equals the current one")
        self._key = master_key
        self._generation += 1
        if params is not None and params != self._params:
            self._params = params
            self._encryptions = 0
            self._streams.clear()

    def field(self, ssrc: int, roc: int, now: float, keyframe: bool = False) -> bytes:
        """The EKT field for the next packet of ``ssrc`` (whose inner ROC is ``roc``)."""
        st = self._streams.get(ssrc)
        if st is None:
            st = self._streams[ssrc] = _OutStream(self._generation, full_left=self._burst)
        elif st.generation != self._generation:
            if st.epoch >= 0xFFFF:
                raise EktUsageError("EKT epoch exhausted for this SSRC: a new EKTKey is needed")
            st.epoch += 1
            st.generation = self._generation
            st.full_left = self._burst
            st.cached_field = b""
        if st.full_left:
            st.full_left -= 1
        elif not keyframe and (self._period is None or now < st.last_full + self._period):
            self.stats.short_tags += 1
            return SHORT_EKT_FIELD
        st.last_full = now
        if st.cached_roc != roc or not st.cached_field:
            params = self._params
            if params.expired(now):
                raise EktUsageError(f"EKTKey with SPI {params.spi} expired (ekt_ttl)")
            if self._encryptions >= EKT_MAX_ENCRYPTIONS:
                raise EktUsageError("EKTKey usage limit T reached (RFC 8870 §4.4)")
            self._encryptions += 1
            ciphertext = ekt_wrap(
                params.cipher, params.key, EktPlaintext(self._key, ssrc, roc).encode()
            )
            st.cached_field = FullEktField(ciphertext, params.spi, st.epoch).encode()
            st.cached_roc = roc
            self.stats.wraps += 1
        self.stats.full_tags += 1
        return st.cached_field


# --- receiver ------------------------------------------------------------------------------


class InnerSession(Protocol):
    """What the receiver needs from an inner SRTP context (perc.srtp.context.SrtpSession)."""

    def unprotect_rtp(self, packet: bytes) -> bytes: ...

    def receive_roc(self, ssrc: int) -> int | None: ...

    def receive_index(self, ssrc: int) -> int | None: ...

    def set_receive_roc(self, ssrc: int, roc: int) -> None: ...


@attrs.define(slots=True, eq=False)
class ReceivedKey:
    """An E2E master key learned from a Full tag, with its inner SRTP context."""

    ssrc: int
    spi: int
    epoch: int
    master_key: bytes = attrs.field(repr=False)
    salt: bytes = attrs.field(repr=False)
    roc: int
    received_at: float
    session: InnerSession = attrs.field(repr=False)
    #: when a newer key of the same stream arrived (None while this is the newest)
    superseded_at: float | None = None


class EktOutcome(enum.Enum):
    """What :meth:`EktReceiver.process` did with a packet's EKT field."""

    NONE = "none"  # Short tag
    NEW_KEY = "new-key"
    ROC_UPDATED = "roc-updated"
    CACHED = "cached"  # identical to the cached ciphertext, not unwrapped
    IGNORED_EPOCH = "ignored-epoch"  # D8: same/lower epoch with a different key
    IGNORED_SSRC = "ignored-ssrc"  # §4.3.2 step 5
    IGNORED_TYPE = "ignored-type"  # extension type we do not know


@attrs.define
class EktReceiverStats:
    short_tags: int = 0
    full_tags: int = 0
    new_keys: int = 0
    roc_updates: int = 0
    cached: int = 0
    ignored_epoch: int = 0
    ignored_ssrc: int = 0
    ignored_type: int = 0
    unknown_spi: int = 0
    #: Full tags under an unknown SPI kept, then applied when that SPI's EKTKey came
    parked_applied: int = 0
    unwrap_failures: int = 0
    bad_plaintext: int = 0
    stream_limit: int = 0
    evicted_keys: int = 0


@attrs.define(slots=True)
class _InStream:
    keys: list[ReceivedKey] = attrs.Factory(list)  # newest first
    #: per SPI: (highest epoch seen, its master key)
    epochs: dict[int, tuple[int, bytes]] = attrs.Factory(dict)
    last_ciphertext: bytes = b""
    #: index into keys of the key that last decrypted a packet (tried first)
    preferred: ReceivedKey | None = None


SessionFactory = Callable[[bytes, bytes], InnerSession]


#: Full tags under unknown SPIs an EKT receiver keeps for :meth:`EktReceiver.apply_parked`.
_MAX_PARKED = 64


class EktReceiver:
    """Inbound EKT state: parameter sets by SPI, per-SSRC keys with their inner contexts.

    ``session_factory(master_key, master_salt)`` builds an inner SRTP context;
    ``master_key_length`` is the inner transform's key length (16 or 32) and
    ``salt_length`` its salt length (12 for AES-GCM): the conference salt is truncated to it
    (§4.3.2 step 4).
    """

    def __init__(
        self,
        session_factory: SessionFactory,
        *,
        master_key_length: int,
        salt_length: int = 12,
        max_parameter_sets: int = 8,
        max_streams: int = 1024,
        keys_per_stream: int = 3,
        old_key_lifetime: float = 10.0,
    ) -> None:
        if master_key_length not in (16, 32):
            raise EktUsageError("master_key_length must be 16 or 32")
        self._factory = session_factory
        self._key_length = master_key_length
        self._salt_length = salt_length
        self._max_sets = max_parameter_sets
        self._max_streams = max_streams
        self._keys_per_stream = keys_per_stream
        self._old_key_lifetime = old_key_lifetime
        self._sets: dict[int, EktParameterSet] = {}
        self._streams: dict[int, _InStream] = {}
        #: (SPI, SSRC) -> the newest Full tag that named an SPI we lacked (bounded, oldest
        #: out): a sender that switched to a new EKTKey before ours arrived announced its new
        #: key only in its first few Full tags, so they are applied when the EKTKey comes.
        self._parked: dict[tuple[int, int], FullEktField] = {}
        self.stats = EktReceiverStats()

    # parameter sets ------------------------------------------------------------------------

    def add_parameter_set(self, params: EktParameterSet) -> None:
        """Add (or replace) the set for ``params.spi``; the oldest is evicted beyond the bound."""
        if len(params.salt) < self._salt_length:
            raise EktUsageError(
                f"SRTP master salt of {len(params.salt)} bytes, need {self._salt_length}"
            )
        old = self._sets.pop(params.spi, None)
        if old is None or not hmac.compare_digest(old.key + old.salt, params.key + params.salt):
            # SPIs wrap (D28): a new EKTKey may name the SPI of a much older one. The epochs a
            # stream recorded under that SPI (D8) belonged to the old key; keeping them would
            # make the new key's first Full tags look like a rollback and be ignored.
            for st in self._streams.values():
                st.epochs.pop(params.spi, None)
        self._sets[params.spi] = params
        while len(self._sets) > self._max_sets:
            del self._sets[next(iter(self._sets))]

    def apply_parked(self, spi: int, now: float) -> int:
        """The EKTKey for ``spi`` arrived: apply the Full tags under it that came first
        (unknown SPI then). Each is processed as on arrival (unwrap under the new key, SSRC
        and epoch checks), so a forged one only counts as a failure. Returns how many
        installed or refreshed a key."""
        applied = 0
        for key in [k for k in self._parked if k[0] == spi]:
            field = self._parked.pop(key)
            try:
                outcome = self.process(field, key[1], now)
            except EktError:
                continue
            if outcome in (EktOutcome.NEW_KEY, EktOutcome.ROC_UPDATED):
                applied += 1
        self.stats.parked_applied += applied
        return applied

    def remove_parameter_set(self, spi: int) -> None:
        self._sets.pop(spi, None)

    def parameter_set(self, spi: int) -> EktParameterSet | None:
        return self._sets.get(spi)

    # keys ----------------------------------------------------------------------------------

    def keys(self, ssrc: int) -> list[ReceivedKey]:
        """Keys known for ``ssrc``, the one that last worked first, then newest first."""
        st = self._streams.get(ssrc)
        if st is None:
            return []
        pref = st.preferred
        if pref is None or not st.keys or st.keys[0] is pref:
            return st.keys
        return [pref, *(k for k in st.keys if k is not pref)]

    def mark_used(self, key: ReceivedKey) -> None:
        """Tell the receiver ``key`` decrypted a packet (it is tried first next time)."""
        st = self._streams.get(key.ssrc)
        if st is not None:
            st.preferred = key

    def forget(self, ssrc: int) -> None:
        """Drop all keys of a stream (e.g. on BYE or when leaving, RFC 8871 §4.3)."""
        self._streams.pop(ssrc, None)

    # packet processing ---------------------------------------------------------------------

    def process(self, field: EktField, ssrc: int, now: float) -> EktOutcome:
        """Apply RFC 8870 §4.3.2 steps 2-6 to the EKT field of a packet from ``ssrc``.

        Raises :class:`UnknownSpiError`, :class:`EktUnwrapError`, :class:`EktPlaintextError`
        or :class:`EktStreamLimitError` when the packet must be dropped; otherwise returns
        what happened to the tag, and the packet is processed normally.
        """
        if not isinstance(field, FullEktField):
            if isinstance(field, ShortEktField):
                self.stats.short_tags += 1
                return EktOutcome.NONE
            # RFC 8870 §4.1: an unknown type -> discard the tag, the packet goes on.
            self.stats.ignored_type += 1
            return EktOutcome.IGNORED_TYPE
        self.stats.full_tags += 1
        st = self._streams.get(ssrc)
        if (
            st is not None
            and st.last_ciphertext
            and hmac.compare_digest(st.last_ciphertext, field.ciphertext)
            and field.spi in st.epochs
            and st.epochs[field.spi][0] == field.epoch
        ):
            # D8: identical to the cached ciphertext: same key, SSRC and ROC; nothing to do.
            self.stats.cached += 1
            return EktOutcome.CACHED
        params = self._sets.get(field.spi)
        if params is None or params.expired(now):
            self.stats.unknown_spi += 1
            if params is None:
                parked = (field.spi, ssrc)
                self._parked.pop(parked, None)
                if len(self._parked) >= _MAX_PARKED:
                    del self._parked[next(iter(self._parked))]
                self._parked[parked] = field
            raise UnknownSpiError(f"no EKT parameter set for SPI {field.spi}")
        try:
            raw = ekt_unwrap(params.cipher, params.key, field.ciphertext)
        except EktUnwrapError:
            self.stats.unwrap_failures += 1
            raise
        try:
            plain = decode_ekt_plaintext(raw)
        except EktDecodeError as exc:
            self.stats.bad_plaintext += 1
            raise EktPlaintextError(str(exc)) from exc
        if plain.ssrc != ssrc:
            # §4.3.2 step 5: discard this tag; the SRTP packet MAY still be processed.
            self.stats.ignored_ssrc += 1
            return EktOutcome.IGNORED_SSRC
        if len(plain.master_key) != self._key_length:
            # §4.3.2 step 6: abort EKT processing and drop the packet.
            self.stats.bad_plaintext += 1
            raise EktPlaintextError(
                f"EKT key of {len(plain.master_key)} bytes, transform needs {self._key_length}"
            )
        if st is None:
            if len(self._streams) >= self._max_streams:
                self.stats.stream_limit += 1
                raise EktStreamLimitError(f"already tracking {self._max_streams} SSRCs")
            st = self._streams[ssrc] = _InStream()
        seen = st.epochs.get(field.spi)
        if seen is not None:
            seen_epoch, seen_key = seen
            same_key = hmac.compare_digest(seen_key, plain.master_key)
            if field.epoch == seen_epoch and same_key:
                st.last_ciphertext = field.ciphertext
                self._update_roc(st, field.spi, plain.master_key, plain.roc)
                self.stats.roc_updates += 1
                return EktOutcome.ROC_UPDATED
            if field.epoch <= seen_epoch:
                # D8 / RFC 8870 §4.1: never roll back to an older key under one SPI.
                self.stats.ignored_epoch += 1
                return EktOutcome.IGNORED_EPOCH
        self._add_key(st, field, params, plain, now)
        st.last_ciphertext = field.ciphertext
        self.stats.new_keys += 1
        return EktOutcome.NEW_KEY

    def _update_roc(self, st: _InStream, spi: int, master_key: bytes, roc: int) -> None:
        for key in st.keys:
            if key.spi == spi and key.master_key == master_key:
                key.roc = max(key.roc, roc)
                if key.session.receive_index(key.ssrc) is None:
                    # No packet decrypted under this key yet: start it with the newest ROC.
                    current = key.session.receive_roc(key.ssrc)
                    if current is None or roc > current:
                        key.session.set_receive_roc(key.ssrc, roc)
                # A live stream keeps its own estimate (RFC 3711 Appendix A): the tag's ROC
                # belongs to the SEQ of the packet carrying it, which for the double transform
                # sits in the encrypted OHB, and the outer layer (no EKT) would need the same
                # resynchronisation anyway.
                return

    def _add_key(
        self,
        st: _InStream,
        field: FullEktField,
        params: EktParameterSet,
        plain: EktPlaintext,
        now: float,
    ) -> None:
        salt = params.salt[: self._salt_length]
        session = self._factory(plain.master_key, salt)
        session.set_receive_roc(plain.ssrc, plain.roc)
        key = ReceivedKey(
            plain.ssrc, field.spi, field.epoch, plain.master_key, salt, plain.roc, now, session
        )
        st.epochs[field.spi] = (field.epoch, plain.master_key)
        for old in st.keys:
            if old.superseded_at is None:
                old.superseded_at = now
        st.keys.insert(0, key)
        # Bound the per-stream state: at most keys_per_stream keys, old ones only for a while.
        # The key that last decrypted a packet stays beyond the count (one more at most): a
        # sender that gets rekeys faster than it switches (each announcement postpones its
        # switch, RFC 8870 §4.3.1) still encrypts with it while announcing newer ones.
        keep: list[ReceivedKey] = []
        for k in st.keys:
            aged = k.superseded_at is not None and now - k.superseded_at > self._old_key_lifetime
            if aged or (len(keep) >= self._keys_per_stream and k is not st.preferred):
                self.stats.evicted_keys += 1
                if st.preferred is k:
                    st.preferred = None
                continue
            keep.append(k)
        st.keys = keep
        # the epochs map is bounded by the parameter sets we hold
        for spi in [s for s in st.epochs if s not in self._sets]:
            del st.epochs[spi]

    def expire_old_keys(self, now: float) -> None:
        """Drop superseded keys older than ``old_key_lifetime`` (call now and then)."""
        for st in self._streams.values():
            keep = [
                k
                for k in st.keys
                if k.superseded_at is None or now - k.superseded_at <= self._old_key_lifetime
            ]
            self.stats.evicted_keys += len(st.keys) - len(keep)
            if st.preferred is not None and st.preferred not in keep:
                st.preferred = None
            st.keys = keep
