"""The demand list KEDA scales a pool on (k5:demand:<model>): every job of the model from creation until it is
final, waiting or running, in-process on the real Redis and the real lifecycle."""

from __future__ import annotations

from service.contract import keys
from service.contract.jobs import JobStore, plan_job
from service.contract.lifecycle import Lifecycle
from service.contract.models import TINY
from service.contract.schemas import VideoCreate
from service.contract.settings import Settings

SPEC = TINY["k5-tiny-t2v"]


def test_demand_counts_waiting_and_running_jobs_until_they_are_final(r):
    store = JobStore(r, Settings())
    life = Lifecycle(store)
    demand = keys.demand(SPEC.id)
    jobs = [plan_job(VideoCreate(prompt=f"job {i}"), SPEC, has_image=False) for i in range(4)]
    for rec in jobs:
        life.create(rec)
    assert r.llen(demand) == 4 and store.queue(SPEC.id).count == 4

    # Running jobs leave RQ's list but stay in demand: a busy pool is not scaled down.
    for rec in jobs[:2]:
        store.queue(SPEC.id).remove(rec.id)  # what a worker's dequeue does to RQ's list
    runs = [life.start(rec.id, "w1", rec.id) for rec in jobs[:2]]
    assert store.queue(SPEC.id).count == 2 and r.llen(demand) == 4
    assert store.queue_stats()[SPEC.id]["in_progress"] == 2

    # A run requeued at shutdown is still demand; completion, failure and cancel end it.
    runs[1].requeue()
    assert r.llen(demand) == 4
    runs[0].complete(expires_at=0)
    assert r.llen(demand) == 3
    life.cancel(jobs[2].id)  # a queued one
    life.cancel(jobs[3].id)
    life.cancel(jobs[3].id)  # repeating is harmless
    assert r.llen(demand) == 1
    assert [keys.text(v) for v in r.lrange(demand, 0, -1)] == [jobs[1].id]
