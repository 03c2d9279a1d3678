"""The index directory: the contract between `export` (writer) and `retriever` (reader).

Layout (written to a temporary sibling and renamed, so readers never see half of it):
    index.faiss     FAISS index over the item vectors, inner product (vectors are L2-normalised)
    vectors.npy     float32 [N, D] item vectors from the exported item tower (histories, "similar items")
    items.json      column-oriented item metadata, row i = FAISS id i
    histories.npz   known customers' last L purchases (see twotower.data.histories)
    score_head.json weights of the 2-layer score head (cosine -> score), evaluated with numpy
    manifest.json   written last: model version, dimension, metric, counts, sha256 of every file

Only numpy here: the retriever imports this without torch.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from twotower.config import write_json

FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
INDEX_FILE = "index.faiss"
VECTORS_FILE = "vectors.npy"
ITEMS_FILE = "items.json"
HISTORIES_FILE = "histories.npz"
SCORE_HEAD_FILE = "score_head.json"
ARTIFACT_FILES = (INDEX_FILE, VECTORS_FILE, ITEMS_FILE, HISTORIES_FILE, SCORE_HEAD_FILE)
METRIC_INNER_PRODUCT = "inner_product"

ITEM_MODEL = "item_tower"
USER_MODEL = "user_tower"


class ArtifactError(RuntimeError):
    """An index directory is missing, corrupt, or does not match the serving towers."""


@dataclasses.dataclass
class Manifest:
    model_version: int
    dim: int
    metric: str
    item_count: int
    customer_count: int
    max_history: int
    context_length: int
    clip_model: str
    index_type: str
    reference_day: int  # day number (days since epoch) of the latest purchase in the data
    data_source: str
    files: dict[str, str]  # file name -> sha256
    tower_checksums: dict[str, str]  # Triton model name -> sha256 of its model.pt
    trained_until: str = ""  # YYYY-MM-DD: the towers saw no purchase on or after this day ("" = all data)
    item_model: str = ITEM_MODEL
    user_model: str = USER_MODEL
    format_version: int = FORMAT_VERSION


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(index_dir: Path, manifest: Manifest) -> None:
    write_json(index_dir / MANIFEST_FILE, dataclasses.asdict(manifest))


def read_manifest(index_dir: Path | str) -> Manifest:
    path = Path(index_dir) / MANIFEST_FILE
    if not path.is_file():
        raise ArtifactError(f"{path}: no manifest (not an index directory written by `python -m export`)")
    try:
        raw: dict[str, Any] = json.loads(path.read_text())
        manifest = Manifest(**raw)
    except (json.JSONDecodeError, TypeError) as err:
        raise ArtifactError(f"{path}: unreadable manifest ({err})") from err
    if manifest.format_version != FORMAT_VERSION:
        raise ArtifactError(f"{path}: format_version {manifest.format_version}, this code reads {FORMAT_VERSION}")
    if manifest.metric != METRIC_INNER_PRODUCT:
        raise ArtifactError(f"{path}: metric {manifest.metric!r} is not supported (expected {METRIC_INNER_PRODUCT!r})")
    return manifest


def verify_files(index_dir: Path | str, manifest: Manifest) -> None:
    """Every file the manifest names exists and has the recorded checksum."""
    directory = Path(index_dir)
    for name in ARTIFACT_FILES:
        expected = manifest.files.get(name)
        path = directory / name
        if expected is None:
            raise ArtifactError(f"{directory / MANIFEST_FILE}: no checksum recorded for {name}")
        if not path.is_file():
            raise ArtifactError(f"{path}: missing (manifest lists it)")
        actual = sha256_file(path)
        if actual != expected:
            raise ArtifactError(f"{path}: checksum {actual[:12]}... does not match the manifest's {expected[:12]}...")


@dataclasses.dataclass
class ScoreHeadWeights:
    """The trained score head, cosine -> sigmoid(w2 . relu(w1 * cosine + b1) + b2)."""

    w1: np.ndarray  # [H]
    b1: np.ndarray  # [H]
    w2: np.ndarray  # [H]
    b2: float

    def __call__(self, cosine: np.ndarray) -> np.ndarray:
        hidden = np.maximum(cosine[..., None] * self.w1 + self.b1, 0.0)
        return 1.0 / (1.0 + np.exp(-(hidden @ self.w2 + self.b2)))

    def to_json(self) -> dict[str, Any]:
        return {"w1": self.w1.tolist(), "b1": self.b1.tolist(), "w2": self.w2.tolist(), "b2": float(self.b2)}

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> "ScoreHeadWeights":
        return cls(
            np.asarray(raw["w1"], dtype=np.float32),
            np.asarray(raw["b1"], dtype=np.float32),
            np.asarray(raw["w2"], dtype=np.float32),
            float(raw["b2"]),
        )
