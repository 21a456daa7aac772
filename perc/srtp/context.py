"""AES-GCM SRTP and SRTCP (RFC 7714) for one master key: :class:`SrtpSession`.

Theory of operation
-------------------
A session holds one master key and salt (AEAD_AES_128_GCM for a 16-byte key,
AEAD_AES_256_GCM for a 32-byte key), derives the SRTP and SRTCP session keys once with the
RFC 3711 KDF (KDR 0, 12-byte salt zero-extended, D13; see :mod:`perc.srtp.keys`) and keeps one
``AESGCM`` object per session key for its whole life: no cipher is ever built per packet.

Per-SSRC state lives inside the session, separately for the send and the receive side and for
RTP and RTCP, because one master key may serve several SSRCs (a receiver hears every SSRC of
its peer under one key): one :class:`~perc.srtp.index.SrtpStream` each, the index core that
guesses indexes (RFC 3711 Appendix A), keeps the replay window (default 128, at least 64),
enforces the limits (2^48 SRTP, 2^31 SRTCP indexes per key, RFC 7714 §8.4, §9.4) and makes the
nonces. On the send side RFC 7714 §8.4 requires that no (SSRC, ROC, SEQ) triple is ever used
twice under one key; the send side therefore keeps the same window and refuses
(``SrtpUsageError``) to protect an index a second time, as libsrtp does. A new SSRC starts with
ROC 0 and the SEQ of its first packet, or with a ROC the caller set beforehand
(``set_receive_roc``/``set_send_roc``, e.g. from an EKT tag). Receive state is created and
moved only after the tag verifies, so forged packets never create a stream. The number of
SSRCs per direction is bounded (``max_streams``).

Packet layout. SRTP AAD is the whole RTP header (fixed part, CSRCs, header extension); the
plaintext is the rest (payload, RTP padding, pad count). SRTCP with E=1: AAD = first 8 octets |
ESRTCP word, plaintext = the rest of the compound packet, packet = 8 octets | ciphertext+tag |
ESRTCP word. With E=0 (authentication only): AAD = whole RTCP packet | ESRTCP word, packet =
RTCP | tag | ESRTCP word. perc always sends E=1 (D19) and accepts both. No MKI (EKT forbids it).

Header parsing happens once per packet: the whole-packet calls read the header length inline,
and the part calls (``open_rtp``, ``send_stream``) take a header their caller has already
parsed, so a Media Distributor hands one inbound parse on to every receiver's encryption.

API
---
``SrtpSession(master_key, master_salt, *, replay_window=128, max_streams=1024)`` or
``SrtpSession.from_session_keys(SessionKeys(...), ...)`` (the RFC 7714 vectors give session
keys). Properties: ``profile`` (``SrtpProfile.AEAD_AES_128_GCM`` / ``_256_GCM``), ``stats``.

Per-packet calls (state tracked per SSRC):

- ``protect_rtp(packet) -> bytes`` / ``unprotect_rtp(packet) -> bytes``
- ``send_stream(ssrc, seq) -> SrtpStream``: the send state of ``ssrc`` (made on first use,
  starting at ``seq``); ``stream.seal(seq, payload, header)`` gives ``ct || tag`` for a packet
  whose header the caller holds apart (the MD's per-receiver encryption, the double sender).
- ``open_rtp(ssrc, seq, header, body) -> payload``: :meth:`unprotect_rtp` for a packet already
  split into header and ``ct || tag``.
- ``protect_rtcp(packet) -> bytes`` (E=1, next SRTCP index of the sender SSRC)
- ``unprotect_rtcp(packet) -> bytes``

State access: ``send_roc(ssrc)``, ``receive_roc(ssrc)`` (``None`` for an unknown SSRC),
``receive_index(ssrc)`` (highest index), ``set_send_roc(ssrc, roc)``,
``set_receive_roc(ssrc, roc)`` (applies to the next packet of that SSRC; on a known stream it
replaces the ROC and clears the replay window).

Errors (:mod:`perc.srtp.errors`): ``unprotect_*`` and ``open_rtp`` raise only
``SrtpDecodeError``, ``AuthenticationError``, ``ReplayError``, ``KeyLifetimeError`` and
``StreamLimitError``, each also counted in ``stats``; ``protect_*``, ``send_stream`` and
``seal`` raise ``SrtpUsageError`` (malformed packet, index reuse), ``KeyLifetimeError`` and
``StreamLimitError``.
"""

from __future__ import annotations

import struct

import attrs
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from perc.srtp.errors import (
    AuthenticationError,
    KeyLifetimeError,
    ReplayError,
    SrtpDecodeError,
    SrtpError,
    SrtpUsageError,
    StreamLimitError,
)
from perc.srtp.index import MAX_RTCP_INDEX, MAX_RTP_INDEX, SrtpStream, iv_base
from perc.srtp.keys import GCM_SALT_LENGTH, SessionKeys, SrtpProfile, derive_session_keys

__all__ = [
    "MAX_RTCP_INDEX",
    "MAX_RTP_INDEX",
    "TAG_LENGTH",
    "SrtpSession",
    "SrtpStats",
]

TAG_LENGTH = 16  # RFC 7714 §13.2: the full 16-octet tag, no truncation
_MIN_RTP = 12 + TAG_LENGTH
_MIN_SRTCP = 8 + TAG_LENGTH + 4

# SEQ at offset 2 and SSRC at offset 8 of the RTP header, in one unpack.
_unpack_seq_ssrc = struct.Struct("!H4xI").unpack_from
_U32 = struct.Struct("!I")
_unpack_u32 = _U32.unpack_from


@attrs.define
class SrtpStats:
    """Counters of packets a session refused (every drop is counted, STYLE 8)."""

    decode_errors: int = 0
    auth_failures: int = 0
    replays: int = 0
    lifetime_errors: int = 0
    stream_limit_drops: int = 0

    def count(self, exc: SrtpError) -> None:
        """Count a refused packet by the error that refused it."""
        if isinstance(exc, AuthenticationError):
            self.auth_failures += 1
        elif isinstance(exc, ReplayError):
            self.replays += 1
        elif isinstance(exc, KeyLifetimeError):
            self.lifetime_errors += 1
        elif isinstance(exc, StreamLimitError):
            self.stream_limit_drops += 1
        else:
            self.decode_errors += 1


class SrtpSession:
    """One AES-GCM SRTP/SRTCP master key with per-SSRC send and receive state."""

    __slots__ = (
        "_max_streams",
        "_pending_rx",
        "_pending_tx",
        "_profile",
        "_rtcp_aead",
        "_rtcp_salt",
        "_rtp_aead",
        "_rtp_salt",
        "_rx_rtcp",
        "_rx_rtp",
        "_tx_rtcp",
        "_tx_rtp",
        "_window",
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
        self._rtp_aead = AESGCM(keys.rtp_key)
        self._rtcp_aead = AESGCM(keys.rtcp_key)
        self._rtp_salt = int.from_bytes(keys.rtp_salt, "big")
        self._rtcp_salt = int.from_bytes(keys.rtcp_salt, "big")
        self._window = replay_window
        self._max_streams = max_streams
        self._tx_rtp: dict[int, SrtpStream] = {}
        self._rx_rtp: dict[int, SrtpStream] = {}
        self._tx_rtcp: dict[int, SrtpStream] = {}
        self._rx_rtcp: dict[int, SrtpStream] = {}
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
        # The header length is read inline (the rule of perc.wire.rtp.rtp_header_length): a
        # call level costs as much here as the rest of the parsing.
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
        aad = packet[:hlen]
        st = self._tx_rtp.get(ssrc) or self.send_stream(ssrc, seq)
        return aad + st.seal(seq, packet[hlen:], aad)

    def send_stream(self, ssrc: int, seq: int) -> SrtpStream:
        """The send state of RTP ``ssrc``; a new one starts at ``seq`` (with the ROC set by
        :meth:`set_send_roc`, else 0). ``StreamLimitError`` beyond ``max_streams``."""
        st = self._tx_rtp.get(ssrc)
        if st is None:
            if len(self._tx_rtp) >= self._max_streams:
                raise StreamLimitError(f"more than {self._max_streams} sending SSRCs")
            roc = self._pending_tx.pop(ssrc, 0)
            st = self._tx_rtp[ssrc] = SrtpStream(
                (roc << 16) | seq, iv_base(self._rtp_salt, ssrc), self._rtp_aead, self._window
            )
        return st

    # --- SRTP receive ---------------------------------------------------------------------------

    def unprotect_rtp(self, packet: bytes) -> bytes:
        """Verify and decrypt one SRTP packet; returns the RTP packet (RFC 7714 §8.2)."""
        # Same inline header read as protect_rtp.
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
        aad = packet[:hlen]
        st = self._rx_rtp.get(ssrc)
        if st is None:
            return aad + self._open_new(ssrc, seq, aad, packet[hlen:])
        try:
            return aad + st.open(seq, packet[hlen:], aad)
        except SrtpError as exc:
            self.stats.count(exc)
            raise

    def open_rtp(self, ssrc: int, seq: int, header: bytes, body: bytes) -> bytes:
        """Verify and decrypt ``body`` (``ct || tag``) of an SRTP packet whose RTP header
        ``header`` (with ``seq`` and ``ssrc``) the caller has parsed; returns the payload.

        The caller checked that ``header`` is a whole RTP header; ``body`` shorter than a tag
        is a ``SrtpDecodeError``. Index, replay and stream state as in :meth:`unprotect_rtp`.
        """
        if len(body) < TAG_LENGTH:
            self.stats.decode_errors += 1
            raise SrtpDecodeError("SRTP packet too short for its tag")
        st = self._rx_rtp.get(ssrc)
        if st is None:
            return self._open_new(ssrc, seq, header, body)
        try:
            return st.open(seq, body, header)
        except SrtpError as exc:
            self.stats.count(exc)
            raise

    def _open_new(self, ssrc: int, seq: int, aad: bytes, body: bytes) -> bytes:
        """First packet of ``ssrc``: the stream exists only once the tag verified."""
        roc = self._pending_rx.get(ssrc, 0)
        st = SrtpStream(
            (roc << 16) | seq, iv_base(self._rtp_salt, ssrc), self._rtp_aead, self._window
        )
        try:
            plain = st.open(seq, body, aad)
            if len(self._rx_rtp) >= self._max_streams:
                raise StreamLimitError(f"more than {self._max_streams} receiving SSRCs")
        except SrtpError as exc:
            self.stats.count(exc)
            raise
        self._pending_rx.pop(ssrc, None)
        self._rx_rtp[ssrc] = st
        return plain

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
            # RFC 3711 §3.3.2: the SRTCP index starts at zero (seal_rtcp sends hi + 1).
            st = self._tx_rtcp[ssrc] = SrtpStream(
                -1, iv_base(self._rtcp_salt, ssrc), self._rtcp_aead, self._window
            )
        return st.seal_rtcp(packet[:8], packet[8:])

    def unprotect_rtcp(self, packet: bytes) -> bytes:
        """Verify (and decrypt if E=1) one SRTCP packet; returns the RTCP compound packet."""
        n = len(packet)
        if n < _MIN_SRTCP or packet[0] & 0xC0 != 0x80:
            self.stats.decode_errors += 1
            raise SrtpDecodeError("not a well-formed SRTCP packet")
        ssrc = _unpack_u32(packet, 4)[0]
        word = _unpack_u32(packet, n - 4)[0]
        idx = word & MAX_RTCP_INDEX
        trailer = packet[n - 4 :]
        st = self._rx_rtcp.get(ssrc)
        new = st is None
        if st is None:
            # A new SSRC: the stream exists only once the tag verified.
            st = SrtpStream(idx, iv_base(self._rtcp_salt, ssrc), self._rtcp_aead, self._window)
        try:
            if word & 0x80000000:
                head = packet[:8]
                out = head + st.open_rtcp(idx, packet[8 : n - 4], head + trailer)
            else:
                out = packet[: n - 4 - TAG_LENGTH]
                st.open_rtcp(idx, packet[n - 4 - TAG_LENGTH : n - 4], out + trailer)
            if new:
                if len(self._rx_rtcp) >= self._max_streams:
                    raise StreamLimitError(f"more than {self._max_streams} receiving SSRCs")
                self._rx_rtcp[ssrc] = st
        except SrtpError as exc:
            self.stats.count(exc)
            raise
        return out

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
        self, streams: dict[int, SrtpStream], pending: dict[int, int], ssrc: int, roc: int
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
            # (roc, last SEQ) with nothing used, so the packet carrying it is accepted.
            st.restart((roc << 16) | (st.hi & 0xFFFF))
