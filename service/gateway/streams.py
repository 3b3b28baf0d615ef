"""Server-sent events of one video: pushed by the change feed, resumable by Last-Event-ID, a bounded number per
key and a bounded lifetime each."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterator

from starlette.concurrency import run_in_threadpool

from service.contract.jobs import JobStore
from service.contract.schemas import TERMINAL
from service.contract.settings import Settings
from service.gateway.auth import too_many
from service.gateway.feed import FALLBACK_S, ChangeFeed, feed_for


def event_id(view) -> str:
    """The id of a state: a stream resumed with Last-Event-ID skips a state the client already has."""
    return f"{view.status}.{view.progress}.{view.queue_position}"


async def events(
    store: JobStore,
    feed: ChangeFeed,
    video_id: str,
    *,
    last_event_id: str | None = None,
    lifetime_s: float = 600.0,
    ping_s: float = 15.0,
) -> AsyncIterator[str]:
    """SSE frames for one video until it is terminal, deleted, or the stream's lifetime ends (then the client
    reconnects, sending Last-Event-ID). Woken by the change feed, not by polling: an idle stream costs Redis
    nothing but a re-read every few seconds (FALLBACK_S), in case a message was missed."""
    rec = await run_in_threadpool(store.get, video_id)
    if rec is None:
        return
    deadline = time.monotonic() + lifetime_s
    last_sent = time.monotonic()
    with feed.watch(video_id, rec.model) as changed:
        while True:
            changed.clear()
            rec = await run_in_threadpool(store.get, video_id)
            if rec is None:
                return
            view = await run_in_threadpool(store.view, rec)
            eid = event_id(view)
            if eid != last_event_id:
                yield f"id: {eid}\nevent: video\ndata: {view.model_dump_json()}\n\n"
                last_event_id, last_sent = eid, time.monotonic()
            if view.status in TERMINAL:
                return
            # Until a change, the slow re-read, or the end of the lifetime; pings meanwhile.
            reread_at = time.monotonic() + FALLBACK_S
            while True:
                now = time.monotonic()
                if now >= deadline:
                    yield "retry: 1000\n\n"  # lifetime over: reconnect in a second, resuming from the id above
                    return
                try:
                    await asyncio.wait_for(changed.wait(), max(0.0, min(deadline, last_sent + ping_s, reread_at) - now))
                    break
                except TimeoutError:
                    pass
                if time.monotonic() - last_sent >= ping_s:
                    yield ": ping\n\n"  # keeps proxies from closing an idle stream
                    last_sent = time.monotonic()
                if time.monotonic() >= reread_at:
                    break
            await asyncio.sleep(0.05)  # coalesce a burst of step updates into one read


class StreamLimit:
    """Event streams open per API key in this process: a cap, so one key cannot hold the gateway's streams."""

    def __init__(self) -> None:
        self.open: dict[str, int] = {}

    @contextlib.contextmanager
    def hold(self, owner: str, cap: int) -> Iterator[None]:
        if self.open.get(owner, 0) >= cap:
            raise too_many(f"You have {cap} event streams open; close one first.", "too_many_streams", 5)
        self.open[owner] = self.open.get(owner, 0) + 1
        try:
            yield
        finally:
            self.open[owner] -= 1
            if not self.open[owner]:
                del self.open[owner]


STREAMS = StreamLimit()


def open_stream(
    store: JobStore, settings: Settings, video_id: str, owner: str, last_event_id: str | None
) -> AsyncIterator[str]:
    """GET /v1/videos/{id}/events: refuses (429) a key at its cap of open streams before the stream starts."""
    cap = settings.sse_max_streams_per_key
    with STREAMS.hold(owner, cap):
        pass  # the check only; the stream holds its slot while it runs

    async def frames() -> AsyncIterator[str]:
        with STREAMS.hold(owner, cap):
            feed = feed_for(settings.redis_url)
            async for frame in events(
                store,
                feed,
                video_id,
                last_event_id=last_event_id,
                lifetime_s=settings.sse_max_lifetime_s,
                ping_s=settings.sse_ping_s,
            ):
                yield frame

    return frames()
