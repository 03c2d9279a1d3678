"""The adjustments made to KServe's app (in the launcher and again in each --workers process)."""

from __future__ import annotations

import asyncio

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
