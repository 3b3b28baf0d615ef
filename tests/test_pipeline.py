"""VideoPipeline's speed features on the real tiny diffusers pipelines (CPU).

Every check compares against the plain diffusers call or the feature switched off, on real components; the only
fakes are a recording wrapper around Qwen's generate and an exception raised from the step callback.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from service.contract.models import resolve_model
from service.contract.settings import Settings
from worker import attention, speed
from worker.pipeline import GenerationRequest, VideoPipeline, buckets
from worker.textcache import LRU, TextEncoders, _PinnedSwap

STEPS = 2


def request(**overrides) -> GenerationRequest:
    fields = dict(
        prompt="a red fox running through the snow",
        width=32,
        height=32,
        num_frames=5,
        num_inference_steps=STEPS,
        guidance_scale=5.0,
        seed=7,
    )
    return GenerationRequest(**{**fields, **overrides})


def plain_diffusers(pipe, req: GenerationRequest, **extra) -> np.ndarray:
    """The seed's path: prompt strings straight into the pipeline, default attention, no caches."""
    generator = torch.Generator().manual_seed(req.seed)
    with torch.inference_mode():
        video = pipe(
            prompt=req.prompt,
            negative_prompt=req.negative_prompt,
            height=req.height,
            width=req.width,
            num_frames=req.num_frames,
            num_inference_steps=req.num_inference_steps,
            guidance_scale=req.guidance_scale,
            generator=generator,
            output_type="np",
            **extra,
        ).frames[0]
    return (np.clip(video, 0.0, 1.0) * 255.0).round().astype(np.uint8)


@pytest.fixture(scope="module")
def t2v_spec(tiny_models):
    return resolve_model(str(tiny_models["t2v"]))


@pytest.fixture(scope="module")
def t2v(t2v_spec) -> VideoPipeline:
    return VideoPipeline.load(Settings(), t2v_spec)


def test_cached_embeddings_give_identical_frames(t2v):
    req = request()
    reference = plain_diffusers(t2v.pipe, req)
    first = t2v.generate(req)
    assert t2v.last_stats.text_cache_hit is False
    second = t2v.generate(req)
    assert t2v.last_stats.text_cache_hit is True
    assert np.array_equal(first, reference) and np.array_equal(second, reference)

    # A request's own negative prompt goes through the same cache, also byte-identical.
    custom = request(negative_prompt="blurry, low detail")
    assert np.array_equal(t2v.generate(custom), plain_diffusers(t2v.pipe, custom))


def test_image_to_video_matches_plain_diffusers(tiny_models):
    i2v = VideoPipeline.load(Settings(), resolve_model(str(tiny_models["i2v"])))
    # Image-to-video needs at least 17 frames (fewer gives NaN frames in diffusers 0.42.1).
    req = request(width=64, height=64, num_frames=17, image=Image.new("RGB", (64, 64), (200, 80, 40)))
    assert np.array_equal(i2v.generate(req), plain_diffusers(i2v.pipe, req, image=req.image))


def test_lru_evicts_least_recently_used(t2v):
    lru: LRU[str, int] = LRU(2)
    lru.put("a", 1)
    lru.put("b", 2)
    assert lru.get("a") == 1  # "b" is now the oldest
    lru.put("c", 3)
    assert "b" not in lru and "a" in lru and "c" in lru and lru.evictions == 1

    encoders = TextEncoders(t2v.pipe, t2v.device, "device", cache_size=2, max_sequence_length=512)
    first, hit = encoders.encode("one")
    assert not hit
    encoders.encode("two")
    encoders.encode("three")  # evicts "one"
    again, hit = encoders.encode("one")
    assert not hit and encoders.cache.evictions == 2
    assert torch.equal(first.qwen, again.qwen) and torch.equal(first.clip, again.clip)
    assert encoders.encode("three")[1]


def test_pinned_swap_round_trips_weights(t2v):
    clip = t2v.pipe.text_encoder_2
    before = [p.detach().clone() for p in clip.parameters()]
    swap = _PinnedSwap(clip, torch.device("cpu"))  # pinning itself needs CUDA; the swapping logic does not
    swap.onload()
    swap.offload()
    assert all(torch.equal(a, b) for a, b in zip(before, clip.parameters(), strict=True))


def test_warm_covers_every_bucket(t2v_spec):
    pipeline = VideoPipeline.load(Settings(), t2v_spec)
    pipeline.warm()
    expected = {(w, h, n) for w, h in [(96, 64), (64, 64), (64, 96)] for n in t2v_spec.seconds.values()}
    assert set(pipeline.warmed) == expected == set(buckets(t2v_spec))
    assert len(pipeline.warmed) == len(expected)


def test_enhance_prompt_runs_bounded_and_cached(t2v_spec, monkeypatch):
    pipeline = VideoPipeline.load(Settings(enhance_max_new_tokens=8), t2v_spec)
    assert pipeline.enhance_default is False  # "auto": the tiny model's expansion is noise
    pipeline.generate(request())
    assert pipeline.last_stats.enhanced_prompt is None

    qwen = pipeline.pipe.text_encoder
    real_generate = qwen.generate
    new_tokens: list[int] = []

    def recording_generate(**kwargs):
        out = real_generate(**kwargs)
        new_tokens.append(out.shape[1] - kwargs["input_ids"].shape[1])
        return out

    monkeypatch.setattr(qwen, "generate", recording_generate)
    frames = pipeline.generate(request(enhance_prompt=True))
    enhanced = pipeline.last_stats.enhanced_prompt
    assert isinstance(enhanced, str) and enhanced
    assert new_tokens and 0 < new_tokens[0] <= 8
    assert pipeline.last_stats.enhance_s > 0
    # Greedy decoding: the same prompt expands the same way, so the second job reuses it and its frames.
    assert np.array_equal(pipeline.generate(request(enhance_prompt=True)), frames)
    assert pipeline.last_stats.enhanced_prompt == enhanced and len(new_tokens) == 1

    on = VideoPipeline.load(Settings(enhance_prompt="on", enhance_max_new_tokens=4), t2v_spec)
    assert on.enhance_default is True


def test_step_cache_off_changes_nothing_and_on_runs(t2v, t2v_spec):
    assert not t2v.pipe.transformer.is_cache_enabled and not t2v.pipe.transformer._forward_pre_hooks
    req = request(num_inference_steps=6)
    plain = t2v.generate(req)

    cached = VideoPipeline.load(Settings(step_cache="taylorseer", step_cache_interval=2), t2v_spec)
    first = cached.generate(req)
    assert cached.pipe.transformer.is_cache_enabled
    assert not np.array_equal(first, plain)  # lossy by design: predicted steps are not computed ones

    class Stop(Exception):
        pass

    def stop_at_3(done: int, total: int) -> None:
        if done == 3:
            raise Stop

    with pytest.raises(Stop):
        cached.generate(req, stop_at_3)
    # The aborted job's half-filled cache state must not leak into the next job.
    assert np.array_equal(cached.generate(req), first)

    ratios = ",".join(["1.0", "1.0"] + ["0.99"] * 10)
    mag = VideoPipeline.load(Settings(step_cache="magcache", step_cache_mag_ratios=ratios), t2v_spec)
    assert mag.generate(req).shape == plain.shape
    with pytest.raises(ValueError, match="mag_ratios"):
        VideoPipeline.load(Settings(step_cache="magcache"), t2v_spec)


def test_flex_backend_matches_default(t2v, t2v_spec):
    flex = VideoPipeline.load(Settings(attention_backend="flex"), t2v_spec)
    assert flex.attention_backend == "flex" and t2v.attention_backend == "native"
    req = request()
    diff = np.abs(flex.generate(req).astype(int) - t2v.generate(req).astype(int))
    # Checked here: flex matches the default backend to ~1e-6 on CPU; after uint8 rounding that is at most 1 level.
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01


def test_last_stats_are_filled(t2v):
    t2v.generate(request())
    stats = t2v.last_stats
    assert stats is not None
    for seconds in (stats.text_encode_s, stats.denoise_s, stats.decode_s, stats.step_s):
        assert isinstance(seconds, float) and seconds >= 0
    assert stats.steps == STEPS
    assert stats.step_s == pytest.approx(stats.denoise_s / STEPS)
    assert stats.peak_gpu_memory_bytes is None  # CPU
    assert stats.enhanced_prompt is None


def test_raising_from_on_step_aborts_and_pipeline_stays_usable(t2v):
    req = request(num_inference_steps=4)
    seen: list[tuple[int, int]] = []

    class Cancelled(Exception):
        pass

    def cancel_at_2(done: int, total: int) -> None:
        seen.append((done, total))
        if done == 2:
            raise Cancelled

    with pytest.raises(Cancelled):
        t2v.generate(req, cancel_at_2)
    assert seen == [(0, 4), (1, 4), (2, 4)]  # stopped at once: no step after the raising one
    assert np.array_equal(t2v.generate(req), plain_diffusers(t2v.pipe, req))


def test_compile_and_backend_decisions_on_cpu(t2v):
    cpu = torch.device("cpu")
    transformer = t2v.pipe.transformer
    # Inductor's CPU build takes minutes for the tiny model (and fails for NABLA): "auto" does not compile here.
    assert speed.compile_scope(Settings(), cpu) == "off" and t2v.compile_scope == "off"
    assert getattr(transformer, "_compiled_call_impl", None) is None
    assert speed.compile_scope(Settings(compile_transformer="regional"), cpu) == "regional"
    assert speed.compile_scope(Settings(), torch.device("cuda")) == "full"

    assert attention.choose("auto", transformer, cpu, 100).dense == "native"
    assert attention.choose("_native_math", transformer, cpu, 100).dense == "_native_math"
    candidates = ["native", "_native_math", "no-such-backend"]
    timings, rejected = attention.validate(candidates, 2, 16, 64, cpu, torch.float32, time_it=True)
    assert set(timings) == {"native", "_native_math"} and set(rejected) == {"no-such-backend"}

    transformer.register_to_config(attention_type="nabla")
    try:
        choice = attention.choose("auto", transformer, cpu, 100)
        assert (choice.dense, choice.visual) == ("native", "flex")
    finally:
        transformer.register_to_config(attention_type="regular")

    assert speed.text_placement(Settings(), t2v.pipe, cpu) == "device"
    assert speed.vae_tiling("auto", cpu, 768, 512, 121) is False
    assert speed.vae_tiling("on", cpu, 64, 64, 25) is True
