"""Request filters: which catalogue rows may be returned.

Filters become a boolean row mask over the catalogue; twotower.ranking applies it and
`Catalog.search_masked` decides how to search it (exact over the few rows that pass, or the ANN index
restricted to them). The per-product-type diversity cap is part of the ranking. Numpy only.
"""

from __future__ import annotations

import dataclasses
import threading
from collections import OrderedDict
from typing import Any, Generic, Mapping, Sequence, TypeVar

import numpy as np

from twotower.item_table import ItemTable

Key = TypeVar("Key")

# request field -> metadata column; each takes a list of accepted values (any of them matches)
CATEGORY_FILTERS = {
    "product_group": "product_group_name",
    "product_type": "product_type_name",
    "index": "index_name",
    "colour": "colour_group_name",
    "section": "section_name",
    "garment_group": "garment_group_name",
}
FILTER_FIELDS = (*CATEGORY_FILTERS, "price_min", "price_max")
# Recent filters' masks kept per index version, read-only, up to this many bytes (one byte per article: 64 masks
# at 1M articles, 6 at 10M). A shop's filters repeat (its menus); building one mask at 10M articles costs 4-29 ms
# (`rows_with_codes`), a cached one nothing. Each kept mask also keeps its packed bitmap (MaskSummary): 1/8 more.
MASK_CACHE_BYTES = 64 * 2**20
# A category filter accepting up to this many values compares the codes once per value; more use a lookup
# table. At 10M int32 codes: one comparison 4.0 ms, two 14.6, three 21.2, four 28.6; the table 28.8 ms at any
# count (median of 20, this 2-core host, 2026-11-30).
MAX_CODE_COMPARISONS = 3


class FilterError(ValueError):
    """A filter field has the wrong type or value; the message names the field."""


@dataclasses.dataclass(frozen=True)
class Filters:
    categories: tuple[tuple[str, frozenset[str]], ...] = ()  # (metadata column, accepted values)
    price_min: float | None = None
    price_max: float | None = None

    @property
    def empty(self) -> bool:
        return not self.categories and self.price_min is None and self.price_max is None

    @classmethod
    def parse(cls, raw: Any, where: str = "filters") -> "Filters":
        """From a request's `filters` object, e.g. {"product_group": ["Garment Upper body"], "price_max": 0.05}."""
        if raw is None:
            return cls()
        if not isinstance(raw, Mapping):
            raise FilterError(f"{where}: expected an object, got {type(raw).__name__}")
        unknown = sorted(set(raw) - set(FILTER_FIELDS))
        if unknown:
            raise FilterError(f"{where}: unknown field(s) {unknown}; expected some of {list(FILTER_FIELDS)}")
        categories = []
        for field, column in CATEGORY_FILTERS.items():
            if field not in raw:
                continue
            values = raw[field]
            if isinstance(values, str):
                values = [values]
            if not isinstance(values, list) or not values or not all(isinstance(v, str) for v in values):
                raise FilterError(f"{where}.{field}: expected a non-empty list of strings")
            categories.append((column, frozenset(values)))
        prices = {}
        for field in ("price_min", "price_max"):
            value = raw.get(field)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value):
                raise FilterError(f"{where}.{field}: expected a finite number, got {value!r}")
            prices[field] = float(value)
        if "price_min" in prices and "price_max" in prices and prices["price_min"] > prices["price_max"]:
            raise FilterError(f"{where}: price_min {prices['price_min']} > price_max {prices['price_max']}")
        return cls(tuple(categories), prices.get("price_min"), prices.get("price_max"))


class MaskSummary:
    """What a search needs of a row mask besides the mask: how many rows it allows, the packed bitmap faiss' id
    selector reads (packed on first use), and what serving.ivf_lists learns of it: the mask's allowed rows per IVF
    list (`per_list`, set there) and, for a mask of one column's values, those values (`values`: the column's codes
    and the codes allowed) and the rows taken out of them (`without`: a version's excluded rows), from which it
    counts them. At 10M rows the count and the bitmap take ~0.8 ms each, so a cached mask's are kept with it."""

    def __init__(self, count: int):
        self.count = count
        self._bitmap: np.ndarray | None = None
        self.values: tuple[np.ndarray, np.ndarray] | None = None
        self.without: np.ndarray | None = None
        self.per_list: tuple[Any, np.ndarray] | None = None  # (the IVF lists counted by, allowed rows in each)

    def bitmap(self, mask: np.ndarray) -> np.ndarray:
        if self._bitmap is None:
            self._bitmap = np.packbits(mask, bitorder="little")
        return self._bitmap


class KeptMasks(Generic[Key]):
    """Recently used read-only masks by key (the least recently used let go past `kept`), each with its summary,
    found by the mask itself (its id: unique while the mask is kept). Thread-safe: searches run in worker threads.
    Used for filters' masks (FilterColumns) and for them without a version's removed rows (serving.catalog)."""

    def __init__(self, kept: int):
        self.kept = max(0, kept)
        self._masks: OrderedDict[Key, tuple[np.ndarray, tuple[Any, ...]]] = OrderedDict()
        self._summaries: dict[int, MaskSummary] = {}  # id of a kept mask -> its summary, dropped with it
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._masks)

    def get(self, key: Key) -> np.ndarray | None:
        with self._lock:
            kept = self._masks.get(key)
            if kept is None:
                return None
            self._masks.move_to_end(key)
            return kept[0]

    def put(self, key: Key, mask: np.ndarray, *alive: Any) -> np.ndarray:
        """Keep `mask` (made read-only and counted) under `key`, with `alive` (objects to keep alive as long as it:
        what an id key stands for). Returns it."""
        mask.flags.writeable = False
        summary = MaskSummary(int(np.count_nonzero(mask)))
        with self._lock:
            replaced = self._masks.pop(key, None)  # built by another request meanwhile
            if replaced is not None:
                del self._summaries[id(replaced[0])]
            self._masks[key], self._summaries[id(mask)] = (mask, alive), summary
            while len(self._masks) > self.kept:
                _, (evicted, _) = self._masks.popitem(last=False)
                del self._summaries[id(evicted)]
        return mask

    def summary(self, mask: np.ndarray) -> MaskSummary | None:
        """The summary of `mask` if it is one this keeps."""
        with self._lock:
            return self._summaries.get(id(mask))


class FilterColumns:
    """The metadata columns filters look at, as arrays (built once per index version)."""

    def __init__(self, items: Mapping[str, Sequence[str]], mask_cache_bytes: int = MASK_CACHE_BYTES):
        table = items if isinstance(items, ItemTable) else ItemTable.from_columns(items)
        n = table.rows
        self.n = n
        self._masks: KeptMasks[Filters] = KeptMasks(mask_cache_bytes // max(1, n))
        # Each category column as (sorted distinct values, integer code per row; the table's own encoding,
        # memory-mapped): a filter becomes a lookup table indexed by code, ~50x cheaper per request than
        # comparing strings row by row.
        self._columns: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for column in CATEGORY_FILTERS.values():
            if column in table:
                self._columns[column] = (np.asarray(table[column].distinct(), dtype=object), table[column].codes)
        # Prices as the table encodes them: each distinct price once, and the mapped codes. A float64 per row was 76
        # MiB of the retriever's own memory at 10M articles, rebuilt by every swap to an addition (tracemalloc,
        # 2026-12-01), and the same NaN-filled array where the catalogue has no prices. A price filter's mask now
        # costs a gather by code: 0.32 ms at 105k rows (0.04 comparing a float per row), 21 ms at 10M (13), once per
        # filter (the masks are kept: `mask`); one thread, 100k distinct prices, microbenchmark.
        self._prices: tuple[np.ndarray, np.ndarray] | None = None
        if "price" in table:
            distinct = np.asarray([float(p) if p else np.nan for p in table["price"].distinct()], dtype=np.float64)
            self._prices = distinct, table["price"].codes
        # product type code per row (the diversity cap groups by it)
        self.product_type = (
            self._columns["product_type_name"][1]
            if "product_type_name" in self._columns
            else np.zeros(n, dtype=np.int64)
        )

    def has(self, column: str) -> bool:
        return column in self._columns

    def values(self, column: str) -> list[str]:
        return [str(v) for v in self._columns[column][0]]

    def row_prices(self) -> np.ndarray:
        """float64 [N]: each row's price, NaN where it has none (built on each call: for offline tools)."""
        if self._prices is None:
            return np.full(self.n, np.nan)
        distinct, codes = self._prices
        return distinct[codes]

    def mask(self, filters: Filters) -> np.ndarray:
        """bool [N], read-only: the rows `filters` let through (recent filters' masks are reused)."""
        cached = self._masks.get(filters)
        if cached is not None:
            return cached
        mask = self._masks.put(filters, self._build_mask(filters))
        summary = self._masks.summary(mask)
        if summary is not None and len(filters.categories) == 1 and filters.price_min is filters.price_max is None:
            summary.values = self._accepted_codes(*filters.categories[0])  # what serving.ivf_lists counts per list
        return mask

    def caches(self, mask: np.ndarray) -> bool:
        """`mask` is one this keeps (a request's filters): the same object until it is let go."""
        return self._masks.summary(mask) is not None

    def summary(self, mask: np.ndarray) -> MaskSummary:
        """The mask's count and bitmap: kept for a mask this caches (a request's filters, nothing taken out), made
        for any other."""
        kept = self._masks.summary(mask)
        return kept if kept is not None else MaskSummary(int(np.count_nonzero(mask)))

    def _accepted_codes(self, column: str, accepted: frozenset[str]) -> tuple[np.ndarray, np.ndarray]:
        """(the column's code per row, the codes of the `accepted` values)."""
        if column not in self._columns:
            raise FilterError(f"this index has no {column} metadata to filter on")
        values, codes = self._columns[column]
        return codes, np.flatnonzero(np.isin(values, list(accepted)))

    def _build_mask(self, filters: Filters) -> np.ndarray:
        keep = np.ones(self.n, dtype=bool)
        for column, accepted in filters.categories:
            codes, wanted = self._accepted_codes(column, accepted)
            keep &= rows_with_codes(codes, wanted, len(self._columns[column][0]))
        if filters.price_min is not None or filters.price_max is not None:
            # Compared once per distinct price; articles without a price (NaN) never match a price filter.
            if self._prices is None:
                return np.zeros(self.n, dtype=bool)
            distinct, codes = self._prices
            inside = np.ones(len(distinct), dtype=bool)
            if filters.price_min is not None:
                inside &= distinct >= filters.price_min
            if filters.price_max is not None:
                inside &= distinct <= filters.price_max
            keep &= rows_with_codes(codes, np.flatnonzero(inside), len(distinct))
        return keep


def rows_with_codes(codes: np.ndarray, wanted: np.ndarray, n_values: int) -> np.ndarray:
    """bool [N]: the rows whose code is one of `wanted` (codes of a column with `n_values` distinct values)."""
    if len(wanted) > MAX_CODE_COMPARISONS:
        table = np.zeros(n_values, dtype=bool)
        table[wanted] = True
        return table[codes]
    keep = np.zeros(len(codes), dtype=bool)
    for code in wanted.tolist():
        keep |= codes == code
    return keep
