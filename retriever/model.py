"""The KServe model: one lifecycle class; parsing lives in protocol.py, Triton calls in towers.py.

preprocess   body (v1 dict / v2 InferRequest) -> ParsedRequest      (400 on bad input)
predict      ParsedRequest -> vectors from Triton -> FAISS top-k     (503 when Triton is gone)
postprocess  results -> v1 JSON or v2 InferResponse
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

import faiss
import numpy as np
from kserve import InferRequest, Model
from kserve.errors import InvalidInput, ModelNotReady

from retriever import metrics
from retriever.catalog import Catalog, UnknownIds
from retriever.protocol import Query, Recommendation, parse_v1, parse_v2, v1_response, v2_response
from retriever.towers import TowerClient, Towers, TritonUnavailable
from twotower.artifacts import ArtifactError
from twotower.config import RetrieverConfig

log = logging.getLogger("retriever")

DEFAULT_MODEL_NAME = "recommender"  # endpoint path: /v1/models/recommender:predict


@dataclasses.dataclass
class ParsedRequest:
    queries: list[Query]
    v2_request: InferRequest | None  # None for v1


@dataclasses.dataclass
class Results:
    request: ParsedRequest
    recommendations: list[Recommendation]


class Recommender(Model):
    def __init__(self, name: str, config: RetrieverConfig, triton_url: str = ""):
        super().__init__(name)
        self.config = config
        self.triton_url = triton_url
        self.catalog: Catalog | None = None
        self.towers: Towers | None = None
        self.tokenizer = None
        self._towers_healthy = False
        self._health_checked_at = float("-inf")

    # -- lifecycle -------------------------------------------------------------------------
    def load(self, triton_wait_s: float = 60.0, local_repository: Path | None = None) -> bool:
        """Load and verify the index, then check Triton serves the matching tower version.

        With `local_repository`, the towers run in this process from that model repository instead
        of Triton: the same request path with no network, used as the benchmark's baseline.
        """
        faiss.omp_set_num_threads(self.config.faiss_threads)
        self.catalog = Catalog(self.config.index_dir, self.config.hnsw_ef_search, self.config.ivf_nprobe)
        from twotower.model.clip_text import get_tokenizer  # imports torch: only when serving

        self.tokenizer = get_tokenizer(self.catalog.manifest.clip_model)
        if local_repository is not None:
            from retriever.towers import LocalTowers

            self.towers = LocalTowers(local_repository, self.catalog.manifest)
        else:
            loop = asyncio.new_event_loop()  # not asyncio.run: that would unset the loop KServe starts on
            try:
                loop.run_until_complete(self._wait_for_towers(triton_wait_s))
            finally:
                loop.close()
            self.towers = TowerClient(self.triton_url, self.catalog.manifest, self.config.triton_timeout_s,
                                      self.config.triton_retries)
        metrics.INDEX_INFO.labels(str(self.catalog.manifest.model_version)).set(len(self.catalog.article_ids))
        self.ready = True
        return self.ready

    async def _wait_for_towers(self, timeout_s: float) -> None:
        assert self.catalog is not None
        client = TowerClient(self.triton_url, self.catalog.manifest, self.config.triton_timeout_s, retries=0)
        deadline = time.monotonic() + timeout_s
        try:
            while True:
                try:
                    await client.verify_models()
                    log.info("Triton at %s serves %s/%s version %d matching the index", self.triton_url,
                             self.catalog.manifest.item_model, self.catalog.manifest.user_model,
                             self.catalog.manifest.model_version)
                    return
                except TritonUnavailable as err:
                    if time.monotonic() > deadline:
                        raise ArtifactError(f"giving up after {timeout_s:.0f}s: {err}") from err
                    log.info("waiting for Triton: %s", err)
                    await asyncio.sleep(1.0)
        finally:
            await client.close()

    async def healthy(self) -> bool:
        """Ready only while the towers really answer: a tiny user-tower inference, cached briefly.

        Triton's own readiness stays green when a python stub has died (every inference then fails),
        so only a real inference tells the truth. KServe asks this on every request and probe.
        """
        if not self.ready or self.towers is None or self.catalog is None:
            return False
        now = time.monotonic()
        if now - self._health_checked_at < self.config.health_cache_s:
            return self._towers_healthy
        self._health_checked_at = now
        length, dim = self.catalog.manifest.max_history, self.catalog.manifest.dim
        mask = np.zeros((1, length), dtype=np.float32)
        mask[0, 0] = 1.0
        try:
            await self.towers.user_vectors(np.zeros((1, length, dim), dtype=np.float32), mask, np.zeros_like(mask))
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
            metrics.STAGE_SECONDS.labels("total").observe(time.perf_counter() - started)

    def validate(self, payload: Any) -> Any:
        return payload  # preprocess has already validated everything

    async def preprocess(self, payload: Any, headers: dict[str, str] | None = None) -> ParsedRequest:
        with metrics.STAGE_SECONDS.labels("parse").time():
            if isinstance(payload, InferRequest):
                return ParsedRequest(parse_v2(payload, self.config), payload)
            return ParsedRequest(parse_v1(payload, self.config), None)

    async def predict(self, payload: ParsedRequest, headers: dict[str, str] | None = None, *args: Any) -> Results:
        assert self.catalog is not None and self.towers is not None
        queries = payload.queries
        vectors = np.zeros((len(queries), self.catalog.manifest.dim), dtype=np.float32)
        histories, history_slots, texts, text_slots = [], [], [], []
        for slot, query in enumerate(queries):
            metrics.REQUESTS.labels(query.kind).inc()
            try:
                if query.kind == "customer_id":
                    histories.append(self.catalog.customer_history(query.value))
                elif query.kind == "history":
                    rows = self.catalog.rows_for(query.value)[::-1]  # requests list oldest first
                    histories.append((rows, np.zeros(len(rows), dtype=np.float32)))
                else:
                    texts.append(query.value)
                    text_slots.append(slot)
                    continue
            except UnknownIds as err:
                raise InvalidInput(f"instances[{slot}]: {err.message}") from err
            history_slots.append(slot)

        try:
            with metrics.STAGE_SECONDS.labels("triton").time():
                calls = []
                if histories:
                    calls.append(self.towers.user_vectors(*self.catalog.history_tensors(histories)))
                if texts:
                    calls.append(self._query_vectors(texts))
                outputs = await asyncio.gather(*calls)
        except TritonUnavailable as err:
            raise ModelNotReady(self.name, f"Triton is unavailable: {err}") from err
        if histories:
            vectors[history_slots] = outputs.pop(0)
        if texts:
            vectors[text_slots] = outputs.pop(0)

        k = max(query.k for query in queries)
        with metrics.STAGE_SECONDS.labels("search").time():
            similarities, rows = await asyncio.to_thread(self.catalog.search, vectors, k)
        return Results(payload, [self._recommendation(similarities[i, : q.k], rows[i, : q.k]) for i, q in enumerate(queries)])

    async def _query_vectors(self, texts: list[str]) -> np.ndarray:
        assert self.tokenizer is not None and self.towers is not None
        started = time.perf_counter()
        input_ids = await asyncio.to_thread(lambda: self.tokenizer(texts).numpy().astype(np.int64))
        metrics.STAGE_SECONDS.labels("tokenize").observe(time.perf_counter() - started)
        return await self.towers.query_vectors(input_ids)

    def _recommendation(self, similarities: np.ndarray, rows: np.ndarray) -> Recommendation:
        assert self.catalog is not None
        keep = rows >= 0
        rows, similarities = rows[keep], similarities[keep]
        scores = self.catalog.score_head(similarities)
        return Recommendation(
            article_ids=[self.catalog.article_ids[r] for r in rows],
            similarities=[float(s) for s in similarities],
            scores=[float(s) for s in scores],
            metadata=[{k: v for k, v in self.catalog.metadata(r).items() if k != "article_id"} for r in rows],
        )

    async def postprocess(self, result: Results, headers: dict[str, str] | None = None, *args: Any) -> Any:
        request = result.request
        if request.v2_request is not None:
            return v2_response(self.name, request.v2_request, result.recommendations)
        return v1_response(request.queries, result.recommendations)

    def stop(self) -> None:
        if self.towers is not None:
            try:
                asyncio.get_running_loop().create_task(self.towers.close())
            except RuntimeError:
                pass
