"""perc.endpoint without sockets: a Joiner and a Session against a DTLS server in memory.

Two sans-IO peers joined by lists of datagrams, time given by the test: the join, the KMF
refusals, the join deadline, rekeys handed to the media engine, the keepalive's schedule, the
way out (BYE, then close_notify) and the media status's report and exit status.
"""

from __future__ import annotations

import os
from typing import Any

import attrs
import pytest

from perc import config, identity
from perc.config import EndpointConfig
from perc.dtls import DtlsConfiguration, DtlsConnection
from perc.dtls.errors import AlertDescription
from perc.dtls.events import ApplicationDataReceived, ConnectionClosed, EktKeyAcknowledged
from perc.endpoint import (
    AssociationEnded,
    ExitCode,
    Joiner,
    JoinRefused,
    JoinSettings,
    JoinTimeout,
    MediaOptions,
    MediaStatus,
    Session,
    WrongKmf,
    is_dtls,
    is_media,
)
from perc.media.sources import VideoSettings
from perc.srtp.ekt import EktParameterSet
from perc.srtp.keys import SrtpProfile

IDS = {n: identity.generate(n) for n in ("kmf", "alice", "other")}
KEY, SALT = os.urandom(16), os.urandom(12)


def _settings(**kw: Any) -> JoinSettings:
    base: dict[str, Any] = {
        "mdd": ("127.0.0.1", 5004),
        "identity": IDS["alice"],
        "kmf_fingerprint": IDS["kmf"].fingerprint,
        "name": "alice",
        "join_timeout": 5.0,
    }
    base.update(kw)
    return JoinSettings(**base)


class Kmf:
    """The KMF side: a DTLS server that sends the EKTKey once the handshake completes."""

    def __init__(self, ident: identity.Identity = IDS["kmf"], send_ekt: bool = True) -> None:
        self.conn = DtlsConnection(
            DtlsConfiguration(
                is_client=False,
                certificate=ident.certificate,
                private_key=ident.private_key,
                tls_id=b"KMF-tls-id-0123456789",
            )
        )
        self.send_ekt = send_ekt
        self.events: list[object] = []

    def receive(self, datagrams: list[bytes], now: float) -> list[bytes]:
        for data in datagrams:
            self.conn.receive_datagram(data, now)
        while (event := self.conn.next_event()) is not None:
            self.events.append(event)
            if type(event).__name__ == "HandshakeCompleted" and self.send_ekt:
                self.conn.send_ekt_key(KEY, SALT, 7, 86400, now)
        return self.conn.datagrams_to_send()


def _join(joiner: Joiner, kmf: Kmf, now: float = 0.0) -> None:
    joiner.start(now)
    out = joiner.datagrams_to_send()
    for _ in range(20):
        back = kmf.receive(out, now)
        for data in back:
            joiner.receive_datagram(data, now)
        out = joiner.datagrams_to_send()
        if joiner.done and not out:
            return
    assert joiner.done


def _session(kmf: Kmf, now: float = 0.0) -> Session:
    joiner = Joiner(_settings())
    _join(joiner, kmf, now)
    return Session(**joiner.session_fields(now))


class FakeMedia:
    """A media engine that sends one datagram every ``period`` and records what it got."""

    def __init__(self, period: float | None = None) -> None:
        self.period = period
        self.next = 0.0 if period is not None else None
        self.received: list[bytes] = []
        self.rekeys: list[EktParameterSet] = []
        self.byes = 0
        self.out: list[bytes] = []

    def timer(self) -> float | None:
        return self.next

    def handle_timer(self, now: float) -> None:
        if self.period is not None and self.next is not None:
            self.out.append(b"\x80media")
            self.next = now + self.period

    def receive(self, datagram: bytes, now: float) -> None:
        self.received.append(datagram)

    def datagrams_to_send(self) -> list[bytes]:
        out, self.out = self.out, []
        return out

    def rekey(self, params: EktParameterSet, now: float) -> None:
        self.rekeys.append(params)

    def bye(self, now: float) -> None:
        self.byes += 1
        self.out.append(b"\x81bye")


def test_demultiplexing_follows_rfc_7983() -> None:
    assert is_dtls(b"\x16") and is_dtls(b"\x3f") and not is_dtls(b"\x40") and not is_dtls(b"")
    assert is_media(b"\x80") and is_media(b"\xbf") and not is_media(b"\xc0")


def test_join_completes_with_a_double_profile_and_the_ektkey() -> None:
    joiner = Joiner(_settings())
    _join(joiner, Kmf())
    fields = joiner.session_fields(1.0)
    assert fields["profile"] in config.DOUBLE_PROFILES
    assert fields["ekt"].spi == 7 and fields["ekt"].key == KEY
    assert fields["hbh"] == fields["keying"].outer()
    assert fields["kmf_tls_id"] == "KMF-tls-id-0123456789"
    assert joiner.stats.ekt_keys == 1


def test_media_before_the_join_is_held_up_to_the_bound() -> None:
    joiner = Joiner(_settings())
    joiner.start(0.0)
    for _ in range(70):
        joiner.receive_datagram(b"\x80x", 0.0)
    joiner.receive_datagram(b"\x00", 0.0)
    assert len(joiner.held) == 64
    assert (joiner.stats.media_held, joiner.stats.dropped_media) == (64, 6)
    assert joiner.stats.dropped_other == 1


def test_a_server_with_another_certificate_is_refused() -> None:
    joiner = Joiner(_settings())
    with pytest.raises(WrongKmf, match="is not the KMF's"):
        _join(joiner, Kmf(IDS["other"]))
    assert joiner.datagrams_to_send()  # our fatal alert, for the shell to send


def test_a_kmf_tls_id_that_differs_is_refused() -> None:
    joiner = Joiner(_settings(kmf_tls_id="another-tls-id-0123456789"))
    with pytest.raises(WrongKmf, match="illegal_parameter"):
        _join(joiner, Kmf())


def test_an_alert_from_the_kmf_is_a_refusal() -> None:
    kmf = Kmf()
    joiner = Joiner(_settings())
    joiner.start(0.0)
    kmf.receive(joiner.datagrams_to_send(), 0.0)
    kmf.conn.close(0.0)
    with pytest.raises(JoinRefused, match="close_notify"):
        for data in kmf.conn.datagrams_to_send():
            joiner.receive_datagram(data, 0.0)


def test_no_ektkey_before_the_deadline_is_a_timeout_with_a_close_notify() -> None:
    joiner = Joiner(_settings(join_timeout=2.0))
    _join_quietly(joiner, Kmf(send_ekt=False))
    assert joiner.get_timer() <= 2.0
    joiner.handle_timer(1.9)
    with pytest.raises(JoinTimeout, match="handshake completed but no EKTKey arrived"):
        joiner.handle_timer(2.0)
    assert joiner.conn.is_closed


def _join_quietly(joiner: Joiner, kmf: Kmf) -> None:
    joiner.start(0.0)
    out = joiner.datagrams_to_send()
    for _ in range(10):
        for data in kmf.receive(out, 0.0):
            joiner.receive_datagram(data, 0.0)
        out = joiner.datagrams_to_send()


def test_silence_is_a_timeout_that_says_so() -> None:
    joiner = Joiner(_settings(join_timeout=1.0))
    joiner.start(10.0)
    with pytest.raises(JoinTimeout, match="no answer at all"):
        joiner.handle_timer(11.0)


def test_session_keepalive_only_after_silence() -> None:
    kmf = Kmf()
    session = _session(kmf)
    session.start(0.0, None, keepalive=3.0)
    sent_at = []
    for t in range(1, 11):
        now = float(t)
        session.handle_timer(now)
        out = session.datagrams_to_send(now)
        if out:
            sent_at.append(t)
            kmf.receive(out, now)
    assert sent_at == [3, 6, 9] and session.stats.keepalives == 3
    empty = [e for e in kmf.events if isinstance(e, ApplicationDataReceived) and e.data == b""]
    assert len(empty) == 3


def test_session_media_keeps_it_alive_and_gets_the_held_datagrams() -> None:
    kmf = Kmf()
    session = _session(kmf)
    session.held_media = [b"\x80early"]
    media = FakeMedia(period=1.0)
    session.start(0.0, media, keepalive=3.0)
    assert media.received == [b"\x80early"]
    for t in range(10):
        session.handle_timer(float(t))
        session.datagrams_to_send(float(t))
        assert session.get_timer() == t + 1.0
    assert session.stats.keepalives == 0


def test_session_hands_a_new_ektkey_to_the_media_engine_once() -> None:
    kmf = Kmf()
    session = _session(kmf)
    media = FakeMedia()
    session.start(0.0, media, keepalive=None)
    new_key = os.urandom(16)
    for spi in (8, 8):
        kmf.conn.send_ekt_key(new_key, SALT, spi, 600, 1.0)
        for data in kmf.conn.datagrams_to_send():
            session.receive_datagram(data, 1.0)
        session.process_events(1.0)
        kmf.receive(session.datagrams_to_send(1.0), 1.0)
    assert [p.spi for p in media.rekeys] == [8]
    assert session.ekt.spi == 8 and session.stats.ekt_keys == 2
    assert len([e for e in kmf.events if isinstance(e, EktKeyAcknowledged)]) >= 2


def test_leaving_sends_bye_then_close_notify_and_the_kmf_ending_it_is_an_error() -> None:
    kmf = Kmf()
    session = _session(kmf)
    media = FakeMedia()
    session.start(0.0, media, keepalive=None)
    session.drain_media(b"\x80late", 1.0)
    session.drain_media(b"\x16dtls", 1.0)  # DTLS no longer matters on the way out
    session.leave(1.0, "stopped")
    out = session.datagrams_to_send(1.0)
    assert out[0] == b"\x81bye" and media.byes == 1 and media.received == [b"\x80late"]
    kmf.receive(out[1:], 1.0)
    assert any(isinstance(e, ConnectionClosed) for e in kmf.events)
    session.leave(2.0, "again")  # closed: nothing more
    assert session.datagrams_to_send(2.0) == [] and media.byes == 1

    other = _session(Kmf())
    kmf2 = Kmf()
    other = _session(kmf2)
    kmf2.conn.abort(int(AlertDescription.internal_error), 3.0)
    for data in kmf2.conn.datagrams_to_send():
        other.receive_datagram(data, 3.0)
    with pytest.raises(AssociationEnded, match="the KMF ended it") as info:
        other.process_events(3.0)
    assert info.value.exit_code == ExitCode.ENDED

    kicked = _session(kmf3 := Kmf())
    kmf3.conn.close(4.0)  # D33: the KMF's close_notify is the operator's kick
    for data in kmf3.conn.datagrams_to_send():
        kicked.receive_datagram(data, 4.0)
    with pytest.raises(AssociationEnded, match="removed by the KMF operator") as info:
        kicked.process_events(4.0)
    assert info.value.exit_code == ExitCode.REMOVED


def test_media_status_reports_and_judges_expect_peers() -> None:
    status = MediaStatus(_settings(), MediaOptions(media="both", expect_peers=1))
    assert status.report() == {
        "name": "alice", "ssrc": None, "sent": 0, "spis": [], "peers": {}, "state": "joining",
        "rejoins": 0, "rejoin_reasons": {}, "rejoins_completed": 0, "silence_limit": 5.0,
    }  # fmt: skip
    session = _session(Kmf())
    session.local_address = ("127.0.0.1", 40000)
    engine = status.make_engine(session, 5.0, unix_time=1_700_000_000.0)
    engine.handle_timer(5.0)
    report = status.report()
    assert report["state"] == "joined" and report["local"] == "127.0.0.1:40000"
    code, message = status.outcome()
    assert code == ExitCode.PEERS
    assert message == "media verified end to end from 0 peer(s) (none), fewer than --expect-peers 1"
    assert status.report(int(code))["state"] == "left"
    assert status.summary().startswith("media summary name=alice sent=")

    never = MediaStatus(_settings(), MediaOptions())
    assert never.outcome(JoinTimeout("join timed out")) == (ExitCode.TIMEOUT, "join timed out")
    assert never.state == "failed"


def test_settings_from_an_endpoint_config() -> None:
    cfg = config.endpoint_config(
        mdd="[::1]:5004", kmf_fingerprint=IDS["kmf"].fingerprint.lower(), cert="x/alice.crt",
        key="x/alice.key", media="video", video_fps=15.0, keepalive=0.0,
    )  # fmt: skip
    settings = JoinSettings.from_config(cfg, IDS["alice"])
    assert settings.mdd == ("::1", 5004) and settings.name == "alice"
    assert settings.kmf_fingerprint == IDS["kmf"].fingerprint
    assert settings.join_timeout == 10.0
    options = MediaOptions.from_config(cfg)
    assert options == MediaOptions(media="video", video=VideoSettings(fps=15.0))
    assert attrs.evolve(cfg, name="bob").name == "bob"


def test_one_source_of_endpoint_defaults() -> None:
    """JoinSettings, MediaOptions and VideoSettings take their defaults from EndpointConfig."""
    d = {f.name: f.default for f in attrs.fields(EndpointConfig)}
    assert _settings(join_timeout=d["join_timeout"]) == JoinSettings(
        mdd=("127.0.0.1", 5004),
        identity=IDS["alice"],
        kmf_fingerprint=IDS["kmf"].fingerprint,
        name="alice",
    )
    assert (MediaOptions().media, MediaOptions().expect_peers) == (d["media"], d["expect_peers"])
    assert (VideoSettings().fps, VideoSettings().bitrate) == (d["video_fps"], d["video_bitrate"])
    assert SrtpProfile.DOUBLE_AEAD_AES_128_GCM in config.DOUBLE_PROFILES


def test_the_media_choices_of_the_cli_are_the_media_engines() -> None:
    from perc.media.endpoint import MediaChoice

    assert tuple(m.value for m in MediaChoice) == config.ENDPOINT_MEDIA
