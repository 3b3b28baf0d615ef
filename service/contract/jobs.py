"""Job records in Redis, read side: planning a request into a record, enqueueing on RQ, listing, live fields (queue
position, ETA); the registry of online models is service/contract/registry.py. Records are written only by
service/contract/lifecycle.py; service/contract/keys.py names every key. RQ queue per model: the queue's name is
the model id, so each worker pool takes only its model's jobs.
"""

from __future__ import annotations

import builtins
import logging
import math
import secrets
import time
from dataclasses import dataclass
from typing import Any, Literal

import redis
from rq import Queue
from rq.job import Job

from service.contract import keys, lineup, ratelimit
from service.contract.models import ModelSpec, parse_size
from service.contract.problems import InvalidParameter
from service.contract.ratelimit import Charge
from service.contract.record import JobRecord
from service.contract.registry import Registry
from service.contract.schemas import MAX_SEED, TERMINAL, Video, VideoCreate
from service.contract.settings import Settings

log = logging.getLogger(__name__)

JOB_FUNC = "worker.runner.run_job"
# How long RQ keeps a job it saw fail (an abandoned delivery, a timeout, an error before the run). The job record
# says how the video ended, so RQ's copy only has to outlive the janitor's next pass, which looks for abandoned
# deliveries in RQ's failed registry (service/contract/recovery.py): an hour bounds that registry by an hour's failures.
RQ_FAILURE_TTL_S = 3600


def connect_redis(settings: Settings) -> redis.Redis:
    # Bytes, not str: RQ keeps pickled job data in the same database.
    return redis.Redis.from_url(
        settings.redis_url, socket_timeout=5, socket_connect_timeout=2, health_check_interval=30
    )


def current_rq_id(conn: Any, video_id: str) -> str:
    """The RQ job that may run `video_id` now: the one its attempt hash names once it was requeued or redelivered,
    else the one enqueued with it, under its own id. `conn`: the connection, or a pipeline watching the hash."""
    return (conn.hget(keys.attempt(video_id), "rq") or b"").decode() or video_id


def new_rq_id(video_id: str) -> str:
    """A fresh RQ job id for a requeued or redelivered video: its id plus `-r<hex>`."""
    return f"{video_id}-r{secrets.token_hex(4)}"


def video_id_of(rq_id: str) -> str:
    """The video an RQ job runs: its id, or its id plus `-r<hex>` once requeued (new_rq_id)."""
    return rq_id.split("-r", 1)[0]


def new_video_id() -> str:
    # Time-ordered (hex nanoseconds, fixed width) so ids sort by creation, plus 64 random bits.
    return f"video_{time.time_ns():016x}{secrets.token_hex(8)}"


Variant = Literal["video", "thumbnail", "spritesheet"]
# Asset name and media type of each downloadable variant, as the worker writes them.
VARIANTS: dict[str, tuple[str, str]] = {
    "video": ("video.mp4", "video/mp4"),
    "thumbnail": ("thumbnail.webp", "image/webp"),
    "spritesheet": ("spritesheet.jpg", "image/jpeg"),
}
INPUT_IMAGE = "input.png"


def asset_key(prefix: str, name: str) -> str:
    """A stored file: a video's input under `<id>/`, a run's outputs under its own prefix (JobRecord.assets)."""
    return f"{prefix}/{name}"


def size_message(size: str, spec: ModelSpec) -> str:
    """Names the model's sizes, and the one whose aspect ratio is nearest (1280x720 -> 768x512)."""
    message = f"Invalid size '{size}' for model {spec.id}; supported sizes: {', '.join(spec.sizes)}"
    width, height = parse_size(size)
    if not width or not height:
        return message + "."

    def distance(candidate: str) -> float:
        w, h = parse_size(candidate)
        return abs(math.log(w / h) - math.log(width / height))

    return message + f" (the nearest in aspect ratio is {min(spec.sizes, key=distance)})."


def plan_job(req: VideoCreate, spec: ModelSpec, has_image: bool) -> JobRecord:
    """Check a request against its model and fill in the model's defaults. Raises InvalidParameter."""
    size = req.size or spec.default_size
    if size not in spec.sizes:
        raise InvalidParameter(size_message(size, spec), param="size")
    seconds = req.seconds or spec.default_seconds
    if seconds not in spec.seconds:
        raise InvalidParameter(
            f"Invalid seconds '{seconds}' for model {spec.id}; supported: {', '.join(spec.seconds)}.",
            param="seconds",
        )
    if spec.task == "image-to-video" and not has_image:
        raise InvalidParameter(
            f"Model {spec.id} is image-to-video and needs input_reference.",
            param="input_reference",
            code="missing",
        )
    if spec.task == "text-to-video" and has_image:
        raise InvalidParameter(
            f"Model {spec.id} is text-to-video and takes no input_reference.", param="input_reference"
        )
    steps = req.num_inference_steps or spec.steps
    if steps > spec.max_steps:
        raise InvalidParameter(
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


# KEYS: the record, the request's rate window. ARGV: the video id, the key prefixes of the lines, timings and
# workers, the cutoff of a worker's last beat to count as online, the rate limit (0: counted already, or none).
# Reply: {'rate', count} (over the limit: nothing read), {} (gone), {record} (finished), or {record, rank (-1: not
# in the line), timing hash as a flat list, workers online}.
_READ = (
    ratelimit.count_lua("KEYS[2]", "ARGV[6]")
    + """
local raw = redis.call('get', KEYS[1])
if not raw then return {} end
local rec = cjson.decode(raw)
if rec.status ~= 'queued' and rec.status ~= 'in_progress' then return {raw} end
local rank = -1
if rec.status == 'queued' then rank = redis.call('zrank', ARGV[2] .. rec.model, ARGV[1]) or -1 end
local workers = redis.call('zcount', ARGV[4] .. rec.model, ARGV[5], '+inf')
return {raw, rank, redis.call('hgetall', ARGV[3] .. rec.model), workers}
"""
)


@dataclass(frozen=True)
class Live:
    """What a video's live fields come from, read with the record: its rank in its model's line (-1: not in the
    index), the model's measured timing (None until a worker measured one) and its workers online."""

    rank: int
    timing: dict[str, float] | None
    workers: int

    @classmethod
    def of(cls, rank: int, timing_flat: builtins.list[Any], workers: int) -> Live:
        """From a script's reply: the timing hash as HGETALL's flat list."""
        return cls(rank, _timing(dict(zip(timing_flat[::2], timing_flat[1::2], strict=True))), workers)


class JobStore(Registry):
    """Job records and their live fields; the models and workers online come from Registry."""

    def __init__(self, r: redis.Redis, settings: Settings) -> None:
        super().__init__(r, settings)
        self._read = r.register_script(_READ)

    # -- jobs ---------------------------------------------------------------------------------------------

    @property
    def record_ttl_s(self) -> int:
        """How long a finished job's record (and its attempt hash) stays: a week past its assets, so that clients
        can still see what happened."""
        return self.settings.asset_ttl_s + 7 * 86400

    def queue(self, model: str) -> Queue:
        return Queue(name=model, connection=self.r)

    def enqueue(
        self,
        pipe: Any,
        model: str,
        video_id: str,
        rq_id: str,
        *,
        description: str,
        at_front: bool = False,
        place: bool = True,
    ) -> None:
        """Put one RQ job for `video_id` on its model's queue, inside the caller's transaction, and give the video
        its place in line (lineup.py; place=False: the caller's script does). A requeued video gets a new `rq_id`
        each time: the attempt record names the current one, and only that one may start."""
        self.queue(model).enqueue_call(
            JOB_FUNC,
            args=(video_id,),
            job_id=rq_id,
            timeout=self.settings.job_timeout_s,
            # The job record is the result; RQ's own copy is not needed.
            result_ttl=0,
            failure_ttl=RQ_FAILURE_TTL_S,
            description=description,
            at_front=at_front,
            pipeline=pipe,
        )
        if place:
            lineup.add(pipe, model, video_id, front=at_front)

    def forget_rq_job(self, model: str, rq_id: str) -> None:
        """A dead or lost delivery's RQ job: out of the started registry, so RQ's own abandoned-job cleanup does
        not file it as failed later (the job record, not RQ, says how the video ended)."""
        try:
            job = Job.fetch(rq_id, connection=self.r)
            self.queue(model).started_job_registry.remove_executions(job)
            job.delete(remove_from_queue=True)
        except Exception:  # noqa: BLE001 - housekeeping only; the job itself is already requeued
            log.debug("could not remove RQ job %s", rq_id, exc_info=True)

    def inflight(self, owner: str) -> int:
        return int(self.r.scard(keys.inflight(owner)))

    def get(self, video_id: str) -> JobRecord | None:
        raw = self.r.get(keys.video(video_id))
        return JobRecord.model_validate_json(raw) if raw else None

    def list(
        self, owner: str, *, after: str | None = None, limit: int = 20, order: str = "desc"
    ) -> tuple[list[JobRecord], bool]:
        """One page of an owner's videos after the cursor, newest first by default; and whether more follow."""
        index = keys.videos(owner)
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
            page = [keys.text(i) for i in ids]
            raws = self.r.mget([keys.video(i) for i in page])
            gone = [i for i, raw in zip(page, raws, strict=True) if raw is None]
            if gone:  # records expire on their own; drop their ids from the index as we meet them
                self.r.zrem(index, *gone)
            records += [JobRecord.model_validate_json(raw) for raw in raws if raw is not None]
            cursor = page[-1]
        return records[:limit], len(records) > limit

    # -- live fields: queue position and estimated completion ------------------------------------------------

    def view(self, rec: JobRecord) -> Video:
        """The public video object with its live fields filled in."""
        return self.view_many([rec])[0]

    def view_many(self, records: builtins.list[JobRecord]) -> builtins.list[Video]:
        """The public video objects with their live fields (queue position, ETA), in one round trip for them all:
        each model's timing and workers online once, and one ZRANK (lineup.py) per queued video."""
        live = [rec for rec in records if rec.status not in TERMINAL]
        if not live:
            return [rec.public() for rec in records]
        models = sorted({rec.model for rec in live})
        queued = {m: [rec.id for rec in live if rec.status == "queued" and rec.model == m] for m in models}
        now = time.time()
        with self.r.pipeline(transaction=False) as pipe:
            for model in models:
                pipe.hgetall(keys.timing(model))
                pipe.zcount(keys.workers(model), now - self.offline_after_s, "+inf")
                lineup.positions(pipe, model, queued[model])
            replies = pipe.execute()
        timing = {m: _timing(replies[3 * i]) for i, m in enumerate(models)}
        workers = {m: int(replies[3 * i + 1]) for i, m in enumerate(models)}
        ranks: dict[str, int] = {}
        for i, model in enumerate(models):
            ranks |= zip(queued[model], map(int, replies[3 * i + 2]), strict=True)
        return [self._live(rec, timing, workers, ranks, now) for rec in records]

    def get_view(self, video_id: str, charge: Charge | None = None) -> tuple[JobRecord, Video] | None:
        """The record and its public object with the live fields, in one round trip (a script reads the record,
        and for a video not finished its position, its model's timing and workers online); None if gone.
        `charge`: the request's count, taken in the same script (Throttled over the limit)."""
        now = time.time()
        cutoff = now - self.offline_after_s
        prefixes = [keys.queued(""), keys.timing(""), keys.workers("")]
        rate_key, rate_limit = ratelimit.window_of(charge)
        reply = self._read(keys=[keys.video(video_id), rate_key], args=[video_id, *prefixes, cutoff, rate_limit])
        ratelimit.check(charge, reply)
        if not reply:
            return None
        rec = JobRecord.model_validate_json(reply[0])
        if len(reply) == 1 or rec.status in TERMINAL:
            return rec, rec.public()
        return rec, self.view_live(rec, Live.of(int(reply[1]), reply[2], int(reply[3])), now)

    def view_live(self, rec: JobRecord, live: Live, now: float | None = None) -> Video:
        """The public video object from its record and the live state read with it (no round trip)."""
        now = time.time() if now is None else now
        return self._live(rec, {rec.model: live.timing}, {rec.model: live.workers}, {rec.id: live.rank}, now)

    def _live(
        self,
        rec: JobRecord,
        timing: dict[str, dict[str, float] | None],
        workers: dict[str, int],
        ranks: dict[str, int],
        now: float,
    ) -> Video:
        if rec.status in TERMINAL:
            return rec.public()
        own = self.estimate_s(rec, timing[rec.model])
        if rec.status == "in_progress":
            eta = lineup.eta(own, None, workers[rec.model], now, rec.progress)
            return rec.public(estimated_completion_at=None if eta is None else int(eta))
        position: int | None = ranks[rec.id]
        if position == -1:  # queued by a release without the index: RQ's list says where it is
            position = self.queue(rec.model).get_job_position(current_rq_id(self.r, rec.id))
        # Not in the queue any more: a worker has just taken it and is starting it, so it is next in line.
        position = 0 if position is None else int(position)
        eta = lineup.eta(own, position, workers[rec.model], now)
        return rec.public(queue_position=position, estimated_completion_at=None if eta is None else int(eta))

    def record_timing(self, rec: JobRecord, step_s: float, overhead_s: float) -> None:
        """A worker's measured seconds per step and per-job overhead, normalised per megavoxel (EWMA)."""
        sample = {
            "step": step_s / (rec.megavoxels * rec.cfg_factor),
            "overhead": overhead_s / rec.megavoxels,
        }
        key = keys.timing(rec.model)
        old = self.timing(rec.model)
        new = {k: v if old is None else 0.7 * old[k] + 0.3 * v for k, v in sample.items()}
        self.r.hset(key, mapping={"step": new["step"], "overhead": new["overhead"]})

    def timing(self, model: str) -> dict[str, float] | None:
        return _timing(self.r.hgetall(keys.timing(model)))

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
                # Runs in progress, also those a worker encodes and uploads after its RQ job returned (worker/post.py):
                # the model's jobs in flight less those waiting. RQ's started registry would miss the latter.
                "in_progress": max(0, self.r.llen(keys.demand(model)) - queue.count),
                "oldest_age_s": oldest,
                "workers": self.workers_online(model),
            }
        return stats


def _timing(raw: dict) -> dict[str, float] | None:
    """A model's k5:timing hash as numbers; None until a worker has measured one."""
    return {keys.text(k): float(v) for k, v in raw.items()} if raw else None
