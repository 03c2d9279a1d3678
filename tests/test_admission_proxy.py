"""The HAProxy admission sidecar (k8s/components/admission-proxy/admission-proxy.cfg), started for real.

The thing under test is HAProxy with our configuration, so the retriever behind it is a stand-in: a stdlib
HTTP server whose predict answers wait until the test releases them. That makes "refused while the
retriever still holds the admitted requests" an ordering the test can check without timing anything.
The same sidecar in front of the real retriever at 6x overload: benchmarks.overload --proxy (docs/overload.md).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from retriever.launch import AdmissionProxy

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("haproxy") is None, reason="Debian's haproxy is not installed (make tools)"),
]
PREDICT = "/v1/models/recommender:predict"


class HeldRetriever(ThreadingHTTPServer):
    """Answers predict requests only once `release` is set; counts how many it holds at once."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.release = threading.Event()
        self.lock = threading.Lock()
        self.held = 0
        self.most_held = 0
        self.seen: list[str] = []


class _Handler(BaseHTTPRequestHandler):
    server: HeldRetriever

    def do_GET(self) -> None:
        self.answer(200, {"status": "alive"})

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length", 0)))
        with self.server.lock:
            self.server.seen.append(self.path)
            self.server.held += 1
            self.server.most_held = max(self.server.most_held, self.server.held)
        self.server.release.wait(30)
        with self.server.lock:
            self.server.held -= 1
        self.answer(200, {"predictions": []})

    def answer(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the stdlib's name
        pass


@pytest.fixture
def retriever() -> Iterator[HeldRetriever]:
    server = HeldRetriever()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.release.set()
    server.shutdown()


@contextlib.contextmanager
def requests_in_parallel(retriever: HeldRetriever, n: int) -> Iterator[ThreadPoolExecutor]:
    """A pool for `n` requests; the retriever lets go of what it holds before the pool waits for them
    (also when an assertion failed)."""
    with ThreadPoolExecutor(n) as pool:
        try:
            yield pool
        finally:
            retriever.release.set()


def proxy(retriever: HeldRetriever, tmp_path: Path, **settings: int) -> AdmissionProxy:
    host, port = retriever.server_address[:2]
    env = {name.upper(): str(value) for name, value in settings.items()}
    return AdmissionProxy(f"http://{host}:{port}", tmp_path / "haproxy.log", env)


def call(port: int, method: str, path: str) -> tuple[int, dict[str, str], dict]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request(method, path, body=b"{}" if method == "POST" else None)
        response = connection.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, json.loads(response.read() or b"{}")
    finally:
        connection.close()


def send_many(pool: ThreadPoolExecutor, port: int, n: int) -> list[Future]:
    return [pool.submit(call, port, "POST", PREDICT) for _ in range(n)]


def first_done(futures: list[Future], n: int, timeout_s: float = 20.0) -> list[Future]:
    """The futures done once at least `n` are (all of them then: more than `n` is a failure to see)."""
    wait_for(lambda: sum(future.done() for future in futures) >= n, timeout_s)
    time.sleep(0.2)  # room for a wrongly admitted request to show up as done too
    return [future for future in futures if future.done()]


def wait_for(condition: Callable[[], bool], timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "not reached within the deadline"
        time.sleep(0.01)


def test_over_limit_and_queue_are_refused_while_the_retriever_still_holds_the_admitted(
    retriever: HeldRetriever, tmp_path: Path
) -> None:
    with (
        proxy(
            retriever, tmp_path, admission_max_in_flight=2, admission_max_queue=2, admission_queue_timeout_ms=30_000
        ) as sidecar,
        requests_in_parallel(retriever, 10) as pool,
    ):
        futures = send_many(pool, sidecar.http_port, 10)
        # 2 at the retriever, 2 queued: the other 6 are answered while nothing has been released
        refused_futures = first_done(futures, 6)
        refused = [future.result() for future in refused_futures]
        assert retriever.held == 2 and not retriever.release.is_set()
        assert [status for status, _, _ in refused] == [503] * 6
        for _, headers, body in refused:
            assert headers["retry-after"] == "1"
            assert body["error"].startswith("overloaded: admission queue full")
        # probes and metrics are not limited, even with the queue full
        assert call(sidecar.http_port, "GET", "/v2/health/live")[0] == 200
        retriever.release.set()
        admitted = [future.result(timeout=20) for future in futures if future not in refused_futures]
        assert [status for status, _, _ in admitted] == [200] * 4
    assert retriever.most_held == 2
    assert retriever.seen == [PREDICT] * 4


def test_a_request_queued_past_the_timeout_gets_503_with_retry_after(retriever: HeldRetriever, tmp_path: Path) -> None:
    with (
        proxy(
            retriever, tmp_path, admission_max_in_flight=1, admission_max_queue=5, admission_queue_timeout_ms=200
        ) as sidecar,
        requests_in_parallel(retriever, 3) as pool,
    ):
        held = pool.submit(call, sidecar.http_port, "POST", PREDICT)
        wait_for(lambda: retriever.held == 1)
        status, headers, body = call(sidecar.http_port, "POST", PREDICT)  # waits 200 ms in the queue
        assert status == 503
        assert headers["retry-after"] == "1"
        assert body["error"].startswith("unavailable: overloaded (queued past the admission timeout)")
        retriever.release.set()
        assert held.result(timeout=20)[0] == 200


def test_the_limit_covers_the_retrievers_api_paths_however_spelt_and_nothing_else(
    retriever: HeldRetriever, tmp_path: Path
) -> None:
    """A queue of 0 refuses every request the limit covers at once, so each path shows which side it is on."""
    retriever.release.set()
    with proxy(retriever, tmp_path, admission_max_queue=0) as sidecar:
        limited = [
            PREDICT,
            "/v1/models/recommender%3Apredict",  # the retriever decodes the path before matching it
            "/v2/models/recommender/infer",
            "/v2/models/recommender/versions/1/infer",
            "/shop/api/search",
        ]
        for path in limited:
            assert call(sidecar.http_port, "POST", path)[0] == 503, path
        assert call(sidecar.http_port, "POST", "/admin/index/reload")[0] == 200
        assert call(sidecar.http_port, "GET", "/v2/health/live")[0] == 200
    assert retriever.seen == ["/admin/index/reload"]
