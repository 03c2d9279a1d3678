"""Ranking metrics over per-customer ranked lists of catalogue rows.

All functions take `ranked` (list of int arrays, best first) and `targets` (list of sets) aligned
by customer, and return the mean over customers; the `*_per_case` ones return each customer's value
(for paired intervals, evaluation/intervals.py).
"""

from __future__ import annotations

import numpy as np


def recall_per_case(ranked: list[np.ndarray], targets: list[set[int]], k: int) -> np.ndarray:
    """|top-k ∩ targets| / |targets| of each customer."""
    return np.asarray([len(set(r[:k].tolist()) & t) / len(t) for r, t in zip(ranked, targets)], dtype=np.float64)


def precision_per_case(ranked: list[np.ndarray], targets: list[set[int]], k: int) -> np.ndarray:
    """|top-k ∩ targets| / k of each query (a list shorter than k counts its missing places as misses)."""
    return np.asarray([len(set(r[:k].tolist()) & t) / k for r, t in zip(ranked, targets)], dtype=np.float64)


def recall_at_k(ranked: list[np.ndarray], targets: list[set[int]], k: int) -> float:
    """|top-k ∩ targets| / |targets|, averaged over customers."""
    return float(np.mean(recall_per_case(ranked, targets, k)))


def average_precision_at_k(ranked: np.ndarray, target: set[int], k: int) -> float:
    """The Kaggle H&M competition's AP@k: sum of precision at each hit, over min(|targets|, k)."""
    hits, total, seen = 0, 0.0, set()
    for position, row in enumerate(ranked[:k].tolist(), start=1):
        if row in target and row not in seen:
            hits += 1
            total += hits / position
        seen.add(row)
    return total / min(len(target), k)


def average_precision_per_case(ranked: list[np.ndarray], targets: list[set[int]], k: int) -> np.ndarray:
    return np.asarray([average_precision_at_k(r, t, k) for r, t in zip(ranked, targets)], dtype=np.float64)


def map_at_k(ranked: list[np.ndarray], targets: list[set[int]], k: int) -> float:
    return float(np.mean(average_precision_per_case(ranked, targets, k)))


def ndcg_at_k(ranked: list[np.ndarray], targets: list[set[int]], k: int) -> float:
    discounts = 1.0 / np.log2(np.arange(2, k + 2))
    scores = []
    for r, t in zip(ranked, targets):
        gains = np.array([row in t for row in r[:k].tolist()], dtype=float)
        ideal = discounts[: min(len(t), k)].sum()
        scores.append(float((gains * discounts[: len(gains)]).sum() / ideal))
    return float(np.mean(scores))


def coverage_at_k(ranked: list[np.ndarray], k: int, catalogue_size: int) -> float:
    """Share of the catalogue that appears in at least one customer's top-k."""
    shown = set()
    for r in ranked:
        shown.update(r[:k].tolist())
    return len(shown) / catalogue_size


def hit_rate_sampled(target_scores: np.ndarray, negative_scores: np.ndarray, k: int) -> float:
    """Leave-one-out HR@k against sampled negatives: the target ranks in the top k of (1 + n) items.

    Ties count against the target, so a model that scores everything equally gets no credit.
    """
    better = (negative_scores >= target_scores[:, None]).sum(axis=1)
    return float(np.mean(better < k))
