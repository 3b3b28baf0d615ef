"""Record changes pushed to the gateway's event streams: one Redis pub/sub connection per gateway process.

Every write of a job record publishes its id on k5:changes (service/contract/jobs.py, in the same MULTI), with its
model when its status changed. A stream waits on its video's changes instead of polling Redis; a queued video
also wakes on its model's status changes, since its queue position moves when a job ahead of it starts.
A message lost while the subscription reconnects is covered by each stream's slow re-read (FALLBACK_S).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import defaultdict
from collections.abc import Iterator

import redis.asyncio as aioredis

from service.contract.keys import CHANGES

log = logging.getLogger(__name__)

FALLBACK_S = 15.0  # a stream re-reads its record at least this often, messages or not


class ChangeFeed:
    def __init__(self, redis_url: str) -> None:
        self.redis_url = redis_url
        self.by_video: dict[str, set[asyncio.Event]] = defaultdict(set)
        self.by_model: dict[str, set[asyncio.Event]] = defaultdict(set)
        self.task: asyncio.Task | None = None

    @contextlib.contextmanager
    def watch(self, video_id: str, model: str | None = None) -> Iterator[asyncio.Event]:
        """An event set on every change of the video (and of its model's jobs, when model is given)."""
        if self.task is None or self.task.done():
            self.task = asyncio.get_running_loop().create_task(self._listen())
        event = asyncio.Event()
        self.by_video[video_id].add(event)
        if model:
            self.by_model[model].add(event)
        try:
            yield event
        finally:
            _discard(self.by_video, video_id, event)
            if model:
                _discard(self.by_model, model, event)

    async def _listen(self) -> None:
        while self.by_video:
            try:
                conn = aioredis.Redis.from_url(self.redis_url)
                async with conn.pubsub() as pubsub:
                    await pubsub.subscribe(CHANGES)
                    while self.by_video:
                        msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=FALLBACK_S)
                        if msg is not None:
                            self._dispatch(msg["data"].decode())
                await conn.aclose()
            except (aioredis.RedisError, OSError):
                log.warning("change feed: redis unavailable; streams fall back to slow re-reads", exc_info=True)
                await asyncio.sleep(1)

    def _dispatch(self, message: str) -> None:
        video_id, _, model = message.partition(" ")
        for event in self.by_video.get(video_id, ()):
            event.set()
        if model:
            for event in self.by_model.get(model, ()):
                event.set()


def _discard(index: dict[str, set[asyncio.Event]], key: str, event: asyncio.Event) -> None:
    events = index.get(key)
    if events is not None:
        events.discard(event)
        if not events:
            del index[key]


_feeds: dict[tuple[str, int], ChangeFeed] = {}


def feed_for(redis_url: str) -> ChangeFeed:
    """This event loop's feed (a gateway has one loop; each test client has its own)."""
    key = (redis_url, id(asyncio.get_running_loop()))
    if key not in _feeds:
        _feeds[key] = ChangeFeed(redis_url)
    return _feeds[key]
