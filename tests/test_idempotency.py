"""Idempotency-Key edge cases through the real app and a real Redis: a key whose video does not exist, and a replay
while the key is at its limit of videos in flight."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from service.contract import keys
from service.contract.jobs import JobStore
from service.contract.models import TINY
from service.contract.settings import Settings
from service.gateway.app import create_app

T2V = TINY["k5-tiny-t2v"]
BODY = {"prompt": "a lighthouse", "model": T2V.id, "seed": 5}


@pytest.fixture
def client(r, redis_server, tmp_path):
    # No worker runs here: a video stays queued, in flight, for as long as the test needs.
    settings = Settings(
        redis_url=redis_server.url.replace("/0", "/1"),
        storage_url=f"file://{tmp_path}",
        allow_anonymous=True,
        max_inflight_per_key=1,
    )
    store = JobStore(r, settings)
    store.announce(T2V, "test-worker")
    with TestClient(create_app(settings)) as c:
        c.store = store
        yield c


def post(client, key: str, **body):
    return client.post("/v1/videos", json={**BODY, **body}, headers={"Idempotency-Key": key})


def test_replay_at_the_in_flight_limit_returns_the_original_video(client):
    first = post(client, "order-1")
    assert first.status_code == 200
    # The key's owner has its one video in flight: a new request is refused ...
    assert post(client, "order-2", seed=6).status_code == 429
    # ... but the replay of the first is no new job: it gets the original video.
    again = post(client, "order-1")
    assert again.status_code == 200, again.text
    assert again.json()["id"] == first.json()["id"] and again.headers["idempotent-replayed"] == "true"


def test_a_key_whose_video_was_deleted_makes_a_new_video(client):
    first = post(client, "order-1").json()
    assert client.delete(f"/v1/videos/{first['id']}").status_code == 200
    again = post(client, "order-1")
    assert again.status_code == 200, again.text
    assert again.json()["id"] != first["id"] and "idempotent-replayed" not in again.headers
    # And from now on the key names the new video.
    assert post(client, "order-1").json()["id"] == again.json()["id"]


def test_a_key_stranded_by_a_gateway_killed_before_it_created_the_job(client):
    """What a gateway killed between claiming a key and creating its job leaves: a key naming a video that never
    came. Sent again, the request makes its video at once; it neither waits for nor refuses the ghost."""
    fresh = post(client, "probe", seed=99).json()  # a real request's fingerprint, for the same body below
    held = json.loads(client.store.r.get(keys.idempotency("anonymous", "probe")))
    client.delete(f"/v1/videos/{fresh['id']}")
    assert client.store.r.get(keys.idempotency("anonymous", "probe")) is None  # DELETE unbinds the key
    ghost = "video_" + "0" * 32
    # What the previous release wrote when it claimed a key, before it created the job.
    claim = {"fingerprint": held["fingerprint"], "video_id": ghost}
    client.store.r.set(keys.idempotency("anonymous", "order-1"), json.dumps(claim), ex=24 * 3600)
    resp = post(client, "order-1", seed=99)
    assert resp.status_code == 200, resp.text
    assert resp.json()["id"] != ghost and resp.json()["status"] == "queued"
    assert post(client, "order-1", seed=99).json()["id"] == resp.json()["id"]
