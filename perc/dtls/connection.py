"""One DTLS 1.2 association, sans-IO: bytes and ``now`` in, datagrams, events and a timer out.

Public API (the contract)::

    conn = DtlsConnection(configuration, cookie_identity=b"")
    conn.connect(now)                       # client: queue the ClientHello
    conn.receive_datagram(data, now)        # never raises on peer input
    conn.datagrams_to_send() -> list[bytes] # each <= configuration.mtu
    conn.next_event() -> Event | None
    conn.get_timer() -> float | None        # absolute time of the next timeout
    conn.handle_timer(now)
    conn.send_ekt_key(key, salt, spi, ttl, now)   # server, after HandshakeCompleted with EKT
    conn.send_application_data(data, now)
    conn.close(now)                         # close_notify
    conn.abort(description, now)            # fatal alert of the caller's choosing
    conn.export_keying_material(label, length)    # RFC 5705, no context
    conn.stats                              # DtlsStats: drop and retransmission counters
    conn.negotiated                         # Negotiated, once the handshake completed
    conn.export_record_state() -> RecordState      # server, established (D29)
    DtlsConnection.resume(configuration, state, next_sequence=N)   # server, established
    conn.next_record_sequence               # the next epoch-1 sequence number we send

Theory of operation
-------------------
Three layers meet here and nowhere else: the record layer (:mod:`perc.dtls.record`), the
flight layer (:mod:`perc.dtls.flight`: fragmentation, reassembly, timers) and the handshake
state machine (:mod:`perc.dtls.handshake`). A datagram is split into records; each record is
opened (epoch 1) or taken as is (epoch 0), then routed by content type. Handshake fragments are
routed by the handshake's state table (``route_fragment``), go through the reassembler, and
whole messages go to the handshake. The handshake holds no reference back: each step returns
an ``Output`` (keys, a flight, a record number to echo, the offer, the negotiated values, an
EKTKey) that ``_apply`` carries out; the connection never branches on a handshake state.

Rules implemented here:

* invalid records are dropped silently and counted (RFC 6347 §4.1.2.7); epoch-1 records that
  arrive before the peer's CCS are buffered (at most ``MAX_FUTURE_RECORDS``) and replayed after
  it (RFC 6347 §4.1; RFC 5246 §7.1);
* a handshake message with an old message_seq is the peer retransmitting: we retransmit our
  current flight (or, server after completion, the final flight) at most once per half timer
  interval (RFC 6347 §4.2.4); a client still waiting for flight 6 takes an epoch-1 record (the
  EKTKey) as the same signal;
* the client keeps retransmitting flight 5 until the server's Finished verifies; the server's
  flight 6 has no timer and is only resent on demand (RFC 6347 §4.2.4);
* EKTKey (D9, D23): the server sends it in an epoch-1 handshake record with its next
  message_seq and retransmits it on its own 1 s/x2/60 s timer until an ACK record covers every
  record of one transmission; the client ACKs every record that carried an EKTKey fragment,
  retransmissions included (RFC 9147 §7);
* plaintext (epoch-0) handshake fragments are accepted only for the message types the peer's
  role may send unprotected; reassembly slots remember their epoch, so forged plaintext can
  neither join nor block a protected message, and leftovers are discarded at completion;
* peer misbehaviour raises :class:`AlertError` inside, which becomes one fatal alert and
  ``ConnectionClosed``; the alert is regenerated if the peer keeps sending (RFC 6347 §4.2.7);
  after epoch 1 is in use, unauthenticated epoch-0 alerts are ignored (RFC 5246 §7.2); an overall
  deadline ends a stuck handshake with reason ``"timeout"``;
* every queue is bounded (outgoing datagrams, peer-driven events, early records, pending
  ACKs) and every drop is counted in :class:`DtlsStats`.
"""

from __future__ import annotations

from collections import deque

import attrs

from perc.dtls import keys
from perc.dtls.config import DtlsConfiguration
from perc.dtls.errors import AlertDescription as AD
from perc.dtls.errors import AlertError, AlertLevel, LocalProtocolError
from perc.dtls.events import (
    AlertReceived,
    ApplicationDataReceived,
    ClientHelloReceived,
    ConnectionClosed,
    EktKeyAcknowledged,
    EktKeyReceived,
    Event,
    HandshakeCompleted,
    Negotiated,
)
from perc.dtls.flight import (
    DROPPED,
    INITIAL_TIMEOUT,
    OLD,
    FlightItem,
    OutgoingMessage,
    Reassembler,
    ReceivedMessage,
    RetransmitTimer,
    packetize,
)
from perc.dtls.handshake import EKT_KEY_LENGTHS, CcsRoute, Handshake, Output, Route, State
from perc.dtls.record import INTEGRITY_LIMIT, RecordLayer
from perc.dtls.resume import RecordState
from perc.srtp.keys import SrtpProfile
from perc.wire.dtls import (
    DTLS_1_2,
    Ack,
    Alert,
    ContentType,
    DtlsDecodeError,
    DtlsRecord,
    EktKey,
    HandshakeFragment,
    HandshakeType,
    decode_change_cipher_spec,
    parse_datagram_untrusted,
    parse_handshake_fragments_untrusted,
)

MAX_FUTURE_RECORDS = 8
MAX_RECORD_SEQUENCE = (1 << 48) - 1
MAX_MESSAGE_SEQ = 0xFFFF
MIN_RETRANSMIT_GAP = 0.1  # seconds; limits amplification by spoofed or duplicated flights
MIN_MTU = 128
MIN_ALERT_REPEAT_GAP = 0.5  # seconds between repeats of our fatal alert
MAX_ALERT_REPEATS = 6
MAX_PENDING_DATAGRAMS = 256
MAX_PENDING_EVENTS = 1024
# An unacknowledged EKTKey is retransmitted (1 s doubling to 60 s, D9) for this many times the
# handshake timeout before the association is declared dead (reason "timeout").
EKT_GIVE_UP_FACTOR = 10

#: The profiles whose keys the exporter yields (RFC 5764 §4.2; SrtpProfile is the one list).
_SRTP_PROFILES = frozenset(int(p) for p in SrtpProfile)


@attrs.define
class DtlsStats:
    """Counters; every dropped record or fragment is counted in exactly one ``dropped_*``."""

    datagrams_received: int = 0
    records_received: int = 0
    dropped_malformed: int = 0  # bad header, trailing bytes, bad fragment/alert/CCS encoding
    dropped_epoch: int = 0  # unknown or no longer accepted epoch, or a bad version
    dropped_replay: int = 0
    dropped_decrypt: int = 0
    dropped_unexpected: int = 0  # valid record of a type or in a state we do not accept
    dropped_after_close: int = 0
    fragments_dropped: int = 0  # reassembly bounds, wrong epoch for the type, stray HVR
    dropped_old: int = 0  # fragments of messages already processed (peer retransmissions)
    future_records_buffered: int = 0
    retransmissions: int = 0
    ekt_retransmissions: int = 0  # of which EKTKey messages (D9)
    internal_errors: int = 0  # unexpected exceptions turned into internal_error alerts
    outgoing_discarded: int = 0  # queued datagrams dropped because nobody collected them
    alerts_repeated: int = 0  # our fatal alert sent again to a peer that kept sending
    events_dropped: int = 0  # data/warning events beyond MAX_PENDING_EVENTS undrained


@attrs.define
class _PendingEkt:
    spi: int
    item: OutgoingMessage
    transmissions: list[frozenset[tuple[int, int]]]
    timer: RetransmitTimer
    give_up_at: float


class DtlsConnection:
    def __init__(self, configuration: DtlsConfiguration, *, cookie_identity: bytes = b"") -> None:
        if configuration.mtu < MIN_MTU:
            raise LocalProtocolError(f"mtu {configuration.mtu} below {MIN_MTU}")
        unknown = [s for s in configuration.cipher_suites if s not in keys.CIPHER_SUITES]
        if unknown or not configuration.cipher_suites:
            raise LocalProtocolError(f"unsupported cipher suites {unknown}")
        if not configuration.groups or any(g not in (23, 29) for g in configuration.groups):
            raise LocalProtocolError(f"unsupported groups {configuration.groups}")
        for tls_id in (configuration.tls_id, configuration.expected_peer_tls_id):
            if tls_id is not None and not 1 <= len(tls_id) <= 255:
                raise LocalProtocolError("tls_id must be 1..255 bytes (RFC 8844 §4.3)")
        if any(not 0 <= p < 1 << 16 for p in configuration.srtp_profiles) or any(
            not 0 < e < 256 for e in configuration.ekt_ciphers
        ):
            raise LocalProtocolError("SRTP profiles are uint16, EKT ciphers uint8")
        self._config = configuration
        #: the opaque identity the server's cookie was bound to (D14), e.g. the association id
        self.cookie_identity = cookie_identity
        self.stats = DtlsStats()
        self._record = RecordLayer()
        self._reasm = Reassembler()
        self._hs = Handshake(configuration)
        self._negotiated: Negotiated | None = None
        self._events: deque[Event] = deque()
        self._out: list[bytes] = []
        self._now = 0.0
        self._closed = False
        self._established = False
        self._deadline: float | None = None
        self._timer = RetransmitTimer()
        self._flight: list[FlightItem] | None = None  # retransmitted on the timer
        self._final_flight: list[FlightItem] | None = None  # server flight 6, on demand only
        self._on_demand_at = -1e18  # last resend triggered by a peer retransmission
        self._peer_retransmitted = False
        self._future: list[DtlsRecord] = []
        self._early_ccs = False
        self._ekt: _PendingEkt | None = None
        self._ekt_acked: set[tuple[int, int]] = set()
        self._ack_pending: list[tuple[int, int]] = []  # client: EKTKey records to ACK
        self._fatal_record: bytes | None = None  # the fatal alert we sent, for repeats
        self._fatal_repeat_at = 0.0
        self._fatal_repeats = 0

    # --- public API ----------------------------------------------------------------------------

    @property
    def is_established(self) -> bool:
        return self._established and not self._closed

    @property
    def is_closed(self) -> bool:
        return self._closed

    @property
    def state(self) -> State:
        return self._hs.state

    def connect(self, now: float) -> None:
        if not self._config.is_client:
            raise LocalProtocolError("connect() is for clients")
        if not self._hs.can_start:
            raise LocalProtocolError("connect() called twice")
        self._now = now
        self._deadline = now + self._config.handshake_timeout
        self._apply(self._hs.start())

    def receive_datagram(self, data: bytes, now: float) -> None:
        self._now = now
        self.stats.datagrams_received += 1
        if self._closed:
            self.stats.dropped_after_close += 1
            self._repeat_fatal_alert(now)
            return
        if self._deadline is None and not self._established:
            self._deadline = now + self._config.handshake_timeout
        records, trailing = parse_datagram_untrusted(data)
        if trailing:
            self.stats.dropped_malformed += 1
        self._peer_retransmitted = False
        try:
            for record in records:
                self.stats.records_received += 1
                self._handle_record(record)
                if self.is_closed:
                    break
            if self._peer_retransmitted and not self.is_closed:
                self._retransmit_on_demand()
        except AlertError as e:
            self._fatal(e)
        except Exception as e:  # the contract: peer input never raises out of here
            # A bug or a library error on hostile input: end this association, not the caller.
            self.stats.internal_errors += 1
            self._fatal(AlertError(AD.internal_error, f"{type(e).__name__}: {e}"))

    def datagrams_to_send(self) -> list[bytes]:
        out = self._out
        self._out = []
        return out

    def next_event(self) -> Event | None:
        return self._events.popleft() if self._events else None

    def get_timer(self) -> float | None:
        if self._closed:
            return None
        candidates = [self._timer.deadline]
        if not self._established:
            candidates.append(self._deadline)
        if self._ekt is not None:
            candidates += [self._ekt.timer.deadline, self._ekt.give_up_at]
        times = [t for t in candidates if t is not None]
        return min(times) if times else None

    def handle_timer(self, now: float) -> None:
        self._now = now
        if self._closed:
            return
        try:
            self._on_timer(now)
        except AlertError as e:  # e.g. sequence numbers exhausted: end the association
            self._fatal(e)

    def _on_timer(self, now: float) -> None:
        if not self._established and self._deadline is not None and now >= self._deadline:
            self._timeout()
            return
        if self._timer.deadline is not None and now >= self._timer.deadline:
            if self._flight is not None:
                self.stats.retransmissions += 1
                self._transmit(self._flight)
                self._timer.backoff(now)
            else:
                self._timer.stop()
        ekt = self._ekt
        if ekt is not None:
            if now >= ekt.give_up_at:
                self._timeout()
                return
            if ekt.timer.deadline is not None and now >= ekt.timer.deadline:
                self.stats.retransmissions += 1
                self.stats.ekt_retransmissions += 1
                self._send_ekt(ekt)
                ekt.timer.backoff(now)

    def send_ekt_key(self, key: bytes, salt: bytes, spi: int, ttl: int, now: float) -> None:
        self._now = now
        if self._config.is_client:
            raise LocalProtocolError("only the server sends EKTKey")
        if not self.is_established:
            raise LocalProtocolError("send_ekt_key() before HandshakeCompleted or after close")
        cipher = self._negotiated.ekt_cipher if self._negotiated is not None else None
        if cipher is None:
            raise LocalProtocolError("no EKT cipher was negotiated")
        if len(key) != EKT_KEY_LENGTHS.get(cipher, -1):
            raise LocalProtocolError("EKT key length does not fit the negotiated cipher")
        try:
            body = EktKey(key, salt, spi, ttl).encode()
        except ValueError as e:
            raise LocalProtocolError(str(e)) from None
        item = OutgoingMessage(1, HandshakeType.EKT_KEY, self._hs.next_message_seq(), body)
        # A new EKTKey supersedes an unacknowledged older one (D22: the newest key wins).
        timer = RetransmitTimer()
        ekt = _PendingEkt(
            spi, item, [], timer, now + EKT_GIVE_UP_FACTOR * self._config.handshake_timeout
        )
        self._ekt = ekt
        self._ekt_acked.clear()
        try:
            self._send_ekt(ekt)
        except AlertError as e:
            self._fatal(e)
            return
        timer.start(now)

    def send_application_data(self, data: bytes, now: float) -> None:
        self._now = now
        if not self.is_established:
            raise LocalProtocolError("application data before the handshake completed")
        if len(data) + 13 + self._record.overhead(1) > self._config.mtu:
            raise LocalProtocolError("application data does not fit one datagram")
        self._out.append(self._record.seal(ContentType.APPLICATION_DATA, data))

    def close(self, now: float) -> None:
        """Send close_notify (RFC 5246 §7.2.1) and end the association; idempotent."""
        self._now = now
        if self._closed:
            return
        self._send_alert(AlertLevel.warning, AD.close_notify)
        self._end(ConnectionClosed(AD.close_notify, False, "close_notify"))

    def abort(self, description: int, now: float) -> None:
        """End the association with a fatal alert of the caller's choosing (a policy refusal
        decided outside the handshake, e.g. handshake_failure); idempotent once closed.
        ConnectionClosed(description, False, "alert sent: <name>: aborted by the application")
        follows, and the keys are wiped as for any fatal alert (RFC 5246 §7.2.2)."""
        self._now = now
        if not 0 < description < 256:
            raise LocalProtocolError("abort() needs a fatal alert description 1..255")
        if self._closed:
            return
        self._fatal(AlertError(description, "aborted by the application"))

    def export_keying_material(self, label: bytes, length: int) -> bytes:
        if not self._established:
            raise LocalProtocolError("exporter before the handshake completed")
        if not 0 < length <= 0xFFFF:
            raise LocalProtocolError("exporter length must be 1..65535 bytes")
        return self._hs.export_keying_material(label, length)

    # --- resumption (D29; theory in perc.dtls.resume) ------------------------------------

    @property
    def next_record_sequence(self) -> int:
        """The sequence number our next epoch-1 record takes."""
        return self._record.next_sequence(1)

    def export_record_state(self) -> RecordState:
        """What :meth:`resume` needs to carry on this server association in another process.

        Key material: the caller must keep it secret (the KMF seals it, D28)."""
        material = self._record.epoch1_material
        if (
            self._config.is_client
            or not self.is_established
            or self._negotiated is None
            or material is None
        ):
            raise LocalProtocolError("export_record_state() needs an established server")
        _, write_key, write_iv, read_key, read_iv = material
        return RecordState(
            negotiated=self._negotiated,
            write_key=write_key,
            write_iv=write_iv,
            read_key=read_key,
            read_iv=read_iv,
            write_seq=self._record.next_sequence(1),
            read_top=self._record.read_top,
            message_seq=self._hs.message_seq,
        )

    @classmethod
    def resume(
        cls,
        configuration: DtlsConfiguration,
        state: RecordState,
        *,
        next_sequence: int,
        cookie_identity: bytes = b"",
    ) -> DtlsConnection:
        """An established server association from :meth:`export_record_state` output.

        ``next_sequence`` must lie past every epoch-1 record number the exporting
        connection may have sent after the export (D29: the durably reserved ceiling); it is
        never below ``state.write_seq``. No HandshakeCompleted is reported (the handshake
        completed in the earlier process); the exporter is unavailable. LocalProtocolError
        if the state does not fit the configuration or the numbers ran out."""
        if configuration.is_client:
            raise LocalProtocolError("only a server association can be resumed")
        n = state.negotiated
        if n.cipher_suite not in configuration.cipher_suites:
            raise LocalProtocolError(f"cipher suite 0x{n.cipher_suite:04X} not configured")
        if not state.write_seq <= next_sequence <= MAX_RECORD_SEQUENCE:
            raise LocalProtocolError("next_sequence below the exported one or past 2^48-1")
        message_seq = state.message_seq + (next_sequence - state.write_seq)
        if message_seq > MAX_MESSAGE_SEQ:
            raise LocalProtocolError("handshake message_seq exhausted: cannot resume")
        conn = cls(configuration, cookie_identity=cookie_identity)
        suite = keys.CIPHER_SUITES[n.cipher_suite]
        conn._record.install_keys(
            suite, state.write_key, state.write_iv, state.read_key, state.read_iv
        )
        conn._record.resume_epoch1(next_sequence, state.read_top)
        conn._hs.resume(n, message_seq)
        conn._reasm.any_order = True
        conn._established = True
        conn._negotiated = n
        return conn

    @property
    def negotiated(self) -> Negotiated | None:
        """What the handshake settled (as in HandshakeCompleted), None before completion."""
        return self._negotiated

    # --- applying what the handshake did ---------------------------------------------------

    def _apply(self, out: Output) -> None:
        """Carry out one handshake step, in the order its fields are listed."""
        if out.offer is not None:
            self._events.append(ClientHelloReceived(out.offer))
        if out.echo_record_seq is not None:
            self._record.set_next_sequence(0, out.echo_record_seq)
        if out.keys is not None:
            self._install_keys(*out.keys)
        if out.flight is not None:
            self._send_flight(out.flight, out.final)
        if out.completed is not None:
            self._completed(out.completed)
        if out.ekt_key is not None:
            m = out.ekt_key
            self._events.append(
                EktKeyReceived(m.ekt_key_value, m.srtp_master_salt, m.ekt_spi, m.ekt_ttl)
            )

    def _send_flight(self, items: list[FlightItem], final: bool) -> None:
        if final:
            self._flight = None
            self._final_flight = items
            self._timer.stop()
        else:
            self._flight = items
            self._timer.start(self._now)
        self._transmit(items)

    def _install_keys(self, suite: keys.CipherSuite, block: keys.KeyBlock) -> None:
        if self._config.is_client:
            self._record.install_keys(
                suite,
                block.client_write_key,
                block.client_write_iv,
                block.server_write_key,
                block.server_write_iv,
            )
        else:
            self._record.install_keys(
                suite,
                block.server_write_key,
                block.server_write_iv,
                block.client_write_key,
                block.client_write_iv,
            )

    def _completed(self, negotiated: Negotiated) -> None:
        self._established = True  # the reassembler switches mode after this message
        self._negotiated = negotiated
        if self._config.is_client:
            self._flight = None
            self._timer.stop()
        material = None
        if negotiated.srtp_profile in _SRTP_PROFILES:
            # RFC 5764 §4.2: both sides' master keys and salts (DOUBLE: inner||outer halves).
            profile = SrtpProfile(negotiated.srtp_profile)
            material = self.export_keying_material(
                b"EXTRACTOR-dtls_srtp", 2 * (profile.key_length + profile.salt_length)
            )
        self._events.append(
            HandshakeCompleted(
                cipher_suite=negotiated.cipher_suite,
                srtp_profile=negotiated.srtp_profile,
                ekt_cipher=negotiated.ekt_cipher,
                peer_certificate_der=negotiated.peer_certificate_der,
                peer_fingerprint=negotiated.peer_fingerprint,
                peer_tls_id=negotiated.peer_tls_id,
                srtp_keying_material=material,
                negotiated=negotiated,
            )
        )

    # --- sending -------------------------------------------------------------------------------

    def _transmit(
        self, items: list[FlightItem], numbers: list[tuple[int, int]] | None = None
    ) -> None:
        rl = self._record
        if any(not rl.can_send(getattr(i, "epoch", 0)) for i in items):
            raise AlertError(AD.internal_error, "sequence numbers exhausted")
        self._out += packetize(
            items,
            seal=rl.seal,
            overhead=rl.overhead,
            next_sequence=rl.next_sequence,
            mtu=self._config.mtu,
            record_numbers=numbers,
        )
        if rl.write_epoch == 0 and any(getattr(i, "epoch", 0) == 1 for i in items):
            rl.activate_write_epoch()  # the CCS went out (RFC 5246 §7.1)
        if len(self._out) > MAX_PENDING_DATAGRAMS:
            # The caller is not draining datagrams_to_send(): keep the newest, count the rest.
            excess = len(self._out) - MAX_PENDING_DATAGRAMS
            self.stats.outgoing_discarded += excess
            del self._out[:excess]

    def _send_ekt(self, ekt: _PendingEkt) -> None:
        numbers: list[tuple[int, int]] = []
        self._transmit([ekt.item], numbers)
        ekt.transmissions.append(frozenset(numbers))

    def _retransmit_on_demand(self) -> None:
        """The peer resent part of its flight: it lost ours (RFC 6347 §4.2.4)."""
        flight = self._flight if self._flight is not None else self._final_flight
        # At most once per half timer interval, measured from the previous on-demand resend
        # only: the peers' timers run in lock-step, so comparing with our own timer-driven
        # resend would suppress exactly the answers that matter (RFC 6347 §4.2.4).
        # The final flight has no timer of its own: do not inherit flight 4's backed-off one.
        interval = self._timer.interval if self._flight is not None else INITIAL_TIMEOUT
        gap = max(MIN_RETRANSMIT_GAP, interval / 2)
        if flight is None or self._now - self._on_demand_at < gap:
            return
        self.stats.retransmissions += 1
        self._transmit(flight)
        self._on_demand_at = self._now

    def _send_alert(self, level: int, description: int) -> None:
        rl = self._record
        if rl.can_send(rl.write_epoch):
            self._out.append(rl.seal(ContentType.ALERT, Alert(level, description).encode()))

    def _fatal(self, error: AlertError) -> None:
        if self._closed:
            return
        self._send_alert(AlertLevel.fatal, error.description)
        if self._out:
            self._fatal_record = self._out[-1]
            self._fatal_repeat_at = self._now + MIN_ALERT_REPEAT_GAP
        self._end(ConnectionClosed(error.description, False, f"alert sent: {error}"))

    def _repeat_fatal_alert(self, now: float) -> None:
        """The peer is still sending, so our fatal alert was probably lost: regenerate it
        (RFC 6347 §4.2.7). The keys are gone, so the cached record goes out again; it is
        new to a peer that never got it, and harmless to one that did."""
        if (
            self._fatal_record is None
            or now < self._fatal_repeat_at
            or self._fatal_repeats >= MAX_ALERT_REPEATS
        ):
            return
        self._fatal_repeats += 1
        self._fatal_repeat_at = now + MIN_ALERT_REPEAT_GAP
        self.stats.alerts_repeated += 1
        self._out.append(self._fatal_record)

    def _timeout(self) -> None:
        self._end(ConnectionClosed(None, False, "timeout"))

    def _end(self, event: ConnectionClosed) -> None:
        self._closed = True
        self._timer.stop()
        self._flight = self._final_flight = None
        self._ekt = None
        self._future.clear()
        if event.alert not in (None, AD.close_notify):
            # A fatal alert ends the association and its secrets (RFC 5246 §7.2.2).
            self._record.forget_keys()
            self._hs.erase_secrets()
        self._events.append(event)

    # --- receiving -----------------------------------------------------------------------------

    def _handle_record(self, record: DtlsRecord) -> None:
        st = self.stats
        rl = self._record
        epoch = record.epoch
        if epoch == 0:
            # Accept {254, x} on epoch 0 (OpenSSL sends 0xFEFF on ClientHello; RFC 6347 §4.1).
            if record.version >> 8 != 0xFE:
                st.dropped_epoch += 1
                return
            plaintext = record.fragment
            if self._established and record.content_type != ContentType.HANDSHAKE:
                # Unauthenticated alerts or CCS after epoch 1 is in use: ignore (RFC 5246 §7.2).
                st.dropped_unexpected += 1
                return
        elif epoch == 1:
            if record.version != DTLS_1_2:
                st.dropped_epoch += 1
                return
            if rl.read_epoch == 0:
                if len(self._future) < MAX_FUTURE_RECORDS and not self._established:
                    self._future.append(record)
                    st.future_records_buffered += 1
                else:
                    st.dropped_epoch += 1
                if self._hs.epoch1_means_peer_resent:
                    # E.g. the server already uses epoch 1, so it has our flight 5 and its
                    # flight 6 was lost: resend flight 5 to get flight 6 again (RFC 6347 §4.2.4).
                    self._peer_retransmitted = True
                return
            opened, reason = rl.open(record)
            if opened is None:
                if reason == "replay":
                    st.dropped_replay += 1
                else:
                    st.dropped_decrypt += 1
                    if rl.decrypt_failures >= INTEGRITY_LIMIT:
                        raise AlertError(AD.bad_record_mac, "AEAD integrity limit reached")
                return
            plaintext = opened
        else:
            st.dropped_epoch += 1
            return

        ctype = record.content_type
        if ctype == ContentType.HANDSHAKE:
            self._handle_handshake_record(record, plaintext)
        elif ctype == ContentType.CHANGE_CIPHER_SPEC:
            self._handle_ccs(record, plaintext)
        elif ctype == ContentType.ALERT:
            self._handle_alert(record, plaintext)
        elif ctype == ContentType.ACK and epoch == 1:
            self._handle_ack(plaintext)
        elif ctype == ContentType.APPLICATION_DATA and epoch == 1 and self._established:
            self._peer_event(ApplicationDataReceived(plaintext))
        else:
            st.dropped_unexpected += 1

    def _handle_handshake_record(self, record: DtlsRecord, plaintext: bytes) -> None:
        try:
            fragments = parse_handshake_fragments_untrusted(plaintext)
        except DtlsDecodeError as e:
            if record.epoch == 1:
                raise AlertError(AD.decode_error, f"handshake record: {e}") from None
            self.stats.dropped_malformed += 1
            return
        for frag in fragments:
            if self._closed:
                return
            if (
                frag.msg_type == HandshakeType.EKT_KEY
                and self._config.is_client
                and record.epoch == 1
                and len(self._ack_pending) < MAX_FUTURE_RECORDS
            ):
                self._ack_pending.append((record.epoch, record.sequence_number))
            self._handle_fragment(record, frag)
        if self._ack_pending and self._established and not self._closed:
            # ACK every record that carried EKTKey, retransmissions too (D9, RFC 9147 §7);
            # records that came before our handshake completed are ACKed now.
            ack = Ack(tuple(dict.fromkeys(self._ack_pending))).encode()
            self._ack_pending.clear()
            self._out.append(self._record.seal(ContentType.ACK, ack))

    def _handle_fragment(self, record: DtlsRecord, frag: HandshakeFragment) -> None:
        route = self._hs.route_fragment(frag, record.epoch)  # the state table decides
        if route is Route.DROP:
            self.stats.fragments_dropped += 1
            return
        if route is Route.NEW_HELLO:
            # Not answered here: the caller starts a new DtlsConnection for it (through the
            # CookieGate), e.g. after client_offer_untrusted() saw a new client_random.
            self.stats.dropped_unexpected += 1
            return
        if route is Route.LATE_PLAINTEXT:
            if frag.message_seq < self._reasm.next_seq:
                self.stats.dropped_old += 1
                self._peer_retransmitted = True
            else:
                self.stats.fragments_dropped += 1
            return
        if route is Route.HELLO_VERIFY:
            self._handle_message(
                record, ReceivedMessage(frag.msg_type, frag.message_seq, frag.body, record.epoch)
            )
            return
        if route is Route.FIRST:
            self._reasm.reset_to(frag.message_seq)
        messages: list[ReceivedMessage] = []
        status = self._reasm.add(frag, messages, record.epoch)
        if status == OLD:
            self.stats.dropped_old += 1
            self._peer_retransmitted = True
            return
        if status == DROPPED:
            self.stats.fragments_dropped += 1
        for m in messages:
            if self._closed:
                return
            self._handle_message(record, m)
        if self._established and not self._reasm.any_order and not self._closed:
            # The handshake just completed: switch to post-handshake numbering (D23) and
            # deliver what waited behind an abandoned message_seq (each message keeps the
            # epoch it arrived in, so a buffered plaintext one is refused as such).
            late: list[ReceivedMessage] = []
            self._reasm.switch_to_any_order(late)
            for m in late:
                if self.is_closed:
                    return
                self._handle_message(record, m)

    def _handle_message(self, record: DtlsRecord, m: ReceivedMessage) -> None:
        hs = self._hs
        if self._established and m.msg_type != HandshakeType.EKT_KEY:
            # No renegotiation (D17): a HelloRequest or epoch-1 ClientHello is ignored.
            self.stats.dropped_unexpected += 1
            return
        out = Output()
        try:
            # The message's own epoch (all its fragments share it), not the completing record's.
            hs.handle_message(
                m.msg_type, m.message_seq, m.body, m.epoch, record.sequence_number, out=out
            )
        finally:
            # Also when the handshake refused the message: e.g. our alert to a refused
            # ClientHello must carry the echoed record number (RFC 6347 §4.2.1).
            self._apply(out)
        if self._early_ccs and hs.expects_ccs:
            self._early_ccs = False
            self._accept_ccs()

    def _handle_ccs(self, record: DtlsRecord, plaintext: bytes) -> None:
        try:
            decode_change_cipher_spec(plaintext)
        except DtlsDecodeError:
            self.stats.dropped_malformed += 1
            return
        if record.epoch != 0 or self._established or self._record.read_epoch != 0:
            # Repeats and late copies are ignored (RFC 5246 §7.1).
            self.stats.dropped_unexpected += 1
            return
        route = self._hs.ccs_route()
        if route is CcsRoute.ACCEPT:
            self._accept_ccs()
        elif route is CcsRoute.EARLY:
            # Reordered ahead of the messages it follows: apply once they are in (RFC 5246 §7.1).
            self._early_ccs = True
        else:
            self.stats.dropped_unexpected += 1

    def _accept_ccs(self) -> None:
        self._hs.handle_ccs()
        self._record.activate_read_epoch()
        future, self._future = self._future, []
        for rec in future:
            if self._closed:
                return
            self._handle_record(rec)

    def _handle_alert(self, record: DtlsRecord, plaintext: bytes) -> None:
        try:
            alert = Alert.decode(plaintext)
        except DtlsDecodeError:
            self.stats.dropped_malformed += 1
            return
        if record.epoch == 0 and self._record.read_epoch == 1:
            # Unauthenticated once epoch 1 is read (RFC 5246 §7.2).
            self.stats.dropped_unexpected += 1
            return
        self._peer_event(AlertReceived(alert.level, alert.description))
        if alert.description == AD.close_notify:
            # Answer close_notify with close_notify (RFC 5246 §7.2.1).
            self._send_alert(AlertLevel.warning, AD.close_notify)
            self._end(ConnectionClosed(AD.close_notify, True, "close_notify"))
        elif alert.level == AlertLevel.fatal:
            try:
                name = AD(alert.description).name
            except ValueError:
                name = str(alert.description)
            self._end(ConnectionClosed(alert.description, True, f"alert received: {name}"))

    def _peer_event(self, event: Event) -> None:
        """Queue an event the peer can repeat at will (data, warnings), bounded: the
        protocol events (completion, EKT, close) are few by construction."""
        if len(self._events) >= MAX_PENDING_EVENTS:
            self.stats.events_dropped += 1
        else:
            self._events.append(event)

    def _handle_ack(self, plaintext: bytes) -> None:
        if self._config.is_client or not self._established:
            self.stats.dropped_unexpected += 1
            return
        try:
            ack = Ack.decode(plaintext)
        except DtlsDecodeError as e:
            raise AlertError(AD.decode_error, f"ACK: {e}") from None
        ekt = self._ekt
        if ekt is None:
            return
        ekt_numbers = set().union(*ekt.transmissions)
        self._ekt_acked.update(n for n in ack.record_numbers if n in ekt_numbers)
        if any(t <= self._ekt_acked for t in ekt.transmissions):
            self._ekt = None
            self._ekt_acked.clear()
            self._events.append(EktKeyAcknowledged(ekt.spi))
