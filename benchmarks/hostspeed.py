"""A fixed CPU workload, timed before and after a benchmark run, so runs from different days can be compared.

On this 2-core VM the same commit has needed ~35% more CPU per request on some evenings than on others,
in every process alike (load generator included) and with no CPU steal reported (benchmarks/LEVERS.md,
"host drift"): latency results are only comparable between runs with similar probe times.
"""

from __future__ import annotations

import json
import statistics
import time

import numpy as np


def _one_round() -> None:
    # Shaped like a request's own work: scoring a few hundred rows, dicts, a JSON round trip.
    rng = np.random.default_rng(0)
    items, user = rng.standard_normal((512, 64)).astype(np.float32), rng.standard_normal(64).astype(np.float32)
    for _ in range(200):
        scores = (items * user).sum(axis=1)  # not a BLAS call: its thread pool would make the probe noisy
        top = np.argsort(-scores)[:12].tolist()
        response = {"items": [{"row": r, "score": float(scores[r]), "name": f"article {r}"} for r in top]}
        json.loads(json.dumps(response))


def probe_ms(repeats: int = 7) -> float:
    """Median wall milliseconds of one round (lower is a faster host)."""
    _one_round()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        _one_round()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)
