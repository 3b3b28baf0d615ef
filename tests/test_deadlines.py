"""Request deadlines: a job not started by its deadline fails deadline_exceeded without running, whether a worker
takes it late (the start transition) or none takes it at all (the janitor); one that cannot finish in time is
refused up front. Real Redis; the last test through a real gateway process with no worker behind it."""

from __future__ import annotations

import httpx
import redis
from rq import Queue

from service.contract import keys
from service.contract.clock import redis_clock
from service.contract.jobs import JobStore, plan_job
from service.contract.lifecycle import Lifecycle
from service.contract.models import TINY
from service.contract.recovery import Recovery
from service.contract.schemas import VideoCreate
from service.contract.settings import Settings
from tests.conftest import gateway_process
from tests.waiting import wait_until

T2V = TINY["k5-tiny-t2v"]


def queued(store: JobStore, deadline_at: float | None):
    rec = plan_job(VideoCreate(prompt="a cat"), T2V, has_image=False)
    rec.deadline_at = deadline_at
    assert Lifecycle(store).create(rec) is not None
    return rec


def test_a_job_past_its_deadline_fails_at_start_without_running(r):
    store = JobStore(r, Settings(heartbeat_s=1))
    life = Lifecycle(store)
    late = queued(store, redis_clock(r) - 1)  # its deadline passed while it waited
    assert r.zscore(keys.DEADLINES, late.id) is not None
    assert life.start(late.id, "w", late.id, started_at=1.0) is None
    rec = store.get(late.id)
    assert rec.status == "failed" and rec.error.code == "deadline_exceeded"
    assert rec.started_at is None and rec.worker is None and life.attempts(late.id) == 0
    assert r.zscore(keys.DEADLINES, late.id) is None and not r.sismember(keys.RUNNING, late.id)
    assert store.inflight(rec.owner) == 0
    # A job still in time starts, and leaves the deadline set as it leaves the queue.
    timely = queued(store, redis_clock(r) + 600)
    run = life.start(timely.id, "w", timely.id)
    assert run is not None and r.zscore(keys.DEADLINES, timely.id) is None
    assert run.progress(50) == "done" and r.zscore(keys.DEADLINES, timely.id) is None
    # Requeued (its worker shut down), it waits again, and its deadline holds again.
    assert run.requeue() == "done" and r.zscore(keys.DEADLINES, timely.id) == timely.deadline_at


def test_the_janitor_fails_only_the_queued_jobs_that_are_due(r):
    store = JobStore(r, Settings(heartbeat_s=1))
    due, later, none = queued(store, redis_clock(r) - 1), queued(store, redis_clock(r) + 600), queued(store, None)
    assert Recovery(store).expire_deadlines() == 1
    failed = store.get(due.id)
    assert failed.status == "failed" and failed.error.code == "deadline_exceeded"
    assert due.id not in Queue(T2V.id, connection=r).get_job_ids()  # off the queue: no worker will take it
    assert store.get(later.id).status == "queued" and store.get(none.id).status == "queued"
    assert [keys.text(m) for m in r.zrange(keys.DEADLINES, 0, -1)] == [later.id]
    # Leaving the queue any other way (here: cancelled) takes its entry along.
    Lifecycle(store).cancel(later.id)
    assert r.zcard(keys.DEADLINES) == 0 and Recovery(store).expire_deadlines() == 0


def test_deadlines_through_a_gateway_with_no_worker(r, redis_server, tmp_path):
    url = redis_server.url.replace("/0", "/1")
    store = JobStore(redis.Redis.from_url(url), Settings(redis_url=url))
    body = {"prompt": "a cat", "model": T2V.id, "size": "64x64", "seconds": "1"}
    # A worker's announcement and measured speed, as a worker writes them; no worker runs: nothing takes a job.
    # 64x64, 25 frames, 4 steps with guidance: 0.1024 MV x 8 forwards x 100 s = 81.92 s a job.
    store.announce(T2V, "deadline-test-worker")
    store.r.hset(keys.timing(T2V.id), mapping={"step": 100.0, "overhead": 0.0})
    with gateway_process(url, tmp_path, K5_HEARTBEAT_S="0.5") as base, httpx.Client(base_url=base) as c:
        for bad, param in (
            ({"deadline_s": 10, "deadline_at": redis_clock(r) + 10}, "deadline_at"),
            ({"deadline_s": 0}, "deadline_s"),
            ({"deadline_s": 8 * 86400}, "deadline_s"),
            ({"deadline_at": redis_clock(r) - 5}, "deadline_at"),
        ):
            resp = c.post("/v1/videos", json={**body, **bad})
            assert resp.status_code == 400 and resp.json()["error"]["param"] == param, (bad, resp.text)
        store.announce(T2V, "deadline-test-worker")
        refused = c.post("/v1/videos", json={**body, "deadline_s": 30})
        error = refused.json()["error"]
        assert refused.status_code == 409 and error["code"] == "deadline_unreachable", refused.text
        assert error["param"] == "deadline_s" and "estimated to complete in 82 s" in error["message"]
        assert c.post("/v1/videos", json={**body, "deadline_s": 120}).status_code == 200
        # Until the model has been timed, a deadline is accepted; not started by then, the job fails.
        store.r.delete(keys.timing(T2V.id))
        store.announce(T2V, "deadline-test-worker")
        video = c.post("/v1/videos", json={**body, "deadline_s": 1}).json()
        assert video["status"] == "queued" and video["deadline_at"] > redis_clock(r)

        def failed() -> dict | None:
            v = c.get(f"/v1/videos/{video['id']}").json()
            return v if v["status"] == "failed" else None

        done = wait_until(failed, 30, "the janitor failing the job past its deadline")
    assert done["error"]["code"] == "deadline_exceeded", done
    assert done["usage"]["gpu_seconds"] == 0 and done["usage"]["steps"] == 0
    rec = store.get(video["id"])
    assert rec.started_at is None and rec.worker is None  # no run ever started
    assert video["id"] not in Queue(T2V.id, connection=store.r).get_job_ids()
