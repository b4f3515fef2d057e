"""The data directory of `pgwake up`: API key, certificates, and where the CLI finds things."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from dataclasses import asdict, dataclass
from pathlib import Path

from tls.certs import CertPair
from tls.devca import ensure_dev_ca, ensure_server_certificate
from wakeup.provisioners.local import LocalSettings

STATE_FILE = "pgwake.json"
API_KEY_FILE = "api_key"


def default_data_dir() -> Path:
    # As root, postgres runs as another user that must traverse the path, and
    # /root is private: use the system location.
    if os.geteuid() == 0:
        return Path("/var/lib/pgwake")
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "pgwake"


def prepare(data_dir: Path) -> None:
    data_dir.mkdir(parents=True, exist_ok=True)
    # Traversable (x) by the postgres user, not listable; secrets inside are 0600.
    data_dir.chmod(0o711)


def api_key(data_dir: Path, given: str | None) -> tuple[str, Path | None]:
    """The API key given, else the one stored, else a new one stored with mode 0600."""
    if given:
        return given, None
    path = data_dir / API_KEY_FILE
    if path.exists():
        return path.read_text().strip(), path
    key = "pgw_" + secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key + "\n")
    return key, path


def ephemeral_root(data_dir: Path) -> Path:
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        # Memory-backed, like a Kubernetes emptyDir with medium: Memory.
        digest = hashlib.sha256(str(data_dir.resolve()).encode()).hexdigest()[:10]
        return shm / f"pgwake-{digest}"
    return data_dir / "ephemeral"


def local_settings(
    data_dir: Path,
    pg_bin: Path | None,
    run_as: str | None,
    port_range: tuple[int, int],
    ephemeral_dir: Path | None = None,
    compute_settings: tuple[tuple[str, str], ...] = (),
) -> LocalSettings:
    """Where the local provisioner keeps computes, for `pgwake up` and `pgwake control`."""
    return LocalSettings(
        root=data_dir / "computes",
        ephemeral_root=ephemeral_dir or ephemeral_root(data_dir),
        pg_bin=pg_bin,
        run_as=run_as,
        port_range=port_range,
        extra_settings=compute_settings,
    )


@dataclass(frozen=True)
class DevCertificates:
    ca: CertPair
    server: CertPair


def dev_certificates(data_dir: Path, domain: str) -> DevCertificates:
    directory = data_dir / "tls"
    directory.mkdir(mode=0o700, exist_ok=True)
    ca = ensure_dev_ca(directory)
    server = ensure_server_certificate(directory, ca, [f"*.{domain}", domain, "localhost"])
    return DevCertificates(ca, server)


@dataclass(frozen=True)
class RunState:
    """Written by `pgwake up` so the CLI can find the API without flags."""

    api_url: str
    proxy: str
    domain: str
    ca_file: str
    pid: int

    def write(self, data_dir: Path) -> None:
        path = data_dir / STATE_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2) + "\n")
        tmp.replace(path)

    @classmethod
    def read(cls, data_dir: Path) -> RunState | None:
        try:
            return cls(**json.loads((data_dir / STATE_FILE).read_text()))
        except (OSError, ValueError, TypeError):
            return None
