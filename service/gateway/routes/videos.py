"""/v1/videos: thin handlers over service.gateway.videos."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Header, Path, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, RedirectResponse, StreamingResponse
from pydantic import BaseModel

from service.contract.jobs import JobStore, Variant
from service.contract.lifecycle import Created
from service.contract.schemas import TERMINAL, VIDEO_ID_PATTERN, Video, VideoDeleted, VideoList
from service.gateway import streams, videos
from service.gateway.deps import CallerDep, OwnerDep, RosterDep, SettingsDep, StorageDep, StoreDep
from service.gateway.errors import responses
from service.gateway.forms import parse_create, parse_remix

router = APIRouter(prefix="/v1", tags=["videos"])

VideoId = Annotated[str, Path(description="The video's id.")]
# How long clients should wait between polls of a job that is not finished (the openai SDK reads this).
POLL_AFTER_MS = "1000"

IdempotencyKey = Annotated[
    str | None,
    Header(
        min_length=1,
        max_length=255,
        description="Send the same key to retry safely: the same request returns the original video (24 h).",
    ),
]


def _json(body: BaseModel, headers: dict[str, str] | None = None) -> Response:
    """The answer as JSON straight from the model: FastAPI would dump it, validate the dump against the
    response model and encode it again (some 80% of a list page's serialisation). `response_model` still
    documents each route's body."""
    return Response(body.model_dump_json(), media_type="application/json", headers=headers)


_CREATE_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/VideoCreate"}},
            "multipart/form-data": {
                "schema": {"$ref": "#/components/schemas/VideoCreateForm"},
                "encoding": {"metadata": {"style": "deepObject", "explode": True}},
            },
        },
    }
}


@router.post(
    "/videos",
    response_model=Video,
    responses=responses(400, 401, 404, 409, 413, 415, 429, 503),
    openapi_extra=_CREATE_BODY,
)
async def create_video(
    request: Request,
    caller: CallerDep,
    store: StoreDep,
    storage: StorageDep,
    settings: SettingsDep,
    roster: RosterDep,
    idempotency_key: IdempotencyKey = None,
) -> Response:
    """Create a video generation job (JSON or multipart/form-data). The answer has status `queued`."""
    body, image = await parse_create(request, settings)

    def create() -> Response:  # one hop to the threadpool for all of the request's Redis work
        made = videos.submit(
            body,
            store,
            storage,
            settings,
            image,
            roster=roster,
            owner=caller.owner,
            ceiling=request.app.state.keys.ceiling(caller.owner),
            idempotency_key=idempotency_key,
            charge=caller,
        )
        return _created(store, made)

    return await run_in_threadpool(create)


def _created(store: JobStore, made: Created) -> Response:
    """The answer to a create or a remix: the video object, marked when it is an Idempotency-Key replay (the
    earlier video, whose live fields are read now)."""
    if made.live is None:
        return _json(store.view(made.record), {"Idempotent-Replayed": "true"})
    return _json(store.view_live(made.record, made.live))


@router.post(
    "/videos/{video_id}/remix",
    response_model=Video,
    responses=responses(400, 401, 404, 409, 410, 413, 415, 429, 503),
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/VideoRemix"}}},
        }
    },
)
async def remix_video(
    video_id: VideoId,
    request: Request,
    owner: OwnerDep,
    store: StoreDep,
    storage: StorageDep,
    settings: SettingsDep,
    roster: RosterDep,
    idempotency_key: IdempotencyKey = None,
) -> Response:
    """Remix a completed video: a new video with a new prompt.

    The new job takes the source's model, size, seconds, seed, negative prompt, steps, guidance and input image,
    and names its source in `remixed_from_video_id`.
    """
    body = await parse_remix(request)

    def remix() -> Response:
        made = videos.remix(
            video_id,
            body.prompt,
            store,
            storage,
            settings,
            roster=roster,
            owner=owner,
            ceiling=request.app.state.keys.ceiling(owner),
            idempotency_key=idempotency_key,
        )
        return _created(store, made)

    return await run_in_threadpool(remix)


@router.get("/videos", response_model=VideoList, responses=responses(400, 401, 429, 503))
def list_videos(
    owner: OwnerDep,
    store: StoreDep,
    after: Annotated[str | None, Query(pattern=VIDEO_ID_PATTERN, description="List videos after this id.")] = None,
    limit: Annotated[int, Query(ge=1, le=100, description="Page size.")] = 20,
    order: Annotated[Literal["asc", "desc"], Query(description="By creation time.")] = "desc",
) -> Response:
    """Your videos, newest first by default, a page at a time (cursor: `after` = the last id you got)."""
    records, has_more = store.list(owner, after=after, limit=limit, order=order)
    data = store.view_many(records)
    return _json(
        VideoList(
            data=data,
            first_id=data[0].id if data else None,
            last_id=data[-1].id if data else None,
            has_more=has_more,
        )
    )


@router.get("/videos/{video_id}", response_model=Video, responses=responses(404, 401, 429, 503))
def retrieve_video(video_id: VideoId, caller: CallerDep, store: StoreDep) -> Response:
    """The video object: status and progress while it is made, then timestamps or the error."""
    rec, view = videos.get_owned_view(store, video_id, caller)
    return _json(view, None if rec.status in TERMINAL else {"openai-poll-after-ms": POLL_AFTER_MS})


@router.get(
    "/videos/{video_id}/events",
    response_class=StreamingResponse,
    responses={
        200: {
            "description": "Server-Sent Events: `event: video` with the video object as `data`, on every change of "
            "status, progress or queue position, each with an `id` to resume from (Last-Event-ID); the stream "
            "ends after a terminal status, or after its lifetime with a `retry` hint. 429 `too_many_streams` "
            "when the key has K5_SSE_MAX_STREAMS_PER_KEY streams open.",
            "content": {"text/event-stream": {"schema": {"type": "string"}}},
        },
        **responses(400, 404, 401, 429, 503),
    },
)
async def video_events(
    video_id: VideoId,
    owner: OwnerDep,
    store: StoreDep,
    settings: SettingsDep,
    last_event_id: Annotated[str | None, Header(alias="Last-Event-ID", max_length=100)] = None,
) -> StreamingResponse:
    """Live status and progress without a polling loop. A stream lasts at most K5_SSE_MAX_LIFETIME_S; the
    client then reconnects with Last-Event-ID and gets only what changed since."""
    await run_in_threadpool(videos.get_owned, store, video_id, owner)  # a 404 before the stream starts
    return StreamingResponse(
        streams.open_stream(store, settings, video_id, owner, last_event_id),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


@router.delete("/videos/{video_id}", response_model=VideoDeleted, responses=responses(404, 401, 429, 503))
def delete_video(video_id: VideoId, owner: OwnerDep, store: StoreDep, storage: StorageDep) -> VideoDeleted:
    """Delete a video and its stored files; a job still running is cancelled first."""
    videos.delete(store, storage, video_id, owner)
    return VideoDeleted(id=video_id)


@router.post("/videos/{video_id}/cancel", response_model=Video, responses=responses(404, 409, 401, 429, 503))
def cancel_video(video_id: VideoId, owner: OwnerDep, store: StoreDep) -> Video:
    """Cancel a queued or running job: it ends `failed` with error code `cancelled`. Safe to repeat."""
    return store.view(videos.cancel(store, video_id, owner))


@router.get(
    "/videos/{video_id}/content",
    response_class=Response,
    responses={
        200: {
            "description": "The content (local storage).",
            "content": {"video/mp4": {}, "image/webp": {}, "image/jpeg": {}},
        },
        302: {"description": "Redirect to a short-lived presigned URL of the object store."},
        **responses(400, 404, 409, 410, 401, 429, 503),
    },
)
def download_content(
    video_id: VideoId,
    owner: OwnerDep,
    store: StoreDep,
    storage: StorageDep,
    variant: Annotated[Variant, Query(description="Which asset.")] = "video",
) -> Response:
    """The finished MP4 (`video`), a WebP `thumbnail`, or a JPEG `spritesheet` of frames."""
    content = videos.locate_content(videos.get_owned(store, video_id, owner), variant, storage)
    if content.url is not None:
        return RedirectResponse(content.url, status_code=302)
    assert content.path is not None
    return FileResponse(
        content.path, media_type=content.media_type, filename=content.filename, content_disposition_type="inline"
    )
