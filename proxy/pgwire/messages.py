"""Builders and parsers for the PostgreSQL v3 messages the proxy sends and inspects.

Builders raise ValueError on bad arguments (our own fault); parsers raise
ProtocolViolation on malformed bodies (the peer's fault).
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence

from proxy.pgwire.codec import frame
from proxy.pgwire.errors import ProtocolViolation

# Untyped startup-phase packets.
MAX_STARTUP_PACKET_LENGTH = 10000 + 4  # PostgreSQL's limit on the payload, plus the length word
CANCEL_REQUEST_CODE = 80877102
SSL_REQUEST_CODE = 80877103
GSSENC_REQUEST_CODE = 80877104
# Protocol 3.2 lets the cancel key grow from 4 to up to 256 bytes.
MIN_CANCEL_SECRET_LENGTH = 4
MAX_CANCEL_SECRET_LENGTH = 256

# Authentication request codes ('R' messages).
AUTH_OK = 0
AUTH_CLEARTEXT_PASSWORD = 3
AUTH_MD5_PASSWORD = 5
AUTH_SASL = 10
AUTH_SASL_CONTINUE = 11
AUTH_SASL_FINAL = 12

_INT32 = struct.Struct("!i")
_UINT32 = struct.Struct("!I")
_MAX_UINT32 = (1 << 32) - 1
_TRANSACTION_STATUSES = (b"I", b"T", b"E")


def _cstring(value: str) -> bytes:
    encoded = value.encode("utf-8")
    if b"\0" in encoded:
        raise ValueError(f"NUL byte in protocol string {value!r}")
    return encoded + b"\0"


def _uint32(value: int, what: str) -> bytes:
    if not 0 <= value <= _MAX_UINT32:
        raise ValueError(f"{what} out of range: {value}")
    return _UINT32.pack(value)


def _check_cancel_secret(secret: bytes) -> None:
    if not MIN_CANCEL_SECRET_LENGTH <= len(secret) <= MAX_CANCEL_SECRET_LENGTH:
        raise ValueError(
            f"cancel secret must be {MIN_CANCEL_SECRET_LENGTH}..{MAX_CANCEL_SECRET_LENGTH}"
            f" bytes, got {len(secret)}"
        )


# --- backend messages (proxy -> client) ---------------------------------------------


def _authentication(code: int, rest: bytes = b"") -> bytes:
    return frame(b"R", _INT32.pack(code) + rest)


def auth_ok() -> bytes:
    return _authentication(AUTH_OK)


def auth_cleartext_password() -> bytes:
    return _authentication(AUTH_CLEARTEXT_PASSWORD)


def auth_sasl(mechanisms: Sequence[str]) -> bytes:
    if not mechanisms:
        raise ValueError("at least one SASL mechanism is required")
    return _authentication(AUTH_SASL, b"".join(_cstring(m) for m in mechanisms) + b"\0")


def auth_sasl_continue(data: bytes) -> bytes:
    return _authentication(AUTH_SASL_CONTINUE, data)


def auth_sasl_final(data: bytes) -> bytes:
    return _authentication(AUTH_SASL_FINAL, data)


def parameter_status(name: str, value: str) -> bytes:
    return frame(b"S", _cstring(name) + _cstring(value))


def backend_key_data(pid: int, secret: bytes) -> bytes:
    _check_cancel_secret(secret)
    return frame(b"K", _uint32(pid, "pid") + secret)


def ready_for_query(status: bytes = b"I") -> bytes:
    if status not in _TRANSACTION_STATUSES:
        raise ValueError(f"invalid transaction status {status!r}")
    return frame(b"Z", status)


def negotiate_protocol_version(newest_minor: int, unrecognized: Sequence[str]) -> bytes:
    body = _uint32(newest_minor, "minor version") + _UINT32.pack(len(unrecognized))
    return frame(b"v", body + b"".join(_cstring(name) for name in unrecognized))


def _fields_message(type_: bytes, fields: Sequence[tuple[bytes, str | None]]) -> bytes:
    body = b"".join(code + _cstring(value) for code, value in fields if value is not None)
    return frame(type_, body + b"\0")


def _check_sqlstate(sqlstate: str) -> None:
    if len(sqlstate) != 5 or not sqlstate.isascii() or not sqlstate.isalnum():
        raise ValueError(f"invalid SQLSTATE {sqlstate!r}")


def error_response(
    sqlstate: str,
    message: str,
    *,
    severity: str = "FATAL",
    detail: str | None = None,
    hint: str | None = None,
) -> bytes:
    _check_sqlstate(sqlstate)
    # S is the localised severity and V the untranslated one; we never localise,
    # but clients such as libpq prefer V when it is present.
    return _fields_message(
        b"E",
        [(b"S", severity), (b"V", severity), (b"C", sqlstate), (b"M", message), (b"D", detail),
         (b"H", hint)],
    )


def notice_response(
    message: str,
    *,
    sqlstate: str = "00000",
    detail: str | None = None,
    hint: str | None = None,
) -> bytes:
    _check_sqlstate(sqlstate)
    return _fields_message(
        b"N",
        [(b"S", "NOTICE"), (b"V", "NOTICE"), (b"C", sqlstate), (b"M", message), (b"D", detail),
         (b"H", hint)],
    )


# --- frontend messages (proxy -> compute) -------------------------------------------


def _untyped(payload: bytes) -> bytes:
    return _UINT32.pack(len(payload) + 4) + payload


def startup_message(params: Mapping[str, str], version: tuple[int, int] = (3, 0)) -> bytes:
    major, minor = version
    if not (0 <= major <= 0xFFFF and 0 <= minor <= 0xFFFF):
        raise ValueError(f"invalid protocol version {major}.{minor}")
    pairs = []
    for key, value in params.items():
        if not key:
            raise ValueError("empty startup parameter name")
        pairs.append(_cstring(key) + _cstring(value))
    packet = _untyped(_UINT32.pack(major << 16 | minor) + b"".join(pairs) + b"\0")
    if len(packet) > MAX_STARTUP_PACKET_LENGTH:
        raise ValueError(f"startup packet too long: {len(packet)} bytes")
    return packet


def ssl_request() -> bytes:
    return _untyped(_UINT32.pack(SSL_REQUEST_CODE))


def cancel_request(pid: int, secret: bytes) -> bytes:
    _check_cancel_secret(secret)
    return _untyped(_UINT32.pack(CANCEL_REQUEST_CODE) + _uint32(pid, "pid") + secret)


def sasl_initial_response(mechanism: str, data: bytes) -> bytes:
    return frame(b"p", _cstring(mechanism) + _INT32.pack(len(data)) + data)


def sasl_response(data: bytes) -> bytes:
    return frame(b"p", data)


def password_message(password: str) -> bytes:
    return frame(b"p", _cstring(password))


def terminate() -> bytes:
    return frame(b"X", b"")


# --- parsers ------------------------------------------------------------------------


class _BodyReader:
    """Cursor over one message body; every read past the end is a ProtocolViolation."""

    def __init__(self, body: bytes, what: str) -> None:
        self._body = body
        self._offset = 0
        self._what = what

    def fail(self, problem: str) -> ProtocolViolation:
        return ProtocolViolation(f"malformed {self._what} message: {problem}")

    def uint32(self) -> int:
        if self._offset + 4 > len(self._body):
            raise self.fail("truncated")
        (value,) = _UINT32.unpack_from(self._body, self._offset)
        self._offset += 4
        return int(value)

    def int32(self) -> int:
        value = self.uint32()
        return value - (1 << 32) if value >= 1 << 31 else value

    def cstring_bytes(self) -> bytes:
        end = self._body.find(b"\0", self._offset)
        if end < 0:
            raise self.fail("missing string terminator")
        value = self._body[self._offset : end]
        self._offset = end + 1
        return value

    def cstring(self, errors: str = "strict") -> str:
        raw = self.cstring_bytes()
        try:
            return raw.decode("utf-8", errors)
        except UnicodeDecodeError:
            raise self.fail("invalid UTF-8") from None

    def take(self, count: int) -> bytes:
        if self._offset + count > len(self._body):
            raise self.fail("truncated")
        value = self._body[self._offset : self._offset + count]
        self._offset += count
        return value

    def rest(self) -> bytes:
        value = self._body[self._offset :]
        self._offset = len(self._body)
        return value

    def at_end(self) -> bool:
        return self._offset == len(self._body)

    def end(self) -> None:
        if not self.at_end():
            raise self.fail("unexpected trailing bytes")


def parse_error_fields(body: bytes) -> dict[str, str]:
    """Fields of an ErrorResponse or NoticeResponse body, keyed by their one-letter code."""
    reader = _BodyReader(body, "error/notice")
    fields: dict[str, str] = {}
    while True:
        code = reader.take(1)
        if code == b"\0":
            reader.end()
            return fields
        # The compute may word messages in a non-UTF-8 lc_messages encoding; that
        # is not a framing error, so keep the text readable instead of failing.
        fields[code.decode("latin-1")] = reader.cstring(errors="replace")


def parse_authentication(body: bytes) -> tuple[int, bytes]:
    reader = _BodyReader(body, "authentication")
    code = reader.int32()
    return code, reader.rest()


def parse_sasl_mechanisms(rest: bytes) -> list[str]:
    """Mechanism names from the rest of an AuthenticationSASL body."""
    reader = _BodyReader(rest, "AuthenticationSASL")
    mechanisms = []
    while mechanism := reader.cstring():
        mechanisms.append(mechanism)
    reader.end()
    if not mechanisms:
        raise reader.fail("no mechanisms offered")
    return mechanisms


def parse_backend_key_data(body: bytes) -> tuple[int, bytes]:
    reader = _BodyReader(body, "BackendKeyData")
    pid = reader.uint32()
    secret = reader.rest()
    if not MIN_CANCEL_SECRET_LENGTH <= len(secret) <= MAX_CANCEL_SECRET_LENGTH:
        raise reader.fail(f"cancel key length {len(secret)}")
    return pid, secret


def parse_parameter_status(body: bytes) -> tuple[str, str]:
    reader = _BodyReader(body, "ParameterStatus")
    name = reader.cstring()
    value = reader.cstring()
    reader.end()
    return name, value


def parse_ready_for_query(body: bytes) -> bytes:
    if body not in _TRANSACTION_STATUSES:
        raise ProtocolViolation(f"malformed ReadyForQuery message: status {body!r}")
    return body


def parse_negotiate_protocol_version(body: bytes) -> tuple[int, list[str]]:
    reader = _BodyReader(body, "NegotiateProtocolVersion")
    newest_minor = reader.uint32()
    count = reader.uint32()
    # Each name takes at least one byte, which bounds the count by the body size.
    if count > len(body):
        raise reader.fail(f"option count {count}")
    names = [reader.cstring() for _ in range(count)]
    reader.end()
    return newest_minor, names


def parse_sasl_initial_response(body: bytes) -> tuple[str, bytes]:
    """(mechanism, data) from a SASLInitialResponse; a data length of -1 means no data."""
    reader = _BodyReader(body, "SASLInitialResponse")
    mechanism = reader.cstring()
    length = reader.int32()
    if length == -1:
        data = b""
    elif length < 0:
        raise reader.fail(f"data length {length}")
    else:
        data = reader.take(length)
    reader.end()
    return mechanism, data


def parse_password_message(body: bytes) -> bytes:
    """The password of a PasswordMessage, as bytes: PostgreSQL does not require UTF-8."""
    reader = _BodyReader(body, "PasswordMessage")
    password = reader.cstring_bytes()
    reader.end()
    return password
