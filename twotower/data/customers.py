"""Customers kept out of training, so that an evaluation can measure the towers on people they never saw.

The choice is a stable hash of the customer id (CRC-32): training and evaluation pick the same customers
from the share alone, with nothing to store or pass around but that number.
"""

from __future__ import annotations

import zlib
from typing import Iterable

import numpy as np

BUCKETS = 10_000


def unseen_customers(customer_ids: Iterable[str], share: float) -> np.ndarray:
    """bool per id: True for the `share` of customers that training never sees."""
    ids = list(customer_ids)
    if share <= 0:
        return np.zeros(len(ids), dtype=bool)
    threshold = int(round(share * BUCKETS))
    return np.fromiter((zlib.crc32(str(c).encode()) % BUCKETS < threshold for c in ids), dtype=bool, count=len(ids))
