"""The gateway's accepted connections have Nagle's algorithm off (TCP_NODELAY) in both process modes. Without it
a response written in two sends (headers, then body) waits for the client's delayed ACK: ~40 ms per request on a
keep-alive connection, which `k5serve gateway --workers N` had and one process did not.

Checked on the real process: the test duplicates the gateway's own end of a live connection (pidfd_getfd) and
reads the option from it."""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import socket

import psutil
import pytest

from tests.conftest import gateway_process

_PIDFD_GETFD = {"x86_64": 438, "aarch64": 438}.get(platform.machine())


def _server_end(client: socket.socket) -> socket.socket:
    """A duplicate of the descriptor that some process under this one holds for the other end of `client`."""
    if _PIDFD_GETFD is None:
        pytest.skip(f"pidfd_getfd: no syscall number known for {platform.machine()}")
    libc = ctypes.CDLL(None, use_errno=True)
    me = client.getsockname()
    for proc in psutil.Process().children(recursive=True):
        for conn in proc.net_connections("tcp"):
            if conn.raddr and tuple(conn.raddr) == me:
                pidfd = os.pidfd_open(proc.pid)
                try:
                    fd = libc.syscall(_PIDFD_GETFD, pidfd, conn.fd, 0)
                finally:
                    os.close(pidfd)
                if fd < 0:
                    err = ctypes.get_errno()
                    if err in (errno.EPERM, errno.ENOSYS):
                        pytest.skip(f"pidfd_getfd not allowed here: {os.strerror(err)}")
                    raise OSError(err, os.strerror(err))
                return socket.socket(fileno=fd)
    raise AssertionError(f"no process under this one holds the other end of {me}")


@pytest.mark.parametrize("workers", ["1", "2"])
def test_accepted_connections_have_nodelay(redis_server, tmp_path, workers):
    url = redis_server.url.replace("/0", "/2")
    with gateway_process(url, tmp_path, "--workers", workers) as base:
        port = int(base.rsplit(":", 1)[1])
        # A few connections: with several processes the kernel spreads them, and each process must set it.
        for _ in range(4):
            with socket.create_connection(("127.0.0.1", port), timeout=30) as client:
                client.sendall(b"GET /healthz HTTP/1.1\r\nHost: gateway\r\n\r\n")
                assert client.recv(65536).startswith(b"HTTP/1.1 ")  # accepted and served: the server end exists
                with _server_end(client) as server:
                    assert server.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
