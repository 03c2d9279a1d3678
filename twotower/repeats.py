"""Letting customers' own recent purchases, and the same products in other colours, be recommended.

Repurchase is the strongest single signal in fashion: on hm_lastweek a fifth of next-day purchases
are articles the customer bought in the days before (another size, a second one), and a few percent
more are another colour of a product they bought. The towers rank by cosine; an article the customer
already bought, or a sibling of one (same product_code), is ranked by its cosine plus a boost that
fades with the days since that purchase:

    own article:  bonus - slope * log1p(age_days)
    sibling:      sibling_bonus - sibling_slope * log1p(age_days)

The four numbers are fitted after training on held-out whole days (never on an evaluation target,
twotower.fitting) and ship with the score head in the index. `candidates` and `merge` are the two
halves twotower.ranking puts together, for training, the evaluation and the retriever alike.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

from twotower.rowsets import member_of


def _fade(bonus: float, slope: float, age_days: np.ndarray) -> np.ndarray:
    return (bonus - slope * np.log1p(np.maximum(age_days, 0.0))).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class RepeatBoost:
    bonus: float = 0.0
    slope: float = 0.0
    sibling_bonus: float = 0.0  # other articles of a product the customer bought (another colour)
    sibling_slope: float = 0.0

    @property
    def active(self) -> bool:
        return self.bonus != 0.0 or self.slope != 0.0 or self.siblings_active

    @property
    def siblings_active(self) -> bool:
        return self.sibling_bonus != 0.0 or self.sibling_slope != 0.0

    def __call__(self, age_days: np.ndarray) -> np.ndarray:
        return _fade(self.bonus, self.slope, age_days)

    def sibling(self, age_days: np.ndarray) -> np.ndarray:
        return _fade(self.sibling_bonus, self.sibling_slope, age_days)

    def to_json(self) -> dict[str, float]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, raw: dict[str, Any] | None) -> "RepeatBoost":
        """Indexes written before sibling boosts have only bonus and slope."""
        if not raw:
            return cls()
        return cls(
            float(raw["bonus"]),
            float(raw["slope"]),
            float(raw.get("sibling_bonus", 0.0)),
            float(raw.get("sibling_slope", 0.0)),
        )


class Products:
    """Which catalogue rows are articles of the same product (H&M `product_code`: one per colour)."""

    def __init__(self, codes: Sequence[str]):
        distinct, product_of = np.unique(np.asarray(codes, dtype=str), return_inverse=True)
        self._group(product_of.reshape(-1), distinct)

    @classmethod
    def from_encoded(cls, product_of: np.ndarray, distinct: np.ndarray) -> "Products":
        """From a dictionary-encoded column (twotower.item_table): a code per row into `distinct`, its sorted
        values as stored (bytes: decoding the millions of product codes of 10M articles took ~2 s of a hot
        swap's 8.4 s load)."""
        products = cls.__new__(cls)
        products._group(product_of, distinct)
        return products

    def _group(self, product_of: np.ndarray, distinct: np.ndarray) -> None:
        # int32 rows and codes: at 10M articles each int64 array is 80 MB of the retriever's own memory, which a
        # 4 Gi pod needs for the page cache (docs/scale.md). A mapped codes column stays mapped unless edited.
        self.product_of = np.asarray(product_of, dtype=np.int32)
        # `distinct` is sorted (np.unique's order, item_table's contract): an empty code can only come first.
        if len(distinct) and not distinct[0]:
            self.product_of = np.where(self.product_of == 0, np.int32(-1), self.product_of)  # no siblings
        # Members of product p: _order[_start[p]:_start[p + 1]] (arrays, not one object per product:
        # a 10M-article catalogue has millions of products).
        self._order = np.argsort(self.product_of, kind="stable").astype(np.int32)
        counts = np.bincount(self.product_of[self.product_of >= 0], minlength=len(distinct))
        skipped = int((self.product_of < 0).sum())  # the -1 rows sort first
        self._start = np.concatenate([[0], np.cumsum(counts)]) + skipped

    def siblings(self, rows: np.ndarray, ages: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Other articles of the products of `rows` (distinct, each with the youngest age of its product)."""
        own = set(rows.tolist())
        youngest: dict[int, float] = {}
        for row, age in zip(rows.tolist(), ages.tolist()):
            product = int(self.product_of[row])
            if product < 0:
                continue
            for sibling in self._order[self._start[product] : self._start[product + 1]].tolist():
                if sibling not in own and sibling not in youngest:
                    youngest[sibling] = age
        return _as_arrays(youngest)


def candidates(
    history: tuple[np.ndarray, np.ndarray], boost: RepeatBoost, products: Products | None, own: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Rows to boost for a history (rows most recent first, ages) and each one's boost. With `own` False,
    only the other colours of its products: a list that hides what was bought still boosts those."""
    rows, ages = latest_purchases(*history)
    own_rows, own_boosts = (rows, boost(ages)) if own else (rows[:0], np.zeros(0, np.float32))
    if products is None or not boost.siblings_active or len(rows) == 0:
        return own_rows, own_boosts
    sibling_rows, sibling_ages = products.siblings(rows, ages)
    return np.concatenate([own_rows, sibling_rows]), np.concatenate([own_boosts, boost.sibling(sibling_ages)])


def latest_purchases(rows: np.ndarray, ages: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct articles of a history (rows most recent first, -1 = padding) with their youngest age."""
    youngest: dict[int, float] = {}
    for row, age in zip(rows.tolist(), ages.tolist()):  # a few dozen items: plain Python beats np.unique here
        if row >= 0 and row not in youngest:
            youngest[row] = age
    return _as_arrays(youngest)


def _as_arrays(age_of_row: dict[int, float]) -> tuple[np.ndarray, np.ndarray]:
    return (
        np.fromiter(age_of_row.keys(), dtype=np.int64, count=len(age_of_row)),
        np.fromiter(age_of_row.values(), dtype=np.float32, count=len(age_of_row)),
    )


def merge(
    similarities: np.ndarray, rows: np.ndarray, repeat_rows: np.ndarray, repeat_scores: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Top k of a search result (-1 rows ignored) and boosted own purchases; a boosted row wins over its search hit."""
    keep = (rows >= 0) & ~member_of(rows, repeat_rows)
    all_scores = np.concatenate([similarities[keep], repeat_scores]).astype(np.float32)
    all_rows = np.concatenate([rows[keep], repeat_rows]).astype(np.int64)
    order = np.argsort(-all_scores, kind="stable")[:k]
    return all_scores[order], all_rows[order]
