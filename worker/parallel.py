"""One video on several GPUs: what each rank of a parallel worker changes in its pipeline (K5_PARALLEL).

Every rank holds the transformer and runs the same denoising loop with the same seed, so the latents agree on every
rank after every step without being sent. What is split:

- CFG-parallel (`cfg=2`): `GuidanceSplit` stands in for `pipe.transformer`. The pipeline calls it twice a step
  (conditional, then unconditional); cfg rank 0 computes the first, cfg rank 1 the second, and one all-gather hands
  each rank both. Each forward is the single-GPU forward on the same inputs, so the frames are byte-identical where
  the kernels are deterministic; NABLA works (each rank runs a whole forward).
- Sequence parallelism (`sp=N`): diffusers' context-parallel hooks (`ContextParallelConfig`, `apply_context_parallel`)
  with a plan for `Kandinsky5Transformer3DModel`, which diffusers 0.42.1 does not ship (`SEQUENCE_PLAN`). The visual
  tokens (after the patch embedding and the RoPE table are flattened) are split before the first visual block and
  gathered after the last; the visual self-attention exchanges heads for tokens (Ulysses all-to-all) inside
  diffusers' attention dispatch. Cross-attention needs no exchange (local visual queries against the whole text)
  and the text blocks run whole on every rank, so only the visual self-attention gets the parallel config.
  NABLA is refused: its block mask is computed from the whole sequence's pooled queries and keys inside the
  attention processor, before dispatch, where a rank holds only its tokens.
- Text: rank 0 expands and encodes; the other ranks load no text encoders and receive the embeddings.
- VAE: rank 0 decodes; the others stop at the latents.

Rank 0 drives: it broadcasts each job and, at every step boundary, whether to go on (cancellation, shutdown), over a
CPU (gloo) group of its own, so a cancelled job stops on every rank at the same step. worker/ranks.py starts the
ranks and restarts the group when one dies.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from service.contract.parallel import Layout
from service.contract.record import GenerationRequest
from worker.runner import DeviceLost
from worker.speed import ConfigError, latent_tokens
from worker.textcache import PromptEmbeds, TextEncoders

log = logging.getLogger(__name__)

# Collectives between ranks inside a step: long enough for the slowest warm-up compile on one rank while the others
# wait; a dead rank is found by worker/ranks.py's watchdog long before.
DATA_TIMEOUT = timedelta(minutes=30)
# Followers wait for the next job on the control group: an idle pool must not time out.
CONTROL_TIMEOUT = timedelta(days=7)


class GroupStop(Exception):
    """Rank 0 stopped the job (cancelled, shutdown, or its own failure before a step): this rank stops too."""


class GroupBroken(DeviceLost):
    """A rank failed inside a step while the others may be inside a collective: the group must restart (the runner
    treats it as a lost device: the job is requeued and the process exits, worker/ranks.py restarts the group)."""


@dataclasses.dataclass
class Rank:
    """This process's place in the group, and the process groups it talks on."""

    rank: int
    layout: Layout
    device: torch.device
    control: Any  # gloo group: jobs, embeddings, step verdicts
    mesh: Any  # DeviceMesh (cfg, ring, ulysses)

    @property
    def leader(self) -> bool:
        return self.rank == 0

    @property
    def cfg_rank(self) -> int:
        return self.rank // self.layout.sp

    # -- control messages (rank 0 -> all) --------------------------------------------------------------------------

    def send(self, kind: str, payload: Any = None) -> None:
        dist.broadcast_object_list([(kind, payload)], src=0, group=self.control)

    def receive(self) -> tuple[str, Any]:
        box: list[Any] = [None]
        dist.broadcast_object_list(box, src=0, group=self.control)
        return box[0]

    # -- hooks called by VideoPipeline (worker/pipeline.py) ----------------------------------------------------------

    def skip_components(self) -> tuple[str, ...]:
        return () if self.leader else ("text_encoder", "text_encoder_2")

    def text_encoders(self, pipe, device, placement, cache_size: int, max_sequence_length: int):
        if self.leader:
            return SharedEncoders(TextEncoders(pipe, device, placement, cache_size, max_sequence_length), self)
        return ReceivedEncoders(self, device)

    def shard(self, video) -> None:
        """After the attention kernels are set, before the step cache and compile: split this rank's work."""
        pipe, spec, settings = video.pipe, video.spec, video.settings
        if settings.step_cache != "off":
            # A cache decides per rank from what that rank computed; ranks that decide differently leave each other
            # waiting in a collective.
            raise ConfigError(f"K5_PARALLEL={self.layout.describe()} runs with K5_STEP_CACHE=off only")
        if self.layout.sp > 1:
            enable_sequence_parallel(pipe.transformer, self, video.attention.visual, buckets_of(video))
        if self.layout.cfg > 1:
            if spec.guidance <= 1.0:
                log.warning("cfg=2 on a model without guidance: both cfg ranks compute the same forward")
            vars(pipe)["transformer"] = GuidanceSplit(pipe, pipe.transformer, self)


def buckets_of(video) -> list[tuple[int, int, int]]:
    from worker.pipeline import buckets

    return buckets(video.spec)


def init(rank: int, layout: Layout, init_method: str, device: torch.device) -> Rank:
    """Join the group (NCCL on CUDA, gloo on CPU) and build its mesh: rank = cfg_rank * sp + sp_rank."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=layout.world, timeout=DATA_TIMEOUT)
    control = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(
        device.type, (layout.cfg, layout.ring, layout.ulysses), mesh_dim_names=("cfg", "ring", "ulysses")
    )
    return Rank(rank, layout, device, control, mesh)


# -- sequence parallelism ------------------------------------------------------------------------------------------


def sequence_plan(num_visual_blocks: int) -> dict:
    """diffusers' context-parallel plan for Kandinsky5Transformer3DModel (dense attention). The transformer flattens
    the visual tokens and their RoPE table (fractal_flatten, a function, not a module) just before the first visual
    block, so the split is on the blocks' inputs: the tokens once (block 0 hands its shard on), the RoPE table,
    passed whole to every block, at each block. The last block's output is gathered before the un-flatten."""
    from diffusers.models._modeling_parallel import ContextParallelInput, ContextParallelOutput

    return {
        "visual_transformer_blocks.0": {"visual_embed": ContextParallelInput(split_dim=1, expected_dims=3)},
        # (batch, tokens, 1, head_dim / 2, 2, 2) after the flatten
        "visual_transformer_blocks.*": {"rope": ContextParallelInput(split_dim=1, expected_dims=6)},
        f"visual_transformer_blocks.{num_visual_blocks - 1}": ContextParallelOutput(gather_dim=1, expected_dims=3),
    }


def enable_sequence_parallel(transformer, rank: Rank, visual_backend: str, buckets: list[tuple[int, int, int]]):
    from diffusers.hooks.context_parallel import apply_context_parallel
    from diffusers.models._modeling_parallel import ContextParallelConfig, ParallelConfig
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

    layout = rank.layout
    if getattr(transformer.config, "attention_type", None) == "nabla":
        raise ConfigError(
            f"K5_PARALLEL={layout.describe()}: NABLA attention cannot be split over the sequence (its block mask is "
            "computed from all visual tokens inside the attention call); use cfg=2 for this model"
        )
    heads = transformer.config.model_dim // sum(transformer.config.axes_dims)
    if heads % layout.ulysses:
        raise ConfigError(
            f"K5_PARALLEL={layout.describe()}: Ulysses over {layout.ulysses} ranks needs the {heads} attention heads "
            f"to divide evenly; make part of sp a ring (ring=R, on CUDA) or use fewer ranks"
        )
    if layout.ring > 1 and visual_backend == "native":
        raise ConfigError(
            "ring attention needs a kernel that returns its log-sum-exp (_native_flash, _native_cudnn, flash); "
            "the native one does not: set K5_ATTENTION_BACKEND or drop ring="
        )
    if not _AttentionBackendRegistry._is_context_parallel_available(AttentionBackendName(visual_backend)):
        raise ConfigError(f"attention kernel {visual_backend} does not support sequence parallelism")
    for width, height, frames in buckets:
        tokens = latent_tokens(transformer, width, height, frames)
        if tokens % layout.sp:
            raise ConfigError(f"{width}x{height}x{frames}: {tokens} visual tokens do not split over sp={layout.sp}")
    mesh = rank.mesh["ring", "ulysses"]
    cp = ContextParallelConfig(ring_degree=layout.ring, ulysses_degree=layout.ulysses, mesh=mesh)
    config = ParallelConfig(context_parallel_config=cp)
    # What ModelMixin.enable_parallelism does, minus its device pick (rank % torch.accelerator.device_count(), which
    # divides by zero on a CPU host) and minus giving every attention processor the config: only the visual
    # self-attention's tokens are split (the module docstring says why).
    config.setup(rank.rank, dist.get_world_size(), rank.device, mesh=mesh)
    transformer._parallel_config = config
    for block in transformer.visual_transformer_blocks:
        block.self_attention.processor._parallel_config = config
    apply_context_parallel(transformer, cp, sequence_plan(len(transformer.visual_transformer_blocks)))


# -- CFG-parallel --------------------------------------------------------------------------------------------------


class GuidanceSplit:
    """Stands in for the pipeline's transformer: of a guided step's two calls, computes only this cfg rank's.

    The pipeline uses the conditional prediction only after the unconditional call returns, so cfg rank 1 hands
    back an empty tensor for the first call and fills it in place once the all-gather has brought rank 0's.
    """

    def __init__(self, pipe, transformer, rank: Rank) -> None:
        self._pipe, self._transformer, self._rank = pipe, transformer, rank
        self._group = rank.mesh["cfg"].get_group()
        self._pending: torch.Tensor | None = None

    def __getattr__(self, name: str):
        return getattr(self._transformer, name)

    def reset(self) -> None:
        self._pending = None

    def __call__(self, **kwargs):
        from diffusers.models.modeling_outputs import Transformer2DModelOutput

        if not self._pipe.guidance_scale > 1.0:
            return self._transformer(**kwargs)
        try:
            if self._pending is None:  # the conditional call
                if self._rank.cfg_rank == 0:
                    out = self._transformer(**kwargs).sample
                else:
                    x = kwargs["hidden_states"]
                    out = torch.empty(
                        (*x.shape[:-1], self._transformer.config.out_visual_dim), dtype=x.dtype, device=x.device
                    )
                self._pending = out
                return Transformer2DModelOutput(sample=out)
            pending, self._pending = self._pending, None
            mine = pending if self._rank.cfg_rank == 0 else self._transformer(**kwargs).sample
            both = [torch.empty_like(mine) for _ in range(2)]
            dist.all_gather(both, mine.contiguous(), group=self._group)
            if self._rank.cfg_rank == 1:
                pending.copy_(both[0])
            return Transformer2DModelOutput(sample=both[1])
        except BaseException:
            self._pending = None
            raise


# -- text: encoded on rank 0, received elsewhere ---------------------------------------------------------------------


def _to_host(embeds: PromptEmbeds) -> tuple[torch.Tensor, ...]:
    return embeds.qwen.cpu(), embeds.clip.cpu(), embeds.cu_seqlens.cpu()


class SharedEncoders:
    """Rank 0's TextEncoders: every result also goes to the other ranks, in call order."""

    def __init__(self, inner: TextEncoders, rank: Rank) -> None:
        self.inner, self.rank = inner, rank

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def pin(self, prompt: str) -> PromptEmbeds:
        return self._shared(lambda: (self.inner.pin(prompt), True))[0]

    def encode(self, prompt: str) -> tuple[PromptEmbeds, bool]:
        return self._shared(lambda: self.inner.encode(prompt))

    def _shared(self, encode) -> tuple[PromptEmbeds, bool]:
        embeds, hit = encode()  # a failure here: Leader.generate tells the others
        self.rank.send("embeds", (_to_host(embeds), hit))
        return embeds, hit


class ReceivedEncoders:
    """A follower's stand-in for TextEncoders: no encoders loaded, the embeddings come from rank 0."""

    def __init__(self, rank: Rank, device: torch.device) -> None:
        self.rank, self.device = rank, device
        self.placement = "device"

    @contextlib.contextmanager
    def session(self) -> Iterator[None]:
        yield

    def pin(self, prompt: str) -> PromptEmbeds:
        return self.encode(prompt)[0]

    def encode(self, prompt: str) -> tuple[PromptEmbeds, bool]:
        kind, payload = self.rank.receive()
        if kind != "embeds":
            raise GroupStop(kind)
        (qwen, clip, cu), hit = payload
        return PromptEmbeds(qwen.to(self.device), clip.to(self.device), cu.to(self.device)), hit


# -- the job loop: rank 0 leads, the others follow --------------------------------------------------------------------


class Leader:
    """Rank 0's pipeline as the RQ worker sees it: generate() also runs the job on every other rank."""

    def __init__(self, video, rank: Rank) -> None:
        self.video, self.rank = video, rank
        # What the followers wait on: "idle" (the next job), "control" (embeddings, a verdict), "data" (a step).
        self._followers = "idle"

    def __getattr__(self, name: str):
        return getattr(self.video, name)

    def generate(self, req: GenerationRequest, on_step=None) -> np.ndarray:
        self.rank.send("job", req)
        self._followers = "control"
        try:
            return self.video.generate(req, self._step(on_step))
        except BaseException as e:
            if self._followers == "control":
                self.rank.send("abort")
            elif self._followers == "data":
                # The others may be inside this step's collectives, waiting for a rank that has left it.
                raise GroupBroken(f"rank 0 failed inside a step ({type(e).__name__}: {e}); the group restarts") from e
            raise
        finally:
            self._followers = "idle"

    def _step(self, on_step):
        def step(done: int, total: int) -> None:
            if done == 0:
                _reset_guidance(self.video)
            try:
                if on_step is not None:
                    on_step(done, total)
            except BaseException:
                self.rank.send("stop")
                self._followers = "idle"
                raise
            self.rank.send("go")
            self._followers = "data" if done < total else "idle"

        return step

    def close(self) -> None:
        """After the worker loop: the others leave their loops too (instead of finding rank 0's sockets closed)."""
        self.rank.send("exit")


def _reset_guidance(video) -> None:
    transformer = vars(video.pipe).get("transformer")
    if isinstance(transformer, GuidanceSplit):
        transformer.reset()


def follow(video, rank: Rank) -> None:
    """A follower's loop: run each job rank 0 sends, stopping where it stops, until it says exit."""

    def step(done: int, total: int) -> None:
        if done == 0:
            _reset_guidance(video)
        kind, _ = rank.receive()
        if kind != "go":
            raise GroupStop(kind)

    while True:
        kind, req = rank.receive()
        if kind == "exit":
            return
        if kind != "job":
            continue
        # Expansion happens on rank 0 only; what this rank needs of it arrives with the embeddings.
        req = dataclasses.replace(req, enhance_prompt=False)
        try:
            with video._busy:
                video._generate(req, step, decode=False)
        except GroupStop:
            video.release_memory()
