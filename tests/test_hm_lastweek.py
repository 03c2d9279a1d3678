"""The real H&M week: train (capped), export all 105,542 articles, serve them through the real servers.

Skips when ../shared/data/hm_lastweek is absent (a user's clone); CI always has it.
Uses the `hm-micro-text` config so the whole catalogue embeds in about a minute and a half.
"""

from __future__ import annotations

import json
import urllib.request

import pytest

from tests.conftest import require_hm

pytestmark = [pytest.mark.hm, pytest.mark.integration]

HM_ARTICLES = 105_542


@pytest.fixture(scope="module")
def hm_served(tmp_path_factory: pytest.TempPathFactory):
    from export.pipeline import export_run
    from localtriton import TritonServer, TritonSettings
    from retriever.launch import RetrieverProcess
    from twotower.config import TrainConfig, from_scratch_model
    from twotower.data.hm import load_hm_dir
    from twotower.train import train

    data_dir = require_hm()
    root = tmp_path_factory.mktemp("hm")
    data = load_hm_dir(data_dir)
    # The micro from-scratch tower: the pretrained one would spend ~30 min embedding 105k captions here.
    # The query tower is distilled for one epoch and not taught retrieval (~3 min): its served path is tested,
    # not its quality.
    model = from_scratch_model(clip_model="hm-micro-text", embed_dim=32, unfreeze_text_blocks=1)
    config = TrainConfig(
        epochs=1,
        max_steps=20,
        query_weight=0,
        co_purchase_weight=0,
        query_tower_epochs=1,
        query_retrieval_epochs=0,
    )
    run_dir = train(data, model, config, root / "run")
    manifest = export_run(run_dir, data_dir, root / "model_repository", root / "index")
    settings = TritonSettings.on_free_ports(root / "model_repository", root)
    with (
        TritonServer(settings),
        RetrieverProcess(
            root / "index", f"127.0.0.1:{settings.http_port}", log_path=root / "retriever.log"
        ) as retriever,
    ):
        yield data, manifest, retriever


def test_hm_files_load_with_the_documented_shape() -> None:
    from twotower.data.hm import load_hm_dir

    data = load_hm_dir(require_hm())
    assert len(data.articles) == HM_ARTICLES
    assert len(data.transactions) == 240_092
    assert data.transactions["customer_id"].nunique() == 68_919


def test_full_catalogue_is_indexed_and_served(hm_served) -> None:
    data, manifest, retriever = hm_served
    assert manifest.item_count == HM_ARTICLES and manifest.index_type == "ivf"
    customer = data.transactions["customer_id"].iloc[0]
    never_bought = sorted(set(data.articles.index) - set(data.transactions["article_id"]))[:2]
    body = {
        "instances": [
            {"customer_id": customer},
            {"history": never_bought, "k": 5},
            {"query": "black jersey dress", "k": 5},
        ]
    }
    request = urllib.request.Request(
        retriever.predict_url, json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        predictions = json.loads(response.read())["predictions"]
    assert [len(p["items"]) for p in predictions] == [12, 5, 5]
    for prediction in predictions:
        for item in prediction["items"]:
            assert item["article_id"] in data.articles.index
            assert item["prod_name"] == data.articles.loc[item["article_id"], "prod_name"]
