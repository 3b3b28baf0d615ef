"""Hostile HTTP against a real `k5serve gateway` process over raw sockets: chunked bodies past the cap,
malformed JSON that used to crash the handler, slow headers and bodies, and too many connections."""

from __future__ import annotations

import http.client
import itertools
import json
import select
import socket
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from bench.gateway_input import stream_until_answered
from tests.conftest import gateway_process

IMAGE_BYTES = 1024 * 1024  # so the body cap is small: 1 MiB * 4/3 + 256 KiB
CAP = IMAGE_BYTES * 4 // 3 + 256 * 1024


@pytest.fixture
def gateway(redis_server, tmp_path) -> Iterator[tuple[str, int, Path]]:
    spool = tmp_path / "spool"
    spool.mkdir()
    env = {
        "K5_MAX_IMAGE_BYTES": str(IMAGE_BYTES),
        "K5_HEADER_TIMEOUT_S": "1",
        "K5_BODY_TIMEOUT_S": "2",
        "K5_MAX_CONNECTIONS_PER_CLIENT": "6",
        "TMPDIR": str(spool),  # where multipart file parts are spooled
    }
    with gateway_process(redis_server.url.replace("/0", "/1"), tmp_path / "store", **env) as url:
        parts = urlsplit(url)
        yield parts.hostname or "127.0.0.1", parts.port or 80, spool


def connect(host: str, port: int) -> socket.socket:
    return socket.create_connection((host, port), timeout=30)


def read_response(sock: socket.socket) -> tuple[int, dict]:
    """Status and JSON body of one response (the server closes or sends content-length)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    if not head:
        return 0, {}
    headers = dict(line.decode().lower().split(": ", 1) for line in head.split(b"\r\n")[1:] if b": " in line)
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return int(head.split()[1]), json.loads(body) if body else {}


def endless(piece: bytes) -> Iterator[bytes]:
    while True:
        yield piece


def test_chunked_json_past_the_cap_is_413_before_the_body_ends(gateway):
    host, port, _ = gateway
    with connect(host, port) as sock:
        head = b"POST /v1/videos HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        head += b"Transfer-Encoding: chunked\r\n\r\n"
        chunks = itertools.chain([b'{"prompt": "'], endless(b"a" * 65536))
        sent = stream_until_answered(sock, head, chunks, most=40 * CAP)
        status, body = read_response(sock)
    assert status == 413, (status, body)
    assert body["error"]["code"] == "body_too_large"
    assert sent < 40 * CAP  # answered while the body was still coming


def test_chunked_multipart_file_past_the_cap_is_413_and_spools_at_most_the_cap(gateway):
    host, port, spool = gateway
    boundary = b"k5boundary"
    first = (
        b"--" + boundary + b'\r\nContent-Disposition: form-data; name="prompt"\r\n\r\na cat\r\n'
        b"--" + boundary + b'\r\nContent-Disposition: form-data; name="input_reference"; filename="a.png"\r\n'
        b"Content-Type: image/png\r\n\r\n"
    )
    spooled = 0
    with connect(host, port) as sock:
        head = b"POST /v1/videos HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=k5boundary\r\n"
        head += b"Transfer-Encoding: chunked\r\n\r\n"
        chunks = itertools.chain([first], endless(b"\x89" * 65536))
        sent = stream_until_answered(sock, head, chunks, most=40 * CAP)
        spooled = sum(f.stat().st_size for f in spool.rglob("*") if f.is_file())
        status, body = read_response(sock)
    assert status == 413, (status, body)
    assert sent < 40 * CAP
    assert spooled <= CAP
    assert not [f for f in spool.rglob("*") if f.is_file()]  # the spooled part is deleted


@pytest.mark.parametrize(
    "body",
    [
        '{"prompt": "a", "metadata": ' + "[" * 960 + "]" * 960 + "}",
        '{"prompt": "a", "seed": ' + "7" * 4301 + "}",
        "[" * 100_000,
    ],
    ids=["nested-960", "int-4301-digits", "nested-100000"],
)
def test_malformed_json_is_400_and_keeps_the_connection(gateway, body):
    host, port, _ = gateway
    conn = http.client.HTTPConnection(host, port, timeout=30)
    try:
        conn.request("POST", "/v1/videos", body=body, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        envelope = json.loads(resp.read())
        assert resp.status == 400, envelope
        assert envelope["error"]["code"] == "invalid_json"
        assert resp.getheader("connection") != "close"
        sock = conn.sock
        conn.request("GET", "/healthz")
        assert conn.getresponse().status == 200
        assert conn.sock is sock  # the same keep-alive connection
    finally:
        conn.close()


def test_incomplete_headers_are_timed_out(gateway):
    host, port, _ = gateway
    with connect(host, port) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # never the blank line
        status, body = read_response(sock)
        assert status == 408 and body["error"]["code"] == "request_timeout"
        assert sock.recv(1) == b""  # and closed
    with connect(host, port) as sock:  # a connection that sends nothing at all
        assert read_response(sock)[0] == 408


def test_trickled_body_is_timed_out(gateway):
    host, port, _ = gateway
    with connect(host, port) as sock:
        sock.sendall(
            b"POST /v1/videos HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n{"
        )
        closed = False
        for _ in range(200):  # one byte every 0.1 s would take 10000 s
            readable, _, _ = select.select([sock], [], [], 0.1)
            if readable:
                closed = True
                break
            try:
                sock.sendall(b" ")
            except (BrokenPipeError, ConnectionResetError):
                closed = True
                break
        assert closed
        status, _ = read_response(sock)
        assert status in (0, 408)


def test_connections_per_client_are_bounded(gateway):
    host, port, _ = gateway
    held: list[socket.socket] = []
    try:
        for _ in range(6):  # each holds a keep-alive connection that works
            held.append(connect(host, port))
            held[-1].sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert read_response(held[-1])[0] == 200
        with connect(host, port) as extra:
            status, body = read_response(extra)
            assert status == 503 and body["error"]["code"] == "too_many_connections"
        held.pop().close()
        status = 0
        for _ in range(50):  # the freed slot is usable again, once the server has seen the close
            with connect(host, port) as again:
                again.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                status, _ = read_response(again)
            if status == 200:
                break
        assert status == 200
    finally:
        for s in held:
            s.close()
