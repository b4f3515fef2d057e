"""A stand-in Kubernetes API server (no kube-apiserver can run here): the REST subset computes use.

Pods, PersistentVolumeClaims and Secrets in namespaces: create, get, list
(with equality label selectors), watch (resourceVersion, streamed JSON lines,
ERROR events with 410 once the history is compacted), delete (graceful for
pods). Every created object is validated strictly against the Kubernetes 1.33
schema. Pods are run by the stand-in kubelet (kubelet.py). Test hooks:
`expire_watches()` (a 410 for every watcher), `kill_pod()` (the container dies),
`calls` (requests by verb and resource).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import kubernetes_validate
from aiohttp import web

from tests.kube_standin.kubelet import Container, PodSandbox
from wakeup.provisioners.pgbin import PgBinaries, RunAs
from wakeup.provisioners.process import wait_pid_exit

log = logging.getLogger(__name__)

KINDS = {"pods": "Pod", "persistentvolumeclaims": "PersistentVolumeClaim", "secrets": "Secret"}
Obj = dict[str, Any]


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _status(code: int, reason: str, message: str) -> web.Response:
    body = {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": code,
            "reason": reason, "message": message}
    return web.json_response(body, status=code)


def _matches(obj: Obj, selector: str) -> bool:
    labels = obj["metadata"].get("labels") or {}
    for term in filter(None, selector.split(",")):
        key, _, value = term.partition("=")
        if labels.get(key) != value:
            return False
    return True


class KubeStandin:
    def __init__(self, root: Path, binaries: PgBinaries, template: Path,
                 run_as: RunAs | None, *, start_timeout: float = 60.0):
        self.root = root
        self.binaries = binaries
        self.image_root = template.parent
        self.run_as = run_as
        self.start_timeout = start_timeout
        self.objects: dict[tuple[str, str, str], Obj] = {}  # (namespace, resource, name)
        self.version = 0
        # (version, namespace, resource, event) in order; compacting drops it.
        self.history: list[tuple[int, str, str, Obj]] = []
        self.compacted = 0  # versions at or below this are too old to watch from
        self.watchers: set[asyncio.Queue[Obj | None]] = set()
        self.calls: dict[tuple[str, str], int] = {}
        self.call_log: list[tuple[str, str, str]] = []  # (verb, resource, object name)
        self.sandboxes: dict[str, PodSandbox] = {}  # by pod uid
        self._tasks: set[asyncio.Task[None]] = set()
        self._next_ip = 1
        self._runner: web.AppRunner | None = None
        self.port = 0
        self.validate = True
        self.fail_next: list[int] = []

    # -- serving ----------------------------------------------------------------------

    async def start(self) -> None:
        (self.root / "pvcs").mkdir(parents=True, exist_ok=True)
        (self.root / "pods").mkdir(parents=True, exist_ok=True)
        app = web.Application(middlewares=[self._injected_failures])
        base = "/api/v1/namespaces/{namespace}/{resource}"
        app.router.add_get(base, self._list_or_watch)
        app.router.add_post(base, self._create)
        app.router.add_get(base + "/{name}", self._get)
        app.router.add_delete(base + "/{name}", self._delete)
        self._runner = web.AppRunner(app, handle_signals=False, access_log=None,
                                     shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        server = site._server
        assert server is not None
        self.port = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    @web.middleware
    async def _injected_failures(self, request: web.Request, handler: Any) -> web.StreamResponse:
        """Test hook: answer the next requests with the statuses in `fail_next`, as an
        overloaded API server does (429 with Retry-After, 503)."""
        if self.fail_next:
            code = self.fail_next.pop(0)
            self._count("failed", str(code))
            response = _status(code, "TooManyRequests" if code == 429 else "ServiceUnavailable",
                               "injected by the test")
            response.headers["Retry-After"] = "0"
            return response
        result: web.StreamResponse = await handler(request)
        return result

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def kubeconfig(self, path: Path, namespace: str) -> Path:
        path.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "standin",
            "clusters": [{"name": "standin", "cluster": {"server": self.url}}],
            "users": [{"name": "pgwake", "user": {"token": "standin-token"}}],
            "contexts": [{"name": "standin", "context": {
                "cluster": "standin", "user": "pgwake", "namespace": namespace}}],
        }))
        return path

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for sandbox in list(self.sandboxes.values()):
            if sandbox.container is not None:
                await sandbox.container.kill_all()
            sandbox.remove()
        for queue in list(self.watchers):
            queue.put_nowait(None)
        if self._runner is not None:
            await self._runner.cleanup()

    def _count(self, verb: str, resource: str, name: str = "") -> None:
        self.calls[(verb, resource)] = self.calls.get((verb, resource), 0) + 1
        self.call_log.append((verb, resource, name))

    # -- the object store -------------------------------------------------------------

    def _emit(self, namespace: str, resource: str, kind: str, obj: Obj) -> None:
        self.version += 1
        obj["metadata"]["resourceVersion"] = str(self.version)
        event = {"type": kind, "object": obj}
        self.history.append((self.version, namespace, resource, json.loads(json.dumps(event))))
        for queue in list(self.watchers):
            queue.put_nowait({"ns": namespace, "resource": resource,
                                                  "version": self.version, "event": event})

    def _put(self, namespace: str, resource: str, obj: Obj, kind: str) -> None:
        self.objects[(namespace, resource, obj["metadata"]["name"])] = obj
        self._emit(namespace, resource, kind, obj)

    def _remove(self, namespace: str, resource: str, name: str) -> None:
        obj = self.objects.pop((namespace, resource, name), None)
        if obj is not None:
            self._emit(namespace, resource, "DELETED", obj)

    def expire_watches(self) -> None:
        """Compact the history and end every watch with 410 Gone, as an API server
        does when a watcher's resourceVersion falls out of its window."""
        self.compacted = self.version
        self.history.clear()
        for queue in list(self.watchers):
            queue.put_nowait({"gone": True})

    # -- handlers ---------------------------------------------------------------------

    def _resource(self, request: web.Request) -> tuple[str, str] | web.Response:
        resource = request.match_info["resource"]
        if resource not in KINDS:
            return _status(404, "NotFound", f"the server could not find resource {resource}")
        return request.match_info["namespace"], resource

    async def _create(self, request: web.Request) -> web.Response:
        where = self._resource(request)
        if isinstance(where, web.Response):
            return where
        namespace, resource = where
        obj = await request.json()
        self._count("create", resource, str((obj.get("metadata") or {}).get("name")))
        if obj.get("kind") != KINDS[resource]:
            return _status(400, "BadRequest", f"kind {obj.get('kind')!r} in {resource}")
        if self.validate:
            try:
                kubernetes_validate.validate(obj, "1.33", strict=True)
            except kubernetes_validate.ValidationError as exc:
                return _status(422, "Invalid", str(exc).splitlines()[0])
        name = obj["metadata"]["name"]
        if (namespace, resource, name) in self.objects:
            return _status(409, "AlreadyExists", f'{resource} "{name}" already exists')
        obj["metadata"].update(namespace=namespace, uid=str(uuid.uuid4()),
                               creationTimestamp=_now())
        if resource == "persistentvolumeclaims":
            (self.root / "pvcs" / name).mkdir(mode=0o700)
            if self.run_as is not None:
                self.run_as.chown(self.root / "pvcs" / name)
            obj["status"] = {"phase": "Bound"}
        if resource == "pods":
            obj["status"] = {"phase": "Pending", "conditions": []}
        self._put(namespace, resource, obj, "ADDED")
        if resource == "pods":
            self._spawn(self._run_pod(namespace, obj), f"standin-pod:{name}")
        return web.json_response(obj, status=201)

    async def _get(self, request: web.Request) -> web.Response:
        where = self._resource(request)
        if isinstance(where, web.Response):
            return where
        namespace, resource = where
        self._count("get", resource, request.match_info["name"])
        obj = self.objects.get((namespace, resource, request.match_info["name"]))
        if obj is None:
            return _status(404, "NotFound", f'{resource} "{request.match_info["name"]}" not found')
        return web.json_response(obj)

    async def _delete(self, request: web.Request) -> web.Response:
        where = self._resource(request)
        if isinstance(where, web.Response):
            return where
        namespace, resource = where
        self._count("delete", resource, request.match_info["name"])
        name = request.match_info["name"]
        obj = self.objects.get((namespace, resource, name))
        if obj is None:
            return _status(404, "NotFound", f'{resource} "{name}" not found')
        if resource != "pods":
            self._remove(namespace, resource, name)
            if resource == "persistentvolumeclaims":
                await asyncio.to_thread(
                    shutil.rmtree, self.root / "pvcs" / name, ignore_errors=True)
            return web.json_response(obj)
        grace_text = request.query.get("gracePeriodSeconds")
        grace = int(grace_text) if grace_text else int(
            obj["spec"].get("terminationGracePeriodSeconds", 30))
        if not obj["metadata"].get("deletionTimestamp"):
            obj["metadata"]["deletionTimestamp"] = _now()
            obj["metadata"]["deletionGracePeriodSeconds"] = grace
            self._put(namespace, resource, obj, "MODIFIED")
            self._spawn(self._stop_pod(namespace, obj, grace), f"standin-stop:{name}")
        return web.json_response(obj)

    async def _list_or_watch(self, request: web.Request) -> web.StreamResponse:
        where = self._resource(request)
        if isinstance(where, web.Response):
            return where
        namespace, resource = where
        selector = request.query.get("labelSelector", "")
        if request.query.get("watch", "").lower() in ("true", "1"):  # Go ParseBool
            return await self._watch(request, namespace, resource, selector)
        self._count("list", resource)
        items = [obj for (ns, res, _), obj in sorted(self.objects.items())
                 if ns == namespace and res == resource and _matches(obj, selector)]
        return web.json_response({"kind": KINDS[resource] + "List", "apiVersion": "v1",
                                  "metadata": {"resourceVersion": str(self.version)},
                                  "items": items})

    async def _watch(self, request: web.Request, namespace: str, resource: str,
                     selector: str) -> web.StreamResponse:
        self._count("watch", resource)
        since = int(request.query.get("resourceVersion") or self.version)
        timeout = float(request.query.get("timeoutSeconds") or 1800)
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)
        queue: asyncio.Queue[Obj | None] = asyncio.Queue()
        self.watchers.add(queue)

        async def send(event: Obj) -> None:
            await response.write(json.dumps(event).encode() + b"\n")

        try:
            if since < self.compacted:
                await send(_gone_event(since))
                return response
            for version, ns, res, event in list(self.history):
                if version > since and ns == namespace and res == resource and _matches(
                    event["object"], selector
                ):
                    await send(event)
            async with asyncio.timeout(timeout):
                while True:
                    item = await queue.get()
                    if item is None:
                        break
                    if item.get("gone"):
                        await send(_gone_event(since))
                        break
                    if item["version"] <= since:
                        continue
                    if item["ns"] == namespace and item["resource"] == resource and _matches(
                        item["event"]["object"], selector
                    ):
                        await send(item["event"])
        except (TimeoutError, ConnectionResetError):
            pass
        finally:
            self.watchers.discard(queue)
        with contextlib.suppress(ConnectionResetError):
            await response.write_eof()
        return response

    # -- the kubelet --------------------------------------------------------------------

    def _spawn(self, work: Any, name: str) -> None:
        task = asyncio.create_task(work, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("stand-in task %s failed", task.get_name(), exc_info=task.exception())

    def _pod_ip(self) -> str:
        n = self._next_ip
        self._next_ip += 1
        return f"127.77.{n // 250}.{n % 250 + 2}"

    def _update_pod(self, namespace: str, pod: Obj, change: Callable[[Obj], None]) -> None:
        key = (namespace, "pods", pod["metadata"]["name"])
        current = self.objects.get(key)
        if current is None or current["metadata"]["uid"] != pod["metadata"]["uid"]:
            return
        change(current)
        self._put(namespace, "pods", current, "MODIFIED")

    async def _run_pod(self, namespace: str, pod: Obj) -> None:
        ip = self._pod_ip()
        secrets = {name: obj for (ns, res, name), obj in self.objects.items()
                   if ns == namespace and res == "secrets"}
        sandbox = PodSandbox(self.root, pod, ip, secrets, self.binaries, self.image_root,
                             self.run_as)
        self.sandboxes[pod["metadata"]["uid"]] = sandbox

        def running(p: Obj) -> None:
            p["status"] = {
                "phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}], "startTime": _now(),
                "conditions": [{"type": "Ready", "status": "True"}],
                "containerStatuses": [{"name": "postgres", "ready": True,
                                       "state": {"running": {"startedAt": _now()}}}],
            }

        try:
            container = await sandbox.start(self.start_timeout)
        except Exception as exc:  # the pod fails, as a kubelet reports any start error
            message = str(exc)
            self._update_pod(namespace, pod, lambda p: p.update(status={
                "phase": "Failed", "message": message[-500:],
                "containerStatuses": [{"name": "postgres", "ready": False, "state": {
                    "terminated": {"exitCode": 1, "reason": "Error",
                                   "message": message[-500:]}}}]}))
            return
        self._update_pod(namespace, pod, running)
        await self._wait_exit(namespace, pod, container)

    async def _wait_exit(self, namespace: str, pod: Obj, container: Container) -> None:
        proc = container._proc
        assert proc is not None
        while not await wait_pid_exit(proc, 3600.0):
            pass
        code = proc.returncode

        def failed(p: Obj) -> None:
            p["status"]["phase"] = "Succeeded" if code == 0 else "Failed"
            p["status"]["conditions"] = [{"type": "Ready", "status": "False"}]
            p["status"]["containerStatuses"] = [{"name": "postgres", "ready": False, "state": {
                "terminated": {"exitCode": code if code is not None and code >= 0 else 137,
                               "reason": "Completed" if code == 0 else "Error"}}}]

        self._update_pod(namespace, pod, failed)

    async def _stop_pod(self, namespace: str, pod: Obj, grace: int) -> None:
        sandbox = self.sandboxes.get(pod["metadata"]["uid"])
        if sandbox is not None and sandbox.container is not None:
            await sandbox.container.terminate(float(grace))
        if sandbox is not None:
            self.sandboxes.pop(pod["metadata"]["uid"], None)
            await asyncio.to_thread(sandbox.remove)
        current = self.objects.get((namespace, "pods", pod["metadata"]["name"]))
        if current is not None and current["metadata"]["uid"] == pod["metadata"]["uid"]:
            self._remove(namespace, "pods", pod["metadata"]["name"])

    async def kill_pod(self, namespace: str, name: str) -> None:
        """The container dies (OOM kill, node trouble): SIGKILL, the pod turns Failed."""
        pod = self.objects[(namespace, "pods", name)]
        sandbox = self.sandboxes[pod["metadata"]["uid"]]
        assert sandbox.container is not None
        await sandbox.container.kill_all()

    def pods(self, namespace: str) -> list[Obj]:
        return [obj for (ns, res, _), obj in self.objects.items()
                if ns == namespace and res == "pods"]


def _gone_event(since: int) -> Obj:
    return {"type": "ERROR", "object": {
        "kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 410,
        "reason": "Expired", "message": f"too old resource version: {since}"}}
