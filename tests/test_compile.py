"""What really compiles: a counting torch.compile backend on the real tiny pipeline (CPU).

The GPU runs Inductor; here a backend that counts graphs and runs them as traced stands in for it, so the tests see
exactly which frames dynamo compiled and when, without Inductor's C++ build. Eager execution of a module's forward
is seen with sys.setprofile: a compiled frame runs dynamo's code object, never the original one.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager

import pytest
import torch

from service.contract import metrics
from service.contract.models import resolve_model
from service.contract.settings import Settings
from worker.pipeline import GenerationRequest, VideoPipeline, buckets

GRAPHS: list = []


def _counting(gm, example_inputs, **kwargs):
    GRAPHS.append(gm)
    return gm.forward


torch._dynamo.register_backend(_counting, "k5-counting")


@pytest.fixture(scope="module")
def spec(tiny_models):
    return resolve_model(str(tiny_models["t2v"]))


@contextmanager
def eager_calls(modules):
    """Counts Python-level (uncompiled) executions of these modules' forward code (these instances only: the text
    blocks' attention shares its code with the visual blocks')."""
    codes = {type(m).forward.__code__ for m in modules}
    ids = {id(m) for m in modules}
    seen = [0]

    def profile(frame, event, arg):
        if event == "call" and frame.f_code in codes and id(frame.f_locals.get("self")) in ids:
            seen[0] += 1

    sys.setprofile(profile)
    try:
        yield seen
    finally:
        sys.setprofile(None)


def job(prompt: str, width: int, height: int, frames: int, steps: int = 4) -> GenerationRequest:
    return GenerationRequest(prompt, width, height, frames, steps, guidance_scale=5.0, seed=1)


CACHES = {
    "taylorseer": {"step_cache": "taylorseer", "step_cache_interval": 2},
    "magcache": {"step_cache": "magcache", "step_cache_mag_ratios": ",".join(["1.0", "1.0"] + ["0.98"] * 10)},
}


@pytest.mark.parametrize("cache", sorted(CACHES))
def test_step_cache_keeps_its_blocks_compiled(spec, cache):
    """diffusers' cache hooks run the block inside torch.compiler.disable: compiled as part of the transformer, the
    blocks would run eager (and NABLA's flex uncompiled). Each hooked module must run compiled code."""
    settings = Settings(compile_transformer="full", compile_backend="k5-counting", **CACHES[cache])
    pipeline = VideoPipeline.load(settings, spec)
    hooked = pipeline.step_cache.hooked_modules()
    assert hooked
    pipeline.warm()
    with eager_calls(hooked) as seen:
        pipeline.generate(job("a cat sitting on a windowsill", 96, 64, 25))
    assert pipeline.pipe.transformer.is_cache_enabled
    assert seen[0] == 0, f"{seen[0]} eager forwards of cached modules"
    assert pipeline.compiled == "blocks"
    # A module outside the cache still runs eager here (the control that shows the profiler sees eager calls).
    with eager_calls(pipeline.pipe.transformer.text_transformer_blocks) as text:
        pipeline.generate(job("a cat sitting on a windowsill", 96, 64, 25))
    assert text[0] > 0
    assert pipeline.recompiles == 0


@pytest.mark.parametrize("cache", ["off", "magcache"])
def test_one_warm_up_covers_every_bucket_duration_and_prompt_length(spec, cache):
    extra = CACHES.get(cache, {})
    settings = Settings(compile_transformer="full", compile_backend="k5-counting", **extra)
    pipeline = VideoPipeline.load(settings, spec)
    pipeline.warm()
    compiled = pipeline.compiles.count
    assert compiled > 0 and len(GRAPHS) > 0
    before = metrics.RECOMPILES.labels(spec.id)._value.get()
    prompts = ["fox", "a red fox running through the snow, " * 6, "an astronaut riding a horse on the moon " * 80]
    # Every bucket with the model's step count (the cache's schedule), then every prompt length on one bucket.
    for index, (width, height, frames) in enumerate(buckets(spec)):
        pipeline.generate(job(prompts[index % len(prompts)], width, height, frames, steps=spec.steps))
    for prompt in prompts:
        pipeline.generate(job(prompt, *buckets(spec)[-1], steps=1))
    assert pipeline.compiles.count == compiled, "a job compiled after the warm-up"
    assert pipeline.recompiles == 0 and metrics.RECOMPILES.labels(spec.id)._value.get() == before

    # The counter and the metric do see a compile after ready: drop dynamo's compiled code, then run a job.
    torch._dynamo.reset()
    pipeline.generate(job("fox", 96, 64, 25, steps=1))
    assert pipeline.recompiles > 0
    assert metrics.RECOMPILES.labels(spec.id)._value.get() == before + pipeline.recompiles
