"""The KServe adapter: one kserve.Model whose hooks hand each request to the recommendation service.

preprocess   body (v1 dict / v2 InferRequest) -> ParsedRequest         (retriever/protocol.py)
predict      ParsedRequest -> RecommendationService.recommend          (retriever/service.py)
postprocess  recommendations -> v1 JSON or v2 InferResponse            (retriever/protocol.py)

Lifecycle only besides: load, readiness (a real tower inference), stop, and what a `--workers N`
process does after KServe unpickles the adapter into it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import Any, Callable

from kserve import InferRequest, Model
from kserve.errors import InvalidInput

from retriever import errors, metrics
from retriever.protocol import V2_INPUTS, V2_OUTPUTS, parse_v1, parse_v2, v1_response, v2_response
from retriever.queries import Query, Recommendation
from retriever.service import RecommendationService

DEFAULT_MODEL_NAME = "recommender"  # endpoint path: /v1/models/recommender:predict


@dataclasses.dataclass
class ParsedRequest:
    queries: list[Query]
    v2_request: InferRequest | None  # None for v1


@dataclasses.dataclass
class Results:
    request: ParsedRequest
    recommendations: list[Recommendation]


class KServeRecommender(Model):
    def __init__(
        self,
        name: str,
        service: RecommendationService,
        on_worker_start: Callable[["KServeRecommender"], None] | None = None,
    ):
        """`on_worker_start` runs in each `--workers N` process after unpickling (the wiring passes the
        step that adds the shop routes to that process's app); a module-level function, so it pickles."""
        super().__init__(name)
        self.service = service
        self.on_worker_start = on_worker_start

    def load(self, triton_wait_s: float = 60.0) -> bool:
        self.service.load(triton_wait_s)
        self.ready = True
        return self.ready

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.service.start_in_worker()
        if self.on_worker_start is not None:
            self.on_worker_start(self)

    async def healthy(self) -> bool:
        """KServe asks this on every request and probe."""
        return self.ready and await self.service.healthy()

    async def __call__(self, body: Any, headers: dict[str, str] | None = None, *args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return await super().__call__(body, headers, *args, **kwargs)
        except Exception as err:  # counted by the reason its HTTP answer will give (KServe's own 400s too)
            metrics.ERRORS.labels(errors.reason(err, (InvalidInput,))).inc()
            raise
        finally:
            metrics.STAGE["total"].observe(time.perf_counter() - started)

    def get_input_types(self) -> list[dict]:
        """GET /v2/models/<name>: the inputs a v2 request may carry (exactly one query kind, optional k)."""
        return V2_INPUTS

    def get_output_types(self) -> list[dict]:
        return V2_OUTPUTS

    def validate(self, payload: Any) -> Any:
        return payload  # preprocess has already validated everything

    async def preprocess(self, payload: Any, headers: dict[str, str] | None = None) -> ParsedRequest:
        with metrics.STAGE["parse"].time():
            if isinstance(payload, InferRequest):
                return ParsedRequest(parse_v2(payload, self.service.config), payload)
            return ParsedRequest(parse_v1(payload, self.service.config), None)

    async def predict(self, payload: ParsedRequest, headers: dict[str, str] | None = None, *args: Any) -> Results:
        return Results(payload, await self.service.recommend(payload.queries))

    async def postprocess(self, result: Results, headers: dict[str, str] | None = None, *args: Any) -> Any:
        request = result.request
        if request.v2_request is not None:
            return v2_response(self.name, request.v2_request, result.recommendations)
        return v1_response(request.queries, result.recommendations)

    def stop(self) -> None:
        try:
            asyncio.get_running_loop().create_task(self.service.close())
        except RuntimeError:  # no event loop left: no connection to close either
            self.service.slot.stop()
