"""Where the targets sit, and how much of each kind a ranker finds.

Each target article of a case falls in the first category that holds it: the customer's own earlier
purchase, another colour of one, the co-purchase baseline's top 100, the popularity top 100 or
101-1000, bought by someone before the cutoff, or cold. Each target weighs 1 / its case's target
count, averaged over cases, so the shares sum to 1 and a ranker's found parts sum to its
recall@100: the table says which kinds of purchases a recall@100 bar could still come from.
"""

from __future__ import annotations

import numpy as np

from evaluation.split import TemporalSplit
from twotower.repeats import Products

CATEGORIES = (
    "own earlier purchase",
    "other colour of an own purchase",
    "co-purchase top 100",
    "popularity top 100",
    "popularity 101-1000",
    "bought by others before, none of the above",
    "cold (never bought before)",
)


def target_breakdown(
    split: TemporalSplit,
    products: Products | None,
    bought: list[np.ndarray],
    co_purchase_ranked: list[np.ndarray],
    popularity_ranked: np.ndarray,
    ranked_by: dict[str, list[np.ndarray]],
    k: int = 100,
) -> dict[str, dict[str, float]]:
    """{category: {"share": its part of all targets, ranker name: its part found in that ranker's top k}}.

    `bought[i]`: case i's rows bought before the cutoff (baselines.Repurchase.bought); `co_purchase_ranked[i]`:
    case i's co-purchase list; `popularity_ranked`: the popularity list (one for everyone, at least 1,000
    long for the 101-1000 band); `ranked_by[name][i]`: a ranker's list for case i.
    """
    top_popular, next_popular = set(popularity_ranked[:100].tolist()), set(popularity_ranked[100:1000].tolist())
    parts = {c: dict.fromkeys(["share", *ranked_by], 0.0) for c in CATEGORIES}
    for case, targets in enumerate(split.targets):
        mine = set(bought[case].tolist())
        my_products = ({int(products.product_of[r]) for r in mine} - {-1}) if products is not None else set()
        co_purchased = set(co_purchase_ranked[case][:100].tolist())
        hits = {name: set(ranked[case][:k].tolist()) for name, ranked in ranked_by.items()}
        for target in targets:
            if target in mine:
                category = CATEGORIES[0]
            elif products is not None and int(products.product_of[target]) in my_products:
                category = CATEGORIES[1]
            elif target in co_purchased:
                category = CATEGORIES[2]
            elif target in top_popular:
                category = CATEGORIES[3]
            elif target in next_popular:
                category = CATEGORIES[4]
            elif target not in split.cold_rows:
                category = CATEGORIES[5]
            else:
                category = CATEGORIES[6]
            part = parts[category]
            part["share"] += 1.0 / len(targets)
            for name, found in hits.items():
                part[name] += float(target in found) / len(targets)
    cases = max(len(split.targets), 1)
    return {c: {key: value / cases for key, value in part.items()} for c, part in parts.items()}
