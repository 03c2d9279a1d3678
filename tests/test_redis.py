"""Posted purchases shared by two real retriever processes through a real Redis (Debian's redis-server),
and what happens when Redis dies and comes back."""

from __future__ import annotations

import json
import os
import shutil
import time
import urllib.error
import urllib.request
from unittest import mock

import pytest

from retriever.launch import RedisServer, RetrieverProcess

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("redis-server") is None, reason="Debian's redis-server is not installed"),
]


def call(url: str, body: dict | None = None) -> tuple[int, dict, dict]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read()), {k.lower(): v for k, v in response.headers.items()}
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}"), {k.lower(): v for k, v in err.headers.items()}


def test_two_retrievers_share_posted_purchases_and_survive_redis_going_away(tiny_pipeline, triton, tmp_path) -> None:
    redis = RedisServer(tmp_path / "redis.log").start()
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


def test_swap_turns_one_replica_at_a_time_with_a_lease_that_lapses_when_its_holder_dies(tmp_path, caplog) -> None:
    import redis as redis_client

    from retriever.swap_turns import RedisSwapTurns

    redis = RedisServer(tmp_path / "redis.log").start()
    a, b = (RedisSwapTurns(redis.url, "root", 1.2, 10.0, 1.0, replica=name) for name in ("a", "b"))
    own = RedisSwapTurns(redis.url, "root", 1.2, 10.0, 1.0)
    assert own.replica.endswith(f":{os.getpid()}")  # per process: KServe workers unpickle it with their own pid
    try:
        with b.take() as turn:
            assert not turn.drain  # nobody else serves: b swaps in place
        b.heartbeat()
        with a.take() as turn:
            assert turn.drain  # b serves: a leaves rotation while it loads
            time.sleep(2.5)  # past the lease's 1.2 s: renewed (every 0.4 s) while held
            assert b.take() is None
        b.leave()
        with b.take() as turn:  # handed on; a sent no heartbeat, so b swaps in place
            assert not turn.drain
        # A replica that took the lease and died: nobody renews it, it lapses, the next replica swaps.
        redis_client.Redis.from_url(redis.url).set(a.lease_key, "dead-pod:7", px=500)
        assert a.take() is None
        time.sleep(0.7)
        with a.take() as turn:
            assert not turn.drain
        redis.kill()
        with caplog.at_level("WARNING", logger="retriever.index"):
            turn = a.take()  # Redis gone: swap in place rather than wait
        assert turn is not None and not turn.drain and "swapping in place" in caplog.text
    finally:
        redis.kill()


def test_two_retrievers_take_turns_at_a_hot_swap_each_out_of_rotation_while_it_loads(
    tiny_pipeline, triton, tmp_path
) -> None:
    import dataclasses

    from twotower import artifacts

    redis = RedisServer(tmp_path / "redis.log").start()
    root = tmp_path / "index"
    shutil.copytree(tiny_pipeline.index_dir, root)
    served = artifacts.current_version(root)
    flags = ["--swap-turns-redis-url", redis.url, "--swap-drain-s", "1.5", "--index-poll-s", "0.2"]
    triton_http = f"127.0.0.1:{triton.settings.http_port}"
    try:
        with (
            RetrieverProcess(root, triton_http, log_path=tmp_path / "a.log", extra_args=flags) as a,
            RetrieverProcess(root, triton_http, log_path=tmp_path / "b.log", extra_args=flags) as b,
        ):
            assert call(f"{a.url}/ready") == (200, {"ready": True, "index_version": served}, mock.ANY)
            new = root / artifacts.next_version_name(root)
            shutil.copytree(root / served, new)
            manifest = artifacts.read_manifest(new)
            artifacts.write_manifest(new, dataclasses.replace(manifest, index_version=new.name))
            time.sleep(0.5)  # both have said they serve
            artifacts.publish_version(root, new.name)
            samples: list[tuple[str, str]] = []
            deadline = time.monotonic() + 60
            while samples[-1:] != [(new.name, new.name)] and time.monotonic() < deadline:
                states = [call(f"{replica.url}/ready")[1] for replica in (a, b)]
                # "out": out of rotation for the swap (any other 503, e.g. a slow tower check, is not a turn)
                samples.append(
                    tuple(
                        "out" if "out of rotation" in state.get("error", "") else state.get("index_version", "?")
                        for state in states
                    )
                )
                time.sleep(0.05)
            assert samples[-1] == (new.name, new.name), samples[-5:]
            # One at a time: each left rotation while it loaded, never both at once.
            assert ("out", served) in samples or ("out", new.name) in samples
            assert (served, "out") in samples or (new.name, "out") in samples
            assert ("out", "out") not in samples
            logs = [(tmp_path / name).read_text() for name in ("a.log", "b.log")]
            assert all("index swap turn taken; 1 other replica(s) serving" in log for log in logs)
            assert all(f"index swapped: {served} -> {new.name}" in log for log in logs)
    finally:
        redis.kill()
