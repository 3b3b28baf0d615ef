"""The worker's job loop in-process: a failing generation marks its job failed and the worker goes on.

The fake lives inside the seam: the real tiny pipeline runs, and only its step callback raises on step 3 of
the first job (the way a CUDA error or a bad kernel would surface mid-denoising)."""

from __future__ import annotations

import pytest
from rq import Queue, SimpleWorker

from service.contract.jobs import JobStore, plan_job
from service.contract.lifecycle import Lifecycle
from service.contract.models import resolve_model
from service.contract.schemas import VideoCreate
from service.contract.storage import open_storage
from tests.conftest import stored
from worker import runner
from worker.pipeline import VideoPipeline


class FailsOnStep3OfFirstJob:
    def __init__(self, real: VideoPipeline) -> None:
        self.real, self.spec, self.calls = real, real.spec, 0
        self.release_memory = real.release_memory

    def generate(self, req, on_step=None):
        self.calls += 1
        if self.calls > 1:
            return self.real.generate(req, on_step)

        def exploding(done: int, total: int) -> None:
            if done == 3:
                raise RuntimeError("injected failure at step 3")
            on_step(done, total)

        return self.real.generate(req, exploding)


@pytest.fixture
def t2v(tiny_models, s3_settings):
    spec = resolve_model(str(tiny_models["t2v"]))
    return spec, VideoPipeline.load(s3_settings, spec)


def test_failed_generation_then_next_job_completes(r, s3_settings, t2v):
    spec, pipeline = t2v
    store, storage = JobStore(r, s3_settings), open_storage(s3_settings)
    runner.configure(runner.WorkerContext(store, storage, FailsOnStep3OfFirstJob(pipeline), "test-worker", 3600))
    first = plan_job(VideoCreate(prompt="a cat", num_inference_steps=5), spec, has_image=False)
    second = plan_job(VideoCreate(prompt="a dog", num_inference_steps=5), spec, has_image=False)
    Lifecycle(store).create(first)
    Lifecycle(store).create(second)

    SimpleWorker([Queue(spec.id, connection=r)], connection=r).work(burst=True)

    failed = store.get(first.id)
    assert failed.status == "failed"
    assert failed.error.code == "generation_error" and "step 3" in failed.error.message
    assert failed.completed_at is None
    assert stored(storage, first.id) == []
    done = store.get(second.id)
    assert done.status == "completed" and done.progress == 100
    prefix = done.assets.removeprefix(f"{second.id}/")
    assert stored(storage, second.id) == [f"{prefix}/{n}" for n in ("spritesheet.jpg", "thumbnail.webp", "video.mp4")]


def test_cancelled_or_missing_record_is_skipped(r, s3_settings, t2v):
    spec, pipeline = t2v
    store, storage = JobStore(r, s3_settings), open_storage(s3_settings)
    runner.configure(runner.WorkerContext(store, storage, pipeline, "test-worker", 3600))
    rec = plan_job(VideoCreate(prompt="a cat"), spec, has_image=False)
    Lifecycle(store).create(rec)
    Lifecycle(store).cancel(rec.id)
    SimpleWorker([Queue(spec.id, connection=r)], connection=r).work(burst=True)
    assert store.get(rec.id).error.code == "cancelled"
    assert stored(storage, rec.id) == []
