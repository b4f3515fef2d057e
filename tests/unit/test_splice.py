"""The splice over real sockets: bytes both ways, and a compute that vanishes."""

from __future__ import annotations

import asyncio
import socket

from proxy.pgwire import messages
from proxy.splice import Splice
from proxy.stream import Stream

READY = messages.ready_for_query(b"I")
LOST = messages.error_response("08006", "lost the connection to the compute")


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
    splice.start(client_pending=b"early")
    assert await loop.sock_recv(compute, 100) == b"early"
    await loop.sock_sendall(client, b"Q-query")
    assert await loop.sock_recv(compute, 100) == b"Q-query"
    await loop.sock_sendall(compute, b"result" + READY)
    assert await loop.sock_recv(client, 100) == b"result" + READY
    compute.close()  # the compute dies while the session is idle
    assert await recv_until_closed(client) == LOST
    result = await splice.wait()
    assert result.closed_by == "compute"
    assert result.bytes_from_client == len(b"earlyQ-query")
    client.close()


async def test_no_error_is_injected_in_the_middle_of_a_message() -> None:
    loop = asyncio.get_running_loop()
    client_t, client = await pair()
    compute_t, compute = await pair()
    splice = Splice(client_t, compute_t, compute_lost_error=LOST)
    splice.start()
    await loop.sock_sendall(compute, b"D\x00\x00\x01\x00partial-row")
    compute.close()
    assert await recv_until_closed(client) == b"D\x00\x00\x01\x00partial-row"
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
