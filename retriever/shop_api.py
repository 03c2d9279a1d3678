"""HTTP endpoints a web shop needs, beside KServe's v1/v2 predict API on the same server.

Transport only: each endpoint builds a `Query` (the same one the v1 API parses) or reads what it
needs from the RecommendationService it is built with, so both APIs share one semantics. FastAPI
documents them at /docs (/openapi.json).

    GET  /shop/                                        the demo page (static HTML + JS)
    GET  /shop/api/search?q=black+dress&k=12           text search through the CLIP text tower
    GET  /shop/api/articles/{id}                       metadata, image URL, availability
    GET  /shop/api/articles/{id}/similar?k=12          "more like this", from the article's vector
    GET  /shop/api/articles/{id}/vector                the indexed vector (debugging, A/B tools)
    GET  /shop/api/customers?limit=20                  sample known customers (for the page)
    GET  /shop/api/customers/{id}/recommendations      with filters, exclude_purchased, diversity cap
    GET  /shop/api/customers/{id}/history              what the service knows they bought
    POST /shop/api/customers/{id}/purchases            {"article_ids": [...]}: counts from the next request
    GET  /shop/api/customers/{id}/vector               the user-tower vector
    GET  /ready                                        the readiness probe: 503 while not ready or out of rotation
    GET  /admin/index                                  the index version being served
    POST /admin/index/reload                           swap to the index root's CURRENT version now
Filters are query parameters: product_group, product_type, index, colour, section, garment_group
(repeatable), price_min, price_max.
"""

from __future__ import annotations

import dataclasses
import hmac
import time
from importlib import resources
from typing import Annotated, Any, Callable, Coroutine

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi import Query as Param
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.routing import APIRoute
from pydantic import BaseModel, Field

from retriever import errors, metrics
from retriever.errors import Forbidden, RequestError, Unauthorized
from retriever.limits import AdaptiveLimit, AdmissionLimit, BodySizeLimit
from retriever.protocol import v1_response
from retriever.queries import Query, QueryOptions
from retriever.service import RecommendationService
from serving.filters import FilterError, Filters

PAGE = "shop.html"


class Purchases(BaseModel):
    article_ids: list[str] = Field(min_length=1, max_length=1000, description="bought articles, oldest first")


FilterParam = Annotated[list[str] | None, Param()]
K = Annotated[int | None, Param(ge=1, le=1000)]
Cap = Annotated[int | None, Param(ge=1, description="at most this many articles of one product type")]


def filter_params(
    product_group: FilterParam = None,
    product_type: FilterParam = None,
    index: FilterParam = None,
    colour: FilterParam = None,
    section: FilterParam = None,
    garment_group: FilterParam = None,
    price_min: float | None = None,
    price_max: float | None = None,
) -> Filters:
    """Filters from query parameters (category ones repeatable: ?colour=Black&colour=White)."""
    given = {
        "product_group": product_group,
        "product_type": product_type,
        "index": index,
        "colour": colour,
        "section": section,
        "garment_group": garment_group,
        "price_min": price_min,
        "price_max": price_max,
    }
    try:
        return Filters.parse({k: v for k, v in given.items() if v is not None}, "filters")
    except FilterError as err:
        raise RequestError(str(err)) from err


FilterQuery = Annotated[Filters, Depends(filter_params)]


class CountedRoute(APIRoute):
    """A route whose failures (validation, domain errors, bugs) are counted in retriever_errors_total by
    reason, as the KServe adapter counts the predict API's."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def counted(request: Request) -> Response:
            try:
                return await handler(request)
            except Exception as err:
                metrics.ERRORS.labels(errors.reason(err, (RequestValidationError,))).inc()
                raise

        return counted


def bearer_token_check(expected: bytes) -> Callable[[Request], None]:
    """A dependency: the request carries `Authorization: Bearer <expected>` (401 without one, 403 with
    another; compared in constant time). Nothing to check when `expected` is empty."""

    def check(request: Request) -> None:
        if not expected:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise Unauthorized("this endpoint needs an 'Authorization: Bearer <token>' header")
        if not hmac.compare_digest(token.strip().encode(), expected):
            raise Forbidden("the bearer token is not the one this endpoint accepts")

    return check


def build_router(service: RecommendationService) -> APIRouter:
    router = APIRouter(route_class=CountedRoute)
    protected = Depends(bearer_token_check(service.admin_token))  # writes and admin: the shop backend, operators

    async def run(query: Query) -> dict[str, Any]:
        started = time.perf_counter()
        try:
            results = await service.recommend([query])
        finally:
            metrics.STAGE["total"].observe(time.perf_counter() - started)
        return v1_response([query], results)["predictions"][0]

    def options(
        k: int | None, filters: Filters, exclude_purchased: bool = False, max_per_product_type: int | None = None
    ) -> tuple[int, QueryOptions]:
        return k or service.config.top_k, QueryOptions(filters, exclude_purchased, max_per_product_type)

    page_html = resources.files("retriever.static").joinpath(PAGE).read_text()  # static: read once

    @router.get("/shop/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> str:
        return page_html

    @router.get("/shop/api/search", tags=["shop"])
    async def search(
        q: Annotated[str, Param(min_length=1, max_length=2000)],
        filters: FilterQuery,
        k: K = None,
        max_per_product_type: Cap = None,
        debug: bool = False,
    ) -> dict[str, Any]:
        """Hybrid text search (BM25 + the item tower, fused by reciprocal rank); `debug` says which found each item."""
        if not q.strip():
            raise RequestError("q: empty query text")
        top, opts = options(k, filters, max_per_product_type=max_per_product_type)
        return await run(Query("query", q.strip(), top, dataclasses.replace(opts, debug=debug)))

    @router.get("/shop/api/articles/{article_id}", tags=["shop"])
    async def article(article_id: str) -> dict[str, Any]:
        return service.article(article_id)

    @router.get("/shop/api/articles/{article_id}/similar", tags=["shop"])
    async def similar(
        article_id: str, filters: FilterQuery, k: K = None, max_per_product_type: Cap = None
    ) -> dict[str, Any]:
        top, opts = options(k, filters, max_per_product_type=max_per_product_type)
        return await run(Query("similar_to", article_id, top, opts))

    @router.get("/shop/api/articles/{article_id}/vector", tags=["debug"])
    async def article_vector(article_id: str) -> dict[str, Any]:
        return service.article_vector(article_id)

    @router.get("/shop/api/customers", tags=["shop"])
    async def customers(limit: Annotated[int, Param(ge=1, le=1000)] = 20) -> dict[str, Any]:
        return service.customers(limit)

    @router.get("/shop/api/customers/{customer_id}/recommendations", tags=["shop"])
    async def recommendations(
        customer_id: str,
        filters: FilterQuery,
        k: K = None,
        exclude_purchased: bool = False,
        max_per_product_type: Cap = None,
    ) -> dict[str, Any]:
        top, opts = options(k, filters, exclude_purchased, max_per_product_type)
        return await run(Query("customer_id", customer_id, top, opts))

    @router.get("/shop/api/customers/{customer_id}/history", tags=["shop"])
    async def history(customer_id: str) -> dict[str, Any]:
        return await service.customer_history(customer_id)

    @router.post("/shop/api/customers/{customer_id}/purchases", tags=["shop"], dependencies=[protected])
    async def purchases(customer_id: str, body: Purchases) -> dict[str, Any]:
        return await service.add_purchases(customer_id, body.article_ids)

    @router.get("/shop/api/customers/{customer_id}/vector", tags=["debug"])
    async def customer_vector(customer_id: str) -> dict[str, Any]:
        return await service.customer_vector(customer_id)

    @router.get("/shop/api/filters", tags=["shop"])
    async def filter_values() -> dict[str, Any]:
        """The values each category filter accepts in the served index (for building a filter UI)."""
        return service.filter_values()

    @router.get("/ready", tags=["health"])
    async def ready() -> dict[str, Any]:
        """200 while this replica should get requests; 503 while it is not ready, or out of rotation because
        it takes its turn at an index swap (requests that still arrive are served)."""
        return await service.in_rotation()

    @router.get("/admin/index", tags=["admin"], dependencies=[protected])
    async def index_info() -> dict[str, Any]:
        return service.index_info()

    @router.post("/admin/index/reload", tags=["admin"], dependencies=[protected])
    async def reload() -> dict[str, Any]:
        result = await service.reload()
        return {"status": result.status, "index_version": result.index_version, "message": result.message}

    return router


async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    """422 naming each bad field. FastAPI's default echoes the input back, which fails (500) when
    the input is not JSON-encodable, e.g. a bare `Infinity` body."""
    problems = [
        "{}: {}".format(".".join(str(part) for part in error.get("loc", ())), error.get("msg", "invalid"))
        for error in exc.errors()
    ]
    return JSONResponse(status_code=422, content={"error": "; ".join(problems) or "invalid request"})


LOAD_METER_CEILING = 16  # overloaded at half of it: 7 slow completions in a row from the top (AdaptiveLimit)


def install(app: FastAPI, service: RecommendationService) -> None:
    """Add the shop/admin routes, the validation handler, the body size and admission limits to an app, once."""
    if getattr(app.state, "shop_api_installed", False):
        return
    app.state.shop_api_installed = True
    config = service.config
    app.add_middleware(BodySizeLimit, max_bytes=config.max_body_bytes, on_refuse=metrics.ERRORS.labels("too_large").inc)
    # Added last, so outermost: an overloaded process refuses before reading the body.
    # Overload as the second stage's shedding sees it: slow completions cut it as they cut an adaptive limit. Its
    # own scale, not --max-in-flight's: with a limit of 0 (none) or 2, one slow request would have tipped it.
    load = AdaptiveLimit(LOAD_METER_CEILING, 1, config.shed_second_stage_ms / 1000)
    service.watch_load(load)
    app.add_middleware(
        AdmissionLimit,
        limit=AdaptiveLimit(config.max_in_flight, config.min_in_flight, config.admission_target_ms / 1000),
        load=load,
        retry_after_s=config.retry_after_s,
        on_arrival=metrics.RECEIVED.inc,
        on_refuse=metrics.ERRORS.labels("overloaded").inc,
        on_limit=metrics.ADMISSION_LIMIT.set,
    )
    metrics.ADMISSION_LIMIT.set(config.max_in_flight)
    app.include_router(build_router(service))
    app.add_exception_handler(RequestValidationError, validation_error)
