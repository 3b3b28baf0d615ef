"""Opt-in step caching: reuse transformer work between denoising steps (faster, slightly different videos).

Of the caches diffusers 0.42.1 ships, checked on Kandinsky5Transformer3DModel:
- MagCache works (its block registry knows Kandinsky5TransformerDecoderBlock), but needs per-checkpoint magnitude
  ratios; upstream publishes them in its configs (magcache.mag_ratios) and runs MagCache by default (thresh 0.12).
- TaylorSeer works once pointed at Kandinsky's module names (its defaults match none, so it silently does nothing).
- FirstBlockCache fails: its hook asks the block for an argument named `hidden_states`, Kandinsky's is
  `visual_embed` ("Parameter 'hidden_states' not found in function signature").
The Kandinsky pipeline calls the transformer without `cache_context`, and with guidance it alternates a cond and
an uncond call every step; the hooks need those two kept apart, which StepCacher._name_branch does.
"""

from __future__ import annotations

from typing import Literal

import torch

StepCache = Literal["off", "taylorseer", "magcache"]

# Attention and feed-forward of every visual block: nearly all of a step's FLOPs.
_TAYLORSEER_MODULES = [r"visual_transformer_blocks\.\d+\.(self_attention|cross_attention|feed_forward)"]


def parse_mag_ratios(values: list[float]) -> list[float]:
    """Upstream's list interleaves cond and uncond ratios, which are nearly equal; diffusers takes one series."""
    return values[0::2]


class StepCacher:
    """Applies one cache kind to a transformer and prepares it for each generation."""

    def __init__(self, transformer, kind: StepCache, threshold: float, interval: int, mag_ratios: list[float]):
        if kind == "magcache" and not mag_ratios:
            raise ValueError("step_cache=magcache needs step_cache_mag_ratios (upstream configs: magcache.mag_ratios)")
        self.transformer = transformer
        self.kind = kind
        self.threshold = threshold
        self.interval = interval
        self.mag_ratios = mag_ratios
        self._steps: int | None = None
        self._calls = 0
        self._cfg = False
        self._hook = transformer.register_forward_pre_hook(self._name_branch) if kind != "off" else None

    def _config(self, steps: int):
        from diffusers.hooks import MagCacheConfig, TaylorSeerCacheConfig

        if self.kind == "magcache":
            # K=2 consecutive skips and 20% retention, as upstream's magcache_utils.
            return MagCacheConfig(
                threshold=self.threshold,
                max_skip_steps=2,
                retention_ratio=0.2,
                num_inference_steps=steps,
                mag_ratios=self.mag_ratios,
            )
        return TaylorSeerCacheConfig(cache_interval=self.interval, cache_identifiers=_TAYLORSEER_MODULES)

    def prepare(self, steps: int, cfg: bool) -> None:
        """Before each generation: fresh state (an aborted job leaves its step counters mid-way)."""
        if self.kind == "off":
            return
        self._calls, self._cfg = 0, cfg
        if steps != self._steps:
            # MagCache interpolates its ratios to the step count, so a new count needs a new config.
            if self._steps is not None:
                self.transformer.disable_cache()
            self.transformer.enable_cache(self._config(steps))
            self._steps = steps
        self.transformer._reset_stateful_cache()

    def remove(self) -> None:
        """Take the cache off the transformer again (a benchmark compares cached and uncached on one model)."""
        if self._hook is not None:
            if self._steps is not None:
                self.transformer.disable_cache()
            self._hook.remove()
            self._hook, self._steps = None, None

    @torch.compiler.disable
    def _name_branch(self, module, args) -> None:
        from diffusers.hooks.hooks import CacheContext, _set_cache_context

        # The pipeline runs cond then uncond each step when guidance is on.
        name = "uncond" if self._cfg and self._calls % 2 else "cond"
        self._calls += 1
        _set_cache_context(module, CacheContext(name))
