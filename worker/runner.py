"""One job: status -> generate -> encode -> upload -> done.

`run_job` is what RQ calls (by name, so the gateway never imports this module). It runs inside the worker
process that holds the warm pipeline, set once by `configure`.
"""

from __future__ import annotations

import io
import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from service import metrics
from service.jobs import VARIANTS, JobRecord, JobStore, asset_key
from service.storage import Storage, StorageError
from worker import encode
from worker.pipeline import GenerationError, GenerationRequest, VideoPipeline

log = logging.getLogger(__name__)

# Progress (0-100) at the start of each phase; denoising steps fill the range between its start and the next.
PHASE = {"text_encode": 1, "denoise": 5, "decode": 90, "encode": 93, "upload": 97}


class JobCancelled(Exception):
    """The job's record became final (cancelled or deleted) while it ran."""


@dataclass
class WorkerContext:
    store: JobStore
    storage: Storage
    pipeline: VideoPipeline
    worker_name: str
    asset_ttl_s: int


_ctx: WorkerContext | None = None


def configure(ctx: WorkerContext) -> None:
    global _ctx
    _ctx = ctx


def run_job(video_id: str) -> None:
    """RQ entry point. Never raises for a job's own failure: the job record carries it."""
    if _ctx is None:
        raise RuntimeError("worker.runner.configure() was not called: run jobs with `k5serve worker`")
    JobRun(_ctx, video_id).run()


class JobRun:
    def __init__(self, ctx: WorkerContext, video_id: str) -> None:
        self.ctx = ctx
        self.video_id = video_id
        self.log = logging.LoggerAdapter(log, {"video_id": video_id})

    def run(self) -> None:
        store = self.ctx.store
        started = time.time()
        rec = store.update(
            self.video_id, "in_progress", progress=PHASE["text_encode"], worker=self.ctx.worker_name, started_at=started
        )
        if rec is None:
            self.log.info("job skipped: record gone or already final")
            return
        model = rec.model
        metrics.PHASE_SECONDS.labels(model, "queue_wait").observe(max(0.0, started - rec.created_at))
        t0 = time.perf_counter()
        try:
            self._run(rec)
        except JobCancelled:
            self.log.info("job cancelled while running", extra={"seconds": round(time.perf_counter() - t0, 3)})
            metrics.JOBS.labels(model, "cancelled").inc()
            self.ctx.pipeline.release_memory()
            return
        except Exception as e:  # the job's boundary: any failure ends the job, never the worker
            code, message = classify(e)
            self.log.exception("job failed", extra={"code": code})
            store.update(self.video_id, "failed", error={"code": code, "message": message})
            metrics.JOBS.labels(model, "failed").inc()
            metrics.FAILURES.labels(model, code).inc()
            self.ctx.pipeline.release_memory()
            return
        seconds = time.perf_counter() - t0
        metrics.JOBS.labels(model, "completed").inc()
        self.log.info("job completed", extra={"seconds": round(seconds, 3)})

    def _run(self, rec: JobRecord) -> None:
        store, storage = self.ctx.store, self.ctx.storage
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
        )
        span = PHASE["decode"] - PHASE["denoise"]

        def on_step(done: int, total: int) -> None:
            # Every step reads the record: a cancelled or deleted job stops here, within one step.
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
        done = store.update(
            self.video_id, "completed", progress=100, completed_at=now, expires_at=now + self.ctx.asset_ttl_s
        )
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
            self.ctx.store.update(self.video_id, enhanced_prompt=stats["enhanced_prompt"])
        return {k: v for k, v in stats.items() if isinstance(v, int | float)}

    def _progress(self, progress: int) -> None:
        if self.ctx.store.update(self.video_id, progress=progress) is None:
            raise JobCancelled


def classify(e: Exception) -> tuple[str, str]:
    """An error code and a message a client can act on."""
    import torch

    if isinstance(e, torch.cuda.OutOfMemoryError):
        return "out_of_memory", "The GPU ran out of memory; try a smaller size or a shorter video."
    if isinstance(e, StorageError):
        return "storage_error", "The video could not be stored; try again."
    if isinstance(e, GenerationError):
        return "generation_error", f"Generation failed: {e}."
    return "generation_error", f"Generation failed: {type(e).__name__}: {e}"
