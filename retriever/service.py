"""The recommendation service: what the v1/v2 API and the shop API ask, answered in plain Python.

A request's path, top to bottom: transport (retriever/protocol.py, retriever/shop_api.py) -> this
service (a vector per query, from caches or the towers) -> twotower.ranking (what to show, in which
order) -> serving.catalog (the index). No kserve or FastAPI here: the KServe adapter and the shop
routes call it, and the tests call it in-process with stand-in towers. Errors are domain errors
(retriever/errors.py), never HTTP ones.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from itertools import islice
from pathlib import Path
from typing import Any, Protocol, Sequence

import faiss
import numpy as np

from retriever import metrics
from retriever.cache import LRUCache
from retriever.errors import NOT_SERVING, NotReady, RequestError
from retriever.index_slot import IndexSlot, ReloadResult, Serving
from retriever.purchases import NOTHING_POSTED, Posted, purchase_store
from retriever.queries import PERSONAL_KINDS, Query, Recommendation
from retriever.swap_turns import heartbeat_stale_s
from serving.catalog import Catalog, UnknownIds
from serving.filters import CATEGORY_FILTERS, FilterError
from serving.lexical import hybrid_rank
from serving.towers import TokenIds, Tokenizer, TritonUnavailable
from twotower import ranking
from twotower.config import RetrieverConfig
from twotower.ranking import NOTHING_BOUGHT, Purchases, RankRequest
from twotower.repeats import RepeatBoost
from twotower.second_stage import SecondStage

log = logging.getLogger("retriever")
STAGE_SHED_LOG_S = 10.0


class LoadSignal(Protocol):
    @property
    def overloaded(self) -> bool: ...


# Rows a request's searches may score together on the event loop (`_rows_scored` each): one unfiltered search of a
# 10M-article index (~107k), a batch of ~20 plain searches at H&M's size (11,454 each) or 7 customers' lists with their
# second stage, or two filtered or hybrid text ones there (~117k).
INLINE_SEARCH_ROWS = 250_000
# What a list's second stage (its pool's candidates and features) counts in that budget. H&M (runs/bench, in process,
# one thread, medians of 60 batches of stored customers): 20 lists ranked in 7.8 ms without the stage (0.034 us a row
# searched) and 22.5 ms with it, 0.74 ms more a list, as much as ~20k rows searched; such a batch stalled the loop
# for those 22.5 ms before the stage was counted
STAGED_LIST_ROWS = 20_000
# Characters of query text a request may tokenize on the event loop, against a worker thread's handoff: MiniLM's
# tokenizer 0.02 ms for a 15-character query, 0.8 ms for the 2,000 a query may have; open_clip's 0.04 / 0.8 ms
INLINE_TOKENIZE_CHARS = 4_000
TEXT_SEARCH_MODES = ("dense", "hybrid")
HISTORY_CLOCKS = ("wall", "index")
SECONDS_PER_DAY = 86_400


def image_url(template: str, article_id: str) -> str:
    return template.format(article_id=article_id, prefix=article_id[:3])


def read_admin_token(path: str) -> bytes:
    """The bearer token protected endpoints require (surrounding whitespace dropped: Secrets often end in \\n)."""
    try:
        return Path(path).read_bytes().strip()
    except OSError as err:
        raise ValueError(f"--admin-token-file: cannot read {path} ({err.strerror})") from err


def check_settings(config: RetrieverConfig) -> None:
    """Settings that would fail every request, refused at start instead (ValueError naming the flag)."""
    if config.text_search not in TEXT_SEARCH_MODES:
        raise ValueError(f"--text-search: {config.text_search!r} is not one of {', '.join(TEXT_SEARCH_MODES)}")
    if config.history_clock not in HISTORY_CLOCKS:
        raise ValueError(f"--history-clock: {config.history_clock!r} is not one of {', '.join(HISTORY_CLOCKS)}")
    if config.image_url_template:
        try:
            image_url(config.image_url_template, "0108775015")
        except (KeyError, IndexError, ValueError, AttributeError) as err:
            raise ValueError(
                f"--image-url-template: {config.image_url_template!r} cannot be filled ({type(err).__name__}: "
                f"{err}); it may use {{article_id}} and {{prefix}} (the id's first 3 digits)"
            ) from err
    if not 1 <= config.top_k <= config.max_k:
        raise ValueError(f"--top-k: {config.top_k} must be between 1 and --max-k ({config.max_k})")
    for name in ("max_instances", "max_total_k", "max_history_items", "max_query_chars", "max_body_bytes"):
        if getattr(config, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')}: must be at least 1, got {getattr(config, name)}")
    if config.swap_drain_s < 0 or config.swap_lease_s <= 0 or config.swap_turn_max_s <= config.swap_drain_s:
        raise ValueError(
            f"--swap-drain-s {config.swap_drain_s} must be at least 0, --swap-lease-s {config.swap_lease_s} "
            f"more than 0 and --swap-turn-max-s {config.swap_turn_max_s} more than --swap-drain-s"
        )
    if config.health_cache_s >= heartbeat_stale_s(config.index_poll_s):
        raise ValueError(
            f"--health-cache-s {config.health_cache_s} must be under {heartbeat_stale_s(config.index_poll_s):g} s: "
            "a replica's heartbeat lapses when no health check ran for that long"
        )
    if config.shed_second_stage_ms < 0:
        raise ValueError(f"--shed-second-stage-ms {config.shed_second_stage_ms} must be at least 0 (0: never)")
    if config.min_in_flight < 1 or config.admission_target_ms < 0:
        raise ValueError(
            f"--min-in-flight {config.min_in_flight} must be at least 1 and --admission-target-ms "
            f"{config.admission_target_ms} at least 0 (0: a fixed limit)"
        )


def _distinct_rows(rows: np.ndarray) -> int:
    """How many articles a purchase list names, as ranking counts the rows it hides (a repeat counts once)."""
    return len(rows) if len(rows) <= ranking.OVERFETCH_LIMIT else len(np.unique(rows[rows >= 0]))


class RecommendationService:
    def __init__(self, config: RetrieverConfig, slot: IndexSlot, tokenizer: Tokenizer | None = None):
        check_settings(config)
        self.config = config
        self.admin_token = read_admin_token(config.admin_token_file) if config.admin_token_file else b""
        if config.admin_token_file and not self.admin_token:  # read once: here, not again in check_settings
            raise ValueError(f"--admin-token-file: {config.admin_token_file} is empty")
        self.slot = slot
        self.tokenizer = tokenizer  # None: the index's own (open_clip) tokenizer, made on load
        self.purchases = purchase_store(
            config.purchases_redis_url,
            config.max_live_customers,
            config.max_live_items,
            config.live_purchase_ttl_days,
            config.purchases_redis_timeout_s,
            config.retry_after_s,
        )
        self.user_cache: LRUCache[np.ndarray] = LRUCache("user_vector", config.vector_cache_size)
        self.query_cache: LRUCache[np.ndarray] = LRUCache("query_vector", config.vector_cache_size)
        # The last tower check's answer; None before this process's first (a worker is pickled before any)
        self._towers_healthy: bool | None = None
        self._first_check: asyncio.Future[bool] | None = None
        self._health_checked_at = float("-inf")
        self._load: LoadSignal | None = None  # an object, not a closure: the service pickles (KServe --workers N)
        self._stage_shed_logged_at, self._stage_shed_since_log = float("-inf"), 0

    def watch_load(self, load: LoadSignal) -> None:
        """What says this process is overloaded (retriever/limits.py, fed each request's service time): its lists
        then skip the second stage (--shed-second-stage-ms)."""
        self._load = load

    def _stages_lists(self, catalog: Catalog) -> bool:
        """Whether customers' and histories' lists take the index's second stage now: it is on and not shed."""
        return bool(self.config.second_stage and catalog.second_stage is not None) and not self._overloaded()

    def _overloaded(self) -> bool:
        return self._load is not None and self._load.overloaded

    def _stage_for(self, catalog: Catalog) -> SecondStage | None:
        """The index's second stage for a customer's or a history's list, unless it is off or shed under load."""
        if not self.config.second_stage or catalog.second_stage is None:
            return None
        if not self._overloaded():
            return catalog.second_stage
        metrics.SECOND_STAGE_SHED.inc()
        # One line per STAGE_SHED_LOG_S while shedding, not one per list (they can be hundreds a second)
        self._stage_shed_since_log += 1
        now = time.monotonic()
        if now - self._stage_shed_logged_at >= STAGE_SHED_LOG_S:
            log.warning(
                "overloaded: lists that skipped the second stage since the last such line: %d (requests slower than "
                "--shed-second-stage-ms for a while)",
                self._stage_shed_since_log,
            )
            self._stage_shed_logged_at, self._stage_shed_since_log = now, 0
        return None

    # -- lifecycle -------------------------------------------------------------------------
    def load(self, triton_wait_s: float = 60.0) -> None:
        """Load the index and its towers (ArtifactError, OSError, ValueError, GpuUnavailable when they
        do not check out), then follow the index root."""
        faiss.omp_set_num_threads(self.config.faiss_threads)
        serving = self.slot.load(triton_wait_s)
        if self.tokenizer is None:
            self.tokenizer = TokenIds(serving.catalog.manifest.clip_model)
        self.slot.start_watching()

    def start_in_worker(self) -> None:
        """What a KServe worker process does after unpickling the loaded service."""
        faiss.omp_set_num_threads(self.config.faiss_threads)  # a fresh process: OpenMP would use every core
        if self.slot.serving is not None:
            self.slot.start_watching()
            self.slot.publish_metrics()  # gauges are per process: the launcher's values are not this worker's
            gc.freeze()  # as after an install: the unpickled index is new to this process's collector

    def serving(self) -> Serving:
        serving = self.slot.serving
        if serving is None:
            raise NotReady("the index is not loaded yet")
        return serving

    async def in_rotation(self) -> dict[str, Any]:
        """The readiness probe's answer: the towers answer and this replica is not out of rotation for an
        index swap (retriever/swap_turns.py); else NotReady saying why."""
        if not await self.healthy():
            raise NotReady(NOT_SERVING)
        if self.slot.out_of_rotation:
            raise NotReady(f"out of rotation: {self.slot.out_of_rotation}")
        return {"ready": True, "index_version": self.serving().catalog.version}

    async def healthy(self) -> bool:
        """True only while the towers really answer: a tiny user-tower inference, cached briefly.

        Triton's own readiness stays green when a python stub has died (every inference then fails),
        so only a real inference tells the truth.
        """
        serving = self.slot.serving
        if serving is None:
            return False
        # Before a process's first answer there is no last answer to give: wait for the check in flight, however long
        # it takes (up to the towers' timeout and retry), and share its outcome, an unexpected error included.
        # Answered "not healthy" instead, a new KServe worker refused the requests that reached it during its first
        # check with 503 ModelNotReady (seen at the start of a fresh `make bench`, --workers 2)
        if self._first_check is not None:
            return await asyncio.shield(self._first_check)
        now = time.monotonic()
        if now - self._health_checked_at < self.config.health_cache_s:
            return bool(self._towers_healthy)
        self._health_checked_at = now
        check = asyncio.ensure_future(self._check_towers(serving))
        if self._towers_healthy is None:
            self._first_check = check  # also keeps the task referenced while its first caller is gone
            check.add_done_callback(self._first_check_done)
        return await asyncio.shield(check)  # a first check outlives a caller that goes away: others wait on it

    def _first_check_done(self, check: asyncio.Future[bool]) -> None:
        if self._first_check is check:
            self._first_check = None

    def __getstate__(self) -> dict[str, Any]:
        # KServe's --workers N pickles the service: a check in flight stays with the launcher's event loop
        return {**self.__dict__, "_first_check": None}

    async def _check_towers(self, serving: Serving) -> bool:
        """A tiny user-tower inference: its answer becomes the cached one (logged when it changes)."""
        await self.slot.close_retired()
        probe = serving.catalog.history_tensors([(np.zeros(1, dtype=np.int64), np.zeros(1, dtype=np.float32))])
        try:
            await serving.towers.user_vectors(*probe)
            healthy = True
        except TritonUnavailable as err:
            healthy = False
            if self._towers_healthy:
                log.error("not ready: the towers do not answer (%s)", err)
        if healthy and not self._towers_healthy:
            log.info("ready: the towers answer%s", "" if self._towers_healthy is None else " again")
        self._towers_healthy = healthy
        self.slot.towers_answered(healthy)
        metrics.TOWERS_HEALTHY.set(1.0 if healthy else 0.0)
        return healthy

    async def reload(self) -> ReloadResult:
        self.serving()
        return await asyncio.to_thread(self.slot.reload)

    async def close(self) -> None:
        self.slot.stop()
        await self.purchases.close()
        if self.slot.serving is not None:
            await self.slot.serving.towers.close()

    # -- recommendations -------------------------------------------------------------------
    async def recommend(self, queries: list[Query], serving: Serving | None = None) -> list[Recommendation]:
        """Vectors for the queries, then each one ranked with its options (twotower.ranking)."""
        serving = serving or self.serving()
        vectors, bought = await self.query_vectors(queries, serving)
        with metrics.STAGE["search"].time():
            # Searches run on the event loop unless the request's queries together score more than
            # INLINE_SEARCH_ROWS: a worker thread's handoff costs more CPU than the loop's stall spares. Served at
            # 10M articles (ivf-pq-fastscan, 100 QPS, one process, ~107k rows scored per search) the retriever took
            # 0.77-0.85 of a core with unfiltered ones inline, 0.86-0.91 in a thread, p99 lower in six alternating
            # pairs (docs/scale.md). Past the budget they go to a worker thread, so that the loop keeps serving
            # other requests: big batches, and at 1M articles and up filtered searches (a mask built on a cache
            # miss: 4-29 ms at 10M) and hybrid text queries.
            rows = self._rows_scored(serving.catalog, queries, bought)
            if rows <= INLINE_SEARCH_ROWS and not self.config.search_in_thread:
                ranked = self._rank(serving.catalog, queries, vectors, bought)
            else:
                ranked = await asyncio.to_thread(self._rank, serving.catalog, queries, vectors, bought)
        return [self._recommendation(serving.catalog, *found) for found in ranked]

    def _rows_scored(self, catalog: Catalog, queries: list[Query], bought: list[Purchases]) -> int:
        """About how many rows ranking the queries touches: a search's each, plus a pass over every row for each
        one that needs a mask (filters, or more purchases to hide than a plain search overfetches) or BM25's scores
        (hybrid text), plus STAGED_LIST_ROWS for each list the second stage re-ranks."""
        passes = sum(
            not query.options.filters.empty
            or (query.hides_bought and _distinct_rows(purchases[0]) > ranking.OVERFETCH_LIMIT)
            or self._hybrid(catalog, query)
            for query, purchases in zip(queries, bought)
        )
        staged = sum(q.kind in PERSONAL_KINDS for q in queries) if self._stages_lists(catalog) else 0
        return catalog.rows_per_search * len(queries) + len(catalog.article_ids) * passes + STAGED_LIST_ROWS * staged

    def _hybrid(self, catalog: Catalog, query: Query) -> bool:
        """With --text-search hybrid, text queries fuse the index's keyword (BM25) results with the dense ones."""
        return query.kind == "query" and self.config.text_search == "hybrid" and catalog.lexical is not None

    def _rank(
        self, catalog: Catalog, queries: list[Query], vectors: np.ndarray, bought: list[Purchases]
    ) -> list[tuple[np.ndarray, np.ndarray, list[str] | None, np.ndarray | None]]:
        """Each query's (similarities, rows, which retriever found each row, the second stage's scores)."""
        # OpenMP's thread count is per thread: a search in asyncio's worker threads would use every core (the
        # count set at load holds for the main thread only). Batched searches there, at 1M ivf-pq-fastscan
        # rows and 4 queries a batch, p99 7.8 ms on 2 threads against 2.8 on one.
        faiss.omp_set_num_threads(self.config.faiss_threads)
        requests = [self._rank_request(catalog, i, query, bought[i]) for i, query in enumerate(queries)]
        hybrid = [i for i, query in enumerate(queries) if self._hybrid(catalog, query)]
        dense = [i for i in range(len(queries)) if i not in hybrid]
        results: list[tuple[np.ndarray, np.ndarray, list[str] | None, np.ndarray | None] | None] = [None] * len(queries)
        for i, found in zip(dense, ranking.rank_lists(catalog, vectors[dense], [requests[i] for i in dense])):
            if found.first_stage is None:
                results[i] = (found.scores, found.rows, None, None)
            else:  # ordered by the stage's purchase probability; the similarity is still the first stage's
                results[i] = (found.first_stage, found.rows, None, found.scores)
        for i in hybrid:
            assert catalog.lexical is not None
            results[i] = (*hybrid_rank(catalog, catalog.lexical, vectors[i], queries[i].value, requests[i]), None)
        return [r for r in results if r is not None]

    def _rank_request(self, catalog: Catalog, slot: int, query: Query, bought: Purchases) -> RankRequest:
        """Customers' and histories' lists rank with the popularity prior and their own purchases again
        (unless excluded), then the index's second stage when it has one; text queries and similar items by
        cosine alone, similar items without the article itself."""
        options = query.options
        allowed = None
        if not options.filters.empty:
            try:
                allowed = catalog.filter_columns.mask(options.filters)
            except FilterError as err:
                raise RequestError(f"instances[{slot}]: {err}") from err
        personal = query.kind in PERSONAL_KINDS
        exclude_bought = query.hides_bought
        return RankRequest(
            query.k,
            prior=catalog.prior_weight_for(exclude_bought) if personal else 0.0,
            boost=catalog.score_head.repeat if personal else RepeatBoost(),
            bought=bought,
            allowed=allowed,
            exclude_bought=exclude_bought,
            max_per_type=options.max_per_product_type,
            fetch_limit=self.config.max_k,
            stage=self._stage_for(catalog) if personal else None,
        )

    async def query_vectors(self, queries: list[Query], serving: Serving) -> tuple[np.ndarray, list[Purchases]]:
        """One vector per query, plus what each query's customer has bought as (rows most recent first,
        ages in days) (for similar_to: the article itself). Known vectors come from caches; the rest from the towers."""
        catalog = serving.catalog
        version = catalog.manifest.model_version
        vectors = np.zeros((len(queries), catalog.manifest.dim), dtype=np.float32)
        bought: list[Purchases] = []
        histories, history_slots, history_keys, texts, text_slots = [], [], [], [], []
        # Posted purchases of every customer asked about, in one round trip (Redis: shared by the replicas).
        posted = await self.purchases.recent([q.value for q in queries if q.kind == "customer_id"])
        for slot, query in enumerate(queries):
            metrics.REQUESTS.labels(query.kind).inc()
            try:
                if query.kind == "similar_to":
                    row = int(catalog.rows_for([query.value])[0])
                    vectors[slot] = catalog.vectors[row]
                    bought.append((np.asarray([row]), np.zeros(1, dtype=np.float32)))
                    continue
                if query.kind == "query":
                    bought.append(NOTHING_BOUGHT)
                    cached = self.query_cache.get((version, query.value))
                    if cached is not None:
                        vectors[slot] = cached
                    else:
                        texts.append(query.value)
                        text_slots.append(slot)
                    continue
                (rows, ages), with_posted = self._history(catalog, query, posted)
            except UnknownIds as err:
                raise RequestError(f"instances[{slot}]: {err.message}") from err
            bought.append((rows, ages))
            if (
                query.kind == "customer_id"
                and self.config.known_customer_vectors
                and not with_posted
                and self.days_since_index(catalog) <= self.config.stored_vector_max_days
            ):
                known = catalog.customer_vector(query.value)  # computed by export: no Triton call
                metrics.CACHE_LOOKUPS.labels("known_customer", "miss" if known is None else "hit").inc()
                if known is not None:
                    vectors[slot] = known
                    continue
            length = catalog.manifest.max_history
            key = (version, rows[:length].tobytes(), np.round(ages[:length], 1).tobytes())
            cached = self.user_cache.get(key)
            if cached is not None:
                vectors[slot] = cached
                continue
            histories.append((rows, ages))
            history_slots.append(slot)
            history_keys.append(key)

        if histories or texts:
            with metrics.STAGE["triton"].time():
                calls = []
                if histories:
                    calls.append(serving.towers.user_vectors(*catalog.history_tensors(histories)))
                if texts:
                    calls.append(self._text_vectors(serving, texts))
                outputs = await asyncio.gather(*calls)
            if histories:
                found = outputs.pop(0)
                vectors[history_slots] = found
                for key, vector in zip(history_keys, found):
                    self.user_cache.put(key, vector)
            if texts:
                found = outputs.pop(0)
                vectors[text_slots] = found
                for text, vector in zip(texts, found):
                    self.query_cache.put((version, text), vector)
        return vectors, bought

    def _history(self, catalog: Catalog, query: Query, posted: dict[str, Posted]) -> tuple[Purchases, bool]:
        """(rows, ages in days) most recent first for a history or customer_id query, and whether
        purchases posted to this service are part of it (the index's stored user vector then is stale)."""
        if query.kind == "history":
            rows = catalog.rows_for(query.value)[::-1]  # requests list oldest first
            ages = np.zeros(len(rows)) if query.ages is None else np.asarray(query.ages)[::-1]
            return (rows, ages.astype(np.float32)), False
        return self._customer_history(catalog, query.value, posted.get(query.value, NOTHING_POSTED))

    def days_since_index(self, catalog: Catalog) -> int:
        """Whole days the index's stored histories have aged since its reference day (the data's latest
        purchase): by the wall clock (UTC), or 0 with history_clock "index" (replaying a past data set)."""
        if self.config.history_clock == "index":
            return 0
        return max(0, int(time.time() // SECONDS_PER_DAY) - catalog.manifest.reference_day)

    def _customer_history(self, catalog: Catalog, customer_id: str, posted: Posted) -> tuple[Purchases, bool]:
        """Purchases posted to this service (most recent first), then the customer's history in the index,
        its ages advanced to today."""
        # An index swapped back to an older version may lack some posted articles: skip those.
        live = [(int(row), age) for row, age in zip(catalog.row_of.rows(posted[0]), posted[1]) if row >= 0]
        try:
            rows, ages = catalog.customer_history(customer_id)
            ages = ages + np.float32(self.days_since_index(catalog))
        except UnknownIds:
            if not live:
                raise
            rows, ages = np.empty(0, dtype=np.int64), np.empty(0, dtype=np.float32)
        if live:
            rows = np.concatenate([np.asarray([r for r, _ in live], dtype=np.int64), rows])
            ages = np.concatenate([np.asarray([a for _, a in live], dtype=np.float32), ages])
        return (rows, ages), bool(live)

    async def _text_vectors(self, serving: Serving, texts: list[str]) -> np.ndarray:
        tokenizer = self.tokenizer
        assert tokenizer is not None, "load() first"
        started = time.perf_counter()
        if sum(map(len, texts)) <= INLINE_TOKENIZE_CHARS:
            input_ids = tokenizer(texts)
        else:
            input_ids = await asyncio.to_thread(tokenizer, texts)
        metrics.STAGE["tokenize"].observe(time.perf_counter() - started)
        return await serving.towers.query_vectors(input_ids)

    def _recommendation(
        self,
        catalog: Catalog,
        similarities: np.ndarray,
        rows: np.ndarray,
        sources: list[str] | None = None,
        scores: np.ndarray | None = None,
    ) -> Recommendation:
        """`scores`: the second stage's, for a list it re-ordered; else the score head's of the similarities."""
        article_ids = catalog.article_ids.take(rows)
        return Recommendation(
            article_ids=article_ids,
            similarities=similarities.tolist(),
            scores=(catalog.score_head(similarities) if scores is None else scores).tolist(),
            metadata=self.article_metadata(catalog, rows, article_ids),
            sources=sources,
        )

    def article_metadata(
        self, catalog: Catalog, rows: Sequence[int] | np.ndarray, article_ids: list[str]
    ) -> list[dict[str, str]]:
        """Metadata shown with each result (article_id is returned beside it), plus the image URL when configured."""
        records = catalog.metadata(rows)
        if self.config.image_url_template:
            for metadata, article_id in zip(records, article_ids):
                metadata["image_url"] = image_url(self.config.image_url_template, article_id)
        return records

    # -- what the shop pages read and write ------------------------------------------------
    def _article_row(self, catalog: Catalog, article_id: str, field: str = "article_id") -> int:
        try:
            return int(catalog.rows_for([article_id])[0])
        except UnknownIds as err:
            raise RequestError(f"{field}: {err.message}") from err

    def article(self, article_id: str) -> dict[str, Any]:
        catalog = self.serving().catalog
        row = self._article_row(catalog, article_id)
        return {
            "article_id": article_id,
            "available": not bool(catalog.excluded[row]),
            "index_version": catalog.version,
            **self.article_metadata(catalog, [row], [article_id])[0],
        }

    def article_vector(self, article_id: str) -> dict[str, Any]:
        catalog = self.serving().catalog
        row = self._article_row(catalog, article_id)
        return {
            "article_id": article_id,
            "model_version": catalog.manifest.model_version,
            "vector": catalog.vectors[row].tolist(),
        }

    def customers(self, limit: int) -> dict[str, Any]:
        catalog = self.serving().catalog
        return {"customer_ids": list(islice(catalog.customer_row, limit)), "count": len(catalog.customer_row)}

    async def customer_history(self, customer_id: str) -> dict[str, Any]:
        """What the service knows a customer bought: posted purchases first, then the index's history."""
        catalog = self.serving().catalog
        posted = (await self.purchases.recent([customer_id])).get(customer_id, NOTHING_POSTED)
        try:
            (rows, ages), _ = self._customer_history(catalog, customer_id, posted)
        except UnknownIds as err:
            raise RequestError(f"customer_id: {err.message}") from err
        article_ids = catalog.article_ids.take(rows)
        items = [
            {"article_id": article_id, "age_days": round(float(a), 2), **metadata}
            for article_id, a, metadata in zip(article_ids, ages, self.article_metadata(catalog, rows, article_ids))
        ]
        return {"customer_id": customer_id, "items": items}

    async def customer_vector(self, customer_id: str) -> dict[str, Any]:
        serving = self.serving()
        vectors, _ = await self.query_vectors([Query("customer_id", customer_id, 1)], serving)
        return {
            "customer_id": customer_id,
            "model_version": serving.catalog.manifest.model_version,
            "vector": vectors[0].tolist(),
        }

    async def add_purchases(self, customer_id: str, article_ids: list[str]) -> dict[str, Any]:
        """Record purchases (oldest first): they count from the customer's next request."""
        catalog = self.serving().catalog
        try:
            catalog.rows_for(article_ids)  # unknown articles are refused, nothing is stored
        except UnknownIds as err:
            raise RequestError(f"article_ids: {err.message}") from err
        count = await self.purchases.add(customer_id, article_ids)
        return {"customer_id": customer_id, "recorded": len(article_ids), "live_purchases": count}

    def filter_values(self) -> dict[str, list[str]]:
        """The values each category filter accepts in the served index (for building a filter UI)."""
        columns = self.serving().catalog.filter_columns
        return {field: columns.values(column) for field, column in CATEGORY_FILTERS.items() if columns.has(column)}

    def index_info(self) -> dict[str, Any]:
        catalog = self.serving().catalog
        manifest = catalog.manifest
        return {
            "index_version": catalog.version,
            "model_version": manifest.model_version,
            "items": len(catalog.article_ids),
            "excluded": catalog.n_excluded,
            "dim": manifest.dim,
            "parent_version": manifest.parent_version,
        }
