"""The repeat boost: own earlier purchases merged into a search result (twotower.repeats)."""

from __future__ import annotations

import numpy as np
import pytest

from twotower import fitting, ranking, repeats
from twotower.artifacts import ScoreHeadWeights


def test_latest_purchases_keeps_the_youngest_age_of_each_article() -> None:
    rows, ages = repeats.latest_purchases(np.array([7, 3, 7, -1]), np.array([0.0, 1.0, 4.0, 0.0]))
    assert dict(zip(rows.tolist(), ages.tolist())) == {3: 1.0, 7: 0.0}


def test_merge_ranks_boosted_purchases_among_search_hits_without_duplicates() -> None:
    similarities, rows = np.array([0.9, 0.8, 0.7, 0.0]), np.array([10, 11, 12, -1])
    scores, merged = repeats.merge(similarities, rows, np.array([11, 20]), np.array([0.95, 0.75]), k=4)
    assert merged.tolist() == [11, 10, 20, 12]
    assert scores.tolist() == np.float32([0.95, 0.9, 0.75, 0.7]).tolist()


def test_boost_fades_with_age_and_round_trips_through_the_score_head_json() -> None:
    boost = repeats.RepeatBoost(bonus=0.5, slope=0.1)
    values = boost(np.array([0.0, 1.0, 30.0]))
    assert values[0] == np.float32(0.5) and values[0] > values[1] > values[2]
    head = ScoreHeadWeights(np.ones(2), np.zeros(2), np.ones(2), 0.0, boost)
    assert ScoreHeadWeights.from_json(head.to_json()).repeat == boost
    legacy = {k: v for k, v in head.to_json().items() if k != "repeat"}
    assert not ScoreHeadWeights.from_json(legacy).repeat.active  # indexes written before boosts


def random_space(
    rng: np.random.Generator, products: repeats.Products | None = None
) -> tuple[ranking.ExactItems, np.ndarray]:
    """200 random articles searched exactly, and 50 random users."""
    vectors = rng.normal(size=(200, 8)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    users = rng.normal(size=(50, 8)).astype(np.float32)
    users /= np.linalg.norm(users, axis=1, keepdims=True)
    return ranking.ExactItems(vectors, products=products), users


def test_fit_finds_a_boost_when_customers_buy_again_and_none_when_they_never_do() -> None:
    rng = np.random.default_rng(0)
    space, users = random_space(rng)
    histories = [(rng.choice(200, 5, replace=False), np.arange(5, dtype=np.float32)) for _ in range(50)]
    again = [{int(h[0][0])} for h in histories]  # each buys their latest article again
    boost, value, unboosted = fitting.fit_repeat_boost(space, users, histories, again)
    assert boost.bonus > 0 and boost.slope > 0 and value > unboosted + 0.3
    nearest = space.search(users, 1)[1][:, 0]
    novel = [{int(nearest[c])} - set(histories[c][0].tolist()) or {199} for c in range(50)]
    boost, _, _ = fitting.fit_repeat_boost(space, users, histories, novel)
    assert boost.bonus <= 0.05, boost


def test_siblings_are_the_other_colours_of_bought_products_with_the_youngest_age() -> None:
    products = repeats.Products(["p1", "p1", "p1", "p2", "", ""])
    rows, ages = products.siblings(np.array([0, 3, 4]), np.array([2.0, 1.0, 0.0]))
    assert dict(zip(rows.tolist(), ages.tolist())) == {1: 2.0, 2: 2.0}  # p2 has no other article; "" is no product
    boost = repeats.RepeatBoost(1.0, 0.0, 0.5, 0.0)
    rows, boosts = repeats.candidates((np.array([1, 0]), np.array([0.0, 3.0])), boost, products)
    assert dict(zip(rows.tolist(), boosts.tolist())) == {1: 1.0, 0: 1.0, 2: 0.5}
    rows, _ = repeats.candidates((np.array([1]), np.array([0.0])), repeats.RepeatBoost(1.0), products)
    assert rows.tolist() == [1]  # no sibling boost fitted: own articles only
    legacy = repeats.RepeatBoost.from_json({"bonus": 1.0, "slope": 0.1})
    assert legacy == repeats.RepeatBoost(1.0, 0.1) and repeats.RepeatBoost.from_json(boost.to_json()) == boost


def test_fit_finds_a_sibling_boost_when_customers_buy_other_colours() -> None:
    rng = np.random.default_rng(1)
    products = repeats.Products([f"p{row // 2}" for row in range(200)])  # articles 2n and 2n+1: one product
    space, users = random_space(rng, products)
    histories = [(np.array([2 * int(p)]), np.array([1.0], np.float32)) for p in rng.choice(100, 50, replace=False)]
    other_colour = [{int(h[0][0]) + 1} for h in histories]
    boost, value, unboosted = fitting.fit_repeat_boost(space, users, histories, other_colour)
    assert boost.sibling_bonus > 0 and value > unboosted + 0.3
    space.products = None
    assert (
        fitting.fit_repeat_boost(space, users, histories, other_colour)[0].sibling_bonus == 0
    )  # no products: no siblings


@pytest.mark.parametrize("overfetch_limit", [256, 2])  # purchases dropped from a longer search; a masked search
def test_a_request_excluding_its_purchases_gets_the_best_rows_it_did_not_buy(
    overfetch_limit: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ranking, "OVERFETCH_LIMIT", overfetch_limit)
    rng = np.random.default_rng(2)
    space, users = random_space(rng)
    for user in users[:10]:
        everything = np.argsort(-(space.vectors @ user), kind="stable")
        bought = np.concatenate([everything[[0, 2, 5]], [-1]])  # -1: padding a history may carry
        request = ranking.RankRequest(k=10, bought=(bought, np.zeros(4, np.float32)), exclude_bought=True)
        _, rows = ranking.rank(space, user[None], [request])[0]
        assert rows.tolist() == [r for r in everything.tolist() if r not in bought][:10]


def test_a_request_excluding_its_purchases_still_boosts_their_other_colours() -> None:
    rng = np.random.default_rng(3)
    products = repeats.Products([f"p{row // 2}" for row in range(200)])  # articles 2n and 2n+1: one product
    space, users = random_space(rng, products)
    boost = repeats.RepeatBoost(bonus=5.0, sibling_bonus=5.0)  # large enough to lead any cosine
    bought = (np.array([10, 21]), np.array([0.0, 2.0], np.float32))
    for exclude, expected in ((False, {10, 11, 20, 21}), (True, {11, 20})):
        request = ranking.RankRequest(k=len(expected), boost=boost, bought=bought, exclude_bought=exclude)
        assert set(ranking.rank(space, users[:1], [request])[0][1].tolist()) == expected
    rows, boosts = repeats.candidates(bought, boost, products, own=False)
    assert dict(zip(rows.tolist(), boosts.tolist())) == {11: 5.0, 20: 5.0}


def test_dense_scores_of_a_few_rows_are_those_rows_of_every_rows_scores() -> None:
    rng = np.random.default_rng(4)
    products = repeats.Products([f"p{row // 2}" for row in range(200)])
    space, users = random_space(rng, products)
    boost = repeats.RepeatBoost(bonus=0.5, sibling_bonus=0.3)
    request = ranking.RankRequest(k=0, boost=boost, bought=(np.array([10, 21]), np.array([0.0, 2.0], np.float32)))
    every = ranking.dense_scores(space, users[0], request)
    rows = np.array([20, 3, 10, 11, 199, 21])  # bought, a sibling of each, and rows nobody boosts
    np.testing.assert_allclose(ranking.dense_scores(space, users[0], request, rows), every[rows], rtol=1e-6)
    assert every[10] > float(space.vectors[10] @ users[0]) + 0.4  # the boost is in both
