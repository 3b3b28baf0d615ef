"""Load and warm a Kandinsky 5 pipeline once; generate(request) -> frames.

The same code loads the published checkpoints (hub repo or downloaded directory) and the tiny test models:
everything goes through diffusers' `from_pretrained`.
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from service.models import ModelSpec, parse_size
from service.settings import Settings

log = logging.getLogger(__name__)

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class GenerationError(RuntimeError):
    """The pipeline ran but its output is unusable (NaN/Inf frames)."""


@dataclass
class GenerationRequest:
    prompt: str
    width: int
    height: int
    num_frames: int
    num_inference_steps: int
    guidance_scale: float
    seed: int
    negative_prompt: str | None = None
    image: Image.Image | None = None


# Called after every denoising step with (steps done, total steps).
StepCallback = Callable[[int, int], None]


def pick_device(settings: Settings) -> torch.device:
    if settings.device != "auto":
        return torch.device(settings.device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pick_dtype(settings: Settings, device: torch.device) -> torch.dtype:
    if settings.dtype != "auto":
        return _DTYPES[settings.dtype]
    # bf16 is the published checkpoints' dtype; CPUs run fp32 faster and exactly.
    return torch.bfloat16 if device.type == "cuda" else torch.float32


class VideoPipeline:
    """A warm Kandinsky 5 pipeline. Not concurrency-safe: the pipeline keeps per-call state on itself."""

    def __init__(self, pipe, spec: ModelSpec, device: torch.device) -> None:
        self.pipe = pipe
        self.spec = spec
        self.device = device

    @classmethod
    def load(cls, settings: Settings, spec: ModelSpec) -> VideoPipeline:
        from diffusers import Kandinsky5I2VPipeline, Kandinsky5T2VPipeline

        device = pick_device(settings)
        dtype = pick_dtype(settings, device)
        pipeline_cls = Kandinsky5I2VPipeline if spec.task == "image-to-video" else Kandinsky5T2VPipeline
        t0 = time.perf_counter()
        pipe = pipeline_cls.from_pretrained(spec.source, dtype=dtype, cache_dir=settings.hf_cache_dir)
        pipe.to(device)
        pipe.set_progress_bar_config(disable=True)
        if getattr(pipe.transformer.config, "attention_type", None) == "nabla":
            # NABLA's block mask only works with the flex backend (REFERENCE: 'BlockMask' has no 'ndim').
            pipe.transformer.set_attention_backend("flex")
        log.info(
            "pipeline loaded",
            extra={
                "model": spec.id,
                "source": spec.source,
                "device": str(device),
                "dtype": str(dtype),
                "seconds": round(time.perf_counter() - t0, 2),
            },
        )
        return cls(pipe, spec, device)

    def generate(self, req: GenerationRequest, on_step: StepCallback | None = None) -> np.ndarray:
        """Run one video; returns uint8 frames (T, H, W, 3)."""

        def callback(pipe, i: int, t, kwargs: dict) -> dict:
            if on_step is not None:
                on_step(i + 1, pipe.num_timesteps)
            return kwargs

        generator = torch.Generator(device=self.device).manual_seed(req.seed)
        kwargs = dict(
            prompt=req.prompt,
            negative_prompt=req.negative_prompt,
            height=req.height,
            width=req.width,
            num_frames=req.num_frames,
            num_inference_steps=req.num_inference_steps,
            guidance_scale=req.guidance_scale,
            generator=generator,
            output_type="np",
            callback_on_step_end=callback,
        )
        if self.spec.task == "image-to-video":
            if req.image is None:
                raise ValueError("image-to-video needs an image")
            kwargs["image"] = req.image
        with torch.inference_mode():
            video = self.pipe(**kwargs).frames[0]
        if not np.isfinite(video).all():
            raise GenerationError("the model produced NaN or Inf values")
        return (np.clip(video, 0.0, 1.0) * 255.0).round().astype(np.uint8)

    def release_memory(self) -> None:
        """After an aborted job: give the cached blocks of its activations back to the device."""
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def warm(self) -> float:
        """One small generation before taking jobs, so the first job does not pay for lazy initialisation."""
        width, height = parse_size(self.spec.sizes[0])
        frames = min(self.spec.seconds.values())
        image = Image.new("RGB", (width, height), (128, 96, 64)) if self.spec.task == "image-to-video" else None
        t0 = time.perf_counter()
        self.generate(
            GenerationRequest(
                prompt="warm-up",
                width=width,
                height=height,
                num_frames=frames,
                num_inference_steps=1,
                guidance_scale=self.spec.guidance,
                seed=0,
                image=image,
            )
        )
        seconds = time.perf_counter() - t0
        log.info("pipeline warm", extra={"model": self.spec.id, "seconds": round(seconds, 2)})
        return seconds
