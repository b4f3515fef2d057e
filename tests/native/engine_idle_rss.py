"""RSS per idle TLS connection held by the native engine (a measurement, not a test).

    .venv/bin/python -m tests.native.engine_idle_rss --conns 2000 --mode python
    .venv/bin/python -m tests.native.engine_idle_rss --conns 2000 --mode splice
    .venv/bin/python -m tests.native.engine_idle_rss --conns 2000 --mode splice --plain

This process runs only the engine and the listener; the TLS clients run in a
child process (Python's ssl, ALPN "postgresql"). Each connection completes its
handshake and one exchange of a 1 KiB message each way in PYTHON mode (so its
buffers were allocated once), then (splice mode) is spliced to a compute
socket and exchanges one message each way through the splice. Then all sit
idle and the RSS delta over the baseline (engine started, certificates
loaded, one connection made and closed) is divided by the count.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import multiprocessing
import select
import socket
import ssl
import sys
import tempfile
import time
from pathlib import Path

from tests.native.engine_support import make_certificates, recv_exactly


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]


def malloc_in_use() -> int:
    """Bytes malloc handed out and not yet freed (all arenas; glibc's mallinfo2)."""
    libc = ctypes.CDLL(None)
    libc.mallinfo2.restype = _MallInfo2
    info = libc.mallinfo2()
    return int(info.uordblks + info.hblkhd)


def rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def clients(port: int, ca: str | None, count: int, splice: bool,
            go: multiprocessing.synchronize.Event,
            spliced: multiprocessing.synchronize.Event,
            done: multiprocessing.synchronize.Event) -> None:
    context = ssl.create_default_context(cafile=ca or None)
    context.check_hostname = False
    context.set_alpn_protocols(["postgresql"])
    socks = []
    for _ in range(count):
        raw = socket.create_connection(("127.0.0.1", port), timeout=60)
        tls = context.wrap_socket(raw, server_hostname="db.alpha.test") if ca else raw
        tls.sendall(b"q" * 1024)
        recv_exactly(tls, 1024)
        socks.append(tls)
    go.set()  # all handshaken; the server may splice
    if splice:
        spliced.wait(600)  # (no bytes wait in the engine's PYTHON-mode buffers meanwhile)
        for tls in socks:
            tls.sendall(b"s" * 1024)
        for tls in socks:
            recv_exactly(tls, 1024)
    done.wait(600)
    for tls in socks:
        tls.close()


def main() -> None:
    from proxy import _dataplane as dp

    parser = argparse.ArgumentParser()
    parser.add_argument("--conns", type=int, default=2000)
    parser.add_argument("--mode", choices=["python", "splice"], default="python")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--plain", action="store_true", help="no TLS: the engine's own cost")
    args = parser.parse_args()

    certs = make_certificates(Path(tempfile.mkdtemp(prefix="engine-rss-")))
    engine = dp.Engine(args.threads)
    engine.set_certificates(*certs.engine_args())
    listener = socket.create_server(("127.0.0.1", 0), backlog=4096)
    port = listener.getsockname()[1]
    pending: list[tuple[int, int, object]] = []

    def wait(cid: int, kind: int) -> object:
        end = time.monotonic() + 60
        while True:
            for i, (c, k, payload) in enumerate(pending):
                if c == cid and k == kind:
                    del pending[i]
                    return payload
            assert time.monotonic() < end, f"no event {kind} for {cid}"
            select.select([engine.fileno()], [], [], 1.0)
            pending.extend(engine.events())

    def serve(
        count: int, go: multiprocessing.synchronize.Event,
        spliced: multiprocessing.synchronize.Event,
    ) -> tuple[list[int], list[int]]:
        ids = []
        for _ in range(count):
            sock, _ = listener.accept()
            sock.setblocking(False)
            cid = engine.accept(sock.detach(), not args.plain)
            wait(cid, dp.READY)
            wait(cid, dp.READABLE)
            got = b""
            while len(got) < 1024:
                chunk = engine.read(cid)
                assert chunk is not None
                got += chunk
                if len(got) < 1024:
                    wait(cid, dp.READABLE)
            engine.write(cid, b"a" * 1024)
            ids.append(cid)
        peers: list[int] = []
        if args.mode == "splice":
            go.wait(600)
            theirs_all = []
            for cid in ids:
                mine, theirs = socket.socketpair()
                mine.setblocking(False)
                engine.splice(cid, mine.detach(), b"", 0, ord("I"))
                theirs_all.append(theirs)
            spliced.set()
            for theirs in theirs_all:
                theirs.setblocking(True)
                recv_exactly(theirs, 1024)  # the client's message, through the splice
                theirs.sendall(b"z" * 1024)
                peers.append(theirs.detach())
        return ids, peers

    ctx = multiprocessing.get_context("spawn")
    # Baseline: one connection made and closed (thread buffers, OpenSSL tables warm).
    go, spliced, done = ctx.Event(), ctx.Event(), ctx.Event()
    splice = args.mode == "splice"
    ca = None if args.plain else str(certs.ca.cert)
    warm = ctx.Process(target=clients, args=(port, ca, 1, splice, go, spliced, done))
    warm.start()
    ids, peers = serve(1, go, spliced)
    done.set()
    warm.join(60)
    for cid in ids:
        engine.close(cid)
        wait(cid, dp.CLOSED)
    for fd in peers:
        socket.socket(fileno=fd).close()
    gc.collect()
    time.sleep(0.5)
    ctypes.CDLL(None).malloc_trim(0)
    base = rss_kib()
    base_heap = malloc_in_use()

    go, spliced, done = ctx.Event(), ctx.Event(), ctx.Event()
    proc = ctx.Process(target=clients, args=(port, ca, args.conns, splice, go, spliced, done))
    proc.start()
    ids, peers = serve(args.conns, go, spliced)
    if args.mode == "python":
        go.wait(600)
    # Idle: every client has its answers (the client process read them) and
    # nothing moves. Wait for the last queues to drain.
    end = time.monotonic() + 60
    while any(engine.state(cid)[16] for cid in ids) and time.monotonic() < end:
        time.sleep(0.05)
    time.sleep(1.0)
    gc.collect()
    now = rss_kib()
    heap = (malloc_in_use() - base_heap) / args.conns
    per_conn = (now - base) * 1024 / args.conns
    # Pages malloc holds free (handshake and record buffers come and go) go
    # back to the system: what stays is what the idle connections need.
    ctypes.CDLL(None).malloc_trim(0)
    trimmed = (rss_kib() - base) * 1024 / args.conns
    kind = "plain" if args.plain else "tls"
    print(f"{kind} mode={args.mode} conns={args.conns} threads={args.threads} "
          f"baseline={base} KiB idle={now} KiB per_conn={per_conn:.0f} B "
          f"({per_conn / 1024:.2f} KiB); after malloc_trim {trimmed:.0f} B; "
          f"malloc in use per conn {heap:.0f} B")
    done.set()
    proc.join(60)
    engine.shutdown()
    sys.exit(0)


if __name__ == "__main__":
    main()
