"""A bounds-checked cursor over bytes for TLS presentation-language types (RFC 8446 §3).

Reads past the end raise :class:`BufferReadError` (the one error this module raises on
input). Vectors ``T x<floor..ceiling>`` carry a length prefix of 1, 2 or 3 bytes counting
bytes; ``pull_vector``/``push_vector`` handle them and ``pull_block``/``push_block`` give a
sub-buffer or back-patch the prefix once the body is written.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from contextlib import contextmanager

from perc.wire.errors import BufferReadError

_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")
_U64 = struct.Struct("!Q")


class Buffer:
    """Read cursor over immutable bytes, or a growable write buffer."""

    __slots__ = ("_data", "_end", "_out", "_pos")

    def __init__(self, data: bytes | bytearray | memoryview = b"") -> None:
        self._data = bytes(data)
        self._pos = 0
        self._end = len(self._data)
        self._out = bytearray()

    # --- reading -----------------------------------------------------------------------------

    @property
    def position(self) -> int:
        return self._pos

    @property
    def remaining(self) -> int:
        return self._end - self._pos

    def eof(self) -> bool:
        return self._pos >= self._end

    def _take(self, n: int) -> int:
        if n < 0 or self._pos + n > self._end:
            raise BufferReadError(f"need {n} bytes at offset {self._pos}, have {self.remaining}")
        start = self._pos
        self._pos += n
        return start

    def pull_bytes(self, n: int) -> bytes:
        start = self._take(n)
        return self._data[start : start + n]

    def pull_rest(self) -> bytes:
        return self.pull_bytes(self.remaining)

    def pull_uint8(self) -> int:
        start = self._take(1)
        return self._data[start]

    def pull_uint16(self) -> int:
        start = self._take(2)
        return int(_U16.unpack_from(self._data, start)[0])

    def pull_uint24(self) -> int:
        start = self._take(3)
        return int.from_bytes(self._data[start : start + 3], "big")

    def pull_uint32(self) -> int:
        start = self._take(4)
        return int(_U32.unpack_from(self._data, start)[0])

    def pull_uint48(self) -> int:
        start = self._take(6)
        return int.from_bytes(self._data[start : start + 6], "big")

    def pull_uint64(self) -> int:
        start = self._take(8)
        return int(_U64.unpack_from(self._data, start)[0])

    def _pull_length(self, prefix: int) -> int:
        if prefix == 1:
            return self.pull_uint8()
        if prefix == 2:
            return self.pull_uint16()
        if prefix == 3:
            return self.pull_uint24()
        raise ValueError(f"length prefix must be 1, 2 or 3 bytes, not {prefix}")  # local misuse

    def pull_vector(self, prefix: int, floor: int = 0, ceiling: int | None = None) -> bytes:
        """Read ``opaque x<floor..ceiling>`` with a ``prefix``-byte length."""
        n = self._pull_length(prefix)
        if n < floor or (ceiling is not None and n > ceiling):
            raise BufferReadError(f"vector length {n} outside <{floor}..{ceiling}>")
        return self.pull_bytes(n)

    def pull_block(self, prefix: int) -> Buffer:
        """Read a length-prefixed block and return a new buffer over exactly its bytes."""
        return Buffer(self.pull_vector(prefix))

    def expect_end(self) -> None:
        if self._pos != self._end:
            raise BufferReadError(f"{self.remaining} trailing bytes")

    # --- writing -----------------------------------------------------------------------------

    def push_bytes(self, data: bytes | bytearray | memoryview) -> None:
        self._out += data

    def push_uint8(self, v: int) -> None:
        self._out.append(v)

    def push_uint16(self, v: int) -> None:
        self._out += _U16.pack(v)

    def push_uint24(self, v: int) -> None:
        self._out += v.to_bytes(3, "big")

    def push_uint32(self, v: int) -> None:
        self._out += _U32.pack(v)

    def push_uint48(self, v: int) -> None:
        self._out += v.to_bytes(6, "big")

    def push_uint64(self, v: int) -> None:
        self._out += _U64.pack(v)

    def push_vector(
        self, prefix: int, data: bytes, floor: int = 0, ceiling: int | None = None
    ) -> None:
        """Write ``opaque x<floor..ceiling>``; a length outside the bounds is local misuse."""
        limit = (1 << (8 * prefix)) - 1
        if ceiling is None:
            ceiling = limit
        if not floor <= len(data) <= min(ceiling, limit):
            raise ValueError(f"vector length {len(data)} outside <{floor}..{ceiling}>")
        self._out += len(data).to_bytes(prefix, "big")
        self._out += data

    @contextmanager
    def push_block(self, prefix: int) -> Iterator[None]:
        """Reserve a ``prefix``-byte length, let the caller write the body, back-patch it."""
        at = len(self._out)
        self._out += bytes(prefix)
        yield
        n = len(self._out) - at - prefix
        if n >= 1 << (8 * prefix):
            raise ValueError(f"block of {n} bytes does not fit a {prefix}-byte length")
        self._out[at : at + prefix] = n.to_bytes(prefix, "big")

    def data(self) -> bytes:
        """The bytes written so far."""
        return bytes(self._out)
