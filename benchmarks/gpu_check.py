"""`make gpu-check`: the towers and the search on a GPU, as they would serve, with nothing from the network.

    python -m benchmarks.gpu_check [--index-dir runs/bench/index --model-repository runs/bench/model_repository]

Needs only PyTorch (CUDA build) and the exported artifacts; faiss is used when it imports. Without --index-dir it
measures make eval's export, else make bench's, and builds make bench's first where there is neither (a fresh
checkout; that needs the project's packages and ../shared/data or a synthetic shop, nothing from the network:
benchmarks.references). For CUDA
(when a GPU is visible) and the CPU in the same process, at batch 1, 16 and 64:
- each exported TorchScript tower (user, item, and the distilled query tower when the index names one)
  from the Triton model repository, the same model.pt files Triton's libtorch backend loads, with
  inputs of the shapes its config declares (real stored histories for the user tower);
- the search: the served FAISS index copied to the GPU when faiss has GPU support, else exact search in
  torch (one matmul + top-k over every item vector); on the CPU the served FAISS index itself.
Prints one table (p50 / p99 ms per call) and writes it as JSON with --out. The served path (Triton
container + KServe + faiss-gpu) is not run here: that needs the container images (make images).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from benchmarks.references import add_export_arguments, export_arguments
from serving.catalog import Catalog
from serving.gpu_search import why_not_gpu
from twotower import artifacts, triton_repository

BATCHES = (1, 16, 64)
QUERY_TOKENS = 8  # a short shopper query, then padding (to the context or, if variable, Triton's warm-up length)


def timed(call: Callable[[], Any], sync: Callable[[], None], repeats: int) -> dict[str, float]:
    for _ in range(5):
        call()
    sync()
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        sync()
        samples.append(1000 * (time.perf_counter() - started))
    return {"p50_ms": float(np.percentile(samples, 50)), "p99_ms": float(np.percentile(samples, 99))}


def tower_inputs(catalog: Catalog, batch: int, device: str) -> dict[str, tuple]:
    """Inputs per tower, shaped as Triton's config declares them: stored histories of known customers for
    the user tower, a short query's token ids (then padding) for the text towers."""
    customers = list(catalog.customer_row)[:batch]
    histories = [catalog.customer_history(c) for c in customers] or [(np.zeros(0, np.int64), np.zeros(0))]
    user = catalog.history_tensors((histories * batch)[:batch])
    length = catalog.manifest.context_length
    ids = torch.zeros(batch, length if length > 0 else triton_repository.WARMUP_LENGTH, dtype=torch.int64)
    ids[:, :QUERY_TOKENS] = torch.randint(1000, 2000, (batch, QUERY_TOKENS))
    return {"user": tuple(torch.from_numpy(t).to(device) for t in user), "text": (ids.to(device),)}


def searcher(catalog: Catalog, device: str, k: int = 100) -> tuple[str, Callable[[torch.Tensor], Any]]:
    """(what searches, search(queries [B, D] on `device`)): the served FAISS index on the CPU, its GPU copy
    where faiss can make one, else exact search in torch."""
    kind = catalog.manifest.index_type
    if device == "cpu":
        return f"faiss {kind} (served settings)", lambda q: catalog.search(q.numpy(), k)
    if catalog.gpu is not None:
        return f"faiss-gpu {kind}", lambda q: catalog.search(q.cpu().numpy(), k)
    items = torch.from_numpy(np.ascontiguousarray(catalog.vectors, dtype=np.float32)).to(device)
    return f"exact, torch matmul + topk ({why_not_gpu(catalog.index)})", lambda q: torch.topk(q @ items.T, k, dim=1)


def measure(device: str, index_dir: Path, repository: Path, repeats: int) -> dict[str, Any]:
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    catalog = Catalog(index_dir, lexical=False, faiss_gpu="auto" if device == "cuda" else "off")
    manifest = catalog.manifest
    models = {"user": manifest.user_model, "item": manifest.item_model}
    if manifest.query_model:
        models["query"] = manifest.query_model
    towers = {
        role: torch.jit.load(str(triton_repository.tower_file(repository, manifest, name)), map_location=device).eval()
        for role, name in models.items()
    }
    search_kind, search = searcher(catalog, device)
    rows: dict[str, Any] = {"search": search_kind}
    with torch.inference_mode():
        for batch in BATCHES:
            inputs = tower_inputs(catalog, batch, device)
            queries = torch.nn.functional.normalize(torch.randn(batch, manifest.dim, device=device), dim=-1)
            row = {}
            for role, tower in towers.items():
                args = inputs["user"] if role == "user" else inputs["text"]
                row[f"{role} tower"] = timed(lambda t=tower, a=args: t(*a), sync, repeats)
            row["search top-100"] = timed(lambda q=queries: search(q), sync, repeats)
            rows[str(batch)] = row
    return rows


def table(report: dict[str, Any]) -> str:
    devices = [d for d in ("cuda", "cpu") if d in report]
    columns = [c for c in report[devices[0]]["1"]]
    head = " | ".join(f"{c} {' / '.join(devices)} p50 (p99) ms" for c in columns)
    lines = [f"| batch | {head} |", "|---|" + "---|" * len(columns)]
    for batch in BATCHES:
        cells = [
            " / ".join(
                f"{report[d][str(batch)][c]['p50_ms']:.2f} ({report[d][str(batch)][c]['p99_ms']:.2f})" for d in devices
            )
            for c in columns
        ]
        lines.append(f"| {batch} | " + " | ".join(cells) + " |")
    searches = "; ".join(f"{d}: {report[d]['search']}" for d in devices)
    return "\n".join([f"{report['device']}; search: {searches}", "", *lines])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_export_arguments(parser)
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    index_root, repository = export_arguments(args)
    index_dir = artifacts.resolve_index_dir(index_root)
    report: dict[str, Any] = {"torch": torch.__version__, "threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        report["device"] = f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
        report["cuda"] = measure("cuda", index_dir, repository, args.repeats)
    else:
        report["device"] = f"no CUDA device visible (torch {torch.__version__}): CPU only"
    report["cpu"] = measure("cpu", index_dir, repository, max(3, args.repeats // 4))
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))
    print(table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
