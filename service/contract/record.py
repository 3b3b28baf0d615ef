"""The stored job record: what Redis keeps under k5:video:<id>, a model of its own, not the public Video.

It is versioned because gateways and workers of two releases read each other's records during a rolling deploy:
a new required field of the public Video must not make a record written by the previous release unreadable, and
a field this release drops must not make the previous release's reader fail. So the record has defaults for
everything a release added, ignores what it does not know, and builds the public Video explicitly (`public`).
Version 1 (the first release) had no `version` field and no `assets`; its assets lay under `<video id>/`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from PIL import Image
from pydantic import BaseModel, ConfigDict

from service.contract.schemas import TERMINAL, Priority, Status, Video, VideoError, VideoUsage

RECORD_VERSION = 2


@dataclass(frozen=True)
class GenerationRequest:
    """One video as the pipeline makes it: what planning decided (JobRecord.generation), nothing re-derived."""

    prompt: str
    width: int
    height: int
    num_frames: int
    num_inference_steps: int
    guidance_scale: float
    seed: int
    negative_prompt: str | None = None
    image: Image.Image | None = None
    # Rewrite the prompt with Qwen2.5-VL first, as upstream does; None = the worker's default (settings).
    enhance_prompt: bool | None = None


class JobRecord(BaseModel):
    """The video as stored, plus what the worker needs and clients never see."""

    # Fields of a newer release are ignored, not an error: its records stay readable here.
    model_config = ConfigDict(extra="ignore")

    version: int = RECORD_VERSION
    id: str
    model: str
    status: Status
    progress: int = 0
    created_at: int
    completed_at: int | None = None
    expires_at: int | None = None
    prompt: str | None = None
    size: str
    seconds: str
    remixed_from_video_id: str | None = None
    error: VideoError | None = None
    negative_prompt: str | None = None
    seed: int
    num_inference_steps: int
    guidance_scale: float
    metadata: dict[str, str] | None = None
    enhanced_prompt: str | None = None
    deadline_at: float | None = None
    # Written by the run as it goes (service/contract/usage.py counts it with the terminal transition).
    usage: VideoUsage | None = None
    # -- never shown to clients ----------------------------------------------------------------------------
    width: int
    height: int
    num_frames: int
    fps: int
    task: str
    input_key: str | None = None
    # The worker of the current (or last) run.
    worker: str | None = None
    # Whose video this is (an API key's id); a key sees only its own videos.
    owner: str = "anonymous"
    webhook_url: str | None = None
    enhance_prompt: bool | None = None
    started_at: float | None = None
    # The lane it was queued in (schemas.Priority); None for a record of a release without lanes.
    priority: Priority | None = None
    # Storage prefix of the run that completed the video: each run writes under its own prefix, so a run that
    # lost its job can neither overwrite nor delete what the run that completed it stored. None: `<id>/` (v1).
    assets: str | None = None
    # The Redis key of the Idempotency-Key bound to this video (service/contract/idempotency.py), so that DELETE
    # can unbind it.
    idempotency_key: str | None = None
    # The step the current (or last) run resumed from a checkpoint at, so the steps it saved; None: from step 0.
    resumed_from_step: int | None = None
    # The step of the last checkpoint a run of it stored (worker/checkpoint.py), written just before the save:
    # a run looks for one, and deletes it at the end, only when this says there may be one. None: never saved.
    checkpoint_step: int | None = None

    def public(self, **live: Any) -> Video:
        """The public video object; `live` adds the fields computed on read (queue position, ETA).

        Built without validating again: every field comes from this record, validated when it was read, and a
        list page builds a hundred of them."""
        return Video.model_construct(
            id=self.id,
            model=self.model,
            status=self.status,
            progress=self.progress,
            created_at=self.created_at,
            completed_at=self.completed_at,
            expires_at=self.expires_at,
            prompt=self.prompt,
            size=self.size,
            seconds=self.seconds,
            remixed_from_video_id=self.remixed_from_video_id,
            error=self.error,
            negative_prompt=self.negative_prompt,
            seed=self.seed,
            num_inference_steps=self.num_inference_steps,
            guidance_scale=self.guidance_scale,
            metadata=self.metadata,
            enhanced_prompt=self.enhanced_prompt,
            deadline_at=self.deadline_at,
            # A finished video that never ran used nothing: zeros, not "unknown".
            usage=self.usage or (VideoUsage() if self.status in TERMINAL else None),
            resumed_from_step=self.resumed_from_step,
            priority=self.priority,
            **live,
        )

    def generation(self, image: Image.Image | None = None) -> GenerationRequest:
        """The request the pipeline runs for this record; `image` is the decoded input_key of image-to-video."""
        return GenerationRequest(
            prompt=self.prompt or "",
            width=self.width,
            height=self.height,
            num_frames=self.num_frames,
            num_inference_steps=self.num_inference_steps,
            guidance_scale=self.guidance_scale,
            seed=self.seed,
            negative_prompt=self.negative_prompt,
            image=image,
            enhance_prompt=self.enhance_prompt,
        )

    @property
    def asset_prefix(self) -> str:
        return self.assets or self.id

    @property
    def megavoxels(self) -> float:
        return self.width * self.height * self.num_frames / 1e6

    @property
    def cfg_factor(self) -> int:
        # With guidance > 1 every step runs the transformer twice (cond and uncond).
        return 2 if self.guidance_scale > 1 else 1
