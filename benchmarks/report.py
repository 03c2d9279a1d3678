"""docs/benchmarks.{json,md,png} from one benchmark run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from twotower.reporting import write_bundle

LEVERS_FILE = Path(__file__).with_name("LEVERS.md")


def _by_rate(runs: dict[str, Any]) -> list[tuple[str, Any]]:
    """Numeric order: the JSON file stores rates as sorted strings ("100" < "50")."""
    return sorted(runs.items(), key=lambda item: float(item[0]))


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.1f}x" if b > 0 else "n/a"


def _by_kind(served: dict[str, Any]) -> list[str]:
    """p50 / p99 per request kind in each rate's reported round (reports before this have none)."""
    rates = [(rate, r["by_kind"]) for rate, r in _by_rate(served) if r.get("by_kind")]
    if not rates:
        return []
    kinds = sorted({kind for _, by_kind in rates for kind in by_kind})
    lines = [
        "Latency by request kind in the same rounds, p50 / p99 ms (text queries: hybrid BM25 + the query tower):",
        "",
        "| target QPS | " + " | ".join(kinds) + " |",
        "|---|" + "---|" * len(kinds),
    ]
    for rate, by_kind in rates:
        cells = [f"{by_kind[k]['p50_ms']:.2f} / {by_kind[k]['p99_ms']:.2f}" if k in by_kind else "-" for k in kinds]
        lines.append(f"| {rate} | " + " | ".join(cells) + " |")
    return lines + [""]


def _host_probe(report: dict[str, Any]) -> list[str]:
    probe = report.get("host_probe_ms")  # runs before the probe existed have none
    if not probe:
        return []
    return [
        (
            f"Host speed probe (benchmarks/hostspeed.py, a fixed CPU workload; lower is faster, 24-25 ms on "
            f"this host when idle, 2026-11-26): {probe['before']:.1f} ms before the run, "
            f"{probe['after']:.1f} ms after. "
            "Compare runs only at similar values: the same code needed a third more CPU per request on some evenings "
            "than on others."
        )
    ]


def _rounds_note(report: dict[str, Any]) -> list[str]:
    rounds = report.get("rounds", 1)  # runs before rounds existed ran each rate once
    if rounds <= 1:
        return []
    return [
        (
            f"Each rate ran {rounds} rounds of the same length, interleaved (every rate, then every rate again), "
            "with fresh requests each; a row is the round with the median p99, whole (its p50, stages and CPU too), "
            "and the last column lists every round's p99 with the host probe taken just before it. Errors are "
            "those of all rounds."
        )
    ]


def _query_mix_note(report: dict[str, Any]) -> list[str]:
    mix = report.get("text_queries")  # runs before it drew from ten fixed phrases
    if not mix:
        return []
    return [
        (
            f"Text queries: a Zipf law (exponent {mix['zipf_exponent']:g}) over {mix['distinct']:,} phrases "
            "made from the "
            "catalogue (colour + product type or name), so popular ones repeat and hit the query-vector cache while "
            "the long tail reaches the item tower; the stage table shows the hit share per rate."
        )
    ]


def _median_of(report: dict[str, Any]) -> str:
    return f" (median round of {report['rounds']})" if report.get("rounds", 1) > 1 else ""


def _errors(run: dict[str, Any]) -> int:
    return int(run.get("errors_all_rounds", run["errors"]))


def _round_p99s(run: dict[str, Any]) -> str:
    rounds = run.get("rounds", [])
    return (
        ", ".join(f"{r['p99_ms']:.1f}" + (f" ({r['probe_ms']:.0f})" if "probe_ms" in r else "") for r in rounds) or "-"
    )


def _inside_triton(model: dict[str, Any]) -> str:
    stages = [
        (stage, model[f"{stage}_ms"])
        for stage in ("queue", "compute_input", "compute_infer", "compute_output")
        if f"{stage}_ms" in model
    ]  # runs before these were recorded have none
    if not stages:
        return ""
    return ", ms per request inside Triton: " + ", ".join(
        f"{stage.replace('compute_', '')} {ms:.2f}" for stage, ms in stages
    )


def markdown(report: dict[str, Any]) -> str:
    served, local = report["served"], report["in_process"]
    at_100 = served.get("100", {})
    ann = report["offline"]["index_recall_at_10"]
    recall = ann["recall"].get(str(ann["served"]), min(ann["recall"].values()))
    lines = [
        "# Serving benchmark",
        "",
        f"Machine: {report['machine']}. Data: {report['data']} ({report['catalogue']:,} articles, "
        f"{report['index_type']} index). Model: {report.get('model_run', '-')}. "
        f"Retriever flags: `{report['retriever_args'] or '(defaults)'}`.",
        *_host_probe(report),
        "Open-loop load (fixed arrival rate, latency from each request's scheduled send time), request mix:",
        "40% known customers, 40% histories of 1..50 articles, 20% text queries, k=12; a quarter of the customer "
        "and history requests exclude purchased articles, a tenth of all requests filter by a product group. "
        "Command: `make bench`.",
        *_query_mix_note(report),
        *_rounds_note(report),
        "",
        "## Served: HTTP -> KServe retriever -> Triton -> FAISS",
        "",
        "| target QPS | achieved | p50 ms | p95 ms | p99 ms | max ms | errors | p50 served/in-process "
        "| p99 served/in-process | p99 ms of each round (probe ms) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for rate, r in _by_rate(served):
        base = local.get(rate)
        lines.append(
            f"| {rate} | {r['achieved_qps']:.0f} | {r['p50_ms']:.2f} | {r['p95_ms']:.2f} | {r['p99_ms']:.2f} | "
            f"{r['max_ms']:.1f} | {_errors(r)} | {_ratio(r['p50_ms'], base['p50_ms']) if base else '-'} | "
            f"{_ratio(r['p99_ms'], base['p99_ms']) if base else '-'} | {_round_p99s(r)} |"
        )
    lines += [
        "",
        f"Highest rate with p99 < 50 ms and no errors: **{report['max_qps_p99_under_50ms']:.0f} QPS**.",
        "",
        *_by_kind(served),
        "## In-process baseline: the same KServe adapter, TorchScript towers and index in one process",
        "",
        "| target QPS | p50 ms | p95 ms | p99 ms | max ms |",
        "|---|---|---|---|---|",
    ]
    for rate, r in _by_rate(local):
        lines.append(f"| {rate} | {r['p50_ms']:.2f} | {r['p95_ms']:.2f} | {r['p99_ms']:.2f} | {r['max_ms']:.1f} |")
    lines += [
        "",
        "## Where the served time goes (retriever's own histograms, mean ms per request)",
        "",
        "Inside the retriever's predict: every column is averaged over all requests, so parse + Triton + search",
        "+ other = total (tokenizing happens inside the Triton stage). Requests answered from a vector cache or",
        "an export-time customer vector make no Triton call; the last column is the call itself. The served",
        "latency above minus `total` is HTTP, KServe's routing and JSON, and the load generator. The last column:",
        "requests whose list skipped the second stage because the process was overloaded (--shed-second-stage-ms).",
        "",
        "| target QPS | parse | Triton stage (tokenize) | search + boosts + results | other | total "
        "| requests calling Triton | ms per Triton call | text queries from the cache | second stage shed |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for rate, r in _by_rate(served):
        s = r["stages_ms"]
        share = f"{s['triton_call_share']:.0%}" if "triton_call_share" in s else "-"
        per_call = f"{s['triton_per_call']:.2f}" if "triton_per_call" in s else "-"
        lines.append(
            f"| {rate} | {s['parse']:.2f} | {s['triton']:.2f} ({s['tokenize']:.2f}) | {s['search']:.2f} | "
            f"{s['other']:.2f} | {s['total']:.2f} | {share} | {per_call} | "
            + (f"{s['query_cache_hit_share']:.0%} |" if "query_cache_hit_share" in s else "- |")
            + (f" {s['second_stage_shed_share']:.1%} |" if "second_stage_shed_share" in s else " - |")
        )
    processes = list(next(iter(served.values()), {}).get("cpu_ms_per_request", {}))
    if processes:
        lines += [
            "",
            "CPU ms per request by process (2 cores give 2,000 CPU ms per second: a rate saturates the machine",
            "when rate x total CPU ms per request nears 2,000):",
            "",
            "| target QPS | " + " | ".join(processes) + " | total |",
            "|---|" + "---|" * (len(processes) + 1),
        ]
        for rate, r in _by_rate(served):
            cpu = r.get("cpu_ms_per_request", {})
            lines.append(
                f"| {rate} | "
                + " | ".join(f"{cpu.get(p, float('nan')):.2f}" for p in processes)
                + f" | {sum(cpu.values()):.2f} |"
            )
    batches = "; ".join(
        f"{name}: {b['inferences']} inferences in {b['executions']} executions{_inside_triton(b)}"
        for name, b in report["triton_batches"].items()
    )
    off = report["offline"]
    lines += [
        "",
        (
            f"Triton over the run (its own statistics; `infer` is the Python backend's round trip to its stub with "
            f"the tower in it): {batches}."
        ),
        "",
        "## Offline costs",
        "",
        f"- Catalogue embedding ({off['clip_model']}, tokenizing included): "
        f"{off['embedding_items_per_s']:.0f} items/s, "
        f"about {off['catalogue_embedding_s_estimate']:.0f} s for {off['items']:,} articles "
        f"(the tokenizer alone: {off['tokenizing_items_per_s']:.0f} items/s).",
        "- Index build over the full catalogue: "
        + ", ".join(f"{k} {v:.1f} s" for k, v in off["index_build_s"].items())
        + ".",
        f"- Training throughput: {off['training_examples_per_s']:.0f} examples/s.",
        (
            f"- Index recall@10 vs exact search, 1000 real user vectors, by {ann['index_type']} {ann['setting']}: "
            + ", ".join(f"{value}: {r:.4f}" for value, r in _by_rate(ann["recall"]))
            + f" (served with {ann['setting']} {ann['served']})."
            if ann["setting"]
            else f"- Index recall@10 vs exact search, 1000 real user vectors: {recall:.4f} "
            f"({ann['index_type']} index: exact)."
        ),
        "",
        "## Targets (issue: p99 <= 10 ms and p50 <= 5 ms at 100 QPS, >= 400 QPS under p99 50 ms, recall@10 >= 0.95)",
        "",
        f"- 100 QPS{_median_of(report)}: p50 {at_100.get('p50_ms', float('nan')):.2f} ms, "
        f"p99 {at_100.get('p99_ms', float('nan')):.2f} ms, errors {_errors(at_100) if at_100 else '-'}: "
        f"{'met' if at_100 and at_100['p99_ms'] <= 10 and at_100['p50_ms'] <= 5 and not _errors(at_100) else 'NOT met'}"
        ".",
        f"- Highest rate under p99 50 ms: {report['max_qps_p99_under_50ms']:.0f} QPS: "
        f"{'met' if report['max_qps_p99_under_50ms'] >= 400 else 'NOT met'}.",
        f"- Index recall@10 at the served {ann['setting'] or 'setting'}: {recall:.4f}: "
        f"{'met' if recall >= 0.95 else 'NOT met'}.",
        "",
    ]
    if LEVERS_FILE.is_file():
        lines += [LEVERS_FILE.read_text()]
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(8, 4.5))
    for label, runs, style in (("served", report["served"], "-o"), ("in-process", report["in_process"], "--s")):
        ordered = _by_rate(runs)
        for quantile in ("p50_ms", "p99_ms"):
            axis.plot(
                [float(r) for r, _ in ordered],
                [v[quantile] for _, v in ordered],
                style,
                label=f"{label} {quantile[:3]}",
            )
    axis.axhline(10, color="grey", linewidth=0.8, linestyle=":")
    axis.axhline(50, color="grey", linewidth=0.8, linestyle=":")
    axis.set_xlabel("target QPS (open loop)")
    axis.set_ylabel("latency, ms")
    axis.set_yscale("log")
    axis.set_title(f"Recommendation latency, {report['catalogue']:,} articles")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def write_report(out_dir: Path, result: dict[str, Any]) -> list[Path]:
    return write_bundle(out_dir, "benchmarks", result, markdown, plot)
