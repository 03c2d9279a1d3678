"""Catalogue lifecycle and the web-shop endpoints against the REAL Triton and KServe processes.

This module runs its own Triton (polling its repository, so new model versions load without
restart) and its own retriever (watching its index root), on copies of the tiny pipeline's
artifacts: publishing index versions here cannot disturb the other tests.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest

from twotower import artifacts
from twotower.data.hm import build_captions, find_data_file

pytestmark = pytest.mark.integration

NEW_IDS = ["0999000001", "0999000002", "0999000003"]


@dataclasses.dataclass
class Shop:
    url: str
    triton_url: str
    root: Path
    repository: Path
    log_path: Path
    data_dir: Path
    run_dir: Path


@pytest.fixture(scope="module")
def shop(tiny_pipeline, tmp_path_factory: pytest.TempPathFactory):
    from localtriton import TritonServer, TritonSettings
    from retriever.launch import RetrieverProcess

    work = tmp_path_factory.mktemp("shop")
    root, repository = work / "index", work / "model_repository"
    shutil.copytree(tiny_pipeline.index_dir, root)
    shutil.copytree(tiny_pipeline.repository, repository)
    settings = dataclasses.replace(TritonSettings.on_free_ports(repository, work / "triton"), repository_poll_s=1)
    log_path = work / "retriever.log"
    with (
        TritonServer(settings) as triton,
        RetrieverProcess(
            root, f"127.0.0.1:{settings.http_port}", log_path=log_path, extra_args=["--index-poll-s", "0.5"]
        ) as retriever,
    ):
        yield Shop(
            retriever.url,
            f"127.0.0.1:{triton.settings.http_port}",
            root,
            repository,
            log_path,
            tiny_pipeline.data_dir,
            tiny_pipeline.run_dir,
        )


def update_catalogue(shop: Shop, *args: str) -> subprocess.CompletedProcess:
    """`python -m export.update` against the shop's index root, embedding through its Triton."""
    command = [sys.executable, "-m", "export.update", "--index-dir", str(shop.root), "--triton", shop.triton_url, *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


def wait_for_version(shop: Shop, predicate, timeout_s: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        info = httpx.get(f"{shop.url}/admin/index").json()
        if predicate(info):
            return info
        if time.monotonic() > deadline:
            raise AssertionError(f"index did not change in {timeout_s}s: {info}\n{shop.log_path.read_text()[-3000:]}")
        time.sleep(0.2)


def articles_frame(data_dir: Path) -> pd.DataFrame:
    return pd.read_csv(find_data_file(data_dir, "articles"), dtype=str, keep_default_na=False)


def search(shop: Shop, text: str, **params) -> list[dict]:
    response = httpx.get(f"{shop.url}/shop/api/search", params={"q": text, **params}, timeout=10)
    assert response.status_code == 200, response.text
    return response.json()["items"]


def test_new_articles_are_served_without_restart(shop: Shop, tmp_path: Path) -> None:
    before = httpx.get(f"{shop.url}/admin/index").json()
    delta = articles_frame(shop.data_dir).iloc[:3].copy()
    delta["article_id"] = NEW_IDS
    delta["prod_name"] = ["Aurora sequin raincoat", "Meadow linen tote", "Harbour wool beanie"]
    delta["detail_desc"] = [
        "Shiny fluorescent raincoat with sequins",
        "Large tote in washed linen",
        "Warm rib-knit beanie",
    ]
    delta.to_csv(tmp_path / "delta.csv", index=False)
    result = update_catalogue(shop, "--articles", str(tmp_path / "delta.csv"))
    assert result.returncode == 0, result.stderr
    info = wait_for_version(shop, lambda i: i["index_version"] != before["index_version"])
    assert info["items"] == before["items"] + 3 and info["parent_version"] == before["index_version"]

    # Each new article is indexed by the item tower's vector of its caption (what Triton serves), and its own
    # caption, sent as a text query (the distilled query tower fused with BM25), finds it among the first three.
    import tritonclient.http as triton_http

    from serving.towers import TokenIds

    delta["article_id"] = NEW_IDS
    captions = build_captions(delta.set_index("article_id", drop=False))
    manifest = artifacts.read_manifest(artifacts.resolve_index_dir(shop.root))
    ids = TokenIds(manifest.clip_model)(captions)
    tensor = triton_http.InferInput("input_ids", list(ids.shape), "INT64")
    tensor.set_data_from_numpy(ids)
    client = triton_http.InferenceServerClient(shop.triton_url)
    version = str(manifest.model_version)
    item_vectors = client.infer(manifest.item_model, [tensor], model_version=version).as_numpy("embedding__0")
    for article_id, caption, item_vector in zip(NEW_IDS, captions, item_vectors):
        indexed = np.asarray(httpx.get(f"{shop.url}/shop/api/articles/{article_id}/vector").json()["vector"])
        assert np.abs(indexed - item_vector).max() <= 1e-5  # a new article has no id vector: text alone
        assert article_id in [item["article_id"] for item in search(shop, caption, k=3)]
    article = httpx.get(f"{shop.url}/shop/api/articles/{NEW_IDS[0]}").json()
    assert article["prod_name"] == "Aurora sequin raincoat" and article["available"] is True
    response = httpx.post(
        f"{shop.url}/v1/models/recommender:predict", json={"instances": [{"history": NEW_IDS[:2], "k": 5}]}
    )
    assert response.status_code == 200 and len(response.json()["predictions"][0]["items"]) == 5

    # Removing (sold out) hides an article from results without a rebuild.
    (tmp_path / "remove.txt").write_text(NEW_IDS[0] + "\n")
    result = update_catalogue(shop, "--remove", str(tmp_path / "remove.txt"))
    assert result.returncode == 0, result.stderr
    wait_for_version(shop, lambda i: i["excluded"] >= 1 and i["items"] == info["items"])
    caption = build_captions(delta.set_index("article_id", drop=False))[0]
    assert NEW_IDS[0] not in [item["article_id"] for item in search(shop, caption, k=20)]
    assert httpx.get(f"{shop.url}/shop/api/articles/{NEW_IDS[0]}").json()["available"] is False


class Load:
    """Requests in a loop from a thread until stopped; every status code is recorded."""

    def __init__(self, shop: Shop, customer_id: str, history: list[str]):
        self.bodies = [
            {"instances": [{"customer_id": customer_id}]},
            {"instances": [{"history": history}]},
            {"instances": [{"query": "striped cotton shirt"}]},
        ]
        self.url = f"{shop.url}/v1/models/recommender:predict"
        self.statuses: list[int] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(timeout=10) as client:
            i = 0
            while not self._stop.is_set():
                try:
                    response = client.post(self.url, json=self.bodies[i % len(self.bodies)])
                    self.statuses.append(response.status_code)
                    if response.status_code != 200:
                        self.errors.append(response.text)
                except httpx.HTTPError as err:
                    self.errors.append(repr(err))
                i += 1

    def __enter__(self) -> "Load":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)


def some_customer(shop: Shop) -> tuple[str, list[str]]:
    customer = httpx.get(f"{shop.url}/shop/api/customers", params={"limit": 1}).json()["customer_ids"][0]
    history = [i["article_id"] for i in httpx.get(f"{shop.url}/shop/api/customers/{customer}/history").json()["items"]]
    return customer, history


def test_swaps_under_load_fail_no_request(shop: Shop) -> None:
    from export.catalogue_update import local_embedder, update_catalogue

    customer, history = some_customer(shop)
    ids = articles_frame(shop.data_dir)["article_id"].str.zfill(10).tolist()
    with Load(shop, customer, history[:3]) as load:
        for i in range(3):
            before = httpx.get(f"{shop.url}/admin/index").json()["index_version"]
            update_catalogue(shop.root, lambda m: local_embedder(shop.repository, m), remove_ids=[ids[20 + i]])
            wait_for_version(shop, lambda info, b=before: info["index_version"] != b)
            time.sleep(0.3)
    assert len(load.statuses) > 20 and not load.errors, load.errors[:3]


def test_mismatched_or_corrupt_index_is_refused_and_old_one_kept(shop: Shop) -> None:
    served = httpx.get(f"{shop.url}/admin/index").json()
    source = shop.root / served["index_version"]
    for spoil in ("model_version", "index"):
        target = shop.root / artifacts.next_version_name(shop.root)
        shutil.copytree(source, target)
        if spoil == "model_version":
            manifest = json.loads((target / artifacts.MANIFEST_FILE).read_text())
            manifest["model_version"] = 99  # Triton serves no such tower version
            (target / artifacts.MANIFEST_FILE).write_text(json.dumps(manifest))
        else:
            data = (target / artifacts.INDEX_FILE).read_bytes()
            (target / artifacts.INDEX_FILE).write_bytes(data[: len(data) // 2])
        artifacts.publish_version(shop.root, target.name)
        result = httpx.post(f"{shop.url}/admin/index/reload", timeout=30).json()
        assert result["status"] == "refused" and result["index_version"] == served["index_version"], result
        assert ("version 99" if spoil == "model_version" else "checksum") in result["message"]
        response = httpx.post(f"{shop.url}/v1/models/recommender:predict", json={"instances": [{"query": "dress"}]})
        assert response.status_code == 200
    assert "index reload refused, still serving " + served["index_version"] in shop.log_path.read_text()
    metrics = httpx.get(f"{shop.url}/metrics").text
    assert 'retriever_index_reloads_total{result="refused"}' in metrics
    artifacts.publish_version(shop.root, served["index_version"])  # put the good one back for later tests
    assert httpx.post(f"{shop.url}/admin/index/reload", timeout=30).json()["index_version"] == served["index_version"]


def test_filters_and_shop_endpoints(shop: Shop) -> None:
    customer, history = some_customer(shop)
    url = f"{shop.url}/shop/api/customers/{customer}/recommendations"
    plain = httpx.get(url, params={"k": 30}).json()["items"]
    excluded = httpx.get(url, params={"k": 30, "exclude_purchased": "true"}).json()["items"]
    assert not set(history) & {i["article_id"] for i in excluded} and len(excluded) == 30
    assert len(plain) == 30
    group = plain[0]["product_group_name"]
    filtered = httpx.get(url, params={"k": 10, "product_group": group}).json()["items"]
    assert filtered and all(i["product_group_name"] == group for i in filtered)
    capped = httpx.get(url, params={"k": 10, "max_per_product_type": 1}).json()["items"]
    types = [i["product_type_name"] for i in capped]
    assert len(types) == len(set(types)) and capped
    prices = sorted(float(i["price"]) for i in plain if i["price"])
    cap = prices[len(prices) // 2]  # the median of the unfiltered list: some articles pass, some do not
    priced = httpx.get(url, params={"k": 10, "price_max": cap}).json()["items"]
    assert priced and all(i["price"] and float(i["price"]) <= cap for i in priced)

    # The same options through KServe's v1 API.
    body = {
        "instances": [
            {"customer_id": customer, "k": 10, "exclude_purchased": True, "filters": {"product_group": [group]}}
        ]
    }
    items = httpx.post(f"{shop.url}/v1/models/recommender:predict", json=body).json()["predictions"][0]["items"]
    assert all(i["product_group_name"] == group and i["article_id"] not in history for i in items)

    article = history[0]
    similar = httpx.get(f"{shop.url}/shop/api/articles/{article}/similar", params={"k": 5}).json()["items"]
    assert len(similar) == 5 and article not in [i["article_id"] for i in similar]
    vector = httpx.get(f"{shop.url}/shop/api/articles/{article}/vector").json()["vector"]
    assert abs(np.linalg.norm(vector) - 1) < 1e-3
    user_vector = np.asarray(httpx.get(f"{shop.url}/shop/api/customers/{customer}/vector").json()["vector"])

    # Posted purchases count from the next request; a new customer is served from them alone.
    new_article = similar[0]["article_id"]
    response = httpx.post(f"{shop.url}/shop/api/customers/{customer}/purchases", json={"article_ids": [new_article]})
    assert response.status_code == 200 and response.json()["recorded"] == 1
    assert (
        httpx.get(f"{shop.url}/shop/api/customers/{customer}/history").json()["items"][0]["article_id"] == new_article
    )
    assert not np.allclose(httpx.get(f"{shop.url}/shop/api/customers/{customer}/vector").json()["vector"], user_vector)
    assert httpx.get(f"{shop.url}/shop/api/customers/brand-new-customer/recommendations").status_code == 400
    httpx.post(f"{shop.url}/shop/api/customers/brand-new-customer/purchases", json={"article_ids": history[:2]})
    assert len(httpx.get(f"{shop.url}/shop/api/customers/brand-new-customer/recommendations").json()["items"]) == 12

    # Bad input: 4xx naming the problem, nothing stored.
    for method, path, kwargs, needle in (
        (
            "post",
            f"/shop/api/customers/{customer}/purchases",
            {"json": {"article_ids": ["0000000001"]}},
            "unknown article_id",
        ),
        ("post", f"/shop/api/customers/{customer}/purchases", {"json": {"article_ids": []}}, "article_ids"),
        ("get", "/shop/api/articles/0000000001/similar", {}, "unknown article_id"),
        ("get", "/shop/api/search", {"params": {"q": "x", "price_min": 2, "price_max": 1}}, "price_min"),
        ("get", "/shop/api/search", {"params": {"q": "x", "k": 0}}, "k"),
    ):
        response = getattr(httpx, method)(f"{shop.url}{path}", **kwargs)
        assert 400 <= response.status_code < 500 and needle in response.text, (path, response.text)
    assert (
        httpx.get(f"{shop.url}/shop/api/customers/{customer}/history").json()["items"][0]["article_id"] == new_article
    )

    # Caches: the repeated customer request above hit the user-vector cache.
    metrics = httpx.get(f"{shop.url}/metrics").text
    assert 'retriever_cache_lookups_total{cache="user_vector",result="hit"}' in metrics
    assert httpx.get(f"{shop.url}/openapi.json").json()["paths"]["/shop/api/search"]


def test_new_model_version_rolls_out_without_downtime(shop: Shop) -> None:
    """A new tower version + its index: Triton loads it by polling, the retriever swaps once it is served."""
    from export.pipeline import ExportOptions, export_run

    customer, history = some_customer(shop)
    before = httpx.get(f"{shop.url}/admin/index").json()
    with Load(shop, customer, history[:3]) as load:
        manifest = export_run(shop.run_dir, shop.data_dir, shop.repository, shop.root, ExportOptions())
        info = wait_for_version(shop, lambda i: i["model_version"] == manifest.model_version, timeout_s=60)
        time.sleep(0.5)
    assert manifest.model_version == before["model_version"] + 1 and info["index_version"] == manifest.index_version
    assert len(load.statuses) > 20 and not load.errors, load.errors[:3]
