"""Purchases posted to the service, kept in memory so a customer's next request reflects them.

Bounded: at most `max_customers` customers (least recently updated dropped first) and the last
`max_items` purchases each. Not persisted: after a restart customers are served from the index's
histories again, until the shop's transaction log is exported into the next index version.
Article ids are stored (not index rows), so the purchases survive an index swap.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque

SECONDS_PER_DAY = 86_400.0


class LivePurchases:
    def __init__(self, max_customers: int, max_items: int):
        self.max_customers = max_customers
        self.max_items = max_items
        self._by_customer: OrderedDict[str, deque[tuple[str, float]]] = OrderedDict()
        self._lock = threading.Lock()  # posted from the event loop, read from search threads

    def add(self, customer_id: str, article_ids: list[str], at: float | None = None) -> int:
        """Record purchases (oldest first); returns how many this customer now has in memory."""
        at = time.time() if at is None else at
        with self._lock:
            items = self._by_customer.pop(customer_id, None) or deque(maxlen=self.max_items)
            items.extend((article_id, at) for article_id in article_ids)
            self._by_customer[customer_id] = items
            while len(self._by_customer) > self.max_customers:
                self._by_customer.popitem(last=False)
            return len(items)

    def recent(self, customer_id: str, now: float | None = None) -> tuple[list[str], list[float]]:
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
