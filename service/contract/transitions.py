"""The vocabulary of a job's life (service/contract/lifecycle.py): the edges a record may take, what a transition
decided (a Move), what its caller learns (an Outcome), and what the one transaction reads (a Snapshot)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any, NamedTuple

from service.contract.record import JobRecord


class Edge(NamedTuple):
    sources: frozenset[str]
    target: str


EDGES: dict[str, Edge] = {
    "start": Edge(frozenset({"queued"}), "in_progress"),
    "progress": Edge(frozenset({"in_progress"}), "in_progress"),
    "complete": Edge(frozenset({"in_progress"}), "completed"),
    "fail": Edge(frozenset({"in_progress"}), "failed"),
    "requeue": Edge(frozenset({"in_progress"}), "queued"),
    "redeliver": Edge(frozenset({"queued"}), "queued"),
    "give_up": Edge(frozenset({"queued", "in_progress"}), "failed"),
    "cancel": Edge(frozenset({"queued", "in_progress"}), "failed"),
    "expire": Edge(frozenset({"queued"}), "failed"),
}


class Outcome(StrEnum):
    DONE = "done"  # the transition happened
    FINAL = "final"  # the job is already final (cancelled, given up, completed): nothing moved
    GONE = "gone"  # there is no record (deleted, expired)
    NOT_OWNER = "not_owner"  # another run owns the job now, or none does: this run's lease lapsed
    REFUSED = "refused"  # not now: not the current RQ job, the lease is alive, already running


@dataclass(frozen=True)
class Snapshot:
    """A job's keys as read under WATCH."""

    record: JobRecord | None
    owner: str  # token of the current run, "" for none
    rq: str  # the video's current RQ job id
    attempts: int
    leased: bool


@dataclass
class Move:
    """What one transition writes: the new record, and for some edges a new run or a new RQ job."""

    edge: str
    record: JobRecord
    token: str | None = None  # start: the new run's token
    rq_id: str | None = None  # requeue, redeliver: the RQ job to enqueue (at the front)
    attempts: int | None = None  # the new attempt count, when it changes


def advanced(snap: Snapshot, status: str, **changes: Any) -> JobRecord:
    """The snapshot's record, moved to `status` with `changes`."""
    assert snap.record is not None
    return snap.record.model_copy(update={**changes, "status": status})
