"""Benchmark plumbing (the benchmark itself prints numbers; it asserts no timings)."""

from __future__ import annotations

import asyncio

import pytest

from benchmarks.loadgen import run_open_loop, summarise
from benchmarks.serving import stage_means


def test_load_generator_only_targets_loopback() -> None:
    with pytest.raises(ValueError, match="loopback"):
        asyncio.run(run_open_loop("http://10.1.2.3:8080/v1/models/x:predict", [b"{}"], rate=1.0))


def test_summary_counts_errors_and_quantiles() -> None:
    summary = summarise([0.001 * i for i in range(1, 101)], errors=2, started=0.0, finished=1.0, rate=100)
    assert summary["requests"] == 102 and summary["errors"] == 2
    assert summary["p50_ms"] == pytest.approx(50.5) and summary["max_ms"] == pytest.approx(100.0)


def test_stage_means_from_histogram_deltas() -> None:
    def sample(total: float, triton: float, count: float) -> dict[str, float]:
        return {'retriever_stage_seconds_sum{stage="total"}': total, 'retriever_stage_seconds_count{stage="total"}': count,
                'retriever_stage_seconds_sum{stage="triton"}': triton, 'retriever_stage_seconds_count{stage="triton"}': count}

    means = stage_means(sample(1.0, 0.5, 10), sample(1.5, 0.7, 110))
    assert means["total"] == pytest.approx(5.0) and means["triton"] == pytest.approx(2.0)
    assert means["other"] == pytest.approx(3.0) and means["search"] == 0.0
