"""Paired bootstrap intervals: is a ranker's lead over another on the same cases more than noise?

Both rankers are scored on the same customers, so the cases are resampled with replacement together
(paired): the interval is that of mean(ours) - ratio * mean(theirs) over 2,000 resamples. A target
"ours >= ratio x theirs" is met only when the whole 95% interval lies above zero, missed when it lies
below, and a tie otherwise.
"""

from __future__ import annotations

import dataclasses

import numpy as np

RESAMPLES = 2000
LEVEL = 0.95


@dataclasses.dataclass(frozen=True)
class Comparison:
    difference: float  # mean(ours) - ratio * mean(theirs)
    low: float
    high: float

    @property
    def verdict(self) -> str:
        if self.low > 0:
            return "met"
        return "NOT met" if self.high < 0 else "tie"

    def to_json(self) -> dict[str, object]:
        return {"verdict": self.verdict, "difference": self.difference, "interval": [self.low, self.high]}


def paired_bootstrap(
    ours: np.ndarray,
    theirs: np.ndarray,
    ratio: float = 1.0,
    resamples: int = RESAMPLES,
    level: float = LEVEL,
    seed: int = 0,
) -> Comparison:
    """mean(ours) - ratio * mean(theirs) over per-case values aligned by case, with its percentile interval."""
    differences = np.asarray(ours, dtype=np.float64) - ratio * np.asarray(theirs, dtype=np.float64)
    if len(differences) == 0:
        raise ValueError("no cases to compare")
    cases = np.random.default_rng(seed).integers(0, len(differences), (resamples, len(differences)))
    means = differences[cases].mean(axis=1)
    low, high = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
    return Comparison(float(differences.mean()), float(low), float(high))
