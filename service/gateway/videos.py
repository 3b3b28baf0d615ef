"""What the video routes do: submit a request as a job, find a video, locate its content."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from starlette.concurrency import run_in_threadpool

from service.contract import keys
from service.contract.idempotency import IdempotencyKey, replay
from service.contract.jobs import INPUT_IMAGE, VARIANTS, JobRecord, JobStore, asset_key, plan_job
from service.contract.lifecycle import Lifecycle
from service.contract.models import ModelSpec, parse_size, resolve_alias
from service.contract.problems import Conflict, Gone, InvalidParameter, NotFound, Throttled, Unavailable
from service.contract.schemas import TERMINAL, VideoCreate
from service.contract.settings import Settings
from service.contract.storage import Storage, StorageError, StorageFull
from service.contract.webhooks import UnsafeURL, URLPolicy
from service.gateway.auth import too_many
from service.gateway.feed import FALLBACK_S, ChangeFeed, feed_for
from service.gateway.images import decode_data_url, prepare_image

log = logging.getLogger(__name__)


class VideoNotFound(NotFound):
    def __init__(self, video_id: str) -> None:
        super().__init__(f"No video found with id '{video_id}'.", param="video_id", code="video_not_found")


def submit(
    req: VideoCreate,
    store: JobStore,
    storage: Storage,
    settings: Settings,
    image: bytes | None = None,
    *,
    owner: str = "anonymous",
    idempotency_key: str | None = None,
    remixed_from: str | None = None,
) -> tuple[JobRecord, bool]:
    """Validate a request against its model, store its input image, record and enqueue the job.

    Returns the record and whether it is a replay of an earlier request with the same Idempotency-Key.
    """
    requested = req.model or store.default_model()
    if requested is None:
        raise NotFound(
            "No model given and no text-to-video model is being served.",
            param="model",
            code="model_not_found",
        )
    model = resolve_alias(requested, settings.aliases)
    spec = store.served_spec(model)
    if spec is None:
        raise NotFound(unserved_message(requested, model, store, settings), param="model", code="model_not_found")
    if req.size is not None and req.size not in spec.sizes:
        raise InvalidParameter(size_message(req.size, spec), param="size")
    if req.webhook_url is not None:
        check_webhook_url(req.webhook_url, settings)
    if image is None and req.input_reference is not None:
        image = decode_data_url(req.input_reference.image_url)
    rec = plan_job(req, spec, has_image=image is not None)
    rec.owner = owner
    rec.remixed_from_video_id = remixed_from
    idem = None
    if idempotency_key is not None:
        idem = IdempotencyKey(owner, idempotency_key, fingerprint(req, image))
        # A replay makes no new job: it is answered before any limit, and without storing its image again.
        if (earlier := replay(store.r, idem)) is not None:
            return earlier, True
    check_capacity(store, settings, owner, spec.id)
    check_storage(storage.available)
    if image is not None:
        png = prepare_image(
            image,
            rec.width,
            rec.height,
            max_bytes=settings.max_image_bytes,
            max_pixels=settings.max_image_pixels,
            max_decodes=settings.max_concurrent_decodes,
        )
        key = rec.input_key = asset_key(rec.id, INPUT_IMAGE)
        check_storage(lambda: storage.put_bytes(key, png, "image/png"))
    try:
        made = Lifecycle(store).create(rec, max_inflight=settings.max_inflight_per_key, idem=idem)
    except BaseException:
        if rec.input_key:
            storage.delete_prefix(rec.id)
        raise
    if made is None or made.id != rec.id:
        if rec.input_key:  # no job of this request will read it
            storage.delete_prefix(rec.id)
    if made is None:
        raise too_many_inflight(store, settings, owner)
    return made, made.id != rec.id


def remix(
    source_id: str,
    prompt: str,
    store: JobStore,
    storage: Storage,
    settings: Settings,
    *,
    owner: str,
    idempotency_key: str | None = None,
) -> tuple[JobRecord, bool]:
    """POST /v1/videos/{id}/remix: a new job like a completed video, with a new prompt (through submit, so every
    check and limit applies). The same seed keeps the composition close to the source's."""
    source = get_owned(store, source_id, owner)
    if source.status != "completed":
        raise Conflict(
            f"Video {source.id} is {source.status}; only a completed video can be remixed.",
            param="video_id",
            code="video_not_ready" if source.status != "failed" else "video_failed",
        )
    image = None
    if source.input_key:
        try:
            image = storage.get_bytes(source.input_key)
        except StorageError as e:
            raise Gone(
                f"The input image of video {source.id} is no longer stored; create a new video instead.",
                param="video_id",
                code="asset_gone",
            ) from e
    req = VideoCreate(
        prompt=prompt,
        model=source.model,
        size=source.size,
        seconds=source.seconds,
        seed=source.seed,
        negative_prompt=source.negative_prompt,
        num_inference_steps=source.num_inference_steps,
        guidance_scale=source.guidance_scale,
        enhance_prompt=source.enhance_prompt,
    )
    # A key names one remix of one source: the same key on another source is another request.
    key = None if idempotency_key is None else f"remix:{source.id}:{idempotency_key}"
    return submit(req, store, storage, settings, image, owner=owner, idempotency_key=key, remixed_from=source.id)


def unserved_message(requested: str, model: str, store: JobStore, settings: Settings) -> str:
    """What to send instead of a model this deployment does not serve."""
    alias = f" (an alias of '{model}')" if model != requested else ""
    online = store.online_models()
    served = ", ".join(f"'{s.id}' ({s.task})" for s in online) or "none is online now"
    aliases = ", ".join(f"'{a}'" for a, target in settings.aliases.items() if target in {s.id for s in online})
    hint = f"; aliases: {aliases}" if aliases else ""
    return (
        f"The model '{requested}'{alias} is not served by this deployment. Use one of: {served}{hint}. "
        "GET /v1/models lists every model; an operator can map other names with K5_MODEL_ALIASES."
    )


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


def check_capacity(store: JobStore, settings: Settings, owner: str, model: str) -> None:
    """Backpressure before anything is stored: the key's jobs in flight, and the model's queue.

    The in-flight limit is checked again, atomically, when the job is created (Lifecycle.create); this early
    check only spares a request that would be refused the image upload. The queue depth is checked here only:
    a burst of concurrent requests can overshoot it by the burst's size, which is fine for a load-shedding cap.
    """
    if store.inflight(owner) >= settings.max_inflight_per_key:
        raise too_many_inflight(store, settings, owner)
    if store.queue(model).count >= settings.max_queue_depth:
        raise too_many(f"The queue of model {model} is full; retry later.", "queue_full", 30)


def check_storage(call: Callable[[], None]) -> None:
    """A store that is away or full refuses new jobs with a 503 and Retry-After (which clients retry), rather
    than accepting work whose video could not be kept."""
    try:
        call()
    except StorageError as e:
        full = isinstance(e, StorageFull)
        raise Unavailable(
            f"The server's storage is {'full' if full else 'unavailable'}; retry later.",
            code="storage_full" if full else "storage_unavailable",
            retry_after_s=30 if full else 5,
        ) from e


def too_many_inflight(store: JobStore, settings: Settings, owner: str) -> Throttled:
    return too_many(
        f"You have {settings.max_inflight_per_key} videos queued or in progress; wait for one to finish.",
        "too_many_inflight",
        first_slot_free_s(store, owner),
    )


def first_slot_free_s(store: JobStore, owner: str, fallback_s: float = 5.0) -> float:
    """Seconds until the key's first job in flight is expected to finish (its estimated_completion_at), so a
    client's retry lands when a slot is free rather than after a fixed guess; the fallback while nothing has
    been timed yet. Only the key's oldest few jobs are looked at: running jobs finish first."""
    names = [keys.video(keys.text(m)) for m in store.r.smembers(keys.inflight(owner))]
    raws = store.r.mget(names) if names else []
    records = [JobRecord.model_validate_json(raw) for raw in raws if raw]
    records = [rec for rec in records if rec.status not in TERMINAL]
    records.sort(key=lambda rec: (rec.status != "in_progress", rec.created_at))
    now = time.time()
    etas = [store.view(rec).estimated_completion_at for rec in records[:4]]
    known = [eta - now for eta in etas if eta is not None]
    return min(max(min(known), 1.0), 3600.0) if known else fallback_s


def fingerprint(req: VideoCreate, image: bytes | None) -> str:
    """What makes two requests 'the same' for an Idempotency-Key: every field, and the image's bytes."""
    h = hashlib.sha256(req.model_dump_json(exclude_none=True).encode())
    if image is not None:
        h.update(hashlib.sha256(image).digest())
    return h.hexdigest()


def check_webhook_url(url: str, settings: Settings) -> None:
    if not settings.webhook_secret:
        raise InvalidParameter(
            "Webhooks are not enabled on this deployment (no signing secret is configured).",
            param="webhook_url",
            code="webhooks_disabled",
        )
    try:
        URLPolicy(settings.webhook_allowed_hosts).check(url)
    except UnsafeURL as e:
        raise InvalidParameter(f"Invalid webhook_url: {e}.", param="webhook_url", code="unsafe_webhook_url") from e


def cancel(store: JobStore, video_id: str, owner: str) -> JobRecord:
    """POST /v1/videos/{id}/cancel: harmless to repeat; a completed video cannot be cancelled."""
    rec = get_owned(store, video_id, owner)
    if rec.status == "completed":
        raise Conflict(
            f"Video {video_id} is already completed; delete it instead.",
            param="video_id",
            code="video_completed",
        )
    return Lifecycle(store).cancel(video_id) or store.get(video_id) or rec


def delete(store: JobStore, storage: Storage, video_id: str, owner: str) -> None:
    """DELETE /v1/videos/{id}: cancel it if it is still running, then remove its record and its assets."""
    rec = get_owned(store, video_id, owner)
    life = Lifecycle(store)
    life.cancel(video_id)
    storage.delete_prefix(rec.id)
    life.remove(rec)


def event_id(view) -> str:
    """The id of a state: a stream resumed with Last-Event-ID skips a state the client already has."""
    return f"{view.status}.{view.progress}.{view.queue_position}"


async def events(
    store: JobStore,
    feed: ChangeFeed,
    video_id: str,
    *,
    last_event_id: str | None = None,
    lifetime_s: float = 600.0,
    ping_s: float = 15.0,
) -> AsyncIterator[str]:
    """SSE frames for one video until it is terminal, deleted, or the stream's lifetime ends (then the client
    reconnects, sending Last-Event-ID). Woken by the change feed, not by polling: an idle stream costs Redis
    nothing but a re-read every few seconds (FALLBACK_S), in case a message was missed."""
    rec = await run_in_threadpool(store.get, video_id)
    if rec is None:
        return
    deadline = time.monotonic() + lifetime_s
    last_sent = time.monotonic()
    with feed.watch(video_id, rec.model) as changed:
        while True:
            changed.clear()
            rec = await run_in_threadpool(store.get, video_id)
            if rec is None:
                return
            view = await run_in_threadpool(store.view, rec)
            eid = event_id(view)
            if eid != last_event_id:
                yield f"id: {eid}\nevent: video\ndata: {view.model_dump_json()}\n\n"
                last_event_id, last_sent = eid, time.monotonic()
            if view.status in TERMINAL:
                return
            # Until a change, the slow re-read, or the end of the lifetime; pings meanwhile.
            reread_at = time.monotonic() + FALLBACK_S
            while True:
                now = time.monotonic()
                if now >= deadline:
                    yield "retry: 1000\n\n"  # lifetime over: reconnect in a second, resuming from the id above
                    return
                try:
                    await asyncio.wait_for(changed.wait(), max(0.0, min(deadline, last_sent + ping_s, reread_at) - now))
                    break
                except TimeoutError:
                    pass
                if time.monotonic() - last_sent >= ping_s:
                    yield ": ping\n\n"  # keeps proxies from closing an idle stream
                    last_sent = time.monotonic()
                if time.monotonic() >= reread_at:
                    break
            await asyncio.sleep(0.05)  # coalesce a burst of step updates into one read


class StreamLimit:
    """Event streams open per API key in this process: a cap, so one key cannot hold the gateway's streams."""

    def __init__(self) -> None:
        self.open: dict[str, int] = {}

    @contextlib.contextmanager
    def hold(self, owner: str, cap: int) -> Iterator[None]:
        if self.open.get(owner, 0) >= cap:
            raise too_many(f"You have {cap} event streams open; close one first.", "too_many_streams", 5)
        self.open[owner] = self.open.get(owner, 0) + 1
        try:
            yield
        finally:
            self.open[owner] -= 1
            if not self.open[owner]:
                del self.open[owner]


STREAMS = StreamLimit()


def open_stream(
    store: JobStore, settings: Settings, video_id: str, owner: str, last_event_id: str | None
) -> AsyncIterator[str]:
    """GET /v1/videos/{id}/events: refuses (429) a key at its cap of open streams before the stream starts."""
    cap = settings.sse_max_streams_per_key
    with STREAMS.hold(owner, cap):
        pass  # the check only; the stream holds its slot while it runs

    async def frames() -> AsyncIterator[str]:
        with STREAMS.hold(owner, cap):
            feed = feed_for(settings.redis_url)
            async for frame in events(
                store,
                feed,
                video_id,
                last_event_id=last_event_id,
                lifetime_s=settings.sse_max_lifetime_s,
                ping_s=settings.sse_ping_s,
            ):
                yield frame

    return frames()


def get_owned(store: JobStore, video_id: str, owner: str) -> JobRecord:
    """The caller's video; another key's video is 'not found' too, so ids reveal nothing."""
    rec = store.get(video_id) if video_id.startswith("video_") else None
    if rec is None or rec.owner != owner:
        raise VideoNotFound(video_id)
    return rec


@dataclass
class Content:
    media_type: str
    filename: str
    url: str | None = None  # redirect here (object store)
    path: Path | None = None  # or stream this file (local store)


def locate_content(rec: JobRecord, variant: str, storage: Storage) -> Content:
    if rec.status == "failed":
        reason = rec.error.code if rec.error else "failed"
        raise Conflict(f"Video {rec.id} failed ({reason}); it has no content.", param="video_id", code="video_failed")
    if rec.status != "completed":
        raise Conflict(
            f"Video {rec.id} is {rec.status}; its content is available once it is completed.",
            param="video_id",
            code="video_not_ready",
        )
    if rec.expires_at is not None and rec.expires_at <= time.time():
        raise Gone(
            f"The files of video {rec.id} expired at {rec.expires_at} and were deleted.",
            param="video_id",
            code="asset_expired",
        )
    name, media_type = VARIANTS[variant]
    key = asset_key(rec.asset_prefix, name)
    filename = f"{rec.id}.{name.rsplit('.', 1)[1]}"
    url = storage.presigned_url(key, filename)
    if url is not None:
        return Content(media_type, filename, url=url)
    path = storage.local_path(key)
    if path is None:
        raise Gone(
            f"The {variant} of video {rec.id} is no longer stored.",
            param="variant",
            code="asset_gone",
        )
    return Content(media_type, filename, path=path)
