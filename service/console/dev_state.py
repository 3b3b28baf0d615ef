"""The processes a `k5serve dev` started, recorded in its state directory, so that the next start can stop what a
killed one left behind (a child that outlived it: stopped, stuck, or on a system without a parent-death signal).

A process is named by its pid and its start time (from /proc): a pid reused by an unrelated process since is not
the one recorded, and is never signalled.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

FILE = "dev-processes.json"
STOP_WAIT_S = 15.0


def start_time(pid: int) -> str | None:
    """The start time of a live (not zombie) process, in clock ticks since boot; None when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2 :].split()
    return None if fields[0] in ("Z", "X") else fields[19]


def _alive(entry: dict) -> bool:
    return entry.get("start") is not None and start_time(entry["pid"]) == entry["start"]


class ChildRecord:
    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / FILE
        self.entries: list[dict] = []

    def claim(self) -> None:
        """Refuses to start beside a live `k5serve dev` on the same state directory; stops what a dead one left."""
        with contextlib.suppress(OSError, ValueError):
            previous = json.loads(self.path.read_text())
            owner = previous["owner"]
            if _alive(owner):
                pid = owner["pid"]
                raise SystemExit(
                    f"k5serve dev: another k5serve dev (pid {pid}) runs on {self.path.parent}: stop it first "
                    f"(Ctrl-C in its terminal, or kill {pid}), or give this one another --state-dir"
                )
            if left := [e for e in previous.get("children", []) if _alive(e)]:
                print(
                    f"k5serve dev: the previous run (pid {owner['pid']}) was killed and left "
                    f"{len(left)} process(es) running (pids {', '.join(str(e['pid']) for e in left)}); stopping them",
                    flush=True,
                )
                _stop(left)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.entries = []
        self._write()

    def add(self, proc: subprocess.Popen | None) -> None:
        if proc is not None:
            self.entries.append({"pid": proc.pid, "start": start_time(proc.pid)})
            self._write()

    def release(self) -> None:
        """A clean stop: everything recorded has been stopped."""
        with contextlib.suppress(OSError):
            self.path.unlink()

    def _write(self) -> None:
        me = {"pid": os.getpid(), "start": start_time(os.getpid())}
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"owner": me, "children": self.entries}))
        tmp.replace(self.path)


def _stop(entries: list[dict]) -> None:
    """SIGTERM (and SIGCONT, for a stopped one), then SIGKILL for any still there after STOP_WAIT_S."""
    for e in entries:
        for sig in (signal.SIGCONT, signal.SIGTERM):
            with contextlib.suppress(OSError):
                os.kill(e["pid"], sig)
    deadline = time.monotonic() + STOP_WAIT_S
    while (left := [e for e in entries if _alive(e)]) and time.monotonic() < deadline:
        time.sleep(0.1)
    for e in left:
        with contextlib.suppress(OSError):
            os.kill(e["pid"], signal.SIGKILL)
    deadline = time.monotonic() + 5
    while [e for e in entries if _alive(e)] and time.monotonic() < deadline:
        time.sleep(0.1)
