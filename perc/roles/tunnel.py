"""The KMF<->MDD tunnel's I/O: mutually authenticated TLS 1.3 carrying RFC 9185 messages (trio).

Theory of operation
-------------------
Decision D1: the tunnel is TLS 1.3 over TCP; both sides present self-signed certificates and
pin each other by certificate fingerprint (D20). The stdlib :mod:`ssl` module cannot do that
on the server side: a server that asks for a client certificate (``CERT_OPTIONAL`` /
``CERT_REQUIRED``) always verifies it against a CA store, and the KMF knows its MDDs only by
fingerprint. So the TLS engine here is OpenSSL through pyOpenSSL, driven over memory BIOs,
with a verify callback that accepts the peer's leaf certificate iff its fingerprint is
trusted. A refused fingerprint fails the handshake itself (an alert goes to the peer), on both
sides: the KMF requires a client certificate (``VERIFY_FAIL_IF_NO_PEER_CERT``) whose
fingerprint is in ``trusted_mdds``; the MDD accepts only the configured ``kmf_fingerprint``.
Only the leaf certificate is pinned; chain certificates and validity dates carry no authority
(the fingerprint is the identity, as with SDP ``a=fingerprint``).

TLS 1.3 note: the client finishes its handshake before the server has checked the client's
certificate, so an MDD refused by the KMF learns it from the alert on its first read (the
connection then fails with :class:`TunnelClosed`); the KMF never accepts such a tunnel.

:class:`TunnelConnection` owns one TCP stream and one OpenSSL connection:

* Reading (one task): TCP bytes -> ``bio_write`` -> ``SSL_read`` -> :class:`TunnelFramer` ->
  a list of messages per read, so a burst of records costs one scheduler round trip.
* Writing (one writer task, started by :meth:`TunnelConnection.run`): :meth:`send` encodes a
  message and appends it to a bounded plaintext queue, synchronously, from any task; the
  writer encrypts everything queued in one ``SSL_write`` (few, full TLS records) and sends the
  ciphertext with one ``send_all``. While it waits for the socket, new messages pile up into
  the next batch (STYLE practice 11). The queue is bounded (``max_pending`` bytes): a
  relayed DTLS datagram that does not fit is dropped and counted (DTLS retransmits); control
  messages (SupportedProfiles, UnsupportedVersion, MediaKeys, EndpointDisconnect) are always
  queued, since their number is bounded by the association table.
* Closing: when the session function given to :meth:`run` returns or raises, the writer
  flushes what is queued and sends close_notify (bounded by ``close_timeout``), then the
  socket is closed. So "send UnsupportedVersion, then close" (RFC 9185 §5.5) is: queue it,
  return. When the task is cancelled instead (process shutdown), queued messages are
  dropped but close_notify is still sent, briefly and shielded, if the stream is intact.

Deadlines: the handshake has one (``handshake``'s ``timeout``); with ``message_timeout``
set, a tunnel message whose first bytes arrived must be complete within that many seconds,
else :class:`TunnelStalled` (a frame header promising bytes that never come would otherwise
hold the connection and its buffer forever). An idle tunnel (no partial message) has no
deadline. While it handshakes, :attr:`TunnelConnection.handshake_progress` tells a server how
far the peer got, so that under pressure it can close the connection that shows the least.

Errors: :class:`TlsHandshakeError` (handshake failed or timed out, including a refused
fingerprint; ``kind`` says which for counters), :class:`TunnelClosed` (the connection ended:
EOF, reset, TLS alert, close_notify; :class:`TunnelStalled` a partial message's deadline),
:class:`TunnelProtocolError` (the peer's bytes broke the tunnel rules, D2). All derive from
:class:`TunnelError`. Network failures never escape as other exceptions: a reset, a timeout or
a TLS failure is one of these, with a one-line reason.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Awaitable, Callable, Mapping

import attrs
import trio
from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL, crypto

from perc.identity import Identity, fingerprint_of_der
from perc.keylog import ENV_VAR, KeyLog
from perc.logsetup import format_address
from perc.wire.tunnel import (
    TunnelDecodeError,
    TunneledDtls,
    TunnelFramer,
    TunnelMessage,
    encode_message,
)

__all__ = [
    "CLOSE_TIMEOUT",
    "HANDSHAKE_TIMEOUT",
    "MAX_PENDING",
    "TlsHandshakeError",
    "TunnelClosed",
    "TunnelConnection",
    "TunnelError",
    "TunnelProtocolError",
    "TunnelStalled",
    "TunnelStats",
    "format_address",
    "make_tls_context",
    "tunnel_keylog",
]

log = logging.getLogger(__name__)

#: Default bound on the TLS handshake (seconds).
HANDSHAKE_TIMEOUT = 10.0
#: Default bound on the graceful close (flush + close_notify), seconds.
CLOSE_TIMEOUT = 2.0
#: Default bound on queued, not yet encrypted, tunnel bytes per connection.
MAX_PENDING = 1 << 20
_READ_SIZE = 1 << 16


class TunnelError(Exception):
    """Base of the tunnel I/O errors."""


class TlsHandshakeError(TunnelError):
    """The TLS handshake failed, timed out, or a peer fingerprint was refused.

    ``kind``: ``"timeout"``, ``"reset"`` (the connection broke or the peer closed it) or
    ``"tls"`` (a TLS error or alert, a refused certificate)."""

    def __init__(self, message: str, kind: str = "tls") -> None:
        super().__init__(message)
        self.kind = kind


class TunnelClosed(TunnelError):
    """The tunnel connection ended (EOF, reset, TLS alert or close_notify)."""


class TunnelStalled(TunnelClosed):
    """A partly received tunnel message did not complete within ``message_timeout``."""


class TunnelProtocolError(TunnelError):
    """The peer broke the tunnel's rules (decision D2): the tunnel must be closed."""


def make_tls_context(
    identity: Identity,
    *,
    server: bool,
    is_trusted: Callable[[str], bool],
    keylog: Callable[[str], None] | None = None,
) -> SSL.Context:
    """A TLS 1.3-only OpenSSL context presenting ``identity`` and pinning the peer.

    ``is_trusted(fingerprint)`` decides on the peer's leaf certificate (D20 text form). The
    server requires a client certificate. TLS 1.3 key-log lines (NSS format) go to
    ``keylog``, or, without one, to the file ``SSLKEYLOGFILE`` names if it is set
    (:func:`tunnel_keylog`), so that Wireshark can decrypt the tunnel.
    """
    ctx = SSL.Context(SSL.TLS_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_3_VERSION)
    ctx.set_max_proto_version(SSL.TLS1_3_VERSION)
    ctx.use_certificate(identity.certificate)
    ctx.use_privatekey(identity.private_key)
    ctx.check_privatekey()
    # No resumption: every tunnel connection is a full, mutually authenticated handshake.
    ctx.set_options(SSL.OP_NO_TICKET)

    def verify(conn: SSL.Connection, cert: crypto.X509, errno: int, depth: int, ok: int) -> bool:
        if depth != 0:
            return True  # only the leaf is pinned; chain certificates carry no authority
        der = cert.to_cryptography().public_bytes(serialization.Encoding.DER)
        fingerprint = fingerprint_of_der(der)
        owner = conn.get_app_data()
        if isinstance(owner, TunnelConnection):
            owner.peer_fingerprint = fingerprint
        return bool(is_trusted(fingerprint))

    mode = SSL.VERIFY_PEER
    if server:
        mode |= SSL.VERIFY_FAIL_IF_NO_PEER_CERT
    ctx.set_verify(mode, verify)

    sink = keylog if keylog is not None else tunnel_keylog()
    if sink is not None:
        write = sink

        def log_secret(conn: SSL.Connection, line: bytes) -> None:
            # OpenSSL hands one complete line per secret; the writer appends it in one write.
            write(line.decode("ascii", "replace"))

        ctx.set_keylog_callback(log_secret)
    return ctx


#: One key-log writer per file for all tunnel contexts of the process (see tunnel_keylog).
_tunnel_keylogs: dict[str, KeyLog] = {}


def tunnel_keylog(environ: Mapping[str, str] | None = None) -> KeyLog | None:
    """The process's tunnel key-log writer for ``SSLKEYLOGFILE``, or None when it is unset.

    Opened once per path and kept for the life of the process (a KMF or MDD makes its TLS
    context once). It is a separate descriptor from the DTLS key log's, on the same file:
    both append whole lines with one ``O_APPEND`` write, so lines never interleave. Raises
    :class:`perc.keylog.KeyLogError` when the file cannot be opened.
    """
    env = os.environ if environ is None else environ
    path = env.get(ENV_VAR, "")
    if not path:
        return None
    existing = _tunnel_keylogs.get(path)
    if existing is not None:
        return existing
    opened = KeyLog(path)
    _tunnel_keylogs[path] = opened
    log.warning(
        "%s is set: tunnel TLS secrets are appended to %s; anyone who can read that file can "
        "decrypt the tunnel, including the hop-by-hop SRTP keys in MediaKeys",
        ENV_VAR,
        opened.path,
    )
    return opened


@attrs.define
class TunnelStats:
    """Counters of one tunnel connection."""

    messages_in: int = 0
    messages_out: int = 0
    bytes_in: int = 0
    """Plaintext tunnel bytes received."""
    bytes_out: int = 0
    """Plaintext tunnel bytes sent (encrypted)."""
    batches_out: int = 0
    """Writer wake-ups that encrypted and sent something (messages_out / batches_out = batching)."""
    dropped_backpressure: int = 0
    """Relayed DTLS messages dropped because the send queue was full."""
    dropped_closed: int = 0
    """Messages given to :meth:`TunnelConnection.send` after the connection stopped sending."""


class TunnelConnection:
    """One TLS tunnel connection: handshake, message reads, batched writes, graceful close."""

    def __init__(
        self,
        transport: trio.SocketStream,
        context: SSL.Context,
        *,
        server: bool,
        peer: str,
        max_pending: int = MAX_PENDING,
        close_timeout: float = CLOSE_TIMEOUT,
        message_timeout: float | None = None,
    ) -> None:
        self._transport = transport
        self._ssl = SSL.Connection(context, None)
        self._ssl.set_app_data(self)
        if server:
            self._ssl.set_accept_state()
        else:
            self._ssl.set_connect_state()
        self.peer = peer
        #: The peer's leaf certificate fingerprint, once the handshake has seen it.
        self.peer_fingerprint: str | None = None
        self.stats = TunnelStats()
        self._framer = TunnelFramer()
        self._plain_out = bytearray()
        self._cipher_out = bytearray()
        self._max_pending = max_pending
        self._close_timeout = close_timeout
        self._wake = trio.Event()
        self._closing = False
        self._stopped = False  # no more sends possible
        self._in_send = False  # a send_all is (or was, if cancelled) in progress
        self._close_notify_sent = False
        self._early = bytearray()
        self._eof = False
        self._peer_closed = False
        self._broken: str | None = None
        self._message_timeout = message_timeout
        self._partial_since: float | None = None
        self._got_bytes = False
        self._flight_sent = False
        #: when the handshake last saw the peer do something (started, or bytes arrived)
        self.last_progress = 0.0

    # --- handshake ---------------------------------------------------------------------------

    async def handshake(self, timeout: float = HANDSHAKE_TIMEOUT) -> None:
        """Run the TLS handshake; raise :class:`TlsHandshakeError` on any failure."""
        self.last_progress = trio.current_time()
        try:
            with trio.fail_after(timeout):
                await self._handshake()
        except trio.TooSlowError:
            await self._abandon()
            raise TlsHandshakeError(
                f"TLS handshake timed out after {timeout:g} s", "timeout"
            ) from None
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as e:
            await self._abandon()
            raise TlsHandshakeError(
                f"connection failed during the TLS handshake: {_os_error_text(e)}", "reset"
            ) from None
        except BaseException:
            # TlsHandshakeError, or cancellation: never leak the socket.
            await self._abandon()
            raise

    @property
    def handshake_progress(self) -> int:
        """How far the peer got: 0 nothing received, 1 some bytes, 2 a whole first flight (we
        answered it). A server under pressure closes the lowest first."""
        return 2 if self._flight_sent else 1 if self._got_bytes else 0

    async def _abandon(self) -> None:
        self._stopped = True
        self._ssl.set_app_data(None)  # no reference cycle left behind (memory, under attack)
        await trio.aclose_forcefully(self._transport)

    async def _handshake(self) -> None:
        while True:
            failure: SSL.Error | None = None
            done = False
            try:
                self._ssl.do_handshake()
                done = True
            except SSL.WantReadError:
                pass
            except SSL.Error as e:
                failure = e
            self._drain_bio()
            if self._cipher_out:
                data = bytes(self._cipher_out)
                self._cipher_out.clear()
                if failure is None:
                    self._flight_sent = self._got_bytes
                    await self._transport.send_all(data)
                else:
                    # Best effort: let the peer see our alert.
                    with trio.move_on_after(0.5):
                        try:
                            await self._transport.send_all(data)
                        except (trio.BrokenResourceError, trio.ClosedResourceError):
                            pass
            if failure is not None:
                raise TlsHandshakeError(self._describe_failure(failure))
            if done:
                return
            data = await self._transport.receive_some(_READ_SIZE)
            if not data:
                raise TlsHandshakeError(
                    "peer closed the connection during the TLS handshake", "reset"
                )
            self._got_bytes = True
            self.last_progress = trio.current_time()
            self._ssl.bio_write(data)

    def _describe_failure(self, error: SSL.Error) -> str:
        text = _ssl_error_text(error)
        if "certificate verify failed" in text and self.peer_fingerprint is not None:
            return f"peer certificate {self.peer_fingerprint} is not trusted ({text})"
        if "certificate verify failed" in text or "peer did not return a certificate" in text:
            return f"peer certificate refused ({text})"
        if "alert" in text:
            return f"peer refused the handshake ({text})"
        return f"TLS handshake failed: {text}"

    async def wait_accepted(self, timeout: float = HANDSHAKE_TIMEOUT) -> bool:
        """Client: wait for the server to show that it accepted our certificate.

        In TLS 1.3 the client's handshake ends before the server has checked the client's
        certificate. An OpenSSL server then sends NewSessionTicket records, or an alert if it
        refused us. This waits for the first post-handshake record: True once one was
        processed without error, False if none came within ``timeout`` (a server that sends
        no tickets; the caller proceeds). A refusal raises :class:`TunnelClosed`. Any
        application data read here is kept for :meth:`receive_messages`.
        """
        with trio.move_on_after(timeout):
            try:
                data = await self._transport.receive_some(_READ_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as e:
                raise TunnelClosed(f"connection failed: {e}") from None
            if not data:
                self._eof = True
                self._ssl.bio_shutdown()
            else:
                self._ssl.bio_write(data)
            self._early += self._read_plaintext()
            if self._eof and not self._early:
                raise TunnelClosed("peer closed the connection after the handshake")
            return True
        return False

    @property
    def tls_version(self) -> str:
        return str(self._ssl.get_protocol_version_name())

    # --- writing -----------------------------------------------------------------------------

    def send(self, msg: TunnelMessage) -> bool:
        """Queue one message for the writer. Returns False if it was dropped (and counted).

        Relayed DTLS (:class:`TunneledDtls`) is dropped when the queue is full; other messages
        are always queued while the connection is open.
        """
        return self.send_encoded(encode_message(msg), droppable=isinstance(msg, TunneledDtls))

    def send_encoded(self, data: bytes, *, droppable: bool) -> bool:
        """Queue one already encoded message (see :meth:`send`)."""
        if self._stopped or self._closing:
            self.stats.dropped_closed += 1
            return False
        if droppable and len(self._plain_out) + len(data) > self._max_pending:
            self.stats.dropped_backpressure += 1
            return False
        if not self._plain_out:
            self._wake.set()
        self._plain_out += data
        self.stats.messages_out += 1
        self.stats.bytes_out += len(data)
        return True

    def close_soon(self) -> None:
        """Stop accepting messages; the writer flushes what is queued and sends close_notify."""
        self._closing = True
        self._wake.set()

    @property
    def pending(self) -> int:
        """Queued plaintext bytes not yet handed to TLS."""
        return len(self._plain_out)

    @property
    def is_open(self) -> bool:
        return not (self._stopped or self._closing)

    def _drain_bio(self) -> None:
        while True:
            try:
                chunk = self._ssl.bio_read(_READ_SIZE)
            except SSL.WantReadError:
                return
            if not chunk:
                return
            self._cipher_out += chunk

    async def _send_cipher(self) -> None:
        data = bytes(self._cipher_out)
        self._cipher_out.clear()
        # A send_all cancelled half-way leaves the stream unusable; remember that.
        self._in_send = True
        await self._transport.send_all(data)
        self._in_send = False

    def _queue_close_notify(self) -> None:
        # RFC 8446 §6.1: close_notify before closing the write side.
        if self._close_notify_sent:
            return
        self._close_notify_sent = True
        try:
            self._ssl.shutdown()
        except SSL.Error:
            pass
        self._drain_bio()

    async def _writer(self) -> None:
        try:
            while True:
                if not self._plain_out and not self._cipher_out:
                    if self._closing:
                        break
                    self._wake = trio.Event()
                    await self._wake.wait()
                    continue
                if self._plain_out:
                    plain = bytes(self._plain_out)
                    self._plain_out.clear()
                    self._ssl.sendall(plain)
                    self._drain_bio()
                self.stats.batches_out += 1
                await self._send_cipher()
            # Graceful end: everything queued is sent; close_notify, then stop.
            self._queue_close_notify()
            if self._cipher_out:
                await self._send_cipher()
        except (trio.BrokenResourceError, trio.ClosedResourceError, SSL.Error, OSError) as e:
            self._broken = f"sending failed: {e}"
            # Wake the reader, which is waiting on the same socket.
            await trio.aclose_forcefully(self._transport)
        finally:
            self._stopped = True
            self._plain_out.clear()

    async def _close_notify_on_cancel(self) -> None:
        """Cancelled from outside (shutdown): still tell the peer, briefly, if the stream is
        intact, so that it logs a clean close rather than a truncated connection."""
        if self._close_notify_sent or self._in_send or self._broken is not None:
            return
        with trio.CancelScope(shield=True), trio.move_on_after(min(self._close_timeout, 0.5)):
            self._queue_close_notify()
            if self._cipher_out:
                try:
                    await self._send_cipher()
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    pass

    # --- reading -----------------------------------------------------------------------------

    async def receive_messages(self) -> list[TunnelMessage]:
        """Wait for and return the next messages (at least one).

        Raises :class:`TunnelClosed` when the connection has ended and
        :class:`TunnelProtocolError` when the bytes do not frame or parse (D2).
        """
        while True:
            plain = self._read_plaintext()
            if self._early:
                plain = bytes(self._early) + plain
                self._early.clear()
            if plain:
                self.stats.bytes_in += len(plain)
                try:
                    msgs = self._framer.feed(plain)
                except TunnelDecodeError as e:
                    raise TunnelProtocolError(str(e)) from None
                if msgs:
                    self.stats.messages_in += len(msgs)
                    return msgs
            if self._peer_closed:
                raise TunnelClosed("peer closed the tunnel (close_notify)")
            if self._eof:
                raise TunnelClosed("peer closed the connection")
            stalled = True
            try:
                with trio.move_on_at(self._message_deadline()):
                    data = await self._transport.receive_some(_READ_SIZE)
                    stalled = False
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as e:
                raise TunnelClosed(
                    self._broken or f"connection failed: {_os_error_text(e)}"
                ) from None
            if stalled:
                raise TunnelStalled(
                    f"a tunnel message stalled: {self._framer.pending} bytes of it arrived, "
                    f"the rest not within {self._message_timeout:g} s"
                )
            if data:
                self._ssl.bio_write(data)
            else:
                self._eof = True
                self._ssl.bio_shutdown()

    def _message_deadline(self) -> float:
        """When the partly received message must be complete (inf: none is partial)."""
        if self._message_timeout is None or not self._framer.pending:
            self._partial_since = None
            return math.inf
        if self._partial_since is None:
            self._partial_since = trio.current_time()
        return self._partial_since + self._message_timeout

    def _read_plaintext(self) -> bytes:
        chunks: list[bytes] = []
        try:
            while True:
                chunks.append(self._ssl.recv(_READ_SIZE))
        except SSL.WantReadError:
            pass
        except SSL.ZeroReturnError:
            self._peer_closed = True
        except SSL.Error as e:
            if chunks:
                # Deliver what arrived before the failure; the next call raises.
                self._eof = True
            else:
                raise TunnelClosed(f"TLS error: {_ssl_error_text(e)}") from None
        # Reading may produce TLS output (alerts, key updates): hand it to the writer.
        self._drain_bio()
        if self._cipher_out:
            self._wake.set()
        return b"".join(chunks)

    # --- lifetime ----------------------------------------------------------------------------

    async def run(self, session: Callable[[TunnelConnection], Awaitable[None]]) -> None:
        """Run ``session(self)`` (the reading side) with the writer alongside, then close.

        When ``session`` returns or raises, queued messages are flushed and close_notify sent
        (within ``close_timeout``), then the socket is closed; ``session``'s exception (if
        any) is then re-raised as is.
        """
        error: Exception | None = None
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._writer)
                try:
                    await session(self)
                except Exception as e:
                    error = e
                finally:
                    self.close_soon()
                    nursery.cancel_scope.deadline = min(
                        nursery.cancel_scope.deadline, trio.current_time() + self._close_timeout
                    )
        finally:
            self._stopped = True
            await self._close_notify_on_cancel()
            await self._abandon()
        if error is not None:
            raise error

    async def aclose(self) -> None:
        """Close the socket without a graceful TLS close (used when :meth:`run` never ran)."""
        await self._abandon()


def _os_error_text(error: BaseException) -> str:
    """A one-line reason for a socket failure (trio wraps the OSError of a reset)."""
    for e in (error, error.__cause__, error.__context__):
        if isinstance(e, OSError):
            return e.strerror or str(e)
    return str(error) or type(error).__name__


def _ssl_error_text(error: SSL.Error) -> str:
    """A one-line reason from a pyOpenSSL error (its args hold OpenSSL's error queue)."""
    if isinstance(error, SSL.SysCallError):
        return "unexpected EOF" if error.args and error.args[0] == -1 else str(error)
    parts: list[str] = []
    for arg in error.args:
        if isinstance(arg, list):
            for item in arg:
                if isinstance(item, tuple) and item:
                    parts.append(str(item[-1]))
        elif arg:
            parts.append(str(arg))
    return "; ".join(parts) or type(error).__name__
