"""The non-forking RQ worker that holds one warm pipeline and takes its model's jobs one at a time."""

from __future__ import annotations

import logging
import os
import socket
import threading

from rq import Queue, SimpleWorker

from service import metrics
from service.jobs import JobStore, connect_redis
from service.models import resolve_model
from service.settings import Settings
from service.storage import open_storage
from worker import runner
from worker.pipeline import VideoPipeline

log = logging.getLogger(__name__)


class Heartbeat(threading.Thread):
    """Announces the worker's model every few seconds, also while a long job runs in the main thread."""

    def __init__(self, store: JobStore, spec, name: str, interval: float) -> None:
        super().__init__(name="k5-heartbeat", daemon=True)
        self.store, self.spec, self.worker_name, self.interval = store, spec, name, interval
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(self.interval):
            try:
                self.store.announce(self.spec, self.worker_name)
            except Exception:  # Redis may be away for a while; keep beating
                log.warning("heartbeat failed", exc_info=True)


def run(settings: Settings) -> None:
    if not settings.model:
        raise SystemExit("K5_MODEL is not set: name a catalogue id, a hub repo id or a local checkpoint directory")
    spec = resolve_model(settings.model)
    name = settings.worker_name or f"{socket.gethostname()}-{os.getpid()}"
    r = connect_redis(settings)
    store = JobStore(r, settings)
    storage = open_storage(settings)

    ready = threading.Event()
    # Liveness from the start (a model download can take many minutes); readiness once warm and announced.
    metrics.serve(settings.host, settings.metrics_port, ready.is_set)

    # Load and warm before announcing: a worker is only online once it can take a job at full speed.
    pipeline = VideoPipeline.load(settings, spec)
    pipeline.warm()
    runner.configure(runner.WorkerContext(store, storage, pipeline, name, settings.asset_ttl_s))

    store.announce(spec, name)
    metrics.MODEL_READY.labels(spec.id).set(1)
    ready.set()
    heartbeat = Heartbeat(store, spec, name, settings.heartbeat_s)
    heartbeat.start()
    log.info("worker ready", extra={"model": spec.id, "worker": name})
    try:
        # RQ raises the socket timeout of its connection for blocking pops: give it one of its own.
        rq_conn = connect_redis(settings)
        worker = SimpleWorker([Queue(spec.id, connection=rq_conn)], connection=rq_conn, name=name)
        worker.work(logging_level=settings.log_level.upper())
    finally:
        heartbeat.stopped.set()
        try:
            store.retire(spec, name)
        except Exception:
            log.warning("could not retire worker", exc_info=True)
