"""The retriever's bounded in-memory state: posted purchases and vector caches."""

from __future__ import annotations

import numpy as np

from retriever.cache import LRUCache
from retriever.purchases import SECONDS_PER_DAY, LivePurchases


def test_live_purchases_are_bounded_and_most_recent_first() -> None:
    purchases = LivePurchases(max_customers=2, max_items=3)
    purchases.add_now("a", ["1", "2"], at=0.0)
    purchases.add_now("a", ["3", "4"], at=SECONDS_PER_DAY)
    ids, ages = purchases.recent_now("a", now=2 * SECONDS_PER_DAY)
    assert ids == ["4", "3", "2"] and ages == [1.0, 1.0, 2.0]  # only the last 3 kept
    purchases.add_now("b", ["5"])
    purchases.add_now("a", ["6"])  # a becomes the most recently updated
    purchases.add_now("c", ["7"])  # evicts b, the least recently updated
    assert purchases.recent_now("b") == ([], []) and purchases.recent_now("a")[0][0] == "6" and len(purchases) == 2


def test_lru_cache_evicts_and_can_be_disabled() -> None:
    cache: LRUCache[np.ndarray] = LRUCache("test", capacity=2)
    cache.put("x", np.ones(2))
    cache.put("y", np.zeros(2))
    assert cache.get("x") is not None  # x is now the most recent
    cache.put("z", np.ones(2))
    assert cache.get("y") is None and cache.get("x") is not None and len(cache) == 2
    off: LRUCache[int] = LRUCache("off", capacity=0)
    off.put("x", 1)
    assert off.get("x") is None and len(off) == 0
