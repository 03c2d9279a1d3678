"""Offline evaluation on a temporal split, two-tower (served artifacts) vs baselines.

    python -m evaluation --data-dir ../shared/data/hm_lastweek \
        --index-dir artifacts/index --model-repository model_repository --out reports/hm_lastweek

Default protocol: the last day of the data is the target, the 6 days before it the history; only
customers with purchases in both count. All articles are candidates. Writes eval.json, eval.md and
eval.png into --out. Train the model with `--until <cutoff>` so the target day stays unseen.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from pathlib import Path

from evaluation.evaluate import evaluate
from evaluation.report import write_reports
from evaluation.split import temporal_split
from twotower.data.hm import load_hm_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", required=True, type=Path)
    parser.add_argument("--index-dir", default=Path("artifacts/index"), type=Path)
    parser.add_argument("--model-repository", default=Path("model_repository"), type=Path)
    parser.add_argument("--cutoff", default="", help="first target day, YYYY-MM-DD; default: the last day of the data")
    parser.add_argument("--history-days", type=int, default=6)
    parser.add_argument("--target-days", type=int, default=1)
    parser.add_argument("--out", default=Path("reports/eval"), type=Path)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    data = load_hm_dir(args.data_dir)
    split = temporal_split(data, args.cutoff, args.history_days, args.target_days)
    logging.getLogger("evaluation").info("%s", split.describe())
    command = "python -m evaluation " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    result = evaluate(data, split, args.index_dir, args.model_repository, command)
    for path in write_reports(args.out, result):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
