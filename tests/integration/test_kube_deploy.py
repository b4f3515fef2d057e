"""deploy/: every overlay renders with kubectl kustomize and validates strictly against
the Kubernetes 1.33 schemas; the properties the deployment promises are in the output."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from tests.helpers import run

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
OVERLAYS = ["dev", "production"]
KUBECTL = shutil.which("kubectl")
# The overlays are rendered by `kubectl kustomize`; a machine without kubectl skips
# those tests (and says why) rather than failing them.
needs_kubectl = pytest.mark.skipif(
    KUBECTL is None,
    reason="kubectl is not on PATH: deploy/ overlays are rendered with `kubectl kustomize`"
    " (install kubectl 1.32+ to run these tests)",
)


async def render(overlay: str) -> list[dict[str, Any]]:
    assert KUBECTL is not None
    code, out, err = await run(KUBECTL, "kustomize", str(DEPLOY / "overlays" / overlay))
    assert code == 0, err
    return [doc for doc in yaml.safe_load_all(out) if doc]


def one(objs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    (found,) = [o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name]
    return found


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
async def test_every_object_validates_strictly(overlay: str) -> None:
    objs = await render(overlay)
    assert len(objs) > 10
    for obj in objs:
        kubernetes_validate.validate(obj, "1.33", strict=True)


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
async def test_the_deployment_keeps_its_promises(overlay: str) -> None:
    objs = await render(overlay)
    kinds = {o["kind"] for o in objs}
    assert "ClusterRole" not in kinds and "ClusterRoleBinding" not in kinds
    role = one(objs, "Role", "pgwake-control")
    resources = {r for rule in role["rules"] for r in rule["resources"]}
    assert resources == {"pods", "persistentvolumeclaims", "secrets", "events"}

    proxy = one(objs, "Deployment", "pgwake-proxy")
    assert proxy["spec"]["replicas"] >= 2
    pod = proxy["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False
    (container,) = pod["containers"]
    # Grace covers preStop + the proxy's drain (10 s by default).
    assert pod["terminationGracePeriodSeconds"] >= (
        container["lifecycle"]["preStop"]["sleep"]["seconds"] + 10
    )
    pdb = one(objs, "PodDisruptionBudget", "pgwake-proxy")
    assert 1 <= pdb["spec"]["minAvailable"] < proxy["spec"]["replicas"]
    service = one(objs, "Service", "pgwake-proxy")
    assert service["spec"]["type"] == "LoadBalancer"
    assert [p["port"] for p in service["spec"]["ports"]] == [5432]

    control = one(objs, "Deployment", "pgwake-control")
    args = control["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--provisioner=kubernetes" in args and "--in-cluster" in args
    (probe_path,) = {
        control["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["path"]
    }
    assert probe_path == "/readyz"

    prepuller = one(objs, "DaemonSet", "pgwake-prepuller")
    spec = prepuller["spec"]["template"]["spec"]
    assert all(c["command"] == ["/bin/sh", "-c", "true"] for c in spec["initContainers"])
    assert [c["image"].split(":")[0] for c in spec["containers"]] == ["registry.k8s.io/pause"]

    policy = one(objs, "NetworkPolicy", "pgwake-compute")
    assert policy["spec"]["podSelector"]["matchLabels"] == {
        "app.kubernetes.io/name": "pgwake-compute"
    }
    sources = {s["podSelector"]["matchLabels"]["app.kubernetes.io/name"]
               for rule in policy["spec"]["ingress"] for s in rule["from"]}
    assert sources == {"pgwake-proxy", "pgwake-control"}
    assert any(o["kind"] == "StatefulSet" for o in objs)  # the control DB
    (namespace,) = [o["metadata"]["name"] for o in objs if o["kind"] == "Namespace"]
    cluster_scoped = {"Namespace", "PriorityClass"}
    assert {o["metadata"].get("namespace") for o in objs if o["kind"] not in cluster_scoped} == {
        namespace
    }


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
async def test_workloads_pass_the_restricted_pod_security_basics(overlay: str) -> None:
    for obj in await render(overlay):
        template = (obj.get("spec") or {}).get("template")
        if template is None:
            continue
        spec = template["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        for container in spec.get("initContainers", []) + spec["containers"]:
            sc = container["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False
            assert sc["capabilities"] == {"drop": ["ALL"]}
            assert sc["readOnlyRootFilesystem"] is True


def test_cert_manager_example_parses() -> None:
    (doc,) = yaml.safe_load_all((DEPLOY / "examples" / "cert-manager.yaml").read_text())
    assert doc["kind"] == "Certificate" and doc["spec"]["secretName"] == "pgwake-tls"
