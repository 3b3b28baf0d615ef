"""What a stranger learns from the gateway: bounded metrics labels, a readiness probe without internals,
unknown routes and methods answered with what exists; and logs and packaging without noise."""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
from pathlib import Path

import httpx

from service.console.localstack import free_port
from service.contract.logs import JsonFormatter, TextFormatter
from tests.conftest import ROOT, gateway_process

KEY = "sk-surface-test-0123456789"


def test_made_up_methods_do_not_grow_the_metrics(redis_server, tmp_path):
    with gateway_process(redis_server.url.replace("/0", "/1"), tmp_path) as base, httpx.Client(base_url=base) as c:
        before = len(c.get("/metrics").content)
        for i in range(200):
            assert c.request(f"X{i:04d}", "/v1/videos").status_code in (401, 405)
            c.get(f"/no/such/path/{i}")
        text = c.get("/metrics").text
    assert "X0001" not in text and "/no/such/path" not in text
    assert 'method="OTHER"' in text and 'route="unmatched"' in text
    # 400 requests with 200 distinct methods and paths add a handful of series, not hundreds.
    assert len(text.encode()) - before < 20_000


def test_readyz_hides_storage_details_from_callers_without_a_key(redis_server, tmp_path):
    dead = f"http://127.0.0.1:{free_port()}"  # an S3 endpoint that refuses connections
    env = {"K5_API_KEYS": KEY, "K5_STORAGE_URL": "s3://secret-bucket/videos", "K5_S3_ENDPOINT_URL": dead}
    env |= {"AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s"}
    with gateway_process(redis_server.url.replace("/0", "/1"), tmp_path, **env) as base:
        anon = httpx.get(base + "/readyz", timeout=60)
        assert anon.status_code == 503
        assert anon.json() == {"status": "unavailable", "checks": {"redis": "ok", "storage": "error"}}
        assert "127.0.0.1" not in anon.text and "secret-bucket" not in anon.text
        wrong = httpx.get(base + "/readyz", headers={"Authorization": "Bearer sk-wrong"}, timeout=60)
        assert wrong.json()["checks"]["storage"] == "error"
        keyed = httpx.get(base + "/readyz", headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
        assert keyed.status_code == 503 and keyed.json()["checks"]["storage"].startswith("error: ")
        assert dead.split("//")[1] in keyed.json()["checks"]["storage"]  # the operator sees where


def test_unknown_routes_and_methods_say_what_exists(redis_server, tmp_path):
    with gateway_process(redis_server.url.replace("/0", "/1"), tmp_path) as base, httpx.Client(base_url=base) as c:
        missing = c.post("/v1/video", json={"prompt": "a cat"})
        assert missing.status_code == 404
        error = missing.json()["error"]
        assert error["code"] == "unknown_route" and error["type"] == "not_found_error"
        assert "POST /v1/video" in error["message"] and "GET, POST /v1/videos" in error["message"]
        assert "POST /v1/videos/{video_id}/remix" in error["message"]
        wrong = c.put("/v1/videos", json={})
        assert wrong.status_code == 405 and wrong.headers["allow"] == "GET, POST"
        assert wrong.json()["error"]["code"] == "method_not_allowed"
        assert "PUT is not allowed on /v1/videos; use GET, POST" in wrong.json()["error"]["message"]
        # A video that does not exist is still the video's own 404, not the route's.
        gone = c.get("/v1/videos/video_00000000000000000000000000000000")
        assert gone.json()["error"]["code"] == "video_not_found"


def test_uvicorn_lines_carry_no_colour_codes():
    # As uvicorn logs: the plain message, and a coloured copy in `color_message` for its own formatter.
    record = logging.LogRecord("uvicorn.error", logging.INFO, __file__, 1, "Started server process [%d]", (42,), None)
    record.color_message = "Started server process [\x1b[36m%d\x1b[0m]"
    record.video_id = "video_1"  # a real extra stays
    text = TextFormatter("%(levelname)s %(name)s: %(message)s").format(record)
    assert text == "INFO uvicorn.error: Started server process [42] video_id=video_1"
    assert "\x1b" not in JsonFormatter().format(record) and "color_message" not in JsonFormatter().format(record)


def test_the_package_metadata_builds_without_deprecation_warnings(tmp_path):
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, tmp_path / name)
    for pkg in ("service", "worker"):
        (tmp_path / pkg).mkdir()
        (tmp_path / pkg / "__init__.py").touch()
    out = Path(tmp_path / "out")
    out.mkdir()
    code = (
        "import warnings; from setuptools import build_meta\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        f"    build_meta.prepare_metadata_for_build_wheel({str(out)!r})\n"
        "print('\\n'.join(str(x.message) for x in w))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert "deprecated" not in done.stdout + done.stderr, done.stdout + done.stderr
    metadata = next(out.glob("*.dist-info")) / "METADATA"
    assert "License-Expression: Apache-2.0" in metadata.read_text()
