"""End-to-end demo: data -> train -> export -> real Triton + real KServe retriever -> requests.

    python examples/demo.py                       # built-in synthetic H&M-format shop
    python examples/demo.py --data-dir ../shared/data/hm_lastweek

Starts both servers on free loopback ports, sends a few recommendation requests (a known
customer, a new customer given only a history, a free-text query, "more like this" with a filter),
adds a new article to the live catalogue without retraining or restarting, prints the results with
the measured latency, and stops both servers whatever happens.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from export.catalogue_update import triton_embedder, update_catalogue
from export.pipeline import export_run
from localtriton import TritonServer, TritonSettings
from retriever.launch import RetrieverProcess
from twotower import artifacts
from twotower.config import ModelConfig, TrainConfig
from twotower.data.hm import build_captions, load_hm_dir
from twotower.data.synthetic import generate
from twotower.train import train

log = logging.getLogger("demo")


def post(url: str, body: dict) -> tuple[dict, float]:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    started = time.perf_counter()
    with urllib.request.urlopen(request, timeout=30) as response:
        payload = json.loads(response.read())
    return payload, (time.perf_counter() - started) * 1000


def show(title: str, prediction: dict, latency_ms: float) -> None:
    print(f"\n=== {title}  ({latency_ms:.1f} ms)")
    for rank, item in enumerate(prediction["items"], 1):
        print(
            f"  {rank:2d}. {item['article_id']}  {item['prod_name']:<28.28} {item['colour_group_name']:<12.12} "
            f"{item['product_type_name']:<14.14} score {item['score']:.3f}  similarity {item['similarity']:.3f}"
        )


def add_article_live(data, index_dir: Path, triton_url: str, retriever: RetrieverProcess) -> None:
    """A new article goes into the served catalogue: embedded by Triton, swapped in without restart."""
    delta = data.articles.iloc[:1].copy()
    with tempfile.TemporaryDirectory() as tmp:
        delta["article_id"] = "0999000001"
        delta["prod_name"] = "Aurora sequin " + delta["product_type_name"].str.lower()
        delta["detail_desc"] = "Shiny fluorescent fabric covered in sequins"
        delta.to_csv(Path(tmp) / "new_articles.csv", index=False)
        summary = update_catalogue(index_dir, lambda m: triton_embedder(triton_url, m), Path(tmp) / "new_articles.csv")
    reload, _ = post(f"{retriever.url}/admin/index/reload", {})
    print(
        f"\nadded 1 article as index {summary.index_version} (parent {summary.parent_version}); "
        f"the retriever now serves {reload['index_version']}, without a restart"
    )
    # The tiny demo model never saw words like "sequin": search with the new article's own caption,
    # which the item tower maps to exactly its indexed vector (cosine 1).
    caption = build_captions(delta)[0]
    payload, latency = post(retriever.predict_url, {"instances": [{"query": caption, "k": 3}]})
    show(f"text query {caption[:60]!r}... after the update", payload["predictions"][0], latency)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default="", help="H&M-format directory; empty = generate the synthetic shop")
    parser.add_argument(
        "--work-dir", type=Path, default=Path("."), help="where data/, runs/, model_repository/ and artifacts/ go"
    )
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--max-steps", type=int, default=0, help="cap training steps (useful on the full H&M data)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    work = args.work_dir
    started = time.perf_counter()

    data_dir = Path(args.data_dir) if args.data_dir else generate(work / "data" / "synthetic", seed=0)
    data = load_hm_dir(data_dir)
    run_dir = train(
        data,
        ModelConfig(),
        TrainConfig(epochs=args.epochs, max_steps=args.max_steps),
        work / "runs" / "demo",
        force=True,
    )
    repository, index_dir = work / "model_repository", work / "artifacts" / "index"
    # The demo's own outputs from an earlier run (model_repository/README.md is the project's: it stays).
    models = (artifacts.ITEM_MODEL, artifacts.USER_MODEL, artifacts.QUERY_MODEL)
    for stale in (index_dir, *(repository / model for model in models)):
        shutil.rmtree(stale, ignore_errors=True)
    export_run(run_dir, data_dir, repository, index_dir)

    settings = TritonSettings.on_free_ports(repository, work / ".localtriton")
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    with (
        TritonServer(settings) as triton,
        # The synthetic shop's purchases are dated 2020: ages as of its last day, not today's clock.
        RetrieverProcess(
            index_dir,
            f"127.0.0.1:{settings.http_port}",
            log_path=settings.state_dir / "retriever-demo.log",
            extra_args=["--history-clock", "index"],
        ) as retriever,
    ):
        print(
            f"\nTriton pid {triton.pid} at {settings.http_url}; "
            f"retriever pid {retriever.process.pid} at {retriever.url}"
        )
        customers = data.transactions["customer_id"].value_counts()
        known = str(customers.index[0])
        history = data.transactions.loc[data.transactions["customer_id"] == known, "article_id"].tolist()
        print(f"\nknown customer {known[:16]}... bought:")
        for article_id in history[-5:]:
            row = data.articles.loc[article_id]
            print(
                f"      {article_id}  {row['prod_name']:<28.28} {row['colour_group_name']:<12.12} "
                f"{row['product_type_name']}"
            )
        new_history = data.articles.index[[3, 4]].tolist()
        requests = [
            ("known customer", {"customer_id": known, "k": 5}),
            (f"new customer with history {new_history}", {"history": new_history, "k": 5}),
            ("text query 'black jersey dress'", {"query": "black jersey dress", "k": 5, "debug": True}),
        ]
        group = str(data.articles.loc[history[-1], "product_group_name"])
        requests.append(
            (
                f"more like {history[-1]}, only {group}",
                {"similar_to": history[-1], "k": 5, "filters": {"product_group": [group]}},
            )
        )
        for title, instance in requests:
            payload, latency = post(retriever.predict_url, {"instances": [instance]})
            show(title, payload["predictions"][0], latency)
        add_article_live(data, index_dir, settings.http_url, retriever)
        latencies = [
            post(retriever.predict_url, {"instances": [instance]})[1] for _ in range(20) for _, instance in requests
        ]
        print(
            f"\nlatency over {len(latencies)} sequential requests: p50 {statistics.median(latencies):.1f} ms, "
            f"max {max(latencies):.1f} ms (HTTP client -> KServe -> Triton -> FAISS -> response)"
        )
    print(f"\ndemo finished in {time.perf_counter() - started:.0f}s; both servers stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
