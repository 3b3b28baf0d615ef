"""Job records move forward only, through one guarded transition; creation and enqueueing are one step."""

from __future__ import annotations

import threading

import pytest
from rq import Queue

from service.jobs import JobStore, plan_job
from service.models import TINY
from service.schemas import VideoCreate
from service.settings import Settings


@pytest.fixture
def store(r):
    return JobStore(r, Settings(heartbeat_s=1))


def queued(store: JobStore):
    rec = plan_job(VideoCreate(prompt="a cat", seed=7), TINY["k5-tiny-t2v"], has_image=False)
    store.create(rec)
    return rec


def test_create_records_and_enqueues_together(store):
    rec = queued(store)
    assert store.get(rec.id) == rec
    job = Queue("k5-tiny-t2v", connection=store.r).fetch_job(rec.id)
    assert job is not None and job.func_name == "worker.runner.run_job" and job.args == (rec.id,)
    assert rec.num_frames == 25 and (rec.width, rec.height) == (96, 64) and rec.seed == 7


def test_transitions_are_forward_only_and_terminal_is_final(store):
    rec = queued(store)
    assert store.update(rec.id, "in_progress", progress=10).progress == 10
    # Progress never goes back.
    assert store.update(rec.id, progress=5).progress == 10
    with pytest.raises(ValueError):
        store.update(rec.id, "queued")
    done = store.update(rec.id, "completed", progress=100, completed_at=1)
    assert done.status == "completed" and done.progress == 100
    # Terminal: nothing changes it any more.
    assert store.update(rec.id, "failed", error={"code": "x", "message": "y"}) is None
    assert store.update(rec.id, progress=1) is None
    assert store.get(rec.id).status == "completed"
    assert store.r.ttl(f"k5:video:{rec.id}") > 0


def test_concurrent_updates_lose_nothing(store):
    rec = queued(store)
    store.update(rec.id, "in_progress")

    def bump(start: int) -> None:
        for p in range(start, 90, 4):
            store.update(rec.id, progress=p)

    threads = [threading.Thread(target=bump, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert store.get(rec.id).progress == 89


def test_models_are_online_while_workers_beat(store):
    spec = TINY["k5-tiny-i2v"]
    assert store.served_spec(spec.id) is None
    store.announce(spec, "w1")
    assert store.workers_online(spec.id) == 1
    assert store.served_spec(spec.id) == spec
    assert [s.id for s in store.online_models()] == [spec.id]
    store.retire(spec, "w1")
    assert store.served_spec(spec.id) is None


def test_declared_models_are_accepted_without_workers(r):
    # Scale-to-zero: a model the deployment declares takes jobs while no worker is up yet.
    store = JobStore(r, Settings(served_models="kandinsky-5.0-t2v-lite-distilled16steps-5s"))
    spec = store.served_spec("kandinsky-5.0-t2v-lite-distilled16steps-5s")
    assert spec is not None and spec.steps == 16
    assert store.default_model() == "kandinsky-5.0-t2v-lite-distilled16steps-5s"
