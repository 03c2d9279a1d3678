"""The loaded index directory: FAISS index, item vectors and metadata, known customers' histories."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import faiss
import numpy as np

from twotower import artifacts
from twotower.config import RetrieverConfig
from twotower.data.histories import PAD

log = logging.getLogger("retriever.catalog")


class UnknownIds(KeyError):
    def __init__(self, kind: str, ids: list[str]):
        shown = ", ".join(repr(i) for i in ids[:5]) + (f" and {len(ids) - 5} more" if len(ids) > 5 else "")
        super().__init__(f"unknown {kind}: {shown}")
        self.message = f"unknown {kind}: {shown}"


class Catalog:
    def __init__(self, index_dir: Path | str, hnsw_ef_search: int = RetrieverConfig.hnsw_ef_search,
                 ivf_nprobe: int = RetrieverConfig.ivf_nprobe):
        """Search settings default to the served ones, so offline evaluation measures what is served."""
        started = time.perf_counter()
        self.index_dir = Path(index_dir)
        self.manifest = artifacts.read_manifest(self.index_dir)
        artifacts.verify_files(self.index_dir, self.manifest)
        self.index = faiss.read_index(str(self.index_dir / artifacts.INDEX_FILE))
        if hasattr(self.index, "hnsw"):
            self.index.hnsw.efSearch = hnsw_ef_search
        if hasattr(self.index, "nprobe"):
            self.index.nprobe = ivf_nprobe
        self.vectors = np.load(self.index_dir / artifacts.VECTORS_FILE)
        self.items: dict[str, list[str]] = json.loads((self.index_dir / artifacts.ITEMS_FILE).read_text())
        self.article_ids: list[str] = self.items["article_id"]
        self.row_of = {article_id: row for row, article_id in enumerate(self.article_ids)}
        with np.load(self.index_dir / artifacts.HISTORIES_FILE) as histories:
            customer_ids = histories["customer_ids"]
            self.history_rows = histories["rows"]
            self.history_age = histories["age_days"]
            self.history_last_day = histories["last_day"]
        self.customer_row = {str(c): i for i, c in enumerate(customer_ids)}
        self.score_head = artifacts.ScoreHeadWeights.from_json(
            json.loads((self.index_dir / artifacts.SCORE_HEAD_FILE).read_text())
        )
        self._check_consistency()
        log.info("loaded index %s: %d items, dim %d, %s, %d customers, model version %d (%.1fs)",
                 self.index_dir, len(self.article_ids), self.manifest.dim, self.manifest.index_type,
                 len(self.customer_row), self.manifest.model_version, time.perf_counter() - started)

    def _check_consistency(self) -> None:
        m = self.manifest
        problems = []
        if self.index.ntotal != m.item_count or len(self.vectors) != m.item_count or len(self.article_ids) != m.item_count:
            problems.append(f"item counts differ: index {self.index.ntotal}, vectors {len(self.vectors)}, "
                            f"metadata {len(self.article_ids)}, manifest {m.item_count}")
        if self.index.d != m.dim or self.vectors.shape[1] != m.dim:
            problems.append(f"dimension differs: index {self.index.d}, vectors {self.vectors.shape[1]}, manifest {m.dim}")
        if self.history_rows.shape[1] != m.max_history:
            problems.append(f"history length {self.history_rows.shape[1]} != manifest max_history {m.max_history}")
        if problems:
            raise artifacts.ArtifactError(f"{self.index_dir}: " + "; ".join(problems))

    def rows_for(self, article_ids: list[str]) -> np.ndarray:
        unknown = [a for a in article_ids if a not in self.row_of]
        if unknown:
            raise UnknownIds("article_id", unknown)
        return np.asarray([self.row_of[a] for a in article_ids], dtype=np.int64)

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

    def history_tensors(self, histories: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Pad (rows most-recent-first, ages) pairs into the user tower's fixed [B, L, D] inputs."""
        length, dim = self.manifest.max_history, self.manifest.dim
        vectors = np.zeros((len(histories), length, dim), dtype=np.float32)
        mask = np.zeros((len(histories), length), dtype=np.float32)
        ages = np.zeros((len(histories), length), dtype=np.float32)
        for i, (rows, age) in enumerate(histories):
            rows, age = rows[:length], age[:length]
            vectors[i, : len(rows)] = self.vectors[rows]
            mask[i, : len(rows)] = 1.0
            ages[i, : len(rows)] = age
        return vectors, mask, ages

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(similarities, rows) [B, k]; rows are -1 where the index has fewer than k results."""
        similarities, rows = self.index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
        return similarities, rows

    def metadata(self, row: int) -> dict[str, str]:
        return {column: values[row] for column, values in self.items.items()}
