"""The compute manifests: pure builders, validated strictly against the Kubernetes 1.33 schemas."""

from __future__ import annotations

import base64

import kubernetes_validate
import pytest

from wakeup.provisioners import k8s_objects as o
from wakeup.provisioners.base import Tier

SPEC = o.ComputeSpec(admin_cidrs=("10.42.0.0/16",), client_cidrs=("10.0.0.0/8",))


@pytest.mark.parametrize("tier", list(Tier))
@pytest.mark.parametrize("size", list(o.SIZE_CLASSES))
def test_pod_validates_and_is_locked_down(tier: Tier, size: str) -> None:
    pod = o.pod_manifest("c-abc23", tier, size, SPEC)
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
    resources = container["resources"]
    assert resources["limits"]["memory"] == o.SIZE_CLASSES[size].memory
    assert f"shared_buffers={o.SIZE_CLASSES[size].shared_buffers}" in container["args"]
    data = next(v for v in spec["volumes"] if v["name"] == "pgdata")
    if tier is Tier.EPHEMERAL:
        assert data["emptyDir"]["medium"] == "Memory"
        assert data["emptyDir"]["sizeLimit"] == o.SIZE_CLASSES[size].ephemeral_size
    else:
        assert data["persistentVolumeClaim"]["claimName"] == o.pvc_name("c-abc23")
    # Every path the container writes to is a volume: the root filesystem stays read-only.
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert {o.PGDATA_MOUNT, o.SOCKET_MOUNT, o.TMP_MOUNT} <= mounts


def test_pvc_and_secret_validate() -> None:
    pvc = o.pvc_manifest("c-abc23", "small", o.ComputeSpec(storage_class="fast"))
    kubernetes_validate.validate(pvc, "1.33", strict=True)
    assert pvc["spec"]["storageClassName"] == "fast"
    secret = o.secret_manifest("c-abc23", Tier.DURABLE, "small", "s3cret", SPEC)
    kubernetes_validate.validate(secret, "1.33", strict=True)
    assert o.password_of(secret) == "s3cret"
    hba = base64.b64decode(secret["data"]["pg_hba.conf"]).decode()
    lines = [line.split() for line in hba.splitlines() if not line.startswith("#")]
    # The admin may log in only from the control plane's network, then nobody else may.
    assert lines.index(["host", "all", o.ADMIN_USER, "10.42.0.0/16", "scram-sha-256"]) < (
        lines.index(["host", "all", o.ADMIN_USER, "all", "reject"])
    ) < lines.index(["host", "all", "all", "10.0.0.0/8", "scram-sha-256"])
    assert ["local", "all", "all", "reject"] in lines


@pytest.mark.parametrize("bad", ["", "C-ABC", "c_abc", "../x", "c-" + "a" * 40, "-c"])
def test_compute_ids_are_checked(bad: str) -> None:
    with pytest.raises(ValueError):
        o.pod_name(bad)


def test_unknown_size_class_is_refused() -> None:
    with pytest.raises(ValueError, match="size class"):
        o.pod_manifest("c-abc23", Tier.DURABLE, "huge", SPEC)


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
