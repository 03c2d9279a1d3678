"""Faults against the real processes: Triton stopped and restarted, a Triton python stub killed."""

from __future__ import annotations

import itertools
import json
import os
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request

import pytest

from localtriton import TritonServer, TritonSettings
from retriever.launch import RetrieverProcess

pytestmark = pytest.mark.integration


def status_of(url: str, body: dict | None = None) -> tuple[int, str]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def wait_for(predicate, timeout_s: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.5)
    return False


@pytest.fixture()
def private_servers(tiny_pipeline, tmp_path):
    """A Triton + retriever pair of this test's own, so breaking them disturbs no other test."""
    settings = TritonSettings.on_free_ports(tiny_pipeline.repository, tmp_path)
    triton = TritonServer(settings).start()
    retriever = RetrieverProcess(
        tiny_pipeline.index_dir, f"127.0.0.1:{settings.http_port}", log_path=tmp_path / "r.log"
    ).start()
    try:
        yield triton, retriever
    finally:
        retriever.stop()
        triton.stop()


REQUEST = {"instances": [{"query": "black dress", "k": 3}]}


def test_triton_gone_gives_503_and_not_ready_then_recovers(private_servers) -> None:
    """While the towers fail their health check KServe refuses predict before the model is called: answered as the
    service's own NotReady (Retry-After, counted under not_ready, one warning line), not KServe's traceback."""
    triton, retriever = private_servers
    ready_url = f"{retriever.url}/v1/models/recommender"
    assert status_of(retriever.predict_url, REQUEST)[0] == 200
    triton.stop()
    assert wait_for(lambda: status_of(ready_url)[0] == 503, 15), "readiness stayed true with Triton gone"
    request = urllib.request.Request(retriever.predict_url, json.dumps(REQUEST).encode())
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=30)
    body = refused.value.read().decode()
    assert refused.value.code == 503 and refused.value.headers["Retry-After"] == "1", body
    assert "is not ready" in json.loads(body)["error"]
    with urllib.request.urlopen(f"{retriever.url}/metrics", timeout=10) as response:
        assert 'retriever_errors_total{reason="not_ready"} 1.0' in response.read().decode()  # the probes not counted
    assert "Traceback" not in retriever.log_path.read_text()
    triton.start()  # same ports: the retriever must find it again by itself
    assert wait_for(lambda: status_of(ready_url)[0] == 200, 30), "readiness did not come back"
    assert status_of(retriever.predict_url, REQUEST)[0] == 200
    assert retriever.process is not None and retriever.process.poll() is None


def stub_pids(triton_pid: int) -> list[int]:
    out = subprocess.run(
        ["pgrep", "-f", "triton_python_backend_stub", "-g", str(triton_pid)], capture_output=True, text=True
    ).stdout
    return [int(pid) for pid in out.split()]


def test_killed_python_stub_is_caught_by_a_real_inference(private_servers) -> None:
    triton, retriever = private_servers
    ready_url = f"{retriever.url}/v1/models/recommender"
    stubs = stub_pids(triton.pid)
    assert stubs, "no python backend stub found under Triton"
    for pid in stubs:
        os.kill(pid, signal.SIGKILL)
    # Triton itself still says ready: only an inference shows the damage.
    assert status_of(f"{triton.settings.http_url}/v2/health/ready")[0] == 200
    assert wait_for(lambda: status_of(ready_url)[0] == 503, 15), "retriever readiness missed the dead stub"
    code, body = status_of(retriever.predict_url, {"instances": [{"history": ["0100001001"]}]})
    assert code == 503, body


class GatedRelay:
    """A TCP relay to the real Triton that stops passing bytes while its gate is shut: requests the
    retriever has sent wait inside it. (Pausing Triton itself with SIGSTOP would not do: its python
    backend finds the stubs unhealthy afterwards and fails the held requests.)"""

    def __init__(self, upstream_port: int) -> None:
        self.gate = threading.Event()
        self.gate.set()
        self._upstream = ("127.0.0.1", upstream_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self._listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                downstream, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self._upstream)
            for source, sink in ((downstream, upstream), (upstream, downstream)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _pump(self, source, sink) -> None:
        with source, sink:
            while chunk := source.recv(65536):
                self.gate.wait()
                sink.sendall(chunk)

    def close(self) -> None:
        self._listener.close()


def test_sigterm_under_load_finishes_in_flight_requests_and_exits_cleanly(tiny_pipeline, tmp_path) -> None:
    """SIGTERM as Kubernetes sends it: the terminating pod has left the Service's endpoints, so no new
    traffic comes (the raw overlay's preStop sleep gives that time), while four requests are in flight
    inside the retriever, held there waiting for Triton. Each must be answered 200, and the process must
    exit 0 within the grace period.

    A new connection arriving just as the listener closes is reset (by the kernel, or by uvicorn before it
    has read the request) on any server: keeping traffic away from a terminating pod is the preStop's job."""
    # Distinct histories: a cached answer would not wait for Triton.
    pairs = [list(pair) for pair in itertools.permutations(tiny_pipeline.article_ids[:40], 2)]
    stop_sending = threading.Event()
    results: list[list[int]] = [[] for _ in range(4)]
    last_answered = [0.0] * 4
    settings = TritonSettings.on_free_ports(tiny_pipeline.repository, tmp_path)
    with TritonServer(settings):
        relay = GatedRelay(settings.http_port)
        retriever = RetrieverProcess(tiny_pipeline.index_dir, relay.address, log_path=tmp_path / "r.log").start()

        def client(number: int) -> None:
            for history in pairs[number::4]:
                if stop_sending.is_set():
                    return
                try:
                    results[number].append(status_of(retriever.predict_url, {"instances": [{"history": history}]})[0])
                    last_answered[number] = time.monotonic()
                except (urllib.error.URLError, OSError) as err:
                    results[number].append(-1)  # a dropped request: each one here was sent before SIGTERM
                    print(f"client {number}: {err!r}")

        try:
            threads = [threading.Thread(target=client, args=(number,)) for number in range(4)]
            for thread in threads:
                thread.start()
            time.sleep(0.5)
            relay.gate.clear()
            time.sleep(0.5)  # each client now waits on a request the retriever holds for Triton
            stop_sending.set()
            started = time.monotonic()
            retriever.process.send_signal(signal.SIGTERM)
            time.sleep(0.5)
            reopened = time.monotonic()
            relay.gate.set()
            code = retriever.process.wait(timeout=40)
            elapsed = time.monotonic() - started
            for thread in threads:
                thread.join(timeout=60)
        finally:
            relay.gate.set()
            retriever.stop()
            relay.close()
    assert code == 0, f"exit code {code}"
    assert elapsed < 35
    summary = [(len(answers), sorted(set(answers)), answers[-1:]) for answers in results]  # count, statuses, last
    assert all(answers and answers[-1] == 200 for answers in results), summary
    assert min(last_answered) > reopened, "a request was not in flight at SIGTERM: the test proved nothing"
    assert all(status == 200 for answers in results for status in answers), summary  # no 5xx, no drop


def test_frozen_triton_times_out_into_503_and_recovers(private_servers, tiny_pipeline) -> None:
    """Triton paused (SIGSTOP: connections accepted, nothing answered): every call has a deadline and
    bounded retries, so requests end in 503 within the bound instead of hanging; SIGCONT heals it."""
    from twotower.config import RetrieverConfig

    triton, retriever = private_servers
    ready_url = f"{retriever.url}/v1/models/recommender"
    article = tiny_pipeline.article_ids[7]
    body = {"instances": [{"history": [article], "k": 3}]}  # not cached: needs the user tower
    config = RetrieverConfig()
    bound_s = 2 * config.triton_timeout_s * (config.triton_retries + 1) + 5  # health check + the request itself
    os.killpg(triton.pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        code, text = status_of(retriever.predict_url, body)
        elapsed = time.monotonic() - started
        assert code == 503, text
        assert elapsed < bound_s, f"took {elapsed:.1f}s, bound {bound_s:.1f}s"
        assert status_of(ready_url)[0] == 503
    finally:
        os.killpg(triton.pid, signal.SIGCONT)
    assert wait_for(lambda: status_of(ready_url)[0] == 200, 30), "readiness did not come back after SIGCONT"
    assert status_of(retriever.predict_url, body)[0] == 200


def test_a_burst_past_the_admission_limit_is_shed_with_retry_after_and_service_resumes(tiny_pipeline, tmp_path) -> None:
    """60 distinct history requests at once against a retriever admitting 2: the rest are answered 503 with
    Retry-After (never queued, never a 500 or a dropped connection), counted, and the next request is
    served normally. The 2x-saturation run with latencies is benchmarks/overload.py (docs/reliability.md)."""
    import asyncio

    from serving.http1 import KeepAliveClient

    articles = tiny_pipeline.article_ids
    bodies = [json.dumps({"instances": [{"history": [a, b], "k": 3}]}).encode() for a, b in zip(articles, articles[1:])]
    settings = TritonSettings.on_free_ports(tiny_pipeline.repository, tmp_path)
    with (
        TritonServer(settings),
        RetrieverProcess(
            tiny_pipeline.index_dir,
            f"127.0.0.1:{settings.http_port}",
            log_path=tmp_path / "r.log",
            extra_args=["--max-in-flight", "2", "--history-clock", "index"],
        ) as retriever,
    ):
        path = retriever.predict_url.removeprefix(retriever.url)

        async def burst() -> list[tuple[int, str | None, str]]:
            client = KeepAliveClient(retriever.url, limit=64, timeout_s=30.0)
            try:
                answers = await asyncio.gather(
                    *(client.request("POST", path, body, "Content-Type: application/json\r\n") for body in bodies[:60])
                )
            finally:
                client.close()
            return [(a.status, a.header("retry-after"), a.body.decode()) for a in answers]

        answers = asyncio.run(burst())
        statuses = [status for status, _, _ in answers]
        assert set(statuses) == {200, 503}, statuses
        shed = [(retry, text) for status, retry, text in answers if status == 503]
        assert all(retry == "1" and "max_in_flight 2" in text for retry, text in shed), shed[:3]
        assert status_of(retriever.predict_url, json.loads(bodies[60]))[0] == 200
        metrics = urllib.request.urlopen(f"{retriever.url}/metrics", timeout=10).read().decode()
        counted = [
            line for line in metrics.splitlines() if line.startswith('retriever_errors_total{reason="overloaded"}')
        ]
        assert counted and float(counted[0].split()[-1]) == len(shed), counted
