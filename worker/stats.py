"""What one generation measured: the typed result the pipeline leaves for its caller (the runner's metrics and
ETAs, the benchmarks), in place of a free-form dict."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class GenerationStats:
    text_encode_s: float  # prompt expansion included
    enhance_s: float  # prompt expansion alone (0 when not used)
    text_cache_hit: bool
    denoise_s: float
    decode_s: float
    steps: int
    step_s: float | None  # mean seconds per denoising step; None when no step ran
    peak_gpu_memory_bytes: int | None  # None off CUDA
    enhanced_prompt: str | None
    vae_tiling: bool
    resumed_from_step: int = 0  # the step a resumed job went on from (worker/checkpoint.py): steps it did not run

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)
