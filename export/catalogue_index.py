"""Embed the whole catalogue through the exported item tower and write the index directory.

Input: the TorchScript item tower (as written to the model repository), the catalogue and
purchases. Output: an index directory (see twotower.artifacts), written atomically.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

import faiss
import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from twotower import artifacts
from twotower.data.hm import METADATA_COLUMNS

log = logging.getLogger("export.index")

INDEX_TYPES = ("auto", "flat", "hnsw", "ivf")
AUTO_FLAT_LIMIT = 50_000  # above this, exact search costs more than a few ms per query


def embed_catalogue(
    item_tower: torch.jit.ScriptModule,
    captions: list[str],
    tokenizer: Callable[[list[str]], torch.Tensor],
    batch_size: int = 512,
) -> np.ndarray:
    """float32 [N, D] item vectors, in catalogue order."""
    chunks = []
    with torch.inference_mode():
        for start in tqdm(range(0, len(captions), batch_size), desc="embedding catalogue", unit="batch", disable=None):
            chunks.append(item_tower(tokenizer(captions[start : start + batch_size])).numpy())
    return np.ascontiguousarray(np.concatenate(chunks), dtype=np.float32)


def resolve_index_type(index_type: str, n_items: int) -> str:
    if index_type not in INDEX_TYPES:
        raise ValueError(f"index type {index_type!r}: expected one of {INDEX_TYPES}")
    if index_type == "auto":
        return "flat" if n_items <= AUTO_FLAT_LIMIT else "hnsw"
    return index_type


def build_faiss_index(vectors: np.ndarray, index_type: str) -> faiss.Index:
    """Inner-product index whose ids are catalogue rows."""
    n, dim = vectors.shape
    if index_type == "flat":
        index = faiss.IndexFlatIP(dim)
    elif index_type == "hnsw":
        index = faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = 80
        index.hnsw.efSearch = 256
    elif index_type == "ivf":
        nlist = max(1, min(int(4 * np.sqrt(n)), n // 39))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.train(vectors)
        index.nprobe = min(nlist, 16)
    else:
        raise ValueError(f"unknown index type {index_type!r}")
    index.add(vectors)
    return index


def item_metadata(articles: pd.DataFrame) -> dict[str, list]:
    columns = ["article_id"] + [c for c in METADATA_COLUMNS if c in articles.columns]
    return {column: articles[column].astype(str).tolist() for column in columns}


def write_index_dir(
    out: Path,
    vectors: np.ndarray,
    index_type: str,
    metadata: dict[str, list],
    histories: dict[str, np.ndarray],
    score_head: artifacts.ScoreHeadWeights,
    manifest_fields: dict,
) -> artifacts.Manifest:
    """Write every artifact into a staging directory, checksum them, then swap it into place."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        started = time.perf_counter()
        index = build_faiss_index(vectors, index_type)
        log.info("built %s index over %d items in %.1fs", index_type, len(vectors), time.perf_counter() - started)
        faiss.write_index(index, str(staging / artifacts.INDEX_FILE))
        np.save(staging / artifacts.VECTORS_FILE, vectors)
        (staging / artifacts.ITEMS_FILE).write_text(json.dumps(metadata))
        np.savez(staging / artifacts.HISTORIES_FILE, **histories)
        (staging / artifacts.SCORE_HEAD_FILE).write_text(json.dumps(score_head.to_json()))
        manifest = artifacts.Manifest(
            dim=int(vectors.shape[1]),
            metric=artifacts.METRIC_INNER_PRODUCT,
            item_count=int(len(vectors)),
            index_type=index_type,
            files={name: artifacts.sha256_file(staging / name) for name in artifacts.ARTIFACT_FILES},
            **manifest_fields,
        )
        artifacts.write_manifest(staging, manifest)
        if out.exists():
            shutil.rmtree(out)
        os.replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return manifest
