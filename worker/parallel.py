"""One video on several GPUs: what each rank of a parallel worker changes in its pipeline (K5_PARALLEL).

Every rank holds the transformer and runs the same denoising loop with the same seed, so the latents agree on every
rank after every step without being sent. What is split:

- CFG-parallel (`cfg=2`): `GuidanceSplit` stands in for `pipe.transformer`. The pipeline calls it twice a step
  (conditional, then unconditional); cfg rank 0 computes the first, cfg rank 1 the second, and one all-gather hands
  each rank both. Each forward is the single-GPU forward on the same inputs, so the frames are byte-identical where
  the kernels are deterministic; NABLA works (each rank runs a whole forward).
- Sequence parallelism (`sp=N`): diffusers' context-parallel hooks (`ContextParallelConfig`, `apply_context_parallel`)
  with a plan for `Kandinsky5Transformer3DModel`, which diffusers 0.42.1 does not ship (worker/splits.py). The visual
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
from worker.speed import ConfigError
from worker.splits import GuidanceSplit, enable_sequence_parallel
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

    def generate(self, req: GenerationRequest, on_step=None, resume=None, on_state=None) -> np.ndarray:
        # A resumed job goes on from the checkpoint's step on every rank (the same latents, scheduler, generator
        # and step-cache state); only rank 0 saves checkpoints (on_state), as it alone holds the job's lease.
        self.rank.send("job", (req, resume))
        self._followers = "control"
        # At each job's start, not at step 0: a resumed job's first step is the checkpoint's.
        _reset_guidance(self.video)
        try:
            return self.video.generate(req, self._step(on_step), resume=resume, on_state=on_state)
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
        kind, _ = rank.receive()
        if kind != "go":
            raise GroupStop(kind)

    while True:
        kind, payload = rank.receive()
        if kind == "exit":
            return
        if kind != "job":
            continue
        req, resume = payload
        # Expansion happens on rank 0 only; what this rank needs of it arrives with the embeddings.
        req = dataclasses.replace(req, enhance_prompt=False)
        _reset_guidance(video)
        try:
            with video._busy:
                video._generate(req, step, decode=False, resume=resume)
        except GroupStop:
            video.release_memory()
