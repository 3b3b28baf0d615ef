"""Prompt expansion ("beautification") with the already-loaded Qwen2.5-VL text encoder, as upstream does.

Kandinsky 5 was trained on long, detailed captions; upstream's own pipeline (kandinskylab/kandinsky-5,
kandinsky/t2v_pipeline.py, `expand_prompts=True` by default) rewrites short user prompts with Qwen2.5-VL before
encoding them. diffusers does not. The instruction below is upstream's, quoted as data.
Source: https://github.com/kandinskylab/kandinsky-5 (MIT License, Copyright (c) 2025 Kandinsky Lab).
Upstream sends it as the user turn (no system turn), decodes at most 256 new tokens, and keeps only the answer.
Upstream's image-to-video expansion also shows the model the input image; this one is text-only.
"""

from __future__ import annotations

import torch

UPSTREAM_INSTRUCTION = """You are a prompt beautifier that transforms short user video descriptions into rich, detailed English prompts specifically optimized for video generation models.
        Here are some example descriptions from the dataset that the model was trained:
        1. "In a dimly lit room with a cluttered background, papers are pinned to the wall and various objects rest on a desk. Three men stand present: one wearing a red sweater, another in a black sweater, and the third in a gray shirt. The man in the gray shirt speaks and makes hand gestures, while the other two men look forward. The camera remains stationary, focusing on the three men throughout the sequence. A gritty and realistic visual style prevails, marked by a greenish tint that contributes to a moody atmosphere. Low lighting casts shadows, enhancing the tense mood of the scene."
        2. "In an office setting, a man sits at a desk wearing a gray sweater and seated in a black office chair. A wooden cabinet with framed pictures stands beside him, alongside a small plant and a lit desk lamp. Engaged in a conversation, he makes various hand gestures to emphasize his points. His hands move in different positions, indicating different ideas or points. The camera remains stationary, focusing on the man throughout. Warm lighting creates a cozy atmosphere. The man appears to be explaining something. The overall visual style is professional and polished, suitable for a business or educational context."
        3. "A person works on a wooden object resembling a sunburst pattern, holding it in their left hand while using their right hand to insert a thin wire into the gaps between the wooden pieces. The background features a natural outdoor setting with greenery and a tree trunk visible. The camera stays focused on the hands and the wooden object throughout, capturing the detailed process of assembling the wooden structure. The person carefully threads the wire through the gaps, ensuring the wooden pieces are securely fastened together. The scene unfolds with a naturalistic and instructional style, emphasizing the craftsmanship and the methodical steps taken to complete the task."
        IImportantly! These are just examples from a large training dataset of 200 million videos.
        Rewrite Prompt: "{prompt}" to get high-quality video generation. Answer only with expanded prompt."""  # noqa: E501

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


def expand_prompt(text_encoder, tokenizer, prompt: str, device: torch.device, max_new_tokens: int) -> str:
    """The rewritten prompt, or the original when the model answers with nothing usable.

    Greedy decoding: the same prompt always expands the same way, so a seed still pins the video and the
    expansion can be cached. Other generation options (e.g. a repetition penalty) come from the checkpoint's
    generation config, as upstream's call leaves them too.
    """
    inputs = tokenizer(text=[chat_text(tokenizer, prompt)], return_tensors="pt", padding=True).to(device)
    with torch.inference_mode():
        out = text_encoder.generate(
            input_ids=inputs["input_ids"],
            attention_mask=inputs["attention_mask"],
            max_new_tokens=max_new_tokens,
            do_sample=False,
        )
    answer = tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)[0]
    answer = " ".join(answer.split())
    return answer or prompt
