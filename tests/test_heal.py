"""Self-healing (D30) and the honest verdict, sans-IO, on a fake clock.

A real :class:`~perc.endpoint.Session` (joined against a DTLS server in memory, as in
tests/test_endpoint.py) carries a real media engine made by
:class:`~perc.endpoint.MediaStatus`; its peers are media engines in the in-memory conference
of tests/media/conference.py, behind a fake MDD that holds the outer keys only. Time is
whatever the test says: each rejoin trigger, the back-off and the verdict are checked at the
instants just before and after they must fire.
"""

from __future__ import annotations

import logging
import os
from typing import TypeVar

import pytest

from perc import config
from perc.dtls.errors import AlertDescription
from perc.endpoint import (
    REJOIN_BACKOFF_MAX,
    AssociationEnded,
    ExitCode,
    Healer,
    Joiner,
    JoinFailed,
    JoinRefused,
    JoinTimeout,
    MediaOptions,
    MediaStatus,
    RejoinNeeded,
    Removed,
    Session,
    WrongKmf,
)
from perc.events import (
    RECORD_KEY,
    EndpointPeersSilent,
    EndpointPeerVerified,
    EndpointRejoin,
    Event,
)
from perc.media.endpoint import EndpointMedia
from tests.media.conference import Conference
from tests.test_endpoint import IDS, SALT, Kmf, _settings

UNIX = 1_700_000_000.0
E = TypeVar("E", bound=Event)


def _joined(spi: int = 7, ttl: int = 86400, now: float = 0.0) -> tuple[Session, Kmf]:
    """A session joined against an in-memory KMF that sends an EKTKey with ``spi``."""
    kmf = Kmf(send_ekt=False)
    joiner = Joiner(_settings())
    joiner.start(now)
    out = joiner.datagrams_to_send()
    sent = False
    for _ in range(20):
        back = kmf.receive(out, now)
        if not sent and any(type(e).__name__ == "HandshakeCompleted" for e in kmf.events):
            kmf.conn.send_ekt_key(os.urandom(16), SALT, spi, ttl, now)
            back += kmf.conn.datagrams_to_send()
            sent = True
        for data in back:
            joiner.receive_datagram(data, now)
        out = joiner.datagrams_to_send()
        if joiner.done and not out:
            break
    assert joiner.done
    session = Session(**joiner.session_fields(now))
    session.mdd_address = ("127.0.0.1", 5004)
    return session, kmf


class Run:
    """alice's MediaStatus and Session, bob and carol in an in-memory conference."""

    def __init__(self, *, peers: tuple[str, ...] = ("bob", "carol"), **options: object) -> None:
        opts: dict[str, object] = {"media": "audio", "expect_peers": len(peers)}
        opts.update(options)
        self.status = MediaStatus(_settings(), MediaOptions(**opts))  # type: ignore[arg-type]
        self.session, self.kmf = _joined()
        self.engine = self.status.make_engine(self.session, 0.0, UNIX)
        self.session.start(0.0, self.engine, keepalive=None)
        self.conf = Conference()
        self.conf.endpoints["alice"] = self.engine
        self.conf.mdd.attach("alice", self.session.keying)
        self.conf.on_deliver = self._delivered
        ekt = self.session.ekt_parameters(0.0)
        self.peers = {p: self.conf.add(p, "audio", ekt, now=0.0) for p in peers}

    def _delivered(self, to: str, _datagram: bytes, now: float) -> None:
        if to == "alice":
            self.session.last_receive = now  # what Session.receive_datagram records

    @property
    def healer(self) -> Healer:
        return self.status.healer

    def run(self, until: float) -> None:
        """Advance to ``until`` in 100 ms steps, checking the watchdog at each."""
        t = self.conf.now
        while t < until:
            t = min(until, round(t + 0.1, 6))
            self.conf.run(t)
            self.session.process_events(t)

    def rejoin(self, now: float, spi: int) -> Session:
        """A rejoin completes: new association and EKTKey; the peers get the KMF's rekey."""
        session, self.kmf = _joined(spi, now=now)
        self.status.rejoined(session, now)
        session.start(now, self.engine, keepalive=None)
        self.session = session
        self.conf.mdd.attach("alice", session.keying)
        for peer in self.peers.values():
            peer.rekey(session.ekt_parameters(now), now)
        return session


def _events(caplog: pytest.LogCaptureFixture, kind: type[E]) -> list[E]:
    found = [getattr(r, RECORD_KEY, None) for r in caplog.records]
    return [e for e in found if isinstance(e, kind)]


# --- the triggers --------------------------------------------------------------------------------


def test_silence_from_the_mdd_triggers_a_rejoin_after_rejoin_silence(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    r = Run()
    r.run(1.0)
    verified = _events(caplog, EndpointPeerVerified)
    assert sorted((e.peer, e.rejoins) for e in verified) == [("bob", 0), ("carol", 0)]
    last = r.session.last_receive
    assert last > 0.9
    for peer in list(r.peers):
        r.conf.remove(peer)  # the MDD is gone: nothing arrives any more
    assert r.session.get_timer() is not None
    assert r.healer.timer(r.session) == pytest.approx(last + 3.0)
    r.session.process_events(last + 2.99)
    with pytest.raises(RejoinNeeded, match=r"nothing from the MDD at 127\.0\.0\.1:5004") as why:
        r.session.process_events(last + 3.0)
    assert why.value.reason == "silence"


@pytest.mark.parametrize(
    "options",
    [{"expect_peers": 0}, {"rejoin_silence": 0.0}, {"rejoin": False}],
)
def test_silence_rule_is_off_without_expected_peers_or_when_disabled(
    options: dict[str, object],
) -> None:
    r = Run(**options)
    r.run(1.0)
    for peer in list(r.peers):
        r.conf.remove(peer)
    r.session.process_events(60.0)  # no RejoinNeeded


def test_silence_rule_waits_until_a_peer_was_heard() -> None:
    """An endpoint alone in its conference (peers not there yet) does not rejoin in a loop."""
    r = Run(peers=(), expect_peers=2)
    r.run(1.0)
    r.session.process_events(30.0)
    assert r.healer.rejoins == 0


def test_media_under_a_newer_spi_for_over_a_second_triggers_a_rejoin() -> None:
    r = Run()
    r.run(1.0)
    newer = _joined(8)[0].ekt_parameters(1.0)
    for peer in r.peers.values():
        peer.rekey(newer, 1.0)  # the KMF rekeyed; alice's copy of the EKTKey never came
    r.run(2.0)  # tags under SPI 8 since ~1.0 s: not yet
    with pytest.raises(RejoinNeeded, match=r"under EKT SPI 8 for 1\.[0-9] s, we hold SPI 7") as why:
        r.run(2.4)
    assert why.value.reason == "stale_spi"


def test_a_late_ektkey_within_the_second_is_no_reason_to_rejoin() -> None:
    r = Run()
    r.run(1.0)
    newer = _joined(8)[0].ekt_parameters(1.0)
    for peer in r.peers.values():
        peer.rekey(newer, 1.0)
    r.run(1.8)
    r.engine.rekey(newer, 1.8)  # D9's retransmission brought it
    r.run(4.0)
    assert r.healer.rejoins == 0 and r.engine.newer_spi is None


def test_an_expired_ektkey_triggers_a_rejoin() -> None:
    r = Run()
    r.session.ekt_received_at = 10.0 - r.session.ekt.ttl  # it expires at 10 s
    r.run(9.9)
    assert r.healer.timer(r.session) == pytest.approx(10.0)
    with pytest.raises(RejoinNeeded, match="expired") as why:
        r.run(10.0)
    assert why.value.reason == "ekt_expired"


def test_the_kmf_ending_the_association_triggers_a_rejoin() -> None:
    r = Run()
    r.run(0.5)
    r.kmf.conn.abort(int(AlertDescription.internal_error), 0.5)  # e.g. MediaKeys undelivered
    for data in r.kmf.conn.datagrams_to_send():
        r.session.receive_datagram(data, 0.5)
    with pytest.raises(RejoinNeeded, match="internal_error") as why:
        r.session.process_events(0.5)
    assert why.value.reason == "ended"


def test_the_kmf_operator_removing_us_ends_the_run_without_a_rejoin() -> None:
    """D33: the KMF's close_notify after the join is a kick: exit 10, no rejoin."""
    r = Run()
    r.run(0.5)
    r.kmf.conn.close(0.5)
    for data in r.kmf.conn.datagrams_to_send():
        r.session.receive_datagram(data, 0.5)
    with pytest.raises(Removed, match="removed by the KMF operator") as info:
        r.session.process_events(0.5)
    assert info.value.exit_code == ExitCode.REMOVED == 10
    assert r.healer.rejoins == 0


def test_access_denied_after_the_join_still_ends_the_run() -> None:
    r = Run()
    r.kmf.conn.abort(int(AlertDescription.access_denied), 0.5)  # taken off the roster
    for data in r.kmf.conn.datagrams_to_send():
        r.session.receive_datagram(data, 0.5)
    with pytest.raises(AssociationEnded, match="access_denied") as info:
        r.session.process_events(0.5)
    assert info.value.exit_code == ExitCode.ENDED


def test_without_healing_an_ended_association_ends_the_run() -> None:
    r = Run(rejoin=False)
    r.kmf.conn.close(0.5)
    for data in r.kmf.conn.datagrams_to_send():
        r.session.receive_datagram(data, 0.5)
    with pytest.raises(AssociationEnded):
        r.session.process_events(0.5)


# --- back-off, retries, and a whole rejoin -------------------------------------------------------


def test_back_off_doubles_to_its_cap_and_restarts_once_media_verifies(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    r = Run()
    r.run(1.0)
    delays = [r.healer.begin("silence", "x", 1.0) - 1.0 for _ in range(7)]
    assert delays == [0.5, 1.0, 2.0, 4.0, 8.0, 8.0, 8.0] and REJOIN_BACKOFF_MAX == 8.0
    events = _events(caplog, EndpointRejoin)
    assert [e.attempt for e in events] == [1, 2, 3, 4, 5, 6, 7]
    r.rejoin(1.0, 9)
    assert r.healer.attempt == 7  # joined, but nothing verified yet
    r.run(1.5)
    assert r.healer.attempt == 0
    assert r.healer.begin("silence", "x", 2.0) == 2.5


def test_failed_attempts_are_retried_unless_retrying_cannot_help() -> None:
    h = Healer("alice")
    assert h.failed(JoinTimeout("join timed out"), 0.0) == 0.5
    closed = JoinRefused("the KMF closed the association", int(AlertDescription.close_notify))
    assert h.failed(closed, 0.0) == 1.0
    assert h.reasons == {"retry": 2} and h.rejoins == 2
    for fatal in (
        JoinRefused("denied", int(AlertDescription.access_denied)),
        WrongKmf("wrong KMF"),
        JoinFailed("no EKT"),
    ):
        with pytest.raises(type(fatal)):
            h.failed(fatal, 0.0)
    assert h.rejoins == 2


def test_a_rejoin_attempt_gives_up_at_once_when_nothing_listens() -> None:
    joiner = Joiner(_settings(), rejoin=True)
    joiner.start(0.0)
    joiner.stats.icmp_unreachable += 1  # what the shell counts on ECONNREFUSED
    with pytest.raises(JoinTimeout, match="nothing listens"):
        joiner.handle_timer(0.01)
    first = Joiner(_settings())  # the first join waits out --join-timeout as before
    first.start(0.0)
    first.stats.icmp_unreachable += 1
    first.handle_timer(0.01)


def test_a_whole_rejoin_resumes_media_and_is_counted(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    r = Run()
    r.run(1.0)
    for peer in list(r.peers):
        r.conf.mdd.detach(peer)  # the MDD restarted: it knows nobody
    r.conf.mdd.detach("alice")
    with pytest.raises(RejoinNeeded) as why:
        r.run(5.0)
    now = r.conf.now
    at = r.status.rejoining(why.value, now)
    assert at == now + 0.5 and r.status.state == "rejoining"
    ssrcs = r.engine.our_ssrcs()
    for name, peer in r.peers.items():  # the peers rejoin too (their own keys)
        keying = _joined(11)[0].keying
        peer.rejoin(keying, r.session.ekt_parameters(at), at)
        r.conf.mdd.attach(name, keying)
    r.conf.now = at
    r.rejoin(at, 11)
    r.run(at + 1.0)
    assert r.engine.our_ssrcs() == ssrcs and r.status.state == "joined"
    again = [e for e in _events(caplog, EndpointPeerVerified) if e.rejoins == 1]
    assert sorted(e.peer for e in again) == ["bob", "carol"]
    rep = r.status.report(now=r.conf.now)
    assert rep["rejoins"] == 1 and rep["rejoin_reasons"] == {"silence": 1}
    assert rep["rejoins_completed"] == 1 and rep["spis"] == [7, 11]
    for name, peer in r.peers.items():
        p = rep["peers"][name]
        assert p["e2e_failures"] == 0 and p["silent_for"] < 0.1 and p["gap"] is None
        mine = peer.report()["peers"]["alice"]
        assert mine["e2e_failures"] == mine["hbh_failures"] == 0
    assert r.status.outcome(now=r.conf.now) == (ExitCode.OK, None)


# --- the verdict ---------------------------------------------------------------------------------


def _peer_goes(r: Run, name: str, *, bye: bool) -> None:
    peer = r.peers.pop(name)
    if bye:
        peer.bye(r.conf.now)
        r.conf.pump(r.conf.now)
    r.conf.remove(name)


def test_a_peer_silent_past_the_limit_without_bye_or_rekey_fails_the_run(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    r = Run(rejoin=False)
    r.run(2.0)
    _peer_goes(r, "carol", bye=False)  # SIGKILLed, or lost by the MDD
    r.run(7.1)
    assert r.status.outcome(now=7.0)[0] == ExitCode.OK  # 5.0 s silent: within the limit
    code, message = r.status.outcome(now=7.1)
    assert code == ExitCode.SILENT == 9
    assert message is not None and "bob" not in message
    assert message.startswith(
        "peers went silent (media stopped for more than --silence-limit 5 s, no BYE, no rekey): "
        "carol since 22:13:2"
    )
    assert "2.0 s after the start, 5.1 s before the end" in message
    (silent,) = _events(caplog, EndpointPeersSilent)
    assert list(silent.peers) == ["carol"] and silent.limit == 5.0
    rep = r.status.report(int(code), now=7.1)
    assert set(rep["silent_peers"]) == {"carol"}
    carol = rep["peers"]["carol"]
    assert carol["bye"] is False and carol["gap"] is None
    assert 1.9 <= carol["last_verified"] <= 2.0 and 5.1 <= carol["silent_for"] <= 5.2
    assert rep["peers"]["bob"]["silent_for"] < 0.1


def test_a_peer_that_said_bye_or_was_followed_by_a_rekey_is_not_silent() -> None:
    r = Run(rejoin=False)
    r.run(2.0)
    _peer_goes(r, "bob", bye=True)
    _peer_goes(r, "carol", bye=False)
    r.run(4.0)
    r.status.healer.rekeyed(4.0)  # the KMF rekeyed: a member left (D22)
    r.run(10.0)
    rep = r.status.report(now=10.0)
    assert rep["peers"]["bob"]["gap"] == "bye" and rep["peers"]["carol"]["gap"] == "rekey"
    assert rep["silent_peers"] == {}
    assert r.status.outcome(now=10.0) == (ExitCode.OK, None)


def test_a_rekey_between_two_packets_of_a_live_peer_is_no_gap() -> None:
    # The end of a run: a member left (rekey) a few ms after bob's last packet so far, and the
    # run ends before his next one. bob is not quiet: nothing needs explaining.
    r = Run(rejoin=False)
    r.run(2.0)
    last = r.engine.peers_last_verified()["bob"][0]
    r.status.healer.rekeyed(last + 0.005)
    rep = r.status.report(now=last + 0.01)
    assert rep["peers"]["bob"]["gap"] is None and rep["silent_peers"] == {}
    rep = r.status.report(now=last + 1.0)  # quiet for a second: the rekey explains it
    assert rep["peers"]["bob"]["gap"] == "rekey"


def test_our_own_rejoin_does_not_excuse_a_silent_peer() -> None:
    r = Run()
    r.run(2.0)
    _peer_goes(r, "carol", bye=False)
    r.status.rejoining(RejoinNeeded("silence", "x"), 3.0)
    rep = r.status.report(now=10.0)
    assert rep["peers"]["carol"]["gap"] == "rejoin" and "carol" in rep["silent_peers"]
    code, message = r.status.outcome(now=10.0)
    assert code == ExitCode.SILENT and message is not None and "1 rejoin attempt(s)" in message


def test_silence_limit_zero_disables_the_verdict_and_missing_peers_come_first() -> None:
    r = Run(rejoin=False, silence_limit=0.0)
    r.run(1.0)
    _peer_goes(r, "carol", bye=False)
    assert r.status.outcome(now=60.0) == (ExitCode.OK, None)
    short = Run(rejoin=False, expect_peers=3)
    short.run(1.0)
    _peer_goes(short, "carol", bye=False)
    assert short.status.outcome(now=60.0)[0] == ExitCode.PEERS


def test_the_verdict_needs_the_end_of_the_run() -> None:
    r = Run(rejoin=False)
    r.run(1.0)
    _peer_goes(r, "carol", bye=False)
    assert r.status.outcome() == (ExitCode.OK, None)  # no "now": no verdict on silence


# --- configuration ------------------------------------------------------------------------------


def test_the_heal_options_come_from_the_endpoint_config() -> None:
    cfg = config.endpoint_config(
        mdd="127.0.0.1:5004", kmf_fingerprint=IDS["kmf"].fingerprint, cert="a.crt",
        key="a.key", rejoin=False, rejoin_silence=1.5, silence_limit=0.0,
    )  # fmt: skip
    options = MediaOptions.from_config(cfg)
    assert (options.rejoin, options.rejoin_silence, options.silence_limit) == (False, 1.5, 0.0)
    defaults = MediaOptions()
    assert (defaults.rejoin, defaults.rejoin_silence, defaults.silence_limit) == (True, 3.0, 5.0)
    for key in ("rejoin_silence", "silence_limit"):
        option = "--" + key.replace("_", "-")
        with pytest.raises(config.ConfigError, match=f"{option}: must be 0 .off."):
            config.endpoint_config(
                mdd="127.0.0.1:5004", kmf_fingerprint=IDS["kmf"].fingerprint, **{key: -1.0}
            )


def test_an_engine_is_what_the_healer_watches() -> None:
    r = Run()
    assert isinstance(r.healer.media, EndpointMedia) and r.session.watchdog is r.healer


@pytest.mark.parametrize(
    "event",
    [
        EndpointRejoin("alice", "silence", 2, delay=1.0, detail="nothing from the MDD"),
        EndpointPeerVerified("alice", "bob", 1),
        EndpointPeersSilent("alice", {"bob": 2.5, "carol": 3.0}, 5.0),
    ],
)
def test_the_heal_events_round_trip_through_json(event: Event) -> None:
    from perc.events import from_json, to_json

    assert from_json(to_json(event)) == event
    assert event.describe().split()[0] in ("rejoin", "peer", "peers")
