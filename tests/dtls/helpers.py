"""In-memory pair driver for our client and our server (no I/O, injected time)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs

from perc import identity
from perc.dtls import CookieGate, DtlsConfiguration, DtlsConnection
from perc.dtls.events import Event

_IDS: dict[str, identity.Identity] = {}


def ident(name: str) -> identity.Identity:
    if name not in _IDS:
        _IDS[name] = identity.generate(name)
    return _IDS[name]


def config(is_client: bool, name: str | None = None, **kw: Any) -> DtlsConfiguration:
    i = ident(name or ("client" if is_client else "server"))
    return DtlsConfiguration(
        is_client=is_client, certificate=i.certificate, private_key=i.private_key, **kw
    )


@attrs.define
class Pair:
    client: DtlsConnection
    server: DtlsConnection | None
    server_config: DtlsConfiguration
    gate: CookieGate | None = None
    now: float = 0.0
    client_events: list[Event] = attrs.Factory(list)
    server_events: list[Event] = attrs.Factory(list)
    c2s: list[bytes] = attrs.Factory(list)
    s2c: list[bytes] = attrs.Factory(list)
    tamper_c2s: Callable[[bytes], bytes] | None = None
    tamper_s2c: Callable[[bytes], bytes] | None = None
    identity: bytes = b"assoc-1"

    def _deliver_to_server(self, dg: bytes) -> None:
        if self.server is None:
            if self.gate is not None:
                verdict = self.gate.check(dg, self.identity, self.now)
                if verdict.reply is not None:
                    self.s2c.append(verdict.reply)
                if not verdict.accepted:
                    return
            self.server = DtlsConnection(self.server_config, cookie_identity=self.identity)
        self.server.receive_datagram(dg, self.now)

    def pump(self, rounds: int = 50) -> None:
        for _ in range(rounds):
            moved = False
            for dg in self.client.datagrams_to_send():
                self.c2s.append(self.tamper_c2s(dg) if self.tamper_c2s else dg)
            if self.server is not None:
                for dg in self.server.datagrams_to_send():
                    self.s2c.append(self.tamper_s2c(dg) if self.tamper_s2c else dg)
            while self.c2s:
                moved = True
                self._deliver_to_server(self.c2s.pop(0))
            while self.s2c:
                moved = True
                self.client.receive_datagram(self.s2c.pop(0), self.now)
            self.drain()
            if not moved and not self.client._out and (self.server is None or not self.server._out):
                return

    def drain(self) -> None:
        while (e := self.client.next_event()) is not None:
            self.client_events.append(e)
        if self.server is not None:
            while (e := self.server.next_event()) is not None:
                self.server_events.append(e)


def make_pair(
    *,
    cookies: bool = False,
    client_kw: dict[str, Any] | None = None,
    server_kw: dict[str, Any] | None = None,
) -> Pair:
    client = DtlsConnection(config(True, **(client_kw or {})))
    scfg = config(False, **(server_kw or {}))
    return Pair(
        client=client,
        server=None,
        server_config=scfg,
        gate=CookieGate(b"k" * 32) if cookies else None,
    )
