"""An in-memory conference for the media tests: endpoints, a fake MDD, impaired links, a clock.

The fake MDD does what RFC 8723 §5.2 lets a Media Distributor do and nothing more: it holds
only the outer halves (what ``MediaKeys`` carries, D4), decrypts a sender's SRTP with the
outer ``client_write`` half through :class:`MediaDistributorHop` and re-encrypts it for every
other endpoint with that receiver's outer ``server_write`` half; SRTCP likewise (D19), fanned
out to everyone else (receivers ignore report blocks about streams that are not theirs).
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable

import attrs

from perc.media.endpoint import EndpointMedia, is_rtcp
from perc.srtp.context import SrtpSession
from perc.srtp.ekt import EktCipher, EktParameterSet
from perc.srtp.hop import HeaderChanges, Inbound, MediaDistributorHop
from perc.srtp.keys import KeyingMaterial, SrtpProfile, exporter_length, split_exporter


def new_keying(profile: SrtpProfile = SrtpProfile.DOUBLE_AEAD_AES_128_GCM) -> KeyingMaterial:
    """Stand-in for a DTLS-SRTP export: random bytes of the right length."""
    return split_exporter(profile, os.urandom(exporter_length(profile)))


def new_ekt(spi: int = 1, cipher: EktCipher = EktCipher.AESKW_128) -> EktParameterSet:
    return EktParameterSet.from_ekt_key(
        os.urandom(cipher.key_length), os.urandom(12), spi, 86400, 0.0, cipher=int(cipher)
    )


@attrs.define
class _Port:
    """The MDD's view of one endpoint: the outer halves only."""

    hop: MediaDistributorHop
    out: SrtpSession


class FakeMdd:
    def __init__(self) -> None:
        self.ports: dict[str, _Port] = {}
        self.forwarded = 0
        self.dropped = 0
        #: optional hook: (sender, inbound plain packet bytes) -> replacement plain packet
        self.tamper_inner: Callable[[str, bytes], bytes] | None = None
        #: optional hook per (sender, receiver, packet): False = do not forward, None = as
        #: is, HeaderChanges = rewrite PT/SEQ/M (RFC 8723 §5.2, the OHB records originals)
        self.select: Callable[[str, str, Inbound], HeaderChanges | bool | None] | None = None

    def attach(self, name: str, keying: KeyingMaterial) -> None:
        outer = keying.outer()
        self.ports[name] = _Port(
            MediaDistributorHop(SrtpSession(outer.client_key, outer.client_salt)),
            SrtpSession(outer.server_key, outer.server_salt),
        )

    def detach(self, name: str) -> None:
        self.ports.pop(name, None)

    def forward(self, sender: str, datagram: bytes) -> list[tuple[str, bytes]]:
        port = self.ports.get(sender)
        if port is None:
            self.dropped += 1
            return []
        out: list[tuple[str, bytes]] = []
        if is_rtcp(datagram):
            plain = port.hop.inbound_session.unprotect_rtcp(datagram)
            for name, other in self.ports.items():
                if name != sender:
                    out.append((name, other.out.protect_rtcp(plain)))
        else:
            inbound = port.hop.decrypt(datagram)
            if self.tamper_inner is not None:
                inbound.packet = self.tamper_inner(sender, inbound.packet)
            for name, other in self.ports.items():
                if name == sender:
                    continue
                changes = None if self.select is None else self.select(sender, name, inbound)
                if changes is False:
                    continue
                if changes is True:
                    changes = None
                out.append((name, port.hop.encrypt_for(other.out, inbound, changes)))
        self.forwarded += len(out)
        return out

    def originate_rtcp(self, to: str, plain_rtcp: bytes) -> bytes:
        """RTCP the MD makes itself (RFC 8871 §4.4), protected for ``to``."""
        return self.ports[to].out.protect_rtcp(plain_rtcp)


class Link:
    """A one-way impaired link: loss and reordering decided per datagram by ``decide``.

    ``decide(index, datagram) -> "drop" | "hold" | "pass"``: a held datagram is released right
    after the next datagram that passes (a swap of neighbours).
    """

    def __init__(self, decide: Callable[[int, bytes], str]) -> None:
        self._decide = decide
        self._held: list[bytes] = []
        self.index = 0
        self.dropped: list[bytes] = []
        self.delivered: list[bytes] = []

    def push(self, datagram: bytes) -> list[bytes]:
        verdict = self._decide(self.index, datagram)
        self.index += 1
        if verdict == "drop":
            self.dropped.append(datagram)
            return []
        if verdict == "hold":
            self._held.append(datagram)
            return []
        out = [datagram, *self._held]
        self._held.clear()
        self.delivered.extend(out)
        return out

    def flush(self) -> list[bytes]:
        out, self._held = self._held, []
        self.delivered.extend(out)
        return out


def seeded_link(seed: int, loss: float, reorder: float) -> Link:
    rng = random.Random(seed)

    def decide(_index: int, _datagram: bytes) -> str:
        r = rng.random()
        if r < loss:
            return "drop"
        if r < loss + reorder:
            return "hold"
        return "pass"

    return Link(decide)


class Conference:
    """Endpoints joined through one FakeMdd, driven by their own timers on a fake clock."""

    def __init__(self) -> None:
        self.mdd = FakeMdd()
        self.endpoints: dict[str, EndpointMedia] = {}
        self.keying: dict[str, KeyingMaterial] = {}
        #: impaired links from the MDD to a receiver (name -> Link)
        self.links: dict[str, Link] = {}
        #: impaired links from a sender to the MDD (name -> Link)
        self.uplinks: dict[str, Link] = {}
        #: called for every datagram delivered: (receiver, datagram, now)
        self.on_deliver: Callable[[str, bytes, float], None] | None = None
        #: send time of every datagram an endpoint emitted, by (sender, datagram)
        self.now = 0.0

    def add(
        self,
        name: str,
        media: str,
        ekt: EktParameterSet,
        now: float | None = None,
        keying: KeyingMaterial | None = None,
        **kwargs: object,
    ) -> EndpointMedia:
        keying = keying or new_keying()
        ep = EndpointMedia(
            name,
            media,
            keying,
            ekt,
            self.now if now is None else now,
            seed=len(self.endpoints),
            **kwargs,  # type: ignore[arg-type]
        )
        self.endpoints[name] = ep
        self.keying[name] = keying
        self.mdd.attach(name, keying)
        return ep

    def remove(self, name: str) -> None:
        self.endpoints.pop(name, None)
        self.mdd.detach(name)

    def deliver(self, to: str, datagram: bytes, now: float) -> None:
        ep = self.endpoints.get(to)
        if ep is None:
            return
        link = self.links.get(to)
        batch = [datagram] if link is None else link.push(datagram)
        for d in batch:
            if self.on_deliver is not None:
                self.on_deliver(to, d, now)
            ep.receive(d, now)

    def pump(self, now: float) -> None:
        """Move everything queued through the MDD until no endpoint has anything to send."""
        moved = True
        while moved:
            moved = False
            for name, ep in list(self.endpoints.items()):
                for d in ep.datagrams_to_send():
                    moved = True
                    self._upstream(name, d, now)

    def _upstream(self, name: str, datagram: bytes, now: float) -> None:
        uplink = self.uplinks.get(name)
        for d in [datagram] if uplink is None else uplink.push(datagram):
            for to, out in self.mdd.forward(name, d):
                self.deliver(to, out, now)

    def run(self, until: float) -> None:
        """Advance the fake clock to ``until``, firing every endpoint's timers on the way."""
        while True:
            timers = [t for ep in self.endpoints.values() if (t := ep.timer()) is not None]
            if not timers or min(timers) > until:
                break
            now = max(self.now, min(timers))
            self.now = now
            for ep in list(self.endpoints.values()):
                t = ep.timer()
                if t is not None and t <= now:
                    ep.handle_timer(now)
            self.pump(now)
        self.now = until
        for name, uplink in self.uplinks.items():
            for d in uplink.flush():
                for to, out in self.mdd.forward(name, d):
                    self.deliver(to, out, until)
        for name, link in self.links.items():
            ep = self.endpoints.get(name)
            for d in link.flush():
                if ep is not None:
                    ep.receive(d, until)
