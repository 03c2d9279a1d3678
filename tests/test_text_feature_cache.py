"""The frozen encoder's feature cache: each distinct text encoded once per encoder, damage never fatal."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from twotower.text_feature_cache import FEATURES_FILE, TextFeatureCache


class CountingEncoder:
    """A text's features: its length and its first character's code, counting the texts it is asked for."""

    def __init__(self) -> None:
        self.asked: list[str] = []

    def __call__(self, texts: list[str]) -> np.ndarray:
        self.asked += texts
        return np.asarray([[len(t), ord(t[0])] for t in texts], dtype=np.float32)


def test_each_distinct_text_is_encoded_once_per_encoder(tmp_path: Path) -> None:
    encode = CountingEncoder()
    cache = TextFeatureCache(tmp_path, "encoder-a")
    first = cache.features(["red dress", "blue top", "red dress"], encode)
    assert encode.asked == ["red dress", "blue top"]
    np.testing.assert_array_equal(first, encode(["red dress", "blue top", "red dress"]))
    encode.asked.clear()
    second = TextFeatureCache(tmp_path, "encoder-a").features(["blue top", "grey coat", "red dress"], encode)
    assert encode.asked == ["grey coat"]
    np.testing.assert_array_equal(second, encode(["blue top", "grey coat", "red dress"]))
    encode.asked.clear()
    # Another encoder (other weights, other torch) never reads these features.
    TextFeatureCache(tmp_path, "encoder-b").features(["red dress"], encode)
    assert encode.asked == ["red dress"]


def test_a_damaged_shard_is_skipped_and_its_texts_encoded_again(tmp_path: Path, caplog) -> None:
    encode = CountingEncoder()
    cache = TextFeatureCache(tmp_path, "encoder")
    cache.features(["red dress", "blue top"], encode)
    (shard,) = cache.directory.iterdir()
    (shard / FEATURES_FILE).write_bytes(b"not numpy")
    encode.asked.clear()
    with caplog.at_level(logging.WARNING, logger="twotower.text_feature_cache"):
        again = cache.features(["red dress", "blue top"], encode)
    assert encode.asked == ["red dress", "blue top"] and "skipping unreadable shard" in caplog.text
    np.testing.assert_array_equal(again, encode(["red dress", "blue top"]))


def test_an_unwritable_cache_only_costs_the_encoding(tmp_path: Path, caplog) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with caplog.at_level(logging.WARNING, logger="twotower.text_feature_cache"):
        features = TextFeatureCache(blocker, "encoder").features(["red dress"], CountingEncoder())
    assert features.shape == (1, 2) and "could not write" in caplog.text


@pytest.mark.parametrize("texts", [[], ["only"]])
def test_small_inputs(tmp_path: Path, texts: list[str]) -> None:
    assert len(TextFeatureCache(tmp_path, "encoder").features(texts, CountingEncoder())) == len(texts)
