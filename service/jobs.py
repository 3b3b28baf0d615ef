"""Job records and their state transitions in Redis; enqueueing on RQ; the registry of online models.

Redis keys:
  k5:video:<id>        the job record (JSON), the source of truth for the video object
  k5:videos:<owner>    the owner's video ids, all with score 0 so that ZRANGEBYLEX lists them in id order;
                       ids are time-ordered, so that is creation order
  k5:spec:<model>      the last ModelSpec a worker announced for <model>
  k5:workers:<model>   sorted set worker name -> last heartbeat (unix seconds)
RQ queue per model: the queue's name is the model id, so each worker pool takes only its model's jobs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
import time
from collections.abc import Callable
from typing import Any, Literal

import redis
from rq import Queue

from service import webhooks
from service.models import CATALOGUE, ModelSpec, find_spec, parse_size
from service.schemas import MAX_SEED, TERMINAL, Video, VideoCreate, VideoError
from service.settings import Settings

log = logging.getLogger(__name__)

JOB_FUNC = "worker.runner.run_job"
# How long an Idempotency-Key keeps pointing at its video.
IDEMPOTENCY_TTL_S = 24 * 3600

# Forward moves only; a status may repeat itself (progress updates) but terminal states never change.
_NEXT: dict[str, frozenset[str]] = {
    "queued": frozenset({"queued", "in_progress", "failed"}),
    "in_progress": frozenset({"in_progress", "completed", "failed"}),
}


class RequestRejected(ValueError):
    """A request that cannot become a job; the gateway turns it into a 4xx envelope."""

    def __init__(self, message: str, *, param: str | None = None, code: str = "invalid_value", status: int = 400):
        super().__init__(message)
        self.message, self.param, self.code, self.status = message, param, code, status
        self.headers: dict[str, str] | None = None


class JobRecord(Video):
    """The video object plus what the worker needs and clients never see."""

    width: int
    height: int
    num_frames: int
    fps: int
    task: str
    input_key: str | None = None
    worker: str | None = None
    # Whose video this is (an API key's id); a key sees only its own videos.
    owner: str = "anonymous"
    webhook_url: str | None = None
    enhance_prompt: bool | None = None
    started_at: float | None = None

    def public(self, **live: Any) -> Video:
        return Video.model_validate({**self.model_dump(include=set(Video.model_fields)), **live})

    @property
    def megavoxels(self) -> float:
        return self.width * self.height * self.num_frames / 1e6

    @property
    def cfg_factor(self) -> int:
        # With guidance > 1 every step runs the transformer twice (cond and uncond).
        return 2 if self.guidance_scale > 1 else 1


def connect_redis(settings: Settings) -> redis.Redis:
    # Bytes, not str: RQ keeps pickled job data in the same database.
    return redis.Redis.from_url(
        settings.redis_url, socket_timeout=5, socket_connect_timeout=2, health_check_interval=30
    )


def attempt_key(video_id: str) -> str:
    """Hash: n (deliveries a worker took), owner (token of the current run), rq (the current RQ job id)."""
    return f"k5:attempt:{video_id}"


def current_rq_id(conn: Any, video_id: str) -> str:
    """The RQ job that may run `video_id` now: the one its attempt hash names once it was requeued or redelivered,
    else the one enqueued with it, under its own id. `conn`: the connection, or a pipeline watching the hash."""
    return (conn.hget(attempt_key(video_id), "rq") or b"").decode() or video_id


def new_rq_id(video_id: str) -> str:
    """A fresh RQ job id for a requeued or redelivered video: its id plus `-r<hex>`."""
    return f"{video_id}-r{secrets.token_hex(4)}"


def video_id_of(rq_id: str) -> str:
    """The video an RQ job runs: its id, or its id plus `-r<hex>` once requeued (new_rq_id)."""
    return rq_id.split("-r", 1)[0]


def new_video_id() -> str:
    # Time-ordered (hex nanoseconds, fixed width) so ids sort by creation, plus 64 random bits.
    return f"video_{time.time_ns():016x}{secrets.token_hex(8)}"


# Pub/sub channel of record changes ("<video id> <model>"), for the gateway's event streams (service/feed.py).
CHANGES = "k5:changes"


def publish_change(pipe: Any, rec: JobRecord, moved: bool = True) -> None:
    """Tell event streams the record changed, in the writer's MULTI: subscribers read it after it is written.
    moved: its status changed, which moves the queue positions of its model's queued jobs (progress does not)."""
    pipe.publish(CHANGES, f"{rec.id} {rec.model}" if moved else rec.id)


def video_key(video_id: str) -> str:
    return f"k5:video:{video_id}"


def index_key(owner: str) -> str:
    return f"k5:videos:{owner}"


def inflight_key(owner: str) -> str:
    # The owner's jobs that are queued or running: added at creation, removed by the terminal transition.
    return f"k5:inflight:{owner}"


Variant = Literal["video", "thumbnail", "spritesheet"]
# Asset name and media type of each downloadable variant, as the worker writes them.
VARIANTS: dict[str, tuple[str, str]] = {
    "video": ("video.mp4", "video/mp4"),
    "thumbnail": ("thumbnail.webp", "image/webp"),
    "spritesheet": ("spritesheet.jpg", "image/jpeg"),
}
INPUT_IMAGE = "input.png"


def asset_key(video_id: str, name: str) -> str:
    return f"{video_id}/{name}"


def plan_job(req: VideoCreate, spec: ModelSpec, has_image: bool) -> JobRecord:
    """Check a request against its model and fill in the model's defaults. Raises RequestRejected."""
    size = req.size or spec.default_size
    if size not in spec.sizes:
        raise RequestRejected(
            f"Invalid size '{size}' for model {spec.id}; supported sizes: {', '.join(spec.sizes)}.",
            param="size",
        )
    seconds = req.seconds or spec.default_seconds
    if seconds not in spec.seconds:
        raise RequestRejected(
            f"Invalid seconds '{seconds}' for model {spec.id}; supported: {', '.join(spec.seconds)}.",
            param="seconds",
        )
    if spec.task == "image-to-video" and not has_image:
        raise RequestRejected(
            f"Model {spec.id} is image-to-video and needs input_reference.",
            param="input_reference",
            code="missing",
        )
    if spec.task == "text-to-video" and has_image:
        raise RequestRejected(
            f"Model {spec.id} is text-to-video and takes no input_reference.", param="input_reference"
        )
    steps = req.num_inference_steps or spec.steps
    if steps > spec.max_steps:
        raise RequestRejected(
            f"num_inference_steps must be at most {spec.max_steps} for model {spec.id}.",
            param="num_inference_steps",
        )
    width, height = parse_size(size)
    return JobRecord(
        id=new_video_id(),
        model=spec.id,
        status="queued",
        progress=0,
        created_at=int(time.time()),
        prompt=req.prompt,
        size=size,
        seconds=seconds,
        negative_prompt=req.negative_prompt,
        seed=req.seed if req.seed is not None else secrets.randbelow(MAX_SEED),
        num_inference_steps=steps,
        guidance_scale=req.guidance_scale if req.guidance_scale is not None else spec.guidance,
        metadata=req.metadata,
        webhook_url=req.webhook_url,
        enhance_prompt=req.enhance_prompt,
        width=width,
        height=height,
        num_frames=spec.frames_for(seconds),
        fps=spec.fps,
        task=spec.task,
    )


class JobStore:
    def __init__(self, r: redis.Redis, settings: Settings) -> None:
        self.r = r
        self.settings = settings

    # -- jobs ---------------------------------------------------------------------------------------------

    @property
    def record_ttl_s(self) -> int:
        """How long a finished job's record (and its attempt hash) stays: a week past its assets, so that clients
        can still see what happened."""
        return self.settings.asset_ttl_s + 7 * 86400

    def queue(self, model: str) -> Queue:
        return Queue(name=model, connection=self.r)

    def create(self, rec: JobRecord, max_inflight: int | None = None) -> bool:
        """Store the record and enqueue its job in one transaction: both happen or neither.

        With `max_inflight`, only while the owner has fewer videos queued or in progress, checked in the same
        transaction, so that concurrent requests cannot overshoot it together. Returns False if it had as many.
        """
        inflight = inflight_key(rec.owner)
        with self.r.pipeline() as pipe:
            while True:
                try:
                    if max_inflight is not None:
                        pipe.watch(inflight)
                        if pipe.scard(inflight) >= max_inflight:
                            return False
                    pipe.multi()
                    pipe.set(video_key(rec.id), rec.model_dump_json())
                    pipe.zadd(index_key(rec.owner), {rec.id: 0})
                    pipe.sadd(inflight, rec.id)
                    self.enqueue(pipe, rec.model, rec.id, rec.id, description=f"video {rec.id}")
                    pipe.execute()
                    break
                except redis.WatchError:
                    continue  # another of the owner's videos was created or finished meanwhile: check again
        log.info("queued", extra={"video_id": rec.id, "model": rec.model})
        return True

    def enqueue(
        self, pipe: Any, model: str, video_id: str, rq_id: str, *, description: str, at_front: bool = False
    ) -> None:
        """Put one RQ job for `video_id` on its model's queue, inside the caller's transaction. A requeued video
        gets a new `rq_id` each time: the attempt record names the current one, and only that one may start."""
        self.queue(model).enqueue_call(
            JOB_FUNC,
            args=(video_id,),
            job_id=rq_id,
            timeout=self.settings.job_timeout_s,
            # The job record is the result; RQ's own copy is not needed.
            result_ttl=0,
            failure_ttl=7 * 86400,
            description=description,
            at_front=at_front,
            pipeline=pipe,
        )

    def inflight(self, owner: str) -> int:
        return int(self.r.scard(inflight_key(owner)))

    def get(self, video_id: str) -> JobRecord | None:
        raw = self.r.get(video_key(video_id))
        return JobRecord.model_validate_json(raw) if raw else None

    def list(
        self, owner: str, *, after: str | None = None, limit: int = 20, order: str = "desc"
    ) -> tuple[list[JobRecord], bool]:
        """One page of an owner's videos after the cursor, newest first by default; and whether more follow."""
        index = index_key(owner)
        records: list[JobRecord] = []
        cursor = after
        while len(records) <= limit:
            want = limit + 1 - len(records)
            if order == "desc":
                ids = self.r.zrevrangebylex(index, f"({cursor}" if cursor else "+", "-", start=0, num=want)
            else:
                ids = self.r.zrangebylex(index, f"({cursor}" if cursor else "-", "+", start=0, num=want)
            if not ids:
                break
            ids = [i.decode() for i in ids]
            raws = self.r.mget([video_key(i) for i in ids])
            gone = [i for i, raw in zip(ids, raws, strict=True) if raw is None]
            if gone:  # records expire on their own; drop their ids from the index as we meet them
                self.r.zrem(index, *gone)
            records += [JobRecord.model_validate_json(raw) for raw in raws if raw is not None]
            cursor = ids[-1]
        return records[:limit], len(records) > limit

    def cancel(self, video_id: str) -> JobRecord | None:
        """Stop a job: off the queue if queued; a running one sees its record final at its next step and stops.

        Safe to repeat. Returns the final record, or None if it was already final before this call.
        """
        rec = self.update(video_id, "failed", error={"code": "cancelled", "message": "The job was cancelled."})
        if rec is not None:
            # Its current RQ job: a requeued or redelivered video waits under a new id.
            current = current_rq_id(self.r, video_id)
            queue = self.queue(rec.model)
            for rq_id in dict.fromkeys([video_id, current]):
                if queue.remove(rq_id):  # still waiting, so no worker holds it: its RQ job can go too
                    self.r.delete(queue.job_class.key_for(rq_id))
            log.info("cancelled", extra={"video_id": video_id})
        return rec

    def remove(self, rec: JobRecord) -> None:
        with self.r.pipeline() as pipe:
            pipe.delete(video_key(rec.id))
            pipe.zrem(index_key(rec.owner), rec.id)
            publish_change(pipe, rec)
            pipe.execute()

    def update(
        self,
        video_id: str,
        status: str | None = None,
        *,
        watch: tuple[str, ...] = (),
        guard: Callable[[Any], None] | None = None,
        on_terminal: Callable[[Any, JobRecord], None] | None = None,
        **changes: Any,
    ) -> JobRecord | None:
        """Apply one guarded transition. Returns the new record, or None when the record is gone or terminal.

        Progress only grows; a terminal status is final; a move that is not forward raises ValueError.
        `watch`, `guard` and `on_terminal` let a caller add keys to the optimistic lock, a check that may raise
        (read on the watched pipeline), and writes that join a terminal transition (service/recovery.py).
        """
        key = video_key(video_id)
        with self.r.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(key, *watch)
                    raw = pipe.get(key)
                    if raw is None:
                        return None
                    rec = JobRecord.model_validate_json(raw)
                    if rec.status in TERMINAL:
                        return None
                    if guard is not None:
                        guard(pipe)
                    new_status = status or rec.status
                    if new_status not in _NEXT[rec.status]:
                        raise ValueError(f"{video_id}: {rec.status} -> {new_status} is not allowed")
                    if "progress" in changes:
                        changes["progress"] = max(rec.progress, min(100, int(changes["progress"])))
                    if "error" in changes and isinstance(changes["error"], dict):
                        changes["error"] = VideoError(**changes["error"])
                    new = rec.model_copy(update={**changes, "status": new_status})
                    pipe.multi()
                    pipe.set(key, new.model_dump_json(), keepttl=True)
                    publish_change(pipe, new, moved=new_status != rec.status)
                    if new_status in TERMINAL and new_status != rec.status:
                        pipe.expire(key, self.record_ttl_s)
                        self.terminal_effects(pipe, new)
                        if on_terminal is not None:
                            on_terminal(pipe, new)
                    pipe.execute()
                    return new
                except redis.WatchError:
                    continue

    # -- idempotency ---------------------------------------------------------------------------------------------

    def claim_idempotency(self, owner: str, key: str, fingerprint: str, video_id: str) -> str | None:
        """Bind an Idempotency-Key to a new video. Returns None when this call owns the key, else the video id
        the key already names (same request); raises RequestRejected (409) when the key was used for another."""
        k = f"k5:idem:{owner}:{hashlib.sha256(key.encode()).hexdigest()}"
        value = json.dumps({"fingerprint": fingerprint, "video_id": video_id})
        for _ in range(3):
            if self.r.set(k, value, nx=True, ex=IDEMPOTENCY_TTL_S):
                return None
            raw = self.r.get(k)
            if raw is None:  # expired between the two calls
                continue
            bound = json.loads(raw)
            if bound["fingerprint"] != fingerprint:
                raise RequestRejected(
                    "This Idempotency-Key was already used with a different request.",
                    param="Idempotency-Key",
                    code="idempotency_key_reused",
                    status=409,
                )
            return bound["video_id"]
        raise RequestRejected("Could not claim the Idempotency-Key; retry.", code="conflict", status=409)

    def release_idempotency(self, owner: str, key: str) -> None:
        self.r.delete(f"k5:idem:{owner}:{hashlib.sha256(key.encode()).hexdigest()}")

    def wait_for(self, video_id: str, timeout_s: float = 10.0) -> JobRecord:
        """The record of a video another request is creating right now."""
        deadline = time.monotonic() + timeout_s
        while (rec := self.get(video_id)) is None:
            if time.monotonic() > deadline:
                raise RequestRejected(
                    "The original request with this Idempotency-Key is still being processed; retry.",
                    param="Idempotency-Key",
                    code="idempotency_in_progress",
                    status=409,
                )
            time.sleep(0.05)
        return rec

    def _queue_webhooks(self, pipe: Any, rec: JobRecord) -> None:
        """The terminal event goes out in the same transaction as the status: exactly once, never lost."""
        urls = [u for u in (rec.webhook_url, self.settings.webhook_url) if u]
        if urls and self.settings.webhook_secret:
            ttl = int(self.settings.webhook_retry_window_s) + 7 * 86400
            webhooks.queue_event(pipe, rec.public().model_dump(mode="json"), urls, time.time(), ttl)

    # -- live fields: queue position and estimated completion ------------------------------------------------

    def view(self, rec: JobRecord) -> Video:
        """The public video object with its live fields filled in."""
        if rec.status in TERMINAL:
            return rec.public()
        timing = self.timing(rec.model)
        own = self.estimate_s(rec, timing)
        now = time.time()
        if rec.status == "in_progress":
            eta = None if own is None else now + own * (1 - rec.progress / 100)
            return rec.public(estimated_completion_at=None if eta is None else int(eta))
        # Its current RQ job (a requeued video waits under a new id); not in the queue any more means a worker
        # has just taken it and is starting it: next in line.
        position = self.queue(rec.model).get_job_position(current_rq_id(self.r, rec.id))
        if position is None:
            position = 0
        workers = self.workers_online(rec.model)
        eta = None
        if own is not None and workers:
            # Jobs ahead are assumed to be like this one; running jobs are on average half done.
            eta = now + (position // workers + 0.5) * own + own
        return rec.public(queue_position=position, estimated_completion_at=None if eta is None else int(eta))

    def record_timing(self, rec: JobRecord, step_s: float, overhead_s: float) -> None:
        """A worker's measured seconds per step and per-job overhead, normalised per megavoxel (EWMA)."""
        sample = {
            "step": step_s / (rec.megavoxels * rec.cfg_factor),
            "overhead": overhead_s / rec.megavoxels,
        }
        key = f"k5:timing:{rec.model}"
        old = self.timing(rec.model)
        new = {k: v if old is None else 0.7 * old[k] + 0.3 * v for k, v in sample.items()}
        self.r.hset(key, mapping=new)

    def timing(self, model: str) -> dict[str, float] | None:
        raw = self.r.hgetall(f"k5:timing:{model}")
        return {k.decode(): float(v) for k, v in raw.items()} if raw else None

    @staticmethod
    def estimate_s(rec: JobRecord, timing: dict[str, float] | None) -> float | None:
        if timing is None:
            return None
        return rec.megavoxels * (rec.num_inference_steps * rec.cfg_factor * timing["step"] + timing["overhead"])

    def queue_stats(self) -> dict[str, dict[str, float]]:
        """Per model: queued, in progress, oldest queued age, workers online (for /metrics)."""
        stats = {}
        now = time.time()
        for model in self.queue_models():
            queue = self.queue(model)
            head = queue.get_job_ids(0, 1)
            oldest = 0.0
            if head:
                rec = self.get(video_id_of(head[0]))
                oldest = now - rec.created_at if rec else 0.0
            stats[model] = {
                "queued": queue.count,
                "in_progress": queue.started_job_registry.count,
                "oldest_age_s": oldest,
                "workers": self.workers_online(model),
            }
        return stats

    # -- models and workers --------------------------------------------------------------------------------

    def queue_models(self) -> list[str]:
        """Every model that can have a queue here: announced by a worker, declared served, or queued for on RQ."""
        announced = {m.decode() for m in self.r.smembers("k5:models")}
        queued = {q.name for q in Queue.all(connection=self.r)}
        return sorted(announced | queued | set(self.settings.served_model_ids))

    def announce(self, spec: ModelSpec, worker: str) -> None:
        """A worker's heartbeat: its model is online while beats keep coming."""
        now = time.time()
        with self.r.pipeline() as pipe:
            pipe.set(f"k5:spec:{spec.id}", spec.model_dump_json())
            pipe.set(f"k5:since:{spec.id}", int(now), nx=True)
            pipe.sadd("k5:models", spec.id)
            pipe.zadd(f"k5:workers:{spec.id}", {worker: now})
            pipe.zremrangebyscore(f"k5:workers:{spec.id}", "-inf", now - self._offline_after())
            pipe.execute()

    def retire(self, spec: ModelSpec, worker: str) -> None:
        self.r.zrem(f"k5:workers:{spec.id}", worker)

    def _offline_after(self) -> float:
        return 3 * self.settings.heartbeat_s + 5

    def workers_online(self, model: str) -> int:
        return int(self.r.zcount(f"k5:workers:{model}", time.time() - self._offline_after(), "+inf"))

    def announced_spec(self, model: str) -> ModelSpec | None:
        raw = self.r.get(f"k5:spec:{model}")
        return ModelSpec.model_validate_json(raw) if raw else None

    def served_spec(self, model: str) -> ModelSpec | None:
        """The spec of a model this deployment serves now: a live worker, or declared for scale-to-zero."""
        if self.workers_online(model) > 0:
            return self.announced_spec(model)
        if model in self.settings.served_model_ids:
            return self.announced_spec(model) or find_spec(model)
        return None

    def served_since(self, model: str) -> int:
        """When a worker first served `model` on this deployment (0: never)."""
        return int(self.r.get(f"k5:since:{model}") or 0)

    def known_models(self) -> list[ModelSpec]:
        """The catalogue, the declared models and every model a worker has announced, announced specs first."""
        announced = sorted(m.decode() for m in self.r.smembers("k5:models"))
        ids = dict.fromkeys([*announced, *self.settings.served_model_ids, *CATALOGUE])
        specs = [self.announced_spec(m) or find_spec(m) for m in ids]
        return [s for s in specs if s is not None]

    def online_models(self) -> list[ModelSpec]:
        ids = sorted(m.decode() for m in self.r.smembers("k5:models"))
        specs = [self.announced_spec(m) for m in ids if self.workers_online(m) > 0]
        return [s for s in specs if s is not None]

    def default_model(self) -> str | None:
        if self.settings.default_model:
            return self.settings.default_model
        for spec in self.online_models():
            if spec.task == "text-to-video":
                return spec.id
        for model in self.settings.served_model_ids:
            spec = find_spec(model)
            if spec and spec.task == "text-to-video":
                return model
        return None

    # -- recovery (service/recovery.py) ----------------------------------------------------------------------

    def terminal_effects(self, pipe: Any, rec: JobRecord) -> None:
        """Everything a terminal transition does besides writing the record: update() and the owner-checked
        transitions of service/recovery.py (a run's completion, worker_lost) all go through here."""
        self._queue_webhooks(pipe, rec)
        pipe.srem(inflight_key(rec.owner), rec.id)
