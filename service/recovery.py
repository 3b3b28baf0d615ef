"""Job leases: which run owns a job, how often it started, and what happens when its worker vanishes.

Redis keys:
  k5:lease:<id>      the owner token of the run in progress, with a short TTL that the worker's heartbeat
                     thread refreshes; an expired lease means the worker is gone (SIGKILL, node loss, OOM killer)
  k5:attempt:<id>    hash: n (deliveries a worker took: runs started, and deliveries lost before their run
                     started), owner (token of the current run), rq (the video's current RQ job id)
  k5:running         set of video ids with a run in progress: all the reaper has to look at
  k5:expiry          sorted set video id -> expires_at of its stored assets
  k5:lock:janitor    one janitor pass at a time across all the processes that run it (gateways and workers)
  k5:limbo:<rq id>   when the janitor first saw an RQ job taken off its queue but not started

Why a token per run and not the worker's name: a worker that was only frozen (a long GC or swap pause, SIGSTOP,
a network partition) can come back after its job was requeued and started elsewhere. Every write a run makes
is checked against its token in the same transaction, so a stale run can neither move nor complete a job it no
longer owns; and terminal states are final, so a job completes, and sends its completion webhook, at most once.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from typing import Any

import redis
from rq.job import Job

from service.jobs import JobRecord, JobStore, attempt_key, current_rq_id, new_rq_id, video_id_of, video_key
from service.schemas import VideoError
from service.storage import Storage

log = logging.getLogger(__name__)

RUNNING = "k5:running"
EXPIRY = "k5:expiry"
JANITOR_LOCK = "k5:lock:janitor"

# Re-arm the lease only while this run still owns the job: a lease that lapsed during a pause comes back,
# but never over a job the reaper has already handed to another run.
_REFRESH = """
if redis.call('hget', KEYS[2], 'owner') == ARGV[1] then
  redis.call('set', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
"""


class Janitor(threading.Thread):
    """The janitor pass on a timer, for a process that is always up: the gateway. Workers run it from their
    heartbeat too, but a pool scaled to zero, or one whose every worker died, runs nothing: a job whose worker
    was lost would stay in_progress, out of the queue that the autoscaler watches, and no worker would ever
    start for it."""

    def __init__(self, store: JobStore, storage: Storage, holder: str) -> None:
        super().__init__(name="k5-janitor", daemon=True)
        self.leases, self.storage, self.holder = Leases(store), storage, holder
        self.interval = store.settings.heartbeat_s
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(self.interval):
            try:
                self.leases.janitor(self.storage, self.holder)
            except Exception:  # Redis or storage away for a while: the next pass tries again
                log.warning("janitor pass failed", exc_info=True)

    def stop(self) -> None:
        self.stopped.set()
        self.join(timeout=5)


class NotOwner(Exception):
    """This run no longer owns its job: the job was requeued (its lease lapsed) and may run elsewhere now."""


def lease_key(video_id: str) -> str:
    return f"k5:lease:{video_id}"


def limbo_key(rq_id: str) -> str:
    return f"k5:limbo:{rq_id}"


class Leases:
    def __init__(self, store: JobStore) -> None:
        self.store, self.r, self.settings = store, store.r, store.settings
        self._refresh = self.r.register_script(_REFRESH)

    @property
    def lease_ms(self) -> int:
        # Three missed beats, as for a worker's online status.
        return int(3 * self.settings.heartbeat_s * 1000)

    def attempts(self, video_id: str) -> int:
        return int(self.r.hget(attempt_key(video_id), "n") or 0)

    def start(self, video_id: str, worker: str, rq_job_id: str, **changes: Any) -> tuple[JobRecord, str] | None:
        """queued -> in_progress for one run; returns the record and the run's owner token, or None when the
        job is final, gone, or already running (a duplicate RQ entry must not start a second run)."""
        token = f"{worker}#{secrets.token_hex(4)}"
        key, akey = video_key(video_id), attempt_key(video_id)
        with self.r.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(key, akey)
                    raw = pipe.get(key)
                    if raw is None:
                        return None
                    rec = JobRecord.model_validate_json(raw)
                    if rec.status != "queued":
                        return None
                    # Only the video's current RQ job may start it: an older one (requeued since, by the reaper or
                    # by redeliver) comes from a worker that was frozen or lost it and must not run it again.
                    if rq_job_id != current_rq_id(pipe, video_id):
                        return None
                    new = rec.model_copy(update={**changes, "status": "in_progress", "worker": worker})
                    pipe.multi()
                    pipe.set(key, new.model_dump_json(), keepttl=True)
                    pipe.hincrby(akey, "n", 1)
                    pipe.hset(akey, mapping={"owner": token, "rq": rq_job_id})
                    pipe.set(lease_key(video_id), token, px=self.lease_ms)
                    pipe.sadd(RUNNING, video_id)
                    pipe.execute()
                    return new, token
                except redis.WatchError:
                    continue

    def refresh(self, video_id: str, token: str) -> bool:
        return bool(self._refresh(keys=[lease_key(video_id), attempt_key(video_id)], args=[token, self.lease_ms]))

    def update(self, video_id: str, token: str, status: str | None = None, **changes: Any) -> JobRecord | None:
        """JobStore.update for a run: the same guarded transition, plus the owner check in the same transaction.

        Returns None when the record is gone or final (cancelled, deleted); raises NotOwner when another run
        owns the job now.
        """
        akey = attempt_key(video_id)

        def owned(pipe: Any) -> None:
            if (pipe.hget(akey, "owner") or b"").decode() != token:
                raise NotOwner(video_id)

        def settle(pipe: Any, new: JobRecord) -> None:
            self._settle(pipe, new, effects=False)
            if new.status == "completed" and new.expires_at is not None:
                # Registered with the completion itself: no stored video can escape the sweep.
                pipe.zadd(EXPIRY, {video_id: new.expires_at})

        return self.store.update(video_id, status, watch=(akey,), guard=owned, on_terminal=settle, **changes)

    def finish(self, video_id: str, token: str) -> None:
        """A run that settled its job (final, requeued or cancelled) lets go of it."""
        akey = attempt_key(video_id)
        with self.r.pipeline() as pipe:
            try:
                pipe.watch(akey)
                owned = (pipe.hget(akey, "owner") or b"").decode() == token
                pipe.multi()
                if owned:
                    pipe.hdel(akey, "owner")
                    pipe.delete(lease_key(video_id))
                    pipe.srem(RUNNING, video_id)
                pipe.execute()
            except redis.WatchError:
                pass  # someone else moved the job meanwhile: it is theirs to settle

    def drop_lease(self, video_id: str, token: str) -> None:
        """Give the job up at once (a worker that is about to exit): the reaper takes it on its next pass."""
        if (self.r.hget(attempt_key(video_id), "owner") or b"").decode() == token:
            self.r.delete(lease_key(video_id))

    def requeue(self, video_id: str, token: str | None = None) -> str:
        """Put an in_progress job back on its queue, or fail it with worker_lost after max_attempts runs.

        in_progress -> queued is the one backward move and deliberately not in jobs._NEXT: JobStore.update must
        keep refusing it, and only this method takes it, with the lease/owner check and a new RQ job.

        With a token (a worker stopping at a step boundary on shutdown): only the owner may, and the run does
        not count as an attempt. Without one (the reaper): only when the lease has lapsed.
        Returns "requeued", "failed", or "skipped" (alive, not owned, or nothing to do).
        """
        key, akey, lkey = video_key(video_id), attempt_key(video_id), lease_key(video_id)
        with self.r.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(key, akey, lkey)
                    raw = pipe.get(key)
                    rec = JobRecord.model_validate_json(raw) if raw else None
                    owner = (pipe.hget(akey, "owner") or b"").decode()
                    if rec is None or rec.status != "in_progress":
                        # Final, gone, or already back in the queue: nothing runs it; stop watching it.
                        if token is None or owner == token:
                            pipe.multi()
                            pipe.srem(RUNNING, video_id)
                            pipe.delete(lkey)
                            pipe.hdel(akey, "owner")
                            pipe.execute()
                        return "skipped"
                    if token is not None and owner != token:
                        return "skipped"
                    if token is None and pipe.exists(lkey):
                        return "skipped"
                    n = int(pipe.hget(akey, "n") or 0)
                    old_rq = (pipe.hget(akey, "rq") or b"").decode()
                    if token is None and n >= self.settings.max_attempts:
                        pipe.multi()
                        self._give_up(pipe, rec, n)
                        pipe.execute()
                        outcome = "failed"
                    else:
                        new = rec.model_copy(
                            update={"status": "queued", "progress": 0, "worker": None, "started_at": None}
                        )
                        # A new RQ job id: the old RQ job may still be finishing (the shutdown case) or be
                        # settled later by a stale worker, and neither must touch the new one.
                        rq_id = new_rq_id(video_id)
                        pipe.multi()
                        pipe.set(key, new.model_dump_json(), keepttl=True)
                        pipe.hset(akey, mapping={"n": n - 1 if token else n, "rq": rq_id})
                        pipe.hdel(akey, "owner")
                        pipe.delete(lkey)
                        pipe.srem(RUNNING, video_id)
                        # It waited its turn once already: to the front.
                        self.store.enqueue(
                            pipe, rec.model, video_id, rq_id, description=f"video {video_id} (requeued)", at_front=True
                        )
                        pipe.execute()
                        outcome = "requeued"
                    break
                except redis.WatchError:
                    continue
        if token is None and old_rq:
            self._forget_rq_job(rec.model, old_rq)
        log.warning(f"job {outcome}", extra={"video_id": video_id, "attempts": n, "graceful": token is not None})
        return outcome

    def reap(self) -> dict[str, int]:
        """Requeue (or fail) every running job whose lease lapsed."""
        counts: dict[str, int] = {}
        for raw in self.r.smembers(RUNNING):
            video_id = raw.decode()
            if self.r.exists(lease_key(video_id)):
                continue
            outcome = self.requeue(video_id)
            counts[outcome] = counts.get(outcome, 0) + 1
        return counts

    def redeliver(self, now: float | None = None) -> int:
        """Requeue the queued jobs whose RQ job a worker took off the queue but never started.

        A worker killed in the moment between RQ's dequeue and the run's lease (SIGKILL, the OOM killer, a lost
        node) leaves the record `queued` and its RQ job in the queue's intermediate list or started registry,
        or, once RQ's own maintenance has filed it as abandoned, in the failed registry: nothing would ever run
        it, and with scale-to-zero no worker would even start for it. A live worker starts its job within
        milliseconds of taking it, so one still unstarted after a lease period was lost; a frozen worker that
        comes back later is refused by `start`, which only runs the video's current RQ job.
        """
        now = time.time() if now is None else now
        grace = self.lease_ms / 1000
        moved = 0
        for model in self.store.queue_models():
            queue = self.store.queue(model)
            taken = queue.intermediate_queue.get_job_ids()
            started = queue.started_job_registry.get_job_ids(cleanup=False)
            failed = queue.failed_job_registry.get_job_ids(cleanup=False)
            for rq_id in dict.fromkeys([*taken, *started, *failed]):
                try:
                    moved += self._check_delivery(queue, rq_id, rq_id in failed, now, grace)
                except Exception:  # one bad entry must not stop the pass (nor the expiry sweep after it)
                    log.warning("could not check RQ job %s", rq_id, exc_info=True)
        return moved

    def _check_delivery(self, queue: Any, rq_id: str, failed: bool, now: float, grace: float) -> bool:
        video_id = video_id_of(rq_id)
        rec = self.store.get(video_id)
        if rec is None or rec.status != "queued" or current_rq_id(self.r, video_id) != rq_id:
            return False  # started, final, gone, or an older RQ job of a requeued video
        if not failed:
            job = queue.fetch_job(rq_id)
            if job is not None and job.started_at is not None:
                since = job.started_at.timestamp()
            else:  # taken but not started: RQ keeps no time for that, so note when it was first seen
                limbo = limbo_key(rq_id)
                self.r.set(limbo, now, nx=True, ex=86400)
                since = float(self.r.get(limbo) or now)
            if now - since < grace:
                return False
        return self._redeliver(video_id, rq_id)

    def _redeliver(self, video_id: str, rq_id: str) -> bool:
        """The lost delivery counts as an attempt: a job that never gets to start (a worker that dies on taking
        it, an error in RQ before the run) ends worker_lost after max_attempts instead of cycling forever."""
        key, akey = video_key(video_id), attempt_key(video_id)
        with self.r.pipeline() as pipe:
            try:
                pipe.watch(key, akey)
                raw = pipe.get(key)
                rec = JobRecord.model_validate_json(raw) if raw else None
                if rec is None or rec.status != "queued" or current_rq_id(pipe, video_id) != rq_id:
                    return False
                n = int(pipe.hget(akey, "n") or 0) + 1
                pipe.multi()
                pipe.hset(akey, "n", n)
                if n >= self.settings.max_attempts:
                    self._give_up(pipe, rec, n)
                else:
                    new_id = new_rq_id(video_id)
                    pipe.hset(akey, "rq", new_id)
                    pipe.expire(akey, self.store.record_ttl_s)
                    self.store.enqueue(
                        pipe, rec.model, video_id, new_id, description=f"video {video_id} (redelivered)", at_front=True
                    )
                pipe.execute()
            except redis.WatchError:
                return False  # it moved meanwhile (started, cancelled): the next pass looks again
        queue = self.store.queue(rec.model)
        queue.intermediate_queue.remove(rq_id)
        self._forget_rq_job(rec.model, rq_id)
        self.r.delete(limbo_key(rq_id))
        outcome = "failed" if n >= self.settings.max_attempts else "redelivered"
        log.warning(f"job {outcome}: a worker took it but never started it", extra={"video_id": video_id})
        return True

    def _give_up(self, pipe: Any, rec: JobRecord, n: int) -> None:
        """in_progress or queued -> failed with worker_lost, inside the caller's transaction (after multi)."""
        new = rec.model_copy(
            update={
                "status": "failed",
                "error": VideoError(
                    code="worker_lost", message=f"The worker running this job was lost {n} times; giving up."
                ),
            }
        )
        pipe.set(video_key(rec.id), new.model_dump_json(), keepttl=True)
        self._settle(pipe, new)

    def sweep_expired(self, storage: Storage, now: float | None = None, batch: int = 100) -> int:
        """Delete the stored assets of videos past their expires_at."""
        due = self.r.zrangebyscore(EXPIRY, "-inf", now or time.time(), start=0, num=batch)
        for raw in due:
            video_id = raw.decode()
            storage.delete_prefix(video_id)
            self.r.zrem(EXPIRY, video_id)
            log.info("assets expired", extra={"video_id": video_id})
        return len(due)

    def janitor(self, storage: Storage, holder: str) -> None:
        """One pass of the periodic cleanup, run by whichever process (a gateway or a worker) gets the lock first."""
        if not self.r.set(JANITOR_LOCK, holder, nx=True, px=max(200, int(self.settings.heartbeat_s * 900))):
            return
        # Each step on its own: one that fails (a bad record, storage away) must not stop the others.
        for step in (self.reap, self.redeliver, lambda: self.sweep_expired(storage)):
            try:
                step()
            except Exception:
                log.warning("janitor step failed", exc_info=True)

    def _settle(self, pipe: Any, new: JobRecord, effects: bool = True) -> None:
        """What every terminal transition of a run does, inside its transaction (JobStore.update already
        applies the record's TTL and the terminal effects when it is the caller: effects=False)."""
        ttl = self.store.record_ttl_s
        pipe.expire(attempt_key(new.id), ttl)
        pipe.hdel(attempt_key(new.id), "owner")
        pipe.delete(lease_key(new.id))
        pipe.srem(RUNNING, new.id)
        if effects:
            pipe.expire(video_key(new.id), ttl)
            self.store.terminal_effects(pipe, new)

    def _forget_rq_job(self, model: str, rq_id: str) -> None:
        """The dead run's RQ job: out of the started registry, so RQ's own abandoned-job cleanup does not
        file it as failed later (the job record, not RQ, says how the video ended)."""
        try:
            job = Job.fetch(rq_id, connection=self.r)
            self.store.queue(model).started_job_registry.remove_executions(job)
            job.delete(remove_from_queue=True)
        except Exception:  # noqa: BLE001 - housekeeping only; the job itself is already requeued
            log.debug("could not remove RQ job %s", rq_id, exc_info=True)
