"""Pure builders for a compute's Kubernetes objects (Pod, PVC, Secret) and readiness of a Pod.

No I/O here: every function maps settings to a manifest dict (or a cached Pod
to a fact), so the manifests are tested without a cluster and validated
against the Kubernetes schemas.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from wakeup.provisioners.base import Tier
from wakeup.sizes import SizeClass

Manifest = dict[str, Any]

ADMIN_USER = "pgwake_admin"
POSTGRES_PORT = 5432
POSTGRES_UID = 999  # the postgres user of the official images (Debian and Alpine alike)

# Labels: how a restarted control plane finds its computes again.
LABEL_APP = "app.kubernetes.io/name"
LABEL_PART_OF = "app.kubernetes.io/part-of"
LABEL_COMPUTE = "pgwake.dev/compute"
LABEL_TIER = "pgwake.dev/tier"
# On pods only: the size class the pod was started with (a resize changes it, the
# PVC and Secret stay).
LABEL_SIZE = "pgwake.dev/size-class"
APP = "pgwake-compute"
PART_OF = "pgwake"
SELECTOR = f"{LABEL_APP}={APP}"

# Compute ids are ours (generate_id) but still checked: they become object names.
_COMPUTE_ID = re.compile(r"^[a-z0-9]([a-z0-9-]{0,38}[a-z0-9])?$")


@dataclass(frozen=True)
class ComputeSpec:
    """What every compute pod shares; filled from KubernetesSettings."""

    image: str = "ghcr.io/pgwake/compute:18"
    image_pull_policy: str = "IfNotPresent"
    storage_class: str | None = None
    volume_size: str = "10Gi"
    # Where the control plane's connections come from; only there may the admin log in.
    admin_cidrs: tuple[str, ...] = ("0.0.0.0/0",)
    client_cidrs: tuple[str, ...] = ("0.0.0.0/0",)
    termination_grace: int = 30
    priority_class: str | None = None
    node_selector: Mapping[str, str] = field(default_factory=dict)
    extra_labels: Mapping[str, str] = field(default_factory=dict)


def check_compute_id(compute_id: str) -> str:
    if not _COMPUTE_ID.fullmatch(compute_id):
        raise ValueError(f"invalid compute id {compute_id!r}")
    return compute_id


def pod_name(compute_id: str) -> str:
    return f"pgwake-{check_compute_id(compute_id)}"


def pvc_name(compute_id: str) -> str:
    return f"pgwake-{check_compute_id(compute_id)}-data"


def secret_name(compute_id: str) -> str:
    return f"pgwake-{check_compute_id(compute_id)}-admin"


def labels(
    compute_id: str, tier: Tier, spec: ComputeSpec, size: SizeClass | None = None
) -> dict[str, str]:
    found = {
        **spec.extra_labels,
        LABEL_APP: APP,
        LABEL_PART_OF: PART_OF,
        LABEL_COMPUTE: check_compute_id(compute_id),
        LABEL_TIER: tier.value,
    }
    if size is not None:
        found[LABEL_SIZE] = size.name
    return found


def pg_hba(spec: ComputeSpec) -> str:
    """Admin only from the control plane's addresses, clients (proxies) with SCRAM."""
    lines = ["# written by pgwake (kubernetes)", "local all all reject"]
    lines += [f"host all {ADMIN_USER} {cidr} scram-sha-256" for cidr in spec.admin_cidrs]
    lines.append(f"host all {ADMIN_USER} all reject")
    lines += [f"host all all {cidr} scram-sha-256" for cidr in spec.client_cidrs]
    return "\n".join(lines) + "\n"


def postgres_settings(size: SizeClass) -> list[tuple[str, str]]:
    """Every compute's settings, then the size class's (wakeup/sizes.py)."""
    return [
        ("listen_addresses", "*"),
        ("port", str(POSTGRES_PORT)),
        ("unix_socket_directories", "/var/run/postgresql"),
        ("password_encryption", "scram-sha-256"),
        *size.postgres_settings(),
        ("huge_pages", "off"),
        ("dynamic_shared_memory_type", "posix"),
        ("lc_messages", "C"),
        ("log_timezone", "UTC"),
        ("timezone", "UTC"),
        ("hba_file", "/etc/pgwake/hba/pg_hba.conf"),
    ]


# The container's entrypoint, run by /bin/sh from the compute image. Paths come
# from the environment so the script does not care where volumes are mounted.
# First boot of a volume: copy the image's initdb'd template (much faster than
# initdb). Whenever the Secret's password differs from the one last installed
# (first boot, rotation), set it in single-user mode: it never appears on a
# command line or in the logs, and a plain wake skips the step.
# SIGTERM (what the kubelet sends on delete) becomes a *fast* shutdown: postgres
# would read SIGTERM as "smart" and wait for every client.
ENTRYPOINT = r"""set -eu
umask 077
if [ ! -s "$PGDATA/PG_VERSION" ]; then
  mkdir -p "$PGDATA"
  rm -rf "$PGDATA/.init"
  if [ -n "${PGWAKE_TEMPLATE:-}" ] && [ -s "$PGWAKE_TEMPLATE/PG_VERSION" ]; then
    cp -Rp "$PGWAKE_TEMPLATE" "$PGDATA/.init"
  else
    initdb -D "$PGDATA/.init" -U pgwake_admin -A reject -E UTF8 --locale=C --no-instructions >&2
  fi
  for f in "$PGDATA"/.init/* ; do mv "$f" "$PGDATA/"; done
  rmdir "$PGDATA/.init"
  chmod 700 "$PGDATA"
fi
sum=$(cksum < "$PGWAKE_ADMIN_PASSWORD_FILE")
if [ "$(cat "$PGDATA/pgwake_admin.cksum" 2>/dev/null || true)" != "$sum" ]; then
  printf "alter role pgwake_admin password '%s';\n" "$(cat "$PGWAKE_ADMIN_PASSWORD_FILE")" |
    postgres --single -D "$PGDATA" -c "hba_file=$PGWAKE_HBA_FILE" \
      -c "unix_socket_directories=$PGWAKE_SOCKET_DIR" -c listen_addresses= \
      -c lc_messages=C postgres >/dev/null
  echo "$sum" > "$PGDATA/pgwake_admin.cksum"
fi
trap 'kill -INT "$pid" 2>/dev/null' TERM INT
postgres -D "$PGDATA" -c "hba_file=$PGWAKE_HBA_FILE" \
  -c "unix_socket_directories=$PGWAKE_SOCKET_DIR" "$@" &
pid=$!
set +e
wait "$pid"; status=$?
if kill -0 "$pid" 2>/dev/null; then wait "$pid"; status=$?; fi
exit "$status"
"""

PGDATA_MOUNT = "/var/lib/postgresql/data"
ADMIN_MOUNT = "/etc/pgwake/admin"
HBA_MOUNT = "/etc/pgwake/hba"
SOCKET_MOUNT = "/var/run/postgresql"
TMP_MOUNT = "/tmp"


def _command_args(size: SizeClass) -> list[str]:
    args: list[str] = []
    for key, value in postgres_settings(size):
        if key in ("hba_file", "unix_socket_directories"):
            continue  # the entrypoint passes these from the environment
        args += ["-c", f"{key}={value}"]
    return args


def secret_manifest(
    compute_id: str, tier: Tier, admin_password: str, spec: ComputeSpec
) -> Manifest:
    """The compute's admin credential and its pg_hba, both mounted read-only into the pod."""

    def b64(text: str) -> str:
        return base64.b64encode(text.encode()).decode()

    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": secret_name(compute_id),
            "labels": labels(compute_id, tier, spec),
        },
        "type": "Opaque",
        "immutable": True,
        "data": {"password": b64(admin_password), "pg_hba.conf": b64(pg_hba(spec))},
    }


def password_of(secret: Mapping[str, Any]) -> str:
    return base64.b64decode(secret["data"]["password"]).decode()


def pvc_manifest(compute_id: str, spec: ComputeSpec) -> Manifest:
    pvc_spec: dict[str, Any] = {
        "accessModes": ["ReadWriteOnce"],
        "resources": {"requests": {"storage": spec.volume_size}},
    }
    if spec.storage_class is not None:
        pvc_spec["storageClassName"] = spec.storage_class
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {
            "name": pvc_name(compute_id),
            "labels": labels(compute_id, Tier.DURABLE, spec),
        },
        "spec": pvc_spec,
    }


def pod_manifest(compute_id: str, tier: Tier, size: SizeClass, spec: ComputeSpec) -> Manifest:
    """One compute of one size class: postgres as a non-root user on a read-only root
    filesystem, with the class's settings and resources (wakeup/sizes.py)."""
    if tier is Tier.DURABLE:
        data_volume: dict[str, Any] = {
            "name": "pgdata",
            "persistentVolumeClaim": {"claimName": pvc_name(compute_id)},
        }
    else:
        # Memory-backed: no volume attach on create, gone with the pod (and
        # charged to the pod's memory limit, hence the size class's limit on it).
        data_volume = {
            "name": "pgdata",
            "emptyDir": {"medium": "Memory", "sizeLimit": size.ephemeral_storage},
        }
    container: dict[str, Any] = {
        "name": "postgres",
        "image": spec.image,
        "imagePullPolicy": spec.image_pull_policy,
        "command": ["/bin/sh", "-c", ENTRYPOINT, "pgwake-compute"],
        "args": _command_args(size),
        "env": [
            {"name": "PGDATA", "value": f"{PGDATA_MOUNT}/pgdata"},
            {"name": "PGWAKE_ADMIN_PASSWORD_FILE", "value": f"{ADMIN_MOUNT}/password"},
            {"name": "PGWAKE_HBA_FILE", "value": f"{HBA_MOUNT}/pg_hba.conf"},
            {"name": "PGWAKE_SOCKET_DIR", "value": SOCKET_MOUNT},
            {"name": "PGWAKE_TEMPLATE", "value": "/opt/pgwake/template"},
        ],
        "ports": [{"name": "postgres", "containerPort": POSTGRES_PORT, "protocol": "TCP"}],
        "readinessProbe": {
            "exec": {"command": ["pg_isready", "-q", "-h", SOCKET_MOUNT, "-p", str(POSTGRES_PORT)]},
            "periodSeconds": 1,
            "timeoutSeconds": 1,
            "failureThreshold": 1,
        },
        "resources": size.kubernetes_resources(),
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
            "capabilities": {"drop": ["ALL"]},
        },
        "volumeMounts": [
            {"name": "pgdata", "mountPath": PGDATA_MOUNT},
            {"name": "admin", "mountPath": ADMIN_MOUNT, "readOnly": True},
            {"name": "hba", "mountPath": HBA_MOUNT, "readOnly": True},
            {"name": "run", "mountPath": SOCKET_MOUNT},
            {"name": "tmp", "mountPath": TMP_MOUNT},
        ],
    }
    pod_spec: dict[str, Any] = {
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "restartPolicy": "Never",  # a crashed compute is woken again by the control plane
        "terminationGracePeriodSeconds": spec.termination_grace,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": POSTGRES_UID,
            "runAsGroup": POSTGRES_UID,
            "fsGroup": POSTGRES_UID,
            "fsGroupChangePolicy": "OnRootMismatch",
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        "volumes": [
            data_volume,
            {"name": "admin", "secret": {
                "secretName": secret_name(compute_id), "defaultMode": 0o400,
                "items": [{"key": "password", "path": "password"}]}},
            {"name": "hba", "secret": {
                "secretName": secret_name(compute_id), "defaultMode": 0o400,
                "items": [{"key": "pg_hba.conf", "path": "pg_hba.conf"}]}},
            # Sockets, lock files and temporary files: the root filesystem is read-only.
            {"name": "run", "emptyDir": {"medium": "Memory", "sizeLimit": "16Mi"}},
            {"name": "tmp", "emptyDir": {"sizeLimit": "1Gi"}},
        ],
    }
    if spec.priority_class:
        pod_spec["priorityClassName"] = spec.priority_class
    if spec.node_selector:
        pod_spec["nodeSelector"] = dict(spec.node_selector)
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": pod_name(compute_id),
            "labels": labels(compute_id, tier, spec, size),
        },
        "spec": pod_spec,
    }


# -- facts about cached objects (pure functions of what the watch delivered) ---------


def compute_id_of(obj: Mapping[str, Any]) -> str | None:
    value = (obj.get("metadata", {}).get("labels") or {}).get(LABEL_COMPUTE)
    return value if isinstance(value, str) else None


def tier_of(obj: Mapping[str, Any]) -> Tier | None:
    value = (obj.get("metadata", {}).get("labels") or {}).get(LABEL_TIER)
    try:
        return Tier(str(value))
    except ValueError:
        return None


def is_terminating(pod: Mapping[str, Any]) -> bool:
    return bool(pod.get("metadata", {}).get("deletionTimestamp"))


def is_finished(pod: Mapping[str, Any]) -> bool:
    return pod.get("status", {}).get("phase") in ("Succeeded", "Failed")


def phase_of(pod: Mapping[str, Any]) -> str:
    """The pod's phase, or "terminating" once it is being deleted (any phase)."""
    if is_terminating(pod):
        return "terminating"
    return str((pod.get("status") or {}).get("phase") or "Pending")


def size_of(pod: Mapping[str, Any]) -> str | None:
    """The size class a pod was started with (its label)."""
    value = (pod.get("metadata", {}).get("labels") or {}).get(LABEL_SIZE)
    return value if isinstance(value, str) else None


def is_ready(pod: Mapping[str, Any]) -> bool:
    """Running, not being deleted, Ready condition true and an IP to reach it at."""
    if is_terminating(pod) or is_finished(pod):
        return False
    status = pod.get("status") or {}
    if status.get("phase") != "Running" or not status.get("podIP"):
        return False
    return any(
        c.get("type") == "Ready" and c.get("status") == "True"
        for c in status.get("conditions") or ()
    )


def pod_ip(pod: Mapping[str, Any]) -> str | None:
    ip = (pod.get("status") or {}).get("podIP")
    return ip if isinstance(ip, str) and ip else None
