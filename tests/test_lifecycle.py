"""Job lifecycle for apps: signed webhooks delivered by their own process, idempotent POSTs, live progress
over SSE with queue positions and ETAs. Real stack, real HTTP receiver on loopback."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import openai
import pytest
from rq import Queue
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from service.console.localstack import stop_process
from service.contract import keys
from service.contract.webhooks import DUE, deliveries_of
from tests.conftest import WEBHOOK_SECRET, start_service
from tests.waiting import wait_until

TINY = {"model": "k5-tiny-t2v", "size": "64x64"}


class Receiver:
    """A webhook endpoint on loopback that answers from a script of status codes (then 200)."""

    def __init__(self) -> None:
        self.calls: list[tuple[dict[str, str], bytes, int]] = []
        self.script: list[int] = []
        self.failing: set[str] = set()  # paths that always answer 500
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if self.path in receiver.failing:
                    status = 500
                else:
                    status = receiver.script.pop(0) if receiver.script else 200
                receiver.calls.append(({k.lower(): v for k, v in self.headers.items()}, body, status))
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def url(self, path: str = "/hook") -> str:
        return f"http://127.0.0.1:{self.server.server_port}{path}"

    def wait_calls(self, n: int, timeout: float = 30) -> list:
        deadline = time.monotonic() + timeout
        while len(self.calls) < n:
            assert time.monotonic() < deadline, f"{len(self.calls)} of {n} webhook calls"
            time.sleep(0.05)
        return self.calls


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.server.shutdown()


def settled_delivery(stack, video_id: str, state: str):
    """The video's one delivery once it reached `state` and is no longer scheduled: no attempt can follow."""

    def settled():
        (d,) = deliveries_of(stack.store.r, video_id) or (None,)
        return d if d is not None and d.state == state and stack.store.r.zscore(DUE, d.id) is None else None

    return wait_until(settled, 30, f"delivery of {video_id} {state}")


def create(stack, **body) -> dict:
    with stack.client() as c:
        resp = c.post("/v1/videos", json={"prompt": "a heron", **TINY, **body})
    assert resp.status_code == 200, resp.text
    return resp.json()


def test_completed_webhook_is_signed_and_verifiable(stack, receiver):
    video = create(stack, webhook_url=receiver.url())
    assert stack.wait(video["id"])["status"] == "completed"
    headers, body, _ = receiver.wait_calls(1)[0]
    # Standard Webhooks: the reference library verifies it...
    event = Webhook(WEBHOOK_SECRET).verify(body, headers)
    assert event["type"] == "video.completed" and event["object"] == "event"
    assert event["data"] == {"id": video["id"]} and event["video"]["status"] == "completed"
    assert headers["webhook-id"] == event["id"]
    # ...and so does the official openai SDK.
    unwrapped = openai.OpenAI(api_key="x").webhooks.unwrap(body, headers, secret=WEBHOOK_SECRET)
    assert unwrapped.type == "video.completed" and unwrapped.data.id == video["id"]
    # A tampered body does not verify.
    with pytest.raises(WebhookVerificationError):
        Webhook(WEBHOOK_SECRET).verify(body.replace(b"completed", b"failed"), headers)


def test_failing_receiver_gets_exactly_one_accepted_delivery(stack, receiver):
    receiver.script = [500, 503, 502]
    video = create(stack, webhook_url=receiver.url())
    calls = receiver.wait_calls(4)
    settled_delivery(stack, video["id"], "delivered")  # no further attempt can come now
    assert [status for _, _, status in receiver.calls] == [500, 503, 502, 200]
    assert len({h["webhook-id"] for h, _, _ in calls}) == 1  # one event, retried
    out = stack_cli(stack, "deliveries", video["id"])
    record = json.loads(out)
    assert record["state"] == "delivered" and record["attempts"] == 4 and record["last_status"] == 200


def test_410_stops_delivery(stack, receiver):
    receiver.script = [410]
    video = create(stack, webhook_url=receiver.url())
    receiver.wait_calls(1)
    settled_delivery(stack, video["id"], "gone")  # never retried
    assert len(receiver.calls) == 1
    assert json.loads(stack_cli(stack, "deliveries", video["id"]))["state"] == "gone"


def test_cancelled_job_sends_video_failed(stack, receiver):
    video = create(stack, webhook_url=receiver.url(), num_inference_steps=50, seconds="2")
    with stack.client() as c:
        assert c.post(f"/v1/videos/{video['id']}/cancel").status_code == 200
    headers, body, _ = receiver.wait_calls(1)[0]
    event = Webhook(WEBHOOK_SECRET).verify(body, headers)
    assert event["type"] == "video.failed" and event["video"]["error"]["code"] == "cancelled"


def test_delete_leaves_no_delivery_attempt_hash_or_idempotency_key(stack, receiver):
    """DELETE forgets the video in Redis too: the deliveries of its webhook (whose bodies hold the prompt and
    metadata) are gone and never attempted again, and so are its attempt hash and its Idempotency-Key."""
    receiver.failing = {"/deleted"}
    r = stack.store.r
    body = {"prompt": "a heron", **TINY, "webhook_url": receiver.url("/deleted"), "metadata": {"order": "7"}}
    with stack.client() as c:
        video = c.post("/v1/videos", json=body, headers={"Idempotency-Key": "to-delete"}).json()
    assert stack.wait(video["id"])["status"] == "completed"

    def calls_for_it() -> int:
        return sum(1 for _, raw, _ in receiver.calls if json.loads(raw)["data"]["id"] == video["id"])

    wait_until(lambda: calls_for_it() >= 2, 30, "retries to the failing receiver")
    (delivery,) = deliveries_of(r, video["id"])
    left = [keys.attempt(video["id"]), keys.idempotency(stack.owner, "to-delete"), keys.webhook(delivery.id)]
    assert r.exists(*left) == 3
    with stack.client() as c:
        assert c.delete(f"/v1/videos/{video['id']}").status_code == 200
    seen = calls_for_it()
    assert r.exists(*left, keys.video_webhooks(video["id"])) == 0 and r.zscore(DUE, delivery.id) is None
    # Its retries came at most 1 s apart (K5_WEBHOOK_RETRY_MAX_S): a later event that needs five attempts (over
    # 1.2 s of backoff) is delivered only after the next retry of the deleted one would have come.
    receiver.script = [500] * 4
    later = create(stack, webhook_url=receiver.url("/later"))
    settled_delivery(stack, later["id"], "delivered")
    assert calls_for_it() <= seen + 1  # the attempt that may have been on its way at the DELETE, no more
    assert r.exists(keys.webhook(delivery.id)) == 0 and r.zscore(DUE, delivery.id) is None


@pytest.mark.parametrize(
    "url",
    [
        "http://10.1.2.3/hook",
        "http://169.254.169.254/latest/meta-data",
        "http://192.168.0.1/",
        "http://[::1]:80/",
        "ftp://example.com/hook",
        "http://user:pw@127.0.0.1/hook",
        "http://no-such-host.invalid/hook",
    ],
)
def test_unsafe_webhook_urls_are_refused(stack, url):
    with stack.client() as c:
        resp = c.post("/v1/videos", json={"prompt": "x", **TINY, "webhook_url": url})
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["param"] == "webhook_url" and resp.json()["error"]["code"] == "unsafe_webhook_url"


def test_delivery_survives_a_restart_of_the_webhook_process(stack, receiver):
    proc = next(p for p in stack.procs if p.name == "webhooks")
    stop_process(proc.popen)
    try:
        video = create(stack, webhook_url=receiver.url())
        assert stack.wait(video["id"])["status"] == "completed"
        # Nobody delivers while the process is down: the event waits, due, never attempted...
        (pending,) = deliveries_of(stack.store.r, video["id"])
        assert pending.state == "pending" and pending.attempts == 0 and stack.store.r.zscore(DUE, pending.id)
        assert receiver.calls == []
    finally:
        stack.procs.remove(proc)
        stack.procs.append(start_service("webhooks", stack.env, proc.log.parent, "webhooks"))
    headers, body, _ = receiver.wait_calls(1)[0]  # ...and nothing was lost
    assert Webhook(WEBHOOK_SECRET).verify(body, headers)["data"]["id"] == video["id"]


def test_idempotency_key_sequential_and_concurrent(stack):
    body = {"prompt": "one job only", **TINY, "seed": 3}
    with stack.client() as c:
        first = c.post("/v1/videos", json=body, headers={"Idempotency-Key": "order-1"})
        again = c.post("/v1/videos", json=body, headers={"Idempotency-Key": "order-1"})
        assert first.status_code == again.status_code == 200
        assert again.json()["id"] == first.json()["id"] and again.headers["idempotent-replayed"] == "true"
        other = c.post("/v1/videos", json={**body, "seed": 4}, headers={"Idempotency-Key": "order-1"})
        assert other.status_code == 409 and other.json()["error"]["code"] == "idempotency_key_reused"

    def post(_: int) -> httpx.Response:
        with stack.client() as c:
            return c.post("/v1/videos", json=body, headers={"Idempotency-Key": "order-2"})

    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(post, range(8)))
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
    ids = {r.json()["id"] for r in responses}
    assert len(ids) == 1
    # Exactly one job reached the queue or a worker.
    (video_id,) = ids
    assert stack.wait(video_id)["status"] == "completed"
    index = stack.store.r.zrange(f"k5:videos:{stack.owner}", 0, -1)
    assert sum(1 for i in index if stack.store.get(i.decode()).seed == 3 and i.decode() != first.json()["id"]) == 1


def read_events(stack, video_id: str) -> list[dict]:
    events = []
    with stack.client() as c, c.stream("GET", f"/v1/videos/{video_id}/events") as resp:
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
        kind = None
        for line in resp.iter_lines():
            if line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("data: ") and kind == "video":
                events.append(json.loads(line[6:]))
    return events


def test_sse_streams_queue_position_then_progress_to_the_end(stack):
    queue = Queue("k5-tiny-t2v", connection=stack.store.r)
    first = create(stack, num_inference_steps=50, seconds="2")
    second = create(stack, num_inference_steps=50, seconds="2")
    # Open the stream at once: the single t2v worker runs `first`, so `second` waits at the head of the queue.
    with ThreadPoolExecutor(1) as pool:
        streamed = pool.submit(read_events, stack, second["id"])
        with stack.client() as c:
            v = c.get(f"/v1/videos/{second['id']}").json()
            running = c.get(f"/v1/videos/{first['id']}").json()
        events = streamed.result(timeout=120)
    if running["status"] == "in_progress" and v["status"] == "queued":
        assert v["queue_position"] == 0 and second["id"] not in queue.job_ids  # it has left the queue by now
    assert events[0]["status"] == "queued" and events[0]["queue_position"] == 0, events[0]
    assert events[-1]["status"] == "completed" and events[-1]["progress"] == 100
    progress = [e["progress"] for e in events]
    assert progress == sorted(progress) and len(set(progress)) >= 4
    in_progress = [e for e in events if e["status"] == "in_progress"]
    # The first job's measured speed gives every running event an estimate.
    assert in_progress and all(e["estimated_completion_at"] for e in in_progress)
    assert [e["status"] for e in read_events(stack, second["id"])] == ["completed"]  # terminal: one event
    with stack.client() as c:
        assert c.get("/v1/videos/video_nope/events").status_code == 404


def stack_cli(stack, *args: str) -> str:
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "service.cli", *args], env=stack.env, capture_output=True, text=True, check=True
    )
    return out.stdout.strip()
