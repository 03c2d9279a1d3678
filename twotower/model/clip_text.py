"""open_clip text encoder loading and tokenisation (the image encoder is never used).

Pretrained Hugging Face backbones (twotower.model.pretrained_text) tokenize through the same
`get_tokenizer`. `load_clip(model_name, pretrained)` accepts any open_clip model name plus, for offline
tests and the demo, the small configs shipped in `configs/` (registered on import).
`pretrained` is an open_clip hub tag ("openai", "laion2b_s34b_b79k", ...) or a local
checkpoint path; "" means random initialisation.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import open_clip
import torch

from twotower.model.pretrained_text import WordPieceIds, is_pretrained_backbone

CONFIG_DIR = Path(__file__).with_name("configs")


@lru_cache(maxsize=1)
def register_local_configs() -> list[str]:
    """Make the shipped small configs (e.g. `hm-tiny-text`) known to open_clip."""
    names = []
    for path in sorted(CONFIG_DIR.glob("*.json")):
        open_clip.add_model_config(path)
        names.append(path.stem)
    return names


def load_clip(model_name: str, pretrained: str = "") -> torch.nn.Module:
    if is_pretrained_backbone(model_name):
        raise ValueError(f"{model_name} is a Hugging Face text backbone (pretrained_text.load_encoder), not CLIP")
    register_local_configs()
    if (
        pretrained
        and not Path(pretrained).exists()
        and "/" in pretrained
        and not pretrained.startswith(("hf-hub:", "local-dir:"))
    ):
        raise FileNotFoundError(f"pretrained checkpoint {pretrained!r} does not exist")
    return open_clip.create_model(model_name, pretrained=pretrained or None, device="cpu")


def context_length_of(model_name: str) -> int:
    """The item tower's input length; -1 = variable (a pretrained backbone's tokenizer pads to the longest
    text of a call and truncates at the backbone's context length)."""
    if is_pretrained_backbone(model_name):
        return -1
    register_local_configs()
    config = open_clip.get_model_config(model_name)
    if config is None:
        raise ValueError(f"unknown open_clip model {model_name!r}")
    return int(config["text_cfg"].get("context_length", 77))


def get_tokenizer(model_name: str) -> Callable[[Sequence[str]], torch.Tensor]:
    """Tokeniser matching the model; returns int64 [batch, context_length] (pretrained backbones:
    [batch, longest text])."""
    if is_pretrained_backbone(model_name):
        return TorchIds(WordPieceIds(model_name))
    register_local_configs()
    return open_clip.get_tokenizer(model_name)


class TorchIds:
    """numpy token ids as a torch tensor (a class, not a lambda: tokenizers travel to KServe workers)."""

    def __init__(self, ids: Callable[[list[str]], np.ndarray]):
        self.ids = ids

    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        return torch.from_numpy(self.ids(list(texts)))
