"""The index directory: the contract between `export` (writer) and `retriever` (reader).

An index root holds immutable versions and a pointer to the served one:
    <root>/CURRENT          the served version's directory name, replaced atomically
    <root>/v0001/, v0002/   one index version each (a catalogue update writes the next one)
A path given to a reader may be the root or a version directory itself.

One version's layout (written to a temporary sibling and renamed, so readers never see half of it):
    index.faiss     FAISS index over the item vectors, inner product (vectors are L2-normalised); all rows but
                    the last `unindexed_rows` of the manifest, which a catalogue update added and the retriever
                    scores exactly beside the index (serving.exact_rows)
    vectors.npy     float32 [N, D] item vectors from the exported item tower (histories, "similar items")
    vector_blocks/  optional: rows a catalogue update appended, one `<version>.npy` per update, read after
                    vectors.npy in the order the manifest's `vector_blocks` lists (twotower.files.RowBlocks)
    items/          item metadata, row i = FAISS id i: memory-mapped dictionary-encoded columns
                    (twotower.item_table; every file checksummed as `items/<name>`); versions written
                    before it have items.json (the same columns as JSON lists), still read
    histories.npz   known customers' last L purchases (see twotower.data.histories) and their user vectors
    score_head.json weights of the 2-layer score head (cosine -> score), the repeat boost and the popularity
                    prior's weight, evaluated with numpy
    item_bias.npy   optional: float32 [N] popularity prior per article (twotower.popularity); when present the
                    FAISS index holds [vector, bias] rows (dimension D + 1)
    excluded.json   optional: rows hidden from results (removed or replaced articles), no rebuild needed
    second_stage.npz optional: per-article sales and co-purchases the second stage reads (twotower.second_stage,
                    which owns its arrays); its weights are in score_head.json. It may hold fewer rows than the
                    index: articles a catalogue update added after it, unsold
    lexical/        optional: the BM25 keyword index over the rows' captions (serving.lexical), for hybrid
                    text search; every file in it is checksummed as `lexical/<name>`. A catalogue update's rows
                    are a block of their own, `lexical/blocks/<version>/`, read after it in the order the
                    manifest's `lexical_blocks` lists
    manifest.json   written last: model version, dimension, metric, counts, sha256 of every file

Only numpy here: the retriever imports this without torch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from twotower.files import sha256_file, write_atomically, write_json
from twotower.item_table import ItemTable
from twotower.popularity import PopularityPrior
from twotower.repeats import RepeatBoost
from twotower.second_stage import StageWeights

FORMAT_VERSION = 1
# Index types whose FAISS index holds compressed codes: searches re-rank candidates from the full vectors.
COMPRESSED_INDEX_TYPES = ("ivf-sq8", "ivf-pq", "ivf-pq-fastscan")
# IVF lists of float16 vectors (faiss' fp16 scalar quantizer), opt-in: half the lists' bytes, and served as found
# (not re-ranked), so similarities are float16 approximations (at most 2.2e-4 off on H&M) and near-ties may swap
# (4.7% of top-12 lists not in exact order; the rows the same). On H&M (105k rows, nprobe 128, one thread, 1,000
# customers searched on both in turn) Catalog.search took 0.07-0.10 ms less than "ivf" (0.78-0.82 vs 0.88-0.90 ms at
# k 12); re-scoring the found rows exactly would cost 0.08-0.13 ms, the whole gain (benchmarks/LEVERS.md).
HALF_INDEX_TYPE = "ivf-fp16"
# The same trained lists (coarse quantizer) for each; what a list stores differs: vectors, float16 vectors, codes.
IVF_INDEX_TYPES = ("ivf", HALF_INDEX_TYPE, *COMPRESSED_INDEX_TYPES)
PADDED_INDEX_TYPES = (HALF_INDEX_TYPE, *COMPRESSED_INDEX_TYPES)  # rows padded to a multiple of 16 columns
# How vectors.npy stores the item vectors. Every read of them (a compressed index's exact re-rank, the user
# tower's history inputs, boosted rows, the second stage) gathers a few hundred random rows, and at 10M articles
# float32's 4.9 GB of them did not fit the page cache beside the retriever under a 4 Gi pod limit: 254,325 pages
# read back from disk in a 60 s run (docs/scale.md). float16 halves the file, one copy read by every path
# (a float16 copy beside float32 for the re-rank alone added a file instead); gathered rows are scored in float32.
VECTOR_DTYPES = ("float32", "float16")


def index_dimension(dim: int, prior: bool, index_type: str) -> int:
    """Columns of the FAISS index's rows: the vector, the popularity prior's coordinate when there is one,
    and for compressed and float16 types zeros up to a multiple of 16: faiss' SIMD kernels for 8-bit and
    float16 codes need a multiple of 8 (1M articles, 129 columns: 9.3 ms per IVF-SQ8 query on 1 thread, the
    scalar fallback, docs/scale.md; H&M in float16 at 129 columns 2.9-3.5 ms against 0.6-0.7 padded, where 136
    and 144 cost the same), and 144 = 48 x 3 gives IVF-PQ a code size faiss' GPU kernels have."""
    columns = dim + prior
    return -(-columns // 16) * 16 if index_type in PADDED_INDEX_TYPES else columns


MANIFEST_FILE = "manifest.json"
INDEX_FILE = "index.faiss"
VECTORS_FILE = "vectors.npy"
VECTOR_BLOCKS_DIR = "vector_blocks"
# An addition to a version whose vectors are already this many files rewrites them as one vectors.npy: every
# gather splits its rows by file, and a version of many small files is a tree of links nobody needs.
MAX_VECTOR_BLOCKS = 8
ITEMS_DIR = "items"
ITEMS_FILE = "items.json"  # versions written before items/: read, never written
HISTORIES_FILE = "histories.npz"
SCORE_HEAD_FILE = "score_head.json"
EXCLUDED_FILE = "excluded.json"
ITEM_BIAS_FILE = "item_bias.npy"
SECOND_STAGE_FILE = "second_stage.npz"
LEXICAL_DIR = "lexical"
LEXICAL_BLOCKS_DIR = f"{LEXICAL_DIR}/blocks"
ARTIFACT_FILES = (INDEX_FILE, VECTORS_FILE, HISTORIES_FILE, SCORE_HEAD_FILE)  # + items/ (or items.json)
CURRENT_FILE = "CURRENT"
VERSION_PREFIX = "v"
METRIC_INNER_PRODUCT = "inner_product"

ITEM_MODEL = "item_tower"
USER_MODEL = "user_tower"
QUERY_MODEL = "query_tower"


class ArtifactError(RuntimeError):
    """An index directory is missing, corrupt, or does not match the serving towers."""


@dataclasses.dataclass
class Manifest:
    model_version: int
    dim: int
    metric: str
    item_count: int
    customer_count: int
    max_history: int
    context_length: int
    clip_model: str
    # flat | hnsw | ivf | ivf-fp16 | ivf-sq8 | ivf-pq | ivf-pq-fastscan (COMPRESSED_INDEX_TYPES: codes, re-ranked)
    index_type: str
    reference_day: int  # day number (days since epoch) of the latest purchase in the data
    data_source: str
    files: dict[str, str]  # file name -> sha256
    tower_checksums: dict[str, str]  # Triton model name -> sha256 of its model.pt
    trained_until: str = ""  # YYYY-MM-DD: the towers saw no purchase on or after this day ("" = all data)
    unseen_customer_share: float = 0.0  # customers training never saw (twotower.data.customers)
    item_tower_precision: str = "fp32"  # or int8: the exported item tower's Linear layers (CPU serving)
    vector_dtype: str = "float32"  # of vectors.npy: one of VECTOR_DTYPES
    # The files holding the item vectors, in row order, when a catalogue update appended rows as a block of their
    # own (VECTOR_BLOCKS_DIR); [] = vectors.npy alone (vector_files)
    vector_blocks: list[str] = dataclasses.field(default_factory=list)
    # The keyword index's blocks after lexical/'s own rows (LEXICAL_BLOCKS_DIR/<version>), in row order
    lexical_blocks: list[str] = dataclasses.field(default_factory=list)
    # The last rows, which index.faiss does not hold: a catalogue update's additions (serving.exact_rows)
    unindexed_rows: int = 0
    index_version: str = ""  # this version's directory name under the index root
    parent_version: str = ""  # the version a catalogue update started from ("" = a full export)
    item_model: str = ITEM_MODEL
    user_model: str = USER_MODEL
    query_model: str = ""  # the model text queries go through: "" = the item tower (no distilled query tower)
    # IVF lists to probe at the prior weights that need more than the default served nprobe (128), measured on the
    # version's stored customers when it was written (serving.nprobe.ProbeSetting's fields); [] = the retriever's
    # --ivf-nprobe for all
    ivf_probes: list[dict[str, float]] = dataclasses.field(default_factory=list)
    format_version: int = FORMAT_VERSION

    @property
    def text_query_model(self) -> str:
        return self.query_model or self.item_model


def vector_files(manifest: Manifest) -> list[str]:
    """The files of a version's item vectors, in row order."""
    return list(manifest.vector_blocks) or [VECTORS_FILE]


def write_manifest(index_dir: Path, manifest: Manifest) -> None:
    raw = dataclasses.asdict(manifest)
    for field in ("vector_blocks", "lexical_blocks", "unindexed_rows", "ivf_probes"):
        if not raw[field]:  # a version without them stays readable by a retriever from before them
            del raw[field]
    write_json(index_dir / MANIFEST_FILE, raw)


def read_manifest(index_dir: Path | str) -> Manifest:
    path = Path(index_dir) / MANIFEST_FILE
    if not path.is_file():
        raise ArtifactError(f"{path}: no manifest (not an index directory written by `python -m export`)")
    try:
        raw: dict[str, Any] = json.loads(path.read_text())
        manifest = Manifest(**raw)
    except (json.JSONDecodeError, TypeError) as err:
        raise ArtifactError(f"{path}: unreadable manifest ({err})") from err
    if manifest.format_version != FORMAT_VERSION:
        raise ArtifactError(f"{path}: format_version {manifest.format_version}, this code reads {FORMAT_VERSION}")
    if manifest.metric != METRIC_INNER_PRODUCT:
        raise ArtifactError(f"{path}: metric {manifest.metric!r} is not supported (expected {METRIC_INNER_PRODUCT!r})")
    if manifest.vector_dtype not in VECTOR_DTYPES:
        raise ArtifactError(f"{path}: vector_dtype {manifest.vector_dtype!r} is not one of {VECTOR_DTYPES}")
    problem = _vector_blocks_problem(manifest)
    if problem:
        raise ArtifactError(f"{path}: vector_blocks {manifest.vector_blocks}: {problem}")
    problem = _lexical_blocks_problem(manifest)
    if problem:
        raise ArtifactError(f"{path}: lexical_blocks {manifest.lexical_blocks}: {problem}")
    if type(manifest.unindexed_rows) is not int or not 0 <= manifest.unindexed_rows <= manifest.item_count:
        raise ArtifactError(f"{path}: unindexed_rows {manifest.unindexed_rows} not in 0..{manifest.item_count}")
    return manifest


# What a retriever keeps from the version it was started with: a swap to a version that differs in one needs a
# restart (retriever.index_slot.check_compatible)
SWAP_FIXED_FIELDS = ("dim", "metric", "max_history", "context_length", "clip_model")


def swap_problem(served: Manifest, new: Manifest) -> str:
    """Why a retriever serving `served` would refuse to swap to `new` ("" when it would not)."""
    for field in SWAP_FIXED_FIELDS:
        if getattr(served, field) != getattr(new, field):
            return f"{field} {getattr(new, field)!r} differs from the served index's {getattr(served, field)!r}"
    return ""


def _vector_blocks_problem(manifest: Manifest) -> str:
    """What is wrong with a manifest's list of vector files ("" when nothing): its order is the rows' order."""
    blocks = manifest.vector_blocks
    in_files = sorted(name for name in manifest.files if part_of(name) == VECTOR_BLOCKS_DIR)
    if not blocks:
        return f"none listed, but the version has {in_files}" if in_files else ""
    if blocks[0] != VECTORS_FILE or len(set(blocks)) != len(blocks):
        return f"not {VECTORS_FILE} first, then each block once"
    if sorted(blocks[1:]) != in_files:
        return f"the blocks listed are not the version's {VECTOR_BLOCKS_DIR}/ files {in_files}"
    return ""


def _lexical_blocks_problem(manifest: Manifest) -> str:
    """What is wrong with a manifest's list of keyword index blocks ("" when nothing): not each block directory of
    the version once."""
    depth = LEXICAL_BLOCKS_DIR.count("/") + 2
    in_files = sorted(
        {"/".join(name.split("/")[:depth]) for name in manifest.files if name.startswith(LEXICAL_BLOCKS_DIR + "/")}
    )
    if len(set(manifest.lexical_blocks)) != len(manifest.lexical_blocks) or sorted(manifest.lexical_blocks) != in_files:
        return f"not each of the version's {LEXICAL_BLOCKS_DIR}/ directories {in_files} once"
    return ""


def part_of(name: str) -> str:
    """The top-level entry of a version that a manifest file name belongs to: `items/<name>` is part of ITEMS_DIR,
    a file its own part. A catalogue update shares a parent's unchanged parts (export.catalogue_index)."""
    return name.split("/", 1)[0]


def verify_files(index_dir: Path | str, manifest: Manifest, checked: tuple[Path, Manifest] | None = None) -> None:
    """Every required file and every file the manifest names exists and has the recorded checksum. `checked` is
    another version already verified (its directory and manifest): a file that is the same file as one of its own
    (a hard link: a catalogue update shares what it left unchanged) with the same recorded checksum is not read
    again. Versions are never written after they are published, so its content is what was checked."""
    directory = Path(index_dir)
    for name in dict.fromkeys((*ARTIFACT_FILES, *manifest.files)):
        expected = manifest.files.get(name)
        path = directory / name
        if expected is None:
            raise ArtifactError(f"{directory / MANIFEST_FILE}: no checksum recorded for {name}")
        if not path.is_file():
            raise ArtifactError(f"{path}: missing (manifest lists it)")
        if checked is not None and _same_file_checked(checked, (directory, manifest), name):
            continue
        actual = sha256_file(path)
        if actual != expected:
            raise ArtifactError(f"{path}: checksum {actual[:12]}... does not match the manifest's {expected[:12]}...")


def shares_part(version: tuple[Path, Manifest], other: tuple[Path, Manifest], part: str) -> bool:
    """Every file of `part` (part_of) in `version` is the same file in `other`, with the same recorded checksum, and
    neither has more: what is derived from the part may be taken over from a loaded `other`."""
    names = {name for name in version[1].files if part_of(name) == part}
    return (
        bool(names)
        and names == {name for name in other[1].files if part_of(name) == part}
        and all(_same_file_checked(other, version, name) for name in names)
    )


def _same_file_checked(checked: tuple[Path, Manifest], version: tuple[Path, Manifest], name: str) -> bool:
    """`name` is one file in both versions (a hard link) and both manifests record the same checksum for it."""
    expected = version[1].files.get(name)
    if expected is None or checked[1].files.get(name) != expected:
        return False
    try:
        return (checked[0] / name).samefile(version[0] / name)
    except OSError:
        return False


@dataclasses.dataclass
class ScoreHeadWeights:
    """The trained score head, cosine -> sigmoid(w2 . relu(w1 * cosine + b1) + b2), the boost an
    article the customer bought before gets on its cosine (twotower.repeats) and the weight of the
    popularity prior (twotower.popularity), and the second stage's weights (twotower.second_stage) when
    training fitted one."""

    w1: np.ndarray  # [H]
    b1: np.ndarray  # [H]
    w2: np.ndarray  # [H]
    b2: float
    repeat: RepeatBoost = RepeatBoost()
    prior: PopularityPrior = PopularityPrior()
    stage: StageWeights | None = None

    def __call__(self, cosine: np.ndarray) -> np.ndarray:
        hidden = np.maximum(cosine[..., None] * self.w1 + self.b1, 0.0)
        return 1.0 / (1.0 + np.exp(-(hidden @ self.w2 + self.b2)))

    def to_json(self) -> dict[str, Any]:
        return {
            "w1": self.w1.tolist(),
            "b1": self.b1.tolist(),
            "w2": self.w2.tolist(),
            "b2": float(self.b2),
            "repeat": self.repeat.to_json(),
            "prior": self.prior.to_json(),
            "second_stage": None if self.stage is None else self.stage.to_json(),
        }

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> "ScoreHeadWeights":
        return cls(
            np.asarray(raw["w1"], dtype=np.float32),
            np.asarray(raw["b1"], dtype=np.float32),
            np.asarray(raw["w2"], dtype=np.float32),
            float(raw["b2"]),
            RepeatBoost.from_json(raw.get("repeat")),  # indexes written before repeats: no boost
            PopularityPrior.from_json(raw.get("prior")),  # nor before the prior
            StageWeights.from_json(raw.get("second_stage")),  # nor before the second stage
        )


# -- index root: versions + CURRENT pointer -------------------------------------------------------
def version_name(number: int) -> str:
    return f"{VERSION_PREFIX}{number:04d}"


def _version_numbers(root: Path) -> dict[str, int]:
    """Directory name -> number for every `v<digits>` directory, complete or not."""
    if not root.is_dir():
        return {}
    return {
        p.name: int(p.name[len(VERSION_PREFIX) :])
        for p in root.iterdir()
        if p.is_dir() and p.name.startswith(VERSION_PREFIX) and p.name[len(VERSION_PREFIX) :].isdigit()
    }


def list_versions(root: Path | str) -> list[str]:
    """Complete version directories (they have a manifest), oldest first."""
    numbers = _version_numbers(Path(root))
    return sorted((name for name in numbers if (Path(root) / name / MANIFEST_FILE).is_file()), key=numbers.__getitem__)


def next_version_name(root: Path | str) -> str:
    """One past the highest version directory, complete or not (a failed write never gets reused)."""
    return version_name(max(_version_numbers(Path(root)).values(), default=0) + 1)


def current_version(root: Path | str) -> str:
    pointer = Path(root) / CURRENT_FILE
    if not pointer.is_file():
        raise ArtifactError(f"{pointer}: missing (not an index root written by `python -m export`)")
    name = pointer.read_text().strip()
    if not name or "/" in name or name.startswith("."):
        raise ArtifactError(f"{pointer}: does not name a version directory ({name!r})")
    return name


WRITER_LOCK_FILE = ".writer.lock"
log = logging.getLogger("twotower.artifacts")


def index_root(path: Path | str) -> Path:
    """`path` if it is an index root (it has CURRENT); a clear error otherwise, before anything is written there."""
    path = Path(path)
    if (path / MANIFEST_FILE).is_file():
        raise ArtifactError(f"{path} is an index version: pass its index root ({path.parent})")
    if not (path / CURRENT_FILE).is_file():
        raise ArtifactError(f"{path}: not an index root (no {CURRENT_FILE})")
    return path


@contextlib.contextmanager
def writer_lock(root: Path | str) -> Iterator[None]:
    """One writer of an index root at a time (export, catalogue updates): an update reads CURRENT, builds on it
    and publishes the result; two at once would each publish a version missing the other's changes. Blocks
    until the other writer is done (an advisory flock on the root's .writer.lock, released if it dies)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    with open(root / WRITER_LOCK_FILE, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("another export or catalogue update is writing %s: waiting for it", root)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


PUBLISHED_LOG = ".published"  # "<unix time> <version>" per line: when each version became CURRENT (prune_versions)
# A version CURRENT named this recently stays through prunes: replicas may still serve it (one waiting for its swap
# turn, or for Triton to serve a new model version), and on a shared volume (NFS) a file removed by another
# client can fail a reader that still maps it.
PRUNE_GRACE_S = 3600.0


def publish_version(root: Path | str, name: str) -> None:
    """Point CURRENT at a complete version (atomic replace: readers see the old or the new name)."""
    root = Path(root)
    if not (root / name / MANIFEST_FILE).is_file():
        raise ArtifactError(f"{root / name}: not a complete index version, refusing to publish it")
    write_atomically(root / CURRENT_FILE, name + "\n")
    with open(root / PUBLISHED_LOG, "a") as published:
        published.write(f"{time.time():.0f} {name}\n")


def recently_published(root: Path | str, within_s: float) -> set[str]:
    """The versions CURRENT named in the last `within_s` seconds (PUBLISHED_LOG)."""
    path, now, names = Path(root) / PUBLISHED_LOG, time.time(), set()
    for line in path.read_text().splitlines() if path.is_file() else []:
        stamp, _, name = line.partition(" ")
        if stamp.isdigit() and now - int(stamp) <= within_s:
            names.add(name)
    return names


def prune_versions(root: Path | str, keep: int, grace_s: float | None = None) -> list[str]:
    """Remove the complete versions but the `keep` newest, CURRENT, CURRENT's parent and those CURRENT named in the
    last `grace_s` seconds (PRUNE_GRACE_S): replicas may still serve the last two kinds, and a swap from the parent
    shares its files. Also the staging directories of killed writers. Call it holding `writer_lock`: no write is
    under way then. Files a kept version shares with a removed one stay (hard links: one file, two names). A
    version is renamed out of sight before it is deleted, so a half-deleted one is never listed; one that cannot
    be removed is logged and tried again next time. Returns the names removed, oldest first."""
    if keep < 1:
        raise ValueError(f"keep at least the newest version (keep={keep})")
    root = Path(root)
    complete = list_versions(root)
    current = current_version(root)
    recent = recently_published(root, PRUNE_GRACE_S if grace_s is None else grace_s)
    kept = {*complete[-keep:], current, read_manifest(root / current).parent_version, *recent}
    removed = []
    for name in (name for name in complete if name not in kept):
        doomed = root / f".{name}.removing-{os.getpid()}"
        try:
            os.rename(root / name, doomed)
        except OSError as err:
            log.warning("could not remove version %s (%s): the next prune tries again", name, err)
            continue
        removed.append(name)
    # Renamed versions (this prune's, or one that failed before) and files.staged_directory's of killed writers
    for leftover in (*root.glob(f".{VERSION_PREFIX}*.removing-*"), *root.glob(f".{VERSION_PREFIX}*.partial-*")):
        try:
            if leftover.is_symlink():  # a version linked in from elsewhere: the link goes, not what it names
                leftover.unlink()
            else:
                shutil.rmtree(leftover)
        except OSError as err:
            log.warning("could not remove %s (%s): the next prune tries again", leftover, err)
    log_path = root / PUBLISHED_LOG
    if removed and log_path.is_file():  # the log keeps lines of versions that still exist
        lines = [line for line in log_path.read_text().splitlines() if line.partition(" ")[2] not in removed]
        write_atomically(log_path, "".join(line + "\n" for line in lines))
    return removed


def resolve_index_dir(path: Path | str) -> Path:
    """The version directory to read: `path` itself when it has a manifest, else its CURRENT version."""
    path = Path(path)
    if (path / MANIFEST_FILE).is_file():
        return path
    if (path / CURRENT_FILE).is_file():
        return path / current_version(path)
    raise ArtifactError(f"{path}: neither an index version (no {MANIFEST_FILE}) nor an index root (no {CURRENT_FILE})")


def read_items(index_dir: Path | str, manifest: Manifest) -> ItemTable:
    """The version's item metadata: memory-mapped columns (items/), or items.json from older versions."""
    directory = Path(index_dir)
    prefix = ITEMS_DIR + "/"
    try:
        names = [name[len(prefix) :] for name in manifest.files if name.startswith(prefix)]
        if names:
            return ItemTable.load(directory / ITEMS_DIR, names)
        if ITEMS_FILE in manifest.files:
            return ItemTable.from_columns(json.loads((directory / ITEMS_FILE).read_text()))
    except (ValueError, OSError) as err:
        raise ArtifactError(f"{directory}: unreadable item metadata ({err})") from err
    raise ArtifactError(f"{directory / MANIFEST_FILE}: lists no item metadata ({ITEMS_DIR}/ or {ITEMS_FILE})")


def read_excluded(index_dir: Path | str) -> list[int]:
    path = Path(index_dir) / EXCLUDED_FILE
    if not path.is_file():
        return []
    try:
        rows = json.loads(path.read_text())["rows"]
        return [int(r) for r in rows]
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise ArtifactError(f"{path}: unreadable excluded-rows file ({err})") from err
