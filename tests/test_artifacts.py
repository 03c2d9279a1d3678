from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from twotower import artifacts
from twotower.model.towers import ScoreHead


def test_numpy_score_head_matches_torch() -> None:
    head = ScoreHead(8)
    cosine = torch.linspace(-1, 1, 11)
    layers = head.layers
    weights = artifacts.ScoreHeadWeights(
        layers[0].weight.detach().numpy()[:, 0],
        layers[0].bias.detach().numpy(),
        layers[2].weight.detach().numpy()[0],
        float(layers[2].bias.item()),
    )
    restored = artifacts.ScoreHeadWeights.from_json(weights.to_json())
    np.testing.assert_allclose(restored(cosine.numpy()), head(cosine).detach().numpy(), atol=1e-6)


def test_corrupt_or_missing_files_are_detected(tiny_pipeline, tmp_path: Path) -> None:
    copy = tmp_path / "index"
    shutil.copytree(tiny_pipeline.version_dir, copy)
    manifest = artifacts.read_manifest(copy)
    artifacts.verify_files(copy, manifest)
    with open(copy / artifacts.VECTORS_FILE, "r+b") as handle:
        handle.seek(-4, 2)
        handle.write(b"\x00\x00\x80\x7f")
    with pytest.raises(artifacts.ArtifactError, match="checksum"):
        artifacts.verify_files(copy, manifest)
    (copy / artifacts.ITEMS_DIR / "article_id.values.npy").unlink()
    with pytest.raises(artifacts.ArtifactError, match="missing"):
        artifacts.verify_files(copy, manifest)
    (copy / artifacts.MANIFEST_FILE).write_text("{not json")
    with pytest.raises(artifacts.ArtifactError, match="unreadable manifest"):
        artifacts.read_manifest(copy)


def test_histories_are_memory_mapped_from_the_npz(tmp_path: Path) -> None:
    from twotower.files import load_npz_mapped

    arrays = {
        "customer_ids": np.asarray(["c1", "c22"]),
        "rows": np.arange(8, dtype=np.int32).reshape(2, 4),
        "user_vectors": np.asarray([[0.5, np.nan], [1.0, 2.0]], dtype=np.float32),
        "none": np.zeros((0, 4), np.float32),
        "fortran": np.asfortranarray(np.arange(6.0).reshape(2, 3)),
    }
    np.savez(tmp_path / "h.npz", **arrays)
    mapped = load_npz_mapped(tmp_path / "h.npz")
    assert set(mapped) == set(arrays) and isinstance(mapped["user_vectors"], np.memmap)
    for name, array in arrays.items():
        np.testing.assert_array_equal(mapped[name], array)
    np.savez_compressed(tmp_path / "c.npz", **arrays)  # compressed members cannot be mapped: read
    np.testing.assert_array_equal(load_npz_mapped(tmp_path / "c.npz")["rows"], arrays["rows"])
