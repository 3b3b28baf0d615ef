"""Resumable jobs through real worker processes: a job stopped by SIGTERM mid-denoising and requeued finishes on
another worker with the frames of an uninterrupted run (real Redis, SeaweedFS, worker processes, tiny model)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import redis

from service.console.localstack import free_port, stop_process
from service.contract.jobs import JobStore, asset_key, plan_job
from service.contract.lifecycle import Lifecycle
from service.contract.models import resolve_model
from service.contract.schemas import VideoCreate
from service.contract.settings import Settings
from service.contract.storage import S3Storage, open_storage
from tests.conftest import ROOT, child_preexec
from tests.waiting import wait_until
from worker.checkpoint import checkpoint_key

pytestmark = pytest.mark.slow


def start_worker(env: dict[str, str], log: Path, name: str, **extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "service.cli", "worker"],
        env={**env, "K5_WORKER_NAME": name, "K5_METRICS_PORT": str(free_port()), **extra},
        cwd=ROOT,
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
        preexec_fn=child_preexec,
    )


def frames_of(storage: S3Storage, prefix: str) -> bytes:
    """Everything a run stored of its frames: the MP4 (the same frames always encode to the same bytes,
    worker/encode.py's x264_params), the spritesheet and the thumbnail."""
    names = ("video.mp4", "spritesheet.jpg", "thumbnail.webp")
    return b"".join(storage.get_bytes(asset_key(prefix, name)) for name in names)


@pytest.fixture
def resume_env(redis_server, s3_server, s3_settings, tiny_models):
    url = redis_server.url.replace("/0", "/5")  # a database of its own: the session's workers never see it
    r = redis.Redis.from_url(url)
    r.flushdb()
    settings = Settings(redis_url=url, storage_url=s3_settings.storage_url, s3_endpoint_url=s3_server.endpoint)
    env = {
        **os.environ,
        **s3_server.env,
        "K5_MODEL": str(tiny_models["t2v"]),
        "K5_REDIS_URL": url,
        "K5_STORAGE_URL": s3_settings.storage_url,
        "K5_S3_ENDPOINT_URL": s3_server.endpoint,
        "K5_HEARTBEAT_S": "1",
        "K5_SHUTDOWN_GRACE_S": "0",
        "HF_HUB_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
    }
    storage = open_storage(settings)
    yield JobStore(r, settings), storage, env, resolve_model(str(tiny_models["t2v"]))
    r.flushdb()


def completed(store: JobStore, video_id: str, *logs: Path):
    return wait_until(lambda: (v := store.get(video_id)).status == "completed" and v, 120, f"{video_id} done", *logs)


def test_jobs_stopped_by_sigkill_or_sigterm_resume_elsewhere_with_the_frames_of_an_uninterrupted_run(
    resume_env, tmp_path
):
    store, storage, env, spec = resume_env
    logs = {name: tmp_path / f"{name}.log" for name in ("a", "b", "c")}
    every = {"K5_CHECKPOINT_EVERY_STEPS": "5"}
    procs = {name: start_worker(env, logs[name], name, **every) for name in ("a", "b")}
    life = Lifecycle(store)

    def submit(seed: int):
        job = plan_job(VideoCreate(prompt="a very slow sunrise", num_inference_steps=50, seed=seed), spec, False)
        life.create(job)
        return job

    def same_frames(resumed, fresh) -> None:
        assert frames_of(storage, resumed.asset_prefix) == frames_of(storage, fresh.asset_prefix)

    try:
        wait_until(lambda: store.workers_online(spec.id) == 2, 180, "workers online", *logs.values())
        # SIGKILL after a periodic checkpoint: the lease lapses, the other worker goes on from that checkpoint.
        killed = submit(1234)
        wait_until(lambda: storage.exists(checkpoint_key(killed.id)), 120, "a periodic checkpoint", *logs.values())
        first = store.get(killed.id).worker
        procs[first].kill()
        procs[first].wait(30)
        other = next(n for n in ("a", "b") if n != first)
        done = completed(store, killed.id, logs[other])
        assert done.worker == other
        assert done.resumed_from_step and done.resumed_from_step % 5 == 0  # at most 4 steps ran twice
        wait_until(lambda: not storage.exists(checkpoint_key(killed.id)), 30, "checkpoint deleted at the end")
        same_frames(done, completed(store, submit(1234).id, logs[other]))

        # SIGTERM with no grace: the state of the step in flight is stored, and a new worker resumes from it.
        stopped = submit(99)
        wait_until(lambda: store.get(stopped.id).progress >= 50, 120, "half done", logs[other])
        procs[other].send_signal(signal.SIGTERM)
        assert procs[other].wait(60) == 0
        back = store.get(stopped.id)
        assert back.status == "queued" and storage.exists(checkpoint_key(stopped.id))
        assert "checkpoint stored" in logs[other].read_text()
        procs["c"] = start_worker(env, logs["c"], "c", K5_CHECKPOINT_EVERY_STEPS="0")
        done = completed(store, stopped.id, logs["c"])
        assert done.worker == "c" and done.resumed_from_step is not None and done.resumed_from_step >= 25
        same_frames(done, completed(store, submit(99).id, logs["c"]))
    finally:
        for p in procs.values():
            stop_process(p, timeout=20)
