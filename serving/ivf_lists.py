"""The IVF lists a search probes: a filtered search the nearest ones that hold rows it may return, an unfiltered
one the best by direction and popularity prior.

faiss' IVF search with an id selector probes the nprobe lists nearest the query, whatever they hold, and skips the
rows the selector refuses; `Catalog` widened nprobe by 1/selectivity (at most MAX_FILTERED_PROBE_FACTOR) so that
about as many allowed rows are scanned as an unfiltered search scans. On real data a category sits in few lists (H&M,
1,299 lists: 90% of a 2-5% product group in 1.4-3.6% of them, 90-97% of the lists without one of its articles), so
the widened lists were mostly other categories' articles, scanned and refused, while the category's own lists could
lie past the widened nprobe. Here the lists holding none of the allowed rows are left out, and the nearest of the
others are probed until they hold that many allowed rows (or the same most lists as before), with faiss'
`search_preassigned`.

Where the index carries the popularity prior ([vector, bias] rows, twotower.popularity), its lists were trained on
direction alone (export.catalogue_index), so faiss ranks them by the query's cosine with their centroid whatever
prior their articles have. For an unfiltered search a list ranks here by that cosine + the query's prior weight x the
highest prior among its rows: 10M synthetic articles laid out as H&M (ivf-pq-fastscan, 12,649 lists, nprobe
128, 100 real user vectors, prior weight 0.03), recall@10 0.663 -> 0.745 alone, 0.880 -> 0.937 with the most
popular rows scored exactly (serving.exact_rows). Numpy and faiss only.
"""

from __future__ import annotations

import dataclasses
import threading
import weakref
from collections import OrderedDict
from typing import Any

import faiss
import numpy as np

from serving.filters import MaskSummary

# Metadata columns' tables kept per index (a version filters by ~6 columns; a swap brings new ones): at 10M rows and
# 12,649 lists 2.4 MiB for 50 colours, 6.3 MiB for 130 product types
TABLES_KEPT = 16


@dataclasses.dataclass(frozen=True)
class ProbeSetting:
    """The nprobe of the lists searched at one prior weight, and the recall@10 it measured."""

    weight: float
    nprobe: int
    recall: float

    def to_json(self) -> dict[str, float]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, raw: dict[str, float]) -> "ProbeSetting":
        return cls(float(raw["weight"]), int(raw["nprobe"]), float(raw["recall"]))


class IvfLists:
    """Which list of an IVF index holds each row, and the lists' centroids (its inner-product flat quantizer's)."""

    def __init__(self, index: Any):
        self.nlist = int(index.nlist)
        self.centroids = index.quantizer.reconstruct_n(0, self.nlist)  # float32 [nlist, d]: 7 MiB at 12,649 lists
        # A row's list, in the smallest integer that holds it: 20 MB at 10M rows (12,649 lists)
        self.list_of_row: np.ndarray = np.full(
            index.ntotal, -1, np.int16 if self.nlist <= np.iinfo(np.int16).max else np.int32
        )
        invlists = index.invlists
        for number in range(self.nlist):
            size = invlists.list_size(number)
            if size:
                ids = invlists.get_ids(number)
                self.list_of_row[faiss.rev_swig_ptr(ids, size)] = number
                invlists.release_ids(number, ids)
        self.rows_per_list = index.ntotal / max(1, self.nlist)
        # Per metadata column (by its codes array, kept alive here), its rows per list and value: int32 [nlist, values]
        self._tables: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._lock = threading.Lock()

    def allowed_per_list(self, mask: np.ndarray, summary: MaskSummary) -> np.ndarray:
        """int [nlist]: the rows `mask` allows in each list, kept in its `summary` (a mask may run past the index's
        rows: a catalogue update's rows past it). A mask of one column's values (`summary.values`) sums the column's
        table, made once per column: 42 ms at 10M rows, then ~0.1 ms a filter; any other mask is counted row by row,
        11-58 ms at 10M rows (1.8-40% allowed), once while it stays cached."""
        counted = summary.per_list
        if counted is not None and counted[0]() is self:  # not another index's (a swap keeps the metadata's masks)
            return counted[1]
        rows = len(self.list_of_row)
        if summary.values is not None:
            codes, wanted = summary.values
            table = self._table(codes)
            # A value only rows past the index have (a catalogue update's new one) is in no list
            counts = table[:, wanted[wanted < table.shape[1]]].sum(axis=1)
            if summary.without is not None:  # excluded rows: a list whose allowed rows all sold out holds none
                out = summary.without[summary.without < rows]
                out = out[np.isin(codes[out], wanted)]
                counts -= np.bincount(self.list_of_row[out], minlength=self.nlist)
        else:
            counts = np.bincount(self.list_of_row[mask[:rows]], minlength=self.nlist)
        summary.per_list = (weakref.ref(self), counts)  # weak: a mask kept across a swap does not keep these lists
        return counts

    def _table(self, codes: np.ndarray) -> np.ndarray:
        with self._lock:
            kept = self._tables.get(id(codes))
            if kept is not None:
                self._tables.move_to_end(id(codes))
                return kept[1]
        rows = len(self.list_of_row)
        values = int(codes[:rows].max(initial=0)) + 1
        cells = self.list_of_row.astype(np.int64) * values + codes[:rows]
        table = np.bincount(cells, minlength=self.nlist * values).astype(np.int32).reshape(self.nlist, values)
        with self._lock:
            self._tables[id(codes)] = (codes, table)
            while len(self._tables) > TABLES_KEPT:
                self._tables.popitem(last=False)
        return table

    @classmethod
    def of(cls, index: Any) -> "IvfLists | None":
        """For an IVF index whose quantizer ranks lists by inner product with a flat scan (the ones export builds);
        None for any other index, whose filtered searches widen nprobe as before."""
        if not hasattr(index, "nprobe") or not isinstance(faiss.downcast_index(index.quantizer), faiss.IndexFlatIP):
            return None
        return cls(index)

    def best_priors(self, item_bias: np.ndarray, excluded: np.ndarray) -> np.ndarray:
        """float32 [nlist]: the highest prior among each list's rows a version shows (not `excluded`: a removed best
        seller would keep drawing searches to its list), 0 where none. Per version: a swap may share these lists
        with a version that removed other rows. 0.02-0.05 s at 10M rows."""
        rows = len(self.list_of_row)
        shown = ~np.asarray(excluded[:rows], bool)
        best = np.zeros(self.nlist, np.float32)
        np.maximum.at(best, self.list_of_row[shown], np.asarray(item_bias[:rows], np.float32)[shown])
        return best

    def nearest(
        self,
        queries: np.ndarray,
        nprobe: int | np.ndarray,
        best_prior: np.ndarray | None = None,
        weights: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """(lists int64 [B, P], their centroids' scores float32 [B, P]): the `nprobe` (one, or int [B]: one per
        query, the rest of a row -1, which faiss skips) best-ranked lists of each of `queries` [B, d] (as the index
        takes them), for `search_lists`. A list ranks by its centroid's score, + the query's prior weight
        (`weights`, float [B]) x the list's `best_prior` (`best_priors`) where both are given; faiss is given the
        centroid scores (an IVF-PQ adds its codes' scores to them)."""
        scores = queries @ self.centroids.T
        key = scores
        if best_prior is not None and weights is not None:
            key = scores + weights[:, None] * best_prior
        if isinstance(nprobe, (int, np.integer)):  # one for the batch (no measured nprobe: 30 us less a search)
            best = self._best(key, int(nprobe))
            return best, np.take_along_axis(scores, best, 1).astype(np.float32)
        probes = np.broadcast_to(np.asarray(nprobe, np.int64), (len(queries),))
        lists = np.full((len(queries), min(int(probes.max(initial=1)), self.nlist)), -1, np.int64)
        for n in np.unique(probes):  # one pass per distinct nprobe: a batch holds one or two
            rows = np.flatnonzero(probes == n)
            best = self._best(key[rows], int(n))
            lists[rows, : best.shape[1]] = best
        return lists, np.take_along_axis(scores, np.maximum(lists, 0), 1).astype(np.float32)

    def _best(self, key: np.ndarray, nprobe: int) -> np.ndarray:
        """int64 [B, min(nprobe, nlist)]: each row's highest-keyed lists, unordered (all, ordered, from nlist on)."""
        if nprobe >= self.nlist:
            return np.argsort(-key, 1).astype(np.int64)
        return np.argpartition(-key, nprobe - 1, axis=1)[:, :nprobe].astype(np.int64)

    def nearest_holding(
        self, query: np.ndarray, allowed_per_list: np.ndarray, allowed_rows: int, max_lists: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """(lists int64 [1, P], their centroids' scores float32 [1, P]), nearest first: the nearest lists holding
        allowed rows until they hold `allowed_rows` of them, at most `max_lists`. By direction alone, not by `nearest`'s
        rank: 10M synthetic articles laid out as H&M (as in the module's docstring, the popular rows scored exactly
        beside), recall@10 of the three largest product groups (41%, 19%, 13%) 0.958 / 0.975 / 0.989 this way,
        0.970 / 0.946 / 0.961 by `nearest`'s rank, the six smaller ones the same within 0.001 (2026-12-01).
        `query` [1, d] as the index searches it; `allowed_per_list` int [nlist] (MaskSummary.per_list)."""
        holding = np.flatnonzero(allowed_per_list)
        if not len(holding):
            return np.zeros((1, 0), np.int64), np.zeros((1, 0), np.float32)
        scores = (self.centroids @ query[0])[holding]
        if len(holding) > max_lists:  # the nearest max_lists, unordered, then ordered: not a sort of every list
            nearest = np.argpartition(-scores, max_lists - 1)[:max_lists]
            order = nearest[np.argsort(-scores[nearest], kind="stable")]
        else:
            order = np.argsort(-scores, kind="stable")
        enough = int(np.searchsorted(np.cumsum(allowed_per_list[holding[order]]), allowed_rows)) + 1
        order = order[:enough]
        return holding[order].astype(np.int64)[None], scores[order].astype(np.float32)[None]


def search_lists(
    index: Any, queries: np.ndarray, k: int, lists: tuple[np.ndarray, np.ndarray], selector: Any
) -> tuple[np.ndarray, np.ndarray]:
    """faiss' IVF search of `queries` [B, d] over the given lists ([B, P]: `nearest`'s or `nearest_holding`'s), the
    rows `selector` allows (None: all; kept alive by the caller). faiss' Python wrapper of search_preassigned takes no
    parameters: the C++ call."""
    assign, centroid_scores = lists
    params = faiss.SearchParametersIVF(sel=selector, nprobe=max(1, assign.shape[1]))  # type: ignore[call-arg]
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    distances = np.empty((len(queries), k), np.float32)
    labels = np.empty((len(queries), k), np.int64)
    if assign.shape[1] == 0:
        distances.fill(-np.inf)
        labels.fill(-1)
        return distances, labels
    index.search_preassigned_c(
        len(queries),
        faiss.swig_ptr(queries),
        k,
        faiss.swig_ptr(assign),
        faiss.swig_ptr(centroid_scores),
        faiss.swig_ptr(distances),
        faiss.swig_ptr(labels),
        False,
        params,
    )
    return distances, labels
