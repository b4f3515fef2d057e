"""The Kubernetes adapter against the API stand-in: 404/409/410 become errors, 429/5xx retry."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.helpers import make_data_dir
from tests.kube_standin.harness import NAMESPACE, running_standin
from tests.kube_standin.server import KubeStandin
from wakeup.provisioners import k8s_objects
from wakeup.provisioners.base import Tier
from wakeup.provisioners.k8s_api import (
    Backoff,
    Conflict,
    Gone,
    KubeAPI,
    KubeError,
    KubeSettings,
    NotFound,
    load_configuration,
)


@pytest.fixture(scope="module")
async def standin(pg_bin: Path) -> AsyncIterator[KubeStandin]:
    async with running_standin(pg_bin) as server:
        yield server


@pytest.fixture
async def api(standin: KubeStandin) -> AsyncIterator[KubeAPI]:
    directory = make_data_dir("pgwake-kube-api-")
    settings = KubeSettings(namespace=NAMESPACE,
                            kubeconfig=standin.kubeconfig(directory / "kubeconfig", NAMESPACE),
                            attempts=3)
    client = KubeAPI(settings, await load_configuration(settings),
                     backoff=Backoff(initial=0.001, maximum=0.01))
    yield client
    await client.close()


def secret(compute_id: str) -> dict[str, object]:
    return k8s_objects.secret_manifest(compute_id, Tier.DURABLE, "pw",
                                       k8s_objects.ComputeSpec())


async def test_not_found_and_conflict(api: KubeAPI) -> None:
    with pytest.raises(NotFound):
        await api.get("secrets", "pgwake-c-missing-admin")
    assert await api.delete("secrets", "pgwake-c-missing-admin") is False
    created = await api.create("secrets", secret("c-conflict"))
    assert created["metadata"]["uid"]
    with pytest.raises(Conflict):
        await api.create("secrets", secret("c-conflict"))
    assert await api.delete("secrets", "pgwake-c-conflict-admin") is True


async def test_throttling_is_retried_then_given_up(api: KubeAPI, standin: KubeStandin) -> None:
    standin.fail_next = [429, 503]
    await api.create("secrets", secret("c-retried"))
    assert standin.fail_next == []
    assert api.calls[("create", "secrets")] >= 3
    standin.fail_next = [429, 429, 429]
    with pytest.raises(KubeError) as failed:
        await api.get("secrets", "pgwake-c-retried-admin")
    assert failed.value.status == 429
    await api.delete("secrets", "pgwake-c-retried-admin")


async def test_watch_from_a_compacted_version_is_gone(api: KubeAPI, standin: KubeStandin) -> None:
    listed = await api.list("secrets", k8s_objects.SELECTOR)
    version = listed["metadata"]["resourceVersion"]
    await api.create("secrets", secret("c-watched"))
    events = api.watch("secrets", k8s_objects.SELECTOR, version, timeout=30)
    first = await anext(events)
    assert (first["type"], first["object"]["metadata"]["name"]) == (
        "ADDED", "pgwake-c-watched-admin")
    await events.aclose()
    standin.expire_watches()
    with pytest.raises(Gone):
        async for _ in api.watch("secrets", k8s_objects.SELECTOR, version, timeout=30):
            pass
    await api.delete("secrets", "pgwake-c-watched-admin")


async def test_a_throttled_watch_raises_the_status(api: KubeAPI, standin: KubeStandin) -> None:
    standin.fail_next = [429]
    with pytest.raises(KubeError) as failed:
        async for _ in api.watch("secrets", k8s_objects.SELECTOR, "0", timeout=30):
            pass
    assert failed.value.status == 429
