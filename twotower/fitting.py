"""Fitting the repeat boost and the popularity prior on held-out whole days, ranking as served.

Both are fitted after training, on days the towers never trained on (never on an evaluation target),
by grid search over what twotower.ranking does with them: the boost for MAP@12 (what is shown first),
then the prior's weight for recall@100 (what candidate generation finds). Each case is a customer's
history before the held-out day, a user vector and the articles bought on that day.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Iterable, Sequence

import numpy as np

from twotower import ranking, repeats, second_stage
from twotower.metrics import map_at_k, recall_at_k
from twotower.ranking import ItemSpace, Purchases, RankRequest
from twotower.repeats import RepeatBoost
from twotower.second_stage import ArticleSignals, StageWeights

BONUS_GRID = (0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0)
SLOPE_GRID = (0.0, 0.02, 0.05, 0.1, 0.2)
SIBLING_BONUS_GRID = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.75)
SIBLING_SLOPE_GRID = (0.0, 0.1, 0.2)
WEIGHT_GRID = (0.0, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5)


NO_BOOST = RepeatBoost()


def held_out_rankings(
    space: ItemSpace,
    users: np.ndarray,
    histories: Sequence[Purchases],
    k: int,
    boost: RepeatBoost = NO_BOOST,
    prior: float = 0.0,
    exclude_bought: bool = False,
) -> list[np.ndarray]:
    """Each case's top-k rows as a customer's list is served (twotower.ranking.rank)."""
    return [rows for _, rows in ranking.rank(space, users, served_requests(histories, k, boost, prior, exclude_bought))]


def served_requests(
    histories: Sequence[Purchases], k: int, boost: RepeatBoost, prior: float, exclude_bought: bool = False
) -> list[RankRequest]:
    """Each case's request as a customer's list of k is served: its history boosted, the prior weighed."""
    return [
        RankRequest(k, prior=prior, boost=boost, bought=history, exclude_bought=exclude_bought) for history in histories
    ]


def fit_repeat_boost(
    space: ItemSpace,
    users: np.ndarray,
    histories: Sequence[Purchases],
    targets: Sequence[set[int]],
    k: int = 12,
    grid: Iterable[tuple[float, float]] = tuple(itertools.product(BONUS_GRID, SLOPE_GRID)),
    sibling_grid: Iterable[tuple[float, float]] = tuple(itertools.product(SIBLING_BONUS_GRID, SIBLING_SLOPE_GRID)),
) -> tuple[RepeatBoost, float, float]:
    """The boost with the best MAP@k over the cases, that MAP, and the MAP without a boost.

    Coordinate ascent: own-article (bonus, slope) over `grid`, then the sibling pair over `sibling_grid`
    (when the space knows products), then own again. Ranked by cosine alone (the prior is fitted after).
    Each case is searched once, deep enough for any boost on the grids, and every grid point then only
    runs ranking.finish on that search.
    """
    products = space.products
    full = RepeatBoost(1.0, 0.0, 1.0 if products is not None else 0.0, 0.0)  # every row any boost could touch
    searches = []
    for case, history in enumerate(histories):
        rows, _ = repeats.candidates(history, full, products)
        similarities, found = space.search(users[case : case + 1], k + len(rows))
        searches.append((similarities[0], found[0]))

    def score(boost: RepeatBoost) -> float:
        ranked = [
            ranking.finish(space, users[case], RankRequest(k, boost=boost, bought=history), *searches[case])[1]
            for case, history in enumerate(histories)
        ]
        return map_at_k(ranked, list(targets), k)

    unboosted = score(RepeatBoost())
    best, best_map = RepeatBoost(), unboosted
    rounds = [("own", grid)] + ([("sibling", sibling_grid), ("own", grid)] if products is not None else [])
    for part, pairs in rounds:
        for a, b in dict.fromkeys(pairs):
            boost = (
                dataclasses.replace(best, bonus=a, slope=b)
                if part == "own"
                else dataclasses.replace(best, sibling_bonus=a, sibling_slope=b)
            )
            value = score(boost)
            if value > best_map + 1e-9:  # ties keep the simpler, earlier boost
                best, best_map = boost, value
    return best, best_map, unboosted


def fit_prior_weight(
    space: ItemSpace,
    users: np.ndarray,
    histories: Sequence[Purchases],
    targets: Sequence[set[int]],
    boost: RepeatBoost,
    k: int = 100,
    grid: Sequence[float] = WEIGHT_GRID,
    exclude_bought: bool = False,
    prefer: float = 0.0,
) -> tuple[float, float, float]:
    """The popularity prior's weight with the best recall@k over the cases (ranked as served, after the
    boost), that recall, and the recall without a prior. Ties keep `prefer`: no prior (it only earns its
    place by finding more), or for lists without the customer's own articles (`exclude_bought`; targets
    then hold only articles the case had not bought) the weight of full lists. Then the smaller weight.
    No cases (no held-out customer bought an article new to them): `prefer`, recalls 0."""
    if not targets:
        return prefer, 0.0, 0.0

    def recall(weight: float) -> float:
        ranked = held_out_rankings(space, users, histories, k, boost, weight, exclude_bought)
        return recall_at_k(ranked, list(targets), k)

    without = recall(0.0)
    best, best_recall = prefer, without if prefer == 0.0 else recall(prefer)
    for weight in sorted((set(grid) | {0.0}) - {prefer}):
        value = without if weight == 0.0 else recall(weight)
        if value > best_recall + 1e-9:
            best, best_recall = weight, value
    return best, best_recall, without


@dataclasses.dataclass(frozen=True)
class StageFit:
    """The second stage's weights and the held-out lists' quality with and without it. In-sample: the weights
    were fitted on these cases (make eval measures it on a later day)."""

    weights: StageWeights
    candidates: int
    bought: int
    recall_at_100: tuple[float, float]  # (with the stage, first stage alone)
    map_at_12: tuple[float, float]


def stage_pools(
    space: ItemSpace,
    users: np.ndarray,
    histories: Sequence[Purchases],
    boost: RepeatBoost,
    prior: float,
    signals: ArticleSignals,
) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
    """Each case's first-stage list as served (boost and prior, POOL_SERVED deep), and the second stage's
    candidates and features over it."""
    requests = served_requests(histories, second_stage.POOL_SERVED, boost, prior)
    first = [rows for _, rows in ranking.rank(space, users, requests)]
    pools, features = [], []
    for case, (request, rows) in enumerate(zip(requests, first)):
        pool, case_features = ranking.stage_candidates(space, users[case], request, signals, rows)
        pools.append(pool)
        features.append(case_features)
    return first, pools, features


def fit_second_stage(
    space: ItemSpace,
    users: np.ndarray,
    histories: Sequence[Purchases],
    targets: Sequence[set[int]],
    boost: RepeatBoost,
    prior: float,
    signals: ArticleSignals,
) -> StageFit | None:
    """Logistic weights over the candidates of the cases' lists, ranked as served (boost and prior), labelled by
    what each case bought. None when the candidates hold no purchase, or nothing else (nothing to learn from)."""
    plain, pools, features = stage_pools(space, users, histories, boost, prior, signals)
    bought = np.concatenate([np.isin(pool, list(case_targets)) for pool, case_targets in zip(pools, targets)])
    if not bought.any() or bought.all():
        return None
    weights = StageWeights.fit(np.concatenate(features), bought)
    staged = [pool[np.argsort(-weights(case_features), kind="stable")] for pool, case_features in zip(pools, features)]
    return StageFit(
        weights,
        len(bought),
        int(bought.sum()),
        (recall_at_k(staged, list(targets), 100), recall_at_k(plain, list(targets), 100)),
        (map_at_k(staged, list(targets), 12), map_at_k(plain, list(targets), 12)),
    )
