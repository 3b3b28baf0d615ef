"""What videos used, summed for billing and budgets: per owner per UTC day in Redis (GET /v1/usage), and in the
k5_usage_* Prometheus counters under a bounded label set.

A video's usage is written into its record by the run as it goes (worker/runner.py) and counted here exactly
once, by its terminal transition (service/contract/lifecycle.py): `count` adds it to the owner's day inside that
transaction, so a total never misses or doubles a video; `observe` adds it to the counters once the transaction
is written. Metrics never carry the raw owner id, which grows with every key: the `key` label is the operator's
name for it (K5_USAGE_LABELS) or "other", so the label set is bounded by configuration.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import Any

from service.contract import keys, metrics
from service.contract.record import JobRecord
from service.contract.schemas import UsageReport, VideoUsage
from service.contract.settings import Settings

# The per-phase seconds of VideoUsage, as summed (HINCRBYFLOAT) and as the `phase` label of k5_usage_seconds.
PHASES = ("text_encode", "denoise", "decode", "encode", "upload")
OTHER = "other"
# A day's totals are kept under its UTC date (keys.usage).
DAY = "%Y%m%d"


def day_of(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime(DAY)


def tenant(settings: Settings, owner: str) -> str:
    """The metrics label of an owner: its configured name, else "other"."""
    return settings.tenant_labels.get(owner, OTHER)


def count(pipe: Any, rec: JobRecord, settings: Settings, now: float | None = None) -> None:
    """Add a finished video to its owner's totals of today (UTC), inside the caller's transaction."""
    key = keys.usage(rec.owner, day_of(time.time() if now is None else now))
    pipe.hincrby(key, "videos_completed" if rec.status == "completed" else "videos_failed", 1)
    used = rec.usage
    if used is not None:
        for phase in PHASES:
            pipe.hincrbyfloat(key, f"{phase}_seconds", getattr(used, f"{phase}_seconds"))
        pipe.hincrby(key, "steps", used.steps)
        pipe.hincrby(key, "steps_resumed", used.steps_resumed)
        pipe.hincrbyfloat(key, "megavoxels", used.megavoxels)
    pipe.expire(key, settings.usage_retention_days * 86400)


def observe(rec: JobRecord, settings: Settings) -> None:
    """Count a finished video in this process's k5_usage_* counters (after its transition is written)."""
    label = tenant(settings, rec.owner)
    metrics.USAGE_VIDEOS.labels(rec.model, label, rec.status).inc()
    used = rec.usage
    if used is None:
        return
    for phase in PHASES:
        metrics.USAGE_SECONDS.labels(rec.model, label, phase).inc(getattr(used, f"{phase}_seconds"))
    metrics.USAGE_STEPS.labels(rec.model, label).inc(used.steps)
    metrics.USAGE_STEPS_RESUMED.labels(rec.model, label).inc(used.steps_resumed)
    metrics.USAGE_MEGAVOXELS.labels(rec.model, label).inc(used.megavoxels)


def days_between(start: float, end: float) -> tuple[datetime, int]:
    """The UTC days that [start, end) touches: the first one's midnight and how many."""
    first = datetime.fromtimestamp(start, UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    last = datetime.fromtimestamp(max(start, end - 1e-6), UTC)
    return first, (last.date() - first.date()).days + 1


def totals(r: Any, owner: str, start: float, end: float) -> UsageReport:
    """An owner's totals over the UTC days that [start, end) touches, one round trip."""
    first, days = days_between(start, end)
    with r.pipeline(transaction=False) as pipe:
        for i in range(days):
            pipe.hgetall(keys.usage(owner, (first + timedelta(days=i)).strftime(DAY)))
        replies = pipe.execute()
    sums: dict[str, float] = {}
    for reply in replies:
        for field, value in reply.items():
            name = keys.text(field)
            sums[name] = sums.get(name, 0.0) + float(value)
    ints = {"videos_completed", "videos_failed", "steps", "steps_resumed"}
    known = set(UsageReport.model_fields) & set(sums)
    figures: dict[str, Any] = {name: int(sums[name]) if name in ints else sums[name] for name in known}
    start_s, end_s = int(first.timestamp()), int((first + timedelta(days=days)).timestamp())
    return UsageReport(owner=owner, start=start_s, end=end_s, **figures)


def combined(earlier: VideoUsage | None, run: VideoUsage) -> VideoUsage:
    """Earlier runs' usage plus this run's: a run lost with its worker used the accelerator too. The size is the
    video's, not a sum."""
    if earlier is None:
        return run
    fields = run.model_dump(exclude={"gpu_seconds", "megavoxels"})
    return VideoUsage(megavoxels=run.megavoxels, **{k: v + getattr(earlier, k) for k, v in fields.items()})
