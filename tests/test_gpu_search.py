"""Which searches go to a GPU copy of the index (serving.gpu_search).

This machine has faiss-cpu and no GPU, so the GPU side is a stand-in recording what it is asked:
the unit under test is the routing (plain top-k -> GPU copy, id-selector searches -> CPU index), the
modes and their errors. The faiss-gpu copy itself is faiss' own `index_cpu_to_gpu`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pytest

from serving import gpu_search
from serving.catalog import RERANK_FACTORS, UNWEIGHTED_RERANK_FACTORS, Catalog
from serving.filters import Filters
from tests.conftest import write_random_index
from twotower import artifacts, ranking


def write_index(directory: Path, index_type: str) -> np.ndarray:
    return write_random_index(directory, index_type, ["A" if i % 10 else "B" for i in range(3000)])


class FakeGpuCopy:
    """Stands in for a faiss GPU index: searches the CPU index it was copied from, counting calls."""

    def __init__(self, index: Any):
        self.cpu, self.searches, self.nprobe = index, 0, None

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        self.searches += 1
        return self.cpu.search(queries, k)


@pytest.fixture
def fake_gpu(monkeypatch: pytest.MonkeyPatch) -> list[FakeGpuCopy]:
    copies: list[FakeGpuCopy] = []

    class ParameterSpace:
        def set_index_parameter(self, index: FakeGpuCopy, name: str, value: int) -> None:
            assert name == "nprobe"
            index.nprobe = value

    def to_gpu(resources: object, device: int, index: Any) -> FakeGpuCopy:
        assert device == 0
        copies.append(FakeGpuCopy(index))
        return copies[-1]

    monkeypatch.setattr(faiss, "StandardGpuResources", object, raising=False)
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 1, raising=False)
    monkeypatch.setattr(faiss, "index_cpu_to_gpu", to_gpu, raising=False)
    monkeypatch.setattr(faiss, "GpuParameterSpace", ParameterSpace, raising=False)
    return copies


def test_modes_on_a_cpu_only_build(tmp_path: Path) -> None:
    write_index(tmp_path / "v0001", "ivf")
    index = faiss.read_index(str(tmp_path / "v0001" / artifacts.INDEX_FILE))
    if hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
        pytest.skip("this machine has a GPU faiss: the CPU-only behaviour cannot be seen here")
    assert gpu_search.gpu_copy(index, "off", 8) is None
    assert gpu_search.gpu_copy(index, "auto", 8) is None  # quietly on the CPU
    with pytest.raises(gpu_search.GpuUnavailable, match="faiss_gpu on: .*(no GPU support|no GPU is visible)"):
        gpu_search.gpu_copy(index, "on", 8)
    with pytest.raises(ValueError, match="faiss_gpu: 'yes' is not one of auto, on, off"):
        gpu_search.gpu_copy(index, "yes", 8)
    assert Catalog(tmp_path / "v0001").gpu is None  # offline tools search on the CPU unless asked


def test_plain_searches_use_the_gpu_copy_and_filtered_ones_the_cpu_index(tmp_path: Path, fake_gpu) -> None:
    vectors = write_index(tmp_path / "v0001", "ivf")
    catalog = Catalog(tmp_path / "v0001", ivf_nprobe=24, exact_search_limit=100, faiss_gpu="auto")
    (copy,) = fake_gpu
    assert catalog.gpu is not None and copy.nprobe == 24
    cpu_similarities, cpu_rows = catalog.index.search(vectors[:4], 10)
    similarities, rows = catalog.search(vectors[:4], 10)
    assert copy.searches == 1 and (rows == cpu_rows).all() and np.allclose(similarities, cpu_similarities)

    mask = catalog.filter_columns.mask(Filters.parse({"product_group": ["A"]}))
    assert catalog.search_plan(mask) == "ivf+selector"
    _, rows = catalog.search_masked(vectors[0], 10, mask)
    assert copy.searches == 1 and mask[rows[rows >= 0]].all()  # the id selector ran on the CPU index

    few_hidden = np.ones(len(mask), dtype=bool)
    few_hidden[:5] = False
    assert catalog.search_plan(few_hidden) == "overfetch"
    _, rows = catalog.search_masked(vectors[0], 10, few_hidden)
    assert copy.searches == 2 and not set(rows.tolist()) & set(range(5))  # overfetch is a plain search
    _, rows = catalog.search(vectors[:1], gpu_search.GPU_MAX_K + 1)  # past the GPU's k-selection: the CPU index
    assert copy.searches == 2 and rows.shape == (1, gpu_search.GPU_MAX_K + 1) and rows[0, 0] == 0


def test_hnsw_stays_on_the_cpu(tmp_path: Path, fake_gpu) -> None:
    write_index(tmp_path / "v0001", "hnsw")
    assert Catalog(tmp_path / "v0001", faiss_gpu="auto").gpu is None and not fake_gpu
    with pytest.raises(gpu_search.GpuUnavailable, match="no GPU HNSW"):
        Catalog(tmp_path / "v0001", faiss_gpu="on")


def test_fastscan_codes_stay_on_the_cpu_and_rerank_from_more_candidates(tmp_path: Path, fake_gpu) -> None:
    vectors = write_index(tmp_path / "v0001", "ivf-pq-fastscan")
    catalog = Catalog(tmp_path / "v0001", faiss_gpu="auto")
    assert catalog.gpu is None and not fake_gpu and catalog.rerank_factor == RERANK_FACTORS["ivf-pq-fastscan"] > 10
    assert set(RERANK_FACTORS) == set(artifacts.COMPRESSED_INDEX_TYPES)  # every compressed type re-ranks
    assert catalog.search(vectors[:2], 10)[1][:, 0].tolist() == [0, 1]
    assert catalog.item_bias is None and catalog._rerank_candidates(10, catalog._unweighted(vectors[:1])) == 1000
    with pytest.raises(gpu_search.GpuUnavailable, match="FastScan"):
        Catalog(tmp_path / "v0001", faiss_gpu="on")


def test_a_long_list_reranks_a_bounded_number_of_candidates(tmp_path: Path, monkeypatch) -> None:
    """k x the factor for short lists (twice that without a prior weight); long ones (a second stage's pool of 300)
    at most the catalogue's rerank_max_candidates (unweighted_rerank_max_candidates without a prior weight) or 2k."""
    groups = ["A" if i % 10 else "B" for i in range(3000)]
    vectors = write_random_index(tmp_path / "v0001", "ivf-pq-fastscan", groups, item_bias=np.ones(3000, np.float32))
    catalog = Catalog(tmp_path / "v0001", exact_search_limit=100)  # group B's 300 rows by the index
    asked: list[int] = []

    class Recording:
        def __init__(self, index: Any):
            self.index = index

        def __getattr__(self, name: str) -> Any:
            return getattr(self.index, name)

        def search(self, queries: np.ndarray, k: int, **kwargs: Any) -> Any:
            asked.append(k)
            return self.index.search(queries, k, **kwargs)

        def search_preassigned_c(self, n: int, queries: Any, k: int, *rest: Any) -> Any:  # filtered (ivf_lists)
            asked.append(k)
            return self.index.search_preassigned_c(n, queries, k, *rest)

    catalog.index = Recording(catalog.index)
    monkeypatch.setattr(catalog, "rerank_max_candidates", 700)
    # the rows a search is reckoned to score (the retriever's event-loop budget) count the capped candidates
    probed = catalog.index.ntotal * min(1.0, catalog.ivf_nprobe / catalog.index.nlist)
    exact = 0 if catalog.exact_rows is None else len(catalog.exact_rows)
    assert catalog.rows_per_search == int(probed + 700) + exact
    with monkeypatch.context() as patched:  # many excluded rows and no prepared selector: each search masks every row
        patched.setattr(catalog, "n_excluded", ranking.OVERFETCH_LIMIT + 1)
        patched.setattr(catalog, "_available", None)
        assert catalog.rows_per_search == int(probed + 700) + exact + len(catalog.excluded)
    for k in (5, 20, 400):
        _, rows = catalog.search(vectors[:2], k, prior=0.1)
        assert rows[:, 0].tolist() == [0, 1] and (rows >= 0).all()
    assert asked == [250, 700, 800]  # 5 x 50; 20 x 50 capped at 700; 400: 2k, not 20,000
    # Without a prior weight (a text query) nothing is scored exactly beside the index: k x 100, also in a batch
    for prior in (0.0, np.asarray([0.1, 0.0], np.float32)):
        _, rows = catalog.search(vectors[:2], 5, prior)
        assert rows[:, 0].tolist() == [0, 1]
    assert asked[-2:] == [500, 500] and UNWEIGHTED_RERANK_FACTORS["ivf-pq-fastscan"] == 100
    catalog.search(vectors[:2], 5, np.asarray([0.1, 0.2], np.float32))  # every query weighted: k x 50
    assert asked[-1] == 250
    group_b = catalog.filter_columns.mask(Filters.parse({"product_group": ["B"]}))
    assert catalog.search_plan(group_b) == "ivf+selector"
    _, rows = catalog.search_masked(vectors[0], 20, group_b, 0.1)
    assert asked[-1] == 700 and group_b[rows[rows >= 0]].all()
    # Capped apart: a long text query's list keeps more candidates than a customer's (nothing beside fills its top)
    monkeypatch.setattr(catalog, "unweighted_rerank_max_candidates", 1400)
    catalog.search(vectors[:2], 20, 0.0)
    catalog.search(vectors[:2], 20, 0.1)
    assert asked[-2:] == [1400, 700]


def test_compressed_indexes_rerank_within_the_gpus_k_limit(tmp_path: Path, fake_gpu, monkeypatch) -> None:
    vectors = write_index(tmp_path / "v0001", "ivf-sq8")
    catalog = Catalog(tmp_path / "v0001", ivf_nprobe=76, faiss_gpu="auto")
    asked: list[int] = []
    (copy,) = fake_gpu
    monkeypatch.setattr(copy, "search", lambda queries, k: asked.append(k) or copy.cpu.search(queries, k))
    monkeypatch.setattr("serving.catalog.GPU_MAX_K", 50)
    _, rows = catalog.search(vectors[:2], 10)
    assert asked == [50]  # 10 * RERANK_FACTORS['ivf-sq8'] capped to what a GPU search returns
    assert rows[:, 0].tolist() == [0, 1]  # the exact re-rank puts each query's own vector first
    # 128 + the prior's coordinate, padded to 144 -> 48 sub-quantizers: a code size the GPU has; 43 is not
    write_random_index(tmp_path / "v0002", "ivf-pq", ["A"] * 3000, dim=128, item_bias=np.ones(3000, np.float32))
    catalog = Catalog(tmp_path / "v0002", faiss_gpu="on")
    assert catalog.index.d == 144 and catalog.index.pq.M == 48 and catalog.gpu is not None
    odd = faiss.IndexIVFPQ(faiss.IndexFlatIP(129), 129, 4, 43, 8, faiss.METRIC_INNER_PRODUCT)
    assert "no 43-byte codes" in gpu_search.why_not_gpu(odd)


@pytest.mark.parametrize("index_type", ["ivf-sq8", "ivf-pq-fastscan"])
def test_a_re_ranked_search_for_more_rows_than_the_index_holds_pads_to_k(tmp_path: Path, index_type: str) -> None:
    """[B, k] with -1 rows past the last result, as an uncompressed index answers (review: a compressed index
    without rows scored beside it returned only its ntotal columns)."""
    write_random_index(tmp_path / "v0001", index_type, ["A"] * 2000)  # no prior: no popular rows merged beside
    catalog = Catalog(tmp_path / "v0001", exact_search_limit=100)
    queries = np.random.default_rng(1).standard_normal((2, catalog.manifest.dim)).astype(np.float32)
    scores, rows = catalog.search(queries, 2005)
    assert rows.shape == scores.shape == (2, 2005)
    assert (rows[:, :2000] >= 0).all() and (rows[:, 2000:] == -1).all() and np.isneginf(scores[:, 2000:]).all()
    allowed = np.ones(2000, dtype=bool)
    allowed[:500] = False
    masked_scores, masked_rows = catalog.search_masked(queries[0], 2005, allowed)
    assert masked_rows.shape == (2005,) and sorted(masked_rows[masked_rows >= 0].tolist()) == list(range(500, 2000))
