"""Prompt expansion ("beautification") with the already-loaded Qwen2.5-VL text encoder, as upstream does.

Kandinsky 5 was trained on long, detailed captions; upstream's own pipeline (kandinskylab/kandinsky-5,
kandinsky/t2v_pipeline.py, `expand_prompts=True` by default) rewrites short user prompts with Qwen2.5-VL before
encoding them. diffusers does not. The instruction below is upstream's, quoted as data.
Source: https://github.com/kandinskylab/kandinsky-5 (MIT License, Copyright (c) 2025 Kandinsky Lab).
Upstream sends it as the user turn (no system turn), decodes at most 256 new tokens, and keeps only the answer.

Image-to-video expansion is upstream's own (kandinsky/models/text_embedders.py, expand_text_prompt): another
instruction, and the input image in the same user turn, through Qwen2.5-VL's processor. Only the real processor
(`Qwen2VLProcessor` as the pipeline's tokenizer, which needs torchvision) can show the model an image; with a
plain tokenizer, image-to-video expansion stays off rather than rewrite the prompt blind to the image.

Two checks keep expansion from producing garbage or costing more than it must:
- at load, `lm_head_stored`: the checkpoint must carry Qwen's language-model head. A text encoder saved without
  it loads with a newly initialised head, which decodes noise (encoding alone never uses the head).
- on CUDA decoding uses a static KV cache (`enhance_cache`): transformers then compiles the decoding step
  instead of running eager `generate()` token by token; greedy output is the same either way.
"""

from __future__ import annotations

import hashlib
import json
import logging
import struct
from pathlib import Path
from typing import Literal

import torch
from PIL import Image

log = logging.getLogger(__name__)

EnhanceCache = Literal["static", "dynamic"]

UPSTREAM_INSTRUCTION = """You are a prompt beautifier that transforms short user video descriptions into rich, detailed English prompts specifically optimized for video generation models.
        Here are some example descriptions from the dataset that the model was trained:
        1. "In a dimly lit room with a cluttered background, papers are pinned to the wall and various objects rest on a desk. Three men stand present: one wearing a red sweater, another in a black sweater, and the third in a gray shirt. The man in the gray shirt speaks and makes hand gestures, while the other two men look forward. The camera remains stationary, focusing on the three men throughout the sequence. A gritty and realistic visual style prevails, marked by a greenish tint that contributes to a moody atmosphere. Low lighting casts shadows, enhancing the tense mood of the scene."
        2. "In an office setting, a man sits at a desk wearing a gray sweater and seated in a black office chair. A wooden cabinet with framed pictures stands beside him, alongside a small plant and a lit desk lamp. Engaged in a conversation, he makes various hand gestures to emphasize his points. His hands move in different positions, indicating different ideas or points. The camera remains stationary, focusing on the man throughout. Warm lighting creates a cozy atmosphere. The man appears to be explaining something. The overall visual style is professional and polished, suitable for a business or educational context."
        3. "A person works on a wooden object resembling a sunburst pattern, holding it in their left hand while using their right hand to insert a thin wire into the gaps between the wooden pieces. The background features a natural outdoor setting with greenery and a tree trunk visible. The camera stays focused on the hands and the wooden object throughout, capturing the detailed process of assembling the wooden structure. The person carefully threads the wire through the gaps, ensuring the wooden pieces are securely fastened together. The scene unfolds with a naturalistic and instructional style, emphasizing the craftsmanship and the methodical steps taken to complete the task."
        IImportantly! These are just examples from a large training dataset of 200 million videos.
        Rewrite Prompt: "{prompt}" to get high-quality video generation. Answer only with expanded prompt."""  # noqa: E501

UPSTREAM_I2V_INSTRUCTION = """You are a prompt beautifier that transforms short user video descriptions into rich, detailed English prompts specifically optimized for video generation models.
    Here are some example descriptions from the dataset that the model was trained:
    1. "Create a video showing a nighttime urban driving scene from inside a car. The driver is focused on the road ahead, with the city lights visible through the windshield. The GPS device on the dashboard continues to display navigation information. The camera remains steady, capturing the interior of the car and the changing street view outside as the vehicle moves forward. The background shifts slightly to show different parts of the cityscape, including illuminated buildings and street signs."
    2. "Create a video where the character, dressed in historical attire, is seen holding an umbrella with a logo. The character should move closer to the camera while maintaining a steady pace, keeping the umbrella raised. The background remains consistent with a foggy, outdoor setting, but the focus shifts more towards the character as they approach. The lighting should emphasize the details of the costume and the umbrella, enhancing the dramatic effect."
    3. "Darken the scene while keeping the characters and setting unchanged, emphasizing a serious atmosphere."
    IImportantly! These are just examples from a large training dataset of 20 mln videos.
    Rewrite Prompt: "{prompt}" to get high-quality image to video generation from this image. Pay main attention to information about changes of objects.
    Make prompt dynamic. Answer only with expanded prompt."""  # noqa: E501

# What Qwen2.5-VL's chat template renders for a lone user turn; used when the tokenizer carries no template
# (the tiny test tokenizer), so both paths feed the model the same text.
_CHATML = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n"
    "<|im_start|>assistant\n"
)


def chat_text(tokenizer, prompt: str) -> str:
    content = UPSTREAM_INSTRUCTION.replace("{prompt}", prompt)
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": [{"type": "text", "text": content}]}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return _CHATML.format(content)


def sees_images(tokenizer) -> bool:
    """Whether the pipeline's `tokenizer` is Qwen2.5-VL's processor, which can show the model an image."""
    return getattr(tokenizer, "image_processor", None) is not None


def image_inputs(tokenizer, prompt: str, image: Image.Image):
    """Upstream's image-to-video expansion input: the image, then its instruction, in one user turn."""
    content = [
        {"type": "image", "image": image},
        {"type": "text", "text": UPSTREAM_I2V_INSTRUCTION.replace("{prompt}", prompt)},
    ]
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
    )
    return tokenizer(text=[text], images=[image], padding=True, return_tensors="pt")


def expand_prompt(
    text_encoder,
    tokenizer,
    prompt: str,
    device: torch.device,
    max_new_tokens: int,
    image: Image.Image | None = None,
    cache: EnhanceCache = "static",
) -> str:
    """The rewritten prompt, or the original when the model answers with nothing usable.

    Greedy decoding: the same prompt (and image) always expands the same way, so a seed still pins the video and
    the expansion can be cached. Other generation options (e.g. a repetition penalty) come from the checkpoint's
    generation config, as upstream's call leaves them too.
    """
    if image is None:
        inputs = tokenizer(text=[chat_text(tokenizer, prompt)], return_tensors="pt", padding=True)
    else:
        inputs = image_inputs(tokenizer, prompt, image)
    inputs = inputs.to(device)
    with torch.inference_mode():
        out = text_encoder.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            cache_implementation="static" if cache == "static" else None,
        )
    answer = tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)[0]
    answer = " ".join(answer.split())
    return answer or prompt


def _stored_keys(directory: Path) -> set[str] | None:
    """Tensor names of a safetensors checkpoint directory, from its index or the files' headers (no weights read)."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        return set(json.loads(index.read_text())["weight_map"])
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        return None
    keys: set[str] = set()
    for file in files:
        with file.open("rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            keys |= set(json.loads(f.read(size))) - {"__metadata__"}
    return keys


def lm_head_stored(text_encoder) -> bool | None:
    """Whether the text encoder's checkpoint carries its language-model head; None when it cannot be told (the
    weights did not come from a local safetensors directory)."""
    if getattr(text_encoder.config, "tie_word_embeddings", False):
        return True  # the head is the input embeddings
    directory = Path(getattr(text_encoder.config, "_name_or_path", "") or "")
    keys = _stored_keys(directory) if directory.is_dir() else None
    if keys is None:
        return None
    return any(k == "lm_head.weight" or k.endswith(".lm_head.weight") for k in keys)


def cache_for(setting: str, device: torch.device) -> EnhanceCache:
    """The KV cache expansion decodes with. A static cache pays off once compiled, which transformers does on
    CUDA only; uncompiled on a CPU it measured slower (tiny model, 12 tokens: 1.47 s static, 0.95 s dynamic)."""
    if setting == "auto":
        return "static" if device.type == "cuda" else "dynamic"
    return "static" if setting == "static" else "dynamic"


def unavailable_reason(pipe, task: str) -> str | None:
    """Why prompt expansion cannot run on this checkpoint, or None when it can."""
    if lm_head_stored(pipe.text_encoder) is False:
        return "the text encoder checkpoint has no language-model head (a new random head would decode noise)"
    if task == "image-to-video" and not sees_images(pipe.tokenizer):
        return "image-to-video expansion needs Qwen2.5-VL's processor (torchvision) to show the model the image"
    return None


def image_key(image: Image.Image | None) -> str:
    """A cache key part for the image an image-to-video expansion saw."""
    if image is None:
        return ""
    return f"{image.size}:{hashlib.sha256(image.tobytes()).hexdigest()}"
