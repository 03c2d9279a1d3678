"""The popularity prior: per-article bias, its place in the index, its fitted weight."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from serving.catalog import Catalog
from tests.conftest import write_random_index
from twotower import artifacts, fitting, popularity, ranking, rundir
from twotower.data.hm import load_hm_dir
from twotower.repeats import RepeatBoost


def test_item_bias_counts_only_the_window_before_the_day() -> None:
    transactions = pd.DataFrame(
        {
            "t_dat": pd.to_datetime(
                ["2020-09-01", "2020-09-15", "2020-09-20", "2020-09-21", "2020-09-21", "2020-09-22"]
            ),
            "article_id": ["a", "b", "b", "a", "zz", "b"],  # zz: not in the catalogue
        }
    )
    bias = popularity.item_bias(transactions, {"a": 0, "b": 1, "c": 2}, 3, pd.Timestamp("2020-09-22"), window_days=7)
    # 09-15..09-21 count (7 days), 09-01 is too old and 09-22 is the day itself.
    np.testing.assert_allclose(bias, np.log1p([1, 2, 0]))


def test_an_index_row_with_bias_scores_cosine_plus_weighted_bias() -> None:
    rng = np.random.default_rng(0)
    vectors, queries = rng.standard_normal((5, 4)).astype(np.float32), rng.standard_normal((3, 4)).astype(np.float32)
    bias = np.arange(5, dtype=np.float32)
    scores = popularity.with_weight(queries, np.asarray([0.0, 0.5, 2.0])) @ popularity.with_bias(vectors, bias).T
    np.testing.assert_allclose(scores, queries @ vectors.T + np.asarray([0.0, 0.5, 2.0])[:, None] * bias, rtol=1e-5)


def test_fit_keeps_the_smallest_weight_that_finds_most() -> None:
    # Row 1 (cosine 0.9, bias 3) beats row 0 (cosine 1, no bias) in a top 1 from weight 1/30 on: 0.05 on the grid.
    vectors = np.asarray([[1.0, 0.0], [0.9, np.sqrt(1 - 0.81)], [-1.0, 0.0]], dtype=np.float32)
    space = ranking.ExactItems(vectors, np.asarray([0.0, 3.0, 0.0], dtype=np.float32))
    users, histories = np.asarray([[1.0, 0.0]], dtype=np.float32), [ranking.NOTHING_BOUGHT]
    assert fitting.fit_prior_weight(space, users, histories, [{1}], RepeatBoost(), k=1) == (0.05, 1.0, 0.0)
    assert fitting.fit_prior_weight(space, users, histories, [{0}], RepeatBoost(), k=1)[0] == 0.0  # no gain: no prior
    # A discovery list keeps the full lists' weight on a tie, and may go down to none.
    assert fitting.fit_prior_weight(space, users, histories, [{1}], RepeatBoost(), k=1, prefer=0.3)[0] == 0.3
    assert fitting.fit_prior_weight(space, users, histories, [{0}], RepeatBoost(), k=1, prefer=0.3)[0] == 0.0
    # Without the customer's own articles: row 0, bought, is hidden, so row 1 leads at any weight.
    bought = [(np.asarray([0]), np.asarray([1.0], dtype=np.float32))]
    fitted = fitting.fit_prior_weight(space, users, bought, [{1}], RepeatBoost(), k=1, exclude_bought=True, prefer=0.3)
    assert fitted == (0.3, 1.0, 1.0)
    assert fitting.fit_prior_weight(space, users[:0], [], [], RepeatBoost(), prefer=0.3) == (0.3, 0.0, 0.0)


def test_score_head_json_keeps_the_prior_and_reads_old_files() -> None:
    head = artifacts.ScoreHeadWeights(
        np.ones(2), np.ones(2), np.ones(2), 0.5, prior=popularity.PopularityPrior(0.03, 5)
    )
    raw = json.loads(json.dumps(head.to_json()))
    assert artifacts.ScoreHeadWeights.from_json(raw).prior == popularity.PopularityPrior(0.03, 5)
    assert popularity.PopularityPrior(0.03, 5).weight_for(exclude_bought=True) == 0.03  # files before it: one weight
    with_discovery = popularity.PopularityPrior(0.1, 7, discovery_weight=0.05)
    assert popularity.PopularityPrior.from_json(json.loads(json.dumps(with_discovery.to_json()))) == with_discovery
    assert [with_discovery.weight_for(exclude_bought=b) for b in (False, True)] == [0.1, 0.05]
    del raw["prior"]
    assert artifacts.ScoreHeadWeights.from_json(raw).prior.weight == 0.0


@pytest.mark.parametrize("index_type", ["flat", "ivf", "ivf-fp16", "ivf-sq8", "ivf-pq", "ivf-pq-fastscan"])
def test_catalog_searches_rank_by_cosine_plus_prior(tmp_path: Path, index_type: str) -> None:
    n = 3000
    bias = np.zeros(n, dtype=np.float32)
    bias[:30] = np.log1p(np.arange(30, dtype=np.float32) * 10)  # a few best sellers, most articles unsold
    vectors = write_random_index(tmp_path / "v0001", index_type, ["A"] * n, item_bias=bias, prior_weight=0.1)
    catalog = Catalog(tmp_path / "v0001", ivf_nprobe=76, exact_search_limit=100)  # all lists: exact for this check
    assert catalog.prior_weight == 0.1  # rows [vector, bias], compressed ones padded with zeros to 16 columns
    assert catalog.index.d == (vectors.shape[1] + 1 if index_type in ("flat", "ivf") else 32)
    query = vectors[100]
    for prior in (0.0, 0.1):
        expected = np.argsort(-(vectors @ query + prior * bias), kind="stable")[:10]
        similarities, rows = catalog.search(query[None], 10, prior)
        assert rows[0].tolist() == expected.tolist()
        # what the search says, exact but for float16 lists (served as found: artifacts.HALF_INDEX_TYPE)
        exact = (vectors @ query + prior * bias)[rows[0]]
        np.testing.assert_allclose(similarities[0], exact, atol=1e-3 if index_type == "ivf-fp16" else 1e-5)
        np.testing.assert_allclose(
            catalog.scores(query, rows[0], prior), (vectors @ query + prior * bias)[rows[0]], rtol=1e-5
        )
        # The filtered paths rank the same way: exact over few rows, the index's selector over many.
        for allowed_rows in (np.arange(0, 60), np.arange(0, 2000)):
            allowed = np.zeros(n, dtype=bool)
            allowed[allowed_rows] = True
            _, rows = catalog.search_masked(query, 10, allowed, prior)
            scores = vectors[allowed_rows] @ query + prior * bias[allowed_rows]
            assert rows.tolist() == allowed_rows[np.argsort(-scores, kind="stable")[:10]].tolist()
    # Many rows hidden (a search per query through the masked path): the same scores.
    catalog.excluded[100:400] = True
    catalog.n_excluded = 300
    visible = np.flatnonzero(~catalog.excluded)
    _, rows = catalog.search(np.stack([query, vectors[7]]), 10, np.asarray([0.1, 0.0]))
    for i, (q, prior) in enumerate(((query, 0.1), (vectors[7], 0.0))):
        scores = vectors[visible] @ q + prior * bias[visible]
        assert rows[i].tolist() == visible[np.argsort(-scores, kind="stable")[:10]].tolist()
    catalog.excluded[100:400], catalog.n_excluded = False, 0
    # The boosted own purchases are scored the same way as the search, plus their boost.
    bought = (np.asarray([5, 200]), np.zeros(2, np.float32))
    request = ranking.RankRequest(10, prior=0.1, boost=RepeatBoost(bonus=2.0), bought=bought)
    merged_scores, merged_rows = ranking.rank(catalog, query[None], [request])[0]
    for row in (5, 200):
        assert row in merged_rows.tolist()
        assert merged_scores[merged_rows.tolist().index(row)] == pytest.approx(
            vectors[row] @ query + 0.1 * bias[row] + 2.0, rel=1e-5
        )


def test_operators_can_replace_the_fitted_weight(tmp_path: Path) -> None:
    write_random_index(tmp_path / "v0001", "flat", ["A"] * 50, item_bias=np.ones(50, np.float32), prior_weight=0.1)
    assert Catalog(tmp_path / "v0001").prior_weight == 0.1  # -1 (default): the fitted weight
    assert Catalog(tmp_path / "v0001", popularity_weight=0.0).prior_weight == 0.0  # off
    assert Catalog(tmp_path / "v0001", popularity_weight=0.3).prior_weight == 0.3


def test_indexes_without_a_prior_search_by_cosine(tmp_path: Path) -> None:
    vectors = write_random_index(tmp_path / "v0001", "flat", ["A"] * 50)
    catalog = Catalog(tmp_path / "v0001")
    assert catalog.item_bias is None and catalog.prior_weight == 0.0 and catalog.index.d == vectors.shape[1]
    _, rows = catalog.search(vectors[:1], 5, prior=0.3)  # a weight with nothing to weigh changes nothing
    assert rows[0].tolist() == np.argsort(-(vectors @ vectors[0]))[:5].tolist()


def test_export_serves_the_fitted_weight_over_the_last_days_sales(tiny_pipeline) -> None:
    catalog = Catalog(tiny_pipeline.index_dir)
    prior = popularity.PopularityPrior.from_json(
        json.loads((tiny_pipeline.run_dir / rundir.POPULARITY_PRIOR).read_text())
    )
    assert catalog.score_head.prior == prior  # the weight training fitted is the one served
    data = load_hm_dir(tiny_pipeline.data_dir)  # trained on all of it: the window ends with the data's last day
    expected = popularity.item_bias(
        data.transactions,
        catalog.row_of,
        len(catalog.row_of),
        data.transactions["t_dat"].max() + pd.Timedelta(days=1),
        prior.window_days,
    )
    assert catalog.item_bias is not None and catalog.item_bias.max() > 0
    np.testing.assert_array_equal(catalog.item_bias, expected)


def test_a_catalog_travels_to_kserve_workers_by_its_files(tmp_path: Path) -> None:
    """--workers N pickles the model: pickled memmaps would arrive as private copies, so a copy maps the files."""
    import pickle

    n = 3000
    bias = np.linspace(0, 2, n, dtype=np.float32)
    vectors = write_random_index(tmp_path / "v0001", "ivf-pq", ["A"] * n, item_bias=bias, prior_weight=0.1)
    catalog = Catalog(tmp_path / "v0001", ivf_nprobe=30)
    payload = pickle.dumps(catalog)
    assert len(payload) < 2_000  # arguments, not arrays
    copy = pickle.loads(payload)
    assert isinstance(copy.vectors.base, np.memmap) and copy.ivf_nprobe == 30  # a view of the mapped file
    for a, b in zip(catalog.search(vectors[:4], 10, 0.1), copy.search(vectors[:4], 10, 0.1)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("index_type", ["flat", "ivf-pq"])
def test_a_float16_catalogue_is_searched_and_scored_in_float32(tmp_path: Path, index_type: str) -> None:
    """export --vector-dtype float16: one half-size vectors file that every read gathers rows from."""
    n = 3000
    bias = np.zeros(n, dtype=np.float32)
    bias[:30] = np.log1p(np.arange(30, dtype=np.float32) * 10)
    vectors = write_random_index(
        tmp_path / "v0001", index_type, ["A"] * n, item_bias=bias, prior_weight=0.1, vector_dtype="float16"
    )
    catalog = Catalog(tmp_path / "v0001", ivf_nprobe=76)
    assert catalog.vectors.dtype == np.float16 and catalog.manifest.vector_dtype == "float16"
    assert (tmp_path / "v0001" / artifacts.VECTORS_FILE).stat().st_size < n * vectors.shape[1] * 2 + 200
    query = vectors[100]
    expected_scores = vectors @ query + 0.1 * bias
    scores, rows = catalog.search(query[None], 10, 0.1)  # ivf-pq: candidates re-ranked from the float16 rows
    assert rows[0].tolist() == np.argsort(-expected_scores, kind="stable")[:10].tolist()
    assert scores.dtype == np.float32
    np.testing.assert_allclose(scores[0], expected_scores[rows[0]], atol=2e-3)
    bought = (np.asarray([5, 200]), np.zeros(2, np.float32))  # boosted rows are scored from the same file
    request = ranking.RankRequest(10, prior=0.1, boost=RepeatBoost(bonus=2.0), bought=bought)
    merged_scores, merged_rows = ranking.rank(catalog, query[None], [request])[0]
    assert merged_scores.dtype == np.float32
    assert merged_scores[merged_rows.tolist().index(200)] == pytest.approx(expected_scores[200] + 2.0, abs=2e-3)


def test_a_vectors_file_other_than_the_manifest_says_is_refused(tmp_path: Path) -> None:
    vectors = write_random_index(tmp_path / "v0001", "flat", ["A"] * 50)
    np.save(tmp_path / "v0001" / artifacts.VECTORS_FILE, vectors.astype(np.float16))
    with pytest.raises(artifacts.ArtifactError, match="vectors are float16, the manifest says float32"):
        Catalog(tmp_path / "v0001", verify=False)  # (verified, its checksum would refuse it first)
    with pytest.raises(ValueError, match="vector_dtype 'int8'"):
        write_random_index(tmp_path / "v0002", "flat", ["A"] * 50, vector_dtype="int8")
