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
import re
import time
from pathlib import Path
from typing import Any, Awaitable, Callable, Sequence, TypeVar
from urllib.parse import urlparse

import numpy as np

T = TypeVar("T")
_STATUS = re.compile(rb"http/1\.[01] (\d{3})")
_CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:[ \t]*(\d+)")


def summarise(latencies_s: list[float], errors: int, started: float, finished: float, rate: float) -> dict[str, Any]:
    values = np.asarray(latencies_s) * 1000.0
    ok = len(values)
    return {
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


async def open_loop(items: Sequence[T], rate: float, send: Callable[[T], Awaitable[bool]], warmup: int = 5) -> dict[str, Any]:
    """Send item i at start + i/rate whatever happened before; latency counts from that scheduled time."""
    latencies: list[float] = []
    errors = 0

    async def one(item: T, scheduled: float) -> None:
        nonlocal errors
        if await send(item):
            latencies.append(time.perf_counter() - scheduled)
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
        tasks.append(asyncio.create_task(one(item, scheduled)))
    await asyncio.gather(*tasks)
    return summarise(latencies, errors, started, time.perf_counter(), rate)


class _Connection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection that reads responses framed by Content-Length.

    The load generator shares the 2 cores with the servers it measures, so it speaks just enough
    HTTP for KServe's answers: no chunked bodies, no redirects, one request in flight per connection.
    """

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.response_size = -1  # header + body bytes of the response being read, once its header is in
        self.status = 0
        self.reusable = True
        self.waiter: asyncio.Future[int] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def request(self, payload: bytes) -> asyncio.Future[int]:
        assert self.transport is not None
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(payload)
        return self.waiter

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if self.response_size < 0:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self.buffer[:end]).lower()
            status, length = _STATUS.match(head), _CONTENT_LENGTH.search(head)
            if status is None or length is None:
                self.fail(ConnectionError(f"response without a status line or Content-Length: {head[:200]!r}"))
                return
            self.status = int(status.group(1))
            self.reusable = b"connection: close" not in head
            self.response_size = end + 4 + int(length.group(1))
        if len(self.buffer) >= self.response_size:
            del self.buffer[: self.response_size]
            self.response_size = -1
            if self.waiter is not None and not self.waiter.done():
                self.waiter.set_result(self.status)

    def fail(self, error: Exception) -> None:
        self.reusable = False
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(error)
        if self.transport is not None:
            self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self.reusable = False
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(exc or ConnectionError("server closed the connection"))


class KeepAlivePoster:
    """POSTs JSON bodies to one URL over a pool of reused connections (opened on demand, up to `limit`).

    Replaces aiohttp here: ~0.25 instead of ~0.75 ms of CPU per request at 400 QPS (benchmarks/LEVERS.md),
    CPU that the servers under test lacked on a 2-core machine.
    """

    def __init__(self, url: str, limit: int = 512, timeout_s: float = 10.0):
        parsed = urlparse(url)
        if parsed.scheme != "http" or not parsed.hostname:
            raise ValueError(f"{url}: the load generator speaks plain http:// only")
        self.host, self.port = parsed.hostname, parsed.port or 80
        path = (parsed.path or "/") + (f"?{parsed.query}" if parsed.query else "")
        self.head = (f"POST {path} HTTP/1.1\r\nHost: {parsed.netloc}\r\nContent-Type: application/json\r\n"
                     "Content-Length: ").encode()
        self.idle: list[_Connection] = []
        self.slots = asyncio.Semaphore(limit)
        self.timeout_s = timeout_s

    async def post(self, body: bytes) -> bool:
        """True when the server answered 200 within the timeout."""
        loop = asyncio.get_running_loop()
        async with self.slots:
            connection = None
            while self.idle and connection is None:  # the server may have closed an idle one (keep-alive timeout)
                candidate = self.idle.pop()
                if candidate.reusable and candidate.transport is not None and not candidate.transport.is_closing():
                    connection = candidate
            try:
                if connection is None:
                    _, connection = await loop.create_connection(_Connection, self.host, self.port)
                waiter = connection.request(self.head + str(len(body)).encode() + b"\r\n\r\n" + body)
                timer = loop.call_later(self.timeout_s, connection.fail, TimeoutError("no answer in time"))
                try:
                    status = await waiter
                finally:
                    timer.cancel()
            except (OSError, ConnectionError, TimeoutError):
                return False
            if connection.reusable:
                self.idle.append(connection)
            elif connection.transport is not None:
                connection.transport.close()
            return status == 200

    def close(self) -> None:
        for connection in self.idle:
            if connection.transport is not None:
                connection.transport.close()
        self.idle.clear()


async def run_open_loop(url: str, bodies: list[bytes], rate: float, timeout_s: float = 10.0) -> dict[str, Any]:
    host = urlparse(url).hostname or ""
    if not (host.startswith("127.") or host in {"localhost", "::1"}):
        raise ValueError(f"refusing to load {host}: the load generator only targets loopback addresses")
    poster = KeepAlivePoster(url, timeout_s=timeout_s)
    try:
        return await open_loop(bodies, rate, poster.post)
    finally:
        poster.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", required=True)
    parser.add_argument("--bodies", required=True, type=Path, help="JSON lines, one request body each (cycled)")
    parser.add_argument("--rate", type=float, required=True, help="requests per second")
    parser.add_argument("--requests", type=int, required=True)
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args(argv)
    pool = [line.encode() for line in args.bodies.read_text().splitlines() if line.strip()]
    bodies = [pool[i % len(pool)] for i in range(args.requests)]
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    result = asyncio.run(run_open_loop(args.url, bodies, args.rate))
    args.out.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
