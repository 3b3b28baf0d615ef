"""One run of a job on a worker: the handle Lifecycle.start returns, and the only way a run writes its job."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from service.contract import keys
from service.contract.record import JobRecord
from service.contract.schemas import VideoError, VideoUsage
from service.contract.transitions import Outcome

if TYPE_CHECKING:
    from service.contract.lifecycle import Lifecycle


@dataclass
class Run:
    """One run of a job on a worker, holding its lease; what the run may do to its job."""

    life: Lifecycle
    record: JobRecord
    token: str
    rq_id: str
    # Where this run stores its files; the record names it once the run completes.
    assets: str = field(init=False)

    def __post_init__(self) -> None:
        self.assets = f"{self.record.id}/run-{self.token.rsplit('#', 1)[1]}"

    @property
    def video_id(self) -> str:
        return self.record.id

    def progress(self, progress: int | None = None, **changes: Any) -> Outcome:
        """Record progress (it only grows); DONE means go on, anything else means stop."""
        if progress is not None:
            changes["progress"] = min(100, int(progress))
        return self._move("progress", changes)

    def complete(self, expires_at: int, usage: VideoUsage | None = None) -> Outcome:
        now = int(time.time())
        changes: dict[str, Any] = {"progress": 100, "completed_at": now, "expires_at": expires_at}
        return self._move("complete", changes if usage is None else {**changes, "usage": usage})

    def fail(self, code: str, message: str, usage: VideoUsage | None = None) -> Outcome:
        changes: dict[str, Any] = {"error": VideoError(code=code, message=message)}
        return self._move("fail", changes if usage is None else {**changes, "usage": usage})

    def requeue(self) -> Outcome:
        """Give the job back at a step boundary (worker shutdown): not a failed attempt."""
        return self.life.requeue(self.video_id, token=self.token)[0]

    def refresh(self) -> bool:
        """Re-arm the lease (the heartbeat); False once another run owns the job."""
        return self.life.refresh(self.video_id, self.token)

    def drop_lease(self) -> None:
        """Let the lease lapse now (a worker about to exit): the janitor requeues the job on its next pass."""
        if keys.text(self.life.r.hget(keys.attempt(self.video_id), "owner") or b"") == self.token:
            self.life.r.delete(keys.lease(self.video_id))

    def release(self) -> None:
        """The run is over and its job settled (final, requeued): let go of the job if this run still holds it."""
        self.life.release(self.video_id, self.token)

    def _move(self, edge: str, changes: dict[str, Any]) -> Outcome:
        if edge == "complete":
            changes["assets"] = self.assets
        outcome, rec = self.life.move_run(self.video_id, self.token, edge, changes)
        if rec is not None:
            self.record = rec
        return outcome
