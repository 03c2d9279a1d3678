"""The recommendation service in-process, with stand-in towers: no Triton, no KServe, no HTTP server.

The ranking rules (filters, exclude_purchased, the diversity cap, repeats, the popularity prior), hot
index swaps, and the error table are checked here in seconds; tests/test_integration.py checks the
same paths through the real servers.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import pickle
import time
from pathlib import Path
from typing import Callable

import faiss
import httpx
import numpy as np
import pytest
from fastapi import FastAPI

from evaluation.two_tower import CaseUsers, TwoTower
from export.catalogue_index import build_faiss_index, write_index_dir
from retriever import heap
from retriever import service as service_module
from retriever.errors import RequestError
from retriever.index_slot import IndexSlot
from retriever.queries import Query, QueryOptions
from retriever.server import install_routes
from retriever.service import RecommendationService
from serving.catalog import Catalog
from serving.filters import Filters
from serving.lexical import LexicalIndex
from twotower import artifacts, fitting, ranking
from twotower.config import RetrieverConfig
from twotower.popularity import PopularityPrior
from twotower.ranking import NOTHING_BOUGHT
from twotower.repeats import RepeatBoost

N, DIM, HISTORY = 120, 8, 4
COLOURS, TYPES = ["Black", "White", "Red"], ["Dress", "Shirt", "Shoe", "Bag"]
BOOST = RepeatBoost(bonus=1.0, slope=0.1, sibling_bonus=0.3, sibling_slope=0.0)
PRIOR = 0.05
DISCOVERY_PRIOR = 0.2  # lists without the customer's own articles


def write_shop_index(directory: Path, seed: int = 0, dim: int = DIM, lexical: bool = False) -> np.ndarray:
    """An index version of N random articles (colour, product type, 2 colours per product), three known
    customers, a repeat boost and a popularity prior; with `lexical`, a BM25 index over "<colour> <type>"
    captions. Returns the vectors."""
    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((N, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    bias = np.log1p(rng.integers(0, 50, N)).astype(np.float32)
    metadata = {
        "article_id": [f"{i:010d}" for i in range(N)],
        "product_code": [str(i // 2) for i in range(N)],
        "colour_group_name": [COLOURS[i % 3] for i in range(N)],
        "product_type_name": [TYPES[(i // 2) % 4] for i in range(N)],
        "prod_name": [f"article {i}" for i in range(N)],
        "price": ["0.01"] * N,
    }
    rows = np.asarray([[10, 11, 40, -1], [3, -1, -1, -1], [70, 71, 72, 73]], dtype=np.int32)
    histories = {
        "customer_ids": np.asarray(["alice", "bob", "carol"]),
        "rows": rows,
        "age_days": np.asarray([[0, 1, 5, 0], [2, 0, 0, 0], [0, 0, 1, 3]], dtype=np.float32),
        "last_day": np.full(3, 100, dtype=np.int64),
    }
    fields = {
        "index_type": "flat",
        "model_version": 1,
        "customer_count": 3,
        "max_history": HISTORY,
        "context_length": 8,
        "clip_model": "stand-in",
        "reference_day": 100,
        "data_source": "test",
        "tower_checksums": {},
    }
    prior = PopularityPrior(PRIOR, discovery_weight=DISCOVERY_PRIOR)
    head = artifacts.ScoreHeadWeights(np.ones(2), np.zeros(2), np.ones(2), 0.0, BOOST, prior)
    captions = [
        f"{colour} {kind}" for colour, kind in zip(metadata["colour_group_name"], metadata["product_type_name"])
    ]
    index = build_faiss_index(vectors, "flat", bias)
    words = LexicalIndex.build(captions) if lexical else None
    write_index_dir(directory, index, vectors, metadata, histories, head, fields, item_bias=bias, lexical=words)
    return vectors


class StandInTowers:
    """User vector = the normalised mean of the history's vectors; a text's vector is looked up."""

    def __init__(self, texts: dict[int, np.ndarray]):
        self.texts = texts  # first token id -> vector
        self.calls = 0

    async def user_vectors(self, history: np.ndarray, mask: np.ndarray, age: np.ndarray) -> np.ndarray:
        self.calls += 1
        summed = (history * mask[..., None]).sum(axis=1)
        return (summed / np.linalg.norm(summed, axis=1, keepdims=True)).astype(np.float32)

    async def query_vectors(self, input_ids: np.ndarray) -> np.ndarray:
        self.calls += 1
        return np.stack([self.texts[int(ids[0])] for ids in input_ids])

    async def close(self) -> None:
        return None


@dataclasses.dataclass
class StandInSource:
    towers: StandInTowers
    refuse_model_versions: tuple[int, ...] = ()
    refused: int = 0

    def open(self, manifest: artifacts.Manifest, wait_s: float = 0.0) -> StandInTowers:
        if manifest.model_version in self.refuse_model_versions:
            self.refused += 1
            raise artifacts.ArtifactError(f"model version {manifest.model_version} is not served")
        return self.towers


def tokenize(texts: list[str]) -> np.ndarray:
    """Each text's length as its one token: the stand-in towers look vectors up by it."""
    return np.asarray([[len(text)] + [0] * 7 for text in texts], dtype=np.int64)


@pytest.fixture()
def shop(tmp_path: Path) -> tuple[RecommendationService, np.ndarray, StandInSource]:
    root = tmp_path / "index"
    vectors = write_shop_index(root / "v0001")
    artifacts.publish_version(root, "v0001")
    source = StandInSource(StandInTowers({len("red dress"): vectors[33], len("white"): vectors[5]}))
    config = RetrieverConfig(index_dir=str(root), index_poll_s=0, faiss_gpu="off", history_clock="index")
    service = RecommendationService(config, IndexSlot(config, source), tokenizer=tokenize)
    service.load(triton_wait_s=0)
    return service, vectors, source


def recommend(service: RecommendationService, *queries: Query) -> list[list[str]]:
    return [r.article_ids for r in asyncio.run(service.recommend(list(queries)))]


def rows_of(ids: list[str]) -> list[int]:
    return [int(a) for a in ids]


def test_filters_keep_only_matching_articles_in_exact_order(shop) -> None:
    service, vectors, _ = shop
    filters = Filters.parse({"colour": ["Red"], "product_type": ["Dress", "Shoe"]})
    found = rows_of(recommend(service, Query("query", "red dress", 10, QueryOptions(filters)))[0])
    allowed = [i for i in range(N) if COLOURS[i % 3] == "Red" and TYPES[(i // 2) % 4] in ("Dress", "Shoe")]
    expected = sorted(allowed, key=lambda i: -float(vectors[i] @ vectors[33]))[:10]
    assert found == expected  # text queries rank by cosine alone, among the allowed rows


def test_a_customers_own_purchases_come_back_boosted_unless_excluded(shop) -> None:
    service, vectors, _ = shop
    catalog = service.slot.serving.catalog
    items = asyncio.run(service.recommend([Query("customer_id", "alice", 12)]))[0]
    own = {"0000000010": 0.0, "0000000011": 1.0, "0000000040": 5.0}  # article -> age in days
    user = np.mean(vectors[[10, 11, 40]], axis=0)
    user /= np.linalg.norm(user)
    for article, age in own.items():
        assert article in items.article_ids
        row = int(article)
        expected = vectors[row] @ user + PRIOR * catalog.item_bias[row] + BOOST(np.asarray([age]))[0]
        assert items.similarities[items.article_ids.index(article)] == pytest.approx(expected, abs=1e-5)
    excluded = recommend(service, Query("customer_id", "alice", 12, QueryOptions(exclude_purchased=True)))[0]
    assert not set(own) & set(excluded) and len(excluded) == 12


def test_stored_and_dated_histories_age_with_the_clock(shop, monkeypatch) -> None:
    service, vectors, source = shop
    catalog = service.slot.serving.catalog
    monkeypatch.setattr(service.config, "history_clock", "wall")
    monkeypatch.setattr("retriever.service.time.time", lambda: (100 + 30) * 86_400 + 3600.0)  # day 130
    assert service.days_since_index(catalog) == 30
    calls = source.towers.calls
    items = asyncio.run(service.recommend([Query("customer_id", "alice", 12)]))[0]
    assert source.towers.calls == calls + 1  # the stored vector is 30 days old: recomputed from the aged history
    user = np.mean(vectors[[10, 11, 40]], axis=0)
    user /= np.linalg.norm(user)
    row = 11  # bought 1 day before the index's day: 31 days ago now
    expected = vectors[row] @ user + PRIOR * catalog.item_bias[row] + BOOST(np.asarray([31.0]))[0]
    assert items.similarities[items.article_ids.index(f"{row:010d}")] == pytest.approx(expected, abs=1e-5)
    # A posted history with dates: its ages, not 0 days, feed the boost.
    dated = Query("history", ["0000000010", "0000000020"], 12, ages=(12.0, 2.0))
    undated = Query("history", ["0000000010", "0000000020"], 12)
    with_dates, without = asyncio.run(service.recommend([dated, undated]))
    for result, age in ((with_dates, 2.0), (without, 0.0)):
        similarity = result.similarities[result.article_ids.index("0000000020")]
        user = np.mean(vectors[[10, 20]], axis=0)
        user /= np.linalg.norm(user)
        assert similarity == pytest.approx(
            vectors[20] @ user + PRIOR * catalog.item_bias[20] + BOOST(np.asarray([age]))[0], abs=1e-5
        )


def test_the_diversity_cap_limits_each_product_type(shop) -> None:
    service, _, _ = shop
    found = recommend(service, Query("history", ["0000000003", "0000000007"], 8, QueryOptions(max_per_product_type=2)))
    types = [TYPES[(row // 2) % 4] for row in rows_of(found[0])]
    assert len(types) == 8 and max(types.count(t) for t in TYPES) == 2


def test_similar_items_never_return_the_article_itself(shop) -> None:
    service, _, _ = shop
    found = recommend(service, Query("similar_to", "0000000005", 5))[0]
    assert "0000000005" not in found and len(found) == 5


def test_vectors_are_cached_and_unknown_ids_are_request_errors(shop) -> None:
    service, _, source = shop
    recommend(service, Query("query", "white", 3), Query("history", ["0000000001"], 3))
    calls = source.towers.calls
    recommend(service, Query("query", "white", 3), Query("history", ["0000000001"], 3))
    assert source.towers.calls == calls  # both vectors came from the caches
    with pytest.raises(RequestError, match=r"instances\[1\]: unknown article_id: '9999999999'"):
        recommend(service, Query("query", "white", 3), Query("history", ["9999999999"], 3))
    with pytest.raises(RequestError, match="unknown customer_id"):
        recommend(service, Query("customer_id", "nobody", 3))


def test_posted_purchases_count_from_the_next_request(shop) -> None:
    service, _, _ = shop
    asyncio.run(service.add_purchases("bob", ["0000000090"]))
    assert asyncio.run(service.customer_history("bob"))["items"][0]["article_id"] == "0000000090"
    assert "0000000090" in recommend(service, Query("customer_id", "bob", 12))[0]  # boosted as bought today


def test_a_refused_index_version_leaves_the_served_one_in_place(shop, tmp_path: Path) -> None:
    service, _, source = shop
    root = Path(service.config.index_dir)
    write_shop_index(root / "v0002", seed=1, dim=DIM + 1)  # another dimension: needs a restart
    artifacts.publish_version(root, "v0002")
    result = service.slot.reload()
    assert result.status == "refused" and "dim" in result.message and service.slot.serving.catalog.version == "v0001"
    write_shop_index(root / "v0003", seed=2)
    artifacts.publish_version(root, "v0003")
    assert service.slot.reload().status == "swapped" and service.slot.serving.catalog.version == "v0003"
    assert service.slot.reload().status == "unchanged"
    recommend(service, Query("customer_id", "alice", 5))  # the new version serves
    # A rollback (python -m export.versions --publish) is a swap like any other: back to an older version.
    artifacts.publish_version(root, "v0001")
    assert service.slot.reload().status == "swapped" and service.slot.serving.catalog.version == "v0001"


def damage_index_file(version_dir: Path) -> None:
    """index.faiss replaced by garbage whose checksum the manifest records: only faiss finds out."""
    from twotower.files import sha256_file

    (version_dir / artifacts.INDEX_FILE).write_bytes(b"not a faiss index" * 10)
    manifest_path = version_dir / artifacts.MANIFEST_FILE
    manifest = json.loads(manifest_path.read_text())
    manifest["files"][artifacts.INDEX_FILE] = sha256_file(version_dir / artifacts.INDEX_FILE)
    manifest_path.write_text(json.dumps(manifest))


def wait_for(
    condition: Callable[[], bool], seconds: float = 20.0, each_poll: Callable[[], None] = lambda: None
) -> None:
    """Poll every 10 ms until `condition` holds or `seconds` pass (a loaded CI machine may take seconds)."""
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        each_poll()
        time.sleep(0.01)


def write_model_version(version_dir: Path, seed: int, model_version: int) -> None:
    """A shop index version whose towers are those of `model_version`."""
    write_shop_index(version_dir, seed=seed)
    manifest = json.loads((version_dir / artifacts.MANIFEST_FILE).read_text())
    manifest["model_version"] = model_version
    (version_dir / artifacts.MANIFEST_FILE).write_text(json.dumps(manifest))


def test_the_index_watcher_survives_any_error_and_reads_a_bad_version_once(shop, monkeypatch) -> None:
    import time

    from retriever import index_slot, metrics

    service, _, source = shop
    slot = service.slot
    root = Path(service.config.index_dir)
    slot.config = dataclasses.replace(slot.config, index_poll_s=0.01)
    monkeypatch.setattr(index_slot, "TOWERS_RETRY_S", 0.05)
    opened: list[str] = []
    open_catalog = slot.open_catalog
    monkeypatch.setattr(
        slot, "open_catalog", lambda path, served=None: opened.append(Path(path).name) or open_catalog(path, served)
    )
    failed = metrics.INDEX_RELOADS.labels("failed")
    failures_before = failed._value.get()
    write_shop_index(root / "v0002", seed=1)
    damage_index_file(root / "v0002")
    # The admin endpoint's path: the reason, not a stack trace, and the old version keeps serving.
    artifacts.publish_version(root, "v0002")
    result = service.slot.reload()
    assert result.status == "failed" and result.message.startswith("RuntimeError: ") and result.index_version == "v0001"
    slot.start_watching()
    try:
        wait_for(lambda: len(opened) >= 2)
        time.sleep(0.3)  # ~30 polls: the damaged version is not opened again while CURRENT names it
        assert opened == ["v0002", "v0002"] and failed._value.get() == failures_before + 2
        assert slot._watcher is not None and slot._watcher.is_alive()
        assert slot.serving.catalog.version == "v0001"
        # Towers Triton does not serve yet: Triton is asked again with backoff until it serves them; the
        # version's files are read once.
        write_model_version(root / "v0003", seed=2, model_version=2)
        source.refuse_model_versions = (2,)
        artifacts.publish_version(root, "v0003")
        wait_for(lambda: source.refused >= 3)
        assert slot.serving.catalog.version == "v0001" and opened.count("v0003") == 1
        source.refuse_model_versions = ()
        wait_for(lambda: slot.serving.catalog.version == "v0003")
        assert slot.serving.catalog.version == "v0003"
    finally:
        slot.stop()


def test_prefetch_reads_the_versions_memory_mapped_files(shop) -> None:
    service, _, _ = shop
    catalog = service.slot.serving.catalog
    mapped = [
        name
        for name in catalog.manifest.files
        if name.startswith(artifacts.ITEMS_DIR + "/")
        or name in (artifacts.HISTORIES_FILE, artifacts.ITEM_BIAS_FILE, artifacts.VECTORS_FILE)
    ]
    assert {artifacts.VECTORS_FILE, artifacts.ITEM_BIAS_FILE} <= set(mapped) and len(mapped) > 3
    assert catalog.prefetch(chunk_bytes=4096) == sum((catalog.index_dir / name).stat().st_size for name in mapped)


class ScriptedTurns:
    """Swap turns as a test scripts them: `holder` set = another replica swaps; `drain` = others serve."""

    def __init__(self, drain: bool):
        self.drain, self.holder, self.taken, self.beats, self.left, self.handed_on = drain, "", 0, 0, 0, 0

    def take(self):
        from retriever.swap_turns import Turn

        if self.holder:
            return None
        self.taken += 1
        return Turn(drain=self.drain, release=self.hand_on)

    def hand_on(self) -> None:
        self.handed_on += 1

    def heartbeat(self) -> None:
        self.beats += 1

    def leave(self) -> None:
        self.left += 1


def swapping_in_turns(
    service: RecommendationService, drain: bool, swap_drain_s: float
) -> tuple[IndexSlot, Path, ScriptedTurns]:
    """The service's slot polling its index root every 10 ms, taking scripted turns: (slot, root, turns)."""
    slot = service.slot
    slot.config = dataclasses.replace(slot.config, index_poll_s=0.01, swap_drain_s=swap_drain_s)
    slot.turns = turns = ScriptedTurns(drain)
    return slot, Path(service.config.index_dir), turns


@pytest.mark.parametrize("others_serve", [True, False])
def test_a_swap_waits_for_its_turn_and_leaves_rotation_only_while_another_replica_serves(
    shop, others_serve, caplog
) -> None:
    from retriever.errors import NotReady

    caplog.set_level("INFO", logger="retriever.index")

    service, _, _ = shop
    slot, root, turns = swapping_in_turns(service, drain=others_serve, swap_drain_s=0.5)
    opened: list[str] = []
    open_catalog = slot.open_catalog
    slot.open_catalog = lambda path, served=None: opened.append(Path(path).name) or open_catalog(path, served)
    readiness: list[str] = []

    def watch(seconds: float, until: str = "") -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and not (until and readiness[-1:] == [until]):
            try:
                readiness.append(asyncio.run(service.in_rotation())["index_version"])
            except NotReady as err:
                readiness.append(str(err))
            time.sleep(0.02)

    turns.holder = "another-pod:1"
    write_shop_index(root / "v0002", seed=1)
    artifacts.publish_version(root, "v0002")
    slot.start_watching()
    try:
        watch(0.3)  # ~30 polls: the version is not read while another replica holds the turn
        assert opened == [] and turns.taken == 0 and set(readiness) == {"v0001"} and turns.beats > 3
        turns.holder = ""
        watch(20.0, until="v0002")  # a loaded CI machine may take seconds
        assert opened == ["v0002"] and turns.taken == 1 and readiness[-1] == "v0002"
        out = [state for state in readiness if state.startswith("out of rotation")]
        if others_serve:  # out of rotation through the drain (~0.5 s of 20 ms samples), then in with v0002
            assert len(out) >= 15 and turns.left == 1
            assert "of the index version before rejoining" in caplog.text  # its mapped files read first
            first_out, last_out = readiness.index(out[0]), len(readiness) - 1 - readiness[::-1].index(out[-1])
            assert set(readiness[:first_out]) == {"v0001"} and set(readiness[last_out + 1 :]) == {"v0002"}
        else:  # the only replica serving: it swaps in place
            assert out == [] and turns.left == 0 and "before rejoining" not in caplog.text
    finally:
        slot.stop()


def test_a_replica_counts_as_serving_only_while_its_towers_answer(shop, monkeypatch, caplog) -> None:
    """Its heartbeat tells the other replicas' swaps to leave rotation for it: none while its towers fail a health
    check, or while no health check has reached it for the heartbeat's freshness window."""
    from retriever import index_slot
    from serving.towers import TritonUnavailable

    caplog.set_level("INFO", logger="retriever.index")
    service, _, source = shop
    service.config = dataclasses.replace(service.config, health_cache_s=0.0)
    slot, _, turns = swapping_in_turns(service, drain=False, swap_drain_s=0.0)
    healthy_vectors = source.towers.user_vectors

    async def failing(*args: object) -> np.ndarray:
        raise TritonUnavailable("Triton at test: connection refused")

    def over_polls(counter: str) -> tuple[int, int]:
        """(heartbeats, leaves) until `counter` has risen by 5 more polls (a poll in flight may send one more)."""
        beats, left = turns.beats, turns.left
        start = getattr(turns, counter)
        wait_for(lambda: getattr(turns, counter) >= start + 5)
        return turns.beats - beats, turns.left - left

    slot.start_watching()
    try:
        assert asyncio.run(service.healthy())
        assert over_polls("beats")[1] == 0
        monkeypatch.setattr(source.towers, "user_vectors", failing)
        assert not asyncio.run(service.healthy())
        beats, left = over_polls("left")
        assert left >= 5 and beats <= 1 and "towers failed the last health check" in caplog.text
        monkeypatch.setattr(source.towers, "user_vectors", healthy_vectors)
        assert asyncio.run(service.healthy())
        beats, left = over_polls("beats")
        assert beats >= 5 and left <= 1 and "answering again" in caplog.text
        # no health check within the window (a stuck event loop, or no probe): no heartbeat either
        monkeypatch.setattr(index_slot, "heartbeat_stale_s", lambda poll_s: 0.05)
        over_polls("left")
        beats, left = over_polls("left")
        assert left >= 5 and beats == 0 and "no health check for 0 s" in caplog.text
    finally:
        slot.stop()


def test_requests_during_a_process_first_health_check_wait_for_its_answer(shop, monkeypatch) -> None:
    """A new KServe worker has no answer yet: requests that reach it while its first check is in flight get that
    check's answer, not 503 (they did: its cached answer starts as "not healthy"). Later checks in flight leave
    the others the last answer, and a caller going away does not cancel the check the others wait for."""
    service = pickle.loads(pickle.dumps(shop[0]))  # as a worker gets it
    towers = service.serving().towers
    answered = towers.user_vectors
    release = asyncio.Event()
    checks: list[int] = []

    async def slow(*args: np.ndarray) -> np.ndarray:
        checks.append(1)
        await release.wait()
        return await answered(*args)

    monkeypatch.setattr(towers, "user_vectors", slow)

    async def requests_during_checks() -> tuple[list[bool], list[bool]]:
        first = [asyncio.ensure_future(service.healthy()) for _ in range(3)]
        await asyncio.sleep(0.01)
        # a worker may be pickled from a process with a check in flight: the future stays behind
        assert service._first_check is not None and service.__getstate__()["_first_check"] is None
        service._health_checked_at = float("-inf")  # a first check outlasting the cache: still the one waited on
        first.append(asyncio.ensure_future(service.healthy()))
        await asyncio.sleep(0.01)
        first[0].cancel()  # the caller that started the check goes away
        release.set()
        first_answers = await asyncio.gather(*first[1:])
        release.clear()
        service._health_checked_at = float("-inf")  # the cached answer has aged: the next caller checks again
        later = [asyncio.ensure_future(service.healthy()) for _ in range(3)]
        await asyncio.sleep(0.01)
        others = [task.result() for task in later[1:]]  # answered at once, from the last answer
        release.set()
        await later[0]
        return first_answers, others

    first_answers, others = asyncio.run(requests_during_checks())
    assert first_answers == [True, True, True] and others == [True, True] and len(checks) == 2


def test_a_turn_past_its_limit_is_handed_on_and_its_load_installed_in_a_later_turn(shop, caplog) -> None:
    import threading

    caplog.set_level("INFO", logger="retriever.index")
    service, _, _ = shop
    slot, root, turns = swapping_in_turns(service, drain=True, swap_drain_s=0.05)
    slot.config = dataclasses.replace(slot.config, swap_turn_max_s=0.5)
    stuck = threading.Event()
    open_catalog = slot.open_catalog
    slot.open_catalog = lambda path, served=None: stuck.wait(20) and open_catalog(path, served)  # a load stuck
    write_shop_index(root / "v0002", seed=1)
    artifacts.publish_version(root, "v0002")
    slot.start_watching()
    try:
        wait_for(lambda: bool(slot.out_of_rotation))
        assert slot.out_of_rotation and turns.handed_on == 0
        wait_for(lambda: not slot.out_of_rotation)  # after 0.5 s, still loading
        assert turns.handed_on == 1 and slot.serving.catalog.version == "v0001"
        assert "index swap turn over 0.5 s: rejoining rotation and handing the turn on" in caplog.text
        beats = turns.beats
        wait_for(lambda: turns.beats >= beats + 5)  # still counted as serving while the watcher is in the load
        assert turns.beats >= beats + 5 and turns.taken == 1
        caplog.clear()
        stuck.set()
        wait_for(lambda: turns.handed_on == 2 and not slot.out_of_rotation)
        # loaded within the overrun turn, installed in a new one: out of rotation again, never in place
        assert slot.serving.catalog.version == "v0002" and turns.taken == 2 and turns.handed_on == 2
        assert "out of rotation for 0 s" in caplog.text and "of the index version before rejoining" in caplog.text
    finally:
        stuck.set()
        slot.stop()


def test_retriever_evaluation_and_fits_rank_identically(shop) -> None:
    """One ranking function: the served lists, the evaluation's and the held-out fits' agree."""
    service, vectors, source = shop
    catalog: Catalog = service.slot.serving.catalog
    rng = np.random.default_rng(3)
    histories = [[f"{r:010d}" for r in rng.choice(N, int(rng.integers(1, 4)), replace=False)] for _ in range(12)]
    served = recommend(service, *(Query("history", h, 15) for h in histories))
    pairs = [(catalog.rows_for(h)[::-1], np.zeros(len(h), np.float32)) for h in histories]
    users = asyncio.run(source.towers.user_vectors(*catalog.history_tensors(pairs)))
    cases = CaseUsers(pairs, users)
    evaluated = [TwoTower(cases, catalog).rank(i, 15) for i in range(len(pairs))]
    assert all((a == b).all() for a, b in zip(TwoTower(cases, catalog).rank_all(len(pairs), 15), evaluated))
    exact = [TwoTower(cases, catalog, exact=True).rank(i, 15) for i in range(len(pairs))]
    fitted = fitting.held_out_rankings(catalog, users, pairs, 15, BOOST, PRIOR)
    space = ranking.ExactItems(catalog.vectors, catalog.item_bias, products=catalog.products)
    fitted_exact = fitting.held_out_rankings(space, users, pairs, 15, BOOST, PRIOR)
    for i, ids in enumerate(served):
        assert (
            rows_of(ids) == evaluated[i].tolist() == exact[i].tolist() == fitted[i].tolist() == fitted_exact[i].tolist()
        )
    # Lists without the customer's own articles rank with the discovery weight, on every path.
    discovery = recommend(service, *(Query("history", h, 15, QueryOptions(exclude_purchased=True)) for h in histories))
    evaluated = [TwoTower(cases, catalog, exclude_purchased=True).rank(i, 15) for i in range(len(pairs))]
    fitted = fitting.held_out_rankings(catalog, users, pairs, 15, BOOST, DISCOVERY_PRIOR, exclude_bought=True)
    at_full_weight = fitting.held_out_rankings(catalog, users, pairs, 15, BOOST, PRIOR, exclude_bought=True)
    assert [rows_of(ids) for ids in discovery] == [r.tolist() for r in evaluated] == [r.tolist() for r in fitted]
    assert [r.tolist() for r in fitted] != [r.tolist() for r in at_full_weight]
    # The boost's fit reranks one cached deep search per case with ranking.finish: the same lists again.
    for i, (user, pair) in enumerate(zip(users, pairs)):
        request = ranking.RankRequest(15, boost=BOOST, bought=pair)
        deep = space.search(user[None], 60)
        assert (
            ranking.finish(space, user, request, deep[0][0], deep[1][0])[1].tolist()
            == fitting.held_out_rankings(space, users[i : i + 1], [pair], 15, BOOST)[0].tolist()
        )


def test_shop_routes_answer_domain_errors_from_the_one_table(shop) -> None:
    from retriever import metrics

    service, _, _ = shop
    app = FastAPI()
    install_routes(app, service)
    invalid, received = metrics.ERRORS.labels("invalid_input"), metrics.RECEIVED
    invalid_before, received_before = invalid._value.get(), received._value.get()

    async def calls() -> list[httpx.Response]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://shop") as client:
            return [
                await client.get("/shop/api/articles/0000000001"),
                await client.get("/shop/api/articles/9999999999"),
                await client.get("/shop/api/search", params={"q": "red dress", "colour": "Red", "k": 3}),
                await client.get("/shop/api/search", params={"q": "red dress", "price_min": 2, "price_max": 1}),
                await client.post("/shop/api/customers/bob/purchases", json={"article_ids": ["nope"]}),
                await client.get("/shop/api/search", params={"q": "red dress", "k": 0}),
            ]

    ok, unknown, search, bad_filter, bad_purchase, bad_k = asyncio.run(calls())
    # Every endpoint's failures are counted, FastAPI's own validation (422) included, as is every request.
    assert bad_k.status_code == 422 and invalid._value.get() == invalid_before + 4
    assert received._value.get() == received_before + 6
    assert ok.status_code == 200 and ok.json()["colour_group_name"] == COLOURS[1]
    assert unknown.status_code == 400 and unknown.json() == {"error": "article_id: unknown article_id: '9999999999'"}
    assert search.status_code == 200 and len(search.json()["items"]) == 3
    assert bad_filter.status_code == 400 and "price_min" in bad_filter.json()["error"]
    assert bad_purchase.status_code == 400 and "article_ids" in bad_purchase.json()["error"]


class GatedTowers(StandInTowers):
    """Text queries wait for `gate`: requests stay in progress until the test opens it."""

    def __init__(self, texts: dict[int, np.ndarray]):
        super().__init__(texts)
        self.gate = asyncio.Event()

    async def query_vectors(self, input_ids: np.ndarray) -> np.ndarray:
        await self.gate.wait()
        return await super().query_vectors(input_ids)


def test_a_full_process_refuses_at_once_with_retry_after_and_recovers(tmp_path: Path) -> None:
    from retriever import metrics

    root = tmp_path / "index"
    vectors = write_shop_index(root / "v0001")
    artifacts.publish_version(root, "v0001")
    config = RetrieverConfig(index_dir=str(root), index_poll_s=0, faiss_gpu="off", max_in_flight=2, retry_after_s=3)
    towers = GatedTowers({len("red dress"): vectors[33]})
    service = RecommendationService(config, IndexSlot(config, StandInSource(towers)), tokenizer=tokenize)
    service.load(triton_wait_s=0)
    app = FastAPI()
    install_routes(app, service)
    refused = metrics.ERRORS.labels("overloaded")
    before = refused._value.get()

    async def calls() -> tuple[list[httpx.Response], httpx.Response, httpx.Response, list[httpx.Response]]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://shop") as client:
            search = {"q": "red dress", "k": 3}
            waiting = [asyncio.create_task(client.get("/shop/api/search", params=search)) for _ in range(2)]
            await asyncio.sleep(0.05)  # both are in progress, waiting for the tower
            shed = await client.get("/shop/api/search", params=search)
            admin = await client.get("/admin/index")  # never limited: operators and probes get through
            towers.gate.set()
            return await asyncio.gather(*waiting), shed, admin, [await client.get("/shop/api/search", params=search)]

    admitted, shed, admin, after = asyncio.run(calls())
    assert [r.status_code for r in admitted] == [200, 200]
    assert shed.status_code == 503 and shed.headers["retry-after"] == "3"
    assert "max_in_flight 2" in shed.json()["error"]
    assert admin.status_code == 200 and after[0].status_code == 200  # back to normal once the two finished
    assert refused._value.get() == before + 1


def test_the_admission_limit_falls_while_requests_are_slow_and_climbs_back_when_they_are_fast() -> None:
    from retriever.limits import AdaptiveLimit

    limit = AdaptiveLimit(ceiling=16, floor=4, target_s=0.025)
    for _ in range(16):  # one window of slow completions: overload
        limit.record(0.2)
    assert limit.current == 4
    completions = 0
    while limit.current < 16:
        limit.record(0.005)
        completions += 1
    assert 100 <= completions <= 150  # back to the ceiling in ~130 fast completions (~1 s per worker at 100 QPS)
    for _ in range(1000):
        limit.record(0.001)
    assert limit.current == 16  # never past the ceiling
    fixed = AdaptiveLimit(ceiling=16, floor=4, target_s=0)
    fixed.record(10.0)
    assert fixed.current == 16
    assert AdaptiveLimit(ceiling=2, floor=4, target_s=0.025).floor == 2  # a ceiling under the floor wins


def test_the_admission_limit_refuses_a_burst_at_its_lowered_limit_and_ignores_slow_uploads() -> None:
    from retriever.limits import AdaptiveLimit, AdmissionLimit

    release = asyncio.Event()
    service_s = {"value": 0.0}

    async def app(scope, receive, send) -> None:  # noqa: ANN001 (an ASGI app)
        while (await receive()).get("more_body", False):
            pass
        await asyncio.sleep(service_s["value"])
        if scope["path"].endswith("wait"):
            await release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    limits: list[int] = []
    middleware = AdmissionLimit(app, AdaptiveLimit(16, 4, 0.025), retry_after_s=1, on_limit=limits.append)

    async def call(path: str, upload_s: float = 0.0) -> int:
        statuses: list[int] = []

        async def receive() -> dict:
            await asyncio.sleep(upload_s)  # a slow client: the body's last byte comes late
            return {"type": "http.request", "body": b"{}", "more_body": False}

        async def send(message: dict) -> None:
            if message["type"] == "http.response.start":
                statuses.append(message["status"])

        await middleware({"type": "http", "path": path}, receive, send)
        return statuses[0]

    async def scenario() -> tuple[list[int], list[int]]:
        assert await asyncio.gather(*(call("/shop/api/search", upload_s=0.06) for _ in range(8))) == [200] * 8
        assert middleware.limit.current == 16  # slow uploads, fast service: the limit holds
        service_s["value"] = 0.06
        await asyncio.gather(*(call("/shop/api/search") for _ in range(8)))  # slow service: overload
        assert middleware.limit.current == 6
        service_s["value"] = 0.0
        burst = [asyncio.create_task(call("/shop/api/wait")) for _ in range(8)]
        await asyncio.sleep(0.02)
        release.set()
        return await asyncio.gather(*burst), [await call("/shop/api/search") for _ in range(200)]

    burst, after = asyncio.run(scenario())
    assert sorted(burst) == [200] * 6 + [503] * 2  # a fixed limit of 16 admitted all 8
    assert after == [200] * 200 and middleware.limit.current == 16 and limits[-1] == 16

    # The load meter (what sheds the second stage) hears the same service times behind a fixed limit or none
    for fixed in (AdaptiveLimit(16, 4, 0.0), AdaptiveLimit(0, 0, 0.0)):
        load = AdaptiveLimit(16, 1, 0.025)
        middleware = AdmissionLimit(app, fixed, retry_after_s=1, load=load)
        service_s["value"] = 0.03
        asyncio.run(call("/shop/api/search"))
        assert load.current == 14 and not load.overloaded  # one slow request
        for _ in range(6):
            asyncio.run(call("/shop/api/search"))
        assert load.overloaded and fixed.current == fixed.ceiling


def test_refused_requests_write_a_summary_instead_of_an_access_log_line_each(caplog) -> None:
    import logging

    from retriever.limits import QUIET_SHEDDING, AdaptiveLimit, AdmissionLimit

    access = logging.getLogger("uvicorn.access")
    release = asyncio.Event()

    async def app(scope, receive, send) -> None:  # noqa: ANN001 (an ASGI app)
        await release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    middleware = AdmissionLimit(app, AdaptiveLimit(2, 2, 0.025), retry_after_s=1)

    async def call() -> None:
        async def receive() -> dict:
            return {"type": "http.request", "body": b"{}", "more_body": False}

        async def send(message: dict) -> None:  # as uvicorn's: the access line when the response starts
            if message["type"] == "http.response.start":
                access.info('"POST /shop/api/search HTTP/1.1" %d', message["status"])

        await middleware({"type": "http", "path": "/shop/api/search"}, receive, send)

    async def scenario() -> None:
        admitted = [asyncio.create_task(call()) for _ in range(2)]
        await asyncio.sleep(0.01)
        for _ in range(50):
            await call()  # refused: the process is full
        release.set()
        await asyncio.gather(*admitted)

    caplog.set_level(logging.INFO)
    try:
        asyncio.run(scenario())
    finally:
        access.removeFilter(QUIET_SHEDDING)
    lines = [r.getMessage() for r in caplog.records if r.name == "uvicorn.access"]
    assert lines == ['"POST /shop/api/search HTTP/1.1" 200'] * 2  # none of the 50 refusals
    warnings = [r.getMessage() for r in caplog.records if r.name == "retriever.limits"]
    assert len(warnings) == 1 and "overloaded: refusing requests with 503 (2 in progress" in warnings[0]
    assert middleware.shed_since_summary == 50  # counted for the next summary, the announced first one too


def test_text_queries_fuse_keyword_and_vector_results_under_the_same_filters(tmp_path: Path) -> None:
    root = tmp_path / "index"
    vectors = write_shop_index(root / "v0001", lexical=True)
    artifacts.publish_version(root, "v0001")
    config = RetrieverConfig(index_dir=str(root), index_poll_s=0, faiss_gpu="off", text_search="hybrid")
    towers = StandInTowers({len("red dress"): vectors[1]})  # a vector far from red dresses: BM25 must find them
    service = RecommendationService(config, IndexSlot(config, StandInSource(towers)), tokenizer=tokenize)
    service.load(triton_wait_s=0)
    red_dresses = {i for i in range(N) if COLOURS[i % 3] == "Red" and TYPES[(i // 2) % 4] == "Dress"}
    (found,) = asyncio.run(service.recommend([Query("query", "red dress", 5, QueryOptions(debug=True))]))
    catalog = service.slot.serving.catalog
    ((_, dense_rows),) = ranking.rank(catalog, vectors[1][None], [ranking.RankRequest(5)])
    hybrid_hits = len(set(rows_of(found.article_ids)) & red_dresses)
    assert hybrid_hits >= 2 and hybrid_hits > len(set(dense_rows.tolist()) & red_dresses)  # BM25 brings them in
    assert found.sources is not None and {"dense", "lexical"} <= {part for s in found.sources for part in s.split("+")}
    np.testing.assert_allclose(found.similarities, catalog.vectors[rows_of(found.article_ids)] @ vectors[1], atol=1e-6)
    only_shirts = QueryOptions(Filters.parse({"product_type": ["Shirt"]}), debug=True)
    (shirts,) = asyncio.run(service.recommend([Query("query", "red dress", 10, only_shirts)]))
    assert all(TYPES[(row // 2) % 4] == "Shirt" for row in rows_of(shirts.article_ids))  # filters bind both halves
    assert len(shirts.article_ids) == 10 and any("dense" in source for source in (shirts.sources or []))


def test_score_fusion_weighs_both_scores_scaled_over_the_candidates() -> None:
    dense = np.array([0.9, 0.8, 0.5, 0.3], dtype=np.float32)  # scaled: 1, 0.833, 0.333, 0
    lexical = np.array([0.0, 4.0, 8.0, 0.0], dtype=np.float32)  # scaled: 0, 0.5, 1, 0
    np.testing.assert_allclose(ranking.fuse_scores(dense, lexical), [0.5, 0.6667, 0.6667, 0.0], atol=1e-4)
    assert np.argsort(-ranking.fuse_scores(dense, lexical, 0.6), kind="stable").tolist() == [2, 1, 0, 3]
    # a query no article matches by word ranks by dense alone; one candidate is not divided by zero
    np.testing.assert_allclose(ranking.fuse_scores(dense, np.zeros(4, np.float32)), dense / 0.6 * 0.5 - 0.25, atol=1e-6)
    assert ranking.fuse_scores(dense[:1], lexical[:1]).tolist() == [0.5]


def test_a_loaded_keyword_index_travels_to_kserve_workers_by_its_files(tmp_path: Path) -> None:
    import pickle

    captions = ["grey dress", "black trousers", "grey trousers", "red swimwear bottom"]
    LexicalIndex.build(captions).save(tmp_path / "lexical")
    loaded = LexicalIndex.load(tmp_path / "lexical")
    state = loaded.__getstate__()
    assert state == {"directory": tmp_path / "lexical"}  # files, not arrays: an unpickled BM25 scored ~20x slower
    copy = pickle.loads(pickle.dumps(loaded))
    everything = np.ones(len(captions), dtype=bool)
    assert (
        copy.search("grey trousers", 3, everything).tolist() == loaded.search("grey trousers", 3, everything).tolist()
    )
    assert copy.search("grey trousers", 3, everything)[0] == 2 and copy.captions == captions
    assert copy.search("the and of", 3, everything).tolist() == []  # stop words only: no match


@pytest.mark.parametrize(
    "flags, fragment",
    [
        (
            ["--image-url-template", "https://cdn/{artcle_id}.jpg"],
            "--image-url-template: 'https://cdn/{artcle_id}.jpg'",
        ),
        (["--image-url-template", "https://cdn/{0}.jpg"], "may use {article_id} and {prefix}"),
        (["--text-search", "fuzzy"], "--text-search: 'fuzzy' is not one of dense, hybrid"),
        (["--top-k", "2000"], "--top-k: 2000 must be between 1 and --max-k (1000)"),
        (["--max-instances", "0"], "--max-instances: must be at least 1"),
    ],
)
def test_settings_that_would_fail_every_request_stop_the_start_with_exit_2(flags, fragment, tmp_path, capsys) -> None:
    from retriever.server import main

    assert main(["--index-dir", str(tmp_path), "--predictor_host", "127.0.0.1:1", *flags]) == 2
    assert fragment in capsys.readouterr().err


def test_an_unknown_flag_is_refused_not_ignored(tmp_path, capsys) -> None:
    from retriever.server import main

    with pytest.raises(SystemExit) as exited:
        main(["--index-dir", str(tmp_path), "--predictor_host", "127.0.0.1:1", "--max-in-fligth", "4"])
    assert exited.value.code == 2 and "unrecognized arguments: --max-in-fligth" in capsys.readouterr().err


def test_writes_and_admin_need_the_bearer_token_and_reads_do_not(tmp_path: Path) -> None:
    root = tmp_path / "index"
    write_shop_index(root / "v0001")
    artifacts.publish_version(root, "v0001")
    token_file = tmp_path / "token"
    token_file.write_text("s3cret-token\n")  # as a Secret mounts it, newline included
    config = RetrieverConfig(index_dir=str(root), index_poll_s=0, faiss_gpu="off", admin_token_file=str(token_file))
    service = RecommendationService(config, IndexSlot(config, StandInSource(StandInTowers({}))), tokenizer=tokenize)
    service.load(triton_wait_s=0)
    app = FastAPI()
    install_routes(app, service)
    purchase = {"article_ids": ["0000000003"]}

    async def calls() -> dict[str, httpx.Response]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://shop") as client:
            good, wrong = {"Authorization": "Bearer s3cret-token"}, {"Authorization": "Bearer s3cret-tokeN"}
            return {
                "purchase without": await client.post("/shop/api/customers/bob/purchases", json=purchase),
                "purchase wrong": await client.post("/shop/api/customers/bob/purchases", json=purchase, headers=wrong),
                "reload basic": await client.post("/admin/index/reload", headers={"Authorization": "Basic eDp5"}),
                "info without": await client.get("/admin/index"),
                "purchase good": await client.post("/shop/api/customers/bob/purchases", json=purchase, headers=good),
                "info good": await client.get("/admin/index", headers=good),
                "reload good": await client.post("/admin/index/reload", headers=good),
                "article": await client.get("/shop/api/articles/0000000003"),
                "history": await client.get("/shop/api/customers/bob/history"),
            }

    answers = asyncio.run(calls())
    assert answers["purchase without"].status_code == 401 and "Bearer" in answers["purchase without"].json()["error"]
    assert answers["purchase wrong"].status_code == 403 and answers["reload basic"].status_code == 401
    assert answers["info without"].status_code == 401
    assert all(answers[name].status_code == 200 for name in ("purchase good", "info good", "reload good"))
    assert all(answers[name].status_code == 200 for name in ("article", "history"))  # public reads unaffected
    assert answers["history"].json()["items"][-1]["article_id"] == "0000000003"  # only the good purchase counted
    assert "path" not in answers["info good"].json()  # no filesystem paths in answers
    assert str(tmp_path) not in answers["info good"].text + answers["reload good"].text
    with pytest.raises(ValueError, match="--admin-token-file: cannot read"):
        RecommendationService(dataclasses.replace(config, admin_token_file=str(tmp_path / "missing")), service.slot)


@pytest.fixture
def handed_off(monkeypatch) -> list[str]:
    """The names of the functions requests hand to a worker thread (asyncio.to_thread), in order."""
    names: list[str] = []
    real_to_thread = asyncio.to_thread

    async def to_thread(function, *args, **kwargs):
        names.append(function.__name__)
        return await real_to_thread(function, *args, **kwargs)

    monkeypatch.setattr(asyncio, "to_thread", to_thread)
    return names


def test_searches_stay_on_the_event_loop_unless_a_request_scores_too_many_rows(shop, handed_off, monkeypatch) -> None:
    service, _, _ = shop
    catalog = service.serving().catalog
    one = Query("customer_id", "alice", 5)
    red = Query("customer_id", "alice", 5, QueryOptions(Filters.parse({"colour": ["Red"]})))
    text = Query("query", "red dress", 5)
    inline = recommend(service, one)
    filtered = recommend(service, red)
    recommend(service, text)  # tokenized and ranked on the loop too: a small catalogue and a short text
    assert handed_off == []
    # a budget one row short of a filtered search (as at 1M articles and up, where a filter's mask passes over a
    # million rows): a plain search stays (a dense text query too, and one hiding a few purchases), a batch past the
    # budget and a filtered one leave
    monkeypatch.setattr(service_module, "INLINE_SEARCH_ROWS", catalog.rows_per_search + len(catalog.article_ids) - 1)
    assert recommend(service, one) == inline
    recommend(service, text)
    assert handed_off == []
    hiding = Query("customer_id", "alice", 5, QueryOptions(exclude_purchased=True))
    unbought = recommend(service, hiding)
    assert handed_off == []
    assert recommend(service, one, one, one) == [inline[0]] * 3 and handed_off == ["_rank"]
    assert recommend(service, red) == filtered and handed_off == ["_rank"] * 2
    with monkeypatch.context() as patched:
        patched.setattr(ranking, "OVERFETCH_LIMIT", 0)  # more purchases than a search overfetches: a mask
        assert recommend(service, hiding) == unbought and handed_off == ["_rank"] * 3
    with monkeypatch.context() as patched:  # an article bought again counts once, as ranking hides it once
        patched.setattr(ranking, "OVERFETCH_LIMIT", 2)
        again = (np.asarray([3, 3, 3, 5]), np.zeros(4, dtype=np.float32))
        assert service._rows_scored(catalog, [hiding], [again]) == catalog.rows_per_search
    with monkeypatch.context() as patched:  # a hybrid text query scores BM25 over every article
        patched.setattr(service, "_hybrid", lambda catalog, query: query.kind == "query")
        assert service._rows_scored(catalog, [text], [NOTHING_BOUGHT]) > service_module.INLINE_SEARCH_ROWS
    # a text longer than the tokenizing budget (one the vector cache has not seen) is tokenized in a thread
    monkeypatch.setattr(service_module, "INLINE_TOKENIZE_CHARS", len("red dress") - 1)
    recommend(service, Query("query", "red shirt", 5))
    assert handed_off == ["_rank"] * 3 + ["tokenize"]
    monkeypatch.setattr(service, "config", dataclasses.replace(service.config, search_in_thread=True))
    assert recommend(service, one) == inline and handed_off == ["_rank"] * 3 + ["tokenize", "_rank"]


def test_searches_in_worker_threads_use_the_configured_faiss_threads(shop, monkeypatch) -> None:
    service, _, _ = shop
    catalog = service.serving().catalog
    monkeypatch.setattr(service, "config", dataclasses.replace(service.config, search_in_thread=True))
    seen: list[int] = []
    real_top_k = catalog._top_k
    monkeypatch.setattr(catalog, "_top_k", lambda *args: seen.append(faiss.omp_get_max_threads()) or real_top_k(*args))
    for _ in range(3):  # fresh and reused pool threads alike
        recommend(service, Query("customer_id", "alice", 5))
    assert seen == [service.config.faiss_threads] * 3  # OpenMP's count is per thread: not every core


def test_a_replaced_version_is_freed_and_its_heap_handed_back(shop, caplog) -> None:
    import logging
    import time
    import weakref

    service, _, _ = shop
    root = Path(service.config.index_dir)
    replaced = weakref.ref(service.slot.serving.catalog)
    write_shop_index(root / "v0002", seed=1)
    artifacts.publish_version(root, "v0002")
    with caplog.at_level(logging.INFO, logger="retriever.heap"):
        assert service.slot.reload().status == "swapped"
        deadline = time.monotonic() + 10
        while "index version v0001 freed" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.1)
    assert replaced() is None  # nothing kept the old version alive: its memory can go back to the OS
    assert "index version v0001 freed: own memory" in caplog.text or not heap.release_freed_heap()


def test_a_replaced_version_still_referenced_is_reported_not_waited_for_forever(caplog) -> None:
    import logging

    class Version:  # weakly referenceable, like a Catalog
        pass

    kept = Version()
    with caplog.at_level(logging.WARNING, logger="retriever.heap"):
        heap.release_when_freed(kept, "index version v0007", timeout_s=0.2).join(timeout=5)
    assert "index version v0007 still referenced 0.2 s after it was replaced" in caplog.text


def test_a_version_waiting_for_its_towers_is_installed_in_a_turn_once_triton_serves_them(shop, monkeypatch) -> None:
    from retriever import index_slot

    service, _, source = shop
    slot, root, turns = swapping_in_turns(service, drain=True, swap_drain_s=0.2)
    rotation: list[str] = []
    monkeypatch.setattr(index_slot, "TOWERS_RETRY_S", 0.02)

    def watch(condition: Callable[[], bool], seconds: float = 20.0) -> None:
        wait_for(condition, seconds, lambda: rotation.append(slot.out_of_rotation))

    write_model_version(root / "v0002", seed=1, model_version=2)
    source.refuse_model_versions = (2,)
    artifacts.publish_version(root, "v0002")
    slot.start_watching()
    try:
        watch(lambda: source.refused >= 4)  # loaded in its turn, then Triton asked again, out of turn
        assert turns.taken == 1 and turns.left == 1 and slot.serving.catalog.version == "v0001"
        rotation.clear()
        watch(lambda: source.refused >= 6)
        assert set(rotation) == {""} and turns.taken == 1  # in rotation while Triton says no
        turns.holder = "another-pod:1"
        served: list[int] = []
        open_towers = source.open
        monkeypatch.setattr(source, "open", lambda manifest, wait_s=0.0: served.append(1) or open_towers(manifest))
        source.refuse_model_versions = ()
        watch(lambda: bool(served))  # Triton serves the towers now: the install waits for the turn,
        watch(lambda: False, 0.3)  # without asking Triton again
        assert slot.serving.catalog.version == "v0001" and turns.taken == 1 and served == [1]
        turns.holder = ""
        watch(lambda: slot.serving.catalog.version == "v0002")
        assert slot.serving.catalog.version == "v0002" and turns.taken == 2 and turns.left == 2
        assert any(state.startswith("loading a new index version") for state in rotation)
    finally:
        slot.stop()


def stand_in_stage():
    """A second stage over the shop's rows: sales drawn at random, random weights (it re-orders the lists)."""
    import pandas as pd

    from twotower.second_stage import FEATURES, ArticleSignals, SecondStage, StageWeights

    rng = np.random.default_rng(0)
    sales = pd.DataFrame(
        {
            "t_dat": pd.Timestamp("2020-09-20") - pd.to_timedelta(rng.integers(1, 9, 600), unit="D"),
            "customer_id": rng.integers(0, 60, 600).astype(str),
            "article_id": rng.integers(0, N, 600).astype(str),
        }
    )
    signals = ArticleSignals.count(sales, {str(i): i for i in range(N)}, N, pd.Timestamp("2020-09-20"))
    weights = StageWeights(np.zeros(len(FEATURES)), np.ones(len(FEATURES)), rng.normal(0, 1, len(FEATURES)), 0.0)
    return SecondStage(signals, weights)


def test_lists_the_second_stage_re_ranks_count_in_the_event_loops_budget(shop, handed_off, monkeypatch) -> None:
    """A batch of customers' lists whose searches fit the budget leaves the loop when their second stage does not."""
    from retriever.limits import AdaptiveLimit

    service, _, _ = shop
    catalog = service.serving().catalog
    batch = [Query("customer_id", "alice", 5), Query("history", ["0000000003"], 5), Query("query", "red dress", 5)]
    bought = [NOTHING_BOUGHT] * len(batch)
    searches = catalog.rows_per_search * len(batch)
    assert service._rows_scored(catalog, batch, bought) == searches  # no stage: the searches alone
    catalog.second_stage = stand_in_stage()
    staged = searches + 2 * service_module.STAGED_LIST_ROWS  # the customer's and the history's lists, not the text's
    assert service._rows_scored(catalog, batch, bought) == staged
    monkeypatch.setattr(service_module, "INLINE_SEARCH_ROWS", staged - 1)
    with_stage = recommend(service, *batch)
    assert handed_off == ["_rank"]
    limit = AdaptiveLimit(ceiling=16, floor=4, target_s=0.025)  # shed under overload: the searches alone again
    service.watch_load(limit)
    while not limit.overloaded:
        limit.record(0.2)
    assert service._rows_scored(catalog, batch, bought) == searches
    service.watch_load(AdaptiveLimit(ceiling=16, floor=4, target_s=0.025))
    monkeypatch.setattr(service, "config", dataclasses.replace(service.config, second_stage=False))
    assert service._rows_scored(catalog, batch, bought) == searches
    assert recommend(service, *batch) != with_stage and handed_off == ["_rank"]  # first stage alone, on the loop


def test_an_overloaded_process_sheds_the_second_stage_before_requests(shop, caplog) -> None:
    """While the admission limit says overloaded, customers' and histories' lists rank by the first stage alone
    (counted, one log line per STAGE_SHED_LOG_S); text queries never had the stage."""
    import pickle

    from retriever import metrics
    from retriever.limits import AdaptiveLimit

    service, _, _ = shop
    catalog = service.serving().catalog
    queries = [Query("customer_id", "alice", 12), Query("history", [f"{i:010d}" for i in (3, 50, 51)], 12)]
    first_stage = recommend(service, *queries)
    catalog.second_stage = stand_in_stage()
    staged = recommend(service, *queries)
    assert staged != first_stage  # the stage re-orders these lists

    limit = AdaptiveLimit(ceiling=16, floor=4, target_s=0.025)
    service.watch_load(limit)
    assert pickle.dumps(service)  # as KServe hands it to --workers N processes (a closure would not pickle)
    assert not limit.overloaded and recommend(service, *queries) == staged
    for _ in range(6):
        limit.record(0.2)
    assert not limit.overloaded  # a few slow requests at normal load: the stage stays (16 x 0.9^6 = 8.5)
    limit.record(0.2)
    assert limit.overloaded
    shed_before = metrics.SECOND_STAGE_SHED._value.get()
    with caplog.at_level("WARNING", logger="retriever"):
        for _ in range(3):
            assert recommend(service, *queries) == first_stage
    assert metrics.SECOND_STAGE_SHED._value.get() - shed_before == 6
    assert sum("skipped the second stage" in r.message for r in caplog.records) == 1
    while limit.overloaded:
        limit.record(0.005)
    assert recommend(service, *queries) == staged
    never = AdaptiveLimit(ceiling=16, floor=1, target_s=0)  # --shed-second-stage-ms 0
    service.watch_load(never)
    never.record(10.0)
    assert not never.overloaded and recommend(service, *queries) == staged
