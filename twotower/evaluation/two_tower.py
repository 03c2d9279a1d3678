"""The two-tower model as served: the exported TorchScript user tower + the built FAISS index."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from retriever.catalog import Catalog
from twotower import artifacts
from twotower.evaluation.baselines import Ranker
from twotower.evaluation.split import TemporalSplit


def load_user_tower(model_repository: Path, manifest: artifacts.Manifest) -> torch.jit.ScriptModule:
    return torch.jit.load(str(artifacts.tower_file(model_repository, manifest, manifest.user_model))).eval()


class TwoTower(Ranker):
    """Ranks with FAISS (as the retriever does) or, with exact=True, by brute force over all vectors."""

    def __init__(self, split: TemporalSplit, catalog: Catalog, user_tower: torch.jit.ScriptModule, exact: bool = False,
                 batch_size: int = 256):
        self.name = "two-tower (exact)" if exact else f"two-tower ({catalog.manifest.index_type})"
        self.catalog, self.exact = catalog, exact
        histories = split.histories(catalog.manifest.max_history)
        pairs = [(rows[rows >= 0], ages[rows >= 0]) for rows, ages in zip(histories.rows, histories.age_days)]
        chunks = []
        with torch.inference_mode():
            for start in range(0, len(pairs), batch_size):
                tensors = catalog.history_tensors(pairs[start : start + batch_size])
                chunks.append(user_tower(*(torch.from_numpy(t) for t in tensors)).numpy())
        self.users = np.concatenate(chunks) if chunks else np.zeros((0, catalog.manifest.dim), np.float32)

    def scores(self, case: int) -> np.ndarray:
        return (self.catalog.vectors @ self.users[case]).astype(np.float64)

    def rank(self, case: int, k: int) -> np.ndarray:
        if self.exact:
            return super().rank(case, k)
        _, rows = self.catalog.search(self.users[case : case + 1], k)
        return rows[0][rows[0] >= 0]
