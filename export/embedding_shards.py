"""Catalogue embedding cut into shards that run anywhere, at once, and resume where they stopped.

A catalogue of millions of articles takes hours to embed on one machine (docs/embedding.md: 106 captions/s
on these 2 cores). Split into shards, each embedded by its own process (a pod of the Indexed Job
k8s/jobs/catalogue-embed.yaml) sending batches to Triton, it takes as long as the slowest shard; and
since every shard writes its vectors in chunks that are never rewritten, a killed pod starts again where
it stopped. `export.update --vectors` then builds the next index version from the finished directory.

This module owns the embedding directory:

    embedding.json                  what is embedded (the `EmbeddingPlan`): a shard refuses a directory
                                    planned for other captions, another tower or another cut
    shard-00003/chunk-000012.npy    float32 [<= chunk_rows, dim]: rows shard_start + 12 * chunk_rows on
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
import uuid
from pathlib import Path
from typing import Any, Callable

import numpy as np

from export.catalogue_update import ItemEmbedder
from twotower import artifacts
from twotower.files import write_json

log = logging.getLogger("export.embedding_shards")

PLAN_FILE = "embedding.json"
CHUNK_ROWS = 4096  # at 106 captions/s about 40 s of work: what a killed shard may have to redo


def captions_digest(captions: list[str]) -> str:
    """sha256 over the captions in order (each length-prefixed: no two lists share a digest)."""
    digest = hashlib.sha256()
    for caption in captions:
        data = caption.encode()
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.hexdigest()


@dataclasses.dataclass(frozen=True)
class EmbeddingPlan:
    """Which captions are embedded by which item tower, cut into how many shards and chunks."""

    rows: int
    shards: int
    chunk_rows: int
    dim: int
    model_version: int
    item_tower_sha256: str  # the served model.pt's checksum, from the index manifest
    captions_sha256: str

    @classmethod
    def for_captions(
        cls, captions: list[str], manifest: artifacts.Manifest, shards: int, chunk_rows: int = CHUNK_ROWS
    ) -> "EmbeddingPlan":
        if shards < 1 or chunk_rows < 1:
            raise ValueError(f"shards ({shards}) and chunk rows ({chunk_rows}) must be at least 1")
        return cls(
            rows=len(captions),
            shards=shards,
            chunk_rows=chunk_rows,
            dim=manifest.dim,
            model_version=manifest.model_version,
            item_tower_sha256=manifest.tower_checksums.get(manifest.item_model, ""),
            captions_sha256=captions_digest(captions),
        )

    def shard_rows(self, shard: int) -> range:
        if not 0 <= shard < self.shards:
            raise ValueError(f"shard {shard} is not one of 0..{self.shards - 1}")
        return range(shard * self.rows // self.shards, (shard + 1) * self.rows // self.shards)

    def chunks(self, shard: int) -> list[range]:
        rows = self.shard_rows(shard)
        return [
            range(start, min(start + self.chunk_rows, rows.stop))
            for start in range(rows.start, rows.stop, self.chunk_rows)
        ]

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> "EmbeddingPlan":
        return cls(**{field.name: raw[field.name] for field in dataclasses.fields(cls)})


def chunk_path(root: Path, shard: int, chunk: int) -> Path:
    return Path(root) / f"shard-{shard:05d}" / f"chunk-{chunk:06d}.npy"


def read_plan(root: Path) -> EmbeddingPlan | None:
    path = Path(root) / PLAN_FILE
    if not path.is_file():
        return None
    try:
        return EmbeddingPlan.from_json(json.loads(path.read_text()))
    except (ValueError, KeyError, TypeError) as err:
        raise artifacts.ArtifactError(f"{path}: not an embedding plan ({err})") from err


def _check_same(found: EmbeddingPlan, expected: EmbeddingPlan, root: Path) -> None:
    fields = [f.name for f in dataclasses.fields(EmbeddingPlan)]
    differ = [
        f"{name} {getattr(found, name)!r} (expected {getattr(expected, name)!r})"
        for name in fields
        if getattr(found, name) != getattr(expected, name)
    ]
    if differ:
        raise artifacts.ArtifactError(
            f"{root / PLAN_FILE} was planned for other work: {'; '.join(differ)}. "
            "Use a new directory for other captions, another model version or another number of shards"
        )


def open_plan(root: Path, plan: EmbeddingPlan) -> None:
    """Record `plan` in `root`, or check it is the one already there: the first shard to start writes it
    (create-if-absent by a hard link, so two shards starting at once agree), the others compare."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    path = root / PLAN_FILE
    if not path.exists():
        staged = root / f".{PLAN_FILE}.{uuid.uuid4().hex}"
        write_json(staged, plan.to_json())
        try:
            os.link(staged, path)
        except FileExistsError:
            pass  # another shard was first: compare with its plan below
        except OSError:  # a volume without hard links: the last of shards starting together wins, the rest compare
            os.replace(staged, path)
        finally:
            staged.unlink(missing_ok=True)
    found = read_plan(root)
    assert found is not None
    _check_same(found, plan, root)


def _finished_chunk(path: Path, rows: int, dim: int) -> np.ndarray | None:
    """A chunk's vectors (memory-mapped) when its file holds exactly its rows, else None. Files appear by
    rename, so a chunk is never half written; a wrong shape is a file of another plan."""
    try:
        stored = np.load(path, mmap_mode="r")
    except (OSError, ValueError):
        return None
    return stored if stored.shape == (rows, dim) and stored.dtype == np.float32 else None


@dataclasses.dataclass
class ShardSummary:
    shard: int
    rows: int
    embedded: int  # rows embedded by this run
    resumed: int  # rows an earlier run had already embedded
    seconds: float


def embed_shard(root: Path, plan: EmbeddingPlan, captions: list[str], shard: int, embed: ItemEmbedder) -> ShardSummary:
    """Embed the chunks of `shard` not yet on disk, each written whole (temporary file, then rename).
    `plan` is `EmbeddingPlan.for_captions(captions, ...)`: the directory's plan is compared with it."""
    if len(captions) != plan.rows:
        raise ValueError(f"{len(captions)} captions, but the plan is for {plan.rows}")
    open_plan(root, plan)
    started = time.perf_counter()
    embedded = resumed = 0
    for number, rows in enumerate(plan.chunks(shard)):
        path = chunk_path(root, shard, number)
        if _finished_chunk(path, len(rows), plan.dim) is not None:
            resumed += len(rows)
            continue
        vectors = np.ascontiguousarray(embed(captions[rows.start : rows.stop]), dtype=np.float32)
        if vectors.shape != (len(rows), plan.dim) or not np.isfinite(vectors).all():
            raise artifacts.ArtifactError(
                f"shard {shard}, rows {rows.start}..{rows.stop - 1}: the item tower returned shape {vectors.shape}"
                f" (all finite: {bool(np.isfinite(vectors).all())}), expected ({len(rows)}, {plan.dim}), finite"
            )
        path.parent.mkdir(parents=True, exist_ok=True)
        staged = path.with_name(f".{path.name}.{uuid.uuid4().hex}.npy")
        np.save(staged, vectors)
        os.replace(staged, path)
        embedded += len(rows)
        elapsed = time.perf_counter() - started
        log.info(
            "shard %d/%d: rows %d..%d written (%d rows this run, %.0f rows/s)",
            shard,
            plan.shards,
            rows.start,
            rows.stop - 1,
            embedded,
            embedded / elapsed if elapsed > 0 else 0.0,
        )
    return ShardSummary(shard, len(plan.shard_rows(shard)), embedded, resumed, time.perf_counter() - started)


def read_vectors(root: Path, captions: list[str], manifest: artifacts.Manifest) -> np.ndarray:
    """float32 [len(captions), dim]: the finished directory's vectors, in caption order. Refused (naming
    what is wrong) unless it embedded exactly these captions with this index's item tower, and every shard
    is complete."""
    root = Path(root)
    plan = read_plan(root)
    if plan is None:
        raise artifacts.ArtifactError(f"{root}: no {PLAN_FILE}; run python -m export.embed into it first")
    _check_same(plan, EmbeddingPlan.for_captions(captions, manifest, plan.shards, plan.chunk_rows), root)
    vectors = np.empty((plan.rows, plan.dim), dtype=np.float32)
    missing: list[int] = []  # each chunk file is read once: checked and copied
    for shard in range(plan.shards):
        for number, rows in enumerate(plan.chunks(shard)):
            chunk = _finished_chunk(chunk_path(root, shard, number), len(rows), plan.dim)
            if chunk is None:
                missing.append(shard)
                break
            vectors[rows.start : rows.stop] = chunk
    if missing:
        raise artifacts.ArtifactError(
            f"{root}: {len(missing)} of {plan.shards} shards are not finished (shards {missing[:10]}"
            f"{' ...' if len(missing) > 10 else ''}); run their embedding again: it resumes"
        )
    return vectors


def precomputed_embedder(root: Path) -> Callable[[artifacts.Manifest], ItemEmbedder]:
    """For export.catalogue_update: captions -> the vectors a sharded embedding of exactly them left in `root`."""
    return lambda manifest: lambda captions: read_vectors(root, captions, manifest)
