"""Probe, not served: would a learned second stage lift the served ranking on the day split?

    python -m evaluation.second_stage_probe --data-dir ../shared/data/hm_lastweek --cutoff 2020-09-22 \
        --index-dir runs/hm-eval/index --model-repository runs/hm-eval/model_repository

Each case's candidate pool: the served ranking's top 300 (exact search, boosts and prior as served), the
co-purchase baseline's top 150 and the 7-day popularity top 150. Every candidate gets the signals the
baselines and the towers already have (below, `FEATURES`), and a classifier scores it as bought or not:
logistic regression (`--model logistic`, the default: one dot product per candidate when served) or
gradient-boosted trees (`--model trees`, scikit-learn's HistGradientBoostingClassifier: 113 ms to score 500
candidates with these 800 trees, too slow to serve). It is cross-fitted: trained on the cases of one half
of the target day's customers, it ranks the other half, and the halves swap. With `--fit-on-held-out RUN`
it is fitted as a served stage would be (as the repeat boost and the prior are): on the day before, over
the customers whose purchases that day training RUN held out (rebuilt from its config.json), then it ranks
the evaluation day. Its settings were picked on the evaluation day.

Prints recall@12, MAP@12 and recall@100 of the re-ranked lists against the served ranking, then, per split
(`make eval`'s day and customer splits), the issue's targets against the best baseline (repurchase >
co-purchase > popularity), each with its paired bootstrap 95% interval (evaluation/intervals.py).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd

from evaluation.baselines import CoPurchase, Mix, Popularity, Repurchase
from evaluation.evaluate import customer_groups, served_vs_baseline
from evaluation.intervals import paired_bootstrap
from evaluation.split import TemporalSplit, temporal_split
from evaluation.two_tower import CaseUsers, TwoTower, case_users
from serving.catalog import Catalog
from twotower import metrics, ranking, triton_repository
from twotower.data.customers import unseen_customers
from twotower.data.histories import training_examples
from twotower.data.hm import HMData, load_hm_dir
from twotower.popularity import item_bias, purchase_counts
from twotower.train import split_examples

log = logging.getLogger("evaluation.second_stage_probe")

POOL_SERVED, POOL_CO_PURCHASE, POOL_POPULAR = 300, 150, 150
RANK_CAP = 2000  # a candidate's rank in a list, capped (the pools reach a few hundred deep)
FEATURES = (
    "served score",
    "served rank",
    "tower cosine",
    "co-purchase count",
    "co-purchase rank",
    "purchases 1 day",
    "purchases 3 days",
    "purchases 7 days",
    "days since own purchase",
    "own purchases",
    "other colour of own purchase",
    "share of history in its product type",
    "history length",
    "article id rank (newness)",
    "product bought before",
    "max cosine to a history article",
    "mean cosine to the history",
    "co-purchase count / sqrt(7-day purchases)",
    "1-day / 7-day purchases",
    "days since first sale",
    "price / customer's mean price",
    "online share - customer's online share",
)
# HistGradientBoostingClassifier settings: small trees, strongly regularised. Five tree settings and pool sizes tried
# on this day (a first version of this probe, 2026-11-30) gave recall@100 +0.015 to +0.021 over the served ranking:
# 15 leaves of 200 +0.016, these +0.021, 4 leaves of 800 +0.016 (served pool 600: +0.015 with these).
TREES = {"max_iter": 800, "learning_rate": 0.02, "max_leaf_nodes": 7, "min_samples_leaf": 400, "l2_regularization": 1.0}


class ArticleSignals:
    """Per-article numbers over the history window: purchases per window, first sale, mean price, online share."""

    def __init__(self, split: TemporalSplit) -> None:
        n = len(split.row_of)
        history = split.history.assign(row=split.history["article_id"].map(split.row_of))
        rows = history["row"].to_numpy()
        self.purchases = {days: purchase_counts(history, split.row_of, n, split.cutoff, days) for days in (1, 3, 7)}
        first = history.groupby("row")["t_dat"].min()
        self.days_since_first_sale = np.full(n, 99.0, np.float32)
        self.days_since_first_sale[first.index.to_numpy()] = (split.cutoff - first).dt.days.to_numpy()
        sold = np.bincount(rows, minlength=n)
        online = (history["sales_channel_id"] == 2).to_numpy().astype(float)
        with np.errstate(invalid="ignore", divide="ignore"):
            self.price = (np.bincount(rows, weights=history["price"].to_numpy(), minlength=n) / sold).astype(np.float32)
            self.online = (np.bincount(rows, weights=online, minlength=n) / sold).astype(np.float32)
        ids = np.asarray(list(split.row_of))
        self.newness = (np.argsort(np.argsort(ids, kind="stable")) / n).astype(np.float32)
        by_customer = history.assign(online=online).groupby("customer_id")
        self.customer_price = by_customer["price"].mean().to_dict()
        self.customer_online = by_customer["online"].mean().to_dict()
        self.repurchase = Repurchase(split)  # each customer's own articles: days since bought, times bought


def _rank_of(order: np.ndarray, pool: np.ndarray, n: int) -> np.ndarray:
    rank = np.full(n, RANK_CAP, np.float32)
    top = order[:RANK_CAP]
    rank[top] = np.arange(len(top))
    return rank[pool]


def case_candidates(
    case: int,
    split: TemporalSplit,
    catalog: Catalog,
    cases: CaseUsers,
    served: TwoTower,
    co_purchase: CoPurchase,
    signals: ArticleSignals,
    popular: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(candidate rows, features [rows, FEATURES], the served ranking's top 100) of one case."""
    n = len(split.row_of)
    scores = served.scores(case).astype(np.float32)
    order = np.argsort(-scores, kind="stable")
    co = co_purchase.scores(case)
    co = np.where(np.isfinite(co), co, 0.0).astype(np.float32)
    co_order = np.argsort(-co, kind="stable")
    co_top = co_order[:POOL_CO_PURCHASE][co[co_order[:POOL_CO_PURCHASE]] > 0]
    pool = np.unique(np.concatenate([order[:POOL_SERVED], co_top, popular]))
    customer = split.customers[case]
    own_rows, own_age, own_count = signals.repurchase.owned(case)
    age = np.full(n, 99.0, np.float32)
    age[own_rows] = own_age
    count = np.zeros(n, np.float32)
    count[own_rows] = own_count
    product_of = catalog.products.product_of if catalog.products is not None else np.full(n, -1)
    own_products = np.setdiff1d(product_of[own_rows], [-1])
    in_own_product = np.isin(product_of[pool], own_products).astype(np.float32)
    history_rows = cases.pairs[case][0]
    types = np.asarray(catalog.product_types)
    type_share = np.bincount(types[history_rows], minlength=int(types.max()) + 1) / max(1, len(history_rows))
    vectors = catalog.vectors[pool]
    similar = vectors @ catalog.vectors[history_rows].T if len(history_rows) else np.zeros((len(pool), 1))
    p1, p3, p7 = (signals.purchases[d][pool] for d in (1, 3, 7))
    features = np.stack(
        [
            scores[pool],
            _rank_of(order, pool, n),
            vectors @ cases.users[case],
            co[pool],
            _rank_of(co_order, pool, n),
            p1,
            p3,
            p7,
            age[pool],
            count[pool],
            in_own_product * (count[pool] == 0),
            type_share[types[pool]],
            np.full(len(pool), len(history_rows)),
            signals.newness[pool],
            in_own_product,
            similar.max(axis=1),
            similar.mean(axis=1),
            co[pool] / (np.sqrt(p7) + 1),
            p1 / (p7 + 1),
            signals.days_since_first_sale[pool],
            signals.price[pool] / signals.customer_price[customer],
            signals.online[pool] - signals.customer_online[customer],
        ],
        axis=1,
    ).astype(np.float32)
    return pool, features, order[:100]


# Counts and ranks enter the linear model as log1p (their effect flattens: the 50th co-purchase adds less than the
# first); what trees split on needs no such shape.
LOG_FEATURES = (
    "served rank",
    "co-purchase count",
    "co-purchase rank",
    "purchases 1 day",
    "purchases 3 days",
    "purchases 7 days",
    "own purchases",
    "co-purchase count / sqrt(7-day purchases)",
)


def linear_inputs(features: np.ndarray) -> np.ndarray:
    """The features as the logistic model reads them: log1p of counts and ranks, unknown (unsold: no price) 0."""
    out = np.array(features, dtype=np.float64)
    columns = [FEATURES.index(name) for name in LOG_FEATURES]
    out[:, columns] = np.log1p(np.maximum(out[:, columns], 0.0))
    return np.nan_to_num(out, nan=0.0, posinf=0.0, neginf=0.0)


def make_model(kind: str, trees: dict = TREES) -> Any:
    """A fresh classifier: "trees" (HistGradientBoostingClassifier) or "logistic" (logistic regression over
    `linear_inputs`, standardised): a served stage would compute the latter as one dot product per candidate."""
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import FunctionTransformer, StandardScaler

    if kind == "trees":
        return HistGradientBoostingClassifier(**trees, random_state=0)
    return make_pipeline(FunctionTransformer(linear_inputs), StandardScaler(), LogisticRegression(max_iter=1000))


def cross_fitted_lists(
    features: np.ndarray, bought: np.ndarray, case_of: np.ndarray, rows: np.ndarray, model: Callable[[], Any]
) -> list:
    """Each case's candidates ordered by a `model()` trained on the other half of the cases (halves by case
    parity)."""
    predicted = np.zeros(len(bought))
    for half in (0, 1):
        train = case_of % 2 != half
        fitted = model().fit(features[train], bought[train])
        predicted[~train] = fitted.predict_proba(features[~train])[:, 1]
    return ranked_pools(rows, case_of, predicted)


def ranked_pools(rows: np.ndarray, case_of: np.ndarray, scores: np.ndarray) -> list[np.ndarray]:
    """Each case's candidate rows (consecutive in `rows`) ordered by `scores`, the top 100."""
    starts = np.flatnonzero(np.r_[True, case_of[1:] != case_of[:-1]])
    return [
        part_rows[np.argsort(-part_scores, kind="stable")][:100]
        for part_rows, part_scores in zip(np.split(rows, starts[1:]), np.split(scores, starts[1:]))
    ]


class DayCandidates:
    """Every case's pool, features and served top 100 on one day (the cases of `customers` only, when given)."""

    def __init__(
        self, data: HMData, cutoff: str, catalog: Catalog, user_tower: Any, customers: set[str] | None = None
    ) -> None:
        self.split = split = temporal_split(data, cutoff)
        cases = case_users(split, catalog, user_tower)
        served = TwoTower(cases, catalog, exact=True)
        # The prior as of this day (the index's counts the week before the evaluation day: on an earlier day
        # they would count that day's own purchases).
        bias = item_bias(data.transactions, split.row_of, len(split.row_of), split.cutoff)
        served.space = ranking.ExactItems(
            catalog.vectors,
            bias,
            products=catalog.products,
            product_types=catalog.product_types,
            excluded=catalog.excluded,
        )
        signals = ArticleSignals(split)
        popular = np.argsort(-signals.purchases[7], kind="stable")[:POOL_POPULAR]
        self.co_purchase = CoPurchase(split)
        self.repurchase = signals.repurchase
        self.cases = [i for i, c in enumerate(split.customers) if customers is None or c in customers]
        found = [
            case_candidates(i, split, catalog, cases, served, self.co_purchase, signals, popular) for i in self.cases
        ]
        self.pools = [pool for pool, _, _ in found]
        self.features = np.concatenate([features for _, features, _ in found])
        self.served_lists = [top for _, _, top in found]
        self.targets = [split.targets[i] for i in self.cases]
        self.rows = np.concatenate(self.pools)
        self.case_of = np.concatenate([np.full(len(pool), k) for k, pool in enumerate(self.pools)])
        self.bought = np.concatenate([np.isin(p, list(t)) for p, t in zip(self.pools, self.targets)]).astype(np.int8)

    def describe(self) -> str:
        return (
            f"{self.split.describe()}, {len(self.cases)} of them: {len(self.rows)} candidates "
            f"({int(self.bought.sum())} bought); the pools hold recall "
            f"{metrics.recall_at_k(self.pools, self.targets, len(self.split.row_of)):.4f} of the targets"
        )


def training_held_out(data: HMData, run_dir: Path) -> tuple[str, set[str]]:
    """(the held-out day, its customers) of the training run in `run_dir`, rebuilt from its config.json as
    twotower.train chose them: those customers' purchases on that day were never trained on."""
    config = json.loads((run_dir / "config.json").read_text())
    train, model = config["train"], config["model"]
    transactions = data.transactions
    if train["until"]:
        transactions = transactions[transactions["t_dat"] < pd.Timestamp(train["until"])]
    if train["unseen_customer_share"] > 0:
        transactions = transactions[~unseen_customers(transactions["customer_id"], train["unseen_customer_share"])]
    row_of = {article_id: i for i, article_id in enumerate(data.article_ids)}
    examples = training_examples(transactions, row_of, model["max_history"], train["earlier_days_only"])
    _, holdout = split_examples(examples, seed=train["seed"])
    # training_examples numbers customers in order of first appearance (pandas factorize, unsorted)
    ids = pd.unique(transactions["customer_id"])
    day = (pd.Timestamp(0) + pd.Timedelta(days=holdout.day)).strftime("%Y-%m-%d")
    return day, {str(ids[c]) for c in np.unique(holdout.examples.customers)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", required=True, type=Path)
    parser.add_argument("--index-dir", required=True, type=Path)
    parser.add_argument("--model-repository", required=True, type=Path)
    parser.add_argument("--cutoff", default="")
    parser.add_argument("--model", choices=("trees", "logistic"), default="logistic")
    parser.add_argument(
        "--fit-on-held-out",
        type=Path,
        default=None,
        metavar="RUN",
        help="fit on the held-out day and customers of this training run (e.g. runs/hm-eval), not cross-fitted",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    started = time.perf_counter()
    data = load_hm_dir(args.data_dir)
    catalog = Catalog(args.index_dir, lexical=False)
    manifest = catalog.manifest
    user_tower = triton_repository.load_tower(args.model_repository, manifest, manifest.user_model)
    day = DayCandidates(data, args.cutoff, catalog, user_tower)
    log.info("evaluated: %s", day.describe())
    if args.fit_on_held_out is None:
        reranked = cross_fitted_lists(day.features, day.bought, day.case_of, day.rows, lambda: make_model(args.model))
        fitted = make_model(args.model).fit(day.features, day.bought) if args.model == "logistic" else None
    else:
        held_day, held_customers = training_held_out(data, args.fit_on_held_out)
        fitted_on = DayCandidates(data, held_day, catalog, user_tower, held_customers)
        log.info("fitted on: %s (held out by %s)", fitted_on.describe(), args.fit_on_held_out)
        fitted = make_model(args.model).fit(fitted_on.features, fitted_on.bought)
        reranked = ranked_pools(day.rows, day.case_of, fitted.predict_proba(day.features)[:, 1])
    if args.model == "logistic":
        weights = fitted[-1].coef_[0]
        print("| feature (standardised) | weight |\n|---|---|")
        for position in np.argsort(-np.abs(weights)):
            print(f"| {FEATURES[position]} | {weights[position]:+.3f} |")
    targets = day.targets
    print("| metric | served (exact) | re-ranked | difference, 95% interval |\n|---|---|---|---|")
    for name, per_case in (
        ("recall@12", lambda lists: metrics.recall_per_case(lists, targets, 12)),
        ("map@12", lambda lists: metrics.average_precision_per_case(lists, targets, 12)),
        ("recall@100", lambda lists: metrics.recall_per_case(lists, targets, 100)),
    ):
        ours, theirs = per_case(reranked), per_case(day.served_lists)
        difference = paired_bootstrap(ours, theirs)
        print(
            f"| {name} | {theirs.mean():.4f} | {ours.mean():.4f} | {difference.difference:+.4f} "
            f"({difference.low:+.4f} .. {difference.high:+.4f}) |"
        )
    baseline = Mix([day.repurchase, day.co_purchase, Popularity(day.split, days=7)])
    baseline_lists = [baseline.rank(case, 100) for case in day.cases]
    print("\n| split | target | cases | re-ranked - ratio x baseline, 95% interval | verdict |\n|---|---|---|---|---|")
    for group, members in customer_groups(day.split, manifest.unseen_customer_share).items():
        verdicts = served_vs_baseline(
            [reranked[i] for i in members], [baseline_lists[i] for i in members], [targets[i] for i in members]
        )
        for name, verdict in verdicts.items():
            low, high = verdict["interval"]  # type: ignore[misc]
            print(
                f"| {group} | {name} | {len(members)} | {verdict['difference']:+.4f} ({low:+.4f} .. {high:+.4f}) "
                f"| {verdict['verdict']} |"
            )
    log.info("done in %.0fs", time.perf_counter() - started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
