"""Webhook bench: one tarpit receiver beside healthy ones, delivered by a real `k5serve webhooks` process.

    python -m bench.webhook_tarpit --tarpit-events 20 --healthy 5

The tarpit accepts, reads the request and answers one byte every 5 s (so no per-read timeout ever fires). Its
events are queued first; once it holds connections, one event per healthy receiver is queued, and the table
gives how long each receiver waited for its delivery. Expected: the healthy ones within a second or two, the
tarpit held to K5_WEBHOOK_ENDPOINT_CONCURRENCY connections, each ended by the K5_WEBHOOK_TIMEOUT_S deadline.
"""

from __future__ import annotations

import argparse
import base64
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import redis

from bench.report import table
from service.console.localstack import RedisServer, stop_process
from service.contract import webhooks

ROOT = Path(__file__).resolve().parents[1]
SECRET = "whsec_" + base64.b64encode(b"k5serve-tarpit-bench-secret-0001").decode()
COLUMNS = [("receiver", "name", "{}"), ("events", "events", "{}"), ("delivered", "delivered", "{}")]
COLUMNS += [("first delivery s", "first_s", "{:.2f}"), ("most connections at once", "most_open", "{}")]


class Tarpit:
    """Accepts, reads the request, then answers one byte every `gap_s` (5 s), forever: no read ever times out."""

    def __init__(self, gap_s: float = 5.0) -> None:
        self.gap_s = gap_s
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.stopped = threading.Event()
        self.lock = threading.Lock()
        self.open = self.most_open = self.accepted = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def url(self) -> str:
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}/hook"

    def _serve(self) -> None:
        while not self.stopped.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._trickle, args=(conn,), daemon=True).start()

    def _trickle(self, conn: socket.socket) -> None:
        with self.lock:
            self.accepted += 1
            self.open += 1
            self.most_open = max(self.most_open, self.open)
        try:
            conn.recv(65536)
            for byte in b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n" * 100:
                conn.sendall(bytes([byte]))
                if self.stopped.wait(self.gap_s):
                    break
        except OSError:
            pass
        finally:
            conn.close()
            with self.lock:
                self.open -= 1

    def close(self) -> None:
        self.stopped.set()
        self.sock.close()


def healthy_receiver(arrivals: list[float]) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's naming
            self.rfile.read(int(self.headers.get("content-length", 0)))
            arrivals.append(time.monotonic())
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def queue(r: redis.Redis, url: str, video_id: str) -> None:
    with r.pipeline() as pipe:
        webhooks.queue_event(pipe, {"id": video_id, "status": "completed"}, [url], webhooks.now_s(), 3600)
        pipe.execute()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tarpit-events", type=int, default=20)
    ap.add_argument("--healthy", type=int, default=5)
    ap.add_argument("--timeout-s", type=float, default=10.0, help="K5_WEBHOOK_TIMEOUT_S of the deliverer")
    ap.add_argument("--wait-s", type=float, default=60.0, help="give up on the healthy deliveries after this")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="k5-tarpit-") as tmp:
        server = RedisServer(Path(tmp) / "redis").start()
        tarpit, arrivals = Tarpit(), [list[float]() for _ in range(args.healthy)]
        healthy = [healthy_receiver(a) for a in arrivals]
        env = {
            **os.environ,
            "K5_REDIS_URL": server.url,
            "K5_WEBHOOK_SECRET": SECRET,
            "K5_WEBHOOK_ALLOWED_HOSTS": "127.0.0.1",
            "K5_WEBHOOK_TIMEOUT_S": str(args.timeout_s),
            "K5_METRICS_PORT": "0",
        }
        proc = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "webhooks"], env=env, cwd=ROOT, stderr=subprocess.DEVNULL
        )
        try:
            r = redis.Redis.from_url(server.url)
            port = tarpit.sock.getsockname()[1]
            for i in range(args.tarpit_events):
                queue(r, f"http://127.0.0.1:{port}/hook", f"video_tarpit{i}")
            while tarpit.open == 0:
                time.sleep(0.05)
            start = time.monotonic()
            for i, s in enumerate(healthy):
                queue(r, f"http://127.0.0.1:{s.server_port}/hook", f"video_ok{i}")
            while not all(arrivals) and time.monotonic() - start < args.wait_s:
                time.sleep(0.05)
            rows = [
                {"name": f"healthy {i}", "events": 1, "delivered": len(a), "first_s": a[0] - start if a else None}
                for i, a in enumerate(arrivals)
            ]
            rows.append({"name": "tarpit", "events": args.tarpit_events, "delivered": 0, "most_open": tarpit.most_open})
        finally:
            stop_process(proc, timeout=args.timeout_s + 10)
            tarpit.stopped.set()
            tarpit.sock.close()
            for s in healthy:
                s.shutdown()
            server.stop()
    print(table(rows, COLUMNS))
    print(f"\nK5_WEBHOOK_TIMEOUT_S={args.timeout_s:g}; the tarpit sends one byte every 5 s")


if __name__ == "__main__":
    main()
