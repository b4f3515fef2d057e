"""The user story over Kubernetes, with the API stand-in: create, suspend, wake, pool, TTL,
410, a pod killed under a session, a control plane restart that adopts its pods, size
classes, the freeze and a resize (generation handoff)."""

from __future__ import annotations

import asyncio
import shutil
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import psycopg
import pytest

from pgwake.up import Up
from tests.helpers import make_data_dir, run, running_up, up_settings
from tests.integration.test_reattach import all_movable, parked_sessions
from tests.kube_standin.harness import NAMESPACE, kube_settings, running_standin
from tests.kube_standin.server import KubeStandin
from wakeup.api import ControlAPIError, ControlClient, CreatedEndpoint
from wakeup.control import ControlPlane
from wakeup.pool import PoolKey
from wakeup.provisioners import k8s_objects
from wakeup.provisioners.base import ProvisionerError, Tier
from wakeup.provisioners.kubernetes import KubernetesProvisioner
from wakeup.sizes import size_class_of

PSQL = shutil.which("psql") or "psql"
DURABLE = PoolKey(Tier.DURABLE)


@pytest.fixture(scope="module")
async def standin(pg_bin: Path) -> AsyncIterator[KubeStandin]:
    async with running_standin(pg_bin) as server:
        yield server


@pytest.fixture(scope="module")
async def kube_up(standin: KubeStandin, pg_bin: Path) -> AsyncIterator[Up]:
    directory = make_data_dir("pgwake-kube-")
    async with running_up(
        "pgwake-kube-up-", pg_bin, kubernetes=kube_settings(standin, directory),
        pool_size=1, pool_check_interval=0.2, ephemeral_ttl=20.0,
    ) as up:
        yield up
    shutil.rmtree(directory, ignore_errors=True)


def control_of(up: Up) -> tuple[ControlPlane, KubernetesProvisioner]:
    assert up.control is not None and up.control.control is not None
    provisioner = up.control.provisioner
    assert isinstance(provisioner, KubernetesProvisioner)
    return up.control.control, provisioner


async def psql(url: str, sql: str) -> str:
    code, out, err = await run(PSQL, url, "-X", "-Atq", "-v", "ON_ERROR_STOP=1", "-c", sql)
    assert code == 0, err
    return out.strip()


async def asyncpg_connect(up: Up, ep: CreatedEndpoint) -> asyncpg.Connection:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return await asyncpg.connect(
        host="127.0.0.1", port=up.proxy_port, user=ep.user, password=ep.password,
        database=ep.database, ssl=ctx, server_settings={"options": f"endpoint={ep.id}"},
    )


async def create(up: Up) -> CreatedEndpoint:
    """A durable endpoint from the warm pool: the control API answers a create within
    its client timeout however loaded the machine is (an on-demand pod start may not)."""
    assert up.control is not None and up.client is not None
    pool = up.control.pool
    assert pool is not None
    await pool.wait_until(lambda: pool.ready_count(DURABLE) == 1, 120)
    ep = await up.client.create_endpoint()
    assert ep.cold_start == "pool_hit"
    return ep


def patient_client(up: Up) -> ControlClient:
    """A control client that waits as long as an on-demand pod start may take on a
    loaded machine (the default client gives up after 10 s)."""
    assert up.control is not None and up.api_key_file is not None
    return ControlClient(up.control.api_url, up.api_key_file.read_text().strip(), timeout=120)


async def show(url: str, name: str) -> str:
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        row = await (await conn.execute(f"show {name}")).fetchone()
        assert row is not None
        return str(row[0])


async def compute_of(up: Up, endpoint_id: str) -> str:
    control, _ = control_of(up)
    row = await control.store.get_endpoint(endpoint_id)
    assert row is not None and row.compute_id is not None
    return row.compute_id


async def test_create_suspend_wake_keeps_data_on_the_pvc(kube_up: Up, standin: KubeStandin) -> None:
    assert kube_up.client is not None
    ep = await create(kube_up)
    compute_id = await compute_of(kube_up, ep.id)
    await psql(ep.url_no_sni, "create table notes (id int primary key, body text)")
    await psql(ep.url, "insert into notes select g, 'n' || g from generate_series(1, 100) g")
    pod = standin.objects[(NAMESPACE, "pods", k8s_objects.pod_name(compute_id))]
    # The proxy is given the pod IP, never a name.
    shown = await kube_up.client.get_endpoint(ep.id)
    assert shown.state == "active"

    await kube_up.client.suspend(ep.id)
    assert (NAMESPACE, "pods", k8s_objects.pod_name(compute_id)) not in standin.objects
    assert (NAMESPACE, "persistentvolumeclaims", k8s_objects.pvc_name(compute_id)) in (
        standin.objects
    )
    # Wake on connect: a new pod on the same claim, data intact (psycopg this time).
    async with await psycopg.AsyncConnection.connect(ep.url_no_sni) as conn:
        cur = await conn.execute("select sum(id), count(*) from notes")
        assert await cur.fetchone() == (5050, 100)
    new_pod = standin.objects[(NAMESPACE, "pods", k8s_objects.pod_name(compute_id))]
    assert new_pod["metadata"]["uid"] != pod["metadata"]["uid"]
    spec = new_pod["spec"]["volumes"][0]
    assert spec["persistentVolumeClaim"]["claimName"] == k8s_objects.pvc_name(compute_id)


async def test_wake_costs_one_create_and_no_polls(kube_up: Up, standin: KubeStandin) -> None:
    assert kube_up.client is not None
    ep = await create(kube_up)
    await kube_up.client.suspend(ep.id)
    compute_id = await compute_of(kube_up, ep.id)
    mark = len(standin.call_log)
    conn = await asyncpg_connect(kube_up, ep)
    try:
        assert await conn.fetchval("select 1") == 1
    finally:
        await conn.close()
    # Everything that touched this compute's objects, and every read or list at all
    # (the warm pool may be refilling meanwhile: its creates are its own).
    calls = [c for c in standin.call_log[mark:]
             if compute_id in c[2] or c[0] in ("get", "list")]
    assert calls == [("create", "pods", k8s_objects.pod_name(compute_id))]


async def test_pool_hit_uses_a_ready_pod(kube_up: Up, standin: KubeStandin) -> None:
    assert kube_up.control is not None and kube_up.client is not None
    pool = kube_up.control.pool
    assert pool is not None
    await pool.wait_until(lambda: pool.ready_count(DURABLE) == 1, 120)
    pooled = next(iter(pool.ready))
    ep = await create(kube_up)
    assert await compute_of(kube_up, ep.id) == pooled
    conn = await asyncpg_connect(kube_up, ep)
    try:
        assert await conn.fetchval("select current_user || '@' || current_database()") == (
            "app@main"
        )
    finally:
        await conn.close()
    # Pooled pods carry the labels a restarted control plane finds them by.
    pod = standin.objects[(NAMESPACE, "pods", k8s_objects.pod_name(pooled))]
    assert pod["metadata"]["labels"][k8s_objects.LABEL_COMPUTE] == pooled


async def test_ephemeral_runs_in_memory_and_expires(kube_up: Up, standin: KubeStandin) -> None:
    assert kube_up.client is not None
    control, provisioner = control_of(kube_up)
    ep = await kube_up.client.create_endpoint(tier="ephemeral")
    compute_id = await compute_of(kube_up, ep.id)
    name = k8s_objects.pod_name(compute_id)
    pod = standin.objects[(NAMESPACE, "pods", name)]
    assert pod["spec"]["volumes"][0]["emptyDir"]["medium"] == "Memory"
    assert (NAMESPACE, "persistentvolumeclaims", k8s_objects.pvc_name(compute_id)) not in (
        standin.objects
    )
    assert await psql(ep.url_no_sni, "select 41 + 1") == "42"
    # Its data is in the pod's memory: a resize (a new pod) would start it empty.
    with pytest.raises(ControlAPIError) as refused:
        await kube_up.client.resize(ep.id, "medium")
    assert (refused.value.status, refused.value.code) == (409, "ephemeral_not_resizable")
    assert await psql(ep.url_no_sni, "select 41 + 1") == "42"
    sandbox_dir = standin.sandboxes[pod["metadata"]["uid"]].dir
    # The janitor deletes it after the TTL: pod and secret gone, its emptyDir too.
    assert provisioner.pods is not None
    pods = provisioner.pods
    await pods.wait_for(lambda: pods.get(name) is None, 60)
    secrets = provisioner.secrets
    assert secrets is not None
    await secrets.wait_for(lambda: secrets.get(k8s_objects.secret_name(compute_id)) is None, 60)
    assert not sandbox_dir.exists()
    assert await control.store.get_endpoint(ep.id) is None or (
        (await control.get(ep.id)).state.value == "deleted"
    )


async def test_watch_broken_with_410_recovers(kube_up: Up, standin: KubeStandin) -> None:
    assert kube_up.client is not None
    _, provisioner = control_of(kube_up)
    assert provisioner.pods is not None
    pods = provisioner.pods
    relists = pods.relists
    ep = await create(kube_up)
    await kube_up.client.suspend(ep.id)
    standin.expire_watches()
    await pods.wait_for(lambda: pods.relists > relists, 60)
    # The cache is whole again: a wake sees its pod become ready through the new watch.
    assert await psql(ep.url, "select 'back'") == "back"


async def test_pod_killed_under_a_session(kube_up: Up, standin: KubeStandin) -> None:
    """The pod dies (OOM kill, node trouble) under an idle session: the session parks,
    and its next message wakes a new pod on the same claim (the failed one is replaced)."""
    assert kube_up.proxy is not None
    ep = await create(kube_up)
    await psql(ep.url, "create table t as select 7 as v")
    name = k8s_objects.pod_name(await compute_of(kube_up, ep.id))
    uid = standin.objects[(NAMESPACE, "pods", name)]["metadata"]["uid"]
    conn = await asyncpg_connect(kube_up, ep)
    try:
        assert await conn.fetchval("select v from t") == 7
        await all_movable(kube_up, ep, 1)
        parked = kube_up.proxy.state.metrics.sessions_parked_total._value.get()
        await standin.kill_pod(NAMESPACE, name)
        # A message sent before the proxy saw the pod go would meet the dying
        # backend (as it would without a proxy): wait for the parking.
        await parked_sessions(kube_up, parked + 1)
        assert await conn.fetchval("select v from t") == 7
    finally:
        conn.terminate()
    assert standin.objects[(NAMESPACE, "pods", name)]["metadata"]["uid"] != uid
    assert await psql(ep.url_no_sni, "select v from t") == "7"


async def test_control_plane_restart_adopts_pods_and_cleans_orphans(
    standin: KubeStandin, pg_bin: Path
) -> None:
    directory = make_data_dir("pgwake-kube-restart-")
    settings = up_settings(directory, pg_bin, kubernetes=kube_settings(standin, directory))
    try:
        up = Up(settings)
        await up.start()
        try:
            assert up.client is not None
            ep = await up.client.create_endpoint()
            await psql(ep.url, "create table kept as select 'yes' as v")
            compute_id = await compute_of(up, ep.id)
            old_port = up.proxy_port
            uid = standin.objects[(NAMESPACE, "pods", k8s_objects.pod_name(compute_id))][
                "metadata"]["uid"]
        finally:
            await up.stop()
        # The pod outlived the control plane.
        pod = standin.objects[(NAMESPACE, "pods", k8s_objects.pod_name(compute_id))]
        assert pod["metadata"]["uid"] == uid and k8s_objects.is_ready(pod)
        # A pod no control DB knows (left by a crash between create and record).
        orphan = k8s_objects.pod_manifest("c-orphan2", Tier.EPHEMERAL, size_class_of("small"),
                                          kube_settings(standin, directory).compute)
        orphan_secret = k8s_objects.secret_manifest(
            "c-orphan2", Tier.EPHEMERAL, "pw", kube_settings(standin, directory).compute)
        await _post(standin, "secrets", orphan_secret)
        await _post(standin, "pods", orphan)

        up = Up(settings)
        await up.start()
        try:
            assert up.client is not None
            before = standin.calls.get(("create", "pods"), 0)
            url = ep.url_no_sni.replace(f":{old_port}/", f":{up.proxy_port}/")
            assert await psql(url, "select v from kept") == "yes"
            assert standin.calls.get(("create", "pods"), 0) == before  # adopted, not restarted
            assert standin.objects[(NAMESPACE, "pods", k8s_objects.pod_name(compute_id))][
                "metadata"]["uid"] == uid
            _, provisioner = control_of(up)
            assert provisioner.pods is not None
            pods = provisioner.pods
            await pods.wait_for(lambda: pods.get("pgwake-c-orphan2") is None, 60)
        finally:
            await up.stop()
    finally:
        shutil.rmtree(directory, ignore_errors=True)


async def test_a_medium_endpoint_runs_a_medium_pod(kube_up: Up, standin: KubeStandin) -> None:
    medium = size_class_of("medium")
    async with patient_client(kube_up) as client:
        ep = await client.create_endpoint(size="medium")
    assert ep.cold_start == "pool_miss"  # the warm pool holds small computes only
    compute_id = await compute_of(kube_up, ep.id)
    pod = standin.objects[(NAMESPACE, "pods", k8s_objects.pod_name(compute_id))]
    (container,) = pod["spec"]["containers"]
    assert container["resources"] == medium.kubernetes_resources()
    assert k8s_objects.size_of(pod) == "medium"
    # The settings reach PostgreSQL: asked through the proxy, as a client would.
    assert await show(ep.url_no_sni, "shared_buffers") == medium.shared_buffers == "128MB"
    assert await show(ep.url, "max_connections") == str(medium.max_connections)
    _, provisioner = control_of(kube_up)
    assert provisioner.connection_budget(medium) == medium.max_connections - 3


async def test_freeze_refuses_new_connections_and_keeps_sessions(
    kube_up: Up, standin: KubeStandin
) -> None:
    """refuse_new_connections is PostgreSQL's smart shutdown of the pod's postmaster; no
    second pod starts on the claim while the first one exists in any phase."""
    ep = await create(kube_up)
    compute_id = await compute_of(kube_up, ep.id)
    _, provisioner = control_of(kube_up)
    name = k8s_objects.pod_name(compute_id)
    ip = k8s_objects.pod_ip(standin.objects[(NAMESPACE, "pods", name)])
    assert ip is not None

    async def direct() -> asyncpg.Connection:
        return await asyncpg.connect(host=ip, port=k8s_objects.POSTGRES_PORT, user=ep.user,
                                     password=ep.password, database=ep.database, ssl=False)

    session = await direct()
    try:
        assert await provisioner.refuse_new_connections(compute_id)
        with pytest.raises(asyncpg.CannotConnectNowError):  # 57P03
            (await direct()).terminate()
        # The open session goes on.
        assert await session.fetchval("select 40 + 2") == 42
        alive = provisioner.live_postmaster(compute_id, Tier.DURABLE)
        assert alive is not None and alive.status == "Running"
        with pytest.raises(ProvisionerError, match="still exists"):
            await provisioner.start(compute_id, Tier.DURABLE, adopt=False)
    finally:
        await session.close()
    # The last session gone, the smart shutdown ends the postmaster: the pod finishes,
    # and still counts as a server until it is deleted.
    assert provisioner.pods is not None
    pods = provisioner.pods
    await pods.wait_for(lambda: k8s_objects.is_finished(pods.get(name) or {}), 60)
    alive = provisioner.live_postmaster(compute_id, Tier.DURABLE)
    assert alive is not None and (alive.pid, alive.status) == (0, "Succeeded")
    with pytest.raises(ProvisionerError, match="still exists"):
        await provisioner.start(compute_id, Tier.DURABLE, adopt=False)
    await provisioner.stop(compute_id)
    assert provisioner.live_postmaster(compute_id, Tier.DURABLE) is None
    assert not await provisioner.refuse_new_connections(compute_id)  # nothing to freeze
    # The next connect wakes it again on the same claim.
    assert await psql(ep.url_no_sni, "select 'awake'") == "awake"


async def test_resize_starts_the_next_generation_on_the_same_claim(
    kube_up: Up, standin: KubeStandin
) -> None:
    assert kube_up.client is not None
    ep = await create(kube_up)
    compute_id = await compute_of(kube_up, ep.id)
    name = k8s_objects.pod_name(compute_id)
    await psql(ep.url_no_sni, "create table kept as select g as id "
               "from generate_series(1, 100) g")
    old = standin.objects[(NAMESPACE, "pods", name)]
    assert k8s_objects.size_of(old) == "small"

    result = await kube_up.client.resize(ep.id, "medium")
    assert (result.previous_size, result.size) == ("small", "medium")

    new = standin.objects[(NAMESPACE, "pods", name)]
    assert new["metadata"]["uid"] != old["metadata"]["uid"]
    assert k8s_objects.size_of(new) == "medium"
    assert new["spec"]["containers"][0]["resources"] == (
        size_class_of("medium").kubernetes_resources())
    claim = new["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"]
    assert claim == k8s_objects.pvc_name(compute_id)
    # The old generation's pod is gone for good: only one pod ever ran on the claim.
    assert old["metadata"]["uid"] not in standin.sandboxes
    assert await show(ep.url_no_sni, "shared_buffers") == "128MB"
    assert await psql(ep.url, "select sum(id) from kept") == "5050"


async def _post(standin: KubeStandin, resource: str, body: dict[str, object]) -> None:
    import aiohttp

    async with aiohttp.ClientSession() as session, session.post(
        f"{standin.url}/api/v1/namespaces/{NAMESPACE}/{resource}", json=body
    ) as resp:
        assert resp.status == 201, await resp.text()
    await asyncio.sleep(0)
