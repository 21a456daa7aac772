"""DTLS 1.2 record layer: epochs, sequence numbers, AEAD protection, anti-replay.

Theory of operation
-------------------
perc has two epochs (RFC 6347 §4.1): epoch 0 is plaintext, epoch 1 carries everything after
ChangeCipherSpec. Each epoch has its own 48-bit write counter, kept after the switch because a
retransmitted final flight still contains epoch-0 records (RFC 6347 §4.1).

Protection (RFC 5246 §6.2.3.3):

* AES-GCM (RFC 5288): nonce = ``write_IV(4) || nonce_explicit(8)``; we send
  ``nonce_explicit = epoch || sequence_number`` so (epoch, seq) uniqueness gives nonce
  uniqueness, and on receipt we take the 8 bytes from the record (OpenSSL uses a counter with a
  random start). Fragment = ``nonce_explicit | ciphertext | tag``.
* ChaCha20-Poly1305 (RFC 7905): nonce = ``write_IV(12) XOR (0^32 || epoch || seq)``;
  fragment = ``ciphertext | tag``.
* additional data = ``epoch || seq || type || wire version || plaintext length``.

Anti-replay (RFC 6347 §4.1.2.6): a 64-record window per protected epoch, checked
before and updated only after successful decryption; epoch 0 is unauthenticated and never
touches a window (handshake duplicates are caught by message_seq instead).

Records that fail any check are dropped silently and counted (RFC 6347 §4.1.2.7); one AEAD
object is built per key and reused.
"""

from __future__ import annotations

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from perc.dtls.keys import CipherSuite
from perc.wire.dtls import DTLS_1_2, RECORD_HEADER, DtlsRecord

REPLAY_WINDOW = 64
_WINDOW_MASK = (1 << REPLAY_WINDOW) - 1
MAX_SEQUENCE = (1 << 48) - 1
ECHO_MARGIN = 1 << 32  # room left for our records after a sequence-number echo
# RFC 9325 §4.4: at most 2^28 failed decryptions per AES-GCM key in DTLS 1.2.
INTEGRITY_LIMIT = 1 << 28
_AAD_TAIL_OFFSET = 8


class ReplayWindow:
    """The sliding window of RFC 6347 §4.1.2.6 (bit i of ``mask`` = seq ``top - i`` seen)."""

    __slots__ = ("mask", "top")

    def __init__(self) -> None:
        self.top = -1
        self.mask = 0

    def is_new(self, seq: int) -> bool:
        if seq > self.top:
            return True
        diff = self.top - seq
        if diff >= REPLAY_WINDOW:
            return False
        return not (self.mask >> diff) & 1

    def update(self, seq: int) -> None:
        if seq > self.top:
            shift = seq - self.top
            self.mask = ((self.mask << shift) | 1) & _WINDOW_MASK if shift < REPLAY_WINDOW else 1
            self.top = seq
        else:
            self.mask |= 1 << (self.top - seq)


class CipherState:
    """One direction of one protected epoch: the AEAD object and fixed IV, built once."""

    __slots__ = ("_aead", "_iv", "_iv_int", "explicit", "failures", "overhead")

    def __init__(self, suite: CipherSuite, key: bytes, iv: bytes) -> None:
        self._aead: AESGCM | ChaCha20Poly1305 = suite.aead(key)
        self._iv = iv
        self._iv_int = int.from_bytes(iv, "big")
        self.explicit = suite.explicit_nonce_length == 8
        self.overhead = suite.overhead
        self.failures = 0

    def _nonce(self, seq_num: bytes) -> bytes:
        if self.explicit:
            return self._iv + seq_num
        return (self._iv_int ^ int.from_bytes(seq_num, "big")).to_bytes(12, "big")

    def seal(self, header: bytes, plaintext: bytes) -> bytes:
        """``header`` is the 13-byte record header with the final (protected) length."""
        seq_num = header[3:11]
        aad = seq_num + header[0:3] + len(plaintext).to_bytes(2, "big")
        ct = self._aead.encrypt(self._nonce(seq_num), plaintext, aad)
        return header + seq_num + ct if self.explicit else header + ct

    def open(self, record: DtlsRecord, seq_num: bytes) -> bytes | None:
        frag = record.fragment
        plain_len = len(frag) - self.overhead
        if plain_len < 0:
            return None
        if self.explicit:
            nonce = self._iv + frag[:8]
            ct = frag[8:]
        else:
            nonce = self._nonce(seq_num)
            ct = frag
        aad = (
            seq_num
            + bytes((record.content_type,))
            + record.version.to_bytes(2, "big")
            + plain_len.to_bytes(2, "big")
        )
        try:
            return self._aead.decrypt(nonce, ct, aad)
        except InvalidTag:
            self.failures += 1
            return None


class RecordLayer:
    """Protects outgoing records and opens incoming ones; knows nothing about handshakes."""

    def __init__(self) -> None:
        self.write_epoch = 0
        self.read_epoch = 0
        self._write_seq = [0, 0]
        self._write_states: list[CipherState | None] = [None, None]
        self._read_states: list[CipherState | None] = [None, None]
        self._window = ReplayWindow()  # epoch 1 only
        #: (suite, write key, write IV, read key, read IV) of epoch 1, for export (D29)
        self.epoch1_material: tuple[CipherSuite, bytes, bytes, bytes, bytes] | None = None

    # --- keys ----------------------------------------------------------------------------------

    def install_keys(
        self, suite: CipherSuite, write_key: bytes, write_iv: bytes, read_key: bytes, read_iv: bytes
    ) -> None:
        """Prepare epoch 1 in both directions; each switches later (CCS sent / CCS received)."""
        self._write_states[1] = CipherState(suite, write_key, write_iv)
        self._read_states[1] = CipherState(suite, read_key, read_iv)
        self.epoch1_material = (suite, write_key, write_iv, read_key, read_iv)

    def resume_epoch1(self, next_write_seq: int, read_top: int) -> None:
        """Both directions in epoch 1 at once (a resumed association, D29): we write from
        ``next_write_seq``; the peer's records up to ``read_top`` count as already seen, and
        epoch 0 is closed for writing."""
        self.write_epoch = self.read_epoch = 1
        self._write_seq = [MAX_SEQUENCE + 1, next_write_seq]
        self._window.top = read_top
        self._window.mask = _WINDOW_MASK if read_top >= 0 else 0

    @property
    def read_top(self) -> int:
        """The highest epoch-1 record number received so far (-1: none)."""
        return self._window.top

    @property
    def has_next_read_keys(self) -> bool:
        return self._read_states[1] is not None

    def activate_write_epoch(self) -> None:
        self.write_epoch = 1

    def activate_read_epoch(self) -> None:
        self.read_epoch = 1

    def forget_keys(self) -> None:
        """A fatal alert wipes the association's secrets (RFC 5246 §7.2.2)."""
        self._write_states = [None, None]
        self._read_states = [None, None]
        self.epoch1_material = None

    # --- sending -------------------------------------------------------------------------------

    def overhead(self, epoch: int) -> int:
        state = self._write_states[epoch]
        return 0 if state is None else state.overhead

    def next_sequence(self, epoch: int) -> int:
        return self._write_seq[epoch]

    def set_next_sequence(self, epoch: int, seq: int) -> None:
        """Stateless-server echo (RFC 6347 §4.2.1): never moves the counter backwards, and
        never so close to 2^48 that our own flights and retransmissions could run out (a
        spoofed plaintext ClientHello could otherwise exhaust the counter): then no echo."""
        if seq <= MAX_SEQUENCE - ECHO_MARGIN:
            self._write_seq[epoch] = max(self._write_seq[epoch], seq)

    def can_send(self, epoch: int) -> bool:
        return self._write_seq[epoch] <= MAX_SEQUENCE and (
            epoch == 0 or self._write_states[epoch] is not None
        )

    def seal(self, content_type: int, payload: bytes, epoch: int | None = None) -> bytes:
        """One record in ``epoch`` (default: the current write epoch), with a fresh seq."""
        if epoch is None:
            epoch = self.write_epoch
        seq = self._write_seq[epoch]
        if seq > MAX_SEQUENCE:
            # Never wrap (RFC 6347 §4.1); the connection tears down long before this.
            raise OverflowError("DTLS sequence number exhausted")
        self._write_seq[epoch] = seq + 1
        state = self._write_states[epoch]
        if state is None:
            return (
                RECORD_HEADER.pack(
                    content_type, DTLS_1_2, epoch, seq >> 32, seq & 0xFFFFFFFF, len(payload)
                )
                + payload
            )
        header = RECORD_HEADER.pack(
            content_type,
            DTLS_1_2,
            epoch,
            seq >> 32,
            seq & 0xFFFFFFFF,
            len(payload) + state.overhead,
        )
        return state.seal(header, payload)

    # --- receiving -----------------------------------------------------------------------------

    def open(self, record: DtlsRecord) -> tuple[bytes | None, str]:
        """Plaintext of a protected (epoch 1) record, or None and the drop reason."""
        state = self._read_states[1]
        if state is None:
            return None, "epoch"
        seq = record.sequence_number
        if not self._window.is_new(seq):
            return None, "replay"
        seq_num = ((record.epoch << 48) | seq).to_bytes(8, "big")
        plaintext = state.open(record, seq_num)
        if plaintext is None:
            return None, "decrypt"
        self._window.update(seq)
        return plaintext, ""

    @property
    def decrypt_failures(self) -> int:
        state = self._read_states[1]
        return 0 if state is None else state.failures
