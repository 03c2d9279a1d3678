"""Posted purchases shared by two real retriever processes through a real Redis (Debian's redis-server),
and what happens when Redis dies and comes back."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from localtriton.process import free_port
from retriever.launch import RetrieverProcess

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("redis-server") is None, reason="Debian's redis-server is not installed"),
]


class RedisServer:
    """redis-server on a loopback port, nothing persisted."""

    def __init__(self, port: int, directory: Path):
        self.port, self.directory = port, directory
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> "RedisServer":
        command = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        self.process = subprocess.Popen(
            command, cwd=self.directory, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            ping = subprocess.run(["redis-cli", "-p", str(self.port), "ping"], capture_output=True, text=True)
            if ping.stdout.strip() == "PONG":
                return self
            time.sleep(0.1)
        raise RuntimeError(f"redis-server did not answer on port {self.port}")

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait(10)
            self.process = None


def call(url: str, body: dict | None = None) -> tuple[int, dict, dict]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read()), {k.lower(): v for k, v in response.headers.items()}
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}"), {k.lower(): v for k, v in err.headers.items()}


def test_two_retrievers_share_posted_purchases_and_survive_redis_going_away(tiny_pipeline, triton, tmp_path) -> None:
    redis = RedisServer(free_port(), tmp_path).start()
    flags = ["--purchases-redis-url", redis.url, "--history-clock", "index"]
    triton_http = f"127.0.0.1:{triton.settings.http_port}"
    items = tiny_pipeline.article_ids
    try:
        with (
            RetrieverProcess(tiny_pipeline.index_dir, triton_http, log_path=tmp_path / "a.log", extra_args=flags) as a,
            RetrieverProcess(tiny_pipeline.index_dir, triton_http, log_path=tmp_path / "b.log", extra_args=flags) as b,
        ):
            customer = call(f"{b.url}/shop/api/customers?limit=1")[1]["customer_ids"][0]
            history_b = f"{b.url}/shop/api/customers/{customer}/history"
            before = [item["article_id"] for item in call(history_b)[1]["items"]]
            bought = next(a_id for a_id in items if a_id not in before)
            status, body, _ = call(f"{a.url}/shop/api/customers/{customer}/purchases", {"article_ids": [bought]})
            assert status == 200, body
            # Posted to A, seen by B on its next request (two processes, one Redis).
            assert call(history_b)[1]["items"][0]["article_id"] == bought
            request = {"instances": [{"customer_id": customer, "k": 5, "exclude_purchased": True}]}
            status, answer, _ = call(b.predict_url, request)
            assert status == 200 and bought not in [i["article_id"] for i in answer["predictions"][0]["items"]]

            redis.kill()  # mid-run: reads fall back to the index's history, writes are refused with 503
            status, body, _ = call(history_b)
            assert status == 200 and [item["article_id"] for item in body["items"]] == before
            assert call(b.predict_url, request)[0] == 200
            assert call(f"{b.url}/v1/models/recommender")[0] == 200  # still ready: Redis is not the index
            status, body, headers = call(f"{a.url}/shop/api/customers/{customer}/purchases", {"article_ids": [bought]})
            assert status == 503 and "purchase store" in body["error"] and headers.get("retry-after") == "1"
            metrics = urllib.request.urlopen(f"{b.url}/metrics", timeout=10).read().decode()
            assert 'retriever_purchase_store_errors_total{operation="read"}' in metrics

            redis.start()  # back, empty (nothing persisted): posting works again once the back-off passed
            time.sleep(1.5)
            status, body, _ = call(f"{a.url}/shop/api/customers/{customer}/purchases", {"article_ids": [bought]})
            assert status == 200, body
            assert call(history_b)[1]["items"][0]["article_id"] == bought
    finally:
        redis.kill()
