"""Builders for perc's DTLS engine in the interop, lossy and robustness tests."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from perc.dtls import CookieGate, DtlsConfiguration, DtlsConnection
from perc.identity import Identity
from tests.dtls_interop.harness import EnginePeer, describe

EKT_KEY = bytes(range(16))
EKT_SALT = bytes(range(100, 114))
EKT_SPI = 0x1234
EKT_TTL = 3600


def config(is_client: bool, ident: Identity, **options: Any) -> DtlsConfiguration:
    return DtlsConfiguration(
        is_client=is_client,
        certificate=ident.certificate,
        private_key=ident.private_key,
        **options,
    )


def client_peer(ident: Identity, **options: Any) -> EnginePeer:
    return EnginePeer(DtlsConnection(config(True, ident, **options)), is_client=True)


def server_peer(ident: Identity, **options: Any) -> EnginePeer:
    return EnginePeer(DtlsConnection(config(False, ident, **options)), is_client=False)


def send_ekt_when_complete(peer: EnginePeer, now: float) -> None:
    """on_handshake_complete hook: the KMF's EKTKey right after the handshake (D9)."""
    if peer.completed.ekt_cipher is not None:
        peer.send_ekt_key(EKT_KEY, EKT_SALT, EKT_SPI, EKT_TTL, now)


def ekt_server_peer(ident: Identity, **options: Any) -> EnginePeer:
    return EnginePeer(
        DtlsConnection(config(False, ident, **options)),
        is_client=False,
        on_handshake_complete=send_ekt_when_complete,
    )


class GatedServer:
    """A server behind a CookieGate, as the KMF runs it (D14): no connection object exists
    until a ClientHello carries a valid cookie for ``identity``."""

    def __init__(
        self,
        ident: Identity,
        *,
        cookie_identity: bytes = b"association-1",
        gate: CookieGate | None = None,
        make_peer: Callable[[DtlsConnection], EnginePeer] | None = None,
        send_ekt: bool = False,
        configuration: DtlsConfiguration | None = None,
        **options: Any,
    ) -> None:
        self.is_client = False
        self.gate = gate if gate is not None else CookieGate()
        self.cookie_identity = cookie_identity
        self.config = (
            configuration if configuration is not None else config(False, ident, **options)
        )
        self.make_peer = make_peer or (
            lambda conn: EnginePeer(
                conn,
                is_client=False,
                on_handshake_complete=send_ekt_when_complete if send_ekt else None,
            )
        )
        self.peer: EnginePeer | None = None
        self.replies: list[bytes] = []
        self.hello_verify_requests = 0
        self.rejected = 0

    def receive_datagram(self, data: bytes, now: float) -> None:
        if self.peer is not None:
            self.peer.receive_datagram(data, now)
            return
        verdict = self.gate.check(data, self.cookie_identity, now)
        if verdict.reply is not None:
            self.hello_verify_requests += 1
            self.replies.append(verdict.reply)
        if verdict.accepted:
            connection = DtlsConnection(self.config, cookie_identity=self.cookie_identity)
            self.peer = self.make_peer(connection)
            self.peer.receive_datagram(data, now)
        elif verdict.reply is None:
            self.rejected += 1

    def datagrams_to_send(self) -> list[bytes]:
        out, self.replies = self.replies, []
        if self.peer is not None:
            out += self.peer.datagrams_to_send()
        return out

    def get_timer(self) -> float | None:
        return None if self.peer is None else self.peer.get_timer()

    def handle_timer(self, now: float) -> None:
        if self.peer is not None:
            self.peer.handle_timer(now)

    @property
    def events(self) -> list[Any]:
        return [] if self.peer is None else self.peer.events

    def has(self, name: str) -> bool:
        return self.peer is not None and self.peer.has(name)

    def first(self, name: str) -> Any | None:
        return None if self.peer is None else self.peer.first(name)

    @property
    def handshake_complete(self) -> bool:
        return self.peer is not None and self.peer.handshake_complete

    @property
    def failed(self) -> Any | None:
        return None if self.peer is None else self.peer.failed

    @property
    def completed(self) -> Any:
        if self.peer is None:
            raise AssertionError(f"no connection behind the gate: {describe(self)}")
        return self.peer.completed

    def export_keying_material(self, label: bytes, length: int) -> bytes:
        if self.peer is None:
            raise AssertionError("no connection behind the gate")
        return self.peer.export_keying_material(label, length)

    @property
    def srtp_profile(self) -> int | None:
        return self.completed.srtp_profile  # type: ignore[no-any-return]

    @property
    def srtp_keying_material(self) -> bytes | None:
        return self.completed.srtp_keying_material  # type: ignore[no-any-return]
