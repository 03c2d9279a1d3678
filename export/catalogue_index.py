"""Embed the whole catalogue through the exported item tower and write the index directory.

Input: the TorchScript item tower (as written to the model repository), the catalogue and
purchases. Output: an index directory (see twotower.artifacts), written atomically.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Callable, Mapping, Sequence

import faiss
import numpy as np
import pandas as pd
import torch

from serving.catalog import Catalog
from serving.gpu_search import GPU_PQ_SUBQUANTIZERS
from serving.lexical import LexicalIndex
from serving.nprobe import calibrate_nprobe
from twotower import artifacts, item_table, popularity
from twotower.config import RetrieverConfig
from twotower.data.histories import user_tower_inputs
from twotower.data.hm import METADATA_COLUMNS
from twotower.files import RowBlocks, link_or_copy, save_rows, sha256_file, staged_directory
from twotower.model.towers import embed_texts
from twotower.second_stage import ArticleSignals

log = logging.getLogger("export.index")

INDEX_TYPES = ("auto", "flat", "hnsw", *artifacts.IVF_INDEX_TYPES)
# Compressed: the index holds 8-bit (sq8) or product-quantised (pq) codes, not the vectors; the retriever
# re-ranks its top candidates exactly from the full vectors (memory-mapped), serving.catalog.
AUTO_FLAT_LIMIT = 50_000  # above this, exact search costs more than a few ms per query
# k-means on more rows than this many per list buys nothing measurable and costs minutes at 10M rows.
TRAIN_ROWS_PER_LIST = 64
TRAIN_ROWS_MIN = 200_000


def embed_catalogue(
    item_tower: torch.jit.ScriptModule,
    captions: list[str],
    tokenizer: Callable[[list[str]], torch.Tensor],
    batch_size: int = 512,
) -> np.ndarray:
    """float32 [N, D] item vectors, in catalogue order."""
    vectors = embed_texts(item_tower, tokenizer, captions, batch_size, "embedding catalogue")
    return np.ascontiguousarray(vectors.numpy(), dtype=np.float32)


def embed_customers(
    user_tower: torch.jit.ScriptModule,
    item_vectors: np.ndarray,
    rows: np.ndarray,
    ages: np.ndarray,
    batch_size: int = 1024,
) -> np.ndarray:
    """float32 [C, D] user vectors of known customers from their stored histories (rows -1 = padding).

    They are what the retriever would ask Triton for on a customer_id request (same tower bytes,
    same inputs), so it can answer those without the call; `ages` must be as the retriever serves them.
    """
    chunks = []
    with torch.inference_mode():
        for start in range(0, len(rows), batch_size):
            inputs = user_tower_inputs(item_vectors, rows[start : start + batch_size], ages[start : start + batch_size])
            chunks.append(user_tower(*(torch.from_numpy(t) for t in inputs)).numpy())
    dim = item_vectors.shape[1]
    return np.ascontiguousarray(np.concatenate(chunks) if chunks else np.zeros((0, dim)), dtype=np.float32)


def resolve_index_type(index_type: str, n_items: int) -> str:
    if index_type not in INDEX_TYPES:
        raise ValueError(f"index type {index_type!r}: expected one of {INDEX_TYPES}")
    if index_type == "auto":
        # IVF over HNSW: on the trained H&M model IVF reaches recall@10 0.97 at 0.28 ms per query where
        # HNSW (M 32) needs efSearch 512 and 0.54 ms for 0.95; it also builds in 2.5 s instead of 14-18 s.
        # Float32 lists, not float16 (artifacts.HALF_INDEX_TYPE): ~0.1 ms less per search is not worth scores and
        # orders that differ from the ones training and the fits ranked by.
        return "flat" if n_items <= AUTO_FLAT_LIMIT else "ivf"
    return index_type


def pq_subquantizers(dim: int) -> int:
    """Sub-quantizers for IVF-PQ: a divisor of `dim` (faiss requires one) leaving ~4 dimensions each, one
    faiss' GPU IVF-PQ implements where there is such (128 -> 32; 144, the padded 128 + prior -> 48):
    8-bit codes of 32-48 bytes per article."""
    divisors = [m for m in range(1, dim + 1) if dim % m == 0 and 2 <= dim / m <= 8] or [dim]
    return min(divisors, key=lambda m: (m not in GPU_PQ_SUBQUANTIZERS, abs(dim / m - 4), -m))


def _training_rows(n: int, nlist: int, seed: int = 0) -> np.ndarray | slice:
    """Which rows k-means and the codes train on: all of them up to max(TRAIN_ROWS_MIN, TRAIN_ROWS_PER_LIST
    per list), else a seeded sample of that many."""
    limit = max(TRAIN_ROWS_MIN, TRAIN_ROWS_PER_LIST * nlist)
    return slice(None) if n <= limit else np.sort(np.random.default_rng(seed).choice(n, limit, replace=False))


ADD_CHUNK = 500_000  # rows encoded per index.add: [vector, bias] rows are never all copied at once


def index_rows(vectors: np.ndarray, bias: np.ndarray | None, dim: int) -> np.ndarray:
    """float32 rows as the index holds them: [vector, bias] (or the vector), zeros up to `dim`
    (artifacts.index_dimension)."""
    rows = np.ascontiguousarray(vectors, dtype=np.float32)
    rows = rows if bias is None else popularity.with_bias(rows, bias)
    return rows if rows.shape[1] == dim else np.pad(rows, ((0, 0), (0, dim - rows.shape[1])))


def build_faiss_index(vectors: np.ndarray, index_type: str, item_bias: np.ndarray | None = None) -> faiss.Index:
    """Inner-product index whose ids are catalogue rows; with `item_bias`, over [vector, bias] rows
    (twotower.popularity), so that a query [user, weight] ranks by cosine + weight * bias."""
    n, dim = len(vectors), artifacts.index_dimension(vectors.shape[1], item_bias is not None, index_type)

    def rows(selection: np.ndarray | slice, bias: np.ndarray | None = item_bias) -> np.ndarray:
        return index_rows(vectors[selection], None if bias is None else bias[selection], dim)

    if index_type == "flat":
        index = faiss.IndexFlatIP(dim)
    elif index_type == "hnsw":
        if item_bias is not None:
            # Measured: the bias column bends the inner-product graph. 5,000 random rows, 50 queries, efSearch 256:
            # recall@10 0.48 / 0.76 at prior weight 0 / 0.1 with it, 1.00 without (review, 2026-12-02); H&M's
            # trained model 0.757-0.896 at efSearch 64-512 where IVF gives 0.968 at nprobe 128 (docs/benchmarks.md)
            log.warning(
                "hnsw over [vector, popularity bias] rows finds the nearest articles poorly (recall@10 0.48-0.90 "
                "measured); ivf (the default above 50,000 articles) or flat rank them as served"
            )
        index = faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = 80
        index.hnsw.efSearch = 256
    elif index_type in artifacts.IVF_INDEX_TYPES:
        nlist = max(1, min(int(4 * np.sqrt(n)), n // 39))
        quantizer = faiss.IndexFlatIP(dim)
        if index_type == "ivf":
            index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
        elif index_type == artifacts.HALF_INDEX_TYPE:
            qtype = faiss.ScalarQuantizer.QT_fp16
            # by_residual off: float16 keeps each vector itself to ~1e-3, nothing for a residual to refine
            index = faiss.IndexIVFScalarQuantizer(quantizer, dim, nlist, qtype, faiss.METRIC_INNER_PRODUCT, False)
        elif index_type == "ivf-sq8":
            qtype = faiss.ScalarQuantizer.QT_8bit
            index = faiss.IndexIVFScalarQuantizer(quantizer, dim, nlist, qtype, faiss.METRIC_INNER_PRODUCT)
        elif index_type == "ivf-pq":
            index = faiss.IndexIVFPQ(quantizer, dim, nlist, pq_subquantizers(dim), 8, faiss.METRIC_INNER_PRODUCT)
        else:
            # 4-bit codes of 2 dimensions each (36 B at 144 columns), scanned 32 rows at a time from SIMD
            # registers (faiss FastScan): at 1M, 0.74 ms per query on one thread against ivf-pq's 1.3-1.8 ms
            # at the same recall@10 (0.930 / 0.933, the coarser codes re-ranked from more candidates:
            # serving.catalog.RERANK_FACTORS). The padded width, a multiple of 16, gives FastScan's even M.
            index = faiss.IndexIVFPQFastScan(quantizer, dim, nlist, dim // 2, 4, faiss.METRIC_INNER_PRODUCT)
        # Lists by direction alone: centroids trained with a zero bias coordinate, so an article's list and
        # the lists a query probes do not depend on popularity (or it would pull best sellers into a few lists).
        zero_bias = None if item_bias is None else np.zeros(n, np.float32)
        directions = rows(_training_rows(n, nlist), zero_bias)
        if index_type == "ivf":
            index.train(directions)
        else:
            # The same lists as "ivf" (a flat IVF trains the shared quantizer); the codes (sq8 ranges, pq
            # codebooks) then train on the real rows, bias included: IndexIVF.train keeps a full quantizer.
            faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT).train(directions)
            index.train(rows(_training_rows(n, nlist, seed=1)))
        del directions
        index.nprobe = min(nlist, RetrieverConfig.ivf_nprobe)  # the retriever sets its own on load
    else:
        raise ValueError(f"unknown index type {index_type!r}")
    for start in range(0, n, ADD_CHUNK):
        index.add(rows(slice(start, start + ADD_CHUNK)))
    return index


def item_metadata(articles: pd.DataFrame, transactions: pd.DataFrame | None = None) -> dict[str, list]:
    """Column-oriented metadata; `price` is the article's mean sale price ("" when never sold)."""
    columns = ["article_id"] + [c for c in METADATA_COLUMNS if c in articles.columns]
    metadata = {column: articles[column].astype(str).tolist() for column in columns}
    if "price" in articles.columns:  # a catalogue delta may carry list prices
        prices = pd.to_numeric(articles["price"], errors="coerce")
    elif transactions is not None and len(transactions):
        prices = articles["article_id"].map(transactions.groupby("article_id")["price"].mean())
    else:
        prices = pd.Series([np.nan] * len(articles))
    metadata["price"] = ["" if pd.isna(p) else f"{float(p):.6f}" for p in prices]
    return metadata


@dataclasses.dataclass(frozen=True)
class SharedParts:
    """Parts of a parent version (top-level entries: artifacts.INDEX_FILE, VECTORS_FILE, ITEMS_DIR, ...) that the
    next version holds unchanged. Its files become hard links to the parent's (artifacts.part_of), with the parent's
    checksums: nothing is written or hashed again, and a retriever swapping between the two versions maps the same
    files, so their pages are in the page cache once. Versions are never written after they are published, so two
    names of one file stay equal."""

    parent: Path
    manifest: artifacts.Manifest
    parts: frozenset[str]

    def link(self, staging: Path, part: str) -> list[str]:
        """Link this part's files into `staging`; their manifest names."""
        names = [name for name in self.manifest.files if artifacts.part_of(name) == part]
        copied = 0
        for name in names:
            target = staging / name
            target.parent.mkdir(parents=True, exist_ok=True)
            copied += not link_or_copy(self.parent / name, target)
        if copied:
            log.warning("%s: the volume refused hard links, %d file(s) of %s copied instead", staging, copied, part)
        return names


def write_index_dir(
    out: Path,
    index: faiss.Index | None,
    vectors: np.ndarray | RowBlocks | Sequence[np.ndarray | RowBlocks],
    metadata: Mapping[str, Sequence[str]],
    histories: dict[str, np.ndarray],
    score_head: artifacts.ScoreHeadWeights,
    manifest_fields: dict,
    excluded_rows: list[int] | None = None,
    item_bias: np.ndarray | None = None,
    lexical: LexicalIndex | None = None,
    signals: ArticleSignals | None = None,
    shared: SharedParts | None = None,
    ivf_recall_target: float = 0.0,
) -> artifacts.Manifest:
    """Write one index version into a staging directory, checksum it, then rename it into place. `vectors` may be
    blocks of rows (a parent's memory-mapped vectors and an update's new rows), written one after the other. The
    parts `shared` names are linked from its parent instead of written (their arguments are then not read; `index`
    may be None when the index is one of them). When the vectors are shared, `vectors` are the rows after the
    parent's (none for a removal), written as a block of their own (artifacts.VECTOR_BLOCKS_DIR).
    `ivf_recall_target` > 0: the IVF lists each served prior weight probes are measured on the version's stored
    customers (serving.nprobe) before it is renamed into place; a catalogue update keeps its parent's
    (`manifest_fields`: its rows past the index are scored exactly, its lists are the parent's)."""
    if out.exists():
        raise FileExistsError(f"{out} exists: index versions are immutable")
    vector_dtype = manifest_fields.get("vector_dtype", artifacts.Manifest.vector_dtype)
    if vector_dtype not in artifacts.VECTOR_DTYPES:
        raise ValueError(f"vector_dtype {vector_dtype!r} is not one of {artifacts.VECTOR_DTYPES}")
    blocks = [vectors] if isinstance(vectors, (np.ndarray, RowBlocks)) else [block for block in vectors if len(block)]
    linked = shared.parts if shared is not None else frozenset()
    parent = shared.manifest if shared is not None and artifacts.VECTORS_FILE in linked else None
    if parent is not None:  # the parent's vectors are every file of them, its appended blocks too
        linked = linked | {artifacts.VECTOR_BLOCKS_DIR}
        if parent.vector_dtype != vector_dtype:
            raise ValueError(f"vector_dtype {vector_dtype}: the parent's shared vectors are {parent.vector_dtype}")
    rows = sum(len(block) for block in blocks) + (parent.item_count if parent is not None else 0)
    dim = parent.dim if parent is not None else int(blocks[0].shape[1])
    if any(block.shape[1:] != (dim,) for block in blocks):
        raise ValueError(f"vectors of {[block.shape[1:] for block in blocks]} columns, the index {dim}")
    if signals is not None and signals.size > rows:  # fewer: articles added since, unsold (ArticleSignals)
        raise ValueError(f"second stage signals have {signals.size} rows, the index {rows}")
    if lexical is not None and len(lexical) != rows:
        raise ValueError(f"lexical index has {len(lexical)} rows, the index {rows}")
    if index is None and artifacts.INDEX_FILE not in linked:
        raise ValueError("no FAISS index to write and none shared with a parent")
    indexed = (  # the rows the index holds; the rest are the last `unindexed_rows` (serving.exact_rows)
        shared.manifest.item_count - shared.manifest.unindexed_rows
        if shared is not None and artifacts.INDEX_FILE in linked
        else index.ntotal  # type: ignore[union-attr]
    )
    unindexed = manifest_fields.get("unindexed_rows", 0)
    if indexed + unindexed != rows:
        raise ValueError(f"the index holds {indexed} rows and {unindexed} are listed past it: not the {rows} rows")

    def save_index(staging: Path) -> list[str]:
        faiss.write_index(index, str(staging / artifacts.INDEX_FILE))
        return [artifacts.INDEX_FILE]

    def save_bias(staging: Path) -> list[str]:
        np.save(staging / artifacts.ITEM_BIAS_FILE, np.asarray(item_bias, dtype=np.float32))
        return [artifacts.ITEM_BIAS_FILE]

    def save_vectors(staging: Path) -> list[str]:
        save_rows(staging / artifacts.VECTORS_FILE, blocks, vector_dtype)
        return [artifacts.VECTORS_FILE]

    def save_histories(staging: Path) -> list[str]:
        np.savez(staging / artifacts.HISTORIES_FILE, **histories)
        return [artifacts.HISTORIES_FILE]

    def save_items(staging: Path) -> list[str]:
        written = item_table.write(staging / artifacts.ITEMS_DIR, metadata)
        return [f"{artifacts.ITEMS_DIR}/{name}" for name in written]

    def save_signals(staging: Path) -> list[str]:
        signals.save(staging / artifacts.SECOND_STAGE_FILE)  # type: ignore[union-attr]
        return [artifacts.SECOND_STAGE_FILE]

    def save_lexical(staging: Path) -> list[str]:  # built whole: blocks are written below, when it is shared
        written = lexical.save(staging / artifacts.LEXICAL_DIR)  # type: ignore[union-attr]
        return [f"{artifacts.LEXICAL_DIR}/{name}" for name in written]

    parts: dict[str, Callable[[Path], list[str]] | None] = {
        artifacts.INDEX_FILE: save_index,
        artifacts.VECTORS_FILE: save_vectors,
        artifacts.VECTOR_BLOCKS_DIR: None,  # a parent's appended blocks, linked with its vectors; new ones below
        artifacts.HISTORIES_FILE: save_histories,
        artifacts.ITEMS_DIR: save_items,
        artifacts.ITEM_BIAS_FILE: None if item_bias is None else save_bias,
        artifacts.SECOND_STAGE_FILE: None if signals is None else save_signals,
        artifacts.LEXICAL_DIR: None if lexical is None else save_lexical,
    }
    with staged_directory(out) as staging:
        (staging / artifacts.SCORE_HEAD_FILE).write_text(json.dumps(score_head.to_json()))
        names, checksums = [artifacts.SCORE_HEAD_FILE], {}
        for part, save in parts.items():
            written = shared.link(staging, part) if shared is not None and part in linked else []
            if written:
                checksums.update({name: shared.manifest.files[name] for name in written})  # type: ignore[union-attr]
            elif save is not None:  # not shared, or the parent has none (items.json before items/: written anew)
                written = save(staging)
            names += written
        vector_blocks = [] if parent is None else list(parent.vector_blocks)
        if parent is not None and blocks:
            block = f"{artifacts.VECTOR_BLOCKS_DIR}/{out.name}.npy"
            (staging / artifacts.VECTOR_BLOCKS_DIR).mkdir(exist_ok=True)
            save_rows(staging / block, blocks, vector_dtype)
            vector_blocks = [*artifacts.vector_files(parent), block]
            names.append(block)
        lexical_blocks, new_block = [], None
        if shared is not None and artifacts.LEXICAL_DIR in linked:
            lexical_blocks = list(shared.manifest.lexical_blocks)
            new_block = None if lexical is None else lexical.new_block()
        if new_block is not None:  # the parent's keyword index, linked above, and the rows this version appended
            block = f"{artifacts.LEXICAL_BLOCKS_DIR}/{out.name}"
            names += [f"{block}/{name}" for name in new_block.save(staging / block)]
            lexical_blocks.append(block)
        if excluded_rows:
            (staging / artifacts.EXCLUDED_FILE).write_text(json.dumps({"rows": sorted(set(excluded_rows))}))
            names.append(artifacts.EXCLUDED_FILE)
        manifest = artifacts.Manifest(
            dim=dim,
            metric=artifacts.METRIC_INNER_PRODUCT,
            item_count=rows,
            index_version=out.name,
            files={name: checksums.get(name) or sha256_file(staging / name) for name in names},
            **{**manifest_fields, "vector_blocks": vector_blocks, "lexical_blocks": lexical_blocks},
        )
        artifacts.write_manifest(staging, manifest)
        if ivf_recall_target > 0 and shared is None and manifest.index_type in artifacts.IVF_INDEX_TYPES:
            catalog = Catalog(staging, lexical=False, verify=False)
            # Only the weights that need more lists than the served nprobe: a manifest with none stays readable by
            # a retriever from before the field (H&M's: 128 lists reach 0.997-1.000)
            probes = [s for s in calibrate_nprobe(catalog, ivf_recall_target) if s.nprobe > catalog.ivf_nprobe]
            del catalog
            if probes:
                manifest = dataclasses.replace(manifest, ivf_probes=[setting.to_json() for setting in probes])
                artifacts.write_manifest(staging, manifest)
    return manifest


def write_catalogue_only(
    out: Path,
    index: faiss.Index,
    vectors: np.ndarray,
    metadata: Mapping[str, Sequence[str]],
    data_source: str,
    index_type: str,
    item_bias: np.ndarray | None = None,
    prior_weight: float = 0.0,
    vector_dtype: str = artifacts.Manifest.vector_dtype,
) -> artifacts.Manifest:
    """An index version with no towers and no customers behind it (one empty history): the search side
    alone, for benchmarks over synthetic catalogues and for tests."""
    from twotower.popularity import PopularityPrior

    histories = {
        "customer_ids": np.asarray(["c"]),
        "rows": np.full((1, 4), -1, np.int32),
        "age_days": np.zeros((1, 4), np.float32),
        "last_day": np.zeros(1, np.int32),
    }
    fields = {
        "index_type": index_type,
        "model_version": 1,
        "customer_count": 1,
        "max_history": 4,
        "context_length": 8,
        "clip_model": "none",
        "reference_day": 0,
        "data_source": data_source,
        "tower_checksums": {},
        "vector_dtype": vector_dtype,
    }
    head = artifacts.ScoreHeadWeights(np.ones(2), np.ones(2), np.ones(2), 0.0, prior=PopularityPrior(prior_weight))
    return write_index_dir(out, index, vectors, metadata, histories, head, fields, item_bias=item_bias)


def new_version_dir(index_root: Path) -> Path:
    """Where the next version of an index root goes (refuses a plain version directory as root)."""
    if (index_root / artifacts.MANIFEST_FILE).is_file():
        raise artifacts.ArtifactError(
            f"{index_root} is a single index version, not an index root: pass its parent directory or a new path"
        )
    return index_root / artifacts.next_version_name(index_root)
