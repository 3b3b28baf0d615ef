"""Prometheus metrics of every k5serve process, named k5_<subsystem>_<name>_<unit>, all defined here.

Counters and histograms live in the process that observes them. Queue and worker figures are read from Redis at
scrape time (a collector), so any number of gateway replicas report the same truth. With several processes
behind one port (PROMETHEUS_MULTIPROC_DIR set, e.g. uvicorn --workers), /metrics aggregates them.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import REGISTRY, Collector

log = logging.getLogger(__name__)

# -- gateway ---------------------------------------------------------------------------------------------------
HTTP_REQUESTS = Counter("k5_http_requests", "HTTP requests by route and status.", ["route", "method", "status"])
HTTP_LATENCY = Histogram(
    "k5_http_request_duration_seconds",
    "HTTP request latency.",
    ["route", "method"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)

# -- worker ----------------------------------------------------------------------------------------------------
PHASE_SECONDS = Histogram(
    "k5_worker_phase_duration_seconds",
    "Seconds per job phase (queue_wait, text_encode, denoise, decode, encode, upload).",
    ["model", "phase"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200, 3600),
)
STEP_SECONDS = Histogram(
    "k5_worker_step_duration_seconds",
    "Seconds per denoising step.",
    ["model"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32),
)
PEAK_GPU_MEMORY = Gauge(
    "k5_worker_peak_gpu_memory_bytes", "Peak GPU memory of the last job.", ["model"], multiprocess_mode="max"
)
JOBS = Counter("k5_worker_jobs", "Jobs a worker finished, by outcome.", ["model", "outcome"])
FAILURES = Counter("k5_worker_failures", "Failed jobs by error code.", ["model", "code"])
# Any torch.compile after the warm-up means a job paid for compiling (a shape or guard the warm-up missed).
RECOMPILES = Counter("k5_worker_recompiles", "torch.compile runs after the worker reported ready.", ["model"])
# Resumable jobs (worker/checkpoint.py): states saved, checkpoints refused (the job started over), and the denoising
# steps a resumed job did not run again.
CHECKPOINTS = Counter("k5_worker_checkpoints", "Denoising states saved to storage.", ["model"])
CHECKPOINT_SECONDS = Histogram(
    "k5_worker_checkpoint_seconds",
    "Time to serialise and store one denoising state.",
    ["model"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8),
)
CHECKPOINTS_REFUSED = Counter("k5_worker_checkpoints_refused", "Checkpoints that did not match their job.", ["model"])
STEPS_RESUMED = Counter("k5_worker_steps_resumed", "Denoising steps saved by resuming from a checkpoint.", ["model"])
MODEL_READY = Gauge("k5_worker_model_ready", "1 once the model is loaded and warm.", ["model"], multiprocess_mode="max")

# -- usage (service/contract/usage.py): counted where a job's terminal transition is written, so a worker counts
# what it completed or failed, a gateway what it cancelled; sum over processes. `key` is the operator's label for
# an API key (K5_USAGE_LABELS) or "other": bounded by configuration, never the raw owner id.
USAGE_VIDEOS = Counter("k5_usage_videos", "Finished videos by key label and status.", ["model", "key", "status"])
USAGE_SECONDS = Counter(
    "k5_usage_seconds",
    "Seconds videos used by phase (text_encode, denoise, decode on the accelerator; encode, upload).",
    ["model", "key", "phase"],
)
USAGE_STEPS = Counter("k5_usage_steps", "Denoising steps run.", ["model", "key"])
USAGE_STEPS_RESUMED = Counter("k5_usage_steps_resumed", "Denoising steps resumed from a checkpoint.", ["model", "key"])
USAGE_MEGAVOXELS = Counter(
    "k5_usage_megavoxels", "Megavoxels (width x height x frames / 1e6) of videos that ran.", ["model", "key"]
)

# -- webhooks --------------------------------------------------------------------------------------------------
WEBHOOK_DELIVERIES = Counter("k5_webhook_deliveries", "Webhook delivery attempts by outcome.", ["outcome"])
WEBHOOK_PENDING = Gauge("k5_webhook_pending", "Deliveries waiting for an attempt.", multiprocess_mode="max")


class QueueCollector(Collector):
    """Queue depth, oldest queued job age, jobs by status and workers online per model, read at scrape time."""

    def __init__(self, store) -> None:  # a service.contract.jobs.JobStore; untyped to keep this module import-light
        self.store = store

    def collect(self) -> Iterator[GaugeMetricFamily]:
        depth = GaugeMetricFamily("k5_queue_depth", "Jobs waiting in the model's queue.", labels=["model"])
        oldest = GaugeMetricFamily("k5_queue_oldest_age_seconds", "Age of the oldest queued job.", labels=["model"])
        jobs = GaugeMetricFamily("k5_jobs", "Jobs queued or in progress.", labels=["model", "status"])
        online = GaugeMetricFamily("k5_workers_online", "Workers serving the model now.", labels=["model"])
        try:
            for model, stats in self.store.queue_stats().items():
                depth.add_metric([model], stats["queued"])
                oldest.add_metric([model], stats["oldest_age_s"])
                jobs.add_metric([model, "queued"], stats["queued"])
                jobs.add_metric([model, "in_progress"], stats["in_progress"])
                online.add_metric([model], stats["workers"])
        except Exception:  # a scrape must never fail because Redis is away
            log.warning("queue metrics unavailable", exc_info=True)
        yield from (depth, oldest, jobs, online)


def exposition(extra: Collector | None = None) -> bytes:
    """The /metrics body: this process's metrics, or all processes' when PROMETHEUS_MULTIPROC_DIR is set."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    else:
        registry = REGISTRY
    body = generate_latest(registry)
    if extra is not None:
        one = CollectorRegistry()
        one.register(extra)
        body += generate_latest(one)
    return body


def serve(host: str, port: int, ready: Callable[[], bool]) -> ThreadingHTTPServer | None:
    """/metrics, /healthz and /readyz of a worker or webhook process, on its own port, in a daemon thread."""
    if port == 0:
        return None

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            if self.path == "/metrics":
                status, body, ctype = 200, exposition(), CONTENT_TYPE_LATEST
            elif self.path == "/healthz":
                status, body, ctype = 200, b'{"status":"ok"}', "application/json"
            elif self.path == "/readyz":
                ok = ready()
                status = 200 if ok else 503
                body = b'{"status":"ok"}' if ok else b'{"status":"unavailable"}'
                ctype = "application/json"
            else:
                status, body, ctype = 404, b"not found", "text/plain"
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:  # scrapes every few seconds: keep them out of the logs
            pass

    server = ThreadingHTTPServer((host, port), Handler)
    threading.Thread(target=server.serve_forever, name="k5-metrics", daemon=True).start()
    log.info("metrics on %s:%d", host, port)
    return server
