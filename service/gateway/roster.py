"""What /v1/models shows: every known model with its workers online, read from Redis at most once per heartbeat.

Workers announce themselves once per heartbeat, so a fresher read could not show anything newer; a listing
that read Redis on every call cost some 40 commands a call (a spec, a worker count and a start time per
catalogue entry)."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from service.contract.jobs import JobStore
from service.contract.models import ModelSpec


@dataclass(frozen=True)
class ModelState:
    spec: ModelSpec
    # Workers whose last heartbeat is recent enough to count as online.
    workers: int
    # When a worker first served the model on this deployment (unix seconds; 0: never).
    since: int
    # K5_PARALLEL layouts of the pools online ("none": one GPU per worker; "cfg=2,sp=4": 8 GPUs per video).
    parallel: list[str]


class Roster:
    def __init__(self, store: JobStore, max_age_s: float) -> None:
        self.store, self.max_age_s = store, max_age_s
        self._lock = threading.Lock()
        self._states: list[ModelState] | None = None
        self._read_at = 0.0

    def models(self) -> list[ModelState]:
        """The known models, announced ones first, as of at most max_age_s ago."""
        # One reader refreshes while concurrent requests wait for its answer instead of each reading Redis.
        with self._lock:
            now = time.monotonic()
            if self._states is None or now - self._read_at >= self.max_age_s:
                self._states = [ModelState(*state) for state in self.store.model_states()]
                self._read_at = now
            return self._states
