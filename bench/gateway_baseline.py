"""The bare baseline of bench/gateway.py: FastAPI + uvicorn doing the Redis work a video API cannot avoid.

POST stores the video object and queues its id (HSET + RPUSH in one MULTI); GET reads it back (one HGET); a list
page reads the newest ids and their objects (LRANGE, then the HGETs pipelined); /v1/models answers from memory.
No authentication, no rate limit, no validation beyond the body's model: what k5serve does on top is its cost.

    BENCH_REDIS_URL=redis://127.0.0.1:6379/0 uvicorn bench.gateway_baseline:create_app --factory
"""

from __future__ import annotations

import json
import os
import secrets
import time

import redis
from fastapi import FastAPI, HTTPException
from pydantic import BaseModel

from service.contract.models import TINY

QUEUE = "base:queue"
TINY_MODEL = "k5-tiny-t2v"


def video_key(video_id: str) -> str:
    return f"base:video:{video_id}"


def video_object(video_id: str, prompt: str, model: str | None, size: str | None, seconds: str | None) -> dict:
    """The 13 fields of a video object, as k5serve answers them."""
    return {
        "id": video_id,
        "object": "video",
        "model": model,
        "status": "queued",
        "progress": 0,
        "created_at": int(time.time()),
        "completed_at": None,
        "expires_at": None,
        "prompt": prompt,
        "size": size,
        "seconds": seconds,
        "remixed_from_video_id": None,
        "error": None,
    }


class Create(BaseModel):
    prompt: str
    model: str | None = None
    size: str | None = None
    seconds: str | None = None


def create_app() -> FastAPI:
    r = redis.Redis.from_url(os.environ["BENCH_REDIS_URL"])
    models = {"object": "list", "data": [{"id": m, "object": "model", "owned_by": "k5serve"} for m in TINY]}
    app = FastAPI()

    @app.post("/v1/videos")
    def create(body: Create) -> dict:
        video_id = f"video_{time.time_ns():016x}{secrets.token_hex(8)}"
        video = video_object(video_id, body.prompt, body.model, body.size, body.seconds)
        with r.pipeline() as pipe:
            pipe.hset(video_key(video_id), "json", json.dumps(video))
            pipe.rpush(QUEUE, video_id)
            pipe.execute()
        return video

    @app.get("/v1/videos/{video_id}")
    def retrieve(video_id: str) -> dict:
        raw = r.hget(video_key(video_id), "json")
        if raw is None:
            raise HTTPException(404)
        return json.loads(raw)

    @app.get("/v1/videos")
    def list_videos(limit: int = 20) -> dict:
        ids = [i.decode() for i in reversed(r.lrange(QUEUE, -limit, -1))]
        with r.pipeline(transaction=False) as pipe:
            for video_id in ids:
                pipe.hget(video_key(video_id), "json")
            data = [json.loads(raw) for raw in pipe.execute() if raw is not None]
        return {
            "object": "list",
            "data": data,
            "first_id": ids[0] if ids else None,
            "last_id": ids[-1] if ids else None,
            "has_more": False,
        }

    @app.get("/v1/models")
    def list_models() -> dict:
        return models

    return app


# ARGV: video JSON, its id (replaced), id prefix, first and end number, key prefix, queue key.
_SEED = """
for i = tonumber(ARGV[4]), tonumber(ARGV[5]) - 1 do
  local id = ARGV[3] .. string.format('%016x', i)
  redis.call('hset', ARGV[6] .. id, 'json', (string.gsub(ARGV[1], ARGV[2], id, 1)))
  redis.call('rpush', ARGV[7], id)
end
"""


def seed(r: redis.Redis, n: int) -> str | None:
    """n queued videos as POST would store them, written by a script inside Redis; returns the newest id."""
    if n == 0:
        return None
    prefix = f"video_{time.time_ns():016x}"
    template_id = f"{prefix}{0:016x}"
    video = json.dumps(video_object(template_id, "a seeded video", TINY_MODEL, "64x64", "1"))
    for start in range(0, n, 10_000):
        r.eval(_SEED, 0, video, template_id, prefix, start, min(n, start + 10_000), video_key(""), QUEUE)
    return f"{prefix}{n - 1:016x}"
