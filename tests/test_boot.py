"""A worker's first boot on a real checkpoint: loading a published-repo-shaped directory, component dtypes,
checkpoint checks, configurations refused at start-up, attention kernels per layer and their fallback, the VAE
tiling rule and the allocator setting. Real tiny diffusers pipelines on CPU; a CUDA device object where a rule
depends on the device (no CUDA call is made for those)."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from service.contract.models import TINY, ModelSpec, resolve_model
from service.contract.settings import Settings
from worker import attention, loader, speed
from worker.pipeline import GenerationRequest, VideoPipeline
from worker.tiny import build_tiny_pipeline, save_published_layout

CUDA = torch.device("cuda")
CPU = torch.device("cpu")


def small(**overrides) -> GenerationRequest:
    fields = dict(prompt="a red fox", width=96, height=64, num_frames=25, num_inference_steps=2, guidance_scale=5.0)
    return GenerationRequest(**{**fields, "seed": 3, **overrides})


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    out = save_published_layout("t2v", tmp_path_factory.mktemp("published") / "t2v")
    (out / "k5serve.json").write_text(json.dumps(TINY["k5-tiny-t2v"].model_dump()))
    return out


def test_published_repo_layout_loads_without_torchvision_clip_in_fp32(published):
    index = json.loads((published / "model_index.json").read_text())
    assert index["tokenizer"] == ["transformers", "Qwen2VLProcessor"]
    if importlib.util.find_spec("torchvision") is None:
        # The defect on a plain `pip install 'k5serve[worker]'`: diffusers builds the processor, which needs
        # torchvision for its image and video halves.
        from diffusers import Kandinsky5T2VPipeline

        with pytest.raises(ImportError, match="[Tt]orchvision"):
            Kandinsky5T2VPipeline.from_pretrained(published)

    pipeline = VideoPipeline.load(Settings(dtype="bfloat16"), resolve_model(str(published)))
    pipe = pipeline.pipe
    assert pipe.transformer.dtype == torch.bfloat16 and pipe.text_encoder.dtype == torch.bfloat16
    assert pipe.text_encoder_2.dtype == torch.float32  # CLIP in fp32, as upstream loads it
    # The fp32-kept modulation layers stay fp32 in a bf16 transformer.
    assert pipe.transformer.visual_transformer_blocks[0].visual_modulation.out_layer.weight.dtype == torch.float32
    frames = pipeline.generate(small())
    assert frames.shape == (25, 64, 96, 3) and frames.std() > 0


def test_weights_are_sized_from_file_headers_as_loaded(published):
    sizes = loader.weights_bytes(published, torch.bfloat16)
    pipe = VideoPipeline.load(Settings(dtype="bfloat16"), resolve_model(str(published))).pipe
    for name in sizes:
        module = getattr(pipe, name)
        as_loaded = sum(t.numel() * t.element_size() for t in module.state_dict().values())
        assert sizes[name] == as_loaded, name


def nabla_spec(**overrides) -> ModelSpec:
    fields = dict(
        id="k5-tiny-nabla",
        task="text-to-video",
        source="k5-tiny-nabla",
        sizes=["128x128"],
        seconds={"1": 9},
        default_seconds="1",
        steps=2,
        guidance=5.0,
        shift=10.0,
        attention="nabla",
    )
    return ModelSpec(**{**fields, **overrides})


def nabla_pipe():
    pipe = build_tiny_pipeline("t2v")
    pipe.transformer.register_to_config(
        attention_type="nabla", attention_P=0.9, attention_wT=11, attention_wH=3, attention_wW=3,
        attention_add_sta=True, attention_method="topcdf",
    )  # fmt: skip
    return pipe


def test_catalogue_nabla_entry_refuses_a_dense_checkpoint():
    with pytest.raises(speed.ConfigError, match="attention_type='regular'"):
        VideoPipeline(build_tiny_pipeline("t2v"), nabla_spec(), CPU, Settings())
    pipe = nabla_pipe()
    pipe.transformer.register_to_config(attention_P=None)
    with pytest.raises(speed.ConfigError, match="attention_P"):
        loader.check_checkpoint(pipe, nabla_spec())


def test_checkpoint_config_is_logged_and_a_shift_mismatch_warned(caplog):
    caplog.set_level(logging.INFO, logger="worker.loader")
    found = loader.check_checkpoint(nabla_pipe(), nabla_spec(shift=5.0))
    assert found["attention_type"] == "nabla" and found["attention_P"] == 0.9
    assert found["attention_windows"] == [11, 3, 3] and found["shift"] == 10.0
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert [r.getMessage() for r in warnings] == [
        "scheduler shift differs from the catalogue; the checkpoint's own is used"
    ]


def test_nabla_without_compiled_flex_is_refused_on_cuda():
    transformer = nabla_pipe().transformer
    with pytest.raises(speed.ConfigError, match="K5_COMPILE_TRANSFORMER=off .*set K5_COMPILE_TRANSFORMER=auto"):
        speed.require_compiled_flex(transformer, "off", CUDA, "flex")
    with pytest.raises(speed.ConfigError, match="K5_ATTENTION_BACKEND=native"):
        speed.require_compiled_flex(transformer, "full", CUDA, "native")
    speed.require_compiled_flex(transformer, "full", CUDA, "flex")
    speed.require_compiled_flex(transformer, "regional", CUDA, "flex")
    speed.require_compiled_flex(transformer, "off", CPU, "flex")  # tiny sizes on a CPU: eager flex is fine
    speed.require_compiled_flex(build_tiny_pipeline("t2v").transformer, "off", CUDA, "native")  # dense


def test_worker_refuses_a_bad_checkpoint_at_start_with_one_line(tmp_path):
    """The start-up refusal reaches the operator as one line and a non-zero exit, not a traceback."""
    out = build_tiny_pipeline("t2v")
    out.save_pretrained(tmp_path / "ckpt")
    spec = nabla_spec(source=str(tmp_path / "ckpt"))
    (tmp_path / "ckpt" / "k5serve.json").write_text(json.dumps(spec.model_dump()))
    env = {
        **os.environ,
        "K5_MODEL": str(tmp_path / "ckpt"),
        "K5_METRICS_PORT": "0",
        "K5_REDIS_URL": "redis://127.0.0.1:1/0",
        "PYTHONPATH": os.getcwd(),
    }
    run = subprocess.run(
        [sys.executable, "-m", "service.cli", "worker"], env=env, capture_output=True, text=True, timeout=120
    )
    assert run.returncode != 0
    last = run.stderr.strip().splitlines()[-1]
    assert "is a NABLA model but the loaded transformer config says attention_type='regular'" in last
    assert "Traceback" not in run.stderr


def test_nabla_gets_flex_only_on_visual_self_attention():
    pipeline = VideoPipeline(nabla_pipe(), nabla_spec(), CPU, Settings())
    layers = attention.per_layer(pipeline.pipe.transformer)
    assert layers == {"visual self-attention": "flex", "cross-attention": "native", "text self-attention": "native"}
    frames = pipeline.generate(small(width=128, height=128, num_frames=9))
    assert frames.shape == (9, 128, 128, 3)


def test_a_kernel_failing_on_one_shape_is_rejected():
    def text_shapes_fail(name, q, k, v):
        if name == "_native_flash" and k.shape[1] != q.shape[1]:
            raise RuntimeError("no kernel for this sequence length")
        return attention._dispatch(name, q, k, v)

    timings, rejected = attention.validate(
        ["native", "_native_flash", "_native_math"], 2, 16, 64, CPU, torch.float32, True, run=text_shapes_fail
    )
    assert set(timings) == {"native", "_native_math"}
    assert rejected["_native_flash"].startswith("cross-attention")


def test_pinned_kernel_that_fails_falls_back_instead_of_crashing():
    # No CPU kernel for memory-efficient SDPA: before validation every job crashed (and the worker restarted).
    settings = Settings(attention_backend="_native_efficient")
    pipeline = VideoPipeline(build_tiny_pipeline("t2v"), TINY["k5-tiny-t2v"], CPU, settings)
    assert pipeline.attention.dense == "native" and "_native_efficient" in pipeline.attention.rejected
    assert pipeline.generate(small()).shape == (25, 64, 96, 3)


def test_warm_up_falls_back_to_native_when_the_kernel_fails_in_the_model():
    tiny = TINY["k5-tiny-t2v"].model_copy(update={"sizes": ["64x64"], "seconds": {"1": 25}})
    pipeline = VideoPipeline(build_tiny_pipeline("t2v"), tiny, CPU, Settings())
    pipeline.attention = attention.AttentionChoice("_native_efficient", "_native_efficient")
    attention.apply(pipeline.pipe.transformer, pipeline.attention)
    pipeline.warm()
    assert pipeline.attention.dense == "native" and pipeline.warmed == [(64, 64, 25)]
    assert set(attention.per_layer(pipeline.pipe.transformer).values()) == {"native"}


def test_vae_tiling_rule_follows_the_chunked_decode():
    # diffusers decodes 5 latent frames at a time: the estimate grows only by the decoded output with length.
    five, ten = (speed.vae_decode_bytes(768, 512, n, 2) for n in (121, 241))
    assert ten / five < 1.1 and ten < 25e9  # the old whole-clip rule said 291 GB for 10 s and tiled every job
    assert speed.vae_decode_bytes(1024, 1024, 121, 2) > 2 * five  # it does grow with pixels
    assert speed.vae_tiling("auto", CPU, 768, 512, 241) is False


def test_vae_estimate_matches_the_real_vae_architecture_on_cpu():
    """The real HunyuanVideo VAE (full width, random weights) decoding at 64x64: peak RSS in a fresh process."""
    rows = []
    for frames in (17, 33):
        out = subprocess.run(
            [sys.executable, "bench/vae_memory.py", "--one", f"64x64x{frames}", "--dtype", "float32"],
            capture_output=True, text=True, timeout=300, check=True, env={**os.environ, "PYTHONPATH": os.getcwd()},
        )  # fmt: skip
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    short, long = (r["peak_gib"] * 2**30 for r in rows)
    assert abs(long - short) / short < 0.1  # the chunked decode's peak does not grow with length
    estimate = speed.vae_decode_bytes(64, 64, 33, 4)
    assert 0.75 < estimate / long < 1.33


def test_worker_command_asks_for_expandable_segments(monkeypatch):
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    env = {**os.environ, "K5_MODEL": "", "PYTHONPATH": os.getcwd()}
    code = "import os, sys; from service import cli; sys.argv=['k5serve','worker']\n" \
        "try:\n    cli.main()\nexcept SystemExit:\n    print(os.environ.get('PYTORCH_CUDA_ALLOC_CONF'))"  # fmt: skip
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert run.stdout.strip().splitlines()[-1] == "expandable_segments:True"
    speed.configure_allocator(env := {"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:512"})
    assert env["PYTORCH_CUDA_ALLOC_CONF"] == "max_split_size_mb:512"  # an operator's own choice stays


def test_frames_match_between_kernel_choices_on_cpu():
    native = VideoPipeline(build_tiny_pipeline("t2v"), TINY["k5-tiny-t2v"], CPU, Settings())
    settings = Settings(attention_backend="_native_math")
    math_ = VideoPipeline(build_tiny_pipeline("t2v"), TINY["k5-tiny-t2v"], CPU, settings)
    assert math_.attention.dense == "_native_math"
    diff = np.abs(native.generate(small()).astype(int) - math_.generate(small()).astype(int))
    assert diff.max() <= 1
