"""Run the retriever as a KServe model server.

    python -m retriever --index-dir artifacts/index --predictor_host 127.0.0.1:8000 --http_port 8080

Beside KServe's v1/v2 API it serves the web-shop endpoints and page of retriever/shop_api.py.
KServe's own flags (--http_port, --workers, --model_name, ...) are accepted unchanged;
--predictor_host is Triton's HTTP address; --model_name defaults to "recommender" and gRPC is off
unless --enable_grpc true (the v1/v2 REST endpoints are the supported API). Ours are listed under RetrieverConfig and can also
be set as TWOTOWER_<FLAG> environment variables.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

# One BLAS thread, set before numpy loads OpenBLAS: its extra threads busy-wait after every product over
# a few hundred rows (the repeat boost's candidates), which cost ~9 ms of CPU per request at 100 QPS.
# The service gets its parallelism from concurrent requests, not from threads inside one.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import kserve  # noqa: E402
from kserve import model_server  # noqa: E402

from retriever.gpu_search import GpuUnavailable  # noqa: E402
from retriever.kserve_app import adjust_app, prepare_worker_metrics  # noqa: E402
from retriever.model import DEFAULT_MODEL_NAME, Recommender  # noqa: E402
from twotower.artifacts import ArtifactError  # noqa: E402
from twotower.config import RetrieverConfig, add_arguments, from_arguments  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, parents=[model_server.parser]
    )
    add_arguments(parser, RetrieverConfig)
    parser.add_argument("--triton-wait-s", type=float, default=60.0, help="how long load() waits for Triton")
    parser.set_defaults(model_name=DEFAULT_MODEL_NAME, enable_grpc=False)
    args, _ = parser.parse_known_args(argv)
    if not args.predictor_host:
        parser.error("--predictor_host (Triton's HTTP host:port) is required")
    config = from_arguments(RetrieverConfig, args)
    # Before KServe spawns the workers: they import prometheus_client afresh and inherit the directory.
    metrics_dir = prepare_worker_metrics(args.workers)
    logging.getLogger("retriever").setLevel(logging.INFO)  # index swaps and readiness changes are for operators
    model = Recommender(args.model_name, config, args.predictor_host)
    try:
        model.load(args.triton_wait_s)
    except (ArtifactError, OSError, GpuUnavailable, ValueError) as err:
        logging.getLogger("retriever").error("refusing to start: %s", err)
        print(f"error: refusing to start: {err}", file=sys.stderr)
        return 2
    if metrics_dir is not None:
        logging.getLogger("retriever").info("%d workers: /metrics sums their files in %s", args.workers, metrics_dir)
    # KServe serves its module-level FastAPI app: our routes and limits join its v1/v2 API
    # (with --workers N each worker process adds them again when it unpickles the model).
    adjust_app(model, config.kserve_timing)
    if args.event_loop in ("auto", "uvloop"):
        # KServe's single-process server runs under asyncio.run(), which ignores --event-loop: install it here.
        import asyncio

        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
        asyncio.set_event_loop(asyncio.new_event_loop())  # KServe asks for a current loop before asyncio.run()
    kserve.ModelServer(http_port=args.http_port, grpc_port=args.grpc_port, workers=args.workers,
                       enable_grpc=args.enable_grpc).start([model])
    return 0


if __name__ == "__main__":
    sys.exit(main())
