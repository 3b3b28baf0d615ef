"""Gateway bench: k5serve's gateway beside a bare FastAPI + uvicorn app doing the equivalent Redis work.

    python -m bench.gateway                    # ~5 min: concurrency 1/16/64; 1k/10k/100k records, 1k/10k queued
    python -m bench.gateway --full             # the same with 5 runs of 3 s, and the processes section
    python -m bench.gateway --smoke            # seconds: every section once, tiny (the tests run it)

Both servers are real processes on one real redis-server, no worker attached: the tiny text-to-video model is
announced online as a worker would announce it. Runs are interleaved (k5serve, baseline, baseline, k5serve...)
and each figure is the median of --repeat runs. The database is emptied and seeded once per state, both
servers' data side by side; reads change nothing and the POST runs come last. Redis commands per request
(those run inside scripts included) come from INFO commandstats deltas: exactly, over 20 requests one after
the other, and under load, over each wrk run (that one includes the up to `concurrency` requests still in
flight when wrk stops, which weigh on slow endpoints).
The load comes from wrk (compiled, one thread): on 2 cores a Python client would take the servers' CPU.

Sections: `main` (POST, GET one, list 100, models at each concurrency); `scale` (the same at 1k-100k completed
records or 1k-10k queued jobs); `processes` (`k5serve gateway --workers 2` beside one process, and uvicorn's own
`--workers 2` as the gateway ran before it set TCP_NODELAY on its shared socket).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import redis

from bench import gateway_baseline, load
from bench.report import table
from service.console.localstack import RedisServer, free_port, stop_process, wait_for_port
from service.contract import keys
from service.contract.jobs import JobStore, new_video_id, plan_job
from service.contract.models import TINY
from service.contract.schemas import VideoCreate
from service.contract.settings import Settings
from service.gateway.auth import owner_of

ROOT = Path(__file__).resolve().parents[1]
API_KEY = "sk-bench-0123456789abcdef"
SPEC = TINY["k5-tiny-t2v"]
REQUEST = {"prompt": "a lighthouse at dusk, waves breaking", "model": SPEC.id, "size": "64x64"}
ENDPOINTS = ["POST /v1/videos", "GET /v1/videos/{id}", "GET /v1/videos?limit=100", "GET /v1/models"]
BASE_QUEUED = 100  # the main table's state: a list page of 100 queued videos
LEGACY = """import uvicorn
uvicorn.run("service.gateway.app:create_app", factory=True, workers={workers}, host="127.0.0.1", port={port},
            log_config=None, proxy_headers=True, timeout_graceful_shutdown=10)
"""


@dataclass
class Server:
    name: str
    kind: str  # "k5serve" or "baseline"
    base: str


@contextmanager
def serving(name: str, kind: str, cmd: list[str], env: dict[str, str], port: int) -> Iterator[Server]:
    proc = subprocess.Popen(
        cmd, env={**os.environ, **env}, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        wait_for_port(port, 60, proc)
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while httpx.get(base + ("/healthz" if kind == "k5serve" else "/v1/models")).status_code != 200:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not answer")
            time.sleep(0.2)
        yield Server(name, kind, base)
    finally:
        stop_process(proc)


def k5serve(redis_url: str, tmp: Path, workers: int, legacy: bool = False) -> tuple[list[str], dict, int]:
    port = free_port()
    env = {
        "K5_HOST": "127.0.0.1",
        "K5_PORT": str(port),
        "K5_REDIS_URL": redis_url,
        "K5_STORAGE_URL": f"file://{tmp}/files",
        "K5_API_KEYS": API_KEY,
        # Load, not abuse: the limits would answer 429 long before the bench is done.
        "K5_RATE_LIMIT_PER_MIN": str(10**9),
        "K5_MAX_INFLIGHT_PER_KEY": str(10**9),
        "K5_MAX_QUEUE_DEPTH": str(10**9),
    }
    if workers > 1:
        env["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="metrics-", dir=tmp)
    cmd = ["-m", "service.cli", "gateway", "--workers", str(workers)]
    if legacy:  # the call `k5serve gateway --workers N` made before: uvicorn's own bind of the shared socket
        cmd = ["-c", LEGACY.format(workers=workers, port=port)]
    return [sys.executable, *cmd], env, port


# KEYS: the owner's index. ARGV: record JSON, its id (replaced), id prefix, first and end number, TTL, key prefix.
_SEED_COMPLETED = """
for i = tonumber(ARGV[4]), tonumber(ARGV[5]) - 1 do
  local id = ARGV[3] .. string.format('%016x', i)
  local body = string.gsub(ARGV[1], ARGV[2], id, 1)
  redis.call('set', ARGV[7] .. id, body, 'EX', ARGV[6])
  redis.call('zadd', KEYS[1], 0, id)
end
"""


class State:
    """Empties the database and seeds it the same way for both servers before every run."""

    def __init__(self, r: redis.Redis, redis_url: str) -> None:
        self.r = r
        self.store = JobStore(r, Settings(redis_url=redis_url))
        self.owner = owner_of(hashlib.sha256(API_KEY.encode()).hexdigest())

    def reset(self, records: int = 0, queued: int = BASE_QUEUED) -> dict[str, str | None]:
        """Returns the id each server's GET asks for: its newest video (the tail of the queue, when queued)."""
        self.r.flushdb()
        self.store.announce(SPEC, "bench-worker")
        newest = self._completed(records)
        newest = self._queued(queued) or newest
        return {"k5serve": newest, "baseline": gateway_baseline.seed(self.r, records + queued)}

    def _completed(self, n: int) -> str | None:
        """n completed videos of the bench's key, written by a script inside Redis (a Python loop took 46 s for
        100k on a loaded machine): the same record under ids that keep the id format, in id order."""
        if n == 0:
            return None
        done = plan_job(VideoCreate(**REQUEST), SPEC, has_image=False)
        now = int(time.time())
        done = done.model_copy(
            update={"status": "completed", "progress": 100, "completed_at": now, "owner": self.owner}
        )
        prefix = f"video_{time.time_ns():016x}"
        template = done.model_dump_json(exclude_none=True)
        for start in range(0, n, 10_000):
            self.r.eval(
                _SEED_COMPLETED,
                1,
                keys.videos(self.owner),
                template,
                done.id,
                prefix,
                start,
                min(n, start + 10_000),
                self.store.record_ttl_s,
                keys.video("X").removesuffix("X"),
            )
        return f"{prefix}{n - 1:016x}"

    def _queued(self, n: int) -> str | None:
        """n jobs as POST creates them (record, index, in-flight set, RQ job), pipelined."""
        newest = None
        planned = plan_job(VideoCreate(**REQUEST), SPEC, has_image=False)
        planned.owner = self.owner
        for start in range(0, n, 500):
            with self.r.pipeline() as pipe:
                pipe.multi()  # RQ's enqueue joins a transaction only
                for _ in range(start, min(n, start + 500)):
                    rec = planned.model_copy(update={"id": new_video_id()})
                    newest = rec.id
                    pipe.set(keys.video(rec.id), rec.model_dump_json(exclude_none=True))
                    pipe.zadd(keys.videos(self.owner), {rec.id: 0})
                    pipe.sadd(keys.inflight(self.owner), rec.id)
                    self.store.enqueue(pipe, SPEC.id, rec.id, rec.id, description=f"video {rec.id}")
                pipe.execute()
        return newest


def commands(r: redis.Redis) -> dict[str, int]:
    """The commands the server has run so far, by name (those inside scripts included), as INFO commandstats counts
    them; INFO itself left out, as the counting asks for it."""
    return {k.removeprefix("cmdstat_"): v["calls"] for k, v in r.info("commandstats").items() if k != "cmdstat_info"}


def measure(r: redis.Redis, server: Server, endpoint: str, target: str | None, conc: int, seconds: float) -> dict:
    method, _, path = endpoint.partition(" ")
    url = server.base + path.replace("{id}", target or "none")
    headers = {"Authorization": f"Bearer {API_KEY}"} if server.kind == "k5serve" else {}
    before = commands(r)
    result = load.run(url, conc, seconds, body=json.dumps(REQUEST) if method == "POST" else None, headers=headers)
    delta = {k: v - before.get(k, 0) for k, v in commands(r).items() if v > before.get(k, 0)}
    top = sorted(delta.items(), key=lambda kv: -kv[1])[:3]
    per = max(1, result.requests)
    return {
        "rps": result.rps,
        "p50_ms": result.p50_ms,
        "p99_ms": result.p99_ms,
        "errors": result.errors,
        "cmds": sum(delta.values()) / per,
        "top": ", ".join(f"{k} {v / per:.3g}" for k, v in top),
    }


def settle(r: redis.Redis, quiet_s: float = 0.3, limit_s: float = 5.0) -> None:
    """Wait until Redis has been idle for quiet_s (at most limit_s): a server may still be answering requests of
    the wrk run before, which would count against the next exact count."""
    deadline, last = time.monotonic() + limit_s, None
    while time.monotonic() < deadline and (now := sum(commands(r).values())) != last:
        last = now
        time.sleep(quiet_s)


def count(r: redis.Redis, server: Server, endpoint: str, target: str | None, n: int = 20) -> dict:
    """Redis commands per request, exactly: n requests one after the other (no retries, nothing in flight),
    after 3 that are not counted. Those take what a gateway reads once per heartbeat (the roster of models, some
    40 commands), which would otherwise land on the first 20 requests after a start."""
    method, _, path = endpoint.partition(" ")
    headers = {"Authorization": f"Bearer {API_KEY}"} if server.kind == "k5serve" else {}
    with httpx.Client(base_url=server.base, headers=headers, timeout=60) as client:

        def send() -> None:
            sent = client.request(
                method, path.replace("{id}", target or "none"), json=REQUEST if method == "POST" else None
            )
            sent.raise_for_status()

        for _ in range(3):
            send()
        settle(r)
        before = commands(r)
        for _ in range(n):
            send()
        delta = {k: v - before.get(k, 0) for k, v in commands(r).items() if v > before.get(k, 0)}
    top = sorted(delta.items(), key=lambda kv: -kv[1])[:4]
    return {"seq": sum(delta.values()) / n, "seq_top": ", ".join(f"{k} {v / n:.3g}" for k, v in top)}


def median_row(runs: list[dict]) -> dict:
    row = {k: statistics.median(r[k] for r in runs) for k in ("rps", "p50_ms", "p99_ms", "cmds")}
    return {**row, "errors": sum(r["errors"] for r in runs), "top": runs[len(runs) // 2]["top"], "runs": len(runs)}


def compare(
    state: State, servers: list[Server], cases: list[tuple[str, int]], repeat: int, seconds: float, **seed: int
) -> list[dict]:
    """Each (endpoint, concurrency) on each server, interleaved, `repeat` times; medians per case and server.

    The database is seeded once per call: reads change nothing, and POSTs run last (they add videos, which
    cost the later requests nothing: every request's Redis work is independent of how many there are)."""
    targets = state.reset(**seed)
    endpoints = sorted(dict.fromkeys(e for e, _ in cases), key=lambda e: e.startswith("POST"))
    runs: dict[tuple[str, int, str], list[dict]] = {}
    exact = {}
    for endpoint in endpoints:
        for server in servers:  # exactly, before the runs: the state as seeded
            state.store.announce(SPEC, "bench-worker")  # a worker's heartbeat: the model stays online
            exact[(endpoint, server.name)] = count(state.r, server, endpoint, targets[server.kind])
        for conc in (c for e, c in cases if e == endpoint):
            for rep in range(repeat):
                for server in servers if rep % 2 == 0 else servers[::-1]:
                    state.store.announce(SPEC, "bench-worker")
                    got = measure(state.r, server, endpoint, targets[server.kind], conc, seconds)
                    runs.setdefault((endpoint, conc, server.name), []).append(got)
    rows = []
    for endpoint, conc in cases:
        row: dict = {"endpoint": endpoint, "concurrency": conc}
        for server in servers:
            med = median_row(runs[(endpoint, conc, server.name)]) | exact[(endpoint, server.name)]
            row |= {f"{server.name}_{k}": v for k, v in med.items()}
        rows.append(row)
    return rows


def ratios(rows: list[dict], ours: str = "k5serve", base: str = "baseline") -> list[dict]:
    for row in rows:
        if row.get(f"{base}_rps"):
            row["ratio"] = row[f"{ours}_rps"] / row[f"{base}_rps"]
    return rows


def meta() -> dict:
    cpu = next(
        (
            ln.split(":", 1)[1].strip()
            for ln in Path("/proc/cpuinfo").read_text().splitlines()
            if ln.startswith("model name")
        ),
        platform.processor(),
    )
    redis_v = subprocess.run(["redis-server", "--version"], capture_output=True, text=True).stdout.split()[2]
    wrk_v = subprocess.run([load.wrk_path(), "-v"], capture_output=True, text=True).stdout.split()[1]
    import fastapi
    import uvicorn

    return {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{os.cpu_count()} cores, {cpu}",
        "software": f"Python {platform.python_version()}, FastAPI {fastapi.__version__}, uvicorn "
        f"{uvicorn.__version__}, redis-server {redis_v.removeprefix('v=')}, wrk {wrk_v}",
        "load_before": os.getloadavg()[0],
    }


MAIN_COLUMNS = [
    ("endpoint", "endpoint", "{}"),
    ("conc.", "concurrency", "{}"),
    ("k5serve req/s", "k5serve_rps", "{:.0f}"),
    ("k5serve p50 ms", "k5serve_p50_ms", "{:.2f}"),
    ("k5serve p99 ms", "k5serve_p99_ms", "{:.2f}"),
    ("baseline req/s", "baseline_rps", "{:.0f}"),
    ("baseline p50 ms", "baseline_p50_ms", "{:.2f}"),
    ("ratio", "ratio", "{:.2f}"),
    ("k5serve Redis cmds/req", "k5serve_seq", "{:.1f}"),
    ("baseline cmds/req", "baseline_seq", "{:.1f}"),
    ("k5serve top commands/req", "k5serve_seq_top", "{}"),
    ("k5serve cmds/req under load", "k5serve_cmds", "{:.1f}"),
    ("errors", "errors", "{}"),
]
SCALE_COLUMNS = [("state", "state", "{}")] + [c for c in MAIN_COLUMNS if c[1] != "concurrency"]
PROCESS_COLUMNS = [
    ("endpoint", "endpoint", "{}"),
    ("conc.", "concurrency", "{}"),
    *[
        (f"{title} {what}", f"{key}_{field}", fmt)
        for title, key in [("1 process", "one"), ("--workers 2", "two"), ("uvicorn --workers 2 (before)", "legacy")]
        for what, field, fmt in [("req/s", "rps", "{:.0f}"), ("p50 ms", "p50_ms", "{:.2f}")]
    ],
]


def run(args: argparse.Namespace) -> dict:
    info = meta()
    out: dict = {"meta": info, "args": vars(args)}
    with tempfile.TemporaryDirectory(prefix="k5-gwbench-") as tmp_name, ExitStack() as stack:
        tmp = Path(tmp_name)
        server = RedisServer(tmp / "redis").start()
        stack.callback(server.stop)
        r = redis.Redis.from_url(server.url)
        state = State(r, server.url)
        state.reset()
        one = stack.enter_context(serving("k5serve", "k5serve", *k5serve(server.url, tmp, 1)))
        port = free_port()
        cmd = [sys.executable, "-m", "uvicorn", "bench.gateway_baseline:create_app", "--factory", "--port", str(port)]
        baseline = stack.enter_context(serving("baseline", "baseline", cmd, {"BENCH_REDIS_URL": server.url}, port))
        pair = [one, baseline]
        if "main" in args.sections:
            cases = [(e, c) for e in ENDPOINTS for c in args.concurrency]
            out["main"] = ratios(compare(state, pair, cases, args.repeat, args.duration))
            for row in out["main"]:
                row["errors"] = row["k5serve_errors"] + row["baseline_errors"]
        if "scale" in args.sections:
            out["scale"] = []
            cases = [(e, args.scale_concurrency) for e in ENDPOINTS[:3]]
            for kind, sizes in (("records", args.records), ("queued", args.queued)):
                for n in sizes:
                    seed = {"records": n, "queued": 0} if kind == "records" else {"records": 0, "queued": n}
                    for row in ratios(compare(state, pair, cases, args.repeat, args.duration, **seed)):
                        row["state"] = f"{n:,} {'completed records' if kind == 'records' else 'queued jobs'}"
                        row["errors"] = row["k5serve_errors"] + row["baseline_errors"]
                        out["scale"].append(row)
        if "processes" in args.sections:
            two = stack.enter_context(serving("two", "k5serve", *k5serve(server.url, tmp, 2)))
            legacy = stack.enter_context(serving("legacy", "k5serve", *k5serve(server.url, tmp, 2, legacy=True)))
            one = Server("one", "k5serve", one.base)
            cases = [("GET /v1/videos/{id}", c) for c in args.process_concurrency]
            out["processes"] = compare(state, [one, two, legacy], cases, args.repeat, args.duration)
    info["load_after"] = os.getloadavg()[0]
    return out


def render(out: dict) -> str:
    m = out["meta"]
    parts = [
        f"{m['date']}; {m['machine']}; {m['software']}; load average {m['load_before']:.1f} before, "
        f"{m['load_after']:.1f} after; medians of {out['args']['repeat']} interleaved runs of "
        f"{out['args']['duration']:g} s each (wrk, 1 thread)."
    ]
    if "main" in out:
        parts.append(
            f"Concurrency {', '.join(map(str, out['args']['concurrency']))}; {BASE_QUEUED} queued jobs:\n\n"
            + table(out["main"], MAIN_COLUMNS)
        )
    if "scale" in out:
        parts.append(
            f"Scaling, concurrency {out['args']['scale_concurrency']}:\n\n" + table(out["scale"], SCALE_COLUMNS)
        )
    if "processes" in out:
        parts.append("Gateway processes, GET /v1/videos/{id}:\n\n" + table(out["processes"], PROCESS_COLUMNS))
    return "\n\n".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="every section once, in seconds (a wiring check)")
    parser.add_argument("--full", action="store_true", help="5 runs of 3 s per figure, and the processes section")
    parser.add_argument("--duration", type=int, help="whole seconds per run, as wrk takes them (default 2; --full 3)")
    parser.add_argument("--repeat", type=int, help="runs per figure, median reported (default 3; --full 5)")
    parser.add_argument("--sections", help="default main,scale (--full and --smoke: main,scale,processes)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    load.wrk_path()  # says how to install it, before anything starts
    full, smoke = args.full, args.smoke
    args.sections = (args.sections or ("main,scale,processes" if full or smoke else "main,scale")).split(",")
    args.duration = args.duration or (1 if smoke else 3 if full else 2)
    args.repeat = args.repeat or (1 if smoke else 5 if full else 3)
    args.concurrency = [1] if smoke else [1, 16, 64]
    args.scale_concurrency = 16
    args.records = [100] if smoke else [1000, 10_000, 100_000]
    args.queued = [] if smoke else [1000, 10_000]
    args.process_concurrency = [1] if smoke else [1, 16]
    out = run(args)
    print(render(out))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2, default=str))


if __name__ == "__main__":
    main()
