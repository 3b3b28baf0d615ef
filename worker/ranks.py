"""`k5serve worker` with K5_PARALLEL: one process per GPU of the node, started together and watched together.

This process (the supervisor) holds no model. It starts world-size rank processes (spawned: a CUDA context cannot
cross a fork), rank r on cuda:r. Rank 0 is the RQ worker of worker/main.py (lease, heartbeat, metrics, SIGTERM);
the others follow it (worker/parallel.py). When any rank exits, the others are killed at once: a rank waiting in a
collective for a dead peer would otherwise wait out the collective's timeout. The job of a dead group is requeued
through its lease, as for any worker killed mid-job, and the group is started again. A group that dies before it
was ever ready (a bad configuration) is not restarted: the supervisor exits with the rank's status.

SIGTERM and SIGINT go to rank 0 only (the ranks run in a process group of their own, so a terminal's Ctrl-C does
not reach them twice), which finishes or requeues its job as a one-GPU worker does; the others stop with it.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import sys
import time

from service.contract.logs import setup_logging
from service.contract.settings import Settings

log = logging.getLogger(__name__)

BACKOFF_MIN_S, BACKOFF_MAX_S = 1.0, 30.0
_PR_SET_PDEATHSIG = 1


def _free_port() -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def device_for(settings: Settings, rank: int):
    import torch

    if settings.device == "auto":
        kind = "cuda" if torch.cuda.is_available() else "cpu"
    else:
        kind = torch.device(settings.device).type
    return torch.device(f"cuda:{rank}") if kind == "cuda" else torch.device("cpu")


def check_devices(settings: Settings) -> None:
    import torch

    world = settings.layout.world
    if device_for(settings, 0).type == "cuda" and torch.cuda.device_count() < world:
        raise SystemExit(
            f"K5_PARALLEL={settings.parallel} needs {world} GPUs; this node shows {torch.cuda.device_count()} "
            "(set gpu.count in the pool, or a smaller layout)"
        )


def rank_main(rank: int, settings: Settings, init_method: str, ready) -> None:
    """The entry point of one rank process."""
    if sys.platform.startswith("linux"):
        # The supervisor's death ends the group at once (even by SIGKILL): no rank outlives it.
        ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    os.setpgid(0, 0)
    setup_logging(settings.log_level, settings.log_format)
    from worker import parallel

    device = device_for(settings, rank)
    settings = settings.model_copy(update={"device": str(device)})
    group = parallel.init(rank, settings.layout, init_method, device)
    if rank == 0:
        from worker.main import run

        run(settings, group, on_ready=ready.set)
        return
    # Followers never take a signal from outside: rank 0 decides when the job stops, the supervisor when they do.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    follower(settings, group)


def follower(settings: Settings, group) -> None:
    from service.contract.models import resolve_model
    from worker.parallel import follow
    from worker.pipeline import VideoPipeline

    spec = resolve_model(settings.model or "", cache_dir=settings.hf_cache_dir)
    video = VideoPipeline.load(settings, spec, group)
    video.warm()
    log.info("rank ready", extra={"rank": group.rank, "parallel": settings.parallel})
    follow(video, group)


class Supervisor:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.stopping = False
        self.procs: list[multiprocessing.process.BaseProcess] = []

    def _signal(self, signum, frame) -> None:
        self.stopping = True
        if self.procs and self.procs[0].pid is not None and self.procs[0].is_alive():
            os.kill(self.procs[0].pid, signal.SIGTERM)

    def start_group(self):
        ctx = multiprocessing.get_context("spawn")
        ready = ctx.Event()
        init_method = f"tcp://127.0.0.1:{_free_port()}"
        self.procs = [
            ctx.Process(target=rank_main, args=(r, self.settings, init_method, ready), name=f"k5-rank{r}")
            for r in range(self.settings.layout.world)
        ]
        for p in self.procs:
            p.start()
        return ready

    def stop_group(self) -> None:
        for p in self.procs:
            if p.is_alive() and p.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, signal.SIGKILL)
        for p in self.procs:
            p.join()

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._signal)
        signal.signal(signal.SIGINT, self._signal)
        backoff = BACKOFF_MIN_S
        while True:
            t0 = time.monotonic()
            ready = self.start_group()
            log.info("parallel worker started", extra={"parallel": self.settings.parallel, "ranks": len(self.procs)})
            first = None
            while first is None:
                done = multiprocessing.connection.wait([p.sentinel for p in self.procs], timeout=1.0)
                first = next((p for p in self.procs if p.sentinel in done), None)
            code = first.exitcode
            rank = self.procs.index(first)
            self.stop_group()
            if self.stopping and rank == 0:
                return code or 0
            if not ready.is_set():
                log.error("a rank exited before the group was ready", extra={"rank": rank, "exit_code": code})
                return code or 1
            if self.stopping:
                return 0
            if time.monotonic() - t0 > 60:
                backoff = BACKOFF_MIN_S
            log.warning(
                "a rank exited: the group restarts (its job is requeued through its lease)",
                extra={"rank": rank, "exit_code": code, "retry_in_s": backoff},
            )
            time.sleep(backoff)
            if self.stopping:
                return 0
            backoff = min(2 * backoff, BACKOFF_MAX_S)


def serve(settings: Settings) -> int:
    check_devices(settings)
    return Supervisor(settings).run()
