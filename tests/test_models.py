"""The catalogue and how a worker resolves K5_MODEL."""

from __future__ import annotations

import json

import pytest

from service.contract.models import CATALOGUE, SPEC_FILE, TINY, UnknownModelError, resolve_model


def test_catalogue_has_the_ten_published_video_checkpoints():
    assert len(CATALOGUE) == 10
    lite = [m for m in CATALOGUE if "-lite-" in m]
    assert len(lite) == 8
    for spec in CATALOGUE.values():
        assert spec.source.startswith("kandinskylab/Kandinsky-5.0-") and spec.source.endswith("-Diffusers")
        for frames in spec.seconds.values():
            assert (frames - 1) % 4 == 0
    assert CATALOGUE["kandinsky-5.0-t2v-lite-distilled16steps-5s"].steps == 16
    assert CATALOGUE["kandinsky-5.0-t2v-lite-nocfg-10s"].guidance == 1.0
    assert CATALOGUE["kandinsky-5.0-t2v-lite-sft-10s"].attention == "nabla"
    assert CATALOGUE["kandinsky-5.0-t2v-lite-sft-10s"].seconds == {"10": 241}
    assert CATALOGUE["kandinsky-5.0-i2v-pro-sft-5s"].task == "image-to-video"


def test_every_size_is_a_multiple_of_16():
    for spec in [*CATALOGUE.values(), *TINY.values()]:
        for size in spec.sizes:
            w, h = map(int, size.split("x"))
            assert w % 16 == 0 and h % 16 == 0


def test_resolve_by_id_repo_and_directory(tmp_path, monkeypatch):
    import huggingface_hub.constants

    # An unknown repo id is looked up on the hub (tests/test_checkpoints.py); here the hub is out of reach at once.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert (
        resolve_model("kandinsky-5.0-t2v-lite-sft-5s").source == "kandinskylab/Kandinsky-5.0-T2V-Lite-sft-5s-Diffusers"
    )
    assert resolve_model("kandinskylab/Kandinsky-5.0-T2V-Pro-sft-5s-Diffusers").id == "kandinsky-5.0-t2v-pro-sft-5s"
    # A downloaded published checkpoint is recognised by its directory name.
    local = tmp_path / "Kandinsky-5.0-T2V-Lite-nocfg-5s-Diffusers"
    local.mkdir()
    spec = resolve_model(str(local))
    assert spec.id == "kandinsky-5.0-t2v-lite-nocfg-5s" and spec.source == str(local)
    # A directory carrying its own spec.
    own = tmp_path / "mine"
    own.mkdir()
    (own / SPEC_FILE).write_text(json.dumps(TINY["k5-tiny-t2v"].model_dump()))
    assert resolve_model(str(own)).source == str(own)
    with pytest.raises(UnknownModelError):
        resolve_model("someone/unknown-model")
    (tmp_path / "anon").mkdir()
    with pytest.raises(UnknownModelError):
        resolve_model(str(tmp_path / "anon"))


def test_catalogue_ships_upstreams_magcache_ratios():
    # Upstream publishes ratios for its 50-step SD configs; none for distilled or pretrain (configs/*.yaml).
    with_ratios = {m for m, spec in CATALOGUE.items() if spec.mag_ratios}
    assert with_ratios == {
        "kandinsky-5.0-t2v-lite-sft-5s",
        "kandinsky-5.0-t2v-lite-sft-10s",
        "kandinsky-5.0-t2v-lite-nocfg-5s",
        "kandinsky-5.0-t2v-lite-nocfg-10s",
        "kandinsky-5.0-t2v-pro-sft-5s",
        "kandinsky-5.0-i2v-pro-sft-5s",
    }
    for model in with_ratios:
        spec = CATALOGUE[model]
        assert len(spec.mag_ratios) == 98 and spec.mag_threshold == 0.12 and spec.steps == 50
    # nocfg checkpoints have no uncond branch: its ratios are published as 0.
    assert set(CATALOGUE["kandinsky-5.0-t2v-lite-nocfg-5s"].mag_ratios[1::2]) == {0.0}
    assert CATALOGUE["kandinsky-5.0-t2v-lite-sft-5s"].mag_ratios[:2] == [0.91607, 0.91507]
