"""Event streams are pushed, capped and bounded: a real gateway process on a redis-server of its own (so the
commands counted are the stream's), records written through JobStore as a worker writes them."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator

import httpx
import pytest
import redis

from service.console.localstack import RedisServer
from service.contract.jobs import JobStore, current_rq_id, plan_job
from service.contract.lifecycle import Lifecycle
from service.contract.models import resolve_model
from service.contract.schemas import VideoCreate
from service.contract.settings import Settings
from tests.conftest import gateway_process


@pytest.fixture
def own_redis(tmp_path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis", die_with_owner=True).start()
    yield server
    server.stop()


@contextlib.contextmanager
def gateway(own_redis, tmp_path, **env: str) -> Iterator[tuple[str, JobStore]]:
    store = JobStore(redis.Redis.from_url(own_redis.url), Settings(redis_url=own_redis.url))
    with gateway_process(own_redis.url, tmp_path, **env) as base:
        yield base, store


def queued_video(store: JobStore, tiny_models) -> str:
    rec = plan_job(VideoCreate(prompt="a kite"), resolve_model(str(tiny_models["t2v"])), has_image=False)
    rec.owner = "anonymous"
    Lifecycle(store).create(rec)
    return rec.id


def start(store: JobStore, video_id: str, progress: int) -> None:
    """A worker takes the job: one transition, so one change is pushed."""
    run = Lifecycle(store).start(video_id, "sse-test", current_rq_id(store.r, video_id), progress=progress)
    assert run is not None


def frames(resp: httpx.Response, within_s: float = 60) -> Iterator[dict[str, str]]:
    """SSE frames as {field: value}; a comment line is the frame {"comment": text}. A stream that goes on past
    within_s fails the test rather than hanging it (a ping every 15 s would keep reads alive)."""
    deadline = time.monotonic() + within_s
    frame: dict[str, str] = {}
    for line in resp.iter_lines():
        assert time.monotonic() < deadline, "the stream did not end in time"
        if line.startswith(":"):
            yield {"comment": line[1:].strip()}
        elif line:
            name, _, value = line.partition(": ")
            frame[name] = value
        elif frame:
            yield frame
            frame = {}


def gets(r: redis.Redis) -> int:
    return int(r.info("commandstats").get("cmdstat_get", {}).get("calls", 0))


def test_an_idle_stream_does_not_poll_and_a_change_is_pushed(own_redis, tmp_path, tiny_models):
    with gateway(own_redis, tmp_path, K5_SSE_PING_S="0.5") as (base, store):
        video_id = queued_video(store, tiny_models)
        with httpx.Client(base_url=base, timeout=30) as c, c.stream("GET", f"/v1/videos/{video_id}/events") as resp:
            stream = frames(resp)
            first = next(stream)
            assert json.loads(first["data"])["status"] == "queued" and first["id"]
            before = gets(store.r)
            pings = 0
            for frame in stream:  # four idle pings, two seconds: polling at 4/s would read the record 8 times
                pings += frame.get("comment") == "ping"
                if pings == 4:
                    break
            assert gets(store.r) - before <= 2  # at most the slow re-read
            start(store, video_id, progress=42)
            pushed = next(f for f in stream if "data" in f)
            assert json.loads(pushed["data"])["progress"] == 42 and pushed["id"] != first["id"]


def test_streams_per_key_are_capped(own_redis, tmp_path, tiny_models):
    with gateway(own_redis, tmp_path, K5_SSE_MAX_STREAMS_PER_KEY="2") as (base, store):
        video_id = queued_video(store, tiny_models)
        with httpx.Client(base_url=base, timeout=30) as c, contextlib.ExitStack() as held:
            readers = []  # kept: a reader dropped would close its stream
            for _ in range(2):
                resp = held.enter_context(c.stream("GET", f"/v1/videos/{video_id}/events"))
                readers.append(frames(resp))
                next(readers[-1])  # open and streaming
            with c.stream("GET", f"/v1/videos/{video_id}/events") as refused:
                assert refused.status_code == 429
                assert json.loads(refused.read())["error"]["code"] == "too_many_streams"
                assert refused.headers["retry-after"]
        # Closed, they free their slots (as soon as the gateway sees the disconnects).
        deadline = time.monotonic() + 30
        with httpx.Client(base_url=base, timeout=30) as c:
            while True:
                with c.stream("GET", f"/v1/videos/{video_id}/events") as resp:
                    if resp.status_code == 200:
                        break
                assert time.monotonic() < deadline, "the closed streams kept their slots"
                time.sleep(0.1)


def test_a_stream_ends_after_its_lifetime_and_resumes_from_last_event_id(own_redis, tmp_path, tiny_models):
    with gateway(own_redis, tmp_path, K5_SSE_MAX_LIFETIME_S="1") as (base, store):
        video_id = queued_video(store, tiny_models)
        with httpx.Client(base_url=base, timeout=30) as c:
            with c.stream("GET", f"/v1/videos/{video_id}/events") as resp:
                got = list(frames(resp))  # ends by itself, the video still queued
            events = [f for f in got if "data" in f]
            assert len(events) == 1 and got[-1].get("retry") == "1000", got
            last = events[0]["id"]
            # Resumed from that id: nothing is sent again for a state the client has.
            headers = {"Last-Event-ID": last}
            with c.stream("GET", f"/v1/videos/{video_id}/events", headers=headers) as resp:
                again = list(frames(resp))
            assert [f for f in again if "data" in f] == [] and again[-1].get("retry") == "1000", again
            start(store, video_id, progress=10)
            with c.stream("GET", f"/v1/videos/{video_id}/events", headers=headers) as resp:
                changed = [f for f in frames(resp) if "data" in f]
            assert [json.loads(f["data"])["progress"] for f in changed] == [10]
