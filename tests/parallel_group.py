"""Run one generation on a parallel rank group (worker/parallel.py) without the queue, for the frames tests: each
rank is a spawned process, rank 0 writes the frames to a file. A layout of one rank is the single-process path."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import numpy as np

from service.contract.record import GenerationRequest
from service.contract.settings import Settings


def _rank(rank: int, settings: Settings, init_method: str, req: GenerationRequest, out: str) -> None:
    import torch

    torch.set_num_threads(1)  # the same kernels and reductions in every process, the reference's too
    from service.contract.models import resolve_model
    from worker import parallel
    from worker.pipeline import VideoPipeline

    spec = resolve_model(settings.model or "")
    if settings.layout.world == 1:
        np.save(out, VideoPipeline.load(settings, spec).generate(req))
        return
    group = parallel.init(rank, settings.layout, init_method, torch.device("cpu"))
    video = VideoPipeline.load(settings, spec, group)
    if rank == 0:
        np.save(out, parallel.Leader(video, group).generate(req))
        group.send("exit")
    else:
        parallel.follow(video, group)


def generate(settings: Settings, req: GenerationRequest, out: Path, port: int, timeout: float = 120) -> np.ndarray:
    ctx = multiprocessing.get_context("spawn")
    procs = [
        ctx.Process(target=_rank, args=(r, settings, f"tcp://127.0.0.1:{port}", req, str(out)))
        for r in range(settings.layout.world)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout)
    codes = [p.exitcode for p in procs]
    for p in procs:
        if p.is_alive():
            p.kill()
    if codes != [0] * len(procs):
        raise RuntimeError(f"rank exit codes {codes}")
    return np.load(out)
