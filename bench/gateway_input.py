"""Gateway input bench: what hostile request bodies cost a real gateway process.

    python -m bench.gateway_input [--tree DIR] [--json-mb 1000] [--multipart-mb 2000] [--images 8] [--slow 600]

Starts redis-server and `k5serve gateway` (from DIR, default this checkout, so an older tree can be measured
the same way) and sends, over raw sockets:

- a chunked JSON body of --json-mb MB (no Content-Length), until the gateway answers;
- a chunked multipart body whose file part is --multipart-mb MB, until the gateway answers;
- --images image-to-video requests at once, each a ~116 KB PNG declaring 6000x6000 pixels;
- --slow sockets that stall inside their header block or trickle a body, counted again after --slow-wait s.

It samples the gateway's RSS and the size of its open temp files every 20 ms and prints one markdown row per case:
peak RSS growth, RSS still held a second after the last answer, peak temp-file size, MB sent before the answer,
and the statuses; then the slow-client counts.
"""

from __future__ import annotations

import argparse
import base64
import io
import itertools
import json
import os
import select
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import redis
from PIL import Image

from service.console.localstack import RedisServer, free_port, stop_process, wait_for_port
from service.contract.jobs import JobStore
from service.contract.models import TINY
from service.contract.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
MB = 1024 * 1024


class Sampler:
    """Peak RSS of a process and peak size of a directory, sampled in a thread."""

    def __init__(self, pid: int, spool: Path) -> None:
        self.proc, self.spool = psutil.Process(pid), spool
        self.rss0 = self.rss_peak = self.proc.memory_info().rss
        self.disk_peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.rss_peak = max(self.rss_peak, self.proc.memory_info().rss)
            self.disk_peak = max(self.disk_peak, self.spooled())

    def spooled(self) -> int:
        """Bytes in the gateway's open files under the temp dir. Spooled parts are unlinked at once (O_TMPFILE),
        so a directory listing never sees them; the process's file descriptors do."""
        size, fds = 0, Path(f"/proc/{self.proc.pid}/fd")
        for fd in fds.iterdir() if fds.is_dir() else ():
            try:
                if os.readlink(fd).startswith(str(self.spool)):
                    size += os.stat(fd).st_size
            except OSError:  # closed while we looked
                pass
        return size

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        time.sleep(1.0)  # let freed memory go back, as it would between bursts
        self._stop.set()
        self._thread.join()
        self.rss_held = self.proc.memory_info().rss


def status_of(sock: socket.socket) -> int:
    sock.settimeout(600)
    data = b""
    while b"\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            return 0
        data += chunk
    return int(data.split()[1])


def stream_until_answered(sock: socket.socket, head: bytes, chunks: Iterator[bytes], most: int) -> int:
    """Send `head`, then chunked-encoded `chunks`, never the terminating chunk, until the server answers or
    `most` bytes went out. Returns the bytes sent."""
    sock.sendall(head)
    sent = 0
    for chunk in chunks:
        readable, _, _ = select.select([sock], [], [], 0)
        if readable or sent >= most:
            break
        try:
            sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        except (BrokenPipeError, ConnectionResetError):
            break
        sent += len(chunk)
    return sent


def chunked(port: int, head: bytes, first: bytes, total: int) -> tuple[int, int]:
    """Send a chunked body of `total` bytes (first, then filler) until the gateway answers: (status, sent)."""
    with socket.create_connection(("127.0.0.1", port)) as sock:
        chunks = itertools.chain([first], itertools.repeat(b"a" * MB))
        sent = stream_until_answered(sock, head + b"Transfer-Encoding: chunked\r\n\r\n", chunks, total)
        if sent >= total:
            sock.sendall(b"0\r\n\r\n")
        return status_of(sock), sent


def bomb_png() -> bytes:
    img = Image.new("RGB", (6000, 6000), (20, 120, 200))
    img.paste((240, 240, 240), (1000, 1000, 5000, 5000))
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def post_json(port: int, body: bytes) -> int:
    with socket.create_connection(("127.0.0.1", port)) as sock:
        head = b"POST /v1/videos HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        sock.sendall(head + b"Content-Length: %d\r\n\r\n" % len(body) + body)
        return status_of(sock)


def slow_clients(port: int, pid: int, n: int, wait_s: float) -> tuple[int, int]:
    """n sockets: half send an incomplete header block, half a header and then one body byte a second.
    Returns the gateway's established connections right after opening them and after wait_s."""
    socks = []
    for i in range(n):
        try:
            sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        except OSError:
            continue
        head = b"POST /v1/videos HTTP/1.1\r\nHost: x\r\n"
        try:
            sock.sendall(head if i % 2 else head + b"Content-Type: application/json\r\nContent-Length: 9999\r\n\r\n{")
        except OSError:
            pass
        socks.append(sock)
    gateway = psutil.Process(pid)

    def established() -> int:
        return sum(c.status == psutil.CONN_ESTABLISHED for c in gateway.net_connections() if c.laddr.port == port)

    opened = established()
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        for sock in socks[::2]:
            try:
                sock.send(b" ")
            except OSError:
                pass
        time.sleep(1)
    left = established()
    for sock in socks:
        sock.close()
    return opened, left


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tree", type=Path, default=ROOT, help="source tree whose gateway to run")
    ap.add_argument("--label", default=None, help="the table's tree column (default: the tree's name)")
    ap.add_argument("--json-mb", type=int, default=1000)
    ap.add_argument("--multipart-mb", type=int, default=2000)
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--slow", type=int, default=600, help="slow-client sockets (0: skip)")
    ap.add_argument("--slow-wait", type=float, default=30.0, help="seconds before counting what is still open")
    args = ap.parse_args()
    label = args.label or args.tree.name
    with tempfile.TemporaryDirectory(prefix="k5-bench-input-") as tmp:
        work = Path(tmp)
        spool = work / "spool"
        spool.mkdir()
        (work / "redis").mkdir()
        server = RedisServer(work / "redis").start()
        settings = Settings(redis_url=server.url)
        JobStore(redis.Redis.from_url(server.url), settings).announce(TINY["k5-tiny-i2v"], "bench-worker")
        port = free_port()
        env = {
            **os.environ,
            "PYTHONPATH": str(args.tree),
            "K5_PORT": str(port),
            "K5_REDIS_URL": server.url,
            "K5_STORAGE_URL": f"file://{work / 'store'}",
            "K5_ALLOW_ANONYMOUS": "true",
            "K5_HEARTBEAT_S": "600",  # the announced worker stays online for the whole bench
            "K5_LOG_LEVEL": "WARNING",
            "TMPDIR": str(spool),
        }
        gateway = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "gateway"],
            cwd=args.tree,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        rows = []
        try:
            wait_for_port(port, 60, gateway)
            time.sleep(1)
            json_head = b"POST /v1/videos HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            with Sampler(gateway.pid, spool) as s:
                status, sent = chunked(port, json_head, b'{"prompt": "', args.json_mb * MB)
            rows.append((f"chunked JSON {args.json_mb} MB", s, sent, Counter([status])))

            part = (
                b'--b\r\nContent-Disposition: form-data; name="prompt"\r\n\r\na cat\r\n'
                b'--b\r\nContent-Disposition: form-data; name="input_reference"; filename="a.png"\r\n'
                b"Content-Type: image/png\r\n\r\n"
            )
            form_head = b"POST /v1/videos HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
            with Sampler(gateway.pid, spool) as s:
                status, sent = chunked(port, form_head, part, args.multipart_mb * MB)
            rows.append((f"chunked multipart {args.multipart_mb} MB", s, sent, Counter([status])))

            png = bomb_png()
            url = "data:image/png;base64," + base64.b64encode(png).decode()
            image = {"image_url": url}
            body = json.dumps({"prompt": "a cat", "model": "k5-tiny-i2v", "size": "96x64", "input_reference": image})
            body = body.encode()
            with Sampler(gateway.pid, spool) as s, ThreadPoolExecutor(args.images) as pool:
                statuses = Counter(pool.map(lambda _: post_json(port, body), range(args.images)))
            name = f"{args.images} x PNG 6000x6000 ({len(png) // 1024} KB) at once"
            rows.append((name, s, len(body) * args.images, statuses))
            if args.slow:
                opened, left = slow_clients(port, gateway.pid, args.slow, args.slow_wait)
        finally:
            stop_process(gateway)
            server.stop()
    columns = ["tree", "case", "RSS before MB", "peak RSS growth MB", "RSS held after MB", "peak temp-dir MB"]
    print("\n| " + " | ".join([*columns, "MB sent", "answers"]) + " |")
    print("|---" * 8 + "|")
    for name, s, sent, statuses in rows:
        codes = ", ".join(f"{n}x {code}" for code, n in sorted(statuses.items()))
        print(
            f"| {label} | {name} | {s.rss0 / MB:.0f} | {(s.rss_peak - s.rss0) / MB:.0f} | "
            f"{(s.rss_held - s.rss0) / MB:.0f} | {s.disk_peak / MB:.0f} | {sent / MB:.0f} | {codes} |"
        )
    if args.slow:
        print(f"\n| tree | slow-client sockets | held open at first | still open after {args.slow_wait:g} s |")
        print("|---|---|---|---|")
        print(f"| {label} | {args.slow} | {opened} | {left} |")


if __name__ == "__main__":
    main()
