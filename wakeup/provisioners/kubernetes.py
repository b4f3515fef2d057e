"""Kubernetes provisioner: a compute is a Pod (its PVC outlives it), reached at its pod IP.

Readiness and addresses come from watch-based caches (pods, PVCs, secrets),
so a wake costs one API call (the pod create) and no polling. The control
plane logs in to a compute as `pgwake_admin` over the network with a
password generated per compute and kept in the compute's Secret; the pod's
pg_hba admits the admin only from the control plane's addresses.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

from wakeup.provisioners import k8s_objects as objects
from wakeup.provisioners.base import AdminTarget, ComputeAddress, ProvisionerError, Tier
from wakeup.provisioners.k8s_api import (
    Conflict,
    KubeAPI,
    KubeError,
    KubeSettings,
    load_configuration,
)
from wakeup.provisioners.k8s_reflector import Reflector
from wakeup.secrets import generate_password

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class KubernetesSettings:
    api: KubeSettings
    compute: objects.ComputeSpec = field(default_factory=objects.ComputeSpec)
    size_class: str = "small"
    start_timeout: float = 120.0  # scheduling, a volume attach, an image pull in the worst case
    stop_timeout: float = 60.0
    list_timeout: float = 30.0


class KubernetesProvisioner:
    # Pods keep running while the control plane restarts; the next one adopts them.
    outlives_control_plane = True

    def __init__(self, settings: KubernetesSettings, api: KubeAPI | None = None):
        objects.size_class_of(settings.size_class)
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
        secret = objects.secret_manifest(
            compute_id, tier, self.settings.size_class, password, self.settings.compute
        )
        try:
            await api.create("secrets", secret)
            self._passwords[compute_id] = password
            if tier is Tier.DURABLE:
                await api.create("persistentvolumeclaims", objects.pvc_manifest(
                    compute_id, self.settings.size_class, self.settings.compute))
        except Conflict as exc:
            raise ProvisionerError(f"compute {compute_id} already has storage") from exc
        except KubeError as exc:
            raise ProvisionerError(f"creating compute {compute_id}: {exc}") from exc

    def _size_class(self, compute_id: str) -> str:
        assert self.secrets is not None
        secret = self.secrets.get(objects.secret_name(compute_id))
        labels = (secret or {}).get("metadata", {}).get("labels") or {}
        size = str(labels.get(objects.LABEL_SIZE))
        return size if size in objects.SIZE_CLASSES else self.settings.size_class

    async def start(self, compute_id: str, tier: Tier) -> ComputeAddress:
        assert self.pods is not None, "prepare() first"
        name = objects.pod_name(compute_id)
        pods = self.pods
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
                    manifest = objects.pod_manifest(
                        compute_id, tier, self._size_class(compute_id), self.settings.compute
                    )
                    try:
                        uid = (await self._api().create("pods", manifest))["metadata"]["uid"]
                    except Conflict:
                        pass  # created by an earlier attempt whose answer was lost
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

        The entrypoint turns the kubelet's SIGTERM into a fast shutdown; `smart` is
        not offered on Kubernetes (the suspender only stops idle computes).
        """
        if self._pod(compute_id) is None:
            return
        await self._delete_pod(compute_id, wait=True)

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
