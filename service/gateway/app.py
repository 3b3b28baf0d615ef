"""create_app(settings): the FastAPI gateway."""

from __future__ import annotations

import logging
import os
import re
import socket
import time
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.contract import metrics
from service.contract.jobs import JobStore, connect_redis
from service.contract.logs import setup_logging
from service.contract.recovery import Janitor
from service.contract.schemas import VideoCreate, VideoRemix
from service.contract.settings import Settings
from service.contract.storage import open_storage
from service.gateway import errors
from service.gateway.auth import KeyRing, Limits
from service.gateway.forms import form_schema
from service.gateway.roster import Roster
from service.gateway.routes import health, models, playground, usage, videos

log = logging.getLogger(__name__)


def create_app(settings: Settings | None = None) -> FastAPI:
    if settings is None:  # the factory form, in each process of `k5serve gateway --workers N`
        settings = Settings()
        setup_logging(settings.log_level, settings.log_format)
    app = FastAPI(
        lifespan=_lifespan,
        title="k5serve",
        version="0.1.0",
        summary="Kandinsky 5.0 video generation behind an OpenAI-videos-compatible API.",
    )
    app.state.settings = settings
    app.state.store = JobStore(connect_redis(settings), settings)
    app.state.storage = open_storage(settings)
    # Workers announce themselves once per heartbeat: /v1/models reads their state no more often than that.
    app.state.roster = Roster(app.state.store, settings.heartbeat_s)
    app.state.keys = KeyRing(settings)
    app.state.limits = Limits(app.state.store.r, settings)
    errors.install(app)
    app.add_exception_handler(404, _unknown_route)
    app.add_exception_handler(405, _unknown_method)
    app.state.queue_metrics = metrics.QueueCollector(app.state.store)
    app.add_middleware(Observe)
    app.include_router(health.router)
    app.include_router(videos.router)
    app.include_router(models.router)
    app.include_router(usage.router)
    app.include_router(playground.router)
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    # The gateway is the one process that is always up, so it also runs the janitor (see recovery.Janitor).
    janitor = Janitor(app.state.store, app.state.storage, f"gateway-{socket.gethostname()}-{os.getpid()}")
    janitor.start()
    try:
        yield
    finally:
        janitor.stop()


# Methods counted by name in the metrics; any other (clients may send any token) counts as OTHER.
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class Observe:
    """Count and time every request by its route template and a fixed set of methods (never the raw path or
    method: ids and made-up methods would grow the labels without bound).

    A plain ASGI middleware: Starlette's BaseHTTPMiddleware (`app.middleware("http")`) runs each request through
    a task group and memory streams of its own, which cost a small request more than its Redis work did."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status = 500

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            path = getattr(scope.get("route"), "path", "unmatched")  # the router sets it on this scope
            method = scope["method"] if scope["method"] in METHODS else "OTHER"
            metrics.HTTP_REQUESTS.labels(path, method, str(status)).inc()
            metrics.HTTP_LATENCY.labels(path, method).observe(time.perf_counter() - t0)


def _api_routes(request: Request) -> dict[str, list[str]]:
    """The API's paths and their methods, as the OpenAPI document states them."""
    paths = request.app.openapi()["paths"]
    return {p: sorted(m.upper() for m in ops) for p, ops in paths.items() if p.startswith("/v1/")}


def _template_of(path: str, templates: Iterable[str]) -> str | None:
    for template in templates:
        if re.fullmatch(re.sub(r"\\{[^/]+?\\}", "[^/]+", re.escape(template)), path):
            return template
    return None


async def _unknown_route(request: Request, exc: Exception) -> JSONResponse:
    """A path no route matches: say what the API has, in one envelope (FastAPI's own says only "Not Found")."""
    if isinstance(exc, StarletteHTTPException) and exc.detail != "Not Found":
        return errors.envelope(404, str(exc.detail))
    listed = "; ".join(f"{', '.join(m)} {p}" for p, m in _api_routes(request).items())
    return errors.envelope(
        404,
        f"Unknown route {request.method} {request.url.path}. The API has: {listed}.",
        code="unknown_route",
    )


async def _unknown_method(request: Request, exc: Exception) -> JSONResponse:
    routes = _api_routes(request)
    template = _template_of(request.url.path, routes)
    allowed = routes[template] if template else []
    message = f"{request.method} is not allowed on {request.url.path}"
    return errors.envelope(
        405,
        f"{message}; use {', '.join(allowed)}." if allowed else f"{message}.",
        code="method_not_allowed",
        headers={"Allow": ", ".join(allowed)} if allowed else None,
    )


def _openapi(app: FastAPI) -> dict:
    """FastAPI documents a 422 for every route with a body; k5serve answers validation errors with a 400
    envelope instead (as OpenAI does), so the schema says that."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
        # The create route parses its body itself (JSON or multipart); its two schemas are documented here.
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        body = VideoCreate.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(body.pop("$defs", {}))
        components["VideoCreate"] = body
        components["VideoCreateForm"] = form_schema(body)
        components["VideoRemix"] = VideoRemix.model_json_schema(ref_template="#/components/schemas/{model}")
        for ops in schema["paths"].values():
            for op in ops.values():
                op["responses"].pop("422", None)
        for name in ("HTTPValidationError", "ValidationError"):
            schema.get("components", {}).get("schemas", {}).pop(name, None)
        app.openapi_schema = schema
    return app.openapi_schema
