"""The SRTP index core: index guessing, replay window, send limits and nonces, written once.

Theory of operation
-------------------
AES-GCM is only safe while no (key, nonce) pair is used twice (RFC 7714 §8.4, §9.4). In SRTP
the nonce is made from the SSRC and the packet index, so what keeps nonces unique is the
index bookkeeping: the guess of a packet's index from its 16-bit SEQ, the window of indexes
already used, and the end of the index space. Every SRTP user in perc (``SrtpSession``'s
protect/unprotect of RTP and RTCP, the double transform's sender, the Media Distributor's
hop and forwarding table) goes through :class:`SrtpStream`, so that logic exists only here.

One :class:`SrtpStream` is the state of one SSRC in one direction (sending or receiving) of RTP
or SRTCP under one session key: RFC 3711 §3.2.3 keeps a cryptographic context per SSRC.

- **Index** (RFC 3711 §3.3.1, Appendix A). The 48-bit SRTP index is ``ROC << 16 | SEQ``; a
  packet's index is guessed from its SEQ and ``hi``, the highest index used so far, by
  :func:`guess_index` (ROC - 1, ROC or ROC + 1, whichever puts the packet within 2^15 of
  ``hi``; a guess of ROC -1, only possible while ROC is 0, means ROC 0, as libsrtp does).
  SRTCP carries its 31-bit index explicitly (RFC 3711 §3.4) and needs no guess.
- **Window** (RFC 3711 §3.3.2). ``holes`` has bit ``d`` set when index ``hi - d`` (``d`` below
  the window size) has *not* been used. A new stream starts at its first index with every bit
  set (nothing used yet, so packets reordered before the first one are still accepted). The
  bits record the holes rather than the used indexes so that a stream without loss or
  reordering keeps ``holes == 0`` and moves on without any arithmetic on a 128-bit integer
  (which costs as much as the rest of the bookkeeping). A jump past the window clears it
  instead of shifting by the jump (an SRTCP index may jump by up to 2^31). The receive side
  checks before decrypting and commits only after the tag verifies (:meth:`SrtpStream.open`),
  so forged packets never move the window; the send side refuses an index a second time
  (``SrtpUsageError``), as libsrtp does, because an MD forwards whatever order packets arrive in.
- **Limits.** At most 2^48 SRTP and 2^31 SRTCP indexes per key (RFC 7714 §8.4, §9.4); beyond
  that :class:`~perc.srtp.errors.KeyLifetimeError`: the key must change.
- **Nonce** (RFC 7714 §8.1, §9.1). ``IV = (00 00 | SSRC | ROC | SEQ) XOR salt`` for SRTP and
  ``(00 00 | SSRC | 00 00 | 0 | SRTCP index) XOR salt`` for SRTCP: both are one integer XOR of
  the stream's ``iv_base`` (``salt ^ SSRC << 48``, :func:`iv_base`, computed once) with the
  index, as 12 big-endian bytes (``int.to_bytes``' default byte order since Python 3.11).

Fast paths. :meth:`SrtpStream.seal` and :meth:`SrtpStream.open` handle the usual packet, the
next SEQ in order, in their own body (for it Appendix A gives ``hi + 1``; a test checks this
against :func:`guess_index` for every SEQ); everything else goes through the general
:meth:`~SrtpStream.send_index` / :meth:`~SrtpStream.receive_index` and :meth:`~SrtpStream.accept`.
The stream holds its session's AEAD functions (one cached ``AESGCM`` object per session key,
never one per packet), so a protected packet costs one Python call plus the AEAD call.

API
---
``guess_index(hi, seq) -> int``; ``iv_base(salt, ssrc) -> int``; ``MAX_RTP_INDEX``,
``MAX_RTCP_INDEX``.

``SrtpStream(first_index, iv_base, aead, window)``; attributes ``hi`` (highest index used) and
``holes``. RTP: ``seal(seq, payload, aad) -> ct||tag``, ``open(seq, body, aad) -> payload``
(raises ``AuthenticationError``, ``ReplayError``, ``KeyLifetimeError``); ``send_index(seq)``;
``receive_index(seq)``; ``reseal(idx, payload, aad)`` (a repair at a used index). SRTCP:
``seal_rtcp(head, payload) -> packet``, ``open_rtcp(index, body, aad) -> payload``. Both:
``unused(index)``, ``accept(index)``, ``nonce(index)``, ``restart(index)``.
"""

from __future__ import annotations

import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from perc.srtp.errors import AuthenticationError, KeyLifetimeError, ReplayError, SrtpUsageError

__all__ = ["MAX_RTCP_INDEX", "MAX_RTP_INDEX", "SrtpStream", "guess_index", "iv_base"]

MAX_RTP_INDEX = (1 << 48) - 1  # RFC 7714 §8.4
MAX_RTCP_INDEX = (1 << 31) - 1  # RFC 7714 §9.4

_pack_u32 = struct.Struct("!I").pack


def guess_index(hi: int, seq: int) -> int:
    """The index of a packet with ``seq``, given the highest index ``hi`` (RFC 3711 App. A).

    ROC - 1 can only come out while ROC is 0; it is read as ROC 0, as libsrtp does.
    """
    s_l = hi & 0xFFFF
    idx = hi - s_l + seq
    if s_l < 0x8000:
        if seq - s_l > 0x8000 and idx >= 0x10000:
            idx -= 0x10000
    elif s_l - 0x8000 > seq:
        idx += 0x10000
    return idx


def iv_base(salt: int, ssrc: int) -> int:
    """``salt ^ SSRC << 48``: the part of every nonce of one SSRC that does not change
    (RFC 7714 §8.1, §9.1; ``salt`` is the 12-byte session salt as a big-endian integer)."""
    return salt ^ (ssrc << 48)


class SrtpStream:
    """Index, window and nonce of one SSRC in one direction under one session key."""

    __slots__ = ("_decrypt", "_encrypt", "_iv_base", "_window", "_wmask", "hi", "holes")

    def __init__(self, first_index: int, iv_base: int, aead: AESGCM, window: int) -> None:
        if not 64 <= window <= 0x8000:
            # RFC 3711 §3.3.2: at least 64; beyond 2^15 the index guess cannot reach anyway.
            raise SrtpUsageError(f"replay window must be 64..32768, got {window}")
        self._window = window
        self._wmask = (1 << window) - 1
        #: highest index used (RTP: ROC << 16 | SEQ; SRTCP: the SRTCP index)
        self.hi = first_index
        #: bit d set: index hi - d is not used yet (nothing is, at the start)
        self.holes = self._wmask
        self._iv_base = iv_base
        self._encrypt = aead.encrypt
        self._decrypt = aead.decrypt

    def __repr__(self) -> str:
        return f"<SrtpStream hi={self.hi:#x}>"

    # --- RTP: one call per packet -----------------------------------------------------------

    def seal(self, seq: int, payload: bytes, aad: bytes) -> bytes:
        """Encrypt the payload of an RTP packet sent with ``seq``: ``ciphertext || tag``.

        The index is guessed, refused if already used or past 2^48, and committed.
        """
        idx = self.hi + 1
        if idx & 0xFFFF == seq and idx <= MAX_RTP_INDEX:
            # The next SEQ in order: Appendix A gives hi + 1, above everything used.
            self.hi = idx
            if self.holes:
                self.holes = (self.holes << 1) & self._wmask
        else:
            idx = self.send_index(seq)
        return self._encrypt((self._iv_base ^ idx).to_bytes(12), payload, aad)

    def open(self, seq: int, body: bytes, aad: bytes) -> bytes:
        """Verify and decrypt ``body`` (``ciphertext || tag``) of an RTP packet with ``seq``.

        Replay and index space are checked first; the window moves only after the tag
        verified. Raises ``AuthenticationError``, ``ReplayError`` or ``KeyLifetimeError``.
        """
        idx = self.hi + 1
        try:
            if idx & 0xFFFF == seq and idx <= MAX_RTP_INDEX:
                # The next SEQ in order (see seal): never a replay.
                plain = self._decrypt((self._iv_base ^ idx).to_bytes(12), body, aad)
                self.hi = idx
                if self.holes:
                    self.holes = (self.holes << 1) & self._wmask
                return plain
            idx = self.receive_index(seq)
            plain = self._decrypt(self.nonce(idx), body, aad)
        except InvalidTag:
            raise AuthenticationError("SRTP authentication failed") from None
        self.accept(idx)
        return plain

    def reseal(self, idx: int, payload: bytes, aad: bytes) -> bytes:
        """``ct || tag`` of an RTP packet sealed again at ``idx``, an index this stream has
        already used (a repair, RFC 8723 §7). The caller must give the payload and header of
        the first sealing: the same key, nonce and input give the same bytes, so nothing new is
        encrypted under a used nonce. An index not used yet is refused (``SrtpUsageError``):
        spending it here could let a later ``seal`` use it for another packet."""
        if not 0 <= idx <= self.hi or self.unused(idx):
            raise SrtpUsageError(f"SRTP index {idx} was never sealed: no repair under it")
        return self._encrypt((self._iv_base ^ idx).to_bytes(12), payload, aad)

    def send_index(self, seq: int) -> int:
        """Index of an RTP packet we send with ``seq``, committed (RFC 7714 §8.4: never the
        same index twice under one key; ``SrtpUsageError`` if it was used)."""
        idx = guess_index(self.hi, seq)
        if idx > MAX_RTP_INDEX:
            raise KeyLifetimeError("SRTP index space (2^48) exhausted: rekey")
        if not self.unused(idx):
            raise SrtpUsageError(f"SRTP index {idx} already used: IV reuse refused")
        self.accept(idx)
        return idx

    def receive_index(self, seq: int) -> int:
        """Index of a received RTP packet with ``seq``, checked but not committed."""
        idx = guess_index(self.hi, seq)
        if idx > MAX_RTP_INDEX:
            raise KeyLifetimeError("SRTP index beyond 2^48")
        if not self.unused(idx):
            raise ReplayError(f"SRTP replay or too old: index {idx}")
        return idx

    # --- SRTCP: one call per packet -----------------------------------------------------------

    def seal_rtcp(self, head: bytes, payload: bytes) -> bytes:
        """The SRTCP packet (E=1, RFC 7714 §9.2) of an RTCP compound whose first 8 octets are
        ``head``: ``head || ct || tag || E | SRTCP index``, with the next index we send (a
        counter from 0, RFC 3711 §3.3.2; the send stream needs no window)."""
        idx = self.hi + 1
        if idx > MAX_RTCP_INDEX:
            raise KeyLifetimeError("SRTCP index space (2^31) exhausted: rekey")
        self.hi = idx
        word = _pack_u32(0x80000000 | idx)
        return head + self._encrypt((self._iv_base ^ idx).to_bytes(12), payload, head + word) + word

    def open_rtcp(self, idx: int, body: bytes, aad: bytes) -> bytes:
        """Verify and decrypt ``body`` of an SRTCP packet with the explicit index ``idx``
        (E=1: ``ct || tag``; E=0: only the tag, the plaintext is then empty); replay checked
        first, window moved after the tag verified."""
        in_order = idx == self.hi + 1  # the usual packet: never a replay
        if not in_order and not self.unused(idx):
            raise ReplayError(f"SRTCP replay or too old: index {idx}")
        try:
            plain = self._decrypt((self._iv_base ^ idx).to_bytes(12), body, aad)
        except InvalidTag:
            raise AuthenticationError("SRTCP authentication failed") from None
        if in_order:
            self.hi = idx
            if self.holes:
                self.holes = (self.holes << 1) & self._wmask
        else:
            self.accept(idx)
        return plain

    # --- the general rules --------------------------------------------------------------------

    def unused(self, idx: int) -> bool:
        """Is ``idx`` above the highest index, or inside the window and not used yet?"""
        d = self.hi - idx
        return d < 0 or (d < self._window and (self.holes >> d) & 1 == 1)

    def accept(self, idx: int) -> None:
        """Mark ``idx`` used (the caller checked :meth:`unused`; receivers after the tag)."""
        delta = idx - self.hi
        if delta > 0:
            if delta < self._window:
                # Positions hi+1 .. idx-1 become holes; idx itself is used.
                self.holes = ((self.holes << delta) | ((1 << delta) - 2)) & self._wmask
            else:
                self.holes = self._wmask - 1  # a jump past the window clears it
            self.hi = idx
        else:
            self.holes &= ~(1 << -delta)

    def restart(self, idx: int) -> None:
        """Start afresh at ``idx`` with nothing used (a new ROC from EKT: the old window's
        positions mean nothing under it)."""
        self.hi = idx
        self.holes = self._wmask

    def nonce(self, idx: int) -> bytes:
        """The 12-byte AES-GCM nonce of ``idx`` (RFC 7714 §8.1 for SRTP, §9.1 for SRTCP)."""
        return (self._iv_base ^ idx).to_bytes(12)
