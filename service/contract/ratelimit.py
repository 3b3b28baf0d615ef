"""Per-key request rate: fixed one-minute windows in Redis (keys.rate), shared by every gateway replica.

Every /v1 request is counted once. Most routes count it on its own (`Charge.now`, one EVALSHA); the hot ones
(POST /v1/videos, GET /v1/videos/{id}) hand their window to the script that does their work, which counts it
first and does nothing else when the key is over its limit (`COUNT_LUA`): the count then costs no round trip
of its own. A request refused before it reaches Redis (a malformed body, an id that is no video's) is counted on
its way out (by the gateway's error handlers, with `Charge.now`), so every request still counts, and the 429
still wins over the other answer.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from service.contract import keys
from service.contract.problems import Throttled

WINDOW_S = 60
# A window's key lives two windows, so a late request of the last window cannot reset it.
TTL_S = 2 * WINDOW_S

# Inside a script, before its own work: KEYS[<k>] the window (keys.rate), ARGV[<a>] the limit (0: the caller
# counts on its own). `RATE_KEY` and `RATE_LIMIT` are replaced by the script's own indices. Leaves the count in
# `rate_count` (0 when not counted) and returns {'rate', count} when the key is over its limit.
COUNT_LUA = """
local rate_count = 0
if tonumber(RATE_LIMIT) > 0 then
  rate_count = redis.call('incr', RATE_KEY)
  redis.call('expire', RATE_KEY, TTL)
  if rate_count > tonumber(RATE_LIMIT) then return {'rate', rate_count} end
end
""".replace("TTL", str(TTL_S))


def count_lua(key: str, limit: str) -> str:
    """COUNT_LUA for a script whose window is `key` (e.g. "KEYS[7]") and limit `limit` (e.g. "ARGV[13]")."""
    return COUNT_LUA.replace("RATE_KEY", key).replace("RATE_LIMIT", limit)


# The count on its own (Charge.now): KEYS[1] the window, ARGV[1] the limit.
_COUNT = count_lua("KEYS[1]", "ARGV[1]") + "return {'ok', rate_count}\n"


@dataclass
class Charge:
    """One request's count in its key's window: taken once, by the first script that is given it (`take`) or by
    `now`. The window is fixed when the request arrives."""

    owner: str
    per_min: int
    script: Any  # the registered _COUNT script
    window: int = field(default_factory=lambda: int(time.time() // WINDOW_S))
    counted: bool = False

    @property
    def key(self) -> str:
        return keys.rate(self.owner, self.window)

    def take(self) -> tuple[str, int]:
        """The (window key, limit) a script counts with; (key, 0) once the request was counted: the script must
        not count it again."""
        if self.counted:
            return self.key, 0
        self.counted = True
        return self.key, self.per_min

    def now(self) -> None:
        """Count the request now, unless it was; raises Throttled over the limit."""
        if self.counted:
            return
        key, limit = self.take()
        check(self, self.script(keys=[key], args=[limit]))

    def refusal(self) -> Throttled:
        retry = (self.window + 1) * WINDOW_S - time.time()
        return Throttled(
            f"Rate limit of {self.per_min} requests per minute exceeded.", code="rate_limited", retry_after_s=retry
        )


def register(r: Any) -> Any:
    """The count as a registered script (sent by SHA)."""
    return r.register_script(_COUNT)


def window_of(charge: Charge | None) -> tuple[str, int]:
    """What a script that counts the request is given (Charge.take), or no count at all (no key, limit 0)."""
    return charge.take() if charge is not None else ("", 0)


def check(charge: Charge | None, reply: list[Any]) -> None:
    """Throttled when the script that took `charge` answered that the key is over its limit ({'rate', count})."""
    if charge is not None and reply and reply[0] in (b"rate", "rate"):
        raise charge.refusal()
