"""Identities: generation, files, fingerprints (D20), mismatched pairs, and the CLI commands."""

from __future__ import annotations

import hashlib
import re
import stat
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from perc import identity
from perc.cli import main
from perc.identity import IdentityError

FP_RE = re.compile(r"^sha-256 ([0-9A-F]{2}:){31}[0-9A-F]{2}$")


def test_generate_write_load_round_trip(tmp_path: Path) -> None:
    ident = identity.generate("alice")
    key_path, crt_path = identity.write(ident, tmp_path / "new", "alice")
    assert (key_path.name, crt_path.name) == ("alice.key", "alice.crt")
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    loaded = identity.load(crt_path, key_path)
    assert loaded.fingerprint == ident.fingerprint
    assert loaded.certificate_der == ident.certificate_der
    assert isinstance(loaded.private_key.curve, ec.SECP256R1)
    cn = loaded.certificate.subject.rfc4514_string()
    assert cn == "CN=alice"
    assert loaded.certificate.issuer == loaded.certificate.subject  # self-signed


def test_fingerprint_format_is_d20() -> None:
    ident = identity.generate("bob")
    fp = ident.fingerprint
    assert FP_RE.match(fp)
    digest = hashlib.sha256(ident.certificate_der).hexdigest().upper()
    assert fp == "sha-256 " + ":".join(digest[i : i + 2] for i in range(0, 64, 2))
    assert identity.parse_fingerprint(fp.lower()) == fp
    assert identity.parse_fingerprint("  " + fp + "\n") == fp
    assert identity.fingerprint_matches(fp, identity.parse_fingerprint(fp.lower()))
    assert not identity.fingerprint_matches(fp, identity.generate("x").fingerprint)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "sha-256",
        "sha-1 " + ":".join(["AB"] * 20),
        "sha-256 " + ":".join(["AB"] * 31),
        "sha-256 " + ":".join(["AB"] * 33),
        "sha-256 " + "AB" * 32,
        "sha-256 " + ":".join(["GZ"] * 32),
        "sha-256:" + ":".join(["AB"] * 32),
    ],
)
def test_malformed_fingerprints(text: str) -> None:
    with pytest.raises(IdentityError, match="malformed fingerprint"):
        identity.parse_fingerprint(text)


def test_mismatched_key_and_certificate(tmp_path: Path) -> None:
    identity.write(identity.generate("a"), tmp_path, "a")
    identity.write(identity.generate("b"), tmp_path, "b")
    with pytest.raises(IdentityError, match=r"a\.key does not belong to .*b\.crt"):
        identity.load(tmp_path / "b.crt", tmp_path / "a.key")


def test_wrong_curve_and_bad_files(tmp_path: Path) -> None:
    identity.write(identity.generate("a"), tmp_path, "a")
    p384 = ec.generate_private_key(ec.SECP384R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    (tmp_path / "p384.key").write_bytes(p384)
    with pytest.raises(IdentityError, match="not an ECDSA P-256 key"):
        identity.load(tmp_path / "a.crt", tmp_path / "p384.key")
    with pytest.raises(IdentityError, match="not an unencrypted PEM private key"):
        identity.load(tmp_path / "a.crt", tmp_path / "a.crt")
    with pytest.raises(IdentityError, match=r"not a PEM or DER X\.509 certificate"):
        identity.load_certificate(tmp_path / "a.key")
    with pytest.raises(IdentityError, match=r"cannot read certificate .*: No such file"):
        identity.load_certificate(tmp_path / "none.crt")


def test_write_refuses_to_overwrite_when_asked(tmp_path: Path) -> None:
    identity.write(identity.generate("a"), tmp_path, "a")
    before = (tmp_path / "a.crt").read_bytes()
    with pytest.raises(IdentityError, match="exists; not overwriting"):
        identity.write(identity.generate("a"), tmp_path, "a", overwrite=False)
    assert (tmp_path / "a.crt").read_bytes() == before


@pytest.mark.parametrize("name", ["", "a/b", "../x", ".hidden", "a b"])
def test_bad_names(name: str) -> None:
    with pytest.raises(IdentityError, match="bad identity name"):
        identity.check_name(name)


# --- through the CLI ---------------------------------------------------------------------------


def test_cli_new_then_show(tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(main, ["identity", "new", "kmf", "--dir", str(tmp_path / "ids")])
    assert result.exit_code == 0, result.output
    fp = result.stdout.strip()
    assert FP_RE.match(fp)
    assert "wrote" in result.stderr
    crt = tmp_path / "ids" / "kmf.crt"
    shown = runner.invoke(main, ["identity", "show", str(crt)])
    assert shown.exit_code == 0
    assert shown.stdout == fp + "\n"
    checked = runner.invoke(
        main, ["identity", "show", str(crt), "--key", str(tmp_path / "ids" / "kmf.key")]
    )
    assert checked.exit_code == 0
    assert checked.stdout == fp + "\n"
    # DER works as well as PEM.
    der = tmp_path / "kmf.der"
    der.write_bytes(identity.load_certificate(crt).public_bytes(serialization.Encoding.DER))
    assert runner.invoke(main, ["identity", "show", str(der)]).stdout == fp + "\n"


def test_cli_new_refuses_overwrite_without_force(tmp_path: Path) -> None:
    runner = CliRunner()
    first = runner.invoke(main, ["identity", "new", "x", "--dir", str(tmp_path)])
    again = runner.invoke(main, ["identity", "new", "x", "--dir", str(tmp_path)])
    assert again.exit_code == 2
    assert again.stderr == f"perc: error: {tmp_path}/x.key exists; not overwriting it\n"
    forced = runner.invoke(main, ["identity", "new", "x", "--dir", str(tmp_path), "--force"])
    assert forced.exit_code == 0
    assert forced.stdout != first.stdout


def test_cli_show_errors(tmp_path: Path) -> None:
    runner = CliRunner()
    identity.write(identity.generate("a"), tmp_path, "a")
    identity.write(identity.generate("b"), tmp_path, "b")
    mismatch = runner.invoke(
        main, ["identity", "show", str(tmp_path / "a.crt"), "--key", str(tmp_path / "b.key")]
    )
    assert mismatch.exit_code == 2
    assert mismatch.stderr == (
        f"perc: error: {tmp_path}/b.key does not belong to {tmp_path}/a.crt\n"
    )
    not_cert = runner.invoke(main, ["identity", "show", str(tmp_path / "a.key")])
    assert not_cert.exit_code == 2
    assert not_cert.stderr == (
        f"perc: error: {tmp_path}/a.key is not a PEM or DER X.509 certificate\n"
    )
    bad_name = runner.invoke(main, ["identity", "new", "a/b", "--dir", str(tmp_path)])
    assert bad_name.exit_code == 2
    assert bad_name.stderr.startswith("perc: error: bad identity name 'a/b'")
