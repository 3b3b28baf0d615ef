"""Speed decisions for one worker: attention kernel, torch.compile and its cache, text-encoder placement, VAE tiling.

Each decision is a pure-ish function of the settings, the checkpoint and the device, so the worker and the
benchmark make the same choices and tests can check the rules on a CPU.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Literal

import torch

from service.settings import Settings
from worker.textcache import Placement

log = logging.getLogger(__name__)

# SDPA variants tried for dense checkpoints on CUDA, plus the FlashAttention packages when installed. Lossy
# kernels (sage, int8/fp8) are left to an explicit setting: they change the videos.
_DENSE_CANDIDATES = ["native", "_native_cudnn", "_native_flash", "_native_efficient", "flash", "_flash_3"]
# Text encoders stay on the device while all weights take at most this share of its memory; the rest is for
# activations (47,616 tokens x 4096 dims per hidden state for Pro at 512x768x121) and the VAE decode.
_RESIDENT_SHARE = 0.6
# Peak memory of an untiled HunyuanVideo VAE decode, in units of one 128-channel full-resolution activation:
# measured 11.2-11.9 on CPU (fp32, 9 and 17 frames at 256x384); rounded up. Check on GPU with bench/pipeline.py.
_VAE_DECODE_ACTIVATIONS = 12


def is_nabla(transformer) -> bool:
    return getattr(transformer.config, "attention_type", None) == "nabla"


def latent_tokens(transformer, width: int, height: int, frames: int) -> int:
    """Visual tokens per transformer forward: latent frames x (H/8/ph) x (W/8/pw)."""
    _, ph, pw = transformer.config.patch_size
    return ((frames - 1) // 4 + 1) * (height // 8 // ph) * (width // 8 // pw)


def time_attention_backends(
    candidates: list[str], heads: int, head_dim: int, tokens: int, device: torch.device, dtype: torch.dtype
) -> dict[str, float]:
    """Seconds per self-attention call at the served shape for each backend that runs and agrees with native."""
    from diffusers.models.attention_dispatch import dispatch_attention_fn

    gen = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(1, tokens, heads, head_dim, device=device, dtype=dtype, generator=gen) for _ in range(3))
    reference = dispatch_attention_fn(q, k, v, backend="native")
    timings: dict[str, float] = {}
    for name in candidates:
        try:
            out = dispatch_attention_fn(q, k, v, backend=name)  # also the warm-up call
            if not torch.allclose(out.float(), reference.float(), atol=2e-2, rtol=2e-2):
                log.warning("attention backend disagrees with native; skipped", extra={"backend": name})
                continue
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(3):
                dispatch_attention_fn(q, k, v, backend=name)
            _sync(device)
            timings[name] = (time.perf_counter() - t0) / 3
        except Exception as e:  # a backend whose package or GPU generation is missing
            log.info("attention backend unavailable", extra={"backend": name, "error": f"{type(e).__name__}: {e}"})
    return timings


def choose_attention_backend(setting: str, transformer, device: torch.device, tokens: int) -> tuple[str, dict]:
    """The backend name and, when measured, each candidate's seconds per call."""
    if setting != "auto":
        return setting, {}
    if is_nabla(transformer):
        # NABLA's block masks only run on flex (REFERENCE 1: the default backend fails on 'BlockMask').
        return "flex", {}
    if device.type != "cuda":
        return "native", {}
    heads = transformer.config.model_dim // sum(transformer.config.axes_dims)
    timings = time_attention_backends(
        _DENSE_CANDIDATES, heads, sum(transformer.config.axes_dims), tokens, device, transformer.dtype
    )
    return (min(timings, key=timings.get) if timings else "native"), timings


CompileScope = Literal["full", "regional", "off"]


def compile_scope(settings: Settings, device: torch.device) -> CompileScope:
    if settings.compile_transformer != "auto":
        return settings.compile_transformer
    # On CPU Inductor's C++ build takes minutes for the tiny model and fails for NABLA (REFERENCE 1).
    return "full" if device.type == "cuda" else "off"


def compile_transformer(transformer, settings: Settings, scope: CompileScope) -> None:
    if scope == "off":
        return
    if settings.compile_cache_dir:
        # Inductor reads this on every cache lookup; Triton's cache lives below it unless TRITON_CACHE_DIR is set.
        os.makedirs(settings.compile_cache_dir, exist_ok=True)
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = settings.compile_cache_dir
    options = {"mode": settings.compile_mode, "dynamic": settings.compile_dynamic}
    if scope == "regional":
        # One compile per block class, reused by all 32 (Lite) or 60 (Pro) blocks: much shorter warm-up.
        transformer.compile_repeated_blocks(**options)
    else:
        transformer.compile(**options)


def text_placement(settings: Settings, pipe, device: torch.device) -> Placement:
    if settings.text_encoder_placement != "auto":
        return settings.text_encoder_placement
    if device.type != "cuda":
        return "device"
    weights = sum(_bytes(getattr(pipe, n)) for n in ("transformer", "vae", "text_encoder", "text_encoder_2"))
    total = torch.cuda.get_device_properties(device).total_memory
    # Lite (~21 GB of weights) stays resident on an 80 GB GPU; Pro (~56 GB) keeps only the transformer there.
    return "device" if weights <= _RESIDENT_SHARE * total else "offload"


def vae_tiling(setting: str, device: torch.device, width: int, height: int, frames: int) -> bool:
    if setting != "auto":
        return setting == "on"
    if device.type != "cuda":
        return False
    estimate = _VAE_DECODE_ACTIVATIONS * frames * height * width * 128 * 2  # bf16
    free = torch.cuda.get_device_properties(device).total_memory - torch.cuda.memory_allocated(device)
    return estimate > 0.8 * free


def configure_process(device: torch.device) -> None:
    if device.type == "cuda":
        # The worker serves a few fixed shapes: let cuDNN time its conv algorithms for the VAE once per shape.
        torch.backends.cudnn.benchmark = True


def _bytes(module) -> int:
    if module is None:
        return 0
    return sum(p.numel() * p.element_size() for p in module.parameters())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
