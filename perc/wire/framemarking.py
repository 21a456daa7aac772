"""Frame marking RTP header extension (RFC 9626), carried as an RFC 8285 element.

Wire layout of the element data (RFC 9626 §3)::

    byte 0     S(1) | E(1) | I(1) | D(1) | B(1) | TID(3)
    byte 1     LID(8)          scalable form only
    byte 2     TL0PICIDX(8)    scalable form only, and only when known

- S: first packet of a frame; E: last packet of a frame; I: independent frame (a key frame:
  decodable without earlier frames); D: discardable (no other frame depends on it);
  B: base layer sync; TID: temporal layer.
- Non-scalable streams use the short form (§3.1): one byte (RFC 8285 ``L = 0``) with B and
  TID sent as 0 and ignored on receipt, so a parse clears them.
- Scalable streams (§3.2) add the layer ID and optionally TL0PICIDX (``L = 1`` or ``L = 2``).

perc (D35) sends the short form with S, E and I on every video packet, under extension ID 4
unless configured otherwise. The extension is not end-to-end authenticated (RFC 8723 §5.3): a
Media Distributor may use it only for forwarding choices.

API: :class:`FrameMarking` (``parse``/``serialize``/``extension``), :func:`find_frame_marking`
(among parsed RFC 8285 elements) and :func:`frame_marking_of_packet` (straight from RTP packet
bytes, for a Media Distributor's forwarding path). Untrusted bytes raise
:class:`FrameMarkingDecodeError` and nothing else.
"""

from __future__ import annotations

from collections.abc import Iterable

import attrs

from perc.wire.errors import DecodeError
from perc.wire.rtp import HeaderExtension, RtpDecodeError, parse_extensions, rtp_header_length

__all__ = [
    "DEFAULT_FRAME_MARKING_ID",
    "FrameMarking",
    "FrameMarkingDecodeError",
    "find_frame_marking",
    "frame_marking_of_packet",
]

DEFAULT_FRAME_MARKING_ID = 4  # D35
_S, _E, _I, _D, _B = 0x80, 0x40, 0x20, 0x10, 0x08


class FrameMarkingDecodeError(DecodeError):
    """Untrusted bytes are not a well-formed frame marking element (or RTP header)."""


@attrs.frozen(slots=True)
class FrameMarking:
    """The values of one frame marking element. ``lid is None``: the short form (§3.1)."""

    start: bool = False  # S
    end: bool = False  # E
    independent: bool = False  # I
    discardable: bool = False  # D
    base_layer_sync: bool = False  # B, scalable form only
    tid: int = 0  # TID, scalable form only
    lid: int | None = None
    tl0_pic_idx: int | None = None  # needs lid

    def serialize(self) -> bytes:
        """The element data (1, 2 or 3 bytes)."""
        b0 = (
            (_S if self.start else 0)
            | (_E if self.end else 0)
            | (_I if self.independent else 0)
            | (_D if self.discardable else 0)
        )
        if self.lid is None:
            if self.tl0_pic_idx is not None or self.tid or self.base_layer_sync:
                raise ValueError("TID, B and TL0PICIDX need the scalable form (a LID)")
            return bytes((b0,))
        if not 0 <= self.tid <= 7 or not 0 <= self.lid <= 0xFF:
            raise ValueError("TID must be 0-7 and LID 0-255")
        b0 |= (_B if self.base_layer_sync else 0) | self.tid
        if self.tl0_pic_idx is None:
            return bytes((b0, self.lid))
        if not 0 <= self.tl0_pic_idx <= 0xFF:
            raise ValueError(f"TL0PICIDX out of range: {self.tl0_pic_idx}")
        return bytes((b0, self.lid, self.tl0_pic_idx))

    def extension(self, ext_id: int = DEFAULT_FRAME_MARKING_ID) -> HeaderExtension:
        """This marking as an RFC 8285 element for :func:`perc.wire.rtp.encode_extensions`."""
        if not 1 <= ext_id <= 14:
            raise ValueError(f"one-byte extension ID must be 1-14, not {ext_id}")
        return HeaderExtension(ext_id, self.serialize())

    @classmethod
    def parse(cls, data: bytes) -> FrameMarking:
        """Decode untrusted element data; its length selects the form."""
        n = len(data)
        if not 1 <= n <= 3:
            raise FrameMarkingDecodeError(f"frame marking element of {n} bytes (expected 1-3)")
        b0 = data[0]
        flags = {
            "start": bool(b0 & _S),
            "end": bool(b0 & _E),
            "independent": bool(b0 & _I),
            "discardable": bool(b0 & _D),
        }
        if n == 1:
            return cls(**flags)
        return cls(
            **flags,
            base_layer_sync=bool(b0 & _B),
            tid=b0 & 0x07,
            lid=data[1],
            tl0_pic_idx=data[2] if n == 3 else None,
        )


def find_frame_marking(
    elements: Iterable[HeaderExtension], ext_id: int = DEFAULT_FRAME_MARKING_ID
) -> FrameMarking | None:
    """The frame marking among RFC 8285 elements (the first with ``ext_id``), or ``None``."""
    for element in elements:
        if element.id == ext_id:
            return FrameMarking.parse(element.data)
    return None


def frame_marking_of_packet(
    packet: bytes, ext_id: int = DEFAULT_FRAME_MARKING_ID
) -> FrameMarking | None:
    """The frame marking of an untrusted RTP packet, or ``None`` when it carries none."""
    try:
        hlen = rtp_header_length(packet)
        if not packet[0] & 0x10:
            return None
        at = 12 + 4 * (packet[0] & 0x0F)
        profile = int.from_bytes(packet[at : at + 2], "big")
        elements = parse_extensions(profile, packet[at + 4 : hlen])
    except RtpDecodeError as exc:
        raise FrameMarkingDecodeError(str(exc)) from None
    return find_frame_marking(elements, ext_id)
