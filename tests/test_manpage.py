"""man/perc.1 renders without warnings and documents every CLI option and config key."""

import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import click
import pytest

from perc import config
from perc.cli import main

MAN = Path(__file__).resolve().parent.parent / "man" / "perc.1"


Command = tuple[tuple[str, ...], click.Command]


def _commands(cmd: click.Command, path: tuple[str, ...] = ()) -> Iterator[Command]:
    if isinstance(cmd, click.Group):
        for name, sub in cmd.commands.items():
            yield from _commands(sub, (*path, name))
    yield path, cmd


def _man_text() -> str:
    # roff escapes: "\-" is a minus/hyphen; "\e" a backslash; font switches carry no text.
    text = MAN.read_text()
    text = text.replace("\\-", "-").replace("\\e", "\\")
    return re.sub(r"\\f[BIRP]", "", text)


def test_groff_renders_without_warnings() -> None:
    groff = shutil.which("groff")
    if groff is None:
        pytest.fail("groff is not installed: `bash dev.sh test` installs groff-base")
    result = subprocess.run(
        [groff, "-man", "-Tutf8", "-ww", "-z", str(MAN)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0
    assert result.stderr == ""


def test_every_command_and_option_is_documented() -> None:
    text = _man_text()
    missing = []
    for path, cmd in _commands(main):
        if path and f"perc {' '.join(path)}" not in text:
            missing.append(" ".join(path))
        for param in cmd.params:
            for opt in getattr(param, "opts", []):
                if opt.startswith("-") and opt not in text:
                    missing.append(f"{' '.join(path)} {opt}")
    assert missing == []


def test_every_config_key_is_documented() -> None:
    text = _man_text()
    tables = [config.KmfSettings, config.KmfConference, config.MddSettings, config.MddConference]
    missing = [
        f"{cls.__name__}.{row.key}"
        for cls in tables
        for row in config.describe(cls)
        if not re.search(rf"^\.BR {re.escape(row.key)} ", text, re.MULTILINE)
    ]
    assert missing == []


def test_environment_and_exit_statuses_are_documented() -> None:
    text = _man_text()
    assert "SSLKEYLOGFILE" in text
    assert ".SH EXIT STATUS" in text
