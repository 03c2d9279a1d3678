"""Fuzzing the real retriever's HTTP API with a fixed budget (hypothesis, derandomized).

Every generated request must get 200 or a 4xx with a message; never a 5xx, never a dead worker,
and the server's answers to a fixed request are the same before and after.
"""

from __future__ import annotations

import json
from urllib.parse import quote

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytestmark = pytest.mark.integration

BUDGET = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

ids = st.sampled_from(["0108775015", "", " ", "0", "x" * 300, "0000000001", "١٢٣", "0108775015,0108775015"])
texts = st.text(max_size=300) | st.sampled_from(["black jersey dress", "\x00", "🧥" * 700, "a" * 5000])
scalars = st.none() | st.booleans() | st.integers(-(10**12), 10**12) | st.floats(allow_nan=True) | texts
json_values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(texts, inner, max_size=4), max_leaves=12
)
field_names = st.sampled_from(
    [
        "customer_id",
        "history",
        "query",
        "similar_to",
        "k",
        "filters",
        "exclude_purchased",
        "max_per_product_type",
        "unknown",
    ]
)
filters = st.dictionaries(
    st.sampled_from(["product_group", "colour", "price_min", "price_max", "size"]), json_values, max_size=3
)
instances = st.dictionaries(field_names, json_values | ids | filters | st.lists(ids, max_size=60), max_size=4)
v1_bodies = st.fixed_dictionaries({"instances": st.lists(instances, max_size=4)}) | json_values
v2_inputs = st.fixed_dictionaries(
    {
        "name": st.sampled_from(["customer_id", "history", "query", "k", "other"]),
        "datatype": st.sampled_from(["BYTES", "INT32", "INT64", "FP32", "BOOL", "NOPE"]),
        "shape": st.lists(st.integers(-2, 5), max_size=3),
        "data": st.lists(json_values | ids, max_size=5),
    }
)
v2_bodies = st.fixed_dictionaries({"inputs": st.lists(v2_inputs, max_size=3)}) | json_values
raw_bodies = st.binary(max_size=300) | st.sampled_from([b"{", b'{"instances": [', b"\xff\xfe", b"null", b"[]"])


def check(response: httpx.Response) -> None:
    assert response.status_code < 500, (response.request.content[:300], response.status_code, response.text[:300])
    if response.status_code >= 400:
        assert response.text.strip(), "a 4xx must say what is wrong"


@pytest.fixture(scope="module")
def client(retriever):
    with httpx.Client(base_url=retriever.url, timeout=30) as client:
        yield client


@pytest.fixture(scope="module")
def reference(client):
    body = {"instances": [{"query": "striped cotton shirt", "k": 5}]}
    before = client.post("/v1/models/recommender:predict", json=body).json()
    index = client.get("/admin/index").json()
    yield
    assert client.post("/v1/models/recommender:predict", json=body).json() == before  # state unchanged
    assert client.get("/admin/index").json() == index
    assert client.get("/v1/models/recommender").status_code == 200  # still ready: no worker died


@BUDGET
@given(body=v1_bodies)
def test_fuzz_v1(client, reference, body) -> None:
    check(
        client.post(
            "/v1/models/recommender:predict",
            content=json.dumps(body, allow_nan=True),
            headers={"content-type": "application/json"},
        )
    )


@BUDGET
@given(body=v2_bodies)
def test_fuzz_v2(client, reference, body) -> None:
    check(
        client.post(
            "/v2/models/recommender/infer",
            content=json.dumps(body, allow_nan=True),
            headers={"content-type": "application/json"},
        )
    )


@BUDGET
@given(
    body=raw_bodies, content_type=st.sampled_from(["application/json", "text/plain", "", "application/octet-stream"])
)
def test_fuzz_raw_bodies(client, reference, body, content_type) -> None:
    check(client.post("/v1/models/recommender:predict", content=body, headers={"content-type": content_type}))
    check(client.post("/v2/models/recommender/infer", content=body, headers={"content-type": content_type}))


@BUDGET
@given(
    article=ids | texts,
    q=texts,
    k=st.sampled_from(["", "0", "-1", "5", "1001", "x", "1e3"]),
    price=st.sampled_from(["", "nan", "inf", "-1", "0.02", "abc"]),
)
def test_fuzz_shop_endpoints(client, reference, article, q, k, price) -> None:
    params = {name: value for name, value in (("k", k), ("price_max", price)) if value}
    check(client.get("/shop/api/search", params={"q": q, **params}))
    check(client.get(f"/shop/api/articles/{quote(article, safe='') or 'x'}/similar", params=params))
    check(client.get("/shop/api/customers/nobody/recommendations", params=params))


@BUDGET
@given(
    count=st.integers(0, 600),  # the default limit is 256 instances
    k=st.integers(-(10**18), 10**18) | st.sampled_from([1e308, -0.0, 1.5]) | st.just(float("inf")),
    depth=st.integers(1, 50_000),
    text=texts,
)
def test_fuzz_reaches_the_request_limits(client, reference, count, k, depth, text) -> None:
    """Many instances, huge or non-finite k, deeply nested values and any unicode, in one body each."""
    nested = "[" * depth + "]" * depth
    instances = json.dumps([{"query": text, "k": k}] * count, allow_nan=True)
    body = f'{{"instances": {instances[:-1]}{", " if count else ""}{{"history": {nested}}}]}}'
    check(client.post("/v1/models/recommender:predict", content=body, headers={"content-type": "application/json"}))


def test_oversized_body_is_refused_with_413(client) -> None:
    body = {"instances": [{"query": "a" * 100}] * 20_000}  # ~2.4 MB > the 1 MB default limit
    response = client.post("/v1/models/recommender:predict", json=body)
    assert response.status_code == 413 and "exceeds the limit" in response.text
