"""The two-tower model as served: the exported TorchScript user tower + the built FAISS index."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from evaluation.baselines import Ranker
from evaluation.split import TemporalSplit
from serving.catalog import Catalog
from twotower import ranking, repeats


@dataclasses.dataclass
class CaseUsers:
    """Each case's history (rows, ages; no padding) and its user vector from the exported user tower."""

    pairs: list[tuple[np.ndarray, np.ndarray]]
    users: np.ndarray  # float32 [cases, dim]


def case_users(
    split: TemporalSplit, catalog: Catalog, user_tower: torch.jit.ScriptModule, batch_size: int = 256
) -> CaseUsers:
    histories = split.histories(catalog.manifest.max_history)
    pairs = [(rows[rows >= 0], ages[rows >= 0]) for rows, ages in zip(histories.rows, histories.age_days)]
    chunks = []
    with torch.inference_mode():
        for start in range(0, len(pairs), batch_size):
            tensors = catalog.history_tensors(pairs[start : start + batch_size])
            chunks.append(user_tower(*(torch.from_numpy(t) for t in tensors)).numpy())
    return CaseUsers(pairs, np.concatenate(chunks) if chunks else np.zeros((0, catalog.manifest.dim), np.float32))


RANK_BLOCK = 256  # cases ranked in one call


class TwoTower(Ranker):
    """Ranks as the retriever does (twotower.ranking over the FAISS index) or, with exact=True, over a
    brute-force search of all vectors.

    Either way the customer's own earlier purchases (and their products' other colours) compete with
    their boosted cosine, and every article with its popularity prior, as served. The variants without
    them show what each adds. Variants share one `CaseUsers`: the user tower runs once per split.
    """

    def __init__(
        self,
        cases: CaseUsers,
        catalog: Catalog,
        exact: bool = False,
        repeat_boost: bool = True,
        popularity_prior: bool = True,
        exclude_purchased: bool = False,
        second_stage: bool = True,
    ):
        self.name = "two-tower (exact)" if exact else f"two-tower ({catalog.manifest.index_type})"
        self.exclude_purchased = exclude_purchased
        if exclude_purchased:
            self.name += " exclude_purchased"
        parts = (("repeat boost", repeat_boost), ("popularity prior", popularity_prior))
        left_out = [part for part, kept in parts if not kept]
        self.stage = catalog.second_stage if second_stage else None
        if catalog.second_stage is not None and not second_stage:
            self.name += " first stage"
        if left_out:
            self.name = self.name.replace("two-tower", "two-tower without " + " or ".join(left_out))
        self.space: ranking.ItemSpace = catalog
        if exact:
            self.space = ranking.ExactItems(
                catalog.vectors,
                catalog.item_bias,
                products=catalog.products,
                product_types=catalog.product_types,
                excluded=catalog.excluded,
            )
        self.boost = catalog.score_head.repeat if repeat_boost else repeats.RepeatBoost()
        self.prior = catalog.prior_weight_for(exclude_purchased) if popularity_prior else 0.0
        self.pairs, self.users = cases.pairs, cases.users

    def request(self, case: int, k: int) -> ranking.RankRequest:
        """A customer's list, as the retriever asks for it."""
        return ranking.RankRequest(
            k,
            prior=self.prior,
            boost=self.boost,
            bought=self.pairs[case],
            exclude_bought=self.exclude_purchased,
            stage=self.stage,
        )

    def scores(self, case: int) -> np.ndarray:
        """Every row's first-stage score (the sampled protocol): the second stage only re-orders a list."""
        return ranking.dense_scores(self.space, self.users[case], self.request(case, 0))

    def sampled_scores(self, case: int, rows: np.ndarray) -> np.ndarray:
        return ranking.dense_scores(self.space, self.users[case], self.request(case, 0), rows)

    def rank(self, case: int, k: int) -> np.ndarray:
        return self.rank_all_of(np.asarray([case]), k)[0]

    def rank_all(self, cases: int, k: int) -> list[np.ndarray]:
        return self.rank_all_of(np.arange(cases), k)

    def rank_all_of(self, cases: np.ndarray, k: int) -> list[np.ndarray]:
        """`rank` of each case, a block of cases searched at once, as the retriever batches requests (the
        re-ranking indexes gather [block, candidates, dim] vectors: blocks keep that small)."""
        out: list[np.ndarray] = []
        for start in range(0, len(cases), RANK_BLOCK):
            block = cases[start : start + RANK_BLOCK]
            requests = [self.request(int(case), k) for case in block]
            out += [rows for _, rows in ranking.rank(self.space, self.users[block], requests)]
        return out
