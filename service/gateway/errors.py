"""One error envelope for every failure: {"error": {message, type, param, code}}."""

from __future__ import annotations

import logging
from typing import Any

import redis
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.contract import problems
from service.contract.schemas import PATTERN_HINTS, ErrorResponse

log = logging.getLogger(__name__)

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable",
}

# The one place where a kind of rejection becomes an HTTP status.
STATUS: dict[type[problems.Rejected], int] = {
    problems.InvalidParameter: 400,
    problems.Unauthenticated: 401,
    problems.NotFound: 404,
    problems.Conflict: 409,
    problems.Gone: 410,
    problems.TooLarge: 413,
    problems.UnsupportedMedia: 415,
    problems.Throttled: 429,
    problems.Unavailable: 503,
}


def status_of(exc: problems.Rejected) -> int:
    return next((STATUS[k] for k in type(exc).__mro__ if k in STATUS), 400)


def envelope(
    status: int,
    message: str,
    *,
    param: str | None = None,
    code: str | None = None,
    type: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body = {
        "error": {
            "message": message,
            "type": type or _TYPES.get(status, "api_error"),
            "param": param,
            "code": code,
        }
    }
    return JSONResponse(body, status_code=status, headers=headers)


def _param_of(loc: tuple[Any, ...]) -> str | None:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header", "form")]
    # Pydantic adds the union/model tag to the location for some errors; keep only field names.
    parts = [p for p in parts if not p.startswith("function-") and p not in ("str", "int", "float")]
    return ".".join(parts) or None


def validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    first = exc.errors()[0]
    param = _param_of(tuple(first.get("loc", ())))
    msg = first.get("msg", "invalid value")
    if first.get("type") == "string_pattern_mismatch":
        msg = PATTERN_HINTS.get(str(first.get("ctx", {}).get("pattern")), msg)
    if first.get("type") == "json_invalid":
        return "The request body is not valid JSON.", None
    if first.get("type") == "missing":
        return f"Missing required parameter: '{param}'.", param
    if first.get("type") == "extra_forbidden":
        return f"Unknown parameter: '{param}'.", param
    return (f"Invalid value for '{param}': {msg}." if param else f"Invalid request: {msg}."), param


def rejection(exc: problems.Rejected) -> JSONResponse:
    return envelope(status_of(exc), exc.message, param=exc.param, code=exc.code, headers=exc.headers or None)


async def settle(request: Request) -> problems.Throttled | None:
    """Count a refused request that nothing counted yet (a hot route's script counts its own, and it was refused
    before reaching it: service/contract/ratelimit.py). The 429 when that count is over the key's limit: it wins
    over the refusal, as if the request had been counted first. A Redis that is away does not make it a 500."""
    charge = getattr(request.state, "charge", None)
    if charge is None or charge.counted:
        return None
    try:
        await run_in_threadpool(charge.now)
    except problems.Throttled as e:
        return e
    except redis.exceptions.RedisError as e:
        log.warning("could not count a refused request: %s", e)
    return None


def install(app: FastAPI) -> None:
    @app.exception_handler(problems.Rejected)
    async def _rejected(request: Request, exc: problems.Rejected) -> JSONResponse:
        return rejection(await settle(request) or exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        if (throttled := await settle(request)) is not None:
            return rejection(throttled)
        message, param = validation_message(exc)
        code = "invalid_json" if param is None and "JSON" in message else "invalid_value"
        return envelope(400, message, param=param, code=code)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if (throttled := await settle(request)) is not None:
            return rejection(throttled)
        return envelope(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))

    @app.exception_handler(redis.exceptions.ConnectionError)
    @app.exception_handler(redis.exceptions.TimeoutError)
    async def _redis_down(_: Request, exc: Exception) -> JSONResponse:
        log.warning("redis unavailable: %s", exc)
        return envelope(
            503,
            "The job store is unavailable; retry shortly.",
            code="store_unavailable",
            headers={"Retry-After": "2"},
        )

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return envelope(500, "Internal server error.", code="internal_error", type="api_error")


def responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses=` for a route's error statuses, all with the envelope schema."""
    descriptions = {
        400: "Invalid request",
        404: "Not found",
        409: "Conflict with the video's state",
        401: "Missing or invalid API key",
        410: "The asset has expired",
        413: "Request too large",
        415: "Unsupported media type",
        429: "Rate, in-flight or queue limit reached; retry after Retry-After",
        503: "A backing service is unavailable",
    }
    return {s: {"model": ErrorResponse, "description": descriptions.get(s, "Error")} for s in sorted(statuses)}
