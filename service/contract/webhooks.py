"""Customer webhooks: Standard Webhooks signing, URL safety, and durable delivery from Redis.

Events are written by the job's terminal transition itself (service/contract/lifecycle.py, in the same MULTI), so
each job yields exactly one video.completed or video.failed per endpoint and a crash cannot lose it. The delivery
process (`k5serve webhooks`) claims due deliveries with a lease, so a crashed deliverer's work is retried by another;
receivers deduplicate on webhook-id, which stays the same across attempts.

Redis keys (named in service/contract/keys.py): the delivery record (JSON), the due set (delivery id -> next
attempt time, unix seconds on Redis's clock, which every deliverer shares) and each video's delivery ids
(for operators, and for DELETE, which deletes them).
"""

from __future__ import annotations

import base64
import ipaddress
import json
import logging
import os
import random
import secrets
import socket
import time
from datetime import UTC, datetime
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel
from standardwebhooks import Webhook

from service.contract import keys
from service.contract.clock import NOW_LUA

log = logging.getLogger(__name__)

DUE = keys.WEBHOOKS_DUE
EVENT_TYPES = {"completed": "video.completed", "failed": "video.failed"}
State = Literal["pending", "delivered", "gone", "failed", "refused"]


def new_secret() -> str:
    return "whsec_" + base64.b64encode(os.urandom(24)).decode()


class Signer:
    """Signs with every configured secret: during a rotation receivers accept either, per Standard Webhooks."""

    def __init__(self, secrets_: str) -> None:
        self.webhooks = [Webhook(s) for s in secrets_.split()]

    def headers(self, msg_id: str, timestamp: int, body: str) -> dict[str, str]:
        when = datetime.fromtimestamp(timestamp, tz=UTC)
        return {
            "webhook-id": msg_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": " ".join(w.sign(msg_id, when, body) for w in self.webhooks),
        }


# -- URL safety -----------------------------------------------------------------------------------------------


class UnsafeURL(ValueError):
    pass


class URLPolicy:
    """Webhooks go to public addresses only, unless the allowlist (hosts or CIDRs) says otherwise."""

    def __init__(self, allowed: list[str]) -> None:
        items = [a.strip() for a in allowed if a.strip()]
        self.hosts: set[str] = set()
        self.networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        for item in items:
            try:
                self.networks.append(ipaddress.ip_network(item, strict=False))
            except ValueError:
                self.hosts.add(item.lower())

    def check(self, url: str) -> list[str] | None:
        """Raises UnsafeURL unless every address the URL's host resolves to may be called; returns those addresses,
        for the sender to connect to (never a second lookup), or None for a host allowed by name."""
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https"):
            raise UnsafeURL("webhook URLs must be http or https")
        host = (parts.hostname or "").lower()
        if not host:
            raise UnsafeURL("the webhook URL has no host")
        if parts.username or parts.password:
            raise UnsafeURL("webhook URLs may not carry credentials")
        if host in self.hosts:
            return None
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError as e:
            raise UnsafeURL("the webhook URL has an invalid port") from e
        try:
            infos = self.resolve(host, port)
        except (socket.gaierror, UnicodeError) as e:
            raise UnsafeURL(f"the webhook host {host!r} does not resolve") from e
        addresses = list(dict.fromkeys(info[4][0].split("%")[0] for info in infos))
        for address in addresses:
            forms = [ipaddress.ip_address(address)]
            forms += embedded(forms[0])
            if not any(self._allowed(ip) for ip in forms) and not all(is_public(ip) for ip in forms):
                raise UnsafeURL(f"the webhook host {host!r} resolves to a non-public address ({address})")
        return addresses

    def _allowed(self, ip: IP) -> bool:
        return any(ip in net for net in self.networks)

    @staticmethod
    def resolve(host: str, port: int) -> list[Any]:
        return socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)


IP = ipaddress.IPv4Address | ipaddress.IPv6Address
# Not globally reachable, though the ipaddress module's is_global says otherwise on the Pythons we run.
_NON_PUBLIC = [ipaddress.ip_network(n) for n in ("192.0.0.0/24", "64:ff9b:1::/48")]
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def embedded(ip: IP) -> list[IP]:
    """The IPv4 addresses an IPv6 address carries and that a router or the kernel may end up reaching: mapped
    (::ffff:a.b.c.d), IPv4-compatible (::a.b.c.d), NAT64 (64:ff9b::a.b.c.d), 6to4 (2002:AABB:CCDD::) and Teredo."""
    if not isinstance(ip, ipaddress.IPv6Address):
        return []
    found: list[IP] = []
    if ip.ipv4_mapped:
        found.append(ip.ipv4_mapped)
    if int(ip) >> 32 == 0 and int(ip) > 1:
        found.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    if ip in _NAT64:
        found.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    if ip.sixtofour:
        found.append(ip.sixtofour)
    if ip.teredo:
        found.extend(ip.teredo)
    return found


def is_public(ip: IP) -> bool:
    # is_global excludes loopback, private, link-local (incl. 169.254.169.254 metadata), CGNAT, reserved.
    return ip.is_global and not ip.is_multicast and not any(ip in net for net in _NON_PUBLIC)


# -- delivery records -----------------------------------------------------------------------------------------


class Delivery(BaseModel):
    id: str
    event_id: str
    type: str
    video_id: str
    url: str
    body: str
    created_at: float
    state: State = "pending"
    attempts: int = 0
    last_status: int | None = None
    last_error: str | None = None
    next_at: float | None = None
    finished_at: float | None = None


def delivery_key(delivery_id: str) -> str:
    return keys.webhook(delivery_id)


# Due at once on Redis's clock, which the deliverers compare due times with (the writer's own clock may be off).
_DUE_NOW = NOW_LUA + "redis.call('ZADD', KEYS[1], now, ARGV[1])\n"


def queue_event(pipe: Any, video: dict, urls: list[str], now: float, record_ttl_s: int) -> None:
    """Add one event for a video that just became terminal, one delivery per endpoint, to a MULTI pipeline."""
    event_id = f"evt_{secrets.token_hex(12)}"
    body = json.dumps(
        {
            "id": event_id,
            "object": "event",
            "created_at": int(now),
            "type": EVENT_TYPES[video["status"]],
            "data": {"id": video["id"]},
            # k5serve extension: the video object as it was at the event, so receivers need no extra GET.
            "video": video,
        },
        separators=(",", ":"),
    )
    for url in dict.fromkeys(urls):
        d = Delivery(
            id=f"whd_{secrets.token_hex(12)}",
            event_id=event_id,
            type=EVENT_TYPES[video["status"]],
            video_id=video["id"],
            url=url,
            body=body,
            created_at=now,
            next_at=now,
        )
        pipe.set(delivery_key(d.id), d.model_dump_json(), ex=record_ttl_s)
        pipe.sadd(keys.video_webhooks(video["id"]), d.id)
        pipe.expire(keys.video_webhooks(video["id"]), record_ttl_s)
        pipe.eval(_DUE_NOW, 1, DUE, d.id)


def backoff(attempts: int, base_s: float, max_s: float) -> float:
    """Exponential with equal jitter: half the step fixed, half random, so retries spread out."""
    step = min(max_s, base_s * 2 ** max(0, attempts - 1))
    return step / 2 + random.uniform(0, step / 2)


def deliveries_of(r: Any, video_id: str) -> list[Delivery]:
    ids = sorted(i.decode() for i in r.smembers(keys.video_webhooks(video_id)))
    raws = r.mget([delivery_key(i) for i in ids]) if ids else []
    return [Delivery.model_validate_json(raw) for raw in raws if raw]


def now_s() -> float:
    return time.time()
