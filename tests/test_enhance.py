"""Prompt expansion on the real tiny checkpoints: the load-time checks, image-to-video upstream's way, the static cache.

The one stand-in is `ImageProcessor` below: Qwen2.5-VL's real processor needs torchvision, which this machine cannot
have next to its CPU torch. It is built from the real tokenizer and the real (PIL) Qwen2-VL image processor and
expands the image placeholder as the processor does, so the real tiny Qwen2.5-VL (vision tower included) runs.
"""

from __future__ import annotations

import logging
import shutil

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from service.contract.models import resolve_model
from service.contract.settings import Settings
from worker import enhance
from worker.pipeline import GenerationRequest, VideoPipeline


def request(**overrides) -> GenerationRequest:
    fields = dict(prompt="a red fox", width=64, height=64, num_frames=17, num_inference_steps=1, guidance_scale=1.0)
    return GenerationRequest(**{**fields, "seed": 1, **overrides})


def test_a_text_encoder_without_its_lm_head_disables_expansion(tiny_models, tmp_path, caplog):
    whole = VideoPipeline.load(
        Settings(enhance_prompt="on", enhance_max_new_tokens=4), resolve_model(str(tiny_models["t2v"]))
    )
    assert enhance.lm_head_stored(whole.pipe.text_encoder) is True and whole.enhance_unavailable is None

    # A checkpoint laid out like a published one whose text_encoder was saved without lm_head.weight.
    headless = tmp_path / "headless"
    shutil.copytree(tiny_models["t2v"], headless)
    (weights,) = (headless / "text_encoder").glob("*.safetensors")
    tensors = load_file(weights)
    assert tensors.pop("lm_head.weight") is not None
    save_file(tensors, weights, metadata={"format": "pt"})

    with caplog.at_level(logging.WARNING, logger="worker.pipeline"):
        pipeline = VideoPipeline.load(
            Settings(enhance_prompt="on", enhance_max_new_tokens=4), resolve_model(str(headless))
        )
    assert enhance.lm_head_stored(pipeline.pipe.text_encoder) is False
    assert "language-model head" in pipeline.enhance_unavailable
    assert pipeline.enhance_default is False
    assert any(r.getMessage() == "prompt expansion disabled" for r in caplog.records)
    pipeline.generate(request(width=32, height=32, num_frames=5, enhance_prompt=True))
    assert pipeline.last_stats.enhanced_prompt is None


def test_image_to_video_expansion_is_off_without_the_processor(tiny_models, caplog):
    with caplog.at_level(logging.WARNING, logger="worker.pipeline"):
        i2v = VideoPipeline.load(
            Settings(enhance_prompt="on", enhance_max_new_tokens=4), resolve_model(str(tiny_models["i2v"]))
        )
    assert not enhance.sees_images(i2v.pipe.tokenizer)  # a plain Qwen2Tokenizer, as without torchvision
    assert "processor" in i2v.enhance_unavailable and i2v.enhance_default is False
    assert any(r.getMessage() == "prompt expansion disabled" for r in caplog.records)
    # Asked for explicitly, it still does not rewrite the prompt blind to the image.
    i2v.generate(request(image=Image.new("RGB", (64, 64), (200, 80, 40)), enhance_prompt=True))
    assert i2v.last_stats.enhanced_prompt is None


class ImageProcessor:
    """Qwen2.5-VL's processor, minus its video half: chat template, image features, placeholder expansion."""

    def __init__(self, tokenizer) -> None:
        from transformers import Qwen2VLImageProcessorPil

        self.tokenizer = tokenizer
        self.image_processor = Qwen2VLImageProcessorPil()
        self.messages: list = []

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True) -> str:
        self.messages.append(messages)
        (turn,) = messages
        parts = [
            "<|vision_start|><|image_pad|><|vision_end|>" if c["type"] == "image" else c["text"]
            for c in turn["content"]
        ]
        return f"<|im_start|>user\n{''.join(parts)}<|im_end|>\n<|im_start|>assistant\n"

    def __call__(self, text, images=None, **kwargs):
        features = self.image_processor(images=images, return_tensors="pt")
        tokens = int(features["image_grid_thw"][0].prod()) // self.image_processor.merge_size**2
        text = [t.replace("<|image_pad|>", "<|image_pad|>" * tokens) for t in text]
        out = self.tokenizer(text=text, return_tensors="pt", padding=True)
        out.update(features)
        return out

    def batch_decode(self, *args, **kwargs):
        return self.tokenizer.batch_decode(*args, **kwargs)


def test_image_to_video_expansion_shows_qwen_the_image(tiny_models):
    i2v = VideoPipeline.load(Settings(enhance_max_new_tokens=12), resolve_model(str(tiny_models["i2v"])))
    processor = ImageProcessor(i2v.pipe.tokenizer)
    i2v.pipe.tokenizer = processor
    qwen = i2v.pipe.text_encoder
    seen: list[torch.Tensor] = []
    handle = qwen.model.visual.register_forward_pre_hook(lambda m, args, kwargs: seen.append(args[0]), with_kwargs=True)
    try:
        red = i2v._expand("a red fox", Image.new("RGB", (64, 64), (220, 30, 30)))
        pixels = torch.randint(0, 256, (64 * 64 * 3,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
        noise = Image.frombytes("RGB", (64, 64), bytes(pixels.tolist()))
        other = i2v._expand("a red fox", noise)
    finally:
        handle.remove()
    assert len(seen) == 2  # the vision tower encoded each image
    (turn,) = processor.messages[0]
    assert turn["content"][0]["type"] == "image"
    assert turn["content"][1]["text"] == enhance.UPSTREAM_I2V_INSTRUCTION.replace("{prompt}", "a red fox")
    assert "image to video generation from this image" in turn["content"][1]["text"]
    # What the model answers depends on the image: its next-token scores differ (a random-weight model's greedy
    # text may not). The processor inputs are upstream's: image then instruction.
    red_image = Image.new("RGB", (64, 64), (220, 30, 30))
    with torch.inference_mode():
        scores = [qwen(**enhance.image_inputs(processor, "a red fox", im)).logits[0, -1] for im in (red_image, noise)]
    assert not torch.allclose(scores[0], scores[1])
    assert isinstance(red, str) and red and isinstance(other, str)
    assert i2v._expand("a red fox", Image.new("RGB", (64, 64), (220, 30, 30))) == red  # cached per image


@pytest.mark.parametrize("task", ["t2v"])
def test_static_cache_expands_exactly_as_eager_generate(tiny_models, task):
    pipeline = VideoPipeline.load(Settings(), resolve_model(str(tiny_models[task])))
    args = (pipeline.pipe.text_encoder, pipeline.pipe.tokenizer, "a cat on a windowsill", torch.device("cpu"), 16)
    assert enhance.expand_prompt(*args, cache="static") == enhance.expand_prompt(*args, cache="dynamic")
