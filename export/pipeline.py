"""Export a trained run for serving (the steps behind `python -m export`).

1. traces both towers to TorchScript and refuses to export one whose output differs from
   eager execution by more than the tolerance (default 1e-5);
2. embeds the whole catalogue through the serialised item tower, builds the FAISS index and
   writes the index directory with its manifest (checked by the retriever at load);
3. writes the towers as the next version of `item_tower`, `user_tower` and, when the run distilled
   one, `query_tower` in the Triton model repository, with config.pbtxt (pytorch_libtorch, dynamic
   batching, KIND_AUTO).
Each output appears whole or not at all; a failure before step 3 leaves the repository untouched.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import logging
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch

from export.catalogue_index import (
    build_faiss_index,
    embed_catalogue,
    embed_customers,
    item_metadata,
    new_version_dir,
    resolve_index_type,
    write_index_dir,
)
from export.torchscript import (
    DEFAULT_TOLERANCE,
    ExportMismatchError,
    int8_linear_layers,
    serialise,
    trace_and_verify,
)
from serving.lexical import LexicalIndex
from twotower import artifacts, popularity, rundir
from twotower.config import ModelConfig
from twotower.data.histories import day_numbers, latest_histories
from twotower.data.hm import build_captions, load_hm_dir
from twotower.model.clip_text import get_tokenizer
from twotower.model.towers import TwoTowerModel, build_model
from twotower.second_stage import ArticleSignals
from twotower.triton_repository import next_version, query_spec, tower_specs, write_model

log = logging.getLogger("export")


def load_run(run_dir: Path) -> tuple[TwoTowerModel, rundir.Run]:
    """The trained model of a run directory (eval mode) and what else the run wrote."""
    run = rundir.read_run(run_dir)
    n_items = len(run.item_ids) if "item_ids.weight" in run.state else 0
    return build_model(run.model_config, run.state, n_items=n_items).eval(), run


def with_id_vectors(
    model: TwoTowerModel, text_vectors: np.ndarray, article_ids: list[str], trained_ids: list[str]
) -> np.ndarray:
    """Hybrid vectors for the index: articles the model was trained with get their id vector added."""
    if model.item_ids is None:
        return text_vectors
    trained_row = {article_id: row for row, article_id in enumerate(trained_ids)}
    rows = torch.tensor([trained_row.get(a, -1) for a in article_ids], dtype=torch.long)
    with torch.no_grad():
        hybrid = model.hybrid(torch.tensor(text_vectors), rows).numpy()
    learned = (model.item_ids.weight.detach().abs().sum(dim=1) > 0)[rows.clamp(min=0)] & (rows >= 0)
    log.info(
        "%d of %d articles carry a learned id vector; the rest are indexed by text alone",
        int(learned.sum()),
        len(article_ids),
    )
    return np.ascontiguousarray(hybrid, dtype=np.float32)


def user_examples(config: ModelConfig, seed: int = 0) -> list[tuple[torch.Tensor, ...]]:
    """Histories of varied lengths at several batch sizes, for the eager-vs-TorchScript check."""
    generator = torch.Generator().manual_seed(seed)
    examples = []
    for batch in (4, 1, 9):
        history = torch.nn.functional.normalize(
            torch.randn(batch, config.max_history, config.embed_dim, generator=generator), dim=-1
        )
        lengths = torch.randint(1, config.max_history + 1, (batch,), generator=generator)
        mask = (torch.arange(config.max_history) < lengths[:, None]).float()
        age = torch.rand(batch, config.max_history, generator=generator) * 30 * mask
        examples.append((history * mask.unsqueeze(-1), mask, age))
    return examples


def catalogue_vectors(
    model: TwoTowerModel,
    run: rundir.Run,
    exported_item_tower: torch.jit.ScriptModule,
    captions: list[str],
    tokenizer: Callable[[list[str]], torch.Tensor],
    options: ExportOptions,
    checked: int = 64,
) -> np.ndarray:
    """Text vectors of the catalogue through the exported item tower. When training kept a frozen encoder's
    features of exactly these captions, only the projection runs over them (13 min -> seconds on H&M with
    2 cores); the exported tower must then agree on a sample of `checked` articles, or nothing is written."""
    # The run's features are the fp32 encoder's: an int8 tower embeds the catalogue itself.
    features = None if options.item_tower_int8 else run.text_features(captions)
    if features is None:
        return embed_catalogue(exported_item_tower, captions, tokenizer, options.embed_batch_size)
    with torch.no_grad():
        vectors = model.item_tower.project(torch.from_numpy(np.array(features))).numpy()
    sample = np.random.default_rng(0).choice(len(captions), min(checked, len(captions)), replace=False)
    exported = embed_catalogue(exported_item_tower, [captions[i] for i in sample], tokenizer)
    difference = float(np.abs(exported - vectors[sample]).max())
    if not difference <= options.tolerance:
        raise ExportMismatchError(
            f"{rundir.TEXT_FEATURES}: the exported item tower differs from the run's features by "
            f"{difference:.3g} (> {options.tolerance:g}) on {len(sample)} articles; nothing written"
        )
    log.info(
        "catalogue vectors from the run's %s (exported tower vs features on %d articles: max |diff| %.2e)",
        rundir.TEXT_FEATURES,
        len(sample),
        difference,
    )
    return np.ascontiguousarray(vectors, dtype=np.float32)


@dataclasses.dataclass
class ExportOptions:
    version: int = 0  # Triton model version; 0 = next free
    max_batch_size: int = 64
    queue_delay_us: int = 200  # dynamic batching max_queue_delay_microseconds
    index_type: str = "auto"
    embed_batch_size: int = 512
    tolerance: float = DEFAULT_TOLERANCE
    # int8 Linear layers in the exported item tower, for CPU serving (export.torchscript.int8_linear_layers):
    # queries ~3.4x cheaper; the catalogue is then embedded through the int8 tower too, so both sides match
    item_tower_int8: bool = False
    # How vectors.npy stores the catalogue (artifacts.VECTOR_DTYPES): float16 halves what every read of the
    # vectors pages in, for catalogues whose float32 vectors would not stay in the pod's page cache (docs/scale.md)
    vector_dtype: str = "float32"
    # An IVF index's lists probed per served prior weight: the fewest (of the retriever's nprobe x 1-4) at which
    # 200 stored customers' lists find this share of their exact top 10 (serving.nprobe); 0 = the served nprobe
    ivf_recall_target: float = 0.90


def export_run(
    run_dir: Path, data_dir: Path, model_repository: Path, index_dir: Path, options: ExportOptions | None = None
) -> artifacts.Manifest:
    """Trace + verify the towers, embed the catalogue, write the index, then the Triton model versions."""
    options = options or ExportOptions()
    model, run = load_run(Path(run_dir))
    config: ModelConfig = model.config
    context_length = run.context_length
    data = load_hm_dir(data_dir)
    captions = build_captions(data.articles)
    tokenizer = get_tokenizer(config.clip_model)

    sample_ids = tokenizer(captions[:16])
    # Other batch sizes and, for a pretrained backbone, other lengths (it pads to the longest text).
    item_examples = [(sample_ids,), (sample_ids[:1],), (tokenizer(captions[16:19]),), (tokenizer(["black dress"]),)]
    item_module = int8_linear_layers(model.item_tower) if options.item_tower_int8 else model.item_tower
    item_ts, item_diff = trace_and_verify(artifacts.ITEM_MODEL, item_module, item_examples, options.tolerance)
    user_ts, user_diff = trace_and_verify(
        artifacts.USER_MODEL, model.user_tower, user_examples(config), options.tolerance
    )
    log.info("TorchScript vs eager max |diff|: item %.2e, user %.2e", item_diff, user_diff)
    query_bytes = b""
    if model.query_tower is not None:  # the same inputs as the item tower: short queries and captions
        query_ts, query_diff = trace_and_verify(
            artifacts.QUERY_MODEL, model.query_tower, item_examples, options.tolerance
        )
        log.info("TorchScript vs eager max |diff|: query %.2e", query_diff)
        query_bytes = serialise(query_ts)

    started = time.perf_counter()
    # Serialised once: these exact bytes are embedded with, checksummed and written for Triton.
    item_bytes, user_bytes = serialise(item_ts), serialise(user_ts)
    exported_item_tower = torch.jit.load(io.BytesIO(item_bytes))
    vectors = catalogue_vectors(model, run, exported_item_tower, captions, tokenizer, options)
    vectors = with_id_vectors(model, vectors, data.article_ids, run.item_ids)
    seconds = time.perf_counter() - started
    log.info("embedded %d articles in %.1fs (%.0f items/s)", len(vectors), seconds, len(vectors) / seconds)

    item_spec, user_spec = tower_specs(config, context_length, options.max_batch_size, options.queue_delay_us)
    served = {item_spec: item_bytes, user_spec: user_bytes}
    if query_bytes:
        served[query_spec(item_spec)] = query_bytes
    version = options.version or next_version(Path(model_repository), [spec.name for spec in served])
    row_of = {article_id: i for i, article_id in enumerate(data.article_ids)}
    customers, histories, last_day = latest_histories(data.transactions, row_of, config.max_history)
    # Known customers' vectors, computed once with the exported user tower: customer_id requests skip Triton.
    reference_day = int(day_numbers(data.transactions["t_dat"]).max())
    served_ages = histories.age_days + (reference_day - last_day)[:, None].astype(np.float32)
    started = time.perf_counter()
    user_vectors = embed_customers(torch.jit.load(io.BytesIO(user_bytes)), vectors, histories.rows, served_ages)
    log.info("embedded %d known customers in %.1fs", len(user_vectors), time.perf_counter() - started)
    head = model.score_head.layers
    prior = run.popularity_prior
    # Counted up to the day training stopped: an evaluation's target day never feeds its own prior.
    until = run.trained_until
    prior_before = pd.Timestamp(until) if until else pd.Timestamp(reference_day + 1, unit="D")
    item_bias = popularity.item_bias(data.transactions, row_of, len(vectors), prior_before, prior.window_days)
    log.info(
        "popularity prior: weight %g on log1p(purchases in the %d days before %s); %d articles bought then",
        prior.weight,
        prior.window_days,
        prior_before.date(),
        int((item_bias > 0).sum()),
    )
    signals = None
    if run.second_stage is not None:  # counted as the prior is: the target day of an evaluation stays unseen
        signals = ArticleSignals.count(data.transactions, row_of, len(vectors), prior_before)
        log.info("second stage: %d co-purchase pairs before %s", len(signals.co_counts), prior_before.date())
    index_root = Path(index_dir)
    # One writer of the root at a time: a catalogue update running now would otherwise publish on top of
    # the version this one replaces.
    with artifacts.writer_lock(index_root):
        out = new_version_dir(index_root)
        index_type = resolve_index_type(options.index_type, len(vectors))
        started = time.perf_counter()
        index = build_faiss_index(vectors, index_type, item_bias)
        log.info("built %s index over %d items in %.1fs", index_type, len(vectors), time.perf_counter() - started)
        manifest = write_index_dir(
            out,
            index,
            vectors,
            item_metadata(data.articles, data.transactions),
            {
                "customer_ids": np.asarray(customers),
                "rows": histories.rows.astype(np.int32),
                "age_days": histories.age_days,
                "last_day": last_day,
                "user_vectors": user_vectors,
            },
            artifacts.ScoreHeadWeights(
                head[0].weight.detach().numpy()[:, 0],
                head[0].bias.detach().numpy(),
                head[2].weight.detach().numpy()[0],
                float(head[2].bias.item()),
                run.repeat_boost,
                prior,
                run.second_stage,
            ),
            {
                "index_type": index_type,
                "model_version": version,
                "customer_count": len(customers),
                "max_history": config.max_history,
                "context_length": context_length,
                "clip_model": config.clip_model,
                "item_tower_precision": "int8" if options.item_tower_int8 else "fp32",
                "vector_dtype": options.vector_dtype,
                "reference_day": reference_day,
                "data_source": str(data_dir),
                "trained_until": run.trained_until,
                "unseen_customer_share": run.unseen_customer_share,
                "tower_checksums": {spec.name: hashlib.sha256(data).hexdigest() for spec, data in served.items()},
                "query_model": artifacts.QUERY_MODEL if query_bytes else "",
            },
            item_bias=item_bias,
            lexical=LexicalIndex.build(captions),
            signals=signals,
            ivf_recall_target=options.ivf_recall_target,
        )
        # Models next, CURRENT last: a failure before leaves the repository and the served index untouched.
        # A retriever watching the root swaps only once Triton serves the version this index names.
        paths = [str(write_model(Path(model_repository), spec, version, data)) for spec, data in served.items()]
        log.info("wrote %s (version %d)", ", ".join(paths), version)
        artifacts.publish_version(index_root, out.name)
    log.info(
        "published index %s: %d items, dim %d, %s index, %d customers, model version %d",
        out,
        manifest.item_count,
        manifest.dim,
        manifest.index_type,
        manifest.customer_count,
        version,
    )

    return manifest
