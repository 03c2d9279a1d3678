"""A frozen text encoder's features kept between training runs: each text is encoded once per encoder.

A frozen pretrained encoder (the default item tower) gives a text the same pooled features in every run,
and on 2 cores it is most of `make eval`: 105,542 H&M captions at 55 captions/s were 32 minutes
(2026-11-29; 65/s and 25.5 minutes since, in batches of `Backbone.encode_batch_size`). Training looks texts up
here first and encodes only the others, so a rerun, or a retrain after a catalogue update, pays for new texts only.

Layout (this module is its only reader and writer):

    <root>/<encoder>/<shard>/keys.npy      uint8 [N, 32]: sha256 of each text's UTF-8
    <root>/<encoder>/<shard>/features.npy  float32 [N, D]: row i belongs to key row i

`<encoder>` names everything the features depend on (twotower.model.pretrained_text.features_id: the
weights' sha256, context length, pooling, torch version), so other weights or code never read them. A shard
is written whole into a hidden staging directory and renamed into place (twotower.files), then never
changed; two runs writing at once add two shards. A shard that cannot be read is skipped with a warning:
its texts are encoded again.
"""

from __future__ import annotations

import hashlib
import logging
import uuid
from pathlib import Path
from typing import Callable

import numpy as np

from twotower.files import staged_directory

log = logging.getLogger(__name__)

KEYS_FILE = "keys.npy"
FEATURES_FILE = "features.npy"
KEY_BYTES = 32


def text_key(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8")).digest()


class TextFeatureCache:
    """The features one encoder gave to texts, under `root/encoder`."""

    def __init__(self, root: Path | str, encoder: str):
        self.directory = Path(root).expanduser() / encoder

    def features(self, texts: list[str], encode: Callable[[list[str]], np.ndarray]) -> np.ndarray:
        """float32 [len(texts), D]: each text's features, from the cache or from `encode` (called once, on
        the distinct texts not found; what it returns is stored as a new shard)."""
        if not texts:
            return np.asarray(encode([]), dtype=np.float32)
        keys = [text_key(text) for text in texts]
        first = dict(zip(keys, range(len(texts))))  # each distinct text once
        found = self._lookup(set(first))
        missing = [key for key in first if key not in found]
        computed: dict[bytes, np.ndarray] = {}
        if missing:
            fresh = np.ascontiguousarray(encode([texts[first[key]] for key in missing]), dtype=np.float32)
            self._write_shard(missing, fresh)
            computed = dict(zip(missing, fresh))
        log.info(
            "text features: %d distinct texts of %d, %d from the cache %s, %d encoded",
            len(first),
            len(texts),
            len(found),
            self.directory,
            len(missing),
        )
        return np.stack([found[key] if key in found else computed[key] for key in keys])

    def _lookup(self, wanted: set[bytes]) -> dict[bytes, np.ndarray]:
        found: dict[bytes, np.ndarray] = {}
        shards = sorted(p for p in self.directory.glob("*") if p.is_dir() and not p.name.startswith("."))
        for shard in shards:
            try:
                keys = np.load(shard / KEYS_FILE)
                features = np.load(shard / FEATURES_FILE, mmap_mode="r")
                if keys.ndim != 2 or keys.shape[1] != KEY_BYTES or len(keys) != len(features):
                    raise ValueError(f"keys {keys.shape} do not match features {features.shape}")
            except (OSError, ValueError) as err:
                log.warning("text feature cache: skipping unreadable shard %s: %s", shard, err)
                continue
            rows = [(key, row) for row, key in enumerate(map(bytes, keys)) if key in wanted and key not in found]
            if rows:
                picked = np.asarray(features[np.asarray([row for _, row in rows])], dtype=np.float32)
                found.update((key, vector) for (key, _), vector in zip(rows, picked))
        return found

    def _write_shard(self, keys: list[bytes], features: np.ndarray) -> None:
        key_array = np.frombuffer(b"".join(keys), dtype=np.uint8).reshape(len(keys), KEY_BYTES)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            with staged_directory(self.directory / uuid.uuid4().hex) as staging:
                np.save(staging / FEATURES_FILE, features)
                np.save(staging / KEYS_FILE, key_array)
        except OSError as err:  # a cache: training goes on without it
            log.warning("text feature cache: could not write to %s: %s", self.directory, err)
