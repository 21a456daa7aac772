"""Admin sockets (D33): the Unix-socket listener of the KMF and the MDD, and the client.

The protocol (framing, requests, answers, tables) is :mod:`perc.admin`, sans-IO; this module
only moves its lines.

* :func:`prepare_socket_path` runs before a role starts (``perc kmf``/``perc mdd`` turn its
  :class:`~perc.admin.AdminError` into exit 2): the path checks of
  :func:`perc.admin.check_socket_path`, and a socket file left there is replaced only if
  nobody listens on it (stale), never taken from a running process.
* :func:`serve_admin` binds the socket, sets mode 0600 before ``listen`` (so nobody can
  connect while the mode is wider), reports :class:`~perc.events.Listening` (``admin``, the
  path as host) and serves each connection in its own task: at most :data:`MAX_CLIENTS` at
  once, one request answered at a time, a request the role's ``answer`` cannot serve is an
  error line and the connection stays; a line over 64 KiB is answered and the connection
  closed. An unexpected exception from ``answer`` is a bug: logged with its traceback,
  answered ``internal error``, and the role goes on. The socket file is removed on the way
  out.
* :func:`call` is the blocking client ``perc admin`` uses: one request line, one answer line.

API::

    prepare_socket_path(path)                       # AdminError: exit 2
    await serve_admin(path, answer, ops=KMF_OPS, task_status=...)   # started(path)
    call(path, line, timeout=10.0) -> dict          # AdminError, OSError
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import trio

from perc.admin import (
    AdminError,
    LineBuffer,
    LineTooLong,
    Request,
    check_socket_path,
    error_line,
    ok_line,
    parse_answer,
    parse_request,
)
from perc.events import Listening, emit

__all__ = ["MAX_CLIENTS", "call", "prepare_socket_path", "serve_admin"]

log = logging.getLogger(__name__)

#: Admin connections served at once; more are answered with an error and closed.
MAX_CLIENTS = 16
#: Longest answer the client reads (bytes): an audit or a member list may be long.
MAX_ANSWER = 16 << 20
_CHUNK = 65536

Answer = Callable[[Request], Awaitable[dict[str, Any]]]


def prepare_socket_path(path: Path) -> None:
    """Check ``path`` for an admin socket and remove a stale socket file there."""
    if not check_socket_path(path):
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        path.unlink(missing_ok=True)  # stale: nobody listens on it
        return
    except OSError as e:
        raise AdminError(f"admin socket {path}: {e.strerror or e}") from None
    finally:
        probe.close()
    raise AdminError(f"admin socket {path}: another process listens on it")


async def serve_admin(
    path: Path,
    answer: Answer,
    *,
    ops: Sequence[str],
    task_status: trio.TaskStatus[Path] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the admin socket at ``path`` until cancelled (see the module docstring)."""
    prepare_socket_path(path)
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    clients = 0

    async def client(stream: trio.SocketStream) -> None:
        nonlocal clients
        try:
            if clients >= MAX_CLIENTS:
                await stream.send_all(error_line(f"more than {MAX_CLIENTS} admin connections"))
                return
            clients += 1
            try:
                await _serve_client(stream, answer, ops)
            finally:
                clients -= 1
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the client went away
        finally:
            await trio.aclose_forcefully(stream)

    try:
        await sock.bind(str(path))
        os.chmod(path, 0o600)  # before listen: nobody can connect while the mode is wider
        sock.listen(MAX_CLIENTS)
        emit(log, Listening("admin", str(path), 0))
        task_status.started(path)
        await trio.serve_listeners(client, [trio.SocketListener(sock)])
    finally:
        sock.close()
        path.unlink(missing_ok=True)


async def _serve_client(stream: trio.SocketStream, answer: Answer, ops: Sequence[str]) -> None:
    lines = LineBuffer()
    while chunk := await stream.receive_some(_CHUNK):
        try:
            requests = lines.feed(chunk)
        except LineTooLong as e:
            await stream.send_all(error_line(str(e)))
            return
        for line in requests:
            await stream.send_all(await _answer(line, answer, ops))


async def _answer(line: bytes, answer: Answer, ops: Sequence[str]) -> bytes:
    try:
        return ok_line(**await answer(parse_request(line, ops)))
    except AdminError as e:
        return error_line(str(e))
    except Exception:
        log.exception("admin request failed: %.200r", line)
        return error_line("internal error (logged by the server)")


def call(path: Path, line: bytes, timeout: float = 10.0) -> dict[str, Any]:
    """Send one request line to the admin socket at ``path``; its answer (blocking).

    OSError when nothing listens there; AdminError for a malformed or missing answer."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(path))
        sock.sendall(line)
        received = b""
        while b"\n" not in received:
            chunk = sock.recv(_CHUNK)
            if not chunk:
                break
            received += chunk
            if len(received) > MAX_ANSWER:
                raise AdminError(f"answer longer than {MAX_ANSWER} bytes")
    if not received.strip():
        raise AdminError("the server closed the connection without an answer")
    return parse_answer(received.split(b"\n", 1)[0])
