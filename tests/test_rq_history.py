"""RQ keeps no history that grows: k5serve's job records say how each video ended, so a finished RQ job leaves
nothing behind and a failed one is gone within an hour, while an abandoned delivery still stays long
enough in RQ's failed registry for the janitor to redeliver it. Real RQ workers against a real redis-server."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import redis
from rq import Queue, SimpleWorker

from service.contract.jobs import JobStore, plan_job
from service.contract.lifecycle import Lifecycle
from service.contract.models import TINY, resolve_model
from service.contract.recovery import Recovery
from service.contract.schemas import VideoCreate
from service.contract.settings import Settings
from service.contract.storage import open_storage
from tests.conftest import ROOT
from tests.test_recovery import DIE_AFTER
from worker import runner
from worker.pipeline import VideoPipeline

# A worker in a process of its own that nobody configured: run_job raises, so RQ files each job as failed.
UNCONFIGURED_WORKER = """
import sys
import redis
from rq import Queue, SimpleWorker

conn = redis.Redis.from_url(sys.argv[1])
SimpleWorker([Queue(sys.argv[2], connection=conn)], connection=conn).work(burst=True)
"""

HOUR = 3600


def per_job_keys(r: redis.Redis) -> dict[str, int]:
    """RQ's keys about single jobs (the job hash, its results, its executions) and their TTLs."""
    found = {}
    for prefix in ("rq:job:", "rq:results:", "rq:execution"):
        found |= {k.decode(): r.ttl(k) for k in r.scan_iter(f"{prefix}*")}
    return found


def test_finished_and_failed_rq_jobs_leave_bounded_history(r, redis_server, tiny_models, tmp_path):
    settings = Settings(storage_url=f"file://{tmp_path}", heartbeat_s=0.2)
    store = JobStore(r, settings)
    spec = resolve_model(str(tiny_models["t2v"]))
    queue = Queue(spec.id, connection=r)
    request = VideoCreate(prompt="a lighthouse", num_inference_steps=1, size="64x64")

    # Finished: no copy in RQ at all, the finished registry stays empty.
    done = plan_job(request, spec, has_image=False)
    Lifecycle(store).create(done)
    runner.configure(runner.WorkerContext(store, open_storage(settings), VideoPipeline.load(settings, spec), "w", 60))
    SimpleWorker([queue], connection=r).work(burst=True)
    assert store.get(done.id).status == "completed"
    assert r.zcard(queue.finished_job_registry.key) == 0 and per_job_keys(r) == {}

    # Failed in RQ's sense (the job raised): kept an hour at most, then RQ's maintenance finds nothing left.
    failed = [plan_job(request, spec, has_image=False) for _ in range(3)]
    for rec in failed:
        Lifecycle(store).create(rec)
    url = redis_server.url.replace("/0", "/1")
    subprocess.run([sys.executable, "-c", UNCONFIGURED_WORKER, url, spec.id], cwd=ROOT, timeout=120, check=True)
    registry = queue.failed_job_registry
    assert sorted(registry.get_job_ids(cleanup=False)) == sorted(rec.id for rec in failed)
    keys = per_job_keys(r)
    assert all(0 < ttl <= HOUR for ttl in keys.values()), keys
    registry.cleanup(timestamp=time.time() + HOUR + 1)  # as a worker's maintenance, an hour on
    assert r.zcard(registry.key) == 0


def test_an_abandoned_delivery_outlives_rq_maintenance_until_the_janitor_redelivers_it(r, redis_server, tiny_models):
    settings = Settings(heartbeat_s=0.2)
    store = JobStore(r, settings)
    spec = resolve_model(str(tiny_models["t2v"]))
    queue = Queue(spec.id, connection=r)
    rec = plan_job(VideoCreate(prompt="a lighthouse", num_inference_steps=1), spec, has_image=False)
    Lifecycle(store).create(rec)
    url = redis_server.url.replace("/0", "/1")
    died = subprocess.run([sys.executable, "-c", DIE_AFTER, url, "prepare", spec.id], cwd=ROOT, timeout=60)
    assert died.returncode == -signal.SIGKILL
    # A worker's maintenance: the started registry files the dead execution as abandoned, and the failed
    # registry's cleanup runs right after it, at the same moment. The entry must survive that.
    queue.started_job_registry.cleanup(timestamp=time.time() + 86400)
    queue.failed_job_registry.cleanup()
    assert rec.id in queue.failed_job_registry.get_job_ids(cleanup=False)
    assert Recovery(store).redeliver() == 1
    assert queue.count == 1 and store.get(rec.id).status == "queued"


def test_the_janitor_settles_each_failed_entry_once(r):
    """A failed RQ job whose video needs nothing more (here: cancelled) leaves RQ's failed registry at the next
    pass, so later passes do not look at it again: a pass costs what is new, not an hour of failures."""
    store = JobStore(r, Settings(heartbeat_s=0.2))
    spec = TINY["k5-tiny-t2v"]
    queue = Queue(spec.id, connection=r)
    request = VideoCreate(prompt="a lighthouse", size="64x64")
    recs = [plan_job(request, spec, has_image=False) for _ in range(3)]
    for rec in recs:
        Lifecycle(store).create(rec)
        job = queue.fetch_job(rec.id)
        queue.remove(rec.id)  # as a worker takes it, and then files it failed (RQ's own call)
        queue.failed_job_registry.add(job, ttl=HOUR, exc_string="boom")
        Lifecycle(store).cancel(rec.id)
    assert r.zcard(queue.failed_job_registry.key) == 3 and len(per_job_keys(r)) == 3
    assert Recovery(store).redeliver() == 0
    assert r.zcard(queue.failed_job_registry.key) == 0 and per_job_keys(r) == {}
