"""What a request costs Redis does not grow with the queue or the list page: positions come from the per-model
line (service/contract/lineup.py), one ZRANK each, exact against the order RQ's workers take jobs in. Counted
with INFO commandstats on a real redis-server (commands run inside scripts included)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from bench.gateway import commands
from service.console.localstack import RedisServer
from service.contract import keys
from service.contract.jobs import JobStore, plan_job, video_id_of
from service.contract.lifecycle import Lifecycle
from service.contract.models import TINY
from service.contract.recovery import Recovery
from service.contract.schemas import VideoCreate
from service.contract.settings import Settings
from tests.test_security import ALICE, auth, make_client

SPEC = TINY["k5-tiny-t2v"]
REQUEST = {"prompt": "a lighthouse", "size": "64x64"}
# Commands that cost O(1) or O(log n) in the size of a queue or an index (plus the reply): what a request may use.
# And LINSERT, which puts an interactive job before the batch lane: it walks only the interactive jobs ahead.
BOUNDED = {
    "evalsha", "eval", "incr", "expire", "get", "mget", "set", "hgetall", "hget", "hset", "zcount", "zrank",
    "zrevrangebylex", "zrangebylex", "zrangebyscore", "zadd", "zcard", "scard", "sadd", "rpush", "linsert", "time",
}  # fmt: skip


def cost(r, call) -> dict[str, int]:
    before = commands(r)
    assert call().status_code == 200
    return {k: v - before.get(k, 0) for k, v in commands(r).items() if v > before.get(k, 0)}


def count_round_trips(client: redis.Redis) -> list[int]:
    """Counts what `client` sends, one write per command or per pipeline: its round trips. Its pool starts
    afresh, so every connection it opens from now on counts."""
    sent = [0]
    pool = client.connection_pool

    class Counted(pool.connection_class):  # type: ignore[name-defined]
        def send_packed_command(self, command, check_health=True):
            sent[0] += 1
            return super().send_packed_command(command, check_health)

    pool.connection_class = Counted
    pool.reset()
    return sent


def trips(sent: list[int], call) -> int:
    before = sent[0]
    assert call().status_code == 200
    return sent[0] - before


def queue_jobs(store: JobStore, owner: str, n: int) -> list[str]:
    ids = []
    for _ in range(n):
        rec = plan_job(VideoCreate(**REQUEST), SPEC, has_image=False)
        rec.owner = owner
        Lifecycle(store).create(rec)
        ids.append(rec.id)
    return ids


@pytest.fixture
def own_redis(tmp_path) -> Iterator[RedisServer]:
    """A redis-server for this test alone: INFO commandstats counts the whole server, and the session's stack
    (its workers' heartbeats, its janitor) runs on the shared one."""
    server = RedisServer(tmp_path / "redis", die_with_owner=True).start()
    yield server
    server.stop()


def test_request_cost_does_not_grow_with_the_queue_or_the_page(own_redis, tmp_path):
    r = redis.Redis.from_url(own_redis.url.replace("/0", "/1"))
    # A heartbeat of an hour: neither the janitor nor the models' roster reads Redis while requests are counted.
    with make_client(own_redis, tmp_path, heartbeat_s=3600, max_inflight_per_key=10**6, max_queue_depth=10**6) as c:
        store = JobStore(r, c.app.state.settings)
        owner = c.app.state.keys.authenticate(f"Bearer {ALICE}")
        round_trips = count_round_trips(c.app.state.store.r)
        costs = []
        for grow in (150, 1000):  # 150 queued (every page full), then 1150
            newest = queue_jobs(store, owner, grow)[-1]
            # Before counting: the roster's one read, and each script's first run (Redis loads it then).
            c.post("/v1/videos", json=REQUEST, headers=auth(ALICE))
            c.get(f"/v1/videos/{newest}", headers=auth(ALICE))
            c.get("/v1/videos?limit=1", headers=auth(ALICE))
            costs.append(
                {
                    "post": cost(r, lambda: c.post("/v1/videos", json=REQUEST, headers=auth(ALICE))),
                    "get": cost(r, lambda n=newest: c.get(f"/v1/videos/{n}", headers=auth(ALICE))),
                    "page of 10": cost(r, lambda: c.get("/v1/videos?limit=10", headers=auth(ALICE))),
                    "page of 100": cost(r, lambda: c.get("/v1/videos?limit=100", headers=auth(ALICE))),
                }
            )
        # A POST and a GET are one round trip each: their script counts the request against the key's rate
        # (service/contract/ratelimit.py) and reads what the answer's live fields need.
        assert trips(round_trips, lambda: c.post("/v1/videos", json=REQUEST, headers=auth(ALICE))) == 1
        assert trips(round_trips, lambda: c.get(f"/v1/videos/{newest}", headers=auth(ALICE))) == 1
        assert trips(round_trips, lambda: c.get("/v1/videos?limit=100", headers=auth(ALICE))) <= 4
        small, large = costs
        assert small == large, [(k, small[k], large[k]) for k in small if small[k] != large[k]]
        # A page's queue positions: one O(log n) rank per video, in one script; the rest does not grow with it.
        ten, hundred = small["page of 10"], small["page of 100"]
        assert (ten.pop("zrank"), hundred.pop("zrank")) == (10, 100)
        assert ten == hundred, small
        for request, used in small.items():
            assert set(used) <= BOUNDED, (request, used)
            # A POST's 20-odd: the rate limit, the roster, and the create script's writes (record, index and its
            # prune, in-flight set, demand list, RQ's job hash and push, the place in line).
            assert sum(used.values()) <= 25, (request, used)


def test_queue_positions_are_the_order_workers_take_jobs_in(r):
    settings = Settings(heartbeat_s=3600)
    store, life = JobStore(r, settings), Lifecycle(JobStore(r, settings))
    store.announce(SPEC, "w")
    ids = queue_jobs(store, "o", 6)
    life.start(ids[0], "w", ids[0])  # running: no longer in line
    life.cancel(ids[3])  # gone from the line
    life.start(ids[1], "w", ids[1])
    life.requeue(ids[1], token=store.r.hget(keys.attempt(ids[1]), "owner").decode())  # back, at the front

    queued = [rec for rec in (store.get(i) for i in ids) if rec.status == "queued"]
    positions = {v.id: v.queue_position for v in store.view_many(queued)}
    # What RQ's workers will take, in order: the list's current jobs of videos still queued.
    order = [video_id_of(j) for j in store.queue(SPEC.id).get_job_ids()]
    order = [i for i in dict.fromkeys(order) if store.get(i).status == "queued"]
    assert order == [ids[1], ids[2], ids[4], ids[5]]
    assert positions == {video_id: n for n, video_id in enumerate(order)}
    assert r.zcard(keys.queued(SPEC.id)) == 4
    # One video's read in one script gives what the pipelined read of a page gives.
    for video_id in ids:
        assert store.get_view(video_id)[1] == store.view(store.get(video_id))
    assert store.get_view("video_" + "0" * 32) is None


def test_a_queued_job_takes_about_a_kilobyte_of_redis(r):
    """Its record, and RQ's job hash in a listpack: the local stack's, the chart's and compose's Redis allow hash
    values of 128 bytes. RQ's pickled call is over the default 64, which made the hash a 1.5 KB hash table; it
    is some 600 bytes now."""
    store = JobStore(r, Settings())
    (video_id,) = queue_jobs(store, "o", 1)
    rq_hash = f"rq:job:{video_id}"
    assert r.object("encoding", rq_hash) == b"listpack"
    assert r.memory_usage(rq_hash) < 700 and r.memory_usage(keys.video(video_id)) < 600


def test_the_janitor_prunes_entries_a_worker_of_the_previous_release_left(r):
    """A worker without the line starts a job without removing it: the janitor drops such entries, so they do
    not count as jobs ahead for good."""
    settings = Settings(heartbeat_s=3600)
    store = JobStore(r, settings)
    store.announce(SPEC, "w")
    ids = queue_jobs(store, "o", 4)
    rec = store.get(ids[1]).model_copy(update={"status": "in_progress"})
    r.set(keys.video(ids[1]), rec.model_dump_json())  # started as the previous release starts a job
    r.delete(keys.video(ids[2]))  # gone
    assert [v.queue_position for v in store.view_many([store.get(ids[3])])] == [3]
    assert Recovery(store).prune_lines() == 2
    assert [v.queue_position for v in store.view_many([store.get(ids[0]), store.get(ids[3])])] == [0, 1]
