"""Opt-in step caching: reuse transformer work between denoising steps (faster, slightly different videos).

Of the caches diffusers 0.42.1 ships, checked on Kandinsky5Transformer3DModel:
- MagCache works (its block registry knows Kandinsky5TransformerDecoderBlock), but needs per-checkpoint magnitude
  ratios; upstream publishes them in its configs (magcache.mag_ratios; the catalogue ships them,
  service/contract/magcache.py) with threshold 0.12, K 2 and retention 0.2. They are fed as upstream's
  set_magcache_params does: a leading 1.0 for step 0, then one series per branch (cond, uncond), resampled to the
  step count with its nearest_interp.
- TaylorSeer works once pointed at Kandinsky's module names (its defaults match none, so it silently does nothing).
- FirstBlockCache fails: its hook asks the block for an argument named `hidden_states`, Kandinsky's is
  `visual_embed` ("Parameter 'hidden_states' not found in function signature").
The Kandinsky pipeline calls the transformer without `cache_context`, and with guidance it alternates a cond and
an uncond call every step; the hooks need those two kept apart, which StepCacher._name_branch does.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Literal

import numpy as np
import torch

from service.contract.magcache import MAX_SKIP_STEPS, RETENTION_RATIO

StepCache = Literal["off", "taylorseer", "magcache"]

# Attention and feed-forward of every visual block: nearly all of a step's FLOPs.
_TAYLORSEER_MODULES = [r"visual_transformer_blocks\.\d+\.(self_attention|cross_attention|feed_forward)"]


def nearest_interp(values: list[float], length: int) -> list[float]:
    """Upstream's resampling of a ratio series to another step count (kandinsky/magcache_utils.py nearest_interp)."""
    if length == 1:
        return values[-1:]
    scale = (len(values) - 1) / (length - 1)
    return [values[int(np.round(i * scale))] for i in range(length)]


def mag_series(published: list[float], steps: int) -> tuple[list[float], list[float]]:
    """The (cond, uncond) ratio of every step of a `steps`-step run, as upstream's set_magcache_params builds them:
    [1.0, 1.0] for step 0 (nothing to compare it with), then the published pairs; resampled when the run's step
    count is not the one they were measured at."""
    if len(published) % 2:
        raise ValueError("MagCache ratios come in cond/uncond pairs (upstream configs: magcache.mag_ratios)")
    full = [1.0, 1.0, *published]
    cond, uncond = full[0::2], full[1::2]
    if len(full) != 2 * steps:
        cond, uncond = nearest_interp(cond, steps), nearest_interp(uncond, steps)
    return cond, uncond


class _BranchRatios:
    """What diffusers' MagCache hook reads as `config.mag_ratios[step]`, answered from the series of the branch being
    computed: its one config serves the cond and the uncond cache states, upstream keeps a series for each."""

    def __init__(self, cond: list[float], uncond: list[float], branch: Callable[[], str]) -> None:
        self.cond, self.uncond, self.branch = cond, uncond, branch

    def __len__(self) -> int:
        return len(self.cond)

    def __getitem__(self, step: int) -> float:
        return (self.uncond if self.branch() == "uncond" else self.cond)[step]


class StepCacher:
    """Applies one cache kind to a transformer and prepares it for each generation."""

    def __init__(self, transformer, kind: StepCache, threshold: float, interval: int, mag_ratios: list[float]):
        if kind == "magcache" and not mag_ratios:
            raise ValueError(
                "step_cache=magcache needs MagCache ratios: the catalogue has upstream's for the 50-step checkpoints; "
                "for others set step_cache_mag_ratios (upstream configs: magcache.mag_ratios)"
            )
        self.transformer = transformer
        self.kind = kind
        self.threshold = threshold
        self.interval = interval
        self.mag_ratios = mag_ratios
        self._steps: int | None = None
        self._calls = 0
        self._cfg = False
        self._branch = "cond"
        self._hook = transformer.register_forward_pre_hook(self._name_branch) if kind != "off" else None

    def hooked_modules(self) -> list[torch.nn.Module]:
        """The modules this cache's hooks will wrap (what worker/speed.py compiles one by one), in model order."""
        if self.kind == "off":
            return []
        if self.kind == "magcache":
            from diffusers.hooks._common import _ALL_TRANSFORMER_BLOCK_IDENTIFIERS

            # apply_mag_cache hooks every block of the model's block lists (Kandinsky: the visual blocks).
            return [
                block
                for name, blocks in self.transformer.named_children()
                if name in _ALL_TRANSFORMER_BLOCK_IDENTIFIERS and isinstance(blocks, torch.nn.ModuleList)
                for block in blocks
            ]
        # TaylorSeer hooks the modules whose names match its identifiers in full.
        return [
            m
            for name, m in self.transformer.named_modules()
            if any(re.fullmatch(pattern, name) for pattern in _TAYLORSEER_MODULES)
        ]

    def warm_steps(self, model_steps: int) -> int:
        """Steps of the warm-up generation: a cache's full schedule (every compute/skip/predict transition has
        happened before the worker is ready), else 1."""
        return 1 if self.kind == "off" else model_steps

    def _config(self, steps: int):
        from diffusers.hooks import MagCacheConfig, TaylorSeerCacheConfig

        if self.kind == "magcache":
            cond, uncond = mag_series(self.mag_ratios, steps)
            config = MagCacheConfig(
                threshold=self.threshold,
                max_skip_steps=MAX_SKIP_STEPS,
                retention_ratio=RETENTION_RATIO,
                num_inference_steps=steps,
                mag_ratios=cond,
            )
            # Set after construction: the config would turn any sequence into one tensor.
            config.mag_ratios = _BranchRatios(cond, uncond, lambda: self._branch)
            return config
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

    def state(self) -> dict:
        """The hooks' per-branch state between two steps (a checkpoint keeps it: worker/checkpoint.py). Tensors on
        the CPU; plain values otherwise."""
        if self.kind == "off":
            return {}
        saved: dict = {"calls": self._calls}
        for path, manager in self._state_managers():
            saved[path] = {ctx: _moved(dict(vars(st)), "cpu") for ctx, st in manager._state_cache.items()}
        return saved

    def restore(self, saved: dict, device: torch.device) -> None:
        """After prepare(): the hooks' state as `state()` returned it, so the resumed steps cache as the
        uninterrupted run's did."""
        if self.kind == "off" or not saved:
            return
        self._calls = saved["calls"]
        for path, manager in self._state_managers():
            for ctx, values in saved.get(path, {}).items():
                st = manager._state_cls(*manager._init_args, **manager._init_kwargs)
                vars(st).update(_moved(values, device))
                manager._state_cache[ctx] = st

    def _state_managers(self):
        # diffusers keeps each hook's state in a StateManager keyed by cache context (hooks/hooks.py).
        for name, module in self.transformer.named_modules():
            registry = getattr(module, "_diffusers_hook", None)
            for hook_name, hook in registry.hooks.items() if registry is not None else ():
                if (manager := getattr(hook, "state_manager", None)) is not None:
                    yield f"{name}/{hook_name}", manager

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
        self._branch = name
        _set_cache_context(module, CacheContext(name))


def _moved(value, device):
    """`value` with every tensor in it on `device` (dicts, lists and tuples walked)."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: _moved(v, device) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_moved(v, device) for v in value)
    return value
