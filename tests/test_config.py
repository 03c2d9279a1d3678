from __future__ import annotations

import argparse

import pytest

from twotower.config import ModelConfig, TrainConfig, add_arguments, from_arguments


def parse(argv: list[str]) -> tuple[ModelConfig, TrainConfig]:
    parser = argparse.ArgumentParser()
    add_arguments(parser, ModelConfig)
    add_arguments(parser, TrainConfig)
    args = parser.parse_args(argv)
    return from_arguments(ModelConfig, args), from_arguments(TrainConfig, args)


def test_defaults_env_and_cli_precedence(monkeypatch: pytest.MonkeyPatch) -> None:
    model, train = parse([])
    assert model == ModelConfig() and train == TrainConfig()
    monkeypatch.setenv("TWOTOWER_EMBED_DIM", "32")
    monkeypatch.setenv("TWOTOWER_UNFREEZE_TOKEN_EMBEDDING", "false")
    model, _ = parse([])
    assert model.embed_dim == 32 and model.unfreeze_token_embedding is False
    model, train = parse(["--embed-dim", "16", "--lr", "0.01"])
    assert model.embed_dim == 16 and train.lr == 0.01


def test_bad_env_value_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TWOTOWER_EPOCHS", "three")
    with pytest.raises(SystemExit, match="TWOTOWER_EPOCHS"):
        parse([])
