"""Add, change or remove catalogue articles without retraining: publish the next index version.

    python -m export.update --index-dir artifacts/index --articles new_articles.csv --triton 127.0.0.1:8000
    python -m export.update --index-dir artifacts/index --remove sold_out.txt
    python -m export.update --index-dir artifacts/index --articles new_season.csv --vectors runs/embedding

The articles file has the H&M articles.csv schema and holds only the delta (new or changed rows,
optionally a `price` column). Captions are embedded by the item tower Triton serves (--triton) or,
offline, by the same TorchScript file from the model repository (--model-repository), or were embedded
beforehand in shards (--vectors: the directory `python -m export.embed` filled for this articles file); removals
alone need none of them. The new
version is written beside the served one and published through CURRENT; a retriever watching the
index root swaps to it without restart (or call POST /admin/index/reload).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from export.catalogue_update import add_embedder_arguments, embedder_from_arguments, read_removals, update_catalogue
from export.embedding_shards import precomputed_embedder
from export.versions import prune
from serving.towers import TritonUnavailable
from twotower.artifacts import ArtifactError
from twotower.data.hm import DataFormatError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--index-dir", type=Path, default=Path("artifacts/index"), help="the index root (holds CURRENT)"
    )
    parser.add_argument("--articles", type=Path, help="H&M-format articles file with only new/changed articles")
    parser.add_argument("--remove", type=Path, help="file with one article_id per line to exclude from results")
    add_embedder_arguments(parser, required=False).add_argument(
        "--vectors", type=Path, help="the finished directory of python -m export.embed over this articles file"
    )
    parser.add_argument(
        "--keep-versions",
        type=int,
        default=0,
        metavar="N",
        help="after publishing, remove all but CURRENT and the N newest versions (python -m export.versions; "
        "0, the default: keep every version)",
    )
    args = parser.parse_args(argv)
    if args.keep_versions < 0:
        parser.error("--keep-versions: 0 (keep all) or more")
    if args.articles and not (args.triton or args.model_repository or args.vectors):
        parser.error("--articles needs the item tower: --triton, --model-repository or --vectors")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        removals = read_removals(args.remove) if args.remove else []
        embedder_for = precomputed_embedder(args.vectors) if args.vectors else embedder_from_arguments(args)
        summary = update_catalogue(args.index_dir, embedder_for, args.articles, removals)
    except (ArtifactError, DataFormatError, FileNotFoundError, FileExistsError, TritonUnavailable, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(
        f"published {summary.index_version} (parent {summary.parent_version}): {summary.added} added, "
        f"{summary.changed} changed, {summary.removed} removed, {summary.items} rows, {summary.seconds:.1f}s"
    )
    if args.keep_versions:
        # The update is published whatever happens here: failing the Job would make it retry the delta (a second
        # version of the same change), so a prune that fails is a warning, and the next update's prune retries.
        try:
            pruned = prune(args.index_dir, args.keep_versions)
            print(f"pruned {', '.join(pruned)}" if pruned else "pruned nothing (every version is kept)")
        except (ArtifactError, OSError, ValueError) as err:
            print(
                f"warning: {summary.index_version} is published, but pruning old versions failed: {err}",
                file=sys.stderr,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
