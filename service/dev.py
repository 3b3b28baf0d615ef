"""`k5serve dev`: the whole stack on one machine, stopped together on Ctrl-C.

Starts what is not configured: Redis (unless K5_REDIS_URL is set), optionally a SeaweedFS S3 endpoint, one
worker per model (K5_MODEL, or the tiny text-to-video and image-to-video models built on first use), and the
gateway. Every child is a real process, started the way production starts it: `k5serve gateway|worker`.
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

from service.jobs import JobStore, connect_redis
from service.localstack import RedisServer, SeaweedS3, free_port, stop_process
from service.models import SPEC_FILE, resolve_model
from service.settings import Settings
from service.webhooks import new_secret


def _child(command: str, env: dict[str, str]) -> subprocess.Popen:
    # Own sessions: Ctrl-C reaches only `k5serve dev`, which then stops workers and gateway before Redis.
    return subprocess.Popen([sys.executable, "-m", "service.cli", command], env=env, start_new_session=True)


def _tiny_models(state_dir: Path, env: dict[str, str]) -> list[str]:
    tiny = state_dir / "tiny"
    dirs = [tiny / "t2v", tiny / "i2v"]
    if not all((d / SPEC_FILE).is_file() for d in dirs):
        print(f"k5serve dev: building the tiny models in {tiny} ...", flush=True)
        subprocess.run([sys.executable, "-m", "service.cli", "tiny-model", str(tiny)], env=env, check=True)
    return [str(d) for d in dirs]


def run_dev(settings: Settings, state_dir: Path, use_s3: bool = False) -> int:
    env = dict(os.environ)
    env.setdefault("K5_ALLOW_ANONYMOUS", "true")
    env.setdefault("HF_HUB_OFFLINE", "1" if "K5_MODEL" not in os.environ else env.get("HF_HUB_OFFLINE", "0"))
    with contextlib.ExitStack() as stack:
        if "K5_REDIS_URL" not in os.environ:
            redis_server = RedisServer(state_dir / "redis").start()
            stack.callback(redis_server.stop)
            env["K5_REDIS_URL"] = redis_server.url
        if use_s3 and "K5_STORAGE_URL" not in os.environ:
            s3 = SeaweedS3(state_dir / f"s3-{os.getpid()}").start()
            stack.callback(s3.stop)
            env.update(s3.env, K5_STORAGE_URL="s3://k5serve/videos", K5_S3_ENDPOINT_URL=s3.endpoint)
            os.environ.update(s3.env)
            from service.storage import S3Storage

            S3Storage("k5serve", "videos", Settings(s3_endpoint_url=s3.endpoint)).ensure_bucket()
        env.setdefault("K5_STORAGE_URL", "file://" + str(state_dir / "data"))

        if "K5_WEBHOOK_SECRET" not in os.environ:
            # A fresh signing secret per run, printed in the banner so a local receiver can verify.
            env["K5_WEBHOOK_SECRET"] = new_secret()
            env.setdefault("K5_WEBHOOK_ALLOWED_HOSTS", "127.0.0.1,::1,localhost")

        models = [os.environ["K5_MODEL"]] if os.environ.get("K5_MODEL") else _tiny_models(state_dir, env)
        children: list[subprocess.Popen] = []
        stack.callback(lambda: [stop_process(p, timeout=30) for p in reversed(children)])
        ports: dict[str, int] = {}
        for model in models:
            ports[f"worker {Path(model).name}"] = port = free_port()
            children.append(_child("worker", {**env, "K5_MODEL": model, "K5_METRICS_PORT": str(port)}))
        ports["webhooks"] = port = free_port()
        children.append(_child("webhooks", {**env, "K5_METRICS_PORT": str(port)}))
        children.append(_child("gateway", env))

        # SIGTERM (e.g. from `timeout` or a supervisor) stops the stack like Ctrl-C does.
        signal.signal(signal.SIGTERM, _interrupt)
        try:
            ids = [resolve_model(m).id for m in models]
            _wait_ready(settings, env, ids, children)
            _banner(settings, ids, ports, env["K5_WEBHOOK_SECRET"])
            while all(p.poll() is None for p in children):
                time.sleep(0.5)
            print("k5serve dev: a process exited; stopping the stack", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("\nk5serve dev: stopping ...", flush=True)
            return 0


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt


def _wait_ready(settings: Settings, env: dict[str, str], model_ids: list[str], children: list) -> None:

    store = JobStore(connect_redis(Settings(redis_url=env["K5_REDIS_URL"])), settings)
    url = f"http://{settings.host}:{settings.port}/readyz"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if any(p.poll() is not None for p in children):
            raise SystemExit("k5serve dev: a process failed to start (see its log above)")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=2).status_code == 200 and all(store.workers_online(m) > 0 for m in model_ids):
                return
        time.sleep(0.5)
    raise SystemExit("k5serve dev: the stack did not become ready within 10 minutes")


def _banner(settings: Settings, model_ids: list[str], ports: dict[str, int], secret: str) -> None:
    base = f"http://{settings.host}:{settings.port}"
    metrics_urls = ", ".join(f"{name} :{port}" for name, port in ports.items())
    print(
        f"""
k5serve is ready at {base}  (models: {", ".join(model_ids)}; Ctrl-C stops everything)
  metrics: {base}/metrics, {metrics_urls}
  webhook signing secret: {secret}

  # create a video
  curl -s {base}/v1/videos -H 'Content-Type: application/json' \\
       -d '{{"prompt": "a red fox running through fresh snow", "seed": 42}}'
  # poll it (status, progress), then download the MP4
  curl -s {base}/v1/videos/VIDEO_ID
  curl -sL -o fox.mp4 {base}/v1/videos/VIDEO_ID/content
""",
        flush=True,
    )
