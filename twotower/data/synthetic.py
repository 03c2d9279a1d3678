"""A synthetic shop in the H&M schema, with structure a model can learn.

Each customer prefers one shop index (Ladieswear, Menswear, ...), a few product types and
a few colours; purchases follow those preferences times a Zipf popularity, with some repeat
purchases. The files match the Kaggle column schema exactly, so every loader and command
runs unchanged on synthetic or real data. Deterministic for a given seed.

    python -m twotower.data.synthetic --out data/synthetic --seed 0
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

from twotower.data.hm import ARTICLES_STEM, TRANSACTIONS_STEM
from twotower.files import staged_directory

# (type_no, type name, product group, garment group no, garment group name)
PRODUCT_TYPES = [
    (265, "Dress", "Garment Full body", 1013, "Dresses Ladies"),
    (272, "Trousers", "Garment Lower body", 1009, "Trousers"),
    (252, "Sweater", "Garment Upper body", 1003, "Knitwear"),
    (255, "T-shirt", "Garment Upper body", 1002, "Jersey Basic"),
    (264, "Jacket", "Garment Upper body", 1007, "Outdoor"),
    (274, "Skirt", "Garment Lower body", 1012, "Skirts"),
    (274 + 1, "Shorts", "Garment Lower body", 1025, "Shorts"),
    (88, "Sneakers", "Shoes", 1020, "Shoes"),
    (66, "Bag", "Accessories", 1019, "Accessories"),
    (87, "Hat/beanie", "Accessories", 1019, "Accessories"),
    (306, "Bra", "Underwear", 1017, "Under-, Nightwear"),
    (302, "Socks", "Socks & Tights", 1021, "Socks and Tights"),
]
# (code, colour name, perceived value id, value name, master id, master name)
COLOURS = [
    (9, "Black", 4, "Dark", 5, "Black"),
    (10, "White", 3, "Light", 9, "White"),
    (73, "Dark Blue", 4, "Dark", 2, "Blue"),
    (42, "Red", 2, "Medium Dusty", 18, "Red"),
    (53, "Dark Green", 4, "Dark", 19, "Green"),
    (13, "Beige", 3, "Light", 11, "Beige"),
    (52, "Pink", 3, "Light", 4, "Pink"),
    (7, "Grey", 2, "Medium Dusty", 12, "Grey"),
    (11, "Yellow", 5, "Bright", 8, "Yellow"),
]
# (code, index name, group no, group name, sections)
INDEXES = [
    ("A", "Ladieswear", 1, "Ladieswear", ["Womens Everyday Collection", "Womens Tailoring"]),
    ("F", "Menswear", 3, "Menswear", ["Men Underwear", "Mens Outerwear", "Contemporary Smart"]),
    ("D", "Divided", 2, "Divided", ["Divided Collection", "Divided Basics"]),
    ("H", "Children Sizes 92-140", 4, "Baby/Children", ["Kids Girl", "Kids Boy"]),
    ("I", "Sport", 26, "Sport", ["Ladies H&M Sport", "Men H&M Sport"]),
]
APPEARANCES = [(1010016, "Solid"), (1010017, "Stripe"), (1010001, "All over pattern"), (1010010, "Melange")]
ADJECTIVES = [
    "Soft",
    "Slim",
    "Relaxed",
    "Classic",
    "Cosy",
    "Airy",
    "Chunky",
    "Fitted",
    "Wide",
    "Cropped",
    "Basic",
    "Luxe",
]
NAMES = ["Ava", "Leo", "Mia", "Noah", "Ella", "Max", "Isla", "Theo", "Luna", "Finn", "Nova", "Ivy", "Oscar", "Zoe"]
MATERIALS = ["cotton jersey", "soft knit", "woven fabric", "denim", "recycled polyester", "wool blend", "linen"]
DETAILS = [
    "a round neckline",
    "long sleeves",
    "an elasticated waist",
    "side pockets",
    "a zip at the front",
    "a relaxed fit",
]

ARTICLE_COLUMNS = [
    "article_id",
    "product_code",
    "prod_name",
    "product_type_no",
    "product_type_name",
    "product_group_name",
    "graphical_appearance_no",
    "graphical_appearance_name",
    "colour_group_code",
    "colour_group_name",
    "perceived_colour_value_id",
    "perceived_colour_value_name",
    "perceived_colour_master_id",
    "perceived_colour_master_name",
    "department_no",
    "department_name",
    "index_code",
    "index_name",
    "index_group_no",
    "index_group_name",
    "section_no",
    "section_name",
    "garment_group_no",
    "garment_group_name",
    "detail_desc",
]
START_DATE = pd.Timestamp("2020-09-16")
DAYS = 7


def make_articles(rng: np.random.Generator, n_articles: int) -> pd.DataFrame:
    rows: list[dict] = []
    product = 0
    while len(rows) < n_articles:
        product += 1
        code = 100000 + product
        index_code, index_name, group_no, group_name, sections = INDEXES[rng.integers(len(INDEXES))]
        section_no = int(rng.integers(len(sections)))
        type_no, type_name, group, garment_no, garment = PRODUCT_TYPES[rng.integers(len(PRODUCT_TYPES))]
        appearance_no, appearance = APPEARANCES[rng.integers(len(APPEARANCES))]
        name = (
            f"{NAMES[rng.integers(len(NAMES))]} {ADJECTIVES[rng.integers(len(ADJECTIVES))].lower()} {type_name.lower()}"
        )
        material = MATERIALS[rng.integers(len(MATERIALS))]
        detail = DETAILS[rng.integers(len(DETAILS))]
        description = f"{appearance} {type_name.lower()} in {material} with {detail}. Style {code}."
        colours = rng.choice(len(COLOURS), size=int(rng.integers(1, 4)), replace=False)
        for variant, colour_index in enumerate(colours):
            colour_code, colour, value_id, value, master_id, master = COLOURS[colour_index]
            rows.append(
                {
                    "article_id": f"{code * 1000 + variant + 1:010d}",
                    "product_code": f"{code:07d}",
                    "prod_name": name.capitalize(),
                    "product_type_no": type_no,
                    "product_type_name": type_name,
                    "product_group_name": group,
                    "graphical_appearance_no": appearance_no,
                    "graphical_appearance_name": appearance,
                    "colour_group_code": colour_code,
                    "colour_group_name": colour,
                    "perceived_colour_value_id": value_id,
                    "perceived_colour_value_name": value,
                    "perceived_colour_master_id": master_id,
                    "perceived_colour_master_name": master,
                    "department_no": 1000 + garment_no % 1000,
                    "department_name": f"{garment} {index_name}",
                    "index_code": index_code,
                    "index_name": index_name,
                    "index_group_no": group_no,
                    "index_group_name": group_name,
                    "section_no": 10 * group_no + section_no,
                    "section_name": sections[section_no],
                    "garment_group_no": garment_no,
                    "garment_group_name": garment,
                    "detail_desc": description,
                }
            )
    return pd.DataFrame(rows[:n_articles], columns=ARTICLE_COLUMNS)


def make_transactions(rng: np.random.Generator, articles: pd.DataFrame, n_customers: int) -> pd.DataFrame:
    index_of = articles["index_code"].map({code: i for i, (code, *_rest) in enumerate(INDEXES)}).to_numpy()
    type_of = articles["product_type_name"].map({t[1]: i for i, t in enumerate(PRODUCT_TYPES)}).to_numpy()
    colour_of = articles["colour_group_code"].map({c[0]: i for i, c in enumerate(COLOURS)}).to_numpy()
    popularity = 1.0 / np.arange(1, len(articles) + 1) ** 0.8
    popularity = popularity[rng.permutation(len(articles))]
    base_price = 0.01 + 0.05 * rng.random(len(PRODUCT_TYPES))

    rows: list[tuple] = []
    for customer in range(n_customers):
        customer_id = f"{rng.integers(0, 2**63):016x}{customer:048x}"
        likes_index = rng.integers(len(INDEXES))
        likes_types = rng.choice(len(PRODUCT_TYPES), size=3, replace=False)
        likes_colours = rng.choice(len(COLOURS), size=2, replace=False)
        weight = (
            popularity
            * np.where(index_of == likes_index, 6.0, 0.15)
            * np.where(np.isin(type_of, likes_types), 6.0, 0.2)
            * np.where(np.isin(colour_of, likes_colours), 4.0, 0.4)
        )
        weight /= weight.sum()
        n_purchases = 1 + int(rng.geometric(0.18))
        bought: list[int] = []
        for _ in range(n_purchases):
            if bought and rng.random() < 0.15:
                bought.append(bought[int(rng.integers(len(bought)))])  # repeat purchase
            else:
                bought.append(int(rng.choice(len(articles), p=weight)))
        days = np.sort(rng.integers(0, DAYS, size=len(bought)))
        channel = int(rng.integers(1, 3))
        for day, article in zip(days, bought):
            price = base_price[type_of[article]] * (0.8 + 0.4 * rng.random())
            rows.append(
                (
                    (START_DATE + pd.Timedelta(days=int(day))).strftime("%Y-%m-%d"),
                    customer_id,
                    articles["article_id"].iat[article],
                    round(float(price), 6),
                    channel,
                )
            )
    frame = pd.DataFrame(rows, columns=["t_dat", "customer_id", "article_id", "price", "sales_channel_id"])
    return frame.sort_values("t_dat", kind="stable").reset_index(drop=True)


def generate(out_dir: Path | str, seed: int = 0, n_articles: int = 600, n_customers: int = 800) -> Path:
    """Write articles.csv and transactions_train.csv into `out_dir` (atomically, as a whole)."""
    if n_articles < 1 or n_customers < 1:
        raise ValueError("n_articles and n_customers must be >= 1")
    out = Path(out_dir)
    rng = np.random.default_rng(seed)
    articles = make_articles(rng, n_articles)
    transactions = make_transactions(rng, articles, n_customers)
    with staged_directory(out, replace=True) as staging:
        articles.to_csv(staging / f"{ARTICLES_STEM}.csv", index=False)
        transactions.to_csv(staging / f"{TRANSACTIONS_STEM}.csv", index=False)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="directory to write (replaced if it exists)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--articles", type=int, default=600)
    parser.add_argument("--customers", type=int, default=800)
    args = parser.parse_args(argv)
    out = generate(args.out, args.seed, args.articles, args.customers)
    print(f"wrote synthetic H&M-format data to {out}")


if __name__ == "__main__":
    main()
