"""The KServe model: one lifecycle class; parsing lives in protocol.py, Triton calls in towers.py.

preprocess   body (v1 dict / v2 InferRequest) -> ParsedRequest      (400 on bad input)
predict      ParsedRequest -> vectors from Triton -> FAISS top-k     (503 when Triton is gone)
postprocess  results -> v1 JSON or v2 InferResponse

The index version and the towers that match it are held together in one `Serving` object that is
replaced whole on a hot reload: a request reads it once and finishes on the pair it started with.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import logging
import threading
import time
from pathlib import Path
from typing import Any

import faiss
import numpy as np
from kserve import InferRequest, Model
from kserve.errors import InvalidInput, ModelNotReady

from retriever import metrics
from retriever.cache import LRUCache
from retriever.catalog import NOTHING_BOUGHT, Catalog, Purchases, UnknownIds
from retriever.filters import FilterError, cap_per_type
from retriever.gpu_search import GpuUnavailable
from retriever.kserve_app import adjust_app
from retriever.protocol import Query, Recommendation, parse_v1, parse_v2, v1_response, v2_response
from retriever.purchases import LivePurchases
from retriever.towers import TowerClient, Towers, TritonUnavailable
from twotower import artifacts
from twotower.artifacts import ArtifactError
from twotower.config import RetrieverConfig

log = logging.getLogger("retriever")

DEFAULT_MODEL_NAME = "recommender"  # endpoint path: /v1/models/recommender:predict
REFUSED_RETRY_S = 5.0  # a refused index version is tried again this often while CURRENT names it


@dataclasses.dataclass
class ParsedRequest:
    queries: list[Query]
    v2_request: InferRequest | None  # None for v1


@dataclasses.dataclass(frozen=True)
class Serving:
    """An index version and the towers serving its model version: swapped as one."""

    catalog: Catalog
    towers: Towers


@dataclasses.dataclass
class ReloadResult:
    status: str  # swapped | unchanged | refused
    index_version: str
    message: str = ""


@dataclasses.dataclass
class Results:
    request: ParsedRequest
    recommendations: list[Recommendation]


def _unfiltered(query: Query) -> bool:
    """Searched with the plain index (similar_to always hides the article itself)."""
    return query.options.plain and query.kind != "similar_to"


class Recommender(Model):
    def __init__(self, name: str, config: RetrieverConfig, triton_url: str = ""):
        super().__init__(name)
        self.config = config
        self.triton_url = triton_url
        self.serving: Serving | None = None
        self.tokenizer = None
        self.local_repository: Path | None = None
        self.purchases = LivePurchases(config.max_live_customers, config.max_live_items)
        self.user_cache: LRUCache[np.ndarray] = LRUCache("user_vector", config.vector_cache_size)
        self.query_cache: LRUCache[np.ndarray] = LRUCache("query_vector", config.vector_cache_size)
        self._towers_healthy = False
        self._health_checked_at = float("-inf")
        self._reload_lock = threading.Lock()
        self._retired: list[tuple[float, Towers]] = []  # old tower clients, closed once requests drained
        self._watcher: threading.Thread | None = None
        self._stop_watching = threading.Event()

    @property
    def catalog(self) -> Catalog | None:
        return self.serving.catalog if self.serving else None

    @property
    def towers(self) -> Towers | None:
        return self.serving.towers if self.serving else None

    # -- lifecycle -------------------------------------------------------------------------
    def load(self, triton_wait_s: float = 60.0, local_repository: Path | None = None) -> bool:
        """Load and verify the index, then check Triton serves the matching tower version.

        With `local_repository`, the towers run in this process from that model repository instead
        of Triton: the same request path with no network, used as the benchmark's baseline.
        """
        faiss.omp_set_num_threads(self.config.faiss_threads)
        self.local_repository = local_repository
        catalog = self._open_catalog(self.config.index_dir)
        from twotower.model.clip_text import get_tokenizer  # imports torch: only when serving

        self.tokenizer = get_tokenizer(catalog.manifest.clip_model)
        self._install(Serving(catalog, self._towers_for(catalog, triton_wait_s)))
        self.ready = True
        self._start_watcher()
        return self.ready

    def _start_watcher(self) -> None:
        if self.config.index_poll_s > 0 and (Path(self.config.index_dir) / artifacts.CURRENT_FILE).is_file():
            self._watcher = threading.Thread(target=self._watch_index, name="index-watch", daemon=True)
            self._watcher.start()

    # KServe's --workers N pickles the loaded model into each worker process: locks and the watcher
    # thread cannot travel, so each worker makes its own (and watches the index root itself).
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        for name in ("_reload_lock", "_stop_watching", "_watcher"):
            state.pop(name, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        faiss.omp_set_num_threads(self.config.faiss_threads)  # a fresh process: OpenMP would use every core
        self._reload_lock = threading.Lock()
        self._stop_watching = threading.Event()
        self._watcher = None
        if self.serving is not None:
            self._start_watcher()
            adjust_app(self, self.config.kserve_timing)  # a worker imports KServe's app afresh, then builds it
            self._publish_index_metrics()  # gauges are per process: the launcher's values are not this worker's
            gc.freeze()  # as after an install: the unpickled index is new to this process's collector

    def _open_catalog(self, index_dir: Path | str) -> Catalog:
        return Catalog(index_dir, self.config.hnsw_ef_search, self.config.ivf_nprobe, self.config.exact_search_limit,
                       self.config.faiss_gpu, self.config.popularity_weight)

    def _towers_for(self, catalog: Catalog, triton_wait_s: float) -> Towers:
        """Towers for this index's model version, proven to be served (raises ArtifactError otherwise)."""
        if self.local_repository is not None:
            from retriever.towers import LocalTowers

            return LocalTowers(self.local_repository, catalog.manifest)
        loop = asyncio.new_event_loop()  # not asyncio.run: that would unset the loop KServe starts on
        try:
            loop.run_until_complete(self._wait_for_towers(catalog, triton_wait_s))
        finally:
            loop.close()
        return TowerClient(self.triton_url, catalog.manifest, self.config.triton_timeout_s, self.config.triton_retries)

    def _install(self, serving: Serving) -> None:
        previous = self.serving
        self.serving = serving  # one reference assignment: requests see the old pair or the new one
        # The loaded index is ~0.5M long-lived Python objects (metadata columns, id maps): a full
        # collection walking them stalls the event loop ~0.27 s, and near capacity such a stall takes
        # seconds of queueing to drain. Frozen objects are skipped by the collector (a replaced
        # version is still freed by reference counting).
        gc.freeze()
        self._publish_index_metrics(previous)

    def _publish_index_metrics(self, previous: Serving | None = None) -> None:
        assert self.serving is not None
        catalog = self.serving.catalog
        if previous is not None:  # one series each: the version being served
            old = str(previous.catalog.manifest.model_version)
            # Zeroed before dropped: with several workers the summed /metrics keeps a series' last value.
            metrics.INDEX_VERSION.labels(previous.catalog.version, old).set(0)
            metrics.INDEX_INFO.labels(old).set(0)
            metrics.INDEX_VERSION.clear()
            metrics.INDEX_INFO.clear()
        metrics.INDEX_INFO.labels(str(catalog.manifest.model_version)).set(len(catalog.article_ids))
        metrics.INDEX_VERSION.labels(catalog.version, str(catalog.manifest.model_version)).set(1)

    async def _wait_for_towers(self, catalog: Catalog, timeout_s: float) -> None:
        manifest = catalog.manifest
        client = TowerClient(self.triton_url, manifest, self.config.triton_timeout_s, retries=0)
        deadline = time.monotonic() + timeout_s
        try:
            while True:
                try:
                    await client.verify_models()
                    log.info("Triton at %s serves %s/%s version %d matching index %s", self.triton_url,
                             manifest.item_model, manifest.user_model, manifest.model_version, catalog.version)
                    return
                except TritonUnavailable as err:
                    if time.monotonic() > deadline:
                        raise ArtifactError(f"giving up after {timeout_s:.0f}s: {err}" if timeout_s > 0 else str(err)) from err
                    log.info("waiting for Triton: %s", err)
                    await asyncio.sleep(1.0)
        finally:
            await client.close()

    # -- hot reload ------------------------------------------------------------------------
    def reload_index(self) -> ReloadResult:
        """Load the index root's CURRENT version and swap it in if it checks out.

        Blocking (run it in a thread). A version that is corrupt, or whose model version Triton does
        not serve, or whose dimension/metric differ, is refused: the old one keeps serving.
        """
        with self._reload_lock:
            current = self.serving
            assert current is not None, "load() first"
            try:
                target = artifacts.resolve_index_dir(self.config.index_dir)
                if current.catalog.index_dir.resolve() == target.resolve():
                    return ReloadResult("unchanged", current.catalog.version)
                catalog = self._open_catalog(target)
                self._check_compatible(current.catalog, catalog)
                if catalog.manifest.model_version == current.catalog.manifest.model_version:
                    towers = current.towers  # same towers: only the catalogue changed
                else:
                    towers = self._towers_for(catalog, triton_wait_s=0.0)
                    self._retired.append((time.monotonic(), current.towers))
            except (ArtifactError, OSError, ValueError, GpuUnavailable) as err:
                metrics.INDEX_RELOADS.labels("refused").inc()
                log.error("index reload refused, still serving %s: %s", current.catalog.version, err)
                return ReloadResult("refused", current.catalog.version, str(err))
            self._install(Serving(catalog, towers))
            metrics.INDEX_RELOADS.labels("swapped").inc()
            log.info("index swapped: %s -> %s (%d items, model version %d)", current.catalog.version,
                     catalog.version, len(catalog.article_ids), catalog.manifest.model_version)
            return ReloadResult("swapped", catalog.version)

    @staticmethod
    def _check_compatible(old: Catalog, new: Catalog) -> None:
        a, b = old.manifest, new.manifest
        for field in ("dim", "metric", "max_history", "context_length", "clip_model"):
            if getattr(a, field) != getattr(b, field):
                raise ArtifactError(f"{new.index_dir}: {field} {getattr(b, field)!r} differs from the served "
                                    f"index's {getattr(a, field)!r}; restart the retriever for such a change")

    def _watch_index(self) -> None:
        """Poll CURRENT; swap when it names a new version. A refused version is retried every
        REFUSED_RETRY_S (its towers may still be loading in Triton) until CURRENT changes again."""
        pointer = Path(self.config.index_dir) / artifacts.CURRENT_FILE
        seen, retry_at = None, 0.0
        while not self._stop_watching.wait(self.config.index_poll_s):
            try:
                name = pointer.read_text().strip()
            except OSError as err:
                log.warning("index watch: cannot read %s: %s", pointer, err)
                continue
            if name == seen and time.monotonic() < retry_at:
                continue
            seen = name
            result = self.reload_index()
            retry_at = time.monotonic() + REFUSED_RETRY_S if result.status == "refused" else float("inf")

    async def _close_retired(self) -> None:
        """Close replaced tower clients once requests that started on them have long finished."""
        grace = 4 * self.config.triton_timeout_s * (self.config.triton_retries + 1)
        while self._retired and time.monotonic() - self._retired[0][0] > grace:
            _, towers = self._retired.pop(0)
            await towers.close()

    async def healthy(self) -> bool:
        """Ready only while the towers really answer: a tiny user-tower inference, cached briefly.

        Triton's own readiness stays green when a python stub has died (every inference then fails),
        so only a real inference tells the truth. KServe asks this on every request and probe.
        """
        serving = self.serving
        if not self.ready or serving is None:
            return False
        now = time.monotonic()
        if now - self._health_checked_at < self.config.health_cache_s:
            return self._towers_healthy
        self._health_checked_at = now
        await self._close_retired()
        length, dim = serving.catalog.manifest.max_history, serving.catalog.manifest.dim
        mask = np.zeros((1, length), dtype=np.float32)
        mask[0, 0] = 1.0
        try:
            await serving.towers.user_vectors(np.zeros((1, length, dim), dtype=np.float32), mask, np.zeros_like(mask))
            healthy = True
        except TritonUnavailable as err:
            healthy = False
            if self._towers_healthy:
                log.error("not ready: the towers do not answer (%s)", err)
        if healthy and not self._towers_healthy:
            log.info("ready: the towers answer again")
        self._towers_healthy = healthy
        metrics.TOWERS_HEALTHY.set(1.0 if healthy else 0.0)
        return healthy

    # -- request path ----------------------------------------------------------------------
    async def __call__(self, body: Any, headers: dict[str, str] | None = None, *args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return await super().__call__(body, headers, *args, **kwargs)
        except InvalidInput:
            metrics.ERRORS.labels("invalid_input").inc()
            raise
        except ModelNotReady:
            metrics.ERRORS.labels("triton_unavailable").inc()
            raise
        except Exception:
            metrics.ERRORS.labels("internal").inc()
            raise
        finally:
            metrics.STAGE["total"].observe(time.perf_counter() - started)

    def validate(self, payload: Any) -> Any:
        return payload  # preprocess has already validated everything

    async def preprocess(self, payload: Any, headers: dict[str, str] | None = None) -> ParsedRequest:
        with metrics.STAGE["parse"].time():
            if isinstance(payload, InferRequest):
                return ParsedRequest(parse_v2(payload, self.config), payload)
            return ParsedRequest(parse_v1(payload, self.config), None)

    async def predict(self, payload: ParsedRequest, headers: dict[str, str] | None = None, *args: Any) -> Results:
        return Results(payload, await self.recommend(payload.queries))

    async def recommend(self, queries: list[Query], serving: Serving | None = None) -> list[Recommendation]:
        """Vectors for the queries, then the top-k search with each query's options."""
        serving = serving or self.serving
        assert serving is not None
        vectors, bought = await self.query_vectors(queries, serving)
        with metrics.STAGE["search"].time():
            # An unfiltered search takes ~0.3 ms: cheaper on the event loop than a thread handoff. Filtered
            # ones may scan tens of thousands of rows and go to a worker thread.
            if not self.config.search_in_thread and all(_unfiltered(q) for q in queries):
                return self._search(serving.catalog, queries, vectors, bought)
            return await asyncio.to_thread(self._search, serving.catalog, queries, vectors, bought)

    async def query_vectors(self, queries: list[Query], serving: Serving) -> tuple[np.ndarray, list[Purchases]]:
        """One vector per query, plus what each query's customer has bought as (rows most recent first,
        ages in days) (for similar_to: the article itself). Known vectors come from caches; the rest from the towers."""
        catalog = serving.catalog
        version = catalog.manifest.model_version
        vectors = np.zeros((len(queries), catalog.manifest.dim), dtype=np.float32)
        bought: list[Purchases] = []
        histories, history_slots, history_keys, texts, text_slots = [], [], [], [], []
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
                (rows, ages), posted = self._history(catalog, query)
            except UnknownIds as err:
                raise InvalidInput(f"instances[{slot}]: {err.message}") from err
            bought.append((rows, ages))
            if query.kind == "customer_id" and self.config.known_customer_vectors and not posted:
                known = catalog.customer_vector(query.value)  # computed by export: no Triton call
                metrics.CACHE_LOOKUPS.labels("known_customer", "miss" if known is None else "hit").inc()
                if known is not None:
                    vectors[slot] = known
                    continue
            key = (version, rows[: catalog.manifest.max_history].tobytes(), np.round(ages[: catalog.manifest.max_history], 1).tobytes())
            cached = self.user_cache.get(key)
            if cached is not None:
                vectors[slot] = cached
                continue
            histories.append((rows, ages))
            history_slots.append(slot)
            history_keys.append(key)

        if histories or texts:
            try:
                with metrics.STAGE["triton"].time():
                    calls = []
                    if histories:
                        calls.append(serving.towers.user_vectors(*catalog.history_tensors(histories)))
                    if texts:
                        calls.append(self._text_vectors(serving, texts))
                    outputs = await asyncio.gather(*calls)
            except TritonUnavailable as err:
                raise ModelNotReady(self.name, f"Triton is unavailable: {err}") from err
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

    def _history(self, catalog: Catalog, query: Query) -> tuple[Purchases, bool]:
        """(rows, ages in days) most recent first for a history or customer_id query, and whether
        purchases posted to this service are part of it (the index's stored user vector then is stale)."""
        if query.kind == "history":
            rows = catalog.rows_for(query.value)[::-1]  # requests list oldest first
            return (rows, np.zeros(len(rows), dtype=np.float32)), False
        return self._customer_history(catalog, query.value)

    def customer_history(self, catalog: Catalog, customer_id: str) -> Purchases:
        """Purchases posted to this service (most recent first), then the customer's history in the index."""
        return self._customer_history(catalog, customer_id)[0]

    def _customer_history(self, catalog: Catalog, customer_id: str) -> tuple[Purchases, bool]:
        # An index swapped back to an older version may lack some posted articles: skip those.
        live = [(catalog.row_of[a], age) for a, age in zip(*self.purchases.recent(customer_id)) if a in catalog.row_of]
        try:
            rows, ages = catalog.customer_history(customer_id)
        except UnknownIds:
            if not live:
                raise
            rows, ages = np.empty(0, dtype=np.int64), np.empty(0, dtype=np.float32)
        if live:
            rows = np.concatenate([np.asarray([r for r, _ in live], dtype=np.int64), rows])
            ages = np.concatenate([np.asarray([a for _, a in live], dtype=np.float32), ages])
        return (rows, ages), bool(live)

    async def _text_vectors(self, serving: Serving, texts: list[str]) -> np.ndarray:
        assert self.tokenizer is not None
        started = time.perf_counter()
        input_ids = await asyncio.to_thread(lambda: self.tokenizer(texts).numpy().astype(np.int64))
        metrics.STAGE["tokenize"].observe(time.perf_counter() - started)
        return await serving.towers.query_vectors(input_ids)

    def _search(self, catalog: Catalog, queries: list[Query], vectors: np.ndarray, bought: list[Purchases]
                ) -> list[Recommendation]:
        results: list[Recommendation | None] = [None] * len(queries)
        # A customer's own earlier purchases may come back (boosted, twotower.repeats) unless excluded.
        personal = [q.kind in ("customer_id", "history") for q in queries]
        repeats = [personal[i] and not q.options.exclude_purchased for i, q in enumerate(queries)]
        # Customers' queries rank with the popularity prior (twotower.popularity); text and similar-item ones by cosine.
        priors = np.asarray([catalog.prior_weight if p else 0.0 for p in personal], dtype=np.float32)
        plain = [i for i, q in enumerate(queries) if _unfiltered(q)]
        if plain:
            k = max(queries[i].k for i in plain)
            similarities, rows = catalog.search(vectors[plain], k, priors[plain])
            for j, i in enumerate(plain):
                found = similarities[j, : queries[i].k], rows[j, : queries[i].k]
                if repeats[i]:
                    found = catalog.with_repeats(vectors[i], *found, bought[i], queries[i].k, prior=priors[i])
                results[i] = self._recommendation(catalog, *found)
        for i, query in enumerate(queries):
            if results[i] is not None:
                continue
            options = query.options
            try:
                allowed = catalog.filter_columns.mask(options.filters)
            except FilterError as err:
                raise InvalidInput(f"instances[{i}]: {err}") from err
            if options.exclude_purchased or query.kind == "similar_to":
                allowed[bought[i][0]] = False
            # A diversity cap drops results: fetch more so k usually remain.
            fetch = query.k if options.max_per_product_type is None else min(self.config.max_k, 5 * query.k)
            similarities, rows = catalog.search_masked(vectors[i], fetch, allowed, priors[i])
            if repeats[i]:
                similarities, rows = catalog.with_repeats(vectors[i], similarities, rows, bought[i], fetch, allowed,
                                                          priors[i])
            if options.max_per_product_type is not None:
                rows, similarities = cap_per_type(rows, similarities, catalog.filter_columns.product_type,
                                                  options.max_per_product_type, query.k)
            results[i] = self._recommendation(catalog, similarities, rows)
        return [r for r in results if r is not None]

    def _recommendation(self, catalog: Catalog, similarities: np.ndarray, rows: np.ndarray) -> Recommendation:
        keep = rows >= 0
        rows, similarities = rows[keep].tolist(), similarities[keep]
        return Recommendation(
            article_ids=[catalog.article_ids[r] for r in rows],
            similarities=similarities.tolist(),
            scores=catalog.score_head(similarities).tolist(),
            metadata=[self.article_metadata(catalog, r) for r in rows],
        )

    def article_metadata(self, catalog: Catalog, row: int) -> dict[str, str]:
        """Metadata shown with a result (article_id is returned beside it), plus the image URL when configured."""
        metadata = catalog.metadata(row)
        if self.config.image_url_template:
            article_id = catalog.article_ids[row]
            metadata["image_url"] = self.config.image_url_template.format(article_id=article_id, prefix=article_id[:3])
        return metadata

    async def postprocess(self, result: Results, headers: dict[str, str] | None = None, *args: Any) -> Any:
        request = result.request
        if request.v2_request is not None:
            return v2_response(self.name, request.v2_request, result.recommendations)
        return v1_response(request.queries, result.recommendations)

    def stop(self) -> None:
        self._stop_watching.set()
        if self.towers is not None:
            try:
                asyncio.get_running_loop().create_task(self.towers.close())
            except RuntimeError:
                pass
