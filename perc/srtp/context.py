"""AES-GCM SRTP and SRTCP (RFC 7714) for one master key: :class:`SrtpSession`.

Theory of operation
-------------------
A session holds one master key and salt (AEAD_AES_128_GCM for a 16-byte key,
AEAD_AES_256_GCM for a 32-byte key), derives the SRTP and SRTCP session keys once with the
RFC 3711 KDF (KDR 0, 12-byte salt zero-extended, D13; see :mod:`perc.srtp.keys`) and keeps one
``AESGCM`` object per session key for its whole life: no cipher is ever built per packet.

Per-SSRC state lives inside the session, separately for the send and the receive side and for
RTP and RTCP, because one master key may serve several SSRCs (a receiver hears every SSRC of
its peer under one key). On the send side RFC 7714 §8.4 requires that no (SSRC, ROC, SEQ)
triple is ever used twice under one key; the send side therefore runs the same index
tracking and window as the receive side and refuses (``SrtpUsageError``) to protect an index a
second time, as libsrtp does.

Packet index (RFC 3711 §3.3.1, Appendix A). The 48-bit index is ``ROC << 16 | SEQ``. Each
stream keeps ``hi``, the highest index accepted so far; a packet's index is guessed from its
SEQ and ``hi``'s (ROC, SEQ) by the Appendix A rule (ROC - 1, ROC or ROC + 1, whichever puts the
packet within 2^15 of ``hi``). A guess of ROC -1 (only possible while ROC is 0) means ROC 0, as
libsrtp does. A new SSRC starts with ROC 0 and SEQ of its first packet, or with a ROC the
caller set beforehand (``set_receive_roc``/``set_send_roc``, e.g. from an EKT tag).

Replay (RFC 3711 §3.3.2). A bit mask of ``replay_window`` (default 128, at least 64) packets
below ``hi``; state is only committed after the tag verifies, so forged packets never move
the window or create a stream. A jump past the window clears the mask instead of shifting it
by the jump (an SRTCP index may jump by up to 2^31). The number of SSRCs per direction is
bounded (``max_streams``).

IV and AAD (RFC 7714 §8.1, §9.1). ``IV = (00 00 | SSRC | ROC | SEQ) XOR salt`` for SRTP and
``(00 00 | SSRC | 00 00 | 0 | SRTCP index) XOR salt`` for SRTCP. Both are computed as one
integer XOR of a per-stream cached ``salt ^ SSRC << 48`` with the index, then ``to_bytes``.
SRTP AAD is the whole RTP header (fixed part, CSRCs, header extension); the plaintext is the
rest (payload, RTP padding, pad count). SRTCP with E=1: AAD = first 8 octets | ESRTCP word,
plaintext = the rest of the compound packet, packet = 8 octets | ciphertext+tag | ESRTCP word.
With E=0 (authentication only): AAD = whole RTCP packet | ESRTCP word, packet = RTCP | tag |
ESRTCP word. perc always sends E=1 (D19) and accepts both. No MKI (EKT forbids it).

Limits. At most 2^48 SRTP packets (the index space) and 2^31 SRTCP packets per key (RFC 7714
§8.4, §9.4): beyond that ``KeyLifetimeError``.

API
---
``SrtpSession(master_key, master_salt, *, replay_window=128, max_streams=1024)`` or
``SrtpSession.from_session_keys(SessionKeys(...), ...)`` (the RFC 7714 vectors give session
keys). Properties: ``profile`` (``SrtpProfile.AEAD_AES_128_GCM`` / ``_256_GCM``), ``stats``.

Per-packet calls (state tracked per SSRC):

- ``protect_rtp(packet) -> bytes`` / ``unprotect_rtp(packet) -> bytes``
- ``protect_rtp_index(packet) -> (bytes, index)`` / ``unprotect_rtp_index(packet) ->
  (bytes, index)``: the same, also returning the 48-bit packet index used.
- ``protect_rtp_parts(header, payload) -> bytes``: ``header || ct || tag`` when the caller
  already holds the header (AAD) and payload apart; ``seal_rtp(header, payload) -> bytes``:
  only ``ct || tag`` (RFC 8723 inner layer, whose AAD is the synthetic header).
- ``unprotect_rtp_split(packet) -> (header_length, rtp)``; ``open_rtp(header, body) ->
  payload``: the inverse of ``seal_rtp`` (same index, ROC and replay handling).
- ``protect_rtcp(packet) -> bytes`` (E=1, next SRTCP index of the sender SSRC)
- ``unprotect_rtcp(packet) -> bytes``; ``unprotect_rtcp_index(packet) -> (bytes, index,
  encrypted)``.

Lower-level calls for the double transform and for tests (no ROC tracking, no replay check,
no state change: the caller owns index uniqueness):

- ``protect_rtp_with_index(packet, index, header_length=None) -> bytes``
- ``unprotect_rtp_with_index(packet, index, header_length=None) -> bytes``
- ``protect_rtcp_with_index(packet, index, *, encrypt=True) -> bytes`` (``encrypt=False``
  makes an E=0 packet: for vectors only, perc never sends one, D19)

State access: ``send_roc(ssrc)``, ``receive_roc(ssrc)`` (``None`` for an unknown SSRC),
``send_index(ssrc)``, ``receive_index(ssrc)`` (highest index), ``set_send_roc(ssrc, roc)``,
``set_receive_roc(ssrc, roc)`` (applies to the next packet of that SSRC; on a known stream it
replaces the ROC and clears the replay window), ``forget_ssrc(ssrc)``.

Helpers: ``rtp_iv(salt, ssrc, index)``, ``rtcp_iv(salt, ssrc, index)``.

Errors (:mod:`perc.srtp.errors`): ``unprotect_*`` raise only ``SrtpDecodeError``,
``AuthenticationError``, ``ReplayError``, ``KeyLifetimeError`` and ``StreamLimitError`` (each
also counted in ``stats``; ``open_rtp`` and ``unprotect_rtp_split`` likewise), plus
``SrtpUsageError`` for an out-of-range explicit index; ``protect_*`` and ``seal_rtp`` raise
``SrtpUsageError`` (malformed packet, index reuse), ``KeyLifetimeError`` and
``StreamLimitError``.
"""

from __future__ import annotations

import struct

import attrs
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from perc.srtp.errors import (
    AuthenticationError,
    KeyLifetimeError,
    ReplayError,
    SrtpDecodeError,
    SrtpUsageError,
    StreamLimitError,
)
from perc.srtp.keys import GCM_SALT_LENGTH, SessionKeys, SrtpProfile, derive_session_keys
from perc.wire.rtp import rtp_header_length_or_negative as _rtp_header_length

__all__ = [
    "MAX_RTCP_INDEX",
    "MAX_RTP_INDEX",
    "TAG_LENGTH",
    "SrtpSession",
    "SrtpStats",
    "rtcp_iv",
    "rtp_iv",
]

TAG_LENGTH = 16  # RFC 7714 §13.2: the full 16-octet tag, no truncation
MAX_RTP_INDEX = (1 << 48) - 1  # RFC 7714 §8.4
MAX_RTCP_INDEX = (1 << 31) - 1  # RFC 7714 §9.4
_MIN_RTP = 12 + TAG_LENGTH
_MIN_SRTCP = 8 + TAG_LENGTH + 4

# SEQ at offset 2 and SSRC at offset 8 of the RTP header, in one unpack.
_SEQ_SSRC = struct.Struct("!H4xI")
_U32 = struct.Struct("!I")
_unpack_seq_ssrc = _SEQ_SSRC.unpack_from
_unpack_u32 = _U32.unpack_from
_pack_u32 = _U32.pack


def rtp_iv(salt: bytes, ssrc: int, index: int) -> bytes:
    """RFC 7714 §8.1 IV: ``00 00 | SSRC | ROC | SEQ`` XOR the 12-byte session salt."""
    return (int.from_bytes(salt, "big") ^ (ssrc << 48) ^ index).to_bytes(12, "big")


def rtcp_iv(salt: bytes, ssrc: int, index: int) -> bytes:
    """RFC 7714 §9.1 IV: ``00 00 | SSRC | 00 00 | 0 | SRTCP index`` XOR the session salt."""
    return (int.from_bytes(salt, "big") ^ (ssrc << 48) ^ (index & MAX_RTCP_INDEX)).to_bytes(
        12, "big"
    )


@attrs.define
class SrtpStats:
    """Counters of packets a session refused (every drop is counted, STYLE 8)."""

    decode_errors: int = 0
    auth_failures: int = 0
    replays: int = 0
    lifetime_errors: int = 0
    stream_limit_drops: int = 0


class _Stream:
    """Index and replay state of one SSRC in one direction of RTP or RTCP."""

    __slots__ = ("hi", "iv_base", "mask")

    def __init__(self, hi: int, mask: int, iv_base: int) -> None:
        self.hi = hi  # highest index accepted (RTP: ROC << 16 | SEQ; RTCP: SRTCP index)
        self.mask = mask  # bit i set: index hi - i was accepted
        self.iv_base = iv_base  # session salt XOR SSRC << 48


class SrtpSession:
    """One AES-GCM SRTP/SRTCP master key with per-SSRC send and receive state."""

    __slots__ = (
        "_max_streams",
        "_pending_rx",
        "_pending_tx",
        "_profile",
        "_rtcp_decrypt",
        "_rtcp_encrypt",
        "_rtcp_salt",
        "_rtp_decrypt",
        "_rtp_encrypt",
        "_rtp_salt",
        "_rx_rtcp",
        "_rx_rtp",
        "_tx_rtcp",
        "_tx_rtp",
        "_window",
        "_wmask",
        "stats",
    )

    def __init__(
        self,
        master_key: bytes,
        master_salt: bytes,
        *,
        replay_window: int = 128,
        max_streams: int = 1024,
    ) -> None:
        if len(master_salt) != GCM_SALT_LENGTH:
            raise SrtpUsageError(f"master salt must be 12 bytes, got {len(master_salt)}")
        self._setup(derive_session_keys(master_key, master_salt), replay_window, max_streams)

    @classmethod
    def from_session_keys(
        cls, keys: SessionKeys, *, replay_window: int = 128, max_streams: int = 1024
    ) -> SrtpSession:
        """A session from already derived session keys and salts (RFC 7714 §16-17 vectors)."""
        self = cls.__new__(cls)
        self._setup(keys, replay_window, max_streams)
        return self

    def _setup(self, keys: SessionKeys, replay_window: int, max_streams: int) -> None:
        for name, value in (("RTP", keys.rtp_key), ("RTCP", keys.rtcp_key)):
            if len(value) not in (16, 32):
                raise SrtpUsageError(f"{name} session key must be 16 or 32 bytes")
        if len(keys.rtp_key) != len(keys.rtcp_key):
            raise SrtpUsageError("RTP and RTCP session keys differ in length")
        for name, value in (("RTP", keys.rtp_salt), ("RTCP", keys.rtcp_salt)):
            if len(value) != GCM_SALT_LENGTH:
                raise SrtpUsageError(f"{name} session salt must be 12 bytes")
        if not 64 <= replay_window <= 0x8000:
            # RFC 3711 §3.3.2: at least 64; beyond 2^15 the index guess cannot reach anyway.
            raise SrtpUsageError(f"replay window must be 64..32768, got {replay_window}")
        if max_streams < 1:
            raise SrtpUsageError("max_streams must be at least 1")
        self._profile = (
            SrtpProfile.AEAD_AES_128_GCM
            if len(keys.rtp_key) == 16
            else SrtpProfile.AEAD_AES_256_GCM
        )
        rtp = AESGCM(keys.rtp_key)
        rtcp = AESGCM(keys.rtcp_key)
        self._rtp_encrypt = rtp.encrypt
        self._rtp_decrypt = rtp.decrypt
        self._rtcp_encrypt = rtcp.encrypt
        self._rtcp_decrypt = rtcp.decrypt
        self._rtp_salt = int.from_bytes(keys.rtp_salt, "big")
        self._rtcp_salt = int.from_bytes(keys.rtcp_salt, "big")
        self._window = replay_window
        self._wmask = (1 << replay_window) - 1
        self._max_streams = max_streams
        self._tx_rtp: dict[int, _Stream] = {}
        self._rx_rtp: dict[int, _Stream] = {}
        self._tx_rtcp: dict[int, _Stream] = {}
        self._rx_rtcp: dict[int, _Stream] = {}
        self._pending_tx: dict[int, int] = {}
        self._pending_rx: dict[int, int] = {}
        self.stats = SrtpStats()

    def __repr__(self) -> str:  # never print key material
        return f"<SrtpSession {self._profile.name} rx={len(self._rx_rtp)} tx={len(self._tx_rtp)}>"

    @property
    def profile(self) -> SrtpProfile:
        return self._profile

    # --- SRTP send ------------------------------------------------------------------------------

    def protect_rtp(self, packet: bytes) -> bytes:
        """Encrypt and authenticate one RTP packet (RFC 7714 §8.2)."""
        # Fast path: header length only (no full parse), one struct unpack, one int XOR for
        # the IV, one AEAD call. Kept in one function body: every call level costs here.
        n = len(packet)
        if n < 12:
            raise SrtpUsageError("RTP packet shorter than 12 bytes")
        b0 = packet[0]
        hlen = 12 + ((b0 & 0x0F) << 2)
        if b0 & 0x10:
            if n < hlen + 4:
                raise SrtpUsageError("RTP header extension runs past the packet")
            hlen += 4 + (((packet[hlen + 2] << 8) | packet[hlen + 3]) << 2)
        if b0 & 0xC0 != 0x80 or n < hlen:
            raise SrtpUsageError("not a well-formed RTP version 2 packet")
        seq, ssrc = _unpack_seq_ssrc(packet, 2)
        st = self._tx_rtp.get(ssrc)
        if st is None:
            st = self._new_tx_rtp(ssrc, seq)
            idx = st.hi
        else:
            hi = st.hi
            s_l = hi & 0xFFFF
            idx = hi - s_l + seq
            if s_l < 0x8000:
                if seq - s_l > 0x8000 and idx >= 0x10000:
                    idx -= 0x10000
            elif s_l - 0x8000 > seq:
                idx += 0x10000
            delta = idx - hi
            if delta > 0:
                if idx > MAX_RTP_INDEX:
                    raise KeyLifetimeError("SRTP index space (2^48) exhausted: rekey")
                # A jump past the window clears it rather than shifting by the jump.
                st.mask = ((st.mask << delta) | 1) & self._wmask if delta < self._window else 1
                st.hi = idx
            else:
                d = -delta
                if d >= self._window or (st.mask >> d) & 1:
                    raise SrtpUsageError(f"SRTP index {idx} of SSRC {ssrc:#x} already used")
                st.mask |= 1 << d
        aad = packet[:hlen]
        return aad + self._rtp_encrypt((st.iv_base ^ idx).to_bytes(12, "big"), packet[hlen:], aad)

    def protect_rtp_index(self, packet: bytes) -> tuple[bytes, int]:
        """:meth:`protect_rtp`, also returning the 48-bit packet index used."""
        hlen = _rtp_header_length(packet)
        if hlen < 0:
            raise SrtpUsageError("not a well-formed RTP version 2 packet")
        aad = packet[:hlen]
        iv, idx = self._tx_rtp_iv(*_unpack_seq_ssrc(packet, 2))
        return aad + self._rtp_encrypt(iv, packet[hlen:], aad), idx

    def protect_rtp_parts(self, header: bytes, payload: bytes) -> bytes:
        """``header || AEAD(payload)``: :meth:`protect_rtp` of ``header + payload`` where the
        caller already knows where the header (the AAD, with CSRCs and extension) ends."""
        if len(header) < 12 or header[0] & 0xC0 != 0x80:
            raise SrtpUsageError("not a well-formed RTP version 2 header")
        iv = self._tx_rtp_iv(*_unpack_seq_ssrc(header, 2))[0]
        return header + self._rtp_encrypt(iv, payload, header)

    def seal_rtp(self, header: bytes, payload: bytes) -> bytes:
        """Only the ciphertext and tag of :meth:`protect_rtp_parts` (index tracked as there).

        For the inner layer of RFC 8723, whose AAD (the synthetic header) differs from the
        header the packet finally carries.
        """
        if len(header) < 12 or header[0] & 0xC0 != 0x80:
            raise SrtpUsageError("not a well-formed RTP version 2 header")
        iv = self._tx_rtp_iv(*_unpack_seq_ssrc(header, 2))[0]
        return self._rtp_encrypt(iv, payload, header)

    def _tx_rtp_iv(self, seq: int, ssrc: int) -> tuple[bytes, int]:
        """Index the next packet of ``ssrc`` sent with ``seq``, commit it, return (IV, index)."""
        st = self._tx_rtp.get(ssrc)
        if st is None:
            st = self._new_tx_rtp(ssrc, seq)
            idx = st.hi
        else:
            hi = st.hi
            idx = _guess_after(hi, seq)
            delta = idx - hi
            if delta > 0:
                if idx > MAX_RTP_INDEX:
                    raise KeyLifetimeError("SRTP index space (2^48) exhausted: rekey")
                # A jump past the window clears it rather than shifting by the jump.
                st.mask = ((st.mask << delta) | 1) & self._wmask if delta < self._window else 1
                st.hi = idx
            else:
                d = -delta
                if d >= self._window or (st.mask >> d) & 1:
                    raise SrtpUsageError(f"SRTP index {idx} of SSRC {ssrc:#x} already used")
                st.mask |= 1 << d
        return (st.iv_base ^ idx).to_bytes(12, "big"), idx

    def _new_tx_rtp(self, ssrc: int, seq: int) -> _Stream:
        if len(self._tx_rtp) >= self._max_streams:
            raise StreamLimitError(f"more than {self._max_streams} sending SSRCs")
        roc = self._pending_tx.pop(ssrc, 0)
        st = _Stream((roc << 16) | seq, 1, self._rtp_salt ^ (ssrc << 48))
        self._tx_rtp[ssrc] = st
        return st

    # --- SRTP receive ---------------------------------------------------------------------------

    def unprotect_rtp(self, packet: bytes) -> bytes:
        """Verify and decrypt one SRTP packet; returns the RTP packet (RFC 7714 §8.2)."""
        # Same fast-path shape as protect_rtp; state is committed only after the tag verifies.
        n = len(packet)
        if n < _MIN_RTP:
            self.stats.decode_errors += 1
            raise SrtpDecodeError("SRTP packet too short")
        b0 = packet[0]
        hlen = 12 + ((b0 & 0x0F) << 2)
        if b0 & 0x10:
            if n < hlen + 4:
                self.stats.decode_errors += 1
                raise SrtpDecodeError("RTP header extension runs past the packet")
            hlen += 4 + (((packet[hlen + 2] << 8) | packet[hlen + 3]) << 2)
        if b0 & 0xC0 != 0x80 or n < hlen + TAG_LENGTH:
            self.stats.decode_errors += 1
            raise SrtpDecodeError("not a well-formed SRTP packet")
        seq, ssrc = _unpack_seq_ssrc(packet, 2)
        st = self._rx_rtp.get(ssrc)
        if st is None:
            aad = packet[:hlen]
            return aad + self._open(aad, packet[hlen:], seq, ssrc)[0]
        hi = st.hi
        s_l = hi & 0xFFFF
        idx = hi - s_l + seq
        if s_l < 0x8000:
            if seq - s_l > 0x8000 and idx >= 0x10000:
                idx -= 0x10000
        elif s_l - 0x8000 > seq:
            idx += 0x10000
        delta = idx - hi
        if delta > 0:
            if idx > MAX_RTP_INDEX:
                self.stats.lifetime_errors += 1
                raise KeyLifetimeError("SRTP index beyond 2^48")
        elif -delta >= self._window or (st.mask >> -delta) & 1:
            self.stats.replays += 1
            raise ReplayError(f"SRTP replay or too old: index {idx} of SSRC {ssrc:#x}")
        aad = packet[:hlen]
        try:
            plain = self._rtp_decrypt((st.iv_base ^ idx).to_bytes(12, "big"), packet[hlen:], aad)
        except InvalidTag:
            self.stats.auth_failures += 1
            raise AuthenticationError("SRTP authentication failed") from None
        if delta > 0:
            # A jump past the window clears it rather than shifting by the jump.
            st.mask = ((st.mask << delta) | 1) & self._wmask if delta < self._window else 1
            st.hi = idx
        else:
            st.mask |= 1 << -delta
        return aad + plain

    def unprotect_rtp_index(self, packet: bytes) -> tuple[bytes, int]:
        """:meth:`unprotect_rtp`, also returning the 48-bit packet index used."""
        hlen = _rtp_header_length(packet)
        if hlen < 0 or len(packet) < hlen + TAG_LENGTH:
            self.stats.decode_errors += 1
            raise SrtpDecodeError("not a well-formed SRTP packet")
        aad = packet[:hlen]
        seq, ssrc = _unpack_seq_ssrc(packet, 2)
        plain, idx = self._open(aad, packet[hlen:], seq, ssrc)
        return aad + plain, idx

    def unprotect_rtp_split(self, packet: bytes) -> tuple[int, bytes]:
        """:meth:`unprotect_rtp`, also returning the RTP header length: ``(hlen, rtp)``."""
        hlen = _rtp_header_length(packet)
        if hlen < 0 or len(packet) < hlen + TAG_LENGTH:
            self.stats.decode_errors += 1
            raise SrtpDecodeError("not a well-formed SRTP packet")
        aad = packet[:hlen]
        seq, ssrc = _unpack_seq_ssrc(packet, 2)
        return hlen, aad + self._open(aad, packet[hlen:], seq, ssrc)[0]

    def open_rtp(self, header: bytes, body: bytes) -> bytes:
        """Verify and decrypt ``body`` (ciphertext || tag) with ``header`` as the AAD; returns the
        plaintext payload. Index, ROC and replay state as in :meth:`unprotect_rtp`.

        The inverse of :meth:`seal_rtp` (RFC 8723 inner layer: the header is the synthetic one).
        """
        if len(header) < 12 or header[0] & 0xC0 != 0x80 or len(body) < TAG_LENGTH:
            self.stats.decode_errors += 1
            raise SrtpDecodeError("not a well-formed SRTP header and body")
        seq, ssrc = _unpack_seq_ssrc(header, 2)
        return self._open(header, body, seq, ssrc)[0]

    def _open(self, aad: bytes, body: bytes, seq: int, ssrc: int) -> tuple[bytes, int]:
        """Index, replay-check, decrypt, then commit: the receive path of every variant."""
        st = self._rx_rtp.get(ssrc)
        if st is None:
            idx = (self._pending_rx.get(ssrc, 0) << 16) | seq
            iv_base = self._rtp_salt ^ (ssrc << 48)
            delta = 1
        else:
            hi = st.hi
            idx = _guess_after(hi, seq)
            delta = idx - hi
            if delta > 0:
                if idx > MAX_RTP_INDEX:
                    self.stats.lifetime_errors += 1
                    raise KeyLifetimeError("SRTP index beyond 2^48")
            elif -delta >= self._window or (st.mask >> -delta) & 1:
                self.stats.replays += 1
                raise ReplayError(f"SRTP replay or too old: index {idx} of SSRC {ssrc:#x}")
            iv_base = st.iv_base
        try:
            plain = self._rtp_decrypt((iv_base ^ idx).to_bytes(12, "big"), body, aad)
        except InvalidTag:
            self.stats.auth_failures += 1
            raise AuthenticationError("SRTP authentication failed") from None
        if st is None:
            if len(self._rx_rtp) >= self._max_streams:
                self.stats.stream_limit_drops += 1
                raise StreamLimitError(f"more than {self._max_streams} receiving SSRCs")
            self._pending_rx.pop(ssrc, None)
            self._rx_rtp[ssrc] = _Stream(idx, 1, iv_base)
        elif delta > 0:
            # A jump past the window clears it rather than shifting by the jump.
            st.mask = ((st.mask << delta) | 1) & self._wmask if delta < self._window else 1
            st.hi = idx
        else:
            st.mask |= 1 << -delta
        return plain, idx

    # --- SRTP with an explicit index (no state) ----------------------------------------------

    def protect_rtp_with_index(
        self, packet: bytes, index: int, header_length: int | None = None
    ) -> bytes:
        """Encrypt with a caller-chosen 48-bit index; no ROC tracking or reuse check."""
        hlen = _rtp_header_length(packet) if header_length is None else header_length
        if hlen < 12 or hlen > len(packet) or packet[0] & 0xC0 != 0x80:
            raise SrtpUsageError("not a well-formed RTP version 2 packet")
        if not 0 <= index <= MAX_RTP_INDEX:
            raise SrtpUsageError(f"SRTP index out of range: {index}")
        ssrc = _unpack_u32(packet, 8)[0]
        iv = (self._rtp_salt ^ (ssrc << 48) ^ index).to_bytes(12, "big")
        aad = packet[:hlen]
        return aad + self._rtp_encrypt(iv, packet[hlen:], aad)

    def unprotect_rtp_with_index(
        self, packet: bytes, index: int, header_length: int | None = None
    ) -> bytes:
        """Verify and decrypt with a caller-chosen 48-bit index; no replay check or state."""
        if not 0 <= index <= MAX_RTP_INDEX:
            raise SrtpUsageError(f"SRTP index out of range: {index}")
        hlen = _rtp_header_length(packet) if header_length is None else header_length
        if hlen < 12 or len(packet) < hlen + TAG_LENGTH or packet[0] & 0xC0 != 0x80:
            self.stats.decode_errors += 1
            raise SrtpDecodeError("not a well-formed SRTP packet")
        ssrc = _unpack_u32(packet, 8)[0]
        iv = (self._rtp_salt ^ (ssrc << 48) ^ index).to_bytes(12, "big")
        aad = packet[:hlen]
        try:
            return aad + self._rtp_decrypt(iv, packet[hlen:], aad)
        except InvalidTag:
            self.stats.auth_failures += 1
            raise AuthenticationError("SRTP authentication failed") from None

    # --- SRTCP ----------------------------------------------------------------------------------

    def protect_rtcp(self, packet: bytes) -> bytes:
        """Encrypt and authenticate one RTCP compound packet with E=1 (RFC 7714 §9.2, D19)."""
        if len(packet) < 8 or packet[0] & 0xC0 != 0x80:
            raise SrtpUsageError("not a well-formed RTCP packet")
        ssrc = _unpack_u32(packet, 4)[0]
        st = self._tx_rtcp.get(ssrc)
        if st is None:
            if len(self._tx_rtcp) >= self._max_streams:
                raise StreamLimitError(f"more than {self._max_streams} sending SSRCs")
            # RFC 3711 §3.3.2: the SRTCP index starts at zero.
            st = self._tx_rtcp[ssrc] = _Stream(-1, 0, self._rtcp_salt ^ (ssrc << 48))
        idx = st.hi + 1
        if idx > MAX_RTCP_INDEX:
            raise KeyLifetimeError("SRTCP index space (2^31) exhausted: rekey")
        st.hi = idx
        word = _pack_u32(0x80000000 | idx)
        head = packet[:8]
        iv = (st.iv_base ^ idx).to_bytes(12, "big")
        return head + self._rtcp_encrypt(iv, packet[8:], head + word) + word

    def protect_rtcp_with_index(self, packet: bytes, index: int, *, encrypt: bool = True) -> bytes:
        """SRTCP with a caller-chosen 31-bit index; ``encrypt=False`` gives E=0 (vectors only)."""
        if len(packet) < 8 or packet[0] & 0xC0 != 0x80:
            raise SrtpUsageError("not a well-formed RTCP packet")
        if not 0 <= index <= MAX_RTCP_INDEX:
            raise SrtpUsageError(f"SRTCP index out of range: {index}")
        ssrc = _unpack_u32(packet, 4)[0]
        iv = (self._rtcp_salt ^ (ssrc << 48) ^ index).to_bytes(12, "big")
        if encrypt:
            word = _pack_u32(0x80000000 | index)
            head = packet[:8]
            return head + self._rtcp_encrypt(iv, packet[8:], head + word) + word
        word = _pack_u32(index)
        return packet + self._rtcp_encrypt(iv, b"", packet + word) + word

    def unprotect_rtcp(self, packet: bytes) -> bytes:
        """Verify (and decrypt if E=1) one SRTCP packet; returns the RTCP compound packet."""
        # Fast path for the common case (E=1, known SSRC); everything else, errors included,
        # goes through unprotect_rtcp_index.
        n = len(packet)
        if n < _MIN_SRTCP or packet[0] & 0xC0 != 0x80 or not packet[n - 4] & 0x80:
            return self.unprotect_rtcp_index(packet)[0]
        st = self._rx_rtcp.get(_unpack_u32(packet, 4)[0])
        if st is None:
            return self.unprotect_rtcp_index(packet)[0]
        idx = _unpack_u32(packet, n - 4)[0] & MAX_RTCP_INDEX
        delta = idx - st.hi
        if delta <= 0 and (-delta >= self._window or (st.mask >> -delta) & 1):
            self.stats.replays += 1
            raise ReplayError(f"SRTCP replay or too old: index {idx}")
        head = packet[:8]
        try:
            plain = self._rtcp_decrypt(
                (st.iv_base ^ idx).to_bytes(12, "big"), packet[8 : n - 4], head + packet[n - 4 :]
            )
        except InvalidTag:
            self.stats.auth_failures += 1
            raise AuthenticationError("SRTCP authentication failed") from None
        if delta > 0:
            st.mask = ((st.mask << delta) | 1) & self._wmask if delta < self._window else 1
            st.hi = idx
        else:
            st.mask |= 1 << -delta
        return head + plain

    def unprotect_rtcp_index(self, packet: bytes) -> tuple[bytes, int, bool]:
        """:meth:`unprotect_rtcp`, also returning the SRTCP index and the E flag."""
        n = len(packet)
        if n < _MIN_SRTCP or packet[0] & 0xC0 != 0x80:
            self.stats.decode_errors += 1
            raise SrtpDecodeError("not a well-formed SRTCP packet")
        ssrc = _unpack_u32(packet, 4)[0]
        word = _unpack_u32(packet, n - 4)[0]
        idx = word & MAX_RTCP_INDEX
        st = self._rx_rtcp.get(ssrc)
        if st is not None:
            delta = idx - st.hi
            if delta <= 0 and (-delta >= self._window or (st.mask >> -delta) & 1):
                self.stats.replays += 1
                raise ReplayError(f"SRTCP replay or too old: index {idx} of SSRC {ssrc:#x}")
            iv_base = st.iv_base
        else:
            iv_base = self._rtcp_salt ^ (ssrc << 48)
        iv = (iv_base ^ idx).to_bytes(12, "big")
        trailer = packet[n - 4 :]
        encrypted = bool(word & 0x80000000)
        try:
            if encrypted:
                head = packet[:8]
                out = head + self._rtcp_decrypt(iv, packet[8 : n - 4], head + trailer)
            else:
                out = packet[: n - 4 - TAG_LENGTH]
                self._rtcp_decrypt(iv, packet[n - 4 - TAG_LENGTH : n - 4], out + trailer)
        except InvalidTag:
            self.stats.auth_failures += 1
            raise AuthenticationError("SRTCP authentication failed") from None
        if st is None:
            if len(self._rx_rtcp) >= self._max_streams:
                self.stats.stream_limit_drops += 1
                raise StreamLimitError(f"more than {self._max_streams} receiving SSRCs")
            self._rx_rtcp[ssrc] = _Stream(idx, 1, iv_base)
        else:
            delta = idx - st.hi
            if delta > 0:
                # A jump past the window clears it rather than shifting by the jump.
                st.mask = ((st.mask << delta) | 1) & self._wmask if delta < self._window else 1
                st.hi = idx
            else:
                st.mask |= 1 << -delta
        return out, idx, encrypted

    # --- state access ---------------------------------------------------------------------------

    def send_roc(self, ssrc: int) -> int | None:
        """ROC of the highest index sent for ``ssrc`` (what an EKT tag carries), or None."""
        st = self._tx_rtp.get(ssrc)
        if st is None:
            return self._pending_tx.get(ssrc)
        return st.hi >> 16

    def receive_roc(self, ssrc: int) -> int | None:
        """ROC of the highest index received for ``ssrc``, or None."""
        st = self._rx_rtp.get(ssrc)
        if st is None:
            return self._pending_rx.get(ssrc)
        return st.hi >> 16

    def send_index(self, ssrc: int) -> int | None:
        """Highest 48-bit SRTP index sent for ``ssrc``, or None."""
        st = self._tx_rtp.get(ssrc)
        return None if st is None else st.hi

    def receive_index(self, ssrc: int) -> int | None:
        """Highest 48-bit SRTP index received for ``ssrc``, or None."""
        st = self._rx_rtp.get(ssrc)
        return None if st is None else st.hi

    def set_send_roc(self, ssrc: int, roc: int) -> None:
        """Use ``roc`` for the next RTP packet sent with ``ssrc``."""
        self._set_roc(self._tx_rtp, self._pending_tx, ssrc, roc)

    def set_receive_roc(self, ssrc: int, roc: int) -> None:
        """Expect ``roc`` for the next RTP packet received with ``ssrc`` (e.g. from EKT)."""
        self._set_roc(self._rx_rtp, self._pending_rx, ssrc, roc)

    def _set_roc(
        self, streams: dict[int, _Stream], pending: dict[int, int], ssrc: int, roc: int
    ) -> None:
        if not 0 <= roc <= 0xFFFFFFFF:
            raise SrtpUsageError(f"ROC out of range: {roc}")
        if not 0 <= ssrc <= 0xFFFFFFFF:
            raise SrtpUsageError(f"SSRC out of range: {ssrc}")
        st = streams.get(ssrc)
        if st is None:
            if len(pending) >= self._max_streams and ssrc not in pending:
                raise StreamLimitError(f"more than {self._max_streams} pending ROCs")
            pending[ssrc] = roc
        elif st.hi >> 16 != roc:
            # A different ROC invalidates the window's positions: start a fresh window at
            # (roc, last SEQ) with nothing marked, so the packet carrying it is accepted.
            st.hi = (roc << 16) | (st.hi & 0xFFFF)
            st.mask = 0

    def forget_ssrc(self, ssrc: int) -> None:
        """Drop all state of ``ssrc`` (both directions, RTP and RTCP)."""
        for table in (self._tx_rtp, self._rx_rtp, self._tx_rtcp, self._rx_rtcp):
            table.pop(ssrc, None)
        self._pending_tx.pop(ssrc, None)
        self._pending_rx.pop(ssrc, None)


def _guess_after(hi: int, seq: int) -> int:
    """The index of SEQ relative to ``hi`` (RFC 3711 Appendix A, ROC -1 read as 0)."""
    s_l = hi & 0xFFFF
    idx = hi - s_l + seq
    if s_l < 0x8000:
        if seq - s_l > 0x8000 and idx >= 0x10000:
            idx -= 0x10000
    elif s_l - 0x8000 > seq:
        idx += 0x10000
    return idx
