"""One webhook POST: to the addresses the URL policy checked, within one total deadline.

httpx resolves a host name again when it connects, so a name that answered the policy with a public address
could answer the connect with a private one (DNS rebinding). Here the connection goes to the checked addresses
themselves; the URL, and so the Host header and the TLS server name (SNI and certificate check), stay the
name's. And a receiver that trickles a byte every few seconds never trips a per-read timeout: every read,
write and connect here is bounded by what is left of the attempt's deadline instead.
"""

from __future__ import annotations

import socket
import ssl
import time
from collections.abc import Iterable
from typing import Any

import httpcore
from httpcore import NetworkBackend, NetworkStream
from httpcore._backends.sync import SyncStream

USER_AGENT = "k5serve-webhooks/0.1"
ERRORS = (httpcore.TimeoutException, httpcore.NetworkError, httpcore.ProtocolError, ssl.SSLError, OSError)


class DeadlineExceeded(httpcore.ReadTimeout):
    pass


class _Deadline:
    def __init__(self, at: float) -> None:
        self.at = at

    def left(self, timeout: float | None) -> float:
        remaining = self.at - time.monotonic()
        if remaining <= 0:
            raise DeadlineExceeded("the attempt's deadline passed")
        return remaining if timeout is None else min(timeout, remaining)


class _DeadlineStream(NetworkStream):
    def __init__(self, inner: NetworkStream, deadline: _Deadline) -> None:
        self.inner, self.deadline = inner, deadline

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self.inner.read(max_bytes, self.deadline.left(timeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self.inner.write(buffer, self.deadline.left(timeout))

    def close(self) -> None:
        self.inner.close()

    def start_tls(
        self, ssl_context: ssl.SSLContext, server_hostname: str | None = None, timeout: float | None = None
    ) -> NetworkStream:
        tls = self.inner.start_tls(ssl_context, server_hostname, self.deadline.left(timeout))
        return _DeadlineStream(tls, self.deadline)

    def get_extra_info(self, info: str) -> Any:
        return self.inner.get_extra_info(info)


class _PinnedBackend(NetworkBackend):
    """Connects to the given addresses in turn, whatever host name the request names (None: resolve it)."""

    def __init__(self, addresses: list[str] | None, deadline: _Deadline) -> None:
        self.addresses, self.deadline = addresses, deadline

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> NetworkStream:
        last: Exception | None = None
        for address in self.addresses or [host]:
            try:
                sock = socket.create_connection((address, port), self.deadline.left(timeout))
            except TimeoutError as e:
                raise httpcore.ConnectTimeout(str(e)) from e
            except OSError as e:
                last = e
                continue
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return _DeadlineStream(SyncStream(sock), self.deadline)
        raise httpcore.ConnectError(f"could not connect to {host}:{port}: {last}")


def post(url: str, body: str, headers: dict[str, str], addresses: list[str] | None, total_s: float) -> int:
    """POSTs body and returns the response status; raises one of ERRORS. Redirects are never followed and the
    response body is never read: only the status counts."""
    deadline = _Deadline(time.monotonic() + total_s)
    timeouts = {"connect": total_s, "read": total_s, "write": total_s, "pool": total_s}
    try:
        return _post(url, body, headers, _PinnedBackend(addresses, deadline), timeouts)
    except httpcore.TimeoutException as e:
        if time.monotonic() >= deadline.at - 0.05:
            raise DeadlineExceeded(f"no response within the attempt's deadline of {total_s:g}s") from e
        raise


def _post(url: str, body: str, headers: dict[str, str], backend: NetworkBackend, timeouts: dict) -> int:
    sent: list[tuple[str | bytes, str | bytes]] = [*headers.items(), ("User-Agent", USER_AGENT)]
    sent.append(("Content-Length", str(len(body.encode()))))
    with httpcore.ConnectionPool(network_backend=backend, retries=0) as pool:
        with pool.stream(
            "POST",
            url,
            headers=sent,
            content=body.encode(),
            extensions={"timeout": timeouts},
        ) as resp:
            return resp.status
