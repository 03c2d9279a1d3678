"""Letting customers' own recent purchases be recommended again.

Repurchase is the strongest single signal in fashion: on hm_lastweek a fifth of next-day purchases
are articles the customer bought in the days before (another size, a second one). The towers rank by
cosine; an article the customer already bought is ranked by its cosine plus a boost that fades with
the days since that purchase:

    boost(age) = bonus - slope * log1p(age_days)

(bonus, slope) are fitted after training on the held-out latest purchases (never on an evaluation
target) and ship with the score head in the index. The same `merge` runs in training, in the
evaluation and in the retriever, so the three agree on what "recommend it again" means.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any, Callable, Iterable

import numpy as np

BONUS_GRID = (0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0)
SLOPE_GRID = (0.0, 0.02, 0.05, 0.1, 0.2)


@dataclasses.dataclass(frozen=True)
class RepeatBoost:
    bonus: float = 0.0
    slope: float = 0.0

    @property
    def active(self) -> bool:
        return self.bonus != 0.0 or self.slope != 0.0

    def __call__(self, age_days: np.ndarray) -> np.ndarray:
        return (self.bonus - self.slope * np.log1p(np.maximum(age_days, 0.0))).astype(np.float32)

    def to_json(self) -> dict[str, float]:
        return {"bonus": self.bonus, "slope": self.slope}

    @classmethod
    def from_json(cls, raw: dict[str, Any] | None) -> "RepeatBoost":
        return cls(float(raw["bonus"]), float(raw["slope"])) if raw else cls()


def latest_purchases(rows: np.ndarray, ages: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct articles of a history (rows most recent first, -1 = padding) with their youngest age."""
    youngest: dict[int, float] = {}
    for row, age in zip(rows.tolist(), ages.tolist()):  # a few dozen items: plain Python beats np.unique here
        if row >= 0 and row not in youngest:
            youngest[row] = age
    return (np.fromiter(youngest.keys(), dtype=np.int64, count=len(youngest)),
            np.fromiter(youngest.values(), dtype=np.float32, count=len(youngest)))


def merge(similarities: np.ndarray, rows: np.ndarray, repeat_rows: np.ndarray, repeat_scores: np.ndarray, k: int
          ) -> tuple[np.ndarray, np.ndarray]:
    """Top k of a search result (-1 rows ignored) and boosted own purchases; a boosted row wins over its search hit."""
    repeated = set(repeat_rows.tolist())
    keep = [i for i, row in enumerate(rows.tolist()) if row >= 0 and row not in repeated]
    all_scores = np.concatenate([similarities[keep], repeat_scores]).astype(np.float32)
    all_rows = np.concatenate([rows[keep], repeat_rows]).astype(np.int64)
    order = np.argsort(-all_scores, kind="stable")[:k]
    return all_scores[order], all_rows[order]


def fit(
    search: Callable[[int, int], tuple[np.ndarray, np.ndarray]],
    cosine: Callable[[int, np.ndarray], np.ndarray],
    histories: list[tuple[np.ndarray, np.ndarray]],
    targets: list[set[int]],
    k: int = 12,
    grid: Iterable[tuple[float, float]] = tuple(itertools.product(BONUS_GRID, SLOPE_GRID)),
) -> tuple[RepeatBoost, float, float]:
    """The (bonus, slope) with the best MAP@k over the cases, that MAP, and the MAP without a boost.

    search(case, n) -> (similarities, rows) of the n nearest articles; cosine(case, rows) -> their
    similarities; histories[case] = (rows most recent first, ages in days).
    """
    from twotower.evaluation.metrics import map_at_k  # evaluation imports this module's users

    prepared = []
    for case, (rows, ages) in enumerate(histories):
        repeat_rows, repeat_ages = latest_purchases(rows, ages)
        similarities, found = search(case, k + len(repeat_rows))
        prepared.append((similarities, found, repeat_rows, repeat_ages, cosine(case, repeat_rows)))
    best, best_map, unboosted = RepeatBoost(), -1.0, 0.0
    for bonus, slope in dict.fromkeys([(0.0, 0.0), *grid]):  # no boost first: ties keep it
        boost = RepeatBoost(bonus, slope)
        ranked = [merge(s, r, rr, rc + boost(ra), k)[1] for s, r, rr, ra, rc in prepared]
        value = map_at_k(ranked, targets, k)
        if not boost.active:
            unboosted = value
        if value > best_map + 1e-9:
            best, best_map = boost, value
    return best, best_map, unboosted
