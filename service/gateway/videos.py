"""What the video routes do: submit a request as a job, find a video, locate its content."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from service.contract.clock import redis_clock
from service.contract.idempotency import IdempotencyKey, replay
from service.contract.jobs import INPUT_IMAGE, VARIANTS, JobRecord, JobStore, asset_key, plan_job
from service.contract.lifecycle import Created, Lifecycle, QueueFull
from service.contract.models import resolve_alias
from service.contract.problems import Conflict, Gone, InvalidParameter, NotFound
from service.contract.ratelimit import Charge
from service.contract.schemas import Priority, Video, VideoCreate
from service.contract.settings import Settings
from service.contract.storage import Storage, StorageError
from service.gateway.admission import (
    check_capacity,
    check_deadline,
    check_storage,
    check_webhook_url,
    deadline_of,
    fingerprint,
    queue_full,
    too_many_inflight,
    unserved_message,
)
from service.gateway.images import decode_data_url, prepare_image
from service.gateway.roster import Roster

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
    roster: Roster,
    owner: str = "anonymous",
    ceiling: Priority = "interactive",
    idempotency_key: str | None = None,
    remixed_from: str | None = None,
    charge: Charge | None = None,
) -> Created:
    """Validate a request against its model, store its input image, record and enqueue the job.

    Returns the record, with its live fields' state, or without (`live` None) when it is a replay of an earlier
    request with the same Idempotency-Key. The models served come from the roster (read once per heartbeat),
    not from Redis on every request. `ceiling`: the highest lane the key may ask for, and its lane when the
    request names none. `charge`: the request's rate count when nothing counted it yet; a plain request (no
    image, Idempotency-Key or deadline) has it counted by its create script, in the same round trip.
    """
    requested = req.model or roster.default_model()
    if requested is None:
        raise NotFound(
            "No model given and no text-to-video model is being served.",
            param="model",
            code="model_not_found",
        )
    model = resolve_alias(requested, settings.aliases)
    spec = roster.served_spec(model)
    if spec is None:
        raise NotFound(unserved_message(requested, model, roster, settings), param="model", code="model_not_found")
    if req.webhook_url is not None:
        check_webhook_url(req.webhook_url, settings)
    if image is None and req.input_reference is not None:
        image = decode_data_url(req.input_reference.image_url)
    if req.priority == "interactive" and ceiling != "interactive":
        raise InvalidParameter(
            f"This API key may queue at most '{ceiling}' jobs; send priority '{ceiling}' or none.",
            param="priority",
            code="priority_not_allowed",
        )
    rec = plan_job(req, spec, has_image=image is not None)
    rec.owner = owner
    rec.priority = req.priority or ceiling
    rec.remixed_from_video_id = remixed_from
    has_deadline = req.deadline_s is not None or req.deadline_at is not None
    if charge is not None and (image is not None or idempotency_key is not None or has_deadline):
        charge.now()  # it reads Redis before its create script: counted first, as every request is
    now = redis_clock(store.r) if has_deadline else 0.0
    rec.deadline_at = deadline_of(req, now)
    idem = None
    if idempotency_key is not None:
        idem = IdempotencyKey(owner, idempotency_key, fingerprint(req, image))
        # A replay makes no new job: it is answered before any limit, and without storing its image again.
        if (earlier := replay(store.r, idem)) is not None:
            return Created(earlier, None)
    if image is not None:  # limits before the upload; without one, the create step checks them on its own
        check_capacity(store, settings, owner, spec.id)
    check_deadline(store, rec, now, "deadline_s" if req.deadline_s is not None else "deadline_at")
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
        made = Lifecycle(store).create(
            rec,
            max_inflight=settings.max_inflight_per_key,
            idem=idem,
            max_depth=settings.max_queue_depth,
            charge=charge,
        )
    except QueueFull as e:
        if rec.input_key:
            storage.delete_prefix(rec.id)
        raise queue_full(e.model) from None
    except BaseException:
        if rec.input_key:
            storage.delete_prefix(rec.id)
        raise
    if made is None or made.record.id != rec.id:
        if rec.input_key:  # no job of this request will read it
            storage.delete_prefix(rec.id)
    if made is None:
        raise too_many_inflight(store, settings, owner)
    return made


def remix(
    source_id: str,
    prompt: str,
    store: JobStore,
    storage: Storage,
    settings: Settings,
    *,
    roster: Roster,
    owner: str,
    ceiling: Priority = "interactive",
    idempotency_key: str | None = None,
) -> Created:
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
    return submit(
        req,
        store,
        storage,
        settings,
        image,
        roster=roster,
        owner=owner,
        ceiling=ceiling,
        idempotency_key=key,
        remixed_from=source.id,
    )


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


def get_owned(store: JobStore, video_id: str, owner: str) -> JobRecord:
    """The caller's video; another key's video is 'not found' too, so ids reveal nothing."""
    rec = store.get(video_id) if video_id.startswith("video_") else None
    if rec is None or rec.owner != owner:
        raise VideoNotFound(video_id)
    return rec


def get_owned_view(store: JobStore, video_id: str, charge: Charge) -> tuple[JobRecord, Video]:
    """get_owned, with the video object's live fields, in one round trip that also counts the request."""
    found = store.get_view(video_id, charge) if video_id.startswith("video_") else None
    if found is None or found[0].owner != charge.owner:
        raise VideoNotFound(video_id)
    return found


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
