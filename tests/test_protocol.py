"""Request parsing: every malformed request is a 400 (RequestError) that names the problem."""

from __future__ import annotations

import re

import numpy as np
import pytest
from kserve import InferInput, InferRequest

from retriever.errors import RequestError
from retriever.protocol import parse_v1, parse_v2, v1_response, v2_response
from retriever.queries import Recommendation
from twotower.config import RetrieverConfig

CONFIG = RetrieverConfig(top_k=12, max_k=100, max_history_items=5, max_query_chars=50)


def test_v1_kinds_and_default_k() -> None:
    queries = parse_v1(
        {"instances": [{"customer_id": " c1 "}, {"history": ["a", "b"], "k": 3}, {"query": "red dress"}]}, CONFIG
    )
    assert [(q.kind, q.value, q.k) for q in queries] == [
        ("customer_id", "c1", 12),
        ("history", ["a", "b"], 3),
        ("query", "red dress", 12),
    ]
    assert parse_v1(b'{"instances": [{"query": "x"}]}', CONFIG)[0].value == "x"


def test_dated_histories_carry_ages_as_of_a_day() -> None:
    dated = {"history": [{"article_id": "a", "t_dat": "2020-09-01"}, "b", {"article_id": "c"}], "as_of": "2020-09-11"}
    query = parse_v1({"instances": [dated]}, CONFIG)[0]
    assert query.value == ["a", "b", "c"] and query.ages == (10.0, 0.0, 0.0)  # undated items: 0 days
    assert parse_v1({"instances": [{"history": ["a", "b"]}]}, CONFIG)[0].ages is None
    today = parse_v1({"instances": [{"history": [{"article_id": "a", "t_dat": "2020-09-01"}]}]}, CONFIG)[0]
    assert today.ages is not None and today.ages[0] > 2000  # as of today's date (UTC)


@pytest.mark.parametrize(
    "instance, fragment",
    [
        ({"history": [{"article_id": "a", "t_dat": "yesterday"}]}, "history[0].t_dat: 'yesterday' is not a date"),
        ({"history": [{"article_id": "a", "t_dat": "2020-09-12"}], "as_of": "2020-09-11"}, "is after as_of"),
        ({"history": ["a"], "as_of": 20200911}, "as_of: expected a date"),
        ({"history": [{"article": "a"}]}, "history[0]: expected"),
        ({"query": "dress", "as_of": "2020-09-11"}, "'as_of' dates a 'history'"),
    ],
)
def test_bad_dates_are_400s_naming_the_item(instance, fragment: str) -> None:
    with pytest.raises(RequestError, match=re.escape(fragment)):
        parse_v1({"instances": [instance]}, CONFIG)


@pytest.mark.parametrize(
    "body, fragment",
    [
        (b"{not json", "not valid JSON"),
        ([], "JSON object with an 'instances' list"),
        ({"instances": []}, "non-empty list"),
        ({"instances": "x"}, "non-empty list"),
        ({"instances": [3]}, "instances[0]: expected an object"),
        ({"instances": [{}]}, "exactly one field of"),
        ({"instances": [{"query": "a", "history": ["b"]}]}, "exactly one field of"),
        ({"instances": [{"query": "a", "colour": "red"}]}, "unknown field(s) ['colour']"),
        ({"instances": [{"query": ""}]}, "'query' must be a non-empty string"),
        ({"instances": [{"query": "x" * 51}]}, "limit is 50"),
        ({"instances": [{"customer_id": 7}]}, "'customer_id' must be a non-empty string"),
        ({"instances": [{"history": []}]}, "'history' is empty"),
        ({"instances": [{"history": "0108775015"}]}, "list of article_id strings"),
        ({"instances": [{"history": ["a"] * 6}]}, "limit is 5"),
        ({"instances": [{"query": "a", "k": 0}]}, "between 1 and 100"),
        ({"instances": [{"query": "a", "k": 101}]}, "between 1 and 100"),
        ({"instances": [{"query": "a", "k": "5"}]}, "'k' must be an integer"),
        ({"instances": [{"query": "a", "k": True}]}, "'k' must be an integer"),
        ({"instances": [{"query": "a"}, {"query": "b", "k": -1}]}, "instances[1]"),
    ],
)
def test_v1_bad_requests(body, fragment: str) -> None:
    with pytest.raises(RequestError) as caught:
        parse_v1(body, CONFIG)
    assert fragment in str(caught.value)


def bytes_input(name: str, values: list[str]) -> InferInput:
    tensor = InferInput(name, [len(values)], "BYTES")
    tensor.set_data_from_numpy(np.array([v.encode() for v in values], dtype=object), binary_data=False)
    return tensor


def test_v2_inputs() -> None:
    k = InferInput("k", [1], "INT32")
    k.set_data_from_numpy(np.array([4], dtype=np.int32), binary_data=False)
    queries = parse_v2(InferRequest("recommender", [bytes_input("history", ["a, b", "c"]), k]), CONFIG)
    assert [(q.value, q.k) for q in queries] == [(["a", "b"], 4), (["c"], 4)]


@pytest.mark.parametrize(
    "inputs, fragment",
    [
        ([], "exactly one input of"),
        ([bytes_input("query", ["a"]), bytes_input("customer_id", ["b"])], "exactly one input of"),
        ([bytes_input("query", ["a"]), bytes_input("extra", ["b"])], "unknown input(s) ['extra']"),
        ([bytes_input("history", [" "])], "'history' is empty"),
    ],
)
def test_v2_bad_requests(inputs, fragment: str) -> None:
    with pytest.raises(RequestError) as caught:
        parse_v2(InferRequest("recommender", inputs), CONFIG)
    assert fragment in str(caught.value)


def test_v2_wrong_dtype_and_shape() -> None:
    wrong = InferInput("query", [1], "FP32")
    wrong.set_data_from_numpy(np.array([1.0], dtype=np.float32), binary_data=False)
    with pytest.raises(RequestError, match="datatype BYTES"):
        parse_v2(InferRequest("recommender", [wrong]), CONFIG)
    k = InferInput("k", [2], "INT32")
    k.set_data_from_numpy(np.array([1, 2], dtype=np.int32), binary_data=False)
    with pytest.raises(RequestError, match="shape \\[1\\]"):
        parse_v2(InferRequest("recommender", [bytes_input("query", ["a"]), k]), CONFIG)


def test_requests_asking_for_too_much_work_are_413s_naming_the_limit() -> None:
    from retriever.errors import RequestTooLarge, classify

    config = RetrieverConfig(max_instances=3, max_total_k=10)
    with pytest.raises(RequestTooLarge, match="4 instances, the limit is 3 per request \\(max_instances\\)") as caught:
        parse_v1({"instances": [{"customer_id": "c"}] * 4}, config)
    assert classify(caught.value)[0] == 413
    with pytest.raises(RequestTooLarge, match="11 items in all .* the limit is 10 per request \\(max_total_k\\)"):
        parse_v1({"instances": [{"customer_id": "c", "k": 6}, {"customer_id": "d", "k": 5}]}, config)
    assert len(parse_v1({"instances": [{"customer_id": "c", "k": 5}] * 2}, config)) == 2  # at the limits: fine
    with pytest.raises(RequestTooLarge, match="input 'customer_id' has 4 instances"):
        parse_v2(InferRequest("recommender", [bytes_input("customer_id", list("abcd"))]), config)
    k = InferInput("k", [1], "INT32")
    k.set_data_from_numpy(np.array([4], dtype=np.int32), binary_data=False)
    with pytest.raises(RequestTooLarge, match="12 items in all"):
        parse_v2(InferRequest("recommender", [bytes_input("customer_id", list("abc")), k]), config)


def test_responses() -> None:
    queries = parse_v1({"instances": [{"query": "a", "k": 2}, {"query": "b", "k": 1}]}, CONFIG)
    results = [
        Recommendation(["x", "y"], [0.9, 0.8], [0.7, 0.6], [{"prod_name": "X"}, {"prod_name": "Y"}]),
        Recommendation(["z"], [0.5], [0.4], [{"prod_name": "Z"}]),
    ]
    body = v1_response(queries, results)
    assert body["predictions"][0]["items"][1] == {"article_id": "y", "score": 0.6, "similarity": 0.8, "prod_name": "Y"}
    response = v2_response("recommender", InferRequest("recommender", [bytes_input("query", ["a", "b"])]), results)
    outputs = {o.name: o for o in response.outputs}
    assert outputs["article_id"].shape == [2, 2]
    assert outputs["score"].shape == [2, 2]
