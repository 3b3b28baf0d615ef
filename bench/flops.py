"""What a video costs in arithmetic, what the device can do, and how much attention NABLA actually keeps.

The analytic transformer model counts matrix work only (2 FLOPs per multiply-add): linear layers on visual and
text tokens, self-attention (QK^T and PV, scaled by the kept fraction of 64x64 blocks under NABLA) and
cross-attention to the text. `check_full_size` compares it with torch's FlopCounterMode on a meta-device model.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import torch
from torch.utils.flop_counter import FlopCounterMode

from bench.configs import build_transformer, transformer_config


def transformer_flops(config: dict, visual_tokens: int, text_tokens: int, kept: float = 1.0) -> dict[str, float]:
    """FLOPs of one transformer forward, split three ways (linear / self-attention / cross-attention)."""
    d, ff, n, lt = config["model_dim"], config["ff_dim"], visual_tokens, text_tokens
    per_visual_block = 2 * n * (4 * d * d + 2 * d * d + 2 * d * ff) + 2 * lt * 2 * d * d  # + text K/V projections
    per_text_block = 2 * lt * (4 * d * d + 2 * d * ff) + 4 * lt * lt * d
    patch = config["patch_size"][0] * config["patch_size"][1] * config["patch_size"][2]
    embed = 2 * n * d * patch * (2 * config["in_visual_dim"] + 1) + 2 * lt * config["in_text_dim"] * d
    out = 2 * n * d * patch * config["out_visual_dim"]
    linear = config["num_visual_blocks"] * per_visual_block + config["num_text_blocks"] * per_text_block + embed + out
    self_attention = config["num_visual_blocks"] * 4 * n * n * d * kept
    cross_attention = config["num_visual_blocks"] * 4 * n * lt * d
    return {
        "linear": linear,
        "self_attention": self_attention,
        "cross_attention": cross_attention,
        "total": linear + self_attention + cross_attention,
    }


def vae_decode_flops(latent_frames: int, latent_height: int, latent_width: int, config: dict | None = None) -> float:
    """Counted by FlopCounterMode on a meta-device copy of the VAE (default: HunyuanVideo's); no memory, no time."""
    from diffusers import AutoencoderKLHunyuanVideo

    with torch.device("meta"):
        vae = AutoencoderKLHunyuanVideo.from_config(config) if config else AutoencoderKLHunyuanVideo()
        z = torch.empty(1, vae.config.latent_channels, latent_frames, latent_height, latent_width)
    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        vae.decode(z)
    return float(counter.get_total_flops())


def check_full_size(model: str = "lite", width: int = 768, height: int = 512, frames: int = 121, text: int = 256):
    """Analytic count vs FlopCounterMode on a meta-device transformer at full size, one forward."""
    config = transformer_config(model, nabla=False)
    meta = build_transformer(model, False, torch.device("meta"), torch.bfloat16)
    meta.set_attention_backend("native")  # flex cannot run on meta tensors; an earlier set may have left it global
    t, h, w = (frames - 1) // 4 + 1, height // 8, width // 8
    with torch.device("meta"):
        x = torch.empty(1, t, h, w, 2 * 16 + 1, dtype=torch.bfloat16)
        args = dict(
            encoder_hidden_states=torch.empty(1, text, 3584, dtype=torch.bfloat16),
            timestep=torch.empty(1, dtype=torch.bfloat16),
            pooled_projections=torch.empty(1, 768, dtype=torch.bfloat16),
            visual_rope_pos=[torch.arange(t), torch.arange(h // 2), torch.arange(w // 2)],
            text_rope_pos=torch.arange(text),
        )
    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        meta(x, scale_factor=(1.0, 2.0, 2.0), **args)
    tokens = t * (h // 2) * (w // 2)
    return {
        "model": model,
        "shape": f"{width}x{height}x{frames}",
        "visual_tokens": tokens,
        "text_tokens": text,
        "params_b": sum(p.numel() for p in meta.parameters()) / 1e9,
        "analytic_tflop": {k: v / 1e12 for k, v in transformer_flops(config, tokens, text).items()},
        "counted_tflop": counter.get_total_flops() / 1e12,
        "vae_decode_pflop": vae_decode_flops(t, h, w) / 1e15,
    }


def matmul_ceiling(device: torch.device, dtype: torch.dtype) -> float:
    """Measured FLOP/s of a large square matmul in the run's dtype: the roof the transformer is held against."""
    n, reps = (8192, 20) if device.type == "cuda" else (2048, 3)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b  # warm-up: cuBLAS handle, kernel selection
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    _sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t0)


@contextlib.contextmanager
def nabla_probe() -> Iterator[list[torch.Tensor]]:
    """Records, for every NABLA attention call inside the block, the fraction of 64x64 blocks it keeps.

    The recorder runs eagerly even inside a compiled transformer (a graph break, so the probed call recompiles
    once); the timed runs happen outside the block, on the original function.
    """
    from diffusers.models.transformers import transformer_kandinsky as tk

    original = tk.nablaT_v2
    kept: list[torch.Tensor] = []

    @torch.compiler.disable
    def recording(q, k, sta, thr=0.9):
        mask = original(q, k, sta, thr=thr)
        # NABLA marks every kept block "full" (no partial blocks); counts are (batch, heads, query blocks).
        counts = mask.full_kv_num_blocks + mask.kv_num_blocks
        kept.append(counts.sum() / (counts.numel() * counts.shape[-1]))
        return mask

    tk.nablaT_v2 = recording
    try:
        yield kept
    finally:
        tk.nablaT_v2 = original


def sta_fraction(pipe, width: int, height: int, frames: int) -> float:
    """The share of blocks NABLA's sliding window keeps by itself (independent of weights)."""
    cfg = pipe.transformer.config
    t, h, w = (frames - 1) // 4 + 1, height // 16, width // 16
    mask = pipe.fast_sta_nabla(
        t, h // 8, w // 8, cfg.attention_wT, cfg.attention_wH, cfg.attention_wW, device=torch.device("cpu")
    )
    return float(mask.float().mean())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
