"""Catalogue updates without retraining: the next index version from the served one plus a delta.

Input: an index root (its CURRENT version is the parent), an H&M-format articles file holding only
new or changed articles, and/or article_ids to remove. Output: the next version directory beside the
parent, published through CURRENT (a watching retriever swaps to it without restart).

- New articles: captions -> item tower (Triton at the parent's model version, batched) -> vectors
  appended after the parent's rows with their metadata and no popularity prior (nobody has bought them
  yet; twotower.popularity). The parent's FAISS index stays as it is: the rows past it are searched
  exactly beside it (serving.exact_rows), until an addition would leave more than `exact_rows.fits`
  allows, which adds them all to a copy of the index (no rebuild: the trained lists are kept).
- Changed articles: appended as new rows the same way; the old row is excluded from results and
  customers' histories point at the new row. They are indexed by their text vector alone: a learned
  id component returns with the next full export; they keep their popularity prior.
- Removed / out-of-stock articles: excluded from results (excluded.json); nothing is rebuilt, and
  histories naming them still work.

What the update leaves unchanged the new version shares with its parent: hard links to the same files
(export.catalogue_index.SharedParts). A removal writes excluded.json, the score head and the manifest and links
the rest (a parent written before items/ gets its columns written);
added rows rewrite the metadata and prior but share the parent's FAISS index, vectors and keyword index, the last
two written after them as blocks of their own (artifacts.VECTOR_BLOCKS_DIR, LEXICAL_BLOCKS_DIR; all as one again
past their limits, and the index written anew past `exact_rows.fits`),
and the customers' histories and the second stage's signals unless a changed article moved rows (new articles are
past the shared signals' rows: unsold, second_stage.ArticleSignals).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import time
from pathlib import Path
from typing import Callable, Protocol

import faiss
import numpy as np
import pandas as pd

from export.catalogue_index import SharedParts, index_rows, item_metadata, new_version_dir, write_index_dir
from serving import exact_rows
from serving.catalog import Catalog
from twotower import artifacts, triton_repository
from twotower.data.hm import build_captions, load_articles
from twotower.files import RowBlocks
from twotower.item_table import ItemTable

log = logging.getLogger("export.update")


class ItemEmbedder(Protocol):
    def __call__(self, captions: list[str]) -> np.ndarray: ...


@dataclasses.dataclass
class UpdateSummary:
    parent_version: str
    index_version: str
    added: int
    changed: int
    removed: int
    items: int
    seconds: float


def read_removals(path: Path) -> list[str]:
    """One article_id per line (blank lines and # comments ignored), zero-padded like the catalogue."""
    ids = []
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        if not text.isdigit() or len(text) > 10:
            raise ValueError(f"{path}, line {number}: {text!r} is not an article_id (at most 10 digits)")
        ids.append(text.zfill(10))
    return ids


def triton_embedder(
    url: str, manifest: artifacts.Manifest, batch_size: int = 64, timeout_s: float = 60.0, concurrency: int = 4
) -> ItemEmbedder:
    """Captions -> vectors through the item tower Triton serves at the index's model version, with the
    retriever's own client (same model/version/shape checks, timeouts and retries). `concurrency` batches
    are in flight at once, so Triton's dynamic batcher and every instance (or replica behind its Service)
    has work; results keep the captions' order."""
    from serving.towers import TokenIds, TowerClient

    tokenizer = TokenIds(manifest.clip_model)

    async def embed_batches(captions: list[str]) -> list[np.ndarray]:
        client = TowerClient(url, manifest, timeout_s)
        slots = asyncio.Semaphore(max(1, concurrency))

        async def embed(start: int) -> np.ndarray:
            async with slots:
                return await client.item_vectors(tokenizer(captions[start : start + batch_size]))

        try:
            await client.verify_models()
            return list(await asyncio.gather(*(embed(start) for start in range(0, len(captions), batch_size))))
        finally:
            await client.close()

    return lambda captions: np.concatenate(asyncio.run(embed_batches(captions))).astype(np.float32)


def local_embedder(model_repository: Path, manifest: artifacts.Manifest) -> ItemEmbedder:
    """The same TorchScript item tower Triton serves, run in this process (no Triton needed)."""

    from export.catalogue_index import embed_catalogue
    from twotower.model.clip_text import get_tokenizer

    tower = triton_repository.load_tower(model_repository, manifest, manifest.item_model)
    tokenizer = get_tokenizer(manifest.clip_model)
    return lambda captions: embed_catalogue(tower, captions, tokenizer)


def add_embedder_arguments(parser: argparse.ArgumentParser, required: bool = True) -> argparse._MutuallyExclusiveGroup:
    """--triton or --model-repository (one required unless `required` is False) and the Triton batching flags; the
    group is returned for a command that offers one more source."""
    source = parser.add_mutually_exclusive_group(required=required)
    source.add_argument("--triton", help="Triton HTTP host:port serving the item tower (batched requests)")
    source.add_argument(
        "--model-repository", type=Path, help="embed in-process with the repository's TorchScript tower"
    )
    parser.add_argument("--batch-size", type=int, default=64, help="captions per Triton request")
    parser.add_argument(
        "--concurrency", type=int, default=4, help="Triton requests in flight (keeps every instance/replica busy)"
    )
    return source


def embedder_from_arguments(args: argparse.Namespace) -> Callable[[artifacts.Manifest], ItemEmbedder]:
    """The embedder `add_embedder_arguments`' flags chose, for an index's manifest."""
    if args.triton:
        return lambda manifest: triton_embedder(args.triton, manifest, args.batch_size, concurrency=args.concurrency)
    return lambda manifest: local_embedder(args.model_repository, manifest)


def update_catalogue(
    index_root: Path,
    embedder_for: Callable[[artifacts.Manifest], ItemEmbedder],
    articles_path: Path | None = None,
    remove_ids: list[str] | None = None,
) -> UpdateSummary:
    """Write and publish the next index version on top of CURRENT; the parent is never modified. One writer of
    the root at a time: a concurrent update or export waits, then builds on what this one published."""
    with artifacts.writer_lock(artifacts.index_root(index_root)):  # checked first: nothing written elsewhere
        return _update(Path(index_root), embedder_for, articles_path, remove_ids)


def carried_over(delta: pd.DataFrame, parent_items: ItemTable, replaced: np.ndarray) -> dict[str, list[str]]:
    """The delta rows' metadata (item_metadata: the catalogue's columns and `price`), where a changed article
    (`replaced`: its parent row, -1 for a new one) keeps its parent's value of every column the delta file does not
    have: a delta that fixes descriptions must not wipe the prices export counted from sales. A new article gets ""."""
    metadata = item_metadata(delta)
    changed = np.flatnonzero(replaced >= 0)
    for name in parent_items:
        if name in delta.columns or not len(changed):
            continue
        values = list(metadata.get(name, [""] * len(delta)))
        for offset, value in zip(changed.tolist(), parent_items[name].take(replaced[changed])):
            values[offset] = value
        metadata[name] = values
    return metadata


def _update(
    index_root: Path,
    embedder_for: Callable[[artifacts.Manifest], ItemEmbedder],
    articles_path: Path | None,
    remove_ids: list[str] | None,
) -> UpdateSummary:
    started = time.perf_counter()
    index_root = Path(index_root)
    parent_name = artifacts.current_version(index_root)
    parent = Catalog(index_root / parent_name)  # verified against its manifest's checksums
    manifest = parent.manifest
    delta = load_articles(articles_path) if articles_path is not None else None
    remove_ids = list(dict.fromkeys(remove_ids or []))
    if (delta is None or delta.empty) and not remove_ids:
        raise ValueError("nothing to do: give an articles delta file and/or article_ids to remove")
    added_ids = set() if delta is None else set(delta["article_id"])  # removed in the same update: the removal wins
    unknown = [a for a in remove_ids if a not in parent.row_of and a not in added_ids]
    if unknown:
        raise ValueError(f"cannot remove unknown article_id(s): {unknown[:5]}")

    # The loaded parent's own objects are extended in memory; its files are never written. What the update leaves
    # as it was, the new version shares with the parent (export.catalogue_index.SharedParts): a removal writes one
    # small file, not a copy of the whole version (at 10M articles, 3.5 GB).
    vectors: list[np.ndarray | RowBlocks] = []  # the rows written: new ones, or all when the blocks are merged
    item_bias = parent.item_bias
    index, items, histories = None, None, {}
    past_index = manifest.unindexed_rows  # the last rows, which the FAISS index does not hold (serving.exact_rows)
    unchanged: set[str] = set()  # the parent's parts this version shares (SharedParts)
    excluded = set(np.flatnonzero(parent.excluded).tolist())
    n_parent = len(parent.vectors)
    added = changed = 0
    lexical = parent.lexical
    signals = None if parent.second_stage is None else parent.second_stage.signals
    if delta is not None and not delta.empty:
        captions = build_captions(delta)
        new_vectors = embedder_for(manifest)(captions)
        if lexical is not None:  # new rows join the keyword index: a block of its own, or everything built again
            lexical = lexical.appended(captions)
            if lexical.new_block() is not None:
                unchanged.add(artifacts.LEXICAL_DIR)
        _check_vectors(new_vectors, len(delta), manifest.dim, articles_path)
        remap = np.arange(n_parent + len(delta), dtype=np.int64)
        new_bias = np.zeros(len(delta), dtype=np.float32)
        replaced = np.full(len(delta), -1, dtype=np.int64)
        for offset, article_id in enumerate(delta["article_id"]):
            old = parent.row_of.get(article_id)
            if old is not None:
                changed += 1
                replaced[offset] = old
                excluded.add(old)
                remap[old] = n_parent + offset
                if item_bias is not None:
                    new_bias[offset] = item_bias[old]
            else:
                added += 1
        items = parent.items.appended(carried_over(delta, parent.items, replaced), len(delta))
        if item_bias is not None:
            item_bias = np.concatenate([item_bias, new_bias])
        first = n_parent - manifest.unindexed_rows  # the first row the parent's index lacks
        past_index += len(delta)
        if exact_rows.fits(past_index, first):  # the new rows are searched exactly beside the parent's index
            unchanged.add(artifacts.INDEX_FILE)
        else:  # added to a copy of it with the parent's unindexed rows, written anew
            index = faiss.read_index(str(parent.index_dir / artifacts.INDEX_FILE))  # its own copy: the parent stays
            for start, block in ((first, parent.vectors[first:n_parent]), (n_parent, new_vectors)):
                bias = None if item_bias is None else item_bias[start : start + len(block)]
                index.add(index_rows(block, bias, index.d))
            log.info("%d rows past the FAISS index of %d: all added to it, written anew", past_index, first)
            past_index = 0
        if signals is not None and changed:  # else shared: the rows past the parent's are new articles, unsold
            signals = signals.extended(replaced, n_parent)
        # Written in the parent's dtype: after the parent's files, or with all its rows when it has enough files
        append_block = len(artifacts.vector_files(manifest)) < artifacts.MAX_VECTOR_BLOCKS
        vectors = [new_vectors] if append_block else [parent.vectors, new_vectors]
        if append_block:
            unchanged.add(artifacts.VECTORS_FILE)
        if changed:  # customers' histories point at a changed article's new row
            with np.load(parent.index_dir / artifacts.HISTORIES_FILE) as stored:
                histories = {name: stored[name] for name in stored.files}
            rows = histories["rows"]
            histories["rows"] = np.where(rows >= 0, remap[np.clip(rows, 0, None)], rows).astype(rows.dtype)
            if "user_vectors" in histories:  # a customer whose history now names a changed article: ask Triton again
                stale = (histories["rows"] != rows).any(axis=1)
                histories["user_vectors"] = histories["user_vectors"].copy()
                histories["user_vectors"][stale] = np.nan
    # Removal applies to an article's current row (its last), so it wins when an id is both added and removed.
    excluded.update((parent.items if items is None else items).row_of[a] for a in remove_ids)
    if not histories:
        unchanged.add(artifacts.HISTORIES_FILE)
    if not changed:
        unchanged.add(artifacts.SECOND_STAGE_FILE)
    if items is None:  # no rows added: the catalogue's side is the parent's
        unchanged |= {
            artifacts.INDEX_FILE,
            artifacts.VECTORS_FILE,
            artifacts.ITEMS_DIR,
            artifacts.ITEM_BIAS_FILE,
            artifacts.SECOND_STAGE_FILE,
            artifacts.LEXICAL_DIR,
        }

    out = new_version_dir(index_root)
    fields = {
        k: v
        for k, v in dataclasses.asdict(manifest).items()
        if k not in ("dim", "metric", "item_count", "index_version", "files")
    }
    fields["parent_version"] = parent_name
    fields["unindexed_rows"] = past_index
    new_manifest = write_index_dir(
        out,
        index,
        vectors,
        parent.items if items is None else items,
        histories,
        parent.score_head,
        fields,
        sorted(excluded),
        item_bias,
        lexical,
        signals,
        SharedParts(parent.index_dir, manifest, frozenset(unchanged)),
    )
    artifacts.publish_version(index_root, out.name)
    summary = UpdateSummary(
        parent_name, out.name, added, changed, len(remove_ids), new_manifest.item_count, time.perf_counter() - started
    )
    log.info(
        "published index %s (parent %s): %d added, %d changed, %d removed, %d rows in %.1fs",
        out.name,
        parent_name,
        added,
        changed,
        len(remove_ids),
        new_manifest.item_count,
        summary.seconds,
    )
    return summary


def _check_vectors(vectors: np.ndarray, n: int, dim: int, source: Path | None) -> None:
    if vectors.shape != (n, dim):
        raise artifacts.ArtifactError(
            f"item tower returned shape {vectors.shape} for {n} articles, expected ({n}, {dim})"
        )
    bad = np.flatnonzero(~np.isfinite(vectors).all(axis=1))
    if len(bad):
        raise artifacts.ArtifactError(
            f"{source}: the item tower returned non-finite vectors for data line(s) {[int(i) + 2 for i in bad[:5]]}"
        )
