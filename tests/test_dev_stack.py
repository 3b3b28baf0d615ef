"""`k5serve dev` (what `make serve` runs): the whole local stack from nothing, the README's curl commands,
a playable MP4 from the local-disk store, and a clean stop on Ctrl-C; what it keeps across a restart (and a crash)
in its state directory, and the short shutdown grace of its workers."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import psutil
import pytest
import redis

from service.console.localstack import free_port
from tests.conftest import ROOT, child_preexec
from tests.test_e2e import decode_mp4

# Real `k5serve dev` stacks, each with its own Redis, storage, gateway and workers.
pytestmark = pytest.mark.slow


def curl(*args: str) -> bytes:
    return subprocess.run(
        ["curl", "-sS", "--fail-with-body", *args], capture_output=True, check=True, timeout=30
    ).stdout


def start_dev(state_dir, port: int, log) -> subprocess.Popen:
    """`k5serve dev` on STATE_DIR with nothing of ours configured (no K5_* variable but host and port)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("K5_")}
    env.update(K5_HOST="127.0.0.1", K5_PORT=str(port), PYTHONUNBUFFERED="1")
    return subprocess.Popen(
        [sys.executable, "-m", "service.cli", "dev", "--state-dir", str(state_dir)],
        env=env,
        cwd=ROOT,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
        preexec_fn=child_preexec,  # it must see the Ctrl-C even when the suite runs with SIGINT ignored
    )


def wait_ready(proc: subprocess.Popen, log) -> str:
    deadline = time.monotonic() + 240
    while "k5serve is ready" not in log.read_text(errors="replace"):
        assert proc.poll() is None, log.read_text()
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.5)
    return log.read_text()


def create(base: str, body: dict) -> dict:
    return json.loads(curl(f"{base}/v1/videos", "-H", "Content-Type: application/json", "-d", json.dumps(body)))


def wait_done(base: str, video: dict, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while video["status"] not in ("completed", "failed"):
        assert time.monotonic() < deadline, video
        time.sleep(0.3)
        video = json.loads(curl(f"{base}/v1/videos/{video['id']}"))
    return video


def tree(proc: subprocess.Popen) -> list[psutil.Process]:
    """The process and all it started, taken while it runs: its children live in sessions of their own, so a
    kill of its process group would not reach them, and once it is gone they cannot be found from it."""
    try:
        root = psutil.Process(proc.pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def kill_all(procs: list[psutil.Process]) -> None:
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.resume()  # a stopped one would not die of the kill until continued
            p.kill()
    psutil.wait_procs(procs, timeout=10)


def ctrl_c(proc: subprocess.Popen) -> int:
    everything = tree(proc)
    try:
        os.killpg(proc.pid, signal.SIGINT)  # as a terminal's Ctrl-C does: the whole foreground group
        return proc.wait(60)
    finally:
        # Whatever happened, nothing it started outlives the test.
        kill_all([p for p in everything if p.is_running()])
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def running(procs: list[psutil.Process]) -> list[psutil.Process]:
    alive = []
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                alive.append(p)
    return alive


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_dev_stack_serves_the_readme_example_and_keeps_its_data_across_restarts(tmp_path):
    """From nothing (the tiny models built on first use), the README's curl commands give a playable MP4 and
    Ctrl-C stops everything; started again on the same state directory, then killed outright (Redis included)
    and started again: the videos, their records and the queued jobs are all still there."""
    state = tmp_path / "k5"
    base, port = "", 0

    def run(name: str):
        nonlocal base, port
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        log = tmp_path / f"{name}.log"
        proc = start_dev(state, port, log)
        return proc, log, wait_ready(proc, log)

    # First run: the README's example, two long ones queued, and Ctrl-C while the first of those runs.
    proc, log, banner = run("first")
    try:
        assert f"curl -s {base}/v1/videos" in banner
        # How client commands in another terminal find this server.
        assert f"K5_HOST\n  and K5_PORT (here K5_PORT={port}: export it there too)" in banner
        assert f"K5_SERVER={base}" in banner
        # The banner names dev's private Redis, the one that holds the records (for `k5serve deliveries`).
        m = re.search(r"redis: (redis://127\.0\.0\.1:\d+/0) \(K5_REDIS_URL for k5serve deliveries\)", banner)
        assert m, banner
        # The README's commands, with curl.
        video = wait_done(base, create(base, {"prompt": "a red fox running through fresh snow", "seed": 42}))
        assert video["status"] == "completed", video
        assert redis.Redis.from_url(m.group(1)).exists(f"k5:video:{video['id']}")
        mp4 = curl("-L", f"{base}/v1/videos/{video['id']}/content")
        frames, info = decode_mp4(mp4)
        assert frames.shape == (25, 64, 96, 3) and info["codec"] == "h264"
        # The local-disk store keeps it under the state directory, in the folder of the run that made it.
        assert len(list((state / "data" / video["id"]).glob("run-*/video.mp4"))) == 1
        slow = [create(base, {"prompt": f"a slow one {i}", "num_inference_steps": 50, "seconds": "2"}) for i in (1, 2)]
        deadline = time.monotonic() + 60
        while json.loads(curl(f"{base}/v1/videos/{slow[0]['id']}"))["status"] != "in_progress":
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        workers = [p for p in psutil.Process(proc.pid).children() if "worker" in p.cmdline()]
        assert len(workers) == 2, workers
        # No K5_SHUTDOWN_GRACE_S given: the workers get dev's few seconds, not production's 600.
        assert {p.environ().get("K5_SHUTDOWN_GRACE_S") for p in workers} == {"5.0"}
    finally:
        children = psutil.Process(proc.pid).children(recursive=True)
        rc = ctrl_c(proc)
    assert rc == 0, log.read_text()
    # Everything it started is gone: nothing listens on the gateway port any more.
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0
    # Redis, workers, webhooks and gateway all stopped with it.
    assert len(children) >= 5, children
    assert running(children) == []
    text = log.read_text()
    assert "Traceback" not in text, text[-3000:]
    assert re.search(r"shutdown requested: finishing the current job.* grace_s=5\.0\b", text), text[-3000:]
    assert "grace_s=600" not in text

    # Second run, same directory (another free port for Redis): the first video is listed and served as before,
    # and the job left queued at Ctrl-C runs now.
    proc, log, banner = run("second")
    try:
        listed = json.loads(curl(f"{base}/v1/videos?limit=100"))["data"]
        assert video["id"] in [v["id"] for v in listed], listed
        assert json.loads(curl(f"{base}/v1/videos/{video['id']}"))["status"] == "completed"
        assert curl("-L", f"{base}/v1/videos/{video['id']}/content") == mp4
        for job in slow:
            assert wait_done(base, job)["status"] == "completed", job
    finally:
        # A crash this time: everything killed at once, Redis too (only its fsynced append-only file is left).
        everything = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
        for p in everything:
            p.kill()
        psutil.wait_procs(everything, timeout=10)
        proc.wait(10)

    # Third run after the crash: it starts (no redis-server left on the directory) and has it all still.
    proc, log, banner = run("third")
    try:
        listed = {v["id"]: v["status"] for v in json.loads(curl(f"{base}/v1/videos?limit=100"))["data"]}
        assert listed == {video["id"]: "completed", **{job["id"]: "completed" for job in slow}}, listed
        assert curl("-L", f"{base}/v1/videos/{video['id']}/content") == mp4
    finally:
        children = psutil.Process(proc.pid).children(recursive=True)
        rc = ctrl_c(proc)
    assert rc == 0, log.read_text()
    assert [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE] == []
    assert "Traceback" not in log.read_text(), log.read_text()[-3000:]


def test_a_busy_port_fails_at_once_and_names_k5_port(tmp_path):
    state = tmp_path / "k5"
    with socket.create_server(("127.0.0.1", 0)) as held:
        port = held.getsockname()[1]
        env = {k: v for k, v in os.environ.items() if not k.startswith("K5_")}
        out = subprocess.run(
            [sys.executable, "-m", "service.cli", "dev", "--state-dir", str(state)],
            env={**env, "K5_HOST": "127.0.0.1", "K5_PORT": str(port)},
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
            preexec_fn=child_preexec,
        )
    assert out.returncode != 0
    assert f"port {port} on 127.0.0.1 is not free" in out.stderr and f"K5_PORT={port + 1}" in out.stderr, out.stderr
    # Refused before anything started: no Redis, no tiny models built.
    assert not (state / "redis").exists() and not (state / "tiny").exists()


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_a_hard_kill_leaves_no_child_and_the_next_start_cleans_up(tmp_path, tiny_models):
    """SIGKILL of `k5serve dev` alone: every child stops by itself (the parent-death signal), except one that
    was stopped (SIGSTOP) and so could not act on it; the next start on the same state directory and port
    stops that one and comes up."""
    state, port = tmp_path / "k5", free_port()
    for name, path in tiny_models.items():  # built already: the first test covers building them
        shutil.copytree(path, state / "tiny" / name)
    proc = start_dev(state, port, tmp_path / "first.log")
    everything = tree(proc)
    try:
        wait_ready(proc, tmp_path / "first.log")
        everything = tree(proc)
        children = everything[1:]
        assert len(children) >= 5, children
        (gateway,) = [c for c in children if "gateway" in c.cmdline()]
        gateway.suspend()  # it holds the port, and cannot die until continued
        proc.kill()
        proc.wait(10)
        psutil.wait_procs([c for c in children if c.pid != gateway.pid], timeout=60)
        assert running(children) == [gateway], running(children)

        log = tmp_path / "second.log"
        second = start_dev(state, port, log)
        try:
            banner = wait_ready(second, log)
            assert f"the previous run (pid {proc.pid}) was killed and left 1 process(es) running" in banner
            assert running([gateway]) == []
            base = f"http://127.0.0.1:{port}"
            assert wait_done(base, create(base, {"prompt": "after the crash"}))["status"] == "completed"
        finally:
            assert ctrl_c(second) == 0, log.read_text()
    finally:
        kill_all(running(everything))
