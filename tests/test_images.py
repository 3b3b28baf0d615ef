"""Input images: decoded at the size the model needs, a bounded number at once, and the memory given back."""

from __future__ import annotations

import base64
import io
import json
import socket
import threading

import psutil
import pytest
import redis
from fastapi.testclient import TestClient
from PIL import Image

from service.contract.jobs import JobStore
from service.contract.models import TINY
from service.contract.settings import Settings
from service.gateway.app import create_app
from service.gateway.images import decode_slots, prepare_image
from tests.conftest import gateway_process

I2V = TINY["k5-tiny-i2v"]


def encoded(img: Image.Image, fmt: str, **save: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **save)
    return buf.getvalue()


def large_png() -> bytes:
    """A ~100 KB PNG that declares 6000x6000 pixels (144 MB decoded), under the 40 MP limit."""
    img = Image.new("RGB", (6000, 6000), (20, 120, 200))
    img.paste((240, 240, 240), (1000, 1000, 5000, 5000))
    return encoded(img, "PNG", optimize=True)


def request_body(png: bytes) -> bytes:
    url = "data:image/png;base64," + base64.b64encode(png).decode()
    body = {"prompt": "a cat", "model": I2V.id, "size": "96x64", "input_reference": {"image_url": url}}
    return json.dumps(body).encode()


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_a_large_rotated_image_is_fitted_the_right_way_up(fmt):
    # Landscape 3000x2000, left half red, EXIF orientation 6 (shown rotated 90 degrees clockwise: red on top).
    img = Image.new("RGB", (3000, 2000), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 1500, 2000))
    exif = Image.Exif()
    exif[0x0112] = 6
    out = prepare_image(encoded(img, fmt, exif=exif.tobytes()), 64, 96, max_bytes=10**8, max_pixels=40_000_000)
    fitted = Image.open(io.BytesIO(out))
    assert fitted.size == (64, 96)
    top, bottom = fitted.getpixel((32, 4)), fitted.getpixel((32, 91))
    assert top[0] > 200 and top[2] < 50 and bottom[2] > 200 and bottom[0] < 50


@pytest.mark.parametrize("mode", ["1", "P", "I;16", "LA"])
def test_every_png_mode_is_reduced_and_fitted(mode):
    out = prepare_image(encoded(Image.new(mode, (3000, 2000)), "PNG"), 96, 64, max_bytes=10**8, max_pixels=10**8)
    assert Image.open(io.BytesIO(out)).size == (96, 64)


def test_a_decode_past_the_bound_is_refused_with_retry_after(r, redis_server, tmp_path):
    settings = Settings(
        redis_url=redis_server.url.replace("/0", "/1"),
        storage_url=f"file://{tmp_path}",
        allow_anonymous=True,
        max_concurrent_decodes=1,
    )
    JobStore(r, settings).announce(I2V, "images-test-worker")
    png = encoded(Image.new("RGB", (200, 100), (9, 9, 9)), "PNG")
    body = request_body(png)
    with TestClient(create_app(settings)) as c:
        slot = decode_slots(1)
        assert slot.acquire(blocking=False)  # another request's decode is running
        try:
            busy = c.post("/v1/videos", content=body, headers={"Content-Type": "application/json"})
        finally:
            slot.release()
        assert busy.status_code == 503 and busy.headers["retry-after"] == "1"
        assert busy.json()["error"]["code"] == "image_decoder_busy"
        assert not list(r.scan_iter("k5:video:*"))  # nothing was created
        ok = c.post("/v1/videos", content=body, headers={"Content-Type": "application/json"})
        assert ok.status_code == 200, ok.text


def test_a_large_image_costs_one_decoded_copy_and_is_given_back(r, redis_server, tmp_path):
    url = redis_server.url.replace("/0", "/1")
    JobStore(redis.Redis.from_url(url), Settings(redis_url=url)).announce(I2V, "images-test-worker")
    body = request_body(large_png())

    def post(port: int) -> int:
        with socket.create_connection(("127.0.0.1", port), timeout=120) as sock:
            head = b"POST /v1/videos HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            sock.sendall(head + b"Content-Length: %d\r\n\r\n" % len(body) + body)
            return int(sock.recv(4096).split()[1])

    with gateway_process(url, tmp_path, K5_HEARTBEAT_S="600") as base:
        port = int(base.rsplit(":", 1)[1])
        gateway = next(p for p in psutil.process_iter() if _serves(p, port))
        assert post(port) == 200  # warm: imports and first allocations
        before = gateway.memory_info().rss
        peak, done = before, threading.Event()

        def sample() -> None:
            nonlocal peak
            while not done.wait(0.01):
                peak = max(peak, gateway.memory_info().rss)

        sampler = threading.Thread(target=sample)
        sampler.start()
        try:
            assert post(port) == 200
        finally:
            done.set()
            sampler.join()
        held = gateway.memory_info().rss - before
    # The 6000x6000 image decodes to 144 MB; before, a copy per step (transpose, convert, crop) took ~350 MB.
    assert peak - before < 220 * 2**20, f"peak {(peak - before) / 2**20:.0f} MB"
    assert held < 50 * 2**20, f"{held / 2**20:.0f} MB held"


def _serves(proc: psutil.Process, port: int) -> bool:
    try:
        return any(c.laddr.port == port and c.status == psutil.CONN_LISTEN for c in proc.net_connections())
    except (psutil.AccessDenied, psutil.NoSuchProcess):
        return False
