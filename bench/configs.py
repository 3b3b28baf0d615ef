"""Random-weight Kandinsky 5 pipelines at the published sizes, built from configs (the GPU hosts have no hub access).

Transformer configs are the published ones (upstream configs/k5_lite_t2v_*_sd.yaml, k5_pro_t2v_5s_sft_sd.yaml; the
"-Diffusers" repos carry the same numbers): Lite 1792/7168, 32+2 blocks, 28 heads x 64; Pro 4096/16384, 60+4 blocks,
32 x 128; NABLA only in Lite 10 s (P 0.9, wT 11, wH 3, wW 3) and Pro HD (P 0.8). The text encoders are full-size
Qwen2.5-VL-7B and CLIP ViT-L/14 text towers; the tokenizers are the tiny trained ones (token counts differ a little
from the real tokenizers'), the VAE is diffusers' AutoencoderKLHunyuanVideo default (the HunyuanVideo VAE, 246 M).
Timings do not depend on weight values; NABLA's kept fraction does, so it is reported as "with random weights".
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from diffusers import (
    AutoencoderKLHunyuanVideo,
    FlowMatchEulerDiscreteScheduler,
    Kandinsky5T2VPipeline,
    Kandinsky5Transformer3DModel,
)
from diffusers.models.transformers.transformer_kandinsky import Kandinsky5Modulation
from transformers import CLIPTextConfig, CLIPTextModel, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from worker.tiny import build_tiny_pipeline

TRANSFORMERS = {
    "lite": dict(model_dim=1792, ff_dim=7168, num_text_blocks=2, num_visual_blocks=32, axes_dims=(16, 24, 24)),
    "pro": dict(model_dim=4096, ff_dim=16384, num_text_blocks=4, num_visual_blocks=60, axes_dims=(32, 48, 48)),
}
TIME_DIM = {"lite": 512, "pro": 1024}
NABLA = {"lite": 0.9, "pro": 0.8}  # attention_P of the published NABLA configs
# attention_P of the "sta" mask: top-CDF then adds only the single strongest block of each row to the window.
STA_P = 1e-3
# variant -> (steps, guidance, scheduler shift), as published.
VARIANTS = {"sft": (50, 5.0, 10.0), "nocfg": (50, 1.0, 10.0), "distilled": (16, 1.0, 5.0)}


@dataclass(frozen=True)
class Case:
    model: str  # "lite", "pro" or "tiny"
    width: int
    height: int
    frames: int
    nabla: bool
    variant: str
    # NABLA's mask: "random" = what the random weights' top-CDF selects at the published P (keeps ~90% of blocks,
    # nothing like a trained model); "sta" = P set near 0, so the mask is the sliding window (STA) plus about one
    # block per row: the density upstream reports for trained weights, fixed, so speed can be judged.
    mask: str = "random"

    @property
    def name(self) -> str:
        attention = ("nabla" + (" sta-mask" if self.mask == "sta" else "")) if self.nabla else "dense"
        return f"{self.model}-{self.variant} {self.width}x{self.height}x{self.frames} {attention}"

    @property
    def nabla_p(self) -> float:
        return STA_P if self.mask == "sta" else NABLA.get(self.model, 0.9)


def transformer_config(model: str, nabla: bool, smoke: bool = False, p: float | None = None) -> dict:
    config = dict(
        TRANSFORMERS[model],
        time_dim=TIME_DIM[model],
        in_visual_dim=16,
        out_visual_dim=16,
        patch_size=(1, 2, 2),
        visual_cond=True,
        in_text_dim=3584,
        in_text_dim2=768,
    )
    if smoke:  # full widths, 2 blocks: checks the wiring on a CPU in seconds
        config.update(num_text_blocks=1, num_visual_blocks=2)
    if nabla:
        config.update(nabla_config(NABLA[model] if p is None else p))
    return config


def nabla_config(p: float) -> dict:
    return dict(
        attention_type="nabla", attention_P=p, attention_wT=11, attention_wH=3, attention_wW=3,
        attention_add_sta=True, attention_method="topcdf",
    )  # fmt: skip


def qwen_config(tokenizer, smoke: bool = False) -> Qwen2_5_VLConfig:
    markers = ("vision_start", "vision_end", "image_pad", "video_pad")
    ids = {n: tokenizer.convert_tokens_to_ids(f"<|{n}|>") for n in markers}
    return Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=2 if smoke else 28,
            num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=128000,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
            eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"), pad_token_id=tokenizer.pad_token_id,
        ),
        vision_config=dict(
            depth=1 if smoke else 32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
            fullatt_block_indexes=[0] if smoke else [7, 15, 23, 31],
        ),
        image_token_id=ids["image_pad"], video_token_id=ids["video_pad"],
        vision_start_token_id=ids["vision_start"], vision_end_token_id=ids["vision_end"],
    )  # fmt: skip


def clip_config(tokenizer, smoke: bool = False) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=49408, hidden_size=768, intermediate_size=3072, projection_dim=768,
        num_hidden_layers=2 if smoke else 12, num_attention_heads=12, max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip


@contextlib.contextmanager
def _building(device: torch.device, dtype: torch.dtype) -> Iterator[None]:
    """Allocate (and random-initialise) straight on the device in the target dtype: a 19B model never exists in
    fp32 and never crosses the bus."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with device:
            yield
    finally:
        torch.set_default_dtype(previous)


def _keep_fp32(model: torch.nn.Module) -> None:
    # As from_pretrained(torch_dtype=bf16) does: the time embeddings and modulations stay fp32.
    keep = set(getattr(model, "_keep_in_fp32_modules", None) or [])
    for name, param in model.named_parameters():
        if keep & set(name.split(".")):
            param.data = param.data.float()


def build_transformer(
    model: str, nabla: bool, device: torch.device, dtype: torch.dtype, smoke: bool = False, p: float | None = None
):
    with _building(device, dtype):
        transformer = Kandinsky5Transformer3DModel(**transformer_config(model, nabla, smoke, p))
        # diffusers zero-initialises the modulations: random gates, or no block (and no prompt) has any effect.
        for module in transformer.modules():
            if isinstance(module, Kandinsky5Modulation):
                module.out_layer.reset_parameters()
    _keep_fp32(transformer)
    return transformer.eval()


def build_pipeline(case: Case, device: torch.device, dtype: torch.dtype, smoke: bool = False) -> Kandinsky5T2VPipeline:
    """A text-to-video pipeline for the case, random weights, every component on `device`."""
    shift = VARIANTS[case.variant][2]
    tiny = build_tiny_pipeline("t2v")
    if case.model == "tiny":
        if case.nabla:
            tiny.transformer.register_to_config(**nabla_config(case.nabla_p))
        tiny.scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
        return tiny.to(device=device, dtype=dtype)
    with _building(device, dtype):
        text_encoder = Qwen2_5_VLForConditionalGeneration(qwen_config(tiny.tokenizer, smoke)).eval()
        text_encoder_2 = CLIPTextModel(clip_config(tiny.tokenizer_2, smoke)).eval()
        vae = AutoencoderKLHunyuanVideo().eval()
    return Kandinsky5T2VPipeline(
        transformer=build_transformer(case.model, case.nabla, device, dtype, smoke, case.nabla_p),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tiny.tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tiny.tokenizer_2,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=shift),
    )
