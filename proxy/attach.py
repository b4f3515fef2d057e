"""Re-attach: give a parked session a new backend, with its settings and prepared statements.

A session is parked when its compute goes away (suspend, crash, handoff) while
it is idle, outside a transaction and known to the compute to hold nothing
that cannot move (sessionstate's snapshot). On the client's next message the
proxy wakes the endpoint if needed, logs in again with the ClientKey it holds,
replays the snapshot on the new backend in one round trip, and only then
forwards the message. Anything that fails here is a clean 08006 for the client.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from proxy.compute import ComputeSession
from proxy.pgwire import messages
from proxy.pgwire.codec import MessageReader, frame
from proxy.pgwire.errors import ProtocolViolation
from proxy.sessionstate import SessionSnapshot
from proxy.stream import PeerClosed, Stream

# `options=pgwake_listen=<policy>`: may a session that LISTENs move to a new backend?
LISTEN_POLICIES = {"pinned": False, "lossy": True}


def lossy_listen(value: str | None) -> bool:
    """The client's LISTEN policy: `pinned` (the default) keeps a LISTEN session on its
    backend; `lossy` lets it move, re-issuing LISTEN there, and accepts that
    notifications sent while it had no backend are lost."""
    if value is None:
        return False
    if value not in LISTEN_POLICIES:
        raise ProtocolViolation(
            f'invalid value for pgwake_listen: "{value}" (expected pinned or lossy)',
            sqlstate="22023",
        )
    return LISTEN_POLICIES[value]


_SET_CONFIG = "select pg_catalog.set_config($1, $2, false)"


class RestoreFailed(Exception):
    """The new backend refused part of the session's state."""


@dataclass(frozen=True)
class Credentials:
    """What logging in again needs: kept by the session from its handshake."""

    params: dict[str, str]
    user: str
    client_key: bytes
    server_key: bytes


def _parse(name: str, statement: str, types: tuple[int, ...] = ()) -> bytes:
    return frame(
        b"P",
        name.encode() + b"\x00" + statement.encode() + b"\x00"
        + struct.pack(f"!H{len(types)}I", len(types), *types),
    )


def _bind_text(values: list[str]) -> bytes:
    body = b"\x00\x00" + struct.pack("!HH", 0, len(values))
    for value in values:
        raw = value.encode()
        body += struct.pack("!i", len(raw)) + raw
    return frame(b"B", body + b"\x00\x00")


_EXECUTE = frame(b"E", b"\x00" + struct.pack("!I", 0))
_SYNC = frame(b"S", b"")


def restore_messages(snapshot: SessionSnapshot) -> bytes:
    """One extended-protocol batch ending in one Sync: the settings through
    set_config (values as parameters, so no quoting), SQL PREPAREs re-run as
    written, protocol-level statements re-parsed with the types the compute had
    resolved, and LISTEN re-issued for each channel of a session that allows it."""
    batch = b""
    if snapshot.settings:
        batch += _parse("", _SET_CONFIG)
        for name, value in snapshot.settings.items():
            batch += _bind_text([name, value]) + _EXECUTE
    for statement in snapshot.prepared:
        if statement.from_sql:
            batch += _parse("", statement.statement) + _bind_text([]) + _EXECUTE
        else:
            batch += _parse(statement.name, statement.statement, statement.parameter_types)
    for channel in snapshot.listening:
        batch += _parse("", f"LISTEN {quote_identifier(channel)}") + _bind_text([]) + _EXECUTE
    return batch + _SYNC if batch else b""


def quote_identifier(name: str) -> str:
    """As PostgreSQL's quote_ident always quotes: the name exactly as the compute gave it."""
    return '"' + name.replace('"', '""') + '"'



async def restore(compute: ComputeSession, snapshot: SessionSnapshot) -> None:
    """Replay `snapshot` on a freshly logged-in backend; raises RestoreFailed."""
    batch = restore_messages(snapshot)
    if not batch:
        return
    compute.stream.write(batch)
    reader = MessageReader()
    reader.feed(compute.trailing)
    compute.trailing = b""
    failure: dict[str, str] | None = None
    while True:
        message = reader.next_message()
        if message is None:
            try:
                reader.feed(await compute.stream.recv())
            except PeerClosed as exc:
                raise RestoreFailed("the compute closed the connection") from exc
            continue
        kind, body = message
        if kind == b"E" and failure is None:
            failure = messages.parse_error_fields(body)
        elif kind == b"Z":
            compute.trailing = reader.take_trailing() + compute.stream.take_buffered()
            if failure is not None:
                raise RestoreFailed(failure.get("M", "restore failed"))
            return


_TERMINATE = frame(b"X", b"")


async def wait_for_client(stream: Stream) -> bytes:
    """A parked session's next bytes from its client; b"" when the client left or
    only said Terminate (nothing to wake a compute for). No deadline: a parked
    session may idle as long as a connected one."""
    try:
        data = await stream.recv()
    except PeerClosed:
        return b""
    return b"" if data == _TERMINATE else data
