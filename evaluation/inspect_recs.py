"""Print a few customers' history captions beside their recommended captions, to judge by eye.

    python -m evaluation.inspect_recs --data-dir ../shared/data/hm_lastweek \
        --index-dir artifacts/index --model-repository model_repository --customers 5

Uses the same split and the same served artifacts as the evaluation; items the customer then
bought on the target day are marked with `*`, their own earlier purchases recommended again with `+`,
other colours of products they bought with `~`.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from pathlib import Path

import numpy as np

from evaluation.split import temporal_split
from evaluation.two_tower import TwoTower, case_users
from serving.catalog import Catalog
from twotower import triton_repository
from twotower.data.hm import build_captions, load_hm_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", required=True, type=Path)
    parser.add_argument("--index-dir", default=Path("artifacts/index"), type=Path)
    parser.add_argument("--model-repository", default=Path("model_repository"), type=Path)
    parser.add_argument("--cutoff", default="")
    parser.add_argument("--history-days", type=int, default=6)
    parser.add_argument("--customers", type=int, default=5)
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    data = load_hm_dir(args.data_dir)
    split = temporal_split(data, args.cutoff, args.history_days)
    catalog = Catalog(args.index_dir)
    user_tower = triton_repository.load_tower(args.model_repository, catalog.manifest, catalog.manifest.user_model)
    ranker = TwoTower(case_users(split, catalog, user_tower), catalog)
    captions = build_captions(data.articles)
    histories = split.histories(catalog.manifest.max_history)
    picks = np.random.default_rng(args.seed).choice(
        len(split.customers), min(args.customers, len(split.customers)), replace=False
    )
    width = 60
    for case in picks:
        history = [r for r in histories.rows[case] if r >= 0]
        recommended = ranker.rank(int(case), args.k)
        siblings = (
            set(catalog.products.siblings(np.asarray(history), np.zeros(len(history)))[0].tolist())
            if catalog.products is not None
            else set()
        )
        print(
            f"\n=== customer {split.customers[case][:16]}...  ({len(history)} purchases before {split.cutoff.date()}, "
            f"{len(split.targets[case])} on the target day)"
        )
        print(
            f"{'history (most recent first)':<{width}} | recommended (* = bought on the target day, + = bought before, "
            "~ = another colour of a product bought before)"
        )
        for i in range(max(len(history[: args.k]), len(recommended))):
            left = textwrap.shorten(captions[history[i]], width) if i < len(history[: args.k]) else ""
            right = ""
            if i < len(recommended):
                row = recommended[i]
                mark = ("*" if row in split.targets[case] else " ") + (
                    "+" if row in history else "~" if row in siblings else " "
                )
                right = f"{mark} {textwrap.shorten(captions[recommended[i]], width)}"
            print(f"{left:<{width}} | {right}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
