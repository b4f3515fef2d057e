"""Wire message builders, parsers and the typed-message framer."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.pgwire import ProtocolViolation
from proxy.pgwire import messages as m
from proxy.pgwire.codec import MessageReader, frame

protocol_text = st.text(st.characters(codec="utf-8", exclude_characters="\0"))


def split(message: bytes) -> tuple[bytes, bytes]:
    reader = MessageReader()
    reader.feed(message)
    parsed = reader.next_message()
    assert parsed is not None
    assert reader.buffered == 0
    return parsed


# --- exact bytes ----------------------------------------------------------------------


def test_known_bytes() -> None:
    assert m.ready_for_query() == b"Z\x00\x00\x00\x05I"
    assert m.ready_for_query(b"T") == b"Z\x00\x00\x00\x05T"
    assert m.auth_ok() == b"R\x00\x00\x00\x08\x00\x00\x00\x00"
    assert m.auth_cleartext_password() == b"R\x00\x00\x00\x08\x00\x00\x00\x03"
    assert m.terminate() == b"X\x00\x00\x00\x04"
    assert m.ssl_request() == b"\x00\x00\x00\x08\x04\xd2\x16\x2f"
    assert m.auth_sasl(["SCRAM-SHA-256"]) == (
        b"R\x00\x00\x00\x17\x00\x00\x00\x0aSCRAM-SHA-256\x00\x00"
    )
    assert m.parameter_status("a", "b") == b"S\x00\x00\x00\x08a\x00b\x00"
    assert m.backend_key_data(7, b"\x01\x02\x03\x04") == (
        b"K\x00\x00\x00\x0c\x00\x00\x00\x07\x01\x02\x03\x04"
    )
    assert m.startup_message({"user": "u"}) == (
        b"\x00\x00\x00\x10\x00\x03\x00\x00user\x00u\x00\x00"
    )
    assert m.cancel_request(1, b"abcd") == (
        b"\x00\x00\x00\x10\x04\xd2\x16\x2e\x00\x00\x00\x01abcd"
    )
    assert m.password_message("pw") == b"p\x00\x00\x00\x07pw\x00"
    assert m.sasl_initial_response("X", b"") == b"p\x00\x00\x00\x0aX\x00\x00\x00\x00\x00"


def test_error_response_fields() -> None:
    message = m.error_response("28P01", "nope", detail="d", hint="h")
    assert message == (
        b"E\x00\x00\x00\x26SFATAL\x00VFATAL\x00C28P01\x00Mnope\x00Dd\x00Hh\x00\x00"
    )
    type_, body = split(message)
    assert type_ == b"E"
    assert m.parse_error_fields(body) == {
        "S": "FATAL", "V": "FATAL", "C": "28P01", "M": "nope", "D": "d", "H": "h",
    }


def test_notice_response_fields() -> None:
    type_, body = split(m.notice_response("waking up", hint="wait"))
    assert type_ == b"N"
    assert m.parse_error_fields(body) == {
        "S": "NOTICE", "V": "NOTICE", "C": "00000", "M": "waking up", "H": "wait",
    }


def test_error_fields_tolerate_non_utf8_text() -> None:
    assert m.parse_error_fields(b"Mcaf\xe9\x00\x00") == {"M": "caf\ufffd"}


# --- round trips ----------------------------------------------------------------------


@given(st.lists(protocol_text.filter(bool), min_size=1, max_size=5))
def test_sasl_mechanisms_round_trip(mechanisms: list[str]) -> None:
    type_, body = split(m.auth_sasl(mechanisms))
    code, rest = m.parse_authentication(body)
    assert (type_, code) == (b"R", m.AUTH_SASL)
    assert m.parse_sasl_mechanisms(rest) == mechanisms


@given(st.binary(max_size=200))
def test_sasl_continue_and_final_round_trip(data: bytes) -> None:
    for build, code in ((m.auth_sasl_continue, m.AUTH_SASL_CONTINUE),
                        (m.auth_sasl_final, m.AUTH_SASL_FINAL)):
        assert m.parse_authentication(split(build(data))[1]) == (code, data)


@given(protocol_text, protocol_text)
def test_parameter_status_round_trip(name: str, value: str) -> None:
    assert m.parse_parameter_status(split(m.parameter_status(name, value))[1]) == (name, value)


@given(st.integers(0, 2**32 - 1), st.binary(min_size=4, max_size=256))
def test_backend_key_data_round_trip(pid: int, secret: bytes) -> None:
    assert m.parse_backend_key_data(split(m.backend_key_data(pid, secret))[1]) == (pid, secret)


@given(protocol_text.filter(bool), st.binary(max_size=100))
def test_sasl_initial_response_round_trip(mechanism: str, data: bytes) -> None:
    type_, body = split(m.sasl_initial_response(mechanism, data))
    assert type_ == b"p"
    assert m.parse_sasl_initial_response(body) == (mechanism, data)


def test_sasl_initial_response_absent_data() -> None:
    assert m.parse_sasl_initial_response(b"SCRAM-SHA-256\x00\xff\xff\xff\xff") == (
        "SCRAM-SHA-256", b"",
    )


@given(st.integers(0, 0xFFFF), st.lists(protocol_text, max_size=4))
def test_negotiate_protocol_version_round_trip(minor: int, names: list[str]) -> None:
    type_, body = split(m.negotiate_protocol_version(minor, names))
    assert type_ == b"v"
    assert m.parse_negotiate_protocol_version(body) == (minor, names)


def test_password_message_round_trip() -> None:
    assert m.parse_password_message(split(m.password_message("s3cret"))[1]) == b"s3cret"
    assert m.parse_password_message(b"\xff\xfe\x00") == b"\xff\xfe"


def test_ready_for_query_round_trip() -> None:
    for status in (b"I", b"T", b"E"):
        assert m.parse_ready_for_query(split(m.ready_for_query(status))[1]) == status


# --- malformed bodies -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("parser", "body"),
    [
        (m.parse_error_fields, b""),
        (m.parse_error_fields, b"Mno terminator"),
        (m.parse_error_fields, b"Mx\x00"),
        (m.parse_error_fields, b"Mx\x00\x00extra"),
        (m.parse_authentication, b"\x00\x00\x00"),
        (m.parse_sasl_mechanisms, b""),
        (m.parse_sasl_mechanisms, b"\x00"),
        (m.parse_sasl_mechanisms, b"SCRAM-SHA-256\x00"),
        (m.parse_sasl_mechanisms, b"SCRAM-SHA-256\x00\x00x"),
        (m.parse_sasl_mechanisms, b"\xff\x00\x00"),
        (m.parse_backend_key_data, b"\x00\x00\x00\x01abc"),
        (m.parse_backend_key_data, b"\x00\x00\x00\x01" + b"a" * 257),
        (m.parse_parameter_status, b"a\x00"),
        (m.parse_parameter_status, b"a\x00b\x00c"),
        (m.parse_sasl_initial_response, b"X\x00\x00\x00\x00\x05abc"),
        (m.parse_sasl_initial_response, b"X\x00\x00\x00\x00\x01ab"),
        (m.parse_sasl_initial_response, b"X\x00\xff\xff\xff\xfe"),
        (m.parse_sasl_initial_response, b"X"),
        (m.parse_negotiate_protocol_version, b"\x00\x00\x00\x02\xff\xff\xff\xff"),
        (m.parse_negotiate_protocol_version, b"\x00\x00\x00\x02\x00\x00\x00\x01"),
        (m.parse_ready_for_query, b"X"),
        (m.parse_password_message, b"pw"),
    ],
)
def test_malformed_bodies(parser: object, body: bytes) -> None:
    assert callable(parser)
    with pytest.raises(ProtocolViolation) as info:
        parser(body)
    assert info.value.sqlstate == "08P01"


def test_builders_reject_bad_arguments() -> None:
    with pytest.raises(ValueError):
        m.backend_key_data(1, b"abc")
    with pytest.raises(ValueError):
        m.backend_key_data(1, b"a" * 257)
    with pytest.raises(ValueError):
        m.backend_key_data(-1, b"abcd")
    with pytest.raises(ValueError):
        m.parameter_status("a\0b", "c")
    with pytest.raises(ValueError):
        m.ready_for_query(b"X")
    with pytest.raises(ValueError):
        m.error_response("28P0", "x")
    with pytest.raises(ValueError):
        m.startup_message({"user": "x" * 10000})
    with pytest.raises(ValueError):
        m.auth_sasl([])


# --- MessageReader --------------------------------------------------------------------


def test_reader_byte_by_byte_with_trailing_bytes() -> None:
    stream = m.auth_ok() + m.parameter_status("a", "b") + m.ready_for_query() + b"Q\x00"
    reader = MessageReader()
    seen = []
    for byte in stream:
        reader.feed(bytes([byte]))
        while (message := reader.next_message()) is not None:
            seen.append(message[0])
    assert seen == [b"R", b"S", b"Z"]
    assert reader.buffered == 2
    assert reader.take_trailing() == b"Q\x00"
    assert reader.buffered == 0
    assert reader.next_message() is None


@pytest.mark.parametrize("length", [0, 3, 2**31, 2**32 - 1, 101])
def test_reader_rejects_bad_lengths(length: int) -> None:
    reader = MessageReader(max_length=100)
    reader.feed(b"Q" + length.to_bytes(4, "big"))
    with pytest.raises(ProtocolViolation) as info:
        reader.next_message()
    assert info.value.sqlstate == "08P01"
    assert str(length) in info.value.message


def test_reader_accepts_max_length() -> None:
    reader = MessageReader(max_length=100)
    reader.feed(frame(b"d", b"x" * 96))
    assert reader.next_message() == (b"d", b"x" * 96)


@given(st.lists(st.tuples(st.binary(min_size=1, max_size=1), st.binary(max_size=50))),
       st.integers(1, 20))
def test_reader_reassembles_any_chunking(messages: list[tuple[bytes, bytes]], chunk: int) -> None:
    stream = b"".join(frame(type_, body) for type_, body in messages)
    reader = MessageReader()
    parsed = []
    for start in range(0, len(stream), chunk):
        reader.feed(stream[start : start + chunk])
        while (message := reader.next_message()) is not None:
            parsed.append(message)
    assert parsed == messages
    assert reader.buffered == 0


@given(st.binary(max_size=300))
def test_reader_fuzz_parses_or_raises_protocol_violation(data: bytes) -> None:
    reader = MessageReader(max_length=64)
    reader.feed(data)
    try:
        while reader.next_message() is not None:
            pass
    except ProtocolViolation:
        pass
