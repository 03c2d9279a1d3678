"""The served index version and the towers that match it, swapped whole: hot index reloads.

A request reads `IndexSlot.serving` once and finishes on the pair it started with. `reload` loads the
index root's CURRENT version and swaps it in only if it checks out (files, dimension, the towers'
model version served by Triton); a watcher thread polls CURRENT and reloads when it changes, taking
its turn among the replicas first (retriever/swap_turns.py: out of rotation while it loads, where
another replica serves). Plain Python: the KServe adapter and the tests use it alike.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import threading
import time
from pathlib import Path
from typing import Any, Protocol

from retriever import heap, metrics
from retriever.swap_turns import SwapTurns, Turn, heartbeat_stale_s, swap_turns
from serving.catalog import Catalog
from serving.gpu_search import GpuUnavailable
from serving.towers import Towers
from twotower import artifacts
from twotower.artifacts import ArtifactError
from twotower.config import RetrieverConfig

log = logging.getLogger("retriever.index")

# A version whose towers Triton does not serve yet is kept loaded and only Triton is asked again, after
# 1 s, then 2, 4, ... at most 10 s: a pod serves a new model version within ~10 s of Triton loading it
# (with 60 s between tries a CI run under load missed a 60 s roll-out). One whose files are bad is not
# read again until CURRENT changes.
TOWERS_RETRY_S = 1.0
TOWERS_RETRY_MAX_S = 10.0


class TowerOpener(Protocol):
    """Opens the towers of an index's model version (serving.towers.TowerSource; stand-ins in tests)."""

    def open(self, manifest: artifacts.Manifest, wait_s: float = 0.0) -> Towers: ...


@dataclasses.dataclass(frozen=True)
class Serving:
    """An index version and the towers serving its model version: swapped as one."""

    catalog: Catalog
    towers: Towers


@dataclasses.dataclass
class _TurnState:
    """One swap turn, as the watcher and the turn's timer see it (under IndexSlot._rotation_lock)."""

    overran: bool = False  # past --swap-turn-max-s: handed on, the replica back in rotation
    settled: bool = False  # the load ended within the turn: the timer no longer acts
    ended: threading.Event = dataclasses.field(default_factory=threading.Event)


@dataclasses.dataclass
class ReloadResult:
    # swapped | unchanged | refused (the version is bad or incompatible) | failed (unexpected error) | ready (checked
    # and kept for the next reload to install: reload(install=False))
    status: str
    index_version: str  # the version being served after the attempt
    message: str = ""
    towers_pending: bool = False  # refused only because Triton does not serve its model version (yet)


class IndexSlot:
    def __init__(self, config: RetrieverConfig, towers: TowerOpener, turns: SwapTurns | None = None):
        self.config = config
        self.towers = towers
        self.turns = turns or swap_turns(
            config.swap_turns_redis_url, str(config.index_dir), config.swap_lease_s, config.index_poll_s
        )
        self.serving: Serving | None = None
        self.out_of_rotation = ""  # why this replica asks not to be sent requests now ("": it is in rotation)
        self.answered_at = 0.0  # time.monotonic() when its towers last answered (opened, or a health check)
        self._answering = True  # as last told to the other replicas (logged when it changes)
        self._lock = threading.Lock()
        # out_of_rotation and what the other replicas are told, changed by the watcher and a turn's timer
        self._rotation_lock = threading.RLock()
        self._retired: list[tuple[float, Towers]] = []  # old tower clients, closed once requests drained
        self._pending: Catalog | None = None  # a checked version waiting for Triton to serve its towers
        self._pending_towers: Towers | None = None  # ... which it serves now: waiting for this replica's turn
        self._released: threading.Thread | None = None  # releases the last replaced version's heap
        self._watcher: threading.Thread | None = None
        self._stop_watching = threading.Event()

    # KServe's --workers N pickles the loaded model into each worker process: locks and the watcher
    # thread cannot travel, so each worker makes its own (and watches the index root itself).
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        for name in ("_lock", "_rotation_lock", "_stop_watching", "_watcher", "_released"):
            state.pop(name, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()
        self._rotation_lock = threading.RLock()
        self._stop_watching = threading.Event()
        self._watcher = None
        self._released = None

    def open_catalog(self, index_dir: Path | str, served: Catalog | None = None) -> Catalog:
        """A version as this retriever serves it; `served` (the version it replaces) shares the files they have in
        common (serving.catalog.Catalog's `shares_with`)."""
        c = self.config
        lexical = c.text_search == "hybrid"  # the BM25 index stays on disk unless text queries use it
        return Catalog(
            index_dir,
            c.hnsw_ef_search,
            c.ivf_nprobe,
            c.exact_search_limit,
            c.faiss_gpu,
            c.popularity_weight,
            lexical,
            mapped=c.index_mmap,
            shares_with=served,
        )

    def load(self, triton_wait_s: float) -> Serving:
        """Load and verify the configured index, then check the towers of its model version are served."""
        catalog = self.open_catalog(self.config.index_dir)
        self._install(Serving(catalog, self.towers.open(catalog.manifest, triton_wait_s)))
        self.answered_at = time.monotonic()
        assert self.serving is not None
        return self.serving

    def towers_answered(self, answered: bool) -> None:
        """A health check's outcome (the service's): whether this replica's heartbeat may say it answers."""
        self.answered_at = time.monotonic() if answered else 0.0

    def _announce(self) -> None:
        """Tell the other replicas whether to count on this one while they swap: a heartbeat while it is in
        rotation and its towers answered within the heartbeat's freshness window, else none (nor once stopping)."""
        with self._rotation_lock:  # stop() takes it too: a stopping replica never announces itself again
            if self._stop_watching.is_set():
                return
            answering = time.monotonic() - self.answered_at <= heartbeat_stale_s(self.config.index_poll_s)
            if answering != self._answering:
                self._answering = answering
                if answering:
                    log.info("answering again: counted as serving while other replicas swap")
                else:
                    log.warning(
                        "%s: no longer counted as serving while other replicas swap",
                        "towers failed the last health check"
                        if not self.answered_at
                        else f"no health check for {time.monotonic() - self.answered_at:.0f} s (no probe reaches it)",
                    )
            if answering:
                self.turns.heartbeat()
            else:
                self.turns.leave()

    def _install(self, serving: Serving) -> threading.Thread | None:
        """Swap `serving` in; returns the thread that releases the replaced version's heap once it is freed."""
        previous = self.serving
        self.serving = serving  # one reference assignment: requests see the old pair or the new one
        # The loaded index is ~0.5M long-lived Python objects (metadata columns, id maps): a full
        # collection walking them stalls the event loop ~0.27 s, and near capacity such a stall takes
        # seconds of queueing to drain. Frozen objects are skipped by the collector (a replaced
        # version is still freed by reference counting).
        gc.freeze()
        self.publish_metrics(previous)
        if previous is None:
            return None
        # freed when the last request that started on it ends
        return heap.release_when_freed(previous.catalog, f"index version {previous.catalog.version}", self._grace_s)

    def publish_metrics(self, previous: Serving | None = None) -> None:
        """The served version's gauges (per process: each KServe worker publishes its own)."""
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

    def reload(self, install: bool = True) -> ReloadResult:
        """Load the index root's CURRENT version and swap it in if it checks out.

        Blocking (run it in a thread). A version that is corrupt, or whose model version Triton does
        not serve, or whose dimension/metric differ, is refused: the old one keeps serving. One refused
        only because Triton does not serve its towers yet stays loaded: the next call only asks Triton.
        With `install=False` a version that checks out stays loaded with its towers, not swapped in
        ("ready"): the next call installs it without reading it or asking Triton again.
        """
        with self._lock:
            current = self.serving
            assert current is not None, "load() first"
            towers_pending = False
            try:
                pending, self._pending = self._pending, None
                pending_towers, self._pending_towers = self._pending_towers, None
                target = artifacts.resolve_index_dir(self.config.index_dir)
                if pending is None or not _same(pending, target):  # CURRENT moved on: its towers go unused
                    self._retire(pending_towers)
                    pending, pending_towers = None, None
                if _same(current.catalog, target):
                    return ReloadResult("unchanged", current.catalog.version)
                if pending is not None:
                    catalog = pending  # read and checked already: only its towers were missing
                else:
                    catalog = self.open_catalog(target, current.catalog)
                    check_compatible(current.catalog, catalog)
                if catalog.manifest.model_version == current.catalog.manifest.model_version:
                    towers = current.towers  # same towers: only the catalogue changed
                else:
                    towers_pending = True
                    towers = pending_towers if pending_towers is not None else self.towers.open(catalog.manifest)
                if not install:
                    self._pending, self._pending_towers = catalog, towers if towers_pending else None
                    return ReloadResult("ready", current.catalog.version)
                if towers_pending:
                    self._retire(current.towers)
            except (ArtifactError, OSError, ValueError, GpuUnavailable) as err:
                if towers_pending:
                    self._pending = catalog
                metrics.INDEX_RELOADS.labels("refused").inc()
                log.error("index reload refused, still serving %s: %s", current.catalog.version, err)
                return ReloadResult("refused", current.catalog.version, str(err), towers_pending)
            except Exception as err:  # faiss's RuntimeError, a KeyError or BadZipFile from a damaged file, ...
                metrics.INDEX_RELOADS.labels("failed").inc()
                log.exception("index reload failed, still serving %s", current.catalog.version)
                return ReloadResult("failed", current.catalog.version, f"{type(err).__name__}: {err}")
            self._released = self._install(Serving(catalog, towers))
            metrics.INDEX_RELOADS.labels("swapped").inc()
            log.info(
                "index swapped: %s -> %s (%d items, model version %d)",
                current.catalog.version,
                catalog.version,
                len(catalog.article_ids),
                catalog.manifest.model_version,
            )
            return ReloadResult("swapped", catalog.version)

    def start_watching(self) -> None:
        """Follow the index root's CURRENT in a thread (when the configured index is a root)."""
        if self.config.index_poll_s > 0 and (Path(self.config.index_dir) / artifacts.CURRENT_FILE).is_file():
            self._watcher = threading.Thread(target=self._watch, name="index-watch", daemon=True)
            self._watcher.start()

    def _watch(self) -> None:
        """Poll CURRENT; swap when it names a new version. A version refused because Triton does not serve
        its towers yet is retried with backoff; any other refusal or failure waits for CURRENT to change.
        Nothing ends the thread but stop(): a dead watcher would leave a pod serving an old index while
        looking healthy."""
        pointer = Path(self.config.index_dir) / artifacts.CURRENT_FILE
        seen, retry_at, backoff = None, 0.0, TOWERS_RETRY_S
        while not self._stop_watching.wait(self.config.index_poll_s):
            try:
                if not self.out_of_rotation:
                    self._announce()
                name = pointer.read_text().strip()
                if name == seen and time.monotonic() < retry_at:
                    continue
                if name != seen:
                    seen, backoff = name, TOWERS_RETRY_S
                result = self._reload_in_turn()
                if result is None:  # another replica is swapping: ask again at the next poll
                    retry_at = 0.0
                elif result.status == "ready":  # loaded in a turn that overran: installed in a new turn
                    retry_at = 0.0
                elif result.status == "refused" and result.towers_pending:
                    retry_at, backoff = time.monotonic() + backoff, min(2 * backoff, TOWERS_RETRY_MAX_S)
                else:
                    retry_at = float("inf")  # swapped, unchanged, or bad: read again when CURRENT changes
            except Exception:  # reading CURRENT (OSError) or anything reload() did not expect
                metrics.INDEX_RELOADS.labels("failed").inc()
                log.exception("index watch: checking %s failed; trying again in %.0f s", pointer, backoff)
                retry_at = time.monotonic() + backoff
                backoff = min(2 * backoff, TOWERS_RETRY_MAX_S)

    def _reload_in_turn(self) -> ReloadResult | None:
        """reload(), in this replica's turn where it loads or installs a new version; None while another replica
        holds the turn. A version loaded already that waits for its towers is installed in a turn too, once
        Triton serves them: asking Triton takes no turn, so a replica is not taken out of rotation to hear no."""
        try:
            target = artifacts.resolve_index_dir(self.config.index_dir)
        except (ArtifactError, OSError):
            return self.reload()  # it reports why CURRENT cannot be read; nothing is loaded
        if self.serving is not None and _same(self.serving.catalog, target):
            return self.reload()  # unchanged
        if self._pending is not None and _same(self._pending, target):
            result = self.reload(install=False)
            if result.status != "ready":
                return result
        return self._swap_in_turn()

    def _swap_in_turn(self) -> ReloadResult | None:
        """reload() once this replica has the turn (None while another holds it), out of rotation meanwhile
        where another replica serves. A load that outlasts the turn (--swap-turn-max-s) is kept, not installed:
        "ready", and the next poll installs it in a new turn."""
        turn = self.turns.take()
        if turn is None:
            return None
        state = _TurnState()
        timer = threading.Timer(self.config.swap_turn_max_s, self._overrun, args=(turn, state))
        timer.daemon = True
        timer.start()
        with turn:
            try:
                if turn.drain:
                    with self._rotation_lock:
                        self.out_of_rotation = "loading a new index version (another replica serves meanwhile)"
                        self.turns.leave()
                    log.info(
                        "out of rotation for %.0f s before loading the new index version", self.config.swap_drain_s
                    )
                    if self._stop_watching.wait(self.config.swap_drain_s):
                        return None  # stopping: nothing to load for
                result = self.reload(install=False)
                with self._rotation_lock:
                    state.settled = not state.overran
                if result.status != "ready" or not state.settled:
                    return result
                result = self.reload()  # installs what was just loaded and checked
                if self.out_of_rotation and result.status == "swapped":
                    self._warm_up()
                return result
            finally:
                timer.cancel()
                state.ended.set()
                self._rejoin()

    def _overrun(self, turn: Turn, state: _TurnState) -> None:
        """The turn ran past --swap-turn-max-s (a load stuck on its volume): back in rotation on the old version,
        the turn handed on, and this thread heartbeats while the watcher's thread is still in the load."""
        with self._rotation_lock:
            if state.settled or state.ended.is_set():
                return
            state.overran = True
            log.warning(
                "index swap turn over %g s: rejoining rotation and handing the turn on; the load goes on, and a later "
                "turn installs it",
                self.config.swap_turn_max_s,
            )
            self._rejoin()
        turn.hand_on()
        while not state.ended.wait(max(self.config.index_poll_s, 0.01)):
            self._announce()

    def _rejoin(self) -> None:
        with self._rotation_lock:
            if self.out_of_rotation:
                self.out_of_rotation = ""
                self._announce()
                log.info("back in rotation, serving %s", self.serving.catalog.version if self.serving else "-")

    def _warm_up(self) -> None:
        """Out of rotation after a swap: let the replaced version's heap go back to the OS, then read the new
        version's memory-mapped files into the page cache, so that the replica rejoins without faulting them in."""
        started = time.perf_counter()
        if self._released is not None:
            self._released.join(self._grace_s)
        assert self.serving is not None
        try:
            read = self.serving.catalog.prefetch() / 2**20
        except OSError as err:  # swapped all the same: it rejoins and faults the pages in under load
            log.warning("reading %s before rejoining failed (%s): rejoining cold", self.serving.catalog.version, err)
            return
        log.info("read %.0f MiB of the index version before rejoining in %.1f s", read, time.perf_counter() - started)

    def _retire(self, towers: Towers | None) -> None:
        """Close these tower clients once requests that may use them have long finished (close_retired)."""
        if towers is not None:
            self._retired.append((time.monotonic(), towers))

    @property
    def _grace_s(self) -> float:
        """Long enough for every request that started on a replaced version to have finished."""
        return 4 * self.config.triton_timeout_s * (self.config.triton_retries + 1)

    async def close_retired(self) -> None:
        """Close replaced tower clients once requests that started on them have long finished."""
        while self._retired and time.monotonic() - self._retired[0][0] > self._grace_s:
            _, towers = self._retired.pop(0)
            await towers.close()

    def stop(self) -> None:
        with self._rotation_lock:
            self._stop_watching.set()
            self.turns.leave()


def _same(catalog: Catalog, index_dir: Path) -> bool:
    return catalog.index_dir.resolve() == index_dir.resolve()


def check_compatible(old: Catalog, new: Catalog) -> None:
    """A hot swap keeps what the process was started with: dimension, metric, history length, tokenizer."""
    problem = artifacts.swap_problem(old.manifest, new.manifest)
    if problem:
        raise ArtifactError(f"{new.index_dir}: {problem}; restart the retriever for such a change")
