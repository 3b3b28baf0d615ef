"""The create transition as one Redis script: the checks (Idempotency-Key, the key's jobs in flight, the model's
queue depth) and every write (record, owner's index, in-flight set, RQ's job and push, the place in line) run as
one atomic step, in one round trip.

Why not WATCH/MULTI: a POST then cost a WATCH, a read, and the MULTI, and under concurrency every other create or
end of the same key's jobs made it retry (26-40 commands a POST at 16-64 concurrent clients instead of 23). A
script cannot be interleaved, so it never retries and its checks hold exactly.

RQ's part is still RQ's own code: its enqueue writes to a CommandRecorder instead of a pipeline, and the script
runs the recorded commands as they are, so whatever RQ writes for a job is what gets written.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from redis.commands.core import CoreCommands

from service.contract import keys, lineup, ratelimit

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
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
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


class Creation:
    """Lifecycle.create's script: `run` gives the script's reply, its words as text."""

    def __init__(self, r: Any) -> None:
        self._script = r.register_script(_CREATE)

    def run(
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
