"""Score every ranker on the same cases of a temporal split."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from evaluation.baselines import CoPurchase, Mix, Popularity, Ranker, Repurchase, WithoutOwn
from evaluation.breakdown import target_breakdown
from evaluation.intervals import paired_bootstrap
from evaluation.split import TemporalSplit
from evaluation.text_search import evaluate_text_search
from evaluation.two_tower import TwoTower, case_users
from serving.catalog import Catalog
from twotower import metrics, triton_repository
from twotower.data.customers import unseen_customers
from twotower.data.hm import HMData
from twotower.model.clip_text import get_tokenizer

log = logging.getLogger("evaluation")

K_SMALL, K_LARGE, SAMPLED_NEGATIVES, SAMPLED_K = 12, 100, 100, 10
FROM_SCRATCH_COLD_RECALL = 0.0137  # the from-scratch text tower's served cold recall@100 (make eval, 2026-11-28)


def score_ranker(ranker: Ranker, split: TemporalSplit, seed: int = 0) -> tuple[dict[str, float], list[np.ndarray]]:
    started = time.perf_counter()
    ranked = ranker.rank_all(len(split.customers), K_LARGE)
    targets = split.targets
    cold = [(r, t & split.cold_rows) for r, t in zip(ranked, targets) if t & split.cold_rows]
    # Leave-one-out with sampled negatives: one target per case, 100 random articles it did not buy.
    rng = np.random.default_rng(seed)
    size = len(split.row_of)
    target_scores, negative_scores = [], []
    for i, t in enumerate(targets):
        held_out = sorted(t)[rng.integers(len(t))]
        negatives = rng.choice(size, SAMPLED_NEGATIVES + len(t), replace=False)
        negatives = np.asarray([n for n in negatives if n not in t][:SAMPLED_NEGATIVES])
        scores = ranker.sampled_scores(i, np.concatenate([[held_out], negatives]))
        target_scores.append(scores[0])
        negative_scores.append(scores[1:])
    result = {
        "recall@12": metrics.recall_at_k(ranked, targets, K_SMALL),
        "map@12": metrics.map_at_k(ranked, targets, K_SMALL),
        "ndcg@12": metrics.ndcg_at_k(ranked, targets, K_SMALL),
        "recall@100": metrics.recall_at_k(ranked, targets, K_LARGE),
        "coverage@12": metrics.coverage_at_k(ranked, K_SMALL, size),
        "cold_recall@100": metrics.recall_at_k([r for r, _ in cold], [t for _, t in cold], K_LARGE) if cold else 0.0,
        "hr@10_sampled100": metrics.hit_rate_sampled(np.asarray(target_scores), np.asarray(negative_scores), SAMPLED_K),
    }
    log.info(
        "%-45s recall@12 %.4f  map@12 %.4f  recall@100 %.4f  cold recall@100 %.4f  (%.1fs)",
        ranker.name,
        result["recall@12"],
        result["map@12"],
        result["recall@100"],
        result["cold_recall@100"],
        time.perf_counter() - started,
    )
    return result, ranked


Check = tuple[str, Callable[[list[np.ndarray], list[set[int]], int], np.ndarray], int, float]
RECALL, PRECISION = metrics.recall_per_case, metrics.average_precision_per_case
SERVED_CHECKS: tuple[Check, ...] = (
    ("recall@100 >= 1.2 x best baseline", RECALL, K_LARGE, 1.2),
    ("recall@12 >= best baseline", RECALL, K_SMALL, 1.0),
    ("map@12 >= best baseline", PRECISION, K_SMALL, 1.0),
)
DISCOVERY_CHECKS: tuple[Check, ...] = (("discovery recall@100 >= 1.5 x baseline", RECALL, K_LARGE, 1.5),)


def served_vs_baseline(
    served: list[np.ndarray],
    baseline: list[np.ndarray],
    targets: list[set[int]],
    checks: tuple[Check, ...] = SERVED_CHECKS,
) -> dict[str, dict[str, object]]:
    """The served ranker against a baseline on the same cases, each target with its paired 95%
    bootstrap interval (evaluation/intervals.py): met only when the interval excludes a loss."""
    return {
        name: paired_bootstrap(per_case(served, targets, k), per_case(baseline, targets, k), ratio).to_json()
        for name, per_case, k, ratio in checks
    }


def customer_groups(split: TemporalSplit, unseen_share: float) -> dict[str, np.ndarray]:
    """Case indices by split: the day split (customers training saw before the cutoff) and, when training
    left a share of customers out, the customer split (customers it never saw)."""
    unseen = unseen_customers(split.customers, unseen_share)
    groups = {"day split": np.flatnonzero(~unseen)}
    if unseen.any():
        groups["customer split"] = np.flatnonzero(unseen)
    return groups


def group_targets(
    groups: dict[str, np.ndarray],
    targets: list[set[int]],
    bought: list[np.ndarray],
    served: list[np.ndarray],
    baseline: list[np.ndarray],
    discovery_served: list[np.ndarray],
    discovery_baseline: list[np.ndarray],
) -> dict[str, dict[str, object]]:
    """Every target per split. Discovery scores only the articles a case had never bought, served with
    exclude_purchased against a baseline without the customer's own articles, over the cases that have one."""
    out: dict[str, dict[str, object]] = {}
    for group, cases in groups.items():

        def pick(lists: list[np.ndarray], among: np.ndarray = cases) -> list[np.ndarray]:
            return [lists[i] for i in among]

        for name, verdict in served_vs_baseline(pick(served), pick(baseline), pick(targets)).items():
            out[f"{group}: {name}"] = {**verdict, "cases": len(cases)}
        new_targets = [targets[i] - set(bought[i].tolist()) for i in cases]
        found = np.asarray([i for i, t in zip(cases, new_targets) if t], dtype=np.int64)
        discovery = served_vs_baseline(
            pick(discovery_served, found),
            pick(discovery_baseline, found),
            [t for t in new_targets if t],
            DISCOVERY_CHECKS,
        )
        for name, verdict in discovery.items():
            out[f"{group}: {name}"] = {**verdict, "cases": len(found)}
    return out


def evaluate(
    data: HMData, split: TemporalSplit, index_dir: Path, model_repository: Path, command: str
) -> dict[str, Any]:
    catalog = Catalog(index_dir)
    if list(catalog.article_ids) != list(data.article_ids):
        raise ValueError(
            f"{index_dir} indexes a different catalogue than {data.source} "
            f"({len(catalog.article_ids)} vs {len(data.article_ids)} articles or a different order)"
        )
    manifest = catalog.manifest
    if not manifest.trained_until or manifest.trained_until > str(split.cutoff.date()):
        log.warning(
            "the model was trained on purchases up to %s, past the cutoff %s: its numbers are not honest; "
            "train with --until %s",
            manifest.trained_until or "the end of the data",
            split.cutoff.date(),
            split.cutoff.date(),
        )
    user_tower = triton_repository.load_tower(model_repository, manifest, manifest.user_model)

    popularity = Popularity(split, days=7)
    repurchase, co_purchase = Repurchase(split), CoPurchase(split)
    baselines: list[Ranker] = [
        popularity,
        Popularity(split, days=1),
        repurchase,
        co_purchase,
        Mix([repurchase, co_purchase, popularity]),
        Mix([repurchase, popularity]),
        Mix([co_purchase, popularity]),
    ]
    results: dict[str, dict[str, float]] = {}
    ranked_by: dict[str, list[np.ndarray]] = {}
    for ranker in baselines:
        results[ranker.name], ranked_by[ranker.name] = score_ranker(ranker, split)
    cases = case_users(split, catalog, user_tower)
    served, exact = TwoTower(cases, catalog), TwoTower(cases, catalog, exact=True)
    results[served.name], ann_ranked = score_ranker(served, split)
    results[exact.name], exact_ranked = score_ranker(exact, split)
    # What the second stage, the prior and then the boost add, for comparison: the last variant is the towers alone.
    variants = []
    if catalog.second_stage is not None:
        variants.append(TwoTower(cases, catalog, exact=True, second_stage=False))
    if catalog.prior_weight:
        variants.append(TwoTower(cases, catalog, exact=True, popularity_prior=False, second_stage=False))
    if catalog.score_head.repeat.active:
        variants.append(
            TwoTower(cases, catalog, exact=True, repeat_boost=False, popularity_prior=False, second_stage=False)
        )
    for variant in variants:
        results[variant.name] = score_ranker(variant, split)[0]
    ann_recall = float(
        np.mean([len(set(a.tolist()) & set(e.tolist())) / max(len(e), 1) for a, e in zip(ann_ranked, exact_ranked)])
    )
    best = max((r.name for r in baselines), key=lambda name: results[name]["recall@100"])
    bought = [repurchase.bought(case) for case in range(len(split.customers))]
    breakdown = target_breakdown(
        split,
        catalog.products,
        bought,
        ranked_by[co_purchase.name],
        popularity.rank(0, 1000),
        {served.name: ann_ranked, best: ranked_by[best]},
    )
    # Discovery: purchases of articles the customer had never bought.
    discovery = TwoTower(cases, catalog, exclude_purchased=True)
    discovery_baseline = WithoutOwn(Mix([co_purchase, popularity]), repurchase)
    results[discovery.name], discovery_ranked = score_ranker(discovery, split)
    results[discovery_baseline.name], discovery_baseline_ranked = score_ranker(discovery_baseline, split)
    boost = catalog.score_head.repeat
    groups = customer_groups(split, manifest.unseen_customer_share)
    targets = group_targets(
        groups,
        split.targets,
        bought,
        ann_ranked,
        ranked_by[best],
        discovery_ranked,
        discovery_baseline_ranked,
    )
    cold = results[served.name]["cold_recall@100"]
    targets[f"cold recall@100 >= 3 x {FROM_SCRATCH_COLD_RECALL}"] = {
        "verdict": "met" if cold >= 3 * FROM_SCRATCH_COLD_RECALL else "NOT met",
        "difference": cold - 3 * FROM_SCRATCH_COLD_RECALL,
    }
    return {
        "data": data.source,
        "split": split.describe(),
        "cutoff": str(split.cutoff.date()),
        "catalogue_size": len(split.row_of),
        "cases": len(split.customers),
        "split_cases": {group: len(cases) for group, cases in groups.items()},
        "unseen_customer_share": manifest.unseen_customer_share,
        "cold_cases": sum(1 for t in split.targets if t & split.cold_rows),
        "model": f"{manifest.clip_model} ({manifest.item_tower_precision} item tower"
        f"{', distilled query tower' if manifest.query_model else ''}), dim {manifest.dim}, "
        f"model version {manifest.model_version}, "
        f"trained until {manifest.trained_until or 'end of data'}, repeat boost for own earlier purchases "
        f"{boost.bonus:g} - {boost.slope:g} * log1p(days), for other colours of their products "
        f"{boost.sibling_bonus:g} - {boost.sibling_slope:g} * log1p(days), popularity prior "
        f"{catalog.prior_weight:g} * log1p(purchases in the {catalog.score_head.prior.window_days} days "
        f"before {manifest.trained_until or 'the end of data'}; "
        f"{catalog.prior_weight_for(exclude_bought=True):g} in lists without the customer's own articles)"
        + (
            ""
            if catalog.second_stage is None
            else ", then a second stage (twotower.second_stage; largest weights "
            f"{catalog.second_stage.weights.describe()})"
        ),
        "rankers": results,
        "best_baseline": best,
        "served": served.name,
        "targets": targets,
        "ann_recall_at_100": ann_recall,
        "target_breakdown": breakdown,
        "text_search": evaluate_text_search(
            data.articles,
            catalog,
            triton_repository.load_tower(model_repository, manifest, manifest.text_query_model),
            get_tokenizer(manifest.clip_model),
            triton_repository.load_tower(model_repository, manifest, manifest.item_model)
            if manifest.query_model
            else None,
        ),
        "command": command,
    }
