"""What a request must pass before it becomes a job: a served model and size, room in the key's and the
model's limits, a reachable store, a safe webhook URL, a deadline it can meet; and the refusals that say what to
send instead."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable

from service.contract import keys, lineup
from service.contract.jobs import JobRecord, JobStore
from service.contract.problems import Conflict, InvalidParameter, Throttled, Unavailable
from service.contract.schemas import MAX_DEADLINE_S, TERMINAL, VideoCreate
from service.contract.settings import Settings
from service.contract.storage import StorageError, StorageFull
from service.contract.webhooks import UnsafeURL, URLPolicy
from service.gateway.auth import too_many
from service.gateway.roster import Roster


def unserved_message(requested: str, model: str, roster: Roster, settings: Settings) -> str:
    """What to send instead of a model this deployment does not serve."""
    alias = f" (an alias of '{model}')" if model != requested else ""
    online = roster.online()
    served = ", ".join(f"'{s.id}' ({s.task})" for s in online) or "none is online now"
    aliases = ", ".join(f"'{a}'" for a, target in settings.aliases.items() if target in {s.id for s in online})
    hint = f"; aliases: {aliases}" if aliases else ""
    return (
        f"The model '{requested}'{alias} is not served by this deployment. Use one of: {served}{hint}. "
        "GET /v1/models lists every model; an operator can map other names with K5_MODEL_ALIASES."
    )


def check_capacity(store: JobStore, settings: Settings, owner: str, model: str) -> None:
    """Backpressure before anything is stored: the key's jobs in flight, and the model's queue.

    Both are checked again, atomically, when the job is created (Lifecycle.create); this early check only
    spares a request with an image that would be refused the upload.
    """
    with store.r.pipeline(transaction=False) as pipe:
        pipe.scard(keys.inflight(owner))
        pipe.zcard(keys.queued(model))
        inflight, depth = pipe.execute()
    if inflight >= settings.max_inflight_per_key:
        raise too_many_inflight(store, settings, owner)
    if depth >= settings.max_queue_depth:
        raise queue_full(model)


def queue_full(model: str) -> Throttled:
    return too_many(f"The queue of model {model} is full; retry later.", "queue_full", 30)


def check_storage(call: Callable[[], None]) -> None:
    """A store that is away or full refuses new jobs with a 503 and Retry-After (which clients retry), rather
    than accepting work whose video could not be kept."""
    try:
        call()
    except StorageError as e:
        full = isinstance(e, StorageFull)
        raise Unavailable(
            f"The server's storage is {'full' if full else 'unavailable'}; retry later.",
            code="storage_full" if full else "storage_unavailable",
            retry_after_s=30 if full else 5,
        ) from e


def too_many_inflight(store: JobStore, settings: Settings, owner: str) -> Throttled:
    return too_many(
        f"You have {settings.max_inflight_per_key} videos queued or in progress; wait for one to finish.",
        "too_many_inflight",
        first_slot_free_s(store, owner),
    )


def first_slot_free_s(store: JobStore, owner: str, fallback_s: float = 5.0) -> float:
    """Seconds until the key's first job in flight is expected to finish (its estimated_completion_at), so a
    client's retry lands when a slot is free rather than after a fixed guess; the fallback while nothing has
    been timed yet. Only the key's oldest few jobs are looked at: running jobs finish first."""
    names = [keys.video(keys.text(m)) for m in store.r.smembers(keys.inflight(owner))]
    raws = store.r.mget(names) if names else []
    records = [JobRecord.model_validate_json(raw) for raw in raws if raw]
    records = [rec for rec in records if rec.status not in TERMINAL]
    records.sort(key=lambda rec: (rec.status != "in_progress", rec.created_at))
    now = time.time()
    etas = [view.estimated_completion_at for view in store.view_many(records[:4])]
    known = [eta - now for eta in etas if eta is not None]
    return min(max(min(known), 1.0), 3600.0) if known else fallback_s


def fingerprint(req: VideoCreate, image: bytes | None) -> str:
    """What makes two requests 'the same' for an Idempotency-Key: every field, and the image's bytes."""
    h = hashlib.sha256(req.model_dump_json(exclude_none=True).encode())
    if image is not None:
        h.update(hashlib.sha256(image).digest())
    return h.hexdigest()


def check_webhook_url(url: str, settings: Settings) -> None:
    if not settings.webhook_secret:
        raise InvalidParameter(
            "Webhooks are not enabled on this deployment (no signing secret is configured).",
            param="webhook_url",
            code="webhooks_disabled",
        )
    try:
        URLPolicy(settings.webhook_allowed_hosts).check(url)
    except UnsafeURL as e:
        raise InvalidParameter(f"Invalid webhook_url: {e}.", param="webhook_url", code="unsafe_webhook_url") from e


def deadline_of(req: VideoCreate, now: float) -> float | None:
    """The request's deadline as a unix time (`now`: Redis's clock, which every deadline check reads)."""
    if req.deadline_s is not None and req.deadline_at is not None:
        raise InvalidParameter("Give deadline_s or deadline_at, not both.", param="deadline_at")
    if req.deadline_s is not None:
        return now + req.deadline_s
    if req.deadline_at is None:
        return None
    if req.deadline_at <= now:
        raise InvalidParameter(
            f"deadline_at ({req.deadline_at:.0f}) is not in the future; the server's time is {now:.0f}.",
            param="deadline_at",
            code="deadline_passed",
        )
    if req.deadline_at > now + MAX_DEADLINE_S:
        raise InvalidParameter(
            f"deadline_at may be at most {MAX_DEADLINE_S} s ahead (the server's time is {now:.0f}).",
            param="deadline_at",
        )
    return req.deadline_at


def check_deadline(store: JobStore, rec: JobRecord, now: float, param: str) -> None:
    """Refuse up front a job that cannot finish by its deadline: its ETA is the wait for the place it would take
    in its model's line (its lane's end: lineup.ahead_of_new) plus its own run, both from the workers' measured
    step times (JobStore.estimate_s), as the video object estimates it (lineup.eta). Until a job of the model has
    been timed, or while no worker is online (scale-to-zero), the job is accepted: the deadline still fails it
    if it has not started in time."""
    if rec.deadline_at is None:
        return
    own = store.estimate_s(rec, store.timing(rec.model))
    workers = store.workers_online(rec.model)
    if own is None or not workers:
        return
    ahead = lineup.ahead_of_new(store.r, rec.model, rec.priority or "batch")
    idle = ahead == 0 and store.queue(rec.model).started_job_registry.count < workers
    eta = now + own if idle else lineup.eta(own, ahead, workers, now)
    assert eta is not None  # own and workers are known
    if eta > rec.deadline_at:
        raise Conflict(
            f"The deadline is {rec.deadline_at - now:.0f} s away, but this video is estimated to complete in "
            f"{eta - now:.0f} s (at {eta:.0f}: {ahead} job(s) queued ahead for {workers} worker(s) of {rec.model}, "
            f"about {own:.1f} s each). Give a later deadline, or none.",
            param=param,
            code="deadline_unreachable",
        )
