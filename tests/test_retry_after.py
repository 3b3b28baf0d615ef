"""429 too_many_inflight tells the client when a slot frees: the key's running jobs' estimated completion, not
a fixed guess. A real gateway process; the tiny model announced and its step time recorded as a worker does."""

from __future__ import annotations

import time

import httpx
import redis

from service.contract.jobs import JobStore, current_rq_id
from service.contract.lifecycle import Lifecycle
from service.contract.models import TINY
from service.contract.settings import Settings
from tests.conftest import gateway_process

T2V = TINY["k5-tiny-t2v"]


def test_retry_after_follows_the_running_jobs_eta(r, redis_server, tmp_path):
    url = redis_server.url.replace("/0", "/1")
    store = JobStore(redis.Redis.from_url(url), Settings(redis_url=url))
    store.announce(T2V, "retry-test-worker")
    # As measured by a worker: 64x64, 25 frames, 4 steps with guidance = 0.1024 MV x 8 forwards -> 81.92 s a job.
    store.r.hset(f"k5:timing:{T2V.id}", mapping={"step": 100.0, "overhead": 0.0})
    body = {"prompt": "a cat", "model": T2V.id, "size": "64x64", "seconds": "1"}
    with gateway_process(url, tmp_path, K5_MAX_INFLIGHT_PER_KEY="2") as base, httpx.Client(base_url=base) as c:
        first, second = (c.post("/v1/videos", json=body).json() for _ in range(2))
        queued = c.post("/v1/videos", json=body)
        assert queued.status_code == 429 and queued.json()["error"]["code"] == "too_many_inflight"
        # Both queued, one worker: the first ends about 1.5 job-times from now.
        assert 110 <= int(queued.headers["retry-after"]) <= 125, queued.headers
        run = Lifecycle(store).start(
            first["id"], "retry-test-worker", current_rq_id(store.r, first["id"]), started_at=time.time()
        )
        assert run is not None and run.progress(75) == "done"
        running = c.post("/v1/videos", json=body)
        assert running.status_code == 429
        # A quarter of 81.92 s is left of the running one.
        assert 18 <= int(running.headers["retry-after"]) <= 24, running.headers
        assert 18_000 <= int(running.headers["retry-after-ms"]) <= 24_000
        assert second["status"] == "queued"
