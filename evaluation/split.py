"""The temporal protocol: history = purchases before a cutoff day, target = purchases from it on.

Never a random split: the model and the baselines see only what happened before the cutoff.
Cases are customers with at least one purchase in the history window and one in the target window.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd

from twotower.data.histories import Histories, day_numbers, latest_histories
from twotower.data.hm import HMData


@dataclasses.dataclass
class TemporalSplit:
    cutoff: pd.Timestamp
    history_start: pd.Timestamp
    target_end: pd.Timestamp  # exclusive
    history: pd.DataFrame  # purchases in [history_start, cutoff)
    customers: list[str]  # the cases, in a fixed order
    targets: list[set[int]]  # catalogue rows each case bought in [cutoff, target_end)
    cold_rows: set[int]  # rows never bought before the cutoff (in the data at all)
    row_of: dict[str, int]

    def describe(self) -> str:
        return (
            f"history {self.history_start.date()}..{(self.cutoff - pd.Timedelta(days=1)).date()}, "
            f"target {self.cutoff.date()}..{(self.target_end - pd.Timedelta(days=1)).date()}, "
            f"{len(self.customers)} customers"
        )

    def histories(self, max_history: int) -> Histories:
        """Each case's last purchases before the cutoff, ages in days as of the cutoff day."""
        customers, histories, last_day = latest_histories(self.history, self.row_of, max_history)
        position = {c: i for i, c in enumerate(customers)}
        order = np.asarray([position[c] for c in self.customers])
        shift = (int(day_numbers(pd.Series([self.cutoff]))[0]) - last_day[order]).astype(np.float32)
        rows, ages = histories.rows[order], histories.age_days[order]
        return Histories(rows, np.where(rows >= 0, ages + shift[:, None], 0.0).astype(np.float32))


def temporal_split(data: HMData, cutoff: str = "", history_days: int = 6, target_days: int = 1) -> TemporalSplit:
    """Default cutoff: the last `target_days` days of the data are the target."""
    transactions = data.transactions
    last_day = transactions["t_dat"].max()
    cut = pd.Timestamp(cutoff) if cutoff else last_day - pd.Timedelta(days=target_days - 1)
    start, end = cut - pd.Timedelta(days=history_days), cut + pd.Timedelta(days=target_days)
    before = transactions[transactions["t_dat"] < cut]
    history = before[before["t_dat"] >= start]
    target = transactions[(transactions["t_dat"] >= cut) & (transactions["t_dat"] < end)]
    if history.empty or target.empty:
        raise ValueError(
            f"{data.source}: no purchases in the history window {start.date()}..{cut.date()} "
            f"or in the target window from {cut.date()} (data spans "
            f"{transactions['t_dat'].min().date()}..{last_day.date()})"
        )
    row_of = {article_id: i for i, article_id in enumerate(data.article_ids)}
    customers = sorted(set(history["customer_id"]) & set(target["customer_id"]))
    target_rows = target.assign(row=target["article_id"].map(row_of)).groupby("customer_id")["row"].agg(set)
    bought_before = set(before["article_id"].map(row_of))
    cold = set(range(len(row_of))) - bought_before
    return TemporalSplit(cut, start, end, history, customers, [target_rows[c] for c in customers], cold, row_of)
