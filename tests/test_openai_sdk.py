"""The official openai SDK, unchanged, against the running stack: base_url=http://host:port/v1.

The SDK always sends multipart/form-data (also without a file), flattens nested extra_body fields to
`key[sub]`, polls with the openai-poll-after-ms header, follows the content redirect to S3, and maps error
envelopes to typed exceptions."""

from __future__ import annotations

import base64
import io
import warnings

import boto3
import openai
import pytest
from PIL import Image

from tests.conftest import BUCKET
from tests.test_e2e import decode_mp4

# The SDK marks its videos methods deprecated (OpenAI's own Sora API is retiring); the API shape lives on.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def client(stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.base_url + "/v1", api_key=stack.api_key, max_retries=0, timeout=60)


def png_bytes(w: int, h: int) -> bytes:
    img = Image.new("RGB", (w, h), (30, 160, 90))
    img.paste((250, 250, 250), (w // 4, h // 4, w // 2, h // 2))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_create_and_poll_then_download_every_variant(client):
    video = client.videos.create_and_poll(
        prompt="a paper boat on a river",
        model="k5-tiny-t2v",
        size="96x64",
        seconds="1",
        extra_body={"seed": 11, "num_inference_steps": 3, "metadata": {"user": "alice", "run": "7"}},
    )
    assert video.status == "completed" and video.progress == 100
    assert (video.size, video.seconds, video.model) == ("96x64", "1", "k5-tiny-t2v")
    # Extensions arrive as extra fields; numbers sent as form strings were understood as numbers.
    extra = video.model_extra
    assert extra["seed"] == 11 and extra["num_inference_steps"] == 3
    assert extra["metadata"] == {"user": "alice", "run": "7"}

    frames, info = decode_mp4(client.videos.download_content(video.id).read())
    assert frames.shape == (25, 64, 96, 3) and info["codec"] == "h264"
    thumb = Image.open(io.BytesIO(client.videos.download_content(video.id, variant="thumbnail").read()))
    assert thumb.format == "WEBP" and thumb.size == (96, 64)
    sheet = Image.open(io.BytesIO(client.videos.download_content(video.id, variant="spritesheet").read()))
    assert sheet.format == "JPEG" and sheet.width >= 96


@pytest.mark.parametrize("how", ["file", "image_url"])
def test_image_to_video_with_an_input_reference(client, how):
    data = png_bytes(120, 160)
    if how == "file":
        kwargs = {"input_reference": ("first-frame.png", data, "image/png")}
    else:
        # The SDK only uploads files in input_reference; an image URL travels as a flattened extra field.
        url = "data:image/png;base64," + base64.b64encode(data).decode()
        kwargs = {"extra_body": {"input_reference": {"image_url": url}}}
    video = client.videos.create(
        prompt="the leaves start to move", model="k5-tiny-i2v", size="64x96", seconds="1", **kwargs
    )
    assert video.status == "queued"
    video = client.videos.poll(video.id, poll_interval_ms=100)
    assert video.status == "completed", video
    frames, _ = decode_mp4(client.videos.download_content(video.id).read())
    assert frames.shape == (25, 96, 64, 3)


def test_list_pages_through_every_video(client):
    created = [client.videos.create(prompt=f"scene {i}", model="k5-tiny-t2v", size="64x64").id for i in range(5)]
    first = client.videos.list(limit=2)
    assert len(first.data) == 2 and first.has_more is True
    # Newest first, and the auto-paginating iterator follows the cursor to the end.
    assert first.data[0].id == created[-1]
    seen = [v.id for v in client.videos.list(limit=2)]
    assert len(seen) == len(set(seen))
    assert [i for i in seen if i in created] == created[::-1]
    ascending = [v.id for v in client.videos.list(limit=3, order="asc")]
    assert ascending == sorted(ascending) and [i for i in ascending if i in created] == created
    for vid in created:
        client.videos.poll(vid, poll_interval_ms=100)


def test_retrieve_and_delete_removes_the_files(client, stack):
    video = client.videos.create_and_poll(prompt="a kite", model="k5-tiny-t2v", size="64x64")
    assert client.videos.retrieve(video.id).status == "completed"
    s3 = boto3.client("s3", endpoint_url=stack.env["K5_S3_ENDPOINT_URL"], region_name="us-east-1")

    def stored() -> list[str]:
        listing = s3.list_objects_v2(Bucket=BUCKET, Prefix=f"videos/{video.id}/")
        return [o["Key"] for o in listing.get("Contents", [])]

    assert len(stored()) == 3
    deleted = client.videos.delete(video.id)
    assert (deleted.id, deleted.object, deleted.deleted) == (video.id, "video.deleted", True)
    assert stored() == []
    with pytest.raises(openai.NotFoundError):
        client.videos.retrieve(video.id)
    with pytest.raises(openai.NotFoundError):
        client.videos.download_content(video.id)
    assert video.id not in [v.id for v in client.videos.list(limit=100)]


def test_typed_errors_name_the_field(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.videos.create(prompt="a cat", model="k5-tiny-t2v", size="1280x720")
    assert e.value.param == "size" and e.value.code == "invalid_value" and "96x64" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        client.videos.create(prompt="a cat", model="k5-tiny-t2v", extra_body={"seed": "not-a-number"})
    assert e.value.param == "seed"
    with pytest.raises(openai.BadRequestError) as e:
        client.videos.create(prompt="a cat", model="k5-tiny-i2v")
    assert e.value.param == "input_reference"
    with pytest.raises(openai.NotFoundError) as e:
        client.videos.create(prompt="a cat", model="sora-2")
    assert e.value.param == "model" and e.value.code == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client.videos.retrieve("video_0000000000000000nothing")


def test_content_before_completion_is_a_conflict(client, stack):
    video = client.videos.create(prompt="slow", model="k5-tiny-t2v", extra_body={"num_inference_steps": 40})
    with pytest.raises(openai.ConflictError) as e:
        client.videos.download_content(video.id)
    assert e.value.code == "video_not_ready"
    client.videos.poll(video.id, poll_interval_ms=100)


def test_models_list_and_retrieve(client):
    models = {m.id: m for m in client.models.list()}
    assert models["k5-tiny-t2v"].model_extra["online"] is True
    assert models["k5-tiny-i2v"].model_extra["task"] == "image-to-video"
    lite = models["kandinsky-5.0-t2v-lite-distilled16steps-5s"]
    assert lite.owned_by == "kandinskylab" and lite.model_extra["online"] is False
    assert lite.model_extra["default_num_inference_steps"] == 16
    tiny = client.models.retrieve("k5-tiny-t2v")
    assert tiny.model_extra["sizes"] == ["96x64", "64x64", "64x96"] and tiny.created > 0
    with warnings.catch_warnings(), pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")
