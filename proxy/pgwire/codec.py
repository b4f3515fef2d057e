"""Sans-IO framing of typed v3 messages (type byte + Int32 length + body)."""

from __future__ import annotations

import struct

from proxy.pgwire.errors import ProtocolViolation

DEFAULT_MAX_MESSAGE_LENGTH = 1 << 20
_HEADER = struct.Struct("!cI")
_MAX_INT32 = (1 << 31) - 1


def frame(type_: bytes, body: bytes) -> bytes:
    """Prefix ``body`` with its type byte and length (the length counts itself, not the type)."""
    if len(type_) != 1:
        raise ValueError(f"message type must be one byte, got {type_!r}")
    length = len(body) + 4
    if length > _MAX_INT32:
        raise ValueError(f"message body too long: {len(body)} bytes")
    return _HEADER.pack(type_, length) + body


class MessageReader:
    """Splits a byte stream into (type, body) messages; holds at most one partial message.

    ``max_length`` bounds the length field (which includes its own 4 bytes), so
    a peer cannot make us wait for, or buffer, an arbitrarily large message.
    """

    def __init__(self, max_length: int = DEFAULT_MAX_MESSAGE_LENGTH) -> None:
        if not 4 <= max_length <= _MAX_INT32:
            raise ValueError(f"max_length must be in 4..{_MAX_INT32}, got {max_length}")
        self._max_length = max_length
        self._buffer = bytearray()

    def feed(self, data: bytes) -> None:
        self._buffer += data

    def next_message(self) -> tuple[bytes, bytes] | None:
        """Return the next complete message, or None until more bytes are fed."""
        if len(self._buffer) < _HEADER.size:
            return None
        type_, length = _HEADER.unpack_from(self._buffer)
        # Checked before the body arrives, so an oversized length fails at once
        # instead of after the peer has made us buffer it.
        if length < 4 or length > self._max_length:
            raise ProtocolViolation(f"invalid message length {length} for message type {type_!r}")
        end = 1 + length
        if len(self._buffer) < end:
            return None
        body = bytes(self._buffer[_HEADER.size : end])
        del self._buffer[:end]
        return type_, body

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def take_trailing(self) -> bytes:
        """Return and forget the unparsed bytes, for handing the stream over to a splice."""
        trailing = bytes(self._buffer)
        self._buffer.clear()
        return trailing
