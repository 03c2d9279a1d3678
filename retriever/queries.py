"""What a recommendation request is, whatever transport it came by (v1, v2 or the shop API)."""

from __future__ import annotations

import dataclasses
from typing import Any

from serving.filters import Filters

KINDS = ("customer_id", "history", "query", "similar_to")
PERSONAL_KINDS = ("customer_id", "history")  # lists ranked with the popularity prior and the repeat boost


@dataclasses.dataclass(frozen=True)
class QueryOptions:
    filters: Filters = Filters()
    exclude_purchased: bool = False  # customer_id/history: never return an article they bought
    max_per_product_type: int | None = None  # diversity cap
    debug: bool = False  # answers say which retriever found each item


@dataclasses.dataclass
class Query:
    kind: str  # one of KINDS
    value: Any  # str for customer_id/query/similar_to, list[str] for history (oldest first)
    k: int
    options: QueryOptions = QueryOptions()
    ages: tuple[float, ...] | None = None  # history: days since each purchase, oldest first (None: 0 days)

    @property
    def hides_bought(self) -> bool:
        """Its list never shows what was bought (similar_to: the article itself)."""
        return self.options.exclude_purchased or self.kind == "similar_to"


@dataclasses.dataclass
class Recommendation:
    article_ids: list[str]
    similarities: list[float]
    scores: list[float]
    metadata: list[dict[str, str]]
    sources: list[str] | None = None  # hybrid text search: "dense", "lexical" or "dense+lexical" per item
