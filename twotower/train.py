"""Train both towers with an in-batch softmax; write a self-contained run directory.

    python -m twotower.train --data-dir data/synthetic --out runs/demo

Run directory (written to a temporary sibling, then renamed, so it is never half-written):
    config.json   model/train settings, open_clip model name, tokenizer context length
    model.pt      state dict of TwoTowerModel (CLIP text weights included: export needs no hub)
    metrics.json  per-epoch loss, in-batch accuracy, held-out recall@10, examples/s
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from tqdm import tqdm

from twotower.config import ModelConfig, TrainConfig, add_arguments, from_arguments, write_json
from twotower.data.hm import DataFormatError, HMData, build_captions, load_hm_dir
from twotower.data.histories import Histories, TrainingExamples, training_examples
from twotower.model.clip_text import context_length_of, get_tokenizer
from twotower.model.towers import TwoTowerModel, build_model

log = logging.getLogger("twotower.train")

RUN_CONFIG = "config.json"
RUN_WEIGHTS = "model.pt"
RUN_METRICS = "metrics.json"
RUN_ITEM_IDS = "item_ids.json"  # article_id of each row of the id-embedding table


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def embed_items(model: TwoTowerModel, tokens: torch.Tensor, rows: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Indexed (hybrid) vectors of catalogue `rows`, without gradients."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        text = torch.cat([model.item_tower(tokens[rows[i : i + batch_size]]) for i in range(0, len(rows), batch_size)])
        out = model.hybrid(text, rows)
    model.train(was_training)
    return out


def history_tensors(histories: Histories, item_table: torch.Tensor, index: np.ndarray) -> tuple[torch.Tensor, ...]:
    rows = torch.from_numpy(histories.rows[index])
    mask = (rows >= 0).float()
    vectors = item_table[rows.clamp(min=0)] * mask.unsqueeze(-1)
    return vectors, mask, torch.from_numpy(histories.age_days[index])


def contrastive_loss(users: torch.Tensor, items: torch.Tensor, targets: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """In-batch softmax; another row with the same target article is not a negative."""
    cosine = users @ items.T
    same_item = (targets.unsqueeze(0) == targets.unsqueeze(1)) & ~torch.eye(len(targets), dtype=torch.bool)
    logits = (cosine / temperature).masked_fill(same_item, float("-inf"))
    labels = torch.arange(len(targets))
    return F.cross_entropy(logits, labels), cosine


def score_head_loss(model: TwoTowerModel, cosine: torch.Tensor) -> torch.Tensor:
    """The score head learns "bought vs not" from the batch's pairs, positives and negatives weighted
    equally, so a score of 0.5 is the boundary; it reads detached cosines and never moves the towers."""
    labels = torch.eye(len(cosine))
    pos_weight = torch.tensor(float(len(cosine) - 1))
    return F.binary_cross_entropy_with_logits(model.score_head.logits(cosine.detach()), labels, pos_weight=pos_weight)


def recall_at_k(model: TwoTowerModel, examples: TrainingExamples, item_table: torch.Tensor, rows: np.ndarray, k: int = 10) -> float:
    """Held-out recall@k against all items the training data knows (`rows`)."""
    if len(examples) == 0:
        return float("nan")
    model.eval()
    candidates = item_table[torch.from_numpy(rows)]
    hits = 0
    with torch.no_grad():
        for start in range(0, len(examples), 512):
            index = np.arange(start, min(start + 512, len(examples)))
            users = model.user_tower(*history_tensors(examples.histories, item_table, index))
            top = (users @ candidates.T).topk(min(k, len(rows)), dim=1).indices.numpy()
            hits += int((rows[top] == examples.targets[index, None]).any(axis=1).sum())
    model.train()
    return hits / len(examples)


def split_examples(examples: TrainingExamples, max_holdout: int = 2000) -> tuple[TrainingExamples, TrainingExamples]:
    """Hold out the latest purchases (never a random split: the future must not leak)."""
    order = np.argsort(examples.days, kind="stable")
    n_holdout = min(max_holdout, max(1, len(order) // 10))
    parts = order[:-n_holdout], order[-n_holdout:]

    def take(index: np.ndarray) -> TrainingExamples:
        h = examples.histories
        return TrainingExamples(Histories(h.rows[index], h.age_days[index]), examples.targets[index], examples.days[index])

    return take(parts[0]), take(parts[1])


def train(data: HMData, model_config: ModelConfig, train_config: TrainConfig, out: Path, force: bool = False) -> Path:
    """Train and write the run directory `out`; returns it."""
    out = Path(out)
    if out.exists() and not force:
        raise FileExistsError(f"run directory {out} exists (pass --force to replace it)")
    seed_everything(train_config.seed)
    if train_config.threads > 0:
        torch.set_num_threads(train_config.threads)

    row_of = {article_id: i for i, article_id in enumerate(data.article_ids)}
    transactions = data.transactions
    if train_config.until:
        transactions = transactions[transactions["t_dat"] < pd.Timestamp(train_config.until)]
        log.info("training on %d purchases before %s (of %d)", len(transactions), train_config.until, len(data.transactions))
    examples = training_examples(transactions, row_of, model_config.max_history)
    if len(examples) < 2:
        raise ValueError(f"{data.source}: need at least 2 customers with 2+ purchases to train, found {len(examples)} examples")
    train_set, holdout = split_examples(examples)
    used_rows = np.unique(np.concatenate([examples.targets, examples.histories.rows[examples.histories.rows >= 0]]))
    log.info("%d articles, %d purchases -> %d training / %d held-out examples over %d distinct articles",
             len(row_of), len(transactions), len(train_set), len(holdout), len(used_rows))

    captions = build_captions(data.articles.iloc[used_rows])
    tokenizer = get_tokenizer(model_config.clip_model)
    tokens_used = tokenizer(captions)
    tokens = torch.zeros((len(row_of), tokens_used.shape[1]), dtype=torch.long)
    tokens[torch.from_numpy(used_rows)] = tokens_used

    model = build_model(model_config, n_items=len(row_of))
    model.train()
    head = list(model.score_head.parameters())
    towers = [p for p in model.parameters() if p.requires_grad and all(p is not h for h in head)]
    optimiser = torch.optim.AdamW(
        [{"params": towers}, {"params": head, "lr": train_config.score_head_lr, "weight_decay": 0.0}],
        lr=train_config.lr, weight_decay=train_config.weight_decay,
    )
    generator = np.random.default_rng(train_config.seed)
    item_table = torch.zeros((len(row_of), model_config.embed_dim))
    epochs: list[dict] = []
    step = 0
    for epoch in range(train_config.epochs):
        # History vectors come from a per-epoch snapshot of the item tower: cheap, and stable targets.
        used = torch.from_numpy(used_rows)
        item_table[used] = embed_items(model, tokens, used, train_config.item_batch_size)
        order = generator.permutation(len(train_set))
        batches = [order[i : i + train_config.batch_size] for i in range(0, len(order), train_config.batch_size)]
        batches = [b for b in batches if len(b) >= 2]
        losses, accuracies, started = [], [], time.perf_counter()
        progress = tqdm(batches, desc=f"epoch {epoch + 1}/{train_config.epochs}", unit="batch", disable=None)
        for index in progress:
            targets = torch.from_numpy(train_set.targets[index])
            users = model.user_tower(*history_tensors(train_set.histories, item_table, index))
            keep = (torch.rand(len(targets)) >= model_config.item_id_dropout).float()
            items = model.hybrid(model.item_tower(tokens[targets]), targets, keep)
            loss, cosine = contrastive_loss(users, items, targets, train_config.temperature)
            total = loss + score_head_loss(model, cosine)
            optimiser.zero_grad(set_to_none=True)
            total.backward()
            optimiser.step()
            losses.append(loss.item())
            accuracies.append((cosine.argmax(dim=1) == torch.arange(len(index))).float().mean().item())
            progress.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
            step += 1
            if train_config.max_steps and step >= train_config.max_steps:
                break
        seconds = time.perf_counter() - started
        n_seen = sum(len(b) for b in batches[: len(losses)])
        item_table[used] = embed_items(model, tokens, used, train_config.item_batch_size)
        record = {
            "epoch": epoch + 1,
            "loss": float(np.mean(losses)),
            "in_batch_accuracy": float(np.mean(accuracies)),
            "holdout_recall_at_10": recall_at_k(model, holdout, item_table, used_rows),
            "examples_per_second": n_seen / seconds if seconds > 0 else float("nan"),
            "seconds": seconds,
        }
        epochs.append(record)
        log.info("epoch %d: loss %.4f, in-batch acc %.3f, held-out recall@10 %.4f, %.0f examples/s",
                 record["epoch"], record["loss"], record["in_batch_accuracy"], record["holdout_recall_at_10"],
                 record["examples_per_second"])
        if train_config.max_steps and step >= train_config.max_steps:
            break

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        write_json(staging / RUN_CONFIG, {
            "model": dataclasses.asdict(model_config),
            "train": dataclasses.asdict(train_config),
            "data": {"source": data.source, "articles": len(row_of), "transactions": len(data.transactions)},
            "context_length": context_length_of(model_config.clip_model),
        })
        torch.save(model.state_dict(), staging / RUN_WEIGHTS)
        write_json(staging / RUN_ITEM_IDS, data.article_ids)
        write_json(staging / RUN_METRICS, {"epochs": epochs, "examples": len(train_set), "holdout": len(holdout)})
        if out.exists():
            shutil.rmtree(out)
        os.replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("wrote run directory %s", out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", required=True, help="H&M-format directory (articles.csv[.gz], transactions_train.csv[.gz])")
    parser.add_argument("--out", required=True, help="run directory to write")
    parser.add_argument("--force", action="store_true", help="replace an existing run directory")
    add_arguments(parser, ModelConfig)
    add_arguments(parser, TrainConfig)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        data = load_hm_dir(args.data_dir)
        train(data, from_arguments(ModelConfig, args), from_arguments(TrainConfig, args), Path(args.out), force=args.force)
    except (DataFormatError, FileNotFoundError, FileExistsError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
