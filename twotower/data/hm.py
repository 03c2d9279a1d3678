"""Reading H&M-format files (Kaggle "H&M Personalized Fashion Recommendations" schema).

Input schema
- articles.csv[.gz]: one row per article; `article_id` plus the text columns in
  ARTICLE_TEXT_COLUMNS (others are kept when present).
- transactions_train.csv[.gz]: t_dat (YYYY-MM-DD), customer_id, article_id, price,
  sales_channel_id; a repeated row is a repeated purchase.
- customers.csv[.gz] is optional and not needed by the model.

Output: pandas frames with string ids (article_id zero-padded to 10 digits, as Kaggle's
own loaders do) and parsed dates. Any malformed value raises DataFormatError naming the
file, the line (header = line 1) and the column.
"""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd

ARTICLES_STEM = "articles"
TRANSACTIONS_STEM = "transactions_train"

ARTICLE_TEXT_COLUMNS = (
    "prod_name",
    "product_type_name",
    "product_group_name",
    "graphical_appearance_name",
    "colour_group_name",
    "index_name",
    "section_name",
    "garment_group_name",
    "detail_desc",
)
ARTICLE_REQUIRED_COLUMNS = ("article_id",) + ARTICLE_TEXT_COLUMNS
# Columns the retriever returns with every recommendation.
METADATA_COLUMNS = (
    "product_code",  # articles sharing it are one product in other colours (the sibling boost reads it)
    "prod_name",
    "product_type_name",
    "product_group_name",
    "colour_group_name",
    "index_name",
    "section_name",
    "garment_group_name",
    "detail_desc",
)
TRANSACTION_REQUIRED_COLUMNS = ("t_dat", "customer_id", "article_id", "price")
ARTICLE_ID_DIGITS = 10


class DataFormatError(ValueError):
    """A data file does not follow the H&M schema; the message names file, line and column."""

    def __init__(self, path: Path | str, message: str, line: int | None = None, column: str | None = None):
        where = str(path)
        if line is not None:
            where += f", line {line}"
        if column is not None:
            where += f", column {column!r}"
        super().__init__(f"{where}: {message}")
        self.path = str(path)
        self.line = line
        self.column = column


def find_data_file(data_dir: Path | str, stem: str, required: bool = True) -> Path | None:
    """Return `<dir>/<stem>.csv` or `<stem>.csv.gz`, whichever exists."""
    directory = Path(data_dir)
    for suffix in (".csv", ".csv.gz"):
        candidate = directory / (stem + suffix)
        if candidate.is_file():
            return candidate
    if required:
        raise FileNotFoundError(f"{directory}: no {stem}.csv or {stem}.csv.gz")
    return None


def _read_csv(path: Path, required: tuple[str, ...]) -> pd.DataFrame:
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False, na_filter=False)
    except pd.errors.ParserError as err:
        raise DataFormatError(path, f"not a well-formed CSV file ({err})") from err
    except (EOFError, OSError, UnicodeDecodeError, csv.Error) as err:
        raise DataFormatError(path, f"cannot be read ({type(err).__name__}: {err})") from err
    except pd.errors.EmptyDataError as err:
        raise DataFormatError(path, "file is empty (no header line)") from err
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise DataFormatError(path, f"missing required column(s) {missing}; found {list(frame.columns)}", line=1)
    return frame


def _first_bad(mask: np.ndarray) -> int | None:
    bad = np.flatnonzero(mask)
    return int(bad[0]) if len(bad) else None


def normalise_article_ids(values: pd.Series, path: Path, column: str = "article_id") -> pd.Series:
    """Zero-pad to 10 digits; Kaggle's raw CSV drops the leading zero."""
    stripped = values.str.strip()
    bad = _first_bad(~stripped.str.fullmatch(r"\d{1,10}").to_numpy(dtype=bool))
    if bad is not None:
        raise DataFormatError(
            path, f"article_id {values.iloc[bad]!r} is not a number of at most 10 digits", line=bad + 2, column=column
        )
    return stripped.str.zfill(ARTICLE_ID_DIGITS)


def load_articles(path: Path | str) -> pd.DataFrame:
    """Load the catalogue, indexed by 10-digit article_id, in file order."""
    path = Path(path)
    frame = _read_csv(path, ARTICLE_REQUIRED_COLUMNS)
    if frame.empty:
        raise DataFormatError(path, "the catalogue is empty: no article rows after the header")
    frame["article_id"] = normalise_article_ids(frame["article_id"], path)
    duplicated = _first_bad(frame["article_id"].duplicated().to_numpy())
    if duplicated is not None:
        raise DataFormatError(
            path,
            f"article_id {frame['article_id'].iloc[duplicated]} appears twice",
            line=duplicated + 2,
            column="article_id",
        )
    for column in ARTICLE_TEXT_COLUMNS:
        frame[column] = frame[column].str.strip()
    return frame.set_index("article_id", drop=False)


def load_transactions(path: Path | str, articles: pd.DataFrame | None = None) -> pd.DataFrame:
    """Load purchases sorted by date (stable: file order within a day)."""
    path = Path(path)
    frame = _read_csv(path, TRANSACTION_REQUIRED_COLUMNS)
    frame["article_id"] = normalise_article_ids(frame["article_id"], path)
    dates = pd.to_datetime(frame["t_dat"], format="%Y-%m-%d", errors="coerce")
    bad = _first_bad(dates.isna().to_numpy())
    if bad is not None:
        raise DataFormatError(
            path, f"date {frame['t_dat'].iloc[bad]!r} is not YYYY-MM-DD", line=bad + 2, column="t_dat"
        )
    frame["t_dat"] = dates
    prices = pd.to_numeric(frame["price"], errors="coerce")
    bad = _first_bad((prices.isna() | ~np.isfinite(prices)).to_numpy())
    if bad is not None:
        raise DataFormatError(
            path, f"price {frame['price'].iloc[bad]!r} is not a finite number", line=bad + 2, column="price"
        )
    frame["price"] = prices.astype("float32")
    bad = _first_bad((frame["customer_id"].str.strip() == "").to_numpy())
    if bad is not None:
        raise DataFormatError(path, "customer_id is empty", line=bad + 2, column="customer_id")
    if articles is not None:
        bad = _first_bad(~frame["article_id"].isin(articles.index).to_numpy())
        if bad is not None:
            raise DataFormatError(
                path,
                f"article_id {frame['article_id'].iloc[bad]} is not in the catalogue",
                line=bad + 2,
                column="article_id",
            )
    frame = frame.reset_index(drop=True)
    return frame.sort_values("t_dat", kind="stable").reset_index(drop=True)


def build_caption(row: pd.Series | dict) -> str:
    """One text per article for the CLIP text tower; the most telling fields first (77-token limit)."""
    parts = [
        f"{row['prod_name']}: {row['colour_group_name']} {row['product_type_name']}".strip(),
        f"{row['graphical_appearance_name']}, {row['index_name']}, {row['section_name']}, {row['garment_group_name']}",
    ]
    description = str(row.get("detail_desc", "") or "").strip()
    if description:
        parts.append(description)
    return ". ".join(parts)


def build_captions(articles: pd.DataFrame) -> list[str]:
    records = articles[list(ARTICLE_TEXT_COLUMNS)].to_dict("records")
    return [build_caption(record) for record in records]


@dataclasses.dataclass
class HMData:
    """A validated H&M-format data set."""

    articles: pd.DataFrame
    transactions: pd.DataFrame
    source: str

    @property
    def article_ids(self) -> list[str]:
        return self.articles.index.tolist()


def load_hm_dir(data_dir: Path | str) -> HMData:
    directory = Path(data_dir)
    articles_path = find_data_file(directory, ARTICLES_STEM)
    transactions_path = find_data_file(directory, TRANSACTIONS_STEM)
    assert articles_path is not None and transactions_path is not None
    articles = load_articles(articles_path)
    transactions = load_transactions(transactions_path, articles)
    if transactions.empty:
        raise DataFormatError(transactions_path, "no purchase rows after the header")
    return HMData(articles=articles, transactions=transactions, source=str(directory))
