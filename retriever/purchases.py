"""Purchases posted to the service, so a customer's next request reflects them.

Two stores behind one interface (PurchaseStore):
- LivePurchases: this process's memory (the default, `make demo`). Bounded: at most `max_customers`
  customers (least recently updated dropped first) and the last `max_items` purchases each. Every
  retriever replica (and KServe worker) has its own: a purchase counts only where it was posted.
- RedisPurchases (`--purchases-redis-url`): one Redis list per customer, shared by every replica and
  worker, the last `max_items` kept, expiring `ttl_days` after the customer's last purchase.
  Redis down or slow (every call has `timeout_s`): reads answer "nothing posted" (the index's history
  serves, counted in retriever_purchase_store_errors_total) and Redis is not asked again for
  `retry_after_s`, so requests keep their latency; a posted purchase is refused with 503 + Retry-After.

Not a transaction log: after a restart (or a Redis flush) customers are served from the index's
histories, until the shop's transactions are exported into the next index version. Article ids are
stored (not index rows), so the purchases survive an index swap.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict, deque
from typing import Any, Protocol

from retriever import metrics

log = logging.getLogger("retriever.purchases")
SECONDS_PER_DAY = 86_400.0
Posted = tuple[list[str], list[float]]  # article_ids most recent first, ages in days
NOTHING_POSTED: Posted = ([], [])


class PurchaseStoreUnavailable(RuntimeError):
    """The shared purchase store cannot record a purchase now (the client may retry later)."""


class PurchaseStore(Protocol):
    async def add(self, customer_id: str, article_ids: list[str]) -> int:
        """Record purchases (oldest first); returns how many this customer now has stored."""
        ...

    async def recent(self, customer_ids: list[str]) -> dict[str, Posted]:
        """Each customer's posted purchases (customers without any may be left out)."""
        ...

    async def close(self) -> None: ...


class LivePurchases:
    def __init__(self, max_customers: int, max_items: int):
        self.max_customers = max_customers
        self.max_items = max_items
        self._by_customer: OrderedDict[str, deque[tuple[str, float]]] = OrderedDict()
        self._lock = threading.Lock()  # posted from the event loop, read from search threads

    async def add(self, customer_id: str, article_ids: list[str]) -> int:
        count = self.add_now(customer_id, article_ids)
        metrics.LIVE_CUSTOMERS.set(len(self))
        return count

    async def recent(self, customer_ids: list[str]) -> dict[str, Posted]:
        return {customer_id: self.recent_now(customer_id) for customer_id in customer_ids}

    async def close(self) -> None:
        return None

    def add_now(self, customer_id: str, article_ids: list[str], at: float | None = None) -> int:
        at = time.time() if at is None else at
        with self._lock:
            items = self._by_customer.pop(customer_id, None) or deque(maxlen=self.max_items)
            items.extend((article_id, at) for article_id in article_ids)
            self._by_customer[customer_id] = items
            while len(self._by_customer) > self.max_customers:
                self._by_customer.popitem(last=False)
            return len(items)

    def recent_now(self, customer_id: str, now: float | None = None) -> Posted:
        """(article_ids, ages in days), most recent first; empty for a customer with none."""
        now = time.time() if now is None else now
        with self._lock:
            items = list(self._by_customer.get(customer_id, ()))
        items.reverse()
        return [a for a, _ in items], [max(0.0, (now - at) / SECONDS_PER_DAY) for _, at in items]

    def __len__(self) -> int:
        return len(self._by_customer)

    def __getstate__(self) -> dict:  # each KServe worker process gets its own copy and lock
        state = self.__dict__.copy()
        del state["_lock"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()


class RedisPurchases:
    KEY_PREFIX = "hm:purchases:"

    def __init__(self, url: str, max_items: int, ttl_days: float, timeout_s: float, retry_after_s: float = 1.0):
        self.url = url
        self.max_items = max_items
        self.ttl_s = max(1, int(ttl_days * SECONDS_PER_DAY))
        self.timeout_s = timeout_s
        self.retry_after_s = retry_after_s
        self._client: Any = None
        self._skip_until = 0.0  # after a failure, Redis is not asked again before this (time.monotonic)

    @property
    def client(self) -> Any:
        # Its connections belong to the event loop that opens them: create on first use, in each worker.
        if self._client is None:
            import redis.asyncio

            self._client = redis.asyncio.Redis.from_url(
                self.url, socket_timeout=self.timeout_s, socket_connect_timeout=self.timeout_s
            )
        return self._client

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_client": None}

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    def _failed(self, operation: str, err: BaseException) -> None:
        metrics.PURCHASE_STORE_ERRORS.labels(operation).inc()
        if time.monotonic() >= self._skip_until:  # one log line per outage window, not one per request
            log.warning(
                "Redis at %s failed on %s (%s: %s): serving the index's histories for %.0f s",
                self.url,
                operation,
                type(err).__name__,
                err,
                self.retry_after_s,
            )
        self._skip_until = time.monotonic() + self.retry_after_s

    async def add(self, customer_id: str, article_ids: list[str]) -> int:
        import redis

        now = time.time()
        key = self.KEY_PREFIX + customer_id
        try:
            async with self.client.pipeline(transaction=True) as pipe:
                pipe.rpush(key, *(f"{article_id}|{now:.3f}" for article_id in article_ids))
                pipe.ltrim(key, -self.max_items, -1)
                pipe.expire(key, self.ttl_s)
                pipe.llen(key)
                *_, count = await pipe.execute()
        except (redis.RedisError, OSError, TimeoutError) as err:
            self._failed("add", err)
            raise PurchaseStoreUnavailable(f"the purchase store is unavailable ({type(err).__name__})") from err
        self._skip_until = 0.0
        return int(count)

    async def recent(self, customer_ids: list[str]) -> dict[str, Posted]:
        import redis

        if not customer_ids or time.monotonic() < self._skip_until:
            return {}
        try:
            async with self.client.pipeline(transaction=False) as pipe:
                for customer_id in customer_ids:
                    pipe.lrange(self.KEY_PREFIX + customer_id, 0, -1)
                lists = await pipe.execute()
        except (redis.RedisError, OSError, TimeoutError) as err:
            self._failed("read", err)
            return {}
        now = time.time()
        posted = {}
        for customer_id, entries in zip(customer_ids, lists):
            if not entries:
                continue
            ids, ages = [], []
            for entry in reversed(entries):  # most recent first
                article_id, _, at = entry.decode().rpartition("|")
                ids.append(article_id)
                ages.append(max(0.0, (now - float(at)) / SECONDS_PER_DAY))
            posted[customer_id] = (ids, ages)
        return posted


def purchase_store(
    redis_url: str, max_customers: int, max_items: int, ttl_days: float, timeout_s: float, retry_after_s: float
) -> LivePurchases | RedisPurchases:
    if redis_url:
        return RedisPurchases(redis_url, max_items, ttl_days, timeout_s, retry_after_s)
    return LivePurchases(max_customers, max_items)
