"""The learned second stage (twotower.second_stage): its signals, its fit, and lists re-ordered by it."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from serving.catalog import Catalog
from twotower import fitting, ranking, repeats, rowsets, second_stage
from twotower.artifacts import ScoreHeadWeights
from twotower.second_stage import FEATURES, NEVER, ArticleSignals, SecondStage, StageWeights

ROW_OF = {"a": 0, "b": 1, "c": 2, "d": 3}


def purchases() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "t_dat": pd.to_datetime(
                ["2020-09-10", "2020-09-18", "2020-09-19", "2020-09-19", "2020-09-19", "2020-09-20"]
            ),
            "customer_id": ["x", "x", "x", "y", "y", "z"],
            "article_id": ["a", "b", "b", "a", "b", "c"],
        }
    )


def test_membership_by_sorted_search_matches_isin() -> None:
    rng = np.random.default_rng(3)
    values, members = rng.integers(0, 50, 300), rng.integers(0, 50, 9)
    np.testing.assert_array_equal(rowsets.member_of(values, members), np.isin(values, members))
    assert not rowsets.member_of(values, members[:0]).any()


def test_signals_count_sales_first_sales_and_customers_who_bought_both() -> None:
    signals = ArticleSignals.count(purchases(), ROW_OF, 4, pd.Timestamp("2020-09-20"))  # the 20th is not counted
    np.testing.assert_array_equal(signals.purchases.T, [[1, 2, 0, 0], [1, 3, 0, 0], [1, 3, 0, 0]])  # 1, 3, 7 days
    np.testing.assert_array_equal(signals.days_since_first_sale, [10, 2, NEVER, NEVER])
    assert signals.popular.tolist() == [1, 0]  # most bought first; unsold articles are no best sellers
    # x and y bought both a and b: 2 customers, however often each bought them
    rows, counts = signals.co_purchases(np.array([0, 0, -1]))
    assert rows.tolist() == [1] and counts.tolist() == [2.0]
    rows, counts = signals.co_purchases(np.array([0, 1]))
    assert dict(zip(rows.tolist(), counts.tolist())) == {0: 2.0, 1: 2.0}
    assert signals.co_purchases(np.array([3]))[0].tolist() == []


def test_signals_survive_a_save_and_a_catalogue_update(tmp_path: Path) -> None:
    signals = ArticleSignals.count(purchases(), ROW_OF, 4, pd.Timestamp("2020-09-21"))
    signals.save(tmp_path / "s.npz")
    loaded = ArticleSignals.load(tmp_path / "s.npz")
    np.testing.assert_array_equal(loaded.co_counts, signals.co_counts)
    extended = loaded.extended(np.array([-1, 1]))  # a new article, and a changed b in a new row (5)
    assert extended.size == 6
    assert extended.purchases[4].tolist() == [0, 0, 0] and extended.days_since_first_sale[4] == NEVER
    assert extended.purchases[5].tolist() == signals.purchases[1].tolist()
    assert extended.popular.tolist() == [5, 0, 2]  # b, the best seller, now in its new row
    # the new row has b's co-purchases, and a's co-purchase partner is the new row
    assert extended.co_purchases(np.array([5]))[0].tolist() == [0]
    assert extended.co_purchases(np.array([0]))[0].tolist() == [5]
    assert extended.co_purchases(np.array([4]))[0].tolist() == []
    assert (np.diff(extended.co_indptr) >= 0).all() and extended.co_indptr[-1] == len(extended.co_indices)
    # Rows past `size` (added by an update that shared these signals) are unsold; a later change of one of them
    # writes them out first.
    sold, first_sale = loaded.sales(np.array([1, 4, 5]))
    assert sold.tolist() == [signals.purchases[1].tolist(), [0, 0, 0], [0, 0, 0]]
    assert first_sale[1:].tolist() == [NEVER, NEVER] and first_sale[0] == signals.days_since_first_sale[1]
    later = loaded.extended(np.array([5]), rows=6)  # row 5, an added article, changed into row 6
    assert later.size == 7 and later.purchases[6].tolist() == [0, 0, 0] and later.days_since_first_sale[6] == NEVER
    np.testing.assert_array_equal(later.purchases[:4], signals.purchases)


def test_the_fit_reaches_the_penalised_log_loss_minimum() -> None:
    rng = np.random.default_rng(0)
    features = np.abs(rng.normal(size=(3000, len(FEATURES)))).astype(np.float32)
    logit = 2.0 * features[:, 2] - 1.5 * np.log1p(features[:, 1]) - 1.0
    bought = rng.random(3000) < 1 / (1 + np.exp(-logit))
    weights = StageWeights.fit(features, bought)
    # the optimum: gradient of the loss + 0.5 * |coef|^2 (intercept unpenalised) is zero
    x = second_stage.standardise(features, weights.mean, weights.scale)
    p = 1 / (1 + np.exp(-(x @ weights.coef + weights.intercept)))
    np.testing.assert_allclose(x.T @ (p - bought) + weights.coef, 0, atol=1e-6)
    assert abs((p - bought).sum()) < 1e-6
    assert weights.coef[2] > 0 > weights.coef[1]
    # served: the folded float32 weights give the standardised model's logit
    np.testing.assert_allclose(weights(features), x @ weights.coef + weights.intercept, rtol=1e-4, atol=1e-4)
    restored = StageWeights.from_json(weights.to_json())
    assert restored is not None
    np.testing.assert_allclose(restored(features), weights(features), rtol=1e-6)


def test_weights_over_other_features_turn_the_stage_off_and_old_score_heads_have_none(
    caplog: pytest.LogCaptureFixture,
) -> None:
    raw = StageWeights(np.zeros(len(FEATURES)), np.ones(len(FEATURES)), np.zeros(len(FEATURES)), 0.0).to_json()
    assert StageWeights.from_json({**raw, "features": list(FEATURES[:-1])}) is None
    assert "second stage off" in caplog.text
    head = ScoreHeadWeights(np.ones(2), np.zeros(2), np.ones(2), 0.0)
    assert ScoreHeadWeights.from_json(head.to_json()).stage is None
    assert ScoreHeadWeights.from_json({k: v for k, v in head.to_json().items() if k != "second_stage"}).stage is None


def staged_space(
    rng: np.random.Generator, excluded: np.ndarray | None = None, n: int = 300
) -> tuple[ranking.ExactItems, ArticleSignals, np.ndarray]:
    """n random articles in products of 3 and 20 types, random purchases before the day, 20 users."""
    vectors = rng.normal(size=(n, 8)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    products = repeats.Products([str(i // 3) for i in range(n)])
    space = ranking.ExactItems(vectors, products=products, product_types=np.arange(n) % 20, excluded=excluded)
    frame = pd.DataFrame(
        {
            "t_dat": pd.Timestamp("2020-09-20") - pd.to_timedelta(rng.integers(1, 9, 2000), unit="D"),
            "customer_id": rng.integers(0, 200, 2000).astype(str),
            "article_id": rng.integers(0, n, 2000).astype(str),
        }
    )
    signals = ArticleSignals.count(frame, {str(i): i for i in range(n)}, n, pd.Timestamp("2020-09-20"))
    return space, signals, rng.normal(size=(20, 8)).astype(np.float32)


def test_a_staged_list_honours_filters_exclusions_and_the_type_cap() -> None:
    rng = np.random.default_rng(1)
    space, signals, users = staged_space(rng, excluded=np.arange(300) % 7 == 0)
    weights = StageWeights(np.zeros(len(FEATURES)), np.ones(len(FEATURES)), rng.normal(size=len(FEATURES)), 0.0)
    stage = SecondStage(signals, weights)
    bought = (np.array([5, 9, 5, 40]), np.array([1.0, 2.0, 3.0, 5.0], np.float32))
    allowed = np.arange(300) % 2 == 1
    requests = [
        ranking.RankRequest(12, bought=bought, stage=stage),
        ranking.RankRequest(12, bought=bought, stage=stage, exclude_bought=True),
        ranking.RankRequest(12, bought=bought, stage=stage, allowed=allowed),
        ranking.RankRequest(12, bought=bought, stage=stage, max_per_type=1),
    ]
    lists = ranking.rank(space, users[:4], requests)
    for scores, rows in lists:
        assert len(rows) == 12 and len(set(rows.tolist())) == 12
        assert not space.excluded[rows].any()
        assert (np.diff(scores) <= 0).all()  # best first by the stage's score
    assert not np.isin(lists[1][1], bought[0]).any()
    assert allowed[lists[2][1]].all()
    assert len(set((np.arange(300) % 20)[lists[3][1]].tolist())) == 12
    # the stage's score is what the list carries, recomputed from the candidates' features
    _, first = ranking.rank(space, users[:1], [ranking.RankRequest(300, bought=bought)])[0]
    pool, features = ranking.stage_candidates(space, users[0], requests[0], signals, first)
    best = pool[np.argsort(-weights(features), kind="stable")][:12]
    assert lists[0][1].tolist() == best.tolist()


def test_the_stage_fitted_on_purchases_it_can_see_finds_them() -> None:
    rng = np.random.default_rng(2)
    space, signals, users = staged_space(rng)
    histories = [(rng.integers(0, 300, 5), np.arange(5, dtype=np.float32)) for _ in users]
    best_sellers = signals.popular[:40].tolist()
    targets = [set(rng.choice(best_sellers, 3, replace=False).tolist()) for _ in users]  # they buy best sellers
    fit = fitting.fit_second_stage(space, users, histories, targets, repeats.RepeatBoost(), 0.0, signals)
    assert fit is not None and fit.bought > 0
    assert fit.map_at_12[0] > fit.map_at_12[1]
    assert fit.weights.coef[FEATURES.index("purchases 7 days")] > 0
    nobody = [set() for _ in users]
    assert fitting.fit_second_stage(space, users, histories, nobody, repeats.RepeatBoost(), 0.0, signals) is None


def test_export_ships_the_stage_training_fitted_and_serves_it(tiny_pipeline) -> None:
    catalog = Catalog(tiny_pipeline.index_dir)
    assert catalog.second_stage is not None
    assert catalog.second_stage.signals.size == catalog.manifest.item_count
    customer = next(iter(catalog.customer_row))
    rows, ages = catalog.customer_history(customer)
    vector = catalog.customer_vector(customer)
    assert vector is not None
    request = ranking.RankRequest(
        12, prior=catalog.prior_weight, boost=catalog.score_head.repeat, bought=(rows[rows >= 0], ages[rows >= 0])
    )
    staged = ranking.rank(catalog, vector[None], [dataclasses.replace(request, stage=catalog.second_stage)])
    assert len(staged[0][1]) == 12


def test_a_long_list_keeps_every_first_stage_row_and_old_purchases_count_as_bought() -> None:
    rng = np.random.default_rng(5)
    space, signals, users = staged_space(rng, n=1000)
    weights = StageWeights(np.zeros(len(FEATURES)), np.ones(len(FEATURES)), rng.normal(size=len(FEATURES)), 0.0)
    stage = SecondStage(signals, weights)
    (_, rows), (_, capped) = ranking.rank(
        space,
        users[:2],
        [
            ranking.RankRequest(700, stage=stage),  # past the 300 + 150 + 150 a short list's pool holds
            ranking.RankRequest(200, stage=stage, max_per_type=10),  # 20 types x 10
        ],
    )
    assert len(rows) == 700 and len(capped) == 200
    ancient = (np.array([7]), np.array([5000.0], np.float32))  # bought long ago (a dated history)
    request = ranking.RankRequest(12, bought=ancient, stage=stage)
    first = ranking.rank(space, users[:1], [ranking.RankRequest(300, bought=ancient)])[0][1]
    pool, features = ranking.stage_candidates(space, users[0], request, signals, first)
    assert features[pool == 7, FEATURES.index("days since own purchase")] == NEVER


def test_a_float16_catalogue_gives_the_stage_the_features_of_float32() -> None:
    rng = np.random.default_rng(4)
    space, signals, users = staged_space(rng)
    bought = (np.array([5, 9, 40]), np.array([1.0, 2.0, 5.0], np.float32))
    request = ranking.RankRequest(12, bought=bought)
    first = ranking.rank(space, users[:1], [ranking.RankRequest(300, bought=bought)])[0][1]
    pool, features = ranking.stage_candidates(space, users[0], request, signals, first)
    space.vectors = space.vectors.astype(np.float16)  # as a catalogue exported with --vector-dtype float16
    half_pool, half_features = ranking.stage_candidates(space, users[0], request, signals, first)
    assert half_pool.tolist() == pool.tolist() and half_features.dtype == features.dtype
    np.testing.assert_allclose(half_features, features, atol=2e-3)


def test_each_feature_is_what_its_name_says() -> None:
    """Every column of a list's candidates against its definition, computed one candidate at a time."""
    rng = np.random.default_rng(6)
    space, signals, users = staged_space(rng, excluded=np.arange(300) % 11 == 0)
    space.item_bias = rng.random(300).astype(np.float32)
    boost = repeats.RepeatBoost(0.5, 0.1, 0.3, 0.1)
    # a repeated article (its youngest age and both purchases count), a sibling of it, one old purchase
    bought = (np.array([5, 9, 5, 40, -1]), np.array([1.0, 2.0, 3.0, 500.0, 0.0], np.float32))
    request = ranking.RankRequest(12, prior=0.2, boost=boost, bought=bought)
    first = ranking.rank(space, users[:1], [dataclasses.replace(request, k=300)])[0][1]
    pool, features = ranking.stage_candidates(space, users[0], request, signals, first)
    assert features.shape == (len(pool), len(FEATURES)) and features.dtype == np.float32

    history, ages = [5, 9, 5, 40], [1.0, 2.0, 3.0, 500.0]
    co = {}  # customers who bought a candidate and a distinct history article, summed over those articles
    for own in sorted(set(history)):
        for at in range(signals.co_indptr[own], signals.co_indptr[own + 1]):
            row = int(signals.co_indices[at])
            co[row] = co.get(row, 0.0) + float(signals.co_counts[at])
    co_ranked = sorted(co, key=lambda row: (-co[row], row))  # ties in row order (a stable sort of ascending rows)
    first_scores = ranking.first_stage_scores(space, users[0], request, pool)
    own_products = {int(space.products.product_of[r]) for r in history}
    for i, row in enumerate(pool.tolist()):
        vector, p1, p3, p7 = space.vectors[row], *signals.purchases[row].tolist()
        mine = [age for r, age in zip(history, ages) if r == row]
        similar = [float(space.vectors[r] @ vector) for r in history]
        co_count = co.get(row, 0.0)
        expected = {
            "served score": first_scores[i],
            "served rank": first.tolist().index(row) if row in first.tolist() else second_stage.POOL_SERVED,
            "tower cosine": float(vector @ users[0]),
            "co-purchase count": co_count,
            "co-purchase rank": co_ranked.index(row) if row in co else len(co),
            "purchases 1 day": p1,
            "purchases 3 days": p3,
            "purchases 7 days": p7,
            "days since own purchase": min(mine + [NEVER]),
            "own purchases": len(mine),
            "other colour of own purchase": float(not mine and int(space.products.product_of[row]) in own_products),
            "share of history in its product type": sum(
                space.product_types[r] == space.product_types[row] for r in history
            )
            / len(history),
            "history length": len(history),
            "product bought before": float(int(space.products.product_of[row]) in own_products),
            "max cosine to a history article": max(similar),
            "mean cosine to the history": sum(similar) / len(similar),
            "co-purchase count / sqrt(7-day purchases)": co_count / (np.sqrt(p7) + 1),
            "1-day / 7-day purchases": p1 / (p7 + 1),
            "days since first sale": signals.days_since_first_sale[row],
        }
        assert list(expected) == list(FEATURES)
        np.testing.assert_allclose(features[i], list(expected.values()), rtol=1e-5, atol=1e-5, err_msg=str(row))
    # the shown list carries the stage's probability, and the first stage's score of each of its rows
    weights = StageWeights(np.zeros(len(FEATURES)), np.ones(len(FEATURES)), rng.normal(0, 0.1, len(FEATURES)), 0.0)
    staged = dataclasses.replace(request, stage=SecondStage(signals, weights))
    (found,) = ranking.rank_lists(space, users[:1], [staged])
    np.testing.assert_allclose(found.first_stage, ranking.first_stage_scores(space, users[0], request, found.rows))
