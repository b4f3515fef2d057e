"""The native tests once more, under AddressSanitizer and UndefinedBehaviorSanitizer.

The extension (every source pyproject.toml lists, when they all exist) and the
tracker tests' own build are compiled with -fsanitize=address,undefined into a
temporary directory, and `pytest tests/native -k 'not sanitized and not fuzz'`
runs in a subprocess with that runtime preloaded and that extension in place of
the installed one. Any sanitizer report fails the run (halt_on_error,
abort_on_error). Leak detection is off there: CPython itself does not free
everything at exit (the fuzzers, which own their process, check leaks).

A canary first proves the set-up catches what it is for: a one-byte heap
overrun in a tiny extension must kill the same kind of subprocess with an
AddressSanitizer report.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

from tests.native.nativebuild import (
    EXTRA_CFLAGS_ENV,
    NATIVE,
    REPO,
    ext_suffix,
    python_include,
    run_cc,
)

SANITIZE = [
    "-fsanitize=address,undefined",
    "-fno-sanitize-recover=undefined",
    "-fno-omit-frame-pointer",
    "-g",
]
CC = "gcc"  # its runtime (libasan.so) is the one preloaded below


def asan_runtime() -> str:
    gcc = shutil.which(CC)
    assert gcc, "the sanitized run needs gcc"
    path = subprocess.run(
        [gcc, "-print-file-name=libasan.so"], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert os.path.isabs(path) and os.path.exists(path), "gcc's libasan is installed with gcc"
    return path


def sanitized_env(reports: Path) -> dict[str, str]:
    """The environment of a sanitized subprocess; reports go to files `reports`.*
    (a pytest that captures fd 2 and then aborts would lose them from stderr)."""
    env = dict(os.environ)
    env.update(
        LD_PRELOAD=asan_runtime(),
        # quarantine_size_mb: ASan's default (256 MB of freed blocks held back)
        # is much for a shared machine; use-after-free is still caught meanwhile.
        ASAN_OPTIONS=f"detect_leaks=0:abort_on_error=1:quarantine_size_mb=32:log_path={reports}",
        # Every Python object from malloc, so that ASan's red zones surround
        # them too (pymalloc's arenas would hide an overrun of a small bytes).
        PYTHONMALLOC="malloc",
        UBSAN_OPTIONS=f"halt_on_error=1:print_stacktrace=1:log_path={reports}",
        CC=CC,
        **{EXTRA_CFLAGS_ENV: " ".join(SANITIZE)},
    )
    # Not this run's business, and a pytest plugin must not get in the way.
    env.pop("PYTEST_ADDOPTS", None)
    return env


def extension_spec() -> dict[str, list[str]]:
    with open(REPO / "pyproject.toml", "rb") as f:
        (ext,) = [
            e
            for e in tomllib.load(f)["tool"]["setuptools"]["ext-modules"]
            if e["name"] == "proxy._dataplane"
        ]
    return ext


def build_sanitized_extension(out: Path) -> Path | None:
    """proxy._dataplane as pyproject.toml declares it, plus the sanitizers; None
    while some of its sources are not written yet (the tracker tests' own
    build still runs sanitized)."""
    ext = extension_spec()
    sources = [REPO / s for s in ext["sources"]]
    if not all(s.exists() for s in sources):
        return None
    target = out / ("_dataplane" + ext_suffix())
    run_cc(
        [
            CC,
            "-shared",
            "-fPIC",
            *ext["extra-compile-args"],
            *SANITIZE,
            f"-I{python_include()}",
            f"-I{NATIVE}",
            *map(str, sources),
            *(f"-l{lib}" for lib in ext["libraries"]),
            "-o",
            str(target),
        ]
    )
    return target


def run_sanitized(
    args: list[str], reports: Path, timeout: float
) -> tuple[subprocess.CompletedProcess[str], str]:
    """Runs `args` sanitized; returns it and the text of any sanitizer report."""
    done = subprocess.run(
        args,
        cwd=REPO,
        env=sanitized_env(reports),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    found = sorted(reports.parent.glob(reports.name + ".*"))
    return done, "".join(f.read_text(errors="replace") for f in found)


def test_canary_heap_overrun_is_reported(tmp_path: Path) -> None:
    source = tmp_path / "overrun.c"
    source.write_text(
        "#include <stdlib.h>\n"
        "int overrun(int n) { char *p = malloc(n); int v = p[n]; free(p); return v; }\n"
    )
    lib = tmp_path / "liboverrun.so"
    run_cc([CC, "-shared", "-fPIC", *SANITIZE, str(source), "-o", str(lib)])
    done, report = run_sanitized(
        [sys.executable, "-c", f"import ctypes; ctypes.CDLL({str(lib)!r}).overrun(8)"],
        tmp_path / "sanitizer",
        timeout=120,
    )
    assert done.returncode != 0
    assert "ERROR: AddressSanitizer: heap-buffer-overflow" in report, done.stderr + report


def test_native_tests_under_sanitizers(tmp_path: Path) -> None:
    extension = build_sanitized_extension(tmp_path)
    args = [sys.executable, str(REPO / "tests" / "native" / "sanitized_run.py")]
    if extension is not None:
        args += ["--extension", str(extension)]
    args += [
        "--",
        "-q",
        "-x",
        "--capture=sys",  # C-level writes to fd 2 stay visible if the process aborts
        "tests/native",
        "-k",
        "not sanitized and not fuzz",
    ]
    done, report = run_sanitized(args, tmp_path / "sanitizer", timeout=1200)
    output = done.stdout + done.stderr
    assert not report, report + output[-5000:]
    assert done.returncode == 0, output[-20000:]
    assert " passed" in done.stdout, output[-20000:]
    if extension is not None:
        assert f"proxy._dataplane from {extension}" in done.stdout
    # else: until module.c and the engine exist, the tracker tests' own build is
    # what runs sanitized (the extension fixture skips there).
