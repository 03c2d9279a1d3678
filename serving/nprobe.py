"""How many IVF lists a version's customers' lists need, measured on its own stored customers when it is written.

One served nprobe fits one catalogue and one prior weight: at 10M synthetic articles (ivf-pq-fastscan, 12,649 lists,
100 real user vectors, exact truth over every row, docs/scale.md) nprobe 128 gave customers' lists (prior weight
0.03) recall@10 0.937 but discovery lists (`exclude_purchased`, weight 0.02: fewer best sellers, whose lists the
ranking favours) 0.810; 192 lists brought those to 0.903 for +0.4 ms a search. On H&M 128 lists already give both
0.997-0.999. So export measures, for each weight a customer's list is searched at, the smallest nprobe (of the
served one times NPROBE_FACTORS) at which its stored customers' top 10 reach a recall target against exact
search; the manifest carries those above the served one (`Manifest.ivf_probes`, written by
export.catalogue_index). The served nprobe stays the floor: a calibration only widens, so the second stage's pool,
deeper than 10, never loses rows it had.
"""

from __future__ import annotations

import logging
import time

import faiss
import numpy as np

from serving.catalog import Catalog, as_float32
from serving.ivf_lists import ProbeSetting
from twotower import popularity
from twotower.files import VectorRows

log = logging.getLogger("serving.nprobe")

NPROBE_FACTORS = (1.0, 1.25, 1.5, 2.0, 3.0, 4.0)
CALIBRATION_CUSTOMERS = 200  # a recall of 0.90 measured on 200 lists of 10: +-0.02 (binomial, 95%)
CALIBRATION_K = 10
TRUTH_CHUNK_ROWS = 1 << 18  # exact scores of 200 customers over this many rows at a time: 200 MiB


def served_weights(catalog: Catalog) -> list[float]:
    """The prior weights customers' lists are searched at: with and without their own articles."""
    return sorted({catalog.prior_weight_for(False), catalog.prior_weight_for(True)})


def exact_top_k(
    vectors: VectorRows,
    bias: np.ndarray | None,
    queries: np.ndarray,
    weights: list[float],
    k: int,
    shown: np.ndarray | None = None,
) -> dict[float, np.ndarray]:
    """Each weight's exact top-k rows [B, k] (fewer columns where fewer rows are shown) among the rows `shown` (bool
    [N]; None: all), by the score every search ranks by ([vector, bias] . [query, weight]); faiss' exact k-selection
    over a chunk of rows at a time (at 10M rows numpy's argpartition over every score took most of a 2-3 minute
    calibration)."""
    n = len(vectors)
    weights = list(dict.fromkeys(weights))  # a weight twice would merge its chunks with themselves
    none = np.zeros((len(queries), 0), np.int64)
    best: dict[float, tuple[np.ndarray, np.ndarray]] = {weight: (none.astype(np.float32), none) for weight in weights}
    for start in range(0, n, TRUTH_CHUNK_ROWS):
        rows: slice | np.ndarray = slice(start, min(n, start + TRUTH_CHUNK_ROWS))
        if shown is not None and not shown[rows].all():
            rows = np.flatnonzero(shown[rows]) + start
        ids = np.arange(rows.start, rows.stop) if isinstance(rows, slice) else rows
        if not len(ids):
            continue
        block = as_float32(np.asarray(vectors[rows]))
        if bias is not None:
            block = np.hstack([block, np.asarray(bias[rows], np.float32)[:, None]])
        block = np.ascontiguousarray(block, dtype=np.float32)
        for weight in weights:
            query = queries if bias is None else popularity.with_weight(queries, weight)
            scores, found = faiss.knn(query, block, min(k, len(ids)), metric=faiss.METRIC_INNER_PRODUCT)
            # with the chunks before
            merged = (np.hstack([best[weight][0], scores]), np.hstack([best[weight][1], ids[found]]))
            keep = np.argsort(-merged[0], axis=1, kind="stable")[:, :k]
            best[weight] = (np.take_along_axis(merged[0], keep, 1), np.take_along_axis(merged[1], keep, 1))
    return {weight: rows for weight, (_, rows) in best.items()}


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean share of each truth row set [B, k] among the found rows [B, >= k]."""
    return float(np.mean([np.isin(t, f).mean() for f, t in zip(found, truth)]))


def calibrate_nprobe(
    catalog: Catalog, target: float, customers: int = CALIBRATION_CUSTOMERS, seed: int = 0
) -> list[ProbeSetting]:
    """For each weight customers' lists are searched at, the smallest nprobe of `catalog.ivf_nprobe` x
    NPROBE_FACTORS at which `customers` of the version's stored customers (their export-time vectors, drawn at
    random) find `target` of their exact top 10; where none does, the widest. [] for an index without IVF lists
    or a version without stored customers' vectors."""
    if catalog.gpu is not None:  # its searches probe the copy's one nprobe, whatever is tried here
        raise ValueError("nprobe is measured on a catalogue searched on the CPU (faiss_gpu off)")
    vectors = catalog.customer_vectors
    if catalog.ivf_lists is None or vectors is None:
        return []
    finite = np.flatnonzero(np.isfinite(vectors).all(axis=1))
    if not len(finite):
        return []
    started = time.perf_counter()
    rng = np.random.default_rng(seed)
    users = np.asarray(vectors[np.sort(rng.choice(finite, min(customers, len(finite)), replace=False))], np.float32)
    weights = served_weights(catalog)
    truth = exact_top_k(catalog.vectors, catalog.item_bias, users, weights, CALIBRATION_K, ~catalog.excluded)
    base, nlist = catalog.ivf_nprobe, catalog.ivf_lists.nlist
    candidates = sorted({min(nlist, int(round(base * factor))) for factor in NPROBE_FACTORS})
    settings = []
    measured_before = catalog.probes_by_weight
    catalog.probes_by_weight = {}  # each search at the nprobe tried, not at what an earlier measure chose
    try:
        for weight in weights:
            measured = []
            for nprobe in candidates:
                catalog.ivf_nprobe = nprobe
                _, rows = catalog.search(users, CALIBRATION_K, weight)
                measured.append(ProbeSetting(weight, nprobe, round(recall(rows, truth[weight]), 4)))
                if measured[-1].recall >= target:
                    break
            settings.append(measured[-1])
            if measured[-1].recall < target:
                log.warning(
                    "nprobe %d (the widest tried) finds %.3f of %d stored customers' exact top %d at prior weight %g, "
                    "under the %g target",
                    measured[-1].nprobe,
                    measured[-1].recall,
                    len(users),
                    CALIBRATION_K,
                    weight,
                    target,
                )
    finally:
        catalog.ivf_nprobe, catalog.probes_by_weight = base, measured_before
    log.info(
        "IVF lists probed, measured on %d stored customers in %.1fs (recall@%d target %g): %s",
        len(users),
        time.perf_counter() - started,
        CALIBRATION_K,
        target,
        ", ".join(f"weight {s.weight:g}: nprobe {s.nprobe} (recall {s.recall:.3f})" for s in settings),
    )
    return settings
