"""create_app(settings): the FastAPI gateway."""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request, Response
from fastapi.openapi.utils import get_openapi

from service import errors, metrics
from service.auth import KeyRing, Limits
from service.forms import form_schema
from service.jobs import JobStore, connect_redis
from service.logs import setup_logging
from service.recovery import Janitor
from service.roster import Roster
from service.routes import health, models, playground, videos
from service.schemas import VideoCreate
from service.settings import Settings
from service.storage import open_storage

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
    app.state.queue_metrics = metrics.QueueCollector(app.state.store)
    app.middleware("http")(_observe)
    app.include_router(health.router)
    app.include_router(videos.router)
    app.include_router(models.router)
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


async def _observe(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
    """Count and time every request by its route template (never the raw path: ids would explode the labels)."""
    t0 = time.perf_counter()
    status = 500
    try:
        response = await call_next(request)
        status = response.status_code
        return response
    finally:
        route = request.scope.get("route")
        path = getattr(route, "path", "unmatched")
        metrics.HTTP_REQUESTS.labels(path, request.method, str(status)).inc()
        metrics.HTTP_LATENCY.labels(path, request.method).observe(time.perf_counter() - t0)


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
        for ops in schema["paths"].values():
            for op in ops.values():
                op["responses"].pop("422", None)
        for name in ("HTTPValidationError", "ValidationError"):
            schema.get("components", {}).get("schemas", {}).pop(name, None)
        app.openapi_schema = schema
    return app.openapi_schema
