"""Rows scored exactly beside a version's FAISS index: the rows past it and its most popular rows.

A catalogue update appends its new articles after the parent's rows. Adding them to the FAISS index meant writing
the whole index again (434 MiB at 10M articles, ivf-pq-fastscan) and, for an index read into memory, a second copy
of it in the retriever while it swaps. Instead an addition links the parent's index and lists how many rows at the
end it lacks (`artifacts.Manifest.unindexed_rows`, while `fits` says so).

An IVF index ranks its lists by direction alone (export.catalogue_index trains them with a zero bias), so an
article whose popularity prior lifts it into a customer's top 10 is missed when its list is not among the probed
ones. Where best sellers sit in few lists, as a real catalogue's do, that was most of the top 10: 10M synthetic
articles laid out as H&M (ivf-pq-fastscan, 12,649 lists, nprobe 128, 100 real user vectors, prior weight 0.03),
recall@10 0.663, and every missed article among the 1% most popular. The POPULAR_ROWS most popular indexed rows
are therefore scored exactly too (with the lists ranked by their best prior as well, serving.ivf_lists):
0.937 (5,000 rows; 10,000: 0.941; 20,000: 0.950; the rows alone, lists by direction: 0.880).

Both are held here as the index would hold them ([vector, bias], float32) and each search's results are merged
with their best, by the same score. Exact, so these rows rank at least as well as the index would have ranked them.
Their costs add: up to 5,000 rows past the index and 5,000 popular ones, 10,000 rows scored per search (156 us at
10k rows below). The popular rows are an IVF index's with a prior only: flat is exact, HNSW not measured.
"""

from __future__ import annotations

import numpy as np

from twotower import popularity
from twotower.files import VectorRows

# How many rows may stay past the index: the addition that would pass it adds them all to the index, written anew.
# Each search scores them all: the merge took 38 / 88 / 156 us per query at 1k / 5k / 10k rows (k 12, one thread,
# numpy), and a search of 1M synthetic articles (ivf-pq-fastscan, k 12, p50 0.60-0.72 ms) 0.08 ms more with 1,000
# rows past its index and 0.33 ms more with 10,000 (paired medians, 300 user vectors x 3 rounds, 2026-12-01). The
# share keeps a small catalogue's tail small beside its index: H&M's 105k articles rewrite their 50 MiB index
# every ~1,000 added rows; 10M articles their 434 MiB one every 5,000.
MAX_ROWS = 5_000
MAX_SHARE = 0.01
# The most popular indexed rows an IVF index's searches score exactly (the module's docstring measures it): at
# most this many, and at most this share of the index's rows, so that a small catalogue, whose probed lists
# already hold a tenth of it (H&M: 128 of 1,299), does not score a large part of itself twice.
POPULAR_ROWS = 5_000
POPULAR_SHARE = 0.01


def fits(unindexed: int, indexed: int) -> bool:
    """Whether `unindexed` rows may stay past an index of `indexed` rows."""
    return unindexed <= min(MAX_ROWS, MAX_SHARE * indexed)


def popular_rows(bias: np.ndarray, indexed: int, excluded: np.ndarray | None = None) -> np.ndarray:
    """The rows (int64, ascending) of the most popular of the first `indexed` rows by their `bias`, at most
    POPULAR_ROWS and POPULAR_SHARE of them, and only rows with a prior (> 0: sold) that are not `excluded` (bool
    per row: removed); ties broken by row."""
    bias = np.asarray(bias[:indexed])
    if excluded is not None:
        bias = np.where(excluded[:indexed], 0, bias)
    count = min(POPULAR_ROWS, int(POPULAR_SHARE * indexed), int(np.count_nonzero(bias > 0)))
    if count <= 0:
        return np.zeros(0, np.int64)
    # The count-th highest bias, then the rows above it and as many of those equal to it as fit: an argpartition
    # alone would pick among equal priors (synthetic catalogues copy them) differently from run to run.
    threshold = np.partition(bias, indexed - count)[indexed - count]
    above = np.flatnonzero(bias > threshold)
    equal = np.flatnonzero(bias == threshold)[: count - len(above)]
    return np.sort(np.concatenate([above, equal])).astype(np.int64)


class ExactRows:
    """Catalogue rows (`ids`, ascending) scored exactly beside the FAISS index. Some of them may be in the index
    too (the popular ones): the index's results drop those, their exact score here stands for them."""

    def __init__(self, ids: np.ndarray, vectors: np.ndarray, bias: np.ndarray | None):
        self.ids = np.asarray(ids, dtype=np.int64)
        rows = np.ascontiguousarray(vectors, dtype=np.float32)
        self.rows = rows if bias is None else popularity.with_bias(rows, bias)

    @classmethod
    def beside(
        cls, vectors: VectorRows, bias: np.ndarray | None, indexed: int, excluded: np.ndarray, popular: bool
    ) -> "ExactRows | None":
        """The rows past the first `indexed` (a catalogue update's, shown or not: searches mask them) and, where
        `popular` (an IVF index with a prior), the most popular indexed rows not `excluded` (`popular_rows`); None
        when there are none."""
        head = popular_rows(bias, indexed, excluded) if popular and bias is not None else np.zeros(0, np.int64)
        ids = np.concatenate([head, np.arange(indexed, len(vectors), dtype=np.int64)])
        if not len(ids):
            return None
        return cls(ids, np.asarray(vectors[ids]), None if bias is None else np.asarray(bias)[ids])

    def __len__(self) -> int:
        return len(self.ids)

    def merged(
        self, found: tuple[np.ndarray, np.ndarray], queries: np.ndarray, k: int, allowed: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """The index's results (scores, rows [B, n]; rows -1 where none) for `queries` [B, >= columns] as the index
        takes them, merged with these rows' best by their exact score: [B, k], rows -1 past the last result. Ties go
        to the index's rows. `allowed`, bool [len(self)], limits which of these rows may be returned."""
        found_scores, found_rows = found
        found_rows = found_rows.astype(np.int64, copy=False)
        # The index's rows that are ours are scored here (exactly, and once); -1 marks no result
        place = np.searchsorted(self.ids, found_rows)
        place[place == len(self.ids)] = 0
        found_scores = np.where((self.ids[place] == found_rows) | (found_rows < 0), -np.inf, found_scores)
        scores = queries[:, : self.rows.shape[1]] @ self.rows.T
        if allowed is not None:
            scores[:, ~allowed] = -np.inf
        each = np.arange(len(scores))[:, None]  # fancy indexing by row: fewer numpy calls than take_along_axis
        if len(self) > k:  # their best k, unordered: a partition, not a sort of every row
            best = np.argpartition(-scores, k - 1, axis=1)[:, :k]
            scores, own_rows = scores[each, best], self.ids[best]
        else:
            own_rows = np.broadcast_to(self.ids, scores.shape)
        all_scores = np.concatenate([found_scores, scores], axis=1)
        all_rows = np.concatenate([found_rows, own_rows], axis=1)
        order = np.argsort(-all_scores, axis=1, kind="stable")[:, :k]
        top_scores = all_scores[each, order].astype(np.float32, copy=False)
        top_rows = all_rows[each, order]
        top_rows[~np.isfinite(top_scores)] = -1
        if top_rows.shape[1] < k:  # fewer candidates than k in all
            missing = k - top_rows.shape[1]
            top_scores = np.pad(top_scores, ((0, 0), (0, missing)), constant_values=-np.inf)
            top_rows = np.pad(top_rows, ((0, 0), (0, missing)), constant_values=-1)
        return top_scores, top_rows
