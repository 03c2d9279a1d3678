"""The adjustments made to KServe's app (in the launcher and again in each --workers process)."""

from __future__ import annotations

import asyncio
import os

import pytest

from retriever.kserve_app import _Untimed, disable_kserve_timing


def test_disable_kserve_timing_swaps_the_middleware_kserve_builds_its_app_with(monkeypatch: pytest.MonkeyPatch) -> None:
    from kserve.protocol.rest import server

    monkeypatch.setattr(server, "TimingMiddleware", server.TimingMiddleware)  # restored after the test
    disable_kserve_timing()
    assert server.TimingMiddleware is _Untimed

    calls = []

    async def app(scope: dict, receive: object, send: object) -> None:
        calls.append(scope["path"])

    asyncio.run(_Untimed(app, client=None, metric_namer=None)({"path": "/v1/models/x:predict"}, None, None))
    assert calls == ["/v1/models/x:predict"]  # passes every request through untouched


def test_worker_metrics_directory_only_with_several_workers(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    from kserve.protocol.rest import server

    from retriever.kserve_app import MULTIPROC_ENV, expose_worker_metrics, prepare_worker_metrics, summed_metrics

    monkeypatch.delenv(MULTIPROC_ENV, raising=False)
    monkeypatch.setattr(server, "metrics_handler", server.metrics_handler)  # restored after the test
    kserves = server.metrics_handler
    assert prepare_worker_metrics(1) is None and MULTIPROC_ENV not in os.environ
    expose_worker_metrics()
    assert server.metrics_handler is kserves  # one process: KServe's own /metrics

    operators = tmp_path / "metrics"
    operators.mkdir()
    (operators / "counter_123.db").write_bytes(b"from a previous run")
    (operators / "keep.txt").write_text("not ours")
    monkeypatch.setenv(MULTIPROC_ENV, str(operators))
    assert prepare_worker_metrics(2) == operators
    assert sorted(p.name for p in operators.iterdir()) == ["keep.txt"]  # stale values would be summed in
    expose_worker_metrics()
    assert server.metrics_handler is summed_metrics
