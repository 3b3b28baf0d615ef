"""Storage faults on a stack of its own (its own redis-server, SeaweedFS and processes, so the shared stack's
storage is never touched): an S3 outage while a finished video uploads, and a full local disk."""

from __future__ import annotations

import base64
import contextlib
import io
import os
import re
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import redis
from PIL import Image

from service.console.localstack import RedisServer, SeaweedS3, free_port, stop_process
from service.contract.jobs import JobStore
from service.contract.models import resolve_model
from service.contract.settings import Settings
from service.contract.storage import S3Storage
from tests.conftest import Proc, start_service

# Long enough to act on while it generates (seconds on these CPUs), short enough for the suite.
SLOW = {"prompt": "a slow sunrise", "model": "k5-tiny-t2v", "size": "64x64", "num_inference_steps": 20}


@dataclass
class Small:
    base_url: str
    procs: list[Proc]
    store: JobStore

    def logs(self) -> str:
        return "\n".join(p.tail() for p in self.procs)

    def get(self, video_id: str) -> dict:
        return httpx.get(f"{self.base_url}/v1/videos/{video_id}", timeout=10).json()

    def wait(self, video_id: str, pred, what: str, timeout: float = 120) -> dict:
        deadline = time.monotonic() + timeout
        while not pred(video := self.get(video_id)):
            assert time.monotonic() < deadline, f"{what}: {video}\n{self.logs()}"
            time.sleep(0.1)
        return video


@contextlib.contextmanager
def small_stack(tmp_path: Path, tiny_models: dict[str, Path], env: dict[str, str], tasks=("t2v",)) -> Iterator[Small]:
    rs = RedisServer(tmp_path / "redis", die_with_owner=True).start()
    procs: list[Proc] = []
    try:
        port = free_port()
        env = {
            **os.environ,
            "K5_HOST": "127.0.0.1",
            "K5_PORT": str(port),
            "K5_REDIS_URL": rs.url,
            "K5_ALLOW_ANONYMOUS": "true",
            "K5_HEARTBEAT_S": "1",
            "HF_HUB_OFFLINE": "1",
            "PYTHONUNBUFFERED": "1",
            **env,
        }
        for task in tasks:
            procs.append(start_service("worker", {**env, "K5_MODEL": str(tiny_models[task])}, tmp_path, f"w-{task}"))
        procs.append(start_service("gateway", env, tmp_path, "gateway"))
        store = JobStore(redis.Redis.from_url(rs.url), Settings(redis_url=rs.url, heartbeat_s=1))
        small = Small(f"http://127.0.0.1:{port}", procs, store)
        models = [resolve_model(str(tiny_models[t])).id for t in tasks]
        deadline = time.monotonic() + 180
        while True:
            assert all(p.popen.poll() is None for p in procs), small.logs()
            with contextlib.suppress(httpx.HTTPError):
                ready = httpx.get(small.base_url + "/readyz", timeout=2).status_code == 200
                if ready and all(store.workers_online(m) for m in models):
                    break
            assert time.monotonic() < deadline, small.logs()
            time.sleep(0.3)
        yield small
    finally:
        for p in reversed(procs):
            stop_process(p.popen, timeout=20)
        rs.stop()


def post(small: Small, **kw) -> httpx.Response:
    return httpx.post(f"{small.base_url}/v1/videos", timeout=30, **kw)


def test_an_s3_outage_during_the_upload_is_waited_out(tmp_path, tiny_models, monkeypatch):
    """S3 is killed while a job generates; the worker keeps the encoded files and retries past the old three
    attempts; meanwhile /readyz and POST say 503; S3 comes back and the same job completes, its video stored."""
    s3 = SeaweedS3(tmp_path / "s3", die_with_owner=True).start()
    for name, value in s3.env.items():
        monkeypatch.setenv(name, value)  # boto3 in this process finds the credentials the standard way
    try:
        settings = Settings(storage_url="s3://k5outage/videos", s3_endpoint_url=s3.endpoint)
        S3Storage("k5outage", "videos", settings).ensure_bucket()
        env = {**s3.env, "K5_STORAGE_URL": settings.storage_url, "K5_S3_ENDPOINT_URL": s3.endpoint}
        with small_stack(tmp_path, tiny_models, {**env, "K5_STORAGE_RETRY_WINDOW_S": "120"}) as small:
            video = post(small, json={**SLOW, "seconds": "1"}).json()
            small.wait(video["id"], lambda v: v["status"] == "in_progress", "running")
            s3.proc.kill()  # an outage: the endpoint is gone at once
            s3.proc.wait(10)
            s3.log.close()
            worker = small.procs[0]
            deadline = time.monotonic() + 90
            # Past the three attempts an upload used to get: the first file is still waiting for the store.
            waiting = re.compile(rf"{video['id']}/(run-\w+/)?thumbnail\.webp failed \(attempt 4\)")
            while not waiting.search(worker.log.read_text(errors="replace")):
                assert time.monotonic() < deadline and small.get(video["id"])["status"] == "in_progress", small.logs()
                time.sleep(0.1)
            # While the store is away the gateway says so: not ready, and no new job is accepted.
            assert httpx.get(small.base_url + "/readyz", timeout=10).status_code == 503
            refused = post(small, json={**SLOW, "seconds": "1"})
            assert refused.status_code == 503 and refused.json()["error"]["code"] == "storage_unavailable"
            assert refused.headers["retry-after"] and s3.endpoint not in refused.text
            s3.start(resume=True)
            done = small.wait(video["id"], lambda v: v["status"] in ("completed", "failed"), "the job's end")
            assert done["status"] == "completed", done
            content = httpx.get(f"{small.base_url}/v1/videos/{video['id']}/content", follow_redirects=True)
            assert content.status_code == 200 and content.content[4:8] == b"ftyp"
    finally:
        s3.stop()


@pytest.fixture
def tmpfs(tmp_path) -> Iterator[Path]:
    """A real 16 MB filesystem that fills up (root only: skipped where mount is not allowed)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    out = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mnt)], capture_output=True)
    if out.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {out.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(disk: Path) -> None:
    with open(disk / "filler", "wb") as f, contextlib.suppress(OSError):
        while True:
            f.write(b"\0" * 65536)
            f.flush()


def png_data_url() -> str:
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def test_a_full_local_disk_is_classified_and_refused_with_503(tmp_path, tiny_models, tmpfs):
    store_dir, scratch = tmpfs / "data", tmpfs / "tmp"
    scratch.mkdir()
    env = {"K5_STORAGE_URL": f"file://{store_dir}", "K5_STORAGE_MIN_FREE_MB": "1", "TMPDIR": str(scratch)}
    with small_stack(tmp_path, tiny_models, env, tasks=("t2v", "i2v")) as small:
        video = post(small, json={**SLOW, "seconds": "1"}).json()
        small.wait(video["id"], lambda v: v["status"] == "in_progress", "running")
        fill(tmpfs)
        failed = small.wait(video["id"], lambda v: v["status"] in ("completed", "failed"), "the job's end")
        assert failed["status"] == "failed" and failed["error"]["code"] == "storage_full", failed
        assert str(tmpfs) not in failed["error"]["message"]
        ready = httpx.get(small.base_url + "/readyz", timeout=10)
        assert ready.status_code == 503 and str(tmpfs) not in ready.text
        image = {"image_url": png_data_url()}
        body = {"prompt": "x", "model": "k5-tiny-i2v", "size": "64x64", "input_reference": image}
        refused = post(small, json=body)
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "storage_full", refused.text
        assert str(tmpfs) not in refused.text
        leftovers = [p.name for p in store_dir.rglob(".upload-*")]
        assert leftovers == []
