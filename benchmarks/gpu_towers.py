"""Tower and search latency on a GPU with plain PyTorch (no Triton/KServe/FAISS needed on the machine).

    python benchmarks/gpu_towers.py --repository runs/bench/model_repository --vectors runs/bench/index/vectors.npy \
        --version 1 --out gpu.json

Runs the exported TorchScript towers and an exact top-k search (one matmul + topk over all item
vectors) on CUDA and, in the same process, on the CPU, at batch sizes 1, 8 and 64.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch


def timed(fn, sync, repeats: int) -> dict[str, float]:
    for _ in range(10):
        fn()
    sync()
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        sync()
        samples.append((time.perf_counter() - started) * 1000)
    return {"p50_ms": float(np.percentile(samples, 50)), "p99_ms": float(np.percentile(samples, 99))}


def measure(device: str, repository: Path, version: str, vectors: np.ndarray, repeats: int) -> dict:
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    user = torch.jit.load(str(repository / "user_tower" / version / "model.pt"), map_location=device).eval()
    item = torch.jit.load(str(repository / "item_tower" / version / "model.pt"), map_location=device).eval()
    items = torch.from_numpy(vectors).to(device)
    length, dim = 20, vectors.shape[1]
    results = {}
    with torch.inference_mode():
        for batch in (1, 8, 64):
            history = torch.randn(batch, length, dim, device=device)
            mask = torch.ones(batch, length, device=device)
            age = torch.zeros(batch, length, device=device)
            ids = torch.randint(1, 40000, (batch, 77), device=device)
            ids[:, 20] = 49407  # end-of-text token
            queries = torch.nn.functional.normalize(torch.randn(batch, dim, device=device), dim=-1)
            results[str(batch)] = {  # each timed() call runs its lambda before the loop moves on
                "user_tower": timed(lambda: user(history, mask, age), sync, repeats),  # noqa: B023
                "item_tower": timed(lambda: item(ids), sync, repeats),  # noqa: B023
                "exact_top12_search": timed(lambda: torch.topk(queries @ items.T, 12, dim=1), sync, repeats),  # noqa: B023
            }
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repository", type=Path, required=True)
    parser.add_argument("--vectors", type=Path, required=True)
    parser.add_argument("--version", default="1")
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    vectors = np.load(args.vectors)
    report = {
        "torch": torch.__version__,
        "items": int(len(vectors)),
        "dim": int(vectors.shape[1]),
        "threads": torch.get_num_threads(),
    }
    if torch.cuda.is_available():
        report["gpu"] = torch.cuda.get_device_name(0)
        report["cuda"] = measure("cuda", args.repository, args.version, vectors, args.repeats)
    report["cpu"] = measure("cpu", args.repository, args.version, vectors, args.repeats // 4)
    args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
