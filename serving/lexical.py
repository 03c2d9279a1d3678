"""Keyword search over the articles' captions (BM25): the lexical half of hybrid text search.

Built with bm25s: maintained, needs only numpy, scores the whole catalogue from sparse matrices in
about a millisecond per query, and saves to plain .npy/.json files that an index version's manifest
checksums like its other files. Export builds one per index version from the same captions the item
tower embeds (`captions.json` keeps them, so a catalogue update can rebuild it with its new rows).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import bm25s
import numpy as np

from twotower import ranking

CAPTIONS_FILE = "captions.json"


def tokenize(texts: list[str]) -> list[list[str]]:
    """Lower-cased words of two or more letters, English stop words removed (the index and queries alike)."""
    return bm25s.tokenize(texts, stopwords="en", return_ids=False, show_progress=False)


class LexicalIndex:
    def __init__(self, bm25: bm25s.BM25, captions: list[str] | None = None, directory: Path | None = None):
        self.bm25 = bm25
        self._captions = captions  # row -> the text it was indexed by; None: still on disk in `directory`
        self.directory = directory  # where it was loaded from (None: built in memory)

    @property
    def captions(self) -> list[str]:
        """Read from disk on first use: only a catalogue update needs them (105k strings the retriever never reads)."""
        if self._captions is None:
            assert self.directory is not None
            self._captions = json.loads((self.directory / CAPTIONS_FILE).read_text())
        return self._captions

    # KServe's --workers N pickles the loaded index into each worker. An unpickled BM25 object scored
    # ~20x slower (2.0 vs 0.1 ms per query, 105k articles): each worker loads the immutable files again.
    def __getstate__(self) -> dict[str, Any]:
        if self.directory is None:
            return self.__dict__.copy()
        return {"directory": self.directory}

    def __setstate__(self, state: dict[str, Any]) -> None:
        if "bm25" in state:
            self.__dict__.update(state)
        else:
            self.__dict__.update(LexicalIndex.load(state["directory"]).__dict__)

    @classmethod
    def build(cls, captions: list[str]) -> LexicalIndex:
        bm25 = bm25s.BM25()
        bm25.index(tokenize(captions), show_progress=False)
        return cls(bm25, list(captions))

    def save(self, directory: Path) -> list[str]:
        """Write into `directory` (made here); returns the file names written."""
        directory.mkdir(parents=True, exist_ok=True)
        self.bm25.save(str(directory), show_progress=False)
        (directory / CAPTIONS_FILE).write_text(json.dumps(self.captions))
        return sorted(path.name for path in directory.iterdir())

    @classmethod
    def load(cls, directory: Path, mmap: bool = True) -> LexicalIndex:
        """`mmap`: the score matrix stays in its files, mapped read-only (docs/lexical-scale.md: 1,988 MiB
        of the process's own memory at 10M articles otherwise). Its pages are then shared by the KServe
        workers and reclaimable, and a hot swap maps the new version's beside them instead of copying it in."""
        bm25 = bm25s.BM25.load(str(directory), mmap=mmap, show_progress=False)
        return cls(bm25, directory=Path(directory))

    def __len__(self) -> int:
        return int(self.bm25.scores["num_docs"])

    def scores(self, text: str) -> np.ndarray:
        """float32 [N]: every row's BM25 score for `text` (0: no word matches; all 0 for stop words only)."""
        words = tokenize([text])[0]
        if not words:
            return np.zeros(len(self), dtype=np.float32)
        return np.asarray(self.bm25.get_scores(words), dtype=np.float32)

    def search(self, text: str, k: int, allowed: np.ndarray, scores: np.ndarray | None = None) -> np.ndarray:
        """Rows of the k best-matching allowed articles (fewer when fewer match any word), best first;
        `scores`: this text's `scores`, when the caller has them."""
        scores = self.scores(text) if scores is None else scores
        candidates = np.flatnonzero(allowed & (scores > 0))
        _, rows = ranking.top_k(scores[candidates], candidates, k)
        return rows[rows >= 0]


def hybrid_rank(
    space: ranking.ItemSpace, lexical: LexicalIndex, query: np.ndarray, text: str, request: ranking.RankRequest
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """A text query as served: BM25 over the rows the request may return, fused with the dense list
    (twotower.ranking.hybrid)."""
    depth = max(ranking.HYBRID_DEPTH, request.fetch)
    scores = lexical.scores(text)
    rows = lexical.search(text, depth, ranking.visible(space, request), scores)
    return ranking.hybrid(space, query, request, rows, scores)
