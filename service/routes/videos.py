"""/v1/videos: thin handlers over service.videos."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query, Response
from fastapi.responses import FileResponse, RedirectResponse

from service import videos
from service.deps import SettingsDep, StorageDep, StoreDep
from service.errors import responses
from service.schemas import TERMINAL, Video, VideoCreate

router = APIRouter(prefix="/v1", tags=["videos"])

VideoId = Annotated[str, Path(max_length=100, description="The video's id.")]
# How long clients should wait between polls of a job that is not finished (the openai SDK reads this).
POLL_AFTER_MS = "1000"


@router.post("/videos", response_model=Video, responses=responses(400, 404, 413, 503))
def create_video(body: VideoCreate, store: StoreDep, storage: StorageDep, settings: SettingsDep) -> Video:
    """Create a video generation job. The answer is the video object with status `queued`."""
    return videos.submit(body, store, storage, settings).public()


@router.get("/videos/{video_id}", response_model=Video, responses=responses(404, 503))
def retrieve_video(video_id: VideoId, store: StoreDep, response: Response) -> Video:
    """The video object: status and progress while it is made, then timestamps or the error."""
    rec = videos.get_owned(store, video_id)
    if rec.status not in TERMINAL:
        response.headers["openai-poll-after-ms"] = POLL_AFTER_MS
    return rec.public()


@router.get(
    "/videos/{video_id}/content",
    response_class=Response,
    responses={
        200: {
            "description": "The content (local storage).",
            "content": {"video/mp4": {}, "image/webp": {}, "image/jpeg": {}},
        },
        302: {"description": "Redirect to a short-lived presigned URL of the object store."},
        **responses(400, 404, 409, 410, 503),
    },
)
def download_content(
    video_id: VideoId,
    store: StoreDep,
    storage: StorageDep,
    variant: Annotated[videos.Variant, Query(description="Which asset.")] = "video",
) -> Response:
    """The finished MP4 (`video`), a WebP `thumbnail`, or a JPEG `spritesheet` of frames."""
    content = videos.locate_content(videos.get_owned(store, video_id), variant, storage)
    if content.url is not None:
        return RedirectResponse(content.url, status_code=302)
    assert content.path is not None
    return FileResponse(
        content.path,
        media_type=content.media_type,
        filename=content.filename,
        content_disposition_type="inline",
    )
