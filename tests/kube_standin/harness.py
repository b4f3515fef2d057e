"""Start the Kubernetes API stand-in with its "image" (PostgreSQL binaries and a template)."""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

from tests.helpers import make_data_dir
from tests.kube_standin.server import KubeStandin
from wakeup.provisioners import k8s_objects
from wakeup.provisioners.k8s_api import KubeSettings
from wakeup.provisioners.kubernetes import KubernetesSettings
from wakeup.provisioners.pgbin import find_binaries, resolve_run_as
from wakeup.provisioners.process import run_checked

NAMESPACE = "pgwake-test"


@contextlib.asynccontextmanager
async def running_standin(pg_bin: Path) -> AsyncIterator[KubeStandin]:
    root = make_data_dir("pgwake-kube-standin-")
    binaries = find_binaries(pg_bin)
    run_as = resolve_run_as(None)
    image = root / "image"
    image.mkdir(mode=0o755)
    if run_as is not None:
        run_as.chown(image)
    # What the compute image ships: an initdb'd template the entrypoint copies.
    await run_checked(
        [binaries.program("initdb"), "-D", str(image / "template"), "-U",
         k8s_objects.ADMIN_USER, "-A", "reject", "-E", "UTF8", "--locale=C",
         "--no-instructions"],
        run_as, timeout=300,
    )
    standin = KubeStandin(root, binaries, image / "template", run_as)
    await standin.start()
    try:
        yield standin
    finally:
        await standin.stop()
        shutil.rmtree(root, ignore_errors=True)


def kube_settings(standin: KubeStandin, directory: Path, **overrides: object) -> KubernetesSettings:
    """Settings a `pgwake control --provisioner kubernetes` would build, with a kubeconfig."""
    kubeconfig = standin.kubeconfig(directory / "kubeconfig", NAMESPACE)
    values: dict[str, object] = {
        "api": KubeSettings(namespace=NAMESPACE, kubeconfig=kubeconfig),
        # Control plane and proxy reach pods from 127.0.0.1 here.
        "compute": k8s_objects.ComputeSpec(admin_cidrs=("127.0.0.1/32",),
                                           client_cidrs=("127.0.0.1/32",)),
        "start_timeout": 120.0,
    }
    values.update(overrides)
    return KubernetesSettings(**values)  # type: ignore[arg-type]
