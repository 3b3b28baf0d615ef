"""Parity with upstream (github.com/kandinskylab/kandinsky-5): what the transformer is actually fed.

Each test runs a real generation on the tiny checkpoints with hooks that record the transformer's inputs, and
compares them with upstream's definitions written out here on their own (not imported from worker/):
- kandinsky/generation_utils.py generate(): sigmas shift*s/(1+(shift-1)*s), s = linspace(1, 0, N+1); the model gets
  t*1000 in fp32 (kandinsky/models/nn.py TimeEmbeddings runs under autocast fp32);
- kandinsky/models/text_embedders.py: the "video" template ("promt engineer") and its crop at token 129;
- kandinsky/magcache_utils.py: ratios [1.0]*2 + the published cond/uncond list, read at 2*step (+1 for uncond).
The other value of each setting must reproduce diffusers' stock behaviour.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, Kandinsky5T2VPipeline

from service.contract.models import resolve_model
from service.contract.settings import Settings
from worker.pipeline import GenerationRequest, VideoPipeline

DIFFUSERS = dict(sampling_grid="diffusers", timestep_precision="model", prompt_template="diffusers")
PROMPT = "a red fox running through the snow"


def upstream_sigmas(steps: int, shift: float) -> np.ndarray:
    s = np.linspace(1.0, 0.0, steps + 1)
    return shift * s / (1 + (shift - 1) * s)


def upstream_timesteps_fp32(steps: int, shift: float) -> torch.Tensor:
    # Upstream's own tensors: fp32 linspace, shifted, times 1000, all in fp32.
    t = torch.linspace(1, 0, steps + 1)
    t = shift * t / (1 + (shift - 1) * t)
    return t[:-1] * 1000


class Recorder:
    """Forward pre-hooks that copy what the transformer and its time embedding receive, call by call."""

    def __init__(self, transformer) -> None:
        self.timesteps: list[torch.Tensor] = []
        self.time_inputs: list[torch.Tensor] = []
        self.text: list[torch.Tensor] = []
        self.handles = [
            transformer.register_forward_pre_hook(self._transformer, with_kwargs=True),
            transformer.time_embeddings.register_forward_pre_hook(self._time),
        ]

    # Outside any compiled graph: a recording hook traced by dynamo would itself cause recompiles.
    @torch.compiler.disable
    def _transformer(self, module, args, kwargs) -> None:
        self.timesteps.append(kwargs["timestep"].detach().clone())
        self.text.append(kwargs["encoder_hidden_states"].detach().clone())

    @torch.compiler.disable
    def _time(self, module, args) -> None:
        self.time_inputs.append(args[0].detach().clone())

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


@pytest.fixture(scope="module")
def t2v_spec(tiny_models):
    return resolve_model(str(tiny_models["t2v"]))


def load(spec, shift: float | None = None, **settings) -> VideoPipeline:
    """The tiny T2V checkpoint in bf16 (the published dtype: where the timestep's precision shows), optionally with
    its scheduler set to another shift, under the worker's VideoPipeline."""
    pipe = Kandinsky5T2VPipeline.from_pretrained(spec.source, dtype=torch.bfloat16)
    pipe.set_progress_bar_config(disable=True)
    if shift is not None:
        pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, shift=shift)
    return VideoPipeline(pipe, spec, torch.device("cpu"), Settings(**settings))


def generate(pipeline: VideoPipeline, steps: int, guidance: float = 1.0) -> Recorder:
    recorder = Recorder(pipeline.pipe.transformer)
    try:
        request = GenerationRequest(PROMPT, 32, 32, 5, steps, guidance, seed=3, enhance_prompt=False)
        with pipeline._busy:
            pipeline._generate(request, None, decode=False)
    finally:
        recorder.remove()
    return recorder


@pytest.mark.parametrize("shift", [5.0, 10.0])
def test_sigmas_and_timesteps_are_upstreams(t2v_spec, shift):
    pipeline = load(t2v_spec, shift=shift)
    stock = load(t2v_spec, shift=shift, **DIFFUSERS)
    for steps in (16, 50):
        rec = generate(pipeline, steps)
        expected = upstream_sigmas(steps, shift)
        # The grid the latents are stepped on (the scheduler's sigmas, terminal 0 included) ...
        np.testing.assert_allclose(pipeline.pipe.scheduler.sigmas.numpy(), expected, rtol=0, atol=1e-6)
        # ... and the timestep the time embedding receives: fp32, upstream's exact fp32 values, one per step.
        assert len(rec.time_inputs) == steps
        fed = torch.cat(rec.time_inputs)
        assert fed.dtype == torch.float32
        assert torch.equal(fed, upstream_timesteps_fp32(steps, shift))
        np.testing.assert_allclose(fed.numpy(), expected[:-1] * 1000, rtol=0, atol=1e-3)
        assert len(set(fed.tolist())) == steps  # no two steps share a conditioning

        # One setting away: diffusers' own grid, and its bf16 timestep.
        rec = generate(stock, steps)
        reference = FlowMatchEulerDiscreteScheduler.from_config(stock.pipe.scheduler.config)
        reference.set_timesteps(steps)
        assert torch.equal(stock.pipe.scheduler.sigmas, reference.sigmas)
        fed = torch.cat(rec.time_inputs)
        assert fed.dtype == torch.bfloat16 and torch.equal(fed, reference.timesteps.to(torch.bfloat16))
        if steps == 16 and shift == 5.0:
            # The distilled model's last evaluated sigma: 0.25 upstream, 0.024 with diffusers' grid.
            assert expected[-2] == pytest.approx(0.25)
            assert float(reference.sigmas[-2]) == pytest.approx(0.024, abs=5e-4)
        if steps == 50 and shift == 10.0:
            assert len(set(fed.tolist())) == 45  # bf16 gives 10 steps near t=1000 only 5 conditionings


def test_guidance_feeds_both_branches_the_same_fp32_timestep(t2v_spec):
    pipeline = load(t2v_spec)
    rec = generate(pipeline, 4, guidance=5.0)
    fed = torch.cat(rec.time_inputs)
    expected = upstream_timesteps_fp32(4, pipeline.pipe.scheduler.shift)
    assert fed.dtype == torch.float32 and torch.equal(fed, expected.repeat_interleave(2))


def test_prompt_template_keeps_exactly_the_prompts_tokens(t2v_spec):
    """The transformer gets Qwen's hidden states of the prompt's own tokens (and the closing <|im_end|>), computed
    after upstream's training system text: no system token leaks in, no prompt token is dropped."""
    pipeline = load(t2v_spec)
    tokenizer, qwen = pipeline.pipe.tokenizer, pipeline.pipe.text_encoder
    stock_template = Kandinsky5T2VPipeline(*[None] * 7).prompt_template
    assert "You are a prompt engineer" in stock_template
    for template, crop, settings in [
        (stock_template.replace("You are a prompt engineer", "You are a promt engineer"), 129, {}),
        (stock_template, 128, DIFFUSERS),
    ]:
        pipeline = load(t2v_spec, **settings)
        fed = generate(pipeline, 1).text[0]
        ids = tokenizer(text=[template.format(PROMPT)], return_tensors="pt")["input_ids"]
        own = tokenizer(text=[PROMPT + "<|im_end|>"])["input_ids"][0]
        assert ids[0, crop:].tolist() == own  # the kept range is exactly the prompt's tokens
        with torch.inference_mode():
            hidden = qwen(input_ids=ids, output_hidden_states=True).hidden_states[-1][:, crop:]
        assert fed.shape[1] == len(own)
        torch.testing.assert_close(fed, hidden.to(fed.dtype))


def test_fp32_timestep_compiles_once(t2v_spec):
    """The fp32 timestep is a tensor input of the compiled graph: a new step's value, or a new job, compiles
    nothing new."""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    pipeline = load(t2v_spec)
    counter = CompileCounter()
    pipeline.pipe.transformer.compile(backend=counter, dynamic=True)
    try:
        rec = generate(pipeline, 2)
        assert rec.time_inputs[0].dtype == torch.float32
        first = counter.frame_count
        assert first > 0
        generate(pipeline, 6)
        assert counter.frame_count == first
    finally:
        torch._dynamo.reset()


def upstream_magcache(published: list[float], steps: int, cfg: bool) -> tuple[list[float], list[bool]]:
    """kandinsky/magcache_utils.py, written out: the ratio each transformer call reads and whether it computes the
    visual blocks, for one generation (cfg: cond then uncond each step; nocfg: cnt advances by 2)."""
    ratios = np.array([1.0] * 2 + published)
    if len(ratios) != steps * 2:

        def interp(src):
            scale = (len(src) - 1) / (steps - 1)
            return src[np.round(np.arange(steps) * scale).astype(int)]

        ratios = np.stack([interp(ratios[0::2]), interp(ratios[1::2])], axis=1).reshape(-1)
    thresh, k, retention, num = 0.12, 2, 0.2, steps * 2
    acc_err, acc_steps, acc_ratio = [0.0, 0.0], [0, 0], [1.0, 1.0]
    read, computed = [], []
    cnt = 0
    while cnt < num:
        b = cnt % 2
        skip = False
        read.append(float(ratios[cnt]))  # this call's step and branch (upstream reads it past the retention only)
        if cnt >= int(num * retention):
            acc_ratio[b] *= ratios[cnt]
            acc_steps[b] += 1
            acc_err[b] += abs(1 - acc_ratio[b])
            if acc_err[b] < thresh and acc_steps[b] <= k:
                skip = True
            else:
                acc_err[b], acc_steps[b], acc_ratio[b] = 0.0, 0, 1.0
        computed.append(not skip)
        cnt += 1 if cfg else 2
    return read, computed


class RatioProbe:
    """Records what diffusers' MagCache head hook reads from its config, and whether each call ran the blocks."""

    def __init__(self, transformer) -> None:
        from diffusers.hooks.mag_cache import _MAG_CACHE_LEADER_BLOCK_HOOK

        head = transformer.visual_transformer_blocks[0]
        config = head._diffusers_hook.get_hook(_MAG_CACHE_LEADER_BLOCK_HOOK).config
        probe = self
        self.read: list[float] = []
        self.calls = 0
        self.attention_calls: list[int] = []
        inner = config.mag_ratios

        class Recording:
            def __len__(self):
                return len(inner)

            def __getitem__(self, i):
                value = float(inner[i])
                probe.read.append(value)
                return value

        config.mag_ratios = Recording()
        self.handles = [
            transformer.register_forward_pre_hook(lambda *_: self.attention_calls.append(0)),
            head.self_attention.register_forward_pre_hook(lambda *_: self._ran()),
        ]

    def _ran(self) -> None:
        self.attention_calls[-1] += 1

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


@pytest.mark.parametrize(
    "model, steps, guidance",
    [
        ("kandinsky-5.0-t2v-lite-sft-5s", 50, 5.0),
        ("kandinsky-5.0-t2v-pro-sft-5s", 25, 5.0),
        ("kandinsky-5.0-t2v-lite-nocfg-5s", 50, 1.0),
    ],
)
def test_magcache_reads_upstreams_ratio_at_every_step(t2v_spec, model, steps, guidance):
    """The catalogue's published ratios, read per step and branch as upstream reads them (leading 1.0 for step 0, no
    shift by one), and the same steps skipped."""
    from service.contract.models import CATALOGUE

    published = CATALOGUE[model].mag_ratios
    assert len(published) == 98 and CATALOGUE[model].mag_threshold == 0.12
    spec = t2v_spec.model_copy(update={"mag_ratios": published})
    pipeline = load(spec, step_cache="magcache")
    pipeline.step_cache.prepare(steps, guidance > 1.0)  # the hooks exist once prepared for a step count
    probe = RatioProbe(pipeline.pipe.transformer)
    try:
        generate(pipeline, steps, guidance)
    finally:
        probe.remove()
    read, computed = upstream_magcache(published, steps, cfg=guidance > 1.0)
    assert probe.read == pytest.approx(read, abs=1e-12)
    assert [n > 0 for n in probe.attention_calls] == computed
    assert not all(computed)  # the threshold does skip steps with these ratios
