"""Item metadata as memory-mapped dictionary-encoded columns (twotower.item_table)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from serving import filters
from serving.filters import FilterColumns, Filters
from twotower import artifacts, item_table, repeats
from twotower.item_table import ItemTable

COLUMNS = {
    "article_id": ["0108775015", "0108775044", "0110065001", "0108775015"],  # the first one changed: row 3 wins
    "product_code": ["0108775", "0108775", "", "0108775"],
    "colour_group_name": ["Black", "White", "Blå", "Black"],
    "product_group_name": ["Garment Upper body", "Garment Upper body", "Underwear", "Garment Upper body"],
    "price": ["0.008", "", "0.02", "0.01"],
}


def test_rows_appended_to_a_table_are_the_table_of_all_rows(tmp_path: Path) -> None:
    """A catalogue update appends its rows to the mapped columns: the same values and codes as encoding every row."""
    table = ItemTable.load(tmp_path / "items", item_table.write(tmp_path / "items", COLUMNS))
    delta = {
        "article_id": ["0999000001", "0108775044"],  # a new article, then a changed one: its last row wins
        "colour_group_name": ["A much longer colour name than any before", "Black"],
        "product_group_name": ["", "Ünderwear"],
        "price": ["0.5", ""],
        "not_in_the_table": ["x", "y"],  # columns the table lacks are not added
    }  # no product_code: "" for both rows
    appended = table.appended(delta, 2)
    expected = {name: values + delta.get(name, ["", ""]) for name, values in COLUMNS.items()}
    reference = ItemTable.from_columns(expected)
    assert appended.to_lists() == expected and set(appended) == set(COLUMNS)
    for name in COLUMNS:
        np.testing.assert_array_equal(appended[name].values, reference[name].values)
        np.testing.assert_array_equal(appended[name].codes, reference[name].codes)
    assert appended.row_of["0108775044"] == 5 and appended.row_of["0999000001"] == 4
    assert table.appended({}, 0).to_lists() == COLUMNS


def test_row_blocks_are_written_as_one_array(tmp_path: Path) -> None:
    from twotower.files import save_rows

    blocks = [np.random.default_rng(0).standard_normal((n, 3)).astype(np.float32) for n in (5, 0, 7)]
    save_rows(tmp_path / "v.npy", blocks, "float16", chunk_rows=2)
    np.testing.assert_array_equal(np.load(tmp_path / "v.npy"), np.concatenate(blocks).astype(np.float16))


def test_row_blocks_read_as_the_array_of_their_rows() -> None:
    from twotower.files import RowBlocks

    rng = np.random.default_rng(1)
    blocks = [rng.standard_normal((n, 4)).astype(np.float16) for n in (6, 1, 3)]
    whole, rows = np.concatenate(blocks), RowBlocks(blocks)
    assert (len(rows), rows.shape, rows.dtype) == (10, (10, 4), np.float16)
    for wanted in (3, 6, -1, np.int64(9), slice(None), slice(2, 8, 3), [0, 9, 6, 6], rng.integers(0, 10, (3, 5))):
        np.testing.assert_array_equal(rows[wanted], whole[wanted])
    np.testing.assert_array_equal(np.asarray(rows, dtype=np.float32), whole.astype(np.float32))
    assert rows[np.zeros(0, dtype=np.int64)].shape == (0, 4)
    assert np.shares_memory(rows[1:5], blocks[0])  # a slice of the first block is a view, as numpy's
    for wrong in ([0, 10], np.array([1.7]), np.ones(10, dtype=bool)):
        with pytest.raises(IndexError):
            rows[wrong]
    with pytest.raises(ValueError, match="row blocks differ"):
        RowBlocks([blocks[0], blocks[1].astype(np.float32)])


@pytest.mark.parametrize("decoded_limit", [item_table.DECODED_LIMIT, 0])  # 0: every value decoded when read
def test_written_columns_read_back_memory_mapped(tmp_path: Path, monkeypatch, decoded_limit: int) -> None:
    monkeypatch.setattr(item_table, "DECODED_LIMIT", decoded_limit)
    names = item_table.write(tmp_path / "items", COLUMNS)
    table = ItemTable.load(tmp_path / "items", names)
    assert isinstance(table["colour_group_name"].codes.base, np.memmap)  # a view of the mapped file, no copy
    assert table.to_lists() == COLUMNS  # every value, non-ASCII and empty ones included, in row order
    assert table.records([2, 0]) == [{k: v[r] for k, v in COLUMNS.items() if k != "article_id"} for r in (2, 0)]
    assert ItemTable.from_columns({"article_id": ["a", "b"]}).records([1, 0]) == [{}, {}]  # ids alone: a dict per row
    assert table.article_ids[1] == "0108775044" and len(table.article_ids) == 4
    # ids: the last row of a repeated id; unknown, longer and shorter ids are simply absent
    assert table.row_of["0108775015"] == 3 and table.row_of.get("0108775044") == 1
    for missing in ("0108775", "01087750150", "9999999999", ""):
        assert missing not in table.row_of and table.row_of.get(missing) is None
    assert sorted(table.row_of) == sorted(set(COLUMNS["article_id"])) and len(table.row_of) == 3
    many = ["0110065001", "0108775", "01087750150", "0108775015", "", "0108775044"]
    assert table.row_of.rows(many).tolist() == [2, -1, -1, 3, -1, 1]  # one search for a whole history
    assert table.row_of.rows([]).tolist() == []


def test_filters_read_the_encoded_columns() -> None:
    table = ItemTable.from_columns(COLUMNS)
    columns = FilterColumns(table)
    assert columns.mask(Filters.parse({"product_group": ["Underwear"]})).tolist() == [False, False, True, False]
    assert columns.mask(Filters.parse({"price_max": 0.009})).tolist() == [True, False, False, False]  # "" never
    assert columns.mask(Filters.parse({"price_min": 0.01})).tolist() == [False, False, True, True]  # bounds included
    both = {"price_min": 0.008, "price_max": 0.01, "product_group": ["Garment Upper body"]}
    assert columns.mask(Filters.parse(both)).tolist() == [True, False, False, True]
    np.testing.assert_array_equal(columns.row_prices(), [0.008, np.nan, 0.02, 0.01])
    unpriced = FilterColumns({name: values for name, values in COLUMNS.items() if name != "price"})
    assert not unpriced.mask(Filters.parse({"price_max": 1.0})).any() and np.isnan(unpriced.row_prices()).all()
    assert FilterColumns(COLUMNS).mask(Filters.parse({"colour": ["Blå"]})).tolist() == [False, False, True, False]
    two = {"colour": ["Blå", "White"]}
    assert columns.mask(Filters.parse(two)).tolist() == [False, True, True, False]
    assert columns.mask(Filters.parse({"colour": ["Pink"]})).tolist() == [False] * 4  # no such value: nothing


def test_a_cached_masks_count_and_bitmap_are_kept_with_it_and_dropped_with_it() -> None:
    from twotower import ranking

    columns = FilterColumns(COLUMNS, mask_cache_bytes=2 * 4)  # two masks of 4 rows
    upper = columns.mask(Filters.parse({"product_group": ["Garment Upper body"]}))
    summary = columns.summary(upper)
    assert summary is columns.summary(upper) and summary.count == 3
    bitmap = summary.bitmap(upper)
    assert bitmap is summary.bitmap(upper) and np.unpackbits(bitmap, count=4, bitorder="little").tolist() == [
        1,
        1,
        0,
        1,
    ]
    taken_out = upper.copy()
    taken_out[0] = False  # a request's own copy: counted anew
    assert columns.summary(taken_out) is not summary and columns.summary(taken_out).count == 2
    columns.mask(Filters.parse({"colour": ["Black"]}))
    columns.mask(Filters.parse({"colour": ["White"]}))  # the first mask evicted: its summary too
    assert columns.summary(upper) is not summary and len(columns._masks._summaries) == len(columns._masks) == 2
    # nothing to take out: the search gets the request's (cached) mask itself, not a copy
    space = ranking.ExactItems(np.eye(4, dtype=np.float32))
    request = ranking.RankRequest(2, allowed=upper)
    assert ranking.visible(space, request) is upper
    hiding = ranking.RankRequest(
        2, allowed=upper, bought=(np.asarray([1]), np.zeros(1, np.float32)), exclude_bought=True
    )
    assert ranking.visible(space, hiding).tolist() == [True, False, False, True] and upper[1]


@pytest.mark.parametrize("n_wanted", [0, 1, 2, filters.MAX_CODE_COMPARISONS, filters.MAX_CODE_COMPARISONS + 1, 19])
def test_rows_with_codes_compares_or_looks_up_alike(n_wanted: int) -> None:
    codes = np.random.default_rng(n_wanted).integers(0, 19, 1000).astype(np.int32)
    wanted = np.arange(19)[::-1][:n_wanted]
    assert np.array_equal(filters.rows_with_codes(codes, wanted, 19), np.isin(codes, wanted))


def test_products_read_the_encoded_columns() -> None:
    table = ItemTable.from_columns(COLUMNS)
    encoded = repeats.Products.from_encoded(table["product_code"].codes, table["product_code"].values)  # bytes
    plain = repeats.Products(COLUMNS["product_code"])
    for products in (encoded, plain):
        assert products.product_of[2] == -1  # no code: no siblings
        rows, _ = products.siblings(np.asarray([0]), np.asarray([1.0]))
        assert rows.tolist() == [1, 3]


def test_versions_with_items_json_still_load(tmp_path: Path) -> None:
    (tmp_path / artifacts.ITEMS_FILE).write_text(json.dumps(COLUMNS))
    manifest = artifacts.Manifest(
        1, 4, "inner_product", 4, 0, 4, 8, "x", "flat", 0, "test", {artifacts.ITEMS_FILE: "-"}, {}
    )
    assert artifacts.read_items(tmp_path, manifest).to_lists() == COLUMNS
    manifest.files = {}
    with pytest.raises(artifacts.ArtifactError, match="lists no item metadata"):
        artifacts.read_items(tmp_path, manifest)
    with pytest.raises(ValueError, match="differ in length"):
        ItemTable.from_columns({"article_id": ["a", "b"], "colour_group_name": ["Black"]})
