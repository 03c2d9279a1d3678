"""Triton model repository writer: `<repo>/<model>/config.pbtxt` + `<repo>/<model>/<version>/model.pt`.

The configs use `platform: "pytorch_libtorch"`, so NVIDIA's Triton container serves them with
its libtorch backend; locally `localtriton` serves the same files with a Python backend
registered under the name `pytorch`. libtorch conventions: inputs are named like the
forward() arguments (in order), outputs `<name>__<index>`.
"""

from __future__ import annotations

import dataclasses
import io
import os
import shutil
import tempfile
from pathlib import Path

import torch

from twotower import artifacts


MODEL_FILE = artifacts.TOWER_FILE
CONFIG_FILE = "config.pbtxt"


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
    instance_count: int = 1
    versions_kept: int = 2  # the previous version stays loaded while its index may still be served
    warmup_runs: int = 3  # TorchScript optimises on its first calls: pay that before serving


def _tensor_block(specs: tuple[TensorSpec, ...]) -> str:
    entries = [
        f'  {{\n    name: "{s.name}"\n    data_type: TYPE_{s.data_type}\n    dims: [ {", ".join(map(str, s.dims))} ]\n  }}'
        for s in specs
    ]
    return "[\n" + ",\n".join(entries) + "\n]"


def _warmup_block(spec: TritonModelSpec) -> str:
    inputs = "".join(
        f'    inputs {{\n      key: "{s.name}"\n      value: {{\n        data_type: TYPE_{s.data_type}\n'
        f'        dims: [ {", ".join(map(str, s.dims))} ]\n        zero_data: true\n      }}\n    }}\n'
        for s in spec.inputs
    )
    return f'model_warmup [\n  {{\n    name: "zeros"\n    batch_size: 1\n    count: {spec.warmup_runs}\n{inputs}  }}\n]\n'


def render_config(spec: TritonModelSpec) -> str:
    return (
        f'name: "{spec.name}"\n'
        'platform: "pytorch_libtorch"\n'
        f"max_batch_size: {spec.max_batch_size}\n"
        f"input {_tensor_block(spec.inputs)}\n"
        f"output {_tensor_block(spec.outputs)}\n"
        f"dynamic_batching {{\n  max_queue_delay_microseconds: {spec.max_queue_delay_us}\n}}\n"
        f"instance_group [\n  {{\n    count: {spec.instance_count}\n    kind: KIND_AUTO\n  }}\n]\n"
        f"version_policy: {{ latest: {{ num_versions: {spec.versions_kept} }} }}\n"
        + (_warmup_block(spec) if spec.warmup_runs > 0 else "")
    )


def serialise(module: torch.jit.ScriptModule) -> bytes:
    """The exact bytes written as model.pt (so their checksum can be recorded before writing)."""
    buffer = io.BytesIO()
    torch.jit.save(module, buffer)
    return buffer.getvalue()


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
    model_dir.mkdir(parents=True, exist_ok=True)
    target = model_dir / str(version)
    if target.exists():
        raise FileExistsError(f"{target} exists: model versions are immutable, export a new version")
    staging = Path(tempfile.mkdtemp(prefix=f".{version}.partial-", dir=model_dir))
    try:
        (staging / MODEL_FILE).write_bytes(model_bytes)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    config = model_dir / CONFIG_FILE
    text = render_config(spec)
    # Rewritten only when it changes: a polling Triton reloads every version of a model whose config changed.
    if not config.is_file() or config.read_text() != text:
        tmp = config.with_name(CONFIG_FILE + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, config)
    return target / MODEL_FILE
