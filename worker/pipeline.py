"""Load and warm a Kandinsky 5 pipeline once; generate(request) -> frames.

The same code loads the published checkpoints (hub repo or downloaded directory) and the tiny test models:
everything goes through diffusers' `from_pretrained`. What makes it fast lives beside it: worker/speed.py (attention
kernel, torch.compile, placement, VAE tiling), worker/textcache.py (prompt embeddings), worker/enhance.py (prompt
expansion) and worker/stepcache.py (opt-in step caching). One process per GPU, one generation at a time.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image

from service.models import TINY, ModelSpec, parse_size
from service.record import GenerationRequest
from service.settings import Settings
from worker import speed
from worker.enhance import expand_prompt
from worker.stats import GenerationStats
from worker.stepcache import StepCacher, parse_mag_ratios
from worker.textcache import DEFAULT_NEGATIVE_PROMPT, LRU, PromptEmbeds, TextEncoders

log = logging.getLogger(__name__)

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class GenerationError(RuntimeError):
    """The pipeline ran but its output is unusable (NaN/Inf frames)."""


# Called with (steps done, total steps): once with 0 when the text phase is over, then after every denoising step.
# Raising from it aborts the generation at once (how cancellation works); the pipeline stays usable.
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


def buckets(spec: ModelSpec) -> list[tuple[int, int, int]]:
    """Every (width, height, frames) the model serves."""
    frames = sorted(set(spec.seconds.values()))
    return [(*parse_size(size), n) for size in spec.sizes for n in frames]


class VideoPipeline:
    """A warm Kandinsky 5 pipeline. Not concurrency-safe: the pipeline keeps per-call state on itself."""

    def __init__(self, pipe, spec: ModelSpec, device: torch.device, settings: Settings) -> None:
        self.pipe = pipe
        self.spec = spec
        self.device = device
        self.settings = settings
        self.last_stats: GenerationStats | None = None
        self.warmed: list[tuple[int, int, int]] = []
        self._busy = threading.Lock()
        transformer = pipe.transformer
        speed.configure_process(device)
        self.placement = speed.text_placement(settings, pipe, device)
        transformer.to(device)
        pipe.vae.to(device)
        self.encoders = TextEncoders(
            pipe, device, self.placement, settings.text_cache_size, settings.max_sequence_length
        )
        self.expansions: LRU[tuple[str, int], str] = LRU(settings.text_cache_size)
        tokens = max(speed.latent_tokens(transformer, w, h, n) for w, h, n in buckets(spec))
        self.attention_backend, self.attention_timings = speed.choose_attention_backend(
            settings.attention_backend, transformer, device, tokens
        )
        # Set even for "native": diffusers also makes the last backend set the process-wide default, which a
        # processor left unset follows.
        transformer.set_attention_backend(self.attention_backend)
        self.step_cache = StepCacher(
            transformer,
            settings.step_cache,
            settings.step_cache_threshold,
            settings.step_cache_interval,
            parse_mag_ratios(settings.step_cache_mag_ratios),
        )
        self.compile_scope = speed.compile_scope(settings, device)
        speed.compile_transformer(transformer, settings, self.compile_scope)
        if settings.enhance_prompt == "auto":
            # A random-weight model's expansion is noise: only real checkpoints get upstream's default.
            self.enhance_default = spec.id not in TINY
        else:
            self.enhance_default = settings.enhance_prompt == "on"
        # Nearly every job uses the default negative prompt: encode it once, now.
        self.encoders.pin(DEFAULT_NEGATIVE_PROMPT)

    @classmethod
    def load(cls, settings: Settings, spec: ModelSpec) -> VideoPipeline:
        import transformers
        from diffusers import Kandinsky5I2VPipeline, Kandinsky5T2VPipeline
        from diffusers.utils import logging as diffusers_logging

        # Loading progress bars would land in the log stream (JSON lines in production) as noise.
        diffusers_logging.disable_progress_bar()
        transformers.utils.logging.disable_progress_bar()

        device = pick_device(settings)
        dtype = pick_dtype(settings, device)
        pipeline_cls = Kandinsky5I2VPipeline if spec.task == "image-to-video" else Kandinsky5T2VPipeline
        t0 = time.perf_counter()
        # Loaded to host memory; __init__ places each component (the text encoders may stay there).
        pipe = pipeline_cls.from_pretrained(spec.source, dtype=dtype, cache_dir=settings.hf_cache_dir)
        pipe.set_progress_bar_config(disable=True)
        loaded = cls(pipe, spec, device, settings)
        log.info(
            "pipeline loaded",
            extra={
                "model": spec.id,
                "source": spec.source,
                "device": str(device),
                "dtype": str(dtype),
                "attention": loaded.attention_backend,
                "compile": loaded.compile_scope,
                "text_encoders": loaded.placement,
                "step_cache": settings.step_cache,
                "seconds": round(time.perf_counter() - t0, 2),
            },
        )
        return loaded

    def generate(self, req: GenerationRequest, on_step: StepCallback | None = None) -> np.ndarray:
        """Run one video; returns uint8 frames (T, H, W, 3). Fills self.last_stats."""
        if not self._busy.acquire(blocking=False):
            raise RuntimeError("a VideoPipeline runs one generation at a time")
        try:
            video = self._generate(req, on_step, decode=True)
        finally:
            self._busy.release()
        if not np.isfinite(video).all():
            raise GenerationError("the model produced NaN or Inf values")
        return (np.clip(video, 0.0, 1.0) * 255.0).round().astype(np.uint8)

    def _warm_bucket(self, req: GenerationRequest) -> None:
        # The VAE decode is warmed only on CUDA, where cuDNN picks conv algorithms per shape; on a CPU it has
        # nothing to warm and is most of a tiny model's warm-up time.
        with self._busy:
            self._generate(req, None, decode=self.device.type == "cuda")

    def _generate(
        self, req: GenerationRequest, on_step: StepCallback | None, decode: bool
    ) -> np.ndarray | torch.Tensor:
        self.last_stats = None
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        cfg = req.guidance_scale > 1.0
        t0 = time.perf_counter()
        with self.encoders.session():
            enhanced = self._expand(req.prompt) if self._wants_enhance(req) else None
            t_enhanced = time.perf_counter()
            positive, hit = self.encoders.encode(enhanced or req.prompt)
            negative = self._negative(req.negative_prompt) if cfg else None
        self._sync()
        t_text = time.perf_counter()
        if on_step is not None:
            on_step(0, req.num_inference_steps)  # a cancellation point between text and denoising

        tiling = speed.vae_tiling(self.settings.vae_tiling, self.device, req.width, req.height, req.num_frames)
        if tiling:
            self.pipe.vae.enable_tiling()
        else:
            self.pipe.vae.disable_tiling()
        self.step_cache.prepare(req.num_inference_steps, cfg)
        step_ends: list[float] = []

        def callback(pipe, i: int, t, kwargs: dict) -> dict:
            self._sync()
            step_ends.append(time.perf_counter())
            if on_step is not None:
                on_step(i + 1, pipe.num_timesteps)
            return kwargs

        kwargs = dict(
            height=req.height,
            width=req.width,
            num_frames=req.num_frames,
            num_inference_steps=req.num_inference_steps,
            guidance_scale=req.guidance_scale,
            generator=torch.Generator(device=self.device).manual_seed(req.seed),
            output_type="np" if decode else "latent",
            callback_on_step_end=callback,
            max_sequence_length=self.settings.max_sequence_length,
            **positive.as_kwargs(),
            **(negative.as_kwargs("negative_") if negative is not None else {}),
        )
        if self.spec.task == "image-to-video":
            if req.image is None:
                raise ValueError("image-to-video needs an image")
            kwargs["image"] = req.image
        t_start = time.perf_counter()
        with torch.inference_mode():
            video = self.pipe(**kwargs).frames[0]
        self._sync()
        t_end = time.perf_counter()
        last_step = step_ends[-1] if step_ends else t_end
        steps = len(step_ends)
        self.last_stats = GenerationStats(
            text_encode_s=t_text - t0,
            enhance_s=t_enhanced - t0 if enhanced is not None else 0.0,
            text_cache_hit=hit,
            denoise_s=last_step - t_start,
            decode_s=t_end - last_step,
            steps=steps,
            step_s=(last_step - t_start) / steps if steps else None,
            peak_gpu_memory_bytes=torch.cuda.max_memory_allocated(self.device) if cuda else None,
            enhanced_prompt=enhanced,
            vae_tiling=tiling,
        )
        return video

    def _wants_enhance(self, req: GenerationRequest) -> bool:
        return self.enhance_default if req.enhance_prompt is None else req.enhance_prompt

    def _expand(self, prompt: str) -> str:
        key = (prompt, self.settings.enhance_max_new_tokens)
        cached = self.expansions.get(key)
        if cached is None:
            with self.encoders.resident() as device:
                cached = expand_prompt(
                    self.pipe.text_encoder, self.pipe.tokenizer, prompt, device, self.settings.enhance_max_new_tokens
                )
            self.expansions.put(key, cached)
        return cached

    def _negative(self, prompt: str | None) -> PromptEmbeds:
        if prompt is None or prompt == DEFAULT_NEGATIVE_PROMPT:
            return self.encoders.pin(DEFAULT_NEGATIVE_PROMPT)
        return self.encoders.encode(prompt)[0]

    def _sync(self) -> None:
        # Phase timings must include the GPU work queued by the phase, not just its launch.
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def release_memory(self) -> None:
        """After an aborted job: give the cached blocks of its activations back to the device."""
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def warm(self) -> float:
        """Before taking jobs: one 1-step generation per served size and duration, so that no job pays for
        compilation, autotuning or lazy initialisation of its shape."""
        t0 = time.perf_counter()
        if self.enhance_default:
            with self.encoders.resident() as device:
                expand_prompt(self.pipe.text_encoder, self.pipe.tokenizer, "warm-up", device, max_new_tokens=4)
        for width, height, frames in buckets(self.spec):
            image = Image.new("RGB", (width, height), (128, 96, 64)) if self.spec.task == "image-to-video" else None
            self._warm_bucket(
                GenerationRequest(
                    prompt="warm-up",
                    width=width,
                    height=height,
                    num_frames=frames,
                    num_inference_steps=1,
                    guidance_scale=self.spec.guidance,
                    seed=0,
                    image=image,
                    enhance_prompt=False,
                )
            )
            self.warmed.append((width, height, frames))
        seconds = time.perf_counter() - t0
        log.info(
            "pipeline warm", extra={"model": self.spec.id, "buckets": len(self.warmed), "seconds": round(seconds, 2)}
        )
        return seconds
