"""The gateway's HTTP/1.1 protocol: uvicorn's h11 protocol with the deadlines and bounds uvicorn lacks.

uvicorn times out idle keep-alive connections only. A client that sends half a header block, or trickles a body
a byte at a time, holds its connection (and a request task) for as long as it likes, and one client may open
any number of connections. This protocol gives each request a deadline for its headers and one for its body,
and refuses a client's connections past a bound. Each gateway process counts its own connections.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from dataclasses import dataclass

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from service.contract.settings import Settings

log = logging.getLogger(__name__)

_TIMEOUT = b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
_BUSY = b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\nconnection: close\r\n"


def _raw(head: bytes, message: str, code: str, type_: str) -> bytes:
    body = (
        '{"error":{"message":"%s","type":"%s","param":null,"code":"%s"}}' % (message, type_, code)  # noqa: UP031
    ).encode()
    return head + b"content-length: %d\r\n\r\n" % len(body) + body


@dataclass(frozen=True)
class ClientLimits:
    header_timeout_s: float
    body_timeout_s: float
    max_connections_per_client: int  # 0: no bound

    @classmethod
    def of(cls, settings: Settings) -> ClientLimits:
        return cls(settings.header_timeout_s, settings.body_timeout_s, settings.max_connections_per_client)


class GatewayProtocol(H11Protocol):
    limits: ClientLimits | None = None  # set by configure(); read from K5_* in processes that did not call it
    open_per_client: Counter[str] = Counter()
    refusal_logged: dict[str, float] = {}  # peer -> when its refusals were last logged (kept small)

    @classmethod
    def configure(cls, settings: Settings) -> type[GatewayProtocol]:
        cls.limits = ClientLimits.of(settings)
        return cls

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if GatewayProtocol.limits is None:
            GatewayProtocol.limits = ClientLimits.of(Settings())
        self._limits = GatewayProtocol.limits
        self._deadline: asyncio.TimerHandle | None = None
        self._phase: str | None = None
        self._peer = self.client[0] if self.client else ""
        self.open_per_client[self._peer] += 1
        bound = self._limits.max_connections_per_client
        if bound and self.open_per_client[self._peer] > bound:
            now = self.loop.time()
            if now - self.refusal_logged.get(self._peer, -60.0) >= 60:  # a line a minute, not one per connection
                if len(self.refusal_logged) > 1024:
                    self.refusal_logged.clear()
                self.refusal_logged[self._peer] = now
                log.warning("refusing connections: %s has %d open", self._peer, bound, extra={"client": self._peer})
            message = f"Too many connections from one client (at most {bound}); reuse a keep-alive connection."
            transport.write(_raw(_BUSY, message, "too_many_connections", "service_unavailable"))
            transport.close()
            return
        self._arm("headers")

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self.open_per_client[self._peer] -= 1
        if self.open_per_client[self._peer] <= 0:
            del self.open_per_client[self._peer]
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        state = self.conn.their_state
        if state is h11.IDLE:  # bytes of a request whose header block is not complete yet
            self._arm("headers")
        elif state is h11.SEND_BODY:
            self._arm("body")
        else:
            self._disarm()

    def on_response_complete(self) -> None:
        self._disarm()  # idle keep-alive connections are uvicorn's own timeout's business
        super().on_response_complete()

    def _arm(self, phase: str) -> None:
        if self._phase == phase:
            return
        self._disarm()
        seconds = self._limits.header_timeout_s if phase == "headers" else self._limits.body_timeout_s
        self._phase = phase
        self._deadline = self.loop.call_later(seconds, self._expired, phase)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        self._deadline, self._phase = None, None

    def _expired(self, phase: str) -> None:
        self._deadline, self._phase = None, None
        if self.transport.is_closing():
            return
        waiting = self.conn.their_state is (h11.IDLE if phase == "headers" else h11.SEND_BODY)
        if not waiting:
            return
        limit = self._limits.header_timeout_s if phase == "headers" else self._limits.body_timeout_s
        log.info("closed a slow connection: %s incomplete after %ss", phase, limit, extra={"client": self._peer})
        if self.cycle is None or not self.cycle.response_started:
            message = f"The request {phase} did not arrive within {limit:g} s."
            self.transport.write(_raw(_TIMEOUT, message, "request_timeout", "invalid_request_error"))
        if self.cycle is not None:
            self.cycle.disconnected = True  # the app's own answer, if it still writes one, goes nowhere
        self.transport.close()
