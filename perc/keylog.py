"""SSLKEYLOGFILE support (D21): NSS key-log lines for Wireshark.

When the ``SSLKEYLOGFILE`` environment variable names a file, every DTLS client and server in
perc (the KMF's per-association servers, the endpoint's client) appends one NSS line per
completed handshake::

    CLIENT_RANDOM <client_random hex> <master_secret hex>

(the DTLS 1.2 form; the line itself comes from the engine, ``perc.dtls.keys.keylog_line``).

Why the details are the way they are:

* The file is opened with ``O_APPEND`` and every line is written with one ``os.write`` of a
  few hundred bytes, so several perc processes (a KMF and its endpoints in a test) can share
  one file without interleaving lines, as browsers sharing ``SSLKEYLOGFILE`` do.
* A file we create gets mode 0600: the lines are the session secrets. An existing file keeps
  its mode (it may be shared with other programs on purpose), but a group- or world-readable
  one is warned about.
* A warning is logged at startup whenever key logging is on: it silently defeats the
  confidentiality of the DTLS associations (and, through the exporter, the hop-by-hop SRTP
  keys; the EKTKey travels inside the handshake protection too).
* Opening the file fails loudly (:class:`KeyLogError`); a failed write later is logged once and
  counted, never raised into the DTLS engine (a broken key log must not break a join).

Usage::

    keylog = keylog_from_env()          # None when SSLKEYLOGFILE is unset or empty
    DtlsConfiguration(..., keylog=keylog)   # a KeyLog is the Callable[[str], None] it expects
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Mapping
from pathlib import Path

logger = logging.getLogger(__name__)

#: The environment variable (the name NSS, OpenSSL-based tools and browsers use).
ENV_VAR = "SSLKEYLOGFILE"

#: Longest line we write; a DTLS 1.2 line is 13 + 64 + 1 + 96 + 1 = 175 characters.
_MAX_LINE = 1024


class KeyLogError(OSError):
    """The key log file could not be opened (a local configuration problem).

    An OSError, so a role's CLI reports it like any other file or socket failure (one
    ``perc: error:`` line, exit status 1) instead of a traceback.
    """


class KeyLog:
    """An append-only NSS key-log file; call it with a line (no newline) to record it."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        #: lines written
        self.lines = 0
        #: lines not written (write errors, oversized or multi-line input)
        self.dropped = 0
        self._warned_write = False
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0)
        existed = self.path.exists()
        try:
            self._fd: int | None = os.open(self.path, flags, 0o600)
        except OSError as exc:
            raise KeyLogError(f"cannot open key log file {self.path}: {exc}") from exc
        try:
            mode = os.fstat(self._fd).st_mode
            if not existed:
                # the umask can only remove bits from 0600, but be explicit: secrets inside
                os.fchmod(self._fd, 0o600)
            elif stat.S_IMODE(mode) & 0o077:
                logger.warning(
                    "key log file %s is readable by other users (mode %o)",
                    self.path,
                    stat.S_IMODE(mode),
                )
        except OSError as exc:
            self.close()
            raise KeyLogError(f"cannot set up key log file {self.path}: {exc}") from exc

    def __call__(self, line: str) -> None:
        """Append ``line`` and a newline in one write (the engine's keylog callback)."""
        if self._fd is None or len(line) > _MAX_LINE or "\n" in line or "\r" in line:
            self.dropped += 1
            return
        data = (line + "\n").encode("ascii", "replace")
        try:
            written = os.write(self._fd, data)
        except OSError as exc:
            self._write_failed(str(exc))
            return
        if written != len(data):
            self._write_failed(f"short write ({written} of {len(data)} bytes)")
            return
        self.lines += 1

    def _write_failed(self, why: str) -> None:
        self.dropped += 1
        if not self._warned_write:
            self._warned_write = True
            logger.error(
                "key log file %s: write failed: %s (further errors counted)", self.path, why
            )

    def close(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)

    def __enter__(self) -> KeyLog:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def keylog_from_env(environ: Mapping[str, str] | None = None) -> KeyLog | None:
    """Open the file ``SSLKEYLOGFILE`` names (and warn), or None when it is unset or empty.

    Raises :class:`KeyLogError` when the file cannot be opened. Call once at process start
    and share the result among all DTLS connections of the process.
    """
    env = os.environ if environ is None else environ
    path = env.get(ENV_VAR, "")
    if not path:
        return None
    keylog = KeyLog(path)
    logger.warning(
        "%s is set: DTLS session secrets are appended to %s; anyone who can read that file "
        "can decrypt this process's DTLS traffic and derive its SRTP keys",
        ENV_VAR,
        keylog.path,
    )
    return keylog
