"""Data loading: schema validation with file/line/column errors, captions, synthetic generator."""

from __future__ import annotations

import gzip
from pathlib import Path

import pandas as pd
import pytest

from twotower.data.histories import PAD, latest_histories, training_examples
from twotower.data.hm import DataFormatError, build_caption, load_articles, load_hm_dir, load_transactions
from twotower.data.synthetic import ARTICLE_COLUMNS, generate

KAGGLE_ARTICLE_COLUMNS = (
    "article_id,product_code,prod_name,product_type_no,product_type_name,product_group_name,"
    "graphical_appearance_no,graphical_appearance_name,colour_group_code,colour_group_name,"
    "perceived_colour_value_id,perceived_colour_value_name,perceived_colour_master_id,"
    "perceived_colour_master_name,department_no,department_name,index_code,index_name,index_group_no,"
    "index_group_name,section_no,section_name,garment_group_no,garment_group_name,detail_desc"
).split(",")


@pytest.fixture(scope="module")
def shop(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate(tmp_path_factory.mktemp("shop") / "data", seed=3, n_articles=60, n_customers=50)


def test_synthetic_has_kaggle_schema_and_is_deterministic(shop: Path, tmp_path: Path) -> None:
    assert ARTICLE_COLUMNS == KAGGLE_ARTICLE_COLUMNS
    again = generate(tmp_path / "again", seed=3, n_articles=60, n_customers=50)
    for name in ("articles.csv", "transactions_train.csv"):
        assert (shop / name).read_bytes() == (again / name).read_bytes()
    other = generate(tmp_path / "other", seed=4, n_articles=60, n_customers=50)
    assert (other / "transactions_train.csv").read_bytes() != (shop / "transactions_train.csv").read_bytes()
    data = load_hm_dir(shop)
    assert len(data.articles) == 60
    assert data.transactions["customer_id"].nunique() == 50
    assert data.transactions["article_id"].str.len().eq(10).all()


def test_synthetic_customers_have_learnable_preferences(tmp_path: Path) -> None:
    data = load_hm_dir(generate(tmp_path / "d", seed=0, n_articles=300, n_customers=200))
    bought = data.transactions.merge(data.articles[["index_name"]], left_on="article_id", right_index=True)
    # Most purchases of a customer fall in one shop index (a random shopper would spread over 5).
    top_share = bought.groupby("customer_id")["index_name"].agg(lambda s: s.value_counts(normalize=True).iloc[0])
    assert top_share.mean() > 0.6


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def articles_csv(rows: list[str]) -> str:
    header = ",".join(KAGGLE_ARTICLE_COLUMNS)
    return "\n".join([header, *rows]) + "\n"


def article_row(article_id: str, desc: str = "Soft top.") -> str:
    values = {c: "x" for c in KAGGLE_ARTICLE_COLUMNS}
    values.update(
        article_id=article_id,
        prod_name="Top",
        product_type_name="Vest top",
        colour_group_name="Black",
        detail_desc=desc,
    )
    return ",".join(values[c] for c in KAGGLE_ARTICLE_COLUMNS)


def test_article_ids_are_zero_padded_like_kaggle(tmp_path: Path) -> None:
    articles = load_articles(write(tmp_path / "articles.csv", articles_csv([article_row("108775015")])))
    assert articles.index.tolist() == ["0108775015"]


def test_gzip_files_are_read(tmp_path: Path) -> None:
    with gzip.open(tmp_path / "articles.csv.gz", "wt") as handle:
        handle.write(articles_csv([article_row("0108775015")]))
    write(
        tmp_path / "transactions_train.csv",
        "t_dat,customer_id,article_id,price,sales_channel_id\n2020-09-16,c1,0108775015,0.05,2\n",
    )
    data = load_hm_dir(tmp_path)
    assert data.transactions["t_dat"].iloc[0] == pd.Timestamp("2020-09-16")


@pytest.mark.parametrize(
    "text, line, column, fragment",
    [
        (articles_csv([article_row("0108775015"), article_row("12ab")]), 3, "article_id", "not a number"),
        (articles_csv([article_row("0108775015"), article_row("0108775015")]), 3, "article_id", "appears twice"),
        (articles_csv([]), None, None, "catalogue is empty"),
        ("article_id,prod_name\n0108775015,Top\n", 1, None, "missing required column"),
        ("", None, None, "empty"),
    ],
)
def test_bad_articles_name_file_line_and_column(tmp_path: Path, text: str, line, column, fragment: str) -> None:
    path = write(tmp_path / "articles.csv", text)
    with pytest.raises(DataFormatError) as caught:
        load_articles(path)
    message = str(caught.value)
    assert str(path) in message and fragment in message
    assert caught.value.line == line and caught.value.column == column
    if line is not None:
        assert f"line {line}" in message


@pytest.mark.parametrize(
    "row, column, fragment",
    [
        ("2020-13-45,c1,0108775015,0.05,2", "t_dat", "not YYYY-MM-DD"),
        ("2020-09-16,c1,0108775015,abc,2", "price", "not a finite number"),
        ("2020-09-16,c1,999,0.05,2", "article_id", "not in the catalogue"),
        ("2020-09-16,,0108775015,0.05,2", "customer_id", "empty"),
    ],
)
def test_bad_transactions_name_file_line_and_column(tmp_path: Path, row: str, column: str, fragment: str) -> None:
    articles = load_articles(write(tmp_path / "articles.csv", articles_csv([article_row("0108775015")])))
    good = "2020-09-16,c0,0108775015,0.05,2"
    path = write(
        tmp_path / "transactions_train.csv", f"t_dat,customer_id,article_id,price,sales_channel_id\n{good}\n{row}\n"
    )
    with pytest.raises(DataFormatError) as caught:
        load_transactions(path, articles)
    assert caught.value.line == 3 and caught.value.column == column
    assert fragment in str(caught.value) and str(path) in str(caught.value)


def test_caption_puts_the_telling_fields_first() -> None:
    row = {
        "prod_name": "Strap top",
        "colour_group_name": "Black",
        "product_type_name": "Vest top",
        "graphical_appearance_name": "Solid",
        "index_name": "Ladieswear",
        "section_name": "Womens Everyday Basics",
        "garment_group_name": "Jersey Basic",
        "detail_desc": "Jersey top with narrow shoulder straps.",
    }
    caption = build_caption(row)
    assert caption.startswith("Strap top: Black Vest top")
    assert caption.endswith("narrow shoulder straps.")
    assert build_caption({**row, "detail_desc": ""}).endswith("Jersey Basic")


def test_histories_are_most_recent_first_with_ages() -> None:
    frame = pd.DataFrame(
        {
            "t_dat": pd.to_datetime(["2020-09-16", "2020-09-18", "2020-09-20", "2020-09-17"]),
            "customer_id": ["a", "a", "a", "b"],
            "article_id": ["x", "y", "z", "x"],
        }
    ).sort_values("t_dat", kind="stable")
    row_of = {"x": 0, "y": 1, "z": 2}
    examples = training_examples(frame, row_of, max_history=2)
    assert len(examples) == 2  # a: y|x, z|y,x ; b has a single purchase
    last = list(examples.targets).index(2)
    assert examples.histories.rows[last].tolist() == [1, 0]
    assert examples.histories.age_days[last].tolist() == [2.0, 4.0]
    customers, histories, last_day = latest_histories(frame, row_of, max_history=3)
    a = customers.index("a")
    assert histories.rows[a].tolist() == [2, 1, 0]
    assert histories.rows[customers.index("b")].tolist() == [0, PAD, PAD]
    assert histories.lengths.tolist()[a] == 3


def test_earlier_days_only_histories_skip_the_same_basket() -> None:
    frame = pd.DataFrame(
        {
            "t_dat": pd.to_datetime(["2020-09-16", "2020-09-18", "2020-09-18", "2020-09-20"]),
            "customer_id": ["a", "a", "a", "a"],
            "article_id": ["x", "y", "z", "w"],
        }
    )
    row_of = {"x": 0, "y": 1, "z": 2, "w": 3}
    plain = training_examples(frame, row_of, max_history=3)
    assert plain.histories.rows[plain.targets.tolist().index(2)].tolist() == [1, 0, PAD]  # z sees y, same day
    strict = training_examples(frame, row_of, max_history=3, earlier_days_only=True)
    assert strict.targets.tolist() == [1, 2, 3]
    assert strict.histories.rows.tolist() == [[0, PAD, PAD], [0, PAD, PAD], [2, 1, 0]]  # y and z: only x
    assert strict.histories.age_days[1].tolist() == [2.0, 0.0, 0.0]


def test_truncated_gzip_is_named_and_nothing_is_half_written(tmp_path: Path, capsys) -> None:
    """A truncated transactions file: a clear error naming it, and no run directory or index left behind."""
    import gzip

    from export.__main__ import main as export_main
    from twotower.data.synthetic import generate
    from twotower.train import main as train_main

    data = generate(tmp_path / "data", seed=0, n_articles=40, n_customers=30)
    raw = (data / "transactions_train.csv").read_bytes()
    (data / "transactions_train.csv").unlink()
    packed = gzip.compress(raw)
    (data / "transactions_train.csv.gz").write_bytes(packed[: len(packed) // 2])
    assert train_main(["--data-dir", str(data), "--out", str(tmp_path / "run"), "--epochs", "1"]) == 1
    message = capsys.readouterr().err
    assert "transactions_train.csv.gz" in message and "cannot be read" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]  # no run directory, no staging leftovers
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text("{}")
    (tmp_path / "run" / "model.pt").write_bytes(b"")
    assert (
        export_main(
            [
                "--run",
                str(tmp_path / "run"),
                "--data-dir",
                str(data),
                "--model-repository",
                str(tmp_path / "repo"),
                "--index-dir",
                str(tmp_path / "index"),
            ]
        )
        != 0
    )
    assert not (tmp_path / "repo").exists() and not (tmp_path / "index").exists()
