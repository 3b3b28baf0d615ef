"""Redis's clock: the one clock that processes on different machines share. Liveness, leases, deadlines and
webhook due times compare only times read from it, never one process's wall clock with another's, so a
worker, gateway or deliverer whose own clock is off neither hides a live worker nor fails a job early."""

from __future__ import annotations

from typing import Any

# The same inside a script: `now` (unix seconds, float) and `t` (TIME's reply) from here on.
NOW_LUA = "local t = redis.call('TIME')\nlocal now = tonumber(t[1]) + tonumber(t[2]) / 1000000\n"


def redis_clock(conn: Any) -> float:
    """Now on Redis's clock (unix seconds)."""
    seconds, micros = conn.time()
    return seconds + micros / 1e6
