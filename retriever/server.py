"""The wiring: the one module that knows both the KServe adapter and the routes beside it.

    python -m retriever --index-dir artifacts/index --predictor_host 127.0.0.1:8000 --http_port 8080

Beside KServe's v1/v2 API it serves the web-shop endpoints and page of retriever/shop_api.py.
KServe's own flags (--http_port, --workers, --model_name, ...) are accepted unchanged;
--predictor_host is Triton's HTTP address; --model_name defaults to "recommender" and gRPC is off
unless --enable_grpc true (the v1/v2 REST endpoints are the supported API). Ours are listed under
RetrieverConfig and can also be set as TWOTOWER_<FLAG> environment variables.
"""

from __future__ import annotations

import argparse
import functools
import logging
import sys
from pathlib import Path

import kserve
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from kserve import model_server

from retriever import errors, kserve_app, metrics, shop_api
from retriever.index_slot import IndexSlot
from retriever.kserve_adapter import DEFAULT_MODEL_NAME, KServeRecommender
from retriever.limits import AdmissionLimit
from retriever.service import RecommendationService
from serving.gpu_search import GpuUnavailable
from serving.towers import TowerSource
from twotower.artifacts import ArtifactError
from twotower.config import RetrieverConfig, add_arguments, from_arguments

log = logging.getLogger("retriever")
OPERATOR_LOGGERS = ("retriever", "serving")


def build_recommender(
    config: RetrieverConfig, name: str = DEFAULT_MODEL_NAME, triton_url: str = "", local_repository: Path | None = None
) -> KServeRecommender:
    """The adapter over a service over an index slot whose towers are Triton's at `triton_url` or,
    with `local_repository`, the same TorchScript files in this process (no network)."""
    towers = TowerSource(triton_url, local_repository, config.triton_timeout_s, config.triton_retries)
    service = RecommendationService(config, IndexSlot(config, towers))
    return KServeRecommender(name, service, on_worker_start=prepare_app)


async def domain_error(request: Request, exc: Exception, retry_after_s: int = 1) -> JSONResponse:
    """Every domain error answered with its status from retriever/errors.py (KServe's own shape)."""
    status, reason = errors.classify(exc)
    log.warning("%s %s: %d %s: %s", request.method, request.url.path, status, reason, exc)
    # 503s pass (Triton down or shedding, no index yet): tell clients when to come back instead of now.
    retry = {"Retry-After": str(retry_after_s)} if status == 503 else None
    return JSONResponse(status_code=status, content={"error": errors.message(exc)}, headers=retry)


async def model_not_ready(request: Request, exc: Exception, retry_after_s: int = 1) -> JSONResponse:
    """KServe's readiness check said no (before each predict, or a readiness probe): answered as the service's
    NotReady; counted where it refused an API request (as retriever_api_requests_total counts them), not a probe."""
    if AdmissionLimit.limited(request.url.path):
        metrics.ERRORS.labels("not_ready").inc()
    not_ready = errors.NotReady(f"{str(exc).rstrip('.')}: {errors.NOT_SERVING}")
    return await domain_error(request, not_ready, retry_after_s)


def install_routes(app: FastAPI, service: RecommendationService) -> None:
    """The shop/admin routes and the domain-error handlers on an app (KServe's, or a test's)."""
    shop_api.install(app, service)
    handler = functools.partial(domain_error, retry_after_s=service.config.retry_after_s)
    for error in errors.DOMAIN_ERRORS:
        app.add_exception_handler(error, handler)


def configure_logging() -> None:
    """Our loggers (index swaps, readiness, refused requests) at INFO on stderr, in every serving process.
    KServe's logging config covers only its own and uvicorn's loggers; before, a root handler appeared only
    as a side effect of open_clip logging through the root logger on import."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(process)d %(name)s %(levelname)s: %(message)s"))
    for name in OPERATOR_LOGGERS:
        logger = logging.getLogger(name)
        if not logger.handlers:
            logger.addHandler(handler)
            logger.setLevel(logging.INFO)
            logger.propagate = False


def prepare_app(recommender: KServeRecommender) -> None:
    """Everything a serving process does to KServe's module-level app before KServe builds it: our
    routes and error handlers, the timing middleware off unless asked for, KServe's not-ready answer ours, and
    summed worker metrics."""
    configure_logging()
    install_routes(model_server.app, recommender.service)
    if not recommender.service.config.kserve_timing:
        kserve_app.disable_kserve_timing()
    kserve_app.answer_model_not_ready(
        functools.partial(model_not_ready, retry_after_s=recommender.service.config.retry_after_s)
    )
    kserve_app.expose_worker_metrics()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, parents=[model_server.parser]
    )
    add_arguments(parser, RetrieverConfig)
    parser.add_argument("--triton-wait-s", type=float, default=60.0, help="how long load() waits for Triton")
    # KServe's per-request latency line (preprocess/predict/postprocess ms) off unless asked for: the stage histograms
    # on /metrics carry the same, and it was every other line of the log (one beside each access-log line)
    parser.set_defaults(model_name=DEFAULT_MODEL_NAME, enable_grpc=False, enable_latency_logging=False)
    args = parser.parse_args(argv)  # an unknown or misspelt flag exits 2 naming it, never silently ignored
    if not args.predictor_host:
        parser.error("--predictor_host (Triton's HTTP host:port) is required")
    config = from_arguments(RetrieverConfig, args)
    # Before KServe spawns the workers: they import prometheus_client afresh and inherit the directory.
    metrics_dir = kserve_app.prepare_worker_metrics(args.workers)
    configure_logging()
    try:
        recommender = build_recommender(config, args.model_name, args.predictor_host)
        recommender.load(args.triton_wait_s)
    except (ArtifactError, OSError, GpuUnavailable, ValueError) as err:
        log.error("refusing to start: %s", err)
        print(f"error: refusing to start: {err}", file=sys.stderr)
        return 2
    if metrics_dir is not None:
        log.info("%d workers: /metrics sums their files in %s", args.workers, metrics_dir)
    # KServe serves its module-level FastAPI app: our routes and limits join its v1/v2 API
    # (with --workers N each worker process adds them again when it unpickles the adapter).
    prepare_app(recommender)
    if args.event_loop in ("auto", "uvloop"):
        # KServe's single-process server runs under asyncio.run(), which ignores --event-loop: install it here.
        import asyncio

        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
        asyncio.set_event_loop(asyncio.new_event_loop())  # KServe asks for a current loop before asyncio.run()
    kserve.ModelServer(
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        workers=args.workers,
        enable_grpc=args.enable_grpc,
        enable_latency_logging=args.enable_latency_logging,
    ).start([recommender])
    return 0
