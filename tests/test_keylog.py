"""perc.keylog: SSLKEYLOGFILE lines, file mode, warning, failures (D21)."""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

import pytest

from perc.keylog import ENV_VAR, KeyLog, KeyLogError, keylog_from_env

LINE = "CLIENT_RANDOM " + "ab" * 32 + " " + "cd" * 48


def test_unset_or_empty_means_no_keylog() -> None:
    assert keylog_from_env({}) is None
    assert keylog_from_env({ENV_VAR: ""}) is None


def test_creates_file_0600_appends_lines_and_warns(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "keys.log"
    with caplog.at_level(logging.WARNING, logger="perc.keylog"):
        keylog = keylog_from_env({ENV_VAR: str(path)})
    assert keylog is not None
    assert any(ENV_VAR in r.getMessage() and str(path) in r.getMessage() for r in caplog.records)
    with keylog:
        keylog(LINE)
        keylog(LINE.replace("ab", "ef"))
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert path.read_text().splitlines() == [LINE, LINE.replace("ab", "ef")]
    assert keylog.lines == 2
    assert keylog.dropped == 0


def test_existing_file_is_appended_not_truncated(tmp_path: Path) -> None:
    path = tmp_path / "keys.log"
    path.write_text("# earlier\n")
    path.chmod(0o600)
    with KeyLog(path) as keylog:
        keylog(LINE)
    assert path.read_text() == "# earlier\n" + LINE + "\n"


def test_two_writers_share_one_file(tmp_path: Path) -> None:
    path = tmp_path / "keys.log"
    with KeyLog(path) as a, KeyLog(path) as b:
        for i in range(50):
            (a if i % 2 else b)(f"CLIENT_RANDOM {i:064x} {'00' * 48}")
    lines = path.read_text().splitlines()
    assert sorted(lines) == sorted(f"CLIENT_RANDOM {i:064x} {'00' * 48}" for i in range(50))


def test_world_readable_existing_file_is_warned_about(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "keys.log"
    path.write_text("")
    path.chmod(0o644)
    with caplog.at_level(logging.WARNING, logger="perc.keylog"), KeyLog(path):
        pass
    assert any("readable by other users" in r.getMessage() for r in caplog.records)
    # an existing file keeps the mode its owner gave it
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o644


def test_unopenable_path_raises_typed_error(tmp_path: Path) -> None:
    with pytest.raises(KeyLogError, match="cannot open key log"):
        KeyLog(tmp_path / "missing-dir" / "keys.log")


def test_bad_lines_and_closed_log_are_counted_not_raised(tmp_path: Path) -> None:
    path = tmp_path / "keys.log"
    keylog = KeyLog(path)
    keylog("two\nlines")
    keylog("x" * 5000)
    keylog.close()
    keylog(LINE)
    keylog.close()  # idempotent
    assert keylog.dropped == 3
    assert keylog.lines == 0
    assert path.read_text() == ""


def test_open_error_is_an_os_error_for_the_cli(tmp_path: Path) -> None:
    with pytest.raises(OSError, match="cannot open key log"):
        keylog_from_env({ENV_VAR: str(tmp_path / "missing" / "keys.log")})
