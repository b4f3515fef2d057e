"""A watch-based cache of one kind of object: list, then watch from the list's resourceVersion.

As kubespawner's reflector: a local dict by name is the cache; on 410 Gone (or
any broken watch) it lists again, after a jittered backoff when the failures
repeat. Readers never poll: they wait on `changed`, a Condition notified on
every event, with a predicate over the cache and a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

import aiohttp

from wakeup.provisioners.k8s_api import Backoff, Gone, KubeAPI, KubeError

log = logging.getLogger(__name__)

Obj = dict[str, Any]


class Reflector:
    def __init__(
        self,
        api: KubeAPI,
        resource: str,
        selector: str,
        *,
        watch_timeout: int = 300,
        backoff: Backoff | None = None,
    ):
        self.api = api
        self.resource = resource
        self.selector = selector
        self.watch_timeout = watch_timeout
        self.backoff = backoff or Backoff(initial=0.2, maximum=10.0)
        self.objects: dict[str, Obj] = {}
        self.resource_version = ""
        self.changed = asyncio.Condition()
        self.first_load = asyncio.Event()
        self.relists = 0  # how often the cache was rebuilt from a list (410s and failures)
        self._task: asyncio.Task[None] | None = None

    def get(self, name: str) -> Obj | None:
        return self.objects.get(name)

    async def start(self, timeout: float) -> None:
        """Begin; return once the first list is in the cache."""
        self._task = asyncio.create_task(self._run(), name=f"reflector:{self.resource}")
        first = asyncio.ensure_future(self.first_load.wait())
        try:
            done, _ = await asyncio.wait({first, self._task}, timeout=timeout,
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            first.cancel()
        if self._task in done:
            self._task.result()  # raises what ended it
        if not self.first_load.is_set():
            raise KubeError(0, f"could not list {self.resource} within {timeout:.0f}s")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def wait_for(self, predicate: Callable[[], bool], timeout: float) -> None:
        """Wait (on cache events) until `predicate()` holds; TimeoutError after `timeout`."""
        async with asyncio.timeout(timeout), self.changed:
            await self.changed.wait_for(predicate)

    async def _list(self) -> None:
        result = await self.api.list(self.resource, self.selector)
        objects = {obj["metadata"]["name"]: obj for obj in result.get("items") or ()}
        async with self.changed:
            self.objects = objects
            self.resource_version = str(result.get("metadata", {}).get("resourceVersion", ""))
            self.relists += 1
            self.first_load.set()
            self.changed.notify_all()

    async def _run(self) -> None:
        failures = 0
        need_list = True
        while True:
            try:
                if need_list:
                    await self._list()
                    need_list = False
                async for event in self.api.watch(
                    self.resource, self.selector, self.resource_version, self.watch_timeout
                ):
                    await self._apply(event)
                    failures = 0
                # The server closed the watch (its timeout): resume from where we are.
            except Gone:
                log.info("watch on %s expired (410); listing again", self.resource)
                need_list = True
                failures += 1
            except (KubeError, OSError, TimeoutError, ValueError, KeyError) as exc:
                log.warning("watch on %s failed: %s", self.resource, exc)
                need_list = True
                failures += 1
            except aiohttp.ClientError as exc:
                log.warning("watch on %s broke: %s", self.resource, exc)
                need_list = True
                failures += 1
            if failures > 1:
                # The first failure relists at once (a 410 is routine); repeated ones
                # back off so that a sick API server is not hammered.
                await asyncio.sleep(self.backoff.delay(failures - 2))

    async def _apply(self, event: Obj) -> None:
        kind = event.get("type")
        obj = event.get("object") or {}
        version = str(obj.get("metadata", {}).get("resourceVersion", ""))
        async with self.changed:
            if kind == "BOOKMARK":
                pass
            elif kind in ("ADDED", "MODIFIED"):
                self.objects[obj["metadata"]["name"]] = obj
            elif kind == "DELETED":
                self.objects.pop(obj["metadata"]["name"], None)
            else:
                return
            if version:
                self.resource_version = version
            self.changed.notify_all()
