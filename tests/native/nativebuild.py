"""Builds the native code the tests load, from the worktree's sources, with `cc`.

The tracker tests do not depend on the installed `proxy._dataplane` being fresh
(or built at all): they compile tracker.c + tracker_py.c with a three-line
module init into a test-only extension. The sanitized run
(test_sanitized.py) sets PGWAKE_NATIVE_TEST_CFLAGS so that these builds carry
the same sanitizer flags as its build of the real extension.
"""

from __future__ import annotations

import importlib.util
import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[2]
NATIVE = REPO / "proxy" / "_native"
# The flags pyproject.toml gives the extension, so the tests see its warnings too.
WARNINGS = ["-std=gnu11", "-Wall", "-Wextra", "-Werror"]
# Set by test_sanitized.py for its subprocess: extra flags for every test build.
EXTRA_CFLAGS_ENV = "PGWAKE_NATIVE_TEST_CFLAGS"
# A module name no installed package uses.
HARNESS = "_pgw_tracker_harness"
_HARNESS_INIT = """\
#include "tracker_py.h"
static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, "%(name)s", NULL, 0,
                                 NULL, NULL, NULL, NULL, NULL};
PyMODINIT_FUNC PyInit_%(name)s(void)
{
    PyObject *m = PyModule_Create(&def);
    if (m && pgw_tracker_add_types(m) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
"""


def compiler() -> str:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    assert cc, "the native tests need a C compiler (cc)"
    return cc


def extra_cflags() -> list[str]:
    return shlex.split(os.environ.get(EXTRA_CFLAGS_ENV, ""))


def python_include() -> str:
    return sysconfig.get_paths()["include"]


def ext_suffix() -> str:
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    assert isinstance(suffix, str)
    return suffix


def run_cc(args: list[str], timeout: float = 300) -> None:
    """Runs the compiler; its diagnostics become the assertion message on failure."""
    done = subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False)
    assert done.returncode == 0, f"{shlex.join(args)}\n{done.stdout}{done.stderr}"


def load_extension(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build_tracker_harness(out_dir: Path) -> ModuleType:
    """tracker.c + tracker_py.c as a test-only extension; returns it loaded."""
    init = out_dir / "harness_init.c"
    init.write_text(_HARNESS_INIT % {"name": HARNESS})
    target = out_dir / (HARNESS + ext_suffix())
    run_cc(
        [
            compiler(),
            "-shared",
            "-fPIC",
            "-O2",
            "-g",
            *WARNINGS,
            *extra_cflags(),
            f"-I{python_include()}",
            f"-I{NATIVE}",
            str(NATIVE / "tracker.c"),
            str(NATIVE / "tracker_py.c"),
            str(init),
            "-o",
            str(target),
        ]
    )
    assert HARNESS not in sys.modules, "the harness is built once per session"
    module = load_extension(HARNESS, target)
    sys.modules[HARNESS] = module
    return module
