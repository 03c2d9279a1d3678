"""Which export a benchmark measures, and where the H&M data sits: one place for both.

A benchmark measures make eval's export (runs/hm-eval: the trained model) when there is one, else make bench's
(runs/bench), which a checkout with neither builds first (benchmarks.offline.prepare_artifacts, as `make bench`
does without a trained run: a 60-step model; ~15-30 minutes on 2 cores for H&M's captions). Before, a clean
clone's `make bench-scale` drew random vectors (recall@10 0.32 at 1M, no served rows) and then failed, and `make
gpu-check` stopped at the missing index (2026-12-02). No torch here: benchmarks.scale's and lexical_scale's worker
processes import their modules, and this with them.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from twotower import artifacts

log = logging.getLogger("benchmarks.references")

HM_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "hm_lastweek"
BENCH_WORK = Path("runs/bench")  # make bench's artifacts (its --work-dir default)
EVAL_WORK = Path("runs/hm-eval")  # make eval's
INDEX_DIR, MODEL_REPOSITORY = "index", "model_repository"  # an export's two outputs, side by side in its work dir


def default_data_dir() -> Path | None:
    """The H&M data beside this checkout (../shared/data/hm_lastweek), None where it is absent."""
    return HM_DIR if (HM_DIR / "articles.csv.gz").is_file() else None


def existing_export() -> Path | None:
    """The index root of make eval's export, else make bench's; None where neither was written."""
    for work in (EVAL_WORK, BENCH_WORK):
        if (work / INDEX_DIR / artifacts.CURRENT_FILE).is_file():
            return work / INDEX_DIR
    return None


def export_to_measure(data_dir: Path | None = None) -> Path:
    """`existing_export()`, or make bench's built first from `data_dir` (default the H&M data beside the checkout,
    else a synthetic shop)."""
    found = existing_export()
    if found is not None:
        return found
    from benchmarks import offline  # torch: only where a model must be trained

    data_dir = data_dir or default_data_dir()
    log.warning(
        "no make eval or make bench export to measure: building make bench's in %s first (a 60-step model of %s)",
        BENCH_WORK,
        data_dir or "a synthetic shop",
    )
    return offline.prepare_artifacts(data_dir, BENCH_WORK).index_dir


def repository_path(index_dir: Path) -> Path:
    """Where an export writes its Triton model repository: beside the index root of `index_dir` (a root or a
    version)."""
    return artifacts.resolve_index_dir(index_dir).resolve().parent.parent / MODEL_REPOSITORY


def repository_beside(index_dir: Path) -> Path:
    """`repository_path(index_dir)`, a clear exit where there is none."""
    repository = repository_path(index_dir)
    if not repository.is_dir():
        raise SystemExit(f"{repository}: no model repository beside {index_dir}'s index root; pass --model-repository")
    return repository


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--index-dir",
        type=Path,
        default=None,
        help="index root or version (default: make eval's export, else make bench's, built first where neither exists)",
    )
    parser.add_argument(
        "--model-repository", type=Path, default=None, help="its Triton repository (default: beside the index root)"
    )


def export_arguments(args: argparse.Namespace) -> tuple[Path, Path]:
    """(index dir, model repository) from `add_export_arguments`' flags and their defaults."""
    index_dir = args.index_dir or export_to_measure()
    return index_dir, args.model_repository or repository_beside(index_dir)
