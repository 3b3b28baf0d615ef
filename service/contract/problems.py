"""Why a request cannot be served, as exceptions that say what went wrong, not which HTTP status to send: the job
contract (planning, idempotency, content) raises them on both sides of the queue, and the gateway's error module
maps each kind to its status in one table (service/gateway/errors.py)."""

from __future__ import annotations


class Rejected(Exception):
    """A request that cannot be served as asked; its message and code go to the client in the error envelope."""

    default_code = "invalid_value"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message, self.param, self.code = message, param, code or self.default_code
        self.headers: dict[str, str] = {}


class InvalidParameter(Rejected):
    """A value the request may not have (for this model, this deployment)."""


class Unauthenticated(Rejected):
    default_code = "invalid_api_key"

    def __init__(self, message: str, **kw: str | None) -> None:
        super().__init__(message, **kw)
        self.headers = {"WWW-Authenticate": "Bearer"}


class NotFound(Rejected):
    default_code = "not_found"


class Conflict(Rejected):
    """The request conflicts with the state of what it names (a completed video, a reused Idempotency-Key)."""

    default_code = "conflict"


class Gone(Rejected):
    """It existed, and no longer does (expired files)."""

    default_code = "gone"


class TooLarge(Rejected):
    default_code = "too_large"


class UnsupportedMedia(Rejected):
    default_code = "unsupported_media_type"


class Throttled(Rejected):
    """A limit was reached (rate, jobs in flight, queue depth): retry after `retry_after_s`."""

    default_code = "rate_limited"

    def __init__(self, message: str, *, retry_after_s: float, param: str | None = None, code: str | None = None):
        super().__init__(message, param=param, code=code)
        self.retry_after_s = max(1.0, retry_after_s)
        # The headers the openai SDK honours.
        self.headers = {
            "Retry-After": str(int(self.retry_after_s + 0.999)),
            "retry-after-ms": str(int(self.retry_after_s * 1000)),
        }


class Unavailable(Throttled):
    """The deployment cannot take this request for a moment (every image decoder busy, storage out of reach):
    not the caller's limit, so it is a 503, with the same Retry-After."""

    default_code = "service_unavailable"
