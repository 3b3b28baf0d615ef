"""POST /v1/videos/{id}/remix with the official openai SDK's `videos.remix`, against the running stack."""

from __future__ import annotations

import openai
import pytest

from tests.test_openai_sdk import png_bytes

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def client(stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.base_url + "/v1", api_key=stack.api_key, max_retries=0, timeout=60)


def test_remix_keeps_the_source_settings_with_the_new_prompt(client, stack):
    source = client.videos.create_and_poll(
        prompt="a red kite over a beach",
        model="k5-tiny-t2v",
        size="64x96",
        seconds="1",
        extra_body={"seed": 1234, "negative_prompt": "blurry", "num_inference_steps": 2, "guidance_scale": 3.0},
    )
    assert source.status == "completed"
    remix = client.videos.remix(source.id, prompt="a blue kite over a beach")
    assert remix.remixed_from_video_id == source.id and remix.id != source.id
    assert (remix.model, remix.size, remix.seconds, remix.prompt) == (
        "k5-tiny-t2v",
        "64x96",
        "1",
        "a blue kite over a beach",
    )
    extra = remix.model_extra
    assert (extra["seed"], extra["negative_prompt"], extra["num_inference_steps"], extra["guidance_scale"]) == (
        1234,
        "blurry",
        2,
        3.0,
    )
    done = client.videos.poll(remix.id)
    assert done.status == "completed" and done.remixed_from_video_id == source.id
    # An Idempotency-Key makes a remix safe to retry: the same key and source give the same video.
    headers = {"Idempotency-Key": "remix-retry-1"}
    first = client.videos.remix(source.id, prompt="a green kite", extra_headers=headers)
    again = client.videos.with_raw_response.remix(source.id, prompt="a green kite", extra_headers=headers)
    assert again.parse().id == first.id and again.headers["idempotent-replayed"] == "true"
    assert client.videos.retrieve(source.id).remixed_from_video_id is None


def test_remix_of_an_image_to_video_job_reuses_its_image(client, stack):
    source = client.videos.create_and_poll(
        prompt="a lighthouse",
        model="k5-tiny-i2v",
        size="96x64",
        input_reference=("first.png", png_bytes(120, 80), "image/png"),
        extra_body={"num_inference_steps": 2},
    )
    assert source.status == "completed"
    remix = client.videos.remix(source.id, prompt="a lighthouse at night")
    old, new = stack.store.get(source.id), stack.store.get(remix.id)
    assert old is not None and new is not None and new.input_key and new.input_key != old.input_key
    assert client.videos.poll(remix.id).status == "completed"


def test_remix_refusals(client, stack):
    with pytest.raises(openai.NotFoundError) as missing:
        client.videos.remix("video_00000000000000000000000000000000", prompt="x")
    assert missing.value.body["code"] == "video_not_found"
    long = client.videos.create(
        prompt="cancelled", model="k5-tiny-t2v", size="64x64", seconds="2", extra_body={"num_inference_steps": 50}
    )
    try:
        client.post(f"/videos/{long.id}/cancel", cast_to=openai.types.Video)
        with pytest.raises(openai.ConflictError) as failed:
            client.videos.remix(long.id, prompt="from a failed video")
        assert failed.value.body["code"] == "video_failed"
        with pytest.raises(openai.BadRequestError) as blank:
            client.videos.remix(long.id, prompt="   ")
        assert blank.value.body["param"] == "prompt"
    finally:
        client.videos.delete(long.id)
    # Another key's video is "not found", as everywhere else.
    mine = client.videos.create_and_poll(
        prompt="mine", model="k5-tiny-t2v", size="64x64", extra_body={"num_inference_steps": 1}
    )
    other = openai.OpenAI(base_url=stack.base_url + "/v1", api_key=stack.other_api_key, max_retries=0)
    with pytest.raises(openai.NotFoundError):
        other.videos.remix(mine.id, prompt="stolen")
