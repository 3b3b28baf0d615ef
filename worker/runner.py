"""One job: status -> generate -> encode -> upload -> done.

`run_job` is what RQ calls (by name, so the gateway never imports this module). It runs inside the worker
process that holds the warm pipeline, set once by `configure`.

Every run holds a lease on its job (service/recovery.py): its writes are checked against its owner token, so a
run whose worker was presumed dead and whose job was requeued cannot complete it. A run that cannot settle its
job (Redis went away, the process dies) leaves the record in_progress: its lease lapses and the reaper requeues.
"""

from __future__ import annotations

import errno
import io
import logging
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis
from PIL import Image

from service import metrics
from service.jobs import VARIANTS, JobRecord, JobStore, asset_key
from service.recovery import Leases, NotOwner
from service.storage import Storage, StorageError, StorageFull
from worker import encode
from worker.pipeline import GenerationError, GenerationRequest, VideoPipeline

log = logging.getLogger(__name__)

# Progress (0-100) at the start of each phase; denoising steps fill the range between its start and the next.
PHASE = {"text_encode": 1, "denoise": 5, "decode": 90, "encode": 93, "upload": 97}


class JobCancelled(Exception):
    """The job's record became final (cancelled or deleted) while it ran."""


class JobLost(Exception):
    """Another run owns the job now (this worker's lease lapsed and the job was requeued)."""


class StopForShutdown(Exception):
    """The worker's shutdown grace period is over: stop at this step boundary and requeue the job."""


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
    # The run in progress, (video id, owner token), for the heartbeat thread to keep its lease alive.
    current: tuple[str, str] | None = None
    # An unrecoverable device error seen by a job: the worker loop exits non-zero after it.
    fatal: BaseException | None = None

    @property
    def leases(self) -> Leases:
        return Leases(self.store)


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
        self.leases = ctx.leases
        self.token = ""
        self.uploading = False
        self.log = logging.LoggerAdapter(log, {"video_id": video_id})

    def run(self) -> None:
        started = time.time()
        claimed = self.leases.start(
            self.video_id, self.ctx.worker_name, self.rq_job_id, progress=PHASE["text_encode"], started_at=started
        )
        if claimed is None:
            self.log.info("job skipped: record gone, final, or running elsewhere")
            return
        rec, self.token = claimed
        self.ctx.current = (self.video_id, self.token)
        model = rec.model
        metrics.PHASE_SECONDS.labels(model, "queue_wait").observe(max(0.0, started - rec.created_at))
        t0 = time.perf_counter()
        # False while the job may still be in_progress under this run: then the lease, not this run, settles it.
        settled = True
        try:
            self._run(rec)
        except JobCancelled:
            self.log.info("job cancelled while running", extra={"seconds": round(time.perf_counter() - t0, 3)})
            metrics.JOBS.labels(model, "cancelled").inc()
            self.ctx.pipeline.release_memory()
            return
        except JobLost:
            # Not ours any more: touch neither the record nor the stored files (the new owner writes them).
            self.log.warning("job lost: another run owns it now")
            self.ctx.pipeline.release_memory()
            return
        except StopForShutdown:
            self.leases.requeue(self.video_id, self.token)
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
                self.leases.drop_lease(self.video_id, self.token)
                return
            code, message = classify(e)
            self.log.exception("job failed", extra={"code": code})
            if self.uploading:
                self._delete_partial(rec)
            try:
                self._settle("failed", error={"code": code, "message": message})
            except JobLost:
                self.log.warning("job lost before its failure was recorded")
            metrics.JOBS.labels(model, "failed").inc()
            metrics.FAILURES.labels(model, code).inc()
            self.ctx.pipeline.release_memory()
            return
        finally:
            self.ctx.current = None
            if settled:
                self.leases.finish(self.video_id, self.token)
        seconds = time.perf_counter() - t0
        metrics.JOBS.labels(model, "completed").inc()
        self.log.info("job completed", extra={"seconds": round(seconds, 3)})

    def _settle(self, status: str, **changes) -> JobRecord | None:
        try:
            return self.leases.update(self.video_id, self.token, status, **changes)
        except NotOwner as e:
            raise JobLost from e

    def _delete_partial(self, rec: JobRecord) -> None:
        """No half-stored video: a failed upload removes what it had written."""
        try:
            self.ctx.storage.delete_prefix(rec.id)
        except Exception:  # noqa: BLE001 - the expiry sweep never sees this video; log for the operator
            self.log.warning("could not delete partial upload", exc_info=True)

    def _run(self, rec: JobRecord) -> None:
        storage = self.ctx.storage
        image = None
        if rec.input_key:
            image = Image.open(io.BytesIO(storage.get_bytes(rec.input_key))).convert("RGB")
        req = GenerationRequest(
            prompt=rec.prompt or "",
            negative_prompt=rec.negative_prompt,
            width=rec.width,
            height=rec.height,
            num_frames=rec.num_frames,
            num_inference_steps=rec.num_inference_steps,
            guidance_scale=rec.guidance_scale,
            seed=rec.seed,
            image=image,
            enhance_prompt=rec.enhance_prompt,
        )
        span = PHASE["decode"] - PHASE["denoise"]

        def on_step(done: int, total: int) -> None:
            # Every step reads the record: a cancelled or deleted job stops here, within one step.
            if self.ctx.stop.is_set():
                raise StopForShutdown
            self._progress(PHASE["denoise"] + span * done // max(total, 1))

        t_job = time.perf_counter()
        frames = self.ctx.pipeline.generate(req, on_step)
        generate_s = time.perf_counter() - t_job
        stats = self._observe_generation(rec, generate_s)
        self.log.info("generated", extra={"seconds": round(generate_s, 3), "frames": len(frames), **stats})

        self._progress(PHASE["encode"])
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
            self._progress(PHASE["upload"])
            self.uploading = True
            t = time.perf_counter()
            # The video goes last: a completed record implies every variant is there.
            for variant in ("thumbnail", "spritesheet", "video"):
                name, media_type = VARIANTS[variant]
                storage.put_file(asset_key(rec.id, name), files[variant], media_type)
            metrics.PHASE_SECONDS.labels(rec.model, "upload").observe(time.perf_counter() - t)
        if "step_s" in stats:
            # Measured speed feeds the ETAs of queued jobs; overhead is everything but the denoising steps.
            total = time.perf_counter() - t_job
            self.ctx.store.record_timing(rec, stats["step_s"], total - stats["step_s"] * rec.num_inference_steps)
        now = int(time.time())
        done = self._settle("completed", progress=100, completed_at=now, expires_at=now + self.ctx.asset_ttl_s)
        if done is None:
            # Cancelled or deleted during the upload: leave nothing behind.
            storage.delete_prefix(rec.id)
            raise JobCancelled

    def _observe_generation(self, rec: JobRecord, generate_s: float) -> dict:
        """Export the pipeline's per-phase figures; fall back to the whole call when it has none."""
        stats = dict(getattr(self.ctx.pipeline, "last_stats", None) or {})
        model = rec.model
        if "denoise_s" in stats:
            for phase in ("text_encode", "denoise", "decode"):
                if stats.get(f"{phase}_s") is not None:
                    metrics.PHASE_SECONDS.labels(model, phase).observe(stats[f"{phase}_s"])
        if stats.get("step_s"):
            metrics.STEP_SECONDS.labels(model).observe(stats["step_s"])
        else:
            stats["step_s"] = generate_s / max(1, rec.num_inference_steps)
        if stats.get("peak_gpu_memory_bytes") is not None:
            metrics.PEAK_GPU_MEMORY.labels(model).set(stats["peak_gpu_memory_bytes"])
        if stats.get("enhanced_prompt"):
            self._settle(None, enhanced_prompt=stats["enhanced_prompt"])
        return {k: v for k, v in stats.items() if isinstance(v, int | float)}

    def _progress(self, progress: int) -> None:
        if self._settle(None, progress=progress) is None:
            raise JobCancelled


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
