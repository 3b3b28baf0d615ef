"""Cancellation through the real stack: a queued job leaves the queue at once, a running one stops within a
denoising step without decoding or uploading, the worker goes straight on, and repeating is harmless."""

from __future__ import annotations

import time

from rq import Queue

from tests.conftest import stored

SLOW = {"prompt": "a very slow sunrise", "model": "k5-tiny-t2v", "num_inference_steps": 50, "seconds": "2"}


def wait_for(c, video_id: str, pred, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = c.get(f"/v1/videos/{video_id}").json()
        if pred(body):
            return body
        time.sleep(0.05)
    raise AssertionError(f"condition not reached for {video_id}: {body}")


def test_cancel_running_and_queued_jobs(stack):
    queue = Queue("k5-tiny-t2v", connection=stack.store.r)
    with stack.client() as c:
        running = c.post("/v1/videos", json=SLOW).json()
        queued = c.post("/v1/videos", json=SLOW).json()
        wait_for(c, running["id"], lambda v: v["status"] == "in_progress" and v["progress"] > 10)
        assert queued["id"] in queue.job_ids

        # Queued: off the queue at once.
        resp = c.post(f"/v1/videos/{queued['id']}/cancel")
        assert resp.status_code == 200
        assert resp.json()["status"] == "failed" and resp.json()["error"]["code"] == "cancelled"
        assert queued["id"] not in queue.job_ids

        # Running: the record is final at once, and the worker stops at its next step.
        resp = c.post(f"/v1/videos/{running['id']}/cancel")
        assert resp.status_code == 200 and resp.json()["error"]["code"] == "cancelled"
        stopped_at = resp.json()["progress"]
        # Repeating is harmless.
        again = c.post(f"/v1/videos/{running['id']}/cancel")
        assert again.status_code == 200 and again.json() == resp.json()

        # The worker goes on with the next job.
        nxt = c.post("/v1/videos", json={"prompt": "next", "model": "k5-tiny-t2v"}).json()
        assert stack.wait(nxt["id"])["status"] == "completed"

        final = c.get(f"/v1/videos/{running['id']}").json()
        assert final["status"] == "failed" and final["progress"] == stopped_at
        # No decode, no upload: nothing of the cancelled videos reached storage, and there is no content.
        for vid in (running["id"], queued["id"]):
            assert stored(stack.storage, vid) == []
            assert c.get(f"/v1/videos/{vid}/content").json()["error"]["code"] == "video_failed"
        worker_log = next(p for p in stack.procs if p.name == "worker-t2v").log.read_text()
        assert "job cancelled while running" in worker_log


def test_cancel_completed_is_a_conflict_and_delete_of_running_cancels(stack):
    with stack.client() as c:
        done = c.post("/v1/videos", json={"prompt": "quick", "model": "k5-tiny-t2v"}).json()
        assert stack.wait(done["id"])["status"] == "completed"
        resp = c.post(f"/v1/videos/{done['id']}/cancel")
        assert resp.status_code == 409 and resp.json()["error"]["code"] == "video_completed"
        assert c.post("/v1/videos/video_nope/cancel").status_code == 404

        running = c.post("/v1/videos", json=SLOW).json()
        wait_for(c, running["id"], lambda v: v["status"] == "in_progress" and v["progress"] > 10)
        resp = c.delete(f"/v1/videos/{running['id']}")
        assert resp.status_code == 200 and resp.json()["deleted"] is True
        assert c.get(f"/v1/videos/{running['id']}").status_code == 404
        nxt = c.post("/v1/videos", json={"prompt": "after delete", "model": "k5-tiny-t2v"}).json()
        assert stack.wait(nxt["id"])["status"] == "completed"
        # The deleted video's run ended before the next job started (one worker): it left nothing behind.
        assert stored(stack.storage, running["id"]) == []
