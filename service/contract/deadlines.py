"""Request deadlines: the clock they are read on, and the failure of a job that did not start in time.

Every deadline check (the gateway turning deadline_s into a time, the start of a run, the janitor's sweep of
k5:deadlines) reads Redis's clock, not the local one: workers, gateways and the janitor run on different
machines, and one whose clock is off must not start a job past its deadline nor fail one early.
"""

from __future__ import annotations

from service.contract.record import JobRecord
from service.contract.schemas import VideoError

CODE = "deadline_exceeded"


def passed(rec: JobRecord, now: float) -> bool:
    return rec.deadline_at is not None and now >= rec.deadline_at


def exceeded(rec: JobRecord, now: float) -> VideoError:
    late = max(0.0, now - (rec.deadline_at or now))
    return VideoError(
        code=CODE,
        message=f"The job had not started by its deadline ({rec.deadline_at:.0f}, {late:.1f} s ago); it did not run.",
    )
