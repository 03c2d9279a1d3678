"""Evaluation outputs: JSON (machine-readable), a markdown table, a PNG bar chart."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from evaluation.text_search import QUERIES_PER_KIND
from twotower.reporting import write_bundle

TABLE_METRICS = ("recall@12", "map@12", "ndcg@12", "recall@100", "coverage@12", "cold_recall@100", "hr@10_sampled100")


def write_reports(out_dir: Path, result: dict[str, Any]) -> list[Path]:
    return write_bundle(out_dir, "eval", result, markdown, bar_chart)


def markdown(result: dict[str, Any]) -> str:
    lines = [
        f"# Evaluation: {result['data']}",
        "",
        f"Temporal split: {result['split']}. Candidates: all {result['catalogue_size']:,} articles. "
        f"{result['cold_cases']} customers bought at least one cold article (never bought before the cutoff).",
        f"Model: {result['model']}.",
        "",
        "| ranker | " + " | ".join(TABLE_METRICS) + " |",
        "|---|" + "---|" * len(TABLE_METRICS),
    ]
    for name, metrics in result["rankers"].items():
        lines.append(f"| {name} | " + " | ".join(f"{metrics[m]:.4f}" for m in TABLE_METRICS) + " |")
    lines += [
        "",
        f"Best baseline by recall@100: **{result['best_baseline']}**. "
        f"ANN recall of the served index vs exact search (top-100 overlap): {result['ann_recall_at_100']:.4f}.",
        "",
    ]
    if "targets" in result:
        lines += [
            f"Targets (served ranker **{result['served']}** against the best baseline on the same cases; a paired",
            "bootstrap 95% interval of the difference, 2,000 resamples of the cases: met only when the interval",
            "excludes a loss, a tie when it holds zero; evaluation/intervals.py):",
            "",
        ]
        lines += [f"- {name}: {target_line(target)}" for name, target in result["targets"].items()]
        lines.append("")
    if "target_breakdown" in result:
        served, best = result["served"], result["best_baseline"]
        lines += [
            "Where the targets are, and how much of each kind the served ranker and the best baseline find in their",
            "top 100 (each case's targets weigh 1 / their count, averaged over cases: the shares sum to 1, a ranker's",
            "column to its recall@100; a target counts in the first row that holds it; evaluation/breakdown.py):",
            "",
            f"| target | share of targets | found by {served} | found by {best} |",
            "|---|---|---|---|",
        ]
        for category, part in result["target_breakdown"].items():
            lines.append(f"| {category} | {part['share']:.4f} | {part[served]:.4f} | {part[best]:.4f} |")
        lines.append("")
    lines += text_search_lines(result.get("text_search") or {})
    lines += [
        "`hr@10_sampled100` is the classic leave-one-out protocol (one held-out purchase ranked against 100",
        "random articles) reported so the numbers can be set beside published ones; it is a much easier",
        "protocol than full-catalogue ranking and flatters every model. The two-tower rows score it by the first",
        "stage (cosine + prior + boost): the second stage re-orders a list's candidates, not sampled pairs.",
        "",
        f"Command: `{result['command']}`",
        "",
    ]
    return "\n".join(lines)


def text_search_lines(text: dict[str, Any]) -> list[str]:
    """The text-search section (evaluation/text_search.py); none for indexes without a BM25 index."""
    if not text:
        return []
    first = next(iter(text["kinds"].values()), {})
    retrievers = [name for name, value in first.items() if isinstance(value, dict)]
    headings = {"dense": "dense (--text-search dense)", "hybrid": "hybrid (served by default)"}
    lines = [
        f"## Text search (top {text['k']}, through the exported query tower and the index's BM25 index)",
        "",
        "Queries made from the catalogue's own attributes: every combination that at least 2 articles share, "
        f"a random {QUERIES_PER_KIND:,} where a kind has more; an article is relevant when it has them all. "
        "Columns marked 'item tower' run the item tower the served query tower was distilled from.",
        "",
        "| queries | count | e.g. | "
        + " | ".join(f"{headings.get(name, name)} p@12 / ndcg@12" for name in retrievers)
        + " |",
        "|---|---|---|" + "---|" * len(retrievers),
    ]
    for kind, part in text["kinds"].items():
        cells = " | ".join(f"{part[r]['precision@12']:.3f} / {part[r]['ndcg@12']:.3f}" for r in retrievers)
        lines.append(f"| {kind} | {part['queries']} | {', '.join(part['examples'][:2])} | {cells} |")
    lines += ["", "Targets (colour + type queries, paired bootstrap over the queries):", ""]
    lines += [f"- {name}: {target_line(target)}" for name, target in text["targets"].items()]
    return lines + [""]


def target_line(target: Any) -> str:
    """One target's verdict; reports written before intervals hold a bare true/false."""
    if isinstance(target, bool):
        return "met" if target else "NOT met"
    line = f"{target['verdict']} ({target['difference']:+.4f}"
    if "interval" in target:
        low, high = target["interval"]
        line += f", 95% interval {low:+.4f} .. {high:+.4f}"
    return line + ")"


def bar_chart(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = ("recall@12", "map@12", "ndcg@12", "recall@100", "cold_recall@100")
    names = list(result["rankers"])
    figure, axis = plt.subplots(figsize=(11, 5))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        values = [result["rankers"][name][m] for m in metrics]
        axis.bar([x + i * width for x in range(len(metrics))], values, width, label=name)
    axis.set_xticks([x + 0.4 - width / 2 for x in range(len(metrics))], metrics)
    axis.set_ylabel("score")
    axis.set_title(f"{result['data']}: {result['split']}")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
