"""The compute manifests: pure builders, validated strictly against the Kubernetes 1.33 schemas."""

from __future__ import annotations

import base64

import kubernetes_validate
import pytest

from wakeup.provisioners import k8s_objects as o
from wakeup.provisioners.base import ProvisionerError, Tier
from wakeup.provisioners.k8s_api import KubeSettings
from wakeup.provisioners.kubernetes import (
    KubernetesProvisioner,
    KubernetesSettings,
    _is_stopping,
    _postmaster_pid,
)
from wakeup.sizes import SIZES, size_class_of

SPEC = o.ComputeSpec(admin_cidrs=("10.42.0.0/16",), client_cidrs=("10.0.0.0/8",))


@pytest.mark.parametrize("tier", list(Tier))
@pytest.mark.parametrize("size", list(SIZES))
def test_pod_validates_and_is_locked_down(tier: Tier, size: str) -> None:
    size_class = size_class_of(size)
    pod = o.pod_manifest("c-abc23", tier, size_class, SPEC)
    kubernetes_validate.validate(pod, "1.33", strict=True)
    spec = pod["spec"]
    assert spec["automountServiceAccountToken"] is False
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] != 0
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    (container,) = spec["containers"]
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    # The one size table decides resources and settings; the pod says its class.
    assert container["resources"] == {
        "requests": {"cpu": size_class.cpu_request, "memory": size_class.memory_request},
        "limits": {"cpu": size_class.cpu_limit, "memory": size_class.memory_limit},
    }
    for name, value in size_class.postgres_settings():
        assert f"{name}={value}" in container["args"]
    assert o.size_of(pod) == size
    data = next(v for v in spec["volumes"] if v["name"] == "pgdata")
    if tier is Tier.EPHEMERAL:
        assert data["emptyDir"]["medium"] == "Memory"
        assert data["emptyDir"]["sizeLimit"] == size_class.ephemeral_storage
    else:
        assert data["persistentVolumeClaim"]["claimName"] == o.pvc_name("c-abc23")
    # Every path the container writes to is a volume: the root filesystem stays read-only.
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert {o.PGDATA_MOUNT, o.SOCKET_MOUNT, o.TMP_MOUNT} <= mounts


def test_pvc_and_secret_validate() -> None:
    pvc = o.pvc_manifest("c-abc23", o.ComputeSpec(storage_class="fast"))
    kubernetes_validate.validate(pvc, "1.33", strict=True)
    assert pvc["spec"]["storageClassName"] == "fast"
    secret = o.secret_manifest("c-abc23", Tier.DURABLE, "s3cret", SPEC)
    kubernetes_validate.validate(secret, "1.33", strict=True)
    assert o.password_of(secret) == "s3cret"
    hba = base64.b64decode(secret["data"]["pg_hba.conf"]).decode()
    lines = [line.split() for line in hba.splitlines() if not line.startswith("#")]
    # The admin may log in only from the control plane's network, then nobody else may.
    assert lines.index(["host", "all", o.ADMIN_USER, "10.42.0.0/16", "scram-sha-256"]) < (
        lines.index(["host", "all", o.ADMIN_USER, "all", "reject"])
    ) < lines.index(["host", "all", "all", "10.0.0.0/8", "scram-sha-256"])
    assert ["local", "all", "all", "reject"] in lines
    # A resize changes the pod's size class, never the claim's or the secret's.
    assert o.size_of(pvc) is None and o.size_of(secret) is None


@pytest.mark.parametrize("bad", ["", "C-ABC", "c_abc", "../x", "c-" + "a" * 40, "-c"])
def test_compute_ids_are_checked(bad: str) -> None:
    with pytest.raises(ValueError):
        o.pod_name(bad)


def _pod(**status: object) -> dict[str, object]:
    return {"metadata": {"name": "p"}, "status": status}


def test_readiness_is_a_function_of_the_pod() -> None:
    ready = [{"type": "Ready", "status": "True"}]
    assert o.is_ready(_pod(phase="Running", podIP="10.1.2.3", conditions=ready))
    assert not o.is_ready(_pod(phase="Running", conditions=ready))
    assert not o.is_ready(_pod(phase="Pending", podIP="10.1.2.3", conditions=ready))
    assert not o.is_ready(_pod(phase="Running", podIP="10.1.2.3",
                               conditions=[{"type": "Ready", "status": "False"}]))
    terminating = _pod(phase="Running", podIP="10.1.2.3", conditions=ready)
    terminating["metadata"] = {"name": "p", "deletionTimestamp": "2026-01-01T00:00:00Z"}
    assert not o.is_ready(terminating)
    assert o.is_finished(_pod(phase="Failed"))
    # What live_postmaster reports: a pod in any phase still stands for a server.
    assert o.phase_of(_pod()) == "Pending"
    assert o.phase_of(_pod(phase="Succeeded")) == "Succeeded"
    assert o.phase_of(terminating) == "terminating"


PID_FILE = ("4242\n/var/lib/postgresql/data/pgdata\n1764375000\n5432\n/var/run/postgresql\n"
            "*\n  1234567     65538\n{}\n")


def test_postmaster_pid_file_is_read_strictly() -> None:
    assert _postmaster_pid(PID_FILE.format("ready")) == 4242
    assert not _is_stopping(PID_FILE.format("ready"))
    assert _is_stopping(PID_FILE.format("stopping"))
    assert not _is_stopping("4242\n")
    # It goes on a shell command line: anything but a plain number is refused.
    for bad in ("4242; rm -rf /\n", "-1\n", "\n", "0\n", "12345678901\n"):
        with pytest.raises(ProvisionerError):
            _postmaster_pid(bad)


def test_connection_budget_follows_the_size_class() -> None:
    provisioner = KubernetesProvisioner(KubernetesSettings(api=KubeSettings(namespace="x")))
    # max_connections minus PostgreSQL's default 3 superuser slots.
    assert [provisioner.connection_budget(s) for s in SIZES.values()] == [97, 197, 397]
