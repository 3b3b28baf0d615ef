"""Webhook delivery under hostile receivers: a tarpit that trickles a byte a second, DNS rebinding, a deliverer
killed mid-attempt. Real Redis, real `k5serve webhooks` processes, real HTTP receivers on loopback."""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from standardwebhooks import Webhook

from bench.webhook_tarpit import Tarpit
from service.console.localstack import stop_process
from service.contract import webhooks
from service.contract.settings import Settings
from service.delivery.deliverer import Deliverer
from tests.conftest import WEBHOOK_SECRET, start_service
from tests.test_lifecycle import Receiver


@pytest.fixture
def tarpit() -> Iterator[Tarpit]:
    t = Tarpit(gap_s=1.0)
    yield t
    t.close()


@contextlib.contextmanager
def receivers(n: int) -> Iterator[list[Receiver]]:
    rs = [Receiver() for _ in range(n)]
    try:
        yield rs
    finally:
        for rec in rs:
            rec.server.shutdown()
            rec.server.server_close()


def queue(r, url: str, video_id: str) -> None:
    video = {"id": video_id, "object": "video", "status": "completed"}
    with r.pipeline() as pipe:
        webhooks.queue_event(pipe, video, [url], webhooks.now_s(), 3600)
        pipe.execute()


def wait_for(predicate, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@contextlib.contextmanager
def deliverer(stack, r, tmp_path: Path, **env: str) -> Iterator[object]:
    """A `k5serve webhooks` process on the test's own Redis database."""
    url = stack.env["K5_REDIS_URL"].rsplit("/", 1)[0] + f"/{r.connection_pool.connection_kwargs['db']}"
    proc = start_service("webhooks", {**stack.env, "K5_REDIS_URL": url, **env}, tmp_path, "webhooks-test")
    try:
        yield proc
    finally:
        stop_process(proc.popen, timeout=20)


def records(r, video_id: str) -> list[webhooks.Delivery]:
    return webhooks.deliveries_of(r, video_id)


def test_a_tarpit_receiver_delays_no_other_endpoint(stack, r, tmp_path, tarpit):
    """Twenty events to a tarpit, then one each to five healthy receivers: the tarpit holds at most its share of
    the slots, the loop never waits for it, and the healthy ones are delivered while it still trickles."""
    env = {"K5_WEBHOOK_TIMEOUT_S": "120", "K5_WEBHOOK_CONCURRENCY": "8", "K5_WEBHOOK_ENDPOINT_CONCURRENCY": "2"}
    with deliverer(stack, r, tmp_path, **env), receivers(5) as healthy:
        for i in range(20):
            queue(r, tarpit.url(), f"video_tarpit{i}")
        wait_for(lambda: tarpit.open == 2, "the tarpit to hold two attempts")
        for i, rec in enumerate(healthy):
            queue(r, rec.url(), f"video_ok{i}")
        wait_for(lambda: all(rec.calls for rec in healthy), "the healthy receivers' deliveries")
        assert tarpit.open == 2 and tarpit.most_open == 2 and tarpit.accepted == 2
        tarpit.close()  # its attempts end now, so the deliverer's stop need not wait out their 120 s
    assert all(records(r, f"video_ok{i}")[0].state == "delivered" for i in range(5))


def test_an_attempt_has_a_total_deadline(stack, r, tmp_path, tarpit):
    """2.5 s: longer than the tarpit's 1 s between bytes, so only a deadline on the whole attempt ends it."""
    with deliverer(stack, r, tmp_path, K5_WEBHOOK_TIMEOUT_S="2.5"):
        queue(r, tarpit.url(), "video_slow")
        wait_for(lambda: records(r, "video_slow")[0].attempts >= 1, "the first attempt to end")
    (d,) = records(r, "video_slow")
    assert d.state == "pending" and d.last_status is None and "deadline" in (d.last_error or "")


def test_redelivery_after_a_killed_deliverer_keeps_the_webhook_id(stack, r, tmp_path):
    """At-least-once: a deliverer killed mid-attempt leaves the delivery to the next one after its lease; the
    event is sent again under the same webhook-id, so the receiver can deduplicate."""
    release = threading.Event()
    with receivers(1) as (rec,):
        original = rec.server.RequestHandlerClass.do_POST

        def hold_the_first(handler) -> None:
            if not rec.calls:
                rec.calls.append(({k.lower(): v for k, v in handler.headers.items()}, b"", 0))
                release.wait(60)
                return
            original(handler)

        rec.server.RequestHandlerClass.do_POST = hold_the_first
        queue(r, rec.url(), "video_kill")
        with deliverer(stack, r, tmp_path, K5_WEBHOOK_TIMEOUT_S="1") as first:
            rec.wait_calls(1)
            first.popen.send_signal(signal.SIGKILL)
            first.popen.wait(10)
        with deliverer(stack, r, tmp_path, K5_WEBHOOK_TIMEOUT_S="1"):
            calls = rec.wait_calls(2)
            wait_for(lambda: records(r, "video_kill")[0].state == "delivered", "the delivery record")
        release.set()
    (held, _, _), (again, body, status) = calls[:2]
    assert status == 200 and held["webhook-id"] == again["webhook-id"]
    assert Webhook(WEBHOOK_SECRET).verify(body, again)["id"] == held["webhook-id"]


# -- DNS rebinding: the send connects to the address the policy checked ---------------------------------------


def rebinding(monkeypatch) -> None:
    """The policy's lookup says localhost is 127.0.0.2 (allowed); the system resolver says 127.0.0.1, as a
    rebinding name would answer the second lookup."""
    real = socket.getaddrinfo

    def resolve(host: str, port: int) -> list:
        assert host == "localhost"
        return real("127.0.0.2", port, type=socket.SOCK_STREAM)

    monkeypatch.setattr(webhooks.URLPolicy, "resolve", staticmethod(resolve))


def deliver_in_process(r, until) -> None:
    settings = Settings(webhook_secret=WEBHOOK_SECRET, webhook_allowed_hosts="127.0.0.2/32", webhook_timeout_s=5)
    d = Deliverer(settings, r)
    try:
        wait_for(lambda: d.tick() >= 0 and until(), "the attempt")
    finally:
        d.pool.shutdown(wait=True)


def test_the_send_connects_to_the_checked_address_keeping_the_host(r, monkeypatch):
    rebinding(monkeypatch)
    with receivers(1) as (checked,):
        port = checked.server.server_port
        checked.server.shutdown()
        checked.server.server_close()  # rebind the same port on 127.0.0.2, beside a target on 127.0.0.1
        from http.server import ThreadingHTTPServer

        handler = checked.server.RequestHandlerClass
        checked.server = ThreadingHTTPServer(("127.0.0.2", port), handler)
        target = ThreadingHTTPServer(("127.0.0.1", port), handler)
        target_calls: list = []
        target.RequestHandlerClass = type("T", (handler,), {"do_POST": lambda h: target_calls.append(h.path)})
        for server in (checked.server, target):
            threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            queue(r, f"http://localhost:{port}/hook", "video_rebind")
            deliver_in_process(r, lambda: records(r, "video_rebind")[0].state != "pending")
        finally:
            target.shutdown()
            target.server_close()
        assert target_calls == []
        ((headers, body, status),) = checked.calls
        assert status == 200 and headers["host"] == f"localhost:{port}"
        assert json.loads(body)["data"]["id"] == "video_rebind"


def test_tls_keeps_the_server_name_of_the_url(r, monkeypatch, tmp_path):
    rebinding(monkeypatch)
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost"]
        + ["-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
    )
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    names: list[str | None] = []
    ctx.sni_callback = lambda _sock, name, _ctx: names.append(name)
    server = socket.create_server(("127.0.0.2", 0))

    def serve() -> None:
        with contextlib.suppress(OSError):
            conn, _ = server.accept()
            with contextlib.suppress(OSError), ctx.wrap_socket(conn, server_side=True):
                pass

    threading.Thread(target=serve, daemon=True).start()
    try:
        queue(r, f"https://localhost:{server.getsockname()[1]}/hook", "video_tls")
        deliver_in_process(r, lambda: records(r, "video_tls")[0].attempts >= 1)
    finally:
        server.close()
    # The connection reached the checked address, asked for the URL's name, and the self-signed certificate
    # was refused: the name is verified too.
    assert names == ["localhost"]
    assert "CERTIFICATE_VERIFY_FAILED" in (records(r, "video_tls")[0].last_error or "")


@pytest.mark.parametrize(
    "url",
    [
        "http://[::127.0.0.1]/hook",  # IPv4-compatible
        "http://[::ffff:127.0.0.1]/hook",  # IPv4-mapped
        "http://[64:ff9b::7f00:1]/hook",  # NAT64
        "http://[2002:7f00:1::]/hook",  # 6to4
        "http://[2001:0:4136:e378:8000:63bf:f5ff:fffe]/hook",  # Teredo of 10.0.0.1
        "http://192.0.0.192/hook",
    ],
)
def test_the_policy_refuses_private_addresses_in_other_forms(url):
    with pytest.raises(webhooks.UnsafeURL, match="non-public"):
        webhooks.URLPolicy("").check(url)


def test_public_addresses_in_those_forms_pass():
    for url in ("http://[64:ff9b::808:808]/", "http://[2002:808:808::]/", "http://8.8.8.8/"):
        assert webhooks.URLPolicy("").check(url)


@pytest.mark.parametrize(
    "url",
    [
        "http://[::10.0.0.1]/hook",
        "http://[::ffff:10.0.0.1]/hook",
        "http://[64:ff9b::a00:1]/hook",  # NAT64 of 10.0.0.1
        "http://[2002:c0a8:1::]/hook",  # 6to4 of 192.168.0.1
        "http://[2002:a9fe:a9fe::]/hook",  # 6to4 of the metadata address
        "http://192.0.0.192/hook",
    ],
)
def test_the_gateway_refuses_them_at_creation(stack, url):
    with stack.client() as c:
        resp = c.post("/v1/videos", json={"prompt": "x", "model": "k5-tiny-t2v", "size": "64x64", "webhook_url": url})
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["code"] == "unsafe_webhook_url"
