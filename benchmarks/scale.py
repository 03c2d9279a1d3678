"""`make bench-scale`: catalogues of 1M (10M with --sizes) synthetic articles, one index per type.

    python -m benchmarks.scale                          # 1M articles: ivf, ivf-sq8, ivf-pq, ivf-pq-fastscan
    python -m benchmarks.scale --sizes 1000000,10000000 # 10M as well (about 6 GB of vectors on disk)

The articles are drawn from a mixture fitted to a trained index (`--reference`, default the `make eval`
or `make bench` export): its item vectors clustered into 512 directions, each article one of them plus
noise of that cluster's measured spread, its popularity bias and metadata columns those of a random real
article of that cluster (so a product group sits in few IVF lists, as on real data). Queries are the
reference's own exported user vectors (real customers), scored with its popularity prior weight as served.
Where neither export exists, make bench's is built first (a 60-step model, as `make bench` trains); with
`--reference random` both are random mixtures and the page says so.

For each size and index type, in a fresh process per index (so resident memory is its own): build time,
index size on disk, resident memory after loading the retriever's Catalog (anonymous, i.e. the process's
own, and file-backed, i.e. memory-mapped pages shared with the page cache), the same after loading the
version a second time (what a hot swap holds), recall@10 of the served search against exact search with
the same scores, single-query latency p50/p99 at the served nprobe, and recall@10 of filtered searches.
Writes docs/scale.{md,json,png}.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import json
import logging
import multiprocessing
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import faiss
import numpy as np

from benchmarks import references
from benchmarks.memory_limit import MemoryCgroup, evict_from_page_cache
from retriever.heap import process_memory
from retriever.launch import RedisServer
from retriever.swap_turns import RedisSwapTurns
from twotower import artifacts
from twotower.item_table import ID_COLUMN, Column, ItemTable
from twotower.second_stage import ArticleSignals

RANDOM_REFERENCE = "random"  # --reference random: random mixtures, no trained export imitated
log = logging.getLogger("benchmarks.scale")

INDEX_TYPES = ("ivf", "ivf-sq8", "ivf-pq", "ivf-pq-fastscan")
PRODUCT_COLUMN = "product_code"
METADATA_COLUMNS = ("product_code", "prod_name", "product_type_name", "product_group_name", "colour_group_name")
CLUSTERS = 512
QUERIES = 500
CHUNK = 200_000


# -- the synthetic catalogue -----------------------------------------------------------------------
class Reference:
    """What the synthetic catalogue imitates: a trained index's vectors, biases, metadata, user vectors."""

    def __init__(self, index_dir: Path | None, dim: int = 128, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.source = f"random mixture (--reference {RANDOM_REFERENCE})"
        self.index_dir = None
        if index_dir is None:
            vectors = _unit(rng.standard_normal((CLUSTERS, dim)).astype(np.float32))
            self.centroids, self.spread, self.weights = vectors, np.full(CLUSTERS, 0.6, np.float32), None
            self.cluster_rows: tuple[np.ndarray, np.ndarray] | None = None  # metadata independent of the vectors
            self.bias = rng.gamma(0.3, 1.0, 100_000).astype(np.float32)
            groups = rng.choice(["A", "B", "C", "D"], 100_000, p=[0.5, 0.3, 0.15, 0.05]).tolist()
            self.items = ItemTable.from_columns({"article_id": [str(i) for i in range(len(groups))],
                                                 "product_group_name": groups})  # fmt: skip
            self.users, self.prior_weight = _unit(rng.standard_normal((QUERIES, dim)).astype(np.float32)), 0.0
            self.discovery_weight = 0.0
            return
        from serving.catalog import Catalog

        catalog = Catalog(index_dir, lexical=False)
        self.index_dir: Path | None = catalog.index_dir
        self.source = f"{catalog.index_dir} ({catalog.manifest.data_source}, {catalog.manifest.item_count:,} articles)"
        vectors = np.ascontiguousarray(catalog.vectors, dtype=np.float32)
        kmeans = faiss.Kmeans(vectors.shape[1], CLUSTERS, niter=20, spherical=True, seed=seed)
        kmeans.train(vectors)
        _, assigned = kmeans.index.search(vectors, 1)
        assigned = assigned[:, 0]
        self.centroids = kmeans.centroids
        residual = vectors - self.centroids[assigned]
        # per-cluster spread: the root mean square residual per dimension
        sq = np.bincount(assigned, (residual**2).sum(axis=1), CLUSTERS)
        counts = np.bincount(assigned, minlength=CLUSTERS)
        self.spread = np.sqrt(sq / np.maximum(counts, 1) / vectors.shape[1]).astype(np.float32)
        self.weights = counts / counts.sum()
        # The real rows of each cluster (rows sorted by cluster, each cluster's first position), whose metadata the
        # cluster's synthetic articles copy: on H&M a product group sits in few IVF lists (90% of its articles in
        # 1.4-3.6% of the 1,299 lists for groups of 2-5%, 30% for the 40% group); copied from any real article, a
        # synthetic 10M catalogue spread every group over the lists (90% in 61-63% of 12,649), which made each
        # filtered search probe lists full of other groups' articles (measured 2026-12-01, docs/scale.md).
        self.cluster_rows = (np.argsort(assigned, kind="stable"), np.concatenate([[0], np.cumsum(counts)]))
        self.bias = catalog.item_bias if catalog.item_bias is not None else np.zeros(len(vectors), np.float32)
        self.items = catalog.items
        known = catalog.customer_vectors
        finite = known[np.isfinite(known).all(axis=1)] if known is not None else np.zeros((0, vectors.shape[1]))
        if len(finite) >= QUERIES:
            self.users = finite[rng.choice(len(finite), QUERIES, replace=False)]
        else:
            self.users = _unit(vectors[rng.choice(len(vectors), QUERIES)] + 0.1)
        self.prior_weight = catalog.prior_weight
        self.discovery_weight = catalog.prior_weight_for(exclude_bought=True)  # lists without the own articles

    def text_vectors(self, repository: Path | None) -> np.ndarray | None:
        """Text queries as served: QUERIES of the bench's shopper phrases from the reference catalogue
        (benchmarks.serving.text_queries), embedded by the reference's query tower (None without one). They are
        searched without the prior, which gives them no help from the best sellers scored beside the index."""
        if repository is None or self.index_dir is None:
            return None
        import asyncio

        from benchmarks.serving import text_queries
        from serving.towers import LocalTowers, TokenIds

        manifest = artifacts.read_manifest(self.index_dir)
        input_ids = TokenIds(manifest.clip_model)(text_queries(self.items)[:QUERIES])
        return asyncio.run(LocalTowers(repository, manifest).query_vectors(input_ids))

    def write_vectors(self, path: Path, n: int, seed: int = 1) -> tuple[np.memmap, np.ndarray, ItemTable]:
        """n article vectors straight into a .npy file (chunk by chunk: 10M never sit in memory twice),
        their biases and metadata (the columns of a random real article of the same mixture cluster each, kept
        encoded: no Python string per synthetic article)."""
        rng = np.random.default_rng(seed)
        dim = self.centroids.shape[1]
        vectors = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, dim))
        clusters = np.empty(n, dtype=np.int32)
        for start in range(0, n, CHUNK):
            size = min(CHUNK, n - start)
            cluster = clusters[start : start + size] = rng.choice(CLUSTERS, size, p=self.weights)
            noise = rng.standard_normal((size, dim), dtype=np.float32) * self.spread[cluster, None]
            vectors[start : start + size] = _unit(self.centroids[cluster] + noise)
        vectors.flush()
        if self.cluster_rows is None:
            source_rows = rng.integers(0, len(self.bias), n)
        else:  # a random real row of each article's cluster (the vectors are drawn as before: the same vectors)
            members, starts = self.cluster_rows
            sizes = np.diff(starts)
            source_rows = members[starts[clusters] + (rng.random(n) * sizes[clusters]).astype(np.int64)]
        ids = np.char.zfill(np.arange(n).astype("S10"), 10)  # sorted: the codes are the rows
        columns = {ID_COLUMN: Column(ids, np.arange(n, dtype=np.int32))}
        for name in METADATA_COLUMNS:
            if name in self.items:
                real = self.items[name]
                columns[name] = Column(np.asarray(real.values), np.asarray(real.codes)[source_rows % len(real)])
        if PRODUCT_COLUMN in columns:
            columns[PRODUCT_COLUMN] = _products_of_real_size(columns[PRODUCT_COLUMN], n, len(self.bias), rng)
        return vectors, self.bias[source_rows % len(self.bias)].astype(np.float32), ItemTable(columns)


def _products_of_real_size(copied: Column, n: int, real_n: int, rng: np.random.Generator) -> Column:
    """Product codes for n articles that copy real ones: each article joins a random one of n / real_n copies
    of its real product, so products keep the real sizes (H&M: 2.2 articles). Copied as they are, 10M articles
    fell into H&M's 47k products, ~212 each, and every history's sibling boost scored thousands of rows
    (a fifth of the retriever's CPU in the 10M served profile, docs/scale.md row 16)."""
    copies = -(-n // real_n)
    if copies == 1:
        return copied
    width = len(str(copies - 1))
    suffixes = np.char.zfill(np.arange(copies).astype(f"S{width}"), width)
    values = np.char.add(np.repeat(np.asarray(copied.values), copies), np.tile(suffixes, len(copied.values)))
    codes = np.asarray(copied.codes, dtype=np.int64) * copies + rng.integers(0, copies, n)
    distinct, inverse = np.unique(values, return_inverse=True)  # sorted, as every column's values are
    return Column(distinct, inverse.astype(np.int32)[codes])


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def exact_top10(
    vectors: np.ndarray, bias: np.ndarray, users: np.ndarray, priors: list[float], allowed=None
) -> dict[float, np.ndarray]:
    """Each prior weight's exact top-10 rows per user by cosine + prior * bias among the `allowed` rows, every weight
    in one pass over the rows (serving.nprobe's, chunked: the catalogue may not fit twice)."""
    from serving.nprobe import exact_top_k

    return exact_top_k(vectors, bias, np.asarray(users, np.float32), priors, 10, allowed)


def write_version(
    directory: Path,
    index_type: str,
    vectors: np.ndarray,
    bias: np.ndarray,
    items: ItemTable,
    reference: Path | None,
    vector_dtype: str = "float32",
) -> float:
    """One index version as export writes it, without a keyword index; returns the build seconds. With a
    reference version, its towers' manifest fields, score head and known customers (whose history rows
    all fall inside the synthetic catalogue) come along, so its Triton model repository can serve it."""
    from export.catalogue_index import build_faiss_index, write_catalogue_only, write_index_dir
    from export.pipeline import ExportOptions

    started = time.perf_counter()
    index = build_faiss_index(vectors, index_type, bias)
    seconds = time.perf_counter() - started
    if reference is None:
        write_catalogue_only(
            directory, index, vectors, items, "benchmarks.scale", index_type, item_bias=bias, vector_dtype=vector_dtype
        )
        return seconds
    manifest = artifacts.read_manifest(reference)
    own = {"dim", "metric", "item_count", "index_version", "files", "index_type", "data_source", "parent_version"}
    own.add("unindexed_rows")  # the reference's rows past its index (a catalogue update's): not this version's
    own.add("ivf_probes")  # measured on this version's own lists, as export does
    fields = {k: v for k, v in dataclasses.asdict(manifest).items() if k not in own}
    fields.update(
        index_type=index_type, data_source=f"benchmarks.scale, towers of {reference}", vector_dtype=vector_dtype
    )
    with np.load(reference / artifacts.HISTORIES_FILE) as stored:
        histories = {name: stored[name] for name in stored.files}
    head = artifacts.ScoreHeadWeights.from_json(json.loads((reference / artifacts.SCORE_HEAD_FILE).read_text()))
    signals = second_stage_signals(reference, len(vectors))
    write_index_dir(
        directory,
        index,
        vectors,
        items,
        histories,
        head,
        fields,
        item_bias=bias,
        signals=signals,
        ivf_recall_target=ExportOptions.ivf_recall_target,
    )
    return seconds


def second_stage_signals(reference: Path, n: int) -> ArticleSignals | None:
    """The reference's second-stage signals for a synthetic catalogue of n rows, so that customers' and histories'
    lists are re-ordered by its stage as a trained deployment's are (its search then fetches the stage's pool,
    Catalog.rerank_max_candidates). The first rows are the reference's articles, as the known customers'
    histories are; the rest are new, unsold articles (ArticleSignals.extended). None where the reference has no
    stage or more articles than n."""
    path = reference / artifacts.SECOND_STAGE_FILE
    if not path.is_file():
        return None
    signals = ArticleSignals.load(path)
    if signals.size > n:
        log.warning("no second stage: the reference has %d articles, the synthetic catalogue %d", signals.size, n)
        return None
    return signals.extended(np.full(n - signals.size, -1, np.int64))


# -- measured in a fresh process per index ---------------------------------------------------------
def _process_tree_memory(pid: int) -> dict[str, float]:
    """`process_memory` summed over a process and its children (KServe's workers). File-backed pages shared by
    the workers count once per process here; a pod's memory cgroup charges them once."""
    import psutil

    pids = [pid, *(child.pid for child in psutil.Process(pid).children(recursive=True))]
    per_process = [process_memory(p) for p in pids]
    return {name: sum(m[name] for m in per_process) for name in per_process[0]}


def measure_version(
    directory: str,
    users: np.ndarray,
    prior: float,
    exact: dict[str, np.ndarray],
    texts: tuple[np.ndarray, np.ndarray] | None = None,
    discovery: tuple[float, np.ndarray] | None = None,
) -> dict[str, Any]:
    """In a child process: load the Catalog as the retriever does, search as it does, report memory. `texts`:
    text queries' vectors and their exact top 10 (without the prior). `discovery`: the prior weight of lists without
    the customer's own articles and the users' exact top 10 at it (the IVF lists probed are the version's own for
    that weight, serving.nprobe)."""
    faiss.omp_set_num_threads(1)  # one request's search, as the retriever runs it
    from serving.catalog import Catalog
    from serving.filters import Filters

    before = process_memory()
    started = time.perf_counter()
    catalog = Catalog(directory, lexical=False)
    load_s = time.perf_counter() - started
    loaded = process_memory()
    seconds, found = _search_each(catalog, users, prior)
    searched = process_memory()
    result: dict[str, Any] = {
        "load_s": load_s,
        "memory_before": before,
        "memory_loaded": loaded,
        "memory_searched": searched,
        "recall_at_10": _recall(np.stack(found), exact["all"]),
        "p50_ms": 1000 * float(np.percentile(seconds, 50)),
        "p99_ms": 1000 * float(np.percentile(seconds, 99)),
        "filtered": {},
        "rerank_factor": catalog.rerank_factor,
        "rerank": {},
    }
    if catalog.rerank_factor:
        # What more re-ranked candidates would buy: recall and time at 2x and 4x the served factor (k 10 x 4 x 50
        # is past the weighted cap: lifted for these searches, so that the column is the factor it names).
        served_factor, served_cap = catalog.rerank_factor, catalog.rerank_max_candidates
        for factor in (2 * served_factor, 4 * served_factor):
            catalog.rerank_factor, catalog.rerank_max_candidates = factor, catalog.index.ntotal
            more_seconds, more_found = _search_each(catalog, users, prior)
            result["rerank"][str(factor)] = {
                "recall_at_10": _recall(np.stack(more_found), exact["all"]),
                "p50_ms": 1000 * float(np.percentile(more_seconds, 50)),
            }
        catalog.rerank_factor, catalog.rerank_max_candidates = served_factor, served_cap
    if discovery is not None:
        weight, truth = discovery
        discovery_seconds, discovery_found = _search_each(catalog, users, weight)
        result["discovery"] = {
            "weight": weight,
            "nprobe": catalog.nprobe_at(weight) if catalog.ivf_lists is not None else None,  # flat, HNSW: none
            "recall_at_10": _recall(np.stack(discovery_found), truth),
            "p50_ms": 1000 * float(np.percentile(discovery_seconds, 50)),
        }
    if texts is not None:
        text_seconds, text_found = _search_each(catalog, texts[0], 0.0)
        result["text"] = {
            "recall_at_10": _recall(np.stack(text_found), texts[1]),
            "p50_ms": 1000 * float(np.percentile(text_seconds, 50)),
            "p99_ms": 1000 * float(np.percentile(text_seconds, 99)),
        }
    for group in [g for g in exact if g != "all"]:
        mask = catalog.filter_columns.mask(Filters.parse({"product_group": [group]}))
        t_filtered, rows_filtered = [], []
        for user in users[:100]:
            t0 = time.perf_counter()
            _, rows = catalog.search_masked(user, 10, mask, prior)
            t_filtered.append(time.perf_counter() - t0)
            rows_filtered.append(rows)
        result["filtered"][group] = {
            "share": float(mask.mean()),
            "path": catalog.search_plan(mask & ~catalog.excluded),
            "recall_at_10": _recall(np.stack(rows_filtered), exact[group][:100]),
            "p99_ms": 1000 * float(np.percentile(t_filtered, 99)),
        }
    # A hot swap: the next version loaded while this one still serves (here the same files again).
    second = Catalog(directory, lexical=False)
    second.search(users[:1], 10, prior)
    result["memory_two_versions"] = process_memory()
    return result


def _search_each(catalog: Any, users: np.ndarray, prior: float) -> tuple[list[float], list[np.ndarray]]:
    """Each user's top 10, one query at a time: the seconds each took and the rows found."""
    seconds, found = [], []
    for user in users:
        started = time.perf_counter()
        _, rows = catalog.search(user[None], 10, prior)
        seconds.append(time.perf_counter() - started)
        found.append(rows[0])
    return seconds, found


def served_latency(
    directory: Path,
    repository: Path,
    work: Path,
    rate: float,
    seconds: float,
    retriever_args: list[str],
    memory_limit_mib: int = 0,
    hot_swap: str = "",
) -> dict[str, Any]:
    """The bench's request mix at a fixed rate through Triton + the retriever (one process, or a KServe
    worker per core with --workers 2) serving this version (benchmarks.serving); the retriever's memory
    after the run, summed over its processes.

    With `memory_limit_mib` the retriever runs in a memory cgroup of that limit (benchmarks.memory_limit),
    its version's files first dropped from the page cache: it faults them in, charged to its limit, as a
    pod does. A first run of the same length then warms that cache ("cold": its own p50 / p99); the
    measured run follows.

    With `hot_swap` the retriever serves an index root whose CURRENT names this version, and three more runs
    of the same length follow the measured one: "during", which starts by pointing CURRENT at a second
    version (a copy of this one: every file new to the page cache, as a new export's are) that the
    retriever's watcher loads and swaps in under load, then "after" and "later" (SWAP_PHASES): a 10M version
    takes 15-30 s to load under a 4 Gi limit, so the swap may end with the first run. `hot_swap` "turn": the
    swap is taken as a replica's turn while another replica serves (retriever/swap_turns.py, a real Redis and
    a stand-in replica's heartbeats): the retriever leaves rotation, loads, rejoins; no requests are sent while
    its /ready answers 503 (Kubernetes sends them to the other replica), and "during" is how long that was.
    `hot_swap` "update": swapped in place, but the second version is a catalogue update that removes
    UPDATE_REMOVALS articles (export.catalogue_update): it shares every other file with the served version.
    `hot_swap` "add": the same, an update adding UPDATE_ADDITIONS articles: it shares the served version's
    vectors, histories, second-stage signals and FAISS index (its rows searched beside it: serving.exact_rows), and
    rewrites its metadata and prior."""
    from benchmarks import offline
    from benchmarks.serving import bench_servers, request_bodies, run_served_rate, wait_until_idle
    from serving.catalog import Catalog

    catalog = Catalog(directory, lexical=False)
    bodies = request_bodies(catalog, int(rate * seconds))
    served_dir = _swap_root(directory, work / "swap-root", hot_swap) if hot_swap else directory
    manifest = catalog.manifest
    served = offline.BenchArtifacts(served_dir, repository, manifest.item_count, manifest.index_type, {})
    del catalog
    bodies_file = work / "bodies.jsonl"
    bodies_file.write_text("\n".join(json.dumps(b) for b in bodies) + "\n")
    cgroup = MemoryCgroup.create(memory_limit_mib * 2**20) if memory_limit_mib else None
    if cgroup is not None:
        evict_from_page_cache(served_dir)
    cold, swap, limit = None, None, None
    try:
        launcher = cgroup.launcher() if cgroup is not None else []
        with contextlib.ExitStack() as stack:
            arguments = retriever_args
            if hot_swap == "turn":
                redis = stack.enter_context(RedisServer(work / "redis.log"))
                arguments = [*retriever_args, "--swap-turns-redis-url", redis.url, "--swap-drain-s", "2"]
                stack.enter_context(_another_replica_serving(redis.url, str(served_dir)))
            servers = stack.enter_context(
                bench_servers(served, work, "retriever.log", arguments, retriever_launcher=launcher)
            )
            triton, retriever = servers.triton, servers.retriever
            assert retriever.process is not None and triton.pid is not None
            pids = {"retriever": retriever.process.pid, "Triton": triton.pid}
            wait_until_idle(list(pids.values()))

            def measured_run() -> dict[str, Any]:
                return run_served_rate(retriever, bodies_file, rate, seconds, work, pids)

            if cgroup is not None:
                cold = measured_run()
            result = measured_run()
            memory = _process_tree_memory(retriever.process.pid)
            limit = cgroup.usage() if cgroup is not None else None
            if hot_swap:
                out_of_rotation = (lambda: _out_of_rotation(retriever.url)) if hot_swap == "turn" else None
                swap = _hot_swap_runs(
                    served_dir, measured_run, retriever.process.pid, cgroup, work / "retriever.log", out_of_rotation
                )
    finally:
        if cgroup is not None:
            cgroup.remove()
        if hot_swap:
            shutil.rmtree(served_dir, ignore_errors=True)
    return {
        "rate": rate,
        "achieved_qps": result["achieved_qps"],
        "p50_ms": result["p50_ms"],
        "p99_ms": result["p99_ms"],
        "errors": result["errors"],
        "retriever_memory": memory,
        "retriever_args": retriever_args,
        "memory_limit": limit,
        "cold": None if cold is None else _latency(cold),
        "hot_swap": swap,
    }


# --hot-swap: swapped while serving; or out of rotation (retriever/swap_turns.py); or swapped while serving to a
# catalogue update that shares the served version's files (removing articles, or adding them)
HOT_SWAP_MODES = ("in-place", "turn", "update", "add")
UPDATE_REMOVALS = 1000  # articles a --hot-swap update removes (sold out): the rest of the version is unchanged
UPDATE_ADDITIONS = 1000  # new articles a --hot-swap add appends (the synthetic shop's, new ids, random vectors)
SWAP_VERSIONS = ("v0001", "v0002")  # the served version and the one swapped in, under the swap root
SWAP_PHASES = ("during", "after", "later")  # the runs of `served_latency(hot_swap=...)` after the measured one


def _swap_root(directory: Path, root: Path, hot_swap: str = "in-place") -> Path:
    """An index root serving `directory` (linked as its first version) with a second version, not yet published:
    a copy of it (its files new to the page cache, as a new export's would be), or for `hot_swap` "update" /
    "add" a catalogue update removing UPDATE_REMOVALS random articles / adding UPDATE_ADDITIONS new ones (what
    it leaves unchanged the first version's files, as an update shares them)."""
    from export.catalogue_update import update_catalogue

    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    first, second = (root / name for name in SWAP_VERSIONS)
    first.symlink_to(directory.resolve(), target_is_directory=True)
    artifacts.publish_version(root, first.name)
    if hot_swap in ("update", "add"):
        if hot_swap == "update":
            ids = artifacts.read_items(directory, artifacts.read_manifest(directory)).article_ids
            removed = np.random.default_rng(0).choice(len(ids), UPDATE_REMOVALS, replace=False)
            published = update_catalogue(root, lambda manifest: None, remove_ids=[str(ids[i]) for i in removed])
        else:
            published = update_catalogue(root, _random_item_tower, _new_articles(root / "added.csv"))
        assert published.index_version == second.name
        artifacts.publish_version(root, first.name)  # the runs publish it under load
        return root
    shutil.copytree(directory, second)
    manifest = artifacts.read_manifest(second)
    artifacts.write_manifest(second, dataclasses.replace(manifest, index_version=second.name))
    return root


def _new_articles(path: Path) -> Path:
    """UPDATE_ADDITIONS articles in the H&M format: the synthetic shop's (twotower.data.synthetic), with ids no
    catalogue here uses."""
    from twotower.data.synthetic import make_articles

    added = make_articles(np.random.default_rng(0), UPDATE_ADDITIONS)
    added["article_id"] = [f"09{number:08d}" for number in range(UPDATE_ADDITIONS)]
    added.to_csv(path, index=False)
    return path


def _random_item_tower(manifest: artifacts.Manifest) -> Callable[[list[str]], np.ndarray]:
    """An item tower for --hot-swap add: a unit vector per caption (the cost measured is the swap's, not the
    embedding's)."""
    rng = np.random.default_rng(0)
    return lambda captions: _unit(rng.standard_normal((len(captions), manifest.dim)).astype(np.float32))


def _hot_swap_runs(
    root: Path,
    measured_run: Callable[[], dict[str, Any]],
    retriever_pid: int,
    cgroup: MemoryCgroup | None,
    retriever_log: Path,
    out_of_rotation: Callable[[], float] | None = None,
) -> dict[str, Any]:
    """Runs during and after the swap to the root's second version (SWAP_PHASES): latency, errors, the pages read back
    from disk in each (under a memory limit), the retriever's memory after each, and whether it swapped. With
    `out_of_rotation` (it waits for the retriever to leave rotation and rejoin, and returns the seconds it was out)
    "during" sends nothing and records that time instead."""
    phases: dict[str, Any] = {}
    faults = cgroup.usage()["major_faults"] if cgroup is not None else 0
    for phase in SWAP_PHASES:
        if phase == "during":
            threading.Timer(1.0, artifacts.publish_version, (root, SWAP_VERSIONS[1])).start()
        if phase == "during" and out_of_rotation is not None:
            result: dict[str, Any] = {"out_of_rotation_s": out_of_rotation()}
        else:
            result = _latency(measured_run())
        usage = cgroup.usage() if cgroup is not None else None
        phases[phase] = {
            **result,
            "retriever_memory": _process_tree_memory(retriever_pid),
            "major_faults": None if usage is None else usage["major_faults"] - faults,
            "peak_mib": None if usage is None else usage["peak_mib"],
        }
        faults = usage["major_faults"] if usage is not None else 0
    log_text = retriever_log.read_text(errors="replace")
    phases["swapped"] = f"-> {SWAP_VERSIONS[1]}" in log_text and "index swapped" in log_text
    return phases


@contextlib.contextmanager
def _another_replica_serving(redis_url: str, index_root: str) -> Iterator[None]:
    """A stand-in second replica's heartbeats (every second), so that a swap is taken out of rotation."""
    peer = RedisSwapTurns(redis_url, index_root, lease_s=30.0, stale_s=10.0, timeout_s=1.0, replica="bench-peer:0")
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(1.0):
            peer.heartbeat()

    peer.heartbeat()
    thread = threading.Thread(target=beat, name="bench-peer", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def _out_of_rotation(retriever_url: str, timeout_s: float = 600.0) -> float:
    """Seconds between the retriever leaving rotation (/ready 503) and rejoining it (200)."""
    import httpx

    deadline = time.monotonic() + timeout_s
    left = None
    while time.monotonic() < deadline:
        status = httpx.get(f"{retriever_url}/ready", timeout=10).status_code
        if status != 200 and left is None:
            left = time.monotonic()
        elif status == 200 and left is not None:
            return time.monotonic() - left
        time.sleep(0.1)
    raise TimeoutError(f"the retriever at {retriever_url} did not leave rotation and rejoin within {timeout_s:.0f} s")


def _latency(result: dict[str, Any]) -> dict[str, Any]:
    return {k: result[k] for k in ("p50_ms", "p99_ms", "errors")}


def _recall(found: np.ndarray, exact: np.ndarray) -> float:
    return float(np.mean([len(set(f.tolist()) & set(e.tolist())) / 10 for f, e in zip(found, exact)]))


# -- the run -----------------------------------------------------------------------------------------
def resolve_reference(requested: str | None, data_dir: Path | None) -> Path | None:
    """The index root the synthetic catalogues imitate: `requested`, else the export benchmarks measure (make
    eval's or make bench's, built first where neither exists: benchmarks.references). `random`: random mixtures
    instead, on purpose (the index types alone, in minutes; no towers, so no served rows)."""
    if requested == RANDOM_REFERENCE:
        return None
    return Path(requested) if requested else references.export_to_measure(data_dir)


def run(
    sizes: list[int],
    index_types: list[str],
    reference: Reference,
    work: Path,
    repository: Path | None,
    rate: float,
    seconds: float,
    retriever_args: list[str],
    memory_limit_mib: int = 0,
    vector_dtype: str = "float32",
    hot_swap: str = "",
) -> list[dict[str, Any]]:
    rows = []
    spawn = multiprocessing.get_context("spawn")
    text_vectors = reference.text_vectors(repository)
    for n in sizes:
        work_n = work / f"n{n}"
        shutil.rmtree(work_n, ignore_errors=True)
        work_n.mkdir(parents=True)
        started = time.perf_counter()
        vectors, bias, items = reference.write_vectors(work_n / "vectors.npy", n)
        log.info("%d synthetic articles in %.0fs", n, time.perf_counter() - started)
        weight = reference.prior_weight
        # customers' lists and discovery lists (lists without the customer's own articles) at their weights
        users_exact = exact_top10(vectors, bias, reference.users, [weight, reference.discovery_weight])
        exact = {"all": users_exact[weight]}
        if "product_group_name" in items:
            groups = items["product_group_name"]
            counts = np.bincount(groups.codes, minlength=len(groups.values))
            # the largest product group and one near 5% of the catalogue: the two filtered-search regimes
            for code in dict.fromkeys([int(np.argmax(counts)), int(np.argmin(np.abs(counts / n - 0.05)))]):
                allowed = np.asarray(groups.codes) == code
                filtered = exact_top10(vectors, bias, reference.users[:100], [weight], allowed)
                exact[groups.distinct()[code]] = filtered[weight]
        texts = None if text_vectors is None else (text_vectors, exact_top10(vectors, bias, text_vectors, [0.0])[0.0])
        discovery = None
        if reference.discovery_weight != weight:
            discovery = (reference.discovery_weight, users_exact[reference.discovery_weight])
        for index_type in index_types:
            directory = work_n / index_type
            build_s = write_version(directory, index_type, vectors, bias, items, reference.index_dir, vector_dtype)
            with concurrent.futures.ProcessPoolExecutor(1, mp_context=spawn) as child:
                measured = child.submit(
                    measure_version, str(directory), reference.users, reference.prior_weight, exact, texts, discovery
                ).result()
            row = {
                "articles": n,
                "index_type": index_type,
                "vector_dtype": vector_dtype,
                "build_s": build_s,
                "index_mib": (directory / artifacts.INDEX_FILE).stat().st_size / 2**20,
                "vectors_mib": (directory / artifacts.VECTORS_FILE).stat().st_size / 2**20,
                "metadata_mib": sum(f.stat().st_size for f in (directory / artifacts.ITEMS_DIR).iterdir()) / 2**20,
                **measured,
            }
            if repository is not None and reference.index_dir is not None:
                row["served"] = served_latency(
                    directory, repository, work_n, rate, seconds, retriever_args, memory_limit_mib, hot_swap
                )
            log.info("%s", json.dumps({k: v for k, v in row.items() if not isinstance(v, dict)}))
            log.info("text queries: %s; served: %s", row.get("text"), row.get("served"))
            rows.append(row)
            shutil.rmtree(directory)
        del vectors
        shutil.rmtree(work_n, ignore_errors=True)
    return rows


def report(rows: list[dict[str, Any]], source: str, out: Path, command: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "scale.json").write_text(json.dumps({"reference": source, "rows": rows}, indent=1))
    lines = [
        "# Scale: synthetic catalogues of the H&M schema",
        "",
        f"Vectors drawn from a mixture fitted to {source}; queries are that index's exported user vectors",
        "(real customers), scored with its popularity prior as served. One index per row, loaded in a fresh",
        "process by the retriever's `Catalog`; searches on 1 thread, one query at a time, at the served",
        f"settings (nprobe {_nprobe()}; compressed types re-rank k x the factor beside them candidates exactly,"
        f" served now: {_rerank_factors()}; an IVF index's most popular rows scored exactly beside it and its lists"
        " ranked by their best prior, serving.exact_rows). Text queries: 500 shopper phrases of the reference's",
        "catalogue (benchmarks.serving.text_queries) embedded by its query tower, searched without the prior as",
        "served (text queries' dense half). Memory in MiB:",
        "anon = the process's own pages, file = memory-mapped pages (shared page cache: the kernel may drop",
        "and re-read them); 'two versions' = a second copy of the version loaded beside the first, as during",
        "a hot swap. 'served': the bench's request mix (benchmarks.serving: known customers, histories, text",
        "queries, filters) at a fixed rate through the real Triton (the reference's towers) and the retriever",
        "(its flags in the column) over HTTP on these 2 cores; its resident memory after the run, summed over its",
        "processes (anon and file-backed, as above; a pod's 4 Gi limit is charged for both, the file pages being",
        "reclaimable and, shared between KServe workers, charged once).",
        "",
        "| articles | index | build s | index MiB | load s | anon MiB | file MiB | anon, two versions |"
        " recall@10 | p50 ms | p99 ms | more re-ranked: k x factor recall@10 / p50 ms"
        " | text queries: recall@10 / p50 / p99 ms | filtered: share / path / recall@10 / p99 ms"
        " | discovery lists: prior weight, nprobe, recall@10 / p50 ms"
        " | served: QPS, p50 / p99 ms, errors | served: retriever anon / file MiB | served: retriever flags"
        " | served under a memory limit: limit / peak MiB, OOM kills, major faults; cold first run p50 / p99 ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        base = r["memory_before"]["anon_mib"]
        filtered = "; ".join(
            f"{f['share']:.0%} / {f['path']} / {f['recall_at_10']:.3f} / {f['p99_ms']:.1f}"
            for f in r["filtered"].values()
        )
        lines.append(
            f"| {r['articles']:,} | {r['index_type']}{_factor(r)} | {r['build_s']:.0f} | {r['index_mib']:.0f} "
            f"| {r['load_s']:.1f} "
            f"| {r['memory_searched']['anon_mib'] - base:.0f} | {r['memory_searched']['file_mib']:.0f} "
            f"| {r['memory_two_versions']['anon_mib'] - base:.0f} | {r['recall_at_10']:.3f} | {r['p50_ms']:.2f} "
            f"| {r['p99_ms']:.2f} | {_reranked(r)} | {_text(r)} | {filtered} | {_discovery(r)} "
            f"| {_served(r.get('served'))} |"
        )
    lines += _hot_swap_table(rows)
    lines += ["", f"Command: `{command}`", ""]
    (out / "scale.md").write_text("\n".join(lines))
    _plot(rows, out / "scale.png")


def _hot_swap_table(rows: list[dict[str, Any]]) -> list[str]:
    """Rows served with --hot-swap: the measured run (before), the run that swapped a second version in
    under load (during) and the runs after it, each with the pages read back from disk under the limit
    (rows measured before the 'later' run have '-' there)."""
    swapped = [(i + 1, r) for i, r in enumerate(rows) if (r.get("served") or {}).get("hot_swap")]
    if not swapped:
        return []
    lines = [
        "",
        "Hot swaps under load (`--hot-swap`): after the measured run, CURRENT is pointed at a second version",
        "(a copy: its files new to the page cache; `--hot-swap update`: a catalogue update removing 1,000 articles,",
        "its other files the served version's; `--hot-swap add`: one adding 1,000, sharing the vectors and",
        "histories) at the start of the next run, which the retriever's",
        "watcher loads and swaps in while serving; two more runs follow ('after', 'later'). Per run:",
        "p50 / p99 ms, errors, major faults under the limit ('before': with the cold run's, as in the table",
        "above); the retriever's own (anon) memory after it; the cgroup's peak since the start. `--hot-swap turn`:",
        "the swap taken as a replica's turn while another serves (retriever/swap_turns.py): out of rotation while",
        "it loads, no requests sent meanwhile (Kubernetes routes them to the other replica); 'during' says how long.",
        "",
        "| row | articles | index | before | during the swap | after | later | retriever anon MiB before / during /"
        " after / later | peak MiB | swapped |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for number, r in swapped:
        served, swap = r["served"], r["served"]["hot_swap"]
        limit = served.get("memory_limit") or {}
        before = {**served, "major_faults": limit.get("major_faults")}
        runs = [before, *(swap.get(phase) for phase in SWAP_PHASES)]
        anon = " / ".join("-" if run is None else f"{run['retriever_memory']['anon_mib']:.0f}" for run in runs)
        shown = " | ".join("-" if run is None else _swap_run(run) for run in runs)
        last = [run for run in runs if run is not None][-1]
        lines.append(
            f"| {number} | {r['articles']:,} | {r['index_type']}{_factor(r)} | {shown} | {anon} "
            f"| {_mib(last.get('peak_mib'))} | {'yes' if swap['swapped'] else 'NO'} |"
        )
    return lines


def _mib(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def _swap_run(run: dict[str, Any]) -> str:
    faults = run.get("major_faults")
    pages = "-" if faults is None else f"{faults:,}"
    if "out_of_rotation_s" in run:  # --hot-swap turn: no requests while it loaded
        return f"out of rotation {run['out_of_rotation_s']:.1f} s, -, {pages}"
    return f"{run['p50_ms']:.2f} / {run['p99_ms']:.2f}, {run['errors']}, {pages}"


def _factor(row: dict[str, Any]) -> str:
    """The re-rank factor, and the vectors' dtype where not float32 (rows before the option were float32)."""
    notes = [f"k x {row['rerank_factor']}"] if row.get("rerank_factor") else []
    if row.get("vector_dtype", "float32") != "float32":
        notes.append(f"{row['vector_dtype']} vectors")
    return f" ({'; '.join(notes)})" if notes else ""


def _reranked(row: dict[str, Any]) -> str:
    """Rows measured before the re-rank sweep have no such column: '-', as for uncompressed types."""
    more = row.get("rerank") or {}
    return "; ".join(f"x{f}: {m['recall_at_10']:.3f} / {m['p50_ms']:.2f}" for f, m in more.items()) or "-"


def _discovery(row: dict[str, Any]) -> str:
    """Rows measured before discovery lists were (2026-12-02), or whose reference has one weight, have '-'."""
    found = row.get("discovery")
    if not found:
        return "-"
    nprobe = "-" if found["nprobe"] is None else found["nprobe"]
    return f"{found['weight']:g}, {nprobe}, {found['recall_at_10']:.3f} / {found['p50_ms']:.2f}"


def _text(row: dict[str, Any]) -> str:
    """Rows measured before text queries were (2026-12-01) have '-'."""
    text = row.get("text")
    return f"{text['recall_at_10']:.3f} / {text['p50_ms']:.2f} / {text['p99_ms']:.2f}" if text else "-"


def _served(served: dict[str, Any] | None) -> str:
    if not served:
        return "- | - | - | -"
    return (
        f"{served['achieved_qps']:.0f}, {served['p50_ms']:.2f} / {served['p99_ms']:.2f}, {served['errors']} "
        f"| {served['retriever_memory']['anon_mib']:.0f} / {served['retriever_memory']['file_mib']:.0f} "
        f"| `{' '.join(served.get('retriever_args', []))}` | {_limited(served)}"
    )


def _limited(served: dict[str, Any]) -> str:
    """Rows measured without a cgroup (or before it existed): 'none'."""
    limit, cold = served.get("memory_limit"), served.get("cold")
    if not limit:
        return "none"
    return (
        f"{limit['limit_mib']:.0f} / {limit['peak_mib']:.0f}, {limit['oom_kills']}, {limit['major_faults']}; "
        f"cold {cold['p50_ms']:.2f} / {cold['p99_ms']:.2f}"
    )


def _rerank_factors() -> str:
    from serving.catalog import (
        RERANK_FACTORS,
        RERANK_MAX_CANDIDATES,
        UNWEIGHTED_RERANK_FACTORS,
        UNWEIGHTED_RERANK_MAX_CANDIDATES,
    )

    factors = ", ".join(f"{factor} ({kind})" for kind, factor in RERANK_FACTORS.items())
    unweighted = ", ".join(f"{factor} ({kind})" for kind, factor in UNWEIGHTED_RERANK_FACTORS.items())
    return (
        f"{factors}, at most {RERANK_MAX_CANDIDATES:,} candidates or 2k; {unweighted} without a prior weight, at most"
        f" {UNWEIGHTED_RERANK_MAX_CANDIDATES:,} or 2k"
    )


def _nprobe() -> int:
    from twotower.config import RetrieverConfig

    return RetrieverConfig.ivf_nprobe


def _plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (memory, latency) = plt.subplots(1, 2, figsize=(10, 4))
    latest = {(r["index_type"], r["articles"]): r for r in rows}  # a page may hold older runs of the same pair
    for index_type in dict.fromkeys(r["index_type"] for r in rows):
        mine = sorted((r for (kind, _), r in latest.items() if kind == index_type), key=lambda r: r["articles"])
        sizes = [r["articles"] for r in mine]
        anon = [r["memory_searched"]["anon_mib"] - r["memory_before"]["anon_mib"] for r in mine]
        memory.plot(sizes, anon, marker="o", label=index_type)
        latency.plot([r["recall_at_10"] for r in mine], [r["p99_ms"] for r in mine], marker="o", label=index_type)
    memory.set(xscale="log", xlabel="articles", ylabel="retriever's own memory after load, MiB")
    latency.set(xlabel="recall@10 vs exact (1M and 10M)", ylabel="p99 ms, one query, 1 thread")
    figure.suptitle("the latest row of each index type and size")
    memory.legend()
    latency.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1000000", help="comma-separated article counts")
    parser.add_argument("--index-types", default=",".join(INDEX_TYPES))
    parser.add_argument(
        "--reference",
        default=None,
        help="index root to imitate (default: make eval's, else make bench's, built first where neither exists); "
        f"'{RANDOM_REFERENCE}': random mixtures, no served rows",
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="the data make bench's export is built from where there is no reference (default: the H&M data beside "
        "this checkout, else a synthetic shop)",
    )
    parser.add_argument(
        "--model-repository",
        type=Path,
        default=None,
        help="the reference's Triton repository, for the served-path rows (default: beside the reference index root)",
    )
    parser.add_argument("--rate", type=float, default=100.0, help="QPS of the served-path run")
    parser.add_argument("--seconds", type=float, default=30.0, help="length of the served-path run")
    parser.add_argument(
        "--retriever-args",
        default="--history-clock index",
        help="flags of the served-path run's retriever (e.g. add '--workers 2': a KServe worker per core)",
    )
    parser.add_argument(
        "--memory-limit-mib",
        type=int,
        default=4096,
        help="run the served-path retriever in a memory cgroup of this limit, as the pod's 4 Gi (0: none; "
        "applied where the host allows creating one, benchmarks.memory_limit)",
    )
    parser.add_argument(
        "--vector-dtype",
        default="float16",
        choices=artifacts.VECTOR_DTYPES,
        help="how each version stores its item vectors (export --vector-dtype; float16, what a catalogue of "
        "millions needs under a 4 Gi pod: docs/scale.md rows 24-27)",
    )
    parser.add_argument(
        "--hot-swap",
        nargs="?",
        const="in-place",
        default="",
        choices=HOT_SWAP_MODES,
        help="after the served run, three more: one that swaps in a second version under load, two after it; "
        "'turn': the swap taken out of rotation, as a replica's turn while another serves (no requests meanwhile); "
        "'update': in place, to a catalogue update removing 1,000 articles, which shares the served version's files; "
        "'add': the same, to an update adding 1,000 articles (shares the vectors and histories)",
    )
    parser.add_argument("--work-dir", type=Path, default=Path("runs/scale"))
    parser.add_argument("--out", type=Path, default=Path("docs"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sizes = [int(s) for s in args.sizes.split(",")]
    index_types = args.index_types.split(",")
    unknown = [t for t in index_types if t not in ("flat", "hnsw", *artifacts.IVF_INDEX_TYPES)]
    if unknown:
        parser.error(f"--index-types: unknown {unknown}")
    reference_root = resolve_reference(args.reference, args.data_dir)
    reference = Reference(reference_root)
    repository = args.model_repository or (references.repository_path(reference_root) if reference_root else None)
    if repository is not None and not repository.is_dir():
        log.warning("no model repository at %s: no served-path rows", repository)
        repository = None
    rows = run(
        sizes,
        index_types,
        reference,
        args.work_dir,
        repository,
        args.rate,
        args.seconds,
        args.retriever_args.split(),
        args.memory_limit_mib,
        args.vector_dtype,
        args.hot_swap,
    )
    report(rows, reference.source, args.out, "python -m benchmarks.scale " + " ".join(argv or sys.argv[1:]))
    print((args.out / "scale.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
