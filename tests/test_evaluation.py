"""Evaluation: metric definitions on hand-computed cases, and the harness end to end on the tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from twotower import metrics


def test_metrics_on_hand_computed_cases() -> None:
    ranked = [np.array([5, 1, 7, 2]), np.array([9, 8, 3, 4])]
    targets = [{1, 2}, {0}]
    assert metrics.recall_at_k(ranked, targets, 2) == pytest.approx((0.5 + 0.0) / 2)
    assert metrics.recall_at_k(ranked, targets, 4) == pytest.approx((1.0 + 0.0) / 2)
    # AP (Kaggle): hits at positions 2 and 4 -> (1/2 + 2/4) / min(2, 12)
    assert metrics.average_precision_at_k(ranked[0], targets[0], 12) == pytest.approx((0.5 + 0.5) / 2)
    assert metrics.map_at_k(ranked, targets, 12) == pytest.approx(0.25)
    ideal = 1 + 1 / np.log2(3)
    assert metrics.ndcg_at_k(ranked[:1], targets[:1], 4) == pytest.approx((1 / np.log2(3) + 1 / np.log2(5)) / ideal)
    assert metrics.coverage_at_k(ranked, 2, 20) == pytest.approx(4 / 20)
    # target beats 9 of 10 negatives -> rank 2: a hit at k=2, a miss at k=1; ties count against the target
    assert metrics.hit_rate_sampled(np.array([0.5]), np.array([[0.9] + [0.1] * 9]), 2) == 1.0
    assert metrics.hit_rate_sampled(np.array([0.5]), np.array([[0.9] + [0.1] * 9]), 1) == 0.0
    assert metrics.hit_rate_sampled(np.array([0.0]), np.zeros((1, 10)), 10) == 0.0


def test_evaluation_harness_writes_reports(tiny_pipeline, tmp_path: Path) -> None:
    from evaluation.__main__ import main

    out = tmp_path / "report"
    assert (
        main(
            [
                "--data-dir",
                str(tiny_pipeline.data_dir),
                "--index-dir",
                str(tiny_pipeline.index_dir),
                "--model-repository",
                str(tiny_pipeline.repository),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    result = json.loads((out / "eval.json").read_text())
    assert {"popularity (7d)", "repurchase", "co-purchase", "two-tower (flat)", "two-tower (exact)"} <= set(
        result["rankers"]
    )
    # a flat index is exact, up to the order of equal scores at the 100th place (float32 sums in faiss vs numpy)
    assert result["ann_recall_at_100"] == pytest.approx(1.0, abs=1e-3)
    for values in result["rankers"].values():
        assert 0.0 <= values["recall@12"] <= values["recall@100"] <= 1.0
    assert result["rankers"]["repurchase"]["cold_recall@100"] == 0.0
    assert "| two-tower (flat) |" in (out / "eval.md").read_text()
    for target in result["targets"].values():  # each with its verdict, the paired ones with an interval
        assert target["verdict"] in ("met", "tie", "NOT met")
        assert "interval" not in target or target["interval"][0] <= target["difference"] <= target["interval"][1]
    assert "95% interval" in (out / "eval.md").read_text()
    text = result["text_search"]  # the tiny export carries a BM25 index: the three retrievers are compared
    for part in text["kinds"].values():
        assert all(0.0 <= part[r]["precision@12"] <= 1.0 for r in ("lexical", "dense", "hybrid"))
    assert "colour + type" in text["kinds"] and "## Text search" in (out / "eval.md").read_text()
    # the breakdown's shares cover every target once; what it finds is the served ranker's recall@100
    breakdown = result["target_breakdown"]
    assert sum(part["share"] for part in breakdown.values()) == pytest.approx(1.0)
    for ranker in ("two-tower (flat)", result["best_baseline"]):
        assert sum(part[ranker] for part in breakdown.values()) == pytest.approx(
            result["rankers"][ranker]["recall@100"]
        )
        assert all(0.0 <= part[ranker] <= part["share"] + 1e-9 for part in breakdown.values())
    assert "| own earlier purchase |" in (out / "eval.md").read_text()
    assert (out / "eval.png").read_bytes()[:4] == b"\x89PNG"


def test_target_breakdown_puts_each_target_in_its_first_category() -> None:
    import pandas as pd

    from evaluation.breakdown import CATEGORIES, target_breakdown
    from evaluation.split import TemporalSplit
    from twotower.repeats import Products

    # rows 0-1 one product; customer a bought 0 before; b bought 5
    history = pd.DataFrame(
        {"customer_id": ["a", "b"], "article_id": ["r0", "r5"], "t_dat": pd.to_datetime(["2020-09-20", "2020-09-21"])}
    )
    row_of = {f"r{i}": i for i in range(1200)}
    split = TemporalSplit(
        pd.Timestamp("2020-09-22"),
        pd.Timestamp("2020-09-16"),
        pd.Timestamp("2020-09-23"),
        history,
        ["a", "b"],
        [{0, 1, 2, 3}, {4, 1100}],
        cold_rows={1100},
        row_of=row_of,
    )
    products = Products(["p0", "p0"] + [f"q{i}" for i in range(2, 1200)])
    co_purchase = [np.asarray([2]), np.asarray([], dtype=np.int64)]
    popularity = np.asarray([3] + list(range(5, 1004)))  # row 4 in neither popularity band
    ranked = [np.asarray([0, 2, 9]), np.asarray([1100])]
    bought = [np.asarray([0]), np.asarray([5])]
    parts = target_breakdown(split, products, bought, co_purchase, popularity, {"found": ranked})
    # a's targets (1/4 each): own 0, sibling 1, co-purchased 2, popular 3; b's (1/2 each): 4 (not cold, in no
    # list) and cold 1100. Each share is averaged over the two cases.
    assert parts[CATEGORIES[0]] == {"share": 0.125, "found": 0.125}
    assert parts[CATEGORIES[1]] == {"share": 0.125, "found": 0.0}
    assert parts[CATEGORIES[2]] == {"share": 0.125, "found": 0.125}
    assert parts[CATEGORIES[3]] == {"share": 0.125, "found": 0.0}
    assert parts[CATEGORIES[5]] == {"share": 0.25, "found": 0.0}
    assert parts[CATEGORIES[6]] == {"share": 0.25, "found": 0.25}


def test_paired_bootstrap_calls_a_lead_only_when_the_interval_excludes_a_loss() -> None:
    from evaluation.intervals import paired_bootstrap

    rng = np.random.default_rng(0)
    theirs = rng.random(500)
    assert paired_bootstrap(theirs, theirs).verdict == "tie"  # the same ranker: no lead
    assert paired_bootstrap(theirs + 0.05, theirs).verdict == "met"
    assert paired_bootstrap(theirs - 0.05, theirs).verdict == "NOT met"
    noisy = theirs + rng.normal(0.0, 0.3, 500)  # +0 on average, with a wide spread: a tie either way
    comparison = paired_bootstrap(noisy, theirs)
    assert comparison.verdict == "tie" and comparison.low < comparison.difference < comparison.high
    assert paired_bootstrap(1.1 * theirs, theirs, ratio=1.2).verdict == "NOT met"  # ahead, but not by 1.2x
    assert metrics.recall_per_case([np.array([1, 2])], [{1, 3}], 2).tolist() == [0.5]


def test_attribute_queries_name_every_article_with_those_attributes() -> None:
    import pandas as pd

    from evaluation.text_search import attribute_queries

    articles = pd.DataFrame(
        {
            "colour_group_name": ["Grey", "Grey", "Black", "Grey", "Unknown"],
            "product_type_name": ["Dress", "Dress", "Dress", "Trousers", "Dress"],
        }
    )
    queries = attribute_queries(articles, ("colour_group_name", "product_type_name"), min_articles=1)
    assert sorted(queries) == [("black dress", {2}), ("grey dress", {0, 1}), ("grey trousers", {3})]  # no "unknown"
    assert attribute_queries(articles, ("colour_group_name", "product_type_name"), min_articles=2) == [
        ("grey dress", {0, 1})
    ]
