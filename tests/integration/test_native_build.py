"""The native data plane's build: optional where it cannot be built, never silently missing
where it can."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from proxy.dataplane import load_extension

ROOT = Path(__file__).resolve().parents[2]
BUILDABLE = shutil.which("cc") is not None and Path("/usr/include/openssl/ssl.h").exists()


@pytest.mark.skipif(not BUILDABLE, reason="no C compiler or OpenSSL headers: nothing to build")
def test_the_extension_is_built_where_it_can_be() -> None:
    """With a compiler and OpenSSL's headers (as ./dev provides), the install built the
    extension (with warnings as errors): a failed optional build would otherwise
    leave the proxy on the Python path without anyone noticing."""
    module, why = load_extension()
    assert module is not None, why


def test_install_without_a_compiler_falls_back_to_the_python_path(tmp_path: Path) -> None:
    """`pip install` on a machine without a compiler: the wheel builds (the extension is
    optional), has no extension in it, and the proxy says, once, that it uses the
    Python path; asking for the native one is a clear error."""
    source = tmp_path / "src"
    shutil.copytree(
        ROOT, source,
        ignore=shutil.ignore_patterns(".venv", ".git", "*.so", "build", "__pycache__",
                                      "*.egg-info", ".mypy_cache", ".ruff_cache", "tests"),
    )
    env = {**os.environ, "CC": "/bin/false", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path / "dist"),
         str(source)],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert built.returncode == 0, built.stderr
    (wheel,) = (tmp_path / "dist").glob("pgwake-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "proxy/dataplane.py" in names
    assert not [name for name in names if "_dataplane" in name], names
    installed = tmp_path / "installed"
    zipfile.ZipFile(wheel).extractall(installed)

    # -S: no site, so no .pth file (the editable install's finder would map
    # proxy._dataplane to this tree's build); the dependencies come on the path.
    dependencies = os.pathsep.join(p for p in sys.path if p.endswith("site-packages"))

    def python(code: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-S", "-c", code], cwd=tmp_path,
            env={**os.environ, "PYTHONPATH": f"{installed}{os.pathsep}{dependencies}"},
            capture_output=True, text=True, timeout=60,
        )

    auto = python(
        "import logging; logging.basicConfig(format='%(message)s');"
        "import proxy.dataplane as d; assert d.__file__.startswith("
        f"{str(installed)!r}), d.__file__; print(d.choose('auto', 2)[0].name)"
    )
    assert auto.returncode == 0, auto.stderr
    assert auto.stdout.strip() == "python"
    lines = [line for line in auto.stderr.splitlines() if "data plane" in line]
    assert len(lines) == 1 and "native extension is not built" in lines[0], auto.stderr

    native = python("import proxy.dataplane as d; d.choose('native', 2)")
    assert native.returncode != 0
    assert "--data-plane native" in native.stderr and "libssl-dev" in native.stderr
