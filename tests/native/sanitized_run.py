"""Runs pytest with a given build of proxy._dataplane in place of the installed one.

Used by test_sanitized.py in a subprocess that has AddressSanitizer preloaded:

    python tests/native/sanitized_run.py [--extension PATH] -- PYTEST-ARGS...

The extension is loaded from PATH as ``proxy._dataplane`` before pytest starts,
so every ``import proxy._dataplane`` in the tests gets the sanitized build
whatever sits in proxy/ (the editable install's own .so, or nothing).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--extension", type=Path)
    parser.add_argument("pytest_args", nargs="*")
    args = parser.parse_args(argv)
    # The runtime is loaded in this process; the processes the tests start
    # (compilers, servers, clients) run as they normally do.
    os.environ.pop("LD_PRELOAD", None)
    os.environ.pop("PYTHONMALLOC", None)
    sys.path.insert(0, str(REPO))
    if args.extension is not None:
        import proxy
        from tests.native.nativebuild import load_extension

        module = load_extension("proxy._dataplane", args.extension)
        sys.modules["proxy._dataplane"] = module
        proxy._dataplane = module
        import proxy._dataplane as check

        assert Path(check.__file__ or "") == args.extension, check.__file__
        print(f"sanitized_run: proxy._dataplane from {args.extension}", flush=True)
    import pytest

    return int(pytest.main(args.pytest_args))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
