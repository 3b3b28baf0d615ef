"""The janitor: reaping runs whose worker vanished, redelivering jobs a worker took but never started, failing queued
jobs past their deadline, sweeping expired files. It is a client of service/contract/lifecycle.py, which makes every
change of a record; this module only decides which jobs to look at (service/contract/keys.py names the keys:
k5:running, k5:expiry, k5:deadlines, k5:limbo:*, k5:lock:janitor).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from service.contract import keys, lineup
from service.contract.clock import redis_clock
from service.contract.jobs import JobStore, current_rq_id, video_id_of
from service.contract.lifecycle import Lifecycle
from service.contract.storage import Storage

log = logging.getLogger(__name__)


class Janitor(threading.Thread):
    """The janitor pass on a timer, for a process that is always up: the gateway. Workers run it from their
    heartbeat too, but a pool scaled to zero, or one whose every worker died, runs nothing: a job whose worker
    was lost would stay in_progress, out of the queue that the autoscaler watches, and no worker would ever
    start for it."""

    def __init__(self, store: JobStore, storage: Storage, holder: str) -> None:
        super().__init__(name="k5-janitor", daemon=True)
        self.recovery, self.storage, self.holder = Recovery(store), storage, holder
        self.interval = store.settings.heartbeat_s
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(self.interval):
            try:
                self.recovery.janitor(self.storage, self.holder)
            except Exception:  # Redis or storage away for a while: the next pass tries again
                log.warning("janitor pass failed", exc_info=True)

    def stop(self) -> None:
        self.stopped.set()
        self.join(timeout=5)


class Recovery:
    def __init__(self, store: JobStore) -> None:
        self.store, self.r, self.settings = store, store.r, store.settings
        self.life = Lifecycle(store)

    def reap(self) -> dict[str, int]:
        """Requeue (or give up) every running job whose lease lapsed."""
        counts: dict[str, int] = {}
        for raw in self.r.smembers(keys.RUNNING):
            video_id = keys.text(raw)
            if self.r.exists(keys.lease(video_id)):
                continue
            _, what = self.life.requeue(video_id)
            counts[what] = counts.get(what, 0) + 1
        return counts

    def redeliver(self, now: float | None = None) -> int:
        """Requeue the queued jobs whose RQ job a worker took off the queue but never started.

        A worker killed in the moment between RQ's dequeue and the run's lease (SIGKILL, the OOM killer, a lost
        node) leaves the record `queued` and its RQ job in the queue's intermediate list or started registry,
        or, once RQ's own maintenance has filed it as abandoned, in the failed registry: nothing would ever run
        it, and with scale-to-zero no worker would even start for it. A live worker starts its job within
        milliseconds of taking it, so one still unstarted after a lease period was lost; a frozen worker that
        comes back later is refused by `start`, which only runs the video's current RQ job.

        `now` is on Redis's clock (clock.redis_clock): the janitor passes of different processes compare it only
        with what they noted on that clock before.

        An entry of the failed registry that needs nothing (its video started, ended, is gone, or runs under a
        newer RQ job) is removed once looked at: the job record says how the video ended, so the pass costs
        what is new since the last one, not an hour of RQ's failures every pass.
        """
        now = redis_clock(self.r) if now is None else now
        grace = self.life.lease_ms / 1000
        moved = 0
        for model in self.store.queue_models():
            queue = self.store.queue(model)
            taken = queue.intermediate_queue.get_job_ids()
            started = queue.started_job_registry.get_job_ids(cleanup=False)
            failed = set(queue.failed_job_registry.get_job_ids(cleanup=False))
            for rq_id in dict.fromkeys([*taken, *started, *sorted(failed)]):
                try:
                    moved += self._check_delivery(queue, rq_id, rq_id in failed, now, grace)
                except Exception:  # one bad entry must not stop the pass (nor the expiry sweep after it)
                    log.warning("could not check RQ job %s", rq_id, exc_info=True)
        return moved

    def _check_delivery(self, queue: Any, rq_id: str, failed: bool, now: float, grace: float) -> bool:
        video_id = video_id_of(rq_id)
        rec = self.store.get(video_id)
        if rec is None or rec.status != "queued" or current_rq_id(self.r, video_id) != rq_id:
            if failed:  # nothing to redeliver, now or later: RQ's copy is done with
                queue.failed_job_registry.remove(rq_id)
                self.store.forget_rq_job(queue.name, rq_id)
            return False  # started, final, gone, or an older RQ job of a requeued video
        if not failed:
            # When the janitor first saw it so, on Redis's clock: RQ's started_at is the taking worker's own
            # clock, which may be off, and RQ keeps no time at all for a job taken but not started.
            limbo = keys.limbo(rq_id)
            self.r.set(limbo, now, nx=True, ex=86400)
            since = float(self.r.get(limbo) or now)
            if now - since < grace:
                return False
        if self.life.redeliver(video_id, rq_id) == "skipped":
            return False  # it moved meanwhile (started, cancelled): the next pass looks again
        queue.intermediate_queue.remove(rq_id)
        self.store.forget_rq_job(rec.model, rq_id)
        self.r.delete(keys.limbo(rq_id))
        return True

    def expire_deadlines(self, batch: int = 100) -> int:
        """Fail the queued jobs whose deadline passed (Redis's clock) without waiting for a worker to take them:
        with no worker free, or none at all (scale-to-zero), none would. k5:deadlines holds only queued jobs, so a
        pass reads just the ones that are due."""
        now = redis_clock(self.r)
        due = self.r.zrangebyscore(keys.DEADLINES, "-inf", now, start=0, num=batch)
        failed = 0
        for raw in due:
            video_id = keys.text(raw)
            if self.life.expire(video_id, now) is not None:
                failed += 1
                continue
            rec = self.store.get(video_id)
            if rec is None or rec.status != "queued":  # left the queue by a way that kept no deadline: drop it
                self.r.zrem(keys.DEADLINES, video_id)
        return failed

    def prune_lines(self) -> int:
        """Each model's line without entries of videos that are no longer queued (lineup.prune)."""
        return sum(lineup.prune(self.r, model) for model in self.store.queue_models())

    def sweep_expired(self, storage: Storage, now: float | None = None, batch: int = 100) -> int:
        """Delete the stored assets of videos past their expires_at."""
        due = self.r.zrangebyscore(keys.EXPIRY, "-inf", now or time.time(), start=0, num=batch)
        for raw in due:
            video_id = keys.text(raw)
            storage.delete_prefix(video_id)
            self.r.zrem(keys.EXPIRY, video_id)
            log.info("assets expired", extra={"video_id": video_id})
        return len(due)

    def janitor(self, storage: Storage, holder: str) -> None:
        """One pass of the periodic cleanup, run by whichever process (a gateway or a worker) gets the lock first."""
        if not self.r.set(keys.JANITOR_LOCK, holder, nx=True, px=max(200, int(self.settings.heartbeat_s * 900))):
            return
        # Each step on its own: one that fails (a bad record, storage away) must not stop the others.
        for step in (
            self.reap,
            self.redeliver,
            self.expire_deadlines,
            self.prune_lines,
            lambda: self.sweep_expired(storage),
        ):
            try:
                step()
            except Exception:
                log.warning("janitor step failed", exc_info=True)
