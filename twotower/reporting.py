"""Writing a measured result as JSON (for machines), markdown (for people) and a PNG (for a glance)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from twotower.files import write_json


def write_bundle(
    out_dir: Path,
    stem: str,
    result: dict[str, Any],
    markdown: Callable[[dict[str, Any]], str],
    plot: Callable[[dict[str, Any], Path], None],
) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{stem}.json", out_dir / f"{stem}.md", out_dir / f"{stem}.png"]
    write_json(paths[0], result)
    paths[1].write_text(markdown(result))
    plot(result, paths[2])
    return paths
