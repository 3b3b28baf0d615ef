"""The non-forking RQ worker that holds one warm pipeline and takes its model's jobs one at a time.

Recovery: SimpleWorker has no heartbeat while a job runs, so the Heartbeat thread keeps
the worker online, keeps the running job's lease alive and runs the janitor (reaper of jobs whose worker died,
asset expiry). SIGTERM finishes the current job within shutdown_grace_s or stops it at a step and requeues it.
When Redis goes away the RQ loop ends; this module reconnects with backoff instead of exiting.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable

import redis
from rq import Queue, SimpleWorker
from rq.worker import WorkerStatus
from rq.worker.base import StopRequested

from service.contract import metrics
from service.contract.jobs import JobStore, connect_redis
from service.contract.models import TINY, UnknownModelError, resolve_model
from service.contract.recovery import Recovery
from service.contract.settings import Settings
from service.contract.storage import Storage, open_storage
from worker import parallel, runner
from worker.checkpoint import Checkpoints
from worker.parallel import Rank
from worker.pipeline import VideoPipeline
from worker.podcost import PodCost
from worker.post import PostProcessor
from worker.speed import ConfigError

log = logging.getLogger(__name__)

# Exit status after an unrecoverable device error: the supervisor restarts the process with a fresh context.
EXIT_DEVICE_LOST = 70
# Reconnect backoff while Redis is unreachable.
BACKOFF_MIN_S, BACKOFF_MAX_S = 0.5, 30.0


class Heartbeat(threading.Thread):
    """Announces the worker's model every few seconds, also while a long job runs in the main thread; keeps the
    running job's lease alive; and runs the janitor pass (one worker at a time holds its lock)."""

    def __init__(
        self, store: JobStore, spec, name: str, interval: float, ctx: runner.WorkerContext, storage: Storage
    ) -> None:
        super().__init__(name="k5-heartbeat", daemon=True)
        self.store, self.spec, self.worker_name, self.interval = store, spec, name, interval
        self.ctx, self.storage, self.recovery = ctx, storage, Recovery(store)
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(self.interval):
            # Separate tries: a failing janitor pass must never cost the running job its lease.
            try:
                # The run generating and those encoding or uploading in the background (worker/post.py).
                live = self.ctx.live_runs()
                for current in live:
                    current.refresh()
                if self.ctx.pod is not None:  # a missed change (an API server that was away) is sent again here
                    self.ctx.pod.set_busy(bool(live))
                self.store.announce(self.spec, self.worker_name)
            except Exception:  # Redis may be away for a while; keep beating
                log.warning("heartbeat failed", exc_info=True)
            try:
                self.recovery.janitor(self.storage, self.worker_name)
            except Exception:
                log.warning("janitor pass failed", exc_info=True)


class RecoveringWorker(SimpleWorker):
    """SimpleWorker with a shutdown grace period and a non-zero exit after a lost device."""

    def __init__(self, *args, ctx: runner.WorkerContext, grace_s: float, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.ctx, self.grace_s = ctx, grace_s
        self.shutdown_requested = False

    def _shutdown(self) -> None:
        # RQ's warm shutdown takes no new job and waits for the current one without limit; a Kubernetes grace
        # period would then SIGKILL it. Stop it at a step boundary (and requeue it) before that happens.
        self.shutdown_requested = True
        if self.get_state() == WorkerStatus.BUSY or self.ctx.live_runs():
            log.info("shutdown requested: finishing the current job", extra={"grace_s": self.grace_s})
            timer = threading.Timer(self.grace_s, self.ctx.stop.set)
            timer.daemon = True
            timer.start()
        super()._shutdown()

    def request_force_stop(self, signum, frame) -> None:
        # A second signal ends the grace now. RQ's cold shutdown would raise SystemExit mid-step and leave the
        # job to its lease; stopping at the next step requeues it at once.
        log.info("second stop signal: stopping the current job at its next step")
        self.ctx.stop.set()

    def execute_job(self, job, queue) -> None:
        if self.ctx.pod is not None:
            self.ctx.pod.set_busy(True)  # before the job starts: a scale-down from now on spares this pod
        super().execute_job(job, queue)
        if self.ctx.pod is not None:
            self.ctx.pod.set_busy(bool(self.ctx.live_runs()))
        if self.ctx.fatal is not None:
            raise SystemExit(EXIT_DEVICE_LOST)


def run(settings: Settings, rank: Rank | None = None, on_ready: Callable[[], None] | None = None) -> None:
    """`rank`: rank 0 of a worker spanning several GPUs (worker/ranks.py starts it); `on_ready` is called once the
    worker is warm and announced."""
    if not settings.model:
        raise SystemExit("K5_MODEL is not set: name a catalogue id, a hub repo id or a local checkpoint directory")
    try:
        spec = resolve_model(settings.model, cache_dir=settings.hf_cache_dir)
    except UnknownModelError as e:  # a typo in K5_MODEL: one line, not a traceback
        hint = " (the tiny models are directories: build them with `k5serve tiny-model DIR`)" * (settings.model in TINY)
        raise SystemExit(f"K5_MODEL: {e}{hint}") from None
    name = settings.worker_name or f"{socket.gethostname()}-{os.getpid()}"
    r = connect_redis(settings)
    store = JobStore(r, settings)
    storage = open_storage(settings)

    ready = threading.Event()
    # Liveness from the start (a model download can take many minutes); readiness once warm and announced.
    metrics.serve(settings.host, settings.metrics_port, ready.is_set)

    # Load and warm before announcing: a worker is only online once it can take a job at full speed.
    try:
        pipeline = VideoPipeline.load(settings, spec, rank)
    except ConfigError as e:  # a configuration that cannot work on this device: one line naming the fix
        raise SystemExit(f"K5_MODEL={settings.model}: {e}") from None
    pipeline.warm()
    if rank is not None:
        pipeline = parallel.Leader(pipeline, rank)
    ckpts = Checkpoints(
        storage, spec.id, settings.checkpoint_every_steps, settings.checkpoint_on_shutdown, settings.checkpoint_ttl_s
    )
    ctx = runner.WorkerContext(store, storage, pipeline, name, settings.asset_ttl_s, checkpoints=ckpts)
    if settings.postprocess_jobs:
        ctx.post = PostProcessor(settings.postprocess_jobs)
    if (pod := PodCost.from_settings(settings)) is not None:
        pod.start()
        pod.set_busy(False)
        ctx.pod = pod
    runner.configure(ctx)

    store.announce(spec, name)
    metrics.MODEL_READY.labels(spec.id).set(1)
    ready.set()
    heartbeat = Heartbeat(store, spec, name, settings.heartbeat_s, ctx, storage)
    heartbeat.start()
    log.info("worker ready", extra={"model": spec.id, "worker": name, "parallel": settings.parallel})
    if on_ready is not None:
        on_ready()
    try:
        serve(settings, spec.id, name, ctx)
    finally:
        if ctx.post is not None:
            # Before the heartbeat stops: the runs encoding or uploading keep their leases until they are settled.
            log.info("finishing post-processing", extra={"jobs": len(ctx.post.runs())})
            ctx.post.close()
        heartbeat.stopped.set()
        try:
            store.retire(spec, name)
        except Exception:
            log.warning("could not retire worker", exc_info=True)
        if isinstance(pipeline, parallel.Leader):
            pipeline.close()


def serve(settings: Settings, queue_name: str, name: str, ctx: runner.WorkerContext) -> None:
    """RQ's work loop, restarted with backoff whenever it ends for any reason but a stop request."""
    backoff = BACKOFF_MIN_S
    incarnation = 0
    while True:
        # RQ raises the socket timeout of its connection for blocking pops: give it one of its own.
        rq_conn = connect_redis(settings)
        # A fresh RQ name per incarnation: the previous one may still be registered (not dead) after an outage.
        rq_name = name if incarnation == 0 else f"{name}.{incarnation}"
        worker = RecoveringWorker(
            [Queue(queue_name, connection=rq_conn)],
            connection=rq_conn,
            name=rq_name,
            ctx=ctx,
            grace_s=settings.shutdown_grace_s,
        )
        t0 = time.monotonic()
        try:
            worker.work(logging_level=settings.log_level.upper())
        except redis.RedisError:  # registration or teardown while Redis is away
            log.warning("worker loop failed: Redis unavailable", exc_info=True)
        if worker.shutdown_requested:
            return
        if time.monotonic() - t0 > 60:
            backoff = BACKOFF_MIN_S
        incarnation += 1
        log.warning("worker loop ended; reconnecting to Redis", extra={"retry_in_s": backoff})
        try:
            wait_for_redis(rq_conn, backoff)
        except StopRequested:  # SIGTERM while reconnecting: RQ's handler is still installed
            return
        backoff = min(2 * backoff, BACKOFF_MAX_S)


def wait_for_redis(conn: redis.Redis, backoff: float) -> None:
    while True:
        time.sleep(backoff)
        try:
            conn.ping()
            return
        except redis.RedisError:
            backoff = min(2 * backoff, BACKOFF_MAX_S)
