"""The two configurations the benchmark compares, each timed per phase the same way.

Phases: text = prompt encoding (and expansion when asked); denoise = from the end of the text phase to the last
step callback; decode = last step callback to the frames in host memory (VAE decode + post-processing). Every
boundary synchronises the device. The first call of each configuration is a warm-up and is not timed.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from bench import flops
from bench.configs import Case
from service.contract.models import ModelSpec
from service.contract.settings import Settings
from worker.pipeline import GenerationRequest, VideoPipeline
from worker.textcache import DEFAULT_NEGATIVE_PROMPT

PROMPT = "A red fox runs through fresh snow at dawn, the low camera tracking it as powder flies from its paws."


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak(device: torch.device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def baseline(pipe, case: Case, steps: int, guidance: float, device: torch.device, seed: int) -> tuple[np.ndarray, dict]:
    """The documented usage: the whole pipeline on the device in bf16, diffusers' default attention, prompt strings
    into pipe(...). NABLA checkpoints get flex with the transformer compiled, as upstream documents (the default
    backend cannot run them; on a CPU, where Inductor cannot build NABLA, flex runs eager). Pro follows upstream's
    advice for one GPU: enable_model_cpu_offload()."""
    setup = "model cpu offload" if case.model == "pro" and device.type == "cuda" else "all on device"
    if setup == "model cpu offload":
        pipe.enable_model_cpu_offload(device=device)
    else:
        pipe.to(device)
    # diffusers' default is native SDPA, but set_attention_backend also changes the process-wide default, so an
    # earlier case in this process could have left another one behind: name it. Same for cuDNN autotuning, which
    # ours switches on process-wide.
    pipe.transformer.set_attention_backend("flex" if case.nabla else "native")
    nabla_compiled = case.nabla and device.type == "cuda"
    if nabla_compiled:
        # NABLA's documented usage (upstream and diffusers' docs): flex with the transformer compiled. Uncompiled
        # flex materialises the whole score matrix (about 1 TB per call at 241 frames): that row cannot finish.
        pipe.transformer.compile(mode="max-autotune-no-cudagraphs", dynamic=True)
    torch.backends.cudnn.benchmark = False
    text = {"s": 0.0, "end": 0.0}
    encode_prompt = pipe.encode_prompt

    def timed_encode(*args, **kwargs):
        _sync(device)
        t0 = time.perf_counter()
        out = encode_prompt(*args, **kwargs)
        _sync(device)
        text["end"] = time.perf_counter()
        text["s"] += text["end"] - t0
        return out

    step_ends: list[float] = []

    def callback(p, i, t, kwargs):
        _sync(device)
        step_ends.append(time.perf_counter())
        return kwargs

    def call(prompt: str, n: int, output_type: str = "np"):
        return pipe(
            prompt=prompt,
            height=case.height,
            width=case.width,
            num_frames=case.frames,
            num_inference_steps=n,
            guidance_scale=guidance,
            generator=torch.Generator(device=device).manual_seed(seed),
            output_type=output_type,
            callback_on_step_end=callback,
        ).frames[0]

    pipe.encode_prompt = timed_encode  # an instance attribute shadows the method; removed below
    try:
        # Warm the decode too on CUDA (cuDNN handles, kernel choice); on a CPU it has nothing to warm, as in ours.
        call("warm-up", 1, "np" if device.type == "cuda" else "latent")
        step_ends.clear()
        text["s"] = 0.0
        _reset_peak(device)
        video = call(PROMPT, steps)
        _sync(device)
        end = time.perf_counter()
    finally:
        del pipe.encode_prompt
    stats = {
        "attention": ("flex" if nabla_compiled else "flex (eager: no NABLA compile on CPU)")
        if case.nabla
        else "default (native SDPA)",
        "sampling": "diffusers/model/diffusers",
        "compile": "full" if nabla_compiled else "off",
        "setup": setup,
        "text_encode_s": text["s"],
        "denoise_s": step_ends[-1] - text["end"],
        "decode_s": end - step_ends[-1],
        "steps": len(step_ends),
        "step_s": (step_ends[-1] - text["end"]) / len(step_ends),
        "peak_gpu_memory_bytes": _peak(device),
    }
    return (np.clip(video, 0.0, 1.0) * 255.0).round().astype(np.uint8), stats


def ours(
    pipe, case: Case, steps: int, guidance: float, device: torch.device, seed: int, settings: Settings
) -> tuple[np.ndarray, dict, VideoPipeline]:
    """k5serve's worker configuration: VideoPipeline with the given settings (defaults = the worker's), warmed over
    the case's one bucket before the timed call."""
    spec = ModelSpec(
        id=f"bench-{case.model}",
        task="text-to-video",
        source="bench (random weights)",
        sizes=[f"{case.width}x{case.height}"],
        seconds={"bench": case.frames},
        default_seconds="bench",
        steps=steps,
        max_steps=1000,
        guidance=guidance,
        attention="nabla" if case.nabla else "dense",
    )
    t0 = time.perf_counter()
    pipeline = VideoPipeline(pipe, spec, device, settings)
    setup_s = time.perf_counter() - t0
    warm_s = pipeline.warm()
    request = GenerationRequest(
        prompt=PROMPT,
        width=case.width,
        height=case.height,
        num_frames=case.frames,
        num_inference_steps=steps,
        guidance_scale=guidance,
        seed=seed,
    )
    frames = pipeline.generate(request)
    stats = {
        **(pipeline.last_stats.as_dict() if pipeline.last_stats else {}),
        "attention": pipeline.attention_backend,
        "attention_timings": pipeline.attention_timings,
        "compile": pipeline.compile_scope,
        "sampling": "/".join(pipeline.sampling.describe().values()),
        "setup": f"text encoders: {pipeline.placement}",
        "setup_s": setup_s,
        "warm_s": warm_s,
    }
    # The text phase of a repeated prompt: both embeddings come from the cache.
    t0 = time.perf_counter()
    pipeline.encoders.encode(PROMPT)
    pipeline.encoders.pin(DEFAULT_NEGATIVE_PROMPT)
    stats["text_encode_cached_s"] = time.perf_counter() - t0
    return frames, stats, pipeline


def nabla_kept(pipeline: VideoPipeline, case: Case, guidance: float, seed: int) -> list[float]:
    """Fraction of attention blocks NABLA keeps, per attention call of one denoising step (both CFG branches)."""
    request = GenerationRequest(PROMPT, case.width, case.height, case.frames, 1, guidance, seed, enhance_prompt=False)
    with flops.nabla_probe() as kept:
        # One step, no VAE decode: the probe needs attention masks, not frames (the worker's own warm-up path).
        with pipeline._busy:
            pipeline._generate(request, None, decode=False)
    return [float(k) for k in kept]
