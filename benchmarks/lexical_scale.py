"""Hybrid text search's keyword half at catalogue scale: the BM25 index (serving.lexical) over 105k to 10M
captions, what each text query pays for it.

    python -m benchmarks.lexical_scale                          # 105,542 and 1M captions -> docs/lexical-scale.*
    python -m benchmarks.lexical_scale --sizes 10000000         # 10M: ~15 min, 16 GB peak (tokens as Python strings)

The captions are a trained index's own (`--reference`, default the `make eval` or `make bench` export:
H&M's article texts), drawn with replacement to each size, so the words and how many rows hold each one
are the real catalogue's, scaled; the queries are its articles' "<colour> <product type>" phrases. Per size,
with a fresh process for the serving side: build seconds (tokenize + index, as export does), files on disk,
the retriever's memory after loading the index, and one query's time, 1 thread, for what hybrid text search
adds to the dense search (serving.lexical.hybrid_rank: every row's BM25 score, then the 100 best rows among
those the request may return): p50 / p99, and the rows that matched any word. Then what a catalogue update pays
for it: 1,000 rows appended as a block (serving.lexical: the index loaded from its files, as an update loads its
parent, the block built and saved), where updates built the whole index again before; and whether a tenth more
rows appended so (the most before the next update rebuilds) ranks as an index built over all of them: the share of
queries whose top 12 have the rebuilt index's top-12 scores.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import logging
import multiprocessing
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.references import default_data_dir, existing_export
from retriever.heap import process_memory
from serving.lexical import MAX_APPENDED_SHARE, MAX_BLOCKS, LexicalIndex
from twotower import ranking

log = logging.getLogger("benchmarks.lexical_scale")
QUERIES = 300
ADDED = 1_000


def reference_texts(reference: Path, seed: int = 0) -> tuple[list[str], list[str]]:
    """The reference index's captions and QUERIES colour + type phrases of its articles."""
    from serving.catalog import Catalog

    catalog = Catalog(reference)
    if catalog.lexical is None:
        raise SystemExit(f"{reference}: the index has no keyword index (exported with --lexical false?)")
    rows = np.random.default_rng(seed).choice(len(catalog.lexical.captions), QUERIES, replace=False)
    colours, types = (catalog.items[name].take(rows) for name in ("colour_group_name", "product_type_name"))
    return catalog.lexical.captions, [f"{colour} {kind}".lower() for colour, kind in zip(colours, types)]


def data_texts(data_dir: Path, seed: int = 0) -> tuple[list[str], list[str]]:
    """The same from an H&M-schema articles file, as export captions them: no exported index needed."""
    from twotower.data.hm import build_captions, find_data_file, load_articles

    articles = load_articles(find_data_file(data_dir, "articles"))
    rows = np.random.default_rng(seed).choice(len(articles), QUERIES, replace=False)
    picked = articles.iloc[rows]
    queries = [f"{c} {t}".lower() for c, t in zip(picked["colour_group_name"], picked["product_type_name"])]
    return build_captions(articles), queries


def measure_loaded(directory: str, queries: list[str], mmap: bool) -> dict[str, Any]:
    """In a child process: load the index as the retriever does (`mmap`, or read into memory as it did
    before) and time each query's keyword part."""
    before = process_memory()
    started = time.perf_counter()
    lexical = LexicalIndex.load(Path(directory), mmap=mmap)
    load_s = time.perf_counter() - started
    allowed = np.ones(len(lexical), dtype=bool)
    seconds, matched = [], []
    for text in queries:
        started = time.perf_counter()
        scores = lexical.scores(text)
        lexical.search(text, ranking.HYBRID_DEPTH, allowed, scores)
        seconds.append(time.perf_counter() - started)
        matched.append(int(np.count_nonzero(scores)))
    loaded = process_memory()  # after the queries: the mapped pages they touched count as file
    return {
        "mmap": mmap,
        "load_s": load_s,
        "anon_mib": loaded["anon_mib"] - before["anon_mib"],
        "file_mib": loaded["file_mib"],
        "p50_ms": 1000 * float(np.percentile(seconds, 50)),
        "p99_ms": 1000 * float(np.percentile(seconds, 99)),
        "matched_share_p50": float(np.median(matched)) / len(lexical),
    }


def measure_addition(directory: Path, newest: list[str], queries: list[str], seed: int) -> dict[str, Any]:
    """An update's keyword index work for ADDED new rows (fewer in an index too small for a block of that many),
    and how a tenth more rows appended as MAX_BLOCKS blocks (the most before the next update builds it again) rank
    against an index built over all of them. The rows come from `newest`: captions the index was not drawn from."""
    rng = np.random.default_rng(seed)
    parent = LexicalIndex.load(directory)
    n = len(parent)
    added = [newest[i] for i in rng.integers(0, len(newest), min(ADDED, int(MAX_APPENDED_SHARE * n)))]
    block_dir = directory.with_name(directory.name + "-block")
    started = time.perf_counter()
    block = LexicalIndex.load(directory).appended(added).new_block()
    assert block is not None
    written = block.save(block_dir)
    add_s = time.perf_counter() - started
    block_mib = sum((block_dir / name).stat().st_size for name in written) / 2**20
    shutil.rmtree(block_dir)

    tenth = [newest[i] for i in rng.integers(0, len(newest), int(MAX_APPENDED_SHARE * n))]
    grown, blocks = parent, min(MAX_BLOCKS, len(tenth))
    for part in np.array_split(np.arange(len(tenth)), blocks):
        grown = grown.appended([tenth[i] for i in part])
    assert len(grown.segments) == blocks + 1
    started = time.perf_counter()
    rebuilt = LexicalIndex.build(parent.captions + tenth)
    rebuild_s = time.perf_counter() - started
    everything = np.ones(len(rebuilt), dtype=bool)
    same, overlap = 0, []
    for text in queries:
        truth = rebuilt.scores(text)
        ours, best = grown.search(text, 12, everything), rebuilt.search(text, 12, everything, truth)
        overlap.append(len(np.intersect1d(ours, best)) / max(len(best), 1))
        ours_scores, best_scores = np.sort(truth[ours]), np.sort(truth[best])
        same += len(ours) == len(best) and bool(np.allclose(ours_scores, best_scores, rtol=1e-4, atol=0.0))
    return {
        "added": len(added),
        "add_s": add_s,
        "block_mib": block_mib,
        "tenth_rebuild_s": rebuild_s,
        "tenth_top12_as_rebuilt": same / len(queries),
        "tenth_top12_overlap": float(np.mean(overlap)),
    }


def run(sizes: list[int], captions: list[str], queries: list[str], work: Path) -> list[dict[str, Any]]:
    rows = []
    spawn = multiprocessing.get_context("spawn")
    # The index is drawn from the older nine tenths of the captions (H&M numbers articles upwards: the end of the
    # file is its newest products), the rows an update adds from the newest tenth.
    older, newest = captions[: len(captions) - len(captions) // 10], captions[len(captions) - len(captions) // 10 :]
    for n in sizes:
        drawn = np.random.default_rng(n).integers(0, len(older), n)
        started = time.perf_counter()
        lexical = LexicalIndex.build([older[i] for i in drawn])
        build_s = time.perf_counter() - started
        directory = work / f"n{n}"
        shutil.rmtree(directory, ignore_errors=True)
        lexical.save(directory)
        del lexical
        disk_mib = sum(f.stat().st_size for f in directory.iterdir()) / 2**20
        addition = measure_addition(directory, newest, queries, seed=n)
        log.info("%d articles: %s", n, json.dumps(addition))
        for mmap in (True, False):  # served, then read into memory: the ratio within one run
            with concurrent.futures.ProcessPoolExecutor(1, mp_context=spawn) as child:
                measured = child.submit(measure_loaded, str(directory), queries, mmap).result()
            row = {"articles": n, "build_s": build_s, "disk_mib": disk_mib, **measured, **addition}
            log.info("%s", json.dumps(row))
            rows.append(row)
        shutil.rmtree(directory)
    return rows


def report(rows: list[dict[str, Any]], source: str, out: Path, command: str) -> str:
    out.mkdir(parents=True, exist_ok=True)
    (out / "lexical-scale.json").write_text(json.dumps({"reference": source, "rows": rows}, indent=1) + "\n")
    lines = [
        "# Hybrid text search's keyword index at scale",
        "",
        f"Captions of {source}, the older nine tenths by article id, drawn with replacement to each size; {QUERIES}"
        " of its articles' colour + type",
        "phrases as queries; one query at a time on 1 thread: every row's BM25 score and the best",
        f"{ranking.HYBRID_DEPTH} matching rows, the part of a hybrid text query the dense search does not pay.",
        "Memory of the process that loaded the index, after the queries: anon = its own (less what it held",
        "before loading), file = memory-mapped (the process's total, so the libraries' too). Each index is",
        "loaded twice, each time in a fresh process: mapped (as served) and read into memory.",
        "",
        "| articles | build s | on disk MiB | loaded | load s | anon MiB | file MiB | rows matching a word (median"
        " share) | keyword part p50 / p99 ms |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['articles']:,} | {r['build_s']:.0f} | {r['disk_mib']:.0f} | {'mapped' if r['mmap'] else 'read'} "
            f"| {r['load_s']:.1f} | {r['anon_mib']:.0f} | {r['file_mib']:.0f} | {r['matched_share_p50']:.1%} "
            f"| {r['p50_ms']:.2f} / {r['p99_ms']:.2f} |"
        )
    lines += [
        "",
        "A catalogue update's keyword index: rows of the newest tenth of the captions appended as a block (the",
        "parent loaded from its files, the block built and saved), where updates built the index again with them",
        "before; then a tenth more rows appended as 8 blocks, the most before an update builds it again, against an",
        "index built over all of them, over the same queries: the share of queries whose top 12 have the rebuilt",
        "index's top-12 scores (the rows may differ where scores tie), and the share of the same rows.",
        "",
        "| articles | rows added | as a block: s / MiB | a tenth more, built again: s | a tenth more in 8 blocks:"
        " top 12 with the scores of the rebuilt index's / the same rows |",
        "|---|---|---|---|---|",
    ]
    for r in (r for r in rows if r["mmap"]):
        lines.append(
            f"| {r['articles']:,} | {r['added']:,} | {r['add_s']:.2f} / {r['block_mib']:.1f} | "
            f"{r['tenth_rebuild_s']:.0f} | {r['tenth_top12_as_rebuilt']:.1%} / {r['tenth_top12_overlap']:.1%} |"
        )
    lines += ["", f"Command: `{command}`", ""]
    text = "\n".join(lines)
    (out / "lexical-scale.md").write_text(text)
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="105542,1000000", help="comma-separated article counts")
    parser.add_argument("--reference", type=Path, default=None, help="index root whose captions to draw from")
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="or an H&M-schema data directory's articles (without a reference: the H&M data beside this checkout)",
    )
    parser.add_argument("--work-dir", type=Path, default=Path("runs/lexical-scale"))
    parser.add_argument("--out", type=Path, default=Path("docs"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    reference = args.data_dir or args.reference or existing_export()
    if reference is None:  # a clean checkout: the H&M captions themselves, where they are
        args.data_dir = reference = default_data_dir()
    if reference is None:
        parser.error("no --reference, no --data-dir and no make eval / make bench export to draw captions from")
    captions, queries = data_texts(reference) if args.data_dir else reference_texts(reference)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    rows = run([int(s) for s in args.sizes.split(",")], captions, queries, args.work_dir)
    command = "python -m benchmarks.lexical_scale " + " ".join(argv or sys.argv[1:])
    print(report(rows, str(reference), args.out, command))
    return 0


if __name__ == "__main__":
    sys.exit(main())
