"""Soak run: a fixed rate through the whole served path for a bounded time, watching errors,
latency per window and the memory (RSS) of the retriever and of Triton with its python stubs.

    python -m benchmarks.soak --minutes 10 --rate 100        # docs/soak.{md,json}

Uses the same artifacts, request mix and open-loop generator as `make bench` (H&M full catalogue
when ../shared/data/hm_lastweek exists). Every request body is distinct where the mix allows, so
the vector caches do not turn the run into a cache benchmark.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks import offline, references
from benchmarks.serving import SIDECAR_BACKSTOP_ARGS, bench_servers, request_bodies, run_served_rate
from serving.catalog import Catalog

log = logging.getLogger("benchmarks.soak")
PAGE_KB = os.sysconf("SC_PAGE_SIZE") / 1024


def rss_mb(pid: int) -> float:
    try:
        pages = int(Path(f"/proc/{pid}/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return 0.0
    return pages * PAGE_KB / 1024


def tree_rss_mb(pid: int) -> float:
    """RSS of a process and all its descendants (the retriever and its KServe workers)."""
    import psutil

    try:
        root = psutil.Process(pid)
        return sum(p.memory_info().rss for p in [root, *root.children(recursive=True)]) / 2**20
    except psutil.Error:
        return 0.0


def group_rss_mb(group: int) -> float:
    """RSS of every process in a process group (Triton and its python backend stubs)."""
    total = 0.0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == group:  # fields after the command: state, ppid, pgrp, ...
            total += rss_mb(int(entry.name))
    return total


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "# Soak run",
        "",
        f"`python -m benchmarks.soak --minutes {report['minutes']:g} --rate {report['rate']:g}"
        f"{' --proxy' if report.get('proxy') else ''}` "
        f"on {report['machine']}; "
        f"catalogue {report['catalogue']:,} articles ({report['data']}).",
        "",
        f"Total: {report['requests']:,} requests, {report['errors']} errors. "
        f"RSS retriever {report['rss_mb']['retriever'][0]:.0f} -> {report['rss_mb']['retriever'][-1]:.0f} MB, "
        f"Triton + stubs {report['rss_mb']['triton'][0]:.0f} -> {report['rss_mb']['triton'][-1]:.0f} MB "
        f"(bound: growth under {report['rss_growth_bound_mb']} MB each).",
        "",
        "| window | achieved QPS | p50 ms | p99 ms | max ms | errors | retriever RSS MB | Triton RSS MB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for i, window in enumerate(report["windows"]):
        lines.append(
            f"| {i + 1} | {window['achieved_qps']:.1f} | {window['p50_ms']:.2f} | {window['p99_ms']:.2f} | "
            f"{window['max_ms']:.1f} | {window['errors']} | {window['rss_retriever_mb']:.0f} | "
            f"{window['rss_triton_mb']:.0f} |"
        )
    verdict = report["verdict"]
    lines += [
        "",
        f"Verdict: zero errors {'held' if verdict['zero_errors'] else 'FAILED'}; memory growth "
        f"{'within' if verdict['memory_bounded'] else 'OVER'} the bound; p99 of the last window / first window "
        f"{verdict['p99_last_over_first']:.2f}.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=references.default_data_dir())
    parser.add_argument("--work-dir", type=Path, default=references.BENCH_WORK)
    parser.add_argument(
        "--run-dir",
        type=Path,
        default=None,
        help="trained run to serve, as for benchmarks.serving (default: a model trained for 60 steps)",
    )
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--rate", type=float, default=100.0)
    parser.add_argument("--window-s", type=float, default=60.0, help="latency and RSS are reported per window")
    parser.add_argument("--rss-growth-bound-mb", type=float, default=100.0)
    parser.add_argument(
        "--proxy",
        action="store_true",
        help="through the HAProxy admission sidecar with its shipped settings, as the raw overlays serve",
    )
    parser.add_argument("--out", type=Path, default=Path("docs"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args.work_dir.mkdir(parents=True, exist_ok=True)
    artifacts = offline.prepare_artifacts(args.data_dir, args.work_dir, args.run_dir)
    windows_n = max(1, round(args.minutes * 60 / args.window_s))
    per_window = int(args.rate * args.window_s)
    bodies = request_bodies(Catalog(artifacts.index_dir), per_window * windows_n, seed=1)

    windows = []
    # the H&M week replayed as of its last day, as make bench does
    retriever_args = ["--history-clock", "index", *(SIDECAR_BACKSTOP_ARGS if args.proxy else [])]
    sidecar = {} if args.proxy else None  # the sidecar's shipped settings
    with bench_servers(artifacts, args.work_dir, "soak-retriever.log", retriever_args, sidecar) as bench:
        triton, retriever = bench.triton, bench.retriever
        assert triton.pid is not None and retriever.process is not None
        rss_start = {"retriever": rss_mb(retriever.process.pid), "triton": group_rss_mb(triton.pid)}
        servers = {"retriever": retriever.process.pid, "Triton": triton.pid}  # CPU per request, per window
        for w in range(windows_n):
            bodies_file = args.work_dir / "soak-bodies.jsonl"
            chunk = bodies[w * per_window : (w + 1) * per_window]
            bodies_file.write_text("\n".join(json.dumps(b) for b in chunk) + "\n")
            result = run_served_rate(
                retriever, bodies_file, args.rate, args.window_s, args.work_dir, servers, predict_url=bench.predict_url
            )
            result["rss_retriever_mb"] = rss_mb(retriever.process.pid)
            result["rss_triton_mb"] = group_rss_mb(triton.pid)
            windows.append(result)
            log.info(
                "window %d/%d: %.0f qps, p50 %.2f ms, p99 %.2f ms, errors %d, RSS retriever %.0f MB, Triton %.0f MB",
                w + 1,
                windows_n,
                result["achieved_qps"],
                result["p50_ms"],
                result["p99_ms"],
                result["errors"],
                result["rss_retriever_mb"],
                result["rss_triton_mb"],
            )
    rss = {
        "retriever": [rss_start["retriever"]] + [w["rss_retriever_mb"] for w in windows],
        "triton": [rss_start["triton"]] + [w["rss_triton_mb"] for w in windows],
    }
    errors = sum(w["errors"] for w in windows)
    report = {
        "minutes": args.minutes,
        "rate": args.rate,
        "proxy": args.proxy,
        "window_s": args.window_s,
        "machine": f"{os.cpu_count()} cores shared by load generator and servers",
        "data": str(args.data_dir or "synthetic"),
        "catalogue": artifacts.item_count,
        "requests": sum(w["requests"] for w in windows),
        "errors": errors,
        "windows": windows,
        "rss_mb": rss,
        "rss_growth_bound_mb": args.rss_growth_bound_mb,
        "verdict": {
            "zero_errors": errors == 0,
            # Growth after the first window: the first one includes warm-up allocations (caches, pools).
            "memory_bounded": all(v[-1] - v[1] < args.rss_growth_bound_mb for v in rss.values()),
            "p99_last_over_first": windows[-1]["p99_ms"] / max(windows[0]["p99_ms"], 1e-9),
        },
        "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "soak.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "soak.md").write_text(markdown(report))
    print(markdown(report))
    return 0 if report["verdict"]["zero_errors"] and report["verdict"]["memory_bounded"] else 1


if __name__ == "__main__":
    sys.exit(main())
