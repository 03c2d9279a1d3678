"""Towers: the pretrained backbone (hash check, tokenizer, frozen features), CLIP checkpoints, freezing,
shapes, padding, seeded training."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from twotower import rundir
from twotower.config import ModelConfig, TrainConfig, from_scratch_model
from twotower.data.hm import load_hm_dir
from twotower.data.synthetic import generate
from twotower.model.clip_text import get_tokenizer, load_clip
from twotower.model.towers import BitsDropout, build_model
from twotower.train import train


def test_pretrained_weights_load_from_a_local_checkpoint(tmp_path: Path) -> None:
    torch.manual_seed(1)
    source = load_clip("hm-tiny-text")
    checkpoint = tmp_path / "tiny.pt"
    torch.save(source.state_dict(), checkpoint)
    model = build_model(from_scratch_model(pretrained=str(checkpoint)))
    assert torch.equal(model.item_tower.token_embedding.weight, source.token_embedding.weight)
    assert torch.equal(
        model.item_tower.transformer.resblocks[1].mlp.c_fc.weight, source.transformer.resblocks[1].mlp.c_fc.weight
    )
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_clip("hm-tiny-text", str(tmp_path / "missing" / "weights.pt"))


def test_only_the_top_text_blocks_and_projections_train() -> None:
    model = build_model(from_scratch_model(unfreeze_text_blocks=1, unfreeze_token_embedding=False))
    tower = model.item_tower
    assert not any(p.requires_grad for p in tower.transformer.resblocks[0].parameters())
    assert all(p.requires_grad for p in tower.transformer.resblocks[1].parameters())
    assert not tower.token_embedding.weight.requires_grad
    assert tower.projection.weight.requires_grad and tower.text_projection.weight.requires_grad
    assert all(p.requires_grad for p in model.user_tower.parameters())


def test_tower_outputs_are_unit_vectors_and_padding_is_ignored() -> None:
    config = ModelConfig()
    model = build_model(config).eval()
    ids = get_tokenizer(config.clip_model)(["black dress", "red sneakers"])
    items = model.item_tower(ids)
    assert items.shape == (2, config.embed_dim)
    torch.testing.assert_close(items.norm(dim=-1), torch.ones(2))
    history = torch.zeros(1, config.max_history, config.embed_dim)
    history[0, :2] = items.detach()
    mask = torch.zeros(1, config.max_history)
    mask[0, :2] = 1
    age = torch.zeros(1, config.max_history)
    with torch.no_grad():
        user = model.user_tower(history, mask, age)
        noisy = history.clone()
        noisy[0, 2:] = torch.randn(config.max_history - 2, config.embed_dim)  # garbage in padded slots
        assert torch.allclose(model.user_tower(noisy, mask, age), user, atol=1e-6)
        empty = model.user_tower(torch.zeros_like(history), torch.zeros_like(mask), age)
    assert torch.isfinite(empty).all()


def test_the_pretrained_backbone_is_the_published_file_and_a_mismatch_is_refused(monkeypatch, tmp_path: Path) -> None:
    from twotower.model import pretrained_text

    name = ModelConfig().clip_model
    assert pretrained_text.is_pretrained_backbone(name)
    directory = pretrained_text.verified_model_dir(name)  # the installed package's weights: published sha256
    fake = tmp_path / "model"
    fake.mkdir()
    (fake / pretrained_text.WEIGHTS_FILE).write_bytes(b"not the weights")
    monkeypatch.setattr(pretrained_text, "model_dir", lambda _: fake)
    with pytest.raises(pretrained_text.WeightsMismatchError, match="refusing to load"):
        pretrained_text.load_encoder(name, load_weights=True)
    assert (directory / pretrained_text.TOKENIZER_FILE).is_file()


def test_retriever_and_training_tokenize_alike_and_as_hugging_face_does() -> None:
    from transformers import AutoTokenizer

    from serving.towers import TokenIds
    from twotower.model import pretrained_text

    name = ModelConfig().clip_model
    texts = ["black jersey dress", "Grey  DRESS", "héllo wörld", "", "a " * 200]
    served = TokenIds(name)(texts)
    trained = get_tokenizer(name)(texts).numpy()
    np.testing.assert_array_equal(served, trained)
    reference = AutoTokenizer.from_pretrained(str(pretrained_text.model_dir(name)))
    expected = reference(
        texts, padding=True, truncation=True, max_length=pretrained_text.BACKBONES[name].context_length
    )["input_ids"]
    np.testing.assert_array_equal(served, np.asarray(expected))
    assert served.shape[1] == pretrained_text.BACKBONES[name].context_length  # the long text is truncated
    assert TokenIds(name)(["grey dress"]).shape == (1, 4)  # a short query costs its own tokens: [CLS] grey dress [SEP]


def test_a_frozen_encoder_is_projected_from_cached_features_and_padding_changes_nothing() -> None:
    model = build_model(ModelConfig()).eval()
    tower = model.item_tower
    assert tower.encoder_frozen and all(p.requires_grad for p in tower.projection.parameters())
    tokenizer = get_tokenizer(model.config.clip_model)
    with torch.no_grad():
        alone = tower(tokenizer(["grey dress"]))
        padded = tower(tokenizer(["grey dress", "a long caption about a black jersey dress with pockets"]))[:1]
        torch.testing.assert_close(padded, alone, atol=1e-5, rtol=0)
        torch.testing.assert_close(tower.project(tower.features(tokenizer(["grey dress"]))), alone)
        # Triton's warm-up sends all-zero ids (padding only): a finite vector, not NaN.
        assert torch.isfinite(tower(torch.zeros((2, 16), dtype=torch.long))).all()


def test_training_is_reproducible_for_a_seed_with_or_without_the_text_feature_cache(tmp_path: Path) -> None:
    data = load_hm_dir(generate(tmp_path / "data", seed=2, n_articles=80, n_customers=60))
    config = TrainConfig(epochs=1, batch_size=32)
    cached = dataclasses.replace(config, text_feature_cache=str(tmp_path / "cache"))
    first = train(data, ModelConfig(), config, tmp_path / "a")
    second = train(data, ModelConfig(), cached, tmp_path / "b")  # encodes and fills the cache
    shards = sorted((tmp_path / "cache").glob("*/*"))  # captions, query phrases
    third = train(data, ModelConfig(), cached, tmp_path / "c")  # reads every text from it
    assert len(shards) == 2 and sorted((tmp_path / "cache").glob("*/*")) == shards  # the third encoded nothing
    runs = (first, second, third)
    weights = [torch.load(run / rundir.WEIGHTS) for run in runs]
    assert all(torch.equal(weights[0][name], other[name]) for other in weights[1:] for name in weights[0])
    losses = [json.loads((run / "metrics.json").read_text())["epochs"][0]["loss"] for run in runs]
    assert losses[0] == losses[1] == losses[2]
    with pytest.raises(FileExistsError):
        train(data, ModelConfig(), config, tmp_path / "a")


def test_hybrid_item_vectors_add_the_id_vector_only_where_known() -> None:
    model = build_model(ModelConfig(), n_items=4)
    assert model.item_ids is not None
    with torch.no_grad():
        model.item_ids.weight[1] = 1.0
    text = torch.nn.functional.normalize(torch.randn(3, ModelConfig().embed_dim), dim=-1)
    out = model.hybrid(text, torch.tensor([1, 2, -1]))
    torch.testing.assert_close(out[1:], text[1:])  # untrained row and unknown article: text alone
    assert not torch.allclose(out[0], text[0])
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(3))
    dropped = model.hybrid(text, torch.tensor([1, 2, -1]), keep=torch.zeros(3))
    torch.testing.assert_close(dropped, text)
    assert build_model(ModelConfig(item_id_embeddings=False), n_items=4).item_ids is None


def test_holdout_is_whole_last_days_of_returning_customers_and_never_trained_on(tmp_path: Path) -> None:
    import numpy as np

    from twotower.data.histories import training_examples
    from twotower.train import split_examples

    data = load_hm_dir(generate(tmp_path / "data", seed=3, n_articles=80, n_customers=120))
    row_of = {a: i for i, a in enumerate(data.article_ids)}
    examples = training_examples(data.transactions, row_of, max_history=5)
    train_set, holdout = split_examples(examples)
    last_day = examples.days.max()
    assert (holdout.examples.days == last_day).all() and len(holdout.targets) > 0
    held = set(holdout.examples.customers.tolist())
    assert not ((train_set.days == last_day) & np.isin(train_set.customers, list(held))).any()
    assert len(train_set) + len(holdout.examples) == len(examples)
    # Each case's history holds earlier days only; its targets are everything bought that day.
    assert (holdout.histories.age_days[:, 0] > 0).all()
    assert sum(len(t) for t in holdout.targets) <= len(holdout.examples)


def test_the_tower_trains_on_new_articles_and_the_repeat_boost_is_fitted(tmp_path: Path) -> None:
    data = load_hm_dir(generate(tmp_path / "data", seed=2, n_articles=60, n_customers=80))
    run = train(data, ModelConfig(), TrainConfig(epochs=2, text_epochs=1, max_steps=0), tmp_path / "run")
    boost = json.loads((run / "repeat_boost.json").read_text())
    assert set(boost) == {"bonus", "slope", "sibling_bonus", "sibling_slope"}
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["holdout_map_at_12"]["with_repeat_boost"] >= metrics["holdout_map_at_12"]["without"]
    assert metrics["epochs"][1]["examples_per_second"] > 0
    assert metrics["query_tower"]["texts"] > 0 and "query_tower.output.weight" in torch.load(run / rundir.WEIGHTS)
    # A run written before query towers existed reads as one without (its text queries use the item tower).
    config = json.loads((run / rundir.CONFIG).read_text())
    del config["model"]["query_tower"]
    (run / rundir.CONFIG).write_text(json.dumps(config))
    state = {k: v for k, v in torch.load(run / rundir.WEIGHTS).items() if not k.startswith("query_tower.")}
    torch.save(state, run / rundir.WEIGHTS)
    old = rundir.read_run(run)
    assert old.model_config.query_tower is False
    assert build_model(old.model_config, old.state, n_items=len(old.item_ids)).query_tower is None


def test_the_query_tower_learns_the_item_towers_vectors_and_ignores_padding(tmp_path: Path) -> None:
    from export.torchscript import trace_and_verify
    from twotower.data.pairs import query_pairs
    from twotower.model.pretrained_text import PAD_ID
    from twotower.model.query_tower import distil, trim_padding

    torch.manual_seed(0)
    model = build_model(ModelConfig()).eval()
    assert model.query_tower is not None
    tokenizer = get_tokenizer(model.config.clip_model)
    articles = load_hm_dir(generate(tmp_path / "data", seed=4, n_articles=60, n_customers=10)).articles
    texts = sorted(set(query_pairs(articles, 3, seed=0).phrases))
    tokens = tokenizer(texts)
    with torch.no_grad():
        targets = model.item_tower(tokens)
        before = (model.query_tower(tokens) * targets).sum(dim=-1).mean()
    report = distil(model.query_tower, tokens, targets, PAD_ID, epochs=40, batch_size=64)
    with torch.no_grad():
        after = (model.query_tower(tokens) * targets).sum(dim=-1).mean()
    assert after > max(0.9, before + 0.2), (before, after, report)
    # Padding is not a word: the same query alone or beside a longer one gives the same vector.
    query = model.query_tower
    alone = query(tokenizer(["grey dress"]))
    padded = query(tokenizer(["grey dress", "a long caption about a black jersey dress with pockets"]))[:1]
    torch.testing.assert_close(padded, alone, atol=1e-6, rtol=0)
    torch.testing.assert_close(
        query(trim_padding(tokenizer(["grey dress", "dress"]), PAD_ID)[1:]), query(tokenizer(["dress"]))
    )
    # TorchScript keeps it exact at other batch sizes and lengths (what Triton serves).
    _, difference = trace_and_verify("query_tower", query, [(tokens[:4],), (tokens[:1],), (tokenizer(["dress"]),)])
    assert difference <= 1e-6


def test_query_phrases_describe_every_article_with_their_fields(tmp_path: Path) -> None:
    from twotower.data.pairs import TEMPLATES, query_pairs

    articles = load_hm_dir(generate(tmp_path / "data", seed=4, n_articles=60, n_customers=10)).articles
    queries = query_pairs(articles, 3, seed=0)
    everything = np.arange(len(articles))
    colour_type = TEMPLATES.index(("colour", "type"))
    i = int(np.flatnonzero(queries.templates == colour_type)[0])
    own = articles.iloc[queries.rows[i]]
    same = (articles["colour_group_name"] == own["colour_group_name"]) & (
        articles["product_type_name"] == own["product_type_name"]
    )
    assert queries.described(np.array([i]), everything)[0].tolist() == same.tolist()
    name = TEMPLATES.index(("name",))
    j = int(np.flatnonzero(queries.templates == name)[0])
    same_name = articles["prod_name"].str.lower() == articles.iloc[queries.rows[j]]["prod_name"].lower()
    assert queries.described(np.array([j]), everything)[0].tolist() == same_name.tolist()  # every colour of it
    batch = np.array([j, i, j, 0])  # phrases of several templates at once: each row as if asked alone
    expected = [queries.described(np.array([p]), everything)[0] for p in batch]
    assert (queries.described(batch, everything) == np.stack(expected)).all()


def test_the_query_tower_learns_to_find_the_articles_its_phrases_describe(tmp_path: Path) -> None:
    from twotower.data.pairs import query_pairs
    from twotower.model.pretrained_text import PAD_ID
    from twotower.model.query_tower import PhraseArticles, learn_retrieval

    torch.manual_seed(0)
    model = build_model(ModelConfig()).eval()
    assert model.query_tower is not None
    articles = load_hm_dir(generate(tmp_path / "data", seed=4, n_articles=200, n_customers=10)).articles
    queries = query_pairs(articles, 3, seed=0)
    tokens = get_tokenizer(model.config.clip_model)(queries.phrases)
    product_types = pd.factorize(articles["product_type_name"])[0].astype(np.int64)
    phrases = PhraseArticles(tokens, queries.rows, queries.described, product_types)
    with torch.no_grad():
        item_vectors = torch.nn.functional.normalize(torch.randn(len(articles), model.config.embed_dim), dim=-1)

    def found() -> float:  # share of phrases whose best article is one they describe
        with torch.no_grad():
            best = (model.query_tower(tokens) @ item_vectors.T).argmax(dim=1).numpy()
        return float(np.mean([queries.described(np.array([i]), best[i : i + 1])[0, 0] for i in range(len(best))]))

    before = found()
    report = learn_retrieval(model.query_tower, phrases, item_vectors, PAD_ID, steps=200, random_negatives=64)
    assert found() > before + 0.3, (before, found(), report)


def test_a_pretrained_encoder_encodes_in_its_measured_batch_size() -> None:
    from twotower.model.pretrained_text import BACKBONES, encode_batch_size

    assert encode_batch_size("all-MiniLM-L6-v2", 256) == BACKBONES["all-MiniLM-L6-v2"].encode_batch_size == 32
    assert encode_batch_size("all-MiniLM-L6-v2", 8) == 8
    assert encode_batch_size("hm-tiny-text", 256) == 256


def test_the_user_towers_dropout_drops_its_share_and_nothing_in_eval_mode() -> None:
    torch.manual_seed(0)
    dropout = BitsDropout(0.1)
    out = dropout(torch.ones(200, 1000))
    assert abs(float((out == 0).float().mean()) - 0.1) < 0.005
    assert out.unique().tolist() == [0.0, pytest.approx(1 / 0.9)]  # the kept are scaled up by 1 / (1 - p)
    x = torch.randn(3, 5)
    assert dropout.eval()(x) is x
    tower = build_model(from_scratch_model()).user_tower
    assert {type(m) for m in tower.encoder.modules() if isinstance(m, torch.nn.Dropout)} == {BitsDropout}


def test_user_vectors_cut_to_each_groups_longest_history_equal_the_padded_towers() -> None:
    from twotower.data.histories import Histories
    from twotower.train import SHORT_HISTORY, history_tensors, user_vectors

    torch.manual_seed(0)
    model = build_model(from_scratch_model())
    for module in model.user_tower.modules():  # train mode (the autograd path) without its randomness
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(module, torch.nn.MultiheadAttention):
            module.dropout = 0.0
    rng = np.random.default_rng(0)
    length = model.config.max_history
    lengths = [0, 1, 3, SHORT_HISTORY, SHORT_HISTORY + 1, 9]  # both groups cut below max_history
    rows = np.full((len(lengths), length), -1, dtype=np.int64)
    for i, n in enumerate(lengths):
        rows[i, :n] = rng.integers(0, 50, n)
    histories = Histories(rows, rng.random(rows.shape).astype(np.float32) * (rows >= 0))
    table = torch.nn.functional.normalize(torch.randn(50, model.config.embed_dim), dim=-1)
    index = np.array([5, 0, 1, 4, 2, 3])
    weights = torch.randn(len(index), model.config.embed_dim)
    grads = []
    for users in (
        lambda: model.user_tower(*history_tensors(histories, table.__getitem__, index, length)),
        lambda: user_vectors(model, histories, table.__getitem__, index),
    ):
        model.zero_grad()
        vectors = users()
        (vectors * weights).sum().backward()
        grads.append((vectors.detach(), [p.grad.clone() for p in model.user_tower.parameters()]))
    torch.testing.assert_close(grads[1][0], grads[0][0], atol=1e-6, rtol=1e-5)
    for cut, padded in zip(grads[1][1], grads[0][1]):
        torch.testing.assert_close(cut, padded, atol=1e-5, rtol=1e-4)
    assert user_vectors(model, histories, table.__getitem__, index[:0]).shape == (0, model.config.embed_dim)
