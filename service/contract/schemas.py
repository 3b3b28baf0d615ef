"""The API models: the request a client sends, the video object it gets back, the error envelope.

Field names follow OpenAI's /v1/videos so that apps and the official SDK work unchanged; k5serve's own
fields are extensions that the SDK ignores. Limits that do not depend on the model live here in Field(...);
the ones that do (sizes, durations, step counts) are checked against the model's spec in jobs.py.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, computed_field

Status = Literal["queued", "in_progress", "completed", "failed"]
# Lanes of a model's queue: every worker of the model takes interactive jobs before batch ones.
Priority = Literal["interactive", "batch"]
TERMINAL: frozenset[str] = frozenset({"completed", "failed"})

MAX_PROMPT_CHARS = 32_000
MAX_SEED = 2**63 - 1
# The furthest a request's deadline may lie ahead: a week, well inside the life of a job record.
MAX_DEADLINE_S = 7 * 86400
# The API's string patterns, and what each means for people (error messages say that, not the regex).
NOT_BLANK = r"\S"
SIZE_PATTERN = r"^[0-9]{1,5}x[0-9]{1,5}$"
SECONDS_PATTERN = r"^[0-9]{1,3}$"
VIDEO_ID_PATTERN = r"^video_[0-9a-f]{32}$"
PATTERN_HINTS = {
    NOT_BLANK: "must not be blank",
    SIZE_PATTERN: "must be WIDTHxHEIGHT, e.g. '768x512'",
    SECONDS_PATTERN: "must be a whole number of seconds, as a string, e.g. '5'",
    VIDEO_ID_PATTERN: "must be a video id, as returned by POST /v1/videos",
}

MetadataKey = Annotated[str, StringConstraints(min_length=1, max_length=64)]
MetadataValue = Annotated[str, StringConstraints(max_length=512)]


class InputReference(BaseModel):
    model_config = ConfigDict(extra="forbid")

    image_url: str = Field(
        description="The first frame as a data URL (data:image/png;base64,...). PNG, JPEG or WebP.",
    )


class VideoCreate(BaseModel):
    """POST /v1/videos."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(
        min_length=1,
        max_length=MAX_PROMPT_CHARS,
        pattern=NOT_BLANK,
        description="What the video shows (not only blanks).",
    )
    model: str | None = Field(None, description="Model id; the deployment's default text-to-video model if unset.")
    size: str | None = Field(
        None,
        pattern=SIZE_PATTERN,
        description="Output size as WIDTHxHEIGHT, one of the model's sizes; the model's default if unset.",
    )
    seconds: str | None = Field(
        None, pattern=SECONDS_PATTERN, description="Duration in seconds, one of the model's durations."
    )
    input_reference: InputReference | None = Field(
        None, description="Image-to-video only: the image the video starts from."
    )
    negative_prompt: str | None = Field(
        None,
        max_length=MAX_PROMPT_CHARS,
        description="k5serve extension: what to steer away from (used when guidance_scale > 1).",
    )
    seed: int | None = Field(
        None,
        ge=0,
        le=MAX_SEED,
        description="k5serve extension: the same seed and request give the same video.",
    )
    num_inference_steps: int | None = Field(
        None, ge=1, description="k5serve extension: denoising steps, up to the model's max_steps."
    )
    guidance_scale: float | None = Field(
        None,
        ge=0.0,
        le=20.0,
        allow_inf_nan=False,
        description="k5serve extension: classifier-free guidance; <= 1 disables it.",
    )
    metadata: dict[MetadataKey, MetadataValue] | None = Field(
        None, max_length=16, description="k5serve extension: up to 16 string pairs, returned on the video."
    )
    enhance_prompt: bool | None = Field(
        None,
        description="k5serve extension: expand the prompt with the model's own Qwen2.5-VL first, as upstream "
        "Kandinsky 5 does; the deployment's default (on for published models) if unset.",
    )
    webhook_url: str | None = Field(
        None,
        max_length=2048,
        description="k5serve extension: where to POST the signed video.completed / video.failed event.",
    )
    deadline_s: float | None = Field(
        None,
        gt=0,
        le=MAX_DEADLINE_S,
        allow_inf_nan=False,
        description="k5serve extension: seconds from now by which the job must have started; one not started by "
        "then fails with deadline_exceeded, and one whose estimated completion is later is refused (409 "
        "deadline_unreachable). Give this or deadline_at, not both.",
    )
    deadline_at: float | None = Field(
        None,
        gt=0,
        allow_inf_nan=False,
        description="k5serve extension: the deadline as an absolute unix time (seconds), at most a week ahead.",
    )
    priority: Priority | None = Field(
        None,
        description="k5serve extension: `interactive` jobs are taken before `batch` ones by every worker of the "
        "model; up to the API key's ceiling (set by the operator), which is also the default.",
    )


class VideoRemix(BaseModel):
    """POST /v1/videos/{video_id}/remix: the source video's model, size, duration, seed, negative prompt, steps,
    guidance and input image, with a new prompt."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(
        min_length=1,
        max_length=MAX_PROMPT_CHARS,
        pattern=NOT_BLANK,
        description="What the remixed video shows (not only blanks).",
    )


class VideoError(BaseModel):
    code: str
    message: str


class VideoUsage(BaseModel):
    """What a video used (k5serve extension), summed over its runs: seconds per phase, denoising steps, size.
    While it runs, what it used so far; on a failed video, what it used until it failed."""

    text_encode_seconds: float = 0.0
    denoise_seconds: float = 0.0
    decode_seconds: float = 0.0
    encode_seconds: float = 0.0
    upload_seconds: float = 0.0
    steps: int = Field(0, description="Denoising steps run (a rerun after a lost worker counts again).")
    steps_resumed: int = Field(0, description="Denoising steps not run again because a checkpoint held them.")
    megavoxels: float = Field(0.0, description="width x height x frames / 1e6 of a video that ran.")

    @computed_field  # type: ignore[prop-decorator]
    @property
    def gpu_seconds(self) -> float:
        """The accelerator's share: text encoding, denoising and the VAE decode."""
        return self.text_encode_seconds + self.denoise_seconds + self.decode_seconds


class Video(BaseModel):
    """The video object. The first 13 fields are OpenAI's and are always present (null where unknown)."""

    id: str
    object: Literal["video"] = "video"
    model: str
    status: Status
    progress: int = Field(ge=0, le=100)
    created_at: int
    completed_at: int | None = None
    expires_at: int | None = None
    prompt: str | None = None
    size: str
    seconds: str
    remixed_from_video_id: str | None = None
    error: VideoError | None = None
    # k5serve extensions.
    negative_prompt: str | None = Field(None, description="The negative prompt used, if any.")
    seed: int = Field(description="The seed used (chosen by the server when the request had none).")
    num_inference_steps: int
    guidance_scale: float
    metadata: dict[str, str] | None = None
    enhanced_prompt: str | None = Field(None, description="The expanded prompt, when enhance_prompt was used.")
    resumed_from_step: int | None = Field(
        None,
        description="Extension: the denoising step the job went on from after its worker was stopped (a saved "
        "checkpoint); the steps before it were not run again. None when it ran from step 0.",
    )
    priority: Priority | None = Field(None, description="The lane the job was queued in.")
    queue_position: int | None = Field(
        None, description="While queued: jobs ahead of this one in its model's queue (both lanes)."
    )
    estimated_completion_at: int | None = Field(
        None, description="While not finished: estimated unix time of completion, from measured step times."
    )
    deadline_at: float | None = Field(None, description="The request's deadline (unix time), if it had one.")
    usage: VideoUsage | None = Field(
        None, description="What the video used: so far while it runs, in total once finished (zero if it never ran)."
    )


class UsageReport(VideoUsage):
    """GET /v1/usage: the calling key's totals over whole UTC days (k5serve extension)."""

    object: Literal["usage"] = "usage"
    owner: str = Field(description="The key's owner id, as K5_USAGE_LABELS names it.")
    start: int = Field(description="Start of the first day counted (unix seconds, UTC midnight).")
    end: int = Field(description="End of the last day counted (exclusive).")
    videos_completed: int = 0
    videos_failed: int = 0
    megavoxels: float = Field(0.0, description="Sum over the videos that ran.")


class VideoList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Video]
    first_id: str | None
    last_id: str | None
    has_more: bool


class VideoDeleted(BaseModel):
    id: str
    object: Literal["video.deleted"] = "video.deleted"
    deleted: bool = True


class ModelObject(BaseModel):
    """OpenAI's model object plus what a client needs to build a valid request."""

    id: str
    object: Literal["model"] = "model"
    created: int = Field(description="When a worker first served this model here (0: never).")
    owned_by: str
    task: Literal["text-to-video", "image-to-video"]
    sizes: list[str] = Field(description="Allowed sizes (WIDTHxHEIGHT); the first is the default.")
    seconds: list[str] = Field(description="Allowed durations.")
    default_size: str
    default_seconds: str
    num_frames: dict[str, int] = Field(description="Frames of each duration.")
    fps: int
    default_num_inference_steps: int
    max_num_inference_steps: int
    default_guidance_scale: float
    attention: Literal["dense", "nabla"]
    online: bool = Field(description="A worker serving this model is up now.")
    workers: int = Field(description="Workers serving this model now.")
    parallel: list[str] = Field(
        default_factory=list,
        description="k5serve extension: how the pools online spread one video over GPUs, as K5_PARALLEL writes it "
        "('none': one GPU; 'cfg=2': guidance branches on two; 'sp=4': visual tokens over four; 'cfg=2,sp=4': eight).",
    )
    description: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelObject]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


class HealthStatus(BaseModel):
    status: Literal["ok", "unavailable"]
    checks: dict[str, str] = Field(default_factory=dict)
