"""Cascade links between two MDD engines in memory (D25): handshake, refusal, restarts,
liveness, retries; the config of ``[[conference.link]]``.

Two :class:`perc.mdd.MddEngine` with real identities exchange datagrams through :class:`Wire`
under a fake clock; nothing sleeps.
"""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from perc import events, identity
from perc.config import ConfigError, build_mdd_config
from perc.forwarding import ForwardingConfig
from perc.links import (
    DEAD_AFTER,
    RETRY_MAX,
    RETRY_MIN,
    Link,
    LinkSpec,
    LinkState,
    hello_request,
)
from perc.mdd import MddEngine

A = ("10.0.0.1", 5004)
B = ("10.0.0.2", 5004)


def engine(ident: identity.Identity) -> MddEngine:
    return MddEngine(
        "demo",
        kmf="127.0.0.1:4444",
        forwarding=ForwardingConfig(),
        idle_timeout=10.0,
        stats_interval=10.0,
        identity=ident,
    )


class Wire:
    """Two engines at A and B; ``run`` carries datagrams and timers until ``until``."""

    def __init__(self) -> None:
        self.ida = identity.generate("mdd-a")
        self.idb = identity.generate("mdd-b")
        self.a = engine(self.ida)
        self.b = engine(self.idb)
        self.now = 0.0
        self.cut = False  # True: everything is lost
        self.events: dict[str, list[events.Event]] = {"a": [], "b": []}
        self.sent: list[tuple[tuple[str, int], bytes]] = []  # (source, datagram) delivered

    def configure(self, *, a: bool = True, b: bool = True, b_expects: str | None = None) -> None:
        if a:
            self.a.add_link(LinkSpec(B, self.idb.fingerprint, connect=True), self.now)
        if b:
            fp = b_expects or self.ida.fingerprint
            self.b.add_link(LinkSpec(A, fp, connect=False), self.now)

    def pump(self) -> None:
        moved = True
        while moved:
            moved = False
            for src, eng, dst in ((A, self.a, self.b), (B, self.b, self.a)):
                for addr, data in eng.datagrams_to_send():
                    if not self.cut and addr == (B if src == A else A):
                        self.sent.append((src, data))
                        dst.receive_datagram(data, src, self.now)
                        moved = True
        for name, eng in (("a", self.a), ("b", self.b)):
            while (e := eng.next_event()) is not None:
                self.events[name].append(e)

    def run(self, until: float) -> None:
        self.pump()
        while True:
            due = min(self.a.get_timer(), self.b.get_timer())
            if due > until:
                self.now = until
                return
            self.now = max(self.now, due)
            for eng in (self.a, self.b):
                if eng.get_timer() <= self.now:
                    eng.handle_timer(self.now)
            self.pump()

    def of(self, name: str, kind: type[events.Event]) -> list[events.Event]:
        return [e for e in self.events[name] if isinstance(e, kind)]


def link_of(eng: MddEngine, peer: tuple[str, int]) -> Link:
    assert eng.link_manager is not None
    return eng.link_manager.links[peer]


def test_two_mdds_link_with_pinned_certificates_and_the_same_keys() -> None:
    w = Wire()
    w.configure()
    w.run(0.5)
    (up_a,) = w.of("a", events.LinkUp)
    (up_b,) = w.of("b", events.LinkUp)
    assert isinstance(up_a, events.LinkUp) and isinstance(up_b, events.LinkUp)
    assert up_a.keys == up_b.keys and up_a.profile == 0x0007
    assert up_a.fingerprint == w.idb.fingerprint and up_b.fingerprint == w.ida.fingerprint
    assert (up_a.role, up_b.role) == ("client", "server")
    assert w.a.links_up == w.b.links_up == 1
    ka, kb = link_of(w.a, B).keys, link_of(w.b, A).keys
    assert ka.outbound == kb.inbound and ka.inbound == kb.outbound
    # Each link is one table entry; the keepalives keep it up.
    w.run(30.0)
    assert w.a.links_up == w.b.links_up == 1
    assert not w.of("a", events.LinkDown)
    # No link DTLS went to the KMF: the tunnel is down and nothing was counted as for it.
    assert w.a.stats.dropped_no_tunnel == w.b.stats.dropped_no_tunnel == 0
    assert w.a.admission_stats.dropped_not_hello == 0


def test_another_certificate_is_refused_counted_and_logged_once() -> None:
    w = Wire()
    other = identity.generate("impostor").fingerprint
    w.configure(b_expects=other)
    w.run(20.0)
    refused = w.of("b", events.LinkRefused)
    assert len(refused) == 1  # once per link, however often the peer tries
    assert isinstance(refused[0], events.LinkRefused)
    assert refused[0].fingerprint == w.ida.fingerprint and refused[0].expected == other
    assert link_of(w.b, A).stats.refused >= 3
    assert w.a.links_up == w.b.links_up == 0
    # The dialer's retries back off: 1 s, 2 s, 4 s, 8 s ... after each failed attempt.
    assert 3 <= link_of(w.a, B).stats.attempts <= 6


def test_media_from_a_peer_before_its_link_is_keyed_is_dropped_and_counted() -> None:
    w = Wire()
    w.configure(a=False)  # B waits for A, which never dials
    srtp = bytes([0x80, 0x60]) + bytes(40)
    w.b.receive_datagram(srtp, A, 0.0)
    assert link_of(w.b, A).stats.dropped_not_keyed == 1
    assert w.b.table.stats.unknown_source == 0
    # ... and pokes the peer (a HelloRequest) to start a handshake.
    assert (A, hello_request()) in w.b.datagrams_to_send()


def test_a_restarted_listener_pokes_and_the_dialer_handshakes_again() -> None:
    w = Wire()
    w.configure()
    w.run(2.0)
    old_keys = link_of(w.a, B).keys
    w.b = engine(w.idb)  # B restarts: a new process with the same identity
    w.configure(a=False)
    w.run(2.5)
    assert w.a.links_up == w.b.links_up == 1
    ups = w.of("a", events.LinkUp)
    assert len(ups) == 2 and isinstance(ups[1], events.LinkUp) and ups[1].replaced
    assert link_of(w.a, B).keys != old_keys
    assert link_of(w.a, B).keys.inbound == link_of(w.b, A).keys.outbound


def test_a_restarted_dialer_replaces_the_listeners_association() -> None:
    w = Wire()
    w.configure()
    w.run(2.0)
    w.a = engine(w.ida)
    w.configure(b=False)
    w.run(2.5)
    ups = w.of("b", events.LinkUp)
    assert len(ups) == 2 and isinstance(ups[1], events.LinkUp) and ups[1].replaced
    assert link_of(w.a, B).keys.inbound == link_of(w.b, A).keys.outbound
    assert w.b.links_up == 1


def test_a_silent_peer_takes_the_link_down_and_the_dialer_retries_with_backoff() -> None:
    w = Wire()
    w.configure()
    w.run(1.0)
    w.cut = True
    w.run(1.0 + DEAD_AFTER + 1.0)
    assert w.a.links_up == w.b.links_up == 0
    (down,) = w.of("a", events.LinkDown)
    assert isinstance(down, events.LinkDown) and down.retry_in == RETRY_MIN
    attempts = link_of(w.a, B).stats.attempts
    w.run(200.0)
    # Attempts of 5 s each, separated by 1, 2, 4, 8, 16, 30, 30 ... s: a handful, not hundreds.
    made = link_of(w.a, B).stats.attempts - attempts
    assert 5 <= made <= 10, made
    assert link_of(w.a, B).backoff == RETRY_MAX
    w.cut = False  # the peer comes back: its pokes get a handshake at once
    w.b = engine(w.idb)
    w.configure(a=False)
    w.run(201.0)
    assert w.a.links_up == 1 and link_of(w.a, B).state is LinkState.UP


# --- config ------------------------------------------------------------------------------------


def _config(tmp_path: Path, links: str) -> None:
    ident = identity.generate("mdd")
    identity.write(ident, tmp_path, "mdd")
    fp = identity.generate("kmf").fingerprint
    text = (
        '[mdd]\ncert = "mdd.crt"\nkey = "mdd.key"\n[[conference]]\nid = "demo"\n'
        f'listen = "127.0.0.1:5004"\nkmf = "127.0.0.1:4444"\nkmf_fingerprint = "{fp}"\n{links}'
    )
    build_mdd_config(tomllib.loads(text), base=tmp_path)


def _link(peer: str, fp: str, connect: str = "true") -> str:
    return f'[[conference.link]]\npeer = "{peer}"\nfingerprint = "{fp}"\nconnect = {connect}\n'


def test_link_config_is_loaded(tmp_path: Path) -> None:
    fp = identity.generate("other").fingerprint
    _config(tmp_path, _link("127.0.0.1:5005", fp) + _link("127.0.0.1:5006", fp, "false"))


@pytest.mark.parametrize(
    ("links", "message"),
    [
        (_link("127.0.0.1:5004", "{fp}"), "conference[0].link[0].peer: 127.0.0.1:5004 is this "
         "conference's own listen address"),
        (_link("127.0.0.1:5005", "{fp}") + _link("127.0.0.1:5005", "{fp}", "false"),
         "conference[0].link[1].peer: 127.0.0.1:5005 is already the peer of "
         "conference[0].link[0] (one link per peer)"),
        (_link("127.0.0.1:5005", "sha-256 AB:CD"), "conference[0].link[0].fingerprint: "
         "malformed fingerprint"),
        ('[[conference.link]]\npeer = "127.0.0.1:5005"\nfingerprint = "{fp}"\n',
         "conference[0].link[0].connect: required key missing"),
        (_link("127.0.0.1:0", "{fp}"), "conference[0].link[0].peer: bad host:port"),
    ],
)  # fmt: skip
def test_bad_link_config_is_one_line(tmp_path: Path, links: str, message: str) -> None:
    fp = identity.generate("other").fingerprint
    with pytest.raises(ConfigError) as info:
        _config(tmp_path, links.replace("{fp}", fp))
    text = str(info.value)
    assert text.startswith(message) and "\n" not in text, text


def test_an_mdd_with_links_loads_no_end_to_end_code() -> None:
    """Key isolation (RFC 8871 §4.1) with links: two engines link up and forward in a fresh
    interpreter, which has then loaded neither trio nor any EKT/double/key-wrap module."""
    code = (
        "import sys\n"
        "from perc import identity\n"
        "from perc.forwarding import ForwardingConfig\n"
        "from perc.links import LinkSpec\n"
        "from perc.mdd import E2E_MODULES, MddEngine\n"
        "ia, ib = identity.generate('a'), identity.generate('b')\n"
        "A, B = ('10.0.0.1', 5004), ('10.0.0.2', 5004)\n"
        "def eng(i):\n"
        "    return MddEngine('demo', kmf='k:1', forwarding=ForwardingConfig(),\n"
        "                     idle_timeout=10.0, stats_interval=10.0, identity=i)\n"
        "a, b = eng(ia), eng(ib)\n"
        "a.add_link(LinkSpec(B, ib.fingerprint, connect=True), 0.0)\n"
        "b.add_link(LinkSpec(A, ia.fingerprint, connect=False), 0.0)\n"
        "for _ in range(10):\n"
        "    for src, e, dst in ((A, a, b), (B, b, a)):\n"
        "        for addr, d in e.datagrams_to_send():\n"
        "            dst.receive_datagram(d, src, 0.1)\n"
        "assert a.links_up == b.links_up == 1\n"
        "bad = [m for m in ('trio', *E2E_MODULES) if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_every_link_key_is_in_the_man_page() -> None:
    from perc import config

    man = (Path(__file__).resolve().parent.parent / "man" / "perc.1").read_text()
    for row in config.describe(config.MddLink):
        assert f"\n.BR {row.key} " in man, row.key
    assert "[[conference.link]]" in man


def test_the_demo_chains_its_mdds(tmp_path: Path) -> None:
    from perc import demo

    assert demo.check_arguments(3, 12.0, "both", None, mdds=2) is None
    assert demo.check_arguments(3, 12.0, "both", None, mdds=4) == (
        f"--mdds: 1 to {demo.MAX_MDDS} MDDs, at most one per participant"
    )
    assert demo.check_arguments(3, 12.0, "both", None, mdds=0) is not None
    files = demo.make_demo_files(tmp_path, demo.NAMES[:4], mdds=3)
    assert files.mdd_names == ("mdd1", "mdd2", "mdd3")
    assert [files.mdd_of(n) for n in files.names] == [0, 1, 2, 0]
    kmf = files.kmf_config.read_text()
    assert all(fp in kmf for fp in files.mdd_fingerprints)
    ports = [6001, 6002, 6003]
    middle = demo.write_mdd_config(files, 4444, 1, ports)
    loaded = build_mdd_config(tomllib.loads(middle.read_text()), base=tmp_path)
    (conf,) = loaded.conferences
    assert conf.listen.port == 6002
    assert [(li.peer.port, li.connect) for li in conf.link] == [(6001, False), (6003, True)]
    assert [li.fingerprint for li in conf.link] == [
        files.mdd_fingerprints[0],
        files.mdd_fingerprints[2],
    ]
    (tmp_path / "one").mkdir()
    single = demo.make_demo_files(tmp_path / "one", demo.NAMES[:2])
    assert single.mdd_names == ("mdd",)
    one = demo.write_mdd_config(single, 4444)
    assert one.name == "mdd.toml" and "[[conference.link]]" not in one.read_text()


def test_a_forged_client_hello_from_the_peers_address_costs_no_state() -> None:
    from tests.forwarding.helpers import client_hello

    w = Wire()
    w.configure(a=False)
    w.b.datagrams_to_send()  # the start-up poke
    w.b.receive_datagram(client_hello(), A, 0.1)
    (reply,) = w.b.datagrams_to_send()
    assert reply[0] == A and reply[1][13] == 3  # a HelloVerifyRequest, stateless (D14)
    assert link_of(w.b, A).pending is None and link_of(w.b, A).stats.attempts == 0


def test_a_late_copy_of_the_live_client_hello_starts_nothing() -> None:
    from perc.dtls.offer import first_client_hello_untrusted

    w = Wire()
    w.configure()
    w.run(1.0)
    hellos = [d for src, d in w.sent if src == A and first_client_hello_untrusted(d)]
    assert len(hellos) == 2  # the first, and the one returning the cookie (D14)
    attempts = link_of(w.b, A).stats.attempts
    w.b.receive_datagram(hellos[-1], A, w.now)
    assert link_of(w.b, A).pending is None
    assert link_of(w.b, A).stats.attempts == attempts
    w.run(20.0)
    assert w.b.links_up == 1 and link_of(w.b, A).stats.failures == 0
