"""Sans-IO parser for the untyped startup phase: SSL/GSS requests, cancels, StartupMessage.

One parser serves a connection across its TLS upgrade: feed it the plaintext
bytes, then (after checking ``trailing_data`` is empty, CVE-2021-23214) the
decrypted ones.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from proxy.pgwire.errors import ProtocolViolation
from proxy.pgwire.messages import (
    CANCEL_REQUEST_CODE,
    GSSENC_REQUEST_CODE,
    MAX_CANCEL_SECRET_LENGTH,
    MAX_STARTUP_PACKET_LENGTH,
    MIN_CANCEL_SECRET_LENGTH,
    SSL_REQUEST_CODE,
)

MIN_STARTUP_PACKET_LENGTH = 8
SUPPORTED_MAJOR = 3
NEWEST_SUPPORTED_MINOR = 2
PROTOCOL_OPTION_PREFIX = "_pq_."

_HEADER = struct.Struct("!II")
_UINT32 = struct.Struct("!I")
_CANCEL_MIN_LENGTH = _HEADER.size + 4 + MIN_CANCEL_SECRET_LENGTH
_CANCEL_MAX_LENGTH = _HEADER.size + 4 + MAX_CANCEL_SECRET_LENGTH
# What PostgreSQL's pg_split_opts treats as a separator: C isspace() in the C locale.
_OPTION_SPACES = frozenset(" \t\n\v\f\r")


@dataclass(frozen=True)
class SSLRequest:
    pass


@dataclass(frozen=True)
class GSSENCRequest:
    pass


@dataclass(frozen=True)
class CancelRequest:
    pid: int
    secret: bytes = field(repr=False)  # anyone holding it can cancel the session's queries


@dataclass(frozen=True)
class StartupMessage:
    major: int
    minor: int
    params: dict[str, str]
    protocol_options: dict[str, str]  # the `_pq_.*` keys, kept whole


StartupEvent = SSLRequest | GSSENCRequest | CancelRequest | StartupMessage


def _unsupported_version(code: int) -> ProtocolViolation:
    return ProtocolViolation(
        f"unsupported frontend protocol {code >> 16}.{code & 0xFFFF}: server supports"
        f" {SUPPORTED_MAJOR}.0 to {SUPPORTED_MAJOR}.{NEWEST_SUPPORTED_MINOR}",
        sqlstate="0A000",
    )


class StartupParser:
    """Turns the bytes a client sends before authentication into startup events.

    The parser stops after a StartupMessage or CancelRequest: what follows is
    typed messages (or nothing), left in ``trailing_data``.  It never waits for
    more than MAX_STARTUP_PACKET_LENGTH bytes before deciding.
    """

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._finished = False
        self._seen_ssl_request = False
        self._seen_gssenc_request = False

    def feed(self, data: bytes) -> None:
        self._buffer += data

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    @property
    def trailing_data(self) -> bytes:
        """Bytes after the last complete packet (non-empty right after SSLRequest is an attack)."""
        return bytes(self._buffer)

    def next_event(self) -> StartupEvent | None:
        """The next packet's event, or None until more bytes arrive (or after the last packet)."""
        if self._finished or len(self._buffer) < 4:
            return None
        (length,) = _UINT32.unpack_from(self._buffer)
        if not MIN_STARTUP_PACKET_LENGTH <= length <= MAX_STARTUP_PACKET_LENGTH:
            raise ProtocolViolation(f"invalid startup packet length {length}")
        if len(self._buffer) < _HEADER.size:
            return None
        code = self._check_header(length, _UINT32.unpack_from(self._buffer, 4)[0])
        if len(self._buffer) < length:
            return None
        payload = bytes(self._buffer[_HEADER.size : length])
        del self._buffer[:length]
        return self._event(code, payload)

    def _check_header(self, length: int, code: int) -> int:
        # Everything decidable from the first 8 bytes is decided there, so a bad
        # packet never makes us wait for (and buffer) its claimed length.
        if code in (SSL_REQUEST_CODE, GSSENC_REQUEST_CODE):
            seen = self._seen_ssl_request if code == SSL_REQUEST_CODE else self._seen_gssenc_request
            if seen:
                # PostgreSQL accepts each negotiation once; a repeat is read as a
                # version number, and rejected as one.
                raise _unsupported_version(code)
            if length != _HEADER.size:
                name = "SSLRequest" if code == SSL_REQUEST_CODE else "GSSENCRequest"
                raise ProtocolViolation(f"invalid {name} packet length {length}")
        elif code == CANCEL_REQUEST_CODE:
            if not _CANCEL_MIN_LENGTH <= length <= _CANCEL_MAX_LENGTH:
                raise ProtocolViolation(f"invalid CancelRequest packet length {length}")
        elif code >> 16 != SUPPORTED_MAJOR:
            raise _unsupported_version(code)
        return code

    def _event(self, code: int, payload: bytes) -> StartupEvent:
        if code == SSL_REQUEST_CODE:
            self._seen_ssl_request = True
            return SSLRequest()
        if code == GSSENC_REQUEST_CODE:
            self._seen_gssenc_request = True
            return GSSENCRequest()
        self._finished = True
        if code == CANCEL_REQUEST_CODE:
            (pid,) = _UINT32.unpack_from(payload)
            return CancelRequest(pid=pid, secret=payload[4:])
        params, protocol_options = _parse_parameters(payload)
        return StartupMessage(
            major=code >> 16, minor=code & 0xFFFF, params=params, protocol_options=protocol_options
        )


def _parse_parameters(payload: bytes) -> tuple[dict[str, str], dict[str, str]]:
    # Layout: (key NUL value NUL)* NUL.  After dropping the final NUL every
    # remaining string is NUL-terminated, so the split must end with an empty tail.
    if not payload.endswith(b"\0"):
        raise ProtocolViolation("invalid startup packet layout: expected terminator as last byte")
    strings = payload[:-1].split(b"\0")
    if strings.pop() != b"":
        raise ProtocolViolation("invalid startup packet layout: expected terminator as last byte")
    if len(strings) % 2:
        raise ProtocolViolation("invalid startup packet layout: parameter without a value")
    params: dict[str, str] = {}
    protocol_options: dict[str, str] = {}
    for raw_key, raw_value in zip(strings[::2], strings[1::2], strict=True):
        try:
            key = raw_key.decode("utf-8")
            value = raw_value.decode("utf-8")
        except UnicodeDecodeError:
            raise ProtocolViolation("invalid UTF-8 in startup packet") from None
        if not key:
            raise ProtocolViolation("invalid startup packet layout: empty parameter name")
        target = protocol_options if key.startswith(PROTOCOL_OPTION_PREFIX) else params
        if key in target:
            raise ProtocolViolation(f'duplicate startup parameter "{key}"')
        target[key] = value
    if not params.get("user"):
        # PostgreSQL's wording and SQLSTATE, so clients see what they would from it.
        raise ProtocolViolation(
            "no PostgreSQL user name specified in startup packet", sqlstate="28000"
        )
    return params, protocol_options


def parse_options(options: str) -> list[str]:
    """Split a libpq ``options`` value like PostgreSQL's pg_split_opts.

    Tokens are separated by ASCII whitespace; a backslash makes the next
    character literal (a trailing lone backslash is dropped).
    """
    tokens: list[str] = []
    current: list[str] = []
    in_token = False
    escaped = False
    for char in options:
        if escaped:
            current.append(char)
            escaped = False
        elif char == "\\":
            in_token = True
            escaped = True
        elif char in _OPTION_SPACES:
            if in_token:
                tokens.append("".join(current))
                current = []
                in_token = False
        else:
            in_token = True
            current.append(char)
    if in_token:
        tokens.append("".join(current))
    return tokens


def _escape_option(token: str) -> str:
    return "".join("\\" + c if c == "\\" or c in _OPTION_SPACES else c for c in token)


def extract_endpoint_from_options(options: str) -> tuple[str | None, str]:
    """Find ``endpoint=<id>`` tokens; return the id and the options without them, re-escaped.

    This is how clients that cannot send SNI name their endpoint.
    """
    return extract_option(options, "endpoint")


def extract_option(options: str, name: str) -> tuple[str | None, str]:
    """Take the proxy's own ``<name>=<value>`` tokens out of a libpq ``options`` value.

    Returns the value and the rest, re-escaped for the compute. A ``-c``
    right before such a token goes with it: left alone it would swallow the
    next option when the compute parses the rest.
    """
    found: str | None = None
    kept: list[str] = []
    for token in parse_options(options):
        key, sep, value = token.partition("=")
        if key != name or not sep:
            kept.append(token)
            continue
        label = "endpoint id" if name == "endpoint" else name
        if not value:
            raise ProtocolViolation(f"empty {label} in options")
        if found is not None and found != value:
            raise ProtocolViolation(f"conflicting {label}s in options")
        found = value
        if kept and kept[-1] == "-c":
            kept.pop()
    # An empty token (from a lone backslash) has no escaped form; dropping it is harmless.
    return found, " ".join(_escape_option(token) for token in kept if token)
