"""Resumable jobs: the denoising state saved at a step boundary, and a requeued job resumed from it.

What a step boundary holds, in diffusers 0.42.1's Kandinsky 5 loop (pipelines/kandinsky5/pipeline_kandinsky.py,
pipeline_kandinsky_i2v.py): the latents (for image-to-video with the image latents and the visual-conditioning
channels already in them, so the image is not encoded again), the step index, and the scheduler's sigmas.
The generator draws the noise (and the image latents' sample) once, before the first step, so its state is saved
for completeness, not because later steps read it. The prompt embeddings are saved too: the resumed run does not
run the text encoders (nor the prompt expansion) again, and its conditioning is the stopped run's to the bit.
A step cache's hook state (worker/stepcache.py) is part of the state as well: MagCache's accumulated error and
skip counters decide which of the remaining steps are computed.

Resuming: the pipeline is called with the saved latents and a scheduler whose timesteps and sigmas start at the
saved step (`starting_at`); every later step computes what the uninterrupted run computed, so the frames are
byte-identical on the same kind of device. A checkpoint made by another model, another pipeline version or for a
changed request does not match the fingerprint: it is refused, deleted, and the job starts over.

The state lives at `<video id>/checkpoint/state.pt`: under the video, so DELETE and expiry remove it with the
rest, and outside any run's prefix, so that the next run reads it and a run's cleanup of its own files keeps it.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from service.contract import metrics
from service.contract.record import GenerationRequest
from service.contract.storage import Storage
from worker.textcache import PromptEmbeds

log = logging.getLogger(__name__)

# The layout of the saved dict; a checkpoint of another layout is refused.
FORMAT = 1


def checkpoint_key(video_id: str) -> str:
    return f"{video_id}/checkpoint/state.pt"


@dataclass
class DenoiseState:
    """What the pipeline hands out after each denoising step (worker/pipeline.py)."""

    step: int  # steps done
    total: int
    latents: torch.Tensor
    generator: torch.Generator
    positive: PromptEmbeds
    negative: PromptEmbeds | None
    enhanced_prompt: str | None
    # Read only when the state is saved: a step cache's state is copied off the device.
    step_cache: Callable[[], dict[str, Any]] = dict


@dataclass
class Resume:
    """A loaded checkpoint: what the pipeline needs to go on from `step`."""

    step: int
    latents: torch.Tensor
    generator_state: torch.Tensor
    positive: PromptEmbeds
    negative: PromptEmbeds | None
    enhanced_prompt: str | None
    step_cache: dict[str, Any]


def fingerprint(pipeline, req: GenerationRequest) -> str:
    """What must be equal for a checkpoint to continue this run: the model and its files, the code that runs it
    (diffusers' version, the sampling and step-cache settings, dtype) and every generation parameter of the
    request (the image by its pixels)."""
    import diffusers

    from worker.enhance import image_key

    settings = pipeline.settings
    parts = {
        "format": FORMAT,
        "model": pipeline.spec.id,
        "source": pipeline.spec.source,
        "checkpoint": pipeline.checkpoint,
        "diffusers": diffusers.__version__,
        "torch": torch.__version__,
        "dtype": str(pipeline.pipe.transformer.dtype),
        "device": pipeline.device.type,
        "sampling": pipeline.sampling.describe(),
        "step_cache": [settings.step_cache, pipeline.step_cache.threshold, pipeline.step_cache.interval],
        "max_sequence_length": settings.max_sequence_length,
        "request": {
            "prompt": req.prompt,
            "negative_prompt": req.negative_prompt,
            "size": [req.width, req.height, req.num_frames],
            "steps": req.num_inference_steps,
            "guidance_scale": req.guidance_scale,
            "seed": req.seed,
            "enhance_prompt": pipeline._wants_enhance(req),
            "image": image_key(req.image),
        },
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _embeds(e: PromptEmbeds | None) -> dict[str, torch.Tensor] | None:
    return None if e is None else {"qwen": e.qwen.cpu(), "clip": e.clip.cpu(), "cu_seqlens": e.cu_seqlens.cpu()}


def _from_embeds(d: dict[str, torch.Tensor] | None) -> PromptEmbeds | None:
    return None if d is None else PromptEmbeds(d["qwen"], d["clip"], d["cu_seqlens"])


def serialise(state: DenoiseState, fp: str) -> bytes:
    buffer = io.BytesIO()
    torch.save(
        {
            "format": FORMAT,
            "fingerprint": fp,
            "created_at": time.time(),
            "step": state.step,
            "total": state.total,
            "latents": state.latents.detach().cpu(),
            "generator": state.generator.get_state(),
            "positive": _embeds(state.positive),
            "negative": _embeds(state.negative),
            "enhanced_prompt": state.enhanced_prompt,
            "step_cache": state.step_cache(),
        },
        buffer,
    )
    return buffer.getvalue()


def deserialise(data: bytes, fp: str, total: int, ttl_s: float) -> tuple[Resume | None, str]:
    """The checkpoint, or None and why it is refused."""
    # weights_only: tensors, numbers, strings and containers only; storage is no place to load code from.
    saved = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    if saved.get("format") != FORMAT:
        return None, "another checkpoint format"
    if saved["fingerprint"] != fp:
        return None, "made by another model, pipeline version or request"
    if time.time() - saved["created_at"] > ttl_s:
        return None, "older than checkpoint_ttl_s"
    if saved["total"] != total or not 0 < saved["step"] < total:
        return None, "its step is outside the schedule"
    positive = _from_embeds(saved["positive"])
    assert positive is not None
    resume = Resume(
        step=saved["step"],
        latents=saved["latents"],
        generator_state=saved["generator"],
        positive=positive,
        negative=_from_embeds(saved["negative"]),
        enhanced_prompt=saved["enhanced_prompt"],
        step_cache=saved["step_cache"],
    )
    return resume, ""


@contextlib.contextmanager
def starting_at(scheduler, step: int) -> Iterator[None]:
    """Within the block, the scheduler's next set_timesteps keeps only the schedule from `step` on.

    The pipeline enumerates scheduler.timesteps and the flow-match step reads sigmas[i] and sigmas[i + 1] at its
    own step index, counted from the first timestep it is given: with both arrays cut at `step`, the first step of
    the resumed loop is step `step` of the full schedule, with the same fp32 values."""
    if step == 0:
        yield
        return
    original = scheduler.set_timesteps

    def truncated(*args, **kwargs):
        original(*args, **kwargs)
        scheduler.timesteps = scheduler.timesteps[step:]
        scheduler.sigmas = scheduler.sigmas[step:]
        scheduler._step_index = None
        scheduler._begin_index = None

    scheduler.set_timesteps = truncated
    try:
        yield
    finally:
        del scheduler.set_timesteps  # the instance attribute goes; the class's method is back


class Checkpoints:
    """Saves and loads one job's checkpoint in storage, and counts what resuming saved."""

    def __init__(self, storage: Storage, model: str, every_steps: int, on_shutdown: bool, ttl_s: float) -> None:
        self.storage, self.model = storage, model
        self.every_steps, self.on_shutdown, self.ttl_s = every_steps, on_shutdown, ttl_s

    def due(self, step: int, total: int, stopping: bool) -> bool:
        """Whether the state after `step` is to be saved: at SIGTERM, or every every_steps (not after the last)."""
        if step <= 0 or step >= total:
            return False
        if stopping:
            return self.on_shutdown
        return self.every_steps > 0 and step % self.every_steps == 0

    def save(self, video_id: str, state: DenoiseState, fp: str) -> int:
        """Store the state (replacing the job's previous one); returns its size in bytes."""
        t0 = time.perf_counter()
        data = serialise(state, fp)
        self.storage.put_bytes(checkpoint_key(video_id), data, "application/octet-stream")
        seconds = time.perf_counter() - t0
        metrics.CHECKPOINTS.labels(self.model).inc()
        metrics.CHECKPOINT_SECONDS.labels(self.model).observe(seconds)
        log.info(
            "checkpoint stored",
            extra={"video_id": video_id, "step": state.step, "bytes": len(data), "seconds": round(seconds, 3)},
        )
        return len(data)

    def load(self, video_id: str, fp: str, total: int) -> Resume | None:
        """The job's checkpoint if it continues this run; a refused one is deleted (the job starts over)."""
        key = checkpoint_key(video_id)
        try:
            if not self.storage.exists(key):
                return None
            resume, why = deserialise(self.storage.get_bytes(key), fp, total, self.ttl_s)
        except Exception as e:  # noqa: BLE001 - an unreadable checkpoint costs the steps it held, never the job
            resume, why = None, f"unreadable ({type(e).__name__}: {e})"
        if resume is None:
            log.warning("checkpoint refused: the job starts over", extra={"video_id": video_id, "reason": why})
            metrics.CHECKPOINTS_REFUSED.labels(self.model).inc()
            self.delete(video_id)
            return None
        log.info("resuming from checkpoint", extra={"video_id": video_id, "step": resume.step, "total": total})
        return resume

    def resumed(self, steps: int) -> None:
        metrics.STEPS_RESUMED.labels(self.model).inc(steps)

    def delete(self, video_id: str) -> None:
        try:
            self.storage.delete_prefix(f"{video_id}/checkpoint")
        except Exception:  # noqa: BLE001 - DELETE or expiry of the video removes it later
            log.warning("could not delete the checkpoint", extra={"video_id": video_id}, exc_info=True)
