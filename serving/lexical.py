"""Keyword search over the articles' captions (BM25): the lexical half of hybrid text search.

Built with bm25s: maintained, needs only numpy, scores the whole catalogue from sparse matrices in
about a millisecond per query, and saves to plain .npy/.json files that an index version's manifest
checksums like its other files. Export builds one per index version from the same captions the item
tower embeds (`captions.json` keeps them, so a catalogue update can rebuild it with its new rows).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import bm25s
import numpy as np

from twotower import ranking

log = logging.getLogger("serving.lexical")

CAPTIONS_FILE = "captions.json"


def tokenize(texts: list[str]) -> list[list[str]]:
    """Lower-cased words of two or more letters, English stop words removed (the index and queries alike)."""
    return bm25s.tokenize(texts, stopwords="en", return_ids=False, show_progress=False)


class LexicalIndex:
    def __init__(self, bm25: bm25s.BM25, captions: list[str]):
        self.bm25 = bm25
        self.captions = captions  # row -> the text it was indexed by

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
    def load(cls, directory: Path) -> LexicalIndex:
        bm25 = bm25s.BM25.load(str(directory), show_progress=False)
        return cls(bm25, json.loads((directory / CAPTIONS_FILE).read_text()))

    def __len__(self) -> int:
        return len(self.captions)

    def search(self, text: str, k: int, allowed: np.ndarray) -> np.ndarray:
        """Rows of the k best-matching allowed articles (fewer when fewer match any word), best first."""
        words = tokenize([text])[0]
        if not words:  # stop words only: nothing to match
            return np.empty(0, dtype=np.int64)
        scores = self.bm25.get_scores(words)
        candidates = np.flatnonzero(allowed & (scores > 0))
        _, rows = ranking.top_k(scores[candidates], candidates, k)
        return rows[rows >= 0]
