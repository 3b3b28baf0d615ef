"""API keys, per-key isolation and limits.

Keys come from K5_API_KEYS or K5_API_KEYS_FILE (a mounted Secret) and are kept only as SHA-256 digests. A key's
owner id (a prefix of its digest) tags every video it creates: other keys get 404 for it, never 403, so ids do
not leak. Without keys the gateway serves anonymously only when K5_ALLOW_ANONYMOUS=true.
"""

from __future__ import annotations

import hashlib
import logging
from typing import cast

import redis

from service.contract import ratelimit
from service.contract.problems import Throttled
from service.contract.ratelimit import Charge
from service.contract.schemas import Priority
from service.contract.settings import Settings

log = logging.getLogger(__name__)

ANONYMOUS = "anonymous"
# The lanes of schemas.Priority, highest first.
LANES = ("interactive", "batch")


class AuthError(Exception):
    pass


def owner_of(digest: str) -> str:
    return f"key_{digest[:16]}"


class KeyRing:
    """The configured keys as digest -> owner id, and each key's priority ceiling; the plain keys are not kept.

    An entry is the key, optionally followed by attributes: `sk-... priority=batch` caps that key at the batch
    lane (K5_PRIORITY_CEILING is the ceiling of every other key)."""

    def __init__(self, settings: Settings) -> None:
        entries = list(settings.api_keys)
        if settings.api_keys_file is not None:
            try:
                lines = settings.api_keys_file.read_text().splitlines()
            except OSError as e:
                raise SystemExit(f"K5_API_KEYS_FILE {settings.api_keys_file} cannot be read: {e}") from e
            entries += [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
        self.default_ceiling: Priority = settings.priority_ceiling
        self.owners: dict[str, str] = {}
        self.ceilings: dict[str, Priority] = {}
        for entry in entries:
            key, *attributes = entry.split()
            digest = hashlib.sha256(key.encode()).hexdigest()
            owner = self.owners[digest] = owner_of(digest)
            for attribute in attributes:
                name, _, value = attribute.partition("=")
                if name != "priority" or value not in LANES:
                    raise SystemExit(
                        f"API key entry: unknown attribute {attribute!r}; the one there is: priority={'|'.join(LANES)}"
                    )
                self.ceilings[owner] = cast(Priority, value)
        self.anonymous = not self.owners
        if self.anonymous and not settings.allow_anonymous:
            raise SystemExit(
                "No API keys configured (K5_API_KEYS or K5_API_KEYS_FILE). Set keys, or K5_ALLOW_ANONYMOUS=true "
                "to serve without authentication (local development only)."
            )
        if self.anonymous:
            log.warning("!!! NO API KEYS: the gateway serves ANYONE without authentication (K5_ALLOW_ANONYMOUS) !!!")
        else:
            log.info("API keys loaded", extra={"keys": len(self.owners)})

    def ceiling(self, owner: str) -> Priority:
        """The highest lane `owner`'s requests may ask for, and the lane of those that name none."""
        return self.ceilings.get(owner, self.default_ceiling)

    def authenticate(self, authorization: str | None) -> str:
        """The owner id of a request's bearer token; raises AuthError."""
        if self.anonymous:
            return ANONYMOUS
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise AuthError("Missing API key: send 'Authorization: Bearer <key>'.")
        owner = self.owners.get(hashlib.sha256(token.strip().encode()).hexdigest())
        if owner is None:
            raise AuthError("Invalid API key.")
        return owner


class Limits:
    """Per-key request rate (service/contract/ratelimit.py): each request's Charge in its key's window."""

    def __init__(self, r: redis.Redis, settings: Settings) -> None:
        self.per_min = settings.rate_limit_per_min
        self._count = ratelimit.register(r)

    def charge(self, owner: str) -> Charge:
        """The request's count, not taken yet: a route's script takes it, or Charge.now."""
        return Charge(owner, self.per_min, self._count)


def too_many(message: str, code: str, retry_after_s: float) -> Throttled:
    """A 429 with the Retry-After headers the openai SDK honours."""
    return Throttled(message, code=code, retry_after_s=retry_after_s)
