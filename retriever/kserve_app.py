"""Adjustments to KServe's FastAPI app, applied in every process that serves it: no timing middleware, its
not-ready answer ours, and with several workers a /metrics that sums them all.

With `--workers N` KServe spawns fresh worker processes that import its app again, so what the
launcher patched in its own process is gone there: retriever/server.py applies these in the launcher
and again in each worker (the adapter is unpickled in each worker before the worker builds the app).
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

# Module level, not imported in the handler: FastAPI resolves its annotations in this module.
from starlette.requests import Request
from starlette.responses import Response


class _Untimed:
    """Stands in for KServe's TimingMiddleware, which times every request for a log that is off by default."""

    def __init__(self, app: Any, **_: Any):
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self.app(scope, receive, send)


def disable_kserve_timing() -> None:
    from kserve.protocol.rest import server

    server.TimingMiddleware = _Untimed  # read when KServe builds its app (RESTServer.create_application)


def answer_model_not_ready(handler: Any) -> None:
    """Have `handler` answer KServe's ModelNotReady, which its predict and infer endpoints raise before the model
    is called when its health check says no (the towers did not answer, or no index yet). KServe's own handler
    logged a traceback per request and answered without Retry-After, uncounted by the retriever's metrics."""
    from kserve.protocol.rest import server

    server.model_not_ready_handler = handler  # read when KServe builds its app, like TimingMiddleware


MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def prepare_worker_metrics(workers: int) -> Path | None:
    """With several workers, have prometheus_client keep every process's metrics in files that /metrics sums.

    KServe's workers share one listening socket, so a scrape reaches one of them at random: without
    this each scrape saw one worker's counters (rates jumped, stage means went negative). Must run
    before prometheus_client is imported; an operator's own directory is emptied (old processes'
    files would be summed too), one made here is removed at exit.
    """
    if workers <= 1:
        return None
    configured = os.environ.get(MULTIPROC_ENV)
    if configured:
        directory = Path(configured)
        directory.mkdir(parents=True, exist_ok=True)
        for stale in directory.glob("*.db"):
            stale.unlink()
    else:
        directory = Path(tempfile.mkdtemp(prefix="retriever-metrics-"))
        atexit.register(shutil.rmtree, directory, ignore_errors=True)
        os.environ[MULTIPROC_ENV] = str(directory)
    return directory


async def summed_metrics(request: Request) -> Response:
    """/metrics over every worker's files (prometheus_client's multiprocess collector)."""
    from prometheus_client import CollectorRegistry, exposition, multiprocess

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    encoder, content_type = exposition.choose_encoder(request.headers.get("accept"))
    return Response(content=encoder(registry), headers={"content-type": content_type})


def expose_worker_metrics() -> None:
    """Serve `summed_metrics` at /metrics (a no-op unless prepare_worker_metrics set the directory)."""
    if os.environ.get(MULTIPROC_ENV):
        from kserve.protocol.rest import server

        server.metrics_handler = summed_metrics  # read when KServe builds its app, like TimingMiddleware
