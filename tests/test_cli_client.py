"""The `k5serve` client commands as a user runs them: the real console script as a subprocess against the real
stack (gateway, workers, Redis, S3), on the tiny models. The MP4s it saves are decoded frame by frame."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from PIL import Image

from service.console.client import K5Client, parse_sse
from service.console.localstack import free_port
from tests.conftest import ROOT, child_preexec, gateway_process
from tests.test_e2e import decode_mp4

SCRIPT = Path(sys.executable).with_name("k5serve")
# The console script is what users run; `python -m service.cli` is the same entry point where it is not installed.
COMMAND = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "service.cli"]
PROMPT = "a lighthouse at dusk [wide shot]"
SLOW = {"prompt": "a very slow sunrise", "model": "k5-tiny-t2v", "num_inference_steps": 50, "seconds": "2"}


def cli_env(stack) -> dict[str, str]:
    env = {**os.environ, "K5_SERVER": stack.base_url, "NO_COLOR": "1"}
    env.pop("K5_API_KEY", None)
    # Where the stack requires keys it says which; until then any key (or none) is accepted.
    if key := getattr(stack, "api_key", None):
        env["K5_API_KEY"] = key
    return env


def stack_at(base_url: str) -> SimpleNamespace:
    """What k5() needs of a stack, for a gateway of a test's own (no API keys)."""
    return SimpleNamespace(base_url=base_url, api_key=None)


def k5(stack, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    # stdin is not a terminal here, as in CI: the commands must neither prompt nor draw live bars.
    env = cli_env(stack)
    return subprocess.run(
        [*COMMAND, *args], env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout
    )


def png(path: Path, size: tuple[int, int] = (300, 200)) -> Path:
    img = Image.new("RGB", size)
    img.paste((220, 40, 40), (0, 0, size[0] // 2, size[1]))
    img.paste((40, 40, 220), (size[0] // 2, 0, size[0], size[1]))
    img.save(path, format="PNG")
    return path


def create(stack, body: dict) -> dict:
    with stack.client() as c:
        resp = c.post("/v1/videos", json=body)
        assert resp.status_code == 200, resp.text
        return resp.json()


def test_generate_saves_an_mp4_of_the_requested_size_and_length(stack, tmp_path):
    out = tmp_path / "cake.mp4"
    run = k5(
        stack,
        "generate",
        "a cat and a dog baking a cake",
        "--model",
        "k5-tiny-t2v",
        "--size",
        "64x96",
        "--seconds",
        "2",
        "--seed",
        "7",
        "--negative-prompt",
        "blurry",
        "--steps",
        "3",
        "--guidance",
        "4.5",
        "--metadata",
        "run=cli-test",
        "-o",
        str(out),
    )
    assert run.returncode == 0, run.stderr
    # stdout is the saved file alone, for scripts; the story of the job is on stderr.
    assert run.stdout.strip() == str(out)
    assert "submitted video_" in run.stderr and "completed" in run.stderr
    frames, info = decode_mp4(out.read_bytes())
    assert frames.shape == (49, 96, 64, 3)
    assert info["codec"] == "h264"
    assert not list(tmp_path.glob("*.part"))

    video_id = run.stderr.split("submitted ", 1)[1].split()[0]
    with stack.client() as c:
        video = c.get(f"/v1/videos/{video_id}").json()
    assert video["status"] == "completed"
    assert (video["seed"], video["num_inference_steps"], video["guidance_scale"]) == (7, 3, 4.5)
    assert video["negative_prompt"] == "blurry" and video["metadata"] == {"run": "cli-test"}


def test_generate_image_to_video_uploads_the_image(stack, tmp_path):
    image = png(tmp_path / "first.png")
    run = k5(
        stack,
        "generate",
        "the flag waves in the wind",
        "--image",
        str(image),
        "--model",
        "k5-tiny-i2v",
        "--size",
        "96x64",
        "-o",
        str(tmp_path),  # a directory: the file is named after the video
    )
    assert run.returncode == 0, run.stderr
    saved = Path(run.stdout.strip())
    assert saved.parent == tmp_path and saved.name.startswith("video_") and saved.suffix == ".mp4"
    frames, _ = decode_mp4(saved.read_bytes())
    assert frames.shape == (25, 64, 96, 3)
    assert len({f.tobytes() for f in frames}) > 1


def test_generate_with_an_image_and_no_model_takes_an_online_image_to_video_model(stack, tmp_path):
    image = png(tmp_path / "first.png")
    run = k5(stack, "generate", "the flag waves", "--image", str(image), "--size", "96x64", "-o", str(tmp_path))
    assert run.returncode == 0, run.stderr
    assert "(k5-tiny-i2v, 96x64, 1 s," in run.stderr
    assert decode_mp4(Path(run.stdout.strip()).read_bytes())[0].shape == (25, 64, 96, 3)


def test_generate_with_an_image_and_no_image_model_online_is_one_clear_line(redis_server, r, tmp_path):
    # A real gateway of its own, on a Redis database where no worker has announced a model.
    url = redis_server.url.replace("/0", "/1")
    with gateway_process(url, tmp_path, K5_METRICS_PORT=str(free_port())) as server:
        run = k5(stack_at(server), "generate", "a fox", "--image", str(png(tmp_path / "in.png")))
    assert run.returncode == 1 and "Traceback" not in run.stderr and run.stdout == ""
    assert run.stderr.strip().splitlines() == [
        f"error: no image-to-video model is online at {server} (image-to-video models it knows: "
        "kandinsky-5.0-i2v-pro-sft-5s); start a worker for one, or name one with --model"
    ]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--model", "k5-tiny-t2v", "--size", "1x1"],
            "error: Invalid size '1x1' for model k5-tiny-t2v; supported sizes: 96x64, 64x64, 64x96 "
            "(the nearest in aspect ratio is 64x64). (param: size)",
        ),
        (["--model", "no-such-model"], "error: "),
        (["--model", "k5-tiny-i2v"], "error: "),  # image-to-video without an image
    ],
)
def test_a_refused_request_is_one_clear_line(stack, args, message):
    run = k5(stack, "generate", "a fox", *args)
    assert run.returncode == 1
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1, run.stderr
    assert lines[0].startswith(message) and "(param: " in lines[0]
    assert "Traceback" not in run.stderr and run.stdout == ""


def test_an_unreachable_server_is_one_clear_line(stack):
    dead = f"http://127.0.0.1:{free_port()}"
    for args in (["generate", "a fox"], ["videos", "list"], ["models"]):
        run = k5(stack, *args, "--server", dead)
        assert run.returncode == 1
        assert run.stderr.strip().splitlines() == [f"error: cannot reach {dead}: [Errno 111] Connection refused"]


def test_the_api_key_is_sent_and_a_refusal_is_one_line(stack):
    """--api-key (or K5_API_KEY) travels as a bearer token; a 401 envelope is shown like any other error."""
    seen: list[str | None] = []

    class Refuse(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append(self.headers.get("Authorization"))
            error = {"message": "Invalid API key.", "type": "authentication_error", "code": "invalid_api_key"}
            body = json.dumps({"error": error}).encode()
            self.send_response(401)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Refuse)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}"
        run = k5(stack, "models", "--server", url, "--api-key", "sk-from-flag")
        assert run.returncode == 1 and run.stderr.strip().splitlines() == ["error: Invalid API key."]
        env = {**cli_env(stack), "K5_API_KEY": "sk-from-env", "K5_SERVER": url}
        subprocess.run([*COMMAND, "videos", "list"], env=env, stdin=subprocess.DEVNULL, capture_output=True, timeout=60)
    finally:
        server.shutdown()
    assert seen == ["Bearer sk-from-flag", "Bearer sk-from-env"]


def test_videos_and_models_commands(stack, tmp_path):
    models = k5(stack, "models", "--json")
    assert models.returncode == 0, models.stderr
    by_id = {m["id"]: m for m in json.loads(models.stdout)}
    assert by_id["k5-tiny-t2v"]["online"] and by_id["k5-tiny-i2v"]["task"] == "image-to-video"
    table = k5(stack, "models")
    assert table.returncode == 0
    row = next(line for line in table.stdout.splitlines() if line.startswith("k5-tiny-t2v "))
    assert "text-to-video" in row and "96x64*" in row and "yes" in row

    # Brackets are printed as they are, not taken for rich markup.
    video = create(stack, {"prompt": PROMPT, "model": "k5-tiny-t2v", "size": "96x64"})
    assert stack.wait(video["id"])["status"] == "completed"

    listed = k5(stack, "videos", "list", "--json", "--limit", "100")
    assert listed.returncode == 0, listed.stderr
    assert video["id"] in [v["id"] for v in json.loads(listed.stdout)]
    listed = k5(stack, "videos", "list", "--all")
    row = next(line for line in listed.stdout.splitlines() if line.startswith(video["id"]))
    assert "completed" in row and PROMPT in row

    shown = k5(stack, "videos", "show", video["id"], "--json")
    assert json.loads(shown.stdout)["status"] == "completed"
    shown = k5(stack, "videos", "show", video["id"])
    assert "completed" in shown.stdout and PROMPT in shown.stdout

    watched = k5(stack, "videos", "watch", video["id"])
    assert watched.returncode == 0 and "completed" in watched.stderr

    got = k5(stack, "videos", "download", video["id"], "-o", str(tmp_path / "lighthouse.mp4"))
    assert got.returncode == 0, got.stderr
    assert decode_mp4((tmp_path / "lighthouse.mp4").read_bytes())[0].shape == (25, 64, 96, 3)
    thumb = k5(stack, "videos", "download", video["id"], "--variant", "thumbnail", "-o", str(tmp_path))
    assert thumb.returncode == 0, thumb.stderr
    assert Image.open(tmp_path / f"{video['id']}.webp").format == "WEBP"

    deleted = k5(stack, "videos", "delete", video["id"])
    assert deleted.returncode == 0 and f"deleted {video['id']}" in deleted.stderr
    gone = k5(stack, "videos", "show", video["id"])
    assert gone.returncode == 1
    assert gone.stderr.strip().splitlines() == [f"error: No video found with id '{video['id']}'. (param: video_id)"]


def test_videos_cancel(stack):
    video = create(stack, SLOW)
    run = k5(stack, "videos", "cancel", video["id"])
    assert run.returncode == 0, run.stderr
    assert "failed (cancelled)" in run.stderr
    done = stack.wait(video["id"])
    assert done["status"] == "failed" and done["error"]["code"] == "cancelled"


def wait_until(c: httpx.Client, video_id: str, pred, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while not pred(video := c.get(f"/v1/videos/{video_id}").json()):
        assert time.monotonic() < deadline, video
        time.sleep(0.05)
    return video


def test_generate_shows_the_queue_then_ctrl_c_cancels_the_job(stack, tmp_path):
    with stack.client() as c:
        # Another job holds the worker, so this one waits in the queue first.
        blocker = c.post("/v1/videos", json=SLOW).json()
        wait_until(c, blocker["id"], lambda v: v["status"] == "in_progress")
        args = ["generate", SLOW["prompt"], "--model", "k5-tiny-t2v", "--steps", "50", "--seconds", "2"]
        proc = subprocess.Popen(
            [*COMMAND, *args, "-o", str(tmp_path / "never.mp4")],
            env=cli_env(stack),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=child_preexec,  # it must see the SIGINT even when the suite runs with SIGINT ignored
        )
        lines: list[str] = []

        def read_stderr() -> None:
            assert proc.stderr is not None
            for line in proc.stderr:
                lines.append(line)

        reader = threading.Thread(target=read_stderr, daemon=True)
        reader.start()

        def wait_line(text: str, timeout: float = 30) -> str:
            deadline = time.monotonic() + timeout
            while not (found := [line for line in lines if text in line]):
                assert proc.poll() is None and time.monotonic() < deadline, "".join(lines)
                time.sleep(0.05)
            return found[0]

        try:
            video_id = wait_line("submitted ").split()[1]
            assert wait_line(f"{video_id}: queued, next in line")
            c.post(f"/v1/videos/{blocker['id']}/cancel")
            # Interrupt it while the worker is denoising, the case that matters: a GPU busy for nothing.
            wait_line(f"{video_id}: generating")
            proc.send_signal(signal.SIGINT)
            assert proc.wait(timeout=30) == 130
        finally:
            if proc.poll() is None:
                proc.kill()
    reader.join(timeout=5)
    stderr = "".join(lines)
    assert f"interrupted: cancelling {video_id} (stdin is not a terminal, so not asking)" in stderr
    assert "Traceback" not in stderr
    done = stack.wait(video_id)
    assert done["status"] == "failed" and done["error"]["code"] == "cancelled"
    assert done["progress"] < 100 and not (tmp_path / "never.mp4").exists()


@pytest.mark.parametrize("host", ["127.0.0.1", "0.0.0.0"])
def test_client_commands_find_the_server_through_k5_host_and_k5_port(stack, host):
    """No K5_SERVER: the variables the gateway was started with lead the client to it (0.0.0.0 means this host)."""
    env = cli_env(stack)
    del env["K5_SERVER"]
    env.update(K5_HOST=host, K5_PORT=stack.base_url.rsplit(":", 1)[1])
    out = subprocess.run([*COMMAND, "models", "--json"], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "k5-tiny-t2v" in {m["id"] for m in json.loads(out.stdout)}


def test_a_gateway_on_a_busy_port_fails_at_once_and_names_k5_port(redis_server, tmp_path):
    with socket.create_server(("127.0.0.1", 0)) as held:
        port = held.getsockname()[1]
        env = {**os.environ, "K5_PORT": str(port), "K5_REDIS_URL": redis_server.url, "K5_ALLOW_ANONYMOUS": "true"}
        out = subprocess.run(
            [sys.executable, "-m", "service.cli", "gateway"],
            env={**env, "K5_STORAGE_URL": f"file://{tmp_path}"},
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert out.returncode != 0
    assert f"port {port} on 127.0.0.1 is not free" in out.stderr and f"K5_PORT={port + 1}" in out.stderr, out.stderr


def test_watch_follows_a_job_by_server_sent_events(stack):
    with K5Client(stack.base_url, getattr(stack, "api_key", None)) as client:
        video = client.create_video("slow clouds", model="k5-tiny-t2v", num_inference_steps=12)
        seen = list(client.watch(video["id"]))
    assert client.progress_source == "events"
    assert seen[-1]["status"] == "completed" and seen[-1]["progress"] == 100
    progresses = [v["progress"] for v in seen]
    assert progresses == sorted(progresses)
    assert any(v["status"] == "in_progress" and 0 < v["progress"] < 100 for v in seen), seen


def test_watch_falls_back_to_polling_at_the_servers_pace(stack):
    class NoEventsTransport(httpx.HTTPTransport):
        # Inside the seam only: the gateway is real; this makes /events answer as an older gateway's would (404).
        def handle_request(self, request: httpx.Request) -> httpx.Response:
            if request.url.path.endswith("/events"):
                return httpx.Response(404, json={"error": {"message": "Not Found", "type": "not_found_error"}})
            return super().handle_request(request)

    with K5Client(stack.base_url, getattr(stack, "api_key", None), transport=NoEventsTransport()) as client:
        video = client.create_video("quick clouds", model="k5-tiny-t2v")
        started = time.monotonic()
        seen = list(client.watch(video["id"]))
        took = time.monotonic() - started
    assert client.progress_source == "polling"
    assert seen[-1]["status"] == "completed" and seen[-1]["progress"] == 100
    # One GET per openai-poll-after-ms (1 s), not a busy loop.
    assert len(seen) <= took / 0.9 + 2, (len(seen), took)


def test_parse_sse_follows_the_event_stream_format():
    stream = [
        ": ping",
        "event: video",
        'data: {"id": "v1",',
        'data:  "status": "queued"}',
        "",
        "",
        ": keep-alive",
        "data: plain",
        "",
        "event: video",
        'data: {"status": "completed"}',
    ]
    assert list(parse_sse(iter(stream))) == [
        ("video", '{"id": "v1",\n "status": "queued"}'),
        ("message", "plain"),
        ("video", '{"status": "completed"}'),
    ]
    assert json.loads(list(parse_sse(iter(stream)))[0][1]) == {"id": "v1", "status": "queued"}
