"""Keyword search over the articles' captions (BM25): the lexical half of hybrid text search.

Built with bm25s: maintained, needs only numpy, scores the whole catalogue from sparse matrices in
about a millisecond per query, and saves to plain .npy/.json files that an index version's manifest
checksums like its other files. Export builds one per index version from the same captions the item
tower embeds (`captions.json` keeps them, so a catalogue update can rebuild it with its new rows).

A catalogue update appends its new rows as a block instead of building everything again (at 10M articles a
build takes ~16 minutes and 16 GB: docs/lexical-scale.md). A block is a bm25s index of its own rows whose
scores use the base index's statistics (document count, mean length, each word's document frequency; a word the
base lacks counts its documents in the block), so its rows score as the base's would; the base's rows are not
scored again. When the blocks would be more than MAX_BLOCKS or hold more than MAX_APPENDED_SHARE of the base's
rows, the next update builds the whole index again: the statistics of a catalogue that grew by a tenth are no
longer the base's.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

import bm25s
import numpy as np
import scipy.sparse

from twotower import ranking

log = logging.getLogger("serving.lexical")

CAPTIONS_FILE = "captions.json"
STATISTICS_FILE = "statistics.json"  # a base's document count and mean length, which its blocks are scored by
MAX_BLOCKS = 8
MAX_APPENDED_SHARE = 0.1


def tokenize(texts: list[str]) -> list[list[str]]:
    """Lower-cased words of two or more letters, English stop words removed (the index and queries alike)."""
    return bm25s.tokenize(texts, stopwords="en", return_ids=False, show_progress=False)


@dataclasses.dataclass(frozen=True)
class Statistics:
    """What a BM25 weight depends on besides the row itself: the corpus's size and mean length in words."""

    documents: int
    mean_length: float


class Segment:
    """One bm25s index: the base's rows, or a block of rows appended after them."""

    def __init__(self, bm25: bm25s.BM25, captions: list[str] | None = None, directory: Path | None = None):
        self.bm25 = bm25
        self._captions = captions  # row -> the text it was indexed by; None: still on disk in `directory`
        self.directory = directory  # where it was loaded from (None: built in memory)

    @property
    def captions(self) -> list[str]:
        """Read from disk on first use: only a rebuild needs them (105k strings the retriever never reads)."""
        if self._captions is None:
            assert self.directory is not None
            self._captions = json.loads((self.directory / CAPTIONS_FILE).read_text())
        return self._captions

    def __len__(self) -> int:
        return int(self.bm25.scores["num_docs"])

    def save(self, directory: Path) -> list[str]:
        directory.mkdir(parents=True, exist_ok=True)
        self.bm25.save(str(directory), show_progress=False)
        (directory / CAPTIONS_FILE).write_text(json.dumps(self.captions))
        return sorted(path.name for path in directory.iterdir())

    @classmethod
    def load(cls, directory: Path, mmap: bool) -> Segment:
        return cls(bm25s.BM25.load(str(directory), mmap=mmap, show_progress=False), directory=Path(directory))


class LexicalIndex:
    """The base index's rows, then each appended block's, in row order."""

    def __init__(self, segments: Sequence[Segment], statistics: Statistics | None):
        self.segments = list(segments)
        self.statistics = statistics  # of the base; None: built before they were kept (an update rebuilds it)

    @property
    def base(self) -> Segment:
        return self.segments[0]

    @property
    def captions(self) -> list[str]:
        if len(self.segments) == 1:
            return self.base.captions
        return [caption for segment in self.segments for caption in segment.captions]

    # KServe's --workers N pickles the loaded index into each worker. An unpickled BM25 object scored
    # ~20x slower (2.0 vs 0.1 ms per query, 105k articles): each worker loads the immutable files again.
    def __getstate__(self) -> dict[str, Any]:
        directories = [segment.directory for segment in self.segments]
        if any(directory is None for directory in directories):
            return self.__dict__.copy()
        return {"directory": directories[0], **({"blocks": directories[1:]} if len(directories) > 1 else {})}

    def __setstate__(self, state: dict[str, Any]) -> None:
        if "segments" in state:
            self.__dict__.update(state)
        else:
            self.__dict__.update(LexicalIndex.load(state["directory"], state.get("blocks", ())).__dict__)

    @classmethod
    def build(cls, captions: list[str]) -> LexicalIndex:
        tokens = tokenize(captions)
        bm25 = bm25s.BM25()
        bm25.index(tokens, show_progress=False)
        statistics = Statistics(len(tokens), float(np.mean([len(words) for words in tokens])) if tokens else 0.0)
        return cls([Segment(bm25, list(captions))], statistics)

    def save(self, directory: Path) -> list[str]:
        """Write a built index (one segment) into `directory` (made here); returns the file names written.
        A block is written into the version that appended it (`new_block().save(...)`)."""
        if len(self.segments) > 1:
            raise ValueError("an index with appended blocks is saved block by block (new_block)")
        directory.mkdir(parents=True, exist_ok=True)
        if self.statistics is not None:
            (directory / STATISTICS_FILE).write_text(json.dumps(dataclasses.asdict(self.statistics)))
        return self.base.save(directory)  # its files and the statistics

    @classmethod
    def load(cls, directory: Path, blocks: Sequence[Path] = (), mmap: bool = True) -> LexicalIndex:
        """`blocks`: the directories of the blocks appended after the base in `directory`, in row order.
        `mmap`: the score matrix stays in its files, mapped read-only (docs/lexical-scale.md: 1,988 MiB
        of the process's own memory at 10M articles otherwise). Its pages are then shared by the KServe
        workers and reclaimable, and a hot swap maps the new version's beside them instead of copying it in."""
        directory = Path(directory)
        statistics_file = directory / STATISTICS_FILE
        statistics = Statistics(**json.loads(statistics_file.read_text())) if statistics_file.is_file() else None
        return cls([Segment.load(path, mmap) for path in (directory, *blocks)], statistics)

    def appended(self, captions: list[str]) -> LexicalIndex:
        """This index with `captions` as rows after its own: a new block, or everything built again (the module's
        docstring says when). This index is not changed."""
        rows = sum(len(segment) for segment in self.segments[1:]) + len(captions)
        why = ""
        if self.statistics is None:
            why = "its base was written before blocks"
        elif (self.base.bm25.method, self.base.bm25.idf_method) != ("lucene", "lucene"):
            why = f"blocks are scored as Lucene's BM25, its base as {self.base.bm25.method}"
        elif len(self.segments) > MAX_BLOCKS:
            why = f"it has {MAX_BLOCKS} blocks"
        elif rows > MAX_APPENDED_SHARE * self.statistics.documents:
            why = f"its blocks would hold {rows} rows, over {MAX_APPENDED_SHARE:.0%} of the base's {len(self.base)}"
        if why:
            log.info("keyword index built again over %d rows: %s", len(self) + len(captions), why)
            return LexicalIndex.build(self.captions + list(captions))
        return LexicalIndex([*self.segments, self._block(captions)], self.statistics)

    def new_block(self) -> Segment | None:
        """The block `appended` made and nobody saved yet (None when there is none)."""
        last = self.segments[-1]
        return last if len(self.segments) > 1 and last.directory is None else None

    def _block(self, captions: list[str]) -> Segment:
        """A bm25s index of `captions` whose weights are the base's: Lucene's BM25 (bm25s' default, which the
        base was built with), idf = log(1 + (N - df + 0.5) / (df + 0.5)), tf / (tf + k1 (1 - b + b len / mean))."""
        assert self.statistics is not None
        base = self.base.bm25
        vocabulary: dict[str, int] = {}
        documents, words, counts, lengths = [], [], [], []
        for document, tokens in enumerate(tokenize(captions)):
            for word, count in Counter(tokens).items():
                documents.append(document)
                words.append(vocabulary.setdefault(word, len(vocabulary)))
                counts.append(count)
            lengths.append(len(tokens))
        in_base = np.diff(base.scores["indptr"])  # a column per word: the base's documents that hold it
        frequency = np.bincount(np.asarray(words, dtype=np.int64), minlength=len(vocabulary))
        for word, column in vocabulary.items():
            if word in base.vocab_dict:
                frequency[column] = in_base[base.vocab_dict[word]]
        vocabulary[""] = len(vocabulary)  # a column of no rows, as bm25s adds: get_scores needs one column at least
        # Rounded where bm25s rounds (idf to its dtype, then the rest in it), so a row scores bit for bit as its copy
        # in the base: rows that tie there tie here
        n = self.statistics.documents
        idf = np.log(1.0 + (n - frequency + 0.5) / (frequency + 0.5)).astype(base.dtype)
        tf = np.asarray(counts, dtype=base.dtype)
        length = np.asarray(lengths)[documents]
        norm = (base.k1 * (1.0 - base.b + base.b * length / max(self.statistics.mean_length, 1e-9))).astype(base.dtype)
        matrix = scipy.sparse.csc_matrix(
            (idf[words] * (tf / (norm + tf)), (documents, words)),
            shape=(len(captions), len(vocabulary)),
        )
        bm25 = bm25s.BM25(k1=base.k1, b=base.b, delta=base.delta, method=base.method, dtype=base.dtype)
        bm25.scores = {
            "data": matrix.data,
            "indices": matrix.indices.astype(base.int_dtype),
            "indptr": matrix.indptr.astype(base.int_dtype),
            "num_docs": len(captions),
        }
        bm25.vocab_dict = vocabulary
        bm25.unique_token_ids_set = set(vocabulary.values())
        bm25.nonoccurrence_array = None
        return Segment(bm25, list(captions))

    def __len__(self) -> int:
        return sum(len(segment) for segment in self.segments)

    def scores(self, text: str) -> np.ndarray:
        """float32 [N]: every row's BM25 score for `text` (0: no word matches; all 0 for stop words only)."""
        words = tokenize([text])[0]
        if not words:
            return np.zeros(len(self), dtype=np.float32)
        parts = [np.asarray(segment.bm25.get_scores(words), dtype=np.float32) for segment in self.segments]
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

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
