"""What videos used: each finished video reports it, GET /v1/usage sums a key's own, and the k5_usage_* metrics
count it under a label set that configuration bounds. The real stack, with keys that only these tests use."""

from __future__ import annotations

import re
import secrets
import time

import httpx
import pytest
from pydantic import ValidationError

from service.contract import keys, usage
from service.contract.jobs import JobStore, plan_job
from service.contract.models import TINY
from service.contract.schemas import VideoCreate, VideoUsage
from service.contract.settings import Settings
from tests.conftest import IDLE_API_KEY, USAGE_API_KEY
from tests.test_metrics import sample
from tests.waiting import wait_until

FIGURES = ("text_encode_seconds", "denoise_seconds", "decode_seconds", "encode_seconds", "upload_seconds")
COUNTS = ("steps", "steps_resumed", "megavoxels", "gpu_seconds")


def samples(text: str, prefix: str) -> list[dict[str, str]]:
    """The labels of every sample whose name starts with `prefix`."""
    found = []
    for line in text.splitlines():
        m = re.match(r"^(\w+)\{(.*)\} \S+$", line)
        if m and m.group(1).startswith(prefix):
            found.append(dict(re.findall(r'(\w+)="([^"]*)"', m.group(2))))
    return found


def test_usage_totals_and_metrics_of_a_key(stack):
    start = int(time.time()) - 60
    body = {"prompt": "a usage fox", "model": "k5-tiny-t2v", "size": "64x64", "seconds": "1"}
    with stack.client(USAGE_API_KEY) as c:
        first = c.post("/v1/videos", json={**body, "seed": 1}).json()
        # Long enough to be cancelled midway: it fails, with what it used until then.
        second = c.post("/v1/videos", json={**body, "num_inference_steps": 30, "seconds": "2"}).json()

        def running() -> bool:
            v = c.get(f"/v1/videos/{second['id']}").json()
            assert v["status"] != "completed", v
            return v["status"] == "in_progress" and (v["usage"] or {}).get("steps", 0) >= 1

        wait_until(running, 60, "the second video's first denoising steps")
        assert c.post(f"/v1/videos/{second['id']}/cancel").status_code == 200
        done = [stack.wait(v["id"], api_key=USAGE_API_KEY) for v in (first, second)]
        totals = c.get("/v1/usage", params={"start": start}).json()
        bad = [
            (c.get("/v1/usage", params={"start": start, "end": start}), "end"),
            (c.get("/v1/usage", params={"start": start, "end": start + 401 * 86400}), "start"),
            (c.get("/v1/usage", params={"start": -1}), "start"),
            # The last day of year 9999: its end is no date at all (a 500 before the bound).
            (c.get("/v1/usage", params={"start": 253402300000, "end": 253402300799}), "start"),
            (c.get("/v1/usage", params={"start": "yesterday"}), "start"),
            (c.get("/v1/usage"), "start"),
        ]
        gateway = c.get("/metrics").text
    completed, cancelled = done
    assert [v["status"] for v in done] == ["completed", "failed"], done
    used = completed["usage"]
    assert all(used[f] > 0 for f in FIGURES), used
    assert used["steps"] == completed["num_inference_steps"] and used["steps_resumed"] == 0
    assert used["megavoxels"] == pytest.approx(64 * 64 * 25 / 1e6)
    assert used["gpu_seconds"] == pytest.approx(sum(used[f] for f in FIGURES[:3]))
    partial = cancelled["usage"]
    assert cancelled["error"]["code"] == "cancelled" and 1 <= partial["steps"] < 30, cancelled
    assert partial["denoise_seconds"] > 0 and partial["upload_seconds"] == 0
    # The key's totals are exactly its videos' usage: two finished today, one of them failed.
    assert (totals["videos_completed"], totals["videos_failed"]) == (1, 1), totals
    for f in FIGURES + COUNTS:
        assert totals[f] == pytest.approx(sum(v["usage"][f] for v in done)), f
    assert totals["start"] <= start < time.time() <= totals["end"]
    for resp, param in bad:
        assert resp.status_code == 400 and resp.json()["error"]["param"] == param, resp.text

    # Another key sees its own totals: nothing, although carol's videos finished in the same days.
    with stack.client(IDLE_API_KEY) as c:
        idle = c.get("/v1/usage", params={"start": start}).json()
    assert idle["owner"] != totals["owner"] and idle["videos_completed"] == idle["videos_failed"] == 0
    assert all(idle[f] == 0 for f in FIGURES + COUNTS)

    # Metrics: the worker counted the completion, the gateway the cancel, under the configured label.
    worker = next(p for p in stack.procs if p.name == "worker-t2v")
    text = httpx.get(f"http://127.0.0.1:{worker.metrics_port}/metrics").text
    assert sample(text, "k5_usage_steps_total", model="k5-tiny-t2v", key="carol") == used["steps"]
    assert sample(text, "k5_usage_videos_total", model="k5-tiny-t2v", key="carol", status="completed") == 1
    assert sample(gateway, "k5_usage_steps_total", model="k5-tiny-t2v", key="carol") == partial["steps"]
    assert sample(gateway, "k5_usage_videos_total", model="k5-tiny-t2v", key="carol", status="failed") == 1
    # Every other key (alice's, bob's, dave's) is "other": the label set is what configuration names.
    labels = samples(text, "k5_usage_") + samples(gateway, "k5_usage_")
    assert labels and {s["key"] for s in labels} <= {"carol", "other"}


def test_unconfigured_keys_share_one_label():
    settings = Settings(usage_labels="key_00112233aabbccdd=acme, key_0123456789abcdef=beta")
    assert usage.tenant(settings, "key_00112233aabbccdd") == "acme"
    owners = {f"key_{secrets.token_hex(8)}" for _ in range(1000)} | {"anonymous"}
    assert {usage.tenant(settings, o) for o in owners} == {"other"}
    with pytest.raises(ValidationError):
        Settings(usage_labels="key_1=has spaces")


def test_totals_count_each_video_on_its_day(r):
    store = JobStore(r, Settings())
    rec = plan_job(VideoCreate(prompt="x"), TINY["k5-tiny-t2v"], has_image=False)
    day = 86400 * 20_000  # a UTC midnight (2024-10-03)
    ran = rec.model_copy(update={"status": "completed", "usage": VideoUsage(denoise_seconds=2.5, steps=4)})
    failed = rec.model_copy(update={"status": "failed"})  # never ran: counted, with no usage
    for when, record in ((day + 10, ran), (day + 86400 + 10, ran), (day + 86400 + 20, failed)):
        with r.pipeline() as pipe:
            usage.count(pipe, record, store.settings, now=when)
            pipe.execute()
    first = usage.totals(r, rec.owner, day, day + 86400)
    assert (first.videos_completed, first.steps, first.denoise_seconds) == (1, 4, 2.5)
    assert (first.start, first.end) == (day, day + 86400)
    both = usage.totals(r, rec.owner, day + 5, day + 86400 + 1)
    assert (both.videos_completed, both.videos_failed, both.steps) == (2, 1, 8)
    assert (both.start, both.end) == (day, day + 2 * 86400)
    assert 0 < r.ttl(keys.usage(rec.owner, usage.day_of(day))) <= 400 * 86400


def test_a_rerun_adds_to_what_the_lost_run_used():
    from worker.meter import Meter

    rec = plan_job(VideoCreate(prompt="x", size="64x64"), TINY["k5-tiny-t2v"], has_image=False)
    lost = VideoUsage(denoise_seconds=1.5, steps=3, megavoxels=rec.megavoxels)  # its worker died at step 3
    meter = Meter(rec.model_copy(update={"usage": lost}))
    meter.enter("denoise")
    meter.steps = 4
    meter.enter(None)
    used = meter.usage()
    assert used.steps == 7 and used.denoise_seconds == pytest.approx(1.5 + meter.seconds["denoise"], abs=1e-6)
    assert used.megavoxels == rec.megavoxels == 64 * 64 * 25 / 1e6  # the video's size, not a sum
