"""Membership of catalogue rows in a request's few rows, by a sorted search.

np.isin costs ~80 us for 300 rows against 8 on numpy 1.26 (it picks a lookup table over the members' value
range); a sorted search over the members takes ~8 us. A second-stage request runs several such tests.
"""

from __future__ import annotations

import numpy as np


def find_sorted(ordered: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(each value's position in `ordered` (ascending), whether it is there): an absent value's position is
    arbitrary but valid."""
    if len(ordered) == 0:
        return np.zeros(len(values), dtype=np.int64), np.zeros(len(values), dtype=bool)
    at = np.minimum(np.searchsorted(ordered, values), len(ordered) - 1)
    return at, ordered[at] == values


def member_of(values: np.ndarray, members: np.ndarray) -> np.ndarray:
    """bool [len(values)]: which values are among `members` (any order, duplicates allowed)."""
    return find_sorted(np.sort(members), values)[1]
