"""The web playground in a real browser: Debian's Chromium, headless, driven by Playwright against the real stack
(gateway, workers, Redis, S3). It fills the form, watches progress arrive, plays the finished MP4, starts from an
uploaded image, cancels and deletes. Screenshots at laptop and phone width land in tests/artifacts/.

Playwright rather than Selenium: one pip package with no driver binary to match to the browser's version, and
waits, file uploads, dialogs and request logs built in. Its own browser download cannot work here (no network to
its CDN), so it launches the system Chromium by path.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from PIL import Image
from playwright.sync_api import Browser, BrowserContext, Page, Request, sync_playwright

from service.gateway.routes.playground import CSP

ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
LAPTOP = {"width": 1280, "height": 900}
PHONE = {"width": 390, "height": 844}


def find_chromium() -> str | None:
    """The system Chromium; installed with apt when missing and we may (root, or sudo without a password)."""
    for name in ("chromium", "chromium-browser"):
        if path := shutil.which(name):
            return path
    if shutil.which("apt-get") is None:
        return None
    sudo = [] if os.geteuid() == 0 else ["sudo", "-n"]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "chromium"]):
        try:
            subprocess.run([*sudo, *cmd], env=env, check=True, capture_output=True, timeout=600)
        except (OSError, subprocess.SubprocessError):
            return None
    return shutil.which("chromium")


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    executable = find_chromium()
    if executable is None:
        pytest.skip("no Chromium: not installed, and `apt-get install chromium` is not possible here")
    with sync_playwright() as pw:
        # launch() gives every run a fresh temporary profile (user-data-dir), removed on close.
        browser = pw.chromium.launch(executable_path=executable, headless=True, args=CHROMIUM_FLAGS)
        yield browser
        browser.close()


class Session:
    """One browser context on the playground, with a log of every request it made and every script error."""

    def __init__(self, context: BrowserContext, base_url: str) -> None:
        self.context = context
        self.base_url = base_url
        self.requests: list[Request] = []
        self.errors: list[str] = []
        context.on("request", lambda request: self.requests.append(request))
        self.page: Page = context.new_page()
        self.page.on("pageerror", lambda exc: self.errors.append(str(exc)))
        self.page.on("dialog", lambda dialog: dialog.accept())  # the delete confirmation
        self.page.set_default_timeout(30_000)

    def open(self) -> Page:
        self.page.goto(self.base_url + "/playground")
        self.page.wait_for_selector("#model option:checked", state="attached")
        return self.page

    def js(self, expression: str) -> Any:
        return self.page.evaluate(expression)

    def wait(self, expression: str, timeout: float = 60, what: str = "") -> Any:
        # Polls from Python: Playwright's wait_for_function evaluates strings, which the page's CSP forbids.
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if value := self.js(expression):
                return value
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what or expression}; script errors: {self.errors}")


@pytest.fixture
def session(browser, stack) -> Iterator[Callable[..., Session]]:
    contexts: list[BrowserContext] = []

    def make(**options: Any) -> Session:
        context = browser.new_context(**{"viewport": LAPTOP, **options})
        if key := api_key(stack):
            # As if typed once before: the page keeps the key in localStorage.
            context.add_init_script(f"localStorage.setItem('k5serve.apiKey', {json.dumps(key)})")
        contexts.append(context)
        return Session(context, stack.base_url)

    yield make
    for context in contexts:
        context.close()


def api_key(stack) -> str | None:
    # Where the stack requires keys, it says which; until then any key (or none) is accepted.
    return getattr(stack, "api_key", None)


def generate(s: Session, prompt: str, *, model: str = "k5-tiny-t2v", steps: int | None = None) -> str:
    page = s.page
    page.select_option("#model", model)
    page.fill("#prompt", prompt)
    if steps is not None:
        page.evaluate("document.querySelector('.advanced').open = true")
        page.fill("#steps", str(steps))
    page.click("#generate")
    return s.wait("document.querySelector('#job-id').textContent", what="the job to be created")


def player_state(s: Session) -> dict:
    return s.js(
        "(() => { const v = document.querySelector('#player');"
        " return {ready: v.readyState, duration: v.duration, width: v.videoWidth, height: v.videoHeight,"
        " src: v.currentSrc, error: v.error && v.error.message}; })()"
    )


def test_playground_route_serves_the_page_with_a_strict_policy(stack):
    with httpx.Client(base_url=stack.base_url) as c:
        redirect = c.get("/playground")
        assert redirect.status_code == 307 and redirect.headers["location"] == "playground/"
        page = c.get("/playground/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert page.headers["content-security-policy"] == CSP
        assert "script-src 'self'" in CSP and "style-src 'self'" in CSP
        for name, media_type in (("playground.js", "text/javascript"), ("playground.css", "text/css")):
            resp = c.get(f"/playground/{name}")
            assert resp.status_code == 200 and resp.headers["content-type"].startswith(media_type)
        assert c.get("/playground/secrets.txt").json()["error"]["code"] == "not_found"
        assert not any(path.startswith("/playground") for path in c.get("/openapi.json").json()["paths"])
    # Nothing is fetched from anywhere else: no CDN scripts, styles or fonts in the page.
    assert "http" not in page.text.replace("http-equiv", "")


def test_text_to_video_in_the_browser(session, stack):
    s = session()
    page = s.open()
    key = api_key(stack) or "sk-playground-test"
    page.fill("#api-key", key)
    page.dispatch_event("#api-key", "change")
    # The key is remembered in this browser.
    since_key = len(s.requests)
    page.reload()
    page.wait_for_selector("#model option:checked", state="attached")
    assert page.input_value("#api-key") == key

    # Choices come from /v1/models: only online models can be picked, sizes and durations follow the model.
    options = s.js("[...document.querySelectorAll('#model option')].map(o => [o.value, o.disabled])")
    assert ["k5-tiny-t2v", False] in options and ["k5-tiny-i2v", False] in options
    assert all(disabled for value, disabled in options if not value.startswith("k5-tiny-"))
    assert page.input_value("#model") == "k5-tiny-t2v"  # text-to-video first: it needs nothing but a prompt
    assert s.js("[...document.querySelectorAll('#size option')].map(o => o.value)") == ["96x64", "64x64", "64x96"]
    assert page.is_hidden("#image-field")
    page.select_option("#model", "k5-tiny-i2v")
    assert page.is_visible("#image-field")
    page.select_option("#model", "k5-tiny-t2v")
    page.select_option("#size", "64x96")
    page.select_option("#seconds", "2")

    video_id = generate(s, "a cat and a dog baking a cake", steps=16)
    # Progress as it arrives: queue position, then denoising steps, then the player.
    seen: list[tuple[str, str | None]] = []
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        state = s.js(
            "[document.querySelector('#job-status').textContent,"
            " document.querySelector('#job-progress').getAttribute('value'),"
            " document.querySelector('#job-progress-text').textContent]"
        )
        if not seen or seen[-1] != tuple(state):
            seen.append(tuple(state))
        if state[0] in ("completed", "failed"):
            break
        time.sleep(0.03)
    assert seen[-1][0] == "completed", seen
    assert any(status == "in progress" and 0 < int(value) < 100 for status, value, _ in seen), seen
    assert any(text.startswith("Generating: ") for _, _, text in seen), seen
    assert s.js("document.querySelector('#job-live').getAttribute('aria-live')") == "polite"

    s.wait("document.querySelector('#player').readyState >= 2", what="the video to load")
    player = player_state(s)
    assert player["duration"] > 1.9 and (player["width"], player["height"]) == (64, 96), player
    assert player["src"].startswith("blob:") and player["error"] is None
    assert page.get_attribute("#download", "download") == f"{video_id}.mp4"
    # The seed shown is exact (seeds exceed a JavaScript number's 53 bits): it reproduces the video.
    with stack.client() as c:
        seed = c.get(f"/v1/videos/{video_id}").json()["seed"]
    assert page.text_content("#job-details").endswith(f"seed {seed}")
    # The new video is in the recent list with its thumbnail.
    s.wait(f"document.querySelector('[data-video-id=\"{video_id}\"] img')?.naturalWidth > 0", what="thumbnail")

    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "playground-desktop.png"), full_page=True)

    # Every /v1 call carried the key, and nothing left this machine (gateway and object store on loopback).
    v1 = [r for r in s.requests[since_key:] if urlsplit(r.url).path.startswith("/v1/")]
    assert v1 and all(r.headers.get("authorization") == f"Bearer {key}" for r in v1 if r.url.startswith(stack.base_url))
    assert {"/v1/models", f"/v1/videos/{video_id}/events"} <= {urlsplit(r.url).path for r in v1}
    # The content route's redirect took the browser to the object store, which got no key.
    store = [r for r in s.requests if r.url.startswith(stack.env["K5_S3_ENDPOINT_URL"])]
    assert store and not any("authorization" in r.all_headers() for r in store)
    network = [urlsplit(r.url) for r in s.requests if not r.url.startswith(("blob:", "data:"))]
    assert {u.hostname for u in network} == {"127.0.0.1"}, {u.geturl() for u in network}
    assert not s.errors


def test_image_to_video_by_upload(session, stack, tmp_path):
    img = Image.new("RGB", (300, 200))
    img.paste((220, 40, 40), (0, 0, 150, 200))
    img.paste((40, 40, 220), (150, 0, 300, 200))
    path = tmp_path / "first-frame.png"
    img.save(path)

    s = session()
    page = s.open()
    page.select_option("#model", "k5-tiny-i2v")
    page.fill("#prompt", "the flag waves in the wind")
    page.click("#generate")
    # Without an image the page says so and points at the file field instead of sending a doomed request.
    assert "choose one" in page.text_content("#form-error")
    assert s.js("document.activeElement.id") == "image"
    page.set_input_files("#image", str(path))
    s.wait("document.querySelector('#image-preview').naturalWidth === 300", what="the image preview")
    page.click("#generate")
    s.wait("document.querySelector('#job-status').textContent === 'completed'", what="the i2v job")
    s.wait("document.querySelector('#player').readyState >= 2", what="the video to load")
    player = player_state(s)
    assert player["duration"] > 0 and (player["width"], player["height"]) == (96, 64), player
    video_id = page.text_content("#job-id")
    with stack.client() as c:
        assert c.get(f"/v1/videos/{video_id}").json()["model"] == "k5-tiny-i2v"
    assert not s.errors


def test_cancel_and_delete_buttons(session, stack):
    slow = {"prompt": "a slow blocker", "model": "k5-tiny-t2v", "num_inference_steps": 50, "seconds": "2"}
    with stack.client() as c:
        # Another job holds the worker, so the page's job shows its place in the queue first.
        blocker = c.post("/v1/videos", json=slow).json()
        deadline = time.monotonic() + 60
        while c.get(f"/v1/videos/{blocker['id']}").json()["status"] != "in_progress":
            assert time.monotonic() < deadline
            time.sleep(0.05)
    s = session()
    page = s.open()
    # Submitted from the keyboard: Ctrl+Enter in the prompt.
    page.evaluate("document.querySelector('.advanced').open = true")
    page.fill("#steps", "50")
    page.select_option("#seconds", "2")
    page.fill("#prompt", "a very slow sunrise")
    page.press("#prompt", "Control+Enter")
    video_id = s.wait("document.querySelector('#job-id').textContent", what="the job to be created")
    s.wait(
        "document.querySelector('#job-progress-text').textContent === 'Queued: next in line'"
        " && !document.querySelector('#job-progress').hasAttribute('value')",
        what="the queue position",
    )
    with stack.client() as c:
        c.post(f"/v1/videos/{blocker['id']}/cancel")
    s.wait("document.querySelector('#job-status').textContent === 'in progress'", what="the job to start")

    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "playground-progress.png"))
    page.click("#cancel")
    s.wait("document.querySelector('#job-status').textContent === 'cancelled'", what="the cancelled state")
    assert page.is_hidden("#cancel")
    done = stack.wait(video_id)
    assert done["status"] == "failed" and done["error"]["code"] == "cancelled"

    page.click("#delete")
    s.wait("document.querySelector('#job').hidden", what="the deleted job to go")
    with stack.client() as c:
        assert c.get(f"/v1/videos/{video_id}").status_code == 404
    s.wait(f"!document.querySelector('[data-video-id=\"{video_id}\"]')", what="the card to go")

    # A recent video's own Delete button.
    with stack.client() as c:
        other = c.post("/v1/videos", json={"prompt": "to be deleted", "model": "k5-tiny-t2v"}).json()
    stack.wait(other["id"])
    page.click("#refresh")
    card = f'[data-video-id="{other["id"]}"]'
    page.click(f"{card} button.danger")
    s.wait(f"!document.querySelector('{card}')", what="the card to go")
    with stack.client() as c:
        assert c.get(f"/v1/videos/{other['id']}").status_code == 404
    assert not s.errors


def test_phone_layout_and_keyboard_access(session, stack):
    with stack.client() as c:
        video = c.post("/v1/videos", json={"prompt": "a lighthouse at dusk", "model": "k5-tiny-t2v"}).json()
    stack.wait(video["id"])

    s = session(viewport=PHONE, device_scale_factor=2, is_mobile=True, has_touch=True)
    page = s.open()
    # Every form control has a label; every control is a real, focusable element (buttons, not divs).
    unlabeled = s.js(
        "[...document.querySelectorAll('input, select, textarea')]"
        ".filter(e => !e.labels.length && !e.getAttribute('aria-label')).map(e => e.id)"
    )
    assert unlabeled == []
    assert s.js("document.querySelectorAll('[onclick], div[role=button]').length") == 0
    # Tabbing from the top of a fresh page reaches the key field, the prompt and Generate, in that order.
    order = []
    for _ in range(15):
        page.keyboard.press("Tab")
        order.append(s.js("document.activeElement.id || document.activeElement.className"))
    assert order[0] == "skip-link" and "generate" in order, order
    assert order.index("api-key") < order.index("prompt") < order.index("generate"), order

    # A recent video opens from its thumbnail with the keyboard and plays.
    card = f'[data-video-id="{video["id"]}"]'
    s.wait(f"document.querySelector('{card} img')?.naturalWidth > 0", what="the thumbnail")
    page.focus(f"{card} .card-open")
    page.keyboard.press("Enter")
    s.wait("document.querySelector('#player').readyState >= 2", what="the video to load")
    assert page.text_content("#job-id") == video["id"]
    # Nothing wider than the screen.
    assert s.js("document.documentElement.scrollWidth") <= PHONE["width"]
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "playground-phone.png"), full_page=True)
    assert not s.errors
