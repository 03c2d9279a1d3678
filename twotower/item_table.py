"""Article metadata as memory-mapped columns: the `items/` directory of an index version.

Each column is dictionary-encoded in two .npy files, both opened with mmap_mode="r":
    items/<column>.values.npy  the column's distinct values, sorted, UTF-8 in fixed-width bytes (numpy "S")
    items/<column>.codes.npy   int32 [N]: row i holds values[codes[i]]
A catalogue of 10M articles then costs the retriever no Python string per article: a row's metadata is
read from the page cache when it is returned, filters compare codes, and an article id is found by a
binary search of the sorted ids. Fixed-width bytes suit these columns (ids, codes, names of at most a
few dozen characters); a long free-text column would want Arrow-style offsets instead.

`ItemTable.from_columns` builds the same table in memory from lists (the older `items.json`, a
catalogue update, tests). Numpy only: the retriever imports this without torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Mapping, Sequence, overload

import numpy as np

ID_COLUMN = "article_id"
DECODED_LIMIT = 65_536  # distinct values a column keeps decoded in memory


def _encode(values: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(sorted distinct values as fixed-width UTF-8 bytes, int32 code per row)."""
    encoded = np.asarray([str(v).encode() for v in values], dtype=bytes)
    if encoded.dtype.itemsize == 0:  # every value empty: numpy cannot make an S0 array
        encoded = encoded.astype("S1")
    distinct, codes = np.unique(encoded, return_inverse=True)
    return distinct, codes.astype(np.int32).reshape(-1)


class Column(Sequence[str]):
    """One dictionary-encoded column, read as a sequence of str (row -> value)."""

    def __init__(self, values: np.ndarray, codes: np.ndarray):
        # Plain ndarray views of the mapped files: indexing an np.memmap goes through Python (~1 us a call).
        self.values = np.asarray(values)  # sorted distinct values (bytes)
        self.codes = np.asarray(codes)  # int32 [N]
        # Category-like columns (colours, types: a few hundred values) are decoded once; per-article ones
        # (ids, names: up to one value per row) are decoded when read.
        self._decoded = self.distinct() if len(values) <= DECODED_LIMIT else None

    def __len__(self) -> int:
        return len(self.codes)

    @overload
    def __getitem__(self, row: int) -> str: ...

    @overload
    def __getitem__(self, row: slice) -> list[str]: ...

    def __getitem__(self, row: int | slice) -> str | list[str]:
        if isinstance(row, slice):
            return self.take(row)
        if self._decoded is not None:
            return self._decoded[self.codes[row]]
        return bytes(self.values[self.codes[row]]).decode()

    def appended(self, values: Sequence[str]) -> "Column":
        """This column with `values` as rows after its own: the dictionaries merged, no existing row decoded (a
        catalogue update at 10M articles; the same column as encoding every row again)."""
        if not len(values):
            return self
        distinct, codes = _encode(values)
        width = f"S{max(self.values.dtype.itemsize, distinct.dtype.itemsize)}"
        own, added = self.values.astype(width), distinct.astype(width)
        merged = np.union1d(own, added)
        moved, placed = (np.searchsorted(merged, values).astype(np.int32) for values in (own, added))
        return Column(merged, np.concatenate([moved[self.codes], placed[codes]]))

    def take(self, rows: np.ndarray | slice) -> list[str]:
        """The values of many rows, their codes gathered at once (one by one, each row costs ~1.3 us)."""
        codes = self.codes[rows]
        if self._decoded is not None:
            decoded = self._decoded
            return [decoded[c] for c in codes.tolist()]
        return [bytes(v).decode() for v in self.values[codes]]

    def __iter__(self) -> Iterator[str]:
        for start in range(0, len(self.codes), 65_536):
            yield from self[start : start + 65_536]

    def distinct(self) -> list[str]:
        """The distinct values in code order (sorted)."""
        return [bytes(v).decode() for v in self.values]


class ArticleRows(Mapping[str, int]):
    """article_id -> its current row, by binary search of the sorted ids: when an id has several rows (a
    changed article is appended and its old row excluded), the last one."""

    def __init__(self, ids: Column):
        self._ids = ids
        codes = np.asarray(ids.codes)
        self._last_row = np.empty(len(ids.values), dtype=np.int32)  # half of int64's 80 MB at 10M articles
        if len(ids.values) == len(codes):  # every id once: the codes are a permutation
            self._last_row[codes] = np.arange(len(codes), dtype=np.int32)
        else:  # the last row of each id: the end of its run in a stable sort by code
            order = np.argsort(codes, kind="stable")
            ends = np.append(np.flatnonzero(np.diff(codes[order])), len(order) - 1)
            self._last_row[codes[order[ends]]] = order[ends]

    def rows(self, article_ids: Sequence[str]) -> np.ndarray:
        """int64 rows of many ids in one binary search (-1 where unknown): a 50-article history costs
        ~10 us instead of 50 lookups."""
        values = self._ids.values
        keys = np.asarray([a.encode() for a in article_ids], dtype=bytes)
        if not len(keys) or not len(values):
            return np.full(len(keys), -1, dtype=np.int64)
        codes = np.minimum(np.searchsorted(values, keys.astype(values.dtype)), len(values) - 1)
        # a key longer than every id would be truncated by the astype above into a false match
        found = (values[codes] == keys) & (np.char.str_len(keys) <= values.dtype.itemsize)
        return np.where(found, self._last_row[codes], -1).astype(np.int64)

    def __getitem__(self, article_id: str) -> int:
        row = int(self.rows([article_id])[0]) if isinstance(article_id, str) else -1
        if row < 0:
            raise KeyError(article_id)
        return row

    def __contains__(self, article_id: object) -> bool:
        return isinstance(article_id, str) and self.rows([article_id])[0] >= 0

    def __iter__(self) -> Iterator[str]:
        return iter(self._ids.distinct())

    def __len__(self) -> int:
        return len(self._ids.values)


class ItemTable(Mapping[str, Column]):
    """The metadata columns of one index version, row i = FAISS id i; always has `article_id`."""

    def __init__(self, columns: dict[str, Column]):
        if ID_COLUMN not in columns:
            raise ValueError(f"item metadata has no {ID_COLUMN} column")
        lengths = {name: len(column) for name, column in columns.items()}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"item metadata columns differ in length: {lengths}")
        self._columns = columns
        self.article_ids = columns[ID_COLUMN]
        self.row_of = ArticleRows(self.article_ids)

    @classmethod
    def from_columns(cls, columns: Mapping[str, Sequence[str]]) -> "ItemTable":
        return cls({name: Column(*_encode(values)) for name, values in columns.items()})

    @classmethod
    def load(cls, directory: Path, names: list[str]) -> "ItemTable":
        """The columns `names` (as listed in a manifest: "<column>.values.npy", "<column>.codes.npy")."""
        columns = sorted({name.rsplit(".", 2)[0] for name in names})
        return cls(
            {
                column: Column(
                    np.load(directory / f"{column}.values.npy", mmap_mode="r"),
                    np.load(directory / f"{column}.codes.npy", mmap_mode="r"),
                )
                for column in columns
            }
        )

    def __getitem__(self, column: str) -> Column:
        return self._columns[column]

    def __iter__(self) -> Iterator[str]:
        return iter(self._columns)

    def __len__(self) -> int:
        return len(self._columns)

    @property
    def rows(self) -> int:
        return len(self.article_ids)

    def records(self, rows: Sequence[int] | np.ndarray, skip: str = ID_COLUMN) -> list[dict[str, str]]:
        """Each row's values by column (but `skip`), a new dict per row, read a column at a time: a page of 12
        H&M rows (11 columns, ids included) took 0.17 ms row by row (numpy scalar indexing), 0.06 so."""
        index = np.asarray(rows, dtype=np.int64)
        records: list[dict[str, str]] = [{} for _ in range(len(index))]  # one per row, even with no column
        for name, column in self._columns.items():
            if name != skip:
                for record, value in zip(records, column.take(index)):
                    record[name] = value
        return records

    def to_lists(self) -> dict[str, list[str]]:
        return {name: list(column) for name, column in self._columns.items()}

    def appended(self, columns: Mapping[str, Sequence[str]], rows: int) -> "ItemTable":
        """This table with `rows` more rows: each column's from `columns`, "" where it has none (columns it lacks
        are not added)."""
        return ItemTable(
            {name: column.appended(columns.get(name, [""] * rows)) for name, column in self._columns.items()}
        )


def write(directory: Path, columns: Mapping[str, Sequence[str]]) -> list[str]:
    """Write the columns into `directory` (created); returns the file names written, relative to it."""
    directory.mkdir(parents=True, exist_ok=True)
    table = columns if isinstance(columns, ItemTable) else ItemTable.from_columns(columns)
    names = []
    for name, column in table.items():
        if "/" in name or name.startswith("."):
            raise ValueError(f"metadata column name {name!r} cannot be a file name")
        np.save(directory / f"{name}.values.npy", np.asarray(column.values))
        np.save(directory / f"{name}.codes.npy", np.asarray(column.codes))
        names += [f"{name}.values.npy", f"{name}.codes.npy"]
    return names
