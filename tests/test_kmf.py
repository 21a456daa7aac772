"""perc.kmf: the Key Distributor engine in memory, against perc's DTLS clients, on a fake clock.

No sockets, no trio: :class:`tests.kmf_memory.MemoryKmf` plays the shell (fake tunnels,
``now`` a float moved by the test). Each test reads what the engine sent per tunnel and the
typed events it reported.
"""

from __future__ import annotations

import json
import uuid
from types import SimpleNamespace

import attrs
import pytest

from perc import identity
from perc.config import KmfConfig
from perc.dtls import events as dtls
from perc.dtls.errors import AlertDescription
from perc.events import (
    Denied,
    DisconnectFromMdd,
    EktKeyAcked,
    Event,
    Joined,
    KmfTunnelDown,
    KmfTunnelUp,
    Left,
    Listening,
    Rekeyed,
    parse_line,
    to_json,
)
from perc.kmf import CloseTunnel, EchoEngine
from perc.srtp.keys import outer_media_keys
from perc.wire.tunnel import (
    EndpointDisconnect,
    MediaKeys,
    SupportedProfiles,
    TunneledDtls,
    UnsupportedVersion,
)

from .kmf_memory import MemoryKmf, client, ekt_spis, endpoint_events, join, pump
from .roles.join_helpers import keying_kmf_config


@pytest.fixture(scope="module")
def who() -> SimpleNamespace:
    return SimpleNamespace(
        kmf=identity.generate("kmf"),
        mdd=identity.generate("mdd"),
        members=[identity.generate(f"m{i}") for i in range(4)],
        outsider=identity.generate("outsider"),
    )


def config(who: SimpleNamespace, **policy: object) -> KmfConfig:
    cfg = keying_kmf_config(who.kmf, [who.mdd], {"demo": who.members}, dtls_cookies=False)
    return attrs.evolve(cfg, conferences=tuple(attrs.evolve(c, **policy) for c in cfg.conferences))



def test_join_sends_media_keys_then_the_ektkey_and_reports_the_ack(who: SimpleNamespace) -> None:
    mem = MemoryKmf(config(who))
    tunnel = mem.tunnel(who.mdd.fingerprint)
    endpoint, aid = client(who.members[0]), uuid.uuid4()
    endpoint.connect(mem.now)
    pump(mem, endpoint, aid, tunnel)
    got = endpoint_events(endpoint)
    done = next(e for e in got if isinstance(e, dtls.HandshakeCompleted))
    key = next(e for e in got if isinstance(e, dtls.EktKeyReceived))
    # RFC 9185 §5.4: MediaKeys to the carrying tunnel, the outer halves of the exporter (D4).
    (keys,) = tunnel.media_keys
    assert keys.association_id == aid and keys.protection_profile == done.srtp_profile == 9
    assert done.srtp_keying_material is not None
    assert (
        keys.client_write_master_key,
        keys.server_write_master_key,
        keys.client_write_master_salt,
        keys.server_write_master_salt,
    ) == outer_media_keys(9, done.srtp_keying_material)
    conf = mem.engine.state.conferences["demo"]
    assert conf.current is not None and conf.current.same_key(key.key, key.salt, key.spi)
    kinds = [type(e) for e in mem.events]
    assert kinds == [KmfTunnelUp, Rekeyed, Joined, EktKeyAcked]
    rekeyed, joined, acked = mem.events[1:]
    assert isinstance(rekeyed, Rekeyed) and (rekeyed.reason, rekeyed.spi) == ("first", key.spi)
    assert isinstance(joined, Joined) and joined.association == aid
    assert (joined.spi, joined.first_key, joined.members) == (key.spi, "now", 1)
    assert joined.fingerprint == who.members[0].fingerprint and joined.ekt_cipher == 2
    assert joined.tls_id == "a-session-id-0123456789"
    assert isinstance(acked, EktKeyAcked) and (acked.spi, acked.conference) == (key.spi, "demo")
    assert key.key.hex() not in repr(mem.events)  # events carry a digest at most


def test_outsider_gets_access_denied_and_the_mdd_is_told(who: SimpleNamespace) -> None:
    mem = MemoryKmf(config(who))
    tunnel = mem.tunnel(who.mdd.fingerprint)
    endpoint, aid = join(mem, who.outsider, tunnel)
    closed = [e for e in endpoint_events(endpoint) if isinstance(e, dtls.ConnectionClosed)]
    assert closed and closed[0].alert == AlertDescription.access_denied and closed[0].sent_by_peer
    assert tunnel.media_keys == [] and tunnel.disconnects == [aid]  # after the alert (D3)
    assert mem.engine.associations == {} and mem.engine.stats.refused == 1
    (denied,) = mem.of(Denied)
    assert isinstance(denied, Denied)
    assert (denied.association, denied.alert) == (aid, "access_denied")
    assert denied.fingerprint == who.outsider.fingerprint and denied.conference is None


def test_cookie_gate_keeps_no_state_until_the_cookie_comes_back(who: SimpleNamespace) -> None:
    cfg = keying_kmf_config(who.kmf, [who.mdd], {"demo": who.members}, dtls_cookies=True)
    mem = MemoryKmf(cfg)
    tunnel = mem.tunnel(who.mdd.fingerprint)
    endpoint, aid = client(who.members[0]), uuid.uuid4()
    endpoint.connect(mem.now)
    (hello,) = endpoint.datagrams_to_send()
    tunnel.deliver(aid, hello)
    assert mem.engine.associations == {} and mem.engine.stats.cookies_sent == 1
    (verify,) = tunnel.take_dtls()  # HelloVerifyRequest, stateless (D14)
    tunnel.deliver(uuid.uuid4(), b"\x17\xfe\xfd" + bytes(20))  # junk for an unknown id
    assert mem.engine.stats.dropped_no_association == 1 and tunnel.dtls == []
    endpoint.receive_datagram(verify, mem.now)
    pump(mem, endpoint, aid, tunnel)
    assert mem.engine.stats.associations_created == 1 and mem.engine.stats.joined == 1


def test_a_leave_and_a_join_in_one_window_make_one_rekey(who: SimpleNamespace) -> None:
    a, b, c, d = who.members
    mem = MemoryKmf(config(who, rekey_window=0.5))
    tunnel = mem.tunnel(who.mdd.fingerprint)
    ea, aid_a = join(mem, a, tunnel)
    eb, aid_b = join(mem, b, tunnel)  # a join into a live conference: its key comes with the rekey
    mem.advance(mem.now + 0.5)
    pump(mem, eb, aid_b, tunnel)
    first = mem.engine.state.conferences["demo"].current
    assert first is not None and ekt_spis(eb) == [first.spi]
    mem.advance(mem.now + 1.0)  # a quiet period
    ec, aid_c = join(mem, c, tunnel)
    # D31 leading edge: c's join rekeys at once (the next timer, same instant) ...
    assert mem.advance(mem.now) == 1
    window_end = mem.now + 0.5
    pump(mem, ec, aid_c, tunnel)
    rekeys = len(mem.of(Rekeyed))
    (c_key,) = ekt_spis(ec)
    assert c_key == mem.engine.state.conferences["demo"].current.spi  # type: ignore[union-attr]
    # ... and within the window it opened: a leaves (close_notify), d joins.
    ea.close(mem.now)
    pump(mem, ea, aid_a, tunnel)
    assert tunnel.disconnects == [aid_a]  # the KMF ended it on the DTLS side: tell the MDD
    mem.advance(mem.now + 0.2)
    ed, aid_d = join(mem, d, tunnel)
    (left,) = mem.of(Left)
    assert isinstance(left, Left) and left.reason == "close_notify" and left.members == 2
    joined_d = mem.of(Joined)[-1]
    assert isinstance(joined_d, Joined) and joined_d.first_key == "at-rekey"
    assert mem.advance(window_end - 0.01) == 0  # batched: the window has not ended
    assert mem.advance(window_end) == 1  # the conference timer fired once, at its end
    new = mem.of(Rekeyed)[rekeys:]
    assert len(new) == 1
    rekey = new[0]
    assert isinstance(rekey, Rekeyed) and rekey.reason == "leave+join" and rekey.members == 3
    for ep, aid in ((eb, aid_b), (ec, aid_c), (ed, aid_d)):
        pump(mem, ep, aid, tunnel)
        assert ekt_spis(ep)[-1] == rekey.spi
    assert mem.engine.state.conferences["demo"].current.spi == rekey.spi  # type: ignore[union-attr]


def test_endpoint_disconnect_from_the_mdd_ends_the_member_silently(who: SimpleNamespace) -> None:
    mem = MemoryKmf(config(who, rekey_on_leave=False))
    tunnel = mem.tunnel(who.mdd.fingerprint)
    _, aid = join(mem, who.members[0], tunnel)
    tunnel.disconnect(aid)
    assert mem.engine.associations == {} and tunnel.disconnects == []
    assert [type(e) for e in mem.events[-2:]] == [DisconnectFromMdd, Left]
    left = mem.events[-1]
    assert isinstance(left, Left) and left.reason == "EndpointDisconnect from the MDD"


def test_tunnel_down_keeps_associations_and_rules_close_bad_tunnels(who: SimpleNamespace) -> None:
    mem = MemoryKmf(config(who))
    tunnel = mem.tunnel(who.mdd.fingerprint)
    _, aid = join(mem, who.members[0], tunnel)
    tunnel.close()
    down = mem.events[-1]
    assert isinstance(down, KmfTunnelDown) and not down.refused
    assert down.reason == "peer closed the tunnel (close_notify)"
    assert aid in mem.engine.associations  # the MDD reconnects; its datagrams come back
    # D2: a message before SupportedProfiles closes that tunnel only.
    engine = mem.engine
    engine.tunnel_opened(50, peer="bad", mdd_fingerprint=who.mdd.fingerprint, now=mem.now)
    engine.receive_messages(50, [TunneledDtls(aid, b"\x16")], mem.now)
    assert engine.messages_to_send() == [(50, CloseTunnel())]
    bad = engine.next_event()
    assert isinstance(bad, KmfTunnelDown) and bad.reason.startswith("protocol error (D2)")
    engine.tunnel_closed(50, "peer closed the connection", mem.now)  # already reported
    assert engine.next_event() is None and engine.tunnel_stats.protocol_errors == 1
    # RFC 9185 §5.5: another version gets UnsupportedVersion(0), then the close.
    engine.tunnel_opened(51, peer="v1", mdd_fingerprint=who.mdd.fingerprint, now=mem.now)
    engine.receive_messages(51, [SupportedProfiles(1, (9,))], mem.now)
    assert engine.messages_to_send() == [(51, UnsupportedVersion(0)), (51, CloseTunnel())]
    refused = engine.next_event()
    assert isinstance(refused, KmfTunnelDown) and refused.refused
    # A KMF-to-MDD message from the MDD breaks D2 too.
    up = mem.tunnel(who.mdd.fingerprint)
    mem.receive(up, [MediaKeys(aid, 9, b"", b"k" * 16, b"K" * 16, b"s" * 12, b"S" * 12)])
    assert up.other == [CloseTunnel()] and engine.tunnel_stats.protocol_errors == 2


def test_echo_engine_answers_on_the_carrying_tunnel() -> None:
    engine = EchoEngine()
    engine.tunnel_opened(1, peer="p", mdd_fingerprint="f", now=0.0)
    aid = uuid.uuid4()
    engine.receive_messages(1, [SupportedProfiles(0, (9,)), TunneledDtls(aid, b"x")], 0.0)
    engine.receive_messages(1, [EndpointDisconnect(aid)], 0.0)
    assert engine.messages_to_send() == [(1, TunneledDtls(aid, b"x"))]
    assert not engine.send(2, TunneledDtls(aid, b"x"))  # no such tunnel


AID = uuid.UUID(int=7)
FP = "sha-256 AB:CD"


@pytest.mark.parametrize(
    ("event", "line"),
    [
        (Listening("tunnel", "127.0.0.1", 4433), "KMF listening on 127.0.0.1:4433"),
        (
            KmfTunnelUp("1.2.3.4:5", FP, 1, 0, [9, 10], "TLSv1.3"),
            f"tunnel up peer=1.2.3.4:5 mdd={FP} version=0 profiles=0x0009,0x000A tls=TLSv1.3",
        ),
        (KmfTunnelDown("p:1", "bad cert", refused=True), "tunnel refused peer=p:1: bad cert"),
        (
            KmfTunnelDown("p:1", "peer closed the tunnel (close_notify)"),
            "tunnel closed peer=p:1: peer closed the tunnel (close_notify)",
        ),
        (
            Joined("demo", AID, FP, 9, 2, "t", 5, "p:1", 2, "at-rekey"),
            f"joined conference=demo association={AID} fingerprint={FP} profile=0x0009 spi=5 "
            "ekt_cipher=2 mdd=p:1 members=2 first_key=at-rekey",
        ),
        (
            Denied(AID, FP, "not on a roster", "access_denied", None, 9, "alert sent: x"),
            f"refused association={AID} fingerprint={FP} conference=- profile=0x0009: "
            "not on a roster (alert sent: x)",
        ),
        (
            Left("demo", AID, FP, "close_notify", 9, 5, 1),
            f"left conference=demo association={AID} fingerprint={FP} profile=0x0009 spi=5 "
            "members=1 reason=close_notify",
        ),
        (
            Rekeyed("demo", 6, "leave", 2, 2, 86400, "d1g"),
            "ektkey conference=demo spi=6 cipher=2 ttl=86400 key=d1g reason=leave members=2",
        ),
        (EktKeyAcked("demo", AID, 6), f"EKTKey acknowledged association={AID} spi=6"),
        (
            DisconnectFromMdd(AID, "p:1"),
            f"endpoint disconnect from MDD association={AID} peer=p:1",
        ),
    ],
)
def test_kmf_events_describe_themselves_as_the_kmf_log_lines(event: Event, line: str) -> None:
    """People, older tools and tests read these lines: each event's describe() keeps them;
    the JSON form round-trips to the same event."""
    assert event.describe() == line
    assert parse_line(json.dumps(to_json(event))) == event


def test_one_tunnel_holds_a_bounded_number_of_unjoined_associations(
    who: SimpleNamespace,
) -> None:
    """A trusted but hostile MDD starting handshakes it never finishes fills only its own
    tunnel's share; a join through another tunnel still works, and the share is given back
    when those associations end."""
    mem = MemoryKmf(config(who), max_pending_per_tunnel=5, dtls_handshake_timeout=4.0)
    hostile, honest = mem.tunnel(who.mdd.fingerprint), mem.tunnel(who.mdd.fingerprint)
    for _ in range(8):  # ClientHellos that are never followed up
        endpoint = client(who.members[1])
        endpoint.connect(mem.now)
        for datagram in endpoint.datagrams_to_send():
            hostile.deliver(uuid.uuid4(), datagram)
    engine = mem.engine
    assert len(engine.associations) == 5
    assert engine.stats.dropped_tunnel_pending == 3
    assert engine.tunnels[hostile.tunnel_id].pending == 5
    _, aid = join(mem, who.members[0], honest)
    assert engine.stats.joined == 1 and engine.tunnels[honest.tunnel_id].pending == 0
    mem.advance(mem.now + 30.0)  # the stalled handshakes time out
    assert list(engine.associations) == [aid]
    assert engine.tunnels[hostile.tunnel_id].pending == 0
    endpoint = client(who.members[1])
    endpoint.connect(mem.now)
    pump(mem, endpoint, uuid.uuid4(), hostile)  # the tunnel may start handshakes again
    assert engine.stats.joined == 2 and engine.tunnels[hostile.tunnel_id].pending == 0
