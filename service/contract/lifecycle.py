"""A job's life: the one writer of job records. Every change of a record is a named transition of EDGES, made by
`_transact`, which alone watches the job's keys, checks the edge and the run token, writes, and applies what
leaving a state means (lease and running set, new RQ job, terminal effects) in the same Redis transaction.

Why a token per run and not the worker's name: a worker that was only frozen (a long GC or swap pause, SIGSTOP,
a network partition) can come back after its job was requeued and started elsewhere. Every write of a run is
checked against its token first, before anything else about the record: a stale run learns NOT_OWNER, never
"cancelled", so it neither moves the job nor touches what another run stored. Terminal states are final, so a
job completes, and sends its terminal webhook, at most once. Each run writes its files under a prefix of its own
(Run.assets), and deletes only that.

The transitions and who takes them:
  create     (none) -> queued          the gateway, with the record, the owner's index, the RQ job and the
                                       Idempotency-Key (service/contract/idempotency.py)
  start      queued -> in_progress     a worker, for the video's current RQ job only: returns a Run
  progress   in_progress -> in_progress  the run, at each step; says whether to go on
  complete   in_progress -> completed  the run, once every file is stored
  fail       in_progress -> failed     the run, on its own error
  requeue    in_progress -> queued     the run at shutdown (not an attempt), or the janitor once its lease lapsed
  redeliver  queued -> queued          the janitor, for an RQ job a worker took but never started
  give_up    queued|in_progress -> failed (worker_lost)  the janitor, after max_attempts lost runs
  cancel     queued|in_progress -> failed (cancelled)    the gateway
  expire     queued -> failed (deadline_exceeded)       a worker's start, or the janitor's sweep of k5:deadlines,
                                                        once the request's deadline passed (on Redis's clock)

A queued job with a deadline is in k5:deadlines: every write that moves a job into or out of `queued` keeps that
set in step, in the same transaction, so the janitor's sweep reads only jobs that are still waiting.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable
from typing import Any

import redis

from service.contract import deadlines, keys, lineup, usage, webhooks
from service.contract.clock import redis_clock
from service.contract.creation import Created, Creation, QueueFull
from service.contract.idempotency import IdempotencyKey, bound_video_id
from service.contract.jobs import JobStore, current_rq_id, new_rq_id
from service.contract.ratelimit import Charge
from service.contract.record import JobRecord
from service.contract.run import Run
from service.contract.schemas import TERMINAL, VideoError
from service.contract.transitions import EDGES, Move, Outcome, Snapshot, advanced

log = logging.getLogger(__name__)

__all__ = ["EDGES", "Created", "Lifecycle", "Move", "Outcome", "QueueFull", "Run", "Snapshot"]


# Re-arm the lease only while this run still owns the job: a lease that lapsed during a pause comes back,
# but never over a job the janitor has already handed to another run.
_REFRESH = """
if redis.call('hget', KEYS[2], 'owner') == ARGV[1] then
  redis.call('set', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
"""

_RELEASE = """
if redis.call('hget', KEYS[1], 'owner') == ARGV[1] then
  redis.call('hdel', KEYS[1], 'owner')
  redis.call('del', KEYS[2])
  redis.call('srem', KEYS[3], ARGV[2])
end
"""


def publish_change(pipe: Any, rec: JobRecord, moved: bool = True) -> None:
    """Tell event streams the record changed, in the writer's MULTI: subscribers read it after it is written.
    moved: its status changed, which moves the queue positions of its model's queued jobs (progress does not)."""
    pipe.publish(keys.CHANGES, f"{rec.id} {rec.model}" if moved else rec.id)


def _expired(snap: Snapshot, now: float) -> Move | None:
    """queued -> failed (deadline_exceeded) when the job's deadline is past `now` (Redis's clock); else None."""
    assert snap.record is not None
    if not deadlines.passed(snap.record, now):
        return None
    return Move("expire", advanced(snap, "failed", error=deadlines.exceeded(snap.record, now)))


class Lifecycle:
    def __init__(self, store: JobStore) -> None:
        self.store, self.r, self.settings = store, store.r, store.settings
        self._refresh = self.r.register_script(_REFRESH)
        self._release = self.r.register_script(_RELEASE)
        self._creation = Creation(store)

    @property
    def lease_ms(self) -> int:
        # Three missed beats, as for a worker's online status.
        return int(3 * self.settings.heartbeat_s * 1000)

    def attempts(self, video_id: str) -> int:
        return int(self.r.hget(keys.attempt(video_id), "n") or 0)

    # -- the gateway's transitions ------------------------------------------------------------------------

    def create(
        self,
        rec: JobRecord,
        max_inflight: int | None = None,
        idem: IdempotencyKey | None = None,
        max_depth: int | None = None,
        charge: Charge | None = None,
    ) -> Created | None:
        """Store the record and enqueue its job in one atomic step (creation.py): both happen or neither.
        Returns the record, with what its live fields are read from (read in the same step).

        With `idem`, the key is bound to the video in the same step; when it already names a video that exists,
        nothing is created and that video's record is returned (a replay; Conflict for another request).
        With `max_inflight`, only while the owner has fewer videos queued or in progress, checked in the same
        step, so that concurrent requests cannot overshoot it together: None when it had as many. With
        `max_depth`, only while the model has fewer videos queued: QueueFull when it had as many. With `charge`,
        the request is counted against its key's rate first, unless it was (Throttled over the limit, and
        nothing is written).
        """
        return self._creation.create(rec, max_inflight, idem, max_depth, charge)

    def cancel(self, video_id: str) -> JobRecord | None:
        """Stop a job: off the queue if queued; a running one learns at its next step and stops.

        Safe to repeat. Returns the final record, or None if it was already final (or gone) before this call.
        """
        error = VideoError(code="cancelled", message="The job was cancelled.")
        outcome, rec = self._transact(
            video_id, lambda s: Move("cancel", advanced(s, "failed", error=error)), edge="cancel"
        )
        if outcome is not Outcome.DONE or rec is None:
            return None
        self._dequeue(rec)
        log.info("cancelled", extra={"video_id": video_id})
        return rec

    def expire(self, video_id: str, now: float) -> JobRecord | None:
        """queued -> failed (deadline_exceeded) once its deadline is past `now` (Redis's clock), off the queue
        like a cancelled job. Returns the final record, or None when nothing moved (started, final, gone, not yet
        due, or changed meanwhile: the janitor's next pass looks again)."""

        def plan(snap: Snapshot) -> Move | Outcome:
            return _expired(snap, now) or Outcome.REFUSED

        outcome, rec = self._transact(video_id, plan, edge="expire", retry=False)
        if outcome is not Outcome.DONE or rec is None:
            return None
        self._dequeue(rec)
        log.info("deadline exceeded before the job started", extra={"video_id": video_id})
        return rec

    def _dequeue(self, rec: JobRecord) -> None:
        # Its current RQ job: a requeued or redelivered video waits under a new id.
        queue = self.store.queue(rec.model)
        for rq_id in dict.fromkeys([rec.id, current_rq_id(self.r, rec.id)]):
            if queue.remove(rq_id):  # still waiting, so no worker holds it: its RQ job can go too
                self.r.delete(queue.job_class.key_for(rq_id))

    def remove(self, rec: JobRecord) -> None:
        """Forget a video (DELETE, after cancel and after its files were deleted), all in one transaction: its
        record, its place in the owner's index, its attempt hash, its webhook deliveries (the prompt and metadata
        are in their bodies; none is attempted again), and its Idempotency-Key while that still names it.

        A run of it may still be storing files (it stops at its next step, or when its upload ends, and deletes
        its own): the janitor sweeps the video's files once more after any run can have ended (job_timeout_s), in
        case that run's worker died in between."""
        vid, idem = rec.id, rec.idempotency_key
        hooks = keys.video_webhooks(vid)
        with self.r.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(hooks, *([idem] if idem else []))
                    deliveries = [keys.text(d) for d in pipe.smembers(hooks)]
                    bound = idem is not None and bound_video_id(pipe.get(idem)) == vid
                    pipe.multi()
                    pipe.delete(keys.video(vid), keys.attempt(vid), hooks)
                    pipe.zrem(keys.videos(rec.owner), vid)
                    pipe.zrem(keys.DEADLINES, vid)
                    lineup.drop(pipe, rec.model, vid)
                    if deliveries:
                        pipe.delete(*(keys.webhook(d) for d in deliveries))
                        pipe.zrem(keys.WEBHOOKS_DUE, *deliveries)
                    if bound and idem:
                        pipe.delete(idem)
                    pipe.zadd(keys.EXPIRY, {vid: time.time() + self.settings.job_timeout_s})
                    publish_change(pipe, rec)
                    pipe.execute()
                    return
                except redis.WatchError:
                    continue  # a delivery was queued or the key rebound meanwhile: look again

    # -- a worker's run ------------------------------------------------------------------------------------

    def start(self, video_id: str, worker: str, rq_id: str, **changes: Any) -> Run | None:
        """queued -> in_progress for one run, or None when the job is final, gone, already running (a duplicate
        RQ entry must not start a second run), or `rq_id` is not its current RQ job (an older one, requeued
        since, comes from a worker that was frozen or lost it and must not run it again). A job past its deadline
        (on Redis's clock) does not start: it fails deadline_exceeded, and None is returned too."""
        token = f"{worker}#{secrets.token_hex(4)}"

        def plan(snap: Snapshot) -> Move | Outcome:
            if rq_id != snap.rq:
                return Outcome.REFUSED
            assert snap.record is not None
            if snap.record.deadline_at is not None and (late := _expired(snap, redis_clock(self.r))) is not None:
                return late
            return Move("start", advanced(snap, "in_progress", worker=worker, **changes), token=token)

        outcome, rec = self._transact(video_id, plan, edge="start")
        if outcome is not Outcome.DONE or rec is None:
            return None
        if rec.status != "in_progress":
            log.info("deadline exceeded before the job started", extra={"video_id": video_id})
            return None
        return Run(self, rec, token, rq_id)

    def move_run(
        self, video_id: str, token: str, edge: str, changes: dict[str, Any]
    ) -> tuple[Outcome, JobRecord | None]:
        """A run's own move (progress, complete, fail), checked against its token: Run calls this."""

        def plan(snap: Snapshot) -> Move:
            update = dict(changes)
            if "progress" in update and snap.record is not None:  # progress only grows, in any order of writes
                update["progress"] = max(snap.record.progress, update["progress"])
            return Move(edge, advanced(snap, EDGES[edge].target, **update))

        return self._transact(video_id, plan, edge=edge, token=token)

    def refresh(self, video_id: str, token: str) -> bool:
        return bool(self._refresh(keys=[keys.lease(video_id), keys.attempt(video_id)], args=[token, self.lease_ms]))

    def release(self, video_id: str, token: str) -> None:
        """A run that is over lets go of its job: its owner mark, lease and running entry, if it still holds it."""
        self._release(keys=[keys.attempt(video_id), keys.lease(video_id), keys.RUNNING], args=[token, video_id])

    # -- the janitor's transitions (service/contract/recovery.py) ----------------------------------------------------

    def requeue(self, video_id: str, token: str | None = None) -> tuple[Outcome, str]:
        """in_progress -> queued with a new RQ job at the front, or give_up after max_attempts lost runs.

        With a token (a run stopping at shutdown): only its owner, and the run is not counted as an attempt.
        Without (the janitor): only once the lease has lapsed. Returns the outcome and "requeued", "failed" or
        "skipped".
        """

        seen: list[str] = []

        def plan(snap: Snapshot) -> Move | Outcome:
            seen[:] = [snap.rq]
            if token is None and snap.leased:
                return Outcome.REFUSED
            if token is None and snap.attempts >= self.settings.max_attempts:
                return self._give_up(snap)
            reset = {"progress": 0, "worker": None, "started_at": None}
            n = snap.attempts - 1 if token else snap.attempts
            return Move("requeue", advanced(snap, "queued", **reset), rq_id=new_rq_id(video_id), attempts=n)

        outcome, rec = self._transact(video_id, plan, edge="requeue", token=token)
        if outcome is not Outcome.DONE or rec is None:
            if token is None and outcome in (Outcome.FINAL, Outcome.GONE):
                self._unwatch(video_id)  # nothing runs it any more: stop looking at it
            return outcome, "skipped"
        what = "failed" if rec.status == "failed" else "requeued"
        if token is None and seen:
            self.store.forget_rq_job(rec.model, seen[0])
        log.warning(f"job {what}", extra={"video_id": video_id, "graceful": token is not None})
        return outcome, what

    def redeliver(self, video_id: str, rq_id: str) -> str:
        """queued -> queued under a new RQ job, for `rq_id` that a worker took but never started; the lost
        delivery counts as an attempt, so a job that never gets to start ends worker_lost instead of cycling.
        Returns "redelivered", "failed" or "skipped"."""

        def plan(snap: Snapshot) -> Move | Outcome:
            if snap.rq != rq_id:
                return Outcome.REFUSED
            if snap.attempts + 1 >= self.settings.max_attempts:
                move = self._give_up(snap, snap.attempts + 1)
                move.attempts = snap.attempts + 1
                return move
            return Move("redeliver", advanced(snap, "queued"), rq_id=new_rq_id(video_id), attempts=snap.attempts + 1)

        outcome, rec = self._transact(video_id, plan, edge="redeliver", retry=False)
        if outcome is not Outcome.DONE or rec is None:
            return "skipped"
        what = "failed" if rec.status == "failed" else "redelivered"
        log.warning(f"job {what}: a worker took it but never started it", extra={"video_id": video_id})
        return what

    def _give_up(self, snap: Snapshot, n: int | None = None) -> Move:
        n = snap.attempts if n is None else n
        error = VideoError(code="worker_lost", message=f"The worker running this job was lost {n} times; giving up.")
        return Move("give_up", advanced(snap, "failed", error=error))

    def _unwatch(self, video_id: str) -> None:
        with self.r.pipeline() as pipe:
            pipe.srem(keys.RUNNING, video_id)
            pipe.delete(keys.lease(video_id))
            pipe.execute()

    # -- the one transaction -------------------------------------------------------------------------------

    def _transact(
        self,
        video_id: str,
        plan: Callable[[Snapshot], Move | Outcome],
        *,
        edge: str,
        token: str | None = None,
        retry: bool = True,
    ) -> tuple[Outcome, JobRecord | None]:
        """Watch the job's keys, check the run token (first: a stale run is NOT_OWNER, whatever the record
        says), the record and the edge's source state, let `plan` decide, then write the move and its effects.
        `retry=False` gives up on a concurrent change (the janitor looks again on its next pass)."""
        vkey, akey, lkey = keys.video(video_id), keys.attempt(video_id), keys.lease(video_id)
        with self.r.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(vkey, akey, lkey)
                    snap = self._read(pipe, video_id)
                    if token is not None and snap.owner != token:
                        # Nothing left of the job at all (DELETE removes its attempt hash too): gone, not taken.
                        gone = snap.record is None and not snap.owner
                        return (Outcome.GONE if gone else Outcome.NOT_OWNER), snap.record
                    if snap.record is None:
                        return Outcome.GONE, None
                    if snap.record.status not in EDGES[edge].sources:
                        terminal = snap.record.status in TERMINAL
                        return (Outcome.FINAL if terminal else Outcome.REFUSED), snap.record
                    move = plan(snap)
                    if isinstance(move, Outcome):
                        return move, snap.record
                    self._check(snap.record, move)
                    pipe.multi()
                    self._write(pipe, snap, move)
                    pipe.execute()
                    if move.record.status in TERMINAL:
                        usage.observe(move.record, self.settings)
                    return Outcome.DONE, move.record
                except redis.WatchError:
                    if not retry:
                        return Outcome.REFUSED, None

    @staticmethod
    def _read(pipe: Any, video_id: str) -> Snapshot:
        raw = pipe.get(keys.video(video_id))
        attempt = {k.decode(): v.decode() for k, v in pipe.hgetall(keys.attempt(video_id)).items()}
        return Snapshot(
            record=JobRecord.model_validate_json(raw) if raw else None,
            owner=attempt.get("owner", ""),
            rq=attempt.get("rq") or video_id,
            attempts=int(attempt.get("n", 0)),
            leased=bool(pipe.exists(keys.lease(video_id))),
        )

    @staticmethod
    def _check(old: JobRecord, move: Move) -> None:
        edge = EDGES[move.edge]
        if old.status not in edge.sources or move.record.status != edge.target:
            raise ValueError(f"{old.id}: {old.status} -> {move.record.status} is not the edge {move.edge}")

    def _write(self, pipe: Any, snap: Snapshot, move: Move) -> None:
        rec, video_id = move.record, move.record.id
        akey, lkey = keys.attempt(video_id), keys.lease(video_id)
        pipe.set(keys.video(video_id), rec.model_dump_json(exclude_none=True), keepttl=True)
        moved = snap.record is None or snap.record.status != rec.status
        publish_change(pipe, rec, moved=moved)
        if move.attempts is not None:
            pipe.hset(akey, "n", move.attempts)
        if move.token is not None:  # a run starts: it owns the job and holds its lease
            pipe.hincrby(akey, "n", 1)
            pipe.hset(akey, mapping={"owner": move.token, "rq": snap.rq})
            pipe.set(lkey, move.token, px=self.lease_ms)
            pipe.sadd(keys.RUNNING, video_id)
        if move.rq_id is not None:  # a new RQ job: the old one, should it still run, may not start it
            pipe.hset(akey, "rq", move.rq_id)
            pipe.hdel(akey, "owner")
            pipe.expire(akey, self.store.record_ttl_s)
            self.store.enqueue(
                pipe, rec.model, video_id, move.rq_id, description=f"video {video_id} ({move.edge})", at_front=True
            )
        if snap.record is not None and snap.record.status == "queued" and rec.status != "queued":
            lineup.drop(pipe, rec.model, video_id)  # started, cancelled or given up: no longer in line
        if snap.record is not None and snap.record.status == "in_progress" and rec.status != "in_progress":
            pipe.delete(lkey)
            pipe.srem(keys.RUNNING, video_id)
        if rec.deadline_at is not None and moved:  # k5:deadlines holds exactly the queued jobs with a deadline
            if rec.status == "queued":
                pipe.zadd(keys.DEADLINES, {video_id: rec.deadline_at})
            else:
                pipe.zrem(keys.DEADLINES, video_id)
        if rec.status in TERMINAL:
            self._terminal_effects(pipe, rec)

    def _terminal_effects(self, pipe: Any, rec: JobRecord) -> None:
        """Everything a job's end writes, with the record: the webhook event (exactly once, never lost), the
        TTLs, the owner's in-flight count and usage totals, the expiry of its stored files. The attempt hash keeps
        its owner: a run that held the job learns FINAL (it was cancelled), any other run NOT_OWNER."""
        ttl = self.store.record_ttl_s
        pipe.expire(keys.video(rec.id), ttl)
        pipe.expire(keys.attempt(rec.id), ttl)
        pipe.expire(keys.videos(rec.owner), ttl)  # the owner's index outlives each of its records
        pipe.srem(keys.inflight(rec.owner), rec.id)
        pipe.lrem(keys.demand(rec.model), 1, rec.id)
        usage.count(pipe, rec, self.settings)
        # Registered with the end itself, so no stored file can escape the sweep: a completed video's at its
        # expires_at; a failed one's (an image-to-video input, what a lost run left) at once, as nothing reads them.
        if rec.status == "completed" and rec.expires_at is not None:
            pipe.zadd(keys.EXPIRY, {rec.id: rec.expires_at})
        elif rec.status == "failed":
            pipe.zadd(keys.EXPIRY, {rec.id: int(time.time())})
        urls = [u for u in (rec.webhook_url, self.settings.webhook_url) if u]
        if urls and self.settings.webhook_secret:
            event_ttl = int(self.settings.webhook_retry_window_s) + 7 * 86400
            webhooks.queue_event(pipe, rec.public().model_dump(mode="json"), urls, time.time(), event_ttl)
