"""Export pieces in isolation: TorchScript equivalence guard, Triton config, atomic writes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from export.catalogue_index import build_faiss_index, resolve_index_type, write_index_dir
from export.torchscript import ExportMismatchError, serialise, trace_and_verify
from twotower import artifacts
from twotower.triton_repository import TensorSpec, TritonModelSpec, next_version, render_config, write_model


class Noisy(nn.Module):
    """Traces fine but its output changes between calls: must be refused."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.rand_like(x) * 1e-3


def test_mismatching_torchscript_is_refused() -> None:
    with pytest.raises(ExportMismatchError, match="differs from eager"):
        trace_and_verify("noisy", Noisy(), [(torch.ones(2, 3),)])


def test_matching_module_passes_at_other_batch_sizes() -> None:
    module = nn.Sequential(nn.Linear(3, 4), nn.Tanh())
    scripted, difference = trace_and_verify("mlp", module, [(torch.ones(2, 3),), (torch.randn(7, 3),)])
    assert difference <= 1e-5
    assert scripted(torch.randn(5, 3)).shape == (5, 4)


SPEC = TritonModelSpec(
    "user_tower",
    (TensorSpec("history", "FP32", (20, 64)), TensorSpec("history_mask", "FP32", (20,))),
    (TensorSpec("embedding__0", "FP32", (64,)),),
    max_batch_size=32,
    max_queue_delay_us=300,
)


def test_an_int8_item_tower_traces_exactly_and_stays_close_to_fp32() -> None:
    from export.torchscript import int8_linear_layers
    from twotower.config import ModelConfig
    from twotower.model.clip_text import get_tokenizer
    from twotower.model.towers import build_model

    tower = build_model(ModelConfig()).item_tower.eval()
    tokenizer = get_tokenizer(ModelConfig().clip_model)
    ids = tokenizer(["grey dress", "a black jersey dress with long sleeves", "striped vest top"])
    int8 = int8_linear_layers(tower)
    assert any("quantized" in type(m).__module__ for m in int8.modules())
    assert not any("quantized" in type(m).__module__ for m in tower.modules())  # a copy: training's tower is fp32
    _, difference = trace_and_verify("item_tower", int8, [(ids,), (ids[:1],), (tokenizer(["dress"]),)])
    assert difference <= 1e-5
    with torch.no_grad():
        cosine = (int8(ids) * tower(ids)).sum(dim=1)
    assert (cosine > 0.9).all(), cosine


def test_config_pbtxt_has_libtorch_platform_batching_and_kind_auto() -> None:
    text = render_config(SPEC)
    for expected in (
        'platform: "pytorch_libtorch"',
        "max_batch_size: 32",
        "max_queue_delay_microseconds: 300",
        "kind: KIND_AUTO",
        'name: "history_mask"',
        "dims: [ 20, 64 ]",
        'name: "embedding__0"',
        "timeout_action: REJECT",
        "max_queue_size: 128",
        "batch_size: 1\n",
        "batch_size: 4\n",
        "batch_size: 16\n",  # warm-up at the batch sizes dynamic batching forms
    ):
        assert expected in text


def test_model_versions_are_immutable_and_numbered(tmp_path: Path) -> None:
    module = serialise(torch.jit.trace(nn.Identity(), torch.ones(1, 2)))
    assert next_version(tmp_path, ["user_tower"]) == 1
    write_model(tmp_path, SPEC, 1, module)
    assert (tmp_path / "user_tower" / "1" / "model.pt").is_file()
    assert next_version(tmp_path, ["user_tower", "item_tower"]) == 2
    with pytest.raises(FileExistsError):
        write_model(tmp_path, SPEC, 1, module)
    assert not list((tmp_path / "user_tower").glob(".*partial*"))


def test_index_types_search_inner_product() -> None:
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(500, 16)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    for index_type in ("flat", "hnsw", "ivf"):
        index = build_faiss_index(vectors, index_type)
        _, rows = index.search(vectors[:5], 1)
        assert rows[:, 0].tolist() == [0, 1, 2, 3, 4], index_type
    assert resolve_index_type("auto", 10) == "flat" and resolve_index_type("auto", 10**6) == "ivf"


def test_hnsw_over_a_popularity_bias_warns(caplog: pytest.LogCaptureFixture) -> None:
    vectors = np.random.default_rng(0).normal(size=(200, 16)).astype(np.float32)
    with caplog.at_level("WARNING", logger="export.index"):
        build_faiss_index(vectors, "hnsw")
        assert not caplog.records
        build_faiss_index(vectors, "hnsw", np.ones(200, dtype=np.float32))
    assert "finds the nearest articles poorly" in caplog.text


def test_failed_index_write_leaves_nothing_behind(tmp_path: Path) -> None:
    out = tmp_path / "index"
    with pytest.raises(TypeError):
        vectors = np.ones((3, 4), np.float32)
        write_index_dir(
            out,
            build_faiss_index(vectors, "flat"),
            vectors,
            {"article_id": ["a", "b", "c"]},
            {},
            artifacts.ScoreHeadWeights(np.ones(2), np.ones(2), np.ones(2), 0.0),
            {"unexpected": 1},
        )
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []
