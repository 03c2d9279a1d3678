"""serving.http1 (the keep-alive client for Triton and the load generator) against a real HTTP/1.1 server,
and the v2 binary-tensor encoding the retriever's Triton client speaks with it."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest

from serving.http1 import KeepAliveClient, Response
from serving.towers import decode_infer_output, encode_infer_request, error_message
from tests.conftest import EchoHandler


def requests(url: str, paths: list[str], timeout_s: float = 5.0) -> list[Response | Exception]:
    async def run() -> list[Response | Exception]:
        client = KeepAliveClient(url, timeout_s=timeout_s)
        answers: list[Response | Exception] = []
        try:
            for i, path in enumerate(paths):
                try:
                    answers.append(await client.request("POST", path, b'{"n": %d}' % i))
                except (OSError, ConnectionError, TimeoutError) as err:
                    answers.append(err)
        finally:
            client.close()
        return answers

    return asyncio.run(run())


def test_sequential_requests_share_one_kept_alive_connection(http_server: str) -> None:
    answers = requests(http_server, ["/ok/200"] * 20)
    assert [a.body for a in answers] == [b'{"n": %d}' % i for i in range(20)]  # type: ignore[union-attr]
    assert EchoHandler.connections == 1
    assert answers[0].header("X-ECHO-PATH") == "/ok/200" and answers[0].header("missing") is None  # type: ignore[union-attr]


def test_status_close_and_framing_errors(http_server: str) -> None:
    assert [a.status for a in requests(http_server, ["/ok/500"] * 2)] == [500, 500]  # type: ignore[union-attr]
    assert [a.status for a in requests(http_server, ["/close/200"] * 3)] == [200] * 3  # type: ignore[union-attr]
    assert EchoHandler.connections == 4  # Connection: close -> a new one each time
    chunked = requests(http_server, ["/chunked/200"])[0]
    assert isinstance(chunked, ConnectionError) and "Content-Length" in str(chunked)  # an error, not a hang


def test_timeout_and_cancellation_never_hand_a_late_answer_to_the_next_request(http_server: str) -> None:
    late, after = requests(http_server, ["/slow/200", "/ok/201"], timeout_s=0.1)
    assert isinstance(late, TimeoutError)
    assert isinstance(after, Response) and after.status == 201 and after.body == b'{"n": 1}'

    async def cancel_then_ask() -> Response:
        client = KeepAliveClient(http_server, timeout_s=5.0)
        try:
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(client.request("GET", "/slow/200"), 0.1)
            return await client.request("POST", "/ok/202", b"mine")
        finally:
            client.close()

    answer = asyncio.run(cancel_then_ask())
    assert answer.status == 202 and answer.body == b"mine"


def test_unreachable_peer_raises_os_error() -> None:
    import socket

    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    assert isinstance(requests(f"http://127.0.0.1:{port}", ["/x/200"])[0], OSError)
    with pytest.raises(ValueError, match="http://"):
        KeepAliveClient("https://example.org")


def binary_response(header: dict, *arrays: np.ndarray) -> Response:
    head = json.dumps(header).encode()
    return Response(
        200,
        b"http/1.1 200 ok\r\ninference-header-content-length: %d" % len(head),
        head + b"".join(a.tobytes() for a in arrays),
    )


def test_infer_request_puts_raw_tensors_after_a_json_header() -> None:
    history = np.arange(6, dtype=np.float32).reshape(1, 2, 3)
    ids = np.array([[7, 8]], dtype=np.int64)
    body, headers = encode_infer_request({"history": history, "ids": ids}, "embedding__0")
    size = int(headers.split("Inference-Header-Content-Length: ")[1].split("\r\n")[0])
    header = json.loads(body[:size])
    assert header["inputs"] == [
        {"name": "history", "shape": [1, 2, 3], "datatype": "FP32", "parameters": {"binary_data_size": 24}},
        {"name": "ids", "shape": [1, 2], "datatype": "INT64", "parameters": {"binary_data_size": 16}},
    ]
    assert header["outputs"] == [{"name": "embedding__0", "parameters": {"binary_data": True}}]
    assert body[size:] == history.tobytes() + ids.tobytes()


def test_infer_output_is_found_among_several_binary_and_json_outputs() -> None:
    first, wanted = np.ones((2, 2), dtype=np.float32), np.arange(6, dtype=np.float32).reshape(2, 3)
    header = {
        "outputs": [
            {"name": "other", "shape": [2, 2], "datatype": "FP32", "parameters": {"binary_data_size": 16}},
            {"name": "embedding__0", "shape": [2, 3], "datatype": "FP32", "parameters": {"binary_data_size": 24}},
        ]
    }
    assert np.array_equal(decode_infer_output(binary_response(header, first, wanted), "embedding__0"), wanted)
    as_json = Response(
        200,
        b"http/1.1 200 ok",
        json.dumps(
            {"outputs": [{"name": "embedding__0", "shape": [1, 2], "datatype": "FP32", "data": [0.5, 1.5]}]}
        ).encode(),
    )
    assert decode_infer_output(as_json, "embedding__0").tolist() == [[0.5, 1.5]]
    with pytest.raises(ValueError, match="no output named"):
        decode_infer_output(binary_response(header, first, wanted), "missing")
    with pytest.raises(ValueError, match="needs 24 bytes"):
        decode_infer_output(binary_response(header, first), "embedding__0")
    header["outputs"][1]["datatype"] = "BYTES"
    with pytest.raises(ValueError, match="datatype 'BYTES'"):
        decode_infer_output(binary_response(header, first, wanted), "embedding__0")


def test_error_message_is_tritons_text_or_the_status() -> None:
    assert error_message(Response(400, b"", b'{"error": "expected 3 inputs"}')) == "expected 3 inputs"
    assert error_message(Response(502, b"", b"<html>bad gateway")) == "HTTP 502: b'<html>bad gateway'"


def test_tower_client_pickles_without_its_connections(http_server: str) -> None:
    import pickle

    from serving.towers import TowerClient
    from twotower.artifacts import Manifest

    manifest = Manifest.__new__(Manifest)  # fields are not read here

    async def use_then_pickle() -> TowerClient:
        client = TowerClient(http_server, manifest)
        assert (await client._call("GET", "/ok/200")).status == 200  # a pooled connection now
        try:
            return pickle.loads(pickle.dumps(client))
        finally:
            await client.close()

    copy = asyncio.run(use_then_pickle())
    assert copy._client is None and copy.url == http_server.removeprefix("http://")


class FailingConnection:
    """Stands in for the keep-alive client: every request fails with `error`; attempts are counted."""

    def __init__(self, error: Exception):
        self.error = error
        self.attempts = 0

    async def request(self, *args: object) -> Response:
        self.attempts += 1
        raise self.error

    def close(self) -> None:
        return None


def test_triton_calls_are_retried_only_on_connection_errors_within_a_budget() -> None:
    from serving.towers import TowerClient, TritonUnavailable
    from twotower.artifacts import Manifest

    def attempts(error: Exception, calls: int) -> list[int]:
        client = TowerClient("127.0.0.1:1", Manifest.__new__(Manifest), retries=1)
        connection = FailingConnection(error)
        client._client = connection  # type: ignore[assignment]
        counts = []
        for _ in range(calls):
            before = connection.attempts
            with pytest.raises(TritonUnavailable):
                asyncio.run(client._call("GET", "/v2/health/ready"))
            counts.append(connection.attempts - before)
        return counts

    # A timeout is never retried: Triton may still be working on it, and late answers mean overload.
    assert attempts(TimeoutError("no answer in 2.0 s"), 3) == [1, 1, 1]
    # A refused or reset connection is, once, while the budget lasts (10 saved, a tenth of a retry per call).
    refused = attempts(ConnectionRefusedError(111, "refused"), 30)
    assert refused[:10] == [2] * 10 and refused.count(2) < 14 and refused[-1] == 1
