"""Small bounded LRU caches with hit/miss counters (customer vectors by history, popular text queries)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from typing import Generic, TypeVar

from retriever import metrics

V = TypeVar("V")


class LRUCache(Generic[V]):
    """Size-bounded; `capacity` 0 disables it. Single event loop: no locking needed."""

    def __init__(self, name: str, capacity: int):
        self.name = name
        self.capacity = capacity
        self._entries: OrderedDict[Hashable, V] = OrderedDict()

    def get(self, key: Hashable) -> V | None:
        if self.capacity <= 0:
            return None
        value = self._entries.get(key)
        # Counters looked up per use, not held: the cache must pickle (KServe --workers N).
        if value is None:
            metrics.CACHE_LOOKUPS.labels(self.name, "miss").inc()
            return None
        self._entries.move_to_end(key)
        metrics.CACHE_LOOKUPS.labels(self.name, "hit").inc()
        return value

    def put(self, key: Hashable, value: V) -> None:
        if self.capacity <= 0:
            return
        self._entries[key] = value
        self._entries.move_to_end(key)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)
