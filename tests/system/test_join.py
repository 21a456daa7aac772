"""Joining for real: ``perc kmf``, ``perc mdd`` and ``perc endpoint`` processes on loopback.

Each test builds its own identities and configs (tests/system/conftest.py) and reads what
happened from the processes' events (perc.events) and exit statuses. Keys are compared through
the one-way digests the roles report (``perc.keying.key_digest``), never printed; the first test
also derives the keys independently from the SSLKEYLOGFILE secrets and the ServerHello seen
on the wire.
"""

from __future__ import annotations

import signal

import pytest
import trio

from perc.dtls.keys import CIPHER_SUITES, export_keying_material
from perc.endpoint import JoinSettings, hbh_digest
from perc.events import (
    AssociationCreated,
    AssociationEnded,
    AssociationKeyed,
    Denied,
    DisconnectFromMdd,
    EktKeyAcked,
    EndpointJoined,
    EndpointLeft,
    Joined,
    KmfTunnelDown,
    Left,
    MddTunnelDown,
    MddTunnelUp,
    Rekeyed,
)
from perc.roles import endpoint
from perc.srtp.keys import split_exporter
from perc.wire.dtls import (
    ContentType,
    HandshakeType,
    ServerHello,
    parse_datagram_untrusted,
    parse_handshake_fragments_untrusted,
)
from tests.netutil.impair import ImpairmentProxy
from tests.system.conftest import LOCAL, System

pytestmark = pytest.mark.slow

NO_REKEY = "rekey_on_join = false\nrekey_on_leave = false\n"


class TapProxy(ImpairmentProxy):
    """A loss-free pass-through that records what the KMF (via the MDD) sends the endpoint."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        super().__init__(upstream, drop=0.0, reorder=0.0)
        self.to_endpoint: list[bytes] = []

    def _impair(self, nursery, stats, sock, data, dest):  # type: ignore[no-untyped-def]
        if stats is self.to_client:
            self.to_endpoint.append(data)
        super()._impair(nursery, stats, sock, data, dest)


def server_hello(datagrams: list[bytes]) -> ServerHello:
    for dg in datagrams:
        records, _ = parse_datagram_untrusted(dg)
        for rec in records:
            if rec.content_type != ContentType.HANDSHAKE or rec.epoch != 0:
                continue
            for frag in parse_handshake_fragments_untrusted(rec.fragment):
                if frag.msg_type == HandshakeType.SERVER_HELLO and frag.is_whole:
                    return ServerHello.decode(frag.body)
    raise AssertionError("no ServerHello seen")


async def test_one_endpoint_joins_and_every_side_holds_the_same_keys(system: System) -> None:
    keylog = {"SSLKEYLOGFILE": str(system.keylog)}
    # No rekeying (D22, issue 5): the test names "the" conference key.
    kmf, kmf_port = await system.start_kmf(system.kmf_config(conference_extra=NO_REKEY), env=keylog)
    mdd, mdd_port = await system.start_mdd(system.mdd_config("mdd", kmf_port))
    tap = TapProxy((LOCAL, mdd_port))
    await system.nursery.start(tap.serve)
    assert tap.address is not None
    alice = await system.start_endpoint("alice", tap.address[1], env=keylog)
    ep = await alice.wait_event(EndpointJoined, name="alice")
    assert (ep.profile_name, ep.profile) == ("DOUBLE_AEAD_AES_128_GCM", 0x0009)
    assert ep.kmf == system.fingerprint("kmf")
    endpoint.check_tls_id(ep.tls_id)

    # The KMF admitted alice into "demo" with the SPI she holds.
    kf = await kmf.wait_event(Joined, conference="demo")
    assert kf.fingerprint == system.fingerprint("alice")
    assert kf.spi == ep.spi
    assert kf.profile == 0x0009
    # The MDD installed MediaKeys for that association (the only one: through the tap).
    md = await mdd.wait_event(AssociationKeyed, conference="demo", association=kf.association)
    assert md.profile == 0x0009

    # Independent derivation (D21): both DTLS ends logged the same secret; with the
    # ServerHello's random the exporter gives the keys; its outer halves are what the
    # endpoint and the MDD hold.
    await kmf.wait_event(EktKeyAcked, association=kf.association)
    # (the KMF's tunnel adds its TLS 1.3 lines to the same file: only the DTLS ones here)
    lines = [x for x in system.keylog.read_text().splitlines() if x.startswith("CLIENT_RANDOM ")]
    assert len(lines) == 2 and lines[0] == lines[1], lines
    _, client_random, master = lines[0].split()
    hello = server_hello(tap.to_endpoint)
    material = export_keying_material(
        CIPHER_SUITES[hello.cipher_suite],
        master_secret=bytes.fromhex(master),
        client_random=bytes.fromhex(client_random),
        server_random=hello.random,
        label=b"EXTRACTOR-dtls_srtp",
        length=2 * (32 + 24),
    )
    outer = split_exporter(0x0009, material).outer()
    assert ep.hbh_keys == hbh_digest(outer)
    assert md.keys == hbh_digest(outer)  # the MDD's MediaKeys: the same outer halves
    # The endpoint's EKTKey is the conference key the KMF made.
    (ekt,) = kmf.find_events(Rekeyed, conference="demo")
    assert (ekt.spi, ekt.key) == (ep.spi, ep.ekt_key)

    # Leaving on SIGINT: close_notify -> the KMF ends the association -> EndpointDisconnect
    # to the MDD.
    assert await system.stop(alice, signal.SIGINT) == 0
    await mdd.wait_event(AssociationEnded, association=kf.association, reason="kmf")
    assert alice.find_events(EndpointLeft, name="alice")
    for proc in (kmf, mdd, alice):
        assert "Traceback" not in proc.text, proc.text


async def test_endpoint_not_on_the_roster_gets_access_denied(system: System) -> None:
    kmf, kmf_port = await system.start_kmf(system.kmf_config())
    mdd, mdd_port = await system.start_mdd(system.mdd_config("mdd", kmf_port))
    mallory = await system.start_endpoint("mallory", mdd_port)
    assert await mallory.wait_exit() == 3
    assert "access_denied" in mallory.error_line
    assert "roster" in mallory.error_line
    assert system.fingerprint("mallory") in mallory.error_line
    # The KMF refused mallory's association; the MDD's association for her 5-tuple (the only
    # endpoint here) was ended by the KMF (EndpointDisconnect).
    denied = await kmf.wait_event(Denied, fingerprint=system.fingerprint("mallory"))
    assert denied.alert == "access_denied", denied
    (created,) = mdd.find_events(AssociationCreated, conference="demo")
    assert created.association == denied.association
    await mdd.wait_event(AssociationEnded, association=denied.association, reason="kmf")
    assert "Traceback" not in kmf.text + mdd.text + mallory.text


async def test_wrong_kmf_fingerprint_aborts_and_says_why(system: System) -> None:
    kmf, kmf_port = await system.start_kmf(system.kmf_config())
    mdd, mdd_port = await system.start_mdd(system.mdd_config("mdd", kmf_port))
    impostor_fp = system.fingerprint("expected-kmf")
    alice = await system.start_endpoint("alice", mdd_port, kmf_fingerprint=impostor_fp)
    assert await alice.wait_exit() == 4
    line = alice.error_line
    assert line.startswith("perc: error: wrong KMF: the server's certificate fingerprint ")
    assert system.fingerprint("kmf") in line and impostor_fp in line
    assert "bad_certificate" in line
    # Our fatal alert went back to the KMF, which ended its side and told the MDD (the
    # association of alice's 5-tuple: the only endpoint here).
    (created,) = mdd.find_events(AssociationCreated, conference="demo")
    await mdd.wait_event(AssociationEnded, association=created.association, reason="kmf")
    assert not kmf.find_events(Joined)


async def test_tls_ids_both_ways(system: System) -> None:
    """D15 / RFC 9185 §5.1, §5.4: the roster's tls-id for alice, the KMF's own tls-id."""
    alice_id, kmf_id = "alice-tls-id_0123456789", "kmf-tls-id_0123456789/+"
    kmf, kmf_port = await system.start_kmf(
        system.kmf_config(
            kmf_extra=f'tls_id = "{kmf_id}"\n',
            conference_extra=f'tls_ids = {{ "{system.fingerprint("alice")}" = "{alice_id}" }}\n',
        )
    )
    _, mdd_port = await system.start_mdd(system.mdd_config("mdd", kmf_port))
    good = await system.start_endpoint(
        "alice", mdd_port, "--tls-id", alice_id, "--kmf-tls-id", kmf_id, "--duration", "0.2"
    )
    wrong_own = await system.start_endpoint("alice", mdd_port, "--tls-id", "x" * 20)
    wrong_kmf = await system.start_endpoint(
        "alice", mdd_port, "--tls-id", alice_id, "--kmf-tls-id", "y" * 20
    )
    assert await good.wait_exit() == 0, good.text
    (ep,) = good.find_events(EndpointJoined, name="alice")
    assert (ep.tls_id, ep.kmf_tls_id) == (alice_id, kmf_id)
    assert await wrong_own.wait_exit() == 3
    assert "access_denied" in wrong_own.error_line
    assert await wrong_kmf.wait_exit() == 4
    assert f"the KMF's tls-id '{kmf_id}' is not '{'y' * 20}'" in wrong_kmf.error_line
    denied = await kmf.wait_event(Denied, reason="tls-id does not match the roster")
    assert denied.fingerprint == system.fingerprint("alice")


async def test_twenty_endpoint_processes_on_two_mdds_share_the_ektkey(system: System) -> None:
    names = [f"ep{i:02d}" for i in range(20)]
    kmf, kmf_port = await system.start_kmf(
        system.kmf_config(
            trusted_mdds=["mdd1", "mdd2"],
            conferences={"demo": names},
            conference_extra=NO_REKEY,
        )
    )
    mdd1, port1 = await system.start_mdd(system.mdd_config("mdd1", kmf_port))
    mdd2, port2 = await system.start_mdd(system.mdd_config("mdd2", kmf_port))
    for name in names:  # identities first, so that the processes start back to back
        system.identity(name)
    procs = [
        await system.start_endpoint(name, port1 if i % 2 else port2, "--join-timeout", "15")
        for i, name in enumerate(names)
    ]
    fields = [await p.wait_event(EndpointJoined, timeout=30, name=p.name) for p in procs]
    # One conference key, the one the KMF made, held by all 20 on both MDDs.
    (ekt,) = kmf.find_events(Rekeyed, conference="demo")
    assert {(f.spi, f.ekt_key) for f in fields} == {(ekt.spi, ekt.key)}
    assert len({f.hbh_keys for f in fields}) == 20  # every association its own HBH keys
    assert len(kmf.find_events(Joined, conference="demo", spi=ekt.spi)) == 20
    # Each MDD holds exactly the hop-by-hop keys of the endpoints it serves.
    for mdd, port in ((mdd1, port1), (mdd2, port2)):
        served = {f.hbh_keys for f in fields if f.mdd == f"{LOCAL}:{port}"}
        assert len(served) == 10
        await mdd.wait_event(AssociationKeyed, conference="demo", count=10)
        assert {k.keys for k in mdd.find_events(AssociationKeyed)} == served
    codes = []
    for p in procs:
        p.signal(signal.SIGTERM)
    for p in procs:
        codes.append(await p.wait_exit())
    assert codes == [0] * 20, [p.text for p in procs if p.process.returncode]


async def test_twenty_simultaneous_joins(system: System) -> None:
    """20 endpoints (perc.roles.endpoint.join, in this process) released by one event."""
    names = [f"sim{i:02d}" for i in range(20)]
    kmf, kmf_port = await system.start_kmf(
        system.kmf_config(conferences={"demo": names}, conference_extra=NO_REKEY)
    )
    mdd, mdd_port = await system.start_mdd(system.mdd_config("mdd", kmf_port))
    go = trio.Event()
    results: list[endpoint.JoinResult] = []

    async def one(name: str, *, task_status: trio.TaskStatus[None]) -> None:
        settings = JoinSettings(
            mdd=(LOCAL, mdd_port),
            identity=system.identity(name),
            kmf_fingerprint=system.fingerprint("kmf"),
            name=name,
            join_timeout=15.0,
        )
        task_status.started()
        await go.wait()
        results.append(await endpoint.join(settings))

    async with trio.open_nursery() as nursery:
        for name in names:
            await nursery.start(one, name)  # each one ready and waiting for go
        go.set()
    try:
        assert len(results) == 20
        assert len({(r.ekt.spi, r.ekt.key) for r in results}) == 1
        assert len({r.hbh.client_key for r in results}) == 20
        await kmf.wait_event(Joined, conference="demo", count=20)
        await mdd.wait_event(AssociationKeyed, conference="demo", count=20)
        installed = {k.keys for k in mdd.find_events(AssociationKeyed)}
        assert installed == {hbh_digest(r.hbh) for r in results}
    finally:
        for r in results:
            r.socket.close()


async def test_joins_through_a_lossy_reordering_path(system: System) -> None:
    names = [f"lossy{i}" for i in range(6)]
    kmf, kmf_port = await system.start_kmf(
        system.kmf_config(conferences={"demo": names}, conference_extra=NO_REKEY)
    )
    _, mdd_port = await system.start_mdd(system.mdd_config("mdd", kmf_port))
    proxy = ImpairmentProxy((LOCAL, mdd_port), drop=0.1, reorder=0.1, seed=4)
    await system.nursery.start(proxy.serve)
    assert proxy.address is not None
    procs = [
        await system.start_endpoint(n, proxy.address[1], "--join-timeout", "30") for n in names
    ]
    fields = [await p.wait_event(EndpointJoined, timeout=40, name=p.name) for p in procs]
    assert len({f.spi for f in fields}) == 1
    # Loss and reordering did happen (10% each way of ~100 datagrams: never none at all).
    assert proxy.to_server.dropped + proxy.to_client.dropped > 0
    assert proxy.to_server.reordered + proxy.to_client.reordered > 0
    await kmf.wait_event(Joined, conference="demo", count=len(names))


async def test_killed_endpoint_is_disconnected_after_the_idle_timeout(system: System) -> None:
    kmf, kmf_port = await system.start_kmf(system.kmf_config())
    mdd, mdd_port = await system.start_mdd(system.mdd_config("mdd", kmf_port, idle_timeout=1.0))
    alice = await system.start_endpoint("alice", mdd_port)
    await alice.wait_event(EndpointJoined, name="alice")
    aid = (await kmf.wait_event(Joined, conference="demo")).association
    acked = await kmf.wait_event(EktKeyAcked, association=aid)
    alice.process.kill()  # SIGKILL: no close_notify, the MDD only sees silence (D3)
    assert await alice.wait_exit() == -signal.SIGKILL
    idle = await mdd.wait_event(AssociationEnded, conference="demo", association=aid)
    assert (idle.reason, idle.disconnect_sent) == ("idle", True), idle
    await kmf.wait_event(DisconnectFromMdd, association=aid)
    # Alice's last datagram was the EKTKey ACK (the MDD relayed it just before the KMF logged
    # it; her keepalive is 3 s away): the MDD waited its 1 s idle timeout from there, and not
    # much longer (it sweeps every timeout/8). Measured with the processes' own log stamps,
    # so a slow test process does not skew it.
    waited = mdd.time_of(idle) - kmf.time_of(acked)
    assert 0.9 < waited < 3.0, waited
    assert not alice.find_events(EndpointLeft)


async def test_keepalive_holds_the_association_past_the_idle_timeout(system: System) -> None:
    kmf, kmf_port = await system.start_kmf(system.kmf_config())
    # A keepalive 8x faster than the idle timeout: scheduling hiccups on a loaded machine
    # must not make the MDD think alice went silent.
    mdd, mdd_port = await system.start_mdd(system.mdd_config("mdd", kmf_port, idle_timeout=1.2))
    alice = await system.start_endpoint(
        "alice", mdd_port, "--keepalive", "0.15", "--duration", "2.6"
    )
    await alice.wait_event(EndpointJoined, name="alice")
    assert await alice.wait_exit() == 0
    assert alice.find_events(EndpointLeft, name="alice", reason="duration elapsed")
    await kmf.wait_event(Left, conference="demo", reason="close_notify")
    assert not mdd.find_events(AssociationEnded, reason="idle")  # 2.6 s, 1.2 s idle timeout


async def test_mdd_not_trusted_endpoints_fail_with_a_clear_message(system: System) -> None:
    kmf, kmf_port = await system.start_kmf(system.kmf_config(trusted_mdds=["other-mdd"]))
    mdd, mdd_port = await system.start_mdd(system.mdd_config("mdd", kmf_port), wait_tunnel=False)
    # The KMF refuses the MDD's certificate: no tunnel, the MDD keeps retrying.
    await kmf.wait_event(KmfTunnelDown, refused=True)
    await mdd.wait_event(MddTunnelDown, conference="demo")
    alice = await system.start_endpoint("alice", mdd_port, "--join-timeout", "1.5")
    assert await alice.wait_exit() == 5
    assert alice.error_line.startswith(
        f"perc: error: join timed out after 1.5 s through the MDD at 127.0.0.1:{mdd_port}: "
    )
    assert "tunnel to the KMF up" in alice.error_line
    assert "Traceback" not in alice.text
    assert not mdd.find_events(MddTunnelUp)
