"""The Triton model repository: `<repo>/<model>/config.pbtxt` + `<repo>/<model>/<version>/model.pt`.

The contract between export (writer: `write_model`), Triton (NVIDIA's container, or `localtriton`
here) and the towers' readers (serving.towers: names, shapes and `tower_file`). The configs use
`platform: "pytorch_libtorch"`, so NVIDIA's Triton container serves them with its libtorch backend;
locally `localtriton` serves the same files with a Python backend registered under the name
`pytorch`. libtorch conventions: inputs are named like the forward() arguments (in order), outputs
`<name>__<index>`. Both towers share version numbers; an index version names the one it was built
with (twotower.artifacts.Manifest.model_version) and the checksum of each file. A run with a distilled
query tower adds a third model, `query_tower`, with the item tower's inputs and output.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from twotower import artifacts
from twotower.config import ModelConfig
from twotower.files import sha256_file, staged_directory, write_atomically

MODEL_FILE = "model.pt"  # <repository>/<tower>/<model_version>/model.pt, as Triton's libtorch backend reads it
CONFIG_FILE = "config.pbtxt"
EMBEDDING_OUTPUT = "embedding__0"  # both towers' one output: an L2-normalised vector
ITEM_INPUTS = ("input_ids",)  # token ids [context_length]; -1 = variable (pretrained backbones)
WARMUP_LENGTH = 16  # tokens of a variable-length input in warm-up requests: a typical text query
USER_INPUTS = ("history", "history_mask", "history_age")  # [max_history, dim], [max_history], [max_history]


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    name: str
    data_type: str  # Triton type name without the TYPE_ prefix: FP32, INT64, ...
    dims: tuple[int, ...]  # per request, without the batch dimension


@dataclasses.dataclass(frozen=True)
class TritonModelSpec:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    max_batch_size: int = 64
    max_queue_delay_us: int = 200
    # A bounded queue: past it Triton rejects at once (the retriever answers 503 + Retry-After) instead of
    # every caller waiting longer; a request queued longer than the timeout is rejected too (REJECT): the
    # retriever gives up on a call after 2 s (--triton-timeout-s), so running it later would be wasted work.
    # (0.5 s rejected single-row requests of the test suite's 32-way bursts on 2 busy cores.)
    max_queue_size: int = 128
    queue_timeout_us: int = 2_000_000
    instance_count: int = 1
    versions_kept: int = 2  # the previous version stays loaded while its index may still be served
    warmup_runs: int = 3  # TorchScript optimises on its first calls: pay that before serving
    # ... at each batch size dynamic batching forms (the bench's towers ran ~1.5 requests per execution, bursts more)
    warmup_batch_sizes: tuple[int, ...] = (1, 4, 16)


def _tensor_block(specs: tuple[TensorSpec, ...]) -> str:
    entries = [
        f'  {{\n    name: "{s.name}"\n    data_type: TYPE_{s.data_type}\n'
        f"    dims: [ {', '.join(map(str, s.dims))} ]\n  }}"
        for s in specs
    ]
    return "[\n" + ",\n".join(entries) + "\n]"


def _warmup_block(spec: TritonModelSpec) -> str:
    inputs = "".join(
        f'    inputs {{\n      key: "{s.name}"\n      value: {{\n        data_type: TYPE_{s.data_type}\n'
        f"        dims: [ {', '.join(str(WARMUP_LENGTH if d < 0 else d) for d in s.dims)} ]\n"
        "        zero_data: true\n      }\n    }\n"
        for s in spec.inputs
    )
    sizes = sorted({min(size, spec.max_batch_size) for size in spec.warmup_batch_sizes})
    entries = [
        f'  {{\n    name: "zeros_batch_{size}"\n    batch_size: {size}\n    count: {spec.warmup_runs}\n{inputs}  }}'
        for size in sizes
    ]
    return "model_warmup [\n" + ",\n".join(entries) + "\n]\n"


def render_config(spec: TritonModelSpec) -> str:
    return (
        f'name: "{spec.name}"\n'
        'platform: "pytorch_libtorch"\n'
        f"max_batch_size: {spec.max_batch_size}\n"
        f"input {_tensor_block(spec.inputs)}\n"
        f"output {_tensor_block(spec.outputs)}\n"
        "dynamic_batching {\n"
        f"  max_queue_delay_microseconds: {spec.max_queue_delay_us}\n"
        "  default_queue_policy {\n"
        "    timeout_action: REJECT\n"
        f"    default_timeout_microseconds: {spec.queue_timeout_us}\n"
        f"    max_queue_size: {spec.max_queue_size}\n"
        "  }\n"
        "}\n"
        f"instance_group [\n  {{\n    count: {spec.instance_count}\n    kind: KIND_AUTO\n  }}\n]\n"
        f"version_policy: {{ latest: {{ num_versions: {spec.versions_kept} }} }}\n"
        + (_warmup_block(spec) if spec.warmup_runs > 0 else "")
    )


def next_version(repository: Path, model_names: list[str]) -> int:
    """One more than the highest version any of the models has (towers share version numbers)."""
    existing = [
        int(p.name)
        for name in model_names
        if (repository / name).is_dir()
        for p in (repository / name).iterdir()
        if p.is_dir() and p.name.isdigit()
    ]
    return max(existing, default=0) + 1


def write_model(repository: Path, spec: TritonModelSpec, version: int, model_bytes: bytes) -> Path:
    """Write one model version; the version directory appears whole or not at all."""
    model_dir = repository / spec.name
    target = model_dir / str(version)
    if target.exists():
        raise FileExistsError(f"{target} exists: model versions are immutable, export a new version")
    with staged_directory(target) as staging:
        (staging / MODEL_FILE).write_bytes(model_bytes)
    config = model_dir / CONFIG_FILE
    text = render_config(spec)
    # Rewritten only when it changes: a polling Triton reloads every version of a model whose config changed.
    if not config.is_file() or config.read_text() != text:
        write_atomically(config, text)
    return target / MODEL_FILE


def tower_specs(
    config: ModelConfig, context_length: int, max_batch_size: int, queue_delay_us: int
) -> tuple[TritonModelSpec, TritonModelSpec]:
    """The item and user towers' inputs and output, as export writes them and the retriever calls them."""
    output = (TensorSpec(EMBEDDING_OUTPUT, "FP32", (config.embed_dim,)),)
    item = TritonModelSpec(
        artifacts.ITEM_MODEL,
        (TensorSpec(ITEM_INPUTS[0], "INT64", (context_length,)),),
        output,
        max_batch_size,
        queue_delay_us,
    )
    history, mask, age = USER_INPUTS
    user = TritonModelSpec(
        artifacts.USER_MODEL,
        (
            TensorSpec(history, "FP32", (config.max_history, config.embed_dim)),
            TensorSpec(mask, "FP32", (config.max_history,)),
            TensorSpec(age, "FP32", (config.max_history,)),
        ),
        output,
        max_batch_size,
        queue_delay_us,
    )
    return item, user


def query_spec(item: TritonModelSpec) -> TritonModelSpec:
    """The query tower: the item tower's inputs and output under its own name."""
    return dataclasses.replace(item, name=artifacts.QUERY_MODEL)


def load_tower(repository: Path | str, manifest: artifacts.Manifest, model: str) -> Any:
    """One tower's TorchScript module at the index's model version (checksum-checked), in eval mode."""
    import torch  # only readers that run the towers in-process need it

    return torch.jit.load(str(tower_file(repository, manifest, model))).eval()


def tower_file(repository: Path | str, manifest: artifacts.Manifest, model: str) -> Path:
    """The TorchScript file of one tower at this index's model version, checked against the checksum
    recorded when the index was built (so an index is never paired with other towers)."""
    path = Path(repository) / model / str(manifest.model_version) / MODEL_FILE
    if not path.is_file():
        raise artifacts.ArtifactError(f"{path}: missing; the index names model version {manifest.model_version}")
    expected = manifest.tower_checksums.get(model)
    if expected and sha256_file(path) != expected:
        raise artifacts.ArtifactError(f"{path}: checksum differs from the one the index was built with")
    return path
