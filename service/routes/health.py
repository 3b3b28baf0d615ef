"""Liveness and readiness probes."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST

from service import metrics
from service.deps import StorageDep, StoreDep
from service.schemas import HealthStatus

router = APIRouter(tags=["health"])


@router.get("/metrics", response_class=PlainTextResponse, include_in_schema=False)
def prometheus_metrics(request: Request) -> Response:
    """Prometheus exposition: this process's counters plus queue figures read from Redis now."""
    body = metrics.exposition(request.app.state.queue_metrics)
    return Response(body, media_type=CONTENT_TYPE_LATEST)


@router.get("/healthz", response_model=HealthStatus)
def healthz() -> HealthStatus:
    """The process is up."""
    return HealthStatus(status="ok")


@router.get("/readyz", response_model=HealthStatus, responses={503: {"model": HealthStatus}})
def readyz(store: StoreDep, storage: StorageDep) -> JSONResponse:
    """Redis and the object store are reachable."""
    checks: dict[str, str] = {}
    try:
        store.r.ping()
        checks["redis"] = "ok"
    except Exception as e:  # any failure means not ready; say which
        checks["redis"] = f"error: {e}"
    try:
        storage.ping()
        checks["storage"] = "ok"
    except Exception as e:
        checks["storage"] = f"error: {e}"
    ok = all(v == "ok" for v in checks.values())
    body = HealthStatus(status="ok" if ok else "unavailable", checks=checks)
    return JSONResponse(body.model_dump(), status_code=200 if ok else 503)
