"""Which IVF lists a search probes (serving.ivf_lists): a filtered search the nearest lists that hold allowed rows,
an unfiltered one the best by direction and prior; and the popular rows scored exactly beside (serving.exact_rows)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from export.catalogue_index import build_faiss_index, index_rows, write_catalogue_only
from export.catalogue_update import update_catalogue
from serving import exact_rows
from serving.catalog import Catalog
from serving.filters import Filters, MaskSummary
from serving.ivf_lists import IvfLists
from twotower import artifacts, ranking

CLUSTERS, PER_CLUSTER, DIM = 40, 200, 16


def _clustered_version(directory: Path, index_type: str = "ivf", bias: np.ndarray | None = None) -> np.ndarray:
    """A catalogue whose product groups sit in lists of their own, as on real data: group "near" in 30 clusters with
    a positive first coordinate, group "far" in 10 with a negative one, so a query along the first axis finds every
    "near" list before any "far" one. `bias`: each row's popularity prior. Returns the vectors."""
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((CLUSTERS, DIM))
    centres[:, 0] = np.abs(centres[:, 0]) + 1.0
    centres[30:, 0] *= -1
    vectors = np.repeat(centres, PER_CLUSTER, axis=0) + 0.3 * rng.standard_normal((CLUSTERS * PER_CLUSTER, DIM))
    vectors = (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)
    groups = ["near"] * (30 * PER_CLUSTER) + ["far"] * (10 * PER_CLUSTER)
    write_catalogue_only(
        directory / "v0001",
        build_faiss_index(vectors, index_type, bias),
        vectors,
        {"article_id": [str(i) for i in range(len(groups))], "product_group_name": groups},
        "random",
        index_type,
        item_bias=bias,
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
    """A catalogue update's new rows are searched beside the index (serving.exact_rows): their values, new to the
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


# -- popular articles far from the query ----------------------------------------------------------------------------
PRIOR = 0.5  # the prior weight the searches below use
ALONG_FIRST_AXIS = np.eye(DIM, dtype=np.float32)[:1]  # a query whose 4 nearest lists are all "near" ones


def _exact(vectors: np.ndarray, bias: np.ndarray, query: np.ndarray, k: int) -> np.ndarray:
    return np.argsort(-(vectors @ query[0] + PRIOR * bias), kind="stable")[:k]


def test_the_most_popular_rows_are_chosen_capped_and_the_same_each_time(monkeypatch):
    bias = np.array([0.0, 3.0, 1.0, 3.0, 2.0, 3.0, 9.0], np.float32)  # the last row is past the index
    monkeypatch.setattr(exact_rows, "POPULAR_SHARE", 1.0)
    monkeypatch.setattr(exact_rows, "POPULAR_ROWS", 2)
    assert exact_rows.popular_rows(bias, 6).tolist() == [1, 3]  # of three equal priors, the first rows
    monkeypatch.setattr(exact_rows, "POPULAR_ROWS", 4)
    assert exact_rows.popular_rows(bias, 6).tolist() == [1, 3, 4, 5]
    monkeypatch.setattr(exact_rows, "POPULAR_SHARE", 0.5)  # at most half the index's 6 rows
    assert exact_rows.popular_rows(bias, 6).tolist() == [1, 3, 5]
    monkeypatch.setattr(exact_rows, "POPULAR_SHARE", 0.1)
    assert exact_rows.popular_rows(bias, 6).tolist() == []
    monkeypatch.setattr(exact_rows, "POPULAR_SHARE", 1.0)
    monkeypatch.setattr(exact_rows, "POPULAR_ROWS", 100)
    assert exact_rows.popular_rows(bias, 6).tolist() == [1, 2, 3, 4, 5]  # never an article without a prior
    assert exact_rows.popular_rows(np.zeros(6, np.float32), 6).tolist() == []


def test_a_best_seller_far_from_the_query_is_scored_beside_the_index(tmp_path):
    bias = np.zeros(CLUSTERS * PER_CLUSTER, np.float32)
    far = 30 * PER_CLUSTER + np.arange(5)  # five best sellers in the first "far" cluster
    bias[far] = 10.0
    vectors = _clustered_version(tmp_path, bias=bias)
    catalog = Catalog(tmp_path / "v0001", lexical=False, ivf_nprobe=4)
    assert catalog.exact_rows is not None and set(far) <= set(catalog.exact_rows.ids)
    assert catalog.ivf_lists is not None
    catalog.list_priors = None  # lists by direction alone: the rows beside the index find them
    exact = _exact(vectors, bias, ALONG_FIRST_AXIS, 5)
    assert set(exact) == set(far)
    _, rows = catalog.search(ALONG_FIRST_AXIS, 5, PRIOR)
    assert rows[0].tolist() == exact.tolist()
    catalog.exact_rows = None  # the index alone probes the 4 nearest lists, all "near" ones
    _, rows = catalog.search(ALONG_FIRST_AXIS, 5, PRIOR)
    assert not set(rows[0]) & set(far)


def test_a_popular_list_far_from_the_query_is_probed(tmp_path, monkeypatch):
    monkeypatch.setattr(exact_rows, "POPULAR_ROWS", 0)  # no rows beside the index: the lists' rank alone
    bias = np.zeros(CLUSTERS * PER_CLUSTER, np.float32)
    far = 30 * PER_CLUSTER + np.arange(PER_CLUSTER)  # a whole "far" cluster of best sellers
    bias[far] = 10.0
    vectors = _clustered_version(tmp_path, bias=bias)
    catalog = Catalog(tmp_path / "v0001", lexical=False)
    assert catalog.exact_rows is None and catalog.ivf_lists is not None
    catalog.ivf_nprobe = len(np.unique(catalog.ivf_lists.list_of_row[far]))  # as many as hold the best sellers
    exact = _exact(vectors, bias, ALONG_FIRST_AXIS, 10)
    assert set(exact) <= set(far)
    _, rows = catalog.search(ALONG_FIRST_AXIS, 10, PRIOR)
    assert rows[0].tolist() == exact.tolist()
    _, by_direction = catalog.search(ALONG_FIRST_AXIS, 10, 0.0)  # weight 0: the lists by direction, as before
    assert not set(by_direction[0]) & set(far)
    catalog.list_priors = None
    _, rows = catalog.search(ALONG_FIRST_AXIS, 10, PRIOR)
    assert not set(rows[0]) & set(far)


def test_a_popular_row_the_index_also_finds_is_returned_once(tmp_path):
    bias = np.zeros(CLUSTERS * PER_CLUSTER, np.float32)
    bias[:50] = 1.0  # popular rows in the query's own lists
    vectors = _clustered_version(tmp_path, bias=bias)
    catalog = Catalog(tmp_path / "v0001", lexical=False, ivf_nprobe=8)
    queries = vectors[[0, 10, 4000]]
    scores, rows = catalog.search(queries, 30, PRIOR)
    for query, found, found_scores in zip(queries, rows, scores):
        assert len(set(found)) == 30  # none twice
        assert found.tolist() == _exact(vectors, bias, query[None], 30).tolist()
        assert np.allclose(found_scores, vectors[found] @ query + PRIOR * bias[found], atol=1e-5)
    # One query at a time, the same
    for i, query in enumerate(queries):
        assert catalog.search(query[None], 30, PRIOR)[1][0].tolist() == rows[i].tolist()


# 5 removed: over-fetched and dropped; 305: the available rows' selector
@pytest.mark.parametrize("others", [0, 300])
def test_removed_best_sellers_are_never_returned_nor_draw_searches(tmp_path, others):
    bias = np.zeros(CLUSTERS * PER_CLUSTER, np.float32)
    far = 30 * PER_CLUSTER + np.arange(5)
    bias[far] = 10.0
    _clustered_version(tmp_path, bias=bias)
    artifacts.publish_version(tmp_path, "v0001")
    hidden = np.concatenate([far, np.arange(others)])
    update_catalogue(tmp_path, lambda manifest: None, remove_ids=[str(row) for row in hidden])
    catalog = Catalog(tmp_path, lexical=False, ivf_nprobe=4, exact_search_limit=100)
    assert (catalog._available is not None) == (len(hidden) > ranking.OVERFETCH_LIMIT)
    assert catalog.exact_rows is None  # no shown row has a prior: none scored beside
    _, rows = catalog.search(ALONG_FIRST_AXIS, 5, PRIOR)
    # Nor do their lists rank first any more: the query's own "near" lists are probed
    assert (rows[0] >= 0).all() and (rows[0] < 30 * PER_CLUSTER).all() and not set(rows[0]) & set(hidden)
    # Filtered, as ranking searches a request's filters (the mask without the removed rows, Catalog.shown)
    far_group = catalog.filter_columns.mask(Filters.parse({"product_group": ["far"]}))  # kept for the next request
    _, rows = catalog.search_masked(ALONG_FIRST_AXIS[0], 5, catalog.shown(far_group), PRIOR)
    assert len(set(rows)) == 5 and (rows >= 30 * PER_CLUSTER).all() and not set(rows) & set(hidden)
    _, rows = catalog.search_masked(ALONG_FIRST_AXIS[0], 5, catalog.shown(far_group.copy()), PRIOR)  # seen once
    assert not set(rows) & set(hidden)
