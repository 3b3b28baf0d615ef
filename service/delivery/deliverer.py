"""`k5serve webhooks`: the lightweight process that delivers webhooks, so no GPU worker ever waits on HTTP.

Only 2xx counts as delivered; 410 stops at once; anything else (other statuses, timeouts, refused connections,
redirects, which are never followed) is retried with exponential backoff and jitter until the retry window ends.

Attempts run concurrently, each within a total deadline (K5_WEBHOOK_TIMEOUT_S), and the loop never waits for
them: it claims only as many deliveries as it has free slots, and an endpoint already at its share of slots
(K5_WEBHOOK_ENDPOINT_CONCURRENCY) has its further deliveries put back for a moment, so a slow or hostile
receiver delays nobody else's events.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from urllib.parse import urlsplit

import redis

from service.contract import metrics
from service.contract.clock import redis_clock
from service.contract.settings import Settings
from service.contract.webhooks import DUE, Delivery, Signer, UnsafeURL, URLPolicy, backoff, delivery_key, now_s
from service.delivery import webhook_http

log = logging.getLogger(__name__)

# Claim due deliveries atomically by pushing their due time past the lease: another deliverer skips them, and
# if this one dies mid-attempt the lease runs out and the delivery is due again (same webhook-id: receivers
# deduplicate, as Standard Webhooks expects of at-least-once delivery).
_CLAIM = """
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))
for _, id in ipairs(ids) do redis.call('ZADD', KEYS[1], ARGV[2], id) end
return ids
"""
# Save an attempt's outcome only over the record it read, and schedule the next only then: a delivery deleted
# meanwhile (DELETE of its video) is neither written back nor attempted again.
_SAVE = """
if redis.call('SET', KEYS[1], ARGV[1], 'KEEPTTL', 'XX') and ARGV[2] ~= '' then
  redis.call('ZADD', KEYS[2], ARGV[2], ARGV[3])
else
  redis.call('ZREM', KEYS[2], ARGV[3])
end
"""
# How long a delivery whose endpoint is busy waits before it is looked at again.
_BUSY_WAIT_S = 0.5


def endpoint(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc.lower()}"


class Deliverer:
    def __init__(self, settings: Settings, r: redis.Redis) -> None:
        if not settings.webhook_secret:
            raise SystemExit("K5_WEBHOOK_SECRET is not set: webhooks are signed, so a secret is required")
        self.settings = settings
        self.r = r
        self.signer = Signer(settings.webhook_secret)
        self.policy = URLPolicy(settings.webhook_allowed_hosts)
        self.claim = r.register_script(_CLAIM)
        self.save = r.register_script(_SAVE)
        self.pool = ThreadPoolExecutor(max_workers=settings.webhook_concurrency, thread_name_prefix="k5-webhook")
        self.lock = threading.Lock()
        self.running: Counter[str] = Counter()  # attempts in flight per endpoint
        self.stopped = threading.Event()

    def run(self) -> None:
        log.info("webhook delivery started")
        while not self.stopped.is_set():
            try:
                done = self.tick()
                metrics.WEBHOOK_PENDING.set(self.r.zcard(DUE))
            except redis.RedisError:
                log.warning("redis unavailable; retrying", exc_info=True)
                done = 0
            if not done:
                self.stopped.wait(0.25)
        self.pool.shutdown(wait=True)
        log.info("webhook delivery stopped")

    def tick(self) -> int:
        """Starts attempts for due deliveries, as many as there are free slots; returns how many it started."""
        with self.lock:
            free = self.settings.webhook_concurrency - sum(self.running.values())
        if free <= 0:
            return 0
        # Due times and claim leases are on Redis's clock, which every deliverer shares: one whose own clock is
        # behind would otherwise see another's lease as lapsed and send the same delivery twice at once.
        now = redis_clock(self.r)
        # The deadline bounds an attempt, so the lease only needs a margin for reading and saving the record.
        lease = now + self.settings.webhook_timeout_s + 5
        ids = [i.decode() for i in self.claim(keys=[DUE], args=[now, lease, free])]
        raws = self.r.mget([delivery_key(i) for i in ids]) if ids else []
        started = 0
        for delivery_id, raw in zip(ids, raws, strict=True):
            d = Delivery.model_validate_json(raw) if raw else None
            if d is None or d.state != "pending":
                self.r.zrem(DUE, delivery_id)
                continue
            where = endpoint(d.url)
            with self.lock:
                busy = self.running[where] >= self.settings.webhook_endpoint_concurrency
                if not busy:
                    self.running[where] += 1
            if busy:
                self.r.zadd(DUE, {delivery_id: now + _BUSY_WAIT_S})
                continue
            self.pool.submit(self.attempt, d).add_done_callback(functools.partial(self._done, where=where))
            started += 1
        return started

    def _done(self, future: Future, where: str) -> None:
        with self.lock:
            self.running[where] -= 1
            if self.running[where] <= 0:
                del self.running[where]
        if (e := future.exception()) is not None:
            log.error("webhook attempt crashed", exc_info=e)

    def attempt(self, d: Delivery) -> None:
        logx = logging.LoggerAdapter(log, {"video_id": d.video_id, "delivery_id": d.id})
        try:
            # Checked again at send time, and the send connects to exactly the addresses checked here.
            addresses = self.policy.check(d.url)
        except UnsafeURL as e:
            self._finish(d, "refused", error=str(e))
            logx.warning("webhook refused: %s", e)
            return
        now = int(now_s())
        headers = {**self.signer.headers(d.event_id, now, d.body), "Content-Type": "application/json"}
        d.attempts += 1
        try:
            status = webhook_http.post(d.url, d.body, headers, addresses, self.settings.webhook_timeout_s)
            d.last_status, d.last_error = status, None
        except webhook_http.ERRORS as e:
            d.last_status, d.last_error = None, f"{type(e).__name__}: {e}"
        if d.last_status is not None and 200 <= d.last_status < 300:
            self._finish(d, "delivered")
            logx.info("webhook delivered", extra={"attempts": d.attempts, "status": d.last_status})
        elif d.last_status == 410:
            self._finish(d, "gone")
            logx.info("webhook endpoint gone (410); no more attempts")
        else:
            self._retry_or_give_up(d, logx)

    def _retry_or_give_up(self, d: Delivery, logx: logging.LoggerAdapter) -> None:
        delay = backoff(d.attempts, self.settings.webhook_retry_base_s, self.settings.webhook_retry_max_s)
        now = redis_clock(self.r)
        if now + delay - d.created_at > self.settings.webhook_retry_window_s:
            self._finish(d, "failed")
            logx.warning("webhook failed for good", extra={"attempts": d.attempts, "status": d.last_status})
            return
        d.next_at = now + delay
        self._save(d, schedule=True)
        metrics.WEBHOOK_DELIVERIES.labels(outcome="retry").inc()
        logx.info(
            "webhook attempt failed; will retry in %.1fs",
            delay,
            extra={"attempts": d.attempts, "status": d.last_status, "error": d.last_error},
        )

    def _finish(self, d: Delivery, state: str, error: str | None = None) -> None:
        d.state, d.finished_at, d.next_at = state, now_s(), None  # type: ignore[assignment]
        if error:
            d.last_error = error
        self._save(d, schedule=False)
        metrics.WEBHOOK_DELIVERIES.labels(outcome=state).inc()

    def _save(self, d: Delivery, schedule: bool) -> None:
        due = repr(d.next_at or 0.0) if schedule else ""
        self.save(keys=[delivery_key(d.id), DUE], args=[d.model_dump_json(), due, d.id])
