"""Queue positions in O(log n): each model's queued videos in a sorted set, k5:queued:<model>, in the order its
workers will take them, so that a video's position is one ZRANK.

RQ's own list cannot answer that cheaply: LPOS walks it from the head, so a list page of 100 queued videos cost
100 walks of the whole queue. The index is written with the queue, never beside it:

- RQ pops its list from the head. A requeued or redelivered video is pushed at the front (LPUSH); a new video
  joins its lane: a batch one at the back (RPUSH), an interactive one before the first batch video in the list
  (LINSERT, which walks only the jobs ahead of the batch lane; creation.py). Each push takes the next number of
  one counter (k5:seq:queued): a push to the front scores its negative, a new video its lane's base (BANDS)
  plus the number. Ascending scores are then the list's order: front pushes latest first, then the interactive
  lane oldest first, then the batch lane oldest first; every worker of the model serves them in that order.
- The index entry is added by an EVAL in the same MULTI as RQ's push (the counter and the ZADD are one step, so
  two gateways' pushes are numbered in the order Redis ran them), and removed in the transaction that moves the
  video out of `queued` (start, cancel, give_up: Lifecycle._write) or deletes it.
- So ZRANK counts exactly the queued videos ahead, one that a worker has popped but not started yet included
  (it is still ahead); a stale RQ entry (an older job of a requeued video, refused at start) is not counted.

A video queued by a release without the index (during a rolling upgrade) has no entry; its position is then read
from RQ's list as before (`None` from `positions`, the caller's fallback).
"""

from __future__ import annotations

from typing import Any

from service.contract import keys

# KEYS: the model's index, the counter. ARGV: video id, 1 for a push to the front, the band's base score.
_ADD = """
local n = redis.call('incr', KEYS[2])
if ARGV[2] == '1' then n = -n end
redis.call('zadd', KEYS[1], tonumber(ARGV[3]) + n, ARGV[1])
"""
# KEYS: the model's index. ARGV: video ids. Their ranks (-1: not in the index), in one command for a whole page.
_RANKS = """
local out = {}
for i, id in ipairs(ARGV) do out[i] = redis.call('zrank', KEYS[1], id) or -1 end
return out
"""
# KEYS: the model's index. ARGV: how many entries to look at from the head of each band, the record key prefix,
# then each band's score range (min, max). Drops the entries whose video is not queued any more; returns how many.
_PRUNE = """
local dropped = 0
for band = 3, #ARGV, 2 do
  local ids = redis.call('zrangebyscore', KEYS[1], ARGV[band], ARGV[band + 1], 'LIMIT', 0, tonumber(ARGV[1]))
  for _, id in ipairs(ids) do
    local raw = redis.call('get', ARGV[2] .. id)
    if not raw or cjson.decode(raw).status ~= 'queued' then
      redis.call('zrem', KEYS[1], id)
      dropped = dropped + 1
    end
  end
end
return dropped
"""
# Where a lane's places start (front pushes are negative): scores stay exact integers in a double below 2**53.
BANDS = {"interactive": 2**50, "batch": 2**51}


def add(pipe: Any, model: str, video_id: str, *, front: bool) -> None:
    """Give `video_id` its place in its model's line, in the caller's MULTI, beside RQ's push."""
    pipe.eval(_ADD, 2, keys.queued(model), keys.QUEUE_SEQ, video_id, int(front), 0 if front else BANDS["batch"])


def drop(pipe: Any, model: str, video_id: str) -> None:
    """The video left `queued`: it is no longer in line (in the caller's transaction)."""
    pipe.zrem(keys.queued(model), video_id)


def positions(pipe: Any, model: str, video_ids: list[str]) -> None:
    """Queue the ranks of `video_ids` in `model`'s line on `pipe`: its reply is one list, -1 for a video that is
    not in the index (queued by a release without it)."""
    # EVAL, with its text: a registered script in a pipeline costs a SCRIPT EXISTS round trip of its own.
    pipe.eval(_RANKS, 1, keys.queued(model), *video_ids)


def prune(r: Any, model: str, head: int = 50) -> int:
    """Drop the entries at the head of `model`'s line whose video is not queued any more (the janitor, once a
    pass). Nothing this release does leaves one: a worker of the release before the line starts jobs without
    removing them, and they would count as jobs ahead (and toward the queue depth) for good. Stale entries are
    the oldest of their band, so they reach its head; the check is in Redis, one round trip, atomic with the
    removal."""
    interactive, batch = BANDS["interactive"], BANDS["batch"]
    bands = ["-inf", f"({interactive}", interactive, f"({batch}", batch, "+inf"]
    return int(r.eval(_PRUNE, 1, keys.queued(model), head, keys.video(""), *bands))


def ahead_of_new(r: Any, model: str, lane: str) -> int:
    """How many queued videos a new one in `lane` would have ahead of it: all of them for a batch video; for an
    interactive one, those pushed to the front and the interactive lane (it goes before the first batch video)."""
    if lane == "interactive":
        return int(r.zcount(keys.queued(model), "-inf", f"({BANDS['batch']}"))
    return int(r.zcard(keys.queued(model)))


def eta(own_s: float | None, position: int | None, workers: int, now: float, progress: int = 0) -> float | None:
    """Estimated completion (unix seconds) of a job that takes `own_s` seconds on its own.

    Running (`position` None): what is left of its own time. Queued at `position` (jobs ahead, 0 = next) with
    `workers` serving its model: the jobs ahead are assumed to be like it, the running ones half done on average.
    None when there is no measured speed yet, or nobody serves the model."""
    if own_s is None:
        return None
    if position is None:
        return now + own_s * (1 - progress / 100)
    if not workers:
        return None
    return now + (position // workers + 0.5) * own_s + own_s
