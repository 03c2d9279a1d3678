"""The run directory: the contract between training (writer) and export (reader).

    config.json            model/train settings, open_clip model name, tokenizer context length
    model.pt               state dict of TwoTowerModel (CLIP text weights included: export needs no hub)
    metrics.json           per-epoch loss, in-batch accuracy, held-out recall@10, examples/s, the fits' numbers,
                           the query tower's distillation (held-out cosine to the item tower)
    item_ids.json          article_id of each row of the id-embedding table
    repeat_boost.json      twotower.repeats.RepeatBoost fitted on the held-out purchases
    popularity_prior.json  twotower.popularity.PopularityPrior, fitted after the boost
    second_stage.json      twotower.second_stage.StageWeights, fitted after the prior (absent: no stage)
    text_features.npy      a frozen text encoder's pooled features of every catalogue caption (optional):
                           export reuses them for the catalogue when config.json's captions_sha256 matches

Written to a temporary sibling and renamed, so a run directory is never half-written.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from twotower.artifacts import ArtifactError
from twotower.config import ModelConfig, from_dict
from twotower.files import staged_directory, write_json
from twotower.popularity import PopularityPrior
from twotower.repeats import RepeatBoost
from twotower.second_stage import StageWeights

CONFIG = "config.json"
WEIGHTS = "model.pt"
METRICS = "metrics.json"
ITEM_IDS = "item_ids.json"
REPEAT_BOOST = "repeat_boost.json"
POPULARITY_PRIOR = "popularity_prior.json"
SECOND_STAGE = "second_stage.json"
TEXT_FEATURES = "text_features.npy"


@dataclasses.dataclass
class Run:
    config: dict[str, Any]  # config.json as written: {"model", "train", "data", "context_length"}
    model_config: ModelConfig
    state: dict[str, torch.Tensor]
    item_ids: list[str]  # [] when trained without id vectors
    repeat_boost: RepeatBoost
    popularity_prior: PopularityPrior
    directory: Path
    second_stage: StageWeights | None = None

    @property
    def context_length(self) -> int:
        return int(self.config["context_length"])

    def text_features(self, captions: list[str]) -> np.ndarray | None:
        """The frozen encoder's features of `captions` if training computed them for exactly these texts."""
        path = self.directory / TEXT_FEATURES
        if not path.is_file() or self.config.get("captions_sha256") != texts_sha256(captions):
            return None
        return np.load(path, mmap_mode="r")

    @property
    def unseen_customer_share(self) -> float:
        """The share of customers (twotower.data.customers) training never saw."""
        return float(self.config["train"].get("unseen_customer_share", 0.0))

    @property
    def trained_until(self) -> str:
        """YYYY-MM-DD: training saw no purchase on or after this day ("" = all data)."""
        return str(self.config["train"].get("until", ""))


def write_run(
    out: Path,
    config: dict[str, Any],
    state: dict[str, torch.Tensor],
    item_ids: list[str],
    repeat_boost: RepeatBoost,
    popularity_prior: PopularityPrior,
    metrics: dict[str, Any],
    text_features: np.ndarray | None = None,
    second_stage: StageWeights | None = None,
) -> None:
    """Write (or replace) the run directory `out` whole."""
    with staged_directory(out, replace=True) as staging:
        if text_features is not None:
            np.save(staging / TEXT_FEATURES, np.ascontiguousarray(text_features, dtype=np.float32))
        write_json(staging / CONFIG, config)
        torch.save(state, staging / WEIGHTS)
        write_json(staging / ITEM_IDS, item_ids)
        write_json(staging / REPEAT_BOOST, repeat_boost.to_json())
        write_json(staging / POPULARITY_PRIOR, popularity_prior.to_json())
        write_json(staging / METRICS, metrics)
        if second_stage is not None:
            write_json(staging / SECOND_STAGE, second_stage.to_json())


def read_run(run_dir: Path) -> Run:
    config_path, weights_path = run_dir / CONFIG, run_dir / WEIGHTS
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(
                f"{path}: missing; is {run_dir} a run directory written by `python -m twotower.train`?"
            )
    try:
        config = json.loads(config_path.read_text())
        # Runs written before query towers were distilled have none (their text queries use the item tower).
        model_config = from_dict(ModelConfig, {"query_tower": False, **config["model"]})
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ArtifactError(f"{config_path}: not a run configuration written by twotower.train ({err!r})") from err
    try:
        state = torch.load(weights_path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for truncated/corrupt files
        raise ArtifactError(f"{weights_path}: unreadable weights ({type(err).__name__}: {err})") from err

    def optional(name: str) -> Any:  # runs trained before repeat boosts, priors or id vectors lack those files
        path = run_dir / name
        return json.loads(path.read_text()) if path.is_file() else None

    return Run(
        config,
        model_config,
        state,
        optional(ITEM_IDS) or [],
        RepeatBoost.from_json(optional(REPEAT_BOOST)),
        PopularityPrior.from_json(optional(POPULARITY_PRIOR)),
        run_dir,
        StageWeights.from_json(optional(SECOND_STAGE)),
    )


def texts_sha256(texts: list[str]) -> str:
    """Identifies a list of captions (order included): features are reused only for the same texts."""
    digest = hashlib.sha256()
    for text in texts:
        digest.update(text.encode("utf-8") + b"\0")
    return digest.hexdigest()
