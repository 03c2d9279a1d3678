"""The one ranking function: what a customer, a history, a text query or an article is shown, in order.

The retriever, the offline evaluation and training's fits of the repeat boost and the popularity prior
all rank through `rank` (the fits of the boost call `finish` on a search they cache), so "what is
recommended" has a single definition. A ranking is two steps:

1. search: the top rows of an `ItemSpace` by cosine + prior * popularity bias (twotower.popularity),
   among the rows the request allows (its filters, not excluded, not already bought when the request
   excludes purchases);
2. finish: the customer's own earlier purchases and the other colours of those products
   (twotower.repeats) join at their cosine + prior * bias + repeat boost, a boosted row replacing its
   search hit; rows the request hides stay out; then at most `max_per_type` articles of one product
   type; cut to k.

A customer's or a history's list may carry a learned second stage (twotower.second_stage): between the two
steps its candidates (the first stage's top POOL_SERVED, co-purchases and best sellers the request may see) are
re-ordered by the stage's purchase probability, which the list then carries as its scores (`rank_lists` adds each
shown row's cosine + prior + boost, which the stage computed for its candidates; `first_stage_scores` computes it).

Text queries may add a lexical (BM25, serving.lexical) list: `hybrid` fuses it with the dense one by a
convex combination of both scores, each scaled to [0, 1] over the two lists' rows, both searched under the
same filters.

Numpy only: the retriever imports this without torch.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Protocol

import numpy as np

from twotower import repeats, second_stage
from twotower.files import VectorRows
from twotower.repeats import Products, RepeatBoost
from twotower.rowsets import find_sorted, member_of
from twotower.second_stage import SecondStage

Purchases = tuple[np.ndarray, np.ndarray]  # (catalogue rows most recent first, ages in days)
NOTHING_BOUGHT: Purchases = (np.empty(0, dtype=np.int64), np.empty(0, dtype=np.float32))
Ranked = tuple[np.ndarray, np.ndarray]  # (scores, rows) best first, no -1 rows
CAP_OVERFETCH = 5  # a diversity cap drops results: fetch this many times k so k usually remain
HYBRID_DEPTH = 100  # a text query fuses this many dense and this many lexical results
# A hybrid row's score: LEXICAL_WEIGHT * BM25 / the best BM25 + (1 - LEXICAL_WEIGHT) * cosine min-max scaled,
# over the rows either list found. Chosen on a second sample of make eval's text queries (seed 1, 150 per
# kind; precision@12 colour + type / pattern + type / product name): weight 0.5 0.606 / 0.612 / 0.314,
# 0.4 0.607 / 0.599 / 0.311, 0.6 0.593 / 0.620 / 0.314; reciprocal rank fusion (k = 60, what this
# replaced) 0.581 / 0.575 / 0.307. Scores keep how far apart two rows are; ranks do not.
LEXICAL_WEIGHT = 0.5
# Up to this many rows to hide from an otherwise unfiltered search (a request's own purchases, an index's
# removed articles), search for that many more and drop them: no pass over every row. A bool mask built
# per request (ones, copy, & ~excluded, count) cost 0.6 ms at 1M rows and 16 ms at 10M.
OVERFETCH_LIMIT = 256
# Queries an exact search scores at once: a [64, N] score matrix is 27 MB at H&M's 105k articles.
EXACT_QUERY_BLOCK = 64


class ItemSpace(Protocol):
    """What ranking searches: N catalogue rows scored by inner product with a query (+ prior * bias).

    serving.catalog.Catalog (the FAISS index as served) and `ExactItems` (brute force over a vector
    table) are the two implementations.
    """

    excluded: np.ndarray  # bool [N]: rows never returned (removed or replaced articles)
    n_excluded: int  # how many
    item_bias: np.ndarray | None  # float32 [N]: the popularity prior's bias per row (twotower.popularity), if any
    products: Products | None  # articles of one product, for the sibling boost
    product_types: np.ndarray  # int [N]: product type code per row, for the diversity cap

    @property
    def vectors(self) -> VectorRows:
        """float32 [N, D]: the item vectors (the second stage compares candidates with a history)."""
        ...

    def search(self, queries: np.ndarray, k: int, prior: float | np.ndarray = 0.0) -> tuple[np.ndarray, np.ndarray]:
        """(scores, rows) [B, k] over every row not excluded; rows are -1 past the last result."""
        ...

    def search_masked(
        self, query: np.ndarray, k: int, allowed: np.ndarray, prior: float = 0.0
    ) -> tuple[np.ndarray, np.ndarray]:
        """(scores, rows) [k] among the rows `allowed` (and not excluded) for one query."""
        ...

    def scores(self, query: np.ndarray, rows: np.ndarray | slice, prior: float = 0.0) -> np.ndarray:
        """What the search ranks `rows` (or every row: slice(None)) by for one query: cosine + prior * popularity
        bias."""
        ...

    def shown(self, allowed: np.ndarray) -> np.ndarray:
        """bool [N], not to be written to: the rows of `allowed` not excluded (`allowed` itself when none are)."""
        ...


def item_scores(
    vectors: VectorRows, bias: np.ndarray | None, query: np.ndarray, rows: np.ndarray | slice, prior: float
) -> np.ndarray:
    """cosine + prior * bias of `rows` for a query [D] (or queries [B, D]): the score every search ranks by."""
    scores = query @ vectors[rows].T
    if prior and bias is not None:
        scores = scores + prior * bias[rows]
    return scores


@dataclasses.dataclass(frozen=True)
class RankRequest:
    """One list to rank. A customer's or a history's list carries `prior` (the index's popularity
    weight), `boost` (its repeat boost) and `bought`; a text query none of them; an article's similar
    items `bought` = the article itself with `exclude_bought`."""

    k: int
    prior: float = 0.0  # popularity prior weight; 0 ranks by cosine alone
    boost: RepeatBoost = RepeatBoost()  # inactive: own purchases get no second chance
    bought: Purchases = NOTHING_BOUGHT  # what the boost reads; hidden when exclude_bought
    allowed: np.ndarray | None = None  # bool [N] the request's filters allow; None = every row
    exclude_bought: bool = False  # never return a bought row (other colours keep their boost)
    max_per_type: int | None = None  # diversity cap
    fetch_limit: int | None = None  # most rows a capped request may fetch
    stage: SecondStage | None = None  # re-orders the list's candidates (customers' and histories' lists)

    @property
    def searches_everything(self) -> bool:
        """Searched with the plain index, batched with other such requests."""
        return self.allowed is None and not self.exclude_bought and self.max_per_type is None

    @property
    def fetch(self) -> int:
        """Rows to search for before the cap thins them out."""
        if self.max_per_type is None:
            rows = self.k
        elif self.fetch_limit is None:
            rows = CAP_OVERFETCH * self.k
        else:
            rows = min(self.fetch_limit, CAP_OVERFETCH * self.k)
        return rows if self.stage is None else max(rows, second_stage.POOL_SERVED)


class RankedList(NamedTuple):
    """A ranked list as the retriever shows it: `Ranked` plus, where a second stage ordered the list (its
    scores then its purchase probability), each row's first-stage score (cosine + prior + boost)."""

    scores: np.ndarray
    rows: np.ndarray
    first_stage: np.ndarray | None


def rank(space: ItemSpace, queries: np.ndarray, requests: list[RankRequest]) -> list[Ranked]:
    """Each query [B, D] ranked for its request. Requests that search everything share one search."""
    return [(found.scores, found.rows) for found in rank_lists(space, queries, requests)]


def rank_lists(space: ItemSpace, queries: np.ndarray, requests: list[RankRequest]) -> list[RankedList]:
    """`rank`, with the first-stage scores of staged lists (the stage computed them for its candidates)."""
    results: list[RankedList | None] = [None] * len(requests)
    boosted = [boosted_rows(space, request) for request in requests]
    # A boosted row whose boost is negative may fall out of the top: fetch one more row for each.
    extra = [int((boosts < 0).sum()) for _, boosts in boosted]
    shared = [i for i, request in enumerate(requests) if request.searches_everything]
    if shared:
        fetch = max(requests[i].fetch + extra[i] for i in shared)
        priors = np.asarray([requests[i].prior for i in shared], dtype=np.float32)
        similarities, rows = space.search(queries[shared], fetch, priors)
        for j, i in enumerate(shared):
            n = requests[i].fetch + extra[i]
            results[i] = _finish(space, queries[i], requests[i], similarities[j, :n], rows[j, :n], boosted[i])
    for i, request in enumerate(requests):
        if results[i] is None:
            similarities, rows = _search_one(space, queries[i], request, request.fetch + extra[i])
            results[i] = _finish(space, queries[i], request, similarities, rows, boosted[i])
    return [r for r in results if r is not None]


def _search_one(space: ItemSpace, query: np.ndarray, request: RankRequest, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The top n rows one request may see (rows -1 past the last result). Its few hidden rows (its purchases when
    it excludes them) are dropped from a longer search: a plain one, or a masked one by its filters' own mask, which
    the space keeps with what it learnt of it (counts, bitmap, lists); a mask of its own per request took 3-4 ms at
    10M rows (combine, count, pack). Many hidden rows: a masked search by a mask without them."""
    hidden = np.unique(request.bought[0][request.bought[0] >= 0]) if request.exclude_bought else NOTHING_BOUGHT[0]
    if len(hidden) <= OVERFETCH_LIMIT:
        if request.allowed is None:
            found_similarities, found_rows = space.search(query[None], n + len(hidden), request.prior)
            similarities, rows = found_similarities[0], found_rows[0]
        else:
            mask = space.shown(request.allowed)  # the filters' mask without the space's excluded rows
            similarities, rows = space.search_masked(query, n + len(hidden), mask, request.prior)
        shown = ~member_of(rows, hidden)
        return similarities[shown][:n], rows[shown][:n]
    return space.search_masked(query, n, visible(space, request), request.prior)


def visible(space: ItemSpace, request: RankRequest) -> np.ndarray:
    """bool [N]: rows this request may return (its filters, minus what it bought when it excludes that). Not to be
    written to: with nothing to take out, the request's own mask (read-only: serving.filters caches them), or the
    space's combination of it with the excluded rows (a served index keeps a recent filter's: Catalog.shown)."""
    if request.allowed is not None and not request.exclude_bought:
        return space.shown(request.allowed)  # a copy of 10M rows takes 1.3 ms: none where nothing is excluded
    # A new array in one pass. At 10M rows allowed > excluded (allowed and not excluded, for bools) takes 1.7 ms;
    # copy, negate and & took 4.0.
    allowed = ~space.excluded if request.allowed is None else np.greater(request.allowed, space.excluded)
    if request.exclude_bought:
        bought = request.bought[0]
        allowed[bought[bought >= 0]] = False
    return allowed


def boosted_rows(space: ItemSpace, request: RankRequest) -> tuple[np.ndarray, np.ndarray]:
    """The rows the repeat boost adds for this request and each one's boost (none when it is off). A request
    that excludes what was bought keeps the boost of those products' other colours: they are new to the
    customer, and about 8% of the new articles customers buy on H&M (reports/hm_lastweek/eval.md)."""
    if not request.boost.active or len(request.bought[0]) == 0:
        return NOTHING_BOUGHT
    rows, boosts = repeats.candidates(request.bought, request.boost, space.products, own=not request.exclude_bought)
    shown = ~space.excluded[rows] if request.allowed is None else ~space.excluded[rows] & request.allowed[rows]
    return rows[shown], boosts[shown]


def finish(
    space: ItemSpace, query: np.ndarray, request: RankRequest, similarities: np.ndarray, rows: np.ndarray
) -> Ranked:
    """Step 2 over a search result (scores and rows best first, -1 ignored) that already honours the
    request's filters: the repeat merge, the diversity cap, the cut to k. The search must have fetched
    at least `request.fetch` rows plus one per negatively boosted row."""
    scores, rows, _ = _finish(space, query, request, similarities, rows, boosted_rows(space, request))
    return scores, rows


def _finish(
    space: ItemSpace,
    query: np.ndarray,
    request: RankRequest,
    similarities: np.ndarray,
    rows: np.ndarray,
    boosted: tuple[np.ndarray, np.ndarray],
) -> RankedList:
    own_rows, boosts = boosted
    if len(own_rows):
        scores = space.scores(query, own_rows, request.prior) + boosts
        similarities, rows = repeats.merge(similarities, rows, own_rows, scores, request.fetch)
    else:
        keep = rows >= 0
        similarities, rows = similarities[keep], rows[keep]
    first_stage = None
    if request.stage is not None:
        rows, features = stage_candidates(space, query, request, request.stage.signals, rows, boosted)
        scores = request.stage.weights(features)
        order = np.argsort(-scores, kind="stable")
        similarities, rows = 1.0 / (1.0 + np.exp(-scores[order])), rows[order]
        first_stage = features[order, second_stage.SERVED_SCORE]  # the shown rows' first-stage scores, computed
    shown: slice | np.ndarray = (
        slice(request.k)
        if request.max_per_type is None
        else capped_positions(rows, space.product_types, request.max_per_type, request.k)
    )
    return RankedList(similarities[shown], rows[shown], None if first_stage is None else first_stage[shown])


def first_stage_scores(
    space: ItemSpace,
    query: np.ndarray,
    request: RankRequest,
    rows: np.ndarray,
    boosted: tuple[np.ndarray, np.ndarray] | None = None,
    cosine: np.ndarray | None = None,
) -> np.ndarray:
    """float32: what the first stage ranks `rows` by for this request: cosine (given, or computed) + prior * bias
    + repeat boost."""
    own_rows, boosts = boosted_rows(space, request) if boosted is None else boosted
    scores = np.array(space.vectors[rows] @ query if cosine is None else cosine, dtype=np.float32)
    if request.prior and space.item_bias is not None:
        scores += request.prior * space.item_bias[rows]
    add_boosts(scores, rows, (own_rows, boosts))
    return scores


def add_boosts(scores: np.ndarray, rows: np.ndarray, boosted: tuple[np.ndarray, np.ndarray]) -> None:
    """scores[i] += the boost of rows[i], for the rows among `boosted` (rows, boosts: boosted_rows')."""
    own_rows, boosts = boosted
    if len(own_rows):
        by_row = np.argsort(own_rows)
        at, found = find_sorted(own_rows[by_row], rows)
        scores[found] += boosts[by_row[at[found]]]


def stage_candidates(
    space: ItemSpace,
    query: np.ndarray,
    request: RankRequest,
    signals: second_stage.ArticleSignals,
    rows: np.ndarray,
    boosted: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(candidate rows, features) of the second stage over a first-stage list (its rows best first, boosts merged,
    no -1 rows: `rank` of the request with k = POOL_SERVED and no stage gives one). Training's fit calls this
    before there are weights."""
    boosted = boosted_rows(space, request) if boosted is None else boosted

    def shown(candidates: np.ndarray) -> np.ndarray:
        keep = ~space.excluded[candidates]
        if request.allowed is not None:
            keep &= request.allowed[candidates]
        if request.exclude_bought:
            keep &= ~member_of(candidates, request.bought[0])
        return keep

    return second_stage.candidates(
        signals,
        second_stage.Candidates(rows, *request.bought),
        shown,
        lambda candidates, cosine: first_stage_scores(space, query, request, candidates, boosted, cosine),
        query,
        space.vectors,
        space.product_types,
        space.products,
    )


def cap_per_type(similarities: np.ndarray, rows: np.ndarray, product_types: np.ndarray, cap: int, k: int) -> Ranked:
    """The best-first list with at most `cap` articles of any one product type, up to k of them."""
    keep = capped_positions(rows, product_types, cap, k)
    return similarities[keep], rows[keep]


def capped_positions(rows: np.ndarray, product_types: np.ndarray, cap: int, k: int) -> np.ndarray:
    """Positions in a best-first list (-1 rows end it) of its first k rows with at most `cap` of a product type."""
    counts: dict[int, int] = {}
    kept = []
    for i, row in enumerate(rows.tolist()):
        if row < 0:
            break
        kind = int(product_types[row])
        if counts.get(kind, 0) < cap:
            counts[kind] = counts.get(kind, 0) + 1
            kept.append(i)
            if len(kept) == k:
                break
    return np.asarray(kept, dtype=np.int64)


def hybrid(
    space: ItemSpace, query: np.ndarray, request: RankRequest, lexical_rows: np.ndarray, lexical_scores: np.ndarray
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """A text query's list: the dense ranking and `lexical_rows` (best first, searched among
    `visible(space, request)`; `lexical_scores` [N] every row's BM25) fused by `fuse_scores`, then capped
    and cut to k. Scores are the cosine (+ prior), as for any list; the third value says which retriever
    found each row."""
    depth = max(HYBRID_DEPTH, request.fetch)
    dense_request = dataclasses.replace(request, k=depth, max_per_type=None)
    _, dense_rows = rank(space, query[None], [dense_request])[0]
    rows = np.concatenate([dense_rows, lexical_rows[:depth]])
    rows = rows[np.sort(np.unique(rows, return_index=True)[1])]  # each once, dense first
    scores = space.scores(query, rows, request.prior).astype(np.float32)
    order = np.argsort(-fuse_scores(scores, lexical_scores[rows]), kind="stable")
    scores, rows = scores[order], rows[order]
    if request.max_per_type is not None:
        scores, rows = cap_per_type(scores, rows, space.product_types, request.max_per_type, request.k)
    scores, rows = scores[: request.k], rows[: request.k]
    dense, lexical = set(dense_rows.tolist()), set(lexical_rows[:depth].tolist())
    sources = [
        "+".join(name for name, found in (("dense", dense), ("lexical", lexical)) if row in found)
        for row in rows.tolist()
    ]
    return scores, rows, sources


def fuse_scores(dense: np.ndarray, lexical: np.ndarray, lexical_weight: float = LEXICAL_WEIGHT) -> np.ndarray:
    """One score per candidate row from its dense and BM25 scores, each scaled to [0, 1] over the candidates
    (BM25 divided by its best: 0 stays "no word matched"; a query no article matches ranks by dense alone)."""
    spread = float(dense.max() - dense.min()) if len(dense) else 0.0
    dense01 = (dense - dense.min()) / spread if spread > 0 else np.ones_like(dense)
    best = float(lexical.max()) if len(lexical) else 0.0
    lexical01 = lexical / best if best > 0 else np.zeros_like(lexical)
    return lexical_weight * lexical01 + (1.0 - lexical_weight) * dense01


def dense_scores(
    space: ItemSpace, query: np.ndarray, request: RankRequest, rows: np.ndarray | slice = slice(None)
) -> np.ndarray:
    """float64 [N] (or of `rows` only): each row's score as `rank` orders them (boosted rows at their
    boosted score), for protocols that score one article against sampled others."""
    scores = space.scores(query, rows, request.prior).astype(np.float64)
    boosted = boosted_rows(space, request)
    if isinstance(rows, slice):
        scores[boosted[0]] += boosted[1]
    else:
        add_boosts(scores, rows, boosted)
    return scores


class ExactItems:
    """An `ItemSpace` searched by brute force over a vector table (the evaluation's exact rows, the fits
    in training). With `searchable`, searches see only those rows, while `scores` scores any row (a
    boosted row outside them still competes, as the fits in training need)."""

    def __init__(
        self,
        vectors: np.ndarray,
        bias: np.ndarray | None = None,
        searchable: np.ndarray | None = None,
        products: Products | None = None,
        product_types: np.ndarray | None = None,
        excluded: np.ndarray | None = None,
    ):
        self.vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        self.item_bias = bias
        n = len(self.vectors)
        self.searchable = np.arange(n) if searchable is None else np.asarray(searchable, dtype=np.int64)
        self.products = products
        self.product_types = np.zeros(n, dtype=np.int64) if product_types is None else product_types
        self.excluded = np.zeros(n, dtype=bool) if excluded is None else excluded
        self.n_excluded = int(np.count_nonzero(self.excluded))
        # What an unfiltered search scores, gathered once: gathering 105k rows per query (a 54 MB copy) was
        # 96% of the time of make eval's exact rows and of training's fits.
        self._candidates = self.searchable[~self.excluded[self.searchable]]
        self._candidate_vectors = self.vectors[self._candidates]
        self._candidate_bias = None if bias is None else np.asarray(bias)[self._candidates]

    def scores(self, query: np.ndarray, rows: np.ndarray | slice = slice(None), prior: float = 0.0) -> np.ndarray:
        return item_scores(self.vectors, self.item_bias, query, rows, prior)

    def search(self, queries: np.ndarray, k: int, prior: float | np.ndarray = 0.0) -> tuple[np.ndarray, np.ndarray]:
        priors = np.broadcast_to(np.asarray(prior, dtype=np.float32), (len(queries),))
        found = []
        for start in range(0, len(queries), EXACT_QUERY_BLOCK):
            block = slice(start, start + EXACT_QUERY_BLOCK)
            scores = item_scores(self._candidate_vectors, None, queries[block], slice(None), 0.0)
            if self._candidate_bias is not None:
                scores += priors[block, None] * self._candidate_bias[None, :]
            found += [top_k(row, self._candidates, k) for row in scores]
        if not found:
            return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
        return np.stack([f[0] for f in found]), np.stack([f[1] for f in found])

    def shown(self, allowed: np.ndarray) -> np.ndarray:
        return np.greater(allowed, self.excluded) if self.n_excluded else allowed

    def search_masked(
        self, query: np.ndarray, k: int, allowed: np.ndarray, prior: float = 0.0
    ) -> tuple[np.ndarray, np.ndarray]:
        candidates = self.searchable[allowed[self.searchable] & ~self.excluded[self.searchable]]
        return self._top(query, k, candidates, prior)

    def _top(self, query: np.ndarray, k: int, candidates: np.ndarray, prior: float) -> tuple[np.ndarray, np.ndarray]:
        return top_k(self.scores(query, candidates, prior), candidates, k)


def top_k(scores: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k best of `rows` by `scores` (float32 [k], int64 [k], best first, ties by position; -1 past
    the end)."""
    out_scores = np.full(k, -np.inf, dtype=np.float32)
    out_rows = np.full(k, -1, dtype=np.int64)
    top = min(k, len(rows))
    if top == 0:
        return out_scores, out_rows
    best = np.argpartition(-scores, top - 1)[:top]
    best = best[np.argsort(-scores[best], kind="stable")]
    out_scores[:top], out_rows[:top] = scores[best], rows[best]
    return out_scores, out_rows
