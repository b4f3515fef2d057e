"""Control API schemas and its HTTP client: the one part of wakeup that proxies import."""

from __future__ import annotations

import datetime as dt
import re
import urllib.parse
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal

import httpx
from pydantic import BaseModel, Field

API_PREFIX = "/v1"
# Redis pub/sub channel: the control plane publishes "invalidate:<endpoint>" on
# suspend/delete; proxies publish "woken:<endpoint>" when a wake result is cached.
INVALIDATION_CHANNEL = "pgwake:events"
ColdStartName = Literal["warm", "resumed", "pool_hit", "pool_miss"]
TierName = Literal["durable", "ephemeral"]
# The size classes of wakeup/sizes.py (their settings live there, not here: the
# proxy imports this module and has no use for them).
SIZE_NAMES = ("small", "medium", "large")

# Endpoint ids become DNS labels (SNI) and file names: lowercase letters,
# digits and inner hyphens, at most 63 characters. Anything else is refused
# before it reaches a query, a path or a log line.
ENDPOINT_ID_RE = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")
# Role names: the one rule for the control API and the proxy's front door. At most
# 63 characters (PostgreSQL's NAMEDATALEN - 1), so a name is also a bounded cache key.
ROLE_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_$-]{0,62}$")
ROLE_NAME_RULE = (
    "role names are 1 to 63 letters, digits, \"_\", \"$\" or \"-\", "
    "starting with a letter or \"_\""
)


def valid_endpoint_id(value: str) -> bool:
    return bool(ENDPOINT_ID_RE.fullmatch(value))


def valid_role_name(value: str) -> bool:
    return bool(ROLE_NAME_RE.fullmatch(value))


def as_postgres_name(value: str) -> str:
    """A name as PostgreSQL reads it from a startup packet: cut to NAMEDATALEN - 1
    (63) bytes, never in the middle of a character."""
    return value.encode("utf-8", "surrogatepass")[:63].decode("utf-8", "ignore")


def path_segment(value: str) -> str:
    """One URL path segment that no value can turn into another path.

    Percent-encoding alone is not enough: httpx resolves "." and ".." before
    sending, and the server decodes "%2F" back into "/" before routing.
    """
    if value in ("", ".", "..") or "/" in value or "\\" in value:
        raise ValueError(f"{value[:80]!r} cannot be a control API path segment")
    return urllib.parse.quote(value, safe="")


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
    size: str = "small"  # size class (wakeup/sizes.py) the next compute start uses
    pinned: int = 0  # of `connections`, sessions pinned to their backend (proxies' reports)
    parked: int = 0  # sessions held at the proxies without a backend (proxies' reports)


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
    size: str = "small"  # small | medium | large (checked by the server: a clear 400)


class ResizeEndpoint(BaseModel):
    size: str  # small | medium | large
    # How long pinned sessions are waited for before 57P01 (default: the server's).
    drain_seconds: float | None = Field(default=None, ge=0.0, le=3600.0)


class Resize(BaseModel):
    """A finished resize: the endpoint at its new generation and what each phase took."""

    endpoint: Endpoint
    previous_size: str
    size: str
    generation: int
    duration_seconds: float
    phases: dict[str, float]  # freeze, drain, stop, start, unfreeze (empty: not running)
    pinned_at_deadline: int  # sessions ended with 57P01 when the drain deadline passed


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
    """A proxy's live client sessions per endpoint; valid for `ttl` seconds.

    `pinned`: of those, the sessions holding state that cannot move to another
    backend (open transaction, temp tables, advisory locks, WITH HOLD cursors,
    LISTEN, an unfinished COPY or extended-protocol exchange). None means the
    proxy does not track pinning; a generation handoff then relies on what the
    compute itself can tell. A proxy that tracks it should report soon after an
    endpoint enters `handoff` (its cached address is invalidated then): the
    drain waits for a report newer than the freeze.

    `parked`: sessions this proxy holds without a backend (not in `connections`).
    `parkable`: of `connections`, idle sessions the proxy knows it can move (the
    compute told it they hold nothing that cannot move): they do not keep the
    compute awake, since an idle suspend parks them and their next message
    re-attaches them.
    `unmovable`: sessions with a backend that cannot move yet (pinned, busy, or
    not yet asked of the compute); sessions still connecting are not among them.
    None: the control plane counts `connections` minus `parkable` instead.

    `last_active` (endpoint → Unix time) is the latest session start, end or
    client traffic since the previous report; `started` counts sessions begun
    since then; `interval` is how often this proxy reports (so the janitor knows
    how stale the news can be).
    """

    proxy_id: str
    connections: dict[str, int]
    ttl: float = 3.0
    pinned: dict[str, int] | None = None
    parked: dict[str, int] = {}
    parkable: dict[str, int] = {}
    unmovable: dict[str, int] | None = None
    last_active: dict[str, float] = {}
    started: dict[str, int] = {}
    interval: float = 0.0


class ActivityAnswer(BaseModel):
    """Endpoints whose addresses stopped being valid since the proxy's previous report
    (endpoint → seconds ago): drop cached copies older than that."""

    invalidated: dict[str, float] = {}
    # Endpoints in a generation handoff (resize) now.
    resizing: list[str] = []


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

    @staticmethod
    def _path(*segments: str) -> str:
        """The one place a control API path is built from values (ids, role names)."""
        return "".join("/" + path_segment(segment) for segment in segments)

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
        self, name: str | None = None, tier: TierName = "durable", size: str = "small"
    ) -> CreatedEndpoint:
        body = CreateEndpoint(name=name, tier=tier, size=size).model_dump()
        created = await self._call("POST", self._path("endpoints"), json=body)
        return CreatedEndpoint.model_validate(created)

    async def resize(
        self, endpoint_id: str, size: str, *, drain_seconds: float | None = None,
        timeout: float = 120.0,
    ) -> Resize:
        """Resize by a generation handoff; returns when the new generation serves."""
        body = ResizeEndpoint(size=size, drain_seconds=drain_seconds).model_dump()
        return Resize.model_validate(
            await self._call(
                "POST", self._path("endpoints", endpoint_id, "resize"), json=body,
                timeout=timeout + (drain_seconds or 0.0),
            )
        )

    async def list_endpoints(self) -> list[Endpoint]:
        listed = await self._call("GET", self._path("endpoints"))
        return [Endpoint.model_validate(e) for e in listed]

    async def pool(self) -> Pool:
        return Pool.model_validate(await self._call("GET", self._path("pool")))

    async def get_endpoint(self, endpoint_id: str, *, timeout: float | None = None) -> Endpoint:
        answer = await self._call("GET", self._path("endpoints", endpoint_id), timeout=timeout)
        return Endpoint.model_validate(answer)

    async def delete_endpoint(self, endpoint_id: str) -> None:
        await self._call("DELETE", self._path("endpoints", endpoint_id))

    async def suspend(self, endpoint_id: str) -> Endpoint:
        return Endpoint.model_validate(
            await self._call("POST", self._path("endpoints", endpoint_id, "suspend"))
        )

    async def wake(self, endpoint_id: str, *, timeout: float | None = None) -> Wake:
        return Wake.model_validate(
            await self._call(
                "POST", self._path("endpoints", endpoint_id, "wake"), timeout=timeout
            )
        )

    async def get_role(self, endpoint_id: str, role: str, *, timeout: float | None = None) -> Role:
        return Role.model_validate(
            await self._call(
                "GET", self._path("endpoints", endpoint_id, "roles", role), timeout=timeout
            )
        )

    async def set_password(self, endpoint_id: str, role: str, password: str) -> None:
        await self._call(
            "PUT",
            self._path("endpoints", endpoint_id, "roles", role, "password"),
            json=SetPassword(password=password).model_dump(),
        )

    async def report_activity(
        self, proxy_id: str, connections: dict[str, int], *, ttl: float,
        timeout: float | None = None, last_active: dict[str, float] | None = None,
        started: dict[str, int] | None = None, interval: float = 0.0,
        pinned: dict[str, int] | None = None, parked: dict[str, int] | None = None,
        parkable: dict[str, int] | None = None, unmovable: dict[str, int] | None = None,
    ) -> ActivityAnswer:
        body = Activity(
            proxy_id=proxy_id, connections=connections, ttl=ttl, pinned=pinned,
            parked=parked or {}, parkable=parkable or {}, unmovable=unmovable,
            last_active=last_active or {}, started=started or {}, interval=interval,
        ).model_dump()
        answer = await self._call("POST", self._path("activity"), json=body, timeout=timeout)
        return ActivityAnswer.model_validate(answer or {})
