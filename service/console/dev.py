"""`k5serve dev`: the whole stack on one machine, stopped together on Ctrl-C.

Starts what is not configured: Redis (unless K5_REDIS_URL is set), optionally a SeaweedFS S3 endpoint, one
worker per model (K5_MODEL, or the tiny text-to-video and image-to-video models built on first use), and the
gateway. Every child is a real process, started the way production starts it: `k5serve gateway|worker`.

What it starts keeps its data in the state directory (.k5), so a restart finds it all again: the videos in data/,
Redis's append-only file in redis/ (records, queued jobs, webhook deliveries), the webhook signing secret. Only a
`--s3` run's SeaweedFS is fresh each time, and so then is its Redis. Remove the directory to start fresh.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from service.console.dev_state import ChildRecord
from service.console.localstack import RedisServer, SeaweedS3, die_with_parent, free_port, port_busy_message
from service.contract.models import SPEC_FILE, resolve_model
from service.contract.settings import Settings
from service.contract.webhooks import new_secret

# The workers' shutdown grace unless K5_SHUTDOWN_GRACE_S is set: Ctrl-C stops a running job at a step within seconds
# (it is requeued and runs again on the next start) instead of waiting for it as long as production does.
DEV_SHUTDOWN_GRACE_S = 5.0
# How long a child may take to stop after its grace (a step to finish, a requeue, an upload) before it is killed.
STOP_MARGIN_S = 30.0


def _child(command: str, env: dict[str, str]) -> subprocess.Popen:
    # Own sessions: Ctrl-C reaches only `k5serve dev`, which then stops workers and gateway before Redis. And each
    # gets SIGTERM if `k5serve dev` dies without stopping them (a SIGKILL, an OOM kill): none outlives the stack.
    return subprocess.Popen(
        [sys.executable, "-m", "service.cli", command], env=env, start_new_session=True, preexec_fn=die_with_parent()
    )


def _tiny_models(state_dir: Path, env: dict[str, str]) -> list[str]:
    tiny = state_dir / "tiny"
    dirs = [tiny / "t2v", tiny / "i2v"]
    if not all((d / SPEC_FILE).is_file() for d in dirs):
        print(f"k5serve dev: building the tiny models in {tiny} ...", flush=True)
        # Dies with `k5serve dev` like the stack's children: a SIGKILLed start leaves no builder running.
        subprocess.run(
            [sys.executable, "-m", "service.cli", "tiny-model", str(tiny)],
            env=env,
            check=True,
            preexec_fn=die_with_parent(),
        )
    return [str(d) for d in dirs]


def _webhook_secret(state_dir: Path) -> str:
    """The signing secret of this state directory: deliveries that survive a restart still verify, and a local
    receiver keeps the secret it was given."""
    path = state_dir / "webhook-secret"
    if not path.is_file():
        state_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(new_secret() + "\n")
    return path.read_text().strip()


def run_dev(settings: Settings, state_dir: Path, use_s3: bool = False) -> int:
    record = ChildRecord(state_dir)
    record.claim()  # refuses a second live `k5serve dev` here; stops what a killed one left running
    if message := port_busy_message(settings.host, settings.port):
        raise SystemExit(f"k5serve dev: {message}")
    env = dict(os.environ)
    env.setdefault("K5_ALLOW_ANONYMOUS", "true")
    env.setdefault("HF_HUB_OFFLINE", "1" if "K5_MODEL" not in os.environ else env.get("HF_HUB_OFFLINE", "0"))
    grace_s = settings.shutdown_grace_s if "K5_SHUTDOWN_GRACE_S" in os.environ else DEV_SHUTDOWN_GRACE_S
    env["K5_SHUTDOWN_GRACE_S"] = str(grace_s)
    private_s3 = use_s3 and "K5_STORAGE_URL" not in os.environ
    with contextlib.ExitStack() as stack:
        stack.callback(record.release)  # runs last, once everything it lists is stopped
        redis_url = None
        if "K5_REDIS_URL" not in os.environ:
            # Persistent unless the videos are not: a fresh SeaweedFS would leave the records pointing at nothing.
            redis_server = RedisServer(state_dir / "redis", appendonly=not private_s3, die_with_owner=True)
            if (pid := redis_server.running_elsewhere()) is not None:
                raise SystemExit(
                    f"k5serve dev: redis-server (pid {pid}) still runs on {redis_server.workdir}: another `k5serve dev`"
                    f" uses {state_dir}, or one was killed (then stop it: kill {pid})"
                )
            redis_server.start()
            stack.callback(redis_server.stop)
            record.add(redis_server.proc)
            env["K5_REDIS_URL"] = redis_url = redis_server.url
        if private_s3:
            s3 = SeaweedS3(state_dir / f"s3-{os.getpid()}", die_with_owner=True).start()
            stack.callback(s3.stop)
            record.add(s3.proc)
            env.update(s3.env, K5_STORAGE_URL="s3://k5serve/videos", K5_S3_ENDPOINT_URL=s3.endpoint)
            os.environ.update(s3.env)
            from service.contract.storage import S3Storage

            S3Storage("k5serve", "videos", Settings(s3_endpoint_url=s3.endpoint)).ensure_bucket()
        env.setdefault("K5_STORAGE_URL", "file://" + str(state_dir / "data"))

        if "K5_WEBHOOK_SECRET" not in os.environ:
            # The state directory's signing secret, printed in the banner so a local receiver can verify.
            env["K5_WEBHOOK_SECRET"] = _webhook_secret(state_dir)
            env.setdefault("K5_WEBHOOK_ALLOWED_HOSTS", "127.0.0.1,::1,localhost")

        models = [os.environ["K5_MODEL"]] if os.environ.get("K5_MODEL") else _tiny_models(state_dir, env)
        children: list[tuple[subprocess.Popen, float]] = []  # with how long each may take to stop
        stack.callback(_stop_children, children)
        ports: dict[str, int] = {}
        for model in models:
            ports[f"worker {Path(model).name}"] = port = free_port()
            worker = _child("worker", {**env, "K5_MODEL": model, "K5_METRICS_PORT": str(port)})
            children.append((worker, grace_s + STOP_MARGIN_S))
        ports["webhooks"] = port = free_port()
        children.append((_child("webhooks", {**env, "K5_METRICS_PORT": str(port)}), STOP_MARGIN_S))
        children.append((_child("gateway", env), STOP_MARGIN_S))
        for child, _ in children:
            record.add(child)

        # SIGTERM (e.g. from `timeout` or a supervisor) and SIGHUP (the terminal closed) stop the stack like Ctrl-C.
        signal.signal(signal.SIGTERM, _interrupt)
        signal.signal(signal.SIGHUP, _interrupt)
        procs = [p for p, _ in children]
        try:
            ids = [resolve_model(m).id for m in models]
            worker_ports = [port for name, port in ports.items() if name.startswith("worker ")]
            _wait_ready(settings, worker_ports, procs)
            kept = "fresh each run with --s3" if private_s3 else "kept across restarts; remove it to start fresh"
            _banner(settings, ids, ports, env["K5_WEBHOOK_SECRET"], redis_url, f"{state_dir} ({kept})", grace_s)
            while all(p.poll() is None for p in procs):
                time.sleep(0.5)
            print("k5serve dev: a process exited; stopping the stack", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("\nk5serve dev: stopping ...", flush=True)
            return 0


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt


def _stop_children(children: list[tuple[subprocess.Popen, float]]) -> None:
    """SIGTERM to all at once (busy workers use their grace side by side), then wait for each, killing one that
    outlasts its time. Another Ctrl-C meanwhile signals them again: a worker then stops its job at the next step."""
    started = time.monotonic()
    for proc, _ in reversed(children):
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc, timeout in reversed(children):
        while True:
            try:
                proc.wait(max(0.0, started + timeout - time.monotonic()))
                break
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
                break
            except KeyboardInterrupt:
                print("\nk5serve dev: stopping the running jobs now ...", flush=True)
                for p, _ in children:
                    if p.poll() is None:
                        p.send_signal(signal.SIGTERM)


def _wait_ready(settings: Settings, worker_ports: list[int], children: list[subprocess.Popen]) -> None:
    """The gateway answers and every worker is warm. A worker's own readiness, not the workers registered in Redis:
    those of a previous run that was killed stay registered for a while."""
    urls = [f"http://{settings.host}:{settings.port}/readyz"]
    urls += [f"http://{settings.host}:{port}/readyz" for port in worker_ports]
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if any(p.poll() is not None for p in children):
            raise SystemExit("k5serve dev: a process failed to start (see its log above)")
        with contextlib.suppress(httpx.HTTPError):
            if all(httpx.get(url, timeout=2).status_code == 200 for url in urls):
                return
        time.sleep(0.5)
    raise SystemExit("k5serve dev: the stack did not become ready within 10 minutes")


def _banner(
    settings: Settings,
    model_ids: list[str],
    ports: dict[str, int],
    secret: str,
    redis_url: str | None,
    state: str,
    grace_s: float,
) -> None:
    base = f"http://{settings.host}:{settings.port}"
    # A client in another terminal reads the same variables; one set only in this shell must be set there too.
    port_hint = "" if settings.port == 8000 else f" (here K5_PORT={settings.port}: export it there too)"
    metrics_urls = ", ".join(f"{name} :{port}" for name, port in ports.items())
    redis = f"{redis_url} (K5_REDIS_URL for k5serve deliveries)" if redis_url else "K5_REDIS_URL, as configured"
    print(
        f"""
k5serve is ready at {base}  (models: {", ".join(model_ids)}; Ctrl-C stops everything)
  clients: `k5serve generate`, `k5serve videos`, `k5serve models` in another terminal find it through K5_HOST
  and K5_PORT{port_hint},
  or K5_SERVER={base} (the openai SDK: base_url={base}/v1)
  metrics: {base}/metrics, {metrics_urls}
  redis: {redis}
  webhook signing secret: {secret}
  state: {state}
  Ctrl-C gives running jobs {grace_s:g} s (K5_SHUTDOWN_GRACE_S), then requeues them for the next start

  # create a video
  curl -s {base}/v1/videos -H 'Content-Type: application/json' \\
       -d '{{"prompt": "a red fox running through fresh snow", "seed": 42}}'
  # poll it (status, progress), then download the MP4
  curl -s {base}/v1/videos/VIDEO_ID
  curl -sL -o fox.mp4 {base}/v1/videos/VIDEO_ID/content
""",
        flush=True,
    )
