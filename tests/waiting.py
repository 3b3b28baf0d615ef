"""Waiting on events in tests: poll a condition until it holds, and say what was awaited (with logs) when it does
not. The timeout is a bound on a hang, not a measurement: no test asserts how long something took."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


def wait_until(pred: Callable[[], T], timeout: float, what: str, *logs: Path) -> T:
    """The first truthy value of `pred()`; AssertionError naming `what` (and the logs' tails) after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        if value := pred():
            return value
        if time.monotonic() > deadline:
            tails = "\n".join(f"--- {p} ---\n{p.read_text(errors='replace')[-4000:]}" for p in logs if p.exists())
            raise AssertionError(f"{what} not reached in {timeout}s\n{tails}")
        time.sleep(0.02)
