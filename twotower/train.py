"""Train both towers with an in-batch softmax; write a self-contained run directory (twotower.rundir).

python -m twotower.train --data-dir data/synthetic --out runs/demo
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import math
import random
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from tqdm import tqdm

from twotower import fitting, popularity, ranking, repeats, rundir, second_stage
from twotower.config import ModelConfig, TrainConfig, add_arguments, from_arguments
from twotower.data import pairs
from twotower.data.customers import unseen_customers
from twotower.data.histories import Histories, TrainingExamples, training_examples
from twotower.data.hm import DataFormatError, HMData, build_captions, load_hm_dir
from twotower.model.clip_text import context_length_of, get_tokenizer
from twotower.model.pretrained_text import PAD_ID, encode_batch_size, features_id, is_pretrained_backbone
from twotower.model.query_tower import PhraseArticles, distil, learn_retrieval
from twotower.model.towers import PretrainedItemTower, TwoTowerModel, build_model, embed_texts
from twotower.text_feature_cache import TextFeatureCache

log = logging.getLogger("twotower.train")

RETRIEVAL_BATCH = 256  # query phrases per step of the query tower's retrieval training


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@contextlib.contextmanager
def evaluating(module: torch.nn.Module) -> Iterator[None]:
    """The module in eval mode (no dropout) for the block, then back to the mode it was in."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


class TextVectors:
    """Text-tower vectors of a list of texts (catalogue captions or query phrases) while training.

    A frozen encoder (the pretrained default) runs once per text: its pooled features are kept (between runs
    too, with a `cache`) and only the projection runs per step. A trainable one (the small from-scratch
    configs) runs on the token ids.
    """

    def __init__(
        self,
        model: TwoTowerModel,
        texts: list[str],
        batch_size: int,
        description: str,
        cache: TextFeatureCache | None = None,
    ):
        self.tower = model.item_tower
        self.texts = texts
        self.batch_size = batch_size
        tokenizer = get_tokenizer(model.config.clip_model)
        self.features: torch.Tensor | None = None
        self.tokens: torch.Tensor | None = None
        if self.tower.encoder_frozen:
            started = time.perf_counter()
            encoder_batch = encode_batch_size(model.config.clip_model, batch_size)

            def encode(batch: list[str]) -> np.ndarray:
                with evaluating(self.tower):
                    return embed_texts(self.tower.features, tokenizer, batch, encoder_batch, description).numpy()

            self.features = torch.from_numpy(encode(texts) if cache is None else cache.features(texts, encode))
            seconds = time.perf_counter() - started
            log.info("%s: frozen encoder features of %d texts in %.0fs", description, len(texts), seconds)
        else:
            self.tokens = tokenizer(texts)

    def __len__(self) -> int:
        source = self.features if self.features is not None else self.tokens
        assert source is not None
        return len(source)

    def __call__(self, rows: torch.Tensor) -> torch.Tensor:
        """Vectors of `rows`, with gradients into what trains."""
        if self.features is not None:
            return self.tower.project(self.features[rows])
        assert self.tokens is not None
        return self.tower(self.tokens[rows])

    def table(self) -> torch.Tensor:
        """Vectors of every text, without gradients."""
        starts = range(0, len(self), self.batch_size)
        with evaluating(self.tower), torch.no_grad():
            return torch.cat([self(torch.arange(i, min(i + self.batch_size, len(self)))) for i in starts])


def train_query_tower(
    model: TwoTowerModel,
    phrases: TextVectors,
    caption_texts: list[str],
    caption_table: torch.Tensor,
    queries: pairs.QueryPairs,
    phrase_ids: np.ndarray,
    item_table: torch.Tensor,
    product_types: np.ndarray,
    config: TrainConfig,
) -> dict[str, Any]:
    """Fit the query tower to the trained item tower's vectors of the query phrases and captions, then
    teach it to find each phrase's article among `item_table` (the indexed vectors, already normalised).

    `caption_table` holds the item tower's vectors of `caption_texts`, as training's last epoch computed them:
    a trainable text tower would spend a pass over the whole catalogue recomputing them (~1 min for 105k H&M
    captions)."""
    assert model.query_tower is not None
    texts = phrases.texts + caption_texts
    targets = torch.cat([phrases.table(), caption_table])
    tokens = torch.as_tensor(get_tokenizer(model.config.clip_model)(texts))
    report: dict[str, Any] = distil(
        model.query_tower, tokens, targets, PAD_ID, config.query_tower_epochs, seed=config.seed
    )
    log.info(
        "query tower: %d texts in %.0fs, held-out cosine to the item tower %.3f (5th percentile %.3f)",
        len(texts),
        report["seconds"],
        report.get("held_out_cosine", float("nan")),
        report.get("held_out_cosine_p05", float("nan")),
    )
    steps = math.ceil(config.query_retrieval_epochs * len(queries) / RETRIEVAL_BATCH)
    if steps > 0:
        articles = PhraseArticles(
            tokens[: len(phrases.texts)][torch.from_numpy(phrase_ids)], queries.rows, queries.described, product_types
        )
        retrieval = learn_retrieval(
            model.query_tower, articles, item_table, PAD_ID, steps, batch_size=RETRIEVAL_BATCH, seed=config.seed
        )
        log.info(
            "query tower: %d steps finding the phrases' articles in %.0fs, held-out phrases whose article "
            "ranks first among the sampled candidates %.3f",
            steps,
            retrieval["seconds"],
            retrieval.get("held_out_top1", float("nan")),
        )
        report["retrieval"] = retrieval
    return report


# Examples with at most this many purchases run through the user tower apart from longer ones (user_vectors).
SHORT_HISTORY = 5


def history_tensors(
    histories: Histories, item_vectors: Callable[[torch.Tensor], torch.Tensor], index: np.ndarray, length: int
) -> tuple[torch.Tensor, ...]:
    """User-tower inputs for examples `index`, their first `length` purchases; `item_vectors` maps catalogue
    rows to indexed item vectors."""
    rows = torch.from_numpy(histories.rows[index, :length])
    mask = (rows >= 0).float()
    vectors = item_vectors(rows.clamp(min=0)) * mask.unsqueeze(-1)
    return vectors, mask, torch.from_numpy(histories.age_days[index, :length])


def user_vectors(
    model: TwoTowerModel,
    histories: Histories,
    item_vectors: Callable[[torch.Tensor], torch.Tensor],
    index: np.ndarray,
) -> torch.Tensor:
    """The user tower over examples `index`, in their order. Histories are padded to max_history (20) but
    H&M's hold 4 purchases on average: the short ones (<= SHORT_HISTORY) and the rest each run cut to their
    longest history. Padding never reaches a purchase's position (masked keys, masked mean), so the vectors
    are the same for the same weights, and a training step's user tower takes half the time (forward +
    backward of a batch of 128 on these 2 cores, two rounds: 121 and 92 ms padded, 58 and 44 ms cut)."""
    if len(index) == 0:
        return torch.zeros((0, model.config.embed_dim))
    batch = histories.take(index)
    lengths = batch.lengths  # purchases come first in a history, padding after them
    parts = [
        part
        for part in (np.flatnonzero(lengths <= SHORT_HISTORY), np.flatnonzero(lengths > SHORT_HISTORY))
        if len(part)
    ]
    vectors = [
        model.user_tower(*history_tensors(batch, item_vectors, part, max(1, int(lengths[part].max()))))
        for part in parts
    ]
    return torch.cat(vectors)[torch.from_numpy(np.argsort(np.concatenate(parts)))]


def contrastive_loss(
    users: torch.Tensor,
    items: torch.Tensor,
    targets: torch.Tensor,
    temperature: float,
    log_frequency: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """In-batch softmax; another row with the same target article is not a negative.

    In-batch negatives are drawn as often as articles are bought, so the plain softmax learns
    lift (popular articles pushed down). With `log_frequency` (logQ correction) each column's
    logit is lowered by log(its sampling frequency) during training only, and the cosine itself
    learns to rank by purchase likelihood, which is what full-catalogue retrieval needs.
    """
    same_item = targets.unsqueeze(0) == targets.unsqueeze(1)
    column_bias = None if log_frequency is None else -log_frequency[targets]
    return in_batch_softmax(users, items, same_item, temperature, column_bias)


def in_batch_softmax(
    left: torch.Tensor,
    right: torch.Tensor,
    same: torch.Tensor,
    temperature: float,
    column_bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, cosine) of the softmax left[i] -> right[i] over the batch's columns; `same[i, j]` (j != i)
    marks a column that is no negative for row i; `column_bias` is added to each column's logit."""
    cosine = left @ right.T
    logits = cosine / temperature
    if column_bias is not None:
        logits = logits + column_bias.unsqueeze(0)
    logits = logits.masked_fill(same & ~torch.eye(len(left), dtype=torch.bool), float("-inf"))
    return F.cross_entropy(logits, torch.arange(len(left))), cosine


def score_head_loss(model: TwoTowerModel, cosine: torch.Tensor) -> torch.Tensor:
    """The score head learns "bought vs not" from the batch's pairs, positives and negatives weighted
    equally, so a score of 0.5 is the boundary; it reads detached cosines and never moves the towers."""
    labels = torch.eye(len(cosine))
    pos_weight = torch.tensor(float(len(cosine) - 1))
    return F.binary_cross_entropy_with_logits(model.score_head.logits(cosine.detach()), labels, pos_weight=pos_weight)


def recall_at_k(
    model: TwoTowerModel, examples: TrainingExamples, item_table: torch.Tensor, rows: np.ndarray, k: int = 10
) -> float:
    """Held-out recall@k against all items the training data knows (`rows`); `item_table` holds indexed vectors."""
    if len(examples) == 0:
        return float("nan")
    model.eval()
    candidates = item_table[torch.from_numpy(rows)]
    hits = 0
    with torch.no_grad():
        for start in range(0, len(examples), 512):
            index = np.arange(start, min(start + 512, len(examples)))
            users = user_vectors(model, examples.histories, item_table.__getitem__, index)
            top = (users @ candidates.T).topk(min(k, len(rows)), dim=1).indices.numpy()
            hits += int((rows[top] == examples.targets[index, None]).any(axis=1).sum())
    model.train()
    return hits / len(examples)


@dataclasses.dataclass
class Holdout:
    """Held-out examples, and the same purchases as whole-day cases for fitting the repeat boost:
    history = what the customer bought before that day, targets = everything they bought on it
    (the evaluation's protocol, one day earlier)."""

    examples: TrainingExamples
    histories: Histories
    targets: list[set[int]]
    day: int  # the held-out day (days since the epoch)


def split_examples(
    examples: TrainingExamples, max_customers: int = 2000, seed: int = 0
) -> tuple[TrainingExamples, Holdout]:
    """Hold out the last day's purchases of up to `max_customers` customers who had bought before that day.

    Never a random split of purchases: a held-out customer's whole last day is unseen in training.
    """
    last_day = examples.days.max()
    on_last = examples.days == last_day
    # A customer's first purchase of that day has only earlier days in its history (most recent age > 0).
    first_of_day = on_last & (examples.histories.age_days[:, 0] > 0)
    eligible = np.unique(examples.customers[first_of_day])
    if len(eligible) == 0 or len(eligible) == len(np.unique(examples.customers)):
        eligible = np.unique(examples.customers[on_last])[:1]  # tiny data: keep at least one case, train on the rest
    count = min(max_customers, max(1, len(eligible) // 2))  # small data sets keep most of their last day
    chosen = np.random.default_rng(seed).choice(eligible, count, replace=False)
    held = on_last & np.isin(examples.customers, chosen)
    holdout = examples.take(np.flatnonzero(held))
    starts = np.flatnonzero(np.r_[True, holdout.customers[1:] != holdout.customers[:-1]])
    targets = [set(map(int, part)) for part in np.split(holdout.targets, starts[1:])]
    h = holdout.histories
    return (
        examples.take(np.flatnonzero(~held)),
        Holdout(holdout, Histories(h.rows[starts], h.age_days[starts]), targets, int(last_day)),
    )


def holdout_users(model: TwoTowerModel, holdout: Holdout, item_table: torch.Tensor) -> torch.Tensor:
    """User vectors of the held-out whole-day cases."""
    model.eval()
    n = len(holdout.targets)
    with torch.no_grad():
        users = torch.cat(
            [
                user_vectors(model, holdout.histories, item_table.__getitem__, np.arange(s, min(s + 512, n)))
                for s in range(0, n, 512)
            ]
        )
    model.train()
    return users


def text_feature_cache(model_config: ModelConfig, directory: str) -> TextFeatureCache | None:
    """The cache of a pretrained backbone's frozen features, when a directory is set (open_clip towers have no
    published weights hash to key them by: they encode every run)."""
    if not directory:
        return None
    if not is_pretrained_backbone(model_config.clip_model):
        log.info("text feature cache: not used for %s (keyed by published weights only)", model_config.clip_model)
        return None
    return TextFeatureCache(directory, features_id(model_config.clip_model))


def held_out_space(
    item_table: torch.Tensor,
    rows: np.ndarray,
    item_bias: np.ndarray,
    products: repeats.Products | None,
    product_types: np.ndarray | None = None,
) -> ranking.ExactItems:
    """The held-out days' search space: the articles `rows` (all of the catalogue) by their indexed vectors,
    popularity bias and product types (the second stage reads them); a boosted article outside them has no
    vector here and scores its boost alone."""
    return ranking.ExactItems(
        item_table.numpy(), item_bias, searchable=rows, products=products, product_types=product_types
    )


def training_purchases(transactions: pd.DataFrame, until: str, unseen_customer_share: float) -> pd.DataFrame:
    """The purchases a run trains on: those before `until` (when set), without the customers it leaves out."""
    if until:
        kept = transactions[transactions["t_dat"] < pd.Timestamp(until)]
        log.info("training on %d purchases before %s (of %d)", len(kept), until, len(transactions))
        transactions = kept
    if unseen_customer_share > 0:
        unseen = unseen_customers(transactions["customer_id"], unseen_customer_share)
        log.info(
            "leaving out %d customers (%d purchases): evaluated as customers the towers never saw",
            transactions.loc[unseen, "customer_id"].nunique(),
            int(unseen.sum()),
        )
        transactions = transactions[~unseen]
    return transactions


def train(data: HMData, model_config: ModelConfig, train_config: TrainConfig, out: Path, force: bool = False) -> Path:
    """Train and write the run directory `out`; returns it."""
    out = Path(out)
    if out.exists() and not force:
        raise FileExistsError(f"run directory {out} exists (pass --force to replace it)")
    seed_everything(train_config.seed)
    if train_config.threads > 0:
        torch.set_num_threads(train_config.threads)

    row_of = {article_id: i for i, article_id in enumerate(data.article_ids)}
    transactions = training_purchases(data.transactions, train_config.until, train_config.unseen_customer_share)
    examples = training_examples(transactions, row_of, model_config.max_history, train_config.earlier_days_only)
    if len(examples) < 2:
        raise ValueError(
            f"{data.source}: need at least 2 customers with 2+ purchases to train, found {len(examples)} examples"
        )
    train_set, holdout = split_examples(examples, seed=train_config.seed)
    if not train_config.repeat_targets:
        again = (train_set.histories.rows == train_set.targets[:, None]).any(axis=1)
        log.info(
            "%d of %d training purchases are of an article the customer already had: left to the repeat boost",
            int(again.sum()),
            len(train_set),
        )
        train_set = train_set.take(np.flatnonzero(~again))
    if len(train_set) < 2:
        raise ValueError(f"{data.source}: only {len(train_set)} training examples left after holding out the last day")
    used_rows = np.unique(np.concatenate([examples.targets, examples.histories.rows[examples.histories.rows >= 0]]))
    log.info(
        "%d articles, %d purchases -> %d training / %d held-out examples over %d distinct articles",
        len(row_of),
        len(transactions),
        len(train_set),
        len(holdout.examples),
        len(used_rows),
    )

    # Id vectors only for articles that appear in training: the others would never get a gradient, and
    # a smaller table keeps each optimiser step cheap. id_row maps catalogue rows to table rows (-1: none).
    model = build_model(model_config, n_items=len(used_rows))
    id_row = torch.full((len(row_of) + 1,), -1, dtype=torch.long)  # index -1 (padding) stays -1
    id_row[torch.from_numpy(used_rows)] = torch.arange(len(used_rows))
    # The whole catalogue, not only bought articles: query phrases describe every article, and the
    # diagnostics and fits rank all of them, as the service does.
    captions = build_captions(data.articles)
    cache = text_feature_cache(model_config, train_config.text_feature_cache)
    item_text = TextVectors(model, captions, train_config.item_batch_size, "catalogue captions", cache)
    if isinstance(model.item_tower, PretrainedItemTower) and item_text.features is not None:
        model.item_tower.initialise_projection(item_text.features)
    queries = pairs.query_pairs(data.articles, train_config.query_phrases_per_article, train_config.seed)
    phrase_texts, phrase_ids = np.unique(np.asarray(queries.phrases, dtype=object), return_inverse=True)
    query_text = TextVectors(model, phrase_texts.tolist(), train_config.item_batch_size, "query phrases", cache)
    before_holdout = transactions[transactions["t_dat"] < pd.Timestamp(holdout.day, unit="D")]
    co_purchases = pairs.co_purchase_pairs(before_holdout, row_of, train_config.co_purchase_window_days)
    log.info(
        "%d query phrases (%d distinct) over %d articles, %d co-purchase pairs (within %d days)",
        len(queries),
        len(phrase_texts),
        len(row_of),
        len(co_purchases),
        train_config.co_purchase_window_days,
    )

    model.train()
    head = list(model.score_head.parameters())
    ids = list(model.item_ids.parameters()) if model.item_ids is not None else []
    towers = [p for p in model.parameters() if p.requires_grad and all(p is not h for h in head + ids)]
    groups: list[dict[str, Any]] = [
        {"params": towers},
        {"params": head, "lr": train_config.score_head_lr, "weight_decay": 0.0},
        {"params": ids, "lr": train_config.item_id_lr, "weight_decay": 0.0},
    ]
    # fused: one kernel for every parameter instead of a loop of small ops per tensor (2.5 vs 18.5 ms a step on
    # these 2 cores, ~5,200 steps in make eval)
    optimiser = torch.optim.AdamW(groups, lr=train_config.lr, weight_decay=train_config.weight_decay, fused=True)
    log_frequency = None
    if train_config.logq_correction:
        counts = np.bincount(train_set.targets, minlength=len(row_of)).astype(np.float64)
        log_frequency = torch.from_numpy(np.log(np.maximum(counts, 1.0) / counts.sum())).float()
    generator = np.random.default_rng(train_config.seed)
    # Text vectors of all articles: a per-epoch snapshot (cheap, stable targets for histories). The id part
    # is added live, so histories see the id vectors as they learn, exactly as the index will hold them.
    text_table = item_text.table()

    def history_item_vectors(rows: torch.Tensor) -> torch.Tensor:
        return model.hybrid(text_table[rows], id_row[rows])

    def side_losses() -> torch.Tensor:
        """Query phrase -> its article, and article <-> an article bought with it (text vectors only)."""
        total = torch.zeros(())
        size = train_config.batch_size
        if train_config.query_weight > 0 and len(queries) >= 2:
            pick = torch.from_numpy(generator.choice(len(queries), min(size, len(queries)), replace=False))
            rows = torch.from_numpy(queries.rows)[pick]
            phrase = torch.from_numpy(phrase_ids[pick.numpy()].astype(np.int64))
            same = torch.from_numpy(queries.described(pick.numpy(), rows.numpy()))
            loss = in_batch_softmax(query_text(phrase), item_text(rows), same, train_config.temperature)[0]
            total = total + train_config.query_weight * loss
        if train_config.co_purchase_weight > 0 and len(co_purchases) >= 2:
            pick = torch.from_numpy(generator.choice(len(co_purchases), min(size, len(co_purchases)), replace=False))
            left, right = torch.from_numpy(co_purchases[pick.numpy()]).T
            same = (right[:, None] == right[None, :]) | (left[:, None] == right[None, :])
            loss = in_batch_softmax(item_text(left), item_text(right), same, train_config.temperature)[0]
            total = total + train_config.co_purchase_weight * loss
        return total

    all_rows = np.arange(len(row_of))
    epochs: list[dict] = []
    step = 0
    for epoch in range(train_config.epochs):
        # A trainable encoder learns for `text_epochs` (later steps use its snapshot: ~10x cheaper on CPU);
        # a frozen one's projection learns throughout, at the cost of a linear layer.
        text_learns = item_text.features is not None or epoch < train_config.text_epochs
        order = generator.permutation(len(train_set))
        batches = [order[i : i + train_config.batch_size] for i in range(0, len(order), train_config.batch_size)]
        batches = [b for b in batches if len(b) >= 2]
        losses, accuracies, started = [], [], time.perf_counter()
        progress = tqdm(batches, desc=f"epoch {epoch + 1}/{train_config.epochs}", unit="batch", disable=None)
        for index in progress:
            targets = torch.from_numpy(train_set.targets[index])
            buyers = user_vectors(model, train_set.histories, history_item_vectors, index)
            keep = (torch.rand(len(targets)) >= model_config.item_id_dropout).float()
            text = item_text(targets) if text_learns else text_table[targets]
            items = model.hybrid(text, id_row[targets], keep)
            loss, cosine = contrastive_loss(buyers, items, targets, train_config.temperature, log_frequency)
            total = loss + score_head_loss(model, cosine) + (side_losses() if text_learns else 0.0)
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
        if text_learns:  # the text tower moved: refresh its snapshot
            text_table = item_text.table()
        with torch.no_grad():
            item_table = model.hybrid(text_table, id_row[: len(row_of)])
        record = {
            "epoch": epoch + 1,
            "loss": float(np.mean(losses)),
            "in_batch_accuracy": float(np.mean(accuracies)),
            "holdout_recall_at_10": recall_at_k(model, holdout.examples, item_table, all_rows),
            "examples_per_second": n_seen / seconds if seconds > 0 else float("nan"),
            "seconds": seconds,
        }
        epochs.append(record)
        log.info(
            "epoch %d: loss %.4f, in-batch acc %.3f, held-out recall@10 %.4f (all %d articles), %.0f examples/s",
            record["epoch"],
            record["loss"],
            record["in_batch_accuracy"],
            record["holdout_recall_at_10"],
            len(row_of),
            record["examples_per_second"],
        )
        if train_config.max_steps and step >= train_config.max_steps:
            break

    products = (
        repeats.Products(data.articles["product_code"].astype(str).tolist())
        if "product_code" in data.articles.columns
        else None
    )
    users = holdout_users(model, holdout, item_table).numpy()
    histories = list(zip(holdout.histories.rows, holdout.histories.age_days))
    item_bias = popularity.item_bias(transactions, row_of, len(row_of), pd.Timestamp(holdout.day, unit="D"))
    # grouped by name, as the retriever's product-type filter column groups them (a required column)
    product_types = pd.factorize(data.articles["product_type_name"].astype(str))[0].astype(np.int64)
    space = held_out_space(item_table, all_rows, item_bias, products, product_types)
    boost, with_boost, without = fitting.fit_repeat_boost(space, users, histories, holdout.targets)
    log.info(
        "repeat boost: own articles %.2f - %.2f * log1p(days), other colours %.2f - %.2f * log1p(days) "
        "(held-out MAP@12 %.4f, %.4f without)",
        boost.bonus,
        boost.slope,
        boost.sibling_bonus,
        boost.sibling_slope,
        with_boost,
        without,
    )
    weight, with_prior, without_prior = fitting.fit_prior_weight(space, users, histories, holdout.targets, boost)
    # Lists without the customer's own articles: recall of the articles each case had not bought.
    new_targets = [targets - set(rows.tolist()) for targets, (rows, _) in zip(holdout.targets, histories)]
    cases = [i for i, targets in enumerate(new_targets) if targets]
    discovery_weight, with_discovery, discovery_without = fitting.fit_prior_weight(
        space,
        users[cases],
        [histories[i] for i in cases],
        [new_targets[i] for i in cases],
        boost,
        exclude_bought=True,
        prefer=weight,
    )
    prior = popularity.PopularityPrior(weight, discovery_weight=discovery_weight)
    log.info(
        "popularity prior: weight %g on log1p(purchases in the %d days before the held-out day) "
        "(held-out recall@100 %.4f, %.4f without); %g without the customer's own articles "
        "(held-out recall@100 of new articles %.4f, %.4f without)",
        prior.weight,
        prior.window_days,
        with_prior,
        without_prior,
        discovery_weight,
        with_discovery,
        discovery_without,
    )

    # The second stage re-orders lists ranked with the prior and boost just fitted, over signals counted before
    # the held-out day, as export counts them before the day training stopped.
    signals = second_stage.ArticleSignals.count(transactions, row_of, len(row_of), pd.Timestamp(holdout.day, unit="D"))
    stage = fitting.fit_second_stage(space, users, histories, holdout.targets, boost, prior.weight, signals)
    stage_metrics = {}
    if stage is None:
        log.info("second stage: not fitted (the held-out candidates hold no purchase, or only purchases)")
    else:
        log.info(
            "second stage: %d candidates (%d bought); held-out recall@100 %.4f (%.4f first stage alone), "
            "MAP@12 %.4f (%.4f), in-sample; largest weights: %s",
            stage.candidates,
            stage.bought,
            *stage.recall_at_100,
            *stage.map_at_12,
            stage.weights.describe(),
        )
        stage_metrics = {
            "candidates": stage.candidates,
            "bought": stage.bought,
            "recall_at_100": dict(zip(("with", "without"), stage.recall_at_100)),
            "map_at_12": dict(zip(("with", "without"), stage.map_at_12)),
        }

    query_tower = {}
    if model.query_tower is not None:
        query_tower = train_query_tower(
            model, query_text, item_text.texts, text_table, queries, phrase_ids, item_table, product_types, train_config
        )

    rundir.write_run(
        out,
        {
            "model": dataclasses.asdict(model_config),
            "train": dataclasses.asdict(train_config),
            "data": {"source": data.source, "articles": len(row_of), "transactions": len(data.transactions)},
            "context_length": context_length_of(model_config.clip_model),
            "captions_sha256": rundir.texts_sha256(captions),
        },
        model.state_dict(),
        np.asarray(data.article_ids, dtype=object)[used_rows].tolist(),  # the property lists all ids per call
        boost,
        prior,
        {
            "epochs": epochs,
            "examples": len(train_set),
            "holdout": len(holdout.examples),
            "holdout_map_at_12": {"with_repeat_boost": with_boost, "without": without},
            "holdout_recall_at_100": {"with_popularity_prior": with_prior, "without": without_prior},
            "holdout_discovery_recall_at_100": {"with_discovery_prior": with_discovery, "without": discovery_without},
            "query_tower": query_tower,
            "holdout_second_stage": stage_metrics,
        },
        text_features=None if item_text.features is None else item_text.features.numpy(),
        second_stage=None if stage is None else stage.weights,
    )
    log.info("wrote run directory %s", out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--data-dir", required=True, help="H&M-format directory (articles.csv[.gz], transactions_train.csv[.gz])"
    )
    parser.add_argument("--out", required=True, help="run directory to write")
    parser.add_argument("--force", action="store_true", help="replace an existing run directory")
    add_arguments(parser, ModelConfig)
    add_arguments(parser, TrainConfig)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        data = load_hm_dir(args.data_dir)
        train(
            data, from_arguments(ModelConfig, args), from_arguments(TrainConfig, args), Path(args.out), force=args.force
        )
    except (DataFormatError, FileNotFoundError, FileExistsError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
