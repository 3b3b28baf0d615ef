"""The attention kernel: validated on every attention shape the model runs, timed on CUDA, set per attention layer.

Kandinsky 5 runs three attention shapes per forward: visual self-attention (tokens x tokens, nearly all the FLOPs),
cross-attention (visual queries on the text) in every visual block, and text self-attention in the text blocks.
A kernel is a candidate only if it runs and agrees with native SDPA on all three: a kernel that only fails on the
short text shape (some cuDNN and flash builds refuse odd lengths) would otherwise crash every job, and the worker
would restart into the same crash. NABLA needs flex on the visual self-attention only (its block masks); the other
two shapes keep the fastest dense kernel.
"""

from __future__ import annotations

import importlib.util
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

log = logging.getLogger(__name__)

# Exact kernels only: lossy ones (sage, int8/fp8) change the videos and are left to an explicit pin.
_DENSE_CANDIDATES = ["native", "_native_cudnn", "_native_flash", "_native_efficient"]
# Text tokens of the text shapes: a typical prompt. Lengths vary per job; the kernels checked here take any length.
TEXT_TOKENS = 256

Runner = Callable[[str, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class AttentionChoice:
    dense: str  # cross-attention, text self-attention, and visual self-attention of dense checkpoints
    visual: str  # visual self-attention: "flex" for NABLA, else the same as dense
    timings: dict[str, float] = field(default_factory=dict)  # seconds per forward's worth of calls, per candidate
    rejected: dict[str, str] = field(default_factory=dict)  # candidate -> why (the shape it failed on)

    def describe(self) -> str:
        return self.dense if self.visual == self.dense else f"{self.dense} (visual self-attention: {self.visual})"


def candidates(device: torch.device) -> list[str]:
    """Dense kernels worth trying on this device: SDPA's, plus FlashAttention 2/3 where their packages are installed
    (FA3 only on Hopper, sm90, which upstream's published timings used)."""
    names = list(_DENSE_CANDIDATES)
    if device.type != "cuda":
        return names
    if importlib.util.find_spec("flash_attn") is not None:
        names.append("flash")
    major, _ = torch.cuda.get_device_capability(device)
    if major == 9 and importlib.util.find_spec("flash_attn_interface") is not None:
        names.append("_flash_3")
    return names


def shapes(heads: int, head_dim: int, visual_tokens: int) -> dict[str, tuple[int, int]]:
    """(query tokens, key tokens) of each attention shape the model runs, by name."""
    return {
        "visual self-attention": (visual_tokens, visual_tokens),
        "cross-attention": (visual_tokens, TEXT_TOKENS),
        "text self-attention": (TEXT_TOKENS, TEXT_TOKENS),
    }


def _dispatch(name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    from diffusers.models.attention_dispatch import dispatch_attention_fn

    return dispatch_attention_fn(q, k, v, backend=name)


def validate(
    names: list[str],
    heads: int,
    head_dim: int,
    visual_tokens: int,
    device: torch.device,
    dtype: torch.dtype,
    time_it: bool,
    run: Runner = _dispatch,
    skip_visual: bool = False,
) -> tuple[dict[str, float], dict[str, str]]:
    """Each candidate on every shape: (seconds per call summed over the shapes for those that pass, why the others
    failed). `skip_visual`: the visual self-attention runs flex (NABLA), so the dense kernel need not run it."""
    gen = torch.Generator(device=device).manual_seed(0)
    timings: dict[str, float] = {}
    rejected: dict[str, str] = {}
    inputs = {}
    for shape, (nq, nk) in shapes(heads, head_dim, visual_tokens).items():
        if skip_visual and shape == "visual self-attention":
            continue
        q = torch.randn(1, nq, heads, head_dim, device=device, dtype=dtype, generator=gen)
        k, v = (torch.randn(1, nk, heads, head_dim, device=device, dtype=dtype, generator=gen) for _ in range(2))
        inputs[shape] = (q, k, v, _dispatch("native", q, k, v))
    for name in names:
        total = 0.0
        for shape, (q, k, v, reference) in inputs.items():
            try:
                out = run(name, q, k, v)  # also the warm-up call
                if not torch.allclose(out.float(), reference.float(), atol=2e-2, rtol=2e-2):
                    raise ValueError("output disagrees with native SDPA")
                if time_it:
                    _sync(device)
                    t0 = time.perf_counter()
                    for _ in range(3):
                        run(name, q, k, v)
                    _sync(device)
                    total += (time.perf_counter() - t0) / 3
            except Exception as e:  # a kernel whose package, GPU generation or shape support is missing
                rejected[name] = f"{shape} {tuple(q.shape)}x{tuple(k.shape)}: {type(e).__name__}: {e}"[:300]
                break
        else:
            timings[name] = total
    return timings, rejected


def choose(setting: str, transformer, device: torch.device, visual_tokens: int, run: Runner = _dispatch):
    """The kernels for one worker: a pinned one (`setting`) if it passes, else the fastest that passes."""
    nabla = getattr(transformer.config, "attention_type", None) == "nabla"
    heads = transformer.config.model_dim // sum(transformer.config.axes_dims)
    head_dim = sum(transformer.config.axes_dims)
    if setting == "auto":
        names = candidates(device) if device.type == "cuda" else ["native"]
    else:
        names = [setting]
    timings, rejected = validate(
        names, heads, head_dim, visual_tokens, device, transformer.dtype, device.type == "cuda", run, skip_visual=nabla
    )
    if setting != "auto" and setting not in timings:
        log.error("pinned attention kernel fails; falling back to native", extra={"kernel": setting, **rejected})
    dense = min(timings, key=timings.get) if timings else "native"
    choice = AttentionChoice(dense, "flex" if nabla else dense, timings, rejected)
    log.info(
        "attention kernel chosen",
        extra={"attention": choice.describe(), "timings_s": timings, "rejected": list(rejected)},
    )
    return choice


def apply(transformer, choice: AttentionChoice) -> None:
    """Set the dense kernel everywhere, then flex on the visual self-attention when NABLA needs it."""
    # Set even for "native": diffusers also makes the last backend set the process-wide default, which a processor
    # left unset follows.
    transformer.set_attention_backend(choice.dense)
    if choice.visual != choice.dense:
        from diffusers.models.attention_dispatch import AttentionBackendName

        for block in transformer.visual_transformer_blocks:
            block.self_attention.processor._attention_backend = AttentionBackendName(choice.visual)


def per_layer(transformer) -> dict[str, str]:
    """The kernel each attention layer kind runs now (for logs and tests)."""
    block = transformer.visual_transformer_blocks[0]
    text = transformer.text_transformer_blocks[0]
    layers = {
        "visual self-attention": block.self_attention,
        "cross-attention": block.cross_attention,
        "text self-attention": text.self_attention,
    }
    return {name: getattr(m.processor._attention_backend, "value", "default") for name, m in layers.items()}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
