"""A small chaos run of the real stack (bench/chaos.py): workers SIGKILLed mid-job and a Redis restart lose no job,
complete none twice, and send exactly one terminal webhook per job."""

from __future__ import annotations

import pytest

from bench.chaos import run_chaos

# Real workers killed at random, and a Redis restart.
pytestmark = pytest.mark.slow


def test_chaos_small():
    # rapid: the second kill does not wait for the first victim's replacement, so both land before 8 short jobs end.
    result = run_chaos(jobs=8, kills=2, workers=2, seed=3, redis_restart=True, timeout=240, rapid=True)
    print(result.table())
    assert result.submitted == 8
    assert result.kills == 2 and result.redis_restarts == 1
    assert result.lost == 0
    assert result.completed_twice == 0
    assert all(n == 1 for n in result.terminal_events.values()), result.terminal_events
    assert result.completed + sum(result.failed.values()) == 8
    # The killed workers' jobs ran again: some job started more than once.
    assert max(result.attempts) >= 2, result.attempts
