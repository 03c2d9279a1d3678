"""Benchmark plumbing (the benchmark itself prints numbers; it asserts no timings)."""

from __future__ import annotations

import asyncio
import re
import shutil
from pathlib import Path

import pytest

from benchmarks.loadgen import run_open_loop, summarise
from benchmarks.offline import exported_data_source, prepare_artifacts
from benchmarks.serving import retriever_config, stage_means
from twotower import artifacts


def test_load_generator_only_targets_loopback() -> None:
    with pytest.raises(ValueError, match="loopback"):
        asyncio.run(run_open_loop("http://10.1.2.3:8080/v1/models/x:predict", [b"{}"], rate=1.0))


def test_summary_counts_errors_and_quantiles() -> None:
    summary = summarise([0.001 * i for i in range(1, 101)], errors=2, started=0.0, finished=1.0, rate=100)
    assert summary["requests"] == 102 and summary["errors"] == 2
    assert summary["p50_ms"] == pytest.approx(50.5) and summary["max_ms"] == pytest.approx(100.0)


def test_stage_means_from_histogram_deltas() -> None:
    def sample(total: float, triton: float, count: float) -> dict[str, float]:
        return {
            'retriever_stage_seconds_sum{stage="total"}': total,
            'retriever_stage_seconds_count{stage="total"}': count,
            'retriever_stage_seconds_sum{stage="triton"}': triton,
            'retriever_stage_seconds_count{stage="triton"}': count,
        }

    means = stage_means(sample(1.0, 0.5, 10), sample(1.5, 0.7, 110))
    assert means["total"] == pytest.approx(5.0) and means["triton"] == pytest.approx(2.0)
    assert means["other"] == pytest.approx(3.0) and means["search"] == 0.0
    # 100 requests, 40 of them calling Triton at 5 ms: 2 ms per request, 5 per call
    before, after = sample(1.0, 0.5, 10), sample(1.5, 0.7, 110)
    after['retriever_stage_seconds_count{stage="triton"}'] = 50.0
    means = stage_means(before, after)
    assert means["triton"] == pytest.approx(2.0) and means["triton_per_call"] == pytest.approx(5.0)
    assert means["triton_call_share"] == pytest.approx(0.4) and means["other"] == pytest.approx(3.0)


def test_in_process_baseline_gets_the_served_retrievers_flags(tmp_path) -> None:
    # KServe's own flags (--workers) are the server's; ours must reach the baseline, or it does other work.
    config = retriever_config(tmp_path, ["--workers", "2", "--history-clock", "index", "--max-in-flight", "8"])
    assert (config.history_clock, config.max_in_flight, config.index_dir) == ("index", 8, str(tmp_path))


def test_host_probe_times_a_fixed_workload() -> None:
    from benchmarks.hostspeed import probe_ms

    assert 0 < probe_ms(repeats=1) < 10_000


def test_process_cpu_counts_this_process() -> None:
    import os

    from benchmarks.serving import process_tree_cpu_s

    before = process_tree_cpu_s(os.getpid())
    sum(i * i for i in range(2_000_000))  # some CPU work it must see
    assert process_tree_cpu_s(os.getpid()) > before


def _report() -> dict:
    """A one-rate benchmark report as benchmarks.serving writes it (before rounds and Triton stages)."""
    run = {
        "target_qps": 100,
        "achieved_qps": 100,
        "requests": 1000,
        "errors": 0,
        "p50_ms": 4.0,
        "p95_ms": 6.0,
        "p99_ms": 9.0,
        "max_ms": 12.0,
        "mean_ms": 4.5,
        "stages_ms": {"parse": 0.1, "tokenize": 0.0, "triton": 3.0, "search": 0.5, "other": 0.4, "total": 4.0},
        "cpu_ms_per_request": {"retriever": 2.0, "Triton": 1.5, "load generator": 0.5},
    }
    return {
        "machine": "x",
        "data": "d",
        "catalogue": 10,
        "index_type": "ivf",
        "model_run": "runs/hm-eval",
        "retriever_args": "",
        "served": {"100": run},
        "in_process": {"100": {**run, "p50_ms": 2.0, "p99_ms": 4.0}},
        "max_qps_p99_under_50ms": 100,
        "triton_batches": {},
        "offline": {
            "clip_model": "m",
            "embedding_items_per_s": 1.0,
            "catalogue_embedding_s_estimate": 1.0,
            "items": 10,
            "tokenizing_items_per_s": 1.0,
            "index_build_s": {"ivf": 1.0},
            "training_examples_per_s": 1.0,
            "index_recall_at_10": {
                "index_type": "ivf",
                "setting": "nprobe",
                "served": 128,
                "recall": {"64": 0.94, "128": 0.97},
            },
        },
    }


def test_report_names_the_search_setting_and_cpu_split() -> None:
    from benchmarks.report import markdown

    report = _report()
    run = report["served"]["100"]
    text = markdown(report)
    assert "Host speed probe" not in text  # a run from before the probe
    assert "by ivf nprobe: 64: 0.9400, 128: 0.9700 (served with nprobe 128)" in text
    assert "Index recall@10 at the served nprobe: 0.9700: met" in text
    assert "| 100 | 2.00 | 1.50 | 0.50 | 4.00 |" in text
    report["host_probe_ms"] = {"before": 24.61, "after": 31.04}
    assert "24.6 ms before the run, 31.0 ms after" in markdown(report)
    assert "| - |" in text.split("text queries from the cache |")[1].splitlines()[2]  # no hit share recorded
    report["text_queries"] = {"zipf_exponent": 1.0, "distinct": 28123}
    report["served"]["100"]["stages_ms"]["query_cache_hit_share"] = 0.62
    text = markdown(report)
    assert "Zipf law (exponent 1) over 28,123 phrases" in text and "| 62% |" in text
    assert "p99 ms of each round" in text and "| 0 | 2.0x | 2.2x | - |" in text  # a run from before rounds
    report["rounds"] = 3
    report["served"]["100"] = {
        **run,
        "errors_all_rounds": 2,
        "rounds": [{"p99_ms": 9.0, "probe_ms": 24.2}, {"p99_ms": 12.04, "probe_ms": 30.6}],
    }
    text = markdown(report)
    assert "| 2 | 2.0x | 2.2x | 9.0 (24), 12.0 (31) |" in text and "interleaved" in text
    assert "100 QPS (median round of 3): p50 4.00 ms, p99 9.00 ms, errors 2: NOT met" in text
    report["offline"]["index_recall_at_10"] = {"index_type": "flat", "setting": "", "served": 0, "recall": {"0": 1.0}}
    assert "1000 real user vectors: 1.0000 (flat index: exact)" in markdown(report)


def test_open_loop_counts_answers_and_errors(http_server: str) -> None:
    result = asyncio.run(run_open_loop(http_server + "/ok/200", [b"{}"] * 50, rate=500.0))
    assert result["requests"] == 50 and result["errors"] == 0 and result["p99_ms"] > 0
    assert 0 <= result["send_lag"]["p50_ms"] <= result["send_lag"]["p99_ms"] <= result["max_ms"]  # in every latency
    result = asyncio.run(run_open_loop(http_server + "/ok/503", [b"{}"] * 5, rate=500.0))
    assert result["errors"] == 5 and result["statuses"]["503"]["requests"] == 5


def test_wait_until_idle_returns_once_the_processes_are_quiet() -> None:
    import os

    from benchmarks.serving import wait_until_idle

    assert 1.0 <= wait_until_idle([os.getpid()], busy_cores=0.5, timeout_s=10.0) < 5.0


def test_median_round_is_one_whole_round_and_counts_every_error() -> None:
    from benchmarks.serving import median_round, passes

    rounds = [
        {"p50_ms": 4.0, "p99_ms": 30.0, "errors": 0, "probe_ms": 31.0, "stages_ms": {"total": 3.0}},
        {"p50_ms": 3.0, "p99_ms": 8.0, "errors": 1, "probe_ms": 24.0, "stages_ms": {"total": 2.0}},
        {"p50_ms": 3.5, "p99_ms": 9.0, "errors": 0, "probe_ms": 25.0, "stages_ms": {"total": 2.5}},
    ]
    chosen = median_round(rounds)
    assert (chosen["p50_ms"], chosen["p99_ms"], chosen["stages_ms"]) == (3.5, 9.0, {"total": 2.5})
    assert [r["p99_ms"] for r in chosen["rounds"]] == [30.0, 8.0, 9.0] and "stages_ms" not in chosen["rounds"][0]
    assert chosen["errors_all_rounds"] == 1 and not passes(chosen)  # an error in any round fails the rate
    assert median_round(rounds[1:])["p99_ms"] == 8.0  # an even count takes the lower middle
    assert passes(median_round(rounds[2:]))
    with pytest.raises(ValueError):
        median_round([])


def test_triton_model_stats_per_request_stage_means() -> None:
    from benchmarks.report import markdown
    from benchmarks.serving import triton_model_stats

    def stage(count: int, ms: float) -> dict:
        return {"count": count, "ns": int(count * ms * 1e6)}

    raw = {
        "model_stats": [
            {
                "name": "user_tower",
                "inference_count": "400",
                "execution_count": "380",
                "inference_stats": {
                    "success": stage(400, 1.8),
                    "queue": stage(400, 0.3),
                    "compute_input": stage(400, 0.04),
                    "compute_infer": stage(400, 1.4),
                    "compute_output": stage(400, 0.08),
                    "fail": stage(0, 0),
                },
            },
            {"name": "item_tower", "inference_count": "0", "execution_count": "0", "inference_stats": {}},
        ]
    }
    stats = triton_model_stats(raw)
    assert stats["user_tower"]["inferences"] == 400 and stats["user_tower"]["executions"] == 380
    assert stats["user_tower"]["compute_infer_ms"] == pytest.approx(1.4) and "queue_ms" not in stats["item_tower"]
    report = _report()
    report["triton_batches"] = stats
    assert (
        "user_tower: 400 inferences in 380 executions, ms per request inside Triton: queue 0.30, input 0.04, "
        "infer 1.40, output 0.08; item_tower: 0 inferences in 0 executions."
    ) in markdown(report)


def test_text_queries_are_distinct_catalogue_phrases_in_a_seeded_order() -> None:
    from benchmarks.serving import text_queries

    items = {
        "colour_group_name": ["Black", "Black", "White"],
        "product_type_name": ["Vest top", "Vest top", "Dress"],
        "prod_name": ["Strap top", "Strap top", "Maxi"],
    }
    queries = text_queries(items, seed=3)
    assert sorted(queries) == ["black strap top", "black vest top", "white dress", "white maxi"]
    assert text_queries(items, seed=3) == queries


def test_stage_means_report_the_query_cache_hit_share() -> None:
    key = 'retriever_cache_lookups_total{cache="query_vector",result="%s"}'
    before = {key % "hit": 10.0, key % "miss": 5.0}
    after = {key % "hit": 40.0, key % "miss": 15.0}
    assert stage_means(before, after)["query_cache_hit_share"] == pytest.approx(0.75)
    assert "query_cache_hit_share" not in stage_means(before, before)  # no text query in the run


def test_load_summaries_split_latency_by_request_kind() -> None:
    from benchmarks.loadgen import request_kind, summarise

    result = summarise([0.001, 0.002, 0.010], 0, 0.0, 1.0, 3.0, ["query", "history", "query"])
    assert result["by_kind"]["query"]["requests"] == 2 and result["by_kind"]["history"]["p50_ms"] == pytest.approx(2.0)
    assert result["by_kind"]["query"]["p99_ms"] == pytest.approx(9.91)
    assert request_kind({"instances": [{"query": "x", "k": 3}]}) == "query" and request_kind({}) == "other"
    assert "by_kind" not in summarise([0.001], 0, 0.0, 1.0, 1.0)


def test_overload_phases_split_admitted_shed_and_unanswered() -> None:
    from benchmarks.overload import phase

    result = {
        "requests": 100,
        "achieved_qps": 50.0,
        "target_qps": 50.0,
        "p50_ms": 4.0,
        "p99_ms": 9.0,
        "statuses": {
            "200": {"requests": 60, "p50_ms": 4.0, "p99_ms": 9.0},
            "503": {"requests": 30, "p50_ms": 1.0, "p99_ms": 2.0},
            "0": {"requests": 8, "p50_ms": 5000.0, "p99_ms": 5000.0},
            "500": {"requests": 2, "p50_ms": 3.0, "p99_ms": 3.0},
        },
    }
    p = phase(result)
    assert (p["admitted"], p["shed"], p["unanswered"], p["other_errors"]) == (60, 30, 8, 2)
    assert p["goodput_qps"] == pytest.approx(30.0) and p["shed_p99_ms"] == 2.0


def test_gpu_check_runs_the_exported_towers_and_search_where_there_is_no_gpu(tiny_pipeline, capsys) -> None:
    """`make gpu-check` as it runs on a machine without CUDA: every tower and the served search, a row per batch."""
    from benchmarks import gpu_check

    assert gpu_check.main(["--index-dir", str(tiny_pipeline.index_dir), "--model-repository",
                           str(tiny_pipeline.repository), "--repeats", "4"]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "user tower" in printed and "item tower" in printed and "search top-100" in printed
    assert [
        line.split("|")[1].strip() for line in printed.splitlines() if line.startswith("| ") and "batch" not in line
    ][:3] == ["1", "16", "64"]


def test_gpu_check_without_arguments_serves_the_export_it_finds_or_builds(tiny_pipeline, monkeypatch, capsys) -> None:
    """A fresh checkout (a GPU machine's) has no runs/bench: `make gpu-check` stopped at its missing index. Now
    it measures benchmarks.references' export (make eval's or make bench's, the latter built where neither
    exists: tests/test_scale_bench.py) with the model repository beside it."""
    from benchmarks import gpu_check, references

    asked: list[object] = []

    def export(data_dir: object = None) -> Path:
        asked.append(data_dir)
        return tiny_pipeline.index_dir

    monkeypatch.setattr(references, "export_to_measure", export)
    assert gpu_check.main(["--repeats", "2"]) == 0
    assert asked == [None] and "user tower" in capsys.readouterr().out


def test_an_exports_model_repository_is_found_beside_its_index_root(tiny_pipeline, tmp_path, monkeypatch) -> None:
    from benchmarks.references import repository_beside
    from twotower import artifacts

    root = tiny_pipeline.index_dir
    beside = tiny_pipeline.repository.resolve()
    version = artifacts.resolve_index_dir(root)
    assert repository_beside(root) == beside and repository_beside(version) == beside
    monkeypatch.chdir(version)  # relative paths too: "." is a version, its root one level up
    assert repository_beside(Path(".")) == beside
    alone = tmp_path / "alone" / "index"
    shutil.copytree(root, alone)  # an index root with no repository beside it: said, not a traceback from torch
    with pytest.raises(SystemExit, match="no model repository beside .*--model-repository"):
        repository_beside(alone)


def test_a_bench_without_data_refuses_to_replace_another_datas_export(tiny_pipeline, tmp_path) -> None:
    work = tmp_path / "bench"
    shutil.copytree(tiny_pipeline.index_dir, work / "index")
    with pytest.raises(
        SystemExit, match=f"holds an export of {re.escape(str(tiny_pipeline.data_dir))}.*pass --data-dir"
    ):
        prepare_artifacts(None, work)
    assert not (work / "data").exists()  # no synthetic shop generated, the export untouched
    assert exported_data_source(work / "index") == str(tiny_pipeline.data_dir)
    assert exported_data_source(tmp_path / "nothing") is None
    shutil.rmtree(artifacts.resolve_index_dir(work / "index"))  # half written: the current version gone
    assert exported_data_source(work / "index") is None  # rebuilt, not a crash
