"""Coverage-guided fuzzing (libFuzzer, with ASan and UBSan) for a bounded time.

fuzz_tracker: the trackers (tracker.c) against a whole-message reference
parser, on random streams in random chunks. fuzz_tls: a server SSL built as
the engine builds it (tls_native.c), fed client records
of every shape through memory BIOs, its plaintext fed to the frontend tracker.
Each runs for FUZZ_SECONDS from a seed corpus of real message sequences and a
real ClientHello, with a fixed -seed; any crash, sanitizer report, leak,
timeout or failed invariant fails the test (libFuzzer exits non-zero and
writes the input as an artifact, named in the failure). A canary checks that
fuzz_tracker's invariants catch a wrong tracker.
"""

from __future__ import annotations

import os
import re
import shutil
import ssl
import struct
import subprocess
from pathlib import Path

import pytest

from proxy.pgwire import messages
from proxy.pgwire.codec import frame
from tests.native.nativebuild import NATIVE, run_cc
from tests.native.test_tracker import BACKEND_SESSION, FRONTEND_SESSION

FUZZ_SECONDS = 15
FUZZ = NATIVE / "fuzz"
CFLAGS = [
    "-g",
    "-O1",
    "-fsanitize=fuzzer,address,undefined",
    "-fno-sanitize-recover=all",
    "-std=gnu11",
    "-Wall",
    "-Wextra",
    "-Werror",
    f"-I{NATIVE}",
]


def clang() -> str:
    for name in ("clang-14", "clang"):
        path = shutil.which(name)
        if path:
            return path
    raise AssertionError(
        "the fuzz tests need clang with libFuzzer (apt-get install clang-14 libclang-rt-14-dev)"
    )


def build(
    out: Path,
    name: str,
    sources: list[Path],
    defines: tuple[str, ...] = (),
    libs: tuple[str, ...] = (),
) -> Path:
    target = out / name
    run_cc([clang(), *CFLAGS, *defines, *map(str, sources), *libs, "-o", str(target)])
    return target


def run_fuzzer(binary: Path, corpus: Path, work: Path, *extra: str) -> str:
    """Runs `binary` on `corpus` for FUZZ_SECONDS; returns its output, having
    failed the test on anything it reported."""
    args = [
        str(binary),
        f"-max_total_time={FUZZ_SECONDS}",
        "-seed=1",
        "-timeout=30",  # one input taking this long is a hang
        "-rss_limit_mb=1024",
        "-print_final_stats=1",
        f"-artifact_prefix={work}/",
        *extra,
        str(corpus),
    ]
    env = dict(os.environ)
    # A small quarantine keeps a fuzzer near 150 MB instead of 1 GB on a shared
    # machine; use-after-free is still caught while the block is in it.
    env["ASAN_OPTIONS"] = "quarantine_size_mb=16:detect_leaks=1"
    env["UBSAN_OPTIONS"] = "print_stacktrace=1"
    # The deadline is for a hung process, far past the fuzzer's own budget.
    done = subprocess.run(
        args,
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=FUZZ_SECONDS + 300,
        check=False,
    )
    output = done.stdout + done.stderr
    artifacts = [
        p.name for p in work.iterdir() if p.name.startswith(("crash-", "leak-", "timeout-", "oom-"))
    ]
    assert done.returncode == 0 and not artifacts, f"{artifacts}\n{output[-20000:]}"
    for report in ("ERROR: AddressSanitizer", "ERROR: LeakSanitizer", "runtime error:"):
        assert report not in output, output[-20000:]
    runs = re.search(r"Done (\d+) runs", output)
    seeds = len(list(corpus.iterdir()))
    # Mutated inputs ran, not only the seeds.
    assert runs and int(runs.group(1)) > 2 * seeds, output[-5000:]
    return output


# --- fuzz_tracker ---------------------------------------------------------------


def tracker_input(sizes: list[int], stream: bytes) -> bytes:
    assert len(sizes) < 16
    return bytes([len(sizes), *sizes]) + stream


def tracker_seeds() -> list[bytes]:
    fatal = messages.error_response("57P01", "terminating connection")
    broken = frame(b"Q", b"select 1\x00") + b"Q\x00\x00\x00\x02" + frame(b"S", b"")
    huge = b"D\xff\xff\xff\xff" + bytes(64)
    return [
        tracker_input([], BACKEND_SESSION),
        tracker_input([], FRONTEND_SESSION),
        tracker_input([1], BACKEND_SESSION),
        tracker_input([1], fatal),
        tracker_input([5, 1, 1, 1, 1, 1, 1, 1, 200], fatal + messages.ready_for_query(b"I")),
        tracker_input([3, 2, 9], FRONTEND_SESSION),
        tracker_input([0, 7, 13], BACKEND_SESSION + FRONTEND_SESSION),
        tracker_input([2], broken),
        tracker_input([6, 1], huge),
        tracker_input([5, 1], frame(b"E", b"SFATA") + b"L\x00" + messages.ready_for_query(b"T")),
    ]


def write_corpus(directory: Path, seeds: list[bytes]) -> Path:
    directory.mkdir()
    for i, seed in enumerate(seeds):
        (directory / f"seed{i:02d}").write_bytes(seed)
    return directory


def test_fuzz_tracker(tmp_path: Path) -> None:
    binary = build(tmp_path, "fuzz_tracker", [FUZZ / "fuzz_tracker.c", NATIVE / "tracker.c"])
    corpus = write_corpus(tmp_path / "corpus", tracker_seeds())
    run_fuzzer(binary, corpus, tmp_path)


def test_fuzz_tracker_catches_a_wrong_tracker(tmp_path: Path) -> None:
    """The canary: a tracker that decides an ErrorResponse's severity one byte
    early fails the harness's checks on the seeds alone."""
    source = (NATIVE / "tracker.c").read_text()
    right = "if (t->probe_len < 7) {"
    assert right in source
    mutant = tmp_path / "tracker.c"
    mutant.write_text(source.replace(right, "if (t->probe_len < 6) {"))
    binary = build(tmp_path, "fuzz_mutant", [FUZZ / "fuzz_tracker.c", mutant])
    corpus = write_corpus(tmp_path / "corpus", tracker_seeds())
    done = subprocess.run(
        [str(binary), "-runs=0", f"-artifact_prefix={tmp_path}/", str(corpus)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode != 0
    assert "fuzz_tracker: fatal" in done.stderr, done.stderr[-5000:]


# --- fuzz_tls -------------------------------------------------------------------


def client_hello(server_name: str | None, alpn: list[str]) -> bytes:
    """A real ClientHello, from Python's ssl (OpenSSL) on memory BIOs."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if alpn:
        ctx.set_alpn_protocols(alpn)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname=server_name)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def query(sql: str) -> bytes:
    body = sql.encode() + b"\x00"
    return b"Q" + struct.pack("!I", len(body) + 4) + body


def write_op(data: bytes) -> bytes:
    """fuzz_tls's op 0 after the handshake: a client write, 255 bytes at most."""
    out = b""
    while data:
        part, data = data[:255], data[255:]
        out += bytes([0, len(part)]) + part
    return out


HANDSHAKE = bytes([0, 2, 2, 2])  # ClientHello, then move the flights both ways


def tls_seeds() -> list[bytes]:
    extended = (
        frame(b"P", b"s\x00select $1\x00\x00\x00")
        + frame(b"B", b"\x00s\x00" + bytes(6))
        + frame(b"E", bytes(5))
        + frame(b"S", b"")
    )
    session = write_op(query("select 1")) + bytes([2, 7, 9]) + write_op(extended) + bytes([2])
    seeds = []
    # (mode, sni): mode & 3 != 0 is a real handshake; bit 5 TLS 1.3; bit 6 ALPN
    # postgresql; bit 7 another ALPN; bits 2-4 the server's read size.
    for mode, sni in [(0x41, 1), (0x61, 1), (0x22, 2), (0x83, 0), (0x25, 3), (0x09, 7)]:
        seeds.append(bytes([mode, sni]) + HANDSHAKE + session + bytes([2, 6, 2]))
        # Records split a few bytes at a time, a key update / renegotiation,
        # a Query spanning records, server writes.
        seeds.append(
            bytes([mode, sni])
            + HANDSHAKE
            + write_op(query("begin"))
            + bytes([1, 3, 1, 0, 1, 50, 2, 5, 2])
            + write_op(query("x"))
            + bytes([8, 70, 1, 200, 2, 7, 9, 2])
        )
        # A corrupted byte and injected bytes after a good exchange.
        seeds.append(
            bytes([mode, sni])
            + HANDSHAKE
            + session
            + bytes([0, 20])
            + bytes(20)
            + bytes([3, 7, 0x10, 4, 5])
            + b"\x17\x03\x03\x00\x10"
        )
    # Raw mode: real ClientHellos as client bytes, in pieces.
    for name, alpn in [
        ("db.example.com", ["postgresql"]),
        (None, []),
        ("x.example.org", ["http/1.1"]),
    ]:
        hello = client_hello(name, alpn)
        seeds.append(bytes([0, 255]) + hello)
        seeds.append(bytes([4, 6]) + hello)
    return seeds


def test_fuzz_tls(tmp_path: Path) -> None:
    # The engine's own SSL set-up (tls_native.c) and TLS 1.3 records (tls_records.c),
    # so the harness tests what runs.
    sources = [FUZZ / "fuzz_tls.c", NATIVE / "tracker.c", NATIVE / "tls_native.c",
               NATIVE / "tls_records.c"]
    binary = build(tmp_path, "fuzz_tls", sources, (), ("-lssl", "-lcrypto"))
    corpus = write_corpus(tmp_path / "corpus", tls_seeds())
    # Whole sessions from the start: libFuzzer's slowly growing length limit
    # would otherwise keep the mutations shorter than one handshake for a while.
    run_fuzzer(binary, corpus, tmp_path, "-len_control=0", "-max_len=2048")


def main(argv: list[str]) -> None:
    """`python -m tests.native.test_fuzz DIR`: the seed corpora, for longer runs by hand
    (DIR/tracker and DIR/tls; see the build lines at the top of each fuzz_*.c)."""
    (out,) = argv
    Path(out).mkdir(parents=True, exist_ok=True)
    write_corpus(Path(out) / "tracker", tracker_seeds())
    write_corpus(Path(out) / "tls", tls_seeds())


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
