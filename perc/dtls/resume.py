"""Export and import of an established server association's record state (sans-IO).

Theory of operation
-------------------
A Key Distributor that restarts must go on sending EKTKeys to endpoints that joined before
(D29) without a new handshake: nothing on the wire tells an endpoint to run one. What the
server needs for that is small and lives in :class:`RecordState`:

* the negotiated parameters (:class:`~perc.dtls.events.Negotiated`: suite, profile, EKT
  cipher, randoms, tls-ids, the peer's certificate);
* the epoch-1 keys and fixed IVs of both directions: ours to write EKTKeys (and alerts), the
  client's to read its ACKs, alerts and close_notify;
* the next epoch-1 write sequence number and the next handshake message_seq at export time;
* the highest epoch-1 record number received from the client (``read_top``).

The master secret is *not* exported: after the handshake the server only needs record
protection (the exporter's output, the SRTP keys, went to the MDD at completion), so a
resumed connection cannot export keying material.

Nonce safety: AES-GCM and ChaCha20-Poly1305 nonces are built from (epoch, sequence number)
(RFC 5288 §3, RFC 7905 §2), so a resumed connection must never send a sequence number the
old one sent. The caller passes ``next_sequence`` to :meth:`DtlsConnection.resume`: a number
the old connection can not have reached (D29: the ceiling reserved durably before any record
at or past it went out). message_seq is derived from it: every EKTKey message takes one
message_seq and goes out in at least one record, so message_seq advanced by at most the
number of records sent since the export; the resumed connection continues at ``message_seq +
(next_sequence - write_seq)``, which is past every message_seq the client has seen (the
client drops older ones as retransmissions, RFC 6347 §4.2.2).

Replay state: the client's records up to ``read_top`` count as seen (the window is full below
it); records it sent after the export but before a restart may be accepted once more. Those
can only be ACKs (which name record numbers of EKTKey transmissions the resumed connection did
not make, so they are ignored) or a close_notify or alert (which end the association anyway).

Encoding: UTF-8 JSON of an object with fixed keys (bytes as lowercase hex), version ``1``.
The blob is key material: the KMF stores it sealed (AES-256-GCM under its state key, D28).
:func:`decode_record_state` raises only :class:`RecordStateError`.
"""

from __future__ import annotations

import json

import attrs

from perc.dtls.events import Negotiated
from perc.dtls.keys import CIPHER_SUITES

__all__ = ["RECORD_STATE_VERSION", "RecordState", "RecordStateError", "decode_record_state"]

RECORD_STATE_VERSION = 1
_MAX_SEQUENCE = (1 << 48) - 1


class RecordStateError(ValueError):
    """An exported record state that cannot be used (malformed, another version)."""


@attrs.frozen(repr=False)
class RecordState:
    """What a server needs to keep protecting records on an established association."""

    negotiated: Negotiated
    write_key: bytes
    write_iv: bytes
    read_key: bytes
    read_iv: bytes
    #: the next epoch-1 sequence number we would have sent at export time
    write_seq: int
    #: the highest epoch-1 sequence number received from the peer (-1: none)
    read_top: int
    #: the next handshake message_seq we would have sent at export time
    message_seq: int

    def __repr__(self) -> str:  # never print key material
        return f"RecordState(write_seq={self.write_seq}, message_seq={self.message_seq})"

    def encode(self) -> bytes:
        n = self.negotiated
        body = {
            "v": RECORD_STATE_VERSION,
            "suite": n.cipher_suite,
            "group": n.named_group,
            "srtp_profile": n.srtp_profile,
            "ekt_cipher": n.ekt_cipher,
            "client_random": n.client_random.hex(),
            "server_random": n.server_random.hex(),
            "local_tls_id": None if n.local_tls_id is None else n.local_tls_id.hex(),
            "peer_tls_id": None if n.peer_tls_id is None else n.peer_tls_id.hex(),
            "peer_fingerprint": n.peer_fingerprint,
            "peer_certificate": n.peer_certificate_der.hex(),
            "write_key": self.write_key.hex(),
            "write_iv": self.write_iv.hex(),
            "read_key": self.read_key.hex(),
            "read_iv": self.read_iv.hex(),
            "write_seq": self.write_seq,
            "read_top": self.read_top,
            "message_seq": self.message_seq,
        }
        return json.dumps(body, separators=(",", ":"), sort_keys=True).encode()


def _int(body: dict[str, object], name: str, low: int, high: int, *, none: bool = False) -> int:
    value = body.get(name)
    if value is None and none:
        return -1
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise RecordStateError(f"record state: {name} missing or out of range")
    return value


def _hex(body: dict[str, object], name: str, *, none: bool = False) -> bytes:
    value = body.get(name)
    if value is None and none:
        return b""
    if not isinstance(value, str):
        raise RecordStateError(f"record state: {name} missing")
    try:
        return bytes.fromhex(value)
    except ValueError:
        raise RecordStateError(f"record state: {name} is not hex") from None


def decode_record_state(data: bytes) -> RecordState:
    """Parse :meth:`RecordState.encode` output; :class:`RecordStateError` if it is not one."""
    try:
        body = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise RecordStateError("record state: not JSON") from None
    if not isinstance(body, dict):
        raise RecordStateError("record state: not an object")
    if body.get("v") != RECORD_STATE_VERSION:
        raise RecordStateError(f"record state: version {body.get('v')!r}, expected 1")
    suite = CIPHER_SUITES.get(_int(body, "suite", 0, 0xFFFF))
    if suite is None:
        raise RecordStateError("record state: unknown cipher suite")
    fingerprint = body.get("peer_fingerprint")
    if not isinstance(fingerprint, str):
        raise RecordStateError("record state: peer_fingerprint missing")
    profile = _int(body, "srtp_profile", 0, 0xFFFF, none=True)
    ekt = _int(body, "ekt_cipher", 0, 0xFF, none=True)
    local_tls_id = _hex(body, "local_tls_id", none=True) or None
    peer_tls_id = _hex(body, "peer_tls_id", none=True) or None
    negotiated = Negotiated(
        cipher_suite=suite.code,
        named_group=_int(body, "group", 0, 0xFFFF),
        srtp_profile=None if profile < 0 else profile,
        ekt_cipher=None if ekt < 0 else ekt,
        client_random=_hex(body, "client_random"),
        server_random=_hex(body, "server_random"),
        local_tls_id=local_tls_id,
        peer_tls_id=peer_tls_id,
        peer_fingerprint=fingerprint,
        peer_certificate_der=_hex(body, "peer_certificate"),
    )
    state = RecordState(
        negotiated=negotiated,
        write_key=_hex(body, "write_key"),
        write_iv=_hex(body, "write_iv"),
        read_key=_hex(body, "read_key"),
        read_iv=_hex(body, "read_iv"),
        write_seq=_int(body, "write_seq", 0, _MAX_SEQUENCE + 1),
        read_top=_int(body, "read_top", -1, _MAX_SEQUENCE),
        message_seq=_int(body, "message_seq", 0, 0xFFFF + 1),
    )
    k, iv = suite.key_length, suite.fixed_iv_length
    if (len(state.write_key), len(state.read_key)) != (k, k) or (
        len(state.write_iv),
        len(state.read_iv),
    ) != (iv, iv):
        raise RecordStateError("record state: key or IV length does not fit the suite")
    return state
