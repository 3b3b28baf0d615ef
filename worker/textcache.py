"""Prompt embeddings: computed once per distinct prompt, with the text encoders placed where they cost least.

The pipeline accepts precomputed (Qwen embeds, CLIP pooled embeds, cu_seqlens) triples and gives identical output
Encoding a prompt runs a 7B Qwen2.5-VL model, so repeated prompts and the negative prompt, which
is the same for almost every job, are served from memory instead.
"""

from __future__ import annotations

import contextlib
import threading
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Generic, Literal, TypeVar

import torch

# diffusers' Kandinsky5 pipelines use this negative prompt when a request gives none (pipeline_kandinsky.py).
DEFAULT_NEGATIVE_PROMPT = (
    "Static, 2D cartoon, cartoon, 2d animation, paintings, images, worst quality, low quality, ugly, deformed, "
    "walking backwards"
)

Placement = Literal["device", "offload", "cpu"]

K = TypeVar("K")
V = TypeVar("V")


class LRU(Generic[K, V]):
    """A small least-recently-used map; size 0 keeps nothing."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.evictions = 0
        self._items: OrderedDict[K, V] = OrderedDict()

    def get(self, key: K) -> V | None:
        value = self._items.get(key)
        if value is not None:
            self._items.move_to_end(key)
        return value

    def put(self, key: K, value: V) -> None:
        if self.size <= 0:
            return
        self._items[key] = value
        self._items.move_to_end(key)
        while len(self._items) > self.size:
            self._items.popitem(last=False)
            self.evictions += 1

    def __contains__(self, key: K) -> bool:
        return key in self._items

    def __len__(self) -> int:
        return len(self._items)


@dataclass(frozen=True)
class PromptEmbeds:
    qwen: torch.Tensor  # (1, tokens, 3584)
    clip: torch.Tensor  # (1, 768) pooled
    cu_seqlens: torch.Tensor  # (2,) int32

    def to(self, device: torch.device) -> PromptEmbeds:
        return PromptEmbeds(self.qwen.to(device), self.clip.to(device), self.cu_seqlens.to(device))

    def as_kwargs(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """The pipeline's argument names: prompt_embeds_qwen, ... or negative_prompt_embeds_qwen, ..."""
        return {
            f"{prefix}prompt_embeds_qwen": self.qwen,
            f"{prefix}prompt_embeds_clip": self.clip,
            f"{prefix}prompt_cu_seqlens": self.cu_seqlens,
        }


class _PinnedSwap:
    """Keeps a module's weights in pinned host memory and lends them to the GPU only while needed.

    Weights never change, so offloading is dropping the device copy (free) and onloading is one host-to-device
    copy from page-locked memory, the fastest the bus allows. The 19B Pro transformer stays put.
    """

    def __init__(self, module: torch.nn.Module, device: torch.device) -> None:
        self.device = device
        self.pairs: list[tuple[torch.Tensor, torch.Tensor]] = []  # (parameter or buffer, its host copy)
        for t in self._tensors(module):
            host = t.data.to("cpu")
            # Page-locked memory copies at full bus speed (and needs a CUDA runtime to allocate).
            host = host.pin_memory() if device.type == "cuda" else host
            # Point the tensor at its pinned copy at once: the unpinned one is freed now, so the host holds one
            # copy of the encoder plus one tensor, not two whole copies (Qwen2.5-VL 7B is 16.6 GB).
            t.data = host
            self.pairs.append((t, host))

    @staticmethod
    def _tensors(module: torch.nn.Module) -> list[torch.Tensor]:
        # Unique objects only: tied weights are one parameter and must stay one.
        seen: dict[int, torch.Tensor] = {}
        for t in [*module.parameters(), *module.buffers()]:
            seen.setdefault(id(t), t)
        return list(seen.values())

    def onload(self) -> None:
        for t, host in self.pairs:
            t.data = host.to(self.device, non_blocking=True)

    def offload(self) -> None:
        # Kernels still reading the device copy are safe: the caching allocator reuses freed blocks in stream order.
        for t, host in self.pairs:
            t.data = host


class TextEncoders:
    """Encodes prompts with the pipeline's Qwen2.5-VL + CLIP pair, caches the results, and owns their placement.

    placement "device": both encoders live on the compute device (Lite: ~17 GB next to a 4 GB transformer).
    "offload": they live in pinned host memory and visit the device for each encode (Pro: keeps the 19B
    transformer resident instead of moving it every job, as enable_model_cpu_offload would). "cpu": they run on
    the CPU (slow, but no device memory at all); the embeddings are then moved to the device.
    """

    def __init__(self, pipe, device: torch.device, placement: Placement, cache_size: int, max_sequence_length: int):
        self.pipe = pipe
        self.device = device
        self.placement = placement
        self.max_sequence_length = max_sequence_length
        self.cache: LRU[tuple[str, int], PromptEmbeds] = LRU(cache_size)
        self.pinned: dict[tuple[str, int], PromptEmbeds] = {}
        self.hits = self.misses = 0
        self._lock = threading.Lock()
        self._depth = 0  # open session() blocks
        self._loaded = False
        encoders = [pipe.text_encoder, pipe.text_encoder_2]
        self._swaps: list[_PinnedSwap] = []
        if placement == "offload" and device.type != "cpu":
            self._swaps = [_PinnedSwap(m, device) for m in encoders]
        else:
            for m in encoders:
                m.to(self.encode_device)

    @property
    def encode_device(self) -> torch.device:
        return torch.device("cpu") if self.placement == "cpu" else self.device

    @contextlib.contextmanager
    def session(self) -> Iterator[None]:
        """Within the block, encoders once onloaded stay until its end: one transfer per job, and none at all
        when every prompt of the job is cached."""
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
            if self._depth == 0 and self._loaded:
                self._move(onload=False)

    @contextlib.contextmanager
    def resident(self) -> Iterator[torch.device]:
        """The encoders on the device they compute on, for the duration of the block (also for prompt expansion)."""
        if not self._loaded:
            self._move(onload=True)
        try:
            yield self.encode_device
        finally:
            if self._depth == 0:
                self._move(onload=False)

    def _move(self, onload: bool) -> None:
        for swap in self._swaps:
            if onload:
                swap.onload()
            else:
                swap.offload()
        self._loaded = onload

    def pin(self, prompt: str) -> PromptEmbeds:
        """Encode once and keep for the process's lifetime (the default negative prompt)."""
        key = (prompt, self.max_sequence_length)
        if key not in self.pinned:
            self.pinned[key] = self._encode(prompt)
        return self.pinned[key]

    def encode(self, prompt: str) -> tuple[PromptEmbeds, bool]:
        """The prompt's embeddings and whether they came from memory."""
        key = (prompt, self.max_sequence_length)
        with self._lock:
            hit = self.pinned.get(key) or self.cache.get(key)
        if hit is not None:
            self.hits += 1
            return hit, True
        self.misses += 1
        embeds = self._encode(prompt)
        with self._lock:
            self.cache.put(key, embeds)
        return embeds, False

    def _encode(self, prompt: str) -> PromptEmbeds:
        dtype = self.pipe.transformer.dtype
        with self.resident() as device, torch.inference_mode():
            qwen, clip, cu = self.pipe.encode_prompt(
                prompt=prompt, max_sequence_length=self.max_sequence_length, device=device, dtype=dtype
            )
        # On the compute device already, except for "cpu" placement; the pipeline never writes into them.
        return PromptEmbeds(qwen.to(self.device), clip.to(self.device), cu.to(self.device))
