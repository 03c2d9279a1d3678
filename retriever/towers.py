"""Async client for the two tower models on Triton (HTTP/REST v2, binary tensors).

tritonclient.http.aio, not tritonclient.grpc: the gRPC client and kserve register the same
protobuf package and cannot share a process.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Protocol

import aiohttp
import numpy as np
import tritonclient.http.aio as triton_http
from tritonclient.utils import InferenceServerException

from twotower.artifacts import ArtifactError, Manifest, tower_file

log = logging.getLogger("retriever.towers")

EMBEDDING_OUTPUT = "embedding__0"


class TritonUnavailable(RuntimeError):
    """Triton could not be reached or could not run the model (the request may be retried later)."""


class Towers(Protocol):
    """Where the user/query vectors come from: Triton when serving, TorchScript in-process as a baseline."""

    async def user_vectors(self, history: np.ndarray, mask: np.ndarray, age: np.ndarray) -> np.ndarray: ...

    async def query_vectors(self, input_ids: np.ndarray) -> np.ndarray: ...

    async def close(self) -> None: ...


class TowerClient:
    """Calls `item_tower` / `user_tower` on Triton at the model version named in the index manifest."""

    def __init__(self, url: str, manifest: Manifest, timeout_s: float = 2.0, retries: int = 1):
        self.url = url.removeprefix("http://").rstrip("/")
        self.manifest = manifest
        self.timeout_s = timeout_s
        self.retries = retries
        self._client: triton_http.InferenceServerClient | None = None

    @property
    def client(self) -> triton_http.InferenceServerClient:
        # aiohttp sessions belong to the event loop that creates them: create on first use.
        if self._client is None:
            self._client = triton_http.InferenceServerClient(self.url, conn_timeout=self.timeout_s)
        return self._client

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None

    async def _infer(self, model: str, tensors: dict[str, np.ndarray]) -> np.ndarray:
        inputs = []
        for name, array in tensors.items():
            tensor = triton_http.InferInput(name, list(array.shape), "INT64" if array.dtype == np.int64 else "FP32")
            tensor.set_data_from_numpy(array, binary_data=True)
            inputs.append(tensor)
        outputs = [triton_http.InferRequestedOutput(EMBEDDING_OUTPUT, binary_data=True)]
        version = str(self.manifest.model_version)
        for attempt in range(self.retries + 1):
            try:
                result = await asyncio.wait_for(
                    self.client.infer(model, inputs, model_version=version, outputs=outputs), self.timeout_s
                )
                return result.as_numpy(EMBEDDING_OUTPUT)
            except (aiohttp.ClientConnectionError, asyncio.TimeoutError) as err:
                if attempt == self.retries:
                    raise TritonUnavailable(f"Triton at {self.url} unreachable for {model} v{version}: {err!r}") from err
                log.warning("Triton call %s v%s failed (%r), retrying", model, version, err)
            except InferenceServerException as err:
                raise TritonUnavailable(f"Triton failed {model} v{version}: {err.message()}") from err
        raise AssertionError("unreachable")

    async def user_vectors(self, history: np.ndarray, mask: np.ndarray, age: np.ndarray) -> np.ndarray:
        return await self._infer(self.manifest.user_model, {"history": history, "history_mask": mask, "history_age": age})

    async def query_vectors(self, input_ids: np.ndarray) -> np.ndarray:
        return await self._infer(self.manifest.item_model, {"input_ids": input_ids})

    async def verify_models(self) -> None:
        """The served towers must be the version the index was built with, with matching shapes."""
        version = str(self.manifest.model_version)
        expected = {
            self.manifest.item_model: {"input_ids": [self.manifest.context_length]},
            self.manifest.user_model: {"history": [self.manifest.max_history, self.manifest.dim]},
        }
        for model, inputs in expected.items():
            try:
                if not await self.client.is_model_ready(model, version):
                    raise TritonUnavailable(f"Triton at {self.url}: model {model} version {version} is not ready")
                config = await self.client.get_model_config(model, version)
            except (aiohttp.ClientConnectionError, asyncio.TimeoutError) as err:
                raise TritonUnavailable(f"Triton at {self.url} unreachable: {err!r}") from err
            except InferenceServerException as err:
                raise TritonUnavailable(f"Triton at {self.url}, model {model} v{version}: {err.message()}") from err
            dims = {entry["name"]: [int(d) for d in entry["dims"]] for entry in config["input"]}
            out_dims = [int(d) for d in config["output"][0]["dims"]]
            for name, want in inputs.items():
                if dims.get(name) != want:
                    raise ArtifactError(f"{model} v{version} input {name} has dims {dims.get(name)}, index expects {want}")
            if out_dims != [self.manifest.dim]:
                raise ArtifactError(f"{model} v{version} output dims {out_dims}, index dimension is {self.manifest.dim}")


class LocalTowers:
    """The exported TorchScript towers run in this process (no Triton, no network)."""

    def __init__(self, repository: Path, manifest: Manifest):
        import torch

        self._torch = torch
        self.user = torch.jit.load(str(tower_file(repository, manifest, manifest.user_model))).eval()
        self.item = torch.jit.load(str(tower_file(repository, manifest, manifest.item_model))).eval()

    async def user_vectors(self, history: np.ndarray, mask: np.ndarray, age: np.ndarray) -> np.ndarray:
        with self._torch.inference_mode():
            return self.user(*(self._torch.from_numpy(a) for a in (history, mask, age))).numpy()

    async def query_vectors(self, input_ids: np.ndarray) -> np.ndarray:
        with self._torch.inference_mode():
            return self.item(self._torch.from_numpy(input_ids)).numpy()

    async def close(self) -> None:
        return None
