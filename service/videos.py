"""What the video routes do: submit a request as a job, find a video, locate its content."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from starlette.concurrency import run_in_threadpool

from service.auth import too_many
from service.feed import FALLBACK_S, ChangeFeed, feed_for
from service.images import decode_data_url, prepare_image
from service.jobs import INPUT_IMAGE, VARIANTS, JobRecord, JobStore, RequestRejected, asset_key, plan_job
from service.schemas import TERMINAL, VideoCreate
from service.settings import Settings
from service.storage import Storage, StorageError, StorageFull
from service.webhooks import UnsafeURL, URLPolicy

log = logging.getLogger(__name__)


class NotFound(LookupError):
    pass


def submit(
    req: VideoCreate,
    store: JobStore,
    storage: Storage,
    settings: Settings,
    image: bytes | None = None,
    *,
    owner: str = "anonymous",
    idempotency_key: str | None = None,
) -> tuple[JobRecord, bool]:
    """Validate a request against its model, store its input image, record and enqueue the job.

    Returns the record and whether it is a replay of an earlier request with the same Idempotency-Key.
    """
    model = req.model or store.default_model()
    if model is None:
        raise RequestRejected(
            "No model given and no text-to-video model is being served.",
            param="model",
            code="model_not_found",
            status=404,
        )
    spec = store.served_spec(model)
    if spec is None:
        online = ", ".join(s.id for s in store.online_models()) or "none"
        raise RequestRejected(
            f"The model '{model}' is not served by this deployment (online: {online}).",
            param="model",
            code="model_not_found",
            status=404,
        )
    if req.webhook_url is not None:
        check_webhook_url(req.webhook_url, settings)
    if image is None and req.input_reference is not None:
        image = decode_data_url(req.input_reference.image_url)
    rec = plan_job(req, spec, has_image=image is not None)
    rec.owner = owner
    check_capacity(store, settings, owner, spec.id)
    check_storage(storage.available)
    if idempotency_key is not None:
        existing = store.claim_idempotency(owner, idempotency_key, fingerprint(req, image), rec.id)
        if existing is not None:
            return store.wait_for(existing), True
    try:
        if image is not None:
            png = prepare_image(
                image, rec.width, rec.height, max_bytes=settings.max_image_bytes, max_pixels=settings.max_image_pixels
            )
            rec.input_key = asset_key(rec.id, INPUT_IMAGE)
            check_storage(lambda: storage.put_bytes(rec.input_key, png, "image/png"))
        if not store.create(rec, max_inflight=settings.max_inflight_per_key):
            if rec.input_key:
                storage.delete_prefix(rec.id)
            raise too_many_inflight(settings)
    except BaseException:
        if idempotency_key is not None:
            store.release_idempotency(owner, idempotency_key)
        raise
    return rec, False


def check_capacity(store: JobStore, settings: Settings, owner: str, model: str) -> None:
    """Backpressure before anything is stored: the key's jobs in flight, and the model's queue.

    The in-flight limit is checked again, atomically, when the job is created (JobStore.create); this early
    check only spares a request that would be refused the image upload. The queue depth is checked here only:
    a burst of concurrent requests can overshoot it by the burst's size, which is fine for a load-shedding cap.
    """
    if store.inflight(owner) >= settings.max_inflight_per_key:
        raise too_many_inflight(settings)
    if store.queue(model).count >= settings.max_queue_depth:
        raise too_many(f"The queue of model {model} is full; retry later.", "queue_full", 30)


def check_storage(call: Callable[[], None]) -> None:
    """A store that is away or full refuses new jobs with a 503 and Retry-After (which clients retry), rather
    than accepting work whose video could not be kept."""
    try:
        call()
    except StorageError as e:
        full = isinstance(e, StorageFull)
        err = RequestRejected(
            f"The server's storage is {'full' if full else 'unavailable'}; retry later.",
            code="storage_full" if full else "storage_unavailable",
            status=503,
        )
        err.headers = {"Retry-After": "30" if full else "5"}
        raise err from e


def too_many_inflight(settings: Settings) -> RequestRejected:
    return too_many(
        f"You have {settings.max_inflight_per_key} videos queued or in progress; wait for one to finish.",
        "too_many_inflight",
        5,
    )


def fingerprint(req: VideoCreate, image: bytes | None) -> str:
    """What makes two requests 'the same' for an Idempotency-Key: every field, and the image's bytes."""
    h = hashlib.sha256(req.model_dump_json(exclude_none=True).encode())
    if image is not None:
        h.update(hashlib.sha256(image).digest())
    return h.hexdigest()


def check_webhook_url(url: str, settings: Settings) -> None:
    if not settings.webhook_secret:
        raise RequestRejected(
            "Webhooks are not enabled on this deployment (no signing secret is configured).",
            param="webhook_url",
            code="webhooks_disabled",
        )
    try:
        URLPolicy(settings.webhook_allowed_hosts).check(url)
    except UnsafeURL as e:
        raise RequestRejected(f"Invalid webhook_url: {e}.", param="webhook_url", code="unsafe_webhook_url") from e


def cancel(store: JobStore, video_id: str, owner: str) -> JobRecord:
    """POST /v1/videos/{id}/cancel: harmless to repeat; a completed video cannot be cancelled."""
    rec = get_owned(store, video_id, owner)
    if rec.status == "completed":
        raise RequestRejected(
            f"Video {video_id} is already completed; delete it instead.",
            param="video_id",
            code="video_completed",
            status=409,
        )
    return store.cancel(video_id) or store.get(video_id) or rec


def delete(store: JobStore, storage: Storage, video_id: str, owner: str) -> None:
    """DELETE /v1/videos/{id}: cancel it if it is still running, then remove its record and its assets."""
    rec = get_owned(store, video_id, owner)
    store.cancel(video_id)
    storage.delete_prefix(rec.id)
    store.remove(rec)


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
        raise NotFound(video_id)
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
        raise RequestRejected(
            f"Video {rec.id} failed ({reason}); it has no content.", param="video_id", code="video_failed", status=409
        )
    if rec.status != "completed":
        raise RequestRejected(
            f"Video {rec.id} is {rec.status}; its content is available once it is completed.",
            param="video_id",
            code="video_not_ready",
            status=409,
        )
    if rec.expires_at is not None and rec.expires_at <= time.time():
        raise RequestRejected(
            f"The files of video {rec.id} expired at {rec.expires_at} and were deleted.",
            param="video_id",
            code="asset_expired",
            status=410,
        )
    name, media_type = VARIANTS[variant]
    key = asset_key(rec.id, name)
    filename = f"{rec.id}.{name.rsplit('.', 1)[1]}"
    url = storage.presigned_url(key, filename)
    if url is not None:
        return Content(media_type, filename, url=url)
    path = storage.local_path(key)
    if path is None:
        raise RequestRejected(
            f"The {variant} of video {rec.id} is no longer stored.",
            param="variant",
            code="asset_gone",
            status=410,
        )
    return Content(media_type, filename, path=path)
