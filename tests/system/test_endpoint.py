"""The endpoint role in one process against a stand-in KMF (tests/system/fakekmf.py).

Real loopback UDP and perc's DTLS engine on both sides; waits that would take seconds (join
timeouts, retransmissions) run under a MockClock.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import socket
from pathlib import Path

import attrs
import pytest
import trio
from hypothesis import given
from hypothesis import settings as settings_
from hypothesis import strategies as st
from trio.testing import MockClock

from perc import identity
from perc.dtls.events import AlertReceived, ApplicationDataReceived
from perc.endpoint import (
    AssociationEnded,
    ExitCode,
    Joiner,
    JoinError,
    JoinFailed,
    JoinRefused,
    JoinSettings,
    JoinTimeout,
    WrongKmf,
    hbh_digest,
)
from perc.keying import key_digest
from perc.keylog import KeyLog
from perc.media.endpoint import EndpointMedia
from perc.roles import endpoint
from perc.srtp.ekt import EktParameterSet
from perc.srtp.keys import SrtpProfile, split_exporter
from perc.wire.dtls import (
    ClientHello,
    ExtensionType,
    UseSrtp,
    find_extension,
    parse_datagram_untrusted,
    parse_handshake_fragments_untrusted,
)
from tests.system.fakekmf import FakeKmf

IDS = {n: identity.generate(n) for n in ("kmf", "alice", "mallory", "other-kmf")}


def settings(kmf_address: tuple[str, int], **kw: object) -> JoinSettings:
    base: dict[str, object] = {
        "mdd": kmf_address,
        "identity": IDS["alice"],
        "kmf_fingerprint": IDS["kmf"].fingerprint,
        "name": "alice",
        "join_timeout": 5.0,
    }
    base.update(kw)
    return JoinSettings(**base)  # type: ignore[arg-type]


@pytest.fixture
def mock_clock() -> MockClock:
    return MockClock(autojump_threshold=0.02)


async def test_join_holds_outer_halves_and_the_ektkey(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "perc")
    kmf = FakeKmf(IDS["kmf"], {IDS["alice"].fingerprint})
    async with trio.open_nursery() as nursery:
        address = await nursery.start(kmf.serve)
        result = await endpoint.join(settings(address))
        # The KMF's own view of the association: same exporter output, our tls-id.
        (peer,) = kmf.peers.values()
        assert peer.completed is not None and peer.completed.srtp_keying_material is not None
        server_km = split_exporter(
            peer.completed.srtp_profile or 0, peer.completed.srtp_keying_material
        )
        assert result.profile is SrtpProfile.DOUBLE_AEAD_AES_128_GCM
        assert result.keying == server_km
        assert result.hbh == server_km.outer()
        assert len(result.hbh.client_key) == 16 and len(result.hbh.client_salt) == 12
        assert peer.completed.peer_tls_id == result.tls_id.encode()
        endpoint.check_tls_id(result.tls_id)
        assert (result.ekt.key, result.ekt.salt, result.ekt.spi) == (
            kmf.ekt.key,
            kmf.ekt.salt,
            kmf.ekt.spi,
        )
        assert result.ekt_cipher == 1
        assert result.kmf_tls_id == "KMF-tls-id-0123456789"
        assert result.kmf_fingerprint == IDS["kmf"].fingerprint
        params = result.ekt_parameters()
        assert isinstance(params, EktParameterSet) and params.spi == kmf.ekt.spi
        assert "key" not in repr(result).lower().replace("keys", "")
        # The EKTKey is acknowledged (D9) while the endpoint stays.
        await endpoint.stay(result, duration=0.3)
        assert [a.spi for a in kmf.acked()] == [kmf.ekt.spi]
        await wait_until(lambda: bool(kmf.closed()))
        closed = kmf.closed()
        assert closed and closed[0].sent_by_peer and closed[0].reason == "close_notify"
        assert result.socket.fileno() == -1
        nursery.cancel_scope.cancel()
    joined = [r.getMessage() for r in caplog.records if r.getMessage().startswith("joined ")]
    assert len(joined) == 1
    line = joined[0]
    assert f"spi={kmf.ekt.spi}" in line
    assert f"ekt_key={key_digest(kmf.ekt.key, kmf.ekt.salt)}" in line
    assert f"hbh_keys={hbh_digest(server_km.outer())}" in line
    assert "profile=DOUBLE_AEAD_AES_128_GCM(0x0009)" in line
    assert f"local=127.0.0.1:{result.local_address[1]}" in line
    assert any("left name=alice" in r.getMessage() for r in caplog.records)


async def test_given_tls_ids_are_sent_and_checked() -> None:
    kmf = FakeKmf(IDS["kmf"])
    async with trio.open_nursery() as nursery:
        address = await nursery.start(kmf.serve)
        mine = "alice_tls-id+/0123456789"
        result = await endpoint.join(
            settings(address, tls_id=mine, kmf_tls_id="KMF-tls-id-0123456789")
        )
        assert result.tls_id == mine
        # The ClientHello offers both DOUBLE profiles and both EKT ciphers (D18, D6, D24).
        records, _ = parse_datagram_untrusted(kmf.received[0])
        (frag,) = parse_handshake_fragments_untrusted(records[0].fragment)
        hello = ClientHello.decode(frag.body)
        use_srtp = find_extension(hello.extensions, ExtensionType.USE_SRTP)
        ekt = find_extension(hello.extensions, ExtensionType.SUPPORTED_EKT_CIPHERS)
        assert use_srtp is not None and UseSrtp.decode(use_srtp).profiles == (0x0009, 0x000A)
        assert ekt == bytes([2, 1, 2])
        assert find_extension(hello.extensions, ExtensionType.EXTERNAL_SESSION_ID) == (
            bytes([len(mine)]) + mine.encode()
        )
        (peer,) = kmf.peers.values()
        assert peer.completed is not None and peer.completed.peer_tls_id == mine.encode()
        result.socket.close()
        nursery.cancel_scope.cancel()


async def test_not_on_the_roster_is_refused_with_access_denied() -> None:
    kmf = FakeKmf(IDS["kmf"], {IDS["mallory"].fingerprint})
    async with trio.open_nursery() as nursery:
        address = await nursery.start(kmf.serve)
        with pytest.raises(JoinRefused) as info:
            await endpoint.join(settings(address))
        nursery.cancel_scope.cancel()
    assert info.value.exit_code == ExitCode.REFUSED == 3
    assert info.value.alert == 49
    text = str(info.value)
    assert "access_denied" in text and "roster" in text
    assert IDS["alice"].fingerprint in text
    assert "\n" not in text


async def test_wrong_kmf_fingerprint_aborts_with_bad_certificate() -> None:
    kmf = FakeKmf(IDS["other-kmf"])
    async with trio.open_nursery() as nursery:
        address = await nursery.start(kmf.serve)
        with pytest.raises(WrongKmf) as info:
            await endpoint.join(settings(address))
        # Our fatal alert reached the server.
        await wait_until(lambda: bool(kmf.events(AlertReceived)))
        nursery.cancel_scope.cancel()
    assert info.value.exit_code == ExitCode.WRONG_KMF == 4
    text = str(info.value)
    assert IDS["other-kmf"].fingerprint in text and IDS["kmf"].fingerprint in text
    assert "bad_certificate" in text
    assert [a.description for a in kmf.events(AlertReceived)] == [42]
    assert not kmf.acked()


async def test_wrong_kmf_tls_id_aborts_with_illegal_parameter() -> None:
    kmf = FakeKmf(IDS["kmf"], tls_id=b"some-other-KMF-tls-id")
    async with trio.open_nursery() as nursery:
        address = await nursery.start(kmf.serve)
        with pytest.raises(WrongKmf) as info:
            await endpoint.join(settings(address, kmf_tls_id="KMF-tls-id-0123456789"))
        await wait_until(lambda: bool(kmf.events(AlertReceived)))
        nursery.cancel_scope.cancel()
    assert "some-other-KMF-tls-id" in str(info.value)
    assert "illegal_parameter" in str(info.value)
    assert [a.description for a in kmf.events(AlertReceived)] == [47]


async def test_no_ekt_negotiated_is_a_protocol_failure() -> None:
    kmf = FakeKmf(IDS["kmf"], ekt_ciphers=())
    async with trio.open_nursery() as nursery:
        address = await nursery.start(kmf.serve)
        with pytest.raises(JoinFailed) as info:
            await endpoint.join(settings(address))
        await wait_until(lambda: bool(kmf.closed()))
        nursery.cancel_scope.cancel()
    assert info.value.exit_code == ExitCode.PROTOCOL
    assert "EKT" in str(info.value)


async def test_silent_mdd_times_out_with_a_clear_message(mock_clock: MockClock) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind(("127.0.0.1", 0))
        start = trio.current_time()
        with pytest.raises(JoinTimeout) as info:
            await endpoint.join(settings(silent.getsockname(), join_timeout=10.0))
        assert trio.current_time() - start == pytest.approx(10.0, abs=0.1)
        # The ClientHello was retransmitted on the RFC 6347 timer (1, 2, 4 s...).
        sent = 0
        silent.setblocking(False)
        while True:
            try:
                silent.recv(65535)
            except BlockingIOError:
                break
            sent += 1
    assert sent >= 4
    assert info.value.exit_code == ExitCode.TIMEOUT == 5
    text = str(info.value)
    assert "timed out after 10 s" in text and "no answer at all" in text and "tunnel" in text


async def test_closed_port_timeout_names_icmp(mock_clock: MockClock) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        closed_address = s.getsockname()
    with pytest.raises(JoinTimeout) as info:
        await endpoint.join(settings(closed_address, join_timeout=3.0))
    assert "ICMP port unreachable" in str(info.value)


@pytest.mark.parametrize("seed", range(8))
async def test_join_under_heavy_loss(mock_clock: MockClock, seed: int) -> None:
    """30% loss each way (retransmissions in virtual time): the join completes, the EKTKey
    is ACKed."""
    rng = random.Random(seed)
    kmf = FakeKmf(
        IDS["kmf"],
        {IDS["alice"].fingerprint},
        drop_in=lambda _: rng.random() < 0.3,
        drop_out=lambda _: rng.random() < 0.3,
    )
    async with trio.open_nursery() as nursery:
        address = await nursery.start(kmf.serve)
        result = await endpoint.join(settings(address, join_timeout=60.0))
        await endpoint.stay(result, duration=30.0, keepalive=None)
        nursery.cancel_scope.cancel()
    assert kmf.dropped_in + kmf.dropped_out > 0
    assert result.ekt.spi == kmf.ekt.spi
    assert (
        result.hbh
        == split_exporter(
            0x0009,
            next(iter(kmf.peers.values())).completed.srtp_keying_material,  # type: ignore[union-attr]
        ).outer()
    )
    assert [a.spi for a in kmf.acked()] == [kmf.ekt.spi]


async def test_cancelled_join_sends_close_notify() -> None:
    kmf = FakeKmf(IDS["kmf"], send_ekt=False)  # the join can never complete
    async with trio.open_nursery() as nursery:
        address = await nursery.start(kmf.serve)
        with trio.move_on_after(0.3):
            await endpoint.join(settings(address))
        await wait_until(lambda: bool(kmf.closed()))
        nursery.cancel_scope.cancel()
    (closed,) = kmf.closed()
    assert closed.sent_by_peer and closed.reason == "close_notify"


async def test_missing_ektkey_times_out(mock_clock: MockClock) -> None:
    kmf = FakeKmf(IDS["kmf"], send_ekt=False)
    async with trio.open_nursery() as nursery:
        address = await nursery.start(kmf.serve)
        with pytest.raises(JoinTimeout) as info:
            await endpoint.join(settings(address, join_timeout=3.0))
        nursery.cancel_scope.cancel()
    assert "no EKTKey arrived" in str(info.value)


@attrs.define
class FakeMedia:
    """Records what stay() hands the media seam; sends one datagram per timer."""

    received: list[bytes] = attrs.Factory(list)
    rekeys: list[int] = attrs.Factory(list)
    byes: int = 0
    next_at: float = 0.0
    out: list[bytes] = attrs.Factory(list)
    ticks: int = 0
    period: float = 0.05

    def timer(self) -> float | None:
        return self.next_at

    def handle_timer(self, now: float) -> None:
        self.ticks += 1
        self.next_at = now + self.period
        self.out.append(b"\x80\x60" + self.ticks.to_bytes(2, "big") + bytes(8))

    def receive(self, datagram: bytes, now: float) -> None:
        self.received.append(datagram)

    def datagrams_to_send(self) -> list[bytes]:
        out, self.out = self.out, []
        return out

    def rekey(self, params: EktParameterSet, now: float) -> None:
        self.rekeys.append(params.spi)

    def bye(self, now: float) -> None:
        self.byes += 1
        self.out.append(b"\x81\xcb\x00\x01" + bytes(4))


async def test_media_seam_rekey_and_held_packets(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "perc")
    srtp_early = b"\x80\x6f" + bytes(20)

    def before_ekt(kmf: FakeKmf, addr: tuple[str, int], peer: object) -> None:
        kmf.send(addr, srtp_early)  # SRTP racing the EKTKey: held for the media engine
        kmf.send(addr, b"\x05junk")  # neither DTLS nor SRTP: dropped (RFC 7983)

    kmf = FakeKmf(IDS["kmf"], on_complete=before_ekt)
    media = FakeMedia()
    async with trio.open_nursery() as nursery:
        address = await nursery.start(kmf.serve)
        result = await endpoint.join(settings(address))

        async def rekey_later() -> None:
            await wait_until(lambda: bool(kmf.acked()))
            (addr,) = kmf.peers
            peer = kmf.peers[addr]
            peer.conn.send_ekt_key(os.urandom(16), os.urandom(12), 0x99, 60, trio.current_time())
            kmf.flush(addr)
            kmf.send(addr, b"\x80\x6f" + bytes(30))

        nursery.start_soon(rekey_later)
        await endpoint.stay(result, duration=0.5, media=media)
        nursery.cancel_scope.cancel()
    assert media.received[0] == srtp_early
    assert len(media.received) == 2
    assert media.rekeys == [0x99]
    assert result.ekt.spi == 0x99
    assert media.byes == 1 and media.ticks >= 3
    assert result.stats.dropped_other == 1
    assert result.stats.ekt_keys == 2
    assert sorted(a.spi for a in kmf.acked()) == [0x99, kmf.ekt.spi]
    assert any(
        re.match(r"ektkey name=alice spi=153 .*\(rekey\)", r.getMessage()) for r in caplog.records
    )


async def test_endpoint_media_plugs_into_the_seam() -> None:
    """perc.media's EndpointMedia is a MediaEngine: run() builds it from the JoinResult."""
    kmf = FakeKmf(IDS["kmf"])
    made: list[EndpointMedia] = []

    def factory(result: endpoint.JoinResult, now: float) -> EndpointMedia:
        media = EndpointMedia(result.name, "audio", result.keying, result.ekt_parameters(now), now)
        made.append(media)
        return media

    async with trio.open_nursery() as nursery:
        address = await nursery.start(kmf.serve)
        await endpoint.run(settings(address), duration=0.3, media=factory)
        await wait_until(lambda: bool(kmf.closed()))
        nursery.cancel_scope.cancel()
    (media,) = made
    assert media.stats.sent_rtp >= 5
    # The stand-in KMF got the SRTP too (its DTLS engine drops it as not-DTLS, counted).
    (peer,) = kmf.peers.values()
    assert peer.conn.stats.dropped_malformed + peer.conn.stats.dropped_epoch >= 5
    assert kmf.closed()[0].reason == "close_notify"


async def test_media_run_writes_reports_and_judges_expect_peers(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """MediaRun (what `perc endpoint` runs): report before the join, while joined (every
    report_interval, atomically) and at the end with the exit status; exit 8 when fewer peers
    than --expect-peers verified (the stand-in KMF echoes nothing: no peer at all)."""
    caplog.set_level(logging.INFO, "perc")
    kmf = FakeKmf(IDS["kmf"])
    path = tmp_path / "alice.json"
    options = endpoint.MediaOptions(media="both", expect_peers=1, report=path, report_interval=0.1)
    seen: list[dict[str, object]] = []
    async with trio.open_nursery() as nursery:
        address = await nursery.start(kmf.serve)
        run = endpoint.MediaRun(settings(address), options)

        async def watch() -> None:
            while True:
                if path.exists():
                    seen.append(json.loads(path.read_text()))  # never half a file
                await trio.sleep(0.05)

        nursery.start_soon(watch)
        await run.run(duration=0.5)
        nursery.cancel_scope.cancel()
    code, message = run.finish()
    assert code == ExitCode.PEERS == 8
    assert message == (
        "media verified end to end from 0 peer(s) (none), fewer than --expect-peers 1"
    )
    states = [r["state"] for r in seen]
    assert "joined" in states and "left" not in states
    assert sum(1 for r in seen if r["state"] == "joined" and int(r["sent"]) > 0) >= 2  # type: ignore[call-overload]
    final = json.loads(path.read_text())
    assert final["state"] == "left" and final["exit_status"] == 8
    assert final["sent"] == run.engine.sent > 20  # type: ignore[union-attr]
    assert final["local"] == f"127.0.0.1:{run.result.local_address[1]}"  # type: ignore[union-attr]
    assert set(final["streams"]) == {"audio", "video"}
    assert not [p for p in tmp_path.iterdir() if p.name != "alice.json"]  # no temp file left
    summary = [r.getMessage() for r in caplog.records if "media summary" in r.getMessage()]
    assert len(summary) == 1
    assert summary[0].startswith(f"media summary name=alice sent={final['sent']} ")
    assert "peers_verified=0 expect_peers=1" in summary[0]


def test_media_run_that_never_joined_reports_failed(tmp_path: Path) -> None:
    path = tmp_path / "r.json"
    run = endpoint.MediaRun(settings(("127.0.0.1", 9)), endpoint.MediaOptions(report=path))
    code, message = run.finish(JoinTimeout("join timed out after 1 s"))
    assert (code, message) == (ExitCode.TIMEOUT, "join timed out after 1 s")
    data = json.loads(path.read_text())
    assert data["state"] == "failed" and data["exit_status"] == 5
    assert data["peers"] == {} and data["sent"] == 0 and data["name"] == "alice"


async def test_lost_ack_the_ektkey_is_retransmitted_and_acked_again(mock_clock: MockClock) -> None:
    """D9: the endpoint keeps running DTLS after the join; a retransmitted EKTKey is ACKed."""
    acks_seen = 0

    def drop_first_ack(data: bytes) -> bool:
        nonlocal acks_seen
        if data[:1] == b"\x1a":  # an ACK record (content type 26) leads the datagram
            acks_seen += 1
            return acks_seen == 1
        return False

    kmf = FakeKmf(IDS["kmf"], drop_in=drop_first_ack)
    async with trio.open_nursery() as nursery:
        address = await nursery.start(kmf.serve)
        result = await endpoint.join(settings(address))
        await endpoint.stay(result, duration=5.0)
        nursery.cancel_scope.cancel()
    assert kmf.dropped_in == 1
    (peer,) = kmf.peers.values()
    assert peer.conn.stats.retransmissions >= 1
    assert [a.spi for a in kmf.acked()] == [kmf.ekt.spi]
    assert result.stats.ekt_keys == 1  # the retransmission is the same key, not a rekey


async def test_keepalive_only_when_silent(mock_clock: MockClock) -> None:
    kmf = FakeKmf(IDS["kmf"])
    async with trio.open_nursery() as nursery:
        address = await nursery.start(kmf.serve)
        quiet = await endpoint.join(settings(address, name="quiet"))
        await endpoint.stay(quiet, duration=10.0, keepalive=3.0)
        busy = await endpoint.join(settings(address, name="busy"))
        await endpoint.stay(busy, duration=10.0, keepalive=3.0, media=FakeMedia(period=1.0))
        nursery.cancel_scope.cancel()
    assert quiet.stats.keepalives == 3  # at 3, 6 and 9 s of silence
    assert busy.stats.keepalives == 0  # media every second
    empty = [e for e in kmf.events(ApplicationDataReceived) if e.data == b""]
    assert len(empty) == 3


async def test_kmf_ending_the_association_after_the_join() -> None:
    kmf = FakeKmf(IDS["kmf"])
    async with trio.open_nursery() as nursery:
        address = await nursery.start(kmf.serve)
        result = await endpoint.join(settings(address))

        async def close_later() -> None:
            await wait_until(lambda: bool(kmf.acked()))
            (addr,) = kmf.peers
            kmf.peers[addr].conn.close(trio.current_time())
            kmf.flush(addr)

        nursery.start_soon(close_later)
        with pytest.raises(AssociationEnded) as info:
            await endpoint.stay(result)
        nursery.cancel_scope.cancel()
    # D33: a close_notify from the KMF after the join is the operator removing us.
    assert info.value.exit_code == ExitCode.REMOVED == 10
    assert "close_notify" in str(info.value) and "removed by the KMF operator" in str(info.value)


async def test_cancelled_stay_sends_close_notify() -> None:
    kmf = FakeKmf(IDS["kmf"])
    async with trio.open_nursery() as nursery:
        address = await nursery.start(kmf.serve)
        result = await endpoint.join(settings(address))
        with trio.move_on_after(0.2):
            await endpoint.stay(result)
        await wait_until(lambda: bool(kmf.closed()))
        nursery.cancel_scope.cancel()
    assert kmf.closed()[0].reason == "close_notify"


async def test_keylog_line_written(tmp_path: Path) -> None:
    kmf = FakeKmf(IDS["kmf"])
    path = tmp_path / "keys.log"
    async with trio.open_nursery() as nursery:
        address = await nursery.start(kmf.serve)
        with KeyLog(path) as keylog:
            result = await endpoint.join(settings(address), keylog=keylog)
        result.socket.close()
        nursery.cancel_scope.cancel()
    (line,) = path.read_text().splitlines()
    assert re.fullmatch(r"CLIENT_RANDOM [0-9a-f]{64} [0-9a-f]{96}", line)


async def wait_until(predicate: object, timeout: float = 5.0) -> None:
    assert callable(predicate)
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.005)


def _plaintext_alert(level: int, description: int) -> bytes:
    # An unauthenticated epoch-0 alert record, as an off-path attacker could send one.
    return bytes.fromhex("15fefd0000000000000000000002") + bytes([level, description])


DATAGRAM = st.one_of(
    st.binary(max_size=300),
    st.builds(_plaintext_alert, st.sampled_from([1, 2]), st.integers(0, 255)),
    st.binary(min_size=1, max_size=40).map(lambda b: bytes([0x80]) + b),  # "SRTP"
)


@settings_(max_examples=150, deadline=None)
@given(st.lists(DATAGRAM, max_size=8))
def test_garbage_during_a_join_is_dropped_or_a_typed_join_error(datagrams: list[bytes]) -> None:
    """Whatever arrives: counted drops, or one JoinError (e.g. a forged alert); no socket."""
    j = Joiner(settings(("127.0.0.1", 9)))
    j.start(0.0)
    try:
        for i, dg in enumerate(datagrams):
            j.receive_datagram(dg, float(i))
    except JoinError as e:
        assert isinstance(e, (JoinRefused, JoinFailed, WrongKmf, JoinTimeout))
        assert "\n" not in str(e)
    stats = j.stats
    assert stats.dtls_in + stats.media_held + stats.dropped_media + stats.dropped_other <= len(
        datagrams
    )


# --- what the media engine counts around joins (perc.media "Pre-join", "Early", key wait) ----
# In-process, on perc.media's fake MDD and clock (tests/media/conference.py), because a real
# conference cannot place a late EKTKey or a reordered Full tag where a test wants it.


@pytest.mark.parametrize("join_at", [1.0, 1.5])
def test_late_ektkey_at_a_member_is_key_wait_and_the_joiner_counts_pre_join(
    join_at: float,
) -> None:
    """carol joins with a new EKTKey (a join rekey); bob gets it at once, alice 40 ms late
    (a lost DTLS record): alice's failures on carol's first packets are key wait, carol's on
    packets under keys from before her join are pre-join; nobody counts an E2E failure."""
    from tests.media.conference import Conference, new_ekt

    conf = Conference()
    k1 = new_ekt(1)
    alice = conf.add("alice", "both", k1)
    bob = conf.add("bob", "both", k1)
    conf.run(join_at)
    k2 = new_ekt(2)
    carol = conf.add("carol", "both", k2)
    bob.rekey(k2, join_at)
    conf.run(join_at + 0.04)
    alice.rekey(k2, join_at + 0.04)
    conf.run(join_at + 1.5)
    reports = {ep.name: ep.report() for ep in (alice, bob, carol)}
    for name, rep in reports.items():
        un = rep["unattributed"]
        assert un["e2e_failures"] == 0, (name, un)
        for peer, p in rep["peers"].items():
            assert p["e2e_failures"] == p["hbh_failures"] == p["payload_failures"] == 0
            assert p["verified"] > 0, (name, peer)
    assert reports["alice"]["unattributed"]["key_wait"] > 0
    assert reports["alice"]["unattributed"]["pre_join"] == 0
    # carol never had k1: what the others sent under it, or under their k1-era E2E keys in
    # the 250 ms after the rekey, is pre-join (D22: a joiner cannot read the past)
    assert reports["carol"]["unattributed"]["pre_join"] > 0
    assert reports["bob"]["unattributed"] == reports["bob"]["unattributed"] | {
        "received": 0,
        "key_wait": 0,
        "pre_join": 0,
    }


def test_a_packet_that_overtakes_its_key_announcement_is_early_not_a_failure() -> None:
    """The first three packets of a stream carry its key (Full EKT tags); if the fourth
    arrives before them it has no key yet, but it verifies-in-kind: counted as early."""
    from tests.media.conference import Conference, Link, new_ekt

    conf = Conference()
    ekt = new_ekt(1)
    conf.add("alice", "audio", ekt)
    bob = conf.add("bob", "none", ekt)
    # To bob: hold alice's first three packets until the fourth has passed.
    conf.links["bob"] = Link(lambda i, _d: "hold" if i < 3 else "pass")
    conf.run(2.0)
    un = bob.report()["unattributed"]
    assert un["early"] == 1 and un["e2e_failures"] == 0, un
    peer = bob.report()["peers"]["alice"]
    assert peer["e2e_failures"] == 0 and peer["verified"] == conf.endpoints["alice"].sent - 1


def test_a_straggler_from_before_a_joiner_s_first_key_is_pre_join() -> None:
    """A packet under a key the joiner never had, arriving after the sender's stream already
    verified for it (reordering), is pre-join, not a failure of that stream."""
    from tests.media.conference import Conference, Link, new_ekt

    conf = Conference()
    k1, k2 = new_ekt(1), new_ekt(2)
    alice = conf.add("alice", "audio", k1)
    conf.run(1.0)
    bob = conf.add("bob", "none", k2)
    alice.rekey(k2, 1.0)
    # alice keeps her old E2E key for 250 ms: hold one of those packets (the 10th to bob)
    # behind later ones, past the first packet under her new key.
    conf.links["bob"] = Link(lambda i, _d: "hold" if 9 <= i < 16 else "pass")
    conf.run(3.0)
    rep = bob.report()
    assert rep["peers"]["alice"]["e2e_failures"] == 0, rep["peers"]["alice"]
    assert rep["unattributed"]["e2e_failures"] == 0, rep["unattributed"]
    assert rep["unattributed"]["pre_join"] > 0
