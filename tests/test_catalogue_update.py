"""Catalogue updates (new index versions without retraining), filtered search, the body size limit."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import faiss
import httpx
import numpy as np
import pandas as pd
import pytest

from export.catalogue_update import local_embedder, read_removals, update_catalogue
from export.embed import main as embed_main
from export.embedding_shards import EmbeddingPlan, embed_shard, precomputed_embedder, read_vectors
from export.update import main as update_main
from retriever.limits import BodySizeLimit
from serving import exact_rows
from serving.catalog import Catalog
from serving.filters import FilterColumns, FilterError, Filters
from tests.conftest import write_random_index
from twotower import artifacts, ranking, second_stage
from twotower.data.hm import DataFormatError, build_captions, find_data_file, load_articles
from twotower.files import RowBlocks, sha256_file
from twotower.ranking import cap_per_type


def copy_root(tiny_pipeline, tmp_path: Path) -> Path:
    root = tmp_path / "index"
    shutil.copytree(tiny_pipeline.index_dir, root)
    return root


def delta_file(tiny_pipeline, path: Path, new_ids: list[str], changed: int = 0) -> pd.DataFrame:
    """New articles cloned from existing rows with new ids and names, plus `changed` edited existing rows."""
    source = pd.read_csv(find_data_file(tiny_pipeline.data_dir, "articles"), dtype=str, keep_default_na=False)
    new = source.iloc[: len(new_ids)].copy()
    new["article_id"] = new_ids
    new["prod_name"] = [f"Brand new item {i}" for i in range(len(new_ids))]
    new["detail_desc"] = "A completely new fluorescent raincoat with sequins"
    edited = source.iloc[len(new_ids) : len(new_ids) + changed].copy()
    edited["prod_name"] = "Edited name"
    frame = pd.concat([new, edited])
    frame.to_csv(path, index=False)
    return frame


def embedder(tiny_pipeline):
    return lambda manifest: local_embedder(tiny_pipeline.repository, manifest)


def test_update_appends_a_new_version_and_leaves_the_parent_untouched(tiny_pipeline, tmp_path: Path) -> None:
    root = copy_root(tiny_pipeline, tmp_path)
    parent = artifacts.current_version(root)
    parent_files = {p: p.read_bytes() for p in (root / parent).rglob("*") if p.is_file()}
    before = Catalog(root)
    delta = delta_file(tiny_pipeline, tmp_path / "delta.csv", ["0999000001", "0999000002"], changed=1)
    changed_id = str(delta["article_id"].iloc[-1]).zfill(10)
    removed_id = before.article_ids[10]

    summary = update_catalogue(root, embedder(tiny_pipeline), tmp_path / "delta.csv", [removed_id])
    assert (summary.added, summary.changed, summary.removed) == (2, 1, 1)
    assert artifacts.current_version(root) == summary.index_version != parent
    assert {p: p.read_bytes() for p in (root / parent).rglob("*") if p.is_file()} == parent_files  # immutable parent

    after = Catalog(root)
    # Both versions loaded, as during a hot swap: each one's index and keyword matrix are mapped from its own
    # files (shared, reclaimable pages), not copied into the process (serving/catalog.py INDEX_READ_FLAGS).
    mapped = Path("/proc/self/maps").read_text()
    for catalog in (before, after):
        assert str(catalog.index_dir / artifacts.INDEX_FILE) in mapped
        assert all(isinstance(segment.bm25.scores["data"], np.memmap) for segment in catalog.lexical.segments)
    assert not isinstance(Catalog(root, mapped=False).lexical.base.bm25.scores["data"], np.memmap)  # --index-mmap false
    assert after.manifest.parent_version == parent and after.manifest.model_version == before.manifest.model_version
    assert len(after.article_ids) == len(before.article_ids) + 3
    new_row = after.row_of["0999000001"]
    (metadata,) = after.metadata([new_row])
    assert metadata["prod_name"] == "Brand new item 0"
    assert "article_id" not in metadata  # answers carry it beside the metadata
    # The new article's own vector finds it first; removed and replaced rows are never returned.
    _, rows = after.search(after.vectors[[new_row]], 5)
    assert rows[0, 0] == new_row
    # The keyword index knows the new rows too: their words find them first. They are a block of their own; the
    # parent's rows are its files, linked.
    assert after.lexical is not None and len(after.lexical) == len(after.article_ids)
    assert after.manifest.lexical_blocks == [f"{artifacts.LEXICAL_BLOCKS_DIR}/{summary.index_version}"]
    assert [len(segment) for segment in after.lexical.segments] == [len(before.article_ids), 3]
    matrix = Path(artifacts.LEXICAL_DIR) / "data.csc.index.npy"
    assert (after.index_dir / matrix).samefile(before.index_dir / matrix)
    found = after.lexical.search("fluorescent raincoat sequins", 2, ~after.excluded)
    assert set(found.tolist()) == {new_row, after.row_of["0999000002"]}
    old_changed_row = before.row_of[changed_id]
    assert after.excluded[old_changed_row] and after.excluded[after.row_of[removed_id]]
    assert (
        after.row_of[changed_id] != old_changed_row
        and after.metadata([after.row_of[changed_id]])[0]["prod_name"] == "Edited name"
    )
    # The delta has no price column: the changed article keeps the mean sale price export counted, a new one has none
    sold_price = before.metadata([old_changed_row])[0]["price"]
    assert sold_price and after.metadata([after.row_of[changed_id]])[0]["price"] == sold_price
    assert "price" not in delta.columns and metadata["price"] == ""
    # The popularity prior: nobody has bought a new article yet; a changed one keeps its sales.
    assert after.item_bias is not None and after.index.d == after.manifest.dim + 1
    assert after.item_bias[new_row] == 0.0 and np.array_equal(
        after.item_bias[: len(before.item_bias)], before.item_bias
    )
    assert after.item_bias[after.row_of[changed_id]] == before.item_bias[old_changed_row]
    _, rows = after.search(after.vectors, 20)
    returned = set(rows[rows >= 0].tolist())
    assert old_changed_row not in returned and after.row_of[removed_id] not in returned
    # Histories now point at the changed article's new row; those customers' stored vectors are
    # marked stale (Triton recomputes them), every other customer keeps theirs.
    assert old_changed_row not in set(after.history_rows[after.history_rows >= 0].tolist())
    touched = (before.history_rows == old_changed_row).any(axis=1)
    assert touched.any()
    customers = list(before.customer_row)
    assert all(after.customer_vector(customers[i]) is None for i in np.flatnonzero(touched))
    kept = np.flatnonzero(~touched)
    assert len(kept) and all(
        np.array_equal(after.customer_vector(customers[i]), before.customer_vector(customers[i])) for i in kept
    )


def shared_names(parent: Path, child: Path) -> set[str]:
    """The manifest names of `child`'s files that are the same files (hard links) as `parent`'s."""
    names = artifacts.read_manifest(child).files
    return {name for name in names if (parent / name).exists() and (parent / name).samefile(child / name)}


def test_an_update_shares_the_files_it_leaves_unchanged(tiny_pipeline, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(exact_rows, "MAX_SHARE", 1.0)  # rows past the index: not bound by this tiny index's size
    root = copy_root(tiny_pipeline, tmp_path)
    first = root / artifacts.current_version(root)
    parent = Catalog(root)
    catalogue_side = set(parent.manifest.files) - {artifacts.SCORE_HEAD_FILE, artifacts.HISTORIES_FILE}
    assert any(name.startswith(artifacts.LEXICAL_DIR + "/") for name in catalogue_side)
    assert artifacts.SECOND_STAGE_FILE in catalogue_side or parent.second_stage is None

    # A removal links every file of the parent but the manifest, the score head and the excluded rows.
    removed = parent.article_ids[3]
    second = root / update_catalogue(root, embedder(tiny_pipeline), remove_ids=[removed]).index_version
    assert shared_names(first, second) == catalogue_side | {artifacts.HISTORIES_FILE}
    after = Catalog(root)  # checksums verified
    assert after.excluded[after.row_of[removed]] and after.n_excluded == parent.n_excluded + 1
    np.testing.assert_array_equal(after.vectors, parent.vectors)
    _, rows = after.search(after.vectors, 10)
    assert after.row_of[removed] not in set(rows.ravel().tolist())

    # New articles rewrite the catalogue's metadata and prior; their vectors and keyword index rows are blocks after
    # the parent's, the FAISS index stays the parent's (the new rows are searched exactly beside it), and the
    # customers' histories and the second stage's sales are shared ...
    delta_file(tiny_pipeline, tmp_path / "new.csv", ["0999000001"])
    third = root / update_catalogue(root, embedder(tiny_pipeline), tmp_path / "new.csv").index_version
    third_block = f"{artifacts.VECTOR_BLOCKS_DIR}/{third.name}.npy"
    keywords = {name for name in catalogue_side if artifacts.part_of(name) == artifacts.LEXICAL_DIR}
    sales = {artifacts.SECOND_STAGE_FILE} & catalogue_side
    kept = {artifacts.HISTORIES_FILE, artifacts.VECTORS_FILE, artifacts.INDEX_FILE}
    assert shared_names(second, third) == kept | keywords | sales
    assert artifacts.read_manifest(third).unindexed_rows == 1
    assert artifacts.read_manifest(third).vector_blocks == [artifacts.VECTORS_FILE, third_block]
    third_keywords = f"{artifacts.LEXICAL_BLOCKS_DIR}/{third.name}"
    assert artifacts.read_manifest(third).lexical_blocks == [third_keywords]
    assert len(np.load(third / third_block)) == 1  # the new row alone
    grown = Catalog(root)
    assert grown.excluded[after.row_of[removed]]  # the removal carries over
    new_row = grown.row_of["0999000001"]
    np.testing.assert_array_equal(grown.vectors[: len(parent.vectors)], parent.vectors)
    _, rows = grown.search(grown.vectors[[new_row]], 5)
    assert rows[0, 0] == new_row
    if grown.second_stage is not None:  # the new row is past the shared signals: ranked as an unsold article
        assert grown.second_stage.signals.size == new_row
        purchases, first_sale = grown.second_stage.signals.sales(np.asarray([0, new_row]))
        assert purchases[1].sum() == 0 and first_sale[1] == second_stage.NEVER
        assert first_sale[0] == parent.second_stage.signals.days_since_first_sale[0]  # type: ignore[union-attr]
        padded = grown.second_stage.signals.extended(np.full(len(grown.article_ids) - new_row, -1))
        np.testing.assert_array_equal(padded.sales(np.arange(len(grown.article_ids)))[0][new_row:], 0.0)
        request = ranking.RankRequest(12, stage=grown.second_stage)
        ((_, rows),) = ranking.rank(grown, grown.vectors[[new_row]], [request])  # its pool holds the new row
        assert len(rows) == 12
    # ... unless a changed article moves customers' history rows.
    delta_file(tiny_pipeline, tmp_path / "changed.csv", [], changed=1)
    fourth = root / update_catalogue(root, embedder(tiny_pipeline), tmp_path / "changed.csv").index_version
    third_keyword_files = {name for name in artifacts.read_manifest(third).files if name.startswith(third_keywords)}
    assert (
        shared_names(third, fourth)
        == {
            artifacts.VECTORS_FILE,
            third_block,
            artifacts.INDEX_FILE,
        }
        | keywords
        | third_keyword_files
    )
    assert artifacts.read_manifest(fourth).unindexed_rows == 2
    assert len(artifacts.read_manifest(fourth).vector_blocks) == 3
    changed = Catalog(fourth)
    if changed.second_stage is not None:  # written again, every row: the changed article's new row has its sales
        assert changed.second_stage.signals.size == len(changed.article_ids)
    assert len(artifacts.read_manifest(fourth).lexical_blocks) == 2
    # Every version still verifies (linked files keep the checksums their parent recorded).
    for version in (first, second, third, fourth):
        artifacts.verify_files(version, artifacts.read_manifest(version))
    # One vectors file and every row in the index: no vector_blocks or unindexed_rows in the manifest, which a
    # retriever from before them reads too.
    assert not {"vector_blocks", "unindexed_rows"} & set(json.loads((second / artifacts.MANIFEST_FILE).read_text()))
    # The list is the rows' order: one that is not the version's files in a possible order is refused.
    raw = json.loads((fourth / artifacts.MANIFEST_FILE).read_text())
    for wrong in (raw["vector_blocks"][::-1], raw["vector_blocks"][:2], [*raw["vector_blocks"], third_block]):
        (fourth / artifacts.MANIFEST_FILE).write_text(json.dumps({**raw, "vector_blocks": wrong}))
        with pytest.raises(artifacts.ArtifactError, match="vector_blocks"):
            Catalog(fourth)
    for wrong in (raw["lexical_blocks"][:1], [*raw["lexical_blocks"], third_keywords]):
        (fourth / artifacts.MANIFEST_FILE).write_text(json.dumps({**raw, "lexical_blocks": wrong}))
        with pytest.raises(artifacts.ArtifactError, match="lexical_blocks"):
            Catalog(fourth)
    (fourth / artifacts.MANIFEST_FILE).write_text(json.dumps({**raw, "unindexed_rows": raw["item_count"] + 1}))
    with pytest.raises(artifacts.ArtifactError, match="unindexed_rows"):
        Catalog(fourth)


def test_vector_blocks_are_merged_into_one_file_past_the_limit(tiny_pipeline, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(artifacts, "MAX_VECTOR_BLOCKS", 2)
    root = copy_root(tiny_pipeline, tmp_path)
    parent = Catalog(root)
    names = [["0999000001"], ["0999000002", "0999000003"]]
    for number, ids in enumerate(names):
        delta_file(tiny_pipeline, tmp_path / f"new{number}.csv", ids)
        update_catalogue(root, embedder(tiny_pipeline), tmp_path / f"new{number}.csv")
        if number == 0:
            blocks = Catalog(root).vectors
            assert isinstance(blocks, RowBlocks) and len(blocks.blocks) == 2
    merged = Catalog(root)  # the second addition found two files: all rows written as one again
    assert merged.manifest.vector_blocks == [] and isinstance(merged.vectors, np.ndarray)
    assert len(merged.vectors) == len(parent.vectors) + 3
    np.testing.assert_array_equal(merged.vectors[:-2], np.asarray(blocks))  # the rows before the second addition


def test_rows_past_the_index_are_added_to_it_past_the_limit(tiny_pipeline, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(exact_rows, "MAX_ROWS", 2)
    root = copy_root(tiny_pipeline, tmp_path)
    first = root / artifacts.current_version(root)
    parent = Catalog(root)
    for number, ids in enumerate([["0999000001"], ["0999000002", "0999000003"]]):
        delta_file(tiny_pipeline, tmp_path / f"new{number}.csv", ids)
        update_catalogue(root, embedder(tiny_pipeline), tmp_path / f"new{number}.csv")
        if number == 0:
            one = Catalog(root)
            assert one.manifest.unindexed_rows == 1 and past_index(one).tolist() == [len(parent.article_ids)]
            assert (one.index_dir / artifacts.INDEX_FILE).samefile(first / artifacts.INDEX_FILE)
    folded = Catalog(root)  # 3 rows past the index would pass the limit: all of them added to a new index file
    assert folded.manifest.unindexed_rows == 0 and not len(past_index(folded))
    assert folded.index.ntotal == len(folded.article_ids) == len(parent.article_ids) + 3
    assert not (folded.index_dir / artifacts.INDEX_FILE).samefile(first / artifacts.INDEX_FILE)
    new_rows = folded.rows_for(["0999000001", "0999000002", "0999000003"])  # the first two: the same caption
    _, rows = folded.search(folded.vectors[new_rows], 2)
    assert all(row in found for row, found in zip(new_rows, rows))


def past_index(catalog: Catalog) -> np.ndarray:
    """The rows a version scores exactly beside its index because the index lacks them (serving.exact_rows)."""
    ids = np.zeros(0, np.int64) if catalog.exact_rows is None else catalog.exact_rows.ids
    return ids[ids >= catalog.index.ntotal]


def index_without_last_rows(version: Path, vectors: np.ndarray, bias: np.ndarray, unindexed: int) -> None:
    """A version's index rewritten over all but its last rows, which the manifest lists as unindexed: the version a
    catalogue update that added them writes."""
    from export.catalogue_index import build_faiss_index

    held, index_type = len(vectors) - unindexed, artifacts.read_manifest(version).index_type
    index = build_faiss_index(vectors[:held], index_type, bias[:held])
    faiss.write_index(index, str(version / artifacts.INDEX_FILE))
    manifest = artifacts.read_manifest(version)
    files = {**manifest.files, artifacts.INDEX_FILE: sha256_file(version / artifacts.INDEX_FILE)}
    artifacts.write_manifest(version, dataclasses.replace(manifest, files=files, unindexed_rows=unindexed))


@pytest.mark.parametrize("index_type", ["flat", "ivf"])
@pytest.mark.parametrize("removed", [0, 20, 400])
def test_rows_past_the_index_are_searched_exactly_beside_it(tmp_path: Path, index_type: str, removed: int) -> None:
    """Every search path (plain, over-fetch, id selector, exact, many removed rows) returns what an exact index
    over every row returns (IVF probing every list), and the removed rows past the index stay hidden."""
    rng = np.random.default_rng(7)
    n, unindexed = 3000, 200
    groups = rng.choice(["A", "B", "C"], size=n, p=[0.6, 0.39, 0.01]).tolist()
    bias = rng.random(n).astype(np.float32)
    hidden = np.concatenate([rng.choice(n - unindexed, removed // 2, replace=False), n - 1 - np.arange(removed // 2)])
    catalogs = []
    for name in ("full", "partial"):
        root = tmp_path / name
        vectors = write_random_index(root / "v0001", index_type, groups, seed=3, item_bias=bias, prior_weight=0.1)
        artifacts.publish_version(root, "v0001")
        if name == "partial":
            index_without_last_rows(root / "v0001", vectors, bias, unindexed)
        if removed:  # a removal keeps the parent's index and its rows past it
            update_catalogue(root, lambda manifest: None, remove_ids=[str(row) for row in hidden])
        catalogs.append(Catalog(root, exact_search_limit=100, ivf_nprobe=1000))
    full, partial = catalogs
    assert partial.index.ntotal == n - unindexed and len(past_index(partial)) == unindexed
    assert (partial._available is not None) == (removed > ranking.OVERFETCH_LIMIT)
    queries = rng.standard_normal((20, vectors.shape[1])).astype(np.float32)
    for prior in (0.0, 0.1):
        expected_scores, expected = full.search(queries, 10, prior)
        scores, rows = partial.search(queries, 10, prior)
        np.testing.assert_array_equal(rows, expected)
        np.testing.assert_allclose(scores, expected_scores, rtol=1e-5, atol=1e-6)
        assert not np.isin(rows, hidden).any()
    masks = [
        full.filter_columns.mask(Filters.parse({"product_group": groups})) for groups in (["B"], ["A", "B", "C"], ["C"])
    ]
    if index_type == "ivf":  # every plan of a filtered search (a flat index has no selector plan)
        expected_plans = {"exact", "ivf+selector"} | ({"overfetch"} if removed <= ranking.OVERFETCH_LIMIT else set())
        assert {partial.search_plan(mask & ~partial.excluded) for mask in masks} == expected_plans
    for mask in masks:
        for query in queries[:5]:
            expected_scores, expected = full.search_masked(query, 10, mask, 0.1)
            scores, rows = partial.search_masked(query, 10, mask, 0.1)
            np.testing.assert_array_equal(rows, expected)
            assert mask[rows[rows >= 0]].all() and not np.isin(rows, hidden).any()


@pytest.mark.parametrize(
    "index_type, on_gpu",
    [("hnsw", False), ("ivf-fp16", False), ("ivf-sq8", False), ("ivf-pq-fastscan", False), ("ivf", True)],
)
def test_rows_past_an_approximate_index_rank_by_their_exact_scores(
    tmp_path: Path, index_type: str, on_gpu: bool
) -> None:
    """With an approximate index (and through a GPU copy: here a stand-in that searches the CPU index) the rows past
    it keep their exact scores, and every one of them that the request may see and that scores above the last
    result is in it."""
    rng = np.random.default_rng(8)
    n, unindexed = 3000, 200
    bias = rng.random(n).astype(np.float32)
    root = tmp_path / "index"
    vectors = write_random_index(root / "v0001", index_type, ["A"] * n, seed=4, item_bias=bias, prior_weight=0.1)
    artifacts.publish_version(root, "v0001")
    index_without_last_rows(root / "v0001", vectors, bias, unindexed)
    # many removed rows: one selector of the rest (CPU only); a few: over-fetched, on the GPU copy when there is one
    hidden = np.concatenate([rng.choice(n, 20 if on_gpu else 300, replace=False), [n - 1]])
    update_catalogue(root, lambda manifest: None, remove_ids=[str(row) for row in hidden])
    catalog = Catalog(root, exact_search_limit=100)
    searched_on_gpu: list[int] = []
    if on_gpu:

        class StandIn:  # what _top_k calls on a GPU copy: search(queries, k)
            def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
                searched_on_gpu.append(k)
                return catalog.index.search(queries, k)

        catalog.gpu = StandIn()  # type: ignore[assignment]
    queries = rng.standard_normal((30, vectors.shape[1])).astype(np.float32)
    exact = vectors @ queries.T + 0.1 * bias[:, None]  # [n, queries]
    scores, rows = catalog.search(queries, 10, 0.1)
    assert bool(searched_on_gpu) == on_gpu and not np.isin(rows, hidden).any() and (rows >= 0).all()
    shown_past = np.setdiff1d(np.arange(n - unindexed, n), hidden)
    for i, (found_scores, found) in enumerate(zip(scores, rows)):
        past = found >= n - unindexed
        np.testing.assert_allclose(found_scores[past], exact[found[past], i], rtol=1e-5, atol=1e-5)
        assert set(shown_past[exact[shown_past, i] > found_scores[-1] + 1e-5]) <= set(found.tolist())


def test_gathered_float16_rows_are_decoded_exactly() -> None:
    from serving.catalog import as_float32

    rows = np.random.default_rng(9).standard_normal((2, 7, 16)).astype(np.float16)
    decoded = as_float32(rows)
    assert decoded.dtype == np.float32 and decoded.shape == rows.shape
    np.testing.assert_array_equal(decoded, rows.astype(np.float32))
    single = rows.astype(np.float32)
    assert as_float32(single) is single  # float32 rows as they are


def test_keyword_index_rows_appended_as_a_block_score_as_the_base_would(tmp_path: Path, monkeypatch) -> None:
    import pickle

    from serving import lexical

    captions = ["grey dress", "black trousers", "grey trousers", "red swimwear bottom", "black dress"] * 8
    base = lexical.LexicalIndex.build(captions)
    # Rows the base already has, appended again: the block scores them with the base's statistics, bit for bit as
    # the base did.
    appended = base.appended(captions[:3])
    assert [len(segment) for segment in appended.segments] == [40, 3] and len(base.segments) == 1
    for text in ("grey trousers", "black dress", "swimwear"):
        np.testing.assert_array_equal(appended.scores(text)[40:], base.scores(text)[:3])
    # A word the base never saw finds the rows that hold it; words in no row score nothing.
    grown = appended.appended(["fluorescent raincoat"])
    everything = np.ones(len(grown), dtype=bool)
    assert grown.search("fluorescent raincoat", 5, everything).tolist() == [43]
    assert grown.search("velvet", 5, everything).tolist() == []
    # Saved into the versions that appended them, loaded and pickled (KServe workers) by their files.
    base.save(tmp_path / "base")
    grown = lexical.LexicalIndex.load(tmp_path / "base").appended(captions[:3])
    with pytest.raises(ValueError, match="block by block"):
        grown.save(tmp_path / "whole")
    grown.new_block().save(tmp_path / "block")  # type: ignore[union-attr]
    loaded = lexical.LexicalIndex.load(tmp_path / "base", [tmp_path / "block"])
    assert loaded.new_block() is None and loaded.captions == captions + captions[:3]
    assert loaded.__getstate__() == {"directory": tmp_path / "base", "blocks": [tmp_path / "block"]}
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(loaded)).scores("grey dress"), loaded.scores("grey dress"))
    # Past MAX_BLOCKS blocks, or a tenth of the base's rows, the next addition builds everything again.
    monkeypatch.setattr(lexical, "MAX_BLOCKS", 1)
    assert len(loaded.appended(["blue coat"]).segments) == 1
    monkeypatch.setattr(lexical, "MAX_BLOCKS", 8)
    assert len(base.appended(captions[:5]).segments) == 1 and len(base.appended(captions[:4]).segments) == 2


def test_a_swap_reads_only_what_the_served_version_does_not_share(tiny_pipeline, tmp_path: Path, monkeypatch) -> None:
    root = copy_root(tiny_pipeline, tmp_path)
    served = Catalog(root)
    removed = served.article_ids[5]
    version = root / update_catalogue(root, embedder(tiny_pipeline), remove_ids=[removed]).index_version
    hashed: list[str] = []
    hash_file = artifacts.sha256_file
    monkeypatch.setattr(artifacts, "sha256_file", lambda path: hashed.append(Path(path).name) or hash_file(path))

    swapped = Catalog(root, shares_with=served)
    assert sorted(hashed) == [artifacts.EXCLUDED_FILE, artifacts.SCORE_HEAD_FILE]  # the rest are the served files
    assert swapped.index is served.index  # one FAISS index for both versions
    # ... and what is derived from the shared metadata and histories
    assert swapped.items is served.items and swapped.filter_columns is served.filter_columns
    assert swapped.products is served.products and swapped.customer_row is served.customer_row
    _, rows = swapped.search(swapped.vectors[:20], 10)
    assert swapped.row_of[removed] not in set(rows.ravel().tolist())
    # New articles: new metadata, the same histories and FAISS index (the new row is searched beside it).
    delta_file(tiny_pipeline, tmp_path / "new.csv", ["0999000001"])
    update_catalogue(root, embedder(tiny_pipeline), tmp_path / "new.csv")
    hashed.clear()
    grown = Catalog(root, shares_with=swapped)
    # the served vectors and index files are not read again: only the block of the new article's vector
    assert not {artifacts.VECTORS_FILE, artifacts.INDEX_FILE} & set(hashed)
    assert f"{grown.manifest.index_version}.npy" in hashed
    assert grown.index is swapped.index and grown.items is not swapped.items and "0999000001" in grown.row_of
    assert grown.customer_row is swapped.customer_row and len(grown.article_ids) == len(swapped.article_ids) + 1
    # A file it does not share is still checked.
    (version / artifacts.EXCLUDED_FILE).write_text(json.dumps({"rows": []}))
    with pytest.raises(artifacts.ArtifactError, match="excluded.json: checksum"):
        Catalog(version, shares_with=served)


def test_a_swap_goes_ahead_when_the_served_versions_directory_is_gone(tiny_pipeline, tmp_path: Path) -> None:
    root = copy_root(tiny_pipeline, tmp_path)
    first = root / artifacts.current_version(root)
    served = Catalog(first)
    version = root / update_catalogue(root, embedder(tiny_pipeline), remove_ids=[served.article_ids[0]]).index_version
    first.rename(tmp_path / "moved-away")  # an operator cleaned up old versions: the links keep their files
    swapped = Catalog(version, shares_with=served)  # nothing to share: every file hashed, its own index
    assert swapped.index is not served.index and swapped.n_excluded == served.n_excluded + 1


def test_an_update_of_a_version_with_items_json_writes_its_columns(tiny_pipeline, tmp_path: Path) -> None:
    """A parent written before items/ has items.json: nothing to share there, so the update writes items/."""
    root = copy_root(tiny_pipeline, tmp_path)
    first = root / artifacts.current_version(root)
    manifest = artifacts.read_manifest(first)
    columns = artifacts.read_items(first, manifest).to_lists()
    shutil.rmtree(first / artifacts.ITEMS_DIR)
    (first / artifacts.ITEMS_FILE).write_text(json.dumps(columns))
    files = {name: sha for name, sha in manifest.files.items() if artifacts.part_of(name) != artifacts.ITEMS_DIR}
    files[artifacts.ITEMS_FILE] = sha256_file(first / artifacts.ITEMS_FILE)
    artifacts.write_manifest(first, dataclasses.replace(manifest, files=files))

    second = root / update_catalogue(root, embedder(tiny_pipeline), remove_ids=[columns["article_id"][0]]).index_version
    assert any(artifacts.part_of(name) == artifacts.ITEMS_DIR for name in artifacts.read_manifest(second).files)
    assert Catalog(root).items.to_lists() == columns


def test_a_volume_without_hard_links_gets_copies(tiny_pipeline, tmp_path: Path, monkeypatch, caplog) -> None:
    root = copy_root(tiny_pipeline, tmp_path)
    first = root / artifacts.current_version(root)

    def refuse(source: object, target: object) -> None:
        raise OSError(1, "Operation not permitted")

    monkeypatch.setattr("os.link", refuse)
    removed = Catalog(root).article_ids[0]
    second = root / update_catalogue(root, embedder(tiny_pipeline), remove_ids=[removed]).index_version
    assert shared_names(first, second) == set()
    assert (second / artifacts.VECTORS_FILE).read_bytes() == (first / artifacts.VECTORS_FILE).read_bytes()
    assert "the volume refused hard links" in caplog.text and "copied instead" in caplog.text
    Catalog(root)  # checksums verified


def test_concurrent_updates_both_land(tiny_pipeline, tmp_path: Path) -> None:
    """Two updates at once: the second waits for the first and builds on its version, so the published
    catalogue holds both deltas (without the writer lock each built on the same parent: one was lost)."""
    import threading
    import time

    root = copy_root(tiny_pipeline, tmp_path)
    delta_file(tiny_pipeline, tmp_path / "a.csv", ["0999000001"])
    delta_file(tiny_pipeline, tmp_path / "b.csv", ["0999000002"])
    first_embedding = threading.Event()

    def slow_embedder(manifest: artifacts.Manifest):
        embed = local_embedder(tiny_pipeline.repository, manifest)

        def embed_slowly(captions: list[str]) -> np.ndarray:
            first_embedding.set()
            time.sleep(0.5)  # the other update starts meanwhile
            return embed(captions)

        return embed_slowly

    errors: list[BaseException] = []

    def update(delta: Path) -> None:
        try:
            update_catalogue(root, slow_embedder, delta)
        except BaseException as err:  # noqa: BLE001 - reported by the assertion below
            errors.append(err)

    threads = [threading.Thread(target=update, args=(tmp_path / "a.csv",))]
    threads[0].start()
    first_embedding.wait(30)
    threads.append(threading.Thread(target=update, args=(tmp_path / "b.csv",)))
    threads[1].start()
    for thread in threads:
        thread.join(60)
    assert not errors, errors
    final = Catalog(root)
    assert {"0999000001", "0999000002"} <= set(final.row_of)


def test_sharded_embedding_resumes_where_it_stopped_and_feeds_an_update(tiny_pipeline, tmp_path: Path) -> None:
    """A delta embedded in 3 shards of 2-row chunks: a shard killed after its first chunk embeds only the rest
    when run again, and `--vectors` publishes the same index rows as embedding during the update."""
    root = copy_root(tiny_pipeline, tmp_path)
    ids = [f"09990000{i:02d}" for i in range(11)]
    delta = delta_file(tiny_pipeline, tmp_path / "delta.csv", ids)
    manifest = Catalog(root).manifest
    captions = build_captions(load_articles(tmp_path / "delta.csv"))
    embed = local_embedder(tiny_pipeline.repository, manifest)
    plan = EmbeddingPlan.for_captions(captions, manifest, shards=3, chunk_rows=2)
    out = tmp_path / "embedding"
    asked: list[int] = []

    def dies_after_one_chunk(batch: list[str]) -> np.ndarray:
        if asked:
            raise RuntimeError("pod evicted")
        asked.append(len(batch))
        return embed(batch)

    with pytest.raises(RuntimeError, match="evicted"):
        embed_shard(out, plan, captions, 1, dies_after_one_chunk)
    with pytest.raises(artifacts.ArtifactError, match=r"3 of 3 shards are not finished"):
        read_vectors(out, captions, manifest)
    summaries = [embed_shard(out, plan, captions, shard, embed) for shard in range(3)]
    assert [(s.rows, s.embedded, s.resumed) for s in summaries] == [(3, 3, 0), (4, 2, 2), (4, 4, 0)]
    assert embed_shard(out, plan, captions, 2, dies_after_one_chunk).embedded == 0  # done: nothing asked again
    # Batches of 2 captions pad to another length than one batch of 11: equal up to float rounding.
    np.testing.assert_allclose(read_vectors(out, captions, manifest), embed(captions), atol=1e-5)

    update_catalogue(root, precomputed_embedder(out), tmp_path / "delta.csv")
    direct = copy_root(tiny_pipeline, tmp_path / "direct")
    update_catalogue(direct, embedder(tiny_pipeline), tmp_path / "delta.csv")
    sharded, embedded_now = Catalog(root), Catalog(direct)
    rows = [sharded.row_of[a] for a in delta["article_id"]]
    np.testing.assert_allclose(sharded.vectors[rows], embedded_now.vectors[rows], atol=1e-5)


def test_sharded_embedding_through_the_real_triton(tiny_pipeline, triton, tmp_path: Path) -> None:
    """Two shards sent to Triton's item tower in batches of 3, 2 in flight: the vectors the in-process tower
    computes for the same captions."""
    delta_file(tiny_pipeline, tmp_path / "delta.csv", [f"09990000{i:02d}" for i in range(9)])
    out = tmp_path / "embedding"
    url = f"127.0.0.1:{triton.settings.http_port}"
    common = ["--index-dir", str(tiny_pipeline.index_dir), "--articles", str(tmp_path / "delta.csv"), "--out", str(out)]
    for shard in ("0", "1"):
        args = [*common, "--shards", "2", "--shard", shard, "--triton", url, "--batch-size", "3", "--concurrency", "2"]
        assert embed_main(args) == 0
    manifest = Catalog(tiny_pipeline.index_dir).manifest
    captions = build_captions(load_articles(tmp_path / "delta.csv"))
    expected = local_embedder(tiny_pipeline.repository, manifest)(captions)
    np.testing.assert_allclose(read_vectors(out, captions, manifest), expected, atol=1e-5)


def test_sharded_embedding_refuses_other_work_in_its_directory(tiny_pipeline, tmp_path: Path) -> None:
    root = copy_root(tiny_pipeline, tmp_path)
    delta_file(tiny_pipeline, tmp_path / "a.csv", ["0999000001", "0999000002"])
    delta_file(tiny_pipeline, tmp_path / "b.csv", ["0999000003"])
    versions = artifacts.list_versions(root)
    repository = ["--model-repository", str(tiny_pipeline.repository)]
    out = tmp_path / "embedding"
    cli = ["--index-dir", str(root), "--out", str(out)]
    assert embed_main([*cli, "--articles", str(tmp_path / "a.csv"), "--shards", "2", *repository]) == 0
    # Another articles file, or another cut, in the same directory: refused before anything is embedded.
    with pytest.raises(artifacts.ArtifactError, match="captions_sha256"):
        embed_shard(
            out,
            EmbeddingPlan.for_captions(["another caption"], Catalog(root).manifest, shards=2),
            ["another caption"],
            0,
            lambda batch: pytest.fail("nothing may be embedded"),
        )
    assert embed_main([*cli, "--articles", str(tmp_path / "a.csv"), "--shards", "3", *repository]) == 2
    assert embed_main([*cli, "--articles", str(tmp_path / "a.csv"), "--shards", "2", "--shard", "2", *repository]) == 2
    # An update over other articles than the directory embedded is refused and publishes nothing.
    assert update_main(["--index-dir", str(root), "--articles", str(tmp_path / "b.csv"), "--vectors", str(out)]) == 2
    assert artifacts.list_versions(root) == versions
    assert update_main(["--index-dir", str(root), "--articles", str(tmp_path / "a.csv"), "--vectors", str(out)]) == 0
    assert {"0999000001", "0999000002"} <= set(Catalog(root).row_of)


def test_an_article_added_and_removed_in_one_update_is_not_shown(tiny_pipeline, tmp_path: Path) -> None:
    root = copy_root(tiny_pipeline, tmp_path)
    delta_file(tiny_pipeline, tmp_path / "delta.csv", ["0999000001", "0999000002"])
    update_catalogue(root, embedder(tiny_pipeline), tmp_path / "delta.csv", remove_ids=["0999000002"])
    catalog = Catalog(root)
    assert not catalog.excluded[catalog.row_of["0999000001"]] and catalog.excluded[catalog.row_of["0999000002"]]


def test_update_refuses_bad_input_and_writes_nothing(tiny_pipeline, tmp_path: Path) -> None:
    root = copy_root(tiny_pipeline, tmp_path)
    versions = artifacts.list_versions(root)
    bad = tmp_path / "bad.csv"
    bad.write_text("article_id,prod_name\n0999000001,x\n")
    with pytest.raises(DataFormatError, match="missing required column"):
        update_catalogue(root, embedder(tiny_pipeline), bad)
    with pytest.raises(ValueError, match="nothing to do"):
        update_catalogue(root, embedder(tiny_pipeline))
    with pytest.raises(ValueError, match="unknown article_id"):
        update_catalogue(root, embedder(tiny_pipeline), remove_ids=["0000000001"])
    removals = tmp_path / "remove.txt"
    removals.write_text("# sold out\n0108775015\nnot-an-id\n")
    with pytest.raises(ValueError, match="line 3"):
        read_removals(removals)
    assert (
        update_main(
            ["--index-dir", str(root), "--articles", str(bad), "--model-repository", str(tiny_pipeline.repository)]
        )
        == 2
    )
    with pytest.raises(SystemExit) as usage:  # new articles need the item tower
        update_main(["--index-dir", str(root), "--articles", str(bad)])
    assert usage.value.code == 2
    version_dir = root / artifacts.current_version(root)  # a version given as the root: refused before any write
    before = sorted(p.name for p in version_dir.iterdir())
    with pytest.raises(artifacts.ArtifactError, match="is an index version: pass its index root"):
        update_catalogue(version_dir, embedder(tiny_pipeline), remove_ids=["0108775015"])
    assert sorted(p.name for p in version_dir.iterdir()) == before
    one = tmp_path / "one.txt"
    one.write_text("0108775015\n")
    assert update_main(["--index-dir", str(tmp_path / "mistyped"), "--remove", str(one)]) == 2
    assert not (tmp_path / "mistyped").exists()
    assert artifacts.list_versions(root) == versions
    # no staging directory left (the writers' lock file stays: it is how the next writer waits)
    assert not [
        p
        for p in root.iterdir()
        if p.name.startswith(".") and p.name not in (artifacts.WRITER_LOCK_FILE, artifacts.PUBLISHED_LOG)
    ]
    # Removals alone need no item tower.
    sold_out = tmp_path / "sold_out.txt"
    sold_out.write_text(Catalog(root).article_ids[0] + "\n")
    assert update_main(["--index-dir", str(root), "--remove", str(sold_out)]) == 0
    assert len(artifacts.list_versions(root)) == len(versions) + 1


def test_filtered_search_equals_exact_filtered_search(tiny_pipeline) -> None:
    catalog = Catalog(tiny_pipeline.index_dir, exact_search_limit=0)  # force the ANN+selector path where possible
    group = catalog.items["product_group_name"][0]
    mask = catalog.filter_columns.mask(Filters((("product_group_name", frozenset([group])),)))
    assert 0 < mask.sum() < len(mask)
    for query in catalog.vectors[:5]:
        similarities, rows = catalog.search_masked(query, 10, mask)
        rows = rows[rows >= 0]
        assert mask[rows].all()
        expected = np.flatnonzero(mask)[np.argsort(-(catalog.vectors[mask] @ query), kind="stable")][: len(rows)]
        assert set(rows.tolist()) == set(expected.tolist())


def test_filters_parse_and_cap() -> None:
    filters = Filters.parse({"product_group": "Shoes", "colour": ["Black", "White"], "price_max": 0.05})
    columns = FilterColumns(
        {
            "article_id": ["a", "b", "c"],
            "product_group_name": ["Shoes", "Shoes", "Bags"],
            "colour_group_name": ["Black", "Red", "Black"],
            "price": ["0.01", "", "0.02"],
            "product_type_name": ["Boot", "Boot", "Bag"],
        }
    )
    assert columns.mask(filters).tolist() == [True, False, False]
    # A repeated filter reuses its mask, which nobody may change; the cache keeps as many as its bytes allow.
    same = Filters.parse({"colour": ["White", "Black"], "product_group": ["Shoes"], "price_max": 0.05})
    assert columns.mask(same) is columns.mask(filters) and not columns.mask(filters).flags.writeable
    small = FilterColumns({"article_id": ["a", "b", "c"], "colour_group_name": ["Black", "Red", "Black"]}, 6)
    first = small.mask(Filters.parse({"colour": "Black"}))
    small.mask(Filters.parse({"colour": "Red"}))
    assert small.mask(Filters.parse({"colour": "Black"})) is first  # 2 masks of 3 bytes fit in 6
    small.mask(Filters.parse({"colour": "White"}))  # evicts the least recently used: Red
    assert small.mask(Filters.parse({"colour": "Black"})) is first
    for raw, message in (
        ([], "expected an object"),
        ({"colour": []}, "colour"),
        ({"price_min": "1"}, "price_min"),
        ({"price_min": 2, "price_max": 1}, "price_min 2.0 > price_max"),
        ({"size": ["M"]}, "unknown"),
    ):
        with pytest.raises(FilterError, match=message):
            Filters.parse(raw)
    sims, rows = cap_per_type(np.array([0.9, 0.8, 0.7, 0.0]), np.array([0, 1, 2, -1]), columns.product_type, 1, 3)
    assert rows.tolist() == [0, 2] and sims.tolist() == [0.9, 0.7]


@pytest.mark.asyncio
async def test_body_size_limit() -> None:
    async def echo(scope, receive, send):
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": json.dumps({"n": len(body)}).encode()})

    app = BodySizeLimit(echo, max_bytes=100)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
        assert (await client.post("/", content=b"x" * 100)).json() == {"n": 100}
        response = await client.post("/", content=b"x" * 101)
        assert response.status_code == 413 and "exceeds the limit of 100" in response.json()["error"]

        async def chunks():
            for _ in range(5):
                yield b"x" * 50

        response = await client.post("/", content=chunks())  # no Content-Length: counted as it streams
        assert response.status_code == 413


@pytest.mark.parametrize("index_type", ["hnsw", "ivf", "ivf-fp16", "ivf-sq8", "ivf-pq", "ivf-pq-fastscan"])
def test_filtered_ann_search_keeps_recall(tmp_path: Path, index_type: str) -> None:
    """The ANN + id-selector path (many candidates) against exact filtered search on random vectors."""
    rng = np.random.default_rng(0)
    groups = rng.choice(["A", "B", "C"], size=3000, p=[0.6, 0.3, 0.1]).tolist()
    vectors = write_random_index(tmp_path / "v0001", index_type, groups, seed=1)
    # IVF: 76 lists here; 24 probed unfiltered, widened to 27 for this 90% filter (all 76 would be exact)
    catalog = Catalog(tmp_path / "v0001", exact_search_limit=100, ivf_nprobe=24)
    mask = catalog.filter_columns.mask(Filters.parse({"product_group": ["A", "B"]}))
    assert catalog.search_plan(mask) == f"{index_type.split('-')[0]}+selector"
    hits = total = 0
    for query in rng.standard_normal((50, vectors.shape[1])).astype(np.float32):
        _, rows = catalog.search_masked(query, 10, mask)
        assert mask[rows].all()
        exact = np.flatnonzero(mask)[np.argsort(-(vectors[mask] @ query))[:10]]
        hits += len(set(rows.tolist()) & set(exact.tolist()))
        total += 10
    assert hits / total >= 0.95


@pytest.mark.parametrize("index_type", ["flat", "hnsw", "ivf", "ivf-pq-fastscan"])
@pytest.mark.parametrize("share_removed", [0.1, 0.6])
def test_many_removed_articles_are_searched_as_a_masked_search_would(
    tmp_path: Path, index_type: str, share_removed: float
) -> None:
    """More removed rows than an over-fetch drops: one selector of the available rows per version, widened as a
    masked search of every row widens (the same results; exact for a flat index)."""
    rng = np.random.default_rng(5)
    vectors = write_random_index(tmp_path / "index" / "v0001", index_type, ["A"] * 3000, seed=2)
    artifacts.publish_version(tmp_path / "index", "v0001")
    removed = rng.choice(3000, int(3000 * share_removed), replace=False)
    assert len(removed) > ranking.OVERFETCH_LIMIT
    update_catalogue(tmp_path / "index", lambda manifest: None, remove_ids=[str(row) for row in removed])
    catalog = Catalog(tmp_path / "index", exact_search_limit=100)
    assert catalog._available is not None
    queries = rng.standard_normal((40, vectors.shape[1])).astype(np.float32)
    _, rows = catalog.search(queries, 10)  # one batched search
    everything = np.ones(3000, dtype=bool)
    for query, found in zip(queries, rows):
        assert not np.isin(found, removed).any() and (found >= 0).all()
        np.testing.assert_array_equal(found, catalog.search_masked(query, 10, everything)[1])


@pytest.mark.parametrize("index_type", ["flat", "ivf"])
def test_a_filter_on_a_version_with_removed_articles_combines_its_mask_once(tmp_path: Path, index_type: str) -> None:
    rng = np.random.default_rng(6)
    groups = rng.choice(["A", "B"], size=3000, p=[0.7, 0.3]).tolist()
    vectors = write_random_index(tmp_path / "index" / "v0001", index_type, groups, seed=3)
    artifacts.publish_version(tmp_path / "index", "v0001")
    removed = rng.choice(3000, 400, replace=False)
    update_catalogue(tmp_path / "index", lambda manifest: None, remove_ids=[str(row) for row in removed])
    catalog = Catalog(tmp_path / "index", ivf_nprobe=1000, exact_search_limit=100)  # IVF: every list, exact
    mask = catalog.filter_columns.mask(Filters.parse({"product_group": ["B"]}))
    shown = catalog.shown(mask)
    assert shown is catalog.shown(mask) and not shown.flags.writeable  # kept for the next request with the filter
    assert np.array_equal(shown, mask & ~catalog.excluded)
    assert catalog.shown(mask.copy()) is not shown  # a request's own mask is combined, not kept
    read_only = mask.copy()
    read_only.flags.writeable = False
    assert catalog.shown(read_only) is not catalog.shown(read_only)  # only what serving.filters keeps is kept
    expected_rows = np.flatnonzero(mask & ~catalog.excluded)
    for query in rng.standard_normal((10, vectors.shape[1])).astype(np.float32):
        _, rows = ranking.rank(catalog, query[None], [ranking.RankRequest(10, allowed=mask)])[0]
        exact = expected_rows[np.argsort(-(vectors[expected_rows] @ query), kind="stable")[:10]]
        assert rows.tolist() == exact.tolist()


def test_an_update_writes_its_vectors_in_the_parents_dtype(tiny_pipeline, tmp_path: Path) -> None:
    root = copy_root(tiny_pipeline, tmp_path)
    parent = root / artifacts.current_version(root)
    # The parent as `export --vector-dtype float16` writes it: half-size vectors, the manifest naming their dtype.
    np.save(parent / artifacts.VECTORS_FILE, np.load(parent / artifacts.VECTORS_FILE).astype(np.float16))
    manifest = artifacts.read_manifest(parent)
    files = {**manifest.files, artifacts.VECTORS_FILE: sha256_file(parent / artifacts.VECTORS_FILE)}
    artifacts.write_manifest(parent, dataclasses.replace(manifest, vector_dtype="float16", files=files))
    delta_file(tiny_pipeline, tmp_path / "delta.csv", ["0999000001"])
    update_catalogue(root, embedder(tiny_pipeline), tmp_path / "delta.csv", [])
    after = Catalog(root)
    assert after.manifest.vector_dtype == "float16" and after.vectors.dtype == np.float16
    new_row = after.row_of["0999000001"]
    _, rows = after.search(np.asarray(after.vectors[[new_row]], np.float32), 5)
    assert rows[0, 0] == new_row


@pytest.mark.parametrize("index_type", ["ivf-fp16", "ivf-sq8"])
@pytest.mark.parametrize("max_unindexed", [0, 1])
def test_an_update_adds_rows_to_an_index_with_padded_rows(
    tiny_pipeline, tmp_path: Path, monkeypatch, index_type: str, max_unindexed: int
) -> None:
    """Index types whose rows are padded to a multiple of 16 columns (artifacts.index_dimension) take the new
    rows padded the same way, and search the rows past them with queries padded the same way."""
    from export.catalogue_index import build_faiss_index

    monkeypatch.setattr(exact_rows, "MAX_ROWS", max_unindexed)
    root = copy_root(tiny_pipeline, tmp_path)
    parent = root / artifacts.current_version(root)
    before = Catalog(root)
    faiss.write_index(build_faiss_index(before.vectors, index_type, before.item_bias), str(parent / "index.faiss"))
    manifest = artifacts.read_manifest(parent)
    files = {**manifest.files, artifacts.INDEX_FILE: sha256_file(parent / artifacts.INDEX_FILE)}
    artifacts.write_manifest(parent, dataclasses.replace(manifest, index_type=index_type, files=files))
    delta_file(tiny_pipeline, tmp_path / "delta.csv", ["0999000001"])
    update_catalogue(root, embedder(tiny_pipeline), tmp_path / "delta.csv", [])
    after = Catalog(root)
    assert after.manifest.index_type == index_type and after.index.d % 16 == 0
    assert after.manifest.unindexed_rows == min(1, max_unindexed)
    new_row = after.row_of["0999000001"]
    _, rows = after.search(after.vectors[[new_row]], 5)
    assert rows[0, 0] == new_row
