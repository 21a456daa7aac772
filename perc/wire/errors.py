"""The error types of the wire codecs.

Every decoder of untrusted bytes raises its format's subclass of :class:`DecodeError` and
nothing else: never ``IndexError``, ``struct.error`` or a bare ``ValueError``.
"""


class DecodeError(Exception):
    """Untrusted bytes do not parse. The base of every wire format's error type."""


class BufferReadError(DecodeError):
    """A read ran past the end of a :class:`perc.wire.buffer.Buffer`."""
