"""A census after a mixed workload on the real stack (completed, cancelled queued and running, failed, deleted while
running, expired): every Redis key and every stored object has a TTL or an owner that deletes it. A key without a
TTL must be of a known bounded family, and each family names its owner below."""

from __future__ import annotations

from collections.abc import Callable

from rq.job import Job

from service.contract import keys
from service.contract.recovery import Recovery
from service.contract.schemas import TERMINAL
from tests.conftest import Stack
from tests.test_storage_faults import png_data_url
from tests.waiting import wait_until

SLOW = {"prompt": "a slow tide", "num_inference_steps": 50, "seconds": "2"}
T2V, I2V = {"model": "k5-tiny-t2v"}, {"model": "k5-tiny-i2v", "size": "64x64"}


def census_rules(stack: Stack) -> list[tuple[str, str, Callable[[str], bool]]]:
    """(key prefix, the owner that deletes the key or its entries, whether this key is one it owns)."""
    r = stack.store.r

    def live(video_id: str) -> bool:  # a queued or running job: the lifecycle owns it until its end
        rec = stack.store.get(video_id)
        return rec is not None and rec.status not in TERMINAL

    def members_live(key: str) -> bool:
        kind = keys.text(r.type(key))
        items = r.smembers(key) if kind == "set" else r.zrange(key, 0, -1) if kind == "zset" else r.lrange(key, 0, -1)
        return all(live(keys.text(i).split("-r", 1)[0]) for i in items)

    def anything(_: str) -> bool:
        return True

    def tail(key: str) -> str:
        return key.rsplit(":", 1)[1]

    return [
        ("k5:video:", "the lifecycle: a queued or running job's record; its end sets a TTL", lambda k: live(tail(k))),
        ("k5:attempt:", "the lifecycle: the running job's attempts, TTL at its end", lambda k: live(tail(k))),
        ("k5:inflight:", "the lifecycle: a job's end takes it out", members_live),
        ("k5:running", "the lifecycle and the janitor's reaper", members_live),
        ("k5:expiry", "the janitor's sweep, each entry at its time", anything),
        ("k5:webhooks:due", "the deliverer: each entry until delivered, given up or its record is gone", anything),
        ("k5:workers:", "each heartbeat prunes the beats past the window", anything),
        ("k5:layouts:", "each heartbeat prunes the pools' layouts past the window", anything),
        ("k5:queued:", "the lifecycle: a video leaves its line when it leaves queued", members_live),
        ("k5:seq:queued", "one counter", anything),
        ("k5:demand:", "the lifecycle: a job's end takes it out", members_live),
        ("k5:deadlines", "the lifecycle: a deadline leaves with its job's queued state", members_live),
        ("k5:models", "one entry per model", anything),
        ("k5:spec:", "one per model", anything),
        ("k5:since:", "one per model", anything),
        ("k5:timing:", "one per model", anything),
        ("rq:queue:", "the model's workers take its jobs (queued videos only)", members_live),
        ("rq:job:", "RQ deletes it when the run returns (result_ttl 0)", lambda k: live(tail(k).split("-r", 1)[0])),
        ("rq:queues", "one entry per queue", anything),
        ("rq:workers", "RQ: its live workers, per queue too", anything),
        ("rq:wip:", "RQ's registry cleanup (entries scored by expiry)", anything),
        ("rq:failed:", "RQ's registry cleanup (entries scored by expiry, RQ_FAILURE_TTL_S)", anything),
        ("rq:finished:", "RQ's registry cleanup (entries scored by expiry)", anything),
        ("rq:canceled:", "RQ's registry cleanup (entries scored by expiry)", anything),
        ("rq:executions:", "RQ's registry cleanup", anything),
    ]


def unowned_keys(stack: Stack) -> list[str]:
    r, rules = stack.store.r, census_rules(stack)
    found = []
    for raw in r.scan_iter(count=1000):
        key = keys.text(raw)
        if r.ttl(key) != -1:  # expires on its own (-2: gone meanwhile)
            continue
        if not any(key.startswith(prefix) and owns(key) for prefix, _, owns in rules):
            found.append(key)
    return found


def unowned_objects(stack: Stack) -> list[str]:
    """Stored objects of a video that is neither live (its run or the lifecycle deletes them) nor due for the sweep."""
    storage, r = stack.storage, stack.store.r
    pages = storage.client.get_paginator("list_objects_v2").paginate(Bucket=storage.bucket, Prefix="videos/")
    found = []
    for page in pages:
        for obj in page.get("Contents", []):
            video_id = obj["Key"].split("/")[1]
            rec = stack.store.get(video_id)
            if (rec is None or rec.status in TERMINAL) and r.zscore(keys.EXPIRY, video_id) is None:
                found.append(obj["Key"])
    return found


def test_every_key_and_object_has_a_ttl_or_an_owner(stack):
    image = {"input_reference": {"image_url": png_data_url()}}
    with stack.client() as c:

        def post(**body) -> str:
            resp = c.post("/v1/videos", json={"prompt": "a census", **body})
            assert resp.status_code == 200, resp.text
            return resp.json()["id"]

        def status(video_id: str) -> dict:
            return c.get(f"/v1/videos/{video_id}").json()

        def started(video_id: str) -> bool:
            v = status(video_id)
            return v["status"] == "in_progress" and v["progress"] > 10

        done = post(**T2V)
        t2v_running, t2v_queued = post(**T2V, **SLOW), post(**T2V, **SLOW)
        # Deleted while it runs, with a webhook that is never answered and an Idempotency-Key.
        body = {"prompt": "deleted", **I2V, **SLOW, **image, "webhook_url": "http://127.0.0.1:9/hook"}
        deleted = c.post("/v1/videos", json=body, headers={"Idempotency-Key": "census"}).json()["id"]
        wait_until(lambda: started(deleted), 120, "the i2v job running", *(p.log for p in stack.procs))
        # Two image-to-video jobs queued behind it: one cancelled, one whose stored input turns out unreadable.
        cancelled_i2v, failing_i2v = post(**I2V, **image), post(**I2V, **image)
        stack.storage.put_bytes(f"{failing_i2v}/input.png", b"not a png", "image/png")
        assert c.post(f"/v1/videos/{cancelled_i2v}/cancel").json()["error"]["code"] == "cancelled"
        assert c.delete(f"/v1/videos/{deleted}").status_code == 200
        wait_until(lambda: started(t2v_running), 120, "the slow t2v job running", *(p.log for p in stack.procs))
        for video_id in (t2v_queued, t2v_running):
            assert c.post(f"/v1/videos/{video_id}/cancel").status_code == 200
        assert stack.wait(done)["status"] == "completed"
        assert stack.wait(failing_i2v)["error"]["code"] == "generation_error"
        assert c.get(f"/v1/videos/{deleted}").status_code == 404

    ours = [done, t2v_running, t2v_queued, cancelled_i2v, failing_i2v, deleted]
    r = stack.store.r
    # The runs of the deleted and the cancelled running job stop at their next step; RQ drops their jobs then.
    runs = [Job.key_for(deleted), Job.key_for(t2v_running)]
    wait_until(lambda: not r.exists(*runs), 60, "the stopped runs' RQ jobs gone", *(p.log for p in stack.procs))
    assert (unowned_keys(stack), unowned_objects(stack)) == ([], [])
    assert not r.exists(keys.attempt(deleted), keys.video_webhooks(deleted), keys.idempotency(stack.owner, "census"))
    # And the owners do delete: the janitor's sweep, once the completed video's files are past expires_at, leaves
    # nothing of the workload in storage (a failed video's files are due at once).
    expires_at = stack.store.get(done).expires_at
    Recovery(stack.store).sweep_expired(stack.storage, now=expires_at + 1, batch=10_000)
    left = [o for o in stored_keys(stack) if o.split("/")[1] in ours]
    assert left == []
    assert all(r.ttl(keys.video(v)) > 0 for v in ours if v != deleted)
    assert r.ttl(keys.videos(stack.owner)) > 0


def stored_keys(stack: Stack) -> list[str]:
    storage = stack.storage
    pages = storage.client.get_paginator("list_objects_v2").paginate(Bucket=storage.bucket, Prefix="videos/")
    return [o["Key"] for page in pages for o in page.get("Contents", [])]
