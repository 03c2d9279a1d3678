"""One loaded index version: FAISS index, item vectors and metadata, known customers' histories.

The reader of the index directory (twotower.artifacts) and the served `ItemSpace` of
twotower.ranking: how to search the index fast (a plain ANN search, an over-fetch, an id selector or
brute force over few rows) lives here; what to rank lives there. Immutable once loaded: the retriever
swaps whole Catalog objects, so a request that started on one version finishes on it.
"""

from __future__ import annotations

import json
import logging
import mmap
import time
from pathlib import Path
from typing import Any, Sequence

import faiss
import numpy as np

from serving.exact_rows import ExactRows
from serving.filters import FilterColumns, KeptMasks
from serving.gpu_search import GPU_MAX_K, GpuIndex, gpu_copy
from serving.ivf_lists import IvfLists, ProbeSetting, search_lists
from serving.lexical import LexicalIndex
from twotower import artifacts, popularity, ranking, repeats
from twotower.config import RetrieverConfig
from twotower.data.histories import PAD, Histories, user_tower_inputs
from twotower.files import RowBlocks, VectorRows, drop_from_page_cache, load_npz_mapped
from twotower.item_table import ItemTable
from twotower.ranking import Purchases
from twotower.second_stage import ArticleSignals, SecondStage

log = logging.getLogger("serving.catalog")


MAX_FILTERED_EF = 2048
# A filtered IVF search probes nprobe / selectivity lists, at most this many times nprobe. Measured at 1M
# synthetic articles (ivf-pq, 4,000 lists, nprobe 128, 100 real user vectors, one thread): a 5% product group
# probed 2,565 lists in 7.0 / 9.6 ms (p50 / p99) for recall@10 1.000; capped at 1,024, 3.1 / 3.5 ms for 0.986;
# a 1.8% group 9.4 / 12.1 ms -> 2.2 / 2.5 ms, recall 1.000 -> 0.969; a 41% group (316 lists) is not capped.
# A cap of 4x fell to recall 0.881 on the 1.8% group. On H&M (1,299 lists) the cap is never reached.
MAX_FILTERED_PROBE_FACTOR = 8
# Where the index knows each row's list (serving.ivf_lists), a filtered search probes instead the nearest lists that
# hold allowed rows until they hold this many times the rows an unfiltered search scans (at most the lists above).
# 10M synthetic articles whose product groups sit in few lists as on H&M (ivf-pq-fastscan, 12,649 lists, nprobe 128,
# 60 real user vectors, top 300, one thread), recall@10 against exact filtered search over the nine groups of 1.8-40%:
# widened nprobe 0.023-0.962 (0.035 for shoes: the lists nearest a customer's taste hold none); these lists x1
# 0.772-1.000, x1.5 0.922-1.000, x2 0.967-1.000, paired time per search x1.5 -1.6 .. +2.8 ms (3-5 ms before). H&M
# (105,542 articles, 1,299 lists; only its 40% group is searched this way, smaller ones exactly): recall@10 0.969
# -> 0.972, -0.03 ms (2026-12-01, docs/scale.md).
FILTERED_ROWS_FACTOR = 1.5
# With IO_FLAG_MMAP_IFC (faiss 1.15.1 here; a faiss without the flag reads the index in), faiss reads flat, HNSW
# and IVF indexes (codes in ArrayInvertedLists: flat, SQ8, PQ) zero-copy: their arrays point into the mapped
# file. Those pages are then shared by the KServe workers and reclaimable, and a hot swap maps the new version
# beside them instead of holding two copies in the process's own memory.
# Measured (64 dims, 1 thread, a fresh process per load): at 1M rows IVF-PQ 0 MiB of its own memory instead
# of 24 and IVF-SQ8 0 instead of 69, at 300k HNSW 4 instead of 151 and flat 0 instead of 73. Search time the
# same: IVF-PQ p50 0.48 / 0.48 ms, IVF-SQ8 0.56 / 0.56 (mapped / read, second of two alternating runs).
# Not IO_FLAG_MMAP: that serves IVF lists through OnDiskInvertedLists, 2.55 ms per H&M query instead of 0.87.
# FastScan's block lists are still read into memory (the flag leaves them as they were).
INDEX_READ_FLAGS = getattr(faiss, "IO_FLAG_MMAP_IFC", 0)
# Index types faiss copies into the process whatever the flags: read without INDEX_READ_FLAGS, then the file's
# pages dropped from the page cache. Mapped, a FastScan index kept the whole file mapped beside its copy: at 10M
# (434 MiB file) +465 MiB own and +428 MiB mapped memory, read in 5.0 s from a cold cache; read, +472 MiB own,
# nothing mapped, 0.44-0.52 s; searches the same (1.19-1.29 against 1.22-1.27 ms at k 120, nprobe 128, one thread;
# a fresh process each, two rounds, 2026-12-01). Under a pod's memory limit those pages crowded out the mapped
# vectors and metadata requests read.
READ_IN_INDEX_TYPES = ("ivf-pq-fastscan",)
# A compressed index (codes, not vectors) is searched for k * this many candidates, which are then scored
# exactly from the full vectors (docs/scale.md measures recall@10). The 4-bit FastScan codes are coarser: at
# 1M (nprobe 128, 300 real user vectors) k x 10 candidates gave recall@10 0.863, k x 25 0.930 (8-bit ivf-pq
# with k x 10: 0.933), and k x 50 no more: the probed lists bound it. At 10M k x 25 fell to 0.822; k x 50
# gave 0.918 and k x 100 0.943, one query p50 1.58 / 1.74 / 2.04 ms (docs/scale.md row 15).
RERANK_FACTORS = {"ivf-sq8": 10, "ivf-pq": 10, "ivf-pq-fastscan": 50}
# A search without a prior weight (text queries, similar items, a version without a prior or served at weight 0; a
# batch if any of its queries) re-ranks twice as many: the best sellers scored exactly beside the index
# (serving.exact_rows) do not fill its top, its results come through the codes. ivf-pq-fastscan, recall@10 of 200
# text queries (the query tower's vectors of the bench's phrases) at k x 50 / k x 100, one thread, 2026-12-01: 10M
# 0.875 / 0.934 (k x 150: 0.957), 1M 0.969 / 0.993, at +0.2-0.5 ms a search; 100 real user vectors at prior weight
# 0: 10M 0.785 / 0.805, 1M 0.945 / 0.964. At the served prior weight the same users gained nothing (10M 0.937 /
# 0.940, 1M 0.997 / 0.997): not for them.
UNWEIGHTED_RERANK_FACTORS = {index_type: 2 * factor for index_type, factor in RERANK_FACTORS.items()}
# ... but at most this many (or 2k): a customer's list asks for the second stage's pool of 300, and 300 x 50
# candidates cost 12.7 ms per query at 10M (p50, one thread), 10.2 of them the exact re-rank of 15,000 float16
# rows, against 1.6 ms for k = 12. 10M ivf-pq-fastscan, 60 real user vectors, recall of the exact top 300 / top 100 /
# top 12 at 600, 1,200, 2,400, 4,800 and 15,000 candidates 0.727 / 0.801 / 0.815 / 0.815 / 0.815, 0.846 / 0.883 /
# 0.887 / 0.887 / 0.887, 0.935 / 0.942 / 0.942 / 0.942 / 0.942: past 2,400 the probed lists bound it (docs/scale.md).
# With a prior weight (customers' and histories' lists) 1,200: against 2,400, the pool's search at k 300 took 0.74
# ms less at 10M (paired median, 95% 0.71-0.76; 200 real user vectors x 3 rounds, one thread) and 0.71 ms less at
# 1M, the same top 12, top 100 / 300 overlapping 0.989 / 0.960 at 10M and 1.000 / 0.996 at 1M (2026-12-02).
# Filtered (the probed lists widened by 1/selectivity, before the lists holding allowed rows), 40 users' top 300:
# recall 0.873 / 0.874 (40% group) and 0.906 / 0.906 (5%) with 2,400 / 15,000, 10.3 / 19.2 and 16.2 / 25.4 ms;
# filtered at 1,200 against 2,400 (the lists holding allowed rows, 40 users, k 300, 10M, 2026-12-02): the same top 12,
# top 100 / 300 overlapping 0.989-1.000 / 0.929-0.956 (40%, 11%, 5% groups), p50 0.6-1.6 ms less. ivf-pq and
# ivf-sq8 (k x 10, finer codes than FastScan's) reach the cap only past k = 120.
RERANK_MAX_CANDIDATES = 1200
# Without a prior weight twice as many, as UNWEIGHTED_RERANK_FACTORS: nothing scored beside the index fills their top
UNWEIGHTED_RERANK_MAX_CANDIDATES = 2400
TYPICAL_K = 100  # results per search that rows_per_search assumes (the shop asks 12-100)
# Filters' masks kept without a version's removed rows (Catalog.shown), per loaded version (two during a swap): at
# 10M rows 10 MB each plus its packed bitmap once searched (1.25 MB), and up to 10 MB more for its source mask
# while serving.filters' own cache has let it go.
SHOWN_MASKS_KEPT = 8


def _drop_rows(similarities: np.ndarray, rows: np.ndarray, hidden: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    out_similarities = np.full((len(rows), k), -np.inf, dtype=np.float32)
    out_rows = np.full((len(rows), k), -1, dtype=np.int64)
    for i in range(len(rows)):
        keep = rows[i][(rows[i] >= 0)]
        keep_mask = ~hidden[keep]
        kept_rows, kept_sims = keep[keep_mask][:k], similarities[i][: len(keep)][keep_mask][:k]
        out_rows[i, : len(kept_rows)], out_similarities[i, : len(kept_rows)] = kept_rows, kept_sims
    return out_similarities, out_rows


def _widening(selectivity: float) -> float:
    """How many times more IVF lists a search restricted to this share of the rows probes. Probing 1/selectivity times
    more lists scans about as many allowed rows as an unfiltered search; past MAX_FILTERED_PROBE_FACTOR the nearest
    lists already hold the allowed rows that rank."""
    return min(1.0 / selectivity, MAX_FILTERED_PROBE_FACTOR)


def as_float32(rows: np.ndarray) -> np.ndarray:
    """Gathered vector rows in float32: float16 ones decoded by faiss' SIMD decoder, not numpy's scalar cast (2,400 x
    128, one thread: 0.33 instead of 0.60 ms; the re-rank's product after it 0.35 ms against 0.67 in float16)."""
    if rows.dtype != np.float16 or rows.size == 0:
        return rows
    decoder = faiss.ScalarQuantizer(rows.shape[-1], faiss.ScalarQuantizer.QT_fp16)
    flat = np.ascontiguousarray(rows).reshape(-1, rows.shape[-1])
    return decoder.decode(flat.view(np.uint8)).reshape(rows.shape)


def random_access(array: np.ndarray) -> None:
    """Tell the kernel a memory-mapped array is read at random (no read-ahead around each page fault)."""
    mapping = getattr(array, "_mmap", None)
    if mapping is not None and hasattr(mmap, "MADV_RANDOM"):
        mapping.madvise(mmap.MADV_RANDOM)


class UnknownIds(KeyError):
    def __init__(self, kind: str, ids: list[str]):
        shown = ", ".join(repr(i) for i in ids[:5]) + (f" and {len(ids) - 5} more" if len(ids) > 5 else "")
        super().__init__(f"unknown {kind}: {shown}")
        self.message = f"unknown {kind}: {shown}"


class Catalog:
    # Set in __init__, read from another Catalog (`shares_with`) before this one sets them: declared here.
    items: ItemTable
    filter_columns: FilterColumns
    products: repeats.Products | None
    history_rows: np.ndarray
    history_age: np.ndarray
    history_last_day: np.ndarray
    customer_vectors: np.ndarray | None
    customer_row: dict[str, int]
    ivf_lists: IvfLists | None

    def __init__(
        self,
        index_dir: Path | str,
        hnsw_ef_search: int = RetrieverConfig.hnsw_ef_search,
        ivf_nprobe: int = RetrieverConfig.ivf_nprobe,
        exact_search_limit: int = RetrieverConfig.exact_search_limit,
        faiss_gpu: str = "off",
        popularity_weight: float = RetrieverConfig.popularity_weight,
        lexical: bool = True,
        verify: bool = True,
        mapped: bool = RetrieverConfig.index_mmap,
        shares_with: "Catalog | None" = None,
    ):
        """`index_dir` is a version directory or an index root (its CURRENT version is loaded).

        Search settings default to the served ones, so offline evaluation measures what is served;
        `faiss_gpu` (auto | on | off, serving.gpu_search) moves unfiltered searches to a GPU copy;
        `popularity_weight` >= 0 replaces the prior weight the index was fitted with; `lexical` False
        leaves the BM25 index on disk (a retriever serving text by vector alone never reads it); `verify`
        False skips the files' sha256 (only for a copy of a Catalog that checked them: __setstate__);
        `mapped` False reads the FAISS index and the BM25 matrix into the process (INDEX_READ_FLAGS: what
        mapping saves). `shares_with` is a loaded version (the served one, during a hot swap) whose files this
        one may share (a catalogue update links what it left unchanged: export.catalogue_index.SharedParts):
        those are not hashed again, and what is derived from a shared part is taken over, not built again (the
        FAISS index object, the metadata's lookups, filter masks and products, the customers' id map).
        """
        # What a copy in another process is rebuilt from (__getstate__): the files, not the mapped memory.
        self._arguments: dict[str, Any] = {
            "index_dir": index_dir,
            "hnsw_ef_search": hnsw_ef_search,
            "ivf_nprobe": ivf_nprobe,
            "exact_search_limit": exact_search_limit,
            "faiss_gpu": faiss_gpu,
            "popularity_weight": popularity_weight,
            "lexical": lexical,
            "mapped": mapped,
        }
        started = time.perf_counter()
        self.index_dir = artifacts.resolve_index_dir(index_dir)
        self.hnsw_ef_search = hnsw_ef_search
        self.ivf_nprobe = ivf_nprobe
        self.exact_search_limit = exact_search_limit
        self.popularity_weight = popularity_weight
        self.manifest = artifacts.read_manifest(self.index_dir)
        # The IVF lists a search at each prior weight probes, as export measured them on this version's customers
        # (serving.nprobe; float32 keys: the weight as the index's queries carry it); ivf_nprobe stays the floor, and
        # the weights that need no more than it are left out (H&M's: its searches take the one-nprobe path)
        self.probes_by_weight = {
            np.float32(setting.weight): setting.nprobe
            for setting in map(ProbeSetting.from_json, self.manifest.ivf_probes)
            if setting.nprobe > ivf_nprobe
        }
        self.widest_nprobe = max([ivf_nprobe, *self.probes_by_weight.values()])  # any search's, unfiltered
        if self.probes_by_weight:
            log.info(
                "%s: IVF lists probed at prior weight %s as export measured (%d at any other weight)",
                self.index_dir,
                ", ".join(f"{w:g}: {n}" for w, n in self.probes_by_weight.items()),
                ivf_nprobe,
            )
        checked = None if shares_with is None else (shares_with.index_dir, shares_with.manifest)

        def shared(part: str) -> bool:
            """This part's files are the served version's: what it derives from them is taken over, not rebuilt."""
            return checked is not None and artifacts.shares_part((self.index_dir, self.manifest), checked, part)

        if verify:
            artifacts.verify_files(self.index_dir, self.manifest, checked)
        # The popularity prior per article (twotower.popularity); indexes written before it have none
        # and search by cosine alone. With it, the index's rows are [vector, bias].
        self.item_bias: np.ndarray | None = None
        if artifacts.ITEM_BIAS_FILE in self.manifest.files:
            # Mapped like the vectors (38 MiB of the process's own memory at 10M articles, per version, when read in)
            self.item_bias = np.asarray(np.load(self.index_dir / artifacts.ITEM_BIAS_FILE, mmap_mode="r"))
        index_path = self.index_dir / artifacts.INDEX_FILE
        self.index: Any
        self.gpu: GpuIndex | None
        if shares_with is not None and shared(artifacts.INDEX_FILE) and self._same_settings(shares_with):
            # A FastScan index is read into the process (~430 MiB at 10M articles): one copy for both versions.
            self.index, self.gpu, ivf_lists = shares_with.index, shares_with.gpu, shares_with.ivf_lists
        else:
            # HNSW, IVF (any codes) or flat, its arrays pointing into the mapped file (INDEX_READ_FLAGS).
            read_in = not mapped or self.manifest.index_type in READ_IN_INDEX_TYPES
            self.index = faiss.read_index(str(index_path), 0 if read_in else INDEX_READ_FLAGS)
            if read_in:  # the process holds its own copy
                self._drop_cached(index_path)
            if hasattr(self.index, "hnsw"):
                self.index.hnsw.efSearch = hnsw_ef_search
            if hasattr(self.index, "nprobe"):
                self.index.nprobe = ivf_nprobe
            # One nprobe for the GPU copy's searches: the widest any weight was measured to need
            self.gpu = gpu_copy(self.index, faiss_gpu, self.widest_nprobe)
            ivf_lists = None  # made once the version's parts are checked against each other, below
        self.rerank_factor = RERANK_FACTORS.get(self.manifest.index_type, 0)  # 0: the index holds the vectors
        self.unweighted_rerank_factor = UNWEIGHTED_RERANK_FACTORS.get(self.manifest.index_type, 0)
        # ... and at most (or 2k): attributes, as benchmarks vary them
        self.rerank_max_candidates = RERANK_MAX_CANDIDATES
        self.unweighted_rerank_max_candidates = UNWEIGHTED_RERANK_MAX_CANDIDATES
        # Memory-mapped, read-only: pages come from the page cache as rows are read (re-ranking, history
        # inputs), shared by every process and by the old and new version during a hot swap.
        blocks = []
        for name in artifacts.vector_files(self.manifest):  # one file, or a catalogue update's appended blocks too
            mapped_vectors = np.load(self.index_dir / name, mmap_mode="r")
            # Rows are read at random (re-ranking, histories): without this hint every fault reads ahead ~128 KiB
            # of neighbours, and 700 searches over 10M articles mapped 5.4 GB of a 5 GB file (docs/scale.md).
            random_access(mapped_vectors)
            # A plain ndarray view of the same pages: indexing an np.memmap goes through Python, 0.1 ms for each
            # of the second stage's five gathers per request on H&M (cProfile, 2026-11-30).
            blocks.append(np.asarray(mapped_vectors))
        try:
            self.vectors: VectorRows = blocks[0] if len(blocks) == 1 else RowBlocks(blocks)
        except ValueError as err:
            raise artifacts.ArtifactError(f"{self.index_dir}: {err}") from err
        # The BM25 index for hybrid text search; indexes written before it search text by vector alone.
        self.lexical: LexicalIndex | None = None
        if lexical and any(name.startswith(artifacts.LEXICAL_DIR + "/") for name in self.manifest.files):
            keyword_blocks = [self.index_dir / block for block in self.manifest.lexical_blocks]
            self.lexical = LexicalIndex.load(self.index_dir / artifacts.LEXICAL_DIR, keyword_blocks, mmap=mapped)
        # The same metadata columns as the served version (an update that removed articles): its lookups, filter
        # masks and products serve this one too. At 10M grouping the products alone took 1.5-4.4 s of the load.
        previous = shares_with if shares_with is not None and shared(artifacts.ITEMS_DIR) else None
        self.items = previous.items if previous else artifacts.read_items(self.index_dir, self.manifest)  # mapped
        self.article_ids = self.items.article_ids
        # A changed article is appended as a new row and its old row excluded: the last row wins.
        self.row_of = self.items.row_of
        self.excluded_rows = np.unique(np.asarray(artifacts.read_excluded(self.index_dir), dtype=np.int64))
        self.excluded = np.zeros(len(self.article_ids), dtype=bool)
        self.excluded[self.excluded_rows] = True
        self.n_excluded = len(self.excluded_rows)  # immutable: counted once, not per search
        # More hidden rows than an over-fetch can drop (removed articles pile up: a shop removes what sold out):
        # searches pass the index a selector of the available rows, built once per version (None: none needed, or
        # a masked search is exact there).
        self._available = self._available_rows() if self.n_excluded > ranking.OVERFETCH_LIMIT else None
        # Recent filters' masks without this version's excluded rows, by the id of the filter's mask (kept alive
        # with them, so the id stays its own).
        self._shown: KeptMasks[int] = KeptMasks(SHOWN_MASKS_KEPT)
        self.filter_columns = previous.filter_columns if previous else FilterColumns(self.items)
        self.product_types = self.filter_columns.product_type  # the diversity cap groups by it
        # Articles of one product (other colours) for the sibling boost; indexes without product_code have none.
        self.products = previous.products if previous else None
        if previous is None and "product_code" in self.items:
            codes = self.items["product_code"]
            self.products = repeats.Products.from_encoded(codes.codes, codes.values)
        if shares_with is not None and shared(artifacts.HISTORIES_FILE):
            self.history_rows, self.history_age = shares_with.history_rows, shares_with.history_age
            self.history_last_day, self.customer_vectors = shares_with.history_last_day, shares_with.customer_vectors
            self.customer_row = shares_with.customer_row
        else:
            histories = load_npz_mapped(self.index_dir / artifacts.HISTORIES_FILE)  # memory-mapped, like the vectors
            self.history_rows = histories["rows"]
            self.history_age = histories["age_days"]
            self.history_last_day = histories["last_day"]
            # Precomputed by export (NaN rows: recompute); indexes written before them have none.
            self.customer_vectors = histories.get("user_vectors")
            self.customer_row = {str(c): i for i, c in enumerate(histories["customer_ids"])}
        self.score_head = artifacts.ScoreHeadWeights.from_json(
            json.loads((self.index_dir / artifacts.SCORE_HEAD_FILE).read_text())
        )
        # Customers' and histories' lists are re-ordered by the second stage when export shipped its signals and
        # training its weights (twotower.second_stage); older indexes rank by the first stage alone.
        self.second_stage: SecondStage | None = None
        if self.score_head.stage is not None and artifacts.SECOND_STAGE_FILE in self.manifest.files:
            signals = ArticleSignals.load(self.index_dir / artifacts.SECOND_STAGE_FILE)
            self.second_stage = SecondStage(signals, self.score_head.stage)
        self._check_consistency()
        # Each row's IVF list, and each list's best prior among the rows this version shows: unfiltered searches
        # probe the lists they rank best by both (serving.ivf_lists)
        self.ivf_lists = ivf_lists or IvfLists.of(self.index)
        self.list_priors: np.ndarray | None = None
        if self.ivf_lists is not None and self.item_bias is not None:
            self.list_priors = self.ivf_lists.best_priors(self.item_bias, self.excluded)
        # A catalogue update's additions the index does not hold, and an IVF index's most popular rows this version
        # shows: scored exactly beside it (serving.exact_rows).
        self.exact_rows = ExactRows.beside(
            self.vectors, self.item_bias, self.index.ntotal, self.excluded, popular=self.ivf_lists is not None
        )
        log.info(
            "loaded index %s: %d items (%d excluded), dim %d, %s (%d rows past it, %d scored exactly), vectors in %d "
            "file(s), %d customers, model version %d, popularity prior weight %g, second stage %s (%.1fs)",
            self.index_dir,
            len(self.article_ids),
            self.n_excluded,
            self.manifest.dim,
            self.manifest.index_type,
            self.manifest.unindexed_rows,
            0 if self.exact_rows is None else len(self.exact_rows),
            len(artifacts.vector_files(self.manifest)),
            len(self.customer_row),
            self.manifest.model_version,
            self.prior_weight,
            "on" if self.second_stage is not None else "off",
            time.perf_counter() - started,
        )

    @staticmethod
    def _drop_cached(path: Path) -> None:
        try:
            drop_from_page_cache(path)
        except OSError as err:  # an advice: a volume that refuses it costs only page cache
            log.debug("%s stays in the page cache: %s", path, err)

    def _same_settings(self, other: "Catalog") -> bool:
        """`other` searches its FAISS index as this version would (its index object can serve both)."""
        settings = ("hnsw_ef_search", "ivf_nprobe", "faiss_gpu", "mapped")
        return all(self._arguments[name] == other._arguments[name] for name in settings)

    def __getstate__(self) -> dict[str, Any]:
        # KServe's --workers N pickles the model. Pickled memmaps would arrive as private copies (every
        # worker a full copy of the vectors and columns): each worker maps the same files again instead.
        # The version directory is immutable and this process checked its hashes: a worker does not
        # hash it again (~20 s at 10M articles, per worker).
        return {"_arguments": {**self._arguments, "index_dir": self.index_dir, "verify": False}}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state["_arguments"])  # type: ignore[misc]

    @property
    def rows_per_search(self) -> int:
        """About how many rows an unfiltered search scores: all of a flat index, the probed lists' share of
        an IVF one (plus a compressed index's exact re-rank); HNSW visits about efSearch x its degree; plus a
        pass over every row where many excluded rows make each search a masked one."""
        if hasattr(self.index, "hnsw"):
            scanned = self.hnsw_ef_search * 32
        elif hasattr(self.index, "nprobe"):
            probed = self.index.ntotal * min(1.0, self.widest_nprobe / max(1, self.index.nlist))
            # as a weighted search (text queries re-rank up to twice as many: ~1% more rows at 10M); 0 where the
            # index holds the vectors
            scanned = probed + self._rerank_candidates(TYPICAL_K)
        else:
            scanned = self.index.ntotal
        if self.n_excluded > ranking.OVERFETCH_LIMIT and (self._available is None or self.gpu is not None):
            scanned += len(self.excluded)  # `search` masks every row for each query
        return int(scanned) + (0 if self.exact_rows is None else len(self.exact_rows))  # scored exactly beside it

    def prefetch(self, chunk_bytes: int = 8 << 20) -> int:
        """Read the version's memory-mapped files once, in order (item metadata columns, histories, the prior, then the
        item vectors, which requests read at random: a 4 KiB page per row, `random_access`), so that their
        pages are in the page cache before requests need them. Returns the bytes read. For a replica out of
        rotation after a swap (retriever/index_slot.py): at 10M under 4 Gi, one that rejoined without it read
        ~236,000 pages back from disk and refused 103 of 3,000 requests in its first 30 s (docs/scale.md).
        The FAISS index file is left out: read into memory for ivf-pq-fastscan (the type measured), and a mapped
        IVF index reads only the lists a search probes."""
        names = [name for name in self.manifest.files if name.startswith(artifacts.ITEMS_DIR + "/")]
        names += [name for name in (artifacts.HISTORIES_FILE, artifacts.ITEM_BIAS_FILE) if name in self.manifest.files]
        names += artifacts.vector_files(self.manifest)
        done = 0
        buffer = bytearray(chunk_bytes)
        for name in names:
            with open(self.index_dir / name, "rb", buffering=0) as handle:
                while read := handle.readinto(buffer):  # without the GIL: requests go on meanwhile
                    done += read
        return done

    @property
    def version(self) -> str:
        return self.manifest.index_version or self.index_dir.name

    @property
    def prior_weight(self) -> float:
        """The popularity prior's weight for customers' lists (0 when this index has no prior)."""
        return self.prior_weight_for(exclude_bought=False)

    def prior_weight_for(self, exclude_bought: bool) -> float:
        """The weight for a customer's list with or without their own articles: the operator's
        --popularity-weight for both when set, else the fitted one."""
        if self.item_bias is None:
            return 0.0
        if self.popularity_weight >= 0:
            return self.popularity_weight
        return self.score_head.prior.weight_for(exclude_bought)

    def _check_consistency(self) -> None:
        m = self.manifest
        problems = []
        if (
            self.index.ntotal + m.unindexed_rows != m.item_count
            or len(self.vectors) != m.item_count
            or len(self.article_ids) != m.item_count
        ):
            problems.append(
                f"item counts differ: index {self.index.ntotal} (+ {m.unindexed_rows} unindexed), vectors "
                f"{len(self.vectors)}, metadata {len(self.article_ids)}, manifest {m.item_count}"
            )
        index_dim = artifacts.index_dimension(m.dim, self.item_bias is not None, m.index_type)
        if self.index.d != index_dim or self.vectors.shape[1] != m.dim:
            problems.append(
                f"dimension differs: index {self.index.d} (expected {index_dim}), vectors "
                f"{self.vectors.shape[1]}, manifest {m.dim}"
            )
        if self.vectors.dtype != np.dtype(m.vector_dtype):
            problems.append(f"vectors are {self.vectors.dtype}, the manifest says {m.vector_dtype}")
        if self.item_bias is not None and self.item_bias.shape != (m.item_count,):
            problems.append(f"item bias shape {self.item_bias.shape} != ({m.item_count},)")
        if self.second_stage is not None and self.second_stage.signals.size > m.item_count:
            problems.append(f"second stage signals have {self.second_stage.signals.size} rows, over {m.item_count}")
        if self.customer_vectors is not None and self.customer_vectors.shape != (len(self.history_rows), m.dim):
            problems.append(f"customer vectors {self.customer_vectors.shape} != ({len(self.history_rows)}, {m.dim})")
        if self.history_rows.shape[1] != m.max_history:
            problems.append(f"history length {self.history_rows.shape[1]} != manifest max_history {m.max_history}")
        if problems:
            raise artifacts.ArtifactError(f"{self.index_dir}: " + "; ".join(problems))

    def rows_for(self, article_ids: list[str]) -> np.ndarray:
        """Current rows of these articles (removed articles stay known: histories may name them)."""
        rows = self.row_of.rows(article_ids)
        if (rows < 0).any():
            raise UnknownIds("article_id", [a for a, row in zip(article_ids, rows) if row < 0])
        return rows

    def customer_vector(self, customer_id: str) -> np.ndarray | None:
        """The user vector export computed for this known customer's stored history, if any."""
        row = self.customer_row.get(customer_id)
        if row is None or self.customer_vectors is None or not np.isfinite(self.customer_vectors[row]).all():
            return None
        return self.customer_vectors[row]

    def customer_history(self, customer_id: str) -> tuple[np.ndarray, np.ndarray]:
        """(rows, ages) most recent first, ages relative to the data's latest day; no padding."""
        row = self.customer_row.get(customer_id)
        if row is None:
            raise UnknownIds("customer_id", [customer_id])
        rows = self.history_rows[row]
        keep = rows != PAD
        # Ages were stored relative to the customer's last purchase; serve them as of the data's last day.
        shift = float(self.manifest.reference_day - self.history_last_day[row])
        return rows[keep].astype(np.int64), self.history_age[row][keep] + shift

    def scores(self, query: np.ndarray, rows: np.ndarray | slice = slice(None), prior: float = 0.0) -> np.ndarray:
        """What the index ranks these rows by for a query [D] (or queries [B, D]): cosine + prior * the
        popularity bias."""
        return ranking.item_scores(self.vectors, self.item_bias, query, rows, prior)

    def _index_queries(self, queries: np.ndarray, prior: float | np.ndarray) -> np.ndarray:
        """Queries as the index holds items: [query, prior weight] when it carries the popularity bias, then
        zeros where the index pads its rows (artifacts.index_dimension)."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        queries = queries if self.item_bias is None else popularity.with_weight(queries, prior)
        padding = self.index.d - queries.shape[1]
        return queries if padding == 0 else np.pad(queries, ((0, 0), (0, padding)))

    def history_tensors(self, histories: list[Purchases]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The user tower's fixed [B, L, D] inputs for (rows most-recent-first, ages) pairs."""
        padded = Histories.from_pairs(histories, self.manifest.max_history)
        return user_tower_inputs(self.vectors, padded.rows, padded.age_days)

    def search(self, queries: np.ndarray, k: int, prior: float | np.ndarray = 0.0) -> tuple[np.ndarray, np.ndarray]:
        """(scores, rows) [B, k] over every available row; rows are -1 past the last result. A score is the
        cosine + `prior` (one weight, or one per query) * the article's popularity bias (`scores`)."""
        if self.n_excluded == 0:
            return self._top_k(self._index_queries(queries, prior), k)
        if self.n_excluded <= ranking.OVERFETCH_LIMIT:
            similarities, rows = self._top_k(self._index_queries(queries, prior), k + self.n_excluded)
            return _drop_rows(similarities, rows, self.excluded, k)
        if self._available is not None and self.gpu is None:
            index_queries = self._index_queries(queries, prior)
            _, selector, params = self._available
            shown = None if self.exact_rows is None else ~self.excluded[self.exact_rows.ids]
            if self.ivf_lists is None:
                return self._top_k(index_queries, k, params, shown)
            # Every available row: the lists ranked as an unfiltered search ranks them, each query's nprobe widened as
            # the selector's is (review: the selector's own nprobe left out the lists measured for a weight)
            widen = _widening((len(self.excluded) - self.n_excluded) / len(self.excluded))  # the selector's, to the bit
            return self._top_k(index_queries, k, None, shown, (*self._ranked_lists(index_queries, widen), selector))
        everything = np.ones(len(self.excluded), dtype=bool)
        priors = np.broadcast_to(np.asarray(prior, dtype=np.float32), (len(queries),))
        results = [self.search_masked(q, k, everything, float(w)) for q, w in zip(queries, priors)]
        return np.stack([r[0] for r in results]), np.stack([r[1] for r in results])

    def _top_k(
        self,
        queries: np.ndarray,
        k: int,
        params: Any = None,
        allowed_exact: np.ndarray | None = None,
        lists: tuple[np.ndarray, np.ndarray, Any] | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """A plain search of every row (or of those `params`' selector allows, on the CPU index; or of the IVF
        `lists`, (lists, their centroids' scores, a selector): serving.ivf_lists): on the GPU copy when there is one.
        A plain search of an IVF index on the CPU probes the lists it ranks best (`_ranked_lists`); a filter's
        selector keeps faiss' nearest ones, as nearest_holding does (measured better for filters). The rows scored
        exactly beside the index (serving.exact_rows) are merged in, the ones `allowed_exact` (bool
        [len(exact_rows)]) allows."""
        # More rows than faiss' GPU k-selection returns (GPU_MAX_K) come from the CPU index
        on_gpu = params is None and lists is None and self.gpu is not None and k <= GPU_MAX_K
        if params is None and lists is None and not on_gpu and self.ivf_lists is not None:
            lists = (*self._ranked_lists(queries), None)

        def search(n: int) -> tuple[np.ndarray, np.ndarray]:
            if lists is not None:
                return search_lists(self.index, queries, n, lists[:2], lists[2])
            if params is not None:
                return self.index.search(queries, n, params=params)
            return (self.gpu or self.index).search(queries, n)

        if not self.rerank_factor:
            found = search(k)
        else:
            fetch = self._rerank_candidates(k, self._unweighted(queries))
            if on_gpu:
                fetch = max(k, min(fetch, GPU_MAX_K))
            _, candidates = search(fetch)
            found = self._rerank(queries, candidates, k)
        if self.exact_rows is None:
            return found
        return self.exact_rows.merged(found, queries, k, allowed_exact)

    def _ranked_lists(self, queries: np.ndarray, widen: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
        """The IVF lists an unfiltered search of `queries` (as the index takes them) probes, each query's `nprobe_at`
        its weight x `widen`, with their centroids' scores: ranked by direction and this version's best prior per
        list (IvfLists.nearest)."""
        assert self.ivf_lists is not None
        weights = None if self.list_priors is None else self._weights(queries)
        probes: int | np.ndarray = self._widened(self.ivf_nprobe, widen)
        if self.probes_by_weight:
            at = self._weights(queries) if self.item_bias is not None else np.zeros(len(queries), np.float32)
            each = np.array([self._widened(self.nprobe_at(w), widen) for w in at], np.int64)
            probes = int(each[0]) if (each == each[0]).all() else each  # one for the batch: faiss' usual search
        return self.ivf_lists.nearest(queries, probes, self.list_priors, weights)

    def _widened(self, nprobe: int, widen: float) -> int:
        return int(min(self.index.nlist, np.ceil(nprobe * widen)))

    def nprobe_at(self, weight: float) -> int:
        """The IVF lists a search at this prior weight probes: as export measured for it (`probes_by_weight`), at
        least the served ivf_nprobe; the served one for a weight it did not measure (text queries, an operator's
        --popularity-weight)."""
        return max(self.ivf_nprobe, self.probes_by_weight.get(np.float32(weight), 0))

    def _available_rows(self) -> tuple[np.ndarray, Any, Any] | None:
        """(bitmap of the rows not excluded, its selector, search parameters selecting them), as a masked search of
        every row would search them (`_plan`, `_selector_params`: the same results; a flat index exactly), or None
        where few rows are left (the masked search scores them exactly). All three are kept: faiss' selector reads
        the bitmap without owning it. At 10M articles (ivf-pq-fastscan, float16 vectors, 1,100 removed, one thread,
        200 stored customers, p50 of two runs of two rounds) a search took 2.7-3.2 ms at k 12 and 4.4-5.6 ms at k
        300 this way, 6.9-7.3 and 7.8-10.1 ms as a masked search per query (a 10M-row mask built, counted and packed
        for each), 1.9-2.6 and 3.3-4.5 ms with nothing removed; the same rows as the masked search."""
        n_available = len(self.excluded) - self.n_excluded
        plan = self._plan(len(self.excluded), n_available)
        flat = not hasattr(self.index, "hnsw") and not hasattr(self.index, "nprobe")
        if n_available == 0 or (plan == "exact" and not flat):  # few rows left: the masked search scores them
            return None
        bitmap = np.packbits(~self.excluded, bitorder="little")
        selector = faiss.IDSelectorBitmap(len(self.excluded), faiss.swig_ptr(bitmap))
        if flat:  # exact either way, batched (review: 50k rows, 1,000 removed, k 100: 0.5 not 2.2 ms per query)
            return bitmap, selector, faiss.SearchParameters(sel=selector)  # type: ignore[call-arg]
        return bitmap, selector, self._selector_params(plan, selector, n_available / len(self.excluded))

    def _selector_params(self, plan: str, selector: Any, selectivity: float, nprobe: int | None = None) -> Any:
        """Search parameters restricted to `selector`'s rows (a share `selectivity` of all), widened as fewer rows
        are allowed. The selector is given to the constructor, and the caller keeps it: some faiss releases keep a
        reference to constructor arguments only, so a selector assigned as `params.sel = ...` could be freed while
        the search reads it (1.15.1, installed here, protects both). An IVF search widens `nprobe` (None: the
        served ivf_nprobe)."""
        if plan == "hnsw+selector":
            # A restricted walk needs a wider beam: efSearch / selectivity^2 (measured on H&M: 1/selectivity gave
            # recall@10 0.94 at 40% selectivity, this 0.97+; docs/filters.md).
            ef = int(min(MAX_FILTERED_EF, np.ceil(self.hnsw_ef_search / selectivity**2)))
            return faiss.SearchParametersHNSW(sel=selector, efSearch=ef)  # type: ignore[attr-defined]
        nprobe = self._widened(nprobe or self.ivf_nprobe, _widening(selectivity))
        return faiss.SearchParametersIVF(sel=selector, nprobe=nprobe)  # type: ignore[call-arg]

    def _weights(self, index_queries: np.ndarray) -> np.ndarray:
        """float32 [B]: each query's prior weight, where `_index_queries` puts it (after the vector); with a prior."""
        return index_queries[:, self.manifest.dim]

    def _unweighted(self, index_queries: np.ndarray) -> bool:
        """Whether some query of a batch carries no prior weight."""
        return self.item_bias is None or not bool(np.all(self._weights(index_queries)))

    def _rerank_candidates(self, k: int, unweighted: bool = False) -> int:
        """How many candidates a compressed index's search for k rows re-ranks exactly."""
        if unweighted:
            factor, most = self.unweighted_rerank_factor, self.unweighted_rerank_max_candidates
        else:
            factor, most = self.rerank_factor, self.rerank_max_candidates
        return min(self.index.ntotal, k * factor, max(most, 2 * k))

    def _rerank(self, index_queries: np.ndarray, candidates: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The best k of each query's candidate rows [B, C] by their exact score, from the full vectors:
        [vector, bias] . [query, prior weight], the score the index approximates."""
        dim = self.manifest.dim
        if candidates.shape[1] < k:  # fewer than k (k past the index's rows): -1 rows after the last, as faiss answers
            candidates = np.pad(candidates, ((0, 0), (0, k - candidates.shape[1])), constant_values=-1)
        found = candidates >= 0
        rows = np.where(found, candidates, 0)
        scores = np.einsum("bcd,bd->bc", as_float32(self.vectors[rows]), index_queries[:, :dim])
        if self.item_bias is not None:
            scores += self.item_bias[rows] * self._weights(index_queries)[:, None]
        scores[~found] = -np.inf
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(scores, order, 1), np.where(
            np.take_along_axis(found, order, 1), np.take_along_axis(rows, order, 1), -1
        )

    def search_plan(self, allowed: np.ndarray) -> str:
        """How `search_masked` will search for this mask (already combined with the excluded rows):
        overfetch (few rows hidden: search the index for k + hidden and drop them), exact (few rows
        allowed: inner products over just them), or hnsw+selector / ivf+selector (the index restricted to
        allowed ids)."""
        return self._plan(len(allowed), self.filter_columns.summary(allowed).count)

    def _plan(self, n: int, n_allowed: int) -> str:
        if n - n_allowed <= ranking.OVERFETCH_LIMIT:
            return "overfetch"
        if n_allowed > self.exact_search_limit:
            if hasattr(self.index, "hnsw"):
                return "hnsw+selector"
            if hasattr(self.index, "nprobe"):
                return "ivf+selector"
        return "exact"

    def shown(self, allowed: np.ndarray) -> np.ndarray:
        """bool [N], read-only: the rows of `allowed` this version shows (not excluded). For a mask serving.filters
        caches (a request's filters) the result and its count are kept for the next request with that filter. At 10M
        rows with 1,100 removed, combining twice and counting per request cost a filtered list 3-4 ms (ranking.rank,
        k 12, one thread, p50: a 40% group 3.9-5.7 ms with none removed, 7.9-9.7 with them; a 5% group 9.7-10.5 and
        13.5-13.6); kept, 3.1-4.3 and 8.5-8.7 ms, as with none removed."""
        if not self.n_excluded:
            return allowed
        if not self.filter_columns.caches(allowed):  # a request's own mask: not seen again
            return np.greater(allowed, self.excluded)
        kept = self._shown.get(id(allowed))
        if kept is not None:
            return kept
        shown = self._shown.put(id(allowed), np.greater(allowed, self.excluded), allowed)
        summary, source = self._shown.summary(shown), self.filter_columns.summary(allowed)
        if summary is not None:  # its IVF lists counted from the filter's values, less the excluded (serving.ivf_lists)
            # `without` first: a search in another thread that finds `values` set counts the excluded out (review)
            summary.without = self.excluded_rows
            summary.values = source.values
        return shown

    def search_masked(
        self, query: np.ndarray, k: int, allowed: np.ndarray, prior: float = 0.0
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k among the rows where `allowed` (and not excluded) is true, for one query vector, by the
        same scores as `search`; rows are -1 past the last result. The selector paths widen the search as
        fewer rows are allowed: HNSW efSearch by 1/selectivity^2; IVF, for a kept filter's mask, probes the nearest
        lists that hold allowed rows (serving.ivf_lists), else nprobe by 1/selectivity up to 8x."""
        summary = self._shown.summary(allowed)  # `shown`'s: excluded rows already out, counted
        kept = summary is not None  # a mask kept for the next request with these filters, with what is learnt of it
        if summary is None:
            if self.n_excluded:
                allowed = np.greater(allowed, self.excluded)  # allowed and not excluded, one pass
            # Counted, not listed, and once (a cached filter's mask: when it was built): at 10M rows count_nonzero
            # takes 0.9 ms, allowed.sum() 5.7 ms and np.flatnonzero over a broad mask ~50 ms.
            kept = self.filter_columns.caches(allowed)
            summary = self.filter_columns.summary(allowed)
        n_allowed = summary.count
        plan = self._plan(len(allowed), n_allowed)
        index_query = self._index_queries(np.reshape(query, (1, -1)), prior)
        if plan == "overfetch":
            similarities, rows = self._top_k(index_query, k + len(allowed) - n_allowed)
            found_similarities, found_rows = _drop_rows(similarities, rows, ~allowed, k)
            return found_similarities[0], found_rows[0]
        if plan == "exact" or n_allowed == 0:
            candidates = np.flatnonzero(allowed)  # few rows: at most exact_search_limit
            scores = self.scores(np.asarray(query, dtype=np.float32).reshape(-1), candidates, prior)
            return ranking.top_k(scores, candidates, k)
        # `bitmap` and `selector` are locals: alive until the search returns (_selector_params says why both).
        bitmap = summary.bitmap(allowed)
        selector = faiss.IDSelectorBitmap(len(allowed), faiss.swig_ptr(bitmap))
        exact = None if self.exact_rows is None else allowed[self.exact_rows.ids]
        if plan == "ivf+selector" and kept and self.ivf_lists is not None:
            # The nearest lists holding allowed rows, until they hold as many as an unfiltered search scans (a
            # request's own mask, seen once, widens nprobe instead: counting its rows per list costs 11-58 ms at 10M)
            nprobe = self.nprobe_at(prior)
            lists = self.ivf_lists.nearest_holding(
                index_query,
                self.ivf_lists.allowed_per_list(allowed, summary),
                int(FILTERED_ROWS_FACTOR * nprobe * self.ivf_lists.rows_per_list),
                int(min(self.ivf_lists.nlist, nprobe * MAX_FILTERED_PROBE_FACTOR)),
            )
            found_similarities, found_rows = self._top_k(index_query, k, None, exact, (*lists, selector))
        else:
            params = self._selector_params(plan, selector, n_allowed / len(allowed), self.nprobe_at(prior))
            found_similarities, found_rows = self._top_k(index_query, k, params, exact)
        return found_similarities[0], found_rows[0]

    def metadata(self, rows: Sequence[int] | np.ndarray) -> list[dict[str, str]]:
        """Each row's metadata columns but article_id (answers carry it beside them): a new dict per row."""
        return self.items.records(rows)
