"""What /v1/models shows: every known model with its workers online, read from Redis at most once per heartbeat.

Workers announce themselves once per heartbeat, so a fresher read could not show anything newer; a listing
that read Redis on every call cost some 40 commands a call (a spec, a worker count and a start time per
catalogue entry)."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from service.contract.jobs import JobStore
from service.contract.models import ModelSpec, find_spec


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

    def models(self, fresh: bool = False) -> list[ModelState]:
        """The known models, announced ones first, as of at most max_age_s ago (fresh: now)."""
        # One reader refreshes while concurrent requests wait for its answer instead of each reading Redis.
        with self._lock:
            now = time.monotonic()
            if fresh or self._states is None or now - self._read_at >= self.max_age_s:
                self._states = [ModelState(*state) for state in self.store.model_states()]
                self._read_at = now
            return self._states

    def served_spec(self, model: str) -> ModelSpec | None:
        """The spec of a model this deployment serves: one with a worker online, or declared served
        (K5_SERVED_MODELS, for scale-to-zero), as of the last read. A model that
        is not served as of the last read is looked up again at once, so a worker that has just come online
        is not refused for up to a heartbeat; one that has just gone is accepted for up to a heartbeat, and its
        jobs wait in the queue as they would for a pool scaled to zero."""
        for fresh in (False, True):
            for state in self.models(fresh):
                if state.spec.id == model and (state.workers > 0 or model in self.store.settings.served_model_ids):
                    return state.spec
        return None

    def online(self, fresh: bool = False) -> list[ModelSpec]:
        """The models with a worker online, by id."""
        return sorted((s.spec for s in self.models(fresh) if s.workers > 0), key=lambda spec: spec.id)

    def default_model(self) -> str | None:
        """The model of a request that names none: the setting, else the first text-to-video model online, else
        the first declared one."""
        settings = self.store.settings
        if settings.default_model:
            return settings.default_model
        for fresh in (False, True):
            online = [spec.id for spec in self.online(fresh) if spec.task == "text-to-video"]
            if online:
                return online[0]
        for model in settings.served_model_ids:
            declared = find_spec(model)
            if declared and declared.task == "text-to-video":
                return model
        return None
