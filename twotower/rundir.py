"""The run directory: the contract between training (writer) and export (reader).

    config.json            model/train settings, open_clip model name, tokenizer context length
    model.pt               state dict of TwoTowerModel (CLIP text weights included: export needs no hub)
    metrics.json           per-epoch loss, in-batch accuracy, held-out recall@10, examples/s, the fits' numbers
    item_ids.json          article_id of each row of the id-embedding table
    repeat_boost.json      twotower.repeats.RepeatBoost fitted on the held-out purchases
    popularity_prior.json  twotower.popularity.PopularityPrior, fitted after the boost

Written to a temporary sibling and renamed, so a run directory is never half-written.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch

from twotower.artifacts import ArtifactError
from twotower.config import ModelConfig, from_dict
from twotower.files import staged_directory, write_json
from twotower.popularity import PopularityPrior
from twotower.repeats import RepeatBoost

CONFIG = "config.json"
WEIGHTS = "model.pt"
METRICS = "metrics.json"
ITEM_IDS = "item_ids.json"
REPEAT_BOOST = "repeat_boost.json"
POPULARITY_PRIOR = "popularity_prior.json"


@dataclasses.dataclass
class Run:
    config: dict[str, Any]  # config.json as written: {"model", "train", "data", "context_length"}
    model_config: ModelConfig
    state: dict[str, torch.Tensor]
    item_ids: list[str]  # [] when trained without id vectors
    repeat_boost: RepeatBoost
    popularity_prior: PopularityPrior

    @property
    def context_length(self) -> int:
        return int(self.config["context_length"])

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
) -> None:
    """Write (or replace) the run directory `out` whole."""
    with staged_directory(out, replace=True) as staging:
        write_json(staging / CONFIG, config)
        torch.save(state, staging / WEIGHTS)
        write_json(staging / ITEM_IDS, item_ids)
        write_json(staging / REPEAT_BOOST, repeat_boost.to_json())
        write_json(staging / POPULARITY_PRIOR, popularity_prior.to_json())
        write_json(staging / METRICS, metrics)


def read_run(run_dir: Path) -> Run:
    config_path, weights_path = run_dir / CONFIG, run_dir / WEIGHTS
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(
                f"{path}: missing; is {run_dir} a run directory written by `python -m twotower.train`?"
            )
    try:
        config = json.loads(config_path.read_text())
        model_config = from_dict(ModelConfig, config["model"])
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
    )
