"""benchmarks.scale: the synthetic catalogue keeps the real product sizes and imitates a trained export (built
where there is none); benchmarks.lexical_scale runs."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from benchmarks.memory_limit import MemoryCgroup
from benchmarks.scale import _products_of_real_size
from twotower.item_table import Column


def test_synthetic_products_keep_the_real_sizes() -> None:
    real = Column(np.asarray([b"0100", b"0200", b"0300"]), np.asarray([0, 0, 1, 2, 2, 2], dtype=np.int32))
    n = 6_000  # 1,000 copies of the 6 real articles
    rng = np.random.default_rng(0)
    source_rows = rng.integers(0, 6, n)
    copied = Column(real.values, real.codes[source_rows])
    products = _products_of_real_size(copied, n, 6, rng)
    sizes = np.bincount(products.codes)
    assert abs(n / len(sizes) - 2.0) < 0.2  # 6 articles in 3 products, as in the real catalogue (not 2,000 each)
    # every synthetic product is a copy of one real product, and its value says which
    values = [bytes(v) for v in products.values]
    assert list(values) == sorted(values) and len(set(values)) == len(values)
    for code in np.unique(products.codes)[:50]:
        assert len(set(copied.codes[products.codes == code].tolist())) == 1
        assert values[code][:4] == bytes(real.values[copied.codes[products.codes == code][0]])
    assert _products_of_real_size(real, 6, 6, rng) is real  # one copy: the real products themselves


def test_a_checkout_without_an_export_builds_make_bench_s_before_imitating_it(tmp_path, monkeypatch) -> None:
    """A clean clone's `make bench-scale` drew random mixtures (recall@10 0.32, no served rows) and then failed in
    benchmarks.lexical_scale: now make bench's export is built first and imitated (a stand-in build here)."""
    from benchmarks import offline, references, scale
    from twotower import artifacts

    monkeypatch.chdir(tmp_path)
    built: list[tuple[Path | None, Path]] = []

    def prepare(data_dir: Path | None, work: Path, run_dir: Path | None = None) -> offline.BenchArtifacts:
        built.append((data_dir, work))
        (work / "index").mkdir(parents=True)
        (work / "index" / artifacts.CURRENT_FILE).write_text("v0001\n")
        return offline.BenchArtifacts(work / "index", work / "model_repository", 0, "flat", {})

    monkeypatch.setattr(offline, "prepare_artifacts", prepare)
    assert scale.resolve_reference(scale.RANDOM_REFERENCE, None) is None
    assert scale.resolve_reference("elsewhere/index", None) == Path("elsewhere/index")
    assert not built
    assert scale.resolve_reference(None, tmp_path / "data") == references.BENCH_WORK / "index"
    assert built == [(tmp_path / "data", references.BENCH_WORK)]
    assert scale.resolve_reference(None, tmp_path / "data") == Path("runs/bench/index")  # built once, then found
    (tmp_path / "runs" / "hm-eval" / "index").mkdir(parents=True)
    (tmp_path / "runs" / "hm-eval" / "index" / artifacts.CURRENT_FILE).write_text("v0001\n")
    assert scale.resolve_reference(None, None) == Path("runs/hm-eval/index")  # make eval's trained model first
    assert len(built) == 1


def test_synthetic_catalogues_carry_the_references_second_stage(tmp_path) -> None:
    """The first rows are the reference's articles (the known customers' histories point at them), the rest unsold."""
    from benchmarks.scale import second_stage_signals
    from twotower import artifacts
    from twotower.second_stage import NEVER, ArticleSignals

    assert second_stage_signals(tmp_path, 10) is None  # a reference without a stage
    real = ArticleSignals(
        purchases=np.asarray([[1, 2, 3], [0, 1, 1], [0, 0, 0]], np.float32),
        days_since_first_sale=np.asarray([5, 2, NEVER], np.float32),
        popular=np.asarray([0, 1]),
        co_indptr=np.asarray([0, 1, 2, 2]),
        co_indices=np.asarray([1, 0], np.int32),
        co_counts=np.asarray([2, 2], np.float32),
    )
    real.save(tmp_path / artifacts.SECOND_STAGE_FILE)
    signals = second_stage_signals(tmp_path, 5)
    assert signals is not None and signals.size == 5
    np.testing.assert_array_equal(signals.purchases[:3], real.purchases)
    assert signals.purchases[3:].sum() == 0 and (signals.days_since_first_sale[3:] == NEVER).all()
    assert signals.popular.tolist() == [0, 1] and signals.co_purchases(np.asarray([0]))[0].tolist() == [1]
    assert second_stage_signals(tmp_path, 2) is None  # fewer rows than the reference: no stage


def test_the_keyword_index_scale_bench_reports_each_size(tmp_path) -> None:
    from benchmarks.lexical_scale import report, run

    captions = ["red dress in jersey", "black trousers", "red trousers with pockets", "blue sweater"]
    rows = run([40, 80], captions * 3, ["red dress", "black trousers", "green"], tmp_path / "work")
    assert [(r["articles"], r["mmap"]) for r in rows] == [(40, True), (40, False), (80, True), (80, False)]
    assert all(r["p99_ms"] >= r["p50_ms"] > 0 and 0 < r["matched_share_p50"] <= 1 for r in rows)
    assert [r["added"] for r in rows] == [4, 4, 8, 8] and all(0 <= r["tenth_top12_as_rebuilt"] <= 1 for r in rows)
    assert "| 80 |" in report(rows, "four captions", tmp_path / "docs", "python -m benchmarks.lexical_scale")
    assert (tmp_path / "docs" / "lexical-scale.json").is_file() and not (tmp_path / "work" / "n40").exists()


def test_a_memory_cgroup_limits_what_its_launcher_starts() -> None:
    cgroup = MemoryCgroup.create(96 * 2**20, name="twotower-test-limit")
    if cgroup is None:
        pytest.skip("this host does not let a process create a memory cgroup")
    try:
        allocate = "import sys; b = bytearray(int(sys.argv[1]) * 2**20); b[::4096] = b'x' * len(b[::4096])"
        small = subprocess.run([*cgroup.launcher(), sys.executable, "-c", allocate, "16"], check=False)
        large = subprocess.run([*cgroup.launcher(), sys.executable, "-c", allocate, "256"], check=False)
        usage = cgroup.usage()
    finally:
        cgroup.remove()
    assert small.returncode == 0
    assert large.returncode == -9 and usage["oom_kills"] >= 1  # killed by the kernel at the limit, as a pod is
    assert usage["limit_mib"] == 96 and usage["peak_mib"] <= 96


def test_the_hot_swap_root_serves_the_version_and_holds_a_copy_to_swap_in(tmp_path) -> None:
    from benchmarks.scale import SWAP_VERSIONS, _swap_root
    from serving.catalog import Catalog
    from tests.conftest import write_random_index
    from twotower import artifacts

    version = tmp_path / "ivf-pq"
    write_random_index(version, "flat", ["Garment Upper body"] * 40)
    root = _swap_root(version, tmp_path / "swap-root")
    first, second = (root / name for name in SWAP_VERSIONS)
    assert artifacts.resolve_index_dir(root) == first and first.resolve() == version.resolve()
    assert (
        not second.is_symlink()
        and (second / artifacts.VECTORS_FILE).stat().st_ino != (version / artifacts.VECTORS_FILE).stat().st_ino
    )  # new files, as a new export's: not links to the served version's pages
    artifacts.publish_version(root, second.name)
    swapped = Catalog(root, lexical=False)  # its files check out against its manifest
    assert swapped.version == second.name and len(swapped.article_ids) == 40


@pytest.mark.parametrize("hot_swap", ["update", "add"])
def test_the_update_swap_roots_hold_an_update_that_shares_the_served_files(tmp_path, monkeypatch, hot_swap) -> None:
    from benchmarks import scale
    from serving.catalog import Catalog
    from tests.conftest import write_random_index
    from twotower import artifacts

    version = tmp_path / "ivf-pq"
    write_random_index(version, "flat", ["Garment Upper body"] * 40)
    monkeypatch.setattr(scale, "UPDATE_REMOVALS", 3)
    monkeypatch.setattr(scale, "UPDATE_ADDITIONS", 5)
    root = scale._swap_root(version, tmp_path / "swap-root", hot_swap)
    first, second = (root / name for name in scale.SWAP_VERSIONS)
    assert artifacts.resolve_index_dir(root) == first  # published by the run, under load
    assert (second / artifacts.VECTORS_FILE).samefile(version / artifacts.VECTORS_FILE)  # a removal's or an addition's
    artifacts.publish_version(root, second.name)
    swapped = Catalog(root, lexical=False)
    removed, rows = (3, 40) if hot_swap == "update" else (0, 45)
    assert swapped.version == second.name and (swapped.n_excluded, len(swapped.article_ids)) == (removed, rows)


def test_the_scale_page_shows_hot_swaps_in_a_table_of_their_own(tmp_path) -> None:
    from benchmarks.scale import _hot_swap_table

    def run(p99: float, anon: float, faults: int | None) -> dict:
        return {
            "p50_ms": 5.0,
            "p99_ms": p99,
            "errors": 0,
            "major_faults": faults,
            "retriever_memory": {"anon_mib": anon},
        }

    served = {
        **run(20.0, 1000.0, None),
        "memory_limit": {"major_faults": 7},
        "hot_swap": {
            "during": {**run(900.0, 1900.0, 50), "peak_mib": 4096.0},
            "after": {**run(21.0, 1010.0, 3), "peak_mib": 4096.0},
            "swapped": True,
        },
    }
    rows = [
        {"articles": 10, "index_type": "flat", "served": None},
        {"articles": 20, "index_type": "ivf-pq", "served": served},
    ]
    turn = {**served, "hot_swap": {**served["hot_swap"], "during": {**served["hot_swap"]["during"]}}}
    for key in ("p50_ms", "p99_ms", "errors"):
        del turn["hot_swap"]["during"][key]
    turn["hot_swap"]["during"]["out_of_rotation_s"] = 31.25
    rows.append({"articles": 20, "index_type": "ivf-pq", "served": turn})
    table = _hot_swap_table(rows)
    assert table[-2:] == [
        "| 2 | 20 | ivf-pq | 5.00 / 20.00, 0, 7 | 5.00 / 900.00, 0, 50 | 5.00 / 21.00, 0, 3 | - "
        "| 1000 / 1900 / 1010 / - | 4,096 | yes |",
        "| 3 | 20 | ivf-pq | 5.00 / 20.00, 0, 7 | out of rotation 31.2 s, -, 50 | 5.00 / 21.00, 0, 3 | - "
        "| 1000 / 1900 / 1010 / - | 4,096 | yes |",
    ]
    assert _hot_swap_table(rows[:1]) == []


def test_a_swap_taken_out_of_rotation_sends_no_requests_until_the_retriever_rejoins(tmp_path) -> None:
    import os
    import time

    from benchmarks.scale import SWAP_VERSIONS, _hot_swap_runs, _swap_root
    from tests.conftest import write_random_index
    from twotower import artifacts

    version = tmp_path / "ivf-pq"
    write_random_index(version, "flat", ["Garment Upper body"] * 40)
    root = _swap_root(version, tmp_path / "swap-root")
    log = tmp_path / "retriever.log"
    log.write_text(f"index swapped: v0001 -> {SWAP_VERSIONS[1]} (40 items, model version 1)\n")
    runs: list[float] = []

    def measured_run() -> dict:
        runs.append(time.monotonic())
        return {"p50_ms": 4.0, "p99_ms": 9.0, "errors": 0, "achieved_qps": 100.0}

    phases = _hot_swap_runs(root, measured_run, os.getpid(), None, log, out_of_rotation=lambda: 12.5)
    assert phases["during"]["out_of_rotation_s"] == 12.5 and "p99_ms" not in phases["during"]
    assert len(runs) == 2 and phases["after"]["p99_ms"] == 9.0 and phases["swapped"]
    time.sleep(1.2)  # the swap is published 1 s into 'during'
    assert artifacts.current_version(root) == SWAP_VERSIONS[1]


def resident_pages(path) -> int:
    """Pages of `path` in the page cache: mincore over a read-only mapping (libc's own calls: Python's mmap
    gives no address of a read-only mapping)."""
    import ctypes
    import mmap

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    size = path.stat().st_size
    with open(path, "rb") as handle:
        address = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, handle.fileno(), 0)
    if address in (None, ctypes.c_void_p(-1).value):
        pytest.skip("mmap failed")
    try:
        pages = (ctypes.c_ubyte * (-(-size // mmap.PAGESIZE)))()
        if libc.mincore(address, size, pages) != 0:
            pytest.skip("mincore is not available here")
        return sum(page & 1 for page in pages)
    finally:
        libc.munmap(address, size)


def test_eviction_reaches_versions_an_index_root_links_to(tmp_path) -> None:
    import os

    from benchmarks.memory_limit import evict_from_page_cache

    served = tmp_path / "kept" / "vectors.npy"
    served.parent.mkdir()
    served.write_bytes(os.urandom(1 << 20))
    root = tmp_path / "root"
    root.mkdir()
    (root / "v0001").symlink_to(served.parent, target_is_directory=True)
    served.read_bytes()
    evict_from_page_cache(served.parent)
    if resident_pages(served) > 0:
        pytest.skip("this filesystem keeps its files in memory (tmpfs): nothing to evict")
    served.read_bytes()
    if resident_pages(served) == 0:
        pytest.skip("no page cache to observe here")
    evict_from_page_cache(root)
    assert resident_pages(served) == 0  # the served version of a hot-swap root starts cold, as a pod's does


def test_a_fastscan_index_is_read_into_the_process_and_its_file_left_out_of_the_page_cache(tmp_path) -> None:
    """FastScan's lists are copied into the process whatever the flags: mapped, the whole file stayed mapped beside
    the copy (serving.catalog.READ_IN_INDEX_TYPES; 428 MiB at 10M)."""
    from serving.catalog import Catalog
    from tests.conftest import write_random_index
    from twotower import artifacts
    from twotower.files import drop_from_page_cache

    version = tmp_path / "v0001"
    write_random_index(version, "ivf-pq-fastscan", ["A"] * 3000, seed=3)
    index_file = version / artifacts.INDEX_FILE
    drop_from_page_cache(index_file)
    if resident_pages(index_file) > 0:
        pytest.skip("this filesystem keeps its files in memory (tmpfs): nothing to drop")
    index_file.read_bytes()
    if resident_pages(index_file) == 0:
        pytest.skip("no page cache to observe here")
    catalog = Catalog(version, lexical=False)  # reads it twice: its checksum, then faiss
    assert str(index_file) not in Path("/proc/self/maps").read_text()
    assert resident_pages(index_file) == 0
    _, rows = catalog.search(np.asarray(catalog.vectors[:1], np.float32), 5)
    assert rows[0, 0] == 0  # searched from the copy


def test_text_queries_are_the_reference_catalogues_phrases_through_its_query_tower(tiny_pipeline) -> None:
    from benchmarks.scale import QUERIES, Reference, _text
    from benchmarks.serving import text_queries
    from serving.catalog import Catalog
    from serving.towers import LocalTowers, TokenIds

    catalog = Catalog(tiny_pipeline.index_dir, lexical=False)
    reference = object.__new__(Reference)  # its mixture fit needs more articles than the tiny shop has
    reference.index_dir, reference.items = catalog.index_dir, catalog.items
    texts = reference.text_vectors(tiny_pipeline.repository)
    assert texts is not None and texts.shape[1] == catalog.manifest.dim and 0 < len(texts) <= QUERIES
    np.testing.assert_allclose(np.linalg.norm(texts, axis=1), 1.0, atol=1e-5)  # the query tower's unit vectors
    assert reference.text_vectors(None) is None
    # the catalogue's first phrase, as the retriever would embed it for a text query
    first = text_queries(catalog.items)[:1]
    served = asyncio.run(
        LocalTowers(tiny_pipeline.repository, catalog.manifest).query_vectors(
            TokenIds(catalog.manifest.clip_model)(first)
        )
    )
    np.testing.assert_allclose(texts[0], served[0], atol=1e-6)
    assert _text({"text": {"recall_at_10": 0.9341, "p50_ms": 2.17, "p99_ms": 3.5}}) == "0.934 / 2.17 / 3.50"
    assert _text({}) == "-"  # rows measured before
