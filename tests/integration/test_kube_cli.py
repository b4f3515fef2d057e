"""`pgwake control --provisioner kubernetes` as a real process against the API stand-in."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from pgwake.split import kubernetes_settings
from tests.helpers import make_data_dir
from tests.kube_standin.harness import NAMESPACE, running_standin
from tests.kube_standin.server import KubeStandin
from wakeup.api import ControlClient
from wakeup.provisioners import k8s_objects


@pytest.fixture(scope="module")
async def standin(pg_bin: Path) -> AsyncIterator[KubeStandin]:
    async with running_standin(pg_bin) as server:
        yield server


async def test_control_process_creates_pods_in_its_namespace(
    standin: KubeStandin, pg_bin: Path
) -> None:
    directory = make_data_dir("pgwake-kube-cli-")
    kubeconfig = standin.kubeconfig(directory / "kubeconfig", NAMESPACE)
    pgwake = str(Path(sys.executable).with_name("pgwake"))
    proc = await asyncio.create_subprocess_exec(
        pgwake, "control", "--provisioner", "kubernetes", "--namespace", NAMESPACE,
        "--kubeconfig", str(kubeconfig), "--data-dir", str(directory / "data"),
        "--api", "127.0.0.1:0", "--pg-bin", str(pg_bin),
        "--admin-cidr", "127.0.0.1/32", "--client-cidr", "127.0.0.1/32",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, "PGWAKE_API_KEY": "kube-cli-test-key"},
    )
    assert proc.stdout is not None
    try:
        async with asyncio.timeout(120):
            while True:
                line = (await proc.stdout.readline()).decode()
                assert line, "pgwake control exited"
                if line.startswith("pgwake control API on "):
                    url = line.split()[4]
                    break
        async with ControlClient(url, "kube-cli-test-key") as client:
            ep = await client.create_endpoint()
            shown = await client.get_endpoint(ep.id)
            assert shown.state == "active"
        pods = [p for p in standin.pods(NAMESPACE) if k8s_objects.is_ready(p)]
        assert pods, "the compute runs as a pod of the stand-in"
        # Reached at its pod IP, as the proxy will be told.
        assert all(p["status"]["podIP"].startswith("127.77.") for p in pods)
    finally:
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.wait(), 60)
        shutil.rmtree(directory, ignore_errors=True)
    # A clean stop leaves the pods running for the next control plane.
    assert any(k8s_objects.is_ready(p) for p in standin.pods(NAMESPACE))


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"namespace": None}, "needs --namespace"),
        ({"kubeconfig": Path("k"), "in_cluster": True}, "not both"),
        ({"admin_cidrs": ["10.0.0.0/33"]}, "10.0.0.0/33"),
    ],
)
def test_kubernetes_flags_are_checked(kwargs: dict[str, object], error: str) -> None:
    values: dict[str, object] = {
        "namespace": "ns", "kubeconfig": None, "in_cluster": False, "image": "img",
        "admin_cidrs": None, "client_cidrs": None,
    }
    values.update(kwargs)
    with pytest.raises(ValueError, match=error):
        kubernetes_settings("kubernetes", **values)  # type: ignore[arg-type]


def test_local_refuses_kubernetes_flags() -> None:
    with pytest.raises(ValueError, match="--provisioner kubernetes"):
        kubernetes_settings("local", namespace="ns", kubeconfig=None, in_cluster=False,
                            image="img", admin_cidrs=None, client_cidrs=None)
    assert kubernetes_settings("local", namespace=None, kubeconfig=None, in_cluster=False,
                               image="img", admin_cidrs=None, client_cidrs=None) is None
