"""Kubernetes provisioner: a compute is a Pod (its PVC outlives it), reached at its pod IP.

Readiness and addresses come from watch-based caches (pods, PVCs, secrets),
so a wake costs one API call (the pod create) and no polling. The control
plane logs in to a compute as `pgwake_admin` over the network with a
password generated per compute and kept in the compute's Secret; the pod's
pg_hba admits the admin only from the control plane's addresses.

Each pod runs its endpoint's size class (wakeup/sizes.py: settings, resources,
the ephemeral tier's ram disk) and carries it as a label; a resize (generation
handoff) deletes the pod and creates the next one on the same PVC.
"""

from __future__ import annotations

import asyncio
import logging
import re
from dataclasses import dataclass, field

import asyncpg

from wakeup.computeconfig import admin_connect
from wakeup.provisioners import k8s_objects as objects
from wakeup.provisioners.base import (
    AdminTarget,
    ComputeAddress,
    ProvisionerError,
    Tier,
    connection_budget,
)
from wakeup.provisioners.k8s_api import (
    Conflict,
    KubeAPI,
    KubeError,
    KubeSettings,
    load_configuration,
)
from wakeup.provisioners.k8s_reflector import Reflector
from wakeup.secrets import generate_password
from wakeup.sizes import DEFAULT_SIZE, SizeClass, size_class_of

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PodServer:
    """A compute's pod as a RunningServer. `pid` is 0: the postmaster's pid lives in
    the pod's PID namespace and the API does not report it; the pod object is what
    stands for the server (it exists until the kubelet has stopped its container)."""

    name: str
    status: str  # the pod's phase, or "terminating" once it is being deleted
    pid: int = 0


@dataclass(frozen=True)
class KubernetesSettings:
    api: KubeSettings
    compute: objects.ComputeSpec = field(default_factory=objects.ComputeSpec)
    start_timeout: float = 120.0  # scheduling, a volume attach, an image pull in the worst case
    stop_timeout: float = 60.0
    list_timeout: float = 30.0


class KubernetesProvisioner:
    # Pods keep running while the control plane restarts; the next one adopts them.
    outlives_control_plane = True
    ephemeral_survives_stop = False  # the emptyDir goes with the pod

    def __init__(self, settings: KubernetesSettings, api: KubeAPI | None = None):
        self.settings = settings
        self.api = api
        self.pods: Reflector | None = None
        self.pvcs: Reflector | None = None
        self.secrets: Reflector | None = None
        # Passwords of secrets this process created, until the watch delivers them.
        self._passwords: dict[str, str] = {}

    async def prepare(self) -> None:
        if self.api is None:
            self.api = KubeAPI(self.settings.api, await load_configuration(self.settings.api))
        self.pods = Reflector(self.api, "pods", objects.SELECTOR)
        self.pvcs = Reflector(self.api, "persistentvolumeclaims", objects.SELECTOR)
        self.secrets = Reflector(self.api, "secrets", objects.SELECTOR)
        try:
            for reflector in (self.pods, self.pvcs, self.secrets):
                await reflector.start(self.settings.list_timeout)
        except BaseException:
            await self.close()
            raise
        log.info("kubernetes provisioner: namespace %s, %d compute pods found",
                 self.settings.api.namespace, len(self.pods.objects))

    def _api(self) -> KubeAPI:
        assert self.api is not None, "prepare() first"
        return self.api

    def _pod(self, compute_id: str) -> dict[str, object] | None:
        assert self.pods is not None, "prepare() first"
        return self.pods.get(objects.pod_name(compute_id))

    # -- lifecycle --------------------------------------------------------------------

    async def create(self, compute_id: str, tier: Tier) -> None:
        """The admin Secret, and for the durable tier the PVC: both outlive pods."""
        api = self._api()
        password = generate_password()
        secret = objects.secret_manifest(compute_id, tier, password, self.settings.compute)
        try:
            await api.create("secrets", secret)
            self._passwords[compute_id] = password
            if tier is Tier.DURABLE:
                await api.create("persistentvolumeclaims",
                                 objects.pvc_manifest(compute_id, self.settings.compute))
        except Conflict as exc:
            raise ProvisionerError(f"compute {compute_id} already has storage") from exc
        except KubeError as exc:
            raise ProvisionerError(f"creating compute {compute_id}: {exc}") from exc

    async def start(
        self, compute_id: str, tier: Tier, *, size: SizeClass | None = None,
        adopt: bool = True,
    ) -> ComputeAddress:
        """Create the compute's pod with `size`'s settings and resources (default: the
        smallest class) and return once it is ready.

        `adopt`: a ready pod of the compute is returned as is (whatever its size: a
        wake, or a pod left by an earlier control plane); a stopping or finished one
        is deleted first. Without it (a generation handoff) any pod of the compute,
        ready, starting, terminating or finished, is an error: its postgres may still
        write to the PVC, and a ReadWriteOnce claim does not stop a second pod on the
        same node from mounting it.
        """
        assert self.pods is not None, "prepare() first"
        name = objects.pod_name(compute_id)
        pods = self.pods
        size = size or size_class_of(DEFAULT_SIZE)
        if not adopt:
            alive = self.live_postmaster(compute_id, tier)
            if alive is not None:
                raise ProvisionerError(
                    f"compute {compute_id}: pod {alive.name} ({alive.status}) still exists;"
                    " refusing to start a second one on its storage"
                )
        deadline = self.settings.start_timeout
        try:
            async with asyncio.timeout(deadline):
                pod = pods.get(name)
                if pod is not None and objects.is_ready(pod):
                    return self._address(pod)
                if pod is not None and (objects.is_terminating(pod) or objects.is_finished(pod)):
                    # A stopping or crashed pod of this compute: never two on one volume.
                    await self._delete_pod(compute_id, wait=True)
                    pod = None
                uid = pod["metadata"]["uid"] if pod is not None else None
                if pod is None:
                    manifest = objects.pod_manifest(compute_id, tier, size, self.settings.compute)
                    try:
                        uid = (await self._api().create("pods", manifest))["metadata"]["uid"]
                    except Conflict:
                        if not adopt:
                            # A pod the cache has not shown yet: not ours to wait on.
                            raise ProvisionerError(
                                f"compute {compute_id}: pod {name} already exists;"
                                " refusing to start a second one on its storage"
                            ) from None
                        # Created by an earlier attempt whose answer was lost.
                # Seen, then ready, crashed or deleted under us: all are watch events.
                seen = False

                def settled() -> bool:
                    nonlocal seen
                    current = pods.get(name)
                    if current is None:
                        return seen
                    if uid is not None and current["metadata"].get("uid") != uid:
                        return False  # the cache has not caught up with our create yet
                    seen = True
                    return objects.is_ready(current) or objects.is_finished(current) or (
                        objects.is_terminating(current))

                await pods.wait_for(settled, deadline)
                pod = pods.get(name)
                if pod is not None and objects.is_ready(pod):
                    return self._address(pod)
                reason = _failure_reason(pod)
        except TimeoutError:
            reason = f"not ready within {deadline:.0f}s"
        except KubeError as exc:
            reason = str(exc)
        await self._delete_pod(compute_id, wait=False)
        raise ProvisionerError(f"compute {compute_id} did not start: {reason}")

    def _address(self, pod: dict[str, object]) -> ComputeAddress:
        ip = objects.pod_ip(pod)
        assert ip is not None
        return ComputeAddress(ip, objects.POSTGRES_PORT)

    async def _delete_pod(self, compute_id: str, *, wait: bool, grace: int | None = None) -> None:
        assert self.pods is not None
        name = objects.pod_name(compute_id)
        try:
            await self._api().delete("pods", name, grace=grace)
        except KubeError as exc:
            raise ProvisionerError(f"deleting pod {name}: {exc}") from exc
        if wait:
            pods = self.pods
            try:
                await pods.wait_for(lambda: pods.get(name) is None, self.settings.stop_timeout)
            except TimeoutError:
                raise ProvisionerError(
                    f"pod {name} still exists {self.settings.stop_timeout:.0f}s after delete"
                ) from None

    async def stop(self, compute_id: str, *, smart: float = 0.0) -> None:
        """Delete the pod and wait until it is gone: its volume may then be used again.

        Always a fast shutdown: the entrypoint turns the kubelet's SIGTERM into
        SIGINT for postgres. `smart` is not honoured here: a grace period of
        sessions finishing would hold the pod (and the wake of anyone who connects
        meanwhile) for up to `smart` seconds, and the suspender stops only computes
        with no active session anyway. A handoff's smart phase comes from
        `refuse_new_connections`, before this.
        """
        if self._pod(compute_id) is None:
            return
        await self._delete_pod(compute_id, wait=True)

    def live_postmaster(self, compute_id: str, tier: Tier) -> PodServer | None:
        """The compute's pod from the cache, in any phase (pending, running, finished,
        terminating): while the object exists its container may still hold the PVC.
        None once the watch has delivered its deletion."""
        pod = self._pod(compute_id)
        if pod is None:
            return None
        return PodServer(objects.pod_name(compute_id), objects.phase_of(pod))

    async def refuse_new_connections(self, compute_id: str, timeout: float = 10.0) -> bool:
        """Freeze: PostgreSQL's smart shutdown of the pod's postmaster. Open sessions go
        on; every new connection gets 57P03 "the database system is shutting down"
        (which proxies answer by waking again), exactly as on the local provisioner.

        The API can only signal a container through `pods/exec` (a streaming
        protocol and a broad RBAC grant), so the control plane's admin, a
        superuser, has its own server signal itself: `COPY ... TO PROGRAM` runs
        `kill -TERM <postmaster pid>` as the server's OS user inside the pod. The pid
        is read from postmaster.pid and checked to be a number before it goes on
        the command line. SIGTERM to the postmaster itself is a smart shutdown (the
        entrypoint only turns the *kubelet's* SIGTERM into a fast one). Once every
        session has ended the pod finishes (Succeeded); `stop` deletes it in any case.

        True once postmaster.pid says "stopping" (or the signal went out but that
        was not seen within `timeout`: the shutdown is under way). False when the
        compute was not frozen: its pod is not ready (nothing to freeze), or the
        admin could not log in or signal (logged). A handoff goes on either way:
        the control plane's own freeze (addresses invalidated, wakes queued behind
        the endpoint's lock) still holds; only a proxy that missed the invalidation
        could then open a session on the old generation, which the stop ends.
        """
        pod = self._pod(compute_id)
        if pod is None or not objects.is_ready(pod):
            return False
        tier = objects.tier_of(pod) or Tier.DURABLE
        signalled = False
        try:
            async with asyncio.timeout(timeout):
                conn = await admin_connect(self.admin_target(compute_id, tier), timeout)
                try:
                    pid = _postmaster_pid(await conn.fetchval(_READ_PID_FILE))
                    # No rows: nothing is written to the program's stdin, so kill
                    # exiting at once cannot fail the COPY with a broken pipe.
                    await conn.execute(
                        f"copy (select where false) to program 'kill -TERM {pid}'")
                    signalled = True
                    # The postmaster rewrites its pid file when it takes the signal;
                    # there is no event to wait on, so look briefly.
                    while True:
                        if _is_stopping(await conn.fetchval(_READ_PID_FILE)):
                            break
                        await asyncio.sleep(0.002)
                finally:
                    conn.terminate()
        except (OSError, TimeoutError, ProvisionerError, asyncpg.PostgresError,
                asyncpg.InterfaceError) as exc:
            if signalled:
                log.warning("compute %s: smart shutdown signalled, not yet seen: %s",
                            compute_id, exc)
                return True
            log.warning("compute %s: could not begin a smart shutdown (not frozen): %s",
                        compute_id, exc)
            return False
        return True

    def connection_budget(self, size: SizeClass) -> int:
        return connection_budget(dict(objects.postgres_settings(size)))

    async def destroy(self, compute_id: str, tier: Tier) -> None:
        await self._delete_pod(compute_id, wait=True)
        try:
            if tier is Tier.DURABLE:
                await self._api().delete("persistentvolumeclaims", objects.pvc_name(compute_id))
            await self._api().delete("secrets", objects.secret_name(compute_id))
        except KubeError as exc:
            raise ProvisionerError(f"deleting compute {compute_id}: {exc}") from exc
        self._passwords.pop(compute_id, None)

    async def status(self, compute_id: str, tier: Tier) -> ComputeAddress | None:
        pod = self._pod(compute_id)
        return self._address(pod) if pod is not None and objects.is_ready(pod) else None

    def is_running(self, compute_id: str) -> bool:
        pod = self._pod(compute_id)
        return pod is not None and objects.is_ready(pod)

    def _password(self, compute_id: str) -> str:
        assert self.secrets is not None
        secret = self.secrets.get(objects.secret_name(compute_id))
        if secret is not None:
            return objects.password_of(secret)
        password = self._passwords.get(compute_id)
        if password is None:
            raise ProvisionerError(f"compute {compute_id} has no admin secret")
        return password

    def admin_target(self, compute_id: str, tier: Tier) -> AdminTarget:
        pod = self._pod(compute_id)
        ip = objects.pod_ip(pod) if pod is not None else None
        if ip is None:
            raise ProvisionerError(f"compute {compute_id} is not running")
        return AdminTarget(ip, objects.POSTGRES_PORT, objects.ADMIN_USER,
                           password=self._password(compute_id))

    def known_computes(self, tier: Tier) -> list[str]:
        found: set[str] = set()
        for reflector in (self.pods, self.pvcs, self.secrets):
            assert reflector is not None
            for obj in reflector.objects.values():
                compute_id = objects.compute_id_of(obj)
                if compute_id is not None and objects.tier_of(obj) is tier:
                    found.add(compute_id)
        return sorted(found)

    async def stop_orphan(self, compute_id: str, tier: Tier) -> None:
        """A compute the control DB does not know: stop its pod. Its PVC and Secret stay
        for an operator to look at (a control DB restored from a backup must not
        cost data)."""
        if self._pod(compute_id) is not None:
            log.warning("deleting orphan compute pod %s", objects.pod_name(compute_id))
            try:
                await self._delete_pod(compute_id, wait=False)
            except ProvisionerError as exc:
                log.warning("%s", exc)

    async def kill(self, compute_id: str) -> None:
        """Delete the pod at once (grace 0), as a node failure would end it."""
        await self._delete_pod(compute_id, wait=True, grace=0)

    async def close(self) -> None:
        """Stop watching; the pods keep running (a restarted control plane adopts them)."""
        for reflector in (self.pods, self.pvcs, self.secrets):
            if reflector is not None:
                await reflector.stop()
        if self.api is not None:
            await self.api.close()


_READ_PID_FILE = "select pg_read_file('postmaster.pid')"


def _postmaster_pid(pid_file: str) -> int:
    """The first line of postmaster.pid: the postmaster's pid."""
    first = pid_file.split("\n", 1)[0].strip()
    if not re.fullmatch(r"[1-9][0-9]{0,9}", first):
        raise ProvisionerError(f"postmaster.pid starts with {first[:20]!r}, not a pid")
    return int(first)


def _is_stopping(pid_file: str) -> bool:
    """Line 8 of postmaster.pid is the postmaster's status (PostgreSQL 10 and later)."""
    lines = pid_file.split("\n")
    return len(lines) > 7 and lines[7].strip() == "stopping"


def _failure_reason(pod: dict[str, object] | None) -> str:
    if pod is None:
        return "its pod was deleted while it started"
    status = pod.get("status")
    if isinstance(status, dict):
        for cs in status.get("containerStatuses") or ():
            terminated = (cs.get("state") or {}).get("terminated")
            if terminated:
                return (f"postgres exited ({terminated.get('exitCode')}): "
                        f"{terminated.get('message') or terminated.get('reason') or ''}")
        return str(status.get("message") or status.get("phase") or "unknown")
    return "unknown"
