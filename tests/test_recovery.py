"""Recovery: leases and the reaper, owner-checked writes, pipeline and storage failures, asset expiry (in-process,
fakes only inside the seams), then SIGTERM and a Redis restart against real worker processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis
import torch
from botocore.exceptions import EndpointConnectionError
from fastapi.testclient import TestClient
from rq import Queue, SimpleWorker
from rq.job import Job

from service.console.localstack import RedisServer, free_port, stop_process
from service.contract import storage as storage_mod
from service.contract.jobs import JobStore, connect_redis, plan_job
from service.contract.keys import EXPIRY, RUNNING
from service.contract.keys import lease as lease_key
from service.contract.lifecycle import Lifecycle, Outcome
from service.contract.models import resolve_model
from service.contract.recovery import Recovery
from service.contract.schemas import VideoCreate
from service.contract.settings import Settings
from service.contract.storage import open_storage
from service.gateway.app import create_app
from tests.conftest import ROOT, WEBHOOK_SECRET, stored
from worker import runner
from worker.main import EXIT_DEVICE_LOST, RecoveringWorker
from worker.pipeline import VideoPipeline

ASSETS = ("video.mp4", "thumbnail.webp", "spritesheet.jpg")


@pytest.fixture
def t2v(tiny_models, s3_settings):
    spec = resolve_model(str(tiny_models["t2v"]))
    return spec, VideoPipeline.load(s3_settings, spec)


@pytest.fixture
def settings(s3_settings) -> Settings:
    # A 0.3 s lease, and a terminal webhook to count (nothing delivers it here).
    return s3_settings.model_copy(
        update={
            "heartbeat_s": 0.1,
            "max_attempts": 2,
            "webhook_secret": WEBHOOK_SECRET,
            "webhook_url": "https://hooks.example.com/k5",
        }
    )


def new_job(store: JobStore, spec, steps: int = 3, seconds: str | None = None):
    req = VideoCreate(prompt="a lighthouse", num_inference_steps=steps, seconds=seconds)
    rec = plan_job(req, spec, has_image=False)
    Lifecycle(store).create(rec)
    return rec


def lapse(r: redis.Redis, video_id: str, timeout: float = 5) -> None:
    """Wait until a lease nobody refreshes has expired (the worker holding it is 'dead')."""
    deadline = time.monotonic() + timeout
    while r.exists(lease_key(video_id)):
        assert time.monotonic() < deadline, "lease never expired"
        time.sleep(0.05)


def terminal_events(r: redis.Redis, video_id: str) -> int:
    return int(r.scard(f"k5:webhooks:video:{video_id}"))


def test_dead_worker_job_is_requeued_then_fails_worker_lost(r, settings, t2v):
    spec, _ = t2v
    store = JobStore(r, settings)
    life, recovery = Lifecycle(store), Recovery(store)
    rec = new_job(store, spec)
    queue = Queue(spec.id, connection=r)

    for attempt in (1, 2):
        rq_id = queue.job_ids[0]
        queue.remove(rq_id)  # a worker popped it ...
        started = life.start(rec.id, f"dead-{attempt}", rq_id, progress=30)
        assert started is not None and started.record.status == "in_progress"
        # ... a second start of the same job (a duplicate RQ entry) is refused while it runs
        assert life.start(rec.id, "other", rq_id) is None
        lapse(r, rec.id)  # ... and died
        assert recovery.reap() == {"requeued" if attempt == 1 else "failed": 1}
        assert life.attempts(rec.id) == attempt
        if attempt == 1:
            back = store.get(rec.id)
            assert back.status == "queued" and back.progress == 0 and back.worker is None
            assert len(queue.job_ids) == 1 and queue.fetch_job(queue.job_ids[0]).args == (rec.id,)
            # The dead run's token is worthless now: it cannot complete the job, and knows it lost it.
            assert started.complete(expires_at=1) is Outcome.NOT_OWNER

    final = store.get(rec.id)
    assert final.status == "failed" and final.error.code == "worker_lost"
    assert not r.sismember(RUNNING, rec.id)
    assert terminal_events(r, rec.id) == 1
    assert recovery.reap() == {}


def test_stale_run_cannot_complete_and_new_owner_completes_once(r, settings, t2v):
    spec, pipeline = t2v
    store, storage = JobStore(r, settings), open_storage(settings)
    life = Lifecycle(store)
    rec = new_job(store, spec)
    queue = Queue(spec.id, connection=r)
    queue.remove(rec.id)
    stale = life.start(rec.id, "frozen", rec.id)
    assert stale is not None
    lapse(r, rec.id)
    assert Recovery(store).reap() == {"requeued": 1}
    # The frozen worker wakes up: its heartbeat cannot re-arm a lease over a requeued job.
    assert stale.refresh() is False

    runner.configure(runner.WorkerContext(store, storage, pipeline, "live", 3600))
    SimpleWorker([queue], connection=r).work(burst=True)
    done = store.get(rec.id)
    assert done.status == "completed" and done.worker == "live" and life.attempts(rec.id) == 2
    assert stale.complete(expires_at=1) is Outcome.NOT_OWNER  # nothing moves it, and the stale run is told why
    assert stored(storage, rec.id) == sorted(f"{done.assets.split('/', 1)[1]}/{a}" for a in ASSETS)
    assert terminal_events(r, rec.id) == 1
    assert r.zscore(EXPIRY, rec.id) == done.expires_at


class Faulty:
    """The real tiny pipeline with one fault injected per job, in order; None = a healthy job."""

    def __init__(self, real: VideoPipeline, faults: list[str | None]) -> None:
        self.real, self.spec, self.faults = real, real.spec, list(faults)
        self.release_memory = real.release_memory

    def generate(self, req, on_step=None):
        fault = self.faults.pop(0)
        if fault == "nan":
            # Inside the pipeline: its own finiteness check must catch what the model produced.
            real_generate = self.real._generate
            self.real._generate = lambda *a, **k: torch.full_like(real_generate(*a, **k), float("nan"))
            try:
                return self.real.generate(req, on_step)
            finally:
                self.real._generate = real_generate

        def step(done: int, total: int) -> None:
            if done == 2 and fault == "oom":
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
            if done == 2 and fault == "device":
                raise RuntimeError("CUDA error: an illegal memory access was encountered")
            on_step(done, total)

        return self.real.generate(req, step)


def test_oom_and_nan_fail_the_job_and_the_worker_goes_on(r, settings, t2v):
    spec, pipeline = t2v
    store, storage = JobStore(r, settings), open_storage(settings)
    runner.configure(runner.WorkerContext(store, storage, Faulty(pipeline, ["oom", "nan", None]), "w", 3600))
    oom, nan, ok = new_job(store, spec), new_job(store, spec), new_job(store, spec)
    SimpleWorker([Queue(spec.id, connection=r)], connection=r).work(burst=True)

    assert store.get(oom.id).error.code == "out_of_memory" and "smaller" in store.get(oom.id).error.message
    assert store.get(nan.id).error.code == "generation_error" and "NaN" in store.get(nan.id).error.message
    assert store.get(ok.id).status == "completed"
    assert not r.smembers(RUNNING)


def test_device_error_exits_the_worker_and_requeues_the_job(r, settings, t2v):
    spec, pipeline = t2v
    store, storage = JobStore(r, settings), open_storage(settings)
    ctx = runner.WorkerContext(store, storage, Faulty(pipeline, ["device", None]), "w", 3600)
    runner.configure(ctx)
    lost, waiting = new_job(store, spec), new_job(store, spec)
    queue = Queue(spec.id, connection=r)
    worker = RecoveringWorker([queue], connection=r, ctx=ctx, grace_s=1)
    with pytest.raises(SystemExit) as exited:
        worker.work(burst=True)
    assert exited.value.code == EXIT_DEVICE_LOST
    # Not failed: the job is the device's victim. Its lease is already dropped, so the next pass requeues it.
    assert store.get(lost.id).status == "in_progress"
    assert store.get(waiting.id).status == "queued"
    assert Recovery(store).reap() == {"requeued": 1}
    assert queue.job_ids[0].startswith(lost.id)  # requeued at the front


def test_upload_retries_then_fails_with_storage_error_and_leaves_nothing(r, settings, t2v, monkeypatch):
    spec, pipeline = t2v
    store, storage = JobStore(r, settings), open_storage(settings)
    monkeypatch.setattr(storage_mod, "UPLOAD_BACKOFF_S", 0.01)
    storage.retry_window_s = 0.1  # retries for a tenth of a second here (K5_STORAGE_RETRY_WINDOW_S)
    real_upload = storage.client.upload_file
    calls: list[str] = []

    def flaky(path, bucket, key, **kw):
        calls.append(key)
        # The first job's video fails twice and then goes through; the second job's video never does.
        if key.endswith("video.mp4") and (len(calls) <= 4 or len(calls) > 6):
            raise EndpointConnectionError(endpoint_url="http://s3.invalid")
        return real_upload(path, bucket, key, **kw)

    monkeypatch.setattr(storage.client, "upload_file", flaky)
    runner.configure(runner.WorkerContext(store, storage, pipeline, "w", 3600))
    retried, broken = new_job(store, spec), new_job(store, spec)
    SimpleWorker([Queue(spec.id, connection=r)], connection=r).work(burst=True)

    done = store.get(retried.id)
    assert done.status == "completed"
    assert all(storage.exists(f"{done.assets}/{a}") for a in ASSETS)
    failed = store.get(broken.id)
    assert failed.status == "failed" and failed.error.code == "storage_error"
    assert sum(broken.id in k and k.endswith("/video.mp4") for k in calls) >= 3
    assert stored(storage, broken.id) == []  # thumbnail and spritesheet removed


def test_expired_assets_are_swept(r, settings, t2v):
    spec, pipeline = t2v
    store, storage = JobStore(r, settings), open_storage(settings)
    runner.configure(runner.WorkerContext(store, storage, pipeline, "w", asset_ttl_s=60))
    rec = new_job(store, spec)
    SimpleWorker([Queue(spec.id, connection=r)], connection=r).work(burst=True)
    done = store.get(rec.id)
    recovery = Recovery(store)
    assert recovery.sweep_expired(storage, now=done.expires_at - 1) == 0
    assert storage.exists(f"{done.assets}/video.mp4")
    assert recovery.sweep_expired(storage, now=done.expires_at + 1) == 1
    assert stored(storage, rec.id) == []
    assert r.zcard(EXPIRY) == 0


# RQ's own worker code up to a point, then SIGKILL: what a worker killed in that moment leaves in Redis.
DIE_AFTER = """
import os, signal, sys
import redis
from rq import Queue, SimpleWorker

class Dying(SimpleWorker):
    def execute_job(self, job, queue):
        if sys.argv[2] == "prepare":
            self.prepare_execution(job)
            self.prepare_job_execution(job, remove_from_intermediate_queue=True)
        os.kill(os.getpid(), signal.SIGKILL)

conn = redis.Redis.from_url(sys.argv[1])
Dying([Queue(sys.argv[3], connection=conn)], connection=conn).work(burst=True)
"""


@pytest.mark.parametrize("dies", ["dequeue", "prepare", "prepare+rq-cleanup"])
def test_job_whose_worker_died_before_starting_it_is_redelivered(r, redis_server, settings, t2v, dies):
    spec, pipeline = t2v
    store, storage = JobStore(r, settings), open_storage(settings)
    recovery, life = Recovery(store), Lifecycle(store)
    rec = new_job(store, spec)
    queue = Queue(spec.id, connection=r)
    url = redis_server.url.replace("/0", "/1")
    died = subprocess.run([sys.executable, "-c", DIE_AFTER, url, dies.split("+")[0], spec.id], cwd=ROOT, timeout=60)
    assert died.returncode == -signal.SIGKILL
    # Off the queue, never started: nothing would ever run it.
    assert store.get(rec.id).status == "queued" and queue.count == 0
    if dies.endswith("rq-cleanup"):
        # RQ's own maintenance, later, files the execution as abandoned in its failed registry.
        queue.started_job_registry.cleanup(timestamp=time.time() + 86400)
        assert rec.id in queue.failed_job_registry.get_job_ids(cleanup=False)
        assert recovery.redeliver() == 1
    else:
        # A live worker starts its job within milliseconds: within a lease period it is left alone.
        assert recovery.redeliver() == 0 and queue.count == 0
        assert recovery.redeliver(now=time.time() + 1) == 1
    assert recovery.redeliver(now=time.time() + 1) == 0  # once
    assert queue.count == 1 and queue.job_ids[0] != rec.id
    # The dead worker's RQ job may not start the video any more, should that worker only have been frozen.
    assert life.start(rec.id, "frozen", rec.id) is None

    runner.configure(runner.WorkerContext(store, storage, pipeline, "live", 3600))
    SimpleWorker([queue], connection=r).work(burst=True)
    done = store.get(rec.id)
    assert done.status == "completed" and life.attempts(rec.id) == 2  # the lost delivery counts
    assert terminal_events(r, rec.id) == 1


def test_a_job_that_never_starts_ends_worker_lost_and_cancel_clears_its_redelivery(r, redis_server, settings, t2v):
    spec, _ = t2v
    store = JobStore(r, settings)
    recovery, life = Recovery(store), Lifecycle(store)
    queue = Queue(spec.id, connection=r)
    url = redis_server.url.replace("/0", "/1")

    def lose_delivery() -> None:
        died = subprocess.run([sys.executable, "-c", DIE_AFTER, url, "dequeue", spec.id], cwd=ROOT, timeout=60)
        assert died.returncode == -signal.SIGKILL
        assert recovery.redeliver() == 0
        assert recovery.redeliver(now=time.time() + 1) == 1

    # Every worker that takes it dies before it starts: after max_attempts (2 here) it fails instead of cycling.
    doomed = new_job(store, spec)
    lose_delivery()
    assert store.get(doomed.id).status == "queued" and queue.count == 1
    lose_delivery()
    failed = store.get(doomed.id)
    assert failed.status == "failed" and failed.error.code == "worker_lost" and life.attempts(doomed.id) == 2
    assert queue.count == 0 and terminal_events(r, doomed.id) == 1

    # A cancel takes the video's current RQ job off the queue, whatever its id is now.
    waiting = new_job(store, spec)
    lose_delivery()
    rq_id = queue.job_ids[0]
    assert rq_id.startswith(f"{waiting.id}-r")
    life.cancel(waiting.id)
    assert queue.count == 0 and not r.exists(Job.key_for(rq_id))


def test_one_bad_entry_does_not_stop_the_janitor(r, settings, t2v):
    spec, pipeline = t2v
    store, storage = JobStore(r, settings), open_storage(settings)
    runner.configure(runner.WorkerContext(store, storage, pipeline, "w", asset_ttl_s=0))
    rec = new_job(store, spec)
    queue = Queue(spec.id, connection=r)
    SimpleWorker([queue], connection=r).work(burst=True)
    assert storage.exists(f"{store.get(rec.id).assets}/video.mp4")
    # A record this version cannot read, whose RQ job a worker took: the redelivery check fails on it ...
    r.set("k5:video:video_unreadable", "{not json")
    r.rpush(queue.intermediate_queue_key, "video_unreadable")
    Recovery(store).janitor(storage, "test")
    # ... and the expiry sweep after it still runs.
    assert stored(storage, rec.id) == [] and r.zcard(EXPIRY) == 0


def test_gateway_reaps_when_no_worker_is_left(r, redis_server, settings, t2v):
    """With every worker of a pool gone (or the pool scaled to zero) the gateway's janitor still requeues a job
    whose worker died, so that it is back in the queue the autoscaler watches."""
    spec, _ = t2v
    store = JobStore(r, settings)
    rec = new_job(store, spec)
    queue = Queue(spec.id, connection=r)
    queue.remove(rec.id)
    assert Lifecycle(store).start(rec.id, "dead", rec.id) is not None
    gateway = settings.model_copy(update={"redis_url": redis_server.url.replace("/0", "/1"), "allow_anonymous": True})
    with TestClient(create_app(gateway)):
        wait_until(lambda: store.get(rec.id).status == "queued", 10, "the gateway requeued the job")
    assert queue.count == 1 and Lifecycle(store).attempts(rec.id) == 1


# -- real worker processes ------------------------------------------------------------------------------------


def start_worker(env: dict[str, str], log: Path, **extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "service.cli", "worker"],
        env={**env, "K5_METRICS_PORT": str(free_port()), **extra},
        cwd=ROOT,
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
    )


def wait_until(pred, timeout: float, what: str, log: Path | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := pred():
            return value
        time.sleep(0.1)
    raise AssertionError(f"{what} not reached in {timeout}s\n" + (log.read_text()[-4000:] if log else ""))


@pytest.fixture
def worker_env(s3_server, s3_settings, tiny_models) -> dict[str, str]:
    return {
        **os.environ,
        **s3_server.env,
        "K5_MODEL": str(tiny_models["t2v"]),
        "K5_STORAGE_URL": s3_settings.storage_url,
        "K5_S3_ENDPOINT_URL": s3_server.endpoint,
        "K5_HEARTBEAT_S": "1",
        "HF_HUB_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
    }


@pytest.mark.slow
def test_sigterm_requeues_after_grace_or_finishes_within_it(redis_server, worker_env, t2v, tmp_path):
    spec, _ = t2v
    url = redis_server.url.replace("/0", "/2")  # a database of its own: no other worker takes these jobs
    r = redis.Redis.from_url(url)
    r.flushdb()
    settings = Settings(redis_url=url, heartbeat_s=1)
    store = JobStore(r, settings)
    env = {**worker_env, "K5_REDIS_URL": url}
    log = tmp_path / "workers.log"
    # No grace: the tiny model's 50 steps take well under a second here, so a grace could let the job finish
    # (a 0.3 s one did, with rq 3.0 on a fast machine).
    procs = [start_worker(env, log, K5_SHUTDOWN_GRACE_S="0")]
    try:
        wait_until(lambda: store.workers_online(spec.id), 120, "worker online", log)
        slow = new_job(store, spec, steps=50, seconds="2")
        wait_until(lambda: store.get(slow.id).progress > 10, 60, "slow job running", log)
        procs[0].send_signal(signal.SIGTERM)
        assert procs[0].wait(30) == 0
        back = store.get(slow.id)
        assert back.status == "queued" and back.progress == 0, back
        assert Lifecycle(store).attempts(slow.id) == 0  # a shutdown is not a failed attempt
        assert "job requeued on shutdown" in log.read_text()

        # A worker with a long grace: SIGTERM mid-job lets the job finish, then the worker exits.
        procs.append(start_worker(env, log, K5_SHUTDOWN_GRACE_S="120"))
        wait_until(lambda: store.get(slow.id).progress > 10, 120, "requeued job running again", log)
        procs[1].send_signal(signal.SIGTERM)
        assert procs[1].wait(120) == 0
        done = store.get(slow.id)
        assert done.status == "completed", done
    finally:
        for p in procs:
            stop_process(p)
        r.flushdb()


@pytest.mark.slow
def test_worker_survives_a_redis_restart(worker_env, t2v, tmp_path):
    spec, _ = t2v
    server = RedisServer(tmp_path / "redis", appendonly=True).start()
    settings = Settings(redis_url=server.url, heartbeat_s=1)
    log = tmp_path / "worker.log"
    proc = start_worker({**worker_env, "K5_REDIS_URL": server.url}, log)
    try:
        store = JobStore(connect_redis(settings), settings)
        wait_until(lambda: store.workers_online(spec.id), 120, "worker online", log)
        done = new_job(store, spec)
        wait_until(lambda: store.get(done.id).status == "completed", 60, "job before the restart", log)
        # The outage hits a running job: either its writes ride it out (client retries) or it is interrupted,
        # its lease lapses and it runs again. Either way it completes, on the same worker process.
        running = new_job(store, spec, steps=50, seconds="2")
        wait_until(lambda: store.get(running.id).progress > 10, 60, "job running", log)

        assert server.proc is not None
        server.proc.kill()  # the hard way: only the fsynced AOF survives
        server.proc.wait(10)
        # The worker meets the outage (its heartbeat fails) and stays up.
        wait_until(lambda: "heartbeat failed" in log.read_text(), 30, "the worker saw Redis go away", log)
        assert proc.poll() is None
        server.start()

        after = new_job(store, spec)
        for rec in (running, after):
            wait_until(lambda rec=rec: store.get(rec.id).status == "completed", 120, "jobs after the restart", log)
        assert proc.poll() is None  # the same process: it reconnected by itself
        assert store.get(done.id).status == "completed"  # AOF: what Redis had acknowledged survived
    finally:
        stop_process(proc)
        server.stop()
