"""Control API schemas and its HTTP client: the one part of wakeup that proxies import."""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal

import httpx
from pydantic import BaseModel

API_PREFIX = "/v1"
# Redis pub/sub channel: the control plane publishes "invalidate:<endpoint>" on
# suspend/delete; proxies publish "woken:<endpoint>" when a wake result is cached.
INVALIDATION_CHANNEL = "pgwake:events"
ColdStartName = Literal["warm", "resumed", "pool_hit", "pool_miss"]
TierName = Literal["durable", "ephemeral"]

# Endpoint ids become DNS labels (SNI) and file names: lowercase letters,
# digits and inner hyphens, at most 63 characters. Anything else is refused
# before it reaches a query, a path or a log line.
ENDPOINT_ID_RE = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")
ROLE_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_$-]{0,62}$")


def valid_endpoint_id(value: str) -> bool:
    return bool(ENDPOINT_ID_RE.fullmatch(value))


@dataclass(frozen=True)
class ComputeAddress:
    """Where the proxy connects: an IP and a port, never a name (no DNS on the hot path)."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @classmethod
    def parse(cls, text: str) -> ComputeAddress:
        host, sep, port = text.rpartition(":")
        if not sep or not port.isdigit():
            raise ValueError(f"invalid compute address {text!r}")
        return cls(host.strip("[]"), int(port))


class Endpoint(BaseModel):
    id: str
    name: str
    tier: TierName
    state: str
    generation: int
    wakes: int
    config_version: int
    database: str
    owner_role: str
    address: str | None
    created_at: dt.datetime
    last_active: dt.datetime
    suspended_at: dt.datetime | None
    expires_at: dt.datetime | None
    url: str
    url_no_sni: str
    connections: int = 0  # live client sessions, summed over the proxies' reports


class PoolClass(BaseModel):
    tier: TierName
    size_class: str
    ready: int
    target: int


class Pool(BaseModel):
    classes: list[PoolClass]
    hits: int
    misses: int
    filled: int
    recycled: int
    died: int


class CreateEndpoint(BaseModel):
    name: str | None = None
    tier: TierName = "durable"


class CreatedEndpoint(Endpoint):
    user: str
    password: str  # shown once; only its SCRAM verifier is stored
    cold_start: ColdStartName
    create_seconds: float


class Wake(BaseModel):
    address: str
    generation: int
    cold_start: ColdStartName
    duration_seconds: float
    # Client sessions the compute admits (max_connections minus reserved slots): the
    # budget all proxies share. None from a control plane that does not say.
    connection_budget: int | None = None


class Role(BaseModel):
    endpoint_id: str
    role: str
    verifier: str


class SetPassword(BaseModel):
    password: str


class Activity(BaseModel):
    """A proxy's live client sessions per endpoint; valid for `ttl` seconds."""

    proxy_id: str
    connections: dict[str, int]
    ttl: float = 3.0


class ApiErrorBody(BaseModel):
    code: str
    message: str


class ApiError(BaseModel):
    error: ApiErrorBody


class ControlAPIError(Exception):
    """A non-2xx answer, or no answer, from the control API."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message

    @property
    def unavailable(self) -> bool:
        return self.status == 0 or self.status >= 500


class ControlClient:
    """Async client for the control API. Every call has a deadline."""

    def __init__(self, base_url: str, api_key: str, *, timeout: float = 10.0):
        self._http = httpx.AsyncClient(
            base_url=base_url.rstrip("/"),
            headers={"Authorization": f"Bearer {api_key}"},
            timeout=timeout,
            limits=httpx.Limits(max_connections=64, max_keepalive_connections=16),
        )

    async def __aenter__(self) -> ControlClient:
        return self

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _call(
        self, method: str, path: str, *, json: Any = None, timeout: float | None = None
    ) -> Any:
        kwargs: dict[str, Any] = {}
        if timeout is not None:
            kwargs["timeout"] = timeout
        try:
            response = await self._http.request(method, API_PREFIX + path, json=json, **kwargs)
        except httpx.TimeoutException as exc:
            raise ControlAPIError(0, "timeout", f"control API did not answer: {exc!r}") from exc
        except httpx.TransportError as exc:
            raise ControlAPIError(0, "unreachable", f"control API unreachable: {exc!r}") from exc
        if response.status_code >= 400:
            try:
                body = ApiError.model_validate_json(response.content).error
                raise ControlAPIError(response.status_code, body.code, body.message)
            except ValueError:
                raise ControlAPIError(
                    response.status_code, "http_error", response.text[:200]
                ) from None
        return response.json() if response.content else None

    async def create_endpoint(
        self, name: str | None = None, tier: TierName = "durable"
    ) -> CreatedEndpoint:
        body = CreateEndpoint(name=name, tier=tier).model_dump()
        return CreatedEndpoint.model_validate(await self._call("POST", "/endpoints", json=body))

    async def list_endpoints(self) -> list[Endpoint]:
        return [Endpoint.model_validate(e) for e in await self._call("GET", "/endpoints")]

    async def pool(self) -> Pool:
        return Pool.model_validate(await self._call("GET", "/pool"))

    async def get_endpoint(self, endpoint_id: str) -> Endpoint:
        return Endpoint.model_validate(await self._call("GET", f"/endpoints/{endpoint_id}"))

    async def delete_endpoint(self, endpoint_id: str) -> None:
        await self._call("DELETE", f"/endpoints/{endpoint_id}")

    async def suspend(self, endpoint_id: str) -> Endpoint:
        return Endpoint.model_validate(
            await self._call("POST", f"/endpoints/{endpoint_id}/suspend")
        )

    async def wake(self, endpoint_id: str, *, timeout: float | None = None) -> Wake:
        return Wake.model_validate(
            await self._call("POST", f"/endpoints/{endpoint_id}/wake", timeout=timeout)
        )

    async def get_role(self, endpoint_id: str, role: str, *, timeout: float | None = None) -> Role:
        return Role.model_validate(
            await self._call("GET", f"/endpoints/{endpoint_id}/roles/{role}", timeout=timeout)
        )

    async def set_password(self, endpoint_id: str, role: str, password: str) -> None:
        await self._call(
            "PUT",
            f"/endpoints/{endpoint_id}/roles/{role}/password",
            json=SetPassword(password=password).model_dump(),
        )

    async def report_activity(
        self, proxy_id: str, connections: dict[str, int], *, ttl: float,
        timeout: float | None = None,
    ) -> None:
        body = Activity(proxy_id=proxy_id, connections=connections, ttl=ttl).model_dump()
        await self._call("POST", "/activity", json=body, timeout=timeout)
