"""One job: status -> generate -> encode -> upload -> done.

`run_job` is what RQ calls (by name, so the gateway never imports this module). It runs inside the worker
process that holds the warm pipeline, set once by `configure`.

Every run holds a lease on its job (service/contract/lifecycle.py): its writes are checked against its run token first,
so a run whose worker was presumed dead and whose job was requeued learns that it lost the job, and cannot complete it.
A run stores its files under a prefix of its own and deletes only that. A run that cannot settle its job (Redis went
away, the process dies) leaves the record in_progress: its lease lapses and the janitor requeues.
"""

from __future__ import annotations

import errno
import io
import logging
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import redis
from PIL import Image

from service.contract import metrics
from service.contract.jobs import VARIANTS, JobStore, asset_key
from service.contract.lifecycle import Lifecycle, Outcome, Run
from service.contract.storage import Storage, StorageError, StorageFull
from worker import checkpoint, encode
from worker.meter import Meter
from worker.pipeline import GenerationError, VideoPipeline
from worker.podcost import PodCost
from worker.post import PostProcessor, ShutdownWhileWaiting
from worker.stats import GenerationStats

log = logging.getLogger(__name__)

# Progress (0-100) at the start of each phase; denoising steps fill the range between its start and the next.
PHASE = {"text_encode": 1, "denoise": 5, "decode": 90, "encode": 93, "upload": 97}


class Stopped(Exception):
    """The run may not go on: its job became final or was deleted (cancelled), or another run owns it (lost)."""

    def __init__(self, outcome: Outcome) -> None:
        super().__init__(outcome.value)
        self.outcome = outcome


class StopForShutdown(Exception):
    """The worker's shutdown grace period is over: stop at this step boundary and requeue the job."""


class HandedOff(Exception):
    """The run's frames went to the post-processing stage (worker/post.py), which settles the job from now on."""


class DeviceLost(Exception):
    """The accelerator is in an unrecoverable state: the process must exit so its supervisor restarts it."""


@dataclass
class WorkerContext:
    store: JobStore
    storage: Storage
    pipeline: VideoPipeline
    worker_name: str
    asset_ttl_s: int
    # Set when the shutdown grace period is over: the running job stops at its next step and is requeued.
    stop: threading.Event = field(default_factory=threading.Event)
    # The run in progress, for the heartbeat thread to keep its lease alive.
    current: Run | None = None
    # An unrecoverable device error seen by a job: the worker loop exits non-zero after it.
    fatal: BaseException | None = None
    # Encodes and uploads finished generations while the next job denoises; None: in line (K5_POSTPROCESS_JOBS=0).
    post: PostProcessor | None = None
    # Keeps the pod's deletion cost high while live_runs() is not empty (Kubernetes only; worker/podcost.py).
    pod: PodCost | None = None

    def live_runs(self) -> list[Run]:
        """Every run this worker holds: the one generating and those in post-processing (their leases)."""
        held = self.post.runs() if self.post is not None else []
        current = self.current
        return held + [current] if current is not None and all(r is not current for r in held) else held

    # Saves running jobs' denoising state and resumes requeued ones (worker/checkpoint.py); None: never.
    checkpoints: checkpoint.Checkpoints | None = None

    @property
    def lifecycle(self) -> Lifecycle:
        return Lifecycle(self.store)


_ctx: WorkerContext | None = None


def configure(ctx: WorkerContext) -> None:
    global _ctx
    _ctx = ctx


def run_job(video_id: str) -> None:
    """RQ entry point. Never raises for a job's own failure: the job record carries it."""
    if _ctx is None:
        raise RuntimeError("worker.runner.configure() was not called: run jobs with `k5serve worker`")
    from rq import get_current_job

    job = get_current_job()
    JobRun(_ctx, video_id, job.id if job is not None else video_id).run()


class JobRun:
    def __init__(self, ctx: WorkerContext, video_id: str, rq_job_id: str | None = None) -> None:
        self.ctx = ctx
        self.video_id = video_id
        self.rq_job_id = rq_job_id or video_id
        self.uploading = False
        self.t0 = time.perf_counter()
        self.log = logging.LoggerAdapter(log, {"video_id": video_id})
        # Checkpointing (worker/checkpoint.py): the run, its fingerprint, the state of the last step that ended.
        self._ckpt_run: Run | None = None
        self._fingerprint = ""
        self._latest_state: checkpoint.DenoiseState | None = None
        self._saved_step = -1
        # Whether a checkpoint of the job may be in storage, an earlier run's (the record says it saved one).
        self._saved_before = False

    def run(self) -> None:
        started = time.time()
        run = self.ctx.lifecycle.start(
            self.video_id, self.ctx.worker_name, self.rq_job_id, progress=PHASE["text_encode"], started_at=started
        )
        if run is None:
            self.log.info("job skipped: record gone, final, or running elsewhere")
            return
        self.ctx.current = run
        rec = run.record
        self.meter = Meter(rec)
        model = rec.model
        metrics.PHASE_SECONDS.labels(model, "queue_wait").observe(max(0.0, started - rec.created_at))
        self.t0 = time.perf_counter()
        self.settle(run, lambda: self._run(run))

    def settle(self, run: Run, body: Callable[[], None]) -> None:
        """The job's boundary: run `body` (the generation, or the post-processing handed over) and settle the job
        by how it ended. Re-raises only a Redis outage, after which the lease settles it."""
        model, t0 = run.record.model, self.t0
        # False while the job may still be in_progress under this run: then the lease, not this run, settles it.
        settled = True
        try:
            body()
        except HandedOff:
            settled = False  # the post-processing stage holds the run now and settles it there
            return
        except Stopped as stop:
            # Whatever this run stored is nobody's: the job is final, gone, or another run stores its own files.
            self._delete_own(run)
            if stop.outcome is Outcome.NOT_OWNER:
                self.log.warning("job lost: another run owns it now")
            else:
                self._delete_checkpoint()
                self.log.info("job cancelled while running", extra={"seconds": round(time.perf_counter() - t0, 3)})
                metrics.JOBS.labels(model, "cancelled").inc()
            self.ctx.pipeline.release_memory()
            return
        except StopForShutdown:
            run.requeue()
            self.log.info("job requeued on shutdown", extra={"seconds": round(time.perf_counter() - t0, 3)})
            self.ctx.pipeline.release_memory()
            return
        except (redis.ConnectionError, redis.TimeoutError):
            # Redis is away: nothing can be recorded now. The lease lapses and the job is requeued, and the worker
            # loop reconnects; failing the job here would turn an outage into lost videos.
            settled = False
            self.log.warning("job interrupted: Redis unavailable", exc_info=True)
            raise
        except Exception as e:  # the job's boundary: any failure ends the job, never the worker
            if is_device_lost(e):
                settled = False
                self.ctx.fatal = e
                self.log.critical("device lost: the worker exits and the job is requeued", exc_info=True)
                run.drop_lease()
                return
            code, message = classify(e)
            self.log.exception("job failed", extra={"code": code})
            if self.uploading:
                self._delete_own(run)  # no half-stored video
            self._delete_checkpoint()  # the job is over: nothing will resume it
            if run.fail(code, message, usage=self.meter.usage()) is Outcome.NOT_OWNER:
                self.log.warning("job lost before its failure was recorded")
            metrics.JOBS.labels(model, "failed").inc()
            metrics.FAILURES.labels(model, code).inc()
            self.ctx.pipeline.release_memory()
            return
        finally:
            if self.ctx.current is run:
                self.ctx.current = None
            if settled:
                run.release()
        seconds = time.perf_counter() - t0
        metrics.JOBS.labels(model, "completed").inc()
        self.log.info("job completed", extra={"seconds": round(seconds, 3)})

    def _delete_checkpoint(self) -> None:
        if self.ctx.checkpoints is not None and (self._saved_before or self._saved_step >= 0):
            self.ctx.checkpoints.delete(self.video_id)

    def _delete_own(self, run: Run) -> None:
        """Delete what this run stored (its own prefix, never another run's files)."""
        try:
            self.ctx.storage.delete_prefix(run.assets)
        except Exception:  # noqa: BLE001 - only the video's own expiry or deletion removes these now; log it
            self.log.warning("could not delete this run's files", exc_info=True)

    def _run(self, run: Run) -> None:
        rec = run.record
        storage = self.ctx.storage
        image = None
        if rec.input_key:
            image = Image.open(io.BytesIO(storage.get_bytes(rec.input_key))).convert("RGB")
        req = rec.generation(image)
        span = PHASE["decode"] - PHASE["denoise"]

        def on_step(done: int, total: int) -> None:
            # Every step reads the record: a cancelled or deleted job stops here, within one step.
            if self.ctx.stop.is_set():
                self._save_at_stop(done)
                raise StopForShutdown
            self.meter.steps = done - self.meter.steps_resumed  # the steps this run computed
            self.meter.enter("decode" if done >= total else "denoise")
            self._progress(run, PHASE["denoise"] + span * done // max(total, 1))

        t_job = time.perf_counter()
        self.meter.enter("text_encode")
        frames = self.ctx.pipeline.generate(req, on_step, **self._checkpointing(run, req))
        generate_s = time.perf_counter() - t_job
        stats = self._observe_generation(run, generate_s)
        self.log.info("generated", extra={"seconds": round(generate_s, 3), "frames": len(frames), **stats})
        if (post := self.ctx.post) is None:
            self._store(run, frames, t_job, stats)
            return
        # The stage holds the run's lease from here; only this thread ever sets or clears `current`.
        self.ctx.current = None
        try:
            # Waits while the stage is full: the GPU then idles only for as long as the CPU is behind.
            post.submit(run, lambda: self.settle(run, lambda: self._store(run, frames, t_job, stats)), self.ctx.stop)
        except ShutdownWhileWaiting:
            raise StopForShutdown from None
        raise HandedOff

    def _store(self, run: Run, frames: np.ndarray, t_job: float, stats: dict[str, float]) -> None:
        """Encode, upload, complete: in line, or on the post-processing thread while the next job denoises."""
        rec = run.record
        storage = self.ctx.storage
        self.meter.enter("encode")
        self._progress(run, PHASE["encode"])
        t = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="k5-") as tmp:
            files = {
                "video": Path(tmp) / VARIANTS["video"][0],
                "thumbnail": Path(tmp) / VARIANTS["thumbnail"][0],
                "spritesheet": Path(tmp) / VARIANTS["spritesheet"][0],
            }
            encode.write_mp4(frames, files["video"], fps=rec.fps)
            encode.write_thumbnail(frames, files["thumbnail"])
            encode.write_spritesheet(frames, files["spritesheet"])
            metrics.PHASE_SECONDS.labels(rec.model, "encode").observe(time.perf_counter() - t)
            self.meter.enter("upload")
            self._progress(run, PHASE["upload"])
            self.uploading = True
            t = time.perf_counter()
            # The video goes last: a completed record implies every variant is there.
            for variant in ("thumbnail", "spritesheet", "video"):
                name, media_type = VARIANTS[variant]
                storage.put_file(asset_key(run.assets, name), files[variant], media_type)
            metrics.PHASE_SECONDS.labels(rec.model, "upload").observe(time.perf_counter() - t)
        if "step_s" in stats:
            # Measured speed feeds the ETAs of queued jobs; overhead is everything but the denoising steps.
            total = time.perf_counter() - t_job
            self.ctx.store.record_timing(rec, stats["step_s"], total - stats["step_s"] * rec.num_inference_steps)
        self.meter.enter(None)
        outcome = run.complete(expires_at=int(time.time()) + self.ctx.asset_ttl_s, usage=self.meter.usage())
        if outcome is not Outcome.DONE:
            raise Stopped(outcome)
        self._delete_checkpoint()

    def _save_at_stop(self, done: int) -> None:
        """At SIGTERM: store the state of the step that just ended, so the job loses nothing but the step."""
        latest = self._latest_state
        if self.ctx.checkpoints is None or latest is None or latest.step != done or done == self._saved_step:
            return  # before the first step, already stored as a periodic one, or without checkpoints
        if self.ctx.checkpoints.due(done, latest.total, stopping=True):
            self._store_checkpoint(latest)

    def _store_checkpoint(self, state: checkpoint.DenoiseState) -> None:
        assert self.ctx.checkpoints is not None and self._ckpt_run is not None
        span = PHASE["decode"] - PHASE["denoise"]
        # Ownership first: a run that lost its job must not replace the state of the run that owns it now.
        self._progress(self._ckpt_run, PHASE["denoise"] + span * state.step // max(state.total, 1), state.step)
        try:
            self.ctx.checkpoints.save(self.video_id, state, self._fingerprint)
            self._saved_step = state.step
        except Exception:  # noqa: BLE001 - a checkpoint that cannot be stored costs steps, never the job
            self.log.warning("checkpoint not stored", extra={"step": state.step}, exc_info=True)

    def _checkpointing(self, run: Run, req) -> dict:
        """The generate() arguments that resume this job from its checkpoint and save its state at the due
        steps; none without checkpoints."""
        ckpts = self.ctx.checkpoints
        if ckpts is None:
            return {}
        self._ckpt_run, self._fingerprint = run, checkpoint.fingerprint(self.ctx.pipeline, req)
        # Only a job whose record says a run saved its state looks for it, so a first run asks storage nothing at
        # its start: a storage outage stalls no new job there, and no job pays a request for a missing file.
        self._saved_before = run.record.checkpoint_step is not None
        resume = ckpts.load(self.video_id, self._fingerprint, req.num_inference_steps) if self._saved_before else None
        start = resume.step if resume is not None else None
        # Where this run starts, on the record (the video object shows it, usage counts the steps it saved).
        if (outcome := run.progress(resumed_from_step=start)) is not Outcome.DONE:
            raise Stopped(outcome)
        if start is not None:
            ckpts.resumed(start)
            self.meter.steps_resumed = start  # usage: the steps the checkpoint saved this run

        def on_state(state: checkpoint.DenoiseState) -> None:
            # Kept for on_step, which runs next in the same step end (before the latents change again) and
            # stores it when SIGTERM's flag is set by then.
            self._latest_state = state
            if ckpts.due(state.step, state.total, stopping=False):
                self._store_checkpoint(state)

        return {"resume": resume, "on_state": on_state}

    def _observe_generation(self, run: Run, generate_s: float) -> dict[str, float]:
        """Export the pipeline's per-phase figures; fall back to the whole call when it has none. Returns the
        numeric figures for the log line, step_s always among them."""
        stats: GenerationStats | None = getattr(self.ctx.pipeline, "last_stats", None)
        model = run.record.model
        figures: dict[str, float] = {}
        if stats is not None:
            self.meter.measured(stats)
            phases = (("text_encode", stats.text_encode_s), ("denoise", stats.denoise_s), ("decode", stats.decode_s))
            for phase, seconds in phases:
                metrics.PHASE_SECONDS.labels(model, phase).observe(seconds)
            if stats.step_s:
                metrics.STEP_SECONDS.labels(model).observe(stats.step_s)
            if stats.peak_gpu_memory_bytes is not None:
                metrics.PEAK_GPU_MEMORY.labels(model).set(stats.peak_gpu_memory_bytes)
            if stats.enhanced_prompt:
                if (outcome := run.progress(enhanced_prompt=stats.enhanced_prompt)) is not Outcome.DONE:
                    raise Stopped(outcome)
            figures = {k: v for k, v in stats.as_dict().items() if isinstance(v, int | float)}
        if not figures.get("step_s"):
            figures["step_s"] = generate_s / max(1, run.record.num_inference_steps)
        return figures

    def _progress(self, run: Run, progress: int, checkpoint_step: int | None = None) -> None:
        # Every step reads the record: a cancelled, deleted or lost job stops here, within one step. The usage
        # so far goes with it, so a job that ends now (cancelled, failed) still says what it used.
        changes = {"checkpoint_step": checkpoint_step} if checkpoint_step is not None else {}
        if (outcome := run.progress(progress, usage=self.meter.usage(), **changes)) is not Outcome.DONE:
            raise Stopped(outcome)


def classify(e: Exception) -> tuple[str, str]:
    """An error code and a message a client can act on."""
    import torch

    if isinstance(e, torch.cuda.OutOfMemoryError):
        return "out_of_memory", "The GPU ran out of memory; try a smaller size or a shorter video."
    if isinstance(e, StorageFull) or (isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)):
        return "storage_full", "The server ran out of disk space for the video; try again later."
    if isinstance(e, StorageError):
        return "storage_error", "The video could not be stored; try again."
    if isinstance(e, OSError):  # strerror only: the filename would show a server path
        return "generation_error", f"Generation failed: {type(e).__name__}: {e.strerror or 'I/O error'}"
    if isinstance(e, GenerationError):
        return "generation_error", f"Generation failed: {e}."
    return "generation_error", f"Generation failed: {type(e).__name__}: {e}"


# Messages of CUDA errors after which the context is unusable: every later kernel fails too.
_DEVICE_LOST = ("CUDA error", "CUBLAS_STATUS", "CUDNN_STATUS", "illegal memory access", "device-side assert")


def is_device_lost(e: BaseException) -> bool:
    """An error the process cannot recover from; out-of-memory is not one (the next, smaller job may fit)."""
    import torch

    if isinstance(e, torch.cuda.OutOfMemoryError):
        return False
    if isinstance(e, DeviceLost):
        return True
    accelerator_error = getattr(torch, "AcceleratorError", None)
    if accelerator_error is not None and isinstance(e, accelerator_error):
        return True
    return isinstance(e, RuntimeError) and any(s in str(e) for s in _DEVICE_LOST)
