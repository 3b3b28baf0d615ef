"""Speed decisions for one worker: torch.compile (with step caches), text-encoder placement, VAE tiling, allocator.

The attention kernel has its own module, worker/attention.py.

Each decision is a pure-ish function of the settings, the checkpoint and the device, so the worker and the
benchmark make the same choices and tests can check the rules on a CPU.
"""

from __future__ import annotations

import logging
import os
from typing import Literal

import torch

from service.contract.settings import Settings
from worker.textcache import Placement

log = logging.getLogger(__name__)

# Text encoders stay on the device while all weights take at most this share of its memory; the rest is for
# activations (47,616 tokens x 4096 dims per hidden state for Pro at 512x768x121) and the VAE decode.
_RESIDENT_SHARE = 0.6
# Peak of diffusers' HunyuanVideo VAE decode. It decodes 5 latent frames (17 video frames) per chunk, so the
# chunk's activations do not grow with the clip: only the decoded output (3 channels, a few copies while the chunks
# are blended and joined) does. Measured with bench/vae_memory.py (real VAE architecture, random weights, fp32, CPU
# peak RSS of a fresh process) at 64x64, 128x128 and 192x128 and 17 to 121 frames (BENCHMARKS.md): the peak did
# not move with frames (within 7%) and a least-squares fit over the ten points gives 178 128-channel activations
# per output pixel plus 0.16 GiB, each point within 7% of the fit.
#   peak = 0.16 GiB + 178 * H * W * 128 * bytes + 3 * frames * H * W * 3 * bytes
# At 768x512 in bf16 that is 19.8 GB for 241 frames and 18.9 GB for 121 (the previous whole-clip rule said
# 291 GB for 241 frames and tiled every job). Assumption: the GPU's conv kernels (cuDNN) hold about the same
# working set per pixel as the CPU's, scaled by the dtype; bench/gpu_check.sh measures it on a GPU to confirm.
_VAE_CHUNK_ACTIVATIONS = 178
_VAE_FIXED_BYTES = int(0.16 * 2**30)
# Copies of the decoded clip alive at the peak: the per-chunk outputs, their blend, the concatenation.
_VAE_OUTPUT_COPIES = 3


class ConfigError(ValueError):
    """A configuration the worker must refuse at start-up: the message is one line naming the fix."""


def is_nabla(transformer) -> bool:
    return getattr(transformer.config, "attention_type", None) == "nabla"


def latent_tokens(transformer, width: int, height: int, frames: int) -> int:
    """Visual tokens per transformer forward: latent frames x (H/8/ph) x (W/8/pw)."""
    _, ph, pw = transformer.config.patch_size
    return ((frames - 1) // 4 + 1) * (height // 8 // ph) * (width // 8 // pw)


CompileScope = Literal["full", "regional", "off"]


def compile_scope(settings: Settings, device: torch.device) -> CompileScope:
    if settings.compile_transformer != "auto":
        return settings.compile_transformer
    # On CPU Inductor's C++ build takes minutes for the tiny model and fails for NABLA.
    return "full" if device.type == "cuda" else "off"


def require_compiled_flex(transformer, scope: CompileScope, device: torch.device, visual_backend: str) -> None:
    """NABLA runs flex attention; uncompiled flex materialises the whole score matrix (about 1 TB per call at
    241 frames 768x512): on a GPU that is an out-of-memory crash on the first job, so refuse it at start-up."""
    if not is_nabla(transformer) or device.type != "cuda":
        return
    if visual_backend != "flex":
        raise ConfigError(
            f"this is a NABLA checkpoint: K5_ATTENTION_BACKEND={visual_backend} cannot run its block masks; "
            "set K5_ATTENTION_BACKEND=auto"
        )
    if scope == "off":
        raise ConfigError(
            "this is a NABLA checkpoint: K5_COMPILE_TRANSFORMER=off runs flex attention uncompiled, which needs "
            "about 1 TB per attention call at 10 s; set K5_COMPILE_TRANSFORMER=auto (or full/regional)"
        )


def compile_transformer(
    transformer, settings: Settings, scope: CompileScope, hooked: list[torch.nn.Module] | None = None
) -> str:
    """Compile in place; returns what was compiled ("off", "full", "regional" or "blocks").

    `hooked`: the modules a step cache will wrap. diffusers' cache hooks run the module's forward inside
    torch.compiler.disable, so a module compiled as part of the transformer (full or regional compile) would run
    eager under the cache. Compiling each hooked module's own forward before the hooks attach makes the hook call
    compiled code; the rest of the transformer (embeddings, text blocks, output layer) is a few percent of a step.
    """
    if scope == "off":
        return "off"
    if settings.compile_cache_dir:
        # Inductor reads this on every cache lookup; Triton's cache lives below it unless TRITON_CACHE_DIR is set.
        os.makedirs(settings.compile_cache_dir, exist_ok=True)
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = settings.compile_cache_dir
    options: dict = {"dynamic": settings.compile_dynamic, "backend": settings.compile_backend}
    if settings.compile_backend == "inductor":
        options["mode"] = settings.compile_mode
    if hooked:
        # One code object for all blocks of a kind: they share one compiled graph (checked by the tests).
        for module in hooked:
            module.forward = torch.compile(module.forward, **options)
        return "blocks"
    if scope == "regional":
        # One compile per block class, reused by all 32 (Lite) or 60 (Pro) blocks: much shorter warm-up.
        transformer.compile_repeated_blocks(**options)
    else:
        transformer.compile(**options)
    return scope


class CompileCounter:
    """Counts torch.compile runs in this process (every backend, every recompile), through dynamo's callback."""

    _instance: CompileCounter | None = None

    def __init__(self) -> None:
        self.count = 0

    def _started(self, _args) -> None:
        self.count += 1

    def ensure(self) -> CompileCounter:
        # torch._dynamo.reset() (the benchmark calls it between cases) drops every callback: register again.
        handler = torch._dynamo.callback.callback_handler
        if self._started not in handler.start_callbacks:
            handler.register_start_callback(self._started)
        return self

    @classmethod
    def get(cls) -> CompileCounter:
        """The process's counter (one callback per process, however many pipelines)."""
        if cls._instance is None:
            cls._instance = CompileCounter()
        return cls._instance.ensure()


def text_placement(settings: Settings, pipe, device: torch.device, weights: int | None = None) -> Placement:
    """`weights`: bytes of all components as loaded, when known before loading (worker/loader.py)."""
    if settings.text_encoder_placement != "auto":
        return settings.text_encoder_placement
    if device.type != "cuda":
        return "device"
    if weights is None:
        weights = sum(_bytes(getattr(pipe, n)) for n in ("transformer", "vae", "text_encoder", "text_encoder_2"))
    total = torch.cuda.get_device_properties(device).total_memory
    # Lite (~21 GB of weights) stays resident on an 80 GB GPU; Pro (~61 GB) keeps only the transformer there.
    return "device" if weights <= _RESIDENT_SHARE * total else "offload"


def vae_decode_bytes(width: int, height: int, frames: int, dtype_bytes: int) -> int:
    """Estimated peak bytes of an untiled (chunked) VAE decode; see _VAE_CHUNK_ACTIVATIONS for the measurement."""
    chunk = _VAE_CHUNK_ACTIVATIONS * height * width * 128 * dtype_bytes
    output = _VAE_OUTPUT_COPIES * frames * height * width * 3 * dtype_bytes
    return _VAE_FIXED_BYTES + chunk + output


def vae_tiling(setting: str, device: torch.device, width: int, height: int, frames: int, dtype_bytes: int = 2) -> bool:
    if setting != "auto":
        return setting == "on"
    if device.type != "cuda":
        return False
    free = torch.cuda.get_device_properties(device).total_memory - torch.cuda.memory_allocated(device)
    return vae_decode_bytes(width, height, frames, dtype_bytes) > 0.8 * free


def configure_process(device: torch.device) -> None:
    if device.type == "cuda":
        # The worker serves a few fixed shapes: let cuDNN time its conv algorithms for the VAE once per shape.
        torch.backends.cudnn.benchmark = True


# The allocator setting must be in the environment before CUDA is initialised: `k5serve worker` sets it first thing.
# Expandable segments let the many differently sized activations of a video (and the VAE decode after the
# transformer) reuse memory instead of fragmenting it into cached blocks of the wrong size.
ALLOC_CONF = "expandable_segments:True"


def configure_allocator(environ: dict) -> None:
    """Ask for expandable segments unless the operator chose an allocator configuration."""
    environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", ALLOC_CONF)


def _bytes(module) -> int:
    if module is None:
        return 0
    return sum(p.numel() * p.element_size() for p in module.parameters())
