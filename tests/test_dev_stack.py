"""`k5serve dev` (what `make serve` runs): the whole local stack from nothing, the README's curl commands,
a playable MP4 from the local-disk store, and a clean stop on Ctrl-C."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import psutil
import pytest

from service.localstack import free_port
from tests.conftest import ROOT
from tests.test_e2e import decode_mp4


def curl(*args: str) -> bytes:
    return subprocess.run(
        ["curl", "-sS", "--fail-with-body", *args], capture_output=True, check=True, timeout=30
    ).stdout


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_dev_stack_serves_the_readme_example(tmp_path):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("K5_")}
    env.update(K5_HOST="127.0.0.1", K5_PORT=str(port), PYTHONUNBUFFERED="1")
    log = tmp_path / "dev.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "dev", "--state-dir", str(tmp_path / "k5")],
        env=env,
        cwd=ROOT,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 240
        while "k5serve is ready" not in log.read_text(errors="replace"):
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.5)
        banner = log.read_text()
        base = f"http://127.0.0.1:{port}"
        assert f"curl -s {base}/v1/videos" in banner

        # The README's commands, with curl.
        video = json.loads(
            curl(
                f"{base}/v1/videos",
                "-H",
                "Content-Type: application/json",
                "-d",
                '{"prompt": "a red fox running through fresh snow", "seed": 42}',
            )
        )
        while video["status"] not in ("completed", "failed"):
            time.sleep(0.3)
            video = json.loads(curl(f"{base}/v1/videos/{video['id']}"))
        assert video["status"] == "completed", video
        out = tmp_path / "fox.mp4"
        curl("-L", "-o", str(out), f"{base}/v1/videos/{video['id']}/content")
        frames, info = decode_mp4(out.read_bytes())
        assert frames.shape == (25, 64, 96, 3) and info["codec"] == "h264"
        # The local-disk store keeps it under the state directory.
        assert (tmp_path / "k5" / "data" / video["id"] / "video.mp4").is_file()
    finally:
        children = psutil.Process(proc.pid).children(recursive=True)
        os.killpg(proc.pid, signal.SIGINT)  # as a terminal's Ctrl-C does: the whole foreground group
        try:
            rc = proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            raise
    assert rc == 0, log.read_text()
    # Everything it started is gone: nothing listens on the gateway port any more.
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0
    # Redis, workers, webhooks and gateway all stopped with it.
    assert len(children) >= 5, children
    assert [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE] == []
    assert "Traceback" not in log.read_text(), log.read_text()[-3000:]
