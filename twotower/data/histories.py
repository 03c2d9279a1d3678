"""Purchase sequences -> fixed-size history tensors for the user tower.

A history is the customer's last L purchases, most recent first, as catalogue row numbers
(-1 = padding) with their age in days relative to a reference day. The same layout is used
for training examples, for the per-customer histories the retriever serves, and for the
tensors sent to Triton, so there is exactly one definition of "a history".
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np
import pandas as pd

from twotower.files import VectorRows

PAD = -1


@dataclasses.dataclass
class Histories:
    rows: np.ndarray  # int64 [N, L], catalogue rows, PAD where empty; column 0 = most recent
    age_days: np.ndarray  # float32 [N, L], 0 where empty

    @property
    def lengths(self) -> np.ndarray:
        return (self.rows != PAD).sum(axis=1)

    def take(self, index: np.ndarray) -> "Histories":
        return Histories(self.rows[index], self.age_days[index])

    @classmethod
    def from_pairs(cls, pairs: Sequence[tuple[np.ndarray, np.ndarray]], length: int) -> "Histories":
        """Fixed-length histories from (rows most recent first, ages) pairs of any length (longer ones cut)."""
        rows = np.full((len(pairs), length), PAD, dtype=np.int64)
        ages = np.zeros((len(pairs), length), dtype=np.float32)
        for i, (pair_rows, pair_ages) in enumerate(pairs):
            n = min(len(pair_rows), length)
            rows[i, :n], ages[i, :n] = pair_rows[:n], pair_ages[:n]
        return cls(rows, ages)


@dataclasses.dataclass
class TrainingExamples:
    histories: Histories
    targets: np.ndarray  # int64 [N] catalogue rows
    days: np.ndarray  # int64 [N] day number of the target purchase
    customers: np.ndarray  # int64 [N] the buyer's number (examples of one customer are consecutive, in order)

    def __len__(self) -> int:
        return len(self.targets)

    def take(self, index: np.ndarray) -> "TrainingExamples":
        return TrainingExamples(
            self.histories.take(index), self.targets[index], self.days[index], self.customers[index]
        )


def user_tower_inputs(
    item_vectors: VectorRows, rows: np.ndarray, ages: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The user tower's inputs (history [B, L, D], mask [B, L], age [B, L], float32) from padded
    histories: `rows` [B, L] catalogue rows (PAD where empty) into `item_vectors`, `ages` in days.
    The one way to build them: export (known customers), the evaluation and the retriever share it."""
    mask = (rows != PAD).astype(np.float32)
    history = item_vectors[np.where(rows != PAD, rows, 0)] * mask[..., None]
    return history.astype(np.float32, copy=False), mask, (ages * mask).astype(np.float32, copy=False)


def day_numbers(dates: pd.Series) -> np.ndarray:
    """Whole days since the epoch: ages are differences of these."""
    return dates.to_numpy(dtype="datetime64[D]").astype(np.int64)


def _customer_sequences(
    transactions: pd.DataFrame, row_of: dict[str, int]
) -> tuple[list[str], list[np.ndarray], list[np.ndarray]]:
    """Per customer, in purchase order: catalogue rows and day numbers."""
    rows = transactions["article_id"].map(row_of).to_numpy(dtype=np.int64)
    days = day_numbers(transactions["t_dat"])
    codes, customers = pd.factorize(transactions["customer_id"], sort=False)
    order = np.argsort(codes, kind="stable")  # keeps date order within a customer
    boundaries = np.flatnonzero(np.diff(codes[order])) + 1
    row_groups = np.split(rows[order], boundaries)
    day_groups = np.split(days[order], boundaries)
    return list(customers), row_groups, day_groups


def _fill(out_rows: np.ndarray, out_age: np.ndarray, i: int, rows: np.ndarray, days: np.ndarray, today: int) -> None:
    recent_rows = rows[::-1][: out_rows.shape[1]]
    recent_days = days[::-1][: out_rows.shape[1]]
    out_rows[i, : len(recent_rows)] = recent_rows
    out_age[i, : len(recent_rows)] = today - recent_days


def training_examples(
    transactions: pd.DataFrame, row_of: dict[str, int], max_history: int, earlier_days_only: bool = False
) -> TrainingExamples:
    """One example per purchase that has at least one earlier purchase by the same customer.

    With `earlier_days_only` a history stops at the day before the target's day: a customer coming
    back on a later day, which is what the evaluation (and a returning visitor) looks like; the
    other articles of the same basket are then never each other's history.
    """
    _, row_groups, day_groups = _customer_sequences(transactions, row_of)
    # ends[p]: how many of the customer's purchases may form the history of purchase p
    ends = [
        np.searchsorted(days, days, side="left") if earlier_days_only else np.arange(len(days)) for days in day_groups
    ]
    total = sum(int((e > 0).sum()) for e in ends)
    rows = np.full((total, max_history), PAD, dtype=np.int64)
    ages = np.zeros((total, max_history), dtype=np.float32)
    targets = np.empty(total, dtype=np.int64)
    target_days = np.empty(total, dtype=np.int64)
    buyers = np.empty(total, dtype=np.int64)
    i = 0
    for customer, (group_rows, group_days, group_ends) in enumerate(zip(row_groups, day_groups, ends)):
        for position in np.flatnonzero(group_ends > 0):
            end = int(group_ends[position])
            _fill(rows, ages, i, group_rows[:end], group_days[:end], int(group_days[position]))
            targets[i] = group_rows[position]
            target_days[i] = group_days[position]
            buyers[i] = customer
            i += 1
    return TrainingExamples(Histories(rows, ages), targets, target_days, buyers)


def latest_histories(
    transactions: pd.DataFrame, row_of: dict[str, int], max_history: int
) -> tuple[list[str], Histories, np.ndarray]:
    """Each customer's last `max_history` purchases; ages relative to that customer's last day.

    Returns (customer_ids, histories, last_day). Serving adds (request day - last_day) to the ages.
    """
    customers, row_groups, day_groups = _customer_sequences(transactions, row_of)
    rows = np.full((len(customers), max_history), PAD, dtype=np.int64)
    ages = np.zeros((len(customers), max_history), dtype=np.float32)
    last_day = np.empty(len(customers), dtype=np.int64)
    for i, (group_rows, group_days) in enumerate(zip(row_groups, day_groups)):
        last_day[i] = group_days[-1]
        _fill(rows, ages, i, group_rows, group_days, int(group_days[-1]))
    return [str(c) for c in customers], Histories(rows, ages), last_day
