"""Adjustments to KServe's FastAPI app, applied in every process that serves it.

With `--workers N` KServe spawns fresh worker processes that import its app again, so what the
launcher patched in its own process is gone there: `Recommender.__setstate__` (the model is
unpickled in each worker before the worker builds the app) applies the same adjustments.
"""

from __future__ import annotations

from typing import Any


class _Untimed:
    """Stands in for KServe's TimingMiddleware, which times every request for a log that is off by default."""

    def __init__(self, app: Any, **_: Any):
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self.app(scope, receive, send)


def disable_kserve_timing() -> None:
    from kserve.protocol.rest import server

    server.TimingMiddleware = _Untimed  # read when KServe builds its app (RESTServer.create_application)
