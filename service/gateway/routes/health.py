"""Liveness and readiness probes."""

from __future__ import annotations

import logging

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST

from service.contract import metrics
from service.contract.schemas import HealthStatus
from service.gateway.auth import AuthError
from service.gateway.deps import StorageDep, StoreDep

log = logging.getLogger(__name__)
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
def readyz(request: Request, store: StoreDep, storage: StorageDep) -> JSONResponse:
    """Redis and the object store are reachable.

    Probes need no key and learn only "ok" or "error" per check. A caller with a valid API key also gets the
    error text, which may name hosts and buckets; failures are logged with it.
    """
    details: dict[str, str] = {}
    for name, check in (("redis", store.r.ping), ("storage", storage.ping)):
        try:
            check()
            details[name] = "ok"
        except Exception as e:  # any failure means not ready; the log says why
            # The store's own errors name no host (they reach clients); its cause does, for the operator.
            why = f"{e} ({e.__cause__})" if e.__cause__ is not None else str(e)
            details[name] = f"error: {why}"
            log.warning("readiness: %s unavailable: %s", name, why)
    ok = all(v == "ok" for v in details.values())
    checks = details if _authenticated(request) else {k: v.split(":", 1)[0] for k, v in details.items()}
    body = HealthStatus(status="ok" if ok else "unavailable", checks=checks)
    return JSONResponse(body.model_dump(), status_code=200 if ok else 503)


def _authenticated(request: Request) -> bool:
    keys = request.app.state.keys
    if keys.anonymous:  # no keys: no one is known, and a probe is anyone
        return False
    try:
        keys.authenticate(request.headers.get("authorization"))
    except AuthError:
        return False
    return True
