"""benchmarks.scale: the synthetic catalogue keeps the real product sizes; benchmarks.lexical_scale runs."""

from __future__ import annotations

import subprocess
import sys

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


def test_the_keyword_index_scale_bench_reports_each_size(tmp_path) -> None:
    from benchmarks.lexical_scale import report, run

    captions = ["red dress in jersey", "black trousers", "red trousers with pockets", "blue sweater"]
    rows = run([40, 80], captions, ["red dress", "black trousers", "green"], tmp_path / "work")
    assert [(r["articles"], r["mmap"]) for r in rows] == [(40, True), (40, False), (80, True), (80, False)]
    assert all(r["p99_ms"] >= r["p50_ms"] > 0 and 0 < r["matched_share_p50"] <= 1 for r in rows)
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
