"""Chaos bench: the real stack on the tiny model while workers are SIGKILLed mid-job and Redis is restarted.

    python -m bench.chaos --jobs 40 --kills 8 --workers 3 --seed 1

Starts redis-server with an append-only file (fsync always, so a restart loses nothing it acknowledged), SeaweedFS
S3, the gateway, the webhook deliverer and W tiny text-to-video workers as real processes, plus a webhook receiver
on loopback. Submits N jobs with a webhook_url, then K times SIGKILLs a worker that is running a job (and starts a
replacement), restarts Redis once half-way (SIGKILL, then start on the same port and directory), and waits until
every job is terminal. Expected: lost 0, completed twice 0, one terminal event per job.

Each kill waits until the replacements of earlier victims are up, as independent failures of a pool would. With
`--rapid` it does not: kills then land while most of the pool is still loading, on the few jobs running, which are
the requeued ones (they go to the head of the queue), so the same job dies again and again and ends `worker_lost`
after K5_MAX_ATTEMPTS runs, as it should.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import redis

from service.console.localstack import RedisServer, SeaweedS3, free_port, stop_process
from service.contract.clock import redis_clock
from service.contract.jobs import JobStore
from service.contract.models import resolve_model
from service.contract.settings import Settings
from service.contract.storage import S3Storage

ROOT = Path(__file__).resolve().parents[1]
BUCKET = "k5chaos"
SECRET = "whsec_" + base64.b64encode(b"k5serve-chaos-bench-secret-00001").decode()
TERMINAL = ("completed", "failed")


class Receiver:
    """A webhook endpoint on loopback that remembers every delivery: (event id, type) per video id."""

    def __init__(self) -> None:
        self.events: dict[str, list[tuple[str, str]]] = defaultdict(list)
        lock = threading.Lock()
        events = self.events

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                body = json.loads(self.rfile.read(int(self.headers.get("content-length", 0))))
                with lock:
                    events[body["data"]["id"]].append((body["id"], body["type"]))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def close(self) -> None:
        self.server.shutdown()


@dataclass
class Result:
    submitted: int = 0
    completed: int = 0
    failed: Counter = field(default_factory=Counter)
    completed_twice: int = 0
    lost: int = 0
    # Per job: deliveries received, and distinct terminal events (the exactly-once measure).
    deliveries: dict[str, int] = field(default_factory=dict)
    terminal_events: dict[str, int] = field(default_factory=dict)
    attempts: Counter = field(default_factory=Counter)
    kills: int = 0
    redis_restarts: int = 0
    seconds: float = 0.0

    def table(self) -> str:
        d = list(self.deliveries.values()) or [0]
        rows = [
            ("submitted", self.submitted),
            ("completed", self.completed),
            *((f"failed ({code})", n) for code, n in sorted(self.failed.items())),
            ("completed twice", self.completed_twice),
            ("lost (not terminal)", self.lost),
            ("webhook deliveries per job (min/max)", f"{min(d)}/{max(d)}"),
            ("jobs by runs started", ", ".join(f"{k}: {v}" for k, v in sorted(self.attempts.items()))),
            ("workers SIGKILLed mid-job", self.kills),
            ("Redis restarts", self.redis_restarts),
            ("wall seconds", f"{self.seconds:.1f}"),
        ]
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"| {k:<{width}} | {v!s:>12} |" for k, v in rows)


class Chaos:
    def __init__(self, workdir: Path, workers: int, seed: int, steps: int, rapid: bool = False) -> None:
        self.workdir, self.n_workers, self.steps, self.rapid = workdir, workers, steps, rapid
        self.rng = random.Random(seed)
        self.procs: dict[str, subprocess.Popen] = {}
        self.others: list[subprocess.Popen] = []
        self.generation = 0

    def start(self) -> None:
        from worker.tiny import save_tiny_models

        self.model_dir = save_tiny_models(self.workdir / "tiny")["t2v"]
        self.model = resolve_model(str(self.model_dir)).id
        self.redis = RedisServer(self.workdir / "redis", appendonly=True).start()
        self.s3 = SeaweedS3(self.workdir / "s3").start()
        os.environ.update(self.s3.env)
        self.receiver = Receiver()
        port = free_port()
        self.base_url = f"http://127.0.0.1:{port}"
        self.env = {
            **os.environ,
            **self.s3.env,
            "K5_HOST": "127.0.0.1",
            "K5_PORT": str(port),
            "K5_REDIS_URL": self.redis.url,
            "K5_STORAGE_URL": f"s3://{BUCKET}/videos",
            "K5_S3_ENDPOINT_URL": self.s3.endpoint,
            "K5_HEARTBEAT_S": "1",
            "K5_ALLOW_ANONYMOUS": "true",
            "K5_MAX_INFLIGHT_PER_KEY": "10000",
            "K5_RATE_LIMIT_PER_MIN": "100000",
            "K5_WEBHOOK_SECRET": SECRET,
            "K5_WEBHOOK_ALLOWED_HOSTS": "127.0.0.1",
            "K5_WEBHOOK_RETRY_BASE_S": "0.2",
            "K5_WEBHOOK_RETRY_MAX_S": "1",
            "K5_LOG_LEVEL": "INFO",
            "HF_HUB_OFFLINE": "1",
            "PYTHONUNBUFFERED": "1",
        }
        settings = Settings(redis_url=self.redis.url, s3_endpoint_url=self.s3.endpoint, heartbeat_s=1)
        S3Storage(BUCKET, "", settings).ensure_bucket()
        self.store = JobStore(redis.Redis.from_url(self.redis.url), settings)
        for _ in range(self.n_workers):
            self.start_worker()
        self.others.append(self._spawn("webhooks", "webhooks"))
        self.others.append(self._spawn("gateway", "gateway"))
        self.wait_ready(self.n_workers)

    def _spawn(self, command: str, name: str, **extra: str) -> subprocess.Popen:
        log = (self.workdir / f"{name}.log").open("ab")
        env = {**self.env, "K5_METRICS_PORT": str(free_port()), **extra}
        return subprocess.Popen(
            [sys.executable, "-m", "service.cli", command], env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT
        )

    def start_worker(self) -> str:
        self.generation += 1
        name = f"chaos-w{self.generation}"
        # One thread each: several CPU workers on a small box otherwise fight over every core.
        self.procs[name] = self._spawn(
            "worker", name, K5_MODEL=str(self.model_dir), K5_WORKER_NAME=name, OMP_NUM_THREADS="1"
        )
        return name

    def wait_ready(self, workers: int, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                ready = httpx.get(self.base_url + "/readyz", timeout=2).status_code == 200
                if ready and self.store.workers_online(self.model) >= workers:
                    return
            except (httpx.HTTPError, redis.RedisError):
                pass
            time.sleep(0.3)
        raise RuntimeError(f"stack not ready after {timeout}s; logs in {self.workdir}")

    def submit(self, n: int) -> list[str]:
        ids = []
        with httpx.Client(base_url=self.base_url, timeout=30) as c:
            for i in range(n):
                body = {
                    "prompt": f"chaos {i}",
                    "model": self.model,
                    "num_inference_steps": self.steps,
                    "webhook_url": self.receiver.url,
                }
                resp = c.post("/v1/videos", json=body)
                resp.raise_for_status()
                ids.append(resp.json()["id"])
        return ids

    def records(self, ids: list[str]) -> dict[str, object]:
        return {i: self.store.get(i) for i in ids}

    def pool_up(self) -> bool:
        """Every worker process is warm and beating (a replacement announces itself once loaded)."""
        now = redis_clock(self.store.r)  # beats are on Redis's clock
        beats = [self.store.r.zscore(f"k5:workers:{self.model}", name) for name in self.procs]
        return all(beat is not None and now - beat < 3 for beat in beats)

    def kill_one_running(self, ids: list[str], timeout: float = 60) -> bool:
        """SIGKILL a worker while it runs a job (past its first steps), then start a replacement."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if not self.rapid and not self.pool_up():
                    time.sleep(0.05)
                    continue
                running = [
                    rec
                    for rec in self.records(ids).values()
                    if rec is not None and rec.status == "in_progress" and rec.progress > 5 and rec.worker in self.procs
                ]
            except redis.RedisError:
                running = []
            if running:
                victim = self.rng.choice(running).worker
                proc = self.procs.pop(victim)
                proc.kill()
                proc.wait(10)
                print(f"chaos: SIGKILL {victim}", flush=True)
                self.start_worker()
                return True
            if all(r is not None and r.status in TERMINAL for r in self.records(ids).values()):
                return False
            time.sleep(0.05)
        return False

    def restart_redis(self, outage_s: float = 1.0) -> None:
        print("chaos: Redis SIGKILL + restart", flush=True)
        assert self.redis.proc is not None
        self.redis.proc.kill()  # the hard way: only the fsynced AOF survives
        self.redis.proc.wait(10)
        time.sleep(outage_s)
        self.redis.start()

    def stop(self) -> None:
        for p in [*self.procs.values(), *reversed(self.others)]:
            stop_process(p, timeout=20)
        self.receiver.close()
        self.redis.stop()
        self.s3.stop()


def run_chaos(
    jobs: int,
    kills: int,
    workers: int,
    seed: int = 0,
    redis_restart: bool = True,
    steps: int = 12,
    timeout: float = 600,
    workdir: Path | None = None,
    rapid: bool = False,
) -> Result:
    with tempfile.TemporaryDirectory(prefix="k5-chaos-") as tmp:
        chaos = Chaos(Path(workdir or tmp), workers, seed, steps, rapid)
        t0 = time.monotonic()
        try:
            chaos.start()
            result = Result()
            ids = chaos.submit(jobs)
            result.submitted = len(ids)
            restart_at = kills // 2 if redis_restart else -1
            for k in range(kills):
                if k == restart_at:
                    chaos.restart_redis()
                    result.redis_restarts += 1
                if chaos.kill_one_running(ids):
                    result.kills += 1
                time.sleep(chaos.rng.uniform(0.2, 1.5))
            if redis_restart and restart_at >= kills:
                chaos.restart_redis()
                result.redis_restarts += 1

            deadline = time.monotonic() + timeout
            recs: dict = {}
            while time.monotonic() < deadline:
                try:
                    recs = chaos.records(ids)
                except redis.RedisError:
                    time.sleep(0.5)
                    continue
                if all(r is not None and r.status in TERMINAL for r in recs.values()):
                    break
                time.sleep(0.3)
            # Every terminal job's event, then a little longer to catch any duplicate.
            while time.monotonic() < deadline and any(
                not chaos.receiver.events.get(i) for i, r in recs.items() if r is not None and r.status in TERMINAL
            ):
                time.sleep(0.2)
            time.sleep(3)

            for i, rec in recs.items():
                events = chaos.receiver.events.get(i, [])
                distinct = {e for e in events if e[1] in ("video.completed", "video.failed")}
                result.deliveries[i] = len(events)
                result.terminal_events[i] = len(distinct)
                if sum(t == "video.completed" for _, t in distinct) > 1:
                    result.completed_twice += 1
                result.attempts[int(chaos.store.r.hget(f"k5:attempt:{i}", "n") or 0)] += 1
                if rec is None or rec.status not in TERMINAL:
                    result.lost += 1
                elif rec.status == "completed":
                    result.completed += 1
                else:
                    result.failed[rec.error.code if rec.error else "unknown"] += 1
            result.seconds = time.monotonic() - t0
            return result
        finally:
            chaos.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=40)
    parser.add_argument("--kills", type=int, default=8)
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=12, help="denoising steps per job (longer jobs, more kills)")
    parser.add_argument("--no-redis-restart", action="store_true")
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--keep-logs", type=Path, help="directory for the processes' logs (kept)")
    parser.add_argument("--rapid", action="store_true", help="kill without waiting for replacements to be up")
    args = parser.parse_args()
    if args.keep_logs:
        args.keep_logs.mkdir(parents=True, exist_ok=True)
    result = run_chaos(
        args.jobs,
        args.kills,
        args.workers,
        args.seed,
        not args.no_redis_restart,
        args.steps,
        args.timeout,
        args.keep_logs,
        args.rapid,
    )
    print(result.table())
    sys.exit(0 if result.lost == 0 and result.completed_twice == 0 else 1)


if __name__ == "__main__":
    main()
