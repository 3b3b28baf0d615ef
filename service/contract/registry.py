"""The models and workers online: each worker's heartbeat, the count of a model's live workers, its pools'
parallel layouts, and what the gateway's roster reads for /v1/models (service/gateway/roster.py, at most once
per heartbeat). All on Redis's clock. JobStore (service/contract/jobs.py) is a Registry.
"""

from __future__ import annotations

import builtins
from typing import Any

from rq import Queue

from service.contract import keys
from service.contract.clock import NOW_LUA
from service.contract.models import CATALOGUE, ModelSpec, find_spec
from service.contract.settings import Settings

# A worker's heartbeat and the count of a model's live workers, both on Redis's clock (TIME): each worker's score
# is when Redis received its last beat, so a worker whose own clock is off is neither hidden nor kept online.
_ANNOUNCE = (
    NOW_LUA
    + """
redis.call('SET', KEYS[1], ARGV[1])
redis.call('SET', KEYS[2], t[1], 'NX')
redis.call('SADD', KEYS[3], ARGV[2])
redis.call('ZADD', KEYS[4], now, ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', now - tonumber(ARGV[4]))
redis.call('ZADD', KEYS[5], now, ARGV[5])
redis.call('ZREMRANGEBYSCORE', KEYS[5], '-inf', now - tonumber(ARGV[4]))
"""
)
_ONLINE = NOW_LUA + "return redis.call('ZCOUNT', KEYS[1], now - tonumber(ARGV[1]), '+inf')\n"
# The parallel layouts of a model's pools with a beat inside the window, on Redis's clock like _ONLINE.
_LAYOUTS = NOW_LUA + "return redis.call('ZRANGEBYSCORE', KEYS[1], now - tonumber(ARGV[1]), '+inf')\n"


class Registry:
    def __init__(self, r: Any, settings: Settings) -> None:
        self.r = r
        self.settings = settings
        # Sent by SHA (EVALSHA), not as text each time: a POST's ETA and /v1/models read the online counts.
        self._announce = r.register_script(_ANNOUNCE)
        self._online = r.register_script(_ONLINE)
        self._layouts = r.register_script(_LAYOUTS)

    # -- models and workers --------------------------------------------------------------------------------

    def queue_models(self) -> builtins.list[str]:
        """Every model that can have a queue here: announced by a worker, declared served, or queued for on RQ."""
        announced = {keys.text(m) for m in self.r.smembers(keys.MODELS)}
        queued = {q.name for q in Queue.all(connection=self.r)}
        return sorted(announced | queued | set(self.settings.served_model_ids))

    def announce(self, spec: ModelSpec, worker: str) -> None:
        """A worker's heartbeat: its model is online while beats keep coming (timed by Redis, _ANNOUNCE), and its
        pool's K5_PARALLEL layout with it."""
        model_keys = [
            keys.spec(spec.id),
            keys.since(spec.id),
            keys.MODELS,
            keys.workers(spec.id),
            keys.layouts(spec.id),
        ]
        args: list[str | float] = [
            spec.model_dump_json(),
            spec.id,
            worker,
            self.offline_after_s,
            self.settings.parallel,
        ]
        self._announce(keys=model_keys, args=args)

    def retire(self, spec: ModelSpec, worker: str) -> None:
        self.r.zrem(keys.workers(spec.id), worker)

    @property
    def offline_after_s(self) -> float:
        """How long a worker's last beat counts as online: three beats and 5 s."""
        return 3 * self.settings.heartbeat_s + 5

    def workers_online(self, model: str) -> int:
        return int(self._online(keys=[keys.workers(model)], args=[self.offline_after_s]))

    # -- /v1/models (service/gateway/roster.py reads this at most once per heartbeat) -------------------------------

    def model_layouts(self) -> dict[str, builtins.list[str]]:
        """model -> the K5_PARALLEL layouts of its pools online now ("none": one GPU per worker)."""
        return {state[0].id: state[3] for state in self.model_states() if state[3]}

    def model_states(self) -> builtins.list[tuple[ModelSpec, int, int, builtins.list[str]]]:
        """Every model the catalogue, the settings or a worker names (announced specs first), each with its workers
        online, since when it is served (unix seconds, 0 for never) and its pools' parallel layouts, in two round
        trips."""
        announced = sorted(keys.text(m) for m in self.r.smembers(keys.MODELS))
        ids = list(dict.fromkeys([*announced, *self.settings.served_model_ids, *CATALOGUE]))
        with self.r.pipeline(transaction=False) as pipe:
            for m in ids:
                pipe.get(keys.spec(m))
                self._online(keys=[keys.workers(m)], args=[self.offline_after_s], client=pipe)
                pipe.get(keys.since(m))
                self._layouts(keys=[keys.layouts(m)], args=[self.offline_after_s], client=pipe)
            replies = pipe.execute()
        states = []
        for i, m in enumerate(ids):
            raw, workers, since, layouts = replies[4 * i : 4 * i + 4]
            spec = ModelSpec.model_validate_json(raw) if raw else find_spec(m)
            if spec is not None:
                states.append((spec, int(workers), int(since or 0), sorted(keys.text(x) for x in layouts)))
        return states
