"""The rows past a version's FAISS index, scored exactly beside it.

A catalogue update appends its new articles after the parent's rows. Adding them to the FAISS index meant writing
the whole index again (434 MiB at 10M articles, ivf-pq-fastscan) and, for an index read into memory, a second copy
of it in the retriever while it swaps. Instead an addition links the parent's index and lists how many rows at the
end it lacks (`artifacts.Manifest.unindexed_rows`, while `fits` says so); they are held here as the index would hold
them ([vector, bias], float32) and each search's results are merged with their best, by the same score. Exact, so an
added article ranks at least as well as the index would have ranked it.
"""

from __future__ import annotations

import numpy as np

from twotower import popularity

# How many rows may stay past the index: the addition that would pass it adds them all to the index, written anew.
# Each search scores them all: the merge took 38 / 88 / 156 us per query at 1k / 5k / 10k rows (k 12, one thread,
# numpy), and a search of 1M synthetic articles (ivf-pq-fastscan, k 12, p50 0.60-0.72 ms) 0.08 ms more with 1,000
# rows past its index and 0.33 ms more with 10,000 (paired medians, 300 user vectors x 3 rounds, 2026-12-01). The
# share keeps a small catalogue's tail small beside its index: H&M's 105k articles rewrite their 50 MiB index
# every ~1,000 added rows; 10M articles their 434 MiB one every 5,000.
MAX_ROWS = 5_000
MAX_SHARE = 0.01


def fits(unindexed: int, indexed: int) -> bool:
    """Whether `unindexed` rows may stay past an index of `indexed` rows."""
    return unindexed <= min(MAX_ROWS, MAX_SHARE * indexed)


class UnindexedRows:
    """Rows `first`.. of a catalogue that its FAISS index does not hold, searched exactly."""

    def __init__(self, first: int, vectors: np.ndarray, bias: np.ndarray | None):
        self.first = first
        rows = np.ascontiguousarray(vectors, dtype=np.float32)
        self.rows = rows if bias is None else popularity.with_bias(rows, bias)

    def __len__(self) -> int:
        return len(self.rows)

    def merged(
        self, found: tuple[np.ndarray, np.ndarray], queries: np.ndarray, k: int, allowed: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """The index's results (scores, rows [B, n]; rows -1 where none) for `queries` [B, >= columns] as the index
        takes them, merged with these rows' best by their exact score: [B, k], rows -1 past the last result. Ties go
        to the index's rows. `allowed`, bool [len(self)], limits which of these rows may be returned."""
        found_scores, found_rows = found
        scores = queries[:, : self.rows.shape[1]] @ self.rows.T
        if allowed is not None:
            scores[:, ~allowed] = -np.inf
        own = np.arange(self.first, self.first + len(self), dtype=np.int64)
        if len(self) > k:  # their best k, unordered: a partition, not a sort of every row
            best = np.argpartition(-scores, k - 1, axis=1)[:, :k]
            scores, own_rows = np.take_along_axis(scores, best, 1), own[best]
        else:
            own_rows = np.broadcast_to(own, scores.shape)
        all_scores = np.concatenate([np.where(found_rows >= 0, found_scores, -np.inf), scores], axis=1)
        all_rows = np.concatenate([found_rows.astype(np.int64, copy=False), own_rows], axis=1)
        order = np.argsort(-all_scores, axis=1, kind="stable")[:, :k]
        top_scores = np.take_along_axis(all_scores, order, 1).astype(np.float32, copy=False)
        top_rows = np.where(np.isfinite(top_scores), np.take_along_axis(all_rows, order, 1), -1)
        if top_rows.shape[1] < k:  # fewer candidates than k in all
            missing = k - top_rows.shape[1]
            top_scores = np.pad(top_scores, ((0, 0), (0, missing)), constant_values=-np.inf)
            top_rows = np.pad(top_rows, ((0, 0), (0, missing)), constant_values=-1)
        return top_scores, top_rows
