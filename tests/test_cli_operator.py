"""The operator commands of `k5serve` that read models and Redis directly (`resolve`, `deliveries`), run as a
subprocess as a user runs them: a wrong name, id or Redis is one clear line on stderr and a non-zero exit."""

from __future__ import annotations

import json
import os
import subprocess

from service.console.localstack import free_port
from tests.test_cli_client import COMMAND
from tests.test_lifecycle import Receiver, create


def k5(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*COMMAND, *args],
        env={**os.environ, "NO_COLOR": "1", **(env or {})},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
    )


def one_error_line(run: subprocess.CompletedProcess[str]) -> str:
    assert run.returncode == 1, (run.returncode, run.stdout, run.stderr)
    assert run.stdout == "" and "Traceback" not in run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1, run.stderr
    return lines[0]


def test_resolve_shows_the_spec_of_a_catalogue_id_or_a_local_directory(tiny_models):
    run = k5("resolve", "kandinsky-5.0-t2v-lite-sft-5s")
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["source"] == "kandinskylab/Kandinsky-5.0-T2V-Lite-sft-5s-Diffusers"
    run = k5("resolve", str(tiny_models["i2v"]))
    assert run.returncode == 0, run.stderr
    spec = json.loads(run.stdout)
    assert (spec["id"], spec["task"], spec["source"]) == ("k5-tiny-i2v", "image-to-video", str(tiny_models["i2v"]))


def test_resolve_a_tiny_id_says_how_to_build_it():
    line = one_error_line(k5("resolve", "k5-tiny-t2v"))
    assert line.startswith("error: k5-tiny-t2v is a tiny test model with no published checkpoint: ")
    assert "`k5serve tiny-model DIR`" in line and "`k5serve resolve DIR/t2v`" in line


def test_resolve_an_unknown_name_or_directory_is_one_line(tmp_path):
    line = one_error_line(k5("resolve", "no-such-model"))
    assert line.startswith("error: unknown model 'no-such-model': use a catalogue id (")
    assert "kandinsky-5.0-t2v-lite-sft-5s" in line
    line = one_error_line(k5("resolve", str(tmp_path)))
    assert line.startswith(f"error: {tmp_path} has no model_index.json or k5serve.json")


def test_deliveries_of_an_unknown_id_or_in_the_wrong_redis_say_so(stack, redis_server):
    receiver = Receiver()
    try:
        video = create(stack, webhook_url=receiver.url())
        assert stack.wait(video["id"])["status"] == "completed"
        receiver.wait_calls(1)
    finally:
        receiver.server.shutdown()
    run = k5("deliveries", video["id"], env=stack.env)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["video_id"] == video["id"]

    url = stack.env["K5_REDIS_URL"]
    line = one_error_line(k5("deliveries", "video_nosuchid", env=stack.env))
    assert line == f"no webhook deliveries for video_nosuchid in the Redis at {url} (K5_REDIS_URL)"
    # The right id, the wrong Redis (another database of the same server): said, not an empty success.
    other = redis_server.url.replace("/0", "/1")
    line = one_error_line(k5("deliveries", video["id"], env={**stack.env, "K5_REDIS_URL": other}))
    assert line == f"no webhook deliveries for {video['id']} in the Redis at {other} (K5_REDIS_URL)"


def test_deliveries_with_redis_unreachable_is_one_line():
    url = f"redis://127.0.0.1:{free_port()}/0"
    line = one_error_line(k5("deliveries", "video_x", env={"K5_REDIS_URL": url}))
    assert line.startswith(f"error: cannot reach the Redis at {url} (K5_REDIS_URL): ")
    assert "Connection refused" in line
    # A password in the URL is not printed.
    secret = f"redis://:hunter2@127.0.0.1:{free_port()}/0"
    line = one_error_line(k5("deliveries", "video_x", env={"K5_REDIS_URL": secret}))
    assert "hunter2" not in line and "redis://:***@127.0.0.1:" in line
    line = one_error_line(k5("deliveries", "video_x", env={"K5_REDIS_URL": "127.0.0.1:6379"}))
    assert line.startswith("error: K5_REDIS_URL '127.0.0.1:6379': Redis URL must specify one of the following schemes")


def test_worker_with_an_unknown_model_stops_with_one_line():
    run = k5("worker", env={"K5_MODEL": "k5-tiny-t2v", "K5_METRICS_PORT": str(free_port())})
    assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr
    line = run.stderr.strip().splitlines()[-1]
    assert line.startswith("K5_MODEL: unknown model 'k5-tiny-t2v'") and "k5serve tiny-model DIR" in line
