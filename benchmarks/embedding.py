"""Catalogue embedding throughput through Triton's item tower, by Triton instances and requests in flight.

    python -m benchmarks.embedding [--index-dir runs/bench/index --model-repository runs/bench/model_repository]

The exported item tower is served by the real Triton with 1 and then 2 instances (`instance_group` count,
one torch thread each: one instance per core here, as one replica per GPU in a cluster); captions of the
index's own catalogue are embedded with export.catalogue_update's `triton_embedder` (batches of 64,
`--concurrency` requests in flight), and in-process on one thread for reference. Writes docs/embedding.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.references import add_export_arguments, export_arguments
from export.catalogue_update import local_embedder, triton_embedder
from localtriton import TritonServer, TritonSettings
from serving.catalog import Catalog
from twotower import artifacts, triton_repository

log = logging.getLogger("benchmarks.embedding")


def captions_of(catalog: Catalog, n: int) -> list[str]:
    """The first n captions the item tower embedded for this index (kept beside its BM25 index: the same
    texts, lengths and words); an index exported before hybrid search has none, and gets caption-like
    texts joined from its columns (shorter than real captions: a flattering items/s)."""
    if catalog.lexical is not None:
        return catalog.lexical.captions[:n]
    columns = [c for c in ("prod_name", "product_type_name", "colour_group_name", "section_name") if c in catalog.items]
    return [" ".join(catalog.items[c][row] for c in columns) for row in range(min(n, catalog.items.rows))]


def repository_with_instances(source: Path, manifest: artifacts.Manifest, instances: int, out: Path) -> Path:
    """A copy of the repository (the client checks every tower the index names) whose item tower asks for
    `instances` instances."""
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(source, out)
    config = out / manifest.item_model / "config.pbtxt"
    text, count = re.subn(r"(instance_group \[\s*\{\s*count: )\d+", rf"\g<1>{instances}", config.read_text())
    if count != 1:
        raise ValueError(f"{config}: no instance_group count to set")
    # Repositories exported before the 2 s queue timeout (0.5 s) reject a second 64-caption batch queued
    # behind one that takes ~0.4 s on one thread: the timeout export writes now.
    timeout = triton_repository.TritonModelSpec.queue_timeout_us
    text = re.sub(r"default_timeout_microseconds: \d+", f"default_timeout_microseconds: {timeout}", text)
    config.write_text(text)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_export_arguments(parser)
    parser.add_argument("--captions", type=int, default=3072)
    parser.add_argument("--work-dir", type=Path, default=Path("runs/embedding"))
    parser.add_argument("--out", type=Path, default=Path("docs"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    index_dir, model_repository = export_arguments(args)
    catalog = Catalog(index_dir)
    manifest = catalog.manifest
    captions = captions_of(catalog, args.captions)
    rows: list[dict[str, Any]] = []

    torch.set_num_threads(1)  # as one Triton instance runs it
    started = time.perf_counter()
    local_embedder(model_repository, manifest)(captions[:512])
    rows.append({"where": "in-process TorchScript, 1 thread", "instances": 0, "concurrency": 1,
                 "items_per_s": 512 / (time.perf_counter() - started)})  # fmt: skip
    for instances in (1, 2):
        repository = repository_with_instances(
            model_repository, manifest, instances, args.work_dir / f"repository-{instances}"
        )
        settings = TritonSettings.on_free_ports(repository, args.work_dir / f"triton-{instances}")
        settings.state_dir.mkdir(parents=True, exist_ok=True)
        with TritonServer(settings):
            for concurrency in (1, 2 * instances):
                embed = triton_embedder(settings.http_url, manifest, concurrency=concurrency)
                embed(captions[:128])  # warm: the instances' first batches
                started = time.perf_counter()
                vectors = embed(captions)
                seconds = time.perf_counter() - started
                assert vectors.shape == (len(captions), manifest.dim)
                rows.append({"where": "Triton, batches of 64", "instances": instances, "concurrency": concurrency,
                             "items_per_s": len(captions) / seconds})  # fmt: skip
                log.info("%s", rows[-1])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "embedding.json").write_text(json.dumps({"captions": len(captions), "rows": rows}, indent=1))
    lines = [
        "# Catalogue embedding throughput",
        "",
        f"{len(captions):,} catalogue texts of {catalog.index_dir} through its exported item tower "
        f"({manifest.clip_model}), on this 2-core machine (one torch thread per Triton instance).",
        "",
        "| where | Triton instances | requests in flight | items/s |",
        "|---|---|---|---|",
        *(f"| {r['where']} | {r['instances'] or '-'} | {r['concurrency']} | {r['items_per_s']:.0f} |" for r in rows),
        "",
        "Command: `python -m benchmarks.embedding " + " ".join(argv or sys.argv[1:]) + "`",
        "",
    ]
    (args.out / "embedding.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
