"""The C trackers (proxy/_native/tracker.c) against the Python ones (proxy/pgwire/tracker.py).

Both are fed the same chunks, split anywhere (inside headers, between a
ReadyForQuery header and its status byte, inside an ErrorResponse's severity),
with invalid lengths and lengths near 2^32; after every chunk every attribute
must agree, and so must the error (type and message) when a length is invalid.
The C code runs from a test-only build of tracker.c + tracker_py.c (and from
the installed proxy._dataplane when it is built).
"""

from __future__ import annotations

import gc
import struct
import tracemalloc
from types import ModuleType
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.pgwire import messages
from proxy.pgwire.codec import frame
from proxy.pgwire.errors import ProtocolViolation
from proxy.pgwire.tracker import BackendTracker, FrontendTracker

BACKEND_ATTRS = (
    "status",
    "ready_count",
    "copying",
    "fatal",
    "broken",
    "at_boundary",
    "last_type",
    "idle",
    "direction",
)
FRONTEND_ATTRS = (
    "requests",
    "unsynced",
    "terminated",
    "broken",
    "at_boundary",
    "last_type",
    "direction",
)
# Hypothesis runs many examples against a session fixture; the machine is loaded.
FUZZ = settings(
    max_examples=400,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def header(type_: bytes, length: int) -> bytes:
    return type_ + struct.pack("!I", length)


def snapshot(tracker: Any, attrs: tuple[str, ...]) -> dict[str, Any]:
    return {name: getattr(tracker, name) for name in attrs}


def fail_of(tracker: Any, chunk: bytes) -> tuple[type, str, str] | None:
    try:
        tracker.feed(chunk)
    except Exception as exc:  # compared below: the C one must raise the same
        return type(exc), str(exc), getattr(exc, "sqlstate", "")
    return None


def compare(c_tracker: Any, py_tracker: Any, chunks: list[bytes], attrs: tuple[str, ...]) -> None:
    assert snapshot(c_tracker, attrs) == snapshot(py_tracker, attrs)
    for i, chunk in enumerate(chunks):
        c_fail, py_fail = fail_of(c_tracker, chunk), fail_of(py_tracker, chunk)
        c_state, py_state = snapshot(c_tracker, attrs), snapshot(py_tracker, attrs)
        if c_fail != py_fail or c_state != py_state:
            raise AssertionError(
                f"after chunk {i} of {[len(c) for c in chunks]} ({chunk[:200]!r}): "
                f"C {c_fail} {c_state} != Python {py_fail} {py_state}"
            )


def compare_backend(c: ModuleType, chunks: list[bytes]) -> None:
    compare(c.BackendTracker(), BackendTracker(), chunks, BACKEND_ATTRS)


def compare_frontend(c: ModuleType, chunks: list[bytes]) -> None:
    compare(c.FrontendTracker(), FrontendTracker(), chunks, FRONTEND_ATTRS)


def split(data: bytes, sizes: list[int]) -> list[bytes]:
    """`data` cut into chunks of `sizes` (0 gives an empty chunk), the rest as one."""
    out, pos = [], 0
    for size in sizes:
        out.append(data[pos : pos + size])
        pos += size
    if pos < len(data):
        out.append(data[pos:])
    return out


# --- real message sequences -------------------------------------------------------

ROW = frame(b"D", b"\x00\x01\x00\x00\x00\x03abc")
BACKEND_SESSION = (
    messages.parameter_status("application_name", "psql")
    + frame(b"T", b"\x00\x01a\x00" + bytes(18))
    + ROW
    + frame(b"C", b"SELECT 1\x00")
    + messages.ready_for_query(b"T")
    + messages.notice_response("there is already a transaction in progress")
    + messages.error_response("42P01", "relation does not exist", severity="ERROR")
    + messages.ready_for_query(b"E")
    + frame(b"H", b"\x00\x00\x00")  # COPY TO STDOUT
    + frame(b"d", b"1\t2\n")
    + frame(b"c", b"")
    + frame(b"C", b"COPY 1\x00")
    + messages.ready_for_query(b"I")
    + frame(b"A", b"\x00\x00\x04\xd2chan\x00payload\x00")
    + frame(b"G", b"\x00\x00\x00")  # COPY FROM STDIN: copying until the next Z
    + messages.ready_for_query(b"I")
    + messages.error_response("57P01", "terminating connection due to administrator command")
)
FRONTEND_SESSION = (
    frame(b"Q", b"select 1\x00")
    + frame(b"P", b"s1\x00select $1\x00\x00\x00")
    + frame(b"B", b"\x00s1\x00" + bytes(6))
    + frame(b"D", b"P\x00")
    + frame(b"E", b"\x00\x00\x00\x00\x00")
    + frame(b"H", b"")
    + frame(b"S", b"")
    + frame(b"F", b"\x00\x00\x04\xd2\x00\x00\x00\x00\x00\x00")
    + frame(b"Q", b"copy t from stdin\x00")
    + frame(b"d", b"1\t2\n")
    + frame(b"c", b"")
    + frame(b"C", b"S\x00")
    + frame(b"S", b"")
    + messages.terminate()
)


def test_c_types_start_like_python(c_trackers: ModuleType) -> None:
    compare_backend(c_trackers, [])
    compare_frontend(c_trackers, [])
    assert c_trackers.BackendTracker().idle and c_trackers.BackendTracker().status == b"I"
    # feed()'s error is the Python tracker's own class, exported for callers.
    assert c_trackers.ProtocolViolation is ProtocolViolation


@pytest.mark.parametrize("direction", ["backend", "frontend"])
def test_every_two_chunk_split_of_a_session(c_trackers: ModuleType, direction: str) -> None:
    """Every cut point: inside each header, each status byte, each severity."""
    data, check = (
        (BACKEND_SESSION, compare_backend)
        if direction == "backend"
        else (FRONTEND_SESSION, compare_frontend)
    )
    for cut in range(len(data) + 1):
        check(c_trackers, [data[:cut], data[cut:]])
    check(c_trackers, [data[i : i + 1] for i in range(len(data))])


def test_error_severity_split_at_every_byte(c_trackers: ModuleType) -> None:
    fatal = messages.error_response("57P01", "bye")
    panic = messages.error_response("XX000", "oops", severity="PANIC")
    error = messages.error_response("42601", "syntax", severity="ERROR")
    for message in (fatal, panic, error):
        # Header, then the body's first 7 bytes one by one, then the rest.
        compare_backend(
            c_trackers, [message[:5], *(message[i : i + 1] for i in range(5, 12)), message[12:]]
        )
        for cut in range(5, 13):
            compare_backend(c_trackers, [message[:cut], message[cut : cut + 2], message[cut + 2 :]])


def test_short_error_bodies_read_like_python(c_trackers: ModuleType) -> None:
    """An ErrorResponse shorter than its severity field: Python compares the 7
    bytes in place when the chunk holds them (into the next message); C must too."""
    short = frame(b"E", b"SFATA")
    follow = b"L\x00" + messages.ready_for_query(b"I")
    for cut in range(len(short) + len(follow) + 1):
        data = short + follow
        compare_backend(c_trackers, [data[:cut], data[cut:]])
    compare_backend(c_trackers, [frame(b"E", b""), frame(b"E", b"S"), frame(b"E", b"SPANIC")])


@pytest.mark.parametrize("length", [0, 1, 2, 3])
@pytest.mark.parametrize("direction", ["backend", "frontend"])
def test_invalid_length_at_every_split(c_trackers: ModuleType, length: int, direction: str) -> None:
    """The error, its message and the state after it (including last_type, which
    the chunk that held the bad header does not update) match, wherever it falls;
    later input is ignored by both."""
    session, check = (
        (BACKEND_SESSION[:60], compare_backend)
        if direction == "backend"
        else (FRONTEND_SESSION[:60], compare_frontend)
    )
    data = session + header(b"Q", length) + b"after"
    for cut in range(len(data) + 1):
        check(c_trackers, [data[:cut], data[cut:], messages.ready_for_query(b"T")])


@pytest.mark.parametrize("length", [4, 5, 0x7FFF_FFFF, 0x8000_0000, 0xFFFF_FFFE, 0xFFFF_FFFF])
def test_lengths_up_to_2_32(c_trackers: ModuleType, length: int) -> None:
    """A body longer than any chunk is skipped by its length; near 2^32 nothing wraps."""
    for type_ in (b"Z", b"E", b"D", b"Q"):
        data = header(type_, length) + b"SFATAL\x00" + bytes(100)
        for cut in (1, 4, 5, 6, 12):
            chunks = [data[:cut], data[cut:], bytes(1 << 16), bytes(1 << 20)]
            compare_backend(c_trackers, chunks)
            compare_frontend(c_trackers, chunks)


def test_memoryview_and_bytearray_chunks(c_trackers: ModuleType) -> None:
    tracker = c_trackers.BackendTracker()
    tracker.feed(bytearray(messages.ready_for_query(b"T")))
    tracker.feed(memoryview(ROW + messages.ready_for_query(b"E"))[:10])
    assert tracker.status == b"T" and tracker.ready_count == 1 and not tracker.at_boundary
    with pytest.raises(TypeError):
        tracker.feed("text")


def test_tracker_objects_give_their_memory_back(c_trackers: ModuleType) -> None:
    """Creating, feeding, failing and reading the C trackers leaks no Python
    objects (tracemalloc sees every object the binding allocates)."""

    def churn(rounds: int) -> None:
        for _ in range(rounds):
            for cls, attrs in ((c_trackers.BackendTracker, BACKEND_ATTRS),
                               (c_trackers.FrontendTracker, FRONTEND_ATTRS)):
                tracker = cls()
                tracker.feed(ROW + messages.ready_for_query(b"T"))
                snapshot(tracker, attrs)
                with pytest.raises(ProtocolViolation):
                    tracker.feed(header(b"Q", 1))
                tracker.feed(b"ignored")
                snapshot(tracker, attrs)

    churn(200)  # the errors module, interned strings
    gc.collect()
    tracemalloc.start()
    try:
        # CPython's free lists (up to 2000 tuples of each size) may fill with
        # blocks traced from here on, so one round fills them and the next is
        # measured: a leak grows in every round.
        churn(3000)
        gc.collect()
        before = tracemalloc.get_traced_memory()[0]
        churn(3000)
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    # 6000 trackers and 6000 exceptions went through; a leak of even the smallest
    # object each time would be 190 KiB or more.
    assert grown < 64 * 1024, grown


# --- generated streams ----------------------------------------------------------


def _body(max_size: int = 40) -> st.SearchStrategy[bytes]:
    return st.binary(max_size=max_size)


_severity = st.sampled_from(
    [b"SFATAL\x00", b"SPANIC\x00", b"SERROR\x00", b"SFATAL", b"SFATA", b"S", b"", b"VFATAL\x00"]
)
backend_message = st.one_of(
    st.sampled_from([b"I", b"T", b"E"]).map(messages.ready_for_query),
    st.binary(max_size=3).map(lambda body: frame(b"Z", body)),  # odd ReadyForQuery lengths
    st.tuples(_severity, _body()).map(lambda sb: frame(b"E", sb[0] + sb[1])),
    st.sampled_from([b"G", b"H", b"W"]).map(lambda t: frame(t, b"\x00\x00\x00")),
    st.tuples(st.sampled_from(list(b"DCTtn12sANSKvdcI")), _body(80)).map(
        lambda tb: frame(bytes([tb[0]]), tb[1])
    ),
)
frontend_message = st.one_of(
    st.text(max_size=30).map(lambda sql: frame(b"Q", sql.encode() + b"\x00")),
    st.tuples(st.sampled_from(list(b"QSFXPBEDCHdcfp")), _body(60)).map(
        lambda tb: frame(bytes([tb[0]]), tb[1])
    ),
)
# What may end a stream: nothing, a bad length, a message longer than the stream,
# or any bytes at all (which may hold more headers, valid or not).
tail = st.one_of(
    st.just(b""),
    st.tuples(st.binary(min_size=1, max_size=1), st.integers(0, 3)).map(
        lambda tl: header(tl[0], tl[1])
    ),
    st.tuples(st.binary(min_size=1, max_size=1), st.integers(4, 2**32 - 1), _body(20)).map(
        lambda tlb: header(tlb[0], tlb[1]) + tlb[2]
    ),
    _body(30),
)
chunk_sizes = st.lists(st.one_of(st.integers(0, 8), st.integers(0, 300)), max_size=60)


@FUZZ
@given(st.lists(backend_message, max_size=25), tail, chunk_sizes, st.data())
def test_backend_streams_in_random_chunks(
    c_trackers: ModuleType, msgs: list[bytes], end: bytes, sizes: list[int], data: st.DataObject
) -> None:
    stream = b"".join(msgs) + end
    # Sometimes more valid messages follow the tail (ignored if it broke the tracker).
    stream += b"".join(data.draw(st.lists(backend_message, max_size=3)))
    compare_backend(c_trackers, split(stream, sizes))


@FUZZ
@given(st.lists(frontend_message, max_size=25), tail, chunk_sizes, st.data())
def test_frontend_streams_in_random_chunks(
    c_trackers: ModuleType, msgs: list[bytes], end: bytes, sizes: list[int], data: st.DataObject
) -> None:
    stream = b"".join(msgs) + end
    stream += b"".join(data.draw(st.lists(frontend_message, max_size=3)))
    compare_frontend(c_trackers, split(stream, sizes))


@FUZZ
@given(st.binary(max_size=400), chunk_sizes)
def test_arbitrary_bytes_in_random_chunks(
    c_trackers: ModuleType, stream: bytes, sizes: list[int]
) -> None:
    chunks = split(stream, sizes)
    compare_backend(c_trackers, chunks)
    compare_frontend(c_trackers, chunks)
