"""Prometheus metrics of every process, scraped from the running stack; several gateway processes behind one
port add up; JSON logs carry the job id."""

from __future__ import annotations

import json
import logging
import os
import re
import time

import httpx

from service.contract.logs import JsonFormatter, QuietProbes, setup_logging
from tests.conftest import gateway_process


def sample(text: str, name: str, **labels: str) -> float | None:
    """The value of one sample in a Prometheus exposition, or None."""
    for line in text.splitlines():
        m = re.match(r"^(\w+)(?:\{(.*)\})? (\S+)$", line)
        if not m or m.group(1) != name:
            continue
        got = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
        if all(got.get(k) == v for k, v in labels.items()):
            return float(m.group(3))
    return None


def test_gateway_worker_and_webhook_metrics(stack):
    with stack.client() as c:
        video = c.post("/v1/videos", json={"prompt": "metrics", "model": "k5-tiny-t2v", "size": "64x64"}).json()
        assert stack.wait(video["id"])["status"] == "completed"
        gateway = c.get("/metrics").text
    assert sample(gateway, "k5_http_requests_total", route="/v1/videos/{video_id}", method="GET", status="200") > 0
    assert sample(gateway, "k5_http_request_duration_seconds_count", route="/v1/videos", method="POST") >= 1
    assert sample(gateway, "k5_workers_online", model="k5-tiny-t2v") == 1
    assert sample(gateway, "k5_queue_depth", model="k5-tiny-t2v") is not None
    assert sample(gateway, "k5_jobs", model="k5-tiny-i2v", status="in_progress") is not None

    worker = next(p for p in stack.procs if p.name == "worker-t2v")
    base = f"http://127.0.0.1:{worker.metrics_port}"
    assert httpx.get(base + "/readyz").status_code == 200 and httpx.get(base + "/healthz").status_code == 200
    text = httpx.get(base + "/metrics").text
    assert sample(text, "k5_worker_model_ready", model="k5-tiny-t2v") == 1
    assert sample(text, "k5_worker_jobs_total", model="k5-tiny-t2v", outcome="completed") >= 1
    for phase in ("queue_wait", "text_encode", "denoise", "decode", "encode", "upload"):
        assert sample(text, "k5_worker_phase_duration_seconds_count", model="k5-tiny-t2v", phase=phase) >= 1, phase
    assert sample(text, "k5_worker_step_duration_seconds_count", model="k5-tiny-t2v") >= 1

    hooks = next(p for p in stack.procs if p.name == "webhooks")
    text = httpx.get(f"http://127.0.0.1:{hooks.metrics_port}/metrics").text
    assert sample(text, "k5_webhook_pending") is not None


def test_several_gateway_processes_add_up(redis_server, tmp_path):
    (tmp_path / "prom").mkdir()
    url, prom = redis_server.url.replace("/0", "/2"), str(tmp_path / "prom")
    with gateway_process(url, tmp_path, "--workers", "2", PROMETHEUS_MULTIPROC_DIR=prom) as base:
        deadline = time.monotonic() + 60
        while httpx.get(base + "/healthz").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.2)
        for _ in range(30):  # new connections: the kernel spreads them over both processes
            assert httpx.get(base + "/v1/models").status_code == 200
        pids = set(os.listdir(tmp_path / "prom"))
        text = httpx.get(base + "/metrics").text
    # Each process wrote its own file, and any process's /metrics reports the sum.
    assert len({f.rsplit("_", 1)[-1] for f in pids if f.startswith("counter_")}) == 2, pids
    assert sample(text, "k5_http_requests_total", route="/v1/models", method="GET", status="200") == 30


def test_json_logs_carry_the_job_id():
    record = logging.LogRecord("worker.runner", logging.INFO, __file__, 1, "job completed", (), None)
    record.video_id = "video_123"
    line = json.loads(JsonFormatter().format(record))
    assert line["msg"] == "job completed" and line["video_id"] == "video_123" and line["level"] == "info"


def test_successful_probes_and_scrapes_stay_out_of_the_access_log():
    def access(path: str, status: int) -> logging.LogRecord:  # as uvicorn logs a request
        args = ("127.0.0.1:5000", "GET", path, "1.1", status)
        return logging.LogRecord("uvicorn.access", logging.INFO, __file__, 1, '%s - "%s %s HTTP/%s" %d', args, None)

    quiet = QuietProbes()
    assert not quiet.filter(access("/readyz", 200)) and not quiet.filter(access("/metrics?x=1", 200))
    assert quiet.filter(access("/readyz", 503))  # a failing probe is news
    assert quiet.filter(access("/v1/videos", 200))
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        setup_logging()  # what every k5serve process does first
        assert any(isinstance(f, QuietProbes) for f in logging.getLogger("uvicorn.access").filters)
    finally:
        root.handlers[:], root.level = handlers, level
