"""perc.admin (D33): the admin protocol in memory, the socket path checks, and the KMF
engine's admin operations against perc's DTLS clients (tests/kmf_memory.py, no I/O)."""

from __future__ import annotations

import json
import os
import socket
import uuid
from pathlib import Path
from types import SimpleNamespace

import attrs
import pytest

from perc import identity
from perc.admin import (
    MAX_LINE,
    AdminError,
    Audit,
    Kick,
    LineBuffer,
    LineTooLong,
    Members,
    RosterAdd,
    Status,
    check_socket_path,
    error_line,
    ok_line,
    parse_answer,
    parse_request,
    render,
    request_line,
)
from perc.config import KmfConfig
from perc.dtls import DtlsConnection
from perc.dtls import events as dtls
from perc.dtls.errors import AlertDescription
from perc.events import Kicked, Rekeyed, RosterChanged
from perc.kmf import AuditRecord, RosterEdit

from .kmf_memory import FakeTunnel, MemoryKmf, endpoint_events, join, pump
from .roles.join_helpers import keying_kmf_config

# --- the protocol ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (b'{"op": "members", "conference": "demo"}', Members("demo")),
        (b'{"op":"kick","conference":"demo","who":"c","ban":true}', Kick("demo", "c", True)),
        (b'{"op": "roster_add", "conference": "d", "fingerprint": "f", "name": null}',
         RosterAdd("d", "f")),
        (b'{"op": "audit", "verify": true, "limit": 5}', Audit(True, 5)),
        (b'  {"op": "status"}  ', Status()),
    ],
)  # fmt: skip
def test_requests_parse_into_typed_requests(line: bytes, expected: object) -> None:
    assert parse_request(line) == expected


@pytest.mark.parametrize(
    ("line", "error"),
    [
        (b"not json", "not JSON"),
        (b"\xff\xfe", "not JSON"),
        (b"[1, 2]", "expected a JSON object"),
        (b'{"conference": "demo"}', 'no "op"'),
        (b'{"op": 7}', 'no "op"'),
        (b'{"op": "explode"}', "unknown op 'explode'"),
        (b'{"op": "members"}', "missing field 'conference'"),
        (b'{"op": "members", "conference": 3}', "'conference' must be a string"),
        (b'{"op": "kick", "conference": "d", "who": "c", "ban": 1}', "'ban' must be true or false"),
        (b'{"op": "audit", "limit": true}', "'limit' must be an integer"),
        (b'{"op": "audit", "limit": -1}', "'limit' must be >= 0"),
        (b'{"op": "status", "key": "x"}', "unknown field 'key'"),
    ],
)
def test_malformed_requests_are_one_line_errors(line: bytes, error: str) -> None:
    with pytest.raises(AdminError, match=error) as info:
        parse_request(line)
    assert "\n" not in str(info.value)


def test_a_role_serves_only_its_ops() -> None:
    with pytest.raises(AdminError, match="unknown op 'status' here: one of conferences"):
        parse_request(b'{"op": "status"}', ("conferences", "members"))


def test_lines_are_framed_and_bounded() -> None:
    buf = LineBuffer()
    assert buf.feed(b'{"op": "sta') == []
    assert buf.feed(b'tus"}\n\n{"op"') == [b'{"op": "status"}']
    assert buf.feed(b': "links"}\n') == [b'{"op": "links"}']
    assert buf.feed(b"x" * MAX_LINE) == []  # exactly the bound: still waiting for its newline
    with pytest.raises(LineTooLong, match="longer than 65536 bytes"):
        buf.feed(b"x")
    with pytest.raises(LineTooLong):
        LineBuffer().feed(b"y" * (MAX_LINE + 1) + b"\n")


def test_answers_and_requests_are_single_json_lines() -> None:
    assert request_line("kick", conference="demo", who="c", ban=False, name=None) == (
        b'{"op":"kick","conference":"demo","who":"c","ban":false}\n'
    )
    assert parse_answer(ok_line(spi=7)) == {"ok": True, "spi": 7}
    bad = parse_answer(error_line("bad\nthing"))
    assert bad["ok"] is False and "\n" not in bad["error"] and "thing" in bad["error"]
    for junk in (b"nope", b"[]", b'{"spi": 1}'):
        with pytest.raises(AdminError, match="malformed answer"):
            parse_answer(junk)


def test_human_tables() -> None:
    lines = render("conferences", {"conferences": [
        {"id": "demo", "members": 2, "roster": 3, "spi": 7, "cipher": 2, "rekey_pending": False},
    ]})  # fmt: skip
    assert lines[0].split() == ["id", "members", "roster", "spi", "cipher", "rekey_pending"]
    assert lines[1].split() == ["demo", "2", "3", "7", "2", "no"]
    assert render("links", {"links": []}) == ["no links"]
    kick = render("kick", {"conference": "demo", "kicked": [], "banned": True, "spi": None})
    assert kick[-1] == "kicked 0 from demo; banned: yes; new spi: -"


# --- the socket path ---------------------------------------------------------------------------


def test_socket_path_checks(tmp_path: Path) -> None:
    tmp_path.chmod(0o700)
    path = tmp_path / "kmf.sock"
    assert check_socket_path(path) is False
    path.write_text("")
    with pytest.raises(AdminError, match="exists and is not a socket"):
        check_socket_path(path)
    path.unlink()
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(path))
        assert check_socket_path(path) is True  # a socket file: the caller checks if stale
    with pytest.raises(AdminError, match=r"folder .*missing"):
        check_socket_path(tmp_path / "missing" / "kmf.sock")
    with pytest.raises(AdminError, match="path too long"):
        check_socket_path(tmp_path / ("x" * 120))
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(AdminError, match=r"others can write to its folder .* 0777"):
        check_socket_path(shared / "kmf.sock")


def test_a_stale_socket_is_replaced_and_a_live_one_refused(tmp_path: Path) -> None:
    from perc.roles.admin import prepare_socket_path

    tmp_path.chmod(0o700)
    path = tmp_path / "a.sock"
    live = socket.socket(socket.AF_UNIX)
    live.bind(str(path))
    live.listen(1)
    with pytest.raises(AdminError, match="another process listens on it"):
        prepare_socket_path(path)
    live.close()  # the file stays: stale
    assert path.exists()
    prepare_socket_path(path)
    assert not path.exists()


# --- the KMF engine's operations ----------------------------------------------------------------


@pytest.fixture(scope="module")
def who() -> SimpleNamespace:
    return SimpleNamespace(
        kmf=identity.generate("kmf"),
        mdd=identity.generate("mdd"),
        members=[identity.generate(n) for n in ("alice", "bob", "carol")],
        dave=identity.generate("dave"),
    )


def config(who: SimpleNamespace) -> KmfConfig:
    cfg = keying_kmf_config(who.kmf, [who.mdd], {"demo": who.members}, dtls_cookies=False)
    return attrs.evolve(
        cfg, conferences=tuple(attrs.evolve(c, rekey_window=5.0) for c in cfg.conferences)
    )


def deliver(mem: MemoryKmf, tunnel: FakeTunnel, joined: list[tuple[DtlsConnection, uuid.UUID]]
            ) -> list[list[dtls.Event]]:  # fmt: skip
    """Carry what the KMF sent to each endpoint (and their answers); each one's events."""
    out = []
    for ep, aid in joined:
        pump(mem, ep, aid, tunnel)
        out.append(endpoint_events(ep))
    return out


def test_kick_closes_tells_the_mdd_and_rekeys_the_others_at_once(who: SimpleNamespace) -> None:
    mem = MemoryKmf(config(who), persistent=True)
    mem.engine.spis_reserved("demo", 1 << 40, 0.0)
    tunnel = mem.tunnel(who.mdd.fingerprint)
    joined = [join(mem, m, tunnel) for m in who.members]
    mem.advance(20.0)
    deliver(mem, tunnel, joined)
    carol_aid = joined[2][1]
    mem.rekey("demo")  # opens a 5 s window: a leave now would wait for its end; a kick does not
    deliver(mem, tunnel, joined)
    mem.engine.persistence_requests()
    mem.events.clear()

    mem.now += 0.1
    answer = mem.engine.admin_answer(Kick("demo", "carol", ban=True), mem.now)
    mem.route()
    assert answer["banned"] is True and answer["persisted"] is True
    assert [k["name"] for k in answer["kicked"]] == ["carol"]
    alice, bob, carol = deliver(mem, tunnel, joined)
    closed = [e for e in carol if isinstance(e, dtls.ConnectionClosed)]
    assert closed[0].alert == AlertDescription.close_notify and closed[0].sent_by_peer
    assert not [e for e in carol if isinstance(e, dtls.EktKeyReceived)]  # no new key for her
    assert tunnel.disconnects == [carol_aid]  # after the close_notify (D3)
    (kicked,) = mem.of(Kicked)
    assert isinstance(kicked, Kicked) and kicked.name == "carol" and kicked.banned
    rekeyed = [e for e in mem.of(Rekeyed) if isinstance(e, Rekeyed)]
    assert [(e.reason, e.members, e.spi) for e in rekeyed] == [("leave+kick", 2, answer["spi"])]
    for events in (alice, bob):
        assert [e.spi for e in events if isinstance(e, dtls.EktKeyReceived)] == [answer["spi"]]
    conf = mem.engine.state.conferences["demo"]
    assert conf.current is not None and conf.current.spi == answer["spi"]
    assert who.members[2].fingerprint not in conf.participants
    requests = mem.engine.persistence_requests()
    assert RosterEdit("demo", who.members[2].fingerprint, False) in requests
    audit = [r.event for r in requests if isinstance(r, AuditRecord)]
    assert audit == ["kick", "leave", "roster_remove", "rekey"]
    assert conf.current.key.hex() not in json.dumps(answer)

    # Banned: the same identity is refused now.
    again, _ = join(mem, who.members[2], tunnel)
    refused = [e for e in endpoint_events(again) if isinstance(e, dtls.ConnectionClosed)]
    assert refused[0].alert == AlertDescription.access_denied


def test_admin_errors_and_roster_edits(who: SimpleNamespace) -> None:
    mem = MemoryKmf(config(who))
    tunnel = mem.tunnel(who.mdd.fingerprint)
    with pytest.raises(AdminError, match="unknown conference 'nope': demo"):
        mem.engine.admin_answer(Members("nope"), 0.0)
    with pytest.raises(AdminError, match="no member named 'carol'"):
        mem.engine.admin_answer(Kick("demo", "carol"), 0.0)
    with pytest.raises(AdminError, match="malformed fingerprint"):
        mem.engine.admin_answer(RosterAdd("demo", "sha-256 00"), 0.0)
    with pytest.raises(AdminError, match="not served by the KMF"):
        mem.engine.admin_answer(Status(), 0.0)

    dave, _ = join(mem, who.dave, tunnel)
    assert any(
        isinstance(e, dtls.ConnectionClosed) and e.alert == AlertDescription.access_denied
        for e in endpoint_events(dave)
    )
    fp = who.dave.fingerprint.lower()  # any case: canonicalised
    answer = mem.engine.admin_answer(RosterAdd("demo", fp, "dave"), 0.0)
    assert answer["fingerprint"] == who.dave.fingerprint and answer["persisted"] is False
    mem.route()
    assert mem.of(RosterChanged) == [RosterChanged("demo", who.dave.fingerprint, True, "dave")]
    dave, aid = join(mem, who.dave, tunnel)
    assert any(isinstance(e, dtls.EktKeyReceived) for e in endpoint_events(dave))
    members = mem.engine.admin_answer(Members("demo"), 1.0)["members"]
    assert [(m["name"], m["association"]) for m in members] == [("dave", str(aid))]


def test_stored_roster_changes_apply_over_the_configuration(who: SimpleNamespace) -> None:
    carol, dave = who.members[2].fingerprint, who.dave.fingerprint
    mem = MemoryKmf(config(who), roster_changes=[("demo", carol, False), ("demo", dave, True),
                                                 ("gone", dave, True)])  # fmt: skip
    conf = mem.engine.state.conferences["demo"]
    assert carol not in conf.participants and dave in conf.participants
    assert mem.engine.state.admit(carol, None).conference is None
    assert mem.engine.state.admit(dave, None).conference is conf


def test_no_socket_in_a_folder_others_can_write_even_with_the_sticky_bit(tmp_path: Path) -> None:
    folder = tmp_path / "t"
    folder.mkdir()
    os.chmod(folder, 0o1777)
    with pytest.raises(AdminError, match="others can write"):
        check_socket_path(folder / "s")


def test_admin_socket_keys_are_relative_to_the_config_file(tmp_path: Path) -> None:
    from perc.config import build_kmf_config, build_mdd_config

    kmf, mdd = identity.generate("kmf"), identity.generate("mdd")
    identity.write(kmf, tmp_path, "kmf")
    identity.write(mdd, tmp_path, "mdd")
    cfg = build_kmf_config(
        {"kmf": {"listen": "127.0.0.1:0", "cert": "kmf.crt", "key": "kmf.key",
                 "trusted_mdds": [mdd.fingerprint], "admin_socket": "run/kmf.sock"},
         "conference": [{"id": "demo", "participants": []}]},
        base=tmp_path,
    )  # fmt: skip
    assert cfg.kmf.admin_socket == tmp_path / "run" / "kmf.sock"
    mcfg = build_mdd_config(
        {"mdd": {"cert": "mdd.crt", "key": "mdd.key", "admin_socket": "/run/perc/mdd.sock"},
         "conference": [{"id": "demo", "listen": "127.0.0.1:0", "kmf": "127.0.0.1:4444",
                         "kmf_fingerprint": kmf.fingerprint}]},
        base=tmp_path,
    )  # fmt: skip
    assert mcfg.mdd.admin_socket == Path("/run/perc/mdd.sock")
    unset = build_mdd_config(
        {"mdd": {"cert": "mdd.crt", "key": "mdd.key"},
         "conference": [{"id": "demo", "listen": "127.0.0.1:0", "kmf": "127.0.0.1:4444",
                         "kmf_fingerprint": kmf.fingerprint}]},
        base=tmp_path,
    )  # fmt: skip
    assert unset.mdd.admin_socket is None
