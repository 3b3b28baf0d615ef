"""Tiny random-weight Kandinsky 5 pipelines, built offline with the real diffusers classes.

They keep the real interfaces (16 latent channels, x8 spatial / x4 temporal VAE compression,
`visual_cond` transformer with 33 input channels, a 128-token Qwen system prefix, 77-token CLIP)
but every layer is a few channels wide, so a whole video generates in seconds on a CPU.
Nothing is downloaded: the tokenizers are trained in code and all weights come from a seeded RNG,
so the same seed always gives byte-identical weights.
"""

from __future__ import annotations

import json
import pathlib
import re
from typing import Literal, TypeAlias

import torch
from diffusers import (
    AutoencoderKLHunyuanVideo,
    FlowMatchEulerDiscreteScheduler,
    Kandinsky5I2VPipeline,
    Kandinsky5T2VPipeline,
    Kandinsky5Transformer3DModel,
)
from diffusers.models.transformers.transformer_kandinsky import Kandinsky5Modulation
from tokenizers import Tokenizer, models, trainers
from tokenizers.pre_tokenizers import ByteLevel
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTokenizer,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2Tokenizer,
)

from service.contract.models import SPEC_FILE, TINY
from worker.sampling import UPSTREAM_VIDEO_CROP, UPSTREAM_VIDEO_TEMPLATE

__all__ = ["Task", "build_tiny_pipeline", "save_published_layout", "save_tiny_checkpoint", "save_tiny_models"]

Task: TypeAlias = Literal["t2v", "i2v"]
Kandinsky5VideoPipeline: TypeAlias = Kandinsky5T2VPipeline | Kandinsky5I2VPipeline
_PIPELINES: dict[Task, type[Kandinsky5VideoPipeline]] = {
    "t2v": Kandinsky5T2VPipeline,
    "i2v": Kandinsky5I2VPipeline,
}

QWEN_DIM = 32  # Qwen hidden size == transformer in_text_dim
CLIP_DIM = 16  # CLIP hidden size == transformer in_text_dim2 (pooled embedding)
LATENT_CHANNELS = 16  # as in the real HunyuanVideo VAE

QWEN_SPECIALS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
CLIP_SPECIALS = ["<|startoftext|>", "<|endoftext|>"]
CLIP_VOCAB_SIZE = 640  # 2 specials + 2 x 256 byte tokens + merges

# Besides the pipelines' own prompt template, a few typical prompts (and the default negative
# prompt) so that common words become single tokens, like they are with the real tokenizers.
_EXTRA_CORPUS = [
    "Static, 2D cartoon, cartoon, 2d animation, paintings, images, worst quality, low quality, ugly, "
    "deformed, walking backwards",
    "a red fox running through the snow",
    "a cat sitting on a windowsill, sunlight, cinematic",
    "A drone shot of a city at night with neon lights and rain.",
    "an astronaut riding a horse on the moon, slow camera pan",
]


def _prompt_template(pipeline_cls: type[Kandinsky5VideoPipeline]) -> tuple[str, int]:
    """The Qwen prompt template and crop index, read from the pipeline class itself.

    They are set in `__init__`, which accepts all seven components as None.
    """
    empty = pipeline_cls(*[None] * 7)
    return empty.prompt_template, empty.prompt_template_encode_start_idx


def _train_bpe(
    wrapper: Qwen2Tokenizer | CLIPTokenizer, corpus: list[str], vocab_size: int, specials: list[str]
) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Train a byte-level BPE with the wrapper class's own normalizer and pre-tokenizer."""
    alphabet = sorted(ByteLevel.alphabet())
    # CLIP marks word ends ("</w>"), Qwen does not; the trainer must produce the same kind of vocab.
    suffix = wrapper.backend_tokenizer.model.end_of_word_suffix
    if suffix:
        # Left alone, the trainer gives "x</w>" ids in hash-map order while it counts words, so
        # ids and merge tie-breaks change from process to process. Registering all 256 of them up
        # front (the real CLIP vocab also starts with bytes and bytes + "</w>") fixes their order.
        specials = specials + [c + suffix for c in alphabet]
    options = {"end_of_word_suffix": suffix} if suffix else {}
    tok = Tokenizer(models.BPE(**options))
    tok.normalizer = wrapper.backend_tokenizer.normalizer
    tok.pre_tokenizer = wrapper.backend_tokenizer.pre_tokenizer
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=alphabet,
        show_progress=False,
        **options,
    )
    tok.train_from_iterator(corpus, trainer)
    model = json.loads(tok.to_str())["model"]
    return model["vocab"], [tuple(pair) for pair in model["merges"]]


def _split_at(texts: list[str], specials: list[str]) -> list[str]:
    # Special tokens are matched before BPE runs, so train on the text between them.
    pattern = "|".join(map(re.escape, specials))
    return [part for text in texts for part in re.split(pattern, text) if part]


def _qwen_tokenizer(templates: list[tuple[str, int]], unseen: list[tuple[str, int]] | None = None) -> Qwen2Tokenizer:
    """A Qwen2Tokenizer whose system prefix is exactly `prompt_template_encode_start_idx` tokens.

    The pipeline keeps Qwen hidden states from that index on, so the prefix length decides whether
    the prompt is cut or system tokens leak into the embeddings. More merges never lengthen the
    prefix, so bisect on the vocabulary size for the smallest one that makes the prefix short enough.
    `unseen` templates must get their prefix lengths too but stay out of the training corpus, as a variant
    spelling is rare in a real tokenizer's (upstream's "promt" costs one token more than "prompt").
    """
    unseen = unseen or []
    texts = [template.format(prompt) for template, _ in templates for prompt in _EXTRA_CORPUS]
    corpus = _split_at(texts + _EXTRA_CORPUS, QWEN_SPECIALS)

    def build(vocab_size: int) -> Qwen2Tokenizer:
        vocab, merges = _train_bpe(Qwen2Tokenizer(), corpus, vocab_size, QWEN_SPECIALS)
        # Real Qwen2.5-VL marks its chat/vision markers as special: never split, one id each.
        return Qwen2Tokenizer(vocab=vocab, merges=merges, extra_special_tokens=QWEN_SPECIALS[1:])

    def prefix_lengths(tok: Qwen2Tokenizer) -> list[tuple[int, int]]:
        return [(len(tok(t.split("{}")[0])["input_ids"]), start) for t, start in templates + unseen]

    low, high = len(QWEN_SPECIALS) + 256, 2048  # byte alphabet + specials .. plenty of merges
    while low < high:
        mid = (low + high) // 2
        if all(n <= start for n, start in prefix_lengths(build(mid))):
            high = mid
        else:
            low = mid + 1
    tok = build(low)
    if any(n != start for n, start in prefix_lengths(tok)):
        raise RuntimeError(f"no vocabulary size gives the Qwen prefix lengths wanted: {prefix_lengths(tok)}")
    return tok


def _clip_tokenizer() -> CLIPTokenizer:
    vocab, merges = _train_bpe(CLIPTokenizer(), _EXTRA_CORPUS, CLIP_VOCAB_SIZE, CLIP_SPECIALS)
    return CLIPTokenizer(vocab=vocab, merges=merges)


def _qwen_encoder(tok: Qwen2Tokenizer) -> Qwen2_5_VLForConditionalGeneration:
    markers = ("vision_start", "vision_end", "image_pad", "video_pad")
    ids = {name: tok.convert_tokens_to_ids(f"<|{name}|>") for name in markers}
    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": len(tok),
            "hidden_size": QWEN_DIM,
            "intermediate_size": 2 * QWEN_DIM,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            # head_dim 16 -> 8 rotary frequencies, split over (time, height, width) as M-RoPE wants
            "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]},
            "bos_token_id": tok.convert_tokens_to_ids("<|endoftext|>"),
            "eos_token_id": tok.convert_tokens_to_ids("<|im_end|>"),
            "pad_token_id": tok.pad_token_id,
        },
        # The vision tower is never used for text-only encoding, but the class always builds one.
        vision_config={
            "depth": 1,
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_heads": 2,
            "out_hidden_size": QWEN_DIM,
            "fullatt_block_indexes": [0],
        },
        image_token_id=ids["image_pad"],
        video_token_id=ids["video_pad"],
        vision_start_token_id=ids["vision_start"],
        vision_end_token_id=ids["vision_end"],
    )
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def _clip_encoder(tok: CLIPTokenizer) -> CLIPTextModel:
    config = CLIPTextConfig(
        vocab_size=len(tok),
        hidden_size=CLIP_DIM,
        intermediate_size=2 * CLIP_DIM,
        projection_dim=CLIP_DIM,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,  # the pipeline always pads CLIP input to 77 tokens
        # The pooled output is read at the first eos token, so the ids must match the tokenizer.
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    return CLIPTextModel(config).eval()


def _transformer() -> Kandinsky5Transformer3DModel:
    transformer = Kandinsky5Transformer3DModel(
        in_visual_dim=LATENT_CHANNELS,
        out_visual_dim=LATENT_CHANNELS,
        visual_cond=True,  # like the published checkpoints: 2 * 16 + 1 = 33 input channels
        in_text_dim=QWEN_DIM,
        in_text_dim2=CLIP_DIM,
        time_dim=32,
        model_dim=32,
        ff_dim=64,
        patch_size=(1, 2, 2),
        num_text_blocks=1,
        num_visual_blocks=2,
        axes_dims=(4, 6, 6),  # head dim 16 -> 2 heads
    )
    # diffusers zero-initialises the modulations (an untrained model's identity). With zero gates
    # no block, hence no text, changes the output: give them ordinary random weights instead.
    for module in transformer.modules():
        if isinstance(module, Kandinsky5Modulation):
            module.out_layer.reset_parameters()
    return transformer.eval()


def _vae() -> AutoencoderKLHunyuanVideo:
    # Four blocks are what give the real x8 spatial / x4 temporal compression; only widths shrink.
    return AutoencoderKLHunyuanVideo(
        latent_channels=LATENT_CHANNELS,
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        norm_num_groups=4,
        spatial_compression_ratio=8,
        temporal_compression_ratio=4,
    ).eval()


def build_tiny_pipeline(task: Task, seed: int = 0) -> Kandinsky5VideoPipeline:
    """Build a tiny random-weight T2V or I2V pipeline in memory (CPU, float32)."""
    pipeline_cls = _PIPELINES[task]
    # Both pipelines' templates go into the corpus so that one trained vocabulary serves either task; upstream's
    # training template (worker/sampling.py, prompt_template="upstream") must get its own prefix length too.
    templates = [_prompt_template(cls) for cls in _PIPELINES.values()]
    qwen_tok = _qwen_tokenizer(templates, unseen=[(UPSTREAM_VIDEO_TEMPLATE, UPSTREAM_VIDEO_CROP)])
    clip_tok = _clip_tokenizer()
    # Weight init draws from torch's global RNG: seed it, but leave the caller's RNG state alone.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        components = {
            "transformer": _transformer(),
            "vae": _vae(),
            "text_encoder": _qwen_encoder(qwen_tok),
            "text_encoder_2": _clip_encoder(clip_tok),
        }
    scheduler = FlowMatchEulerDiscreteScheduler(shift=10.0)  # as the Lite sft checkpoints
    return pipeline_cls(tokenizer=qwen_tok, tokenizer_2=clip_tok, scheduler=scheduler, **components)


def save_tiny_checkpoint(task: Task, out_dir: pathlib.Path, seed: int = 0) -> pathlib.Path:
    """Build a tiny pipeline and save it in the diffusers layout (safetensors) under `out_dir`.

    It reloads offline with `Kandinsky5T2VPipeline` / `Kandinsky5I2VPipeline.from_pretrained(out_dir)`.
    """
    out_dir = pathlib.Path(out_dir)
    build_tiny_pipeline(task, seed=seed).save_pretrained(out_dir, safe_serialization=True)
    return out_dir


# What a Qwen2VLProcessor saves beside its text tokenizer, as in the published repos' `tokenizer` folder: the image
# and video processor configs (building those needs torchvision) and the chat template.
_PROCESSOR_FILES = {
    "preprocessor_config.json": {
        "image_processor_type": "Qwen2VLImageProcessor",
        "processor_class": "Qwen2VLProcessor",
        "do_resize": True,
        "do_rescale": True,
        "do_normalize": True,
        "do_convert_rgb": True,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "min_pixels": 3136,
        "max_pixels": 12845056,
        "patch_size": 14,
        "temporal_patch_size": 2,
        "merge_size": 2,
    },
    "video_preprocessor_config.json": {
        "video_processor_type": "Qwen2VLVideoProcessor",
        "processor_class": "Qwen2VLProcessor",
        "patch_size": 14,
        "temporal_patch_size": 2,
        "merge_size": 2,
    },
    "chat_template.json": {
        "chat_template": "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
        "{% for content in message['content'] %}{% if content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
        "{% endfor %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    },
}


def save_published_layout(task: Task, out_dir: pathlib.Path, seed: int = 0) -> pathlib.Path:
    """A tiny checkpoint laid out like a published `-Diffusers` repo: model_index.json names a Qwen2VLProcessor
    as `tokenizer`, whose folder carries the processor's configs next to the text tokenizer's files. Loading it
    with plain `from_pretrained` needs torchvision; the worker's loader must not."""
    out = save_tiny_checkpoint(task, out_dir, seed=seed)
    index_path = out / "model_index.json"
    index = json.loads(index_path.read_text())
    index["tokenizer"] = ["transformers", "Qwen2VLProcessor"]
    index_path.write_text(json.dumps(index, indent=2) + "\n")
    folder = out / "tokenizer"
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["processor_class"] = "Qwen2VLProcessor"
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    for name, content in _PROCESSOR_FILES.items():
        (folder / name).write_text(json.dumps(content, indent=2) + "\n")
    return out


def save_tiny_models(directory: pathlib.Path, seed: int = 0) -> dict[str, pathlib.Path]:
    """`k5serve tiny-model DIR`: both checkpoints (DIR/t2v, DIR/i2v), each with the k5serve.json spec that the
    worker reads the same way it reads the catalogue entry of a published model."""
    paths = {}
    for task in ("t2v", "i2v"):
        out = save_tiny_checkpoint(task, pathlib.Path(directory) / task, seed=seed)
        spec = TINY[f"k5-tiny-{task}"]
        (out / SPEC_FILE).write_text(json.dumps(spec.model_dump(), indent=2) + "\n")
        paths[task] = out
    return paths
