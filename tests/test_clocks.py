"""Liveness and leases on Redis's clock. A process whose own wall clock is a minute off (time.time() shifted in this
process, for the calls made as that process) neither hides live workers, nor is kept offline, nor keeps a dead one
online; the janitors' redelivery grace and the deliverers' claims compare only times read from Redis. Real Redis,
and a real tarpit receiver holding a delivery in flight."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import pytest
from rq import Queue

from bench.webhook_tarpit import Tarpit
from service.contract import keys, webhooks
from service.contract.jobs import JobStore, plan_job
from service.contract.lifecycle import Lifecycle
from service.contract.models import TINY
from service.contract.recovery import Recovery
from service.contract.schemas import VideoCreate
from service.contract.settings import Settings
from service.delivery.deliverer import Deliverer
from tests.conftest import WEBHOOK_SECRET
from tests.waiting import wait_until

SPEC = TINY["k5-tiny-t2v"]


def redis_clock(r) -> float:
    seconds, micros = r.time()
    return seconds + micros / 1e6


@contextlib.contextmanager
def clock_off(monkeypatch: pytest.MonkeyPatch, seconds: float) -> Iterator[None]:
    """This process's wall clock `seconds` ahead (or behind) while the block runs: as another process's would be."""
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + seconds)
    try:
        yield
    finally:
        monkeypatch.setattr(time, "time", real)


@pytest.mark.parametrize("skew", [60.0, -60.0])
def test_a_worker_whose_clock_is_off_is_online_and_hides_nobody(r, monkeypatch, skew):
    store = JobStore(r, Settings(heartbeat_s=1))
    store.announce(SPEC, "on-time")
    with clock_off(monkeypatch, skew):
        store.announce(SPEC, "off-by-a-minute")
    # Its beat is when Redis got it, not what its clock said.
    assert abs(r.zscore(keys.workers(SPEC.id), "off-by-a-minute") - redis_clock(r)) < 5
    assert store.workers_online(SPEC.id) == 2
    with clock_off(monkeypatch, -skew):  # and a gateway whose clock is off the other way sees the same
        assert store.workers_online(SPEC.id) == 2
        states = {spec.id: workers for spec, workers, *_ in store.model_states()}
        assert states[SPEC.id] == 2


def test_a_dead_worker_goes_offline_for_a_gateway_whose_clock_is_behind(r, monkeypatch):
    store = JobStore(r, Settings(heartbeat_s=0.1))  # offline 3 beats + 5 s after its last beat
    store.announce(SPEC, "dies")
    beat = r.zscore(keys.workers(SPEC.id), "dies")
    with clock_off(monkeypatch, -60):
        wait_until(lambda: store.workers_online(SPEC.id) == 0, 30, "the dead worker offline")
    # Not before its window ran out, on the clock that timed its beat.
    assert redis_clock(r) - beat >= 3 * 0.1 + 5


def test_redelivery_waits_its_grace_whichever_janitor_noted_the_job(r, monkeypatch):
    store = JobStore(r, Settings(heartbeat_s=5))  # a 15 s grace (one lease) before a taken job counts as lost
    rec = plan_job(VideoCreate(prompt="a cat"), SPEC, has_image=False)
    Lifecycle(store).create(rec)
    queue = Queue(SPEC.id, connection=r)
    r.lmove(queue.key, queue.intermediate_queue.key)  # a worker took it off the queue and has not started it
    with clock_off(monkeypatch, -60):
        assert Recovery(store).redeliver() == 0  # a janitor whose clock is a minute behind notes it first
    assert Recovery(store).redeliver() == 0  # the next janitor's pass is still within the grace
    assert Recovery(store).redeliver(now=redis_clock(r) + 16) == 1  # and past it, it is redelivered


def test_deliverers_share_redis_clock_for_due_times_and_claims(r, monkeypatch):
    tarpit = Tarpit()  # holds an attempt in flight until its deadline
    settings = Settings(
        webhook_secret=WEBHOOK_SECRET, webhook_allowed_hosts=["127.0.0.1"], webhook_timeout_s=1, webhook_concurrency=2
    )
    first, second = Deliverer(settings, r), Deliverer(settings, r)
    try:
        video = {"id": "video_clock", "object": "video", "status": "completed"}
        with clock_off(monkeypatch, 60), r.pipeline() as pipe:  # the job's end is written by a process a minute ahead
            webhooks.queue_event(pipe, video, [tarpit.url()], time.time(), 3600)
            pipe.execute()
        with clock_off(monkeypatch, -60):  # due at once for a deliverer a minute behind, which claims it
            assert first.tick() == 1
        wait_until(lambda: tarpit.accepted == 1, 30, "the attempt in flight")
        assert second.tick() == 0  # its claim holds for the other deliverer too
    finally:
        for d in (first, second):
            d.pool.shutdown(wait=True)
        tarpit.close()
