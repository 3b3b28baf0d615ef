"""Load and warm a Kandinsky 5 pipeline once; generate(request) -> frames.

The same code loads the published checkpoints (hub repo or downloaded directory) and the tiny test models:
worker/loader.py loads each component in its own dtype straight to its device. What makes it fast lives beside
it: worker/attention.py (kernels), worker/speed.py (torch.compile, placement, VAE tiling), worker/textcache.py
(prompt embeddings), worker/enhance.py (prompt expansion) and worker/stepcache.py (opt-in step caching).
One process per GPU, one generation at a time.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

from service.contract import metrics
from service.contract.models import TINY, ModelSpec, parse_size
from service.contract.record import GenerationRequest
from service.contract.settings import Settings
from worker import attention, enhance, loader, sampling, speed
from worker.checkpoint import DenoiseState, Resume, starting_at
from worker.frames import all_finite, to_uint8
from worker.stats import GenerationStats
from worker.stepcache import StepCacher
from worker.textcache import DEFAULT_NEGATIVE_PROMPT, LRU, Placement, PromptEmbeds, TextEncoders

if TYPE_CHECKING:
    from worker.parallel import Rank

log = logging.getLogger(__name__)

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class GenerationError(RuntimeError):
    """The pipeline ran but its output is unusable (NaN/Inf frames)."""


# Called with (steps done, total steps): once with 0 when the text phase is over, then after every denoising step.
# Raising from it aborts the generation at once (how cancellation works); the pipeline stays usable.
StepCallback = Callable[[int, int], None]
# Called after every denoising step, before the StepCallback, with the state a checkpoint saves (worker/checkpoint.py).
StateCallback = Callable[[DenoiseState], None]


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

    def __init__(
        self,
        pipe,
        spec: ModelSpec,
        device: torch.device,
        settings: Settings,
        placement: Placement | None = None,
        rank: Rank | None = None,
    ) -> None:
        self.pipe = pipe
        self.spec = spec
        self.device = device
        self.settings = settings
        self.last_stats: GenerationStats | None = None
        # One rank of a worker spanning several GPUs (worker/parallel.py), or None.
        self.rank = rank
        self.warmed: list[tuple[int, int, int]] = []
        self._busy = threading.Lock()
        transformer = pipe.transformer
        speed.configure_process(device)
        self.checkpoint = loader.check_checkpoint(pipe, spec)
        self.placement = placement or speed.text_placement(settings, pipe, device)
        transformer.to(device)
        pipe.vae.to(device)
        self.encoders = (rank.text_encoders if rank else TextEncoders)(
            pipe, device, self.placement, settings.text_cache_size, settings.max_sequence_length
        )
        self.expansions: LRU[tuple[str, int, str], str] = LRU(settings.text_cache_size)
        self._setup_attention_and_compile()
        if settings.enhance_prompt == "auto":
            # A random-weight model's expansion is noise: only real checkpoints get upstream's default.
            self.enhance_default = spec.id not in TINY
        else:
            self.enhance_default = settings.enhance_prompt == "on"
        # Checked once at load (worker/enhance.py): a missing LM head, or image-to-video without the processor.
        self.enhance_unavailable = enhance.unavailable_reason(pipe, spec.task) if pipe.text_encoder else None
        if pipe.text_encoder is None:
            self.enhance_default = False  # a follower rank: rank 0 expands and encodes
        elif self.enhance_unavailable is not None:
            log.warning("prompt expansion disabled", extra={"model": spec.id, "reason": self.enhance_unavailable})
            self.enhance_default = False
        # Nearly every job uses the default negative prompt: encode it once, now.
        self.encoders.pin(DEFAULT_NEGATIVE_PROMPT)

    def _setup_attention_and_compile(self) -> None:
        """Attention kernels per layer, the step cache, then compile: in that order, so that compiled graphs see
        the final kernels and the cache hooks wrap compiled modules (worker/speed.py: compile_transformer)."""
        transformer, settings = self.pipe.transformer, self.settings
        tokens = max(speed.latent_tokens(transformer, w, h, n) for w, h, n in buckets(self.spec))
        self.attention = attention.choose(settings.attention_backend, transformer, self.device, tokens)
        attention.apply(transformer, self.attention)
        self.attention_backend = self.attention.describe()
        self.attention_timings = self.attention.timings
        if self.rank is not None:
            self.rank.shard(self)  # CFG / sequence split, before the step cache and compile
        self.compile_scope = speed.compile_scope(settings, self.device)
        speed.require_compiled_flex(transformer, self.compile_scope, self.device, self.attention.visual)
        self.step_cache = StepCacher(
            transformer,
            settings.step_cache,
            settings.step_cache_threshold or self.spec.mag_threshold,
            settings.step_cache_interval,
            settings.step_cache_mag_ratios or self.spec.mag_ratios,
        )
        # Before compiling: the grid, the fp32 timestep hook and the prompt template (worker/sampling.py).
        self.sampling = sampling.Sampling(
            self.pipe, settings.sampling_grid, settings.timestep_precision, settings.prompt_template
        )
        self.compiled = speed.compile_transformer(
            transformer, settings, self.compile_scope, self.step_cache.hooked_modules()
        )
        self.compiles = speed.CompileCounter.get()
        self.compiles_at_ready: int | None = None  # set by warm(); later compiles are recompiles
        self.recompiles = 0

    @classmethod
    def load(cls, settings: Settings, spec: ModelSpec, rank: Rank | None = None) -> VideoPipeline:
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
        folder = loader.checkpoint_dir(spec, settings)
        # Placement first, from the files' headers: each component then loads straight to where it will live.
        weights = loader.weights_bytes(folder, dtype)
        placement = speed.text_placement(settings, None, device, sum(weights.values()))
        text_device = device if placement == "device" else torch.device("cpu")
        skip = rank.skip_components() if rank else ()
        pipe = pipeline_cls(**loader.load_components(folder, device, dtype, text_device, skip))
        pipe.set_progress_bar_config(disable=True)
        loaded = cls(pipe, spec, device, settings, placement, rank)
        log.info(
            "pipeline loaded",
            extra={
                "model": spec.id,
                "source": spec.source,
                "device": str(device),
                "dtype": str(dtype),
                "weights_gb": round(sum(weights.values()) / 1e9, 2),
                "attention": loaded.attention_backend,
                "compile": loaded.compiled,
                "text_encoders": loaded.placement,
                "step_cache": settings.step_cache,
                **loaded.sampling.describe(),
                "seconds": round(time.perf_counter() - t0, 2),
            },
        )
        return loaded

    def generate(
        self,
        req: GenerationRequest,
        on_step: StepCallback | None = None,
        resume: Resume | None = None,
        on_state: StateCallback | None = None,
    ) -> np.ndarray:
        """Run one video; returns uint8 frames (T, H, W, 3). Fills self.last_stats. With `resume`, from its step on
        (the checkpoint's conditioning, latents and step-cache state); `on_state` sees every step's state."""
        if not self._busy.acquire(blocking=False):
            raise RuntimeError("a VideoPipeline runs one generation at a time")
        self.compiles.ensure()
        try:
            video = self._generate(req, on_step, decode=True, resume=resume, on_state=on_state)
        finally:
            self._busy.release()
            self._count_recompiles()
        # Checked and converted where the VAE decoded it (worker/frames.py): only uint8 crosses to the CPU.
        if not all_finite(video):
            raise GenerationError("the model produced NaN or Inf values")
        return to_uint8(video)

    def _warm_bucket(self, req: GenerationRequest) -> None:
        # The VAE decode is warmed only on CUDA, where cuDNN picks conv algorithms per shape; on a CPU it has
        # nothing to warm and is most of a tiny model's warm-up time.
        with self._busy:
            self._generate(req, None, decode=self.device.type == "cuda")

    def _generate(
        self,
        req: GenerationRequest,
        on_step: StepCallback | None,
        decode: bool,
        resume: Resume | None = None,
        on_state: StateCallback | None = None,
    ) -> torch.Tensor:
        self.last_stats = None
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        cfg = req.guidance_scale > 1.0
        t0 = time.perf_counter()
        if resume is not None:  # the stopped run's conditioning, to the bit: no text encoder runs
            enhanced, t_enhanced, hit = resume.enhanced_prompt, t0, True
            positive = resume.positive.to(self.device)
            negative = resume.negative.to(self.device) if resume.negative is not None else None
        else:
            with self.encoders.session():
                enhanced = self._expand(req.prompt, req.image) if self._wants_enhance(req) else None
                t_enhanced = time.perf_counter()
                positive, hit = self.encoders.encode(enhanced or req.prompt)
                negative = self._negative(req.negative_prompt) if cfg else None
        self._sync()
        t_text = time.perf_counter()
        start = resume.step if resume is not None else 0
        if on_step is not None:
            on_step(start, req.num_inference_steps)  # a cancellation point between text and denoising

        tiling = speed.vae_tiling(self.settings.vae_tiling, self.device, req.width, req.height, req.num_frames)
        if tiling:
            self.pipe.vae.enable_tiling()
        else:
            self.pipe.vae.disable_tiling()
        self.step_cache.prepare(req.num_inference_steps, cfg)
        generator = torch.Generator(device=self.device).manual_seed(req.seed)
        if resume is not None:
            self.step_cache.restore(resume.step_cache, self.device)
            generator.set_state(resume.generator_state)
        step_ends: list[float] = []
        total = req.num_inference_steps

        def callback(pipe, i: int, t, kwargs: dict) -> dict:
            self._sync()
            step_ends.append(time.perf_counter())
            if on_state is not None:
                state = DenoiseState(
                    start + i + 1, total, kwargs["latents"], generator, positive, negative, enhanced,
                    self.step_cache.state,
                )  # fmt: skip
                on_state(state)
            if on_step is not None:
                on_step(start + i + 1, total)
            return kwargs

        kwargs = dict(
            height=req.height,
            width=req.width,
            num_frames=req.num_frames,
            num_inference_steps=req.num_inference_steps,
            guidance_scale=req.guidance_scale,
            generator=generator,
            output_type="pt" if decode else "latent",
            callback_on_step_end=callback,
            max_sequence_length=self.settings.max_sequence_length,
            **positive.as_kwargs(),
            **(negative.as_kwargs("negative_") if negative is not None else {}),
        )
        if self.spec.task == "image-to-video":
            if req.image is None:
                raise ValueError("image-to-video needs an image")
            kwargs["image"] = req.image
        if resume is not None:
            kwargs["latents"] = resume.latents.to(self.device)
        t_start = time.perf_counter()
        with torch.inference_mode(), starting_at(self.pipe.scheduler, start):
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
            resumed_from_step=start,
        )
        return video

    def _count_recompiles(self) -> None:
        """After a job: compiles since the warm-up mean that job paid for compiling; count and log them."""
        if self.compiles_at_ready is None:
            return
        new = self.compiles.count - self.compiles_at_ready - self.recompiles
        if new > 0:
            self.recompiles += new
            metrics.RECOMPILES.labels(self.spec.id).inc(new)
            log.warning(
                "torch.compile ran during a job (the warm-up missed a shape or guard)",
                extra={"model": self.spec.id, "compiles": new, "recompiles_total": self.recompiles},
            )

    def _wants_enhance(self, req: GenerationRequest) -> bool:
        if self.enhance_unavailable is not None:
            return False  # said once at load; a request asking for it gets its prompt as written
        return self.enhance_default if req.enhance_prompt is None else req.enhance_prompt

    def _expand(self, prompt: str, image: Image.Image | None = None, max_new_tokens: int | None = None) -> str:
        # Image-to-video expansion looks at the image (upstream's way); text-to-video requests carry none.
        image = image if self.spec.task == "image-to-video" else None
        max_new_tokens = max_new_tokens or self.settings.enhance_max_new_tokens
        key = (prompt, max_new_tokens, enhance.image_key(image))
        cached = self.expansions.get(key)
        if cached is None:
            with self.encoders.resident() as device:
                cached = enhance.expand_prompt(
                    self.pipe.text_encoder,
                    self.pipe.tokenizer,
                    prompt,
                    device,
                    max_new_tokens,
                    image=image,
                    cache=enhance.cache_for(self.settings.enhance_cache, device),
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
        """Before taking jobs: one generation per served size and duration, so that no job pays for compilation,
        autotuning or lazy initialisation of its shape. With a step cache the first bucket runs the model's full
        step schedule (the cache's compute/skip/predict steps all happen once); one more call at the first bucket
        with a prompt of max_sequence_length tokens covers the longest text. If the chosen attention kernel fails
        here, the worker falls back to native SDPA once instead of crashing into a restart loop."""
        t0 = time.perf_counter()
        try:
            self._warm_all()
        except Exception:
            if self.attention.dense == "native":
                raise
            log.exception("warm-up failed with attention kernel %s; retrying with native", self.attention.dense)
            nabla = self.attention.visual == "flex"
            self.attention = attention.AttentionChoice("native", "flex" if nabla else "native")
            attention.apply(self.pipe.transformer, self.attention)
            self.attention_backend = self.attention.describe()
            self.warmed.clear()
            self._warm_all()
        self.compiles_at_ready = self.compiles.count
        seconds = time.perf_counter() - t0
        log.info(
            "pipeline warm",
            extra={
                "model": self.spec.id,
                "buckets": len(self.warmed),
                "compiles": self.compiles.count,
                "seconds": round(seconds, 2),
            },
        )
        return seconds

    def _warm_all(self) -> None:
        if self.enhance_default:
            image = Image.new("RGB", (64, 64), (128, 96, 64)) if self.spec.task == "image-to-video" else None
            self._expand("warm-up", image, max_new_tokens=4)
        all_buckets = buckets(self.spec)
        for index, (width, height, frames) in enumerate(all_buckets):
            steps = self.step_cache.warm_steps(self.spec.steps) if index == 0 else 1
            self._warm_bucket(self._warm_request(width, height, frames, steps, "warm-up"))
            self.warmed.append((width, height, frames))
        self._warm_bucket(self._warm_request(*all_buckets[0], 1, self._longest_prompt()))

    def _warm_request(self, width: int, height: int, frames: int, steps: int, prompt: str) -> GenerationRequest:
        image = Image.new("RGB", (width, height), (128, 96, 64)) if self.spec.task == "image-to-video" else None
        return GenerationRequest(
            prompt=prompt,
            width=width,
            height=height,
            num_frames=frames,
            num_inference_steps=steps,
            guidance_scale=self.spec.guidance,
            seed=0,
            image=image,
            enhance_prompt=False,
        )

    def _longest_prompt(self) -> str:
        """A prompt of at least max_sequence_length Qwen tokens (the pipeline truncates it to exactly that)."""
        words = "a red fox runs through fresh snow at dawn while the camera tracks it "
        text = words
        while len(self.pipe.tokenizer(text=[text])["input_ids"][0]) < self.settings.max_sequence_length + 16:
            text += words * 8
        return text
