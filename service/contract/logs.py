"""Logging set-up: text for people, one JSON object per line in production, the job id on every job line."""

from __future__ import annotations

import json
import logging
import sys
import time

# Attributes every LogRecord has; anything else came in through `extra=` and belongs in the JSON line.
_STANDARD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}
# uvicorn adds `color_message` (its message with ANSI colour codes, for its own coloured formatter) to every
# record: not an extra of ours, and raw escape codes in a log file or a JSON line are noise.
_SKIPPED = _STANDARD | {"color_message"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        line.update({k: v for k, v in record.__dict__.items() if k not in _SKIPPED})
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        extras = " ".join(f"{k}={v}" for k, v in record.__dict__.items() if k not in _SKIPPED)
        base = super().format(record)
        return f"{base} {extras}" if extras else base


class QuietProbes(logging.Filter):
    """Drops uvicorn's access lines of successful probe and scrape requests (/healthz, /readyz, /metrics): with
    Kubernetes probes and Prometheus they are most of the log and say nothing. Failures still show."""

    PATHS = frozenset({"/healthz", "/readyz", "/metrics"})

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        # uvicorn.access: (client_addr, method, full_path, http_version, status_code)
        if isinstance(args, tuple) and len(args) == 5:
            path, status = str(args[2]).split("?", 1)[0], args[4]
            if path in self.PATHS and isinstance(status, int) and status < 400:
                return False
        return True


def setup_logging(level: str = "INFO", fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    access = logging.getLogger("uvicorn.access")
    if not any(isinstance(f, QuietProbes) for f in access.filters):
        access.addFilter(QuietProbes())
    # httpx logs every request it makes at INFO (readiness polls, webhook sends, which log their own outcome).
    logging.getLogger("httpx").setLevel(logging.WARNING)
