"""The repository explains itself (docs/design.md).

* every decision number ``Dn`` cited in the code, the man page or the README names a decision
  heading (``### Dn. Title``) in docs/design.md;
* no comment or text under ``perc/`` speaks of issues ("issue 6") instead of the code;
* nothing under ``perc/`` or ``man/`` (code, help texts, errors, the man page) points at a
  document that is not in the repository.
"""

import re
from collections.abc import Iterator
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from perc.cli import main

ROOT = Path(__file__).resolve().parent.parent
DESIGN = ROOT / "docs" / "design.md"

#: A decision number as the code cites it: "D5", "(D1-D3)", "D22,".
DECISION_TOKEN = re.compile(r"\bD(\d{1,2})\b")
#: A decision heading in docs/design.md: "### D5. SRTP before MediaKeys".
DECISION_HEADING = re.compile(r"^### D(\d+)\. (\S.*)$", re.MULTILINE)
#: "issue 6", "Issue 12": a reference to the issue tracker instead of to the code.
ISSUE_REFERENCE = re.compile(r"issue [0-9]", re.IGNORECASE)
#: Documents that are not in the repository. "SPEC" as a word (CHANGE_CIPHER_SPEC is not one).
OUTSIDE_DOCUMENT = re.compile(r"\bSPEC(?:-DTLS)?(?:\.md)?\b|\bAPI\.md\b")


def _files(*roots: str, suffixes: tuple[str, ...] = ()) -> Iterator[Path]:
    for name in roots:
        path = ROOT / name
        if path.is_file():
            yield path
            continue
        for file in sorted(path.rglob("*")):
            if not file.is_file() or "__pycache__" in file.parts:
                continue
            if suffixes and file.suffix not in suffixes:
                continue
            yield file


def _matches(files: Iterator[Path], pattern: re.Pattern[str]) -> list[tuple[str, int, str]]:
    """``(path, line number, matched text)`` for every match, paths relative to the root."""
    found = []
    for file in files:
        try:
            text = file.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue  # not text
        for number, line in enumerate(text.splitlines(), 1):
            for m in pattern.finditer(line):
                found.append((str(file.relative_to(ROOT)), number, m.group(0)))
    return found


def _report(found: list[tuple[str, int, str]]) -> str:
    per_file: dict[str, int] = {}
    for path, _, _ in found:
        per_file[path] = per_file.get(path, 0) + 1
    lines = [f"{len(found)} in {len(per_file)} files:"]
    lines += [f"  {path}: {count}" for path, count in sorted(per_file.items())]
    lines += [f"  {path}:{number}: {text}" for path, number, text in found]
    return "\n".join(lines)


def _decisions() -> dict[int, str]:
    text = DESIGN.read_text(encoding="utf-8")
    headings: dict[int, str] = {}
    for m in DECISION_HEADING.finditer(text):
        number = int(m.group(1))
        assert number not in headings, f"D{number} has two headings in docs/design.md"
        headings[number] = m.group(2)
    return headings


def test_design_numbers_its_decisions_without_gaps() -> None:
    numbers = sorted(_decisions())
    assert numbers, "docs/design.md has no '### Dn. Title' headings"
    assert numbers == list(range(1, numbers[-1] + 1))


def test_every_cited_decision_is_in_design_md() -> None:
    decisions = _decisions()
    cited = _matches(_files("perc", suffixes=(".py",)), DECISION_TOKEN)
    cited += _matches(_files("man/perc.1", "README.md"), DECISION_TOKEN)
    assert cited, "no decision is cited anywhere: the pattern is broken"
    unknown = [c for c in cited if int(c[2][1:]) not in decisions]
    assert not unknown, "decisions missing from docs/design.md: " + _report(unknown)


def test_no_comment_refers_to_an_issue() -> None:
    found = _matches(_files("perc"), ISSUE_REFERENCE)
    assert not found, "issue references under perc/: " + _report(found)


def test_nothing_refers_to_documents_outside_the_repository() -> None:
    found = _matches(_files("perc", "man"), OUTSIDE_DOCUMENT)
    assert not found, "references to SPEC/SPEC-DTLS/API.md: " + _report(found)


def _commands(cmd: click.Command, path: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    yield path
    if isinstance(cmd, click.Group):
        for name, sub in cmd.commands.items():
            yield from _commands(sub, (*path, name))


@pytest.mark.parametrize("path", list(_commands(main)), ids=lambda p: " ".join(p) or "perc")
def test_help_points_only_inside_the_repository(path: tuple[str, ...]) -> None:
    result = CliRunner().invoke(main, [*path, "--help"])
    assert result.exit_code == 0, result.output
    assert not OUTSIDE_DOCUMENT.search(result.output), result.output
    assert not ISSUE_REFERENCE.search(result.output), result.output
    decisions = _decisions()
    for m in DECISION_TOKEN.finditer(result.output):
        assert int(m.group(1)) in decisions, f"{m.group(0)} in `perc {' '.join(path)} --help`"
