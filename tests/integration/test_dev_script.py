"""`./dev`: installs with visible progress, and only when pyproject.toml (or the
Python in .venv) changed; later runs start at once."""

from __future__ import annotations

from pathlib import Path

from tests.helpers import run

ROOT = Path(__file__).resolve().parents[2]
DEV = str(ROOT / "dev")
INSTALLING = "dev: installing pgwake"


def installed_files() -> dict[str, int]:
    """pip rewrites these on every `pip install -e .`: unchanged means pip did not run."""
    site = next((ROOT / ".venv" / "lib").glob("python*/site-packages"))
    return {str(p): p.stat().st_mtime_ns for p in site.glob("*pgwake*")}


async def test_dev_up_installs_once_with_progress_then_skips() -> None:
    code, _out, err = await run(DEV, "up", "--help", timeout=900)  # installs if never stamped
    assert code == 0, err
    stamp = ROOT / ".venv" / ".pgwake-installed-base"
    good = stamp.read_text()
    before = installed_files()

    code, out, err = await run(DEV, "up", "--help", timeout=120)
    assert code == 0 and "pgwake up" in out, err
    assert INSTALLING not in err and installed_files() == before, err

    # A stamp that does not match (pyproject.toml changed): install again, visibly.
    stamp.write_text("stale\n")
    try:
        code, out, err = await run(DEV, "up", "--help", timeout=900)
        assert code == 0, err
        assert INSTALLING in err and "Successfully installed" in err, err
        assert stamp.read_text() == good and installed_files() != before
    finally:
        stamp.write_text(good)

    code, out, err = await run(DEV, "up", "--help", timeout=120)
    assert code == 0 and INSTALLING not in err, err


async def test_dev_test_skips_the_install_when_nothing_changed() -> None:
    args = ("test", "-q", "tests/unit/test_clientparams.py")
    code, out, err = await run(DEV, *args, timeout=900)
    assert code == 0, out + err
    before = installed_files()
    code, out, err = await run(DEV, *args, timeout=600)
    assert code == 0, out + err
    assert INSTALLING not in err and "2 passed" in out, out + err
    assert installed_files() == before
