"""What the transformer is fed at each step, as the published checkpoints were trained and distilled with.

diffusers 0.42.1's Kandinsky 5 pipelines depart from upstream's code (github.com/kandinskylab/kandinsky-5) in
three ways that change every video. Each is a setting whose default is upstream's behaviour; the other value is
diffusers' own, for comparison (bench/pipeline.py runs both):

- sampling_grid: upstream (kandinsky/generation_utils.py, generate()) evaluates the model at
  sigma = shift*s / (1 + (shift-1)*s) for s = linspace(1, 0, N+1)[:-1] and steps to 0. diffusers' scheduler spaces
  N points between 1 and its already-shifted sigma_min and shifts them again: the 16-step distilled model (shift 5)
  ends at sigma 0.024 instead of 0.25, off the grid it was distilled on.
- timestep_precision: upstream feeds the time embedding t*1000 in fp32 (kandinsky/models/nn.py TimeEmbeddings runs
  under autocast fp32). The pipeline casts the timestep to the model dtype first; near 1000 bf16 steps by 4, so
  consecutive steps (997.9, 995.8) get the same conditioning.
- prompt_template: upstream's training template says "You are a promt engineer" (sic) and keeps the Qwen hidden
  states from token 129 on (kandinsky/models/text_embedders.py PROMPT_TEMPLATE, "video"; image-to-video encodes
  with the same "video" template, generation_utils.generate_sample_i2v). diffusers says "prompt engineer", 128.
"""

from __future__ import annotations

import logging
from typing import Literal

import torch
from diffusers import FlowMatchEulerDiscreteScheduler

log = logging.getLogger(__name__)

SamplingGrid = Literal["upstream", "diffusers"]
TimestepPrecision = Literal["float32", "model"]
PromptTemplate = Literal["upstream", "diffusers"]

# kandinsky/models/text_embedders.py, Qwen2_5_VLTextEmbedder.PROMPT_TEMPLATE["template"]["video"], joined by "\n"
# as its __call__ does; quoted as data (MIT License, Copyright (c) 2025 Kandinsky Lab). The typos are the trained text.
UPSTREAM_VIDEO_TEMPLATE = "\n".join(
    [
        "<|im_start|>system\nYou are a promt engineer. Describe the video in detail.",
        "Describe how the camera moves or shakes, describe the zoom and view angle, whether it follows the objects.",
        "Describe the location of the video, main characters or objects and their action.",
        "Describe the dynamism of the video and presented actions.",
        "Name the visual style of the video: whether it is a professional footage, user generated content, some kind"
        " of animation, video game or scren content.",
        "Describe the visual effects, postprocessing and transitions if they are presented in the video.",
        "Pay attention to the order of key actions shown in the scene.<|im_end|>",
        "<|im_start|>user\n{}<|im_end|>",
    ]
)
# PROMPT_TEMPLATE["crop_start"]["video"]: the system prefix's length in Qwen2.5-VL tokens.
UPSTREAM_VIDEO_CROP = 129

# Scheduler options upstream's sampler has no counterpart for; the upstream grid ignores them (and says so).
_FOREIGN_OPTIONS = (
    "use_dynamic_shifting",
    "shift_terminal",
    "use_karras_sigmas",
    "use_exponential_sigmas",
    "use_beta_sigmas",
    "invert_sigmas",
    "stochastic_sampling",
)


def upstream_sigmas(steps: int, shift: float, device: torch.device | str | None = None) -> torch.Tensor:
    """The N+1 sigmas of upstream's sampler (the last is 0), in fp32 and in upstream's order of operations."""
    s = torch.linspace(1, 0, steps + 1, device=device)
    return shift * s / (1 + (shift - 1) * s)


class UpstreamGridScheduler(FlowMatchEulerDiscreteScheduler):
    """FlowMatchEulerDiscreteScheduler evaluated on upstream's grid; step() is unchanged (an Euler step from each
    sigma to the next, as upstream's `img += timestep_diff * pred_velocity`)."""

    def set_timesteps(self, num_inference_steps=None, device=None, sigmas=None, mu=None, timesteps=None):
        if num_inference_steps is None or sigmas is not None or timesteps is not None:
            # An explicit schedule is the caller's choice.
            return super().set_timesteps(num_inference_steps, device, sigmas, mu, timesteps)
        grid = upstream_sigmas(num_inference_steps, self.shift, device)
        self.num_inference_steps = num_inference_steps
        # Upstream passes t * 1000 to the model: the same fp32 product the scheduler's timesteps are.
        self.timesteps = grid[:-1] * self.config.num_train_timesteps
        self.sigmas = grid
        self._step_index = None
        self._begin_index = None


class Fp32Timestep:
    """Hands the transformer the scheduler's own fp32 timestep in place of the pipeline's model-dtype copy.

    A forward pre-hook outside any compiled graph (torch.compiler.disable): the compiled transformer always sees an
    fp32 tensor of the same shape, so a new step's value costs no recompile.
    """

    def __init__(self, transformer, scheduler_of) -> None:
        self._scheduler_of = scheduler_of  # the pipeline's current scheduler (it can be replaced)
        self._warned = False
        self.handle = transformer.register_forward_pre_hook(self._restore, with_kwargs=True)

    def remove(self) -> None:
        self.handle.remove()

    @torch.compiler.disable
    def _restore(self, module, args, kwargs):
        fed = kwargs.get("timestep")
        if not isinstance(fed, torch.Tensor) or fed.dtype == torch.float32:
            return None
        scheduler = self._scheduler_of()
        index = scheduler.step_index if scheduler.step_index is not None else (scheduler.begin_index or 0)
        exact = scheduler.timesteps[index].to(device=fed.device, dtype=torch.float32)
        # Only the value the pipeline rounded may be replaced: anything else means the step index is not the
        # pipeline's (a caller driving the transformer itself) and its own timestep stands.
        if not bool((exact.to(fed.dtype) == fed).all()):
            if not self._warned:
                log.warning("timestep is not the scheduler's current one; left at the model dtype")
                self._warned = True
            return None
        kwargs["timestep"] = exact.expand(fed.shape).contiguous()
        return args, kwargs


def prefix_tokens(tokenizer, template: str) -> int:
    """Tokens of the template before the prompt: the index the prompt's hidden states start at."""
    return len(tokenizer(text=[template.split("{}")[0]])["input_ids"][0])


def apply_prompt_template(pipe, setting: PromptTemplate) -> None:
    if setting == "diffusers":
        return
    pipe.prompt_template = UPSTREAM_VIDEO_TEMPLATE
    pipe.prompt_template_encode_start_idx = UPSTREAM_VIDEO_CROP
    measured = prefix_tokens(pipe.tokenizer, UPSTREAM_VIDEO_TEMPLATE)
    if measured != UPSTREAM_VIDEO_CROP:
        # The checkpoint's tokenizer is not the one upstream counted with: system tokens leak into, or prompt tokens
        # are cut from, what the transformer sees.
        log.warning(
            "prompt template prefix length differs from upstream's crop",
            extra={"prefix_tokens": measured, "crop": UPSTREAM_VIDEO_CROP},
        )


class Sampling:
    """Applies the three settings to a loaded pipeline; call before compiling the transformer."""

    def __init__(self, pipe, grid: SamplingGrid, timestep: TimestepPrecision, template: PromptTemplate) -> None:
        self.pipe = pipe
        self.grid, self.timestep, self.template = grid, timestep, template
        self._original = (pipe.scheduler, pipe.prompt_template, pipe.prompt_template_encode_start_idx)
        if grid == "upstream":
            config = dict(pipe.scheduler.config)
            if foreign := [k for k in _FOREIGN_OPTIONS if config.get(k)]:
                log.warning("scheduler options ignored by the upstream sampling grid", extra={"options": foreign})
            pipe.scheduler = UpstreamGridScheduler.from_config(config)
        apply_prompt_template(pipe, template)
        # fp32 weights take the pipeline's timestep losslessly: the hook is only needed for bf16/fp16.
        lossy = pipe.transformer.dtype != torch.float32
        self.hook = Fp32Timestep(pipe.transformer, lambda: pipe.scheduler) if timestep == "float32" and lossy else None

    def describe(self) -> dict[str, str]:
        return {"sampling_grid": self.grid, "timestep_precision": self.timestep, "prompt_template": self.template}

    def remove(self) -> None:
        """Give the pipeline back as loaded (a benchmark runs several settings on one set of weights)."""
        if self.hook is not None:
            self.hook.remove()
            self.hook = None
        self.pipe.scheduler, self.pipe.prompt_template, self.pipe.prompt_template_encode_start_idx = self._original
