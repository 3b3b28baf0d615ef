"""A worker that was frozen past its lease (a long GC pause, a swap storm, a network partition) while its job went
to another worker must leave the finished video alone when it wakes up: real SeaweedFS, Redis, worker processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import redis
from fastapi.testclient import TestClient

from service.console.localstack import SeaweedS3, free_port, stop_process
from service.contract.jobs import VARIANTS, JobStore, asset_key, plan_job
from service.contract.lifecycle import Lifecycle
from service.contract.models import resolve_model
from service.contract.schemas import VideoCreate
from service.contract.settings import Settings
from service.contract.storage import S3Storage
from service.gateway.app import create_app
from tests.conftest import ROOT
from tests.waiting import wait_until

pytestmark = pytest.mark.slow


def start_worker(env: dict[str, str], log: Path, name: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "service.cli", "worker"],
        env={**env, "K5_WORKER_NAME": name, "K5_METRICS_PORT": str(free_port())},
        cwd=ROOT,
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
    )


def test_a_stale_worker_does_not_delete_the_video_another_run_completed(redis_server, tiny_models, tmp_path):
    s3 = SeaweedS3(tmp_path / "s3").start()
    url = redis_server.url.replace("/0", "/3")  # a database of its own: the session's workers never see it
    r = redis.Redis.from_url(url)
    r.flushdb()
    settings = Settings(
        redis_url=url,
        storage_url="s3://k5stale/videos",
        s3_endpoint_url=s3.endpoint,
        heartbeat_s=0.5,
        allow_anonymous=True,
    )
    os.environ.update(s3.env)
    storage = S3Storage("k5stale", "videos", settings)
    storage.ensure_bucket()
    store = JobStore(r, settings)
    spec = resolve_model(str(tiny_models["t2v"]))
    env = {
        **os.environ,
        **s3.env,
        "K5_MODEL": str(tiny_models["t2v"]),
        "K5_REDIS_URL": url,
        "K5_STORAGE_URL": settings.storage_url,
        "K5_S3_ENDPOINT_URL": s3.endpoint,
        "K5_HEARTBEAT_S": "0.5",
        "HF_HUB_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
    }
    logs = {name: tmp_path / f"{name}.log" for name in ("w1", "w2")}
    procs = {name: start_worker(env, log, name) for name, log in logs.items()}
    frozen: list[subprocess.Popen] = []
    try:
        wait_until(lambda: store.workers_online(spec.id) == 2, 180, "both workers online", *logs.values())
        # Storage freezes: the job runs to its upload and blocks there.
        assert s3.proc is not None
        s3.proc.send_signal(signal.SIGSTOP)
        frozen.append(s3.proc)
        rec = plan_job(VideoCreate(prompt="a lighthouse", num_inference_steps=2), spec, has_image=False)
        Lifecycle(store).create(rec)
        uploading = wait_until(
            lambda: (v := store.get(rec.id)) is not None and v.progress >= 97 and v, 120, "upload", *logs.values()
        )
        stale = uploading.worker
        assert stale in procs
        live = next(name for name in procs if name != stale)
        # Its worker freezes past its lease; storage comes back; the other worker runs the job to completion.
        procs[stale].send_signal(signal.SIGSTOP)
        frozen.append(procs[stale])
        s3.proc.send_signal(signal.SIGCONT)
        frozen.remove(s3.proc)
        done = wait_until(
            lambda: (v := store.get(rec.id)) is not None and v.status == "completed" and v, 120, "completed", logs[live]
        )
        assert done.worker == live
        # The frozen worker goes on: its upload finishes and its run finds it no longer owns the job.
        procs[stale].send_signal(signal.SIGCONT)
        frozen.remove(procs[stale])
        wait_until(
            lambda: "job lost" in logs[stale].read_text() or "cancelled" in logs[stale].read_text(),
            60,
            "the stale run ended",
            logs[stale],
        )

        final = store.get(rec.id)
        assert final is not None and final.status == "completed" and final.worker == live
        prefix = final.asset_prefix
        for name, _ in VARIANTS.values():
            assert storage.exists(asset_key(prefix, name)), f"{name} was deleted\n{logs[stale].read_text()[-3000:]}"
        with TestClient(create_app(settings)) as c:
            resp = c.get(f"/v1/videos/{rec.id}/content", follow_redirects=False)
            assert resp.status_code == 302, resp.text
            video = httpx.get(resp.headers["location"], timeout=30)
            assert video.status_code == 200 and video.content[4:8] == b"ftyp"
    finally:
        for p in frozen:
            p.send_signal(signal.SIGCONT)
        for p in procs.values():
            stop_process(p, timeout=20)
        s3.stop()
        r.flushdb()
