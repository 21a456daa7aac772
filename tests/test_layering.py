"""The shape of the package: sans-IO cores, and I/O only in perc/roles.

* Nothing outside ``perc/roles`` (and the CLI, which starts the roles) imports trio, trio-util
  or the socket module: codecs, DTLS, SRTP, media, forwarding and keying take bytes and
  ``now`` and return bytes, events and timers.
* Nothing in ``perc/roles`` parses protocol bytes: no ``struct``, no ``int.from_bytes``, no
  byte buffer, no indexing into a datagram. Every format is parsed in one place, under
  ``perc/wire`` or the engine that owns it.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "perc"
IO_MODULES = {"trio", "trio_util", "socket", "selectors", "asyncio"}
#: Names the roles use for bytes off the network.
BYTES_NAMES = {"data", "datagram", "packet", "payload", "chunk", "raw", "record", "message"}


def _modules(under: Path) -> list[Path]:
    return sorted(under.rglob("*.py"))


def _imports(tree: ast.AST) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_cores_do_no_io() -> None:
    offenders = []
    for path in _modules(PACKAGE):
        rel = path.relative_to(PACKAGE)
        if rel.parts[0] == "roles" or rel.name == "cli.py":
            continue
        imported = {name.split(".")[0] for name in _imports(ast.parse(path.read_text()))}
        if imported & IO_MODULES:
            offenders.append(f"{rel}: {sorted(imported & IO_MODULES)}")
    assert not offenders, offenders


def test_roles_parse_no_protocol_bytes() -> None:
    offenders = []
    for path in _modules(PACKAGE / "roles"):
        rel = path.relative_to(PACKAGE)
        tree = ast.parse(path.read_text())
        for name in _imports(tree):
            if name == "struct" or name == "perc.wire.buffer":
                offenders.append(f"{rel}: imports {name}")
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr == "from_bytes":
                offenders.append(f"{rel}:{node.lineno}: from_bytes")
            if (
                isinstance(node, ast.Subscript)
                and isinstance(node.value, ast.Name)
                and node.value.id in BYTES_NAMES
                and isinstance(node.slice, ast.Constant | ast.Slice)
            ):
                offenders.append(f"{rel}:{node.lineno}: indexes {node.value.id}")
    assert not offenders, offenders


def test_roles_are_small() -> None:
    """perc/roles is I/O only; the protocol weight lives in the cores.

    The bound grows with the number of sockets the roles serve (tunnel, media, links, metrics,
    admin, worker supervision), about 400 lines each; protocol logic never counts toward it.
    """
    lines = sum(len(p.read_text().splitlines()) for p in _modules(PACKAGE / "roles"))
    assert lines < 4500, lines
