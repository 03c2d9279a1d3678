"""Prometheus metrics added to KServe's own on the retriever's /metrics.

Gauges say how to combine workers (`multiprocess_mode`, used only with --workers N, see
retriever/kserve_app.py): the latest value any worker set, or the sum of per-worker state.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

# Fine buckets at the low end: the latency targets are single-digit milliseconds.
LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.002,
    0.003,
    0.005,
    0.0075,
    0.01,
    0.015,
    0.02,
    0.03,
    0.05,
    0.075,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
)

STAGE_SECONDS = Histogram(
    "retriever_stage_seconds",
    "Time per request stage: parse, tokenize, triton (tower call), search (FAISS), total",
    ["stage"],
    buckets=LATENCY_BUCKETS,
)
# Children bound once: labels() takes a lock and a dict lookup, several times per request.
STAGE = {stage: STAGE_SECONDS.labels(stage) for stage in ("parse", "tokenize", "triton", "search", "total")}
REQUESTS = Counter("retriever_requests_total", "Recommendation queries served, by kind", ["kind"])
ERRORS = Counter("retriever_errors_total", "Failed requests, by reason", ["reason"])
# The error-rate alert's denominator: every request to an API path, refused ones included (the numerator
# counts refusals: a stage histogram only sees the requests that got in).
RECEIVED = Counter("retriever_api_requests_total", "Requests to the v1/v2 predict and shop API paths, admitted or not")
SECOND_STAGE_SHED = Counter(
    "retriever_second_stage_shed_total", "Lists ranked without the second stage because the process was overloaded"
)
ADMISSION_LIMIT = Gauge(
    "retriever_admission_limit",
    "Requests this process admits at once now (max_in_flight at normal load, lower while requests are slow)",
    multiprocess_mode="livesum",
)
INDEX_INFO = Gauge(
    "retriever_index_items", "Items in the loaded index", ["model_version"], multiprocess_mode="mostrecent"
)
TOWERS_HEALTHY = Gauge(
    "retriever_towers_healthy",
    "1 while a real tower inference succeeds (readiness), else 0",
    multiprocess_mode="mostrecent",
)
CACHE_LOOKUPS = Counter(
    "retriever_cache_lookups_total", "Vector cache lookups, by cache and result", ["cache", "result"]
)
INDEX_RELOADS = Counter(
    "retriever_index_reloads_total", "Index version swaps attempted, by result (swapped, refused, failed)", ["result"]
)
INDEX_VERSION = Gauge(
    "retriever_index_version_info",
    "1 for the index version being served",
    ["index_version", "model_version"],
    multiprocess_mode="mostrecent",
)
PURCHASE_STORE_ERRORS = Counter(
    "retriever_purchase_store_errors_total",
    "Failed calls to the shared purchase store (Redis), by operation; reads fall back to the index's histories",
    ["operation"],
)
LIVE_CUSTOMERS = Gauge(
    "retriever_live_customers",
    "Customers with purchases posted since start (kept in memory, per worker)",
    multiprocess_mode="livesum",
)
