"""Control API HTTP routes (FastAPI): endpoints, wake, roles, health and metrics."""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from wakeup.api import (
    ENDPOINT_ID_RE,
    Activity,
    ActivityAnswer,
    CreatedEndpoint,
    CreateEndpoint,
    Endpoint,
    Pool,
    PoolClass,
    Resize,
    ResizeEndpoint,
    Role,
    SetPassword,
    Wake,
    valid_role_name,
)
from wakeup.control import ControlPlane, EndpointNotFound, WakeFailed
from wakeup.handoff import HandoffFailed
from wakeup.provisioners.base import ProvisionerError, Tier
from wakeup.sizes import SizeClass, UnknownSize, size_class_of
from wakeup.store import EndpointRow
from wakeup.urls import PublicAddress

ReadinessCheck = Callable[[], Awaitable[dict[str, bool]]]


class APIProblem(Exception):
    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def _endpoint_out(
    ep: EndpointRow, public: PublicAddress, connections: int = 0, pinned: int = 0,
    parked: int = 0,
) -> Endpoint:
    return Endpoint(
        id=ep.id,
        name=ep.name,
        tier=ep.tier,  # type: ignore[arg-type]
        state=ep.state.value,
        generation=ep.generation,
        wakes=ep.wakes,
        config_version=ep.config_version,
        database=ep.database,
        owner_role=ep.owner_role,
        address=ep.address,
        created_at=ep.created_at,
        last_active=ep.last_active,
        suspended_at=ep.suspended_at,
        expires_at=ep.expires_at,
        url=public.url(ep.id, ep.owner_role, None, ep.database),
        url_no_sni=public.url_no_sni(ep.id, ep.owner_role, None, ep.database),
        connections=connections,
        size=ep.size,
        pinned=pinned,
        parked=parked,
    )


def create_app(
    control: ControlPlane,
    *,
    api_key: str,
    public: PublicAddress,
    readiness: ReadinessCheck,
    metrics: Callable[[], Awaitable[tuple[bytes, str]]] | None = None,
) -> FastAPI:
    app = FastAPI(title="pgwake control API", version="1", openapi_url="/openapi.json")
    bearer = HTTPBearer(auto_error=False)

    def authorize(creds: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        given = creds.credentials.encode() if creds is not None else b""
        if creds is None or not hmac.compare_digest(given, api_key.encode()):
            raise APIProblem(
                401, "unauthorized", "missing or wrong API key (Authorization: Bearer)"
            )

    def checked_id(endpoint_id: str) -> str:
        if not ENDPOINT_ID_RE.fullmatch(endpoint_id):
            raise APIProblem(400, "invalid_endpoint_id", f"invalid endpoint id {endpoint_id!r}")
        return endpoint_id

    @app.exception_handler(APIProblem)
    async def _problem(_: Request, exc: APIProblem) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return JSONResponse(
            {"error": {"code": exc.code, "message": exc.message}},
            status_code=exc.status,
            headers=headers,
        )

    @app.exception_handler(EndpointNotFound)
    async def _not_found(_: Request, exc: EndpointNotFound) -> JSONResponse:
        return JSONResponse(
            {"error": {"code": "endpoint_not_found", "message": str(exc)}}, status_code=404
        )

    @app.exception_handler(WakeFailed)
    async def _wake_failed(_: Request, exc: WakeFailed) -> JSONResponse:
        return JSONResponse({"error": {"code": "wake_failed", "message": str(exc)}}, 503)

    @app.exception_handler(HandoffFailed)
    async def _handoff_failed(_: Request, exc: HandoffFailed) -> JSONResponse:
        return JSONResponse({"error": {"code": "handoff_failed", "message": str(exc)}}, 503)

    def checked_size(name: str) -> SizeClass:
        try:
            return size_class_of(name)
        except UnknownSize as exc:
            raise APIProblem(400, "invalid_size", str(exc)) from None

    @app.exception_handler(ProvisionerError)
    async def _provisioner(_: Request, exc: ProvisionerError) -> JSONResponse:
        return JSONResponse({"error": {"code": "provisioner_error", "message": str(exc)}}, 503)

    v1 = "/v1"
    auth = [Depends(authorize)]

    @app.post(v1 + "/endpoints", dependencies=auth, status_code=201)
    async def create_endpoint(body: CreateEndpoint) -> CreatedEndpoint:
        size = checked_size(body.size)
        created = await control.create_endpoint(body.name, Tier(body.tier), size.name)
        ep = created.endpoint
        base = _endpoint_out(ep, public).model_dump()
        base["url"] = public.url(ep.id, created.role, created.password, ep.database)
        base["url_no_sni"] = public.url_no_sni(ep.id, created.role, created.password, ep.database)
        return CreatedEndpoint(
            **base,
            user=created.role,
            password=created.password,
            cold_start=created.cold_start.value,
            create_seconds=round(created.duration, 6),
        )

    @app.get(v1 + "/endpoints", dependencies=auth)
    async def list_endpoints() -> list[Endpoint]:
        return [
            _endpoint_out(
                ep, public, control.reported_connections(ep.id), control.pinned_sessions(ep.id),
                control.reported_parked(ep.id),
            )
            for ep in await control.list()
        ]

    @app.get(v1 + "/endpoints/{endpoint_id}", dependencies=auth)
    async def get_endpoint(endpoint_id: str) -> Endpoint:
        ep = await control.get(checked_id(endpoint_id))
        return _endpoint_out(
            ep, public, control.reported_connections(ep.id), control.pinned_sessions(ep.id),
                control.reported_parked(ep.id),
        )

    @app.delete(v1 + "/endpoints/{endpoint_id}", dependencies=auth, status_code=204)
    async def delete_endpoint(endpoint_id: str) -> Response:
        await control.delete(checked_id(endpoint_id))
        return Response(status_code=204)

    @app.post(v1 + "/endpoints/{endpoint_id}/suspend", dependencies=auth)
    async def suspend(endpoint_id: str) -> Endpoint:
        ep = await control.get(checked_id(endpoint_id))
        if ep.tier == Tier.EPHEMERAL:
            # The contract: ephemeral endpoints run until deleted (or their TTL).
            raise APIProblem(
                409, "ephemeral_not_suspendable",
                f"endpoint {endpoint_id} is ephemeral: ephemeral endpoints are never "
                "suspended (delete it when done)",
            )
        await control.suspend(endpoint_id)
        return _endpoint_out(await control.get(endpoint_id), public)

    @app.post(v1 + "/endpoints/{endpoint_id}/wake", dependencies=auth)
    async def wake(endpoint_id: str) -> Wake:
        result = await control.wake(checked_id(endpoint_id))
        return Wake(
            address=str(result.address),
            generation=result.generation,
            cold_start=result.cold_start.value,
            duration_seconds=round(result.duration, 6),
            connection_budget=result.connection_budget,
        )

    @app.post(v1 + "/endpoints/{endpoint_id}/resize", dependencies=auth)
    async def resize(endpoint_id: str, body: ResizeEndpoint) -> Resize:
        """Generation handoff to another size class; answers once the new one serves."""
        size = checked_size(body.size)
        ep = await control.get(checked_id(endpoint_id))
        if ep.tier == Tier.EPHEMERAL and not control.provisioner.ephemeral_survives_stop:
            raise APIProblem(
                409, "ephemeral_not_resizable",
                f"endpoint {endpoint_id} is ephemeral: its data lives in its compute's"
                " memory and would not survive the move to a new generation here",
            )
        result = await control.resize(
            checked_id(endpoint_id), size, drain_timeout=body.drain_seconds
        )
        ep = result.endpoint
        return Resize(
            endpoint=_endpoint_out(
                ep, public, control.reported_connections(ep.id), control.pinned_sessions(ep.id),
                control.reported_parked(ep.id),
            ),
            previous_size=result.previous_size,
            size=ep.size,
            generation=ep.generation,
            duration_seconds=round(result.total, 6),
            phases={k: round(v, 6) for k, v in result.durations.items()},
            pinned_at_deadline=result.pinned_at_deadline,
        )

    @app.get(v1 + "/endpoints/{endpoint_id}/roles/{role}", dependencies=auth)
    async def get_role(endpoint_id: str, role: str) -> Role:
        if not valid_role_name(role):
            raise APIProblem(404, "role_not_found", "role not found")
        verifier = await control.verifier(checked_id(endpoint_id), role)
        if verifier is None:
            raise APIProblem(404, "role_not_found", f"role {role} not found")
        return Role(endpoint_id=endpoint_id, role=role, verifier=verifier)

    @app.put(v1 + "/endpoints/{endpoint_id}/roles/{role}/password", dependencies=auth)
    async def set_password(endpoint_id: str, role: str, body: SetPassword) -> dict[str, int]:
        if not valid_role_name(role):
            raise APIProblem(400, "invalid_role", f"invalid role name {role!r}")
        version = await control.set_password(checked_id(endpoint_id), role, body.password)
        return {"config_version": version}

    @app.post(v1 + "/activity", dependencies=auth)
    async def activity(body: Activity) -> ActivityAnswer:
        invalidated = await control.record_activity(
            body.proxy_id, body.connections, body.ttl,
            last_active={k: v for k, v in body.last_active.items() if ENDPOINT_ID_RE.fullmatch(k)},
            interval=body.interval, pinned=body.pinned,
            parked=body.parked, parkable=body.parkable, unmovable=body.unmovable,
        )
        return ActivityAnswer(invalidated=invalidated, resizing=sorted(control.resizing))

    @app.get(v1 + "/pool", dependencies=auth)
    async def pool() -> Pool:
        manager = control.pool
        if manager is None:
            return Pool(classes=[], hits=0, misses=0, filled=0, recycled=0, died=0)
        stats = manager.stats
        return Pool(
            classes=[
                PoolClass(
                    tier=key.tier.value,
                    size_class=key.size_class,
                    ready=manager.ready_count(key),
                    target=target,
                )
                for key, target in manager.settings.sizes.items()
            ],
            hits=stats.hits,
            misses=stats.misses,
            filled=stats.filled,
            recycled=stats.recycled,
            died=stats.died,
        )

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        checks = await readiness()
        ok = all(checks.values())
        return JSONResponse(
            {"status": "ready" if ok else "unready", "checks": checks},
            status_code=200 if ok else 503,
        )

    if metrics is not None:
        render = metrics

        @app.get("/metrics")
        async def metrics_route() -> Response:
            body, content_type = await render()
            return Response(body, media_type=content_type)

    return app
