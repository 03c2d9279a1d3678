"""Files and directories written so that a reader never sees half of one: the one place for write-then-rename.

Every on-disk contract (run directory, index versions and CURRENT, the Triton repository, reports)
writes through these: a file goes to a temporary sibling and is renamed over its name; a directory is
filled as a hidden `.<name>.partial-*` sibling and renamed into place, or removed if filling fails.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np


def write_atomically(path: Path | str, data: str | bytes) -> None:
    """Replace `path` with `data` in one rename: readers see the old content or the new, never a part."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    if isinstance(data, str):
        tmp.write_text(data)
    else:
        tmp.write_bytes(data)
    os.replace(tmp, path)


def write_json(path: Path | str, payload: Any) -> None:
    """JSON (indented, sorted keys) written atomically."""
    write_atomically(path, json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n")


@contextlib.contextmanager
def staged_directory(target: Path | str, replace: bool = False) -> Iterator[Path]:
    """A temporary sibling of `target` to fill; renamed to `target` when the block ends without error,
    removed otherwise. An existing `target` is an error unless `replace` (then it is removed first)."""
    target = Path(target)
    if target.exists() and not replace:
        raise FileExistsError(f"{target} exists")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        yield staging
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def link_or_copy(source: Path | str, target: Path | str) -> bool:
    """`target` becomes another name of `source` (a hard link: one file, one set of pages in the page cache), or
    a copy where the volume refuses links (another file system, no link support). True when linked."""
    try:
        os.link(source, target)
        return True
    except OSError:
        shutil.copy2(source, target)
        return False


def save_rows(
    path: Path | str, blocks: Sequence[np.ndarray | RowBlocks], dtype: str, chunk_rows: int = 1 << 18
) -> None:
    """One .npy file of the blocks' rows, one block after the other, in `dtype`, written a chunk at a time: a
    memory-mapped block is copied without ever being in the process's own memory at once."""
    rows = sum(len(block) for block in blocks)
    out = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=(rows, *blocks[0].shape[1:]))
    start = 0
    for block in blocks:
        for offset in range(0, len(block), chunk_rows):
            chunk = block[offset : offset + chunk_rows]
            out[start : start + len(chunk)] = chunk
            start += len(chunk)
    out.flush()
    del out


class RowBlocks:
    """Row blocks (memory-mapped arrays of one dtype and row shape) read as one array of their rows, one block after
    the other: a catalogue update appends its new articles' vectors as a block beside the parent's file instead
    of rewriting every row (at 10M articles, 2.4 GB of float16). Indexing by an int, a slice or an int array of any
    shape (a gather) returns what indexing the concatenation would; np.asarray builds the concatenation."""

    def __init__(self, blocks: Sequence[np.ndarray]):
        if not blocks:
            raise ValueError("no row blocks")
        first = blocks[0]
        for block in blocks[1:]:
            if block.dtype != first.dtype or block.shape[1:] != first.shape[1:]:
                raise ValueError(
                    f"row blocks differ: {block.dtype} {block.shape[1:]} after {first.dtype} {first.shape[1:]}"
                )
        self.blocks = list(blocks)
        self.ends = np.cumsum([len(block) for block in self.blocks])
        self.starts = self.ends - [len(block) for block in self.blocks]
        self.dtype = first.dtype
        self.shape = (int(self.ends[-1]), *first.shape[1:])
        self.ndim = len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows: int | np.integer | slice | np.ndarray) -> np.ndarray:
        if isinstance(rows, slice):
            start, stop, step = rows.indices(len(self))
            if step > 0 and stop <= self.ends[0]:  # within the first block: a view, as numpy's
                return self.blocks[0][start:stop:step]
            rows = np.arange(start, stop, step)
        if isinstance(rows, tuple):
            raise TypeError("RowBlocks takes row numbers (an int, a slice or an int array), not a tuple of axes")
        wanted = np.asarray(rows)
        if wanted.size == 0:
            return np.empty(wanted.shape + self.shape[1:], dtype=self.dtype)
        if not np.issubdtype(wanted.dtype, np.integer):  # numpy refuses floats and masks alike
            raise IndexError(f"RowBlocks takes row numbers, not {wanted.dtype} values")
        wanted = wanted.astype(np.int64, copy=False)
        if wanted.min() < 0:
            wanted = np.where(wanted < 0, wanted + len(self), wanted)
        low, high = int(wanted.min()), int(wanted.max())
        if low < 0 or high >= len(self):
            raise IndexError(f"row out of range for {len(self)} rows")
        if high < self.ends[0]:
            # Rows of the first block only, the common case (updates add few rows): one gather, as from one array.
            # Split by block, a gather of 2,400 of 10M float16 rows took 0.86 ms against 0.65 from one array; this
            # way 0.61 against 0.57 (one thread, 300 gathers, the second of two rounds, 2026-12-01).
            return self.blocks[0][wanted]
        which = np.searchsorted(self.ends, wanted, side="right")
        if wanted.ndim == 0:
            return self.blocks[int(which)][int(wanted - self.starts[which])]
        out = np.empty(wanted.shape + self.shape[1:], dtype=self.dtype)
        for block in np.unique(which):  # a gather per block its rows fall in: most in the first
            chosen = which == block
            out[chosen] = self.blocks[block][wanted[chosen] - self.starts[block]]
        return out

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        if copy is False:
            raise ValueError("the rows of several blocks cannot be one array without a copy")
        whole = np.concatenate(self.blocks)
        return whole if dtype is None else whole.astype(dtype, copy=False)


# Item vectors as the catalogue holds them: one array, or a version's row blocks
VectorRows = np.ndarray | RowBlocks


def drop_from_page_cache(path: Path | str) -> None:
    """Write back `path`'s dirty pages and drop its cached pages that no process maps (posix_fadvise DONTNEED):
    for a file whose content a process has read into its own memory."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def sha256_file(path: Path | str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_npz_mapped(path: Path | str) -> dict[str, np.ndarray]:
    """The arrays of an .npz file written by `np.savez` (stored, not compressed), memory-mapped read-only
    where a member is a plain numeric array (np.load cannot map an archive's members); the others read."""
    mapped: dict[str, np.ndarray] = {}
    with zipfile.ZipFile(path) as archive, open(path, "rb") as raw:
        for info in archive.infolist():
            name = info.filename.removesuffix(".npy")
            if info.compress_type != zipfile.ZIP_STORED:
                mapped[name] = np.load(archive.open(info))
                continue
            raw.seek(info.header_offset)
            local = raw.read(30)  # the local file header: its name and extra field lengths at bytes 26..29
            raw.seek(
                info.header_offset
                + 30
                + int.from_bytes(local[26:28], "little")
                + int.from_bytes(local[28:30], "little")
            )
            version = np.lib.format.read_magic(raw)
            header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
            if version not in header:
                mapped[name] = np.load(archive.open(info), allow_pickle=False)
                continue
            shape, fortran, dtype = header[version](raw)
            if dtype.hasobject:
                mapped[name] = np.load(archive.open(info), allow_pickle=False)
                continue
            mapped[name] = np.memmap(
                path, dtype=dtype, mode="r", offset=raw.tell(), shape=shape, order="F" if fortran else "C"
            )
    return mapped
