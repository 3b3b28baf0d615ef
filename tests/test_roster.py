"""/v1/models reads the workers' state from Redis at most once per heartbeat, not on every call: counted with
INFO commandstats on a redis-server of the test's own, through a real gateway process."""

from __future__ import annotations

import time

import httpx
import redis

from bench.gateway import commands
from service.console.localstack import RedisServer
from service.contract.jobs import JobStore
from service.contract.models import TINY
from service.contract.settings import Settings
from service.gateway.roster import Roster
from tests.conftest import gateway_process


def test_models_listing_costs_no_redis_reads_between_heartbeats(tmp_path):
    server = RedisServer(tmp_path / "redis").start()
    try:
        r = redis.Redis.from_url(server.url)
        spec = TINY["k5-tiny-t2v"]
        JobStore(r, Settings(redis_url=server.url, heartbeat_s=30)).announce(spec, "worker-1")
        # A second pool that spreads each video over 8 GPUs: the model object names both layouts.
        JobStore(r, Settings(redis_url=server.url, heartbeat_s=30, parallel="sp=4,cfg=2")).announce(spec, "pod-8gpu")
        # A long heartbeat: neither the janitor nor a refresh of the listing comes round during the test.
        with gateway_process(server.url, tmp_path, K5_HEARTBEAT_S="30") as base, httpx.Client(base_url=base) as c:
            first = c.get("/v1/models")
            assert first.status_code == 200, first.text
            by_id = {m["id"]: m for m in first.json()["data"]}
            assert by_id[spec.id]["online"] and by_id[spec.id]["workers"] == 2
            assert by_id[spec.id]["parallel"] == ["cfg=2,sp=4", "none"]
            assert by_id["kandinsky-5.0-t2v-pro-sft-5s"]["parallel"] == []  # nothing online
            before = commands(r)
            calls = 50
            for _ in range(calls):
                assert c.get("/v1/models").json() == first.json()
                assert c.get(f"/v1/models/{spec.id}").json() == by_id[spec.id]
            after = commands(r)
        delta = {k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)}
        # What is left per request is the rate limit's counter: INCR and EXPIRE in one script (one command).
        rate_limit = ("evalsha", "incr", "expire")
        assert delta == dict.fromkeys(rate_limit, 2 * calls), delta
    finally:
        server.stop()


def test_roster_sees_a_new_worker_after_its_max_age(r):
    settings = Settings(heartbeat_s=0.2)
    store = JobStore(r, settings)
    roster = Roster(store, max_age_s=settings.heartbeat_s)
    spec = TINY["k5-tiny-t2v"]

    def workers() -> int:
        return next((s.workers for s in roster.models() if s.spec.id == spec.id), 0)

    assert workers() == 0
    store.announce(spec, "worker-1")
    deadline = time.monotonic() + 10
    while workers() == 0:
        assert time.monotonic() < deadline, "the roster never saw the announced worker"
    states = {s.spec.id: s for s in roster.models()}
    assert states[spec.id].since > 0 and states[spec.id].spec == spec
    # The catalogue is listed too, announced models first.
    assert list(states)[0] == spec.id and len(states) > 1
