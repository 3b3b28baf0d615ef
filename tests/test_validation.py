"""Bad requests get a 4xx error envelope naming the field, and never reach the queue.

The gateway runs in-process against a real Redis; the tiny models are announced the way a worker announces
them, so validation sees exactly what it sees in production.
"""

from __future__ import annotations

import base64
import io

import pytest
from fastapi.testclient import TestClient
from PIL import Image
from rq import Queue

from service.contract.jobs import JobStore
from service.contract.lifecycle import Lifecycle, Outcome
from service.contract.models import TINY
from service.contract.settings import Settings
from service.gateway.app import create_app

T2V, I2V = TINY["k5-tiny-t2v"], TINY["k5-tiny-i2v"]


@pytest.fixture
def client(r, redis_server, tmp_path):
    settings = Settings(
        redis_url=redis_server.url.replace("/0", "/1"), storage_url=f"file://{tmp_path}", allow_anonymous=True
    )
    app = create_app(settings)
    store = JobStore(r, settings)
    store.announce(T2V, "test-worker-t2v")
    store.announce(I2V, "test-worker-i2v")
    with TestClient(app) as c:
        c.store = store
        yield c


def png_data_url(w: int = 40, h: int = 30, fmt: str = "PNG") -> str:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (200, 30, 30)).save(buf, format=fmt)
    mime = {"PNG": "image/png", "JPEG": "image/jpeg", "GIF": "image/gif"}[fmt]
    return f"data:{mime};base64," + base64.b64encode(buf.getvalue()).decode()


def assert_nothing_queued(client) -> None:
    r = client.store.r
    assert not list(r.scan_iter("k5:videos:*"))
    for spec in (T2V, I2V):
        assert Queue(spec.id, connection=r).count == 0
    assert not list(r.scan_iter("k5:video:*"))


BAD_REQUESTS = [
    ({}, "prompt", 400),
    ({"prompt": ""}, "prompt", 400),
    ({"prompt": " \n\t "}, "prompt", 400),
    ({"prompt": "x" * 32001}, "prompt", 400),
    ({"prompt": 5}, "prompt", 400),
    ({"prompt": "a cat", "size": "100x100"}, "size", 400),
    ({"prompt": "a cat", "size": "big"}, "size", 400),
    ({"prompt": "a cat", "size": "64x96x3"}, "size", 400),
    ({"prompt": "a cat", "seconds": "7"}, "seconds", 400),
    ({"prompt": "a cat", "seconds": "-1"}, "seconds", 400),
    ({"prompt": "a cat", "num_inference_steps": 0}, "num_inference_steps", 400),
    ({"prompt": "a cat", "num_inference_steps": 51}, "num_inference_steps", 400),
    ({"prompt": "a cat", "guidance_scale": -1}, "guidance_scale", 400),
    ({"prompt": "a cat", "guidance_scale": 21}, "guidance_scale", 400),
    ({"prompt": "a cat", "seed": -5}, "seed", 400),
    ({"prompt": "a cat", "seed": 2**64}, "seed", 400),
    ({"prompt": "a cat", "negative_prompt": "x" * 32001}, "negative_prompt", 400),
    ({"prompt": "a cat", "model": "no-such-model"}, "model", 404),
    ({"prompt": "a cat", "bogus": 1}, "bogus", 400),
    ({"prompt": "a cat", "metadata": {f"k{i}": "v" for i in range(17)}}, "metadata", 400),
    # Text-to-video refuses an image; image-to-video needs one, and a valid one.
    ({"prompt": "a cat", "input_reference": {"image_url": png_data_url()}}, "input_reference", 400),
    ({"prompt": "a cat", "model": "k5-tiny-i2v"}, "input_reference", 400),
    (
        {"prompt": "a cat", "model": "k5-tiny-i2v", "input_reference": {"image_url": "http://x/y.png"}},
        "input_reference.image_url",
        400,
    ),
    (
        {
            "prompt": "a cat",
            "model": "k5-tiny-i2v",
            "input_reference": {"image_url": "data:image/png;base64,!!"},
        },
        "input_reference.image_url",
        400,
    ),
    (
        {
            "prompt": "a cat",
            "model": "k5-tiny-i2v",
            "input_reference": {"image_url": "data:image/png;base64," + base64.b64encode(b"not an image").decode()},
        },
        "input_reference",
        400,
    ),
    (
        {
            "prompt": "a cat",
            "model": "k5-tiny-i2v",
            "input_reference": {"image_url": png_data_url(fmt="GIF")},
        },
        "input_reference",
        400,
    ),
]


@pytest.mark.parametrize(("body", "param", "status"), BAD_REQUESTS, ids=[b[1] for b in BAD_REQUESTS])
def test_bad_request_gets_envelope_and_is_not_queued(client, body, param, status):
    resp = client.post("/v1/videos", json=body)
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param
    assert error["message"]
    assert error["type"] == ("invalid_request_error" if status == 400 else "not_found_error")
    assert_nothing_queued(client)


def test_malformed_json_is_a_400_envelope(client):
    resp = client.post("/v1/videos", content=b"{not json", headers={"Content-Type": "application/json"})
    assert resp.status_code == 400
    assert resp.json()["error"]["type"] == "invalid_request_error"
    assert_nothing_queued(client)


def test_decompression_bomb_is_refused(client):
    # A tiny PNG file that declares 20000 x 20000 pixels: refused from its header, never decoded.
    buf = io.BytesIO()
    Image.new("1", (20000, 20000)).save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    resp = client.post(
        "/v1/videos", json={"prompt": "a cat", "model": "k5-tiny-i2v", "input_reference": {"image_url": url}}
    )
    assert resp.status_code == 400
    assert resp.json()["error"]["code"] == "image_too_large"
    assert_nothing_queued(client)


def test_valid_request_is_queued_with_model_defaults(client):
    resp = client.post("/v1/videos", json={"prompt": "a red fox", "metadata": {"user": "42"}})
    assert resp.status_code == 200, resp.text
    video = resp.json()
    openai_fields = [
        "id",
        "object",
        "model",
        "status",
        "progress",
        "created_at",
        "completed_at",
        "expires_at",
        "prompt",
        "size",
        "seconds",
        "remixed_from_video_id",
        "error",
    ]
    assert all(f in video for f in openai_fields)
    assert video["object"] == "video" and video["status"] == "queued" and video["progress"] == 0
    # No model given: the deployment's text-to-video model, with its defaults.
    assert video["model"] == "k5-tiny-t2v"
    assert (video["size"], video["seconds"]) == (T2V.default_size, T2V.default_seconds)
    assert (video["num_inference_steps"], video["guidance_scale"]) == (T2V.steps, T2V.guidance)
    assert isinstance(video["seed"], int) and video["metadata"] == {"user": "42"}
    assert video["completed_at"] is None and video["error"] is None
    assert Queue("k5-tiny-t2v", connection=client.store.r).job_ids == [video["id"]]
    got = client.get(f"/v1/videos/{video['id']}")
    assert got.status_code == 200 and got.json() == video
    assert got.headers["openai-poll-after-ms"]


def test_image_is_fitted_to_the_output_size(client):
    resp = client.post(
        "/v1/videos",
        json={
            "prompt": "a cat",
            "model": "k5-tiny-i2v",
            "size": "64x96",
            "input_reference": {"image_url": png_data_url(300, 100, "JPEG")},
        },
    )
    assert resp.status_code == 200, resp.text
    rec = client.store.get(resp.json()["id"])
    stored = client.app.state.storage.get_bytes(rec.input_key)
    assert Image.open(io.BytesIO(stored)).size == (64, 96)


def test_unknown_video_and_not_ready_content(client):
    resp = client.get("/v1/videos/video_doesnotexist")
    assert resp.status_code == 404 and resp.json()["error"]["code"] == "video_not_found"
    resp = client.get("/v1/videos/../../etc/passwd")
    assert resp.status_code == 404
    video = client.post("/v1/videos", json={"prompt": "a cat"}).json()
    resp = client.get(f"/v1/videos/{video['id']}/content")
    assert resp.status_code == 409 and resp.json()["error"]["code"] == "video_not_ready"
    resp = client.get(f"/v1/videos/{video['id']}/content", params={"variant": "poster"})
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "variant"
    # Still queued, yet nobody will run it: a worker took it and is starting it (position 0, next in line).
    client.store.queue(video["model"]).empty()
    assert client.get(f"/v1/videos/{video['id']}").json()["queue_position"] == 0
    # A failed video will never have content, and says so.
    client.post(f"/v1/videos/{video['id']}/cancel")
    resp = client.get(f"/v1/videos/{video['id']}/content")
    error = resp.json()["error"]
    assert resp.status_code == 409 and error["code"] == "video_failed" and "(cancelled)" in error["message"]


def test_errors_say_what_a_pattern_means(client):
    blank = client.post("/v1/videos", json={"prompt": "   "}).json()["error"]
    assert blank["message"] == "Invalid value for 'prompt': must not be blank."
    size = client.post("/v1/videos", json={"prompt": "a cat", "size": "big"}).json()["error"]
    assert size["message"] == "Invalid value for 'size': must be WIDTHxHEIGHT, e.g. '768x512'."
    cursor = client.get("/v1/videos", params={"after": "garbage"})
    assert cursor.status_code == 400 and cursor.json()["error"]["param"] == "after"
    assert "must be a video id" in cursor.json()["error"]["message"]


def test_model_without_worker_is_refused(client):
    resp = client.post("/v1/videos", json={"prompt": "a cat", "model": "kandinsky-5.0-t2v-lite-sft-5s"})
    assert resp.status_code == 404
    assert resp.json()["error"]["code"] == "model_not_found"
    assert "k5-tiny-t2v" in resp.json()["error"]["message"]


def test_multipart_form_fields_become_the_same_request(client):
    png = base64.b64decode(png_data_url().split(",", 1)[1])
    resp = client.post(
        "/v1/videos",
        data={
            "prompt": "a cat",
            "model": "k5-tiny-i2v",
            "seed": "12",
            "guidance_scale": "3.5",
            "size": "",
            "metadata[user]": "bob",
            "metadata[tag]": "x",
        },
        files={"input_reference": ("a.png", png, "image/png")},
    )
    assert resp.status_code == 200, resp.text
    video = resp.json()
    assert video["seed"] == 12 and video["guidance_scale"] == 3.5 and video["size"] == I2V.default_size
    assert video["metadata"] == {"user": "bob", "tag": "x"}


@pytest.mark.parametrize(
    ("kwargs", "status", "param", "code"),
    [
        ({"data": {"prompt": "a cat", "seed": "abc"}}, 400, "seed", "invalid_value"),
        ({"data": {"prompt": ""}}, 400, "prompt", "invalid_value"),
        (
            {"data": {"prompt": "a cat"}, "files": {"other": ("a.png", b"x", "image/png")}},
            400,
            "other",
            "invalid_value",
        ),
        ({"content": b"prompt=a+cat", "headers": {"Content-Type": "text/plain"}}, 415, None, "unsupported_media_type"),
        ({"content": b"[1, 2]", "headers": {"Content-Type": "application/json"}}, 400, None, "invalid_json"),
        # Starlette reads a truncated multipart body as an empty form: the prompt is missing.
        (
            {"content": b"--x\r\nbroken", "headers": {"Content-Type": "multipart/form-data; boundary=x"}},
            400,
            "prompt",
            "invalid_value",
        ),
        (
            {"data": {f"metadata[k{i}]": "v" for i in range(70)}, "files": {"input_reference": ("a", b"x", "a/b")}},
            400,
            None,
            "invalid_multipart",
        ),
    ],
    ids=[
        "seed-not-a-number",
        "empty-prompt",
        "unexpected-file",
        "text-plain",
        "json-array",
        "broken-multipart",
        "too-many-fields",
    ],
)
def test_malformed_bodies_are_4xx_envelopes(client, kwargs, status, param, code):
    resp = client.post("/v1/videos", **kwargs)
    assert resp.status_code == status, resp.text
    assert resp.json()["error"]["param"] == param and resp.json()["error"]["code"] == code
    assert_nothing_queued(client)


def test_oversized_body_is_413(client):
    limit = client.app.state.settings.max_image_bytes * 4 // 3 + 256 * 1024
    resp = client.post("/v1/videos", content=b"{" + b" " * limit + b"}", headers={"Content-Type": "application/json"})
    assert resp.status_code == 413 and resp.json()["error"]["code"] == "body_too_large"
    assert_nothing_queued(client)


def test_expired_content_is_410(client):
    video = client.post("/v1/videos", json={"prompt": "old"}).json()
    store = client.store
    run = Lifecycle(store).start(video["id"], "w", video["id"])
    assert run is not None and run.complete(expires_at=2) is Outcome.DONE
    resp = client.get(f"/v1/videos/{video['id']}/content")
    assert resp.status_code == 410 and resp.json()["error"]["code"] == "asset_expired"
