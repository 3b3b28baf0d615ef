"""Resuming from a saved denoising state, in-process on the real tiny pipeline (CPU): a run stopped at step k and
resumed from its checkpoint gives the frames of an uninterrupted run, byte for byte; a checkpoint that does not
match its job is refused."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from PIL import Image

from service.contract.models import resolve_model
from service.contract.settings import Settings
from service.contract.storage import LocalStorage
from worker import checkpoint
from worker.checkpoint import DenoiseState
from worker.pipeline import GenerationRequest, VideoPipeline

STEPS, STOP_AT = 6, 3


class Stop(Exception):
    pass


def request(**overrides) -> GenerationRequest:
    fields = dict(
        prompt="a lighthouse in a storm", width=64, height=64, num_frames=5, num_inference_steps=STEPS,
        guidance_scale=5.0, seed=11,
    )  # fmt: skip
    return GenerationRequest(**{**fields, **overrides})


def stopped_at(pipeline: VideoPipeline, req: GenerationRequest, step: int) -> bytes:
    """Run `req` until `step`, save its state there as a checkpoint does, and stop (as SIGTERM would)."""
    saved: list[bytes] = []

    def on_state(state: DenoiseState) -> None:
        if state.step == step:
            saved.append(checkpoint.serialise(state, checkpoint.fingerprint(pipeline, req)))

    def on_step(done: int, total: int) -> None:
        if done == step:
            raise Stop

    with pytest.raises(Stop):
        pipeline.generate(req, on_step, on_state=on_state)
    return saved[0]


def resumed(pipeline: VideoPipeline, req: GenerationRequest, data: bytes) -> tuple[np.ndarray, list[int]]:
    resume, why = checkpoint.deserialise(data, checkpoint.fingerprint(pipeline, req), STEPS, 3600)
    assert resume is not None, why
    steps: list[int] = []
    frames = pipeline.generate(req, lambda done, total: steps.append(done), resume=resume)
    return frames, steps


@pytest.fixture(scope="module")
def spec(tiny_models):
    return resolve_model(str(tiny_models["t2v"]))


@pytest.fixture(scope="module")
def t2v(spec) -> VideoPipeline:
    return VideoPipeline.load(Settings(), spec)


def test_resumed_run_is_byte_identical_and_runs_only_the_remaining_steps(t2v):
    req = request()
    uninterrupted = t2v.generate(req)
    data = stopped_at(t2v, req, STOP_AT)
    frames, steps = resumed(t2v, req, data)
    assert steps == list(range(STOP_AT, STEPS + 1))  # the start, then one call per step run: steps 4..6 only
    assert t2v.last_stats is not None and t2v.last_stats.steps == STEPS - STOP_AT
    assert t2v.last_stats.resumed_from_step == STOP_AT
    assert np.array_equal(frames, uninterrupted)


def test_image_to_video_resumes_byte_identical(tiny_models):
    i2v = VideoPipeline.load(Settings(), resolve_model(str(tiny_models["i2v"])))
    image = Image.new("RGB", (64, 64), (200, 40, 90))
    req = request(num_frames=17, image=image)
    uninterrupted = i2v.generate(req)
    frames, _ = resumed(i2v, req, stopped_at(i2v, req, STOP_AT))
    assert np.array_equal(frames, uninterrupted)


def test_step_cache_state_is_part_of_the_checkpoint(spec):
    # TaylorSeer with interval 2: which steps are computed and what they predict from depends on the hook state.
    cached = VideoPipeline.load(Settings(step_cache="taylorseer", step_cache_interval=2), spec)
    req = request()
    uninterrupted = cached.generate(req)
    frames, _ = resumed(cached, req, stopped_at(cached, req, STOP_AT))
    assert np.array_equal(frames, uninterrupted)


def test_a_checkpoint_of_another_request_or_model_is_refused(t2v, tiny_models):
    req = request()
    data = stopped_at(t2v, req, STOP_AT)
    changes = [{"seed": 12}, {"prompt": "a boat"}, {"num_inference_steps": 8}]
    for changed in (dataclasses.replace(req, **change) for change in changes):
        fp = checkpoint.fingerprint(t2v, changed)
        resume, why = checkpoint.deserialise(data, fp, changed.num_inference_steps, 3600)
        assert resume is None and "request" in why
    other = VideoPipeline.load(Settings(sampling_grid="diffusers"), resolve_model(str(tiny_models["t2v"])))
    assert checkpoint.deserialise(data, checkpoint.fingerprint(other, req), STEPS, 3600)[0] is None
    assert checkpoint.deserialise(data, checkpoint.fingerprint(t2v, req), STEPS, 0)[1] == "older than checkpoint_ttl_s"


def test_checkpoint_storage_layout_refusal_and_deletion(t2v, tmp_path):
    storage = LocalStorage(tmp_path)
    ckpts = checkpoint.Checkpoints(storage, "k5-tiny-t2v", every_steps=2, on_shutdown=True, ttl_s=3600)
    req = request()
    fp = checkpoint.fingerprint(t2v, req)
    video = "video_abc"
    data = stopped_at(t2v, req, STOP_AT)
    storage.put_bytes(checkpoint.checkpoint_key(video), data, "application/octet-stream")
    # A run's cleanup of its own prefix keeps it: the next run reads it.
    storage.put_bytes(f"{video}/run-1234/video.mp4", b"x", "video/mp4")
    storage.delete_prefix(f"{video}/run-1234")
    resume = ckpts.load(video, fp, STEPS)
    assert resume is not None and resume.step == STOP_AT
    # Refused (another request): deleted, so no later run tries it again.
    assert ckpts.load(video, checkpoint.fingerprint(t2v, dataclasses.replace(req, seed=1)), STEPS) is None
    assert not storage.exists(checkpoint.checkpoint_key(video))
    # It is the video's data: deleting the video's prefix (DELETE, expiry) removes it.
    storage.put_bytes(checkpoint.checkpoint_key(video), data, "application/octet-stream")
    storage.delete_prefix(video)
    assert ckpts.load(video, fp, STEPS) is None
    # Due at SIGTERM and every every_steps, never after the last step.
    assert [s for s in range(STEPS + 1) if ckpts.due(s, STEPS, False)] == [2, 4]
    assert ckpts.due(1, STEPS, True) and not ckpts.due(STEPS, STEPS, True)


def test_real_shape_sizes_follow_the_vae_compression():
    from bench.checkpoint import real_shape_sizes

    five, ten = real_shape_sizes()
    assert five["latents_shape"] == [1, 31, 64, 96, 33] and ten["latents_shape"] == [1, 61, 64, 96, 33]
    assert five["latents_mb"] < five["checkpoint_mb"] < ten["checkpoint_mb"]
