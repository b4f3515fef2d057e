"""Why a session that could not move was ended: the compute's 57P01 reworded by the proxy.

A resize stops the old generation with a fast shutdown; PostgreSQL tells each
backend's client "terminating connection due to administrator command". For a
session the proxy could not move (it held an open transaction, temp tables…)
that says nothing useful, and the proxy knows better: it knows the endpoint is
being resized and what the session held. Sans-IO: bytes in, bytes out.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

from proxy.pgwire import messages
from proxy.pgwire.errors import ProtocolViolation

# A session's pin reasons (proxy.sessionstate) in words.
_REASONS = {
    "transaction": "an open transaction",
    "copy": "an unfinished COPY",
    "extended_protocol": "an unfinished extended-protocol exchange (no Sync yet)",
    "untracked_stream": "a stream the proxy could not follow",
    "temp_tables": "temporary tables",
    "advisory_locks": "advisory locks",
    "holdable_cursors": "WITH HOLD cursors",
    "listen": "LISTEN registrations",
}


def describe(reasons: list[str]) -> str:
    words: list[str] = []
    for reason in reasons:
        word = _REASONS.get(reason)
        if word is None and reason.startswith("probe_failed:"):
            word = "state the proxy could not read"
        if word is not None and word not in words:
            words.append(word)
    return ", ".join(words) if words else "state that could not be moved"


def resize_error(endpoint: str, reasons: list[str]) -> bytes:
    return messages.error_response(
        "57P01",
        f'terminating connection because endpoint "{endpoint}" is being resized;'
        f" it held {describe(reasons)}",
        hint="Reconnect: new connections reach the resized endpoint. Sessions without"
        " such state move to it on their own.",
    )


def replace_admin_shutdown(chunk: bytes, replacement: Callable[[], bytes]) -> bytes:
    """If `chunk` starts with a whole FATAL 57P01 ErrorResponse, put `replacement()` in
    its place (the rest of the chunk is kept); otherwise return `chunk` as it is."""
    if len(chunk) < 5 or chunk[0] != 0x45:  # b"E"
        return chunk
    (length,) = struct.unpack_from("!I", chunk, 1)
    end = 1 + length
    if length < 4 or end > len(chunk):
        return chunk
    try:
        fields = messages.parse_error_fields(chunk[5:end])
    except ProtocolViolation:
        return chunk
    if fields.get("C") != "57P01" or fields.get("V", fields.get("S")) != "FATAL":
        return chunk
    return replacement() + chunk[end:]
