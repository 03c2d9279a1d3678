"""Non-learned baselines computed from the history window only.

Each ranker exposes `scores(i)`: a dense float vector over the catalogue for case i (higher =
better, -inf = never recommended), which serves both full-catalogue ranking and the sampled
leave-one-out protocol.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp

from evaluation.split import TemporalSplit


class Ranker:
    name = "ranker"

    def scores(self, case: int) -> np.ndarray:
        raise NotImplementedError

    def rank(self, case: int, k: int) -> np.ndarray:
        scores = self.scores(case)
        top = np.argpartition(-scores, min(k, len(scores) - 1))[:k]
        top = top[np.argsort(-scores[top], kind="stable")]
        return top[np.isfinite(scores[top])]

    def rank_all(self, cases: int, k: int) -> list[np.ndarray]:
        """`rank` of cases 0 .. cases - 1 (a ranker that searches a batch at once overrides it)."""
        return [self.rank(i, k) for i in range(cases)]

    def sampled_scores(self, case: int, rows: np.ndarray) -> np.ndarray:
        """`scores(case)[rows]` (a ranker that can score a few rows alone overrides it)."""
        return self.scores(case)[rows]


def _matrix(split: TemporalSplit, frame: pd.DataFrame, customers: list[str]) -> sp.csr_matrix:
    position = {c: i for i, c in enumerate(customers)}
    frame = frame[frame["customer_id"].isin(position)]
    rows = frame["customer_id"].map(position).to_numpy()
    cols = frame["article_id"].map(split.row_of).to_numpy()
    return sp.csr_matrix((np.ones(len(rows), np.float32), (rows, cols)), shape=(len(customers), len(split.row_of)))


class Popularity(Ranker):
    """The most bought articles of the last `days` before the cutoff, the same list for everyone."""

    def __init__(self, split: TemporalSplit, days: int = 7):
        self.name = f"popularity ({days}d)"
        recent = split.history[split.history["t_dat"] >= split.cutoff - pd.Timedelta(days=days)]
        counts = np.bincount(recent["article_id"].map(split.row_of).to_numpy(), minlength=len(split.row_of))
        self._scores = np.where(counts > 0, counts.astype(np.float64), -np.inf)

    def scores(self, case: int) -> np.ndarray:
        return self._scores


class Repurchase(Ranker):
    """The customer's own purchases, most recent first (then most often)."""

    name = "repurchase"

    def __init__(self, split: TemporalSplit):
        cutoff_day = split.cutoff.normalize()
        frame = split.history.assign(
            row=split.history["article_id"].map(split.row_of),
            recency=(cutoff_day - split.history["t_dat"]).dt.days,
        )
        self._size = len(split.row_of)
        grouped = frame.groupby(["customer_id", "row"]).agg(recency=("recency", "min"), count=("row", "size"))
        self._items: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {
            customer: (part.index.get_level_values(1).to_numpy(), part["recency"].to_numpy(), part["count"].to_numpy())
            for customer, part in grouped.groupby(level=0)
        }
        self._customers = split.customers

    def bought(self, case: int) -> np.ndarray:
        """The catalogue rows the case's customer bought before the cutoff."""
        return self._items[self._customers[case]][0]

    def owned(self, case: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(rows, days since the latest purchase of each, purchases of each) of the case's own articles."""
        return self._items[self._customers[case]]

    def scores(self, case: int) -> np.ndarray:
        out = np.full(self._size, -np.inf)
        rows, recency, count = self.owned(case)
        out[rows] = 1000.0 - recency + count / 100.0  # fewer days ago ranks first; more purchases break ties
        return out


class CoPurchase(Ranker):
    """Item-to-item: articles bought by the same customers as the customer's own articles."""

    name = "co-purchase"

    def __init__(self, split: TemporalSplit):
        everyone = sorted(split.history["customer_id"].unique())
        bought = _matrix(split, split.history, everyone)
        bought.data[:] = 1.0
        co = (bought.T @ bought).tocsr()
        co.setdiag(0.0)
        co.eliminate_zeros()
        self._co = co
        self._cases = _matrix(split, split.history, split.customers)
        self._cases.data[:] = 1.0

    def scores(self, case: int) -> np.ndarray:
        dense = np.asarray((self._cases[case] @ self._co).todense()).ravel().astype(np.float64)
        return np.where(dense > 0, dense, -np.inf)


class Mix(Ranker):
    """Rankers in priority order: everything the first one ranks, then the next one's, and so on."""

    def __init__(self, parts: list[Ranker]):
        self.parts = parts
        self.name = " > ".join(p.name for p in parts)

    def scores(self, case: int) -> np.ndarray:
        out = np.full_like(self.parts[0].scores(case), -np.inf)
        for tier, part in enumerate(self.parts):
            scores = part.scores(case)
            finite = np.isfinite(scores) & ~np.isfinite(out)
            if finite.any():
                # squash each part's scores into (0, 1) and lift them above the lower tiers
                values = scores[finite]
                span = values.max() - values.min()
                scaled = (values - values.min()) / span if span > 0 else np.zeros_like(values)
                out[finite] = (len(self.parts) - tier) * 10.0 + scaled
        return out


class WithoutOwn(Ranker):
    """Another ranker with the customer's own earlier purchases removed: the baseline for discovery."""

    def __init__(self, ranker: Ranker, repurchase: Repurchase):
        self.ranker, self.repurchase = ranker, repurchase
        self.name = f"{ranker.name} (without own articles)"

    def scores(self, case: int) -> np.ndarray:
        out = self.ranker.scores(case).copy()
        out[self.repurchase.bought(case)] = -np.inf
        return out
