"""The one adapter to the Kubernetes API: kubernetes-asyncio calls, status codes, retries.

Every quirk of the API lives here: 404 (gone, often fine), 409 (already
exists), 410 (the watch's resourceVersion is too old), 429 and 5xx (retry
after a jittered backoff, honouring Retry-After). Objects travel as plain dicts:
the reflector caches them as the API sent them, without model classes.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from kubernetes_asyncio import client, config

log = logging.getLogger(__name__)

Obj = dict[str, Any]
MAX_BODY = 16 << 20  # one list response; far above what a namespace of computes needs
MAX_EVENT_LINE = 4 << 20


class KubeError(Exception):
    """The API refused a request; `status` is the HTTP status (0: no answer)."""

    def __init__(self, status: int, message: str):
        super().__init__(f"Kubernetes API: {status} {message}")
        self.status = status


class NotFound(KubeError):
    pass


class Conflict(KubeError):
    """409: the object exists already (or changed under us)."""


class Gone(KubeError):
    """410: the resourceVersion is too old; list again."""


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff with full jitter: the one retry policy of the adapter."""

    initial: float = 0.1
    maximum: float = 5.0
    factor: float = 2.0

    def delay(self, attempt: int, rng: Callable[[], float] = random.random) -> float:
        return rng() * min(self.maximum, self.initial * self.factor**attempt)


RETRYABLE = frozenset({429, 500, 502, 503, 504})


@dataclass(frozen=True)
class KubeSettings:
    namespace: str
    kubeconfig: Path | None = None  # None: in-cluster (service account)
    context: str | None = None
    request_timeout: float = 10.0
    attempts: int = 5  # for retryable statuses and connection errors


async def load_configuration(settings: KubeSettings) -> client.Configuration:
    cfg = client.Configuration()
    if settings.kubeconfig is None:
        config.load_incluster_config(client_configuration=cfg)
    else:
        await config.load_kube_config(
            config_file=str(settings.kubeconfig), context=settings.context,
            client_configuration=cfg, persist_config=False,
        )
    return cfg


class KubeAPI:
    """Namespaced create/get/list/watch/delete for the three kinds computes use."""

    KINDS = {"pods": "pod", "persistentvolumeclaims": "persistent_volume_claim",
             "secrets": "secret"}

    def __init__(self, settings: KubeSettings, configuration: client.Configuration,
                 backoff: Backoff | None = None):
        self.settings = settings
        self.namespace = settings.namespace
        self.backoff = backoff or Backoff()
        self._api_client = client.ApiClient(configuration)
        self._core = client.CoreV1Api(self._api_client)
        # Every request the adapter sends, by verb and resource: the loadtests report
        # API calls per wake from it.
        self.calls: dict[tuple[str, str], int] = {}

    async def close(self) -> None:
        await self._api_client.close()

    def _method(self, verb: str, resource: str) -> Callable[..., Awaitable[Any]]:
        method: Callable[..., Awaitable[Any]] = getattr(
            self._core, f"{verb}_namespaced_{self.KINDS[resource]}"
        )
        return method

    async def _once(self, verb: str, resource: str, *args: Any, **kwargs: Any) -> Obj:
        self.calls[(verb, resource)] = self.calls.get((verb, resource), 0) + 1
        resp = await self._method(verb, resource)(
            *args, _preload_content=False,
            _request_timeout=self.settings.request_timeout, **kwargs,
        )
        try:
            body = await resp.content.read(MAX_BODY + 1)
            status: int = resp.status
            retry_after = resp.headers.get("Retry-After")
        finally:
            resp.release()
        if len(body) > MAX_BODY:
            raise KubeError(status, "response too large")
        return _decode(status, body, retry_after)

    async def request(self, verb: str, resource: str, *args: Any, **kwargs: Any) -> Obj:
        """One call; retried (through the backoff) on 429/5xx and connection errors."""
        attempt = 0
        while True:
            try:
                # By keyword: the generated methods take (name, namespace) for one
                # object but (namespace, body) for a create.
                return await self._once(verb, resource, *args, namespace=self.namespace,
                                        **kwargs)
            except _Retryable as exc:
                error: Exception = exc.error
                wait = max(min(exc.retry_after or 0.0, self.backoff.maximum),
                           self.backoff.delay(attempt))
            except (OSError, TimeoutError) as exc:
                error, wait = exc, self.backoff.delay(attempt)
            except aiohttp.ClientError as exc:
                error, wait = exc, self.backoff.delay(attempt)
            attempt += 1
            if attempt >= self.settings.attempts:
                if isinstance(error, KubeError):
                    raise error
                raise KubeError(0, f"{verb} {resource}: {error}") from error
            log.info("kubernetes %s %s failed (%s), retrying in %.2fs", verb, resource,
                     error, wait)
            await asyncio.sleep(wait)

    async def create(self, resource: str, body: Obj) -> Obj:
        return await self.request("create", resource, body=body)

    async def get(self, resource: str, name: str) -> Obj:
        return await self.request("read", resource, name)

    async def delete(self, resource: str, name: str, *, grace: int | None = None) -> bool:
        """False when it was already gone (404 is the outcome we wanted)."""
        kwargs: dict[str, Any] = {}
        if grace is not None:
            kwargs["grace_period_seconds"] = grace
        try:
            await self.request("delete", resource, name, **kwargs)
        except NotFound:
            return False
        return True

    async def list(self, resource: str, selector: str) -> Obj:
        return await self.request("list", resource, label_selector=selector)

    async def watch(
        self, resource: str, selector: str, resource_version: str, timeout: int
    ) -> AsyncIterator[Obj]:
        """Watch events as dicts; raises Gone when the version is too old (in the
        HTTP status or, as the API server does, as an ERROR event with code 410)."""
        self.calls[("watch", resource)] = self.calls.get(("watch", resource), 0) + 1
        resp = await self._method("list", resource)(
            namespace=self.namespace, label_selector=selector, watch=True,
            resource_version=resource_version, allow_watch_bookmarks=True,
            timeout_seconds=timeout, _preload_content=False,
            # The server ends the watch after `timeout`; a dead connection is noticed
            # by the socket read deadline of the same size.
            _request_timeout=aiohttp.ClientTimeout(
                total=None, sock_connect=self.settings.request_timeout,
                sock_read=timeout + self.settings.request_timeout,
            ),
        )
        try:
            if resp.status != 200:
                body = await resp.content.read(MAX_BODY)
                try:
                    _decode(resp.status, body, resp.headers.get("Retry-After"))
                except _Retryable as exc:
                    raise exc.error from None  # the reflector's backoff retries watches
            while True:
                line = await resp.content.readline()
                if not line:
                    return
                if len(line) > MAX_EVENT_LINE:
                    raise KubeError(200, "watch event too large")
                event: Obj = json.loads(line)
                if event.get("type") == "ERROR":
                    status = event.get("object") or {}
                    code = int(status.get("code") or 500)
                    raise _error(code, str(status.get("message") or "watch error"))
                yield event
        finally:
            resp.release()


class _Retryable(Exception):
    def __init__(self, error: KubeError, retry_after: float | None):
        self.error = error
        self.retry_after = retry_after


def _error(status: int, message: str) -> KubeError:
    kinds: dict[int, type[KubeError]] = {404: NotFound, 409: Conflict, 410: Gone}
    return kinds.get(status, KubeError)(status, message)


def _decode(status: int, body: bytes, retry_after: str | None) -> Obj:
    try:
        data = json.loads(body) if body else {}
    except ValueError:
        data = {"message": body[:200].decode(errors="replace")}
    if 200 <= status < 300:
        if not isinstance(data, dict):
            raise KubeError(status, "response is not an object")
        return data
    message = str(data.get("message") or data.get("reason") or "") if isinstance(data, dict) else ""
    error = _error(status, message)
    if status in RETRYABLE:
        try:
            after = float(retry_after) if retry_after else None
        except ValueError:
            after = None
        raise _Retryable(error, after)
    raise error
