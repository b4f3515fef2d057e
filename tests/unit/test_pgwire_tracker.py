"""The message-boundary trackers: whole, byte by byte, with trailing bytes, and fuzzed."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.pgwire import messages
from proxy.pgwire.codec import frame
from proxy.pgwire.errors import ProtocolViolation
from proxy.pgwire.tracker import BackendTracker, FrontendTracker

ROW = frame(b"D", b"\x00\x01\x00\x00\x00\x03abc")
COMPLETE = frame(b"C", b"SELECT 1\x00")
FATAL = messages.error_response("57P01", "terminating connection due to administrator command")
QUERY_ERROR = messages.error_response("42P01", "no such table", severity="ERROR")
BACKEND = (
    frame(b"T", b"\x00\x01a\x00" + bytes(18))
    + ROW
    + COMPLETE
    + messages.ready_for_query(b"T")
    + frame(b"G", b"\x00\x00\x00")
    + QUERY_ERROR
    + messages.ready_for_query(b"E")
    + frame(b"D", bytes(70_000))
    + messages.ready_for_query(b"I")
)
FRONTEND = (
    frame(b"Q", b"select 1\x00")
    + frame(b"P", b"s1\x00select $1\x00\x00\x00")
    + frame(b"B", b"\x00s1\x00" + bytes(6))
    + frame(b"E", b"\x00\x00\x00\x00\x00")
    + frame(b"S", b"")
    + frame(b"P", b"\x00select 2\x00\x00\x00")
)


def chunks(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


@pytest.mark.parametrize("size", [1, 2, 3, 4, 5, 6, 7, 13, 4096, 1 << 20])
def test_backend_stream_in_any_chunking(size: int) -> None:
    tracker = BackendTracker()
    seen = []
    for chunk in chunks(BACKEND, size):
        tracker.feed(chunk)
        seen.append((tracker.ready_count, tracker.status))
    assert tracker.at_boundary and tracker.idle
    assert tracker.ready_count == 3 and tracker.status == b"I"
    assert not tracker.copying and not tracker.fatal
    if size > 13:
        return  # several ReadyForQuery share a chunk: only the last status shows
    # The statuses were seen in order, each once its byte arrived.
    statuses: list[tuple[int, bytes]] = []
    for count, status in seen:
        if count and (not statuses or statuses[-1][0] != count):
            statuses.append((count, status))
    assert [s for _, s in statuses] == [b"T", b"E", b"I"]


@pytest.mark.parametrize("size", [1, 3, 5, 4096])
def test_copy_and_fatal_are_noticed(size: int) -> None:
    tracker = BackendTracker()
    for chunk in chunks(frame(b"H", b"\x00\x00\x00") + ROW, size):
        tracker.feed(chunk)
    assert tracker.copying and tracker.at_boundary and not tracker.idle
    for chunk in chunks(FATAL, size):
        tracker.feed(chunk)
    assert tracker.fatal and tracker.at_boundary


def test_a_non_fatal_error_is_not_fatal() -> None:
    tracker = BackendTracker()
    tracker.feed(QUERY_ERROR)
    assert not tracker.fatal


@pytest.mark.parametrize("size", [1, 2, 5, 6, 4096])
def test_trailing_bytes_leave_the_stream_inside_a_message(size: int) -> None:
    tracker = BackendTracker()
    for chunk in chunks(BACKEND + b"D\x00\x00", size):
        tracker.feed(chunk)
    assert not tracker.at_boundary and not tracker.idle
    tracker.feed(b"\x00\x08abcd")
    assert tracker.at_boundary and tracker.last_type == ord("D")
    tracker.feed(b"D\x00\x00\x00\x09abc")
    assert not tracker.at_boundary


@pytest.mark.parametrize("size", [1, 2, 4, 5, 9, 4096])
def test_frontend_requests_sync_and_terminate(size: int) -> None:
    tracker = FrontendTracker()
    for chunk in chunks(FRONTEND, size):
        tracker.feed_at(chunk, 7.0)
    assert tracker.requests == 2  # the Query and the Sync
    assert tracker.unsynced  # a Parse after the Sync
    assert tracker.at_boundary and not tracker.terminated
    assert tracker.last_activity == 7.0
    for chunk in chunks(frame(b"S", b"") + messages.terminate(), size):
        tracker.feed(chunk)
    assert tracker.terminated and not tracker.unsynced and tracker.requests == 3


@pytest.mark.parametrize("length", [0, 1, 2, 3])
def test_an_impossible_length_is_a_protocol_violation(length: int) -> None:
    tracker = FrontendTracker()
    with pytest.raises(ProtocolViolation) as info:
        tracker.feed(b"Q" + length.to_bytes(4, "big") + b"rest")
    assert "from the client" in info.value.message
    assert tracker.broken and not tracker.at_boundary
    tracker.feed(b"more bytes")  # ignored once broken
    assert tracker.broken


@given(st.lists(st.binary(max_size=40), max_size=20))
def test_fuzz_backend_parses_or_raises_the_protocol_error(parts: list[bytes]) -> None:
    tracker = BackendTracker()
    try:
        for part in parts:
            tracker.feed(part)
    except ProtocolViolation:
        assert tracker.broken


@given(st.lists(st.binary(max_size=40), max_size=20))
def test_fuzz_frontend_parses_or_raises_the_protocol_error(parts: list[bytes]) -> None:
    tracker = FrontendTracker()
    try:
        for part in parts:
            tracker.feed(part)
    except ProtocolViolation:
        assert tracker.broken


@given(
    st.lists(st.tuples(st.sampled_from(b"DCTZEN"), st.binary(max_size=30)), max_size=15),
    st.integers(min_value=1, max_value=40),
)
def test_fuzz_valid_streams_agree_whatever_the_chunking(
    bodies: list[tuple[int, bytes]], size: int
) -> None:
    stream = b"".join(frame(bytes([t]), b) for t, b in bodies)
    whole, split = BackendTracker(), BackendTracker()
    whole.feed(stream)
    for chunk in chunks(stream, size):
        split.feed(chunk)
    for tracker in (whole, split):
        assert tracker.at_boundary
    assert (whole.ready_count, whole.status, whole.fatal, whole.last_type) == (
        split.ready_count, split.status, split.fatal, split.last_type,
    )
    assert whole.ready_count == sum(1 for t, _ in bodies if t == ord("Z"))
