"""Every Redis key family of k5serve, in one place: `k5:<kind>[:<id>]`. RQ keeps its own keys (`rq:*`) in the same
database; the queue of a model is named by the model id.

Jobs (written only by service/contract/lifecycle.py):
  k5:video:<id>          the job record (JSON, service/contract/record.py), the source of truth for the video object
  k5:videos:<owner>      the owner's video ids, all with score 0 so that ZRANGEBYLEX lists them in id order;
                         ids are time-ordered, so that is creation order. Its TTL (a record's) is re-armed at each
                         creation and each end, and each creation prunes the oldest ids whose records are gone
  k5:inflight:<owner>    the owner's videos that are queued or running: added at creation, removed when final
  k5:attempt:<id>        hash: n (deliveries a worker took: runs started, and deliveries lost before their run
                         started), owner (token of the current run), rq (the video's current RQ job id)
  k5:lease:<id>          the owner token of the run in progress, with a short TTL that its worker's heartbeat
                         refreshes; an expired lease means the worker is gone
  k5:running             set of video ids with a run in progress: all the reaper has to look at
  k5:demand:<model>      list of the model's video ids queued or running (in post-processing too): added at
                         creation, removed when final. Its length is what KEDA scales the model's pool on (a
                         Redis list, which KEDA's redis trigger counts; RQ's own list holds only waiting jobs)
  k5:expiry              sorted set video id -> when the janitor deletes its stored files: expires_at of a
                         completed video, the end of a failed one, job_timeout_s after a DELETE
  k5:queued:<model>      sorted set of the model's queued video ids -> their place in line (service/contract/
                         jobs.py, QueueIndex): added in the transaction that puts the video on RQ's queue, removed
                         in the one that moves it out of queued; ZRANK is its queue position
  k5:seq:queued          the counter that numbers places in line (one key)
  k5:idem:<owner>:<hash> an Idempotency-Key (sha256) -> {fingerprint, video_id}
  k5:deadlines           sorted set video id -> deadline (unix seconds) of the queued jobs that have one: added
                         when a job enters the queue, removed when it leaves it (started, final, deleted)
Usage (service/contract/usage.py, written with each job's terminal transition):
  k5:usage:<owner>:<day> hash of an owner's totals for one UTC day (YYYYMMDD): videos, seconds, steps, megavoxels
Housekeeping:
  k5:lock:janitor        one janitor pass at a time across all the processes that run it
  k5:limbo:<rq id>       when the janitor first saw an RQ job taken off its queue but not started
Models and workers:
  k5:models              set of every model id a worker ever announced
  k5:spec:<model>        the last ModelSpec a worker announced for <model>
  k5:since:<model>       when a worker first served <model> (unix seconds, Redis's clock)
  k5:workers:<model>     sorted set worker name -> last heartbeat (unix seconds, Redis's clock: registry._ANNOUNCE)
  k5:timing:<model>      hash: measured seconds per step and overhead, per megavoxel (EWMA), for ETAs
Access:
  k5:rate:<owner>:<min>  requests of an API key in one minute window
Webhooks (service/contract/webhooks.py):
  k5:webhook:<delivery>  the delivery record (JSON)
  k5:webhooks:due        sorted set delivery id -> next attempt time (unix seconds, Redis's clock)
  k5:webhooks:video:<id> the video's delivery ids (for operators)
"""

from __future__ import annotations

import hashlib
from typing import Any


def text(raw: Any) -> str:
    """A Redis reply as text: k5serve's connections return bytes (RQ shares them and keeps pickles there)."""
    return raw.decode() if isinstance(raw, bytes) else str(raw)


RUNNING = "k5:running"
QUEUE_SEQ = "k5:seq:queued"
EXPIRY = "k5:expiry"
DEADLINES = "k5:deadlines"
JANITOR_LOCK = "k5:lock:janitor"
MODELS = "k5:models"
WEBHOOKS_DUE = "k5:webhooks:due"
# Pub/sub channel of record changes ("<video id> <model>", or "<video id>" for progress), for the gateway's event
# streams (service/gateway/feed.py); published by the lifecycle in the writing transaction.
CHANGES = "k5:changes"


def video(video_id: str) -> str:
    return f"k5:video:{video_id}"


def videos(owner: str) -> str:
    return f"k5:videos:{owner}"


def inflight(owner: str) -> str:
    return f"k5:inflight:{owner}"


def demand(model: str) -> str:
    return f"k5:demand:{model}"


def queued(model: str) -> str:
    return f"k5:queued:{model}"


def attempt(video_id: str) -> str:
    return f"k5:attempt:{video_id}"


def lease(video_id: str) -> str:
    return f"k5:lease:{video_id}"


def idempotency(owner: str, key: str) -> str:
    # Hashed: a client's key is arbitrary text and may be long.
    return f"k5:idem:{owner}:{hashlib.sha256(key.encode()).hexdigest()}"


def usage(owner: str, day: str) -> str:
    return f"k5:usage:{owner}:{day}"


def limbo(rq_id: str) -> str:
    return f"k5:limbo:{rq_id}"


def spec(model: str) -> str:
    return f"k5:spec:{model}"


def since(model: str) -> str:
    return f"k5:since:{model}"


def workers(model: str) -> str:
    return f"k5:workers:{model}"


def layouts(model: str) -> str:
    # How the model's online pools spread a video over GPUs (K5_PARALLEL), scored by last heartbeat.
    return f"k5:layouts:{model}"


def timing(model: str) -> str:
    return f"k5:timing:{model}"


def rate(owner: str, window: int) -> str:
    return f"k5:rate:{owner}:{window}"


def webhook(delivery_id: str) -> str:
    return f"k5:webhook:{delivery_id}"


def video_webhooks(video_id: str) -> str:
    return f"k5:webhooks:video:{video_id}"
