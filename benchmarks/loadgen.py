"""Open-loop HTTP load generator: requests are sent on a fixed schedule, whatever the server does.

Latency is measured from each request's *scheduled* send time, so a server that falls behind is
charged for the queueing it causes (no coordinated omission). Bounded by request count; loopback only.

    python -m benchmarks.loadgen --url http://127.0.0.1:8080/v1/models/recommender:predict \
        --bodies bodies.jsonl --rate 100 --requests 1000 --out result.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path
from typing import Any, Awaitable, Callable, Sequence, TypeVar
from urllib.parse import urlparse

import numpy as np

from serving.http1 import KeepAliveClient

T = TypeVar("T")
JSON_HEADER = "Content-Type: application/json\r\n"
OK = 200
NO_ANSWER = 0  # a send's status when no HTTP answer came (timeout, connection error)


def summarise(
    latencies_s: list[float], errors: int, started: float, finished: float, rate: float, kinds: list[str] | None = None
) -> dict[str, Any]:
    """Latency percentiles over the run; with `kinds` (one per latency) also per request kind."""
    values = np.asarray(latencies_s) * 1000.0
    ok = len(values)
    by_kind = {}
    if kinds is not None:
        labels = np.asarray(kinds)
        for kind in sorted(set(kinds)):
            part = values[labels == kind]
            by_kind[kind] = {
                "requests": len(part),
                "p50_ms": float(np.percentile(part, 50)),
                "p99_ms": float(np.percentile(part, 99)),
            }
    return {
        **({"by_kind": by_kind} if kinds is not None else {}),
        "target_qps": rate,
        "achieved_qps": (ok + errors) / max(finished - started, 1e-9),
        "requests": ok + errors,
        "errors": errors,
        "p50_ms": float(np.percentile(values, 50)) if ok else float("nan"),
        "p95_ms": float(np.percentile(values, 95)) if ok else float("nan"),
        "p99_ms": float(np.percentile(values, 99)) if ok else float("nan"),
        "max_ms": float(values.max()) if ok else float("nan"),
        "mean_ms": float(values.mean()) if ok else float("nan"),
    }


def by_status(outcomes: dict[int, list[float]]) -> dict[str, dict[str, float]]:
    """Count and latency percentiles of each HTTP status (NO_ANSWER: count and time to give up)."""
    return {
        str(status): {
            "requests": len(seconds),
            "p50_ms": float(np.percentile(seconds, 50)) * 1000.0,
            "p99_ms": float(np.percentile(seconds, 99)) * 1000.0,
        }
        for status, seconds in sorted(outcomes.items())
    }


async def open_loop(
    items: Sequence[T],
    rate: float,
    send: Callable[[T], Awaitable[int]],
    warmup: int = 5,
    kinds: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Send item i at start + i/rate whatever happened before; latency counts from that scheduled time.
    `send` returns the HTTP status (NO_ANSWER when none came); latency percentiles are over the 200s, the
    rest are errors, each status with its own count and latency under "statuses" (a shed request's
    503 should come fast). `kinds` (one per item) adds percentiles per request kind."""
    latencies: list[float] = []
    answered: list[str] = []
    # How late the generator itself starts each send: on a busy machine its own event loop falls behind the
    # schedule, and that lag is in every latency it reports (a shed answer's included).
    send_lags: list[float] = []
    outcomes: dict[int, list[float]] = {}
    errors = 0

    async def one(item: T, scheduled: float, kind: str) -> None:
        nonlocal errors
        send_lags.append(time.perf_counter() - scheduled)
        status = await send(item)
        elapsed = time.perf_counter() - scheduled
        outcomes.setdefault(status, []).append(elapsed)
        if status == OK:
            latencies.append(elapsed)
            answered.append(kind)
        else:
            errors += 1

    for item in items[:warmup]:  # connection pools and first-call paths, outside the measurement
        await send(item)
    started = time.perf_counter()
    tasks = []
    for i, item in enumerate(items):
        scheduled = started + i / rate
        delay = scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(item, scheduled, kinds[i] if kinds is not None else "")))
    await asyncio.gather(*tasks)
    result = summarise(latencies, errors, started, time.perf_counter(), rate, answered if kinds is not None else None)
    lag_ms = np.asarray(send_lags) * 1000.0
    send_lag = {"p50_ms": float(np.percentile(lag_ms, 50)), "p99_ms": float(np.percentile(lag_ms, 99))}
    return {**result, "statuses": by_status(outcomes), "send_lag": send_lag}


async def run_open_loop(
    url: str, bodies: list[bytes], rate: float, timeout_s: float = 10.0, kinds: list[str] | None = None
) -> dict[str, Any]:
    parsed = urlparse(url)
    host = parsed.hostname or ""
    if not (host.startswith("127.") or host in {"localhost", "::1"}):
        raise ValueError(f"refusing to load {host}: the load generator only targets loopback addresses")
    path = (parsed.path or "/") + (f"?{parsed.query}" if parsed.query else "")
    # The keep-alive client the retriever uses for Triton: ~0.25 instead of aiohttp's ~0.75 ms of CPU
    # per request at 400 QPS (benchmarks/LEVERS.md), CPU the servers under test share on 2 cores.
    client = KeepAliveClient(url, limit=512, timeout_s=timeout_s)

    async def post(body: bytes) -> int:
        try:
            return (await client.request("POST", path, body, JSON_HEADER)).status
        except (OSError, ConnectionError, TimeoutError):
            return NO_ANSWER

    try:
        return await open_loop(bodies, rate, post, kinds=kinds)
    finally:
        client.close()


def request_kind(body: Any) -> str:
    """A v1 body's kind: its first instance's query field (customer_id, history, query, similar_to)."""
    try:
        instance = body["instances"][0]
        return next(k for k in ("customer_id", "history", "query", "similar_to") if k in instance)
    except (KeyError, IndexError, TypeError, StopIteration):
        return "other"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", required=True)
    parser.add_argument("--bodies", required=True, type=Path, help="JSON lines, one request body each (cycled)")
    parser.add_argument("--rate", type=float, required=True, help="requests per second")
    parser.add_argument("--requests", type=int, required=True)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--timeout-s", type=float, default=10.0, help="a request unanswered this long is given up")
    args = parser.parse_args(argv)
    lines = [line for line in args.bodies.read_text().splitlines() if line.strip()]
    pool = [line.encode() for line in lines]
    bodies = [pool[i % len(pool)] for i in range(args.requests)]
    pool_kinds = [request_kind(json.loads(line)) for line in lines]  # read before the run, not during it
    kinds = [pool_kinds[i % len(pool)] for i in range(args.requests)]
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    result = asyncio.run(run_open_loop(args.url, bodies, args.rate, args.timeout_s, kinds=kinds))
    args.out.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
