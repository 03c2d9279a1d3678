"""Overload run: twice the saturating rate through the whole served path, with the retriever's admission
limit, without it and through the HAProxy admission sidecar (Debian's haproxy; `make overload` installs it),
then the normal rate again to see how fast the service recovers.

    python -m benchmarks.overload                      # docs/overload.{md,json}

Per setting: 100 QPS for --calm-s (the reference), --overload-rate for --overload-s, then 100 QPS in
--window-s windows for --recovery-s. Requests are the bench mix with fresh bodies (make bench's
artifacts), each given up by the client after --client-timeout-s. Reported per phase: admitted (200)
p50/p99, shed answers (503) and how fast they came, requests never answered, goodput, and the RSS
of the retriever and of Triton with its stubs.
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
from benchmarks.serving import (
    SIDECAR_BACKSTOP_ARGS,
    bench_servers,
    request_bodies,
    run_served_rate,
    wait_until_idle,
)
from benchmarks.soak import group_rss_mb, tree_rss_mb
from retriever.launch import admission_proxy_defaults
from serving.catalog import Catalog
from twotower.config import RetrieverConfig, config_from_env

log = logging.getLogger("benchmarks.overload")
CALM_RATE = 100.0
DEFAULTS = RetrieverConfig()
# The retriever reads TWOTOWER_<FIELD> overrides too, e.g. TWOTOWER_MIN_IN_FLIGHT=2: name what it will run.
FLOOR = config_from_env(RetrieverConfig).min_in_flight


def setting_name(max_in_flight: int, target_ms: float) -> str:
    if max_in_flight <= 0:
        return "no admission limit"
    name = f"max_in_flight {max_in_flight}, " + (
        f"adaptive (target {target_ms:g} ms, floor {FLOOR})" if target_ms > 0 else "fixed"
    )
    default = (max_in_flight, target_ms, FLOOR) == (
        DEFAULTS.max_in_flight,
        DEFAULTS.admission_target_ms,
        DEFAULTS.min_in_flight,
    )
    return name + (" (default)" if default else "")


def settings(limits: str, targets: str) -> list[tuple[int, float]]:
    """Every limit with every target (a limit of 0 once: no limit, nothing to adapt)."""
    pairs = [(int(v), float(t)) for v in filter(None, limits.split(",")) for t in targets.split(",")]
    return list(dict.fromkeys((limit, target if limit > 0 else 0.0) for limit, target in pairs))


def phase(result: dict[str, Any]) -> dict[str, Any]:
    statuses = result.get("statuses", {})

    def part(status: str) -> dict[str, float]:
        return statuses.get(status, {"requests": 0, "p50_ms": float("nan"), "p99_ms": float("nan")})

    duration = result["requests"] / max(result["achieved_qps"], 1e-9)
    return {
        "sent": result["requests"],
        "target_qps": result["target_qps"],
        "admitted": part("200")["requests"],
        "goodput_qps": part("200")["requests"] / max(duration, 1e-9),
        "admitted_p50_ms": result["p50_ms"],
        "admitted_p99_ms": result["p99_ms"],
        "shed": part("503")["requests"],
        "shed_p50_ms": part("503")["p50_ms"],
        "shed_p99_ms": part("503")["p99_ms"],
        "unanswered": part("0")["requests"],
        "other_errors": sum(v["requests"] for k, v in statuses.items() if k not in ("200", "503", "0")),
        "send_lag_p50_ms": result.get("send_lag", {}).get("p50_ms", float("nan")),
        "send_lag_p99_ms": result.get("send_lag", {}).get("p99_ms", float("nan")),
    }


def run_setting(
    artifacts: offline.BenchArtifacts,
    flags: list[str],
    bodies: list[dict],
    args: argparse.Namespace,
    proxy: dict[str, str] | None = None,
) -> dict[str, Any]:
    """One setting's phases; with `proxy` (AdmissionProxy's settings) the load goes through that sidecar."""
    bodies_file = args.work_dir / "overload-bodies.jsonl"
    used = 0

    def run(rate: float, seconds: float) -> dict[str, Any]:
        nonlocal used
        n = int(rate * seconds)
        bodies_file.write_text("\n".join(json.dumps(b) for b in bodies[used : used + n]) + "\n")
        used += n
        result = run_served_rate(
            retriever,
            bodies_file,
            rate,
            seconds,
            args.work_dir,
            servers,
            client_timeout_s=args.client_timeout_s,
            predict_url=bench.predict_url,
        )
        return {**phase(result), "rss_retriever_mb": tree_rss_mb(pid), "rss_triton_mb": group_rss_mb(triton.pid or 0)}

    retriever_args = ["--workers", "2", "--history-clock", "index", *flags]
    with bench_servers(artifacts, args.work_dir, "overload-retriever.log", retriever_args, proxy) as bench:
        triton, retriever = bench.triton, bench.retriever
        assert triton.pid is not None and retriever.process is not None
        pid = retriever.process.pid
        servers = {"retriever": pid, "Triton": triton.pid}
        if bench.sidecar is not None and bench.sidecar.process is not None:
            servers["admission proxy"] = bench.sidecar.process.pid
        wait_until_idle(list(servers.values()))
        rss_start = {"retriever": tree_rss_mb(pid), "triton": group_rss_mb(triton.pid)}
        calm = run(CALM_RATE, args.calm_s)
        overload = run(args.overload_rate, args.overload_s)
        recovery = [run(CALM_RATE, args.window_s) for _ in range(max(1, round(args.recovery_s / args.window_s)))]
    return {
        "flags": flags,
        "proxy": proxy,
        "rss_start": rss_start,
        "calm": calm,
        "overload": overload,
        "recovery": recovery,
    }


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "## Overload: twice the saturating rate",
        "",
        f"`python -m benchmarks.overload` ({report['finished']}) on {report['machine']}; catalogue "
        f"{report['catalogue']:,} articles ({report['data']}); the bench mix with fresh bodies; retriever "
        "`--workers 2`. Per setting: "
        f"{CALM_RATE:g} QPS for {report['calm_s']:g} s, {report['overload_rate']:g} QPS for "
        f"{report['overload_s']:g} s ({report['overload_rate'] / report['saturating_rate']:.1f}x the "
        f"{report['saturating_rate']:g} QPS `make bench` could not sustain), then {CALM_RATE:g} QPS in "
        f"{report['window_s']:g} s windows. Clients give up after {report['client_timeout_s']:g} s (unanswered).",
        *(
            [
                "",
                "'HAProxy sidecar' rows: the load goes through k8s/components/admission-proxy/admission-proxy.cfg "
                "(requests in flight to the retriever, queue length, queue timeout), and the retriever behind it "
                f"keeps `{' '.join(SIDECAR_BACKSTOP_ARGS)}` as a backstop.",
            ]
            if any(setting.get("proxy") for setting in report["settings"].values())
            else []
        ),
        "",
        "| setting | phase | sent | admitted (200) | goodput QPS | admitted p50 / p99 ms | shed (503) "
        "| shed p50 / p99 ms | unanswered | other errors | RSS retriever / Triton MB | load generator's send lag "
        "p50 / p99 ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, setting in report["settings"].items():
        phases = [("calm", setting["calm"]), ("overload", setting["overload"])]
        phases += [
            (f"after, {i * report['window_s']:g}-{(i + 1) * report['window_s']:g} s", r)
            for i, r in enumerate(setting["recovery"])
        ]
        for label, p in phases:
            lines.append(
                f"| {name} | {label} | {p['sent']} | {p['admitted']} | {p['goodput_qps']:.0f} | "
                f"{p['admitted_p50_ms']:.1f} / {p['admitted_p99_ms']:.1f} | {p['shed']} | "
                f"{p['shed_p50_ms']:.1f} / {p['shed_p99_ms']:.1f} | {p['unanswered']} | {p['other_errors']} | "
                f"{p['rss_retriever_mb']:.0f} / {p['rss_triton_mb']:.0f} | "
                f"{p['send_lag_p50_ms']:.1f} / {p['send_lag_p99_ms']:.1f} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=references.default_data_dir())
    parser.add_argument("--work-dir", type=Path, default=references.BENCH_WORK)
    parser.add_argument("--run-dir", type=Path, default=None, help="trained run to serve, as for benchmarks.serving")
    parser.add_argument(
        "--saturating-rate",
        type=float,
        default=400.0,
        help="the rate make bench could not sustain (docs/benchmarks.md)",
    )
    parser.add_argument("--overload-rate", type=float, default=0.0, help="default: twice --saturating-rate")
    parser.add_argument("--overload-s", type=float, default=60.0)
    parser.add_argument("--calm-s", type=float, default=20.0)
    parser.add_argument("--recovery-s", type=float, default=20.0)
    parser.add_argument("--window-s", type=float, default=5.0)
    parser.add_argument("--client-timeout-s", type=float, default=5.0)
    parser.add_argument(
        "--max-in-flight",
        default=f"{DEFAULTS.max_in_flight},0",
        help="comma-separated admission limits to compare (0 = none; empty: only the --proxy settings)",
    )
    parser.add_argument(
        "--admission-target-ms",
        default=f"{DEFAULTS.admission_target_ms:g},0",
        help="comma-separated service-time targets of the adaptive limit to compare with each limit (0 = fixed)",
    )
    proxy_defaults = admission_proxy_defaults()  # the sidecar's shipped settings
    parser.add_argument(
        "--proxy",
        default=proxy_defaults["ADMISSION_MAX_IN_FLIGHT"],
        help="comma-separated ADMISSION_MAX_IN_FLIGHT values: also run with the HAProxy sidecar "
        "(k8s/components/admission-proxy/admission-proxy.cfg) allowing that many requests into the retriever, which "
        f"then keeps `{' '.join(SIDECAR_BACKSTOP_ARGS)}` as a backstop; empty: none",
    )
    parser.add_argument(
        "--proxy-queue", type=int, default=int(proxy_defaults["ADMISSION_MAX_QUEUE"]), help="its ADMISSION_MAX_QUEUE"
    )
    parser.add_argument(
        "--proxy-queue-timeout-ms",
        type=int,
        default=int(proxy_defaults["ADMISSION_QUEUE_TIMEOUT_MS"]),
        help="its ADMISSION_QUEUE_TIMEOUT_MS",
    )
    parser.add_argument("--out", type=Path, default=Path("docs"))
    args = parser.parse_args(argv)
    args.overload_rate = args.overload_rate or 2 * args.saturating_rate
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args.work_dir.mkdir(parents=True, exist_ok=True)
    artifacts = offline.prepare_artifacts(args.data_dir, args.work_dir, args.run_dir)
    per_setting = int(CALM_RATE * (args.calm_s + args.recovery_s) + args.overload_rate * args.overload_s) + 1000
    bodies = request_bodies(Catalog(artifacts.index_dir), per_setting, seed=7)
    report: dict[str, Any] = {
        "machine": f"{os.cpu_count()} cores shared by load generator and servers",
        "data": str(args.data_dir or "synthetic"),
        "catalogue": artifacts.item_count,
        "saturating_rate": args.saturating_rate,
        "overload_rate": args.overload_rate,
        "overload_s": args.overload_s,
        "calm_s": args.calm_s,
        "window_s": args.window_s,
        "client_timeout_s": args.client_timeout_s,
        "settings": {},
    }
    for limit, target_ms in settings(args.max_in_flight, args.admission_target_ms):
        log.info("overload run: %s", setting_name(limit, target_ms))
        flags = ["--max-in-flight", str(limit), "--admission-target-ms", str(target_ms)]
        report["settings"][setting_name(limit, target_ms)] = run_setting(artifacts, flags, bodies, args)
    for in_flight in filter(None, args.proxy.split(",")):
        proxy = {
            "ADMISSION_MAX_IN_FLIGHT": in_flight,
            "ADMISSION_MAX_QUEUE": str(args.proxy_queue),
            "ADMISSION_QUEUE_TIMEOUT_MS": str(args.proxy_queue_timeout_ms),
        }
        name = f"HAProxy sidecar: {in_flight} in flight, queue {args.proxy_queue}, {args.proxy_queue_timeout_ms} ms"
        log.info("overload run: %s", name)
        report["settings"][name] = run_setting(artifacts, SIDECAR_BACKSTOP_ARGS, bodies, args, proxy)
    report["finished"] = time.strftime("%Y-%m-%d %H:%M")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "overload.json").write_text(json.dumps(report, indent=2) + "\n")
    text = markdown(report)
    (args.out / "overload.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
