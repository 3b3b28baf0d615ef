"""SSE bench: what open event streams cost a gateway process, and what they do to an ordinary GET.

    python -m bench.sse_streams --streams 0 300 --window-s 20

A real redis-server and a real `k5serve gateway` process (local-disk store, anonymous); N queued video records
written through JobStore, one stream open on each. During the window one record changes every half second
(pushed to its stream) while GET /v1/videos/{id} is timed one request after another. The table gives the
gateway's CPU (share of one core, from /proc) and the GET latencies. Targets: 300 streams under 20% of a core,
GET p99 under 50 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
import redis

from bench.report import table
from service.console.localstack import RedisServer, free_port, stop_process, wait_for_port
from service.contract.jobs import JobStore, current_rq_id, plan_job
from service.contract.lifecycle import Lifecycle
from service.contract.models import resolve_model
from service.contract.schemas import VideoCreate
from service.contract.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
COLUMNS = [
    ("streams", "streams", "{}"),
    ("streams open", "open", "{}"),
    ("gateway % of a core", "cpu_pct", "{:.1f}"),
    ("GETs", "gets", "{}"),
    ("GET p50 ms", "p50_ms", "{:.1f}"),
    ("GET p99 ms", "p99_ms", "{:.1f}"),
    ("redis cmds/s", "redis_cps", "{:.0f}"),
]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def hold_streams(base: str, ids: list[str], opened: list[int], stop: threading.Event) -> None:
    async def one(client: httpx.AsyncClient, video_id: str) -> None:
        async with client.stream("GET", f"/v1/videos/{video_id}/events") as resp:
            opened.append(1)
            async for _ in resp.aiter_lines():
                if stop.is_set():
                    return

    async def main() -> None:
        limits = httpx.Limits(max_connections=len(ids) + 10)
        async with httpx.AsyncClient(base_url=base, timeout=None, limits=limits) as client:
            tasks = [asyncio.create_task(one(client, i)) for i in ids]
            while not stop.is_set():
                await asyncio.sleep(0.2)
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    asyncio.run(main())


def measure(base: str, store: JobStore, pid: int, n: int, window_s: float) -> dict:
    spec = resolve_model("kandinsky-5.0-t2v-lite-sft-5s")
    ids = []
    for _ in range(max(n, 1)):
        rec = plan_job(VideoCreate(prompt="a kite"), spec, has_image=False)
        rec.owner = "anonymous"
        Lifecycle(store).create(rec)
        ids.append(rec.id)
    opened: list[int] = []
    stop = threading.Event()
    holder = threading.Thread(target=hold_streams, args=(base, ids[:n], opened, stop), daemon=True)
    if n:
        holder.start()
        deadline = time.monotonic() + 60
        while len(opened) < n and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(2)  # the first reads settle
    cmds0 = store.r.info("stats")["total_commands_processed"]
    cpu0, t0 = cpu_seconds(pid), time.monotonic()
    latencies: list[float] = []
    progress = 0
    run = None
    next_change = t0
    with httpx.Client(base_url=base, timeout=30) as c:
        while time.monotonic() - t0 < window_s:
            if time.monotonic() >= next_change:
                progress = min(99, progress + 1)
                if run is None:
                    run = Lifecycle(store).start(ids[0], "bench", current_rq_id(store.r, ids[0]), progress=progress)
                else:
                    run.progress(progress)
                next_change += 0.5
            t = time.perf_counter()
            c.get(f"/v1/videos/{ids[-1]}")
            latencies.append((time.perf_counter() - t) * 1000)
            time.sleep(0.02)
    elapsed = time.monotonic() - t0
    cpu = cpu_seconds(pid) - cpu0
    cmds = store.r.info("stats")["total_commands_processed"] - cmds0
    stop.set()
    if n:
        holder.join(timeout=30)
    q = statistics.quantiles(latencies, n=100)
    return {
        "streams": n,
        "open": len(opened),
        "cpu_pct": 100 * cpu / elapsed,
        "gets": len(latencies),
        "p50_ms": statistics.median(latencies),
        "p99_ms": q[98],
        "redis_cps": cmds / elapsed,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--streams", type=int, nargs="+", default=[0, 300])
    ap.add_argument("--window-s", type=float, default=20.0)
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="k5-sse-") as tmp:
        server = RedisServer(Path(tmp) / "redis").start()
        port = free_port()
        env = {
            **os.environ,
            "K5_PORT": str(port),
            "K5_REDIS_URL": server.url,
            "K5_STORAGE_URL": f"file://{tmp}/data",
            "K5_ALLOW_ANONYMOUS": "true",
            "K5_SSE_MAX_STREAMS_PER_KEY": "100000",
            "K5_MAX_INFLIGHT_PER_KEY": "100000",
            "K5_RATE_LIMIT_PER_MIN": "100000000",
        }
        proc = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "gateway"], env=env, cwd=ROOT, stderr=subprocess.DEVNULL
        )
        try:
            wait_for_port(port, 60, proc)
            store = JobStore(redis.Redis.from_url(server.url), Settings(redis_url=server.url))
            for n in args.streams:
                rows.append(measure(f"http://127.0.0.1:{port}", store, proc.pid, n, args.window_s))
        finally:
            stop_process(proc)
            server.stop()
    print(table(rows, COLUMNS))
    print(f"\n{platform.node()}: {os.cpu_count()} CPUs; window {args.window_s:g} s; {datetime.now(UTC):%Y-%m-%d}")


if __name__ == "__main__":
    main()
