"""Job records move only along the lifecycle's edges and terminal states are final; creation and enqueueing are
one step; a record written by the previous release still reads."""

from __future__ import annotations

import threading

import pytest
from rq import Queue

from service.contract.jobs import JobStore, plan_job
from service.contract.lifecycle import EDGES, Lifecycle, Move, Outcome
from service.contract.models import TINY
from service.contract.schemas import VideoCreate
from service.contract.settings import Settings
from service.gateway.roster import Roster


@pytest.fixture
def store(r):
    return JobStore(r, Settings(heartbeat_s=1))


def queued(store: JobStore):
    rec = plan_job(VideoCreate(prompt="a cat", seed=7), TINY["k5-tiny-t2v"], has_image=False)
    Lifecycle(store).create(rec)
    return rec


def test_create_records_and_enqueues_together(store):
    rec = queued(store)
    assert store.get(rec.id) == rec
    job = Queue("k5-tiny-t2v", connection=store.r).fetch_job(rec.id)
    assert job is not None and job.func_name == "worker.runner.run_job" and job.args == (rec.id,)
    assert rec.num_frames == 25 and (rec.width, rec.height) == (96, 64) and rec.seed == 7


def test_transitions_are_forward_only_and_terminal_is_final(store):
    life = Lifecycle(store)
    rec = queued(store)
    run = life.start(rec.id, "w", rec.id, progress=10)
    assert run is not None and store.get(rec.id).status == "in_progress"
    # Progress never goes back.
    assert run.progress(5) is Outcome.DONE and store.get(rec.id).progress == 10
    assert run.complete(expires_at=2) is Outcome.DONE
    done = store.get(rec.id)
    assert done.status == "completed" and done.progress == 100 and done.assets == run.assets
    # Terminal: nothing changes it any more, and the run that completed it is told FINAL, not lost.
    assert run.fail("x", "y") is Outcome.FINAL
    assert run.progress(1) is Outcome.FINAL
    assert life.cancel(rec.id) is None
    assert life.start(rec.id, "w2", rec.id) is None
    assert store.get(rec.id).status == "completed"
    assert store.r.ttl(f"k5:video:{rec.id}") > 0


def test_every_edge_checks_its_source_state(store):
    """The table is the whole truth: a move whose source or target is not its edge's is refused."""
    rec = queued(store)
    for name, edge in EDGES.items():
        for status in ("queued", "in_progress", "completed", "failed"):
            if status in edge.sources:
                continue
            move_record = rec.model_copy(update={"status": edge.target})
            with pytest.raises(ValueError):
                Lifecycle._check(rec.model_copy(update={"status": status}), Move(name, move_record))


def test_a_run_that_lost_its_job_is_told_so_not_that_it_was_cancelled(store):
    life = Lifecycle(store)
    rec = queued(store)
    stale = life.start(rec.id, "frozen", rec.id)
    assert stale is not None
    store.r.delete(f"k5:lease:{rec.id}")  # its worker froze past its lease
    assert life.requeue(rec.id) == (Outcome.DONE, "requeued")
    rq_id = store.r.hget(f"k5:attempt:{rec.id}", "rq").decode()
    live = life.start(rec.id, "live", rq_id)
    assert live is not None and live.complete(expires_at=2) is Outcome.DONE
    # Completed by another run: the stale run is NOT_OWNER for every move (never FINAL, which means cancelled).
    assert stale.progress(50) is Outcome.NOT_OWNER
    assert stale.complete(expires_at=3) is Outcome.NOT_OWNER
    assert stale.fail("x", "y") is Outcome.NOT_OWNER
    assert stale.assets != live.assets and store.get(rec.id).assets == live.assets


def test_a_run_whose_job_was_deleted_is_told_it_is_gone(store):
    """DELETE removes the attempt hash with the record: the run in progress learns GONE (it stops as for a
    cancel), not that another run took the job, and its heartbeat can no longer re-arm a lease."""
    life = Lifecycle(store)
    rec = queued(store)
    run = life.start(rec.id, "w", rec.id)
    assert run is not None and life.cancel(rec.id) is not None
    life.remove(store.get(rec.id))
    assert not store.r.exists(f"k5:attempt:{rec.id}", f"k5:video:{rec.id}")
    assert run.progress(50) is Outcome.GONE and run.complete(expires_at=2) is Outcome.GONE
    assert not run.refresh() and not store.r.exists(f"k5:lease:{rec.id}")


def test_concurrent_updates_lose_nothing(store):
    rec = queued(store)
    run = Lifecycle(store).start(rec.id, "w", rec.id)
    assert run is not None

    def bump(start: int) -> None:
        for p in range(start, 90, 4):
            run.progress(p)

    threads = [threading.Thread(target=bump, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert store.get(rec.id).progress == 89


def test_models_are_online_while_workers_beat(store):
    spec = TINY["k5-tiny-i2v"]
    roster = Roster(store, max_age_s=0)  # read on every call: what the gateway sees once its state is refreshed
    assert roster.served_spec(spec.id) is None
    store.announce(spec, "w1")
    assert store.workers_online(spec.id) == 1
    assert roster.served_spec(spec.id) == spec
    assert [s.id for s in roster.online()] == [spec.id]
    store.retire(spec, "w1")
    assert roster.served_spec(spec.id) is None


def test_declared_models_are_accepted_without_workers(r):
    # Scale-to-zero: a model the deployment declares takes jobs while no worker is up yet.
    roster = Roster(JobStore(r, Settings(served_models="kandinsky-5.0-t2v-lite-distilled16steps-5s")), max_age_s=0)
    spec = roster.served_spec("kandinsky-5.0-t2v-lite-distilled16steps-5s")
    assert spec is not None and spec.steps == 16
    assert roster.default_model() == "kandinsky-5.0-t2v-lite-distilled16steps-5s"


# A record exactly as the previous release (version 1: the stored record was the public Video plus worker fields)
# wrote it, during a rolling deploy: this release must read it, show it, and run it.
V1_RECORD = {
    "id": "video_18ed0000000000000123456789abcdef",
    "object": "video",
    "model": "k5-tiny-t2v",
    "status": "queued",
    "progress": 0,
    "created_at": 1764547200,
    "completed_at": None,
    "expires_at": None,
    "prompt": "a cat",
    "size": "96x64",
    "seconds": "1",
    "remixed_from_video_id": None,
    "error": None,
    "negative_prompt": None,
    "seed": 7,
    "num_inference_steps": 2,
    "guidance_scale": 1.0,
    "metadata": {"order": "42"},
    "enhanced_prompt": None,
    "queue_position": None,
    "estimated_completion_at": None,
    "width": 96,
    "height": 64,
    "num_frames": 25,
    "fps": 24,
    "task": "text-to-video",
    "input_key": None,
    "worker": None,
    "owner": "anonymous",
    "webhook_url": None,
    "enhance_prompt": None,
    "started_at": None,
}


def test_a_record_of_the_previous_release_reads_and_runs(store):
    import json

    store.r.set(f"k5:video:{V1_RECORD['id']}", json.dumps(V1_RECORD))
    rec = store.get(V1_RECORD["id"])
    assert rec is not None and rec.version == 2 and rec.assets is None and rec.asset_prefix == rec.id
    video = store.view(rec)
    assert video.id == rec.id and video.metadata == {"order": "42"} and video.status == "queued"
    # A field of a newer release is ignored, not an error.
    store.r.set(f"k5:video:{V1_RECORD['id']}", json.dumps({**V1_RECORD, "version": 3, "shiny": True}))
    assert store.get(V1_RECORD["id"]).prompt == "a cat"
    run = Lifecycle(store).start(rec.id, "w", rec.id)
    assert run is not None and run.complete(expires_at=2) is Outcome.DONE
    assert store.get(rec.id).public().status == "completed"


def test_the_pipeline_runs_what_planning_decided():
    """One request shape from planning to the pipeline: every planned field arrives, model defaults included."""
    req = VideoCreate(prompt="a cat", negative_prompt="dogs", seed=11, enhance_prompt=False)
    rec = plan_job(req, TINY["k5-tiny-t2v"], has_image=False)
    gen = rec.generation()
    assert (gen.prompt, gen.negative_prompt, gen.seed, gen.enhance_prompt) == ("a cat", "dogs", 11, False)
    assert (gen.width, gen.height, gen.num_frames) == (rec.width, rec.height, rec.num_frames) == (96, 64, 25)
    spec = TINY["k5-tiny-t2v"]
    assert (gen.num_inference_steps, gen.guidance_scale, gen.image) == (spec.steps, spec.guidance, None)
