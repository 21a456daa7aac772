"""Configuration loading: good files of both kinds, relative paths, every bad-config class."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from perc import config, identity
from perc.cli import main
from perc.config import ConfigError, HostPort


@pytest.fixture(scope="module")
def ids(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    d = tmp_path_factory.mktemp("ids")
    out: dict[str, Any] = {"dir": d}
    for name in ("kmf", "mdd", "alice"):
        ident = identity.generate(name)
        identity.write(ident, d, name)
        out[name] = ident.fingerprint
    return out


def kmf_toml(ids: dict[str, Any]) -> str:
    return f"""
[kmf]
listen = "127.0.0.1:4444"
cert = "kmf.crt"
key = "kmf.key"
trusted_mdds = ["{ids["mdd"].lower()}"]

[[conference]]
id = "demo"
participants = ["{ids["alice"]}"]
"""


def mdd_toml(ids: dict[str, Any]) -> str:
    return f"""
[mdd]
cert = "mdd.crt"
key = "mdd.key"

[[conference]]
id = "demo"
listen = "127.0.0.1:5004"
kmf = "127.0.0.1:4444"
kmf_fingerprint = "{ids["kmf"]}"
"""


def test_good_kmf_config(ids: dict[str, Any]) -> None:
    path = ids["dir"] / "kmf.toml"
    path.write_text(kmf_toml(ids))
    cfg = config.load_kmf_config(path)
    assert cfg.kmf.listen == HostPort("127.0.0.1", 4444)
    assert cfg.kmf.cert == ids["dir"].resolve() / "kmf.crt"
    assert cfg.kmf.trusted_mdds == (ids["mdd"],)  # canonical upper case
    assert cfg.identity.fingerprint == ids["kmf"]
    (conf,) = cfg.conferences
    assert conf.id == "demo"
    assert conf.participants == (ids["alice"],)
    # Defaults come from the schema.
    assert cfg.kmf.dtls_cookies is True
    assert cfg.kmf.profiles == (0x0009, 0x000A)
    assert (conf.rekey_on_join, conf.rekey_on_leave, conf.rekey_window) == (True, True, 0.05)
    assert conf.ekt_ttl == 86400
    assert conf.tls_ids == {}
    assert cfg.conference("demo") is conf
    assert cfg.conference("other") is None


def test_kmf_optional_keys(ids: dict[str, Any]) -> None:
    alice = ids["alice"]
    text = kmf_toml(ids).replace(
        'listen = "127.0.0.1:4444"',
        'listen = "[::1]:0"\ndtls_cookies = false\nprofiles = [0x000A]\n'
        'tls_id = "KMF_tls-id+/0123456789"',
    ) + (
        f'tls_ids = {{ "{alice.lower()}" = "abcdefghijklmnopqrstuvwxyz" }}\n'
        "rekey_on_join = false\nrekey_window = 0\nekt_ttl = 60\n"
        '[[conference]]\nid = "second"\nparticipants = []\n'
    )
    path = ids["dir"] / "kmf-opt.toml"
    path.write_text(text)
    cfg = config.load_kmf_config(path)
    assert cfg.kmf.listen == HostPort("::1", 0)
    assert str(cfg.kmf.listen) == "[::1]:0"
    assert cfg.kmf.dtls_cookies is False
    assert cfg.kmf.profiles == (0x000A,)
    assert cfg.kmf.tls_id == "KMF_tls-id+/0123456789"
    demo, second = cfg.conferences
    assert demo.tls_ids == {alice: "abcdefghijklmnopqrstuvwxyz"}
    assert (demo.rekey_on_join, demo.rekey_window, demo.ekt_ttl) == (False, 0.0, 60)
    assert second.participants == ()


def test_good_mdd_config_with_relative_paths(
    ids: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # cert/key are relative to the config file's folder, not to the working directory.
    (tmp_path / "etc").mkdir()
    (tmp_path / "keys").mkdir()
    (tmp_path / "elsewhere").mkdir()
    for name in ("mdd.crt", "mdd.key"):
        (tmp_path / "keys" / name).write_bytes((ids["dir"] / name).read_bytes())
    text = mdd_toml(ids).replace('"mdd.', '"../keys/mdd.')
    (tmp_path / "etc" / "mdd.toml").write_text(text)
    monkeypatch.chdir(tmp_path / "elsewhere")
    cfg = config.load_mdd_config(Path("../etc/mdd.toml"))
    assert cfg.mdd.cert.resolve() == (tmp_path / "keys" / "mdd.crt").resolve()
    assert cfg.mdd.key.resolve() == (tmp_path / "keys" / "mdd.key").resolve()
    assert cfg.identity.fingerprint == ids["mdd"]
    (conf,) = cfg.conferences
    assert conf.listen == HostPort("127.0.0.1", 5004)
    assert conf.kmf == HostPort("127.0.0.1", 4444)
    assert conf.kmf_fingerprint == ids["kmf"]
    assert conf.last_n is None
    assert cfg.mdd.idle_timeout == 10.0
    assert (cfg.mdd.reconnect_min, cfg.mdd.reconnect_max) == (0.5, 30.0)
    assert cfg.mdd.handshake_timeout == 10.0
    assert conf.max_associations == 10000


def test_mdd_quick_form(ids: dict[str, Any]) -> None:
    cfg = config.mdd_quick_config(
        kmf="127.0.0.1:4444",
        kmf_fingerprint=ids["kmf"].lower(),
        listen="127.0.0.1:0",
        cert="mdd.crt",
        key="mdd.key",
        base=ids["dir"],
    )
    (conf,) = cfg.conferences
    assert conf.id == "demo"
    assert conf.kmf_fingerprint == ids["kmf"]
    assert cfg.identity.fingerprint == ids["mdd"]
    with pytest.raises(ConfigError) as e:
        config.mdd_quick_config(
            kmf="127.0.0.1:4444",
            kmf_fingerprint="sha-256 00",
            listen="127.0.0.1:0",
            cert="mdd.crt",
            key="mdd.key",
            base=ids["dir"],
        )
    assert str(e.value).startswith("--kmf-fingerprint: malformed fingerprint 'sha-256 00'")
    with pytest.raises(ConfigError, match=r"^--cert: cannot read certificate"):
        config.mdd_quick_config(
            kmf="127.0.0.1:4444",
            kmf_fingerprint=ids["kmf"],
            listen="127.0.0.1:0",
            cert="nope.crt",
            key="mdd.key",
            base=ids["dir"],
        )


def _set(*keys: Any, value: Any) -> Any:
    def mutate(d: dict[str, Any]) -> None:
        for k in keys[:-1]:
            d = d[k]
        d[keys[-1]] = value

    return mutate


def _drop(*keys: Any) -> Any:
    def mutate(d: dict[str, Any]) -> None:
        for k in keys[:-1]:
            d = d[k]
        del d[keys[-1]]

    return mutate


FP_HINT = ": expected 'sha-256 ' and 32 hex pairs joined by ':'"

MDD_BAD = [
    # missing keys
    (_drop("mdd", "cert"), "mdd.cert: required key missing"),
    (
        _drop("conference", 0, "kmf_fingerprint"),
        "conference[0].kmf_fingerprint: required key missing",
    ),
    (_drop("mdd"), "mdd: required key missing"),
    (_drop("conference"), "conference: at least one [[conference]] table is required"),
    # wrong types
    (_set("mdd", "idle_timeout", value="10"), "mdd.idle_timeout: expected a number, got string"),
    (_set("mdd", "idle_timeout", value=True), "mdd.idle_timeout: expected a number, got boolean"),
    (
        _set("conference", 0, "listen", value=5004),
        "conference[0].listen: expected a string 'host:port', got integer",
    ),
    (
        _set("conference", 0, "last_n", value=2.5),
        "conference[0].last_n: expected an integer, got float",
    ),
    (_set("mdd", value=[]), "mdd: expected a table, got array"),
    (_set("conference", value={}), "conference: expected an array, got table"),
    # bad values
    (_set("mdd", "idle_timeout", value=0), "mdd.idle_timeout: must be a positive number, got 0.0"),
    (_set("mdd", "reconnect_max", value=0.1), "mdd.reconnect_max: must be >= mdd.reconnect_min"),
    (_set("conference", 0, "last_n", value=0), "conference[0].last_n: must be >= 1, got 0"),
    (
        _set("conference", 0, "listen", value="localhost"),
        "conference[0].listen: bad host:port 'localhost': expected HOST:PORT with PORT 0-65535",
    ),
    (
        _set("conference", 0, "listen", value="h:70000"),
        "conference[0].listen: bad host:port 'h:70000': expected HOST:PORT with PORT 0-65535",
    ),
    (
        _set("conference", 0, "listen", value="::1:5"),
        "conference[0].listen: bad host:port '::1:5': write IPv6 addresses as [addr]:port",
    ),
    (
        _set("conference", 0, "kmf", value="127.0.0.1:0"),
        "conference[0].kmf: bad host:port '127.0.0.1:0': port 0",
    ),
    (
        _set("conference", 0, "kmf_fingerprint", value="sha-1 AB:CD"),
        "conference[0].kmf_fingerprint: malformed fingerprint 'sha-1 AB:CD'" + FP_HINT,
    ),
    (
        _set("mdd", "handshake_timeout", value=float("inf")),
        "mdd.handshake_timeout: must be a positive number, got inf",
    ),
    (
        _set("conference", 0, "max_associations", value=0),
        "conference[0].max_associations: must be >= 1, got 0",
    ),
    # unknown keys (typos)
    (_set("mdd", "idle_timout", value=3), "mdd.idle_timout: unknown key (a typo?)"),
    (
        _set("conference", 0, "kmf_fingerprints", value=[]),
        "conference[0].kmf_fingerprints: unknown key (a typo?)",
    ),
    (_set("kmf", value={}), "kmf: unknown key (a typo?)"),
    # identities
    (
        _set("mdd", "cert", value="missing.crt"),
        "mdd.cert: cannot read certificate {dir}/missing.crt: No such file or directory",
    ),
    (
        _set("mdd", "cert", value="mdd.key"),
        "mdd.cert: {dir}/mdd.key is not a PEM or DER X.509 certificate",
    ),
    (
        _set("mdd", "key", value="mdd.crt"),
        "mdd.key: {dir}/mdd.crt is not an unencrypted PEM private key",
    ),
    (
        _set("mdd", "key", value="kmf.key"),
        "mdd.key: {dir}/kmf.key does not belong to {dir}/mdd.crt",
    ),
]


def _duplicate_conference(d: dict[str, Any]) -> None:
    d["conference"].append(dict(d["conference"][0], listen="127.0.0.1:5006"))


def _duplicate_listen(d: dict[str, Any]) -> None:
    d["conference"].append(dict(d["conference"][0], id="other"))


MDD_BAD += [
    (_duplicate_conference, "conference[1].id: duplicate conference id 'demo'"),
    (
        _duplicate_listen,
        "conference[1].listen: 127.0.0.1:5004 is already the listen address of conference[0]",
    ),
]


@pytest.mark.parametrize(("mutate", "message"), MDD_BAD)
def test_bad_mdd_config(ids: dict[str, Any], tmp_path: Path, mutate: Any, message: str) -> None:
    data = tomllib.loads(mdd_toml(ids))
    mutate(data)
    with pytest.raises(ConfigError) as e:
        config.build_mdd_config(data, base=ids["dir"])
    text = str(e.value)
    assert "\n" not in text
    assert text == message.format(dir=ids["dir"])


KMF_BAD = [
    (_drop("kmf", "trusted_mdds"), "kmf.trusted_mdds: required key missing"),
    (_drop("conference", 0, "participants"), "conference[0].participants: required key missing"),
    (
        _set("kmf", "trusted_mdds", value="sha-256 AB"),
        "kmf.trusted_mdds: expected an array, got string",
    ),
    (
        _set("kmf", "trusted_mdds", value=["sha-256 AB"]),
        "kmf.trusted_mdds[0]: malformed fingerprint 'sha-256 AB'" + FP_HINT,
    ),
    (
        _set("kmf", "trusted_mdds", value=[7]),
        "kmf.trusted_mdds[0]: expected a fingerprint string 'sha-256 AB:...', got integer",
    ),
    (
        _set("kmf", "dtls_cookies", value="false"),
        "kmf.dtls_cookies: expected true or false, got string",
    ),
    (
        _set("kmf", "profiles", value=[7]),
        "kmf.profiles[0]: unsupported profile 0x0007: perc runs 0x0009 and 0x000A (D18)",
    ),
    (_set("kmf", "profiles", value=[]), "kmf.profiles: must list at least one profile"),
    (_set("kmf", "profiles", value=[9, 9]), "kmf.profiles: duplicate profile"),
    (
        _set("kmf", "tls_id", value="short"),
        "kmf.tls_id: must be 20 to 255 characters of A-Z a-z 0-9 + / - _ (RFC 8842 §4)",
    ),
    (
        _set("kmf", "listen", value="127.0.0.1"),
        "kmf.listen: bad host:port '127.0.0.1': expected HOST:PORT with PORT 0-65535",
    ),
    (_set("kmf", "lisen", value="127.0.0.1:1"), "kmf.lisen: unknown key (a typo?)"),
    (
        _set("conference", 0, "ekt_ttl", value=0),
        "conference[0].ekt_ttl: must be 1..16777215 seconds (uint24, RFC 8870 §5.2.2), got 0",
    ),
    (
        _set("conference", 0, "rekey_window", value=-1),
        "conference[0].rekey_window: must be a number >= 0, got -1.0",
    ),
    (
        _set("conference", 0, "tls_ids", value={"sha-256 AB": "x"}),
        "conference[0].tls_ids['sha-256 AB']: malformed fingerprint 'sha-256 AB'" + FP_HINT,
    ),
    (
        _set("kmf", "cert", value="nope/kmf.crt"),
        "kmf.cert: cannot read certificate {dir}/nope/kmf.crt: No such file or directory",
    ),
    (
        _set("kmf", "key", value="alice.key"),
        "kmf.key: {dir}/alice.key does not belong to {dir}/kmf.crt",
    ),
]


@pytest.mark.parametrize(("mutate", "message"), KMF_BAD)
def test_bad_kmf_config(ids: dict[str, Any], mutate: Any, message: str) -> None:
    data = tomllib.loads(kmf_toml(ids))
    mutate(data)
    with pytest.raises(ConfigError) as e:
        config.build_kmf_config(data, base=ids["dir"])
    assert str(e.value) == message.format(dir=ids["dir"])


def test_tls_ids_must_name_participants(ids: dict[str, Any]) -> None:
    data = tomllib.loads(kmf_toml(ids))
    data["conference"][0]["tls_ids"] = {ids["mdd"]: "abcdefghijklmnopqrstuvwxyz"}
    with pytest.raises(ConfigError) as e:
        config.build_kmf_config(data, base=ids["dir"])
    assert str(e.value) == (
        f"conference[0].tls_ids: {ids['mdd']} is not in this conference's participants"
    )


def test_file_errors_name_the_file(ids: dict[str, Any], tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        config.load_mdd_config(tmp_path / "absent.toml")
    assert (
        str(e.value) == f"cannot read config file {tmp_path}/absent.toml: No such file or directory"
    )
    bad = tmp_path / "bad.toml"
    bad.write_text("[mdd\n")
    with pytest.raises(ConfigError, match=r"bad.toml: not valid TOML: "):
        config.load_mdd_config(bad)
    typo = tmp_path / "typo.toml"
    typo.write_text(mdd_toml(ids).replace("[mdd]", "[mdd]\nidle_timout = 3"))
    with pytest.raises(ConfigError) as e:
        config.load_mdd_config(typo)
    assert str(e.value) == f"{typo}: mdd.idle_timout: unknown key (a typo?)"


def test_describe_reads_the_schema() -> None:
    settings = {s.key: s for s in config.describe(config.MddSettings)}
    assert settings["idle_timeout"].default == 10.0
    assert not settings["idle_timeout"].required
    assert settings["cert"].required
    assert settings["cert"].type == "path"
    assert "EndpointDisconnect" in settings["idle_timeout"].doc
    conf = {s.key: s for s in config.describe(config.MddConference)}
    assert conf["listen"].type == "host:port"
    assert conf["last_n"].type == "integer (optional)"
    kconf = {s.key: s for s in config.describe(config.KmfConference)}
    assert kconf["participants"].type == "array of fingerprint"
    assert kconf["tls_ids"].default == {}


# Each bad-config class through the CLI: one line on stderr, exit 2, nothing started.
CLI_BAD = [
    ("missing key", ('cert = "mdd.crt"\n', ""), "mdd.cert: required key missing"),
    (
        "wrong type",
        ('key = "mdd.key"\n', 'key = "mdd.key"\nidle_timeout = "soon"\n'),
        "mdd.idle_timeout: expected a number, got string",
    ),
    (
        "unreadable cert",
        ('"mdd.crt"', '"gone.crt"'),
        "mdd.cert: cannot read certificate {dir}/gone.crt: No such file or directory",
    ),
    (
        "malformed fingerprint",
        ('kmf_fingerprint = "sha-256 ', 'kmf_fingerprint = "sha-256 00:'),
        "conference[0].kmf_fingerprint: malformed fingerprint 'sha-256 00:{fp}'" + FP_HINT,
    ),
    (
        "bad host:port",
        ('kmf = "127.0.0.1:4444"', 'kmf = "127.0.0.1"'),
        "conference[0].kmf: bad host:port '127.0.0.1': expected HOST:PORT with PORT 0-65535",
    ),
    (
        "unknown key",
        ("[[conference]]\n", "[[conference]]\nlastn = 3\n"),
        "conference[0].lastn: unknown key (a typo?)",
    ),
    (
        "duplicate conference id",
        ('id = "demo"\n', 'id = "demo"\n'),
        "conference[1].id: duplicate conference id 'demo'",
    ),
]


@pytest.mark.parametrize(("what", "edit", "message"), CLI_BAD, ids=[c[0] for c in CLI_BAD])
def test_bad_config_through_the_cli(
    ids: dict[str, Any],
    monkeypatch: pytest.MonkeyPatch,
    what: str,
    edit: tuple[str, str],
    message: str,
) -> None:
    import perc.cli

    started: list[object] = []
    monkeypatch.setattr(perc.cli, "_run_role", lambda *a: started.append(a))
    text = mdd_toml(ids)
    if what == "duplicate conference id":
        text += text[text.index("[[conference]]") :].replace("5004", "5006")
    else:
        assert edit[0] in text
        text = text.replace(edit[0], edit[1], 1)
    path = ids["dir"] / f"bad-{what.replace(' ', '-')}.toml"
    path.write_text(text)
    result = CliRunner().invoke(main, ["mdd", "--config", str(path)])
    assert result.exit_code == 2
    expected = message.format(dir=ids["dir"], fp=ids["kmf"].removeprefix("sha-256 "))
    assert result.stderr == f"perc: error: {path}: {expected}\n"
    assert started == []


# Whatever a TOML file holds, loading fails only with a one-line ConfigError.
toml_scalars = st.one_of(
    st.booleans(),
    st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=True),
    st.text(max_size=10),
    st.sampled_from(["127.0.0.1:1", "[::1]:2", "mdd.crt", "mdd.key", "kmf.crt", "sha-256 AB"]),
)
KEYS = [
    "mdd", "kmf", "conference", "cert", "key", "listen", "kmf_fingerprint", "id",
    "participants", "trusted_mdds", "tls_ids", "idle_timeout", "last_n", "profiles",
]  # fmt: skip
keys = st.sampled_from(KEYS) | st.text(max_size=6)
toml_values = st.one_of(
    toml_scalars,
    st.lists(toml_scalars, max_size=3),
    st.dictionaries(keys, toml_scalars, max_size=3),
)
tables = st.dictionaries(keys, toml_values, max_size=5)
toml_docs = st.dictionaries(
    keys, st.one_of(toml_values, tables, st.lists(tables, max_size=2)), max_size=3
)


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix] if prefix else []
    if isinstance(node, dict):
        for k, v in node.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _paths(v, (*prefix, i))
    return out


def _only_config_error(build: Any, doc: dict[str, Any], base: Path) -> None:
    try:
        build(doc, base=base)
    except ConfigError as e:
        assert "\n" not in str(e)
        assert str(e)


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(doc=toml_docs)
def test_arbitrary_documents_raise_only_config_error(
    ids: dict[str, Any], doc: dict[str, Any]
) -> None:
    _only_config_error(config.build_mdd_config, doc, ids["dir"])
    _only_config_error(config.build_kmf_config, doc, ids["dir"])


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.data())
def test_mutated_good_documents_raise_only_config_error(
    ids: dict[str, Any], data: st.DataObject
) -> None:
    # One change anywhere in a good file of either kind: replaced, removed or added.
    for text, build in ((mdd_toml(ids), config.build_mdd_config),
                        (kmf_toml(ids), config.build_kmf_config)):  # fmt: skip
        doc = tomllib.loads(text)
        path = data.draw(st.sampled_from(_paths(doc)))
        parent = doc
        for k in path[:-1]:
            parent = parent[k]
        action = data.draw(st.sampled_from(["replace", "remove", "add"]))
        if action == "replace":
            parent[path[-1]] = data.draw(toml_values)
        elif action == "remove":
            del parent[path[-1]]
        elif isinstance(parent, dict):
            parent[data.draw(keys)] = data.draw(toml_values)
        _only_config_error(build, doc, ids["dir"])


# --- perc endpoint's settings -------------------------------------------------------------------


def test_endpoint_defaults_are_what_perc_endpoint_help_says() -> None:
    """One source: every EndpointConfig key is an option whose help shows the key's doc and,
    when it has one, its default."""
    command = main.commands["endpoint"]
    ctx = click.Context(command)
    options = {p.name: p for p in command.params}
    text = " ".join(CliRunner().invoke(main, ["endpoint", "--help"]).stdout.split())
    for setting in config.describe(config.EndpointConfig):
        option = options[setting.key]
        if not setting.required:
            # click holds no default of its own (click 8.3 says UNSET, earlier ones None)
            assert option.get_default(ctx) in (None, getattr(click.core, "UNSET", None))
        help_text = getattr(option, "help", "") or ""
        assert help_text.startswith(setting.doc[:1].upper() + setting.doc[1:])
        if setting.default is not None:
            assert f"[default: {setting.default}]" in help_text
            assert f"[default: {setting.default}]" in text
    assert set(options) - {"log_level", "log_format"} == {
        s.key for s in config.describe(config.EndpointConfig)
    }


def test_endpoint_config_takes_the_defaults(ids: dict[str, Any]) -> None:
    cfg = config.endpoint_config(
        mdd="127.0.0.1:5004", kmf_fingerprint=ids["kmf"], cert="a.crt", key="a.key"
    )
    assert cfg == config.EndpointConfig(
        mdd=HostPort("127.0.0.1", 5004),
        cert=Path("a.crt"),
        key=Path("a.key"),
        kmf_fingerprint=config.Fingerprint(ids["kmf"]),
    )
    assert (cfg.join_timeout, cfg.keepalive, cfg.media, cfg.expect_peers) == (
        10.0, 3.0, "audio", 0,
    )  # fmt: skip
    assert (cfg.video_fps, cfg.video_bitrate, cfg.duration, cfg.name) == (30.0, 500_000, None, None)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"mdd": "nowhere"}, "--mdd: bad host:port 'nowhere'"),
        ({"mdd": "h:0"}, "--mdd: port 0 in 'h:0' is not an address to send to"),
        ({"kmf_fingerprint": "md5 AB"}, "--kmf-fingerprint: "),
        ({"tls_id": "short"}, "--tls-id: bad tls-id 'short': 20 to 255 characters"),
        ({"kmf_tls_id": "x" * 256}, "--kmf-tls-id: bad tls-id"),
        ({"join_timeout": 0.0}, "--join-timeout: must be a positive number of seconds"),
        ({"duration": float("nan")}, "--duration: must be a positive number of seconds"),
        ({"keepalive": -1.0}, "--keepalive: must be 0 (off) or a positive number of seconds"),
        ({"name": "a b"}, "--name: 'a b' must be one printable word (no spaces)"),
        ({"name": ""}, "--name: '' must be one printable word"),
        ({"media": "smell"}, "--media: one of audio, video, both, none, not 'smell'"),
        ({"expect_peers": -1}, "--expect-peers: must be >= 0, got -1"),
        ({"colour": "red"}, "endpoint settings: "),
    ],
)
def test_endpoint_config_errors_name_the_option(
    ids: dict[str, Any], options: dict[str, Any], message: str
) -> None:
    given_options: dict[str, Any] = {
        "mdd": "127.0.0.1:5004",
        "kmf_fingerprint": ids["kmf"],
        "cert": "a.crt",
        "key": "a.key",
        **options,
    }
    with pytest.raises(ConfigError) as info:
        config.endpoint_config(**given_options)
    assert str(info.value).startswith(message)


def test_double_profiles_are_the_srtp_profiles_that_are_double() -> None:
    from perc.srtp.keys import SrtpProfile

    assert config.DOUBLE_PROFILES == (
        SrtpProfile.DOUBLE_AEAD_AES_128_GCM,
        SrtpProfile.DOUBLE_AEAD_AES_256_GCM,
    )
    assert config.default(config.KmfSettings, "profiles") == (0x0009, 0x000A)
