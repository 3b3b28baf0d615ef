"""Janitor bench: what one cleanup pass costs as past jobs pile up (1k, 10k, 100k by default).

    python -m bench.janitor                      # 1k, 10k, 100k past jobs, about a minute
    python -m bench.janitor --past 1000 --runs 3 # a wiring check (the tests run it)

A real redis-server, seeded as k5serve leaves finished jobs: each past job's record, its place in its owner's
index and its files' expiry (a week ahead), and for every `--failed-every`-th one RQ's copy in its failed
registry as RQ files a job it saw fail (the job hash and the registry entry, kept an hour), its video final.
Then the pass that the gateway and every worker run once per heartbeat (Recovery.janitor: reap, redeliver,
expiry sweep) is timed and its Redis commands counted: the first pass after the seed, which settles RQ's failed
entries, and the median of the passes after it, which have nothing new to look at.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import redis
from rq import Queue

from bench.gateway import commands
from bench.report import table
from service.console.localstack import RedisServer
from service.contract import keys
from service.contract.jobs import JOB_FUNC, RQ_FAILURE_TTL_S, JobStore, plan_job
from service.contract.models import TINY
from service.contract.recovery import Recovery
from service.contract.schemas import VideoCreate
from service.contract.settings import Settings
from service.contract.storage import open_storage

SPEC = TINY["k5-tiny-t2v"]
OWNER = "key_bench"


def seed(r: redis.Redis, store: JobStore, n: int, failed_every: int) -> int:
    """n past jobs as k5serve leaves them; returns how many also left a failed RQ job."""
    done = plan_job(VideoCreate(prompt="a lighthouse at dusk", size="64x64"), SPEC, has_image=False)
    now = int(time.time())
    done = done.model_copy(update={"status": "completed", "progress": 100, "completed_at": now, "owner": OWNER})
    done.expires_at = now + 7 * 86400
    template = done.model_dump_json(exclude_none=True)
    queue = Queue(SPEC.id, connection=r)
    failed = 0
    for start in range(0, n, 2000):
        with r.pipeline(transaction=False) as pipe:
            for i in range(start, min(n, start + 2000)):
                video_id = f"video_{time.time_ns():016x}{i:016x}"
                pipe.set(keys.video(video_id), template.replace(done.id, video_id), ex=store.record_ttl_s)
                pipe.zadd(keys.videos(OWNER), {video_id: 0})
                pipe.zadd(keys.EXPIRY, {video_id: done.expires_at})
                if failed_every and i % failed_every == 0:
                    job = queue.create_job(JOB_FUNC, args=(video_id,), job_id=video_id, failure_ttl=RQ_FAILURE_TTL_S)
                    job.save(pipeline=pipe)
                    queue.failed_job_registry.add(job, ttl=RQ_FAILURE_TTL_S, pipeline=pipe, exc_string="timeout")
                    failed += 1
            pipe.execute()
    return failed


def one_pass(r: redis.Redis, recovery: Recovery, storage) -> tuple[float, int]:
    r.delete(keys.JANITOR_LOCK)  # a pass per call, as if a heartbeat had passed
    before = sum(commands(r).values())
    t0 = time.perf_counter()
    recovery.janitor(storage, "bench")
    return time.perf_counter() - t0, sum(commands(r).values()) - before


def run(args: argparse.Namespace) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="k5-janitor-") as tmp:
        server = RedisServer(Path(tmp) / "redis").start()
        try:
            r = redis.Redis.from_url(server.url)
            settings = Settings(redis_url=server.url, storage_url=f"file://{tmp}/files")
            store, storage = JobStore(r, settings), open_storage(settings)
            recovery = Recovery(store)
            for n in args.past:
                r.flushdb()
                store.announce(SPEC, "bench-worker")
                failed = seed(r, store, n, args.failed_every)
                first_s, first_cmds = one_pass(r, recovery, storage)
                steady = [one_pass(r, recovery, storage) for _ in range(args.runs)]
                rows.append(
                    {
                        "past": n,
                        "failed": failed,
                        "first_ms": first_s * 1e3,
                        "first_cmds": first_cmds,
                        "steady_ms": statistics.median(s for s, _ in steady) * 1e3,
                        "steady_cmds": statistics.median(c for _, c in steady),
                        "failed_left": r.zcard(Queue(SPEC.id, connection=r).failed_job_registry.key),
                    }
                )
        finally:
            server.stop()
    return rows


COLUMNS = [
    ("past jobs", "past", "{:,}"),
    ("of them failed in RQ", "failed", "{:,}"),
    ("first pass ms", "first_ms", "{:.1f}"),
    ("first pass Redis cmds", "first_cmds", "{:,}"),
    ("later passes ms (median)", "steady_ms", "{:.2f}"),
    ("later passes Redis cmds", "steady_cmds", "{:,.0f}"),
    ("RQ failed entries left", "failed_left", "{:,}"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--past", type=lambda s: [int(x) for x in s.split(",")], default=[1000, 10_000, 100_000])
    parser.add_argument("--failed-every", type=int, default=10, help="every n-th past job also failed in RQ")
    parser.add_argument("--runs", type=int, default=5, help="passes after the first, median reported")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    load = os.getloadavg()[0]
    rows = run(args)
    print(
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {os.cpu_count()} cores; load average "
        f"{load:.1f} before, {os.getloadavg()[0]:.1f} after\n"
    )
    print(table(rows, COLUMNS))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
