"""Harness, not served: refit the second stage with this checkout's code and rank the evaluation day with it.

    python -m evaluation.stage_harness --data-dir ../shared/data/hm_lastweek --run runs/hm-eval

Fits `twotower.second_stage` as training does (`fitting.fit_second_stage`, on the training run's held-out day and
customers, rebuilt from its config.json) but with the features and pools of the code checked out now, then ranks
every case of the evaluation day through `ranking.rank` over exact search, as `make eval`'s exact rows do. Prints
recall@12, MAP@12, recall@100 and cold recall@100 of the staged lists, how much of the targets the pools hold,
and each split's targets against the best baseline (paired bootstrap 95% intervals). A feature or pool change can
be measured in ~2 minutes instead of a `make eval` (31 minutes warm); reports/hm_lastweek/model-levers.md has
what it measured. `--cold` also says where the never-sold articles bought on the day rank by the user vector.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from evaluation.baselines import CoPurchase, Mix, Popularity, Repurchase, WithoutOwn
from evaluation.evaluate import customer_groups, group_targets
from evaluation.split import TemporalSplit, temporal_split
from evaluation.two_tower import CaseUsers, case_users
from serving.catalog import Catalog
from twotower import fitting, metrics, ranking, second_stage, triton_repository
from twotower.data.histories import training_examples
from twotower.data.hm import HMData, load_hm_dir
from twotower.popularity import item_bias
from twotower.train import split_examples, training_purchases

log = logging.getLogger("evaluation.stage_harness")


def held_out(data: HMData, run: Path) -> tuple[str, set[str]]:
    """(the held-out day, its customers) of a training run, chosen again as twotower.train chose them."""
    config = json.loads((run / "config.json").read_text())
    train, model = config["train"], config["model"]
    transactions = training_purchases(data.transactions, train["until"], train["unseen_customer_share"])
    row_of = {article_id: i for i, article_id in enumerate(data.article_ids)}
    examples = training_examples(transactions, row_of, model["max_history"], train["earlier_days_only"])
    _, holdout = split_examples(examples, seed=train["seed"])
    ids = pd.unique(transactions["customer_id"])  # training numbers customers in order of first appearance
    day = (pd.Timestamp(0) + pd.Timedelta(days=holdout.day)).strftime("%Y-%m-%d")
    return day, {str(ids[c]) for c in np.unique(holdout.examples.customers)}


class Day:
    """One day's cases, ranked over exact search with the prior and the signals counted before that day."""

    def __init__(self, data: HMData, catalog: Catalog, user_tower: object, cutoff: str) -> None:
        self.split: TemporalSplit = temporal_split(data, cutoff)
        self.cases: CaseUsers = case_users(self.split, catalog, user_tower)  # type: ignore[arg-type]
        before = data.transactions[data.transactions["t_dat"] < self.split.cutoff]
        n = len(self.split.row_of)
        self.space = ranking.ExactItems(
            catalog.vectors,
            item_bias(before, self.split.row_of, n, self.split.cutoff),
            products=catalog.products,
            product_types=catalog.product_types,
            excluded=catalog.excluded,
        )
        self.signals = second_stage.ArticleSignals.count(before, self.split.row_of, n, self.split.cutoff)

    def lists(self, catalog: Catalog, stage: second_stage.SecondStage | None, k: int, exclude: bool = False) -> list:
        requests = [
            ranking.RankRequest(
                k,
                prior=catalog.prior_weight_for(exclude),
                boost=catalog.score_head.repeat,
                bought=pair,
                exclude_bought=exclude,
                stage=stage,
            )
            for pair in self.cases.pairs
        ]
        return [rows for _, rows in ranking.rank(self.space, self.cases.users, requests)]

    def pools(self, catalog: Catalog) -> list[np.ndarray]:
        """Each case's candidates (what the stage orders)."""
        prior, boost = catalog.prior_weight_for(False), catalog.score_head.repeat
        return fitting.stage_pools(self.space, self.cases.users, self.cases.pairs, boost, prior, self.signals)[1]


def cold_ranks(day: Day, catalog: Catalog) -> None:
    """Where each never-sold article bought on the day ranks by its buyer's user vector among all never-sold ones."""
    unsold = np.flatnonzero(day.signals.days_since_first_sale >= second_stage.NEVER)
    bought = [(case, row) for case, rows in enumerate(day.split.targets) for row in rows if row in day.split.cold_rows]
    vectors = catalog.vectors[unsold]
    ranks = np.asarray(
        [
            int((vectors @ day.cases.users[case] > catalog.vectors[row] @ day.cases.users[case]).sum())
            for case, row in bought
        ]
    )
    shares = ", ".join(f"top {k}: {(ranks < k).mean():.3f}" for k in (50, 100, 200, 1000))
    print(f"{len(unsold)} articles never sold before the day; {len(bought)} of them bought on it; by cosine: {shares}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", required=True, type=Path)
    parser.add_argument("--run", required=True, type=Path, help="a make eval run: its index/ and model_repository/")
    parser.add_argument("--cutoff", default="2020-09-22")
    parser.add_argument("--cold", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    data = load_hm_dir(args.data_dir)
    catalog = Catalog(args.run / "index", lexical=False)
    manifest = catalog.manifest
    user_tower = triton_repository.load_tower(args.run / "model_repository", manifest, manifest.user_model)

    fit_day, fit_customers = held_out(data, args.run)
    fitting_on = Day(data, catalog, user_tower, fit_day)
    keep = [i for i, customer in enumerate(fitting_on.split.customers) if customer in fit_customers]
    fit = fitting.fit_second_stage(
        fitting_on.space,
        fitting_on.cases.users[keep],
        [fitting_on.cases.pairs[i] for i in keep],
        [fitting_on.split.targets[i] for i in keep],
        catalog.score_head.repeat,
        catalog.prior_weight_for(False),
        fitting_on.signals,
    )
    if fit is None:
        print("nothing to fit on")
        return 1
    print(f"fitted on {fit_day}, {len(keep)} customers: {fit.candidates} candidates ({fit.bought} bought)")
    print(f"largest weights: {fit.weights.describe()}")

    day = Day(data, catalog, user_tower, args.cutoff)
    stage = second_stage.SecondStage(day.signals, fit.weights)
    targets, cold = day.split.targets, day.split.cold_rows
    staged, discovery = day.lists(catalog, stage, 100), day.lists(catalog, stage, 100, exclude=True)
    with_cold = [i for i, t in enumerate(targets) if t & cold]
    pools = day.pools(catalog)
    print(
        f"recall@12 {metrics.recall_at_k(staged, targets, 12):.4f}  map@12 {metrics.map_at_k(staged, targets, 12):.4f}"
        f"  recall@100 {metrics.recall_at_k(staged, targets, 100):.4f}  cold recall@100 "
        f"{metrics.recall_at_k([staged[i] for i in with_cold], [targets[i] & cold for i in with_cold], 100):.4f}"
        f"  pools: {np.mean([len(p) for p in pools]):.0f} candidates, "
        f"recall {metrics.recall_at_k(pools, targets, 10**6):.4f}"
    )
    repurchase, co_purchase, popularity = Repurchase(day.split), CoPurchase(day.split), Popularity(day.split, days=7)
    baseline = Mix([repurchase, co_purchase, popularity])
    discovery_baseline = WithoutOwn(Mix([co_purchase, popularity]), repurchase)
    cases = range(len(targets))
    verdicts = group_targets(
        customer_groups(day.split, manifest.unseen_customer_share),
        targets,
        [repurchase.bought(i) for i in cases],
        staged,
        [baseline.rank(i, 100) for i in cases],
        discovery,
        [discovery_baseline.rank(i, 100) for i in cases],
    )
    for name, verdict in verdicts.items():
        low, high = verdict["interval"]  # type: ignore[misc]
        print(f"{name}: {verdict['difference']:+.4f} ({low:+.4f} .. {high:+.4f}) {verdict['verdict']}")
    if args.cold:
        cold_ranks(day, catalog)
    return 0


if __name__ == "__main__":
    sys.exit(main())
