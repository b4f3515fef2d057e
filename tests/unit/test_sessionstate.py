"""The survey's answer parsing and the restore batch, without a server (the
integration tests run both against real computes)."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.attach import restore_messages
from proxy.pgwire import messages
from proxy.pgwire.codec import MessageReader, frame
from proxy.pgwire.errors import ProtocolViolation
from proxy.sessionstate import (
    PreparedStatement,
    SessionSnapshot,
    parse_data_row,
    parse_probe_answer,
)


def row(*values: bytes | None) -> tuple[bytes, bytes]:
    body = struct.pack("!H", len(values))
    for value in values:
        body += struct.pack("!i", -1) if value is None else struct.pack("!i", len(value)) + value
    return b"D", body


DONE = (b"C", b"SELECT 1\x00")


def test_a_probe_answer_becomes_a_snapshot() -> None:
    answer = [
        (b"T", b""), row(b"f", b"t", b"f", b"t"), DONE,
        (b"T", b""), row(b"work_mem", b"7MB"), row(b"search_path", b'"$user", public'), DONE,
        (b"T", b""), row(b"p1", b"PREPARE p1(int) AS select $1", b"t", b"{23}"),
        row(b"_pg3_0", b"select $1::int", b"f", b"{21,25}"), DONE,
        (b"T", b""), row(b"jobs"), row(b'We "quote"'), DONE,
        (b"Z", b"I"),
    ]
    snapshot = parse_probe_answer(answer)
    assert snapshot.pins == ("advisory_locks", "listen")
    assert snapshot.settings == {"work_mem": "7MB", "search_path": '"$user", public'}
    assert snapshot.prepared == (
        PreparedStatement("p1", "PREPARE p1(int) AS select $1", True, (23,)),
        PreparedStatement("_pg3_0", "select $1::int", False, (21, 25)),
    )
    assert snapshot.listening == ("jobs", 'We "quote"')


def test_an_error_pins_the_session() -> None:
    error = messages.error_response("57014", "canceling statement due to statement timeout",
                                    severity="ERROR")
    answer = [(b"E", error[5:]), (b"Z", b"I")]
    assert parse_probe_answer(answer).pins == ("probe_failed:57014",)


def test_an_unexpected_answer_is_a_protocol_violation() -> None:
    with pytest.raises(ProtocolViolation):
        parse_probe_answer([DONE, (b"Z", b"I")])


@given(st.binary(max_size=64))
def test_fuzz_data_rows_parse_or_raise_the_protocol_error(body: bytes) -> None:
    try:
        parse_data_row(body)
    except ProtocolViolation:
        pass


def test_the_restore_batch_is_one_extended_exchange_with_one_sync() -> None:
    snapshot = SessionSnapshot(
        settings={"work_mem": "7MB"},
        prepared=(
            PreparedStatement("p1", "PREPARE p1(int) AS select $1", True, (23,)),
            PreparedStatement("_pg3_0", "select $1::int", False, (21,)),
        ),
    )
    reader = MessageReader()
    reader.feed(restore_messages(snapshot))
    kinds = []
    while (message := reader.next_message()) is not None:
        kinds.append(message[0])
    assert b"".join(kinds) == b"PBE" + b"PBE" + b"P" + b"S"
    assert restore_messages(SessionSnapshot()) == b""
    assert frame(b"S", b"") == restore_messages(snapshot)[-5:]
