"""The resize notice: the compute's FATAL 57P01 replaced whole, anything else untouched."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from proxy.endnotice import describe, replace_admin_shutdown, resize_error
from proxy.pgwire import messages

ADMIN = messages.error_response("57P01", "terminating connection due to administrator command")
OURS = resize_error("ep-1", ["transaction", "temp_tables"])


def test_the_shutdown_error_is_replaced_and_what_follows_kept() -> None:
    assert replace_admin_shutdown(ADMIN + b"tail", lambda: OURS) == OURS + b"tail"
    fields = messages.parse_error_fields(OURS[5:])
    assert fields["C"] == "57P01" and fields["S"] == "FATAL"
    assert fields["M"] == ('terminating connection because endpoint "ep-1" is being resized;'
                           " it held an open transaction, temporary tables")


def test_other_errors_and_partial_messages_pass_unchanged() -> None:
    error = messages.error_response("57P01", "x", severity="ERROR")
    crash = messages.error_response("57P02", "crash shutdown")
    for chunk in (error, crash, ADMIN[:-1], b"Z\x00\x00\x00\x05I", b"E", b""):
        assert replace_admin_shutdown(chunk, lambda: OURS) == chunk


def test_reasons_in_words() -> None:
    assert describe([]) == "state that could not be moved"
    assert describe(["probe_failed:57014", "advisory_locks", "advisory_locks"]) == (
        "state the proxy could not read, advisory locks")


@given(st.binary(max_size=64))
def test_any_bytes_are_either_replaced_whole_or_left_alone(chunk: bytes) -> None:
    out = replace_admin_shutdown(chunk, lambda: OURS)
    assert out == chunk or out.startswith(OURS)
