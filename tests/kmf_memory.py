"""An in-memory KMF for tests: :class:`perc.kmf.KmfEngine`, fake tunnels and a fake clock.

:class:`MemoryKmf` plays the shell (:mod:`perc.roles.kmf`) without I/O: it opens tunnels in
the engine, hands it messages, routes what it sends into per-tunnel lists, collects its
events and runs its timers when the test moves the clock (``now`` is a plain float). The
endpoints are perc's DTLS clients (:class:`perc.dtls.DtlsConnection`), driven by
:func:`pump` with the same clock.
"""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Sequence

from perc.config import KmfConfig
from perc.dtls import DtlsConfiguration, DtlsConnection, events
from perc.events import Event
from perc.identity import Identity
from perc.kmf import CloseTunnel, KmfEngine
from perc.wire.tunnel import (
    EndpointDisconnect,
    MediaKeys,
    SupportedProfiles,
    TunneledDtls,
    TunnelMessage,
)


class FakeTunnel:
    """One tunnel of a :class:`MemoryKmf`: records what the engine sends on it."""

    def __init__(
        self, kmf: MemoryKmf, tunnel_id: int, fingerprint: str, *, refuse_media_keys: bool
    ) -> None:
        self.kmf = kmf
        self.tunnel_id = tunnel_id
        self.mdd_fingerprint = fingerprint
        self.is_open = True
        self.refuse_media_keys = refuse_media_keys
        self.dtls: list[tuple[uuid.UUID, bytes]] = []
        self.media_keys: list[MediaKeys] = []
        self.disconnects: list[uuid.UUID] = []
        self.other: list[TunnelMessage | CloseTunnel] = []

    def deliver(self, aid: uuid.UUID, datagram: bytes) -> None:
        self.kmf.receive(self, [TunneledDtls(aid, datagram)])

    def disconnect(self, aid: uuid.UUID) -> None:
        self.kmf.receive(self, [EndpointDisconnect(aid)])

    def close(self, reason: str = "peer closed the tunnel (close_notify)") -> None:
        self.is_open = False
        self.kmf.engine.tunnel_closed(self.tunnel_id, reason, self.kmf.now)
        self.kmf.route()

    def take_dtls(self, aid: uuid.UUID | None = None) -> list[bytes]:
        """The DTLS datagrams sent so far (for ``aid`` only, if given); the rest stay."""
        taken = [d for a, d in self.dtls if aid is None or a == aid]
        self.dtls = [(a, d) for a, d in self.dtls if aid is not None and a != aid]
        return taken


class MemoryKmf:
    """A :class:`KmfEngine` with fake tunnels and a fake clock (see the module docstring)."""

    def __init__(self, config: KmfConfig, *, now: float = 0.0, **engine_args: object) -> None:
        self.now = now
        self.engine = KmfEngine(config, **engine_args)  # type: ignore[arg-type]
        self.tunnels: dict[int, FakeTunnel] = {}
        self.events: list[Event] = []
        self._ids = itertools.count(1)

    def tunnel(
        self,
        fingerprint: str,
        profiles: Sequence[int] = (0x0009, 0x000A),
        *,
        refuse_media_keys: bool = False,
    ) -> FakeTunnel:
        """A tunnel as the shell opens it: TLS accepted, then the MDD's SupportedProfiles."""
        tid = next(self._ids)
        tunnel = self.tunnels[tid] = FakeTunnel(
            self, tid, fingerprint, refuse_media_keys=refuse_media_keys
        )
        self.engine.tunnel_opened(tid, peer=f"mdd-{tid}", mdd_fingerprint=fingerprint, now=self.now)
        self.receive(tunnel, [SupportedProfiles(0, tuple(profiles))])
        return tunnel

    def receive(self, tunnel: FakeTunnel, messages: list[TunnelMessage]) -> None:
        self.engine.receive_messages(tunnel.tunnel_id, messages, self.now)
        self.route()

    def route(self) -> None:
        """Deliver what the engine sends (refusals go back as message_not_sent); events."""
        engine = self.engine
        while out := engine.messages_to_send():
            for tid, msg in out:
                tunnel = self.tunnels.get(tid)
                refused = tunnel is None or not tunnel.is_open
                if tunnel is not None and isinstance(msg, MediaKeys):
                    refused = refused or tunnel.refuse_media_keys
                if refused:
                    if not isinstance(msg, CloseTunnel):
                        engine.message_not_sent(tid, msg, self.now)
                    continue
                assert tunnel is not None
                if isinstance(msg, TunneledDtls):
                    tunnel.dtls.append((msg.association_id, msg.dtls_message))
                elif isinstance(msg, MediaKeys):
                    tunnel.media_keys.append(msg)
                elif isinstance(msg, EndpointDisconnect):
                    tunnel.disconnects.append(msg.association_id)
                else:
                    tunnel.other.append(msg)
        while (event := engine.next_event()) is not None:
            self.events.append(event)

    def advance(self, to: float) -> int:
        """Move the clock to ``to``, running every engine timer due on the way; returns how
        many times the timer fired (one shell wake-up each)."""
        fired = 0
        while (timer := self.engine.get_timer()) is not None and timer <= to:
            self.now = max(self.now, timer)
            self.engine.handle_timer(self.now)
            self.route()
            fired += 1
        self.now = max(self.now, to)
        return fired

    def rekey(self, conference: str) -> object:
        key = self.engine.rekey(conference, self.now)
        self.route()
        return key

    def of(self, kind: type[Event]) -> list[Event]:
        return [e for e in self.events if isinstance(e, kind)]


def client(
    ident: Identity,
    *,
    tls_id: bytes | None = b"a-session-id-0123456789",
    ekt_ciphers: tuple[int, ...] = (1, 2),
    profiles: tuple[int, ...] = (0x0009, 0x000A),
) -> DtlsConnection:
    """An endpoint's DTLS client (perc's engine)."""
    return DtlsConnection(
        DtlsConfiguration(
            is_client=True,
            certificate=ident.certificate,
            private_key=ident.private_key,
            tls_id=tls_id,
            ekt_ciphers=ekt_ciphers,
            srtp_profiles=profiles,
        )
    )


def pump(kmf: MemoryKmf, endpoint: DtlsConnection, aid: uuid.UUID, tunnel: FakeTunnel) -> None:
    """Carry datagrams both ways through ``tunnel`` until nothing moves (no loss, no timers)."""
    while True:
        moved = False
        for datagram in endpoint.datagrams_to_send():
            tunnel.deliver(aid, datagram)
            moved = True
        for datagram in tunnel.take_dtls(aid):
            endpoint.receive_datagram(datagram, kmf.now)
            moved = True
        if not moved:
            return


def endpoint_events(endpoint: DtlsConnection) -> list[events.Event]:
    out = []
    while (event := endpoint.next_event()) is not None:
        out.append(event)
    return out


def join(mem: MemoryKmf, ident: Identity, tunnel: FakeTunnel) -> tuple[DtlsConnection, uuid.UUID]:
    """A perc DTLS client joins through ``tunnel`` on a new association id (pumped to the end)."""
    endpoint, aid = client(ident), uuid.uuid4()
    endpoint.connect(mem.now)
    pump(mem, endpoint, aid, tunnel)
    return endpoint, aid


def ekt_spis(endpoint: DtlsConnection) -> list[int]:
    """The SPIs of the EKTKeys ``endpoint`` received, in order."""
    return [e.spi for e in endpoint_events(endpoint) if isinstance(e, events.EktKeyReceived)]
