"""Idempotency-Key: the same request under the same key makes one video, however often and however concurrently
it is sent.

A key is bound to its video in the same transaction that creates the video's record (Lifecycle.create), so there
is no moment when a key names a video that does not exist yet: nothing to wait for, and no key left behind by a
gateway killed halfway. A key that names a video that no longer exists (deleted, expired; or a key the previous
release claimed before a gateway died) is taken over by the next request, which makes the video anew. A replay is
answered before any limit is checked: it makes no new job.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from service.contract import keys
from service.contract.problems import Conflict
from service.contract.record import JobRecord

# How long a key stays bound to its video.
IDEMPOTENCY_TTL_S = 24 * 3600


@dataclass(frozen=True)
class IdempotencyKey:
    owner: str
    key: str
    fingerprint: str  # what makes two requests the same (videos.fingerprint)

    @property
    def redis_key(self) -> str:
        return keys.idempotency(self.owner, self.key)

    def binding(self, video_id: str) -> str:
        return json.dumps({"fingerprint": self.fingerprint, "video_id": video_id})

    def bound_video(self, conn: Any) -> str | None:
        """The video this key names, if any and if it still exists; raises Conflict when the key was used with
        another request. `conn`: the connection, or a pipeline watching the key."""
        raw = conn.get(self.redis_key)
        if raw is None:
            return None
        video_id = self.held_video(raw)
        return video_id if conn.exists(keys.video(video_id)) else None

    def held_video(self, binding: str | bytes) -> str:
        """The video a binding of this key names; raises Conflict when it was made for another request."""
        held = json.loads(binding)
        if held["fingerprint"] != self.fingerprint:
            raise Conflict(
                "This Idempotency-Key was already used with a different request.",
                param="Idempotency-Key",
                code="idempotency_key_reused",
            )
        return held["video_id"]


def bound_video_id(raw: bytes | str | None) -> str | None:
    """The video a stored binding names (None for none)."""
    return json.loads(raw)["video_id"] if raw else None


def replay(conn: Any, idem: IdempotencyKey) -> JobRecord | None:
    """The video an earlier identical request made under the key, if it exists."""
    video_id = idem.bound_video(conn)
    raw = conn.get(keys.video(video_id)) if video_id else None
    return JobRecord.model_validate_json(raw) if raw else None
