"""Post-processing in the background: job N's encode and upload run on a thread while job N+1 denoises.

A generation hands its frames over with `submit` and the GPU loop takes its next job at once. At most `capacity`
jobs are here at a time; a generation that finishes while the stage is full waits in `submit` (backpressure), so
frames never pile up in host memory. The guarantees of a job in line carry over, because the same JobRun code runs
it (worker/runner.py: JobRun.settle): the worker's heartbeat keeps the lease of every run here alive (`runs`), a
cancellation is seen before encoding and again before uploading (and a cancel that comes later still stops the
completion, whose files are then deleted), and failures are classified and recorded as in line. On shutdown the
worker drains the stage (`close`) before it stops its heartbeat; a generation still waiting for a slot when the
grace period is over is requeued like a job stopped at a step.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable

from service.contract.run import Run

log = logging.getLogger(__name__)

# How often a generation waiting for a slot looks at the shutdown flag (a threading.Timer sets it, without notifying).
_POLL_S = 0.2


class ShutdownWhileWaiting(Exception):
    """The shutdown grace period ended while a generation waited for a slot: the caller requeues its job."""


class PostProcessor:
    """One thread that runs handed-over work in order, with room for `capacity` jobs."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("a PostProcessor needs room for at least one job")
        self.capacity = capacity
        self._slots = threading.BoundedSemaphore(capacity)
        self._work: queue.Queue[tuple[Run, Callable[[], None]] | None] = queue.Queue()
        self._runs: dict[str, Run] = {}
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name="k5-post", daemon=True)
        self._thread.start()

    def submit(self, run: Run, work: Callable[[], None], stop: threading.Event) -> None:
        """Queue `work` (which settles `run`), waiting while the stage is full. Raises ShutdownWhileWaiting when
        `stop` is set before a slot frees up: the work was not queued and the caller still owns the run."""
        with self._lock:  # from now on the heartbeat refreshes its lease from here, also while it waits
            self._runs[run.token] = run
        while not self._slots.acquire(timeout=_POLL_S):
            if stop.is_set():
                with self._lock:
                    self._runs.pop(run.token, None)
                raise ShutdownWhileWaiting
        self._work.put((run, work))

    def runs(self) -> list[Run]:
        """The runs here now, whose leases the heartbeat keeps alive."""
        with self._lock:
            return list(self._runs.values())

    def busy(self) -> bool:
        with self._lock:
            return bool(self._runs)

    def close(self, timeout: float | None = None) -> bool:
        """Finish what was handed over, then end the thread. False if it was still running after `timeout`."""
        self._work.put(None)
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _loop(self) -> None:
        while (item := self._work.get()) is not None:
            run, work = item
            try:
                work()
            except Exception:  # settle() re-raises only a Redis outage: the run's lease lapses and the janitor requeues
                log.warning(
                    "post-processing left its job to the lease", extra={"video_id": run.video_id}, exc_info=True
                )
            finally:
                with self._lock:
                    self._runs.pop(run.token, None)
                self._slots.release()
