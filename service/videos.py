"""What the video routes do: submit a request as a job, find a video, locate its content."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from service.images import decode_data_url, prepare_image
from service.jobs import JobRecord, JobStore, RequestRejected, asset_key, plan_job
from service.schemas import VideoCreate
from service.settings import Settings
from service.storage import Storage

log = logging.getLogger(__name__)

Variant = Literal["video", "thumbnail", "spritesheet"]
# Asset name and media type of each downloadable variant, as the worker writes them.
VARIANTS: dict[str, tuple[str, str]] = {
    "video": ("video.mp4", "video/mp4"),
    "thumbnail": ("thumbnail.webp", "image/webp"),
    "spritesheet": ("spritesheet.jpg", "image/jpeg"),
}
INPUT_IMAGE = "input.png"


class NotFound(LookupError):
    pass


def submit(
    req: VideoCreate, store: JobStore, storage: Storage, settings: Settings, image: bytes | None = None
) -> JobRecord:
    """Validate a request against its model, store its input image, record and enqueue the job."""
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
    if image is None and req.input_reference is not None:
        image = decode_data_url(req.input_reference.image_url)
    rec = plan_job(req, spec, has_image=image is not None)
    if image is not None:
        png = prepare_image(
            image,
            rec.width,
            rec.height,
            max_bytes=settings.max_image_bytes,
            max_pixels=settings.max_image_pixels,
        )
        rec.input_key = asset_key(rec.id, INPUT_IMAGE)
        storage.put_bytes(rec.input_key, png, "image/png")
    store.create(rec)
    return rec


def cancel(store: JobStore, video_id: str) -> JobRecord:
    """POST /v1/videos/{id}/cancel: harmless to repeat; a completed video cannot be cancelled."""
    rec = get_owned(store, video_id)
    if rec.status == "completed":
        raise RequestRejected(
            f"Video {video_id} is already completed; delete it instead.",
            param="video_id",
            code="video_completed",
            status=409,
        )
    return store.cancel(video_id) or store.get(video_id) or rec


def delete(store: JobStore, storage: Storage, video_id: str) -> None:
    """DELETE /v1/videos/{id}: cancel it if it is still running, then remove its record and its assets."""
    rec = get_owned(store, video_id)
    store.cancel(video_id)
    storage.delete_prefix(rec.id)
    store.remove(rec)


def get_owned(store: JobStore, video_id: str) -> JobRecord:
    rec = store.get(video_id) if video_id.startswith("video_") else None
    if rec is None:
        raise NotFound(video_id)
    return rec


@dataclass
class Content:
    media_type: str
    filename: str
    url: str | None = None  # redirect here (object store)
    path: Path | None = None  # or stream this file (local store)


def locate_content(rec: JobRecord, variant: str, storage: Storage) -> Content:
    if rec.status != "completed":
        raise RequestRejected(
            f"Video {rec.id} is {rec.status}; its content is available once it is completed.",
            param="video_id",
            code="video_not_ready",
            status=409,
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
