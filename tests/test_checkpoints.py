"""Any Kandinsky 5 Diffusers checkpoint serves: a local directory or a hub repo id outside the catalogue.

The checkpoints are the tiny ones laid out like the published "-Diffusers" repos (model_index.json, transformer/,
scheduler/, ... and no k5serve.json), with their configs edited the way other checkpoints differ.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import huggingface_hub.constants
import pytest

from service.contract.models import SPEC_FILE, UnknownModelError, resolve_model
from service.contract.settings import Settings
from worker.pipeline import GenerationRequest, VideoPipeline


def published_layout(tiny: Path, dest: Path, shift: float | None = None, **transformer) -> Path:
    shutil.copytree(tiny, dest, ignore=shutil.ignore_patterns(SPEC_FILE))
    if shift is not None:
        edit(dest / "scheduler" / "scheduler_config.json", shift=shift)
    if transformer:
        edit(dest / "transformer" / "config.json", **transformer)
    return dest


def edit(path: Path, **values) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **values}))


def hub_cache(cache: Path, repo_id: str, files: Path) -> None:
    """The hub client's cache layout for one snapshot of a repo (what a warm model volume holds)."""
    root = cache / f"models--{repo_id.replace('/', '--')}"
    commit = "0" * 40
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)
    shutil.copytree(files, root / "snapshots" / commit)


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def test_a_local_checkpoint_outside_the_catalogue_serves_from_its_configs(tiny_models, tmp_path):
    local = published_layout(tiny_models["t2v"], tmp_path / "acme-k5-lite-distilled-5s", shift=5.0)
    spec = resolve_model(str(local))
    assert spec.id == "acme-k5-lite-distilled-5s" and spec.source == str(local)
    assert spec.task == "text-to-video" and spec.attention == "dense"
    assert (spec.steps, spec.guidance, spec.shift) == (16, 1.0, 5.0)  # the variant's defaults, the config's shift
    assert spec.sizes == ["768x512", "512x512", "512x768"] and spec.seconds == {"5": 121}

    # A small spec file beside the configs wins over what the name says; the worker serves what it resolves to.
    (local / SPEC_FILE).write_text(json.dumps({"sizes": ["32x32"], "seconds": {"1": 5}, "default_seconds": "1"}))
    spec = resolve_model(str(local))
    assert spec.sizes == ["32x32"] and spec.steps == 16 and spec.id == "acme-k5-lite-distilled-5s"
    pipeline = VideoPipeline.load(Settings(), spec)
    frames = pipeline.generate(GenerationRequest("a red fox", 32, 32, 5, 1, spec.guidance, seed=0))
    assert frames.shape == (5, 32, 32, 3)


def test_a_hub_repo_outside_the_catalogue_is_read_from_its_configs(tiny_models, tmp_path, offline):
    repo = "kandinskylab/Kandinsky-5.0-I2V-Pro-distilled-5s-Diffusers"
    hub_cache(tmp_path / "hub", repo, published_layout(tiny_models["i2v"], tmp_path / "files", shift=5.0))
    spec = resolve_model(repo, cache_dir=str(tmp_path / "hub"))
    assert spec.id == "kandinsky-5.0-i2v-pro-distilled-5s" and spec.source == repo
    assert (spec.task, spec.steps, spec.guidance, spec.shift) == ("image-to-video", 16, 1.0, 5.0)
    with pytest.raises(UnknownModelError, match="out of reach"):
        resolve_model("someone/not-cached", cache_dir=str(tmp_path / "hub"))


def test_checkpoints_outside_the_catalogue_are_validated_like_it(tiny_models, tmp_path):
    # A NABLA transformer needs sides that are multiples of 128.
    nabla = published_layout(tiny_models["t2v"], tmp_path / "k5-nabla-10s", attention_type="nabla")
    spec = resolve_model(str(nabla))
    assert spec.attention == "nabla" and spec.seconds == {"10": 241}
    (nabla / SPEC_FILE).write_text(json.dumps({"sizes": ["96x64"]}))
    with pytest.raises(UnknownModelError, match="multiples of 128"):
        resolve_model(str(nabla))
    # Image-to-video below 17 frames is broken in the pipeline; frame counts must be 4k+1.
    i2v = published_layout(tiny_models["i2v"], tmp_path / "k5-i2v")
    (i2v / SPEC_FILE).write_text(json.dumps({"seconds": {"0.5": 13}, "default_seconds": "0.5"}))
    with pytest.raises(UnknownModelError, match="at least 17"):
        resolve_model(str(i2v))
    # Not a Kandinsky 5 video checkpoint at all.
    other = published_layout(tiny_models["t2v"], tmp_path / "not-k5")
    edit(other / "model_index.json", _class_name="StableDiffusionPipeline")
    with pytest.raises(UnknownModelError, match="StableDiffusionPipeline"):
        resolve_model(str(other))
    edit(other / "model_index.json", _class_name="Kandinsky5T2VPipeline")
    edit(other / "transformer" / "config.json", _class_name="UNet2DConditionModel")
    with pytest.raises(UnknownModelError, match="Kandinsky5Transformer3DModel"):
        resolve_model(str(other))
