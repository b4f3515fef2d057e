"""The splice over real sockets: bytes both ways, and a compute that vanishes."""

from __future__ import annotations

import asyncio
import socket

from proxy.pgwire import messages
from proxy.pgwire.codec import frame
from proxy.splice import Splice
from proxy.stream import Stream

READY = messages.ready_for_query(b"I")
LOST = messages.error_response("08006", "lost the connection to the compute")
SHUTDOWN = messages.error_response("57P01", "terminating connection: the proxy is shutting down")
QUERY = frame(b"Q", b"select 1\x00")
EARLY = frame(b"Q", b"set x = 1\x00")
RESULT = frame(b"D", b"\x00\x01\x00\x00\x00\x01x") + frame(b"C", b"SELECT 1\x00")


async def pair() -> tuple[asyncio.Transport, socket.socket]:
    """An asyncio transport (the proxy's side) and the raw socket on the other end."""
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    theirs.setblocking(False)
    transport, _ = await asyncio.get_running_loop().connect_accepted_socket(Stream, ours)
    return transport, theirs


async def recv_until_closed(sock: socket.socket) -> bytes:
    loop = asyncio.get_running_loop()
    data = b""
    async with asyncio.timeout(5):
        while chunk := await loop.sock_recv(sock, 65536):
            data += chunk
    return data


async def test_bytes_flow_both_ways_and_an_idle_compute_crash_is_reported() -> None:
    loop = asyncio.get_running_loop()
    client_t, client = await pair()
    compute_t, compute = await pair()
    splice = Splice(client_t, compute_t, compute_lost_error=LOST)
    splice.start(client_pending=EARLY)
    assert await loop.sock_recv(compute, 100) == EARLY
    await loop.sock_sendall(client, QUERY)
    assert await loop.sock_recv(compute, 100) == QUERY
    await loop.sock_sendall(compute, READY + RESULT + READY)
    assert await loop.sock_recv(client, 100) == READY + RESULT + READY
    assert splice.idle
    compute.close()  # the compute dies while the session is idle
    assert await recv_until_closed(client) == LOST
    result = await splice.wait()
    assert result.closed_by == "compute" and not result.query_running
    assert result.bytes_from_client == len(EARLY + QUERY)
    client.close()


async def test_a_compute_that_dies_mid_query_is_reported_and_the_query_is_flagged() -> None:
    loop = asyncio.get_running_loop()
    client_t, client = await pair()
    compute_t, compute = await pair()
    splice = Splice(client_t, compute_t, compute_lost_error=LOST)
    splice.start()
    await loop.sock_sendall(client, QUERY)
    assert await loop.sock_recv(compute, 100) == QUERY
    await loop.sock_sendall(compute, RESULT)  # rows, then the compute is killed
    compute.close()
    assert await recv_until_closed(client) == RESULT + LOST
    assert (await splice.wait()).query_running
    client.close()


async def test_the_computes_own_fatal_error_is_not_doubled() -> None:
    loop = asyncio.get_running_loop()
    client_t, client = await pair()
    compute_t, compute = await pair()
    splice = Splice(client_t, compute_t, compute_lost_error=LOST)
    splice.start()
    fatal = messages.error_response("57P01", "terminating connection due to administrator command")
    await loop.sock_sendall(compute, fatal)
    compute.close()
    assert await recv_until_closed(client) == fatal
    await splice.wait()
    client.close()


async def test_no_error_after_the_clients_terminate() -> None:
    """Issue 9 item 2: the compute closes after Terminate; the client reads on."""
    loop = asyncio.get_running_loop()
    client_t, client = await pair()
    compute_t, compute = await pair()
    splice = Splice(client_t, compute_t, compute_lost_error=LOST)
    splice.start()
    await loop.sock_sendall(client, QUERY)
    assert await loop.sock_recv(compute, 100) == QUERY
    await loop.sock_sendall(compute, RESULT + READY)
    assert await loop.sock_recv(client, 100) == RESULT + READY
    await loop.sock_sendall(client, messages.terminate())
    assert await loop.sock_recv(compute, 100) == messages.terminate()
    compute.close()
    assert await recv_until_closed(client) == b""
    result = await splice.wait()
    assert result.client_terminated and result.closed_by == "compute"
    client.close()


async def test_end_when_idle_waits_for_the_running_query() -> None:
    loop = asyncio.get_running_loop()
    client_t, client = await pair()
    compute_t, compute = await pair()
    splice = Splice(client_t, compute_t, compute_lost_error=LOST)
    splice.start()
    await loop.sock_sendall(client, QUERY)
    assert await loop.sock_recv(compute, 100) == QUERY
    splice.end_when_idle(SHUTDOWN)
    await loop.sock_sendall(compute, RESULT[:3])
    await loop.sock_sendall(compute, RESULT[3:] + READY)
    assert await recv_until_closed(client) == RESULT + READY + SHUTDOWN
    result = await splice.wait()
    assert result.closed_by == "proxy" and not result.query_running
    client.close()
    compute.close()


async def test_end_at_boundary_never_cuts_a_message_and_flags_the_query() -> None:
    loop = asyncio.get_running_loop()
    client_t, client = await pair()
    compute_t, compute = await pair()
    splice = Splice(client_t, compute_t, compute_lost_error=LOST)
    splice.start()
    await loop.sock_sendall(client, QUERY)
    assert await loop.sock_recv(compute, 100) == QUERY
    await loop.sock_sendall(compute, RESULT[:4])  # half a DataRow is on its way
    assert await loop.sock_recv(client, 100) == RESULT[:4]
    splice.end_at_boundary(SHUTDOWN)
    assert not splice._done.done()
    await loop.sock_sendall(compute, RESULT[4:])
    assert await recv_until_closed(client) == RESULT[4:] + SHUTDOWN
    result = await splice.wait()
    assert result.closed_by == "proxy" and result.query_running
    client.close()
    compute.close()


async def test_no_error_is_injected_in_the_middle_of_a_message() -> None:
    loop = asyncio.get_running_loop()
    client_t, client = await pair()
    compute_t, compute = await pair()
    splice = Splice(client_t, compute_t, compute_lost_error=LOST)
    splice.start()
    await loop.sock_sendall(compute, READY + b"D\x00\x00\x01\x00partial-row")
    compute.close()
    assert await recv_until_closed(client) == READY + b"D\x00\x00\x01\x00partial-row"
    await splice.wait()
    client.close()


async def test_a_terminating_client_is_recognised() -> None:
    loop = asyncio.get_running_loop()
    client_t, client = await pair()
    compute_t, compute = await pair()
    splice = Splice(client_t, compute_t)
    splice.start()
    await loop.sock_sendall(client, messages.terminate())
    assert await loop.sock_recv(compute, 100) == messages.terminate()
    client.close()
    # Plain TCP half-closes: the compute sees EOF, then closes its side too.
    assert await recv_until_closed(compute) == b""
    compute.close()
    result = await splice.wait()
    assert result.client_terminated


async def test_evict_parks_an_idle_movable_session_and_tells_the_backend_goodbye() -> None:
    """evict() on an idle session: Terminate to the backend, the compute side closed,
    the client's transport handed to the parked session (no error, still open); on a
    session mid-query, or one the predicate calls pinned, nothing happens."""
    loop = asyncio.get_running_loop()
    client_t, client = await pair()
    compute_t, compute = await pair()
    parked = Stream()
    movable = {"yes": False}
    splice = Splice(client_t, compute_t, compute_lost_error=LOST,
                    park=(parked, lambda _: movable["yes"]))
    splice.start()
    await loop.sock_sendall(client, QUERY)
    assert await loop.sock_recv(compute, 100) == QUERY
    assert not splice.evict()  # a query is running
    await loop.sock_sendall(compute, RESULT + READY)
    assert await loop.sock_recv(client, 100) == RESULT + READY
    assert splice.idle and not splice.evict()  # idle, but pinned
    movable["yes"] = True
    assert splice.evict()
    assert await recv_until_closed(compute) == frame(b"X", b"")
    result = await splice.wait()
    assert result.parked and result.error_sent is None and not result.query_running
    assert not client_t.is_closing() and client_t.get_protocol() is parked
    assert not splice.evict()  # once
    client_t.close()
    client.close()
    compute.close()
