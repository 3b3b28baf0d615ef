"""Apps written for another OpenAI-compatible provider: model aliases an operator sets, and refusals that say
what to send instead. A real gateway process, the official openai SDK, a tiny model announced in Redis."""

from __future__ import annotations

import warnings

import openai
import pydantic
import pytest
import redis

from service.contract.jobs import JobStore
from service.contract.models import TINY
from service.contract.settings import Settings
from tests.conftest import gateway_process

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
ALIASES = "sora-2=k5-tiny-t2v, sora-2-pro=kandinsky-5.0-t2v-pro-sft-5s"


@pytest.fixture
def client(r, redis_server, tmp_path):
    url = redis_server.url.replace("/0", "/1")
    settings = Settings(redis_url=url, model_aliases=ALIASES)
    JobStore(redis.Redis.from_url(url), settings).announce(TINY["k5-tiny-t2v"], "alias-test-worker")
    with gateway_process(url, tmp_path, K5_MODEL_ALIASES=ALIASES) as base:
        yield openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=30)


def test_an_alias_runs_on_the_served_model(client):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        video = client.videos.create(prompt="a cat", model="sora-2", size="64x64")
    assert video.model == "k5-tiny-t2v" and video.status == "queued"


def test_refusals_name_what_to_use_instead(client):
    with pytest.raises(openai.NotFoundError) as unknown:
        client.videos.create(prompt="a cat", model="gpt-video-1")
    message = unknown.value.message
    assert unknown.value.code == "model_not_found" and unknown.value.param == "model"
    assert "'k5-tiny-t2v' (text-to-video)" in message and "'sora-2'" in message and "K5_MODEL_ALIASES" in message
    with pytest.raises(openai.NotFoundError) as offline:
        client.videos.create(prompt="a cat", model="sora-2-pro")
    assert "an alias of 'kandinsky-5.0-t2v-pro-sft-5s'" in offline.value.message
    with pytest.raises(openai.BadRequestError) as size:
        client.videos.create(prompt="a cat", model="sora-2", size="1280x720")
    assert size.value.param == "size"
    assert "supported sizes: 96x64, 64x64, 64x96" in size.value.message
    assert "nearest in aspect ratio is 96x64" in size.value.message


def test_malformed_aliases_stop_the_start():
    with pytest.raises(pydantic.ValidationError, match="alias=model-id"):
        Settings(model_aliases="sora-2")
