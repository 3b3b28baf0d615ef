"""Post-processing in the background (worker/post.py) on the real tiny pipeline, Redis and S3, in-process.

Jobs run one after another on a thread each, as the RQ loop would run them. The one fake sits in the storage
seam: the first upload of the first job waits for the test to let it go, so that the test can look at the worker
while that job is still in post-processing. The shutdown test runs the worker's own run() instead, with an object
store that does not answer.
"""

from __future__ import annotations

import os
import signal
import threading

import pytest

from service.console.localstack import free_port
from service.contract.jobs import JobStore, plan_job
from service.contract.keys import lease as lease_key
from service.contract.lifecycle import Lifecycle
from service.contract.models import resolve_model
from service.contract.schemas import VideoCreate
from service.contract.settings import Settings
from service.contract.storage import open_storage
from tests.conftest import stored
from tests.waiting import wait_until
from worker import main as worker_main
from worker import runner
from worker.main import Heartbeat
from worker.pipeline import VideoPipeline
from worker.post import PostProcessor

FILES = ["spritesheet.jpg", "thumbnail.webp", "video.mp4"]


class HeldUpload:
    """The real storage, except that the first upload of `held` waits until `release` is set."""

    def __init__(self, real) -> None:
        self.real, self.held = real, ""
        self.uploading, self.release = threading.Event(), threading.Event()
        self.puts: list[str] = []

    def put_file(self, key, path, content_type) -> None:
        self.puts.append(key)
        if key.startswith(self.held + "/") and not self.uploading.is_set():
            self.uploading.set()
            assert self.release.wait(60), "the test never released the upload"
        self.real.put_file(key, path, content_type)

    def __getattr__(self, name):
        return getattr(self.real, name)


@pytest.fixture(scope="module")
def pipeline(tiny_models):
    spec = resolve_model(str(tiny_models["t2v"]))
    return VideoPipeline.load(Settings(), spec)


@pytest.fixture
def worker(r, s3_settings, pipeline):
    # A 0.3 s lease: a run the heartbeat forgot would lapse, and the janitor in the heartbeat would requeue it.
    settings = s3_settings.model_copy(update={"heartbeat_s": 0.1})
    store = JobStore(r, settings)
    storage = HeldUpload(open_storage(settings))
    ctx = runner.WorkerContext(store, storage, pipeline, "test-worker", 3600, post=PostProcessor(1))
    beat = Heartbeat(store, pipeline.spec, "test-worker", settings.heartbeat_s, ctx, storage)
    beat.start()
    yield ctx, store, storage
    storage.release.set()
    ctx.post.close(60)
    beat.stopped.set()


def job(store: JobStore, spec, prompt: str) -> str:
    rec = plan_job(VideoCreate(prompt=prompt, num_inference_steps=2, size="96x64"), spec, has_image=False)
    Lifecycle(store).create(rec)
    return rec.id


def run_in_turn(ctx, video_id: str) -> threading.Thread:
    """One job as the RQ loop runs it; returns once the job is handed to post-processing (or settled)."""
    t = threading.Thread(target=runner.JobRun(ctx, video_id, video_id).run)
    t.start()
    return t


def test_next_job_denoises_while_the_last_one_uploads_and_the_lease_holds(worker):
    ctx, store, storage = worker
    spec = ctx.pipeline.spec
    first, second, third = (job(store, spec, p) for p in ("a fox", "a hare", "an owl"))
    storage.held = first

    run_in_turn(ctx, first).join(120)  # generated and handed over: the loop is free for the next job
    wait_until(storage.uploading.is_set, 60, "the first job uploading")
    second_run = run_in_turn(ctx, second)
    # The second job generates while the first is held in its upload; the stage is full, so the second waits for
    # the first (backpressure) and the loop cannot take the third.
    wait_until(lambda: len(ctx.post.runs()) == 2, 120, "the second job generated and waiting for the stage")
    assert second_run.is_alive() and store.get(third).status == "queued"
    assert not any(k.startswith(second + "/") for k in storage.puts)

    # Both leases (0.3 s) stay alive through several of them: the heartbeat refreshes runs in post-processing.
    r = store.r
    seen = {vid: [] for vid in (first, second)}

    def refreshed_often() -> bool:
        for vid, ttls in seen.items():
            ttls.append(r.pttl(lease_key(vid)))
        return all(sum(b > a for a, b in zip(ttls, ttls[1:], strict=False)) >= 5 for ttls in seen.values())

    wait_until(refreshed_often, 30, "five lease refreshes of each job")
    assert {store.get(v).status for v in (first, second)} == {"in_progress"}
    assert Lifecycle(store).attempts(first) == 1 and Lifecycle(store).attempts(second) == 1

    storage.release.set()
    second_run.join(120)
    assert ctx.post.close(120)
    for vid in (first, second):
        done = store.get(vid)
        assert done.status == "completed", done
        prefix = done.assets.removeprefix(f"{vid}/")
        assert stored(storage.real, vid) == [f"{prefix}/{n}" for n in FILES]
    assert not r.exists(lease_key(first)) and not r.exists(lease_key(second))


def test_cancel_in_post_processing_stores_nothing_and_shutdown_requeues_a_waiting_job(worker):
    ctx, store, storage = worker
    spec = ctx.pipeline.spec
    first, second = job(store, spec, "a fox"), job(store, spec, "a hare")
    storage.held = first
    run_in_turn(ctx, first).join(120)
    wait_until(storage.uploading.is_set, 60, "the first job uploading")
    second_run = run_in_turn(ctx, second)
    wait_until(lambda: len(ctx.post.runs()) == 2, 120, "the second job waiting for the stage")

    # The first is cancelled mid-upload; then the shutdown grace period ends while the second waits for the stage.
    Lifecycle(store).cancel(first)
    ctx.stop.set()
    second_run.join(60)
    back = store.get(second)
    assert back.status == "queued" and back.progress == 0, back
    assert Lifecycle(store).attempts(second) == 0  # a shutdown is not a failed attempt
    assert not any(k.startswith(second + "/") for k in storage.puts)  # never encoded nor uploaded

    storage.release.set()
    assert ctx.post.close(120)
    rec = store.get(first)
    assert rec.status == "failed" and rec.error.code == "cancelled", rec
    assert stored(storage.real, first) == []  # what it had uploaded was deleted


def test_sigterm_waits_for_the_job_in_post_processing(r, s3_settings, tiny_models):
    """The worker's own run() (loading, RQ loop, shutdown), in this process: SIGTERM while its job uploads in the
    background. The job is settled before run() returns; without the drain it would be left in_progress."""
    conn = r.connection_pool.connection_kwargs  # the test's own database, on the session's Redis
    settings = s3_settings.model_copy(
        update={
            "model": str(tiny_models["t2v"]),
            "redis_url": f"redis://127.0.0.1:{conn['port']}/{conn['db']}",
            "worker_name": "drain-test",
            "metrics_port": 0,
            "heartbeat_s": 0.2,
            # Nothing listens there: the upload retries for the window, then the job fails storage_error.
            "s3_endpoint_url": f"http://127.0.0.1:{free_port()}",
            "storage_retry_window_s": 4.0,
        }
    )
    store = JobStore(r, settings)
    video_id = job(store, resolve_model(settings.model), "a fox")

    def stop_while_uploading() -> None:
        # 97: the upload phase (worker/runner.py PHASE), reached on the post-processing thread.
        wait_until(lambda: store.get(video_id).progress >= 97, 120, "the job uploading in the background")
        os.kill(os.getpid(), signal.SIGTERM)  # RQ's handler, installed by the worker loop, takes it

    watcher = threading.Thread(target=stop_while_uploading, daemon=True)
    watcher.start()
    worker_main.run(settings)
    watcher.join(5)
    rec = store.get(video_id)
    assert rec.status == "failed" and rec.error.code == "storage_error", rec
