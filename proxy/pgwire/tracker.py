"""Sans-IO message-boundary trackers for the spliced byte streams (both directions).

The splice moves chunks without parsing them; these trackers are fed the same
chunks and read only the 5-byte headers (plus ReadyForQuery's status byte and
an ErrorResponse's first field), skipping every body by its length. No
payload is copied: a header split across chunks keeps at most 4 bytes.

From the compute's side they tell where message boundaries are (where the
proxy may insert an ErrorResponse of its own), the last ReadyForQuery status
and whether a COPY runs; from the client's side, how many requests expect a
ReadyForQuery, whether an extended-protocol exchange lacks its Sync, and
whether the client said Terminate.
"""

from __future__ import annotations

import struct

from proxy.pgwire.errors import ProtocolViolation

_HEADER = struct.Struct("!BI")
_unpack_header = _HEADER.unpack_from
_MAX_LENGTH = (1 << 31) - 1

# Frontend message types (after the startup phase).
_QUERY = ord("Q")
_SYNC = ord("S")
_FUNCTION_CALL = ord("F")
_TERMINATE = ord("X")
# Parse, Bind, Execute, Describe, Close, Flush: an exchange that only a Sync ends.
_EXTENDED = frozenset(b"PBEDCH")

# Backend message types.
_READY = ord("Z")
_ERROR = ord("E")
_COPY_START = frozenset(b"GHW")  # CopyInResponse, CopyOutResponse, CopyBothResponse
_FATAL_SEVERITIES = (b"SFATAL\x00", b"SPANIC\x00")
_BACKEND_NOTABLE = frozenset(b"ZEGHW")
_FRONTEND_NOTABLE = frozenset(b"QSFXPBEDCH")


class _Framer:
    """Walks message headers; subclasses see each header once, in order."""

    __slots__ = ("_head", "_pending", "_skip", "_want", "broken", "direction", "last_type")
    # The message types a subclass wants to see (`_message`); others are only skipped.
    NOTABLE: frozenset[int] = frozenset()

    def __init__(self, direction: str) -> None:
        self.direction = direction
        self.last_type = 0  # the type of the last message whose header was read
        self._skip = 0  # body bytes of the current message still to come
        self._head = b""  # a partial header (0..4 bytes) carried to the next chunk
        self._want = 0  # a message type whose body starts at the next chunk's first byte
        self._pending = False  # any of the above, or broken: the next chunk resumes
        self.broken = False

    @property
    def at_boundary(self) -> bool:
        """True between two messages (nothing of a message is pending)."""
        return not self._skip and not self._head and not self.broken

    def feed(self, data: bytes) -> None:
        """Account for one chunk. Raises ProtocolViolation on an invalid length;
        after that the tracker is `broken` and ignores further input."""
        # The hot path (a chunk that starts on a boundary) reads one attribute,
        # then walks headers with no call per message unless its type is notable.
        pos = self._resume(data) if self._pending else 0
        if pos < 0:
            return
        n = len(data)
        notable = self.NOTABLE
        last = -1
        while pos + 5 <= n:
            type_, length = _unpack_header(data, pos)
            if length < 4:
                self._invalid(type_, length)
            last = type_
            if type_ in notable:
                self._message(type_, data, pos + 5, length - 4)
            pos += 1 + length
        if last >= 0:
            self.last_type = last
        if pos != n:
            self._pending = True
            if pos > n:
                self._skip = pos - n
            else:
                self._head = data[pos:]

    def _resume(self, data: bytes) -> int:
        """A chunk after one that ended inside a message: where its first whole
        message starts, or -1 when nothing more in it is to be walked."""
        n = len(data)
        if self.broken or not n:
            return -1
        if self._want:
            self._body_start(data)
        pos = self._skip
        if pos:
            if pos >= n:
                self._skip = pos - n
                self._pending = bool(self._skip or self._want)
                return -1
            self._skip = 0
        elif self._head:
            carried = len(self._head)
            head = self._head + data[: 5 - carried]
            if len(head) < 5:
                self._head = head
                return -1
            self._head = b""
            type_, length = _HEADER.unpack(head)
            pos = self._header(type_, length, data, 5 - carried)
            if pos > n:
                self._skip = pos - n
                return -1
        self._pending = bool(self._want)
        return pos

    def _header(self, type_: int, length: int, data: bytes, body: int) -> int:
        """A header that was split across chunks; its body starts at `data[body]`.
        Returns where the next message starts."""
        if length < 4:
            self._invalid(type_, length)
        self.last_type = type_
        if type_ in self.NOTABLE:
            self._message(type_, data, body, length - 4)
        return body + length - 4

    def _invalid(self, type_: int, length: int) -> None:
        self.broken = self._pending = True
        raise ProtocolViolation(
            f"invalid message length {length} for message type {bytes([type_])!r} "
            f"from the {self.direction}"
        )

    def _message(self, type_: int, data: bytes, body: int, body_length: int) -> None:
        raise NotImplementedError

    def _body_start(self, data: bytes) -> None:
        """The body of the message named by `_want` starts at `data[0]`."""
        self._want = 0


class BackendTracker(_Framer):
    """The compute → client direction."""

    __slots__ = ("_probe", "copying", "fatal", "ready_count", "status")
    NOTABLE = _BACKEND_NOTABLE

    def __init__(self) -> None:
        super().__init__("compute")
        self.status = b"I"  # the last ReadyForQuery's transaction status
        self.ready_count = 0  # ReadyForQuery messages seen
        self.copying = False  # between a Copy*Response and the next ReadyForQuery
        self.fatal = False  # the compute sent a FATAL/PANIC ErrorResponse
        self.last_type = _READY  # a splice starts right after the login's ReadyForQuery
        self._probe = b""  # the first bytes of an ErrorResponse split across chunks (≤ 7)

    def feed(self, data: bytes) -> None:
        # The generic walk with ReadyForQuery (one per answer) handled inline:
        # this runs for every chunk a compute sends.
        pos = self._resume(data) if self._pending else 0
        if pos < 0:
            return
        n = len(data)
        last = -1
        while pos + 5 <= n:
            type_, length = _unpack_header(data, pos)
            if length < 4:
                self._invalid(type_, length)
            last = type_
            if type_ in _BACKEND_NOTABLE:
                if type_ == _READY and length == 5 and pos + 5 < n:
                    self.status = data[pos + 5 : pos + 6]
                    self.ready_count += 1
                    self.copying = False
                else:
                    self._message(type_, data, pos + 5, length - 4)
            pos += 1 + length
        if last >= 0:
            self.last_type = last
        if pos != n:
            self._pending = True
            if pos > n:
                self._skip = pos - n
            else:
                self._head = data[pos:]

    def _message(self, type_: int, data: bytes, body: int, body_length: int) -> None:
        if type_ == _READY:
            # Counted once its status is known, so the two always agree.
            if body < len(data) or not body_length:
                if body_length:
                    self.status = data[body : body + 1]
                self.ready_count += 1
                self.copying = False
            else:
                self._want = _READY
        elif type_ == _ERROR:
            # The severity is the first field: "SFATAL\0" or "SPANIC\0", 7 bytes.
            if body + 7 <= len(data):
                self.fatal = self.fatal or data.startswith(_FATAL_SEVERITIES, body)
            elif body_length >= 7:
                self._probe = data[body:]
                self._want = _ERROR
        elif type_ in _COPY_START:
            self.copying = True

    def _body_start(self, data: bytes) -> None:
        want, self._want = self._want, 0
        if want == _READY:
            self.status = data[:1]
            self.ready_count += 1
            self.copying = False
        elif want == _ERROR:
            probe = self._probe + data[: 7 - len(self._probe)]
            if len(probe) < 7:
                self._probe, self._want = probe, _ERROR
            else:
                self._probe = b""
                self.fatal = self.fatal or probe.startswith(_FATAL_SEVERITIES)

    @property
    def idle(self) -> bool:
        """At a boundary right after ReadyForQuery `I`: no transaction is open."""
        return self.at_boundary and self.last_type == _READY and self.status == b"I"


class FrontendTracker(_Framer):
    """The client → compute direction."""

    __slots__ = ("last_activity", "requests", "terminated", "unsynced")
    NOTABLE = _FRONTEND_NOTABLE

    def __init__(self) -> None:
        super().__init__("client")
        self.requests = 0  # messages that each earn one ReadyForQuery (Query, Sync, FunctionCall)
        self.unsynced = False  # Parse/Bind/Execute/... sent since the last Sync
        self.terminated = False  # the client sent Terminate
        self.last_activity = 0.0

    def feed_at(self, data: bytes, now: float) -> None:
        """`feed`, recording `now` (the caller's clock) as the last client activity."""
        self.last_activity = now
        self.feed(data)

    def feed(self, data: bytes) -> None:
        # The generic walk with Query (one per simple request) counted inline.
        pos = self._resume(data) if self._pending else 0
        if pos < 0:
            return
        n = len(data)
        last = -1
        queries = 0
        while pos + 5 <= n:
            type_, length = _unpack_header(data, pos)
            if length < 4:
                self.requests += queries
                self._invalid(type_, length)
            last = type_
            if type_ == _QUERY:
                queries += 1
            elif type_ in _FRONTEND_NOTABLE:
                self._message(type_, data, pos + 5, length - 4)
            pos += 1 + length
        if queries:
            self.requests += queries
        if last >= 0:
            self.last_type = last
        if pos != n:
            self._pending = True
            if pos > n:
                self._skip = pos - n
            else:
                self._head = data[pos:]

    def _message(self, type_: int, data: bytes, body: int, body_length: int) -> None:
        if type_ == _QUERY or type_ == _FUNCTION_CALL:
            self.requests += 1
        elif type_ == _SYNC:
            self.requests += 1
            self.unsynced = False
        elif type_ in _EXTENDED:
            self.unsynced = True
        elif type_ == _TERMINATE:
            self.terminated = True
