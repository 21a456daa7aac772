"""Join helpers for tests: an endpoint's DTLS client (perc's sans-IO engine) over real UDP.

``join_once(mdd_addr, identity, kmf_fingerprint, ...)`` runs one DTLS-SRTP handshake from a
fresh loopback UDP socket to an MDD's conference port, checks the KMF's certificate
fingerprint (``bad_certificate`` otherwise, as an endpoint must, RFC 8871 §5), waits for the
EKTKey (ACKed by the engine, D9) or the end of the association, and returns a
:class:`JoinResult` with everything a test wants to compare: the ``HandshakeCompleted`` event
(exporter output, profile, the KMF's tls-id), the ``EktKeyReceived``, the ``ConnectionClosed``
and the key-log lines. The socket stays open (``result.socket``) unless ``close=True``, so a
test can keep the endpoint "alive", send a close_notify (``await result.leave()``) or simply
drop it (the MDD's idle timeout then ends it, D3). Works under ``MockClock``.

Also: :func:`keying_kmf_config` builds a KmfConfig with a roster, without files.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import attrs
import trio

from perc.config import Fingerprint, HostPort, KmfConference, KmfConfig, KmfSettings
from perc.dtls import DtlsConfiguration, DtlsConnection, PeerIdentity, events
from perc.dtls.errors import AlertDescription
from perc.identity import Identity
from perc.tlsid import random_tls_id

LOCAL = "127.0.0.1"
DOUBLE_PROFILES = (0x0009, 0x000A)


def keying_kmf_config(
    ident: Identity,
    trusted_mdds: Sequence[Identity],
    participants: Mapping[str, Sequence[Identity]],
    *,
    tls_ids: Mapping[str, Mapping[Identity, str]] | None = None,
    dtls_cookies: bool = True,
    profiles: Sequence[int] = DOUBLE_PROFILES,
    tls_id: str | None = None,
    ekt_ttl: int = 86400,
) -> KmfConfig:
    """A KMF config listening on an ephemeral loopback port; ``participants`` per conference."""
    conferences = []
    for cid, members in participants.items():
        ids = (tls_ids or {}).get(cid, {})
        conferences.append(
            KmfConference(
                id=cid,
                participants=tuple(Fingerprint(m.fingerprint) for m in members),
                tls_ids={Fingerprint(m.fingerprint): t for m, t in ids.items()},
                ekt_ttl=ekt_ttl,
            )
        )
    return KmfConfig(
        kmf=KmfSettings(
            listen=HostPort(LOCAL, 0),
            cert=Path("unused.crt"),
            key=Path("unused.key"),
            trusted_mdds=tuple(Fingerprint(i.fingerprint) for i in trusted_mdds),
            dtls_cookies=dtls_cookies,
            profiles=tuple(profiles),
            tls_id=tls_id,
            handshake_timeout=5.0,
        ),
        conferences=tuple(conferences),
        identity=ident,
    )


@attrs.define(eq=False)
class JoinResult:
    connection: DtlsConnection
    socket: trio.socket.SocketType
    mdd_addr: tuple[str, int]
    local_address: tuple[str, int]
    completed: events.HandshakeCompleted | None = None
    ekt_key: events.EktKeyReceived | None = None
    closed: events.ConnectionClosed | None = None
    ekt_keys: list[events.EktKeyReceived] = attrs.Factory(list)
    alerts: list[events.AlertReceived] = attrs.Factory(list)
    keylog_lines: list[str] = attrs.Factory(list)
    elapsed: float = 0.0

    @property
    def joined(self) -> bool:
        return self.completed is not None and self.ekt_key is not None and self.closed is None

    @property
    def alert_received(self) -> int | None:
        """The fatal alert the KMF sent us, if the association ended that way."""
        if self.closed is not None and self.closed.sent_by_peer:
            return self.closed.alert
        return None

    async def pump(self, done: Callable[[], bool]) -> None:
        """Drive the client: send, receive, timers, events; return once ``done()`` holds."""
        conn, sock = self.connection, self.socket
        while True:
            for datagram in conn.datagrams_to_send():
                await sock.sendto(datagram, self.mdd_addr)
            while (event := conn.next_event()) is not None:
                if isinstance(event, events.HandshakeCompleted):
                    self.completed = event
                elif isinstance(event, events.EktKeyReceived):
                    self.ekt_key = event
                    self.ekt_keys.append(event)
                elif isinstance(event, events.AlertReceived):
                    self.alerts.append(event)
                elif isinstance(event, events.ConnectionClosed):
                    self.closed = event
            # The ACK of an EKTKey is queued with the event: send it before returning.
            for datagram in conn.datagrams_to_send():
                await sock.sendto(datagram, self.mdd_addr)
            if done():
                return
            timer = conn.get_timer()
            with trio.move_on_at(timer if timer is not None else math.inf):
                data, _ = await sock.recvfrom(65535)
                conn.receive_datagram(data, trio.current_time())
                continue
            conn.handle_timer(trio.current_time())

    async def serve(self) -> None:
        """Keep the joined endpoint answering (EKTKey retransmissions, rekeys) until closed."""
        await self.pump(lambda: self.closed is not None)

    async def leave(self) -> None:
        """Send close_notify to the KMF (through the MDD) and close the socket."""
        self.connection.close(trio.current_time())
        for datagram in self.connection.datagrams_to_send():
            await self.socket.sendto(datagram, self.mdd_addr)
        self.socket.close()


async def join_once(
    mdd_addr: tuple[str, int],
    identity: Identity,
    kmf_fingerprint: str,
    *,
    tls_id: bytes | None = None,
    send_tls_id: bool = True,
    kmf_tls_id: bytes | None = None,
    profiles: Sequence[int] = DOUBLE_PROFILES,
    ekt_ciphers: Sequence[int] = (1, 2),
    timeout: float = 20.0,
    close: bool = False,
    sock: trio.socket.SocketType | None = None,
) -> JoinResult:
    """One endpoint join through the MDD at ``mdd_addr``; returns when the EKTKey arrived, the
    association ended, or ``timeout`` (virtual) seconds passed."""

    def verify(peer: PeerIdentity) -> int | None:
        if peer.fingerprint != kmf_fingerprint:
            return int(AlertDescription.bad_certificate)
        return None

    if tls_id is None and send_tls_id:
        tls_id = random_tls_id().encode()  # D15: random per session unless given
    lines: list[str] = []
    config = DtlsConfiguration(
        is_client=True,
        certificate=identity.certificate,
        private_key=identity.private_key,
        srtp_profiles=tuple(profiles),
        ekt_ciphers=tuple(ekt_ciphers),
        tls_id=tls_id,
        expected_peer_tls_id=kmf_tls_id,
        verify_peer=verify,
        handshake_timeout=timeout,
        keylog=lines.append,
    )
    conn = DtlsConnection(config)
    if sock is None:
        sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
        await sock.bind((LOCAL, 0))
    local = sock.getsockname()
    result = JoinResult(conn, sock, mdd_addr, (local[0], local[1]), keylog_lines=lines)
    start = trio.current_time()
    conn.connect(start)
    with trio.move_on_after(timeout):
        await result.pump(lambda: result.closed is not None or result.ekt_key is not None)
    result.elapsed = trio.current_time() - start
    if close:
        sock.close()
    return result
