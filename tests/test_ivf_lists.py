"""Filtered IVF searches probe the nearest lists that hold allowed rows (serving.ivf_lists)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from export.catalogue_index import build_faiss_index, index_rows, write_catalogue_only
from serving.catalog import Catalog
from serving.filters import Filters, MaskSummary
from serving.ivf_lists import IvfLists

CLUSTERS, PER_CLUSTER, DIM = 40, 200, 16


def _clustered_version(directory: Path, index_type: str = "ivf") -> np.ndarray:
    """A catalogue whose product groups sit in lists of their own, as on real data: group "near" in 30 clusters with
    a positive first coordinate, group "far" in 10 with a negative one, so a query along the first axis finds every
    "near" list before any "far" one. Returns the vectors."""
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((CLUSTERS, DIM))
    centres[:, 0] = np.abs(centres[:, 0]) + 1.0
    centres[30:, 0] *= -1
    vectors = np.repeat(centres, PER_CLUSTER, axis=0) + 0.3 * rng.standard_normal((CLUSTERS * PER_CLUSTER, DIM))
    vectors = (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)
    groups = ["near"] * (30 * PER_CLUSTER) + ["far"] * (10 * PER_CLUSTER)
    write_catalogue_only(
        directory / "v0001",
        build_faiss_index(vectors, index_type),
        vectors,
        {"article_id": [str(i) for i in range(len(groups))], "product_group_name": groups},
        "random",
        index_type,
    )
    return vectors


@pytest.mark.parametrize("index_type", ["ivf", "ivf-pq-fastscan"])
def test_each_row_is_in_the_list_the_quantizer_assigns_it(tmp_path, index_type):
    vectors = _clustered_version(tmp_path, index_type)
    index = Catalog(tmp_path / "v0001", lexical=False).index
    lists = IvfLists.of(index)
    assert lists is not None and lists.nlist == index.nlist
    assigned = index.quantizer.assign(index_rows(vectors, None, index.d), 1)[:, 0]
    assert np.array_equal(lists.list_of_row, assigned)


def test_other_indexes_widen_nprobe_as_before(tmp_path):
    _clustered_version(tmp_path, "flat")
    assert IvfLists.of(Catalog(tmp_path / "v0001", lexical=False).index) is None


def test_a_filter_far_from_the_query_finds_its_nearest_rows(tmp_path):
    vectors = _clustered_version(tmp_path)
    catalog = Catalog(tmp_path / "v0001", lexical=False, ivf_nprobe=4, exact_search_limit=100)
    far = catalog.filter_columns.mask(Filters.parse({"product_group": ["far"]}))
    assert catalog.search_plan(far) == "ivf+selector"
    query = np.zeros(DIM, np.float32)
    query[0] = 1.0
    allowed = np.flatnonzero(far)
    exact = allowed[np.argsort(-(vectors[allowed] @ query))[:10]]
    _, rows = catalog.search_masked(query, 10, far)
    assert set(rows) == set(exact)
    # Widening nprobe by 1/selectivity probes the 16 lists nearest the query: all of them the other group's
    catalog.ivf_lists = None
    _, widened = catalog.search_masked(query, 10, far)
    assert not set(widened) & set(exact)


def test_lists_are_counted_the_same_from_a_columns_values_and_row_by_row(tmp_path):
    _clustered_version(tmp_path)
    catalog = Catalog(tmp_path / "v0001", lexical=False)
    lists = catalog.ivf_lists
    assert lists is not None
    for group in ("near", "far"):
        mask = catalog.filter_columns.mask(Filters.parse({"product_group": [group]}))
        summary = catalog.filter_columns.summary(mask)
        assert summary.values is not None  # one column's values: counted from its table
        by_values = lists.allowed_per_list(mask, summary)
        assert np.array_equal(by_values, np.bincount(lists.list_of_row[mask], minlength=lists.nlist))
        assert lists.allowed_per_list(mask, summary) is by_values  # kept with the mask


def test_a_value_only_rows_past_the_index_have_is_in_no_list(tmp_path):
    """A catalogue update's new rows are searched beside the index (serving.unindexed): their values, new to the
    column, have no column in a list's table."""
    _clustered_version(tmp_path)
    lists = Catalog(tmp_path / "v0001", lexical=False).ivf_lists
    assert lists is not None
    rows = len(lists.list_of_row)
    codes = np.zeros(rows + 3, np.int32)
    codes[rows:] = 1  # the value of the three rows past the index
    summary = MaskSummary(3)
    summary.values = codes, np.array([1])
    mask = np.zeros(rows + 3, bool)
    mask[rows:] = True
    assert not lists.allowed_per_list(mask, summary).any()


def test_a_filter_whose_nearest_rows_were_removed_finds_the_rest(tmp_path):
    """A removed (sold-out) article stays in the index, excluded: the lists' counts of a filter leave it out, or lists
    holding only removed rows would fill the probe and hide the group's other rows."""
    from export.catalogue_update import update_catalogue
    from twotower import artifacts

    vectors = _clustered_version(tmp_path)
    artifacts.publish_version(tmp_path, "v0001")
    removed = np.arange(30 * PER_CLUSTER, 38 * PER_CLUSTER)  # "far" clusters 30-37; 38 and 39 stay
    update_catalogue(tmp_path, lambda manifest: None, remove_ids=[str(row) for row in removed])  # type: ignore
    catalog = Catalog(tmp_path, lexical=False, ivf_nprobe=4, exact_search_limit=100)
    assert catalog.n_excluded == len(removed) and catalog.ivf_lists is not None
    far = catalog.shown(catalog.filter_columns.mask(Filters.parse({"product_group": ["far"]})))
    assert catalog.search_plan(far) == "ivf+selector"
    query = vectors[removed].mean(axis=0)  # nearest the removed clusters
    query /= np.linalg.norm(query)
    allowed = np.flatnonzero(far)
    exact = allowed[np.argsort(-(vectors[allowed] @ query))[:10]]
    _, rows = catalog.search_masked(query, 10, far)
    assert set(rows) == set(exact)
