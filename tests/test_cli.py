"""The click CLI: help for every command, entry points, argument errors, role start-up wiring."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

import perc.cli
from perc import config, identity, logsetup
from perc.cli import main

REPO = Path(__file__).resolve().parent.parent
FP_RE = re.compile(r"^sha-256 ([0-9A-F]{2}:){31}[0-9A-F]{2}$")


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["identity"],
        ["identity", "new"],
        ["identity", "show"],
        ["kmf"],
        ["mdd"],
        ["endpoint"],
        ["demo"],
    ],
    ids=lambda a: " ".join(a) or "perc",
)
def test_help_for_every_command(args: list[str]) -> None:
    result = CliRunner().invoke(main, [*args, "--help"])
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("Usage: ")
    if args in (["kmf"], ["mdd"], ["endpoint"], ["demo"], ["identity", "new"]):
        assert "--log-level" in result.stdout


def test_group_help_lists_the_commands() -> None:
    text = CliRunner().invoke(main, ["--help"]).stdout
    for name in ("identity", "kmf", "mdd", "endpoint", "demo"):
        assert re.search(rf"^\s+{name}\s", text, re.MULTILINE), name


def test_mdd_help_takes_defaults_from_the_config_schema() -> None:
    text = " ".join(CliRunner().invoke(main, ["mdd", "--help"]).stdout.split())
    assert "EndpointDisconnect" in text  # the idle_timeout doc from perc.config
    assert "[default: 10.0]" in text


def test_version() -> None:
    result = CliRunner().invoke(main, ["--version"])
    assert result.exit_code == 0
    assert result.stdout == f"perc, version {perc.__version__}\n"


# --- the three entry points, as real processes --------------------------------------------------

ENTRY_POINTS = {
    "python -m perc": [sys.executable, "-m", "perc"],
    "python perc.py": [sys.executable, str(REPO / "perc.py")],
    "perc script": [str(Path(sys.executable).parent / "perc")],
}


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_identity_commands_in_a_subprocess(entry: str, tmp_path: Path) -> None:
    cmd = ENTRY_POINTS[entry]
    made = subprocess.run(
        [*cmd, "identity", "new", "mdd", "--dir", str(tmp_path)],
        capture_output=True,
        text=True,
        check=False,
        cwd=tmp_path,
        timeout=60,
    )
    assert made.returncode == 0, made.stderr
    fp = made.stdout.strip()
    assert FP_RE.match(fp)
    shown = subprocess.run(
        [*cmd, "identity", "show", "mdd.crt"],
        capture_output=True,
        text=True,
        check=False,
        cwd=tmp_path,
        timeout=60,
    )
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.strip() == fp
    assert identity.load_certificate(tmp_path / "mdd.crt") is not None


def test_identity_does_not_import_trio(tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "from perc.cli import main\n"
        f"main(['identity', 'new', 'x', '--dir', {str(tmp_path)!r}], standalone_mode=False)\n"
        "sys.stdout.flush()\n"
        "assert 'trio' not in sys.modules, 'trio imported'\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=60
    )
    assert done.returncode == 0, done.stderr


def test_bad_config_in_a_real_process(tmp_path: Path) -> None:
    (tmp_path / "kmf.toml").write_text('[kmf]\nlisten = "127.0.0.1:4444"\n')
    done = subprocess.run(
        [sys.executable, "-m", "perc", "kmf", "--config", "kmf.toml"],
        capture_output=True,
        text=True,
        check=False,
        cwd=tmp_path,
        timeout=60,
    )
    assert done.returncode == 2
    assert done.stderr == "perc: error: kmf.toml: kmf.cert: required key missing\n"
    assert done.stdout == ""


# --- argument errors and role wiring (no role is started) --------------------------------------


@pytest.fixture
def started(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Any, Any]]:
    calls: list[tuple[Any, Any]] = []

    def run_role(serve: Any, cfg: Any, what: str = "") -> None:
        calls.append((serve, cfg))

    monkeypatch.setattr(perc.cli, "_run_role", run_role)
    return calls


@pytest.fixture(scope="module")
def idents(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    d = tmp_path_factory.mktemp("cli-ids")
    out: dict[str, Any] = {"dir": d}
    for name in ("kmf", "mdd"):
        ident = identity.generate(name)
        identity.write(ident, d, name)
        out[name] = ident.fingerprint
    (d / "kmf.toml").write_text(
        '[kmf]\nlisten = "127.0.0.1:0"\ncert = "kmf.crt"\nkey = "kmf.key"\n'
        f'trusted_mdds = ["{out["mdd"]}"]\n[[conference]]\nid = "demo"\nparticipants = []\n'
    )
    (d / "mdd.toml").write_text(
        '[mdd]\ncert = "mdd.crt"\nkey = "mdd.key"\n[[conference]]\nid = "demo"\n'
        f'listen = "127.0.0.1:0"\nkmf = "127.0.0.1:4444"\nkmf_fingerprint = "{out["kmf"]}"\n'
    )
    return out


def test_kmf_with_good_config_starts_the_role(
    idents: dict[str, Any], started: list[tuple[Any, Any]]
) -> None:
    result = CliRunner().invoke(main, ["kmf", "--config", str(idents["dir"] / "kmf.toml")])
    assert result.exit_code == 0, result.output
    ((serve, cfg),) = started
    from perc.roles import kmf

    assert serve is kmf.serve
    assert isinstance(cfg, config.KmfConfig)
    assert cfg.identity.fingerprint == idents["kmf"]


def test_mdd_config_and_quick_form_start_the_role(
    idents: dict[str, Any], started: list[tuple[Any, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    runner = CliRunner()
    result = runner.invoke(main, ["mdd", "--config", str(idents["dir"] / "mdd.toml")])
    assert result.exit_code == 0, result.output
    monkeypatch.chdir(idents["dir"])
    quick = [
        "mdd",
        "--kmf", "127.0.0.1:4444",
        "--kmf-fingerprint", idents["kmf"].lower(),
        "--listen", "127.0.0.1:0",
        "--cert", "mdd.crt",
        "--key", "mdd.key",
        "--conference", "room",
        "--idle-timeout", "2.5",
    ]  # fmt: skip
    result = runner.invoke(main, quick)
    assert result.exit_code == 0, result.output
    (_, from_file), (serve, from_flags) = started
    from perc.roles import mdd

    assert serve.func is mdd.serve
    assert serve.keywords == {"freeze_heap": True}  # a process role freezes its start-up heap
    assert from_file.conferences[0].id == "demo"
    assert from_flags.conferences[0].id == "room"
    assert from_flags.conferences[0].kmf_fingerprint == idents["kmf"]
    assert from_flags.mdd.idle_timeout == 2.5
    assert from_flags.identity.fingerprint == idents["mdd"]


def _quick(kmf: str, fp: str) -> list[str]:
    return [
        "mdd", "--kmf", kmf, "--kmf-fingerprint", fp, "--listen", "h:2",
        "--cert", "mdd.crt", "--key", "mdd.key",
    ]  # fmt: skip


COMBINED = "--config cannot be combined with the quick form"
FP_HINT = ": expected 'sha-256 ' and 32 hex pairs joined by ':'"
HOST_PORT_HINT = ": expected HOST:PORT with PORT 0-65535"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["mdd"], "give --config FILE, or --kmf, --kmf-fingerprint, --listen, --cert and --key"),
        (
            ["mdd", "--kmf", "h:1"],
            "the quick form also needs --kmf-fingerprint, --listen, --cert, --key",
        ),
        (["mdd", "--config", "mdd.toml", "--kmf", "h:1"], f"{COMBINED} (--kmf)"),
        (["mdd", "--config", "mdd.toml", "--idle-timeout", "1"], f"{COMBINED} (--idle-timeout)"),
        (
            _quick("h:1", "sha-256 AB"),
            "--kmf-fingerprint: malformed fingerprint 'sha-256 AB'" + FP_HINT,
        ),
        (_quick("h", "sha-256 AB"), "--kmf: bad host:port 'h'" + HOST_PORT_HINT),
        (
            ["kmf", "--config", "missing.toml"],
            "cannot read config file missing.toml: No such file or directory",
        ),
        (
            ["mdd", "--config", "kmf.toml"],
            "kmf.toml: mdd: required key missing (this is a KMF config: it has [kmf])",
        ),
        (
            ["kmf", "--config", "mdd.toml"],
            "mdd.toml: kmf: required key missing (this is an MDD config: it has [mdd])",
        ),
    ],
)
def test_argument_and_config_errors_exit_2_starting_nothing(
    idents: dict[str, Any],
    started: list[tuple[Any, Any]],
    monkeypatch: pytest.MonkeyPatch,
    args: list[str],
    message: str,
) -> None:
    monkeypatch.chdir(idents["dir"])
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2
    assert result.stderr == f"perc: error: {message}\n"
    assert result.stdout == ""
    assert started == []


def test_unknown_log_level_is_a_usage_error() -> None:
    result = CliRunner().invoke(main, ["--log-level", "loud", "kmf", "--help"])
    assert result.exit_code == 2


def test_log_level_before_or_after_the_subcommand(
    idents: dict[str, Any], started: list[tuple[Any, Any]]
) -> None:
    cfg = str(idents["dir"] / "kmf.toml")
    runner = CliRunner()
    try:
        assert runner.invoke(main, ["--log-level", "debug", "kmf", "--config", cfg]).exit_code == 0
        assert logging.getLogger().level == logging.DEBUG
        assert runner.invoke(main, ["kmf", "--config", cfg, "--log-level", "ERROR"]).exit_code == 0
        assert logging.getLogger().level == logging.ERROR
        assert runner.invoke(main, ["kmf", "--config", cfg]).exit_code == 0
        assert logging.getLogger().level == logging.INFO
    finally:
        logsetup.setup("warning")
    assert len(started) == 3


def test_role_failure_is_one_line_and_exit_1(idents: dict[str, Any]) -> None:
    async def serve(cfg: object) -> None:
        raise OSError(98, "Address already in use")

    cfg = config.load_kmf_config(idents["dir"] / "kmf.toml")
    with pytest.raises(perc.cli.RuntimeFailure) as e:
        perc.cli._run_role(serve, cfg, "KMF on 127.0.0.1:1")
    assert e.value.exit_code == 1
    assert e.value.message == "KMF on 127.0.0.1:1: Address already in use"


# --- logging ------------------------------------------------------------------------------------


def test_log_lines_are_single_lines() -> None:
    stream = io.StringIO()
    logsetup.setup("debug", stream)
    try:
        log = logging.getLogger("perc.test")
        log.info("tunnel up %s", logsetup.kv(conference="demo", association=None, peer="h:1"))
        try:
            raise ValueError("two\nlines")
        except ValueError:
            log.exception("failed")
    finally:
        logsetup.setup("warning")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2
    assert re.match(
        r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z INFO perc.test: tunnel up conference=demo "
        r"peer=h:1$",
        lines[0],
    )
    assert " ERROR perc.test: failed | Traceback" in lines[1]
    assert "ValueError: two | lines" in lines[1]
    with pytest.raises(ValueError, match="log level"):
        logsetup.setup("loud")
    assert os.environ is not None


# --- perc endpoint ------------------------------------------------------------------------------


def test_endpoint_help_lists_every_exit_code() -> None:
    from perc.endpoint import ExitCode

    text = CliRunner().invoke(main, ["endpoint", "--help"]).stdout
    listed = dict(re.findall(r"^\s+(\d+)\s+(\S.*)$", text.split("Exit status:")[1], re.MULTILINE))
    assert sorted(int(c) for c in listed) == sorted(int(c) for c in ExitCode)
    assert "access_denied" in listed[str(int(ExitCode.REFUSED))]
    assert "--join-timeout" in listed[str(int(ExitCode.TIMEOUT))]
    assert "perc admin kick" in listed[str(int(ExitCode.REMOVED))]
    assert "[default: 10.0]" in " ".join(text.split())


@pytest.fixture(scope="module")
def endpoint_files(idents: dict[str, Any]) -> dict[str, Any]:
    d = idents["dir"]
    alice = identity.generate("alice")
    identity.write(alice, d, "alice")
    return {"dir": d, "alice": alice.fingerprint, "kmf": idents["kmf"]}


def _endpoint_args(kmf_fp: str, *extra: str) -> list[str]:
    return [
        "endpoint", "--mdd", "127.0.0.1:5004", "--cert", "alice.crt", "--key", "alice.key",
        "--kmf-fingerprint", kmf_fp, *extra,
    ]  # fmt: skip


def test_endpoint_arguments_reach_the_role(
    endpoint_files: dict[str, Any], started: list[tuple[Any, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(endpoint_files["dir"])
    args = _endpoint_args(
        endpoint_files["kmf"].lower(),
        "--tls-id", "A" * 20, "--kmf-tls-id", "b/+-_" * 4, "--join-timeout", "2.5",
        "--duration", "7", "--keepalive", "0",
    )  # fmt: skip
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    ((_, (run, duration, keylog, keepalive)),) = started
    from perc.media.sources import VideoSettings
    from perc.roles import endpoint

    assert isinstance(run, endpoint.MediaRun)
    settings = run.settings
    assert run.options == endpoint.MediaOptions(video=VideoSettings())  # audio, expect 0
    assert settings.mdd == ("127.0.0.1", 5004)
    assert settings.kmf_fingerprint == endpoint_files["kmf"]  # canonical (upper case)
    assert settings.identity.fingerprint == endpoint_files["alice"]
    assert (settings.tls_id, settings.kmf_tls_id) == ("A" * 20, "b/+-_" * 4)
    assert settings.name == "alice"
    assert settings.join_timeout == 2.5
    assert duration == 7.0
    assert keylog is None
    assert keepalive is None  # 0 turns it off


def test_endpoint_media_options_reach_the_role(
    endpoint_files: dict[str, Any],
    started: list[tuple[Any, Any]],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    from perc.media.sources import VideoSettings
    from perc.roles import endpoint

    monkeypatch.chdir(endpoint_files["dir"])
    report = tmp_path / "alice.json"
    args = _endpoint_args(
        endpoint_files["kmf"], "--media", "both", "--expect-peers", "2", "--report",
        str(report), "--video-fps", "15", "--video-bitrate", "200000",
    )  # fmt: skip
    result = CliRunner().invoke(main, args)
    # The stand-in role ran nothing, so no peer was verified: exit 8, one line, final report.
    assert result.exit_code == endpoint.ExitCode.PEERS == 8, result.output
    assert result.stderr == (
        "perc: error: media verified end to end from 0 peer(s) (none), fewer than "
        "--expect-peers 2\n"
    )
    ((_, (run, *_)),) = started
    assert run.options == endpoint.MediaOptions(
        media="both",
        expect_peers=2,
        report=report,
        video=VideoSettings(fps=15.0, bitrate=200_000),
    )
    data = json.loads(report.read_text())
    assert data["name"] == "alice" and data["state"] == "failed" and data["exit_status"] == 8
    assert data["peers"] == {} and data["sent"] == 0
    assert [p.name for p in tmp_path.iterdir()] == ["alice.json"]  # no temporary file left


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--video-fps", "0"], "--video-fps/--video-bitrate: video frame rate 0.0 out of range"),
        (
            ["--report", "no-such-dir/r.json"],
            "--report: folder 'no-such-dir' does not exist",
        ),
        (["--name", "x" * 65], f"--name: '{'x' * 65}': sender name must be 1..64 bytes of UTF-8"),
        (["--mdd", "nowhere"], "--mdd: bad host:port 'nowhere'" + HOST_PORT_HINT),
        (["--mdd", "127.0.0.1:0"], "--mdd: port 0 in '127.0.0.1:0' is not an address to send to"),
        (
            ["--kmf-fingerprint", "sha-256 AB"],
            "--kmf-fingerprint: malformed fingerprint 'sha-256 AB'" + FP_HINT,
        ),
        (
            ["--tls-id", "short"],
            "--tls-id: bad tls-id 'short': 20 to 255 characters of A-Z a-z 0-9 + / - _ "
            "(RFC 8842 §4)",
        ),
        (
            ["--kmf-tls-id", "x" * 19],
            f"--kmf-tls-id: bad tls-id '{'x' * 19}': 20 to 255 characters of A-Z a-z 0-9 + / - _ "
            "(RFC 8842 §4)",
        ),
        (
            ["--cert", "missing.crt"],
            "cannot read certificate missing.crt: No such file or directory",
        ),
        (["--keepalive", "-1"], "--keepalive: must be 0 (off) or a positive number of seconds"),
        (["--name", "a b"], "--name: 'a b' must be one printable word (no spaces)"),
    ],
)
def test_endpoint_argument_errors_exit_2(
    endpoint_files: dict[str, Any],
    started: list[tuple[Any, Any]],
    monkeypatch: pytest.MonkeyPatch,
    extra: list[str],
    message: str,
) -> None:
    monkeypatch.chdir(endpoint_files["dir"])
    result = CliRunner().invoke(main, _endpoint_args(endpoint_files["kmf"], *extra))
    assert result.exit_code == 2, result.output
    assert result.stderr == f"perc: error: {message}\n"
    assert started == []


@pytest.mark.parametrize("option", ["--join-timeout", "--duration"])
def test_endpoint_times_must_be_positive(
    endpoint_files: dict[str, Any], started: list[tuple[Any, Any]], option: str
) -> None:
    result = CliRunner().invoke(main, [*_endpoint_args(endpoint_files["kmf"]), option, "0"])
    assert result.exit_code == 2
    assert "positive number of seconds" in result.stderr
    assert started == []


def test_endpoint_join_errors_keep_their_exit_status(
    endpoint_files: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    from perc.endpoint import ExitCode, JoinRefused

    def refuse(serve: Any, cfg: Any, what: str = "") -> None:
        raise JoinRefused("join refused by the KMF: fatal alert access_denied", 49)

    monkeypatch.setattr(perc.cli, "_run_role", refuse)
    monkeypatch.chdir(endpoint_files["dir"])
    result = CliRunner().invoke(main, _endpoint_args(endpoint_files["kmf"]))
    assert result.exit_code == ExitCode.REFUSED == 3
    assert result.stderr.endswith(
        "perc: error: join refused by the KMF: fatal alert access_denied\n"
    )


def test_endpoint_timeout_in_a_real_process(endpoint_files: dict[str, Any]) -> None:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind(("127.0.0.1", 0))
        port = silent.getsockname()[1]
        args = _endpoint_args(endpoint_files["kmf"], "--join-timeout", "0.3")
        args[2] = f"127.0.0.1:{port}"
        done = subprocess.run(
            [sys.executable, "-m", "perc", *args],
            capture_output=True,
            text=True,
            check=False,
            cwd=endpoint_files["dir"],
            timeout=60,
        )
    assert done.returncode == 5, done.stderr
    last = done.stderr.splitlines()[-1]
    assert last.startswith(
        f"perc: error: join timed out after 0.3 s through the MDD at 127.0.0.1:{port}"
    )
    assert "Traceback" not in done.stderr


def test_endpoint_unopenable_keylog_is_one_line_exit_1(
    endpoint_files: dict[str, Any], started: list[tuple[Any, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(endpoint_files["dir"])
    monkeypatch.setenv("SSLKEYLOGFILE", str(endpoint_files["dir"] / "no-such-dir" / "keys.log"))
    result = CliRunner().invoke(main, _endpoint_args(endpoint_files["kmf"]))
    assert result.exit_code == 1
    assert result.stderr.startswith("perc: error: cannot open key log file ")
    assert started == []


# --- perc demo ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ([], {"keep": None}),
        (
            ["--participants", "4", "--duration", "6", "--media", "audio", "--keep"],
            {"participants": 4, "duration": 6.0, "media": "audio", "keep": True},
        ),
    ],
)
def test_demo_options_reach_the_demo(
    monkeypatch: pytest.MonkeyPatch, args: list[str], expected: dict[str, Any]
) -> None:
    from perc.roles import demo

    calls: list[dict[str, Any]] = []

    def fake_main(**kwargs: Any) -> int:
        calls.append(kwargs)
        return 7

    monkeypatch.setattr(demo, "main", fake_main)
    result = CliRunner().invoke(main, ["demo", *args])
    assert result.exit_code == 7  # demo.main's status is the process's
    assert calls == [expected]  # only what was given: the demo owns its defaults


def test_demo_bad_media_is_a_usage_error() -> None:
    result = CliRunner().invoke(main, ["demo", "--media", "none"])
    assert result.exit_code == 2
