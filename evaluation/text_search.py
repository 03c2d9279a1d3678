"""Text search relevance: do shopper-style queries find the articles they describe?

Queries are drawn from the catalogue's own attributes, so relevance needs no labels: "<colour> <product
type>" ("grey dress"; relevant = articles of that colour and type), "<pattern> <product type>"
("striped t-shirt") and a product's name (relevant = the articles of that name). Each query runs
through the served artifacts (the exported query tower, the index, its BM25 index) three ways:
lexical only, dense only (`--text-search dense`), and hybrid (the retriever's default). When the
index serves a distilled query tower, dense and hybrid also run with the item tower it was distilled
from, to show what the distillation costs. Reported: precision@12 and NDCG@12 per query kind and
retriever, and paired bootstrap intervals for the targets.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import numpy as np
import pandas as pd
import torch

from evaluation.intervals import paired_bootstrap
from serving.catalog import Catalog
from serving.lexical import hybrid_rank
from twotower import metrics, ranking
from twotower.data.pairs import UNINFORMATIVE

log = logging.getLogger("evaluation.text_search")

K = 12
# Every combination at least 2 articles share, up to this many per kind (a random sample past it: H&M has
# 2,196 colour + type and 934 pattern + type combinations, all used, and 22,335 product names). A sample of
# 150 left both colour + type targets a tie on H&M (intervals +-0.03); all 2,196 resolve +-0.008.
QUERIES_PER_KIND = 2500
RETRIEVERS = ("lexical", "dense", "hybrid")
ITEM_TOWER_SUFFIX = ", item tower"  # dense and hybrid with the item tower instead of the query tower
# query kind -> the article columns whose lower-cased values, joined, make the query text
KINDS = {
    "colour + type": ("colour_group_name", "product_type_name"),
    "pattern + type": ("graphical_appearance_name", "product_type_name"),
    "product name": ("prod_name",),
}


def attribute_queries(
    articles: pd.DataFrame, columns: tuple[str, ...], n: int = QUERIES_PER_KIND, seed: int = 0, min_articles: int = 2
) -> list[tuple[str, set[int]]]:
    """(query text, relevant rows) for every distinct value combination with at least `min_articles`
    articles, or a random n of them where there are more."""
    if not set(columns) <= set(articles.columns):
        return []
    frame = articles[list(columns)].astype(str).apply(lambda column: column.str.strip().str.lower())
    usable = (~frame.isin(UNINFORMATIVE).any(axis=1)).to_numpy()  # "" is one of them
    positions = np.flatnonzero(usable)  # catalogue rows: articles are in catalogue order
    groups = frame[usable].groupby(list(columns)).indices  # key -> positions within the usable rows
    combos = sorted((key, rows) for key, rows in groups.items() if len(rows) >= min_articles)
    picked = np.random.default_rng(seed).permutation(len(combos))[:n]
    queries = []
    for i in sorted(picked.tolist()):
        key, rows = combos[i]
        words = key if isinstance(key, tuple) else (key,)
        queries.append((" ".join(words), {int(r) for r in positions[rows]}))
    return queries


def rankings(catalog: Catalog, vectors: np.ndarray, texts: list[str], suffix: str = "") -> dict[str, list[np.ndarray]]:
    """Each retriever's top K rows for each text (with its query vector); lexical only without a suffix."""
    assert catalog.lexical is not None
    out: dict[str, list[np.ndarray]] = {name + suffix: [] for name in RETRIEVERS if name != "lexical" or not suffix}
    for text, vector in zip(texts, vectors):
        request = ranking.RankRequest(K)
        if not suffix:
            out["lexical"].append(catalog.lexical.search(text, K, ranking.visible(catalog, request)))
        out["dense" + suffix].append(ranking.rank(catalog, vector[None], [request])[0][1])
        out["hybrid" + suffix].append(hybrid_rank(catalog, catalog.lexical, vector, text, request)[1])
    return out


def query_vectors(tower: torch.jit.ScriptModule, tokenizer: Callable[[list[str]], torch.Tensor], texts: list[str]):
    with torch.inference_mode():
        return np.concatenate([tower(tokenizer(texts[s : s + 256])).numpy() for s in range(0, len(texts), 256)])


def evaluate_text_search(
    articles: pd.DataFrame,
    catalog: Catalog,
    query_tower: torch.jit.ScriptModule,
    tokenizer: Callable[[list[str]], torch.Tensor],
    item_tower: torch.jit.ScriptModule | None = None,
) -> dict[str, Any]:
    """precision@12 / NDCG@12 per query kind and retriever, and the targets (empty when the index has no
    BM25 index: exported before hybrid search). `query_tower` is what the service runs for text queries;
    with `item_tower` (the one it was distilled from) dense and hybrid are also measured with that."""
    if catalog.lexical is None:
        return {}
    result: dict[str, Any] = {"k": K, "kinds": {}, "targets": {}}
    for kind, columns in KINDS.items():
        queries = attribute_queries(articles, columns)
        if not queries:
            continue
        texts, relevant = [text for text, _ in queries], [rows for _, rows in queries]
        ranked = rankings(catalog, query_vectors(query_tower, tokenizer, texts), texts)
        if item_tower is not None:
            ranked |= rankings(catalog, query_vectors(item_tower, tokenizer, texts), texts, ITEM_TOWER_SUFFIX)
        precision = {name: metrics.precision_per_case(rows, relevant, K) for name, rows in ranked.items()}
        result["kinds"][kind] = {
            "queries": len(queries),
            "examples": texts[:3],
            **{
                name: {"precision@12": float(precision[name].mean()), "ndcg@12": metrics.ndcg_at_k(rows, relevant, K)}
                for name, rows in ranked.items()
            },
        }
        if kind == "colour + type":
            result["targets"] = {
                "hybrid precision@12 >= 1.1 x lexical": paired_bootstrap(
                    precision["hybrid"], precision["lexical"], ratio=1.1
                ).to_json(),
                "dense precision@12 >= lexical": paired_bootstrap(precision["dense"], precision["lexical"]).to_json(),
            }
        log.info(
            "text search, %s (%d queries): precision@12 %s",
            kind,
            len(queries),
            ", ".join(f"{name} {values.mean():.3f}" for name, values in precision.items()),
        )
    return result
