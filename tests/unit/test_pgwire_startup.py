"""Startup-phase parser: every packet whole, byte by byte, with trailing bytes, and fuzzed."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.pgwire import ProtocolViolation
from proxy.pgwire import messages as m
from proxy.pgwire.startup import (
    CancelRequest,
    GSSENCRequest,
    SSLRequest,
    StartupEvent,
    StartupMessage,
    StartupParser,
    extract_endpoint_from_options,
    parse_options,
)

GSSENC_REQUEST = struct.pack("!II", 8, m.GSSENC_REQUEST_CODE)


def packet(code: int, payload: bytes = b"") -> bytes:
    return struct.pack("!II", 8 + len(payload), code) + payload


def version(major: int, minor: int) -> int:
    return major << 16 | minor


def drain(parser: StartupParser) -> list[StartupEvent]:
    events = []
    while (event := parser.next_event()) is not None:
        events.append(event)
    return events


def feed_whole(data: bytes) -> tuple[list[StartupEvent], StartupParser]:
    parser = StartupParser()
    parser.feed(data)
    return drain(parser), parser


def feed_bytewise(data: bytes) -> tuple[list[StartupEvent], StartupParser]:
    parser = StartupParser()
    events = []
    for byte in data:
        parser.feed(bytes([byte]))
        events.extend(drain(parser))
    return events, parser


def startup(params: dict[str, str], minor: int = 0, options: dict[str, str] | None = None) -> bytes:
    return m.startup_message({**params, **(options or {})}, version=(3, minor))


VALID = [
    (m.ssl_request(), [SSLRequest()]),
    (GSSENC_REQUEST, [GSSENCRequest()]),
    (m.cancel_request(42, b"\x01\x02\x03\x04"), [CancelRequest(42, b"\x01\x02\x03\x04")]),
    (m.cancel_request(2**32 - 1, b"k" * 256), [CancelRequest(2**32 - 1, b"k" * 256)]),
    (startup({"user": "alice"}), [StartupMessage(3, 0, {"user": "alice"}, {})]),
    (
        startup({"user": "bob", "database": "db", "options": "endpoint=ep-1"}, minor=2,
                options={"_pq_.test": "on"}),
        [StartupMessage(3, 2, {"user": "bob", "database": "db", "options": "endpoint=ep-1"},
                        {"_pq_.test": "on"})],
    ),
    (startup({"user": "zoë", "application_name": ""}),
     [StartupMessage(3, 0, {"user": "zoë", "application_name": ""}, {})]),
    (
        m.ssl_request() + startup({"user": "u"}),
        [SSLRequest(), StartupMessage(3, 0, {"user": "u"}, {})],
    ),
    (
        GSSENC_REQUEST + m.ssl_request() + m.cancel_request(1, b"abcd"),
        [GSSENCRequest(), SSLRequest(), CancelRequest(1, b"abcd")],
    ),
]


@pytest.mark.parametrize(("data", "expected"), VALID)
@pytest.mark.parametrize("feed", [feed_whole, feed_bytewise])
def test_valid_input(data: bytes, expected: list[StartupEvent], feed: object) -> None:
    assert callable(feed)
    events, parser = feed(data)
    assert events == expected
    assert parser.trailing_data == b""
    assert parser.buffered == 0


@pytest.mark.parametrize(("data", "expected"), VALID)
def test_valid_input_with_trailing_bytes(data: bytes, expected: list[StartupEvent]) -> None:
    # Three bytes can never complete a packet, so they must come back untouched.
    events, parser = feed_whole(data + b"\x16\x03\x01")
    assert events == expected
    assert parser.trailing_data == b"\x16\x03\x01"
    assert parser.buffered == 3


def test_bytes_after_ssl_request_are_visible_before_the_tls_handshake() -> None:
    # CVE-2021-23214: data pipelined behind SSLRequest was sent in the clear and
    # must not be taken as if it came through TLS.
    parser = StartupParser()
    parser.feed(m.ssl_request() + startup({"user": "mallory"}))
    assert parser.next_event() == SSLRequest()
    assert parser.trailing_data == startup({"user": "mallory"})


def test_parser_stops_after_startup_message() -> None:
    typed = m.password_message("pw")
    events, parser = feed_whole(startup({"user": "u"}) + typed)
    assert events == [StartupMessage(3, 0, {"user": "u"}, {})]
    assert parser.trailing_data == typed
    assert parser.next_event() is None


def test_cancel_secret_is_not_in_repr() -> None:
    assert "abcd" not in repr(CancelRequest(1, b"abcd"))


def violation(data: bytes) -> ProtocolViolation:
    parser = StartupParser()
    parser.feed(data)
    with pytest.raises(ProtocolViolation) as info:
        drain(parser)
    return info.value


@pytest.mark.parametrize("length", [*range(8), 10005, 2**31 - 1, 2**32 - 1])
def test_bad_lengths_are_rejected_from_the_length_word_alone(length: int) -> None:
    error = violation(struct.pack("!I", length))
    assert error.sqlstate == "08P01"
    assert error.message == f"invalid startup packet length {length}"


def test_length_8_is_an_ssl_request_or_an_unterminated_startup() -> None:
    assert feed_whole(packet(m.SSL_REQUEST_CODE))[0] == [SSLRequest()]
    error = violation(packet(version(3, 0)))
    assert "expected terminator" in error.message


def test_maximum_length_startup_packet() -> None:
    padding = "x" * (m.MAX_STARTUP_PACKET_LENGTH - len(startup({"user": "u", "p": ""})))
    data = startup({"user": "u", "p": padding})
    assert len(data) == m.MAX_STARTUP_PACKET_LENGTH
    assert feed_whole(data)[0] == [StartupMessage(3, 0, {"user": "u", "p": padding}, {})]
    oversized = struct.pack("!I", len(data) + 1) + data[4:] + b"\0"
    assert "10005" in violation(oversized).message


@pytest.mark.parametrize(("major", "minor"), [(3, 0), (3, 1), (3, 2), (3, 9999), (3, 0xFFFF)])
def test_supported_major_reports_any_minor(major: int, minor: int) -> None:
    events, _ = feed_whole(packet(version(major, minor), b"user\0u\0\0"))
    assert events == [StartupMessage(major, minor, {"user": "u"}, {})]


@pytest.mark.parametrize(("major", "minor"), [(2, 0), (4, 0), (1234, 5677), (0, 0)])
def test_unsupported_major_is_rejected_from_the_header(major: int, minor: int) -> None:
    # Only the 8-byte header is fed: the decision must not wait for the body.
    error = violation(struct.pack("!II", 100, version(major, minor)))
    assert error.sqlstate == "0A000"
    assert error.message == (
        f"unsupported frontend protocol {major}.{minor}: server supports 3.0 to 3.2"
    )


@pytest.mark.parametrize(
    "data",
    [
        struct.pack("!II", 12, m.SSL_REQUEST_CODE),
        struct.pack("!II", 16, m.GSSENC_REQUEST_CODE),
        struct.pack("!II", 12, m.CANCEL_REQUEST_CODE),
        struct.pack("!II", 15, m.CANCEL_REQUEST_CODE),
        struct.pack("!II", 269, m.CANCEL_REQUEST_CODE),
    ],
)
def test_special_packets_with_wrong_length(data: bytes) -> None:
    assert violation(data).sqlstate == "08P01"


@pytest.mark.parametrize("request_", [m.ssl_request(), GSSENC_REQUEST])
def test_repeated_encryption_request_is_rejected_like_postgres(request_: bytes) -> None:
    error = violation(request_ + request_)
    assert error.sqlstate == "0A000"
    assert error.message.startswith("unsupported frontend protocol 1234.")


@pytest.mark.parametrize(
    ("payload", "problem"),
    [
        (b"", "expected terminator"),
        (b"user\0u\0", "expected terminator"),
        (b"user\0u", "expected terminator"),
        (b"user\0\0", "without a value"),
        (b"user\0u\0database\0\0", "without a value"),
        (b"\0u\0user\0u\0\0", "empty parameter name"),
        (b"user\0u\0user\0v\0\0", 'duplicate startup parameter "user"'),
        (b"user\0u\0_pq_.x\0a\0_pq_.x\0b\0\0", 'duplicate startup parameter "_pq_.x"'),
        (b"user\0\xff\0\0", "invalid UTF-8"),
        (b"\xc3\0u\0user\0u\0\0", "invalid UTF-8"),
    ],
)
def test_malformed_startup_message(payload: bytes, problem: str) -> None:
    error = violation(packet(version(3, 0), payload))
    assert error.sqlstate == "08P01"
    assert problem in error.message


@pytest.mark.parametrize("payload", [b"\0", b"database\0d\0\0", b"user\0\0\0", b"_pq_.user\0u\0\0"])
def test_missing_user_is_rejected_like_postgres(payload: bytes) -> None:
    error = violation(packet(version(3, 0), payload))
    assert error.sqlstate == "28000"
    assert error.message == "no PostgreSQL user name specified in startup packet"


@given(st.binary(max_size=64), st.integers(1, 16))
def test_fuzz_parses_or_raises_protocol_violation(data: bytes, chunk: int) -> None:
    parser = StartupParser()
    try:
        for start in range(0, len(data), chunk):
            parser.feed(data[start : start + chunk])
            drain(parser)
    except ProtocolViolation:
        pass


@given(st.binary(max_size=64))
def test_fuzz_after_valid_header(payload: bytes) -> None:
    parser = StartupParser()
    parser.feed(packet(version(3, 0), payload))
    try:
        drain(parser)
    except ProtocolViolation:
        pass


text = st.text(st.characters(codec="utf-8", exclude_characters="\0"), max_size=20)
keys = text.filter(lambda key: bool(key) and not key.startswith("_pq_."))


@given(
    st.dictionaries(keys, text, max_size=5),
    text.filter(bool),
    st.dictionaries(text.map(lambda name: "_pq_." + name), text, max_size=3),
    st.integers(0, 0xFFFF),
)
def test_generated_startup_messages_round_trip(
    params: dict[str, str], user: str, options: dict[str, str], minor: int
) -> None:
    params = {**params, "user": user}
    data = m.startup_message({**params, **options}, version=(3, minor))
    for feed in (feed_whole, feed_bytewise):
        events, parser = feed(data)
        assert events == [StartupMessage(3, minor, params, options)]
        assert parser.buffered == 0


# --- options ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "tokens"),
    [
        ("", []),
        ("   ", []),
        ("-c geqo=off", ["-c", "geqo=off"]),
        ("  -c\tgeqo=off\n", ["-c", "geqo=off"]),
        (r"-c search_path=a\ b", ["-c", "search_path=a b"]),
        (r"a\\b", [r"a\b"]),
        ("a\\", ["a"]),
        ("\\", [""]),
        ("x\u00a0y", ["x\u00a0y"]),  # only ASCII whitespace separates, as in C isspace()
    ],
)
def test_parse_options(options: str, tokens: list[str]) -> None:
    assert parse_options(options) == tokens


@pytest.mark.parametrize(
    ("options", "endpoint", "rest"),
    [
        ("", None, ""),
        ("-c geqo=off", None, "-c geqo=off"),
        ("endpoint=ep-1", "ep-1", ""),
        ("endpoint=ep-1 -c geqo=off", "ep-1", "-c geqo=off"),
        (r"-c search_path=a\ b endpoint=ep-1", "ep-1", r"-c search_path=a\ b"),
        ("endpoint=ep-1 endpoint=ep-1", "ep-1", ""),
        ("-c endpoint=ep-1 -c geqo=off", "ep-1", "-c geqo=off"),
        ("--endpoint=ep-1", None, "--endpoint=ep-1"),
        ("endpoint", None, "endpoint"),
    ],
)
def test_extract_endpoint(options: str, endpoint: str | None, rest: str) -> None:
    assert extract_endpoint_from_options(options) == (endpoint, rest)


@pytest.mark.parametrize(
    ("options", "problem"),
    [("endpoint=a endpoint=b", "conflicting endpoint ids in options"),
     ("endpoint=", "empty endpoint id in options")],
)
def test_extract_endpoint_rejects(options: str, problem: str) -> None:
    with pytest.raises(ProtocolViolation) as info:
        extract_endpoint_from_options(options)
    assert (info.value.sqlstate, info.value.message) == ("08P01", problem)


@given(st.lists(st.text(min_size=1, max_size=10).filter(lambda t: not t.startswith("endpoint=")),
                max_size=6))
def test_remaining_options_keep_their_tokens(tokens: list[str]) -> None:
    escaped = " ".join("".join("\\" + c if c in " \t\n\v\f\r\\" else c for c in t) for t in tokens)
    assert parse_options(escaped) == tokens
    endpoint, rest = extract_endpoint_from_options("endpoint=ep-x " + escaped)
    assert endpoint == "ep-x"
    assert parse_options(rest) == tokens
