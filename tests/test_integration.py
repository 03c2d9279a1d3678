"""Against the REAL servers: the Triton binary and the KServe retriever, each its own process."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
import tritonclient.http as triton_http

from twotower import artifacts, ranking
from twotower.data.hm import build_captions, load_hm_dir
from twotower.model.clip_text import get_tokenizer
from twotower.triton_repository import MODEL_FILE

pytestmark = pytest.mark.integration


def post(url: str, body, content_type: str = "application/json") -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url, data, {"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


def infer(client: triton_http.InferenceServerClient, model: str, tensors: dict[str, np.ndarray]) -> np.ndarray:
    inputs = []
    for name, array in tensors.items():
        tensor = triton_http.InferInput(name, list(array.shape), "INT64" if array.dtype == np.int64 else "FP32")
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return client.infer(model, inputs, model_version="1").as_numpy("embedding__0")


def local_tower(pipeline, model: str) -> torch.jit.ScriptModule:
    return torch.jit.load(str(pipeline.repository / model / "1" / MODEL_FILE))


def user_inputs(manifest: artifacts.Manifest, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    history = rng.normal(size=(batch, manifest.max_history, manifest.dim)).astype(np.float32)
    mask = (np.arange(manifest.max_history) < rng.integers(1, manifest.max_history, size=(batch, 1))).astype(np.float32)
    age = (rng.random((batch, manifest.max_history)) * 5 * mask).astype(np.float32)
    return {"history": history * mask[..., None], "history_mask": mask, "history_age": age}


def test_triton_output_equals_in_process_torchscript(tiny_pipeline, triton) -> None:
    manifest = artifacts.read_manifest(tiny_pipeline.version_dir)
    client = triton_http.InferenceServerClient(f"127.0.0.1:{triton.settings.http_port}")
    tensors = user_inputs(manifest, batch=5)
    served = infer(client, "user_tower", tensors)
    with torch.inference_mode():
        expected = local_tower(tiny_pipeline, "user_tower")(*(torch.from_numpy(t) for t in tensors.values())).numpy()
    assert served.shape == (5, manifest.dim)
    assert np.abs(served - expected).max() <= 1e-5
    assert np.abs(served).sum() > 0  # numpy 2 in the stub would give zeros/empty silently

    captions = build_captions(load_hm_dir(tiny_pipeline.data_dir).articles)[:3]
    ids = get_tokenizer(manifest.clip_model)(captions).numpy().astype(np.int64)
    served = infer(client, "item_tower", {"input_ids": ids})
    with torch.inference_mode():
        expected = local_tower(tiny_pipeline, "item_tower")(torch.from_numpy(ids)).numpy()
    assert np.abs(served - expected).max() <= 1e-5
    # The distilled query tower is served beside them, with the item tower's inputs and output.
    assert manifest.query_model == "query_tower"
    query_ids = get_tokenizer(manifest.clip_model)(["red dress", "black cotton trousers"]).numpy().astype(np.int64)
    query = infer(client, "query_tower", {"input_ids": query_ids})
    with torch.inference_mode():
        expected_query = local_tower(tiny_pipeline, "query_tower")(torch.from_numpy(query_ids)).numpy()
    assert query.shape == (2, manifest.dim) and np.abs(query - expected_query).max() <= 1e-5
    # ... and the index holds exactly those vectors (plus each article's learned id vector) for those articles.
    from export.pipeline import load_run, with_id_vectors

    model, run = load_run(tiny_pipeline.run_dir)
    article_ids = artifacts.read_items(tiny_pipeline.version_dir, artifacts.read_manifest(tiny_pipeline.version_dir))[
        "article_id"
    ][:3]
    expected_index = with_id_vectors(model, served, article_ids, run.item_ids)
    assert np.abs(np.load(tiny_pipeline.version_dir / artifacts.VECTORS_FILE)[:3] - expected_index).max() <= 1e-5


def test_retrievers_triton_client_agrees_with_tritonclient_and_names_tritons_errors(tiny_pipeline, triton) -> None:
    import asyncio
    import dataclasses

    from serving.towers import TowerClient, TritonUnavailable

    manifest = artifacts.read_manifest(tiny_pipeline.version_dir)
    url = f"127.0.0.1:{triton.settings.http_port}"
    tensors = user_inputs(manifest, batch=3, seed=1)
    reference = infer(triton_http.InferenceServerClient(url), "user_tower", tensors)
    ids = get_tokenizer(manifest.clip_model)(["red cotton dress"]).numpy().astype(np.int64)
    reference_query = infer(triton_http.InferenceServerClient(url), "query_tower", {"input_ids": ids})
    reference_item = infer(triton_http.InferenceServerClient(url), "item_tower", {"input_ids": ids})

    async def run() -> tuple[np.ndarray, np.ndarray]:
        client = TowerClient(url, manifest)
        try:
            await client.verify_models()
            served = await client.user_vectors(*tensors.values())
            query = await client.query_vectors(ids)  # text queries: the distilled query tower
            assert np.array_equal(await client.item_vectors(ids), reference_item)  # captions: the item tower
            with pytest.raises(TritonUnavailable, match="history_mask"):  # Triton's own message, passed on
                await client._infer(manifest.user_model, {"history": tensors["history"]})
            assert np.array_equal(await client.user_vectors(*tensors.values()), served)  # connection still usable
        finally:
            await client.close()
        wrong = TowerClient(url, dataclasses.replace(manifest, model_version=99))
        try:
            with pytest.raises(TritonUnavailable, match="version 99 is not ready"):
                await wrong.verify_models()
        finally:
            await wrong.close()
        return served, query

    served, query = asyncio.run(run())
    assert np.array_equal(served, reference) and np.array_equal(query, reference_query)


def statistics(client: triton_http.InferenceServerClient, model: str) -> tuple[int, int]:
    stats = client.get_inference_statistics(model)["model_stats"][0]
    return int(stats["inference_count"]), int(stats["execution_count"])


def test_dynamic_batching_forms_batches_under_concurrency(tiny_pipeline, triton) -> None:
    import asyncio

    import tritonclient.http.aio as triton_aio

    manifest = artifacts.read_manifest(tiny_pipeline.version_dir)
    url = f"127.0.0.1:{triton.settings.http_port}"

    async def burst() -> list[np.ndarray]:
        client = triton_aio.InferenceServerClient(url)
        gate = asyncio.Semaphore(32)  # 32 single-row requests in flight at once

        async def one(seed: int) -> np.ndarray:
            inputs = []
            for name, array in user_inputs(manifest, batch=1, seed=seed).items():
                tensor = triton_aio.InferInput(name, list(array.shape), "FP32")
                tensor.set_data_from_numpy(array)
                inputs.append(tensor)
            async with gate:
                result = await client.infer("user_tower", inputs, model_version="1")
            return result.as_numpy("embedding__0")

        try:
            return await asyncio.gather(*(one(seed) for seed in range(400)))
        finally:
            await client.close()

    stats_client = triton_http.InferenceServerClient(url)
    before = statistics(stats_client, "user_tower")
    results = asyncio.run(burst())
    after = statistics(stats_client, "user_tower")
    inferences, executions = after[0] - before[0], after[1] - before[1]
    assert len(results) == 400 and inferences == 400
    assert executions < inferences, f"{inferences} inferences in {executions} executions: no batch was formed"


def test_query_for_an_articles_own_caption_returns_that_article(tiny_pipeline, retriever) -> None:
    data = load_hm_dir(tiny_pipeline.data_dir)
    articles = data.articles
    captions = build_captions(articles)
    # Never-bought articles are indexed by their text vector alone: their own caption must find them. The
    # query tower (distilled from the item tower that embedded them, then trained to find articles rather
    # than to copy vectors) lands near that vector, not on it: cosine 0.87-0.9+ on this shop.
    never_bought = [i for i, a in enumerate(articles.index) if a not in set(data.transactions["article_id"])]
    assert len(never_bought) >= 3, "the synthetic shop (seed 1) has cold articles"
    for row in never_bought[:3]:
        status, body = post(retriever.predict_url, {"instances": [{"query": captions[row], "k": 3}]})
        assert status == 200, body
        top = body["predictions"][0]["items"][0]
        assert top["article_id"] == articles.index[row]
        assert top["similarity"] > 0.8
        assert top["prod_name"] == articles["prod_name"].iloc[row]


def test_a_colour_and_type_query_returns_that_colour_and_type_first(tiny_pipeline) -> None:
    """What `make demo` shows: "<colour> <type>" finds articles of that colour and type first, with the
    pretrained item tower fused with BM25 as the demo serves it (the towers in-process: the same
    TorchScript files Triton serves). The tower alone is measured on H&M by `make eval`."""
    import asyncio

    from retriever.index_slot import IndexSlot
    from retriever.queries import Query
    from retriever.service import RecommendationService
    from serving.towers import TowerSource
    from twotower.config import RetrieverConfig

    articles = load_hm_dir(tiny_pipeline.data_dir).articles
    pairs = articles.groupby(["colour_group_name", "product_type_name"]).size()
    asked = pairs[pairs >= 3].sort_values(ascending=False).index[:5]
    assert len(asked) == 5, "the synthetic shop (seed 1) has colour/type pairs of 3+ articles"
    config = RetrieverConfig(
        index_dir=str(tiny_pipeline.index_dir), index_poll_s=0, faiss_gpu="off", text_search="hybrid"
    )
    service = RecommendationService(config, IndexSlot(config, TowerSource(local_repository=tiny_pipeline.repository)))
    service.load(triton_wait_s=0)
    queries = [Query("query", f"{colour} {kind}".lower(), 3) for colour, kind in asked]
    for (colour, kind), result in zip(asked, asyncio.run(service.recommend(queries))):
        found = articles.loc[result.article_ids, ["colour_group_name", "product_type_name"]]
        assert (found["colour_group_name"] == colour).all() and (found["product_type_name"] == kind).all(), (
            f"{colour} {kind}: {found.values.tolist()}"
        )


def reference_top_k(pipeline, tensors: dict[str, np.ndarray], k: int, bought: list | None = None) -> list[list[str]]:
    """The same computation in-process: TorchScript user tower + exact search over the item vectors,
    ranked as a customer's list (given what each query's customer bought: with the index's prior, boost and
    second stage)."""
    from serving.catalog import Catalog

    with torch.inference_mode():
        users = local_tower(pipeline, "user_tower")(*(torch.from_numpy(t) for t in tensors.values())).numpy()
    catalog = Catalog(pipeline.index_dir)
    space = ranking.ExactItems(
        catalog.vectors, catalog.item_bias, products=catalog.products, product_types=catalog.product_types
    )
    requests = [
        ranking.RankRequest(k)
        if bought is None
        else ranking.RankRequest(
            k,
            prior=catalog.prior_weight,
            boost=catalog.score_head.repeat,
            bought=bought[i],
            stage=catalog.second_stage,
        )
        for i in range(len(users))
    ]
    return [[catalog.article_ids[r] for r in rows] for _, rows in ranking.rank(space, users, requests)]


def test_history_and_customer_requests_return_the_reference_items(tiny_pipeline, retriever) -> None:
    from serving.catalog import Catalog

    catalog = Catalog(tiny_pipeline.index_dir)
    history = [catalog.article_ids[5], catalog.article_ids[9], catalog.article_ids[20]]  # oldest first
    customer = next(iter(catalog.customer_row))
    status, body = post(
        retriever.predict_url, {"instances": [{"history": history, "k": 10}, {"customer_id": customer, "k": 10}]}
    )
    assert status == 200, body
    served = [[item["article_id"] for item in p["items"]] for p in body["predictions"]]
    bought = [(catalog.rows_for(history)[::-1], np.zeros(3, np.float32)), catalog.customer_history(customer)]
    vectors, mask, ages = catalog.history_tensors(bought)
    expected = reference_top_k(
        tiny_pipeline, {"history": vectors, "history_mask": mask, "history_age": ages}, 10, bought
    )
    assert served == expected
    scores = [item["score"] for item in body["predictions"][0]["items"]]
    assert all(0.0 < s < 1.0 for s in scores)


def test_more_instances_than_tritons_batch_limit_are_sent_in_chunks(tiny_pipeline, retriever) -> None:
    """100 distinct histories and 100 distinct texts in one request: Triton takes at most 64 rows per call."""
    ids = load_hm_dir(tiny_pipeline.data_dir).articles.index.tolist()
    histories = [{"history": [ids[i], ids[i + 1]], "k": 2} for i in range(100)]
    queries = [{"query": f"chunked query number {i}", "k": 2} for i in range(100)]
    for instances in (histories, queries):
        status, body = post(retriever.predict_url, {"instances": instances})
        assert status == 200, body
        assert len(body["predictions"]) == 100 and all(len(p["items"]) == 2 for p in body["predictions"])
    # Bounded work per request: more instances, or more items across them, are refused before any work.
    customers = [{"customer_id": c, "k": 1000} for c in load_hm_dir(tiny_pipeline.data_dir).transactions["customer_id"]]
    status, body = post(retriever.predict_url, {"instances": customers[:3000]})
    assert status == 413 and "the limit is 256 per request (max_instances)" in body["error"], body
    status, body = post(retriever.predict_url, {"instances": customers[:11]})
    assert status == 413 and "11000 items in all" in body["error"], body


def test_known_customers_are_answered_from_vectors_computed_at_export(tiny_pipeline, retriever) -> None:
    """Export stores each known customer's user vector; the retriever serves it without calling Triton."""
    from serving.catalog import Catalog

    catalog = Catalog(tiny_pipeline.index_dir)
    customers = list(catalog.customer_row)[:20]
    vectors, mask, ages = catalog.history_tensors([catalog.customer_history(c) for c in customers])
    with torch.inference_mode():
        expected = local_tower(tiny_pipeline, "user_tower")(
            *(torch.from_numpy(t) for t in (vectors, mask, ages))
        ).numpy()
    stored = np.stack([catalog.customer_vector(c) for c in customers])
    np.testing.assert_allclose(stored, expected, atol=1e-5)

    def metrics() -> str:
        return urllib.request.urlopen(f"{retriever.url}/metrics", timeout=10).read().decode()

    before = metrics()
    status, body = post(retriever.predict_url, {"instances": [{"customer_id": customers[0], "k": 5}]})
    assert status == 200, body
    after = metrics()

    def count(text: str, needle: str) -> float:
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(needle))

    hits = 'retriever_cache_lookups_total{cache="known_customer",result="hit"}'
    assert count(after, hits) == count(before, hits) + 1
    triton_calls = 'retriever_stage_seconds_count{stage="triton"}'
    assert count(after, triton_calls) == count(before, triton_calls)


def test_v2_protocol(retriever) -> None:
    body = {
        "inputs": [
            {"name": "query", "datatype": "BYTES", "shape": [2], "data": ["black dress", "red sneakers"]},
            {"name": "k", "datatype": "INT32", "shape": [1], "data": [4]},
        ]
    }
    status, response = post(f"{retriever.url}/v2/models/recommender/infer", body)
    assert status == 200, response
    outputs = {o["name"]: o for o in response["outputs"]}
    assert outputs["article_id"]["shape"] == [2, 4]
    assert json.loads(outputs["metadata"]["data"][0])["prod_name"]
    # The model metadata a v2 client reads describes every input and output (it listed none before).
    metadata = triton_http.InferenceServerClient(retriever.url.removeprefix("http://")).get_model_metadata(
        "recommender"
    )
    inputs = {i["name"]: (i["datatype"], i["shape"]) for i in metadata["inputs"]}
    assert inputs == {
        **{kind: ("BYTES", [-1]) for kind in ("customer_id", "history", "query", "similar_to")},
        "k": ("INT32", [1]),
    }
    assert [(o["name"], o["datatype"], o["shape"]) for o in metadata["outputs"]] == [
        (o["name"], o["datatype"], [-1, -1]) for o in response["outputs"]
    ]


@pytest.mark.parametrize(
    "body, fragment",
    [
        (b"{oops", "Unrecognized request format"),  # KServe's own JSON decoding
        ({"instances": [{"customer_id": "nobody"}]}, "unknown customer_id: 'nobody'"),
        ({"instances": [{"history": ["0000000000"]}]}, "unknown article_id: '0000000000'"),
        ({"instances": [{"history": []}]}, "'history' is empty"),
        ({"instances": [{"query": "dress", "k": 0}]}, "'k' must be between 1 and"),
        ({"instances": [{"query": "dress", "k": 100000}]}, "'k' must be between 1 and"),
        ({"inputs": []}, "'instances'"),
    ],
)
def test_bad_requests_get_400_with_a_clear_message(retriever, body, fragment: str) -> None:
    status, response = post(retriever.predict_url, body)
    assert status == 400
    assert fragment in response["error"]


def test_v2_bad_dtype_gets_400(retriever) -> None:
    body = {"inputs": [{"name": "query", "datatype": "INT32", "shape": [1], "data": [3]}]}
    status, response = post(f"{retriever.url}/v2/models/recommender/infer", body)
    assert status == 400 and "datatype BYTES" in response["error"]


def test_metrics_expose_stage_latencies_and_counters(retriever, triton) -> None:
    post(retriever.predict_url, {"instances": [{"query": "dress"}]})
    post(retriever.predict_url, {"instances": [{"query": ""}]})
    text = urllib.request.urlopen(f"{retriever.url}/metrics", timeout=10).read().decode()
    for needle in (
        'retriever_stage_seconds_bucket{le="0.005",stage="triton"}',
        'stage="search"',
        'stage="total"',
        'retriever_requests_total{kind="query"}',
        'retriever_errors_total{reason="invalid_input"}',
        "request_predict_seconds",
    ):
        assert needle in text, needle
    triton_metrics = urllib.request.urlopen(triton.settings.metrics_url, timeout=10).read().decode()
    assert "nv_inference_exec_count" in triton_metrics


def run_retriever(index_dir: Path, triton_port: int) -> subprocess.CompletedProcess:
    command = [
        sys.executable,
        "-m",
        "retriever",
        "--index-dir",
        str(index_dir),
        "--predictor_host",
        f"127.0.0.1:{triton_port}",
        "--http_port",
        "0",
        "--triton-wait-s",
        "3",
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


def test_retriever_refuses_an_index_that_does_not_match_the_towers(tiny_pipeline, triton, tmp_path: Path) -> None:
    mismatched = tmp_path / "index"
    shutil.copytree(tiny_pipeline.version_dir, mismatched)
    manifest = json.loads((mismatched / artifacts.MANIFEST_FILE).read_text())
    manifest["model_version"] = 99
    (mismatched / artifacts.MANIFEST_FILE).write_text(json.dumps(manifest))
    result = run_retriever(mismatched, triton.settings.http_port)
    assert result.returncode == 2
    assert "refusing to start" in result.stderr and "version 99" in result.stderr

    (mismatched / artifacts.MANIFEST_FILE).write_text((tiny_pipeline.version_dir / artifacts.MANIFEST_FILE).read_text())
    (mismatched / artifacts.ITEMS_DIR / "article_id.codes.npy").write_bytes(b"not the exported codes")
    result = run_retriever(mismatched, triton.settings.http_port)
    assert result.returncode == 2 and "checksum" in result.stderr

    result = run_retriever(tmp_path / "nowhere", triton.settings.http_port)  # no index at all
    assert result.returncode == 2 and "nowhere" in result.stderr and "CURRENT" in result.stderr


def test_retriever_gives_up_clearly_when_triton_never_comes(tiny_pipeline) -> None:
    from localtriton.process import free_port

    result = run_retriever(tiny_pipeline.index_dir, free_port())  # nothing listens there
    assert result.returncode == 2 and "giving up after 3s" in result.stderr and "unreachable" in result.stderr


def test_localtriton_cli_starts_in_background_and_stops_by_pid(tiny_pipeline, tmp_path: Path) -> None:
    from localtriton.process import free_port
    from localtriton.server import pid_alive

    ports = [str(free_port()) for _ in range(3)]
    common = [
        "--model-repository",
        str(tiny_pipeline.repository),
        "--state-dir",
        str(tmp_path),
        "--http-port",
        ports[0],
        "--grpc-port",
        ports[1],
        "--metrics-port",
        ports[2],
    ]
    started = subprocess.run(
        [sys.executable, "-m", "localtriton", "start", *common], capture_output=True, text=True, timeout=180
    )
    assert started.returncode == 0, started.stderr
    state = json.loads((tmp_path / f"triton-{ports[0]}.json").read_text())
    assert pid_alive(state["pid"])
    assert urllib.request.urlopen(f"http://127.0.0.1:{ports[0]}/v2/health/ready", timeout=5).status == 200
    # A second start on the same ports must not take the running server's "ready" for its own.
    again = subprocess.run(
        [sys.executable, "-m", "localtriton", "start", *common, "--state-dir", str(tmp_path / "second")],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert again.returncode != 0 and "already accept connections" in again.stderr, again.stdout + again.stderr
    stopped = subprocess.run(
        [sys.executable, "-m", "localtriton", "stop", *common], capture_output=True, text=True, timeout=60
    )
    assert stopped.returncode == 0 and "stopped Triton" in stopped.stdout
    assert not pid_alive(state["pid"])
    assert not (tmp_path / f"triton-{ports[0]}.json").exists()


def test_two_kserve_workers_serve_every_route(tiny_pipeline, triton, tmp_path: Path) -> None:
    """--workers 2 pickles the model into each worker process: every route must come along."""
    import urllib.request

    from retriever.launch import RetrieverProcess

    with RetrieverProcess(
        tiny_pipeline.index_dir,
        f"127.0.0.1:{triton.settings.http_port}",
        log_path=tmp_path / "r.log",
        extra_args=["--workers", "2"],
    ) as retriever:
        body = json.dumps({"instances": [{"query": "black dress", "k": 2}]}).encode()
        for _ in range(6):  # requests spread over both workers
            for url, data in (
                (retriever.predict_url, body),
                (f"{retriever.url}/admin/index", None),
                (f"{retriever.url}/shop/api/customers?limit=1", None),
            ):
                request = urllib.request.Request(url, data, {"Content-Type": "application/json"})
                with urllib.request.urlopen(request, timeout=10) as response:
                    assert response.status == 200, url
        # A scrape reaches one worker, yet each must report both workers' requests (and the index once).
        manifest = artifacts.read_manifest(tiny_pipeline.version_dir)
        items = manifest.item_count
        for _ in range(6):
            with urllib.request.urlopen(f"{retriever.url}/metrics", timeout=10) as response:
                text = response.read().decode()
            assert 'retriever_stage_seconds_count{stage="total"} 6.0' in text
            assert f'retriever_index_items{{model_version="{manifest.model_version}"}} {float(items)}' in text
        log = retriever.log_path.read_text()
        metrics_dir = log.split("/metrics sums their files in ")[1].split()[0]
        assert Path(metrics_dir).is_dir()
        # an access-log line per request, without KServe's latency line beside each (--enable_latency_logging)
        assert log.count("POST /v1/models/recommender:predict") == 6 and "predict_ms" not in log
    assert not Path(metrics_dir).exists()  # made for this run, removed with it


def test_tritons_own_full_queue_refuses_calls_and_the_client_neither_retries_nor_hides_it(
    tiny_pipeline, tmp_path
) -> None:
    """Triton's bounded queue (dynamic_batching's default_queue_policy), filled for real: a copy of the
    repository whose user tower queues at most 1 request, 200 calls at once. The overflow is refused by
    Triton with its reason (the retriever answers that 503 + Retry-After: retriever/errors.py), refused
    calls are not sent again, and the tower serves normally afterwards."""
    import asyncio
    import re

    from localtriton import TritonServer, TritonSettings
    from serving.towers import TowerClient, TritonUnavailable

    manifest = artifacts.read_manifest(tiny_pipeline.version_dir)
    repository = tmp_path / "repository"
    shutil.copytree(tiny_pipeline.repository, repository)
    config = repository / manifest.user_model / "config.pbtxt"
    text, count = re.subn(r"max_queue_size: \d+", "max_queue_size: 1", config.read_text())
    assert count == 1, "the exported user tower has no queue bound"
    config.write_text(text)
    tensors = user_inputs(manifest, batch=1)
    settings = TritonSettings.on_free_ports(repository, tmp_path / "triton")

    async def burst(client: TowerClient) -> list[object]:
        calls = [client.user_vectors(*tensors.values()) for _ in range(200)]
        return await asyncio.gather(*calls, return_exceptions=True)

    async def run() -> None:
        client = TowerClient(settings.http_url, manifest)
        try:
            await client.verify_models()
            sent = []
            real_request = client.client.request

            async def counted(method: str, path: str, body: bytes = b"", headers: str = ""):
                sent.append(path)
                return await real_request(method, path, body, headers)

            client.client.request = counted  # type: ignore[method-assign]
            results = await burst(client)
            refused = [r for r in results if isinstance(r, TritonUnavailable)]
            served = [r for r in results if isinstance(r, np.ndarray)]
            assert len(refused) + len(served) == 200, [
                r for r in results if not isinstance(r, (np.ndarray, TritonUnavailable))
            ]
            assert refused and served, (len(refused), len(served))
            assert all(re.search("queue", str(err), re.IGNORECASE) for err in refused), refused[0]
            assert len(sent) == 200  # a refusal is an answer, not a connection failure: never sent again
            after = await client.user_vectors(*tensors.values())  # the queue drained: served again
            np.testing.assert_allclose(after, served[0], atol=1e-5)
        finally:
            await client.close()

    with TritonServer(settings):
        asyncio.run(run())
