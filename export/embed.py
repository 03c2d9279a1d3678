"""Embed an articles file in shards, resumably, for `python -m export.update --vectors`.

    python -m export.embed --index-dir artifacts/index --articles new_season.csv --out runs/embedding \
        --triton 127.0.0.1:8000 --shards 8 --shard 3
    python -m export.update --index-dir artifacts/index --articles new_season.csv --vectors runs/embedding

Each shard is an independent process (k8s/jobs/catalogue-embed.yaml runs one per pod of an Indexed Job,
`--shard $(JOB_COMPLETION_INDEX)`); without --shard this process embeds every shard in turn. A shard run
again skips what it already wrote (export/embedding_shards.py). The item tower is the one the index root's
CURRENT version names, served by Triton (--triton) or run in this process (--model-repository).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from export.catalogue_update import add_embedder_arguments, embedder_from_arguments
from export.embedding_shards import CHUNK_ROWS, EmbeddingPlan, embed_shard
from serving.towers import TritonUnavailable
from twotower import artifacts
from twotower.artifacts import ArtifactError
from twotower.data.hm import DataFormatError, build_captions, load_articles


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--index-dir", type=Path, default=Path("artifacts/index"), help="the index root (holds CURRENT)"
    )
    parser.add_argument("--articles", type=Path, required=True, help="H&M-format articles file to embed")
    parser.add_argument("--out", type=Path, required=True, help="the embedding directory (shared by all shards)")
    parser.add_argument("--shards", type=int, default=1, help="how many shards the articles are cut into")
    parser.add_argument("--shard", type=int, default=None, help="the one shard to embed (default: all, in turn)")
    parser.add_argument("--chunk-rows", type=int, default=CHUNK_ROWS, help="rows per file: the unit of resuming")
    add_embedder_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        manifest = artifacts.read_manifest(artifacts.resolve_index_dir(args.index_dir))
        captions = build_captions(load_articles(args.articles))
        plan = EmbeddingPlan.for_captions(captions, manifest, args.shards, args.chunk_rows)
        shards = range(plan.shards) if args.shard is None else [args.shard]
        plan.shard_rows(shards[0])  # an out-of-range --shard fails before Triton is asked anything
        embed = embedder_from_arguments(args)(manifest)
        for shard in shards:
            summary = embed_shard(args.out, plan, captions, shard, embed)
            print(
                f"shard {summary.shard}/{plan.shards}: {summary.rows} rows, {summary.embedded} embedded now, "
                f"{summary.resumed} already done, {summary.seconds:.1f}s"
            )
    except (ArtifactError, DataFormatError, FileNotFoundError, TritonUnavailable, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
