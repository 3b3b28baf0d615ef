"""How a rank's share of a step is cut out (worker/parallel.py runs the ranks): the sequence split through diffusers'
context-parallel hooks, and the guidance split. worker/parallel.py's docstring says what each does and why.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from worker.speed import ConfigError, latent_tokens

if TYPE_CHECKING:
    from worker.parallel import Rank


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
