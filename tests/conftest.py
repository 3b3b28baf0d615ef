"""Real parts at the edges: a redis-server and a SeaweedFS S3 endpoint on free loopback ports, the tiny
Kandinsky 5 checkpoints built once per session, and the service's own processes started as in production."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import redis

from service.console.localstack import RedisServer, SeaweedS3, die_with_parent, free_port, stop_process, wait_for_port
from service.contract.jobs import JobStore
from service.contract.models import resolve_model
from service.contract.settings import Settings
from service.contract.storage import S3Storage
from service.gateway.auth import owner_of

ROOT = Path(__file__).resolve().parents[1]
BUCKET = "k5test"
# Two API keys: the stack serves with authentication on, as production does; bob checks isolation.
API_KEY, OTHER_API_KEY = "sk-test-alice-0123456789", "sk-test-bob-0123456789"
# Keys of the usage tests alone, so their totals hold only their own videos: carol has a metrics label of her
# own (K5_USAGE_LABELS), dave makes no video at all.
USAGE_API_KEY, IDLE_API_KEY = "sk-test-carol-0123456789", "sk-test-dave-0123456789"
WEBHOOK_SECRET = "whsec_" + base64.b64encode(b"k5serve-test-webhook-secret-0001").decode()


def child_preexec() -> None:
    """preexec_fn of every process a test starts. SIGINT back to its default: a suite run with SIGINT ignored (a
    script's background job) hands that on to children, which then never see the Ctrl-C a test sends them. And
    SIGTERM to the child if this process dies, even by SIGKILL: a killed run leaves no server behind."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    if _die_with_us is not None:
        _die_with_us()


_die_with_us = die_with_parent()


@contextlib.contextmanager
def gateway_process(redis_url: str, tmp_path: Path, *args: str, **env: str) -> Iterator[str]:
    """A `k5serve gateway [ARGS]` process of its own (anonymous, file storage, the given Redis): its base URL."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "gateway", *args],
        env={
            **os.environ,
            "K5_PORT": str(port),
            "K5_REDIS_URL": redis_url,
            "K5_STORAGE_URL": f"file://{tmp_path}",
            "K5_ALLOW_ANONYMOUS": "true",
            **env,
        },
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=child_preexec,
    )
    try:
        wait_for_port(port, 60, proc)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_process(proc)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"), die_with_owner=True).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory) -> Iterator[SeaweedS3]:
    server = SeaweedS3(tmp_path_factory.mktemp("s3"), die_with_owner=True).start()
    os.environ.update(server.env)  # boto3 in this process finds the credentials the standard way
    yield server
    server.stop()


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    from worker.tiny import save_tiny_models

    return save_tiny_models(tmp_path_factory.mktemp("tiny"))


@pytest.fixture
def r(redis_server) -> Iterator[redis.Redis]:
    """A clean Redis database for one test (db 1; the session stack lives in db 0)."""
    conn = redis.Redis.from_url(redis_server.url.replace("/0", "/1"))
    conn.flushdb()
    yield conn
    conn.flushdb()


@pytest.fixture
def s3_settings(s3_server, tmp_path) -> Settings:
    settings = Settings(
        storage_url=f"s3://{BUCKET}/t-{tmp_path.name}", s3_endpoint_url=s3_server.endpoint, heartbeat_s=1
    )
    S3Storage(BUCKET, "", settings).ensure_bucket()
    return settings


def stored(storage: S3Storage, video_id: str) -> list[str]:
    """Every object stored for a video (its input, every run's files), as keys under the video's prefix."""
    full = storage._key(video_id) + "/"
    pages = storage.client.get_paginator("list_objects_v2").paginate(Bucket=storage.bucket, Prefix=full)
    return sorted(o["Key"][len(full) :] for page in pages for o in page.get("Contents", []))


def owner_of_key(key: str) -> str:
    """The owner id the gateway gives a key's videos."""
    return owner_of(hashlib.sha256(key.encode()).hexdigest())


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    log: Path
    metrics_port: int

    def tail(self, n: int = 40) -> str:
        lines = self.log.read_text(errors="replace").splitlines()
        return f"--- {self.name} ({self.log}) ---\n" + "\n".join(lines[-n:])


@dataclass
class Stack:
    """Gateway + one worker per tiny model, real processes against real Redis and S3."""

    base_url: str
    env: dict[str, str]
    store: JobStore
    procs: list[Proc] = field(default_factory=list)
    api_key: str = API_KEY
    other_api_key: str = OTHER_API_KEY

    @property
    def storage(self) -> S3Storage:
        settings = Settings(s3_endpoint_url=self.env["K5_S3_ENDPOINT_URL"], storage_url=self.env["K5_STORAGE_URL"])
        return S3Storage(BUCKET, "videos", settings)

    @property
    def owner(self) -> str:
        """The owner id of api_key, as the gateway tags its videos."""
        return owner_of_key(self.api_key)

    def client(self, api_key: str | None = API_KEY) -> httpx.Client:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        return httpx.Client(base_url=self.base_url, timeout=30, headers=headers)

    def logs(self) -> str:
        return "\n".join(p.tail() for p in self.procs)

    def wait(self, video_id: str, timeout: float = 120, api_key: str = API_KEY) -> dict:
        """Poll until the video (of `api_key`) is terminal; returns the last video object."""
        deadline = time.monotonic() + timeout
        with self.client(api_key) as c:
            while time.monotonic() < deadline:
                body = c.get(f"/v1/videos/{video_id}").json()
                if body["status"] in ("completed", "failed"):
                    return body
                time.sleep(0.2)
        raise AssertionError(f"video {video_id} not terminal after {timeout}s\n{self.logs()}")


def start_service(command: str, env: dict[str, str], logdir: Path, name: str) -> Proc:
    log = logdir / f"{name}.log"
    port = free_port()
    popen = subprocess.Popen(
        [sys.executable, "-m", "service.cli", command],
        env={**env, "K5_METRICS_PORT": str(port)},
        cwd=ROOT,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        preexec_fn=child_preexec,
    )
    return Proc(name, popen, log, port)


def wait_ready(stack: Stack, models: list[str], timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in stack.procs:
            if p.popen.poll() is not None:
                raise RuntimeError(f"{p.name} exited with {p.popen.returncode}\n{p.tail()}")
        try:
            ready = httpx.get(stack.base_url + "/readyz", timeout=2).status_code == 200
        except httpx.HTTPError:
            ready = False
        if ready and all(stack.store.workers_online(m) for m in models):
            return
        time.sleep(0.3)
    raise RuntimeError(f"stack not ready after {timeout}s\n{stack.logs()}")


@pytest.fixture(scope="session")
def stack(redis_server, s3_server, tiny_models, tmp_path_factory) -> Iterator[Stack]:
    logdir = tmp_path_factory.mktemp("logs")
    port = free_port()
    env = {
        **os.environ,
        **s3_server.env,
        "K5_HOST": "127.0.0.1",
        "K5_PORT": str(port),
        "K5_REDIS_URL": redis_server.url,
        "K5_STORAGE_URL": f"s3://{BUCKET}/videos",
        "K5_S3_ENDPOINT_URL": s3_server.endpoint,
        "K5_HEARTBEAT_S": "1",
        "K5_API_KEYS": f"{API_KEY},{OTHER_API_KEY},{USAGE_API_KEY},{IDLE_API_KEY}",
        "K5_USAGE_LABELS": f"{owner_of_key(USAGE_API_KEY)}=carol",
        # Polling tests and the fuzzer send many requests; the limits themselves are tested in test_security.
        "K5_RATE_LIMIT_PER_MIN": "1000000",
        "K5_MAX_INFLIGHT_PER_KEY": "10000",
        "K5_WEBHOOK_SECRET": WEBHOOK_SECRET,
        # The tests' webhook receivers listen on loopback, which the URL policy refuses otherwise.
        "K5_WEBHOOK_ALLOWED_HOSTS": "127.0.0.1",
        "K5_WEBHOOK_RETRY_BASE_S": "0.2",
        "K5_WEBHOOK_RETRY_MAX_S": "1",
        "HF_HUB_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
    }
    settings = Settings(
        redis_url=redis_server.url,
        storage_url=env["K5_STORAGE_URL"],
        s3_endpoint_url=s3_server.endpoint,
        heartbeat_s=1,
    )
    S3Storage(BUCKET, "", settings).ensure_bucket()
    store = JobStore(redis.Redis.from_url(redis_server.url), settings)
    st = Stack(f"http://127.0.0.1:{port}", env, store)
    models = []
    for task, path in tiny_models.items():
        st.procs.append(start_service("worker", {**env, "K5_MODEL": str(path)}, logdir, f"worker-{task}"))
        models.append(resolve_model(str(path)).id)
    st.procs.append(start_service("webhooks", env, logdir, "webhooks"))
    st.procs.append(start_service("gateway", env, logdir, "gateway"))
    try:
        wait_ready(st, models)
        yield st
    finally:
        for p in reversed(st.procs):
            stop_process(p.popen, timeout=20)


# Modules whose tests start real gateway, deliverer or S3 processes of their own, or spend tens of CPU seconds
# (the real VAE architecture, compile counting over every bucket): `slow` too.
SLOW_MODULES = {
    "test_bench_gateway_input",
    "test_compile",
    "test_gateway_bench",
    "test_gateway_socket",
    "test_gateway_surface",
    "test_hostile_http",
    "test_model_aliases",
    "test_remix",
    "test_retry_after",
    "test_roster",
    "test_rq_history",
    "test_sse",
    "test_storage_faults",
    "test_webhook_delivery",
}
SLOW_TESTS = {
    "test_vae_estimate_matches_the_real_vae_architecture_on_cpu",
    "test_api_conforms_to_openapi",
    "test_deadlines_through_a_gateway_with_no_worker",
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test on the session's process stack (gateway, workers, webhook sender) is `slow`, like the tests
    that start processes of their own and mark themselves or are listed above: `make test-fast` leaves them out."""
    for item in items:
        module = item.module.__name__.rsplit(".", 1)[-1] if getattr(item, "module", None) else ""
        name = getattr(item, "originalname", item.name)
        if "stack" in getattr(item, "fixturenames", ()) or module in SLOW_MODULES or name in SLOW_TESTS:
            item.add_marker(pytest.mark.slow)
