"""Hostile and careless clients: missing or wrong keys, other keys' videos, limits, path-like ids, and
validation under random input (hypothesis). The gateway runs in-process against a real Redis."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import re
from concurrent.futures import ThreadPoolExecutor

import pytest
import redis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from service.console.localstack import RedisServer, free_port
from service.contract.jobs import JobStore
from service.contract.models import TINY
from service.contract.settings import Settings
from service.gateway.app import create_app
from service.gateway.auth import KeyRing

ALICE, BOB = "sk-alice-secret-1", "sk-bob-secret-2"


def make_client(redis_server, tmp_path, **overrides) -> TestClient:
    keys_file = tmp_path / "keys"
    keys_file.write_text(f"# one key per line\n{BOB}\n")
    settings = Settings(
        redis_url=redis_server.url.replace("/0", "/1"),
        storage_url=f"file://{tmp_path}/store",
        api_keys=ALICE,
        api_keys_file=keys_file,
        **overrides,
    )
    app = create_app(settings)
    store = JobStore(app.state.store.r, settings)
    store.announce(TINY["k5-tiny-t2v"], "w-t2v")
    return TestClient(app)


@pytest.fixture
def client(r, redis_server, tmp_path):
    with make_client(redis_server, tmp_path) as c:
        yield c


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_gateway_refuses_to_start_without_keys_unless_anonymous(tmp_path):
    with pytest.raises(SystemExit, match="No API keys"):
        create_app(Settings(storage_url=f"file://{tmp_path}"))
    create_app(Settings(storage_url=f"file://{tmp_path}", allow_anonymous=True))


def test_keys_are_kept_hashed(tmp_path):
    ring = KeyRing(Settings(storage_url=f"file://{tmp_path}", api_keys=f"{ALICE},{BOB}"))
    assert ALICE not in repr(vars(ring)) and hashlib.sha256(ALICE.encode()).hexdigest() in ring.owners


@pytest.mark.parametrize("headers", [{}, auth("sk-wrong"), {"Authorization": ALICE}, {"Authorization": "Basic xyz"}])
@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v1/videos"),
        ("POST", "/v1/videos"),
        ("GET", "/v1/models"),
        ("GET", "/v1/videos/video_x"),
        ("DELETE", "/v1/videos/video_x"),
    ],
)
def test_requests_without_a_valid_key_get_401(client, headers, method, path):
    resp = client.request(method, path, headers=headers, json={"prompt": "x"} if method == "POST" else None)
    assert resp.status_code == 401
    assert resp.json()["error"]["type"] == "authentication_error" and resp.headers["www-authenticate"] == "Bearer"


def test_probes_and_playground_need_no_key(client):
    assert client.get("/healthz").status_code == 200
    assert client.get("/metrics").status_code == 200
    assert client.get("/playground/").status_code == 200


def test_a_key_sees_only_its_own_videos(client):
    video = client.post("/v1/videos", json={"prompt": "alice's"}, headers=auth(ALICE)).json()
    vid = video["id"]
    assert client.get(f"/v1/videos/{vid}", headers=auth(ALICE)).status_code == 200
    # Every route answers 404 to another key, exactly as for an id that does not exist.
    for method, path in [
        ("GET", f"/v1/videos/{vid}"),
        ("GET", f"/v1/videos/{vid}/content"),
        ("GET", f"/v1/videos/{vid}/events"),
        ("POST", f"/v1/videos/{vid}/cancel"),
        ("DELETE", f"/v1/videos/{vid}"),
    ]:
        resp = client.request(method, path, headers=auth(BOB))
        assert resp.status_code == 404 and resp.json()["error"]["code"] == "video_not_found", (method, path)
    assert client.get("/v1/videos", headers=auth(BOB)).json()["data"] == []
    assert [v["id"] for v in client.get("/v1/videos", headers=auth(ALICE)).json()["data"]] == [vid]
    # Bob's attempts changed nothing.
    assert client.get(f"/v1/videos/{vid}", headers=auth(ALICE)).json()["status"] == "queued"


@pytest.mark.parametrize(
    "path",
    ["/v1/videos/..%2F..%2Fetc%2Fpasswd", "/v1/videos/video_..%2Fx/content", "/v1/videos/%00", "/v1/videos/k5:video:x"],
)
def test_path_like_ids_are_404(client, path):
    resp = client.get(path, headers=auth(ALICE))
    assert resp.status_code == 404


def test_rate_limit_is_429_with_retry_after(r, redis_server, tmp_path):
    with make_client(redis_server, tmp_path, rate_limit_per_min=5) as c:
        codes = [c.get("/v1/videos", headers=auth(ALICE)).status_code for _ in range(6)]
        assert codes == [200] * 5 + [429]
        resp = c.get("/v1/videos", headers=auth(ALICE))
        assert resp.json()["error"]["code"] == "rate_limited" and resp.json()["error"]["type"] == "rate_limit_error"
        assert 1 <= int(resp.headers["retry-after"]) <= 60 and int(resp.headers["retry-after-ms"]) >= 1000
        # Another key has its own budget.
        assert c.get("/v1/videos", headers=auth(BOB)).status_code == 200


def rate_counts(r) -> int:
    """The requests counted in every key's rate windows (both, should the minute turn during a test)."""
    return sum(int(r.get(k) or 0) for k in r.scan_iter("k5:rate:*"))


def test_every_request_is_counted_once_on_every_path_of_the_hot_routes(r, redis_server, tmp_path):
    """POST /v1/videos and GET /v1/videos/{id} count a request inside the script that does their work (no round
    trip of its own): each path, refused or not, must count it exactly once, and the 429 still wins."""
    r1 = redis.Redis.from_url(redis_server.url.replace("/0", "/1"))
    webp = io.BytesIO()
    Image.new("RGB", (96, 64), (20, 120, 200)).save(webp, format="WEBP")
    image = "data:image/webp;base64," + base64.b64encode(webp.getvalue()).decode()
    with make_client(redis_server, tmp_path, rate_limit_per_min=1000) as c:
        JobStore(c.app.state.store.r, c.app.state.settings).announce(TINY["k5-tiny-i2v"], "w-i2v")
        owner = c.app.state.keys.authenticate(f"Bearer {ALICE}")
        vid = c.post("/v1/videos", json={"prompt": "a"}, headers=auth(ALICE)).json()["id"]
        requests = {
            "plain POST": lambda: c.post("/v1/videos", json={"prompt": "b"}, headers=auth(ALICE)),
            "POST with a key": lambda: c.post(
                "/v1/videos", json={"prompt": "c"}, headers={**auth(ALICE), "Idempotency-Key": "k1"}
            ),
            "its replay": lambda: c.post(
                "/v1/videos", json={"prompt": "c"}, headers={**auth(ALICE), "Idempotency-Key": "k1"}
            ),
            "POST with an image": lambda: c.post(
                "/v1/videos",
                json={"prompt": "d", "model": "k5-tiny-i2v", "input_reference": {"image_url": image}},
                headers=auth(ALICE),
            ),
            "POST with a deadline": lambda: c.post(
                "/v1/videos", json={"prompt": "e", "deadline_s": 600}, headers=auth(ALICE)
            ),
            "POST, unknown field": lambda: c.post("/v1/videos", json={"prompt": "f", "x": 1}, headers=auth(ALICE)),
            "POST, bad size": lambda: c.post("/v1/videos", json={"prompt": "g", "size": "1x1"}, headers=auth(ALICE)),
            "POST, not JSON": lambda: c.post(
                "/v1/videos", content=b"{", headers={**auth(ALICE), "Content-Type": "application/json"}
            ),
            "POST, bad header": lambda: c.post(
                "/v1/videos", json={"prompt": "h"}, headers={**auth(ALICE), "Idempotency-Key": "k" * 300}
            ),
            "GET": lambda: c.get(f"/v1/videos/{vid}", headers=auth(ALICE)),
            "GET of no video": lambda: c.get("/v1/videos/video_" + "0" * 32, headers=auth(ALICE)),
            "GET of a malformed id": lambda: c.get("/v1/videos/nonsense", headers=auth(ALICE)),
            "GET of another key's": lambda: c.get(f"/v1/videos/{vid}", headers=auth(BOB)),
        }
        statuses = {}
        for name, send in requests.items():
            before = rate_counts(r1)
            statuses[name] = send().status_code
            assert rate_counts(r1) - before == 1, name
        assert statuses["plain POST"] == statuses["GET"] == statuses["its replay"] == 200, statuses
        assert statuses["POST with an image"] == statuses["POST with a deadline"] == 200, statuses
        assert {statuses[n] for n in ("POST, unknown field", "POST, bad size", "POST, not JSON")} == {400}
        assert statuses["GET of no video"] == statuses["GET of another key's"] == 404
    # Over the limit, the 429 comes first on each path, and the refused create wrote nothing.
    r1.delete(*r1.scan_iter("k5:rate:*"))
    with make_client(redis_server, tmp_path, rate_limit_per_min=2) as c:
        assert [c.get(f"/v1/videos/{vid}", headers=auth(ALICE)).status_code for _ in range(2)] == [200, 200]
        for name in ("plain POST", "POST with a key", "POST with an image", "POST, bad size", "POST, not JSON",
                     "GET", "GET of no video", "GET of a malformed id"):  # fmt: skip
            resp = requests[name]()
            assert resp.status_code == 429 and resp.json()["error"]["code"] == "rate_limited", (name, resp.text)
            assert int(resp.headers["retry-after"]) >= 1
        assert c.get("/v1/videos", params={"limit": 100}, headers=auth(BOB)).status_code == 200
        assert r1.zcard(f"k5:videos:{owner}") == 5  # a, b, c, d, e: none of the refused ones


def test_inflight_and_queue_depth_caps(r, redis_server, tmp_path):
    with make_client(redis_server, tmp_path, max_inflight_per_key=2, max_queue_depth=3) as c:
        ok = [c.post("/v1/videos", json={"prompt": f"a{i}"}, headers=auth(ALICE)) for i in range(2)]
        assert [x.status_code for x in ok] == [200, 200]
        over = c.post("/v1/videos", json={"prompt": "a3"}, headers=auth(ALICE))
        assert over.status_code == 429 and over.json()["error"]["code"] == "too_many_inflight"
        assert "retry-after" in over.headers
        # A finished job frees its slot.
        c.post(f"/v1/videos/{ok[0].json()['id']}/cancel", headers=auth(ALICE))
        assert c.post("/v1/videos", json={"prompt": "a4"}, headers=auth(ALICE)).status_code == 200
        # The model's queue (shared by every key) holds at most 3.
        assert c.post("/v1/videos", json={"prompt": "b1"}, headers=auth(BOB)).status_code == 200
        full = c.post("/v1/videos", json={"prompt": "b2"}, headers=auth(BOB))
        assert full.status_code == 429 and full.json()["error"]["code"] == "queue_full"


def test_inflight_cap_holds_under_concurrent_requests(r, redis_server, tmp_path):
    """24 POSTs at once from one key with room for 5: exactly 5 are accepted (no worker takes any meanwhile)."""
    overrides = {"max_inflight_per_key": 5, "rate_limit_per_min": 1000}
    with make_client(redis_server, tmp_path, **overrides) as c, ThreadPoolExecutor(24) as pool:
        codes = list(pool.map(lambda i: c.post("/v1/videos", json={"prompt": f"p{i}"}, headers=auth(ALICE)).status_code,
                              range(24)))  # fmt: skip
        assert sorted(codes) == [200] * 5 + [429] * 19
        assert c.app.state.store.inflight(c.app.state.keys.authenticate(f"Bearer {ALICE}")) == 5
        assert len(c.get("/v1/videos", params={"limit": 100}, headers=auth(ALICE)).json()["data"]) == 5


field_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True),
    st.text(max_size=40),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=3),
)
bodies = st.dictionaries(
    st.sampled_from(
        [
            "prompt",
            "model",
            "size",
            "seconds",
            "seed",
            "num_inference_steps",
            "guidance_scale",
            "negative_prompt",
            "metadata",
            "input_reference",
            "webhook_url",
            "extra",
        ]
    ),
    field_values,
    max_size=6,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=bodies)
def test_random_bodies_never_cause_a_5xx(client, body):
    # Raw JSON, so NaN and Infinity literals reach the server too (Python's json.loads accepts them).
    headers = {**auth(ALICE), "Content-Type": "application/json"}
    resp = client.post("/v1/videos", content=json.dumps(body), headers=headers)
    assert resp.status_code in (200, 400, 404, 413, 429), resp.text
    if resp.status_code != 200:
        assert set(resp.json()["error"]) == {"message", "type", "param", "code"}


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    size=st.sampled_from(TINY["k5-tiny-t2v"].sizes),
    seconds=st.sampled_from(list(TINY["k5-tiny-t2v"].seconds)),
    steps=st.integers(1, 50),
    guidance=st.floats(0, 20),
    seed=st.integers(0, 2**63 - 1),
    prompt=st.text(min_size=1, max_size=200).filter(lambda p: re.search(r"\S", p)),  # not only blanks
)
def test_every_valid_request_is_accepted(client, size, seconds, steps, guidance, seed, prompt):
    body = {
        "prompt": prompt,
        "size": size,
        "seconds": seconds,
        "num_inference_steps": steps,
        "guidance_scale": guidance,
        "seed": seed,
    }
    resp = client.post("/v1/videos", json=body, headers=auth(ALICE))
    if resp.status_code == 429:  # the in-flight cap of the key; free it and carry on
        client.app.state.store.r.delete("k5:inflight:" + client.app.state.keys.authenticate(f"Bearer {ALICE}"))
        resp = client.post("/v1/videos", json=body, headers=auth(ALICE))
    assert resp.status_code == 200, resp.text
    video = resp.json()
    assert (video["size"], video["seconds"], video["seed"]) == (size, seconds, seed)


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_guidance_is_refused(client, value):
    body = '{"prompt": "x", "guidance_scale": ' + value + "}"
    resp = client.post("/v1/videos", content=body, headers={**auth(ALICE), "Content-Type": "application/json"})
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "guidance_scale"


def test_redis_down_is_503_and_the_gateway_recovers_without_restart(tmp_path):
    port = free_port()
    settings = Settings(redis_url=f"redis://127.0.0.1:{port}/0", storage_url=f"file://{tmp_path}", api_keys=ALICE)
    with TestClient(create_app(settings)) as c:
        resp = c.post("/v1/videos", json={"prompt": "x"}, headers=auth(ALICE))
        assert resp.status_code == 503 and resp.json()["error"]["code"] == "store_unavailable"
        assert "retry-after" in resp.headers
        assert c.get("/v1/videos", headers=auth(ALICE)).status_code == 503
        assert c.get("/readyz").status_code == 503 and c.get("/healthz").status_code == 200
        server = RedisServer(tmp_path / "redis", port=port).start()
        try:
            # Same process, same app: the connection pool reconnects.
            assert c.get("/readyz").status_code == 200
            assert c.get("/v1/videos", headers=auth(ALICE)).status_code == 200
        finally:
            server.stop()
