"""`k5serve webhooks`: the lightweight process that delivers webhooks, so no GPU worker ever waits on HTTP.

Only 2xx counts as delivered; 410 stops at once; anything else (other statuses, timeouts, refused connections,
redirects, which are never followed) is retried with exponential backoff and jitter until the retry window ends.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import redis

from service import metrics
from service.settings import Settings
from service.webhooks import DUE, Delivery, Signer, UnsafeURL, URLPolicy, backoff, delivery_key, now_s

log = logging.getLogger(__name__)

# Claim due deliveries atomically by pushing their due time past the lease: another deliverer skips them, and
# if this one dies mid-attempt the lease runs out and the delivery is due again.
_CLAIM = """
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))
for _, id in ipairs(ids) do redis.call('ZADD', KEYS[1], ARGV[2], id) end
return ids
"""


class Deliverer:
    def __init__(self, settings: Settings, r: redis.Redis, batch: int = 16) -> None:
        if not settings.webhook_secret:
            raise SystemExit("K5_WEBHOOK_SECRET is not set: webhooks are signed, so a secret is required")
        self.settings = settings
        self.r = r
        self.batch = batch
        self.signer = Signer(settings.webhook_secret)
        self.policy = URLPolicy(settings.webhook_allowed_hosts)
        self.claim = r.register_script(_CLAIM)
        self.http = httpx.Client(follow_redirects=False, headers={"User-Agent": "k5serve-webhooks/0.1"})
        self.pool = ThreadPoolExecutor(max_workers=batch, thread_name_prefix="k5-webhook")
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
        now = now_s()
        lease = now + self.settings.webhook_timeout_s + 30
        ids = [i.decode() for i in self.claim(keys=[DUE], args=[now, lease, self.batch])]
        list(self.pool.map(self.attempt, ids))
        return len(ids)

    def attempt(self, delivery_id: str) -> None:
        raw = self.r.get(delivery_key(delivery_id))
        if raw is None:
            self.r.zrem(DUE, delivery_id)
            return
        d = Delivery.model_validate_json(raw)
        if d.state != "pending":
            self.r.zrem(DUE, delivery_id)
            return
        logx = logging.LoggerAdapter(log, {"video_id": d.video_id, "delivery_id": d.id})
        try:
            # Checked again at send time: the name may resolve elsewhere now than when the job was created.
            self.policy.check(d.url)
        except UnsafeURL as e:
            self._finish(d, "refused", error=str(e))
            logx.warning("webhook refused: %s", e)
            return
        now = int(now_s())
        headers = {**self.signer.headers(d.event_id, now, d.body), "Content-Type": "application/json"}
        d.attempts += 1
        try:
            resp = self.http.post(d.url, content=d.body, headers=headers, timeout=self.settings.webhook_timeout_s)
            d.last_status, d.last_error = resp.status_code, None
        except httpx.HTTPError as e:
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
        if now_s() + delay - d.created_at > self.settings.webhook_retry_window_s:
            self._finish(d, "failed")
            logx.warning("webhook failed for good", extra={"attempts": d.attempts, "status": d.last_status})
            return
        d.next_at = now_s() + delay
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
        with self.r.pipeline() as pipe:
            pipe.set(delivery_key(d.id), d.model_dump_json(), keepttl=True)
            if schedule:
                pipe.zadd(DUE, {d.id: d.next_at or 0.0})
            else:
                pipe.zrem(DUE, d.id)
            pipe.execute()
