"""Request parsing and response building for the v1 (JSON instances) and v2 (tensors) protocols.

Transport only: what a request means is retriever/queries.py. Every malformed request raises
RequestError (HTTP 400, retriever/errors.py) with a message naming the instance and field.

v1  POST /v1/models/<name>:predict
    {"instances": [{"customer_id": "..."} | {"history": ["0108775015", ...]} | {"query": "black dress"}
                   | {"similar_to": "0108775015"}, ... each may add the options below]}
    -> {"predictions": [{"kind": ..., "items": [{"article_id", "score", "similarity", "prod_name", ...}]}]}
    `history` lists article_ids oldest first (the last one is the most recent purchase); an item may
    be {"article_id": "...", "t_dat": "YYYY-MM-DD"} and the instance may add "as_of": "YYYY-MM-DD"
    (default: today, UTC): ages in days (as_of - t_dat) feed the user tower and the repeat boost.
    Undated items are aged 0 days (bought as of the request).
    Options: "k": 12, "filters": {"product_group": [...], "product_type": [...], "index": [...],
    "colour": [...], "section": [...], "garment_group": [...], "price_min": 0.01, "price_max": 0.05},
    "exclude_purchased": true (customer_id/history: drop what they bought), "max_per_product_type": 3,
    "debug": true (text queries: each item says which retriever found it, "dense", "lexical" or both).

v2  POST /v2/models/<name>/infer with ONE of the BYTES inputs `customer_id` [N], `query` [N],
    `history` [N] (each element: article_ids separated by commas or spaces, oldest first),
    optional INT32/INT64 `k` [1]. Outputs: article_id BYTES [N,k], score FP32 [N,k],
    similarity FP32 [N,k], metadata BYTES [N,k] (JSON objects).
"""

from __future__ import annotations

import datetime
import json
import re
from typing import Any

import numpy as np
from kserve import InferOutput, InferRequest, InferResponse

from retriever.errors import RequestError, RequestTooLarge
from retriever.queries import KINDS, Query, QueryOptions, Recommendation
from serving.filters import FilterError, Filters
from twotower.config import RetrieverConfig

OPTIONS = ("k", "filters", "exclude_purchased", "max_per_product_type", "debug", "as_of")
# The v2 model metadata (open inference protocol: name, datatype, shape; -1 = any size). A request gives
# exactly one of the BYTES inputs, and `k` optionally.
V2_INPUTS = [{"name": kind, "datatype": "BYTES", "shape": [-1]} for kind in KINDS] + [
    {"name": "k", "datatype": "INT32", "shape": [1]}
]
V2_OUTPUTS = [
    {"name": "article_id", "datatype": "BYTES", "shape": [-1, -1]},
    {"name": "score", "datatype": "FP32", "shape": [-1, -1]},
    {"name": "similarity", "datatype": "FP32", "shape": [-1, -1]},
    {"name": "metadata", "datatype": "BYTES", "shape": [-1, -1]},
]
ID_SEPARATORS = re.compile(r"[,\s]+")


def _check_instances(count: int, config: RetrieverConfig, noun: str) -> None:
    if count > config.max_instances:
        raise RequestTooLarge(
            f"{noun} has {count} instances, the limit is {config.max_instances} per request (max_instances)"
        )


def _check_total_k(queries: list[Query], config: RetrieverConfig) -> list[Query]:
    total = sum(query.k for query in queries)
    if total > config.max_total_k:
        raise RequestTooLarge(
            f"the instances ask for {total} items in all (sum of 'k'), the limit is {config.max_total_k} "
            "per request (max_total_k)"
        )
    return queries


def _parse_k(raw: Any, where: str, config: RetrieverConfig) -> int:
    if raw is None:
        return config.top_k
    if isinstance(raw, bool) or not isinstance(raw, (int, np.integer)):
        raise RequestError(f"{where}: 'k' must be an integer, got {type(raw).__name__} {raw!r}")
    if not 1 <= int(raw) <= config.max_k:
        raise RequestError(f"{where}: 'k' must be between 1 and {config.max_k}, got {raw}")
    return int(raw)


def parse_options(raw: dict[str, Any], where: str) -> QueryOptions:
    try:
        filters = Filters.parse(raw.get("filters"), f"{where}: 'filters'")
    except FilterError as err:
        raise RequestError(str(err)) from err
    exclude = raw.get("exclude_purchased", False)
    if not isinstance(exclude, bool):
        raise RequestError(f"{where}: 'exclude_purchased' must be true or false, got {exclude!r}")
    cap = raw.get("max_per_product_type")
    if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap < 1):
        raise RequestError(f"{where}: 'max_per_product_type' must be a positive integer, got {cap!r}")
    debug = raw.get("debug", False)
    if not isinstance(debug, bool):
        raise RequestError(f"{where}: 'debug' must be true or false, got {debug!r}")
    return QueryOptions(filters, exclude, cap, debug)


def _parse_value(kind: str, value: Any, where: str, config: RetrieverConfig) -> Any:
    if kind in ("customer_id", "similar_to"):
        if not isinstance(value, str) or not value.strip():
            raise RequestError(f"{where}: '{kind}' must be a non-empty string")
        return value.strip()
    if kind == "query":
        if not isinstance(value, str) or not value.strip():
            raise RequestError(f"{where}: 'query' must be a non-empty string")
        if len(value) > config.max_query_chars:
            raise RequestError(f"{where}: 'query' is {len(value)} characters, the limit is {config.max_query_chars}")
        return value.strip()
    ids, _ = _parse_history(value, where, config)
    return ids


def _date(raw: Any, where: str) -> datetime.date:
    if not isinstance(raw, str):
        raise RequestError(f"{where}: expected a date YYYY-MM-DD, got {raw!r}")
    try:
        return datetime.date.fromisoformat(raw.strip())
    except ValueError as err:
        raise RequestError(f"{where}: {raw!r} is not a date YYYY-MM-DD") from err


def _history_item(item: dict[str, Any], where: str) -> tuple[str, datetime.date | None]:
    unknown = sorted(set(item) - {"article_id", "t_dat"})
    if unknown or not isinstance(item.get("article_id"), str):
        raise RequestError(f'{where}: expected {{"article_id": "...", "t_dat": "YYYY-MM-DD"}}, got {item!r}')
    return item["article_id"], _date(item["t_dat"], f"{where}.t_dat") if "t_dat" in item else None


def _parse_history(value: Any, where: str, config: RetrieverConfig) -> tuple[list[str], list[datetime.date | None]]:
    """article_ids, oldest first, and each item's purchase day (None: undated), each item read once."""
    if not isinstance(value, list) or not all(isinstance(a, (str, dict)) for a in value):
        raise RequestError(
            f'{where}: \'history\' must be a list of article_id strings or {{"article_id", "t_dat"}} objects'
        )
    if not value:
        raise RequestError(f"{where}: 'history' is empty; give at least one article_id (or use 'query')")
    if len(value) > config.max_history_items:
        raise RequestError(f"{where}: 'history' has {len(value)} items, the limit is {config.max_history_items}")
    items = [
        (a, None) if isinstance(a, str) else _history_item(a, f"{where}: history[{i}]") for i, a in enumerate(value)
    ]
    return [a.strip() for a, _ in items], [day for _, day in items]


def history_ages(days: list[datetime.date | None], as_of: datetime.date, where: str) -> tuple[float, ...] | None:
    """Days between each dated purchase and `as_of`, oldest first; None when no item carries a date (the
    history is then aged 0 days: bought as of the request). An undated item in a dated history is aged 0
    days too."""
    if all(day is None for day in days):
        return None
    for i, day in enumerate(days):
        if day is not None and day > as_of:
            raise RequestError(f"{where}: history[{i}].t_dat {day} is after as_of {as_of}")
    return tuple(float((as_of - day).days) if day is not None else 0.0 for day in days)


def _choose_kind(names: set[str], where: str, noun: str, options: tuple[str, ...] = OPTIONS) -> str:
    """Exactly one of KINDS, optionally some of `options`, nothing else."""
    given = [kind for kind in KINDS if kind in names]
    if len(given) != 1:
        raise RequestError(f"{where}give exactly one {noun} of {list(KINDS)}, got {given or 'none'}")
    unknown = sorted(names - set(KINDS) - set(options))
    if unknown:
        raise RequestError(f"{where}unknown {noun}(s) {unknown}; allowed: {list(KINDS) + list(options)}")
    return given[0]


def parse_instance(instance: Any, index: int, config: RetrieverConfig) -> Query:
    where = f"instances[{index}]"
    if not isinstance(instance, dict):
        raise RequestError(f"{where}: expected an object with one of {list(KINDS)}, got {type(instance).__name__}")
    kind = _choose_kind(set(instance), f"{where}: ", "field")
    if "as_of" in instance and kind != "history":
        raise RequestError(f"{where}: 'as_of' dates a 'history'; {kind!r} requests take none")
    ages = None
    if kind == "history":
        value, days = _parse_history(instance[kind], where, config)
        today = datetime.datetime.now(datetime.timezone.utc).date()
        as_of = _date(instance["as_of"], f"{where}: as_of") if "as_of" in instance else today
        ages = history_ages(days, as_of, where)
    else:
        value = _parse_value(kind, instance[kind], where, config)
    return Query(kind, value, _parse_k(instance.get("k"), where, config), parse_options(instance, where), ages)


def parse_v1(body: Any, config: RetrieverConfig) -> list[Query]:
    if isinstance(body, (bytes, str)):  # a body sent without a JSON content type arrives undecoded
        try:
            body = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise RequestError(f"request body is not valid JSON: {err}") from err
    if not isinstance(body, dict) or "instances" not in body:
        raise RequestError("request body must be a JSON object with an 'instances' list")
    instances = body["instances"]
    if not isinstance(instances, list) or not instances:
        raise RequestError("'instances' must be a non-empty list")
    _check_instances(len(instances), config, "'instances'")
    return _check_total_k([parse_instance(instance, i, config) for i, instance in enumerate(instances)], config)


def _decode(value: Any) -> str:
    return value.decode("utf-8", errors="strict") if isinstance(value, bytes) else str(value)


def parse_v2(request: InferRequest, config: RetrieverConfig) -> list[Query]:
    inputs = {tensor.name: tensor for tensor in request.inputs}
    kind = _choose_kind(set(inputs), "", "input", options=("k",))
    tensor = inputs[kind]
    if tensor.datatype != "BYTES":
        raise RequestError(f"input '{kind}' must have datatype BYTES, got {tensor.datatype}")
    if len(tensor.shape) != 1 or tensor.shape[0] < 1:
        raise RequestError(f"input '{kind}' must have shape [N] with N >= 1, got {tensor.shape}")
    _check_instances(int(tensor.shape[0]), config, f"input '{kind}'")
    try:
        values = [_decode(v) for v in tensor.as_numpy().reshape(-1)]
    except (UnicodeDecodeError, ValueError) as err:
        raise RequestError(f"input '{kind}': cannot decode ({err})") from err
    k = config.top_k
    if "k" in inputs:
        k_tensor = inputs["k"]
        if k_tensor.datatype not in ("INT32", "INT64") or list(k_tensor.shape) != [1]:
            raise RequestError(
                f"input 'k' must be INT32 or INT64 with shape [1], got {k_tensor.datatype} {k_tensor.shape}"
            )
        k = _parse_k(int(k_tensor.as_numpy().reshape(-1)[0]), "input 'k'", config)
    if kind == "history":
        parsed: list[Any] = [[a for a in ID_SEPARATORS.split(v.strip()) if a] for v in values]
    else:
        parsed = values
    return _check_total_k(
        [Query(kind, _parse_value(kind, v, f"{kind}[{i}]", config), k) for i, v in enumerate(parsed)], config
    )


def v1_response(queries: list[Query], results: list[Recommendation]) -> dict[str, Any]:
    predictions = []
    for query, result in zip(queries, results):
        items = [
            {"article_id": a, "score": round(s, 6), "similarity": round(c, 6), **meta}
            for a, s, c, meta in zip(result.article_ids, result.scores, result.similarities, result.metadata)
        ]
        if query.options.debug and result.sources is not None:  # which retriever found each item (hybrid search)
            for item, source in zip(items, result.sources):
                item["retrieved_by"] = source
        predictions.append({query.kind: query.value, "items": items})
    return {"predictions": predictions}


def v2_response(model_name: str, request: InferRequest, results: list[Recommendation]) -> InferResponse:
    k = max((len(r.article_ids) for r in results), default=0)

    def padded(values: list, fill: Any) -> list:
        return list(values) + [fill] * (k - len(values))

    ids = np.array([padded(r.article_ids, "") for r in results], dtype=object).reshape(len(results), k)
    scores = np.array([padded(r.scores, 0.0) for r in results], dtype=np.float32).reshape(len(results), k)
    sims = np.array([padded(r.similarities, 0.0) for r in results], dtype=np.float32).reshape(len(results), k)
    meta = np.array([padded([json.dumps(m) for m in r.metadata], "{}") for r in results], dtype=object).reshape(
        len(results), k
    )
    outputs = []
    for spec, array in zip(V2_OUTPUTS, (ids, scores, sims, meta)):
        output = InferOutput(name=spec["name"], shape=list(array.shape), datatype=spec["datatype"])
        output.set_data_from_numpy(array, binary_data=False)
        outputs.append(output)
    return InferResponse(response_id=request.id or "", model_name=model_name, infer_outputs=outputs)
