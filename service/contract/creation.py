"""The create transition (Lifecycle.create hands it here) as one Redis script: the checks (the request's rate,
the Idempotency-Key, the key's jobs in flight, the model's queue depth) and every write (record, owner's index,
in-flight set, RQ's job and push, the place in line) run as one atomic step, in one round trip, which also reads
what the answer's live fields need.

Why not WATCH/MULTI: a POST then cost a WATCH, a read, and the MULTI, and under concurrency every other create or
end of the same key's jobs made it retry (26-40 commands a POST at 16-64 concurrent clients instead of 23). A
script cannot be interleaved, so it never retries and its checks hold exactly.

RQ's part is still RQ's own code: its enqueue writes to a CommandRecorder instead of a pipeline, and the script
runs the recorded commands as they are, so whatever RQ writes for a job is what gets written.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from redis.commands.core import CoreCommands

from service.contract import keys, lineup, ratelimit
from service.contract.clock import NOW_LUA
from service.contract.idempotency import IDEMPOTENCY_TTL_S, IdempotencyKey
from service.contract.jobs import JobStore, Live
from service.contract.ratelimit import Charge
from service.contract.record import JobRecord

log = logging.getLogger(__name__)

# KEYS: the owner's in-flight set, the Idempotency-Key (or any key when there is none), the model's line, the
# place counter, RQ's list of the model, the owner's index, the request's rate window, the model's timing and its
# workers' beats. ARGV: max in flight (0: none), max queue depth (0: none), whether there is an Idempotency-Key,
# the binding the key may hold to be taken over ('' for none), the video id, the lane's base score, 1 for the
# interactive lane, the batch lane's base score, the index prune's cutoff (an exclusive lex bound), batch size,
# record key prefix and index TTL, the rate limit (0: counted already), how long a worker's beat counts as online,
# then each command as its argument count and its arguments (RQ's push excluded: the script pushes, where the
# lane says).
# Replies: {'ok', rank, timing hash as a flat list, workers online} (what the video object's live fields need,
# so that the answer costs no second round trip), {'held', binding}, {'inflight'}, {'depth'}, {'rate', count}.
_CREATE = (
    ratelimit.count_lua("KEYS[7]", "ARGV[13]")
    + NOW_LUA
    + """
local max_inflight, max_depth = tonumber(ARGV[1]), tonumber(ARGV[2])
if ARGV[3] == '1' then
  local held = redis.call('get', KEYS[2])
  if held and held ~= ARGV[4] then return {'held', held} end
end
if max_inflight > 0 and redis.call('scard', KEYS[1]) >= max_inflight then return {'inflight'} end
if max_depth > 0 and redis.call('zcard', KEYS[3]) >= max_depth then return {'depth'} end
local i = 15
while i <= #ARGV do
  local n = tonumber(ARGV[i])
  redis.call(unpack(ARGV, i + 1, i + n))
  i = i + n + 1
end
local id, base = ARGV[5], tonumber(ARGV[6])
if ARGV[7] == '1' then
  -- Before the first batch video (its RQ job has its id: only a requeue gives a new one, at the front).
  local first = redis.call('zrangebyscore', KEYS[3], ARGV[8], '+inf', 'LIMIT', 0, 1)[1]
  if not first then
    redis.call('rpush', KEYS[5], id)
  elseif redis.call('linsert', KEYS[5], 'BEFORE', first, id) == -1 then
    redis.call('lpush', KEYS[5], id)  -- a worker has taken it, so everything that was ahead of it too
  end
else
  redis.call('rpush', KEYS[5], id)
end
redis.call('zadd', KEYS[3], base + redis.call('incr', KEYS[4]), id)
-- The owner's index: forget the oldest ids whose records are gone, and live as long as its newest record.
local old = redis.call('zrangebylex', KEYS[6], '-', ARGV[9], 'LIMIT', 0, tonumber(ARGV[10]))
for _, gone in ipairs(old) do
  if redis.call('exists', ARGV[11] .. gone) == 0 then redis.call('zrem', KEYS[6], gone) end
end
redis.call('expire', KEYS[6], ARGV[12])
local workers = redis.call('zcount', KEYS[9], now - tonumber(ARGV[14]), '+inf')
return {'ok', redis.call('zrank', KEYS[3], id), redis.call('hgetall', KEYS[8]), workers}
"""
)


@dataclass(frozen=True)
class IndexPrune:
    """The owner's index (keys.videos) and how a creation keeps it bounded (Lifecycle._index_prune)."""

    index: str
    cutoff: str
    batch: int
    record_prefix: str
    ttl_s: int


# Queued with each creation, so the owner's index stays bounded without a reader: drops the ids, among the
# owner's oldest (created before ARGV[1]: longer ago than a finished record lives), whose records are gone, a batch
# at a time, and re-arms the index's own TTL. Ids sort by creation time (jobs.new_video_id), so the cut is a lex range.
# Ids the prune looks at per creation: more than one, so it catches up with what creations left behind.
PRUNE_BATCH = 20


class QueueFull(Exception):
    """The model's queue already holds max_depth videos."""

    def __init__(self, model: str) -> None:
        super().__init__(model)
        self.model = model


class CommandRecorder(CoreCommands):
    """Stands where RQ expects a pipeline in MULTI mode, and keeps the commands it is given, unsent."""

    explicit_transaction = True  # RQ checks that the caller's pipeline is in a transaction
    _event_dispatcher: Any = None  # CoreCommands declares it; nothing is sent, so nothing dispatches events

    def __init__(self) -> None:
        self.commands: list[tuple[Any, ...]] = []

    def execute_command(self, *args: Any, **options: Any) -> CommandRecorder:
        self.commands.append(args)
        return self

    def multi(self) -> None:
        pass


@dataclass(frozen=True)
class Created:
    """What Lifecycle.create made: the record, and what its video object's live fields are read from; `live` is
    None for the earlier video an Idempotency-Key named (nothing was created: a replay)."""

    record: JobRecord
    live: Live | None


class Creation:
    """Lifecycle.create: the record, its writes as the script's commands, and the script's reply."""

    def __init__(self, store: JobStore) -> None:
        self.store = store
        self._script = store.r.register_script(_CREATE)

    def create(
        self,
        rec: JobRecord,
        max_inflight: int | None,
        idem: IdempotencyKey | None,
        max_depth: int | None,
        charge: Charge | None,
    ) -> Created | None:
        """What Lifecycle.create says it does."""
        inflight = keys.inflight(rec.owner)
        if idem is not None:
            rec.idempotency_key = idem.redis_key  # so that DELETE can unbind it
        writes: Any = CommandRecorder()  # typed loosely: redis-py types its commands for a client
        writes.set(keys.video(rec.id), rec.model_dump_json(exclude_none=True))
        writes.zadd(keys.videos(rec.owner), {rec.id: 0})
        writes.sadd(inflight, rec.id)
        if idem is not None:
            writes.set(idem.redis_key, idem.binding(rec.id), ex=IDEMPOTENCY_TTL_S)
        if rec.deadline_at is not None:
            writes.zadd(keys.DEADLINES, {rec.id: rec.deadline_at})
        writes.rpush(keys.demand(rec.model), rec.id)
        self.store.enqueue(writes, rec.model, rec.id, rec.id, description=f"video {rec.id}", place=False)
        takeover = ""
        while True:
            reply = self._run(
                inflight_key=inflight,
                idem_key=idem.redis_key if idem else None,
                model=rec.model,
                video_id=rec.id,
                commands=writes.commands,
                max_inflight=max_inflight,
                max_depth=max_depth,
                lane=rec.priority or "batch",
                takeover=takeover,
                prune=self._index_prune(rec.owner),
                rate=ratelimit.window_of(charge),
                offline_after_s=self.store.offline_after_s,
            )
            ratelimit.check(charge, reply)
            if reply[0] == "ok":
                break
            if reply[0] == "inflight":
                return None
            if reply[0] == "depth":
                raise QueueFull(rec.model)
            assert idem is not None  # "held": the key names a video already
            held = keys.text(reply[1])
            raw = self.store.r.get(keys.video(idem.held_video(held)))
            if raw is not None:
                return Created(JobRecord.model_validate_json(raw), None)
            takeover = held  # its video is gone: this request takes the key over, unless another did
        log.info("queued", extra={"video_id": rec.id, "model": rec.model})
        _, rank, timing, workers = reply
        return Created(rec, Live.of(int(rank), timing, int(workers)))

    def _index_prune(self, owner: str) -> IndexPrune:
        """What the create script does to the owner's index besides adding the video: forget up to PRUNE_BATCH
        of its oldest ids whose records are gone (ids sort by creation time, so only those older than a record
        lives), and keep the index alive as long as its newest record."""
        ttl = self.store.record_ttl_s
        cutoff = f"(video_{int((time.time() - ttl) * 1e9):016x}"
        return IndexPrune(keys.videos(owner), cutoff, PRUNE_BATCH, keys.video(""), ttl)

    def _run(
        self,
        *,
        inflight_key: str,
        idem_key: str | None,
        model: str,
        video_id: str,
        commands: list[tuple[Any, ...]],
        max_inflight: int | None,
        max_depth: int | None,
        lane: str = "batch",
        takeover: str = "",
        prune: IndexPrune,
        rate: tuple[str, int],
        offline_after_s: float,
    ) -> list[Any]:
        """`commands`: what RQ's enqueue recorded, its push of the job onto `model`'s list last (taken off: the
        script pushes where `lane` says). `rate`: the request's window and limit (Charge.take; limit 0 when it
        was counted already)."""
        *writes, push = commands
        queue_key = push[1]
        if push[0] != "RPUSH" or keys.text(push[2]) != video_id:
            raise ValueError(f"RQ's enqueue no longer ends with its push: {push[:2]}")
        rate_key, rate_limit = rate
        argv: list[Any] = [max_inflight or 0, max_depth or 0, int(idem_key is not None), takeover, video_id]
        argv += [lineup.BANDS[lane], int(lane == "interactive"), lineup.BANDS["batch"]]
        argv += [prune.cutoff, prune.batch, prune.record_prefix, prune.ttl_s, rate_limit, offline_after_s]
        for command in writes:
            argv += [len(command), *command]
        keys_ = [inflight_key, idem_key or inflight_key, keys.queued(model), keys.QUEUE_SEQ, queue_key, prune.index]
        keys_ += [rate_key, keys.timing(model), keys.workers(model)]
        reply = self._script(keys=keys_, args=argv)
        return [keys.text(reply[0]), *reply[1:]]
