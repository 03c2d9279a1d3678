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
from pathlib import Path
from typing import Any, Iterator


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


def sha256_file(path: Path | str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
