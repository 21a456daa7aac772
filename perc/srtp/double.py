"""Double encryption at the endpoints (RFC 8723 §5.1, §5.3) with EKT (RFC 8870).

Theory of operation
-------------------
**Sender** (:class:`DoubleSender`, RFC 8723 §5.1). For each RTP packet:

1. the *synthetic packet* is the original header with X cleared, cut to ``12 + 4*CC`` bytes
   (header extensions are hop-by-hop only), followed by the original payload including any
   RTP padding;
2. it is encrypted with the **inner** (end-to-end) session: the sender's own E2E master key
   with the conference salt of the current EKTKey (RFC 8871 §4.5.1, D10), tracking its own
   ROC per SSRC;
3. the original header (extensions, X bit) goes back in front of the inner ciphertext and
   tag, followed by the empty OHB ``0x00``;
4. that packet is encrypted with the **outer** (hop-by-hop) session, which keeps its own
   ROC per SSRC ("SEQ and ROC are tracked independently", RFC 8723 §3);
5. the EKT field from :class:`~perc.srtp.ekt.EktSender` is appended (Full or Short, §4.6 of
   RFC 8870; the Full tag carries the inner ROC, D10).

Key rotation (:meth:`DoubleSender.rekey`, RFC 8870 §4.5-4.6, RFC 8871 §4.5.2, D22): a new
EKTKey forces a fresh random E2E key. The new key is announced at once in Full tags (three
packets) under the new SPI, but the sender keeps encrypting with the old key (and the old
salt) for 250 ms, so receivers have the new key before the first packet that needs it.

**Receiver** (:class:`DoubleReceiver`, RFC 8723 §5.3). For each packet: strip and parse the EKT
field (last-byte rule); let the :class:`~perc.srtp.ekt.EktReceiver` process the tag first, as
RFC 8870 §4.3.2 orders it (it may drop the packet); verify and decrypt the outer layer with
the receiver's inbound HBH session (outer replay check); take the OHB and the inner tag off
the end; rebuild the synthetic header with the original PT/SEQ/M from the OHB; decrypt the
inner layer with the sender's key learned from EKT (inner replay check, per key). Around a
rekey a stream has more than one key: the key that last worked is tried first, then the
others (RFC 8870 §4.3.2 allows trial decryption with integrity-protected transforms).

The application view (:class:`MediaPacket`) follows RFC 8723 §5.3: the payload, marker and
timestamp come from the end-to-end protected synthetic packet; the outer PT is what the
application matches against SDP, and the outer SEQ is what it orders by. Outer header
extensions are passed along but are not end-to-end protected.

Repair mode (RTX/FEC outer-only packets, RFC 8723 §7) is not implemented.

API
---
``DoubleSender(outer_key, outer_salt, params, *, inner_key=None, period=0.1)``:
``protect(packet, now, *, keyframe=False) -> bytes``; ``rekey(params, now, *, inner_key=None)``;
``inner_key``, ``params``, ``ekt`` (the :class:`EktSender`), ``inner_roc(ssrc)``,
``outer_roc(ssrc)``. Each layer is an :class:`~perc.srtp.context.SrtpSession` (inner and
outer track SEQ and ROC independently, RFC 8723 §3); per SSRC the sender keeps the two send
streams (:class:`~perc.srtp.index.SrtpStream`) at hand, so a packet costs one header parse and
one ``seal`` per layer. The sender is the only RTP sender of its outer key, as RFC 7714 §8.4
requires. SRTCP under the same outer key goes through an ordinary SrtpSession.

``DoubleSender.for_endpoint(material, params)`` and ``DoubleReceiver.for_endpoint(material)``
build both from a DOUBLE profile's :class:`~perc.srtp.keys.KeyingMaterial` (DTLS client side).

``DoubleReceiver(outer, *, master_key_length=16)``: ``add_parameter_set(params)``;
``unprotect(packet, now) -> MediaPacket``; ``ekt`` (the :class:`EktReceiver`); ``stats``.

Errors: everything raised is a :class:`~perc.srtp.errors.SrtpError`: the session errors of
:mod:`perc.srtp.errors`, the EKT errors of :mod:`perc.srtp.ekt`, and
:class:`DoubleDecodeError` for an outer plaintext without a valid OHB and inner tag, or an
inner payload whose RTP padding count is impossible.
"""

from __future__ import annotations

import os
import struct

import attrs

from perc.srtp.context import TAG_LENGTH, SrtpSession
from perc.srtp.ekt import (
    OLD_KEY_SEND_TIME,
    EktFieldError,
    EktOutcome,
    EktParameterSet,
    EktReceiver,
    EktSender,
    EktUsageError,
    ReceivedKey,
)
from perc.srtp.errors import (
    AuthenticationError,
    ReplayError,
    SrtpDecodeError,
    SrtpError,
    SrtpUsageError,
)
from perc.srtp.index import SrtpStream
from perc.srtp.keys import KeyingMaterial
from perc.wire.ekt import SHORT, EktDecodeError, split_ekt_field
from perc.wire.ohb import OhbDecodeError, decode_ohb_fields
from perc.wire.rtp import rtp_header_length_or_negative as rtp_header_length

__all__ = [
    "DoubleDecodeError",
    "DoubleReceiver",
    "DoubleReceiverStats",
    "DoubleSender",
    "MediaPacket",
    "NoInnerKeyError",
]

_SSRC = struct.Struct("!I")
_unpack_ssrc = _SSRC.unpack_from
_unpack_seq_ssrc = struct.Struct("!H4xI").unpack_from
_INNER_SALT_LENGTH = 12
_CSRCS = [struct.Struct(f"!{cc}I").unpack_from for cc in range(16)]


class DoubleDecodeError(SrtpDecodeError):
    """An authenticated outer plaintext lacks a valid OHB/inner tag, or inner padding is bad."""


class NoInnerKeyError(AuthenticationError):
    """No end-to-end key is known for the packet's SSRC (no Full EKT tag seen yet)."""


# --- sender --------------------------------------------------------------------------------

#: SSRCs one endpoint sends (audio, video, and room for a few more).
_MAX_SEND_STREAMS = 64


class DoubleSender:
    """Double-encrypts one endpoint's RTP packets and appends EKT fields.

    ``outer_key``/``outer_salt`` are the endpoint's outer (HBH) write master key and salt (the
    second halves of its DTLS-SRTP client_write key and salt); ``params`` is the current EKT
    parameter set. The E2E key is random unless ``inner_key`` is given.
    """

    __slots__ = (
        "_ekt",
        "_inner",
        "_inner_key",
        "_outer",
        "_params",
        "_pending",
        "_rekey_ssrcs",
        "_streams",
        "_switch_at",
    )

    def __init__(
        self,
        outer_key: bytes,
        outer_salt: bytes,
        params: EktParameterSet,
        *,
        inner_key: bytes | None = None,
        period: float | None = 0.1,
    ) -> None:
        key_length = len(outer_key)
        if key_length not in (16, 32):
            raise SrtpUsageError(f"outer key must be 16 or 32 bytes, got {key_length}")
        if inner_key is None:
            # RFC 8870 §6: distinct, randomly generated master keys per sender.
            inner_key = os.urandom(key_length)
        if len(inner_key) != key_length:
            raise SrtpUsageError(f"inner key must be {key_length} bytes like the outer key")
        self._outer = _layer(outer_key, outer_salt)
        self._params = params
        self._inner_key = inner_key
        self._inner = _layer(inner_key, _inner_salt(params))
        #: per SSRC: (inner, outer) send streams of the current layers
        self._streams: dict[int, tuple[SrtpStream, SrtpStream]] = {}
        self._ekt = EktSender(params, inner_key, period=period)
        # (layer, key, params) to switch to at _switch_at, while the old key is still used
        self._pending: tuple[SrtpSession, bytes, EktParameterSet] | None = None
        self._switch_at = 0.0
        self._rekey_ssrcs: list[int] = []

    @classmethod
    def for_endpoint(
        cls, material: KeyingMaterial, params: EktParameterSet, *, period: float | None = 0.1
    ) -> DoubleSender:
        """The sender of a DTLS client endpoint: outer half of ``client_write`` (RFC 8871
        §4.5.1, §6.2); the inner half of the exporter output is not used, a fresh random E2E
        key is (RFC 8870 §6)."""
        outer = material.outer()
        return cls(outer.client_key, outer.client_salt, params, period=period)

    @property
    def inner_key(self) -> bytes:
        """The E2E master key packets are currently encrypted with."""
        return self._inner_key

    @property
    def params(self) -> EktParameterSet:
        """The EKT parameter set whose salt the current inner key uses."""
        return self._params

    @property
    def ekt(self) -> EktSender:
        return self._ekt

    def inner_roc(self, ssrc: int) -> int | None:
        """ROC of the inner (E2E) layer for ``ssrc`` (what Full EKT tags carry, D10)."""
        return self._inner.send_roc(ssrc)

    def outer_roc(self, ssrc: int) -> int | None:
        """ROC of the outer (HBH) layer for ``ssrc``."""
        return self._outer.send_roc(ssrc)

    def rekey(
        self, params: EktParameterSet | None, now: float, *, inner_key: bytes | None = None
    ) -> None:
        """Switch to a fresh E2E key (RFC 8870 §4.5; required on every new EKTKey).

        ``params`` is the new EKT parameter set (None: keep the current one and only change
        the E2E key). The new key is announced immediately in Full tags; packets keep using
        the old key for 250 ms (RFC 8870 §4.3.1, D22).
        """
        # A rekey while another is pending: the pending key has never encrypted a packet,
        # so it is simply replaced (receivers may have it, they never need it); packets go
        # on with the current key for 250 ms after this announcement.
        self._pending = None
        new_params = self._params if params is None else params
        key_length = len(self._inner_key)
        new_key = os.urandom(key_length) if inner_key is None else inner_key
        if len(new_key) != key_length:
            raise SrtpUsageError(f"inner key must be {key_length} bytes")
        layer = _layer(new_key, _inner_salt(new_params))
        # SSRCs sent so far (the EKT sender forgets them when the parameter set changes).
        self._rekey_ssrcs = self._ekt.ssrcs()
        self._ekt.change_key(new_key, params)
        self._pending = (layer, new_key, new_params)
        self._switch_at = now + OLD_KEY_SEND_TIME

    def _switch(self, now: float) -> None:
        pending = self._pending
        if pending is None or now < self._switch_at:
            return
        layer, key, params = pending
        # The RTP stream goes on: the new inner context continues each SSRC's ROC.
        for ssrc in {*self._rekey_ssrcs, *self._ekt.ssrcs()}:
            roc = self._inner.send_roc(ssrc)
            if roc is not None:
                layer.set_send_roc(ssrc, roc)
        self._inner, self._inner_key, self._params = layer, key, params
        self._streams.clear()  # their inner streams belong to the old key
        self._pending = None

    def protect(self, packet: bytes, now: float, *, keyframe: bool = False) -> bytes:
        """Double-encrypt one RTP packet and append its EKT field (``keyframe``: video)."""
        if self._pending is not None and now >= self._switch_at:
            self._switch(now)
        n = len(packet)
        b0 = packet[0] if n else 0
        hlen = 12 + ((b0 & 0x0F) << 2)
        if b0 & 0x10:
            slen = hlen
            hlen = rtp_header_length(packet)
            if hlen < 0:
                raise SrtpUsageError("not a well-formed RTP version 2 packet")
            header = packet[:hlen]
            # Synthetic header (RFC 8723 §5.1 step 3): X = 0, extension dropped.
            synth = bytes((b0 & 0xEF,)) + packet[1:slen]
        elif n < hlen or b0 & 0xC0 != 0x80:
            raise SrtpUsageError("not a well-formed RTP version 2 packet")
        else:
            header = synth = packet[:hlen]  # no extension: synthetic header = header
        seq, ssrc = _unpack_seq_ssrc(packet, 2)
        streams = self._streams.get(ssrc)
        if streams is None:
            streams = self._streams[ssrc] = (
                self._inner.send_stream(ssrc, seq),
                self._outer.send_stream(ssrc, seq),
            )
        st_in, st_out = streams
        # Inner layer over the synthetic packet, then the empty OHB 0x00 (§5.1 steps 4-5),
        # then the outer layer with the full original header as AAD (step 6). Inner and
        # outer track their indexes separately (RFC 8723 §3).
        body = st_in.seal(seq, packet[hlen:], synth)
        out = header + st_out.seal(seq, body + b"\x00", header)
        # The Full tag carries the inner stream's current ROC (RFC 8870 §4.3.1, D10).
        return out + self._ekt.field(ssrc, st_in.hi >> 16, now, keyframe)


def _layer(master_key: bytes, master_salt: bytes) -> SrtpSession:
    """One layer's send session (only its RTP send side is used)."""
    return SrtpSession(master_key, master_salt, max_streams=_MAX_SEND_STREAMS)


def _inner_salt(params: EktParameterSet) -> bytes:
    # RFC 8870 §4.3.2 step 4: a longer conference salt is cut to the transform's length.
    if len(params.salt) < _INNER_SALT_LENGTH:
        raise EktUsageError(f"conference salt of {len(params.salt)} bytes, need 12")
    return params.salt[:_INNER_SALT_LENGTH]


# --- receiver ------------------------------------------------------------------------------


@attrs.frozen
class MediaPacket:
    """The application view of a double-encrypted packet (RFC 8723 §5.3)."""

    ssrc: int
    #: outer PT: what the application matches against the SDP
    payload_type: int
    #: outer SEQ: what the application orders by
    sequence_number: int
    #: the end-to-end protected marker bit (from the OHB if an MD changed it)
    marker: bool
    timestamp: int
    csrcs: tuple[int, ...]
    #: the decrypted payload, RTP padding removed
    payload: bytes
    #: original PT and SEQ as the sender set them (statistics only)
    original_payload_type: int
    original_sequence_number: int
    #: the outer header as received (its extensions are hop-by-hop only, not E2E protected)
    header: bytes
    #: the EKT parameter set and epoch of the key that decrypted the inner layer
    spi: int
    epoch: int
    #: what the packet's EKT field did
    ekt_outcome: EktOutcome
    #: the RTP padding removed from ``payload`` (count byte included; end-to-end protected)
    padding: bytes = b""


@attrs.define
class DoubleReceiverStats:
    received: int = 0
    accepted: int = 0
    short_packets: int = 0
    ekt_field_errors: int = 0
    ohb_errors: int = 0
    no_key: int = 0
    inner_auth_failures: int = 0
    inner_replays: int = 0
    padding_errors: int = 0


class DoubleReceiver:
    """Decrypts double-encrypted packets arriving from a Media Distributor."""

    def __init__(
        self,
        outer: SrtpSession,
        *,
        master_key_length: int | None = None,
        ekt: EktReceiver | None = None,
    ) -> None:
        if master_key_length is None:
            master_key_length = outer.profile.half_key_length
        self._outer = outer
        self._ekt = ekt or EktReceiver(SrtpSession, master_key_length=master_key_length)
        self.stats = DoubleReceiverStats()

    @classmethod
    def for_endpoint(cls, material: KeyingMaterial) -> DoubleReceiver:
        """The receiver of a DTLS client endpoint: what the MD sends it is protected with the
        outer half of ``server_write`` (RFC 9185 §6.4: the MD holds the server side)."""
        outer = material.outer()
        return cls(SrtpSession(outer.server_key, outer.server_salt))

    @property
    def ekt(self) -> EktReceiver:
        return self._ekt

    @property
    def outer_session(self) -> SrtpSession:
        return self._outer

    def add_parameter_set(self, params: EktParameterSet, now: float | None = None) -> None:
        """A new EKTKey arrived (RFC 8870 §5.2.2): keep it, keys under it become readable;
        with ``now``, Full tags under its SPI that came before it are applied too
        (:meth:`EktReceiver.apply_parked`)."""
        self._ekt.add_parameter_set(params)
        if now is not None:
            self._ekt.apply_parked(params.spi, now)

    def unprotect(self, packet: bytes, now: float) -> MediaPacket:
        """Verify and decrypt both layers; raises a :class:`SrtpError` to drop the packet."""
        self.stats.received += 1
        n = len(packet)
        if n > 12 and packet[n - 1] == 0:
            # ShortEKTField (most packets, RFC 8870 §4.6): nothing for EKT to do.
            n -= 1
            ssrc = _unpack_ssrc(packet, 8)[0]
            outcome = self._ekt.process(SHORT, ssrc, now)
        else:
            try:
                n, field = split_ekt_field(packet)
            except EktDecodeError as exc:
                self.stats.ekt_field_errors += 1
                raise EktFieldError(str(exc)) from None
            if n < 12:
                self.stats.short_packets += 1
                raise DoubleDecodeError("packet shorter than an RTP header")
            ssrc = _unpack_ssrc(packet, 8)[0]
            # RFC 8870 §4.3.2 order: the EKT tag first (it may drop the packet), then SRTP.
            # A packet dropped for its tag thus leaves the outer replay window untouched.
            outcome = self._ekt.process(field, ssrc, now)
        # One header parse for both layers: the outer layer is opened in parts.
        hlen = rtp_header_length(packet)
        if hlen < 0 or hlen > n:
            self.stats.short_packets += 1
            raise DoubleDecodeError("not a well-formed RTP header")
        header = packet[:hlen]
        b0 = packet[0]
        b1 = packet[1]
        out_pt = b1 & 0x7F
        out_seq = (packet[2] << 8) | packet[3]
        # outer plaintext: inner ciphertext | inner tag | OHB
        body = self._outer.open_rtp(ssrc, out_seq, header, packet[hlen:n])
        try:
            ohb_pt, ohb_seq, ohb_m, olen = decode_ohb_fields(body, 0)
        except OhbDecodeError as exc:
            self.stats.ohb_errors += 1
            raise DoubleDecodeError(f"OHB: {exc}") from None
        inner_end = len(body) - olen
        if inner_end < TAG_LENGTH:
            self.stats.ohb_errors += 1
            raise DoubleDecodeError("outer plaintext too short for an inner tag")
        pt = out_pt if ohb_pt is None else ohb_pt
        seq = out_seq if ohb_seq is None else ohb_seq
        marker = bool(b1 & 0x80) if ohb_m is None else ohb_m
        slen = 12 + ((b0 & 0x0F) << 2)
        # Synthetic packet (RFC 8723 §5.3 step 4): original PT/SEQ/M, X = 0, no extension.
        synth = (
            bytes((b0 & 0xEF, (0x80 if marker else 0) | pt, seq >> 8, seq & 0xFF))
            + header[4:slen]
            + body[:inner_end]
        )
        key, inner = self._decrypt_inner(synth, ssrc)
        payload = inner[slen:]
        padding = b""
        if b0 & 0x20:
            # RTP padding is covered by the inner layer only (RFC 8723 §5.1, §5.3): strip it here.
            count = payload[-1] if payload else 0
            if count == 0 or count > len(payload):
                self.stats.padding_errors += 1
                raise DoubleDecodeError(f"RTP padding count {count} invalid")
            payload, padding = payload[:-count], payload[-count:]
        self.stats.accepted += 1
        cc = b0 & 0x0F
        return MediaPacket(
            ssrc=ssrc,
            payload_type=out_pt,
            sequence_number=out_seq,
            marker=marker,
            timestamp=_unpack_ssrc(header, 4)[0],
            csrcs=_CSRCS[cc](header, 12),
            payload=payload,
            original_payload_type=pt,
            original_sequence_number=seq,
            header=header,
            spi=key.spi,
            epoch=key.epoch,
            ekt_outcome=outcome,
            padding=padding,
        )

    def _decrypt_inner(self, synth: bytes, ssrc: int) -> tuple[ReceivedKey, bytes]:
        keys = self._ekt.keys(ssrc)
        if not keys:
            self.stats.no_key += 1
            raise NoInnerKeyError(f"no end-to-end key for SSRC {ssrc:#x}")
        replay: SrtpError | None = None
        for key in keys:
            session = key.session
            try:
                inner = session.unprotect_rtp(synth)
            except ReplayError as exc:
                # Only a real replay if this key also authenticates it; try the others.
                replay = exc
                continue
            except AuthenticationError:
                continue
            if key is not keys[0]:
                self._ekt.mark_used(key)
            return key, inner
        if replay is not None:
            self.stats.inner_replays += 1
            raise replay
        self.stats.inner_auth_failures += 1
        raise AuthenticationError("inner (end-to-end) authentication failed")
