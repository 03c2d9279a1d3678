"""Async client for the two tower models on Triton (HTTP/REST v2, binary tensors).

REST, not gRPC: tritonclient.grpc and kserve register the same protobuf package and cannot share a
process; and the REST call, spoken directly, is the cheapest in CPU (see TowerClient).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np

from serving.http1 import KeepAliveClient, Response
from twotower.artifacts import ArtifactError, Manifest
from twotower.triton_repository import EMBEDDING_OUTPUT, ITEM_INPUTS, USER_INPUTS, load_tower

log = logging.getLogger("serving.towers")


Tokenizer = Callable[[list[str]], np.ndarray]  # texts -> int64 token ids [B, context_length]


class TokenIds:
    """Texts -> the item tower's int64 `input_ids`, tokenized exactly as training and export do (an object,
    so KServe workers can unpickle it; torch is imported only when one is made)."""

    def __init__(self, clip_model: str):
        from twotower.model.pretrained_text import WordPieceIds, is_pretrained_backbone

        self.tokenizer: Callable[[list[str]], Any]
        if is_pretrained_backbone(clip_model):  # the tokenizers library alone: no torch in the retriever
            self.tokenizer = WordPieceIds(clip_model)
        else:
            from twotower.model.clip_text import get_tokenizer

            self.tokenizer = get_tokenizer(clip_model)  # open_clip's: a torch tensor

    def __call__(self, texts: list[str]) -> np.ndarray:
        ids = self.tokenizer(texts)
        return np.asarray(ids if isinstance(ids, np.ndarray) else ids.numpy(), dtype=np.int64)


class RetryBudget:
    """Retries allowed as a share of calls: each call earns `ratio` of a retry, a retry spends one, at most
    `burst` saved up. When Triton is down every call fails: retrying each would double the load on a
    recovering server (and on the event loop) exactly when it is weakest."""

    def __init__(self, ratio: float = 0.1, burst: float = 10.0):
        self.ratio = ratio
        self.burst = burst
        self.tokens = burst

    def earn(self) -> None:
        self.tokens = min(self.burst, self.tokens + self.ratio)

    def spend(self) -> bool:
        if self.tokens < 1.0:
            return False
        self.tokens -= 1.0
        return True


class TritonUnavailable(RuntimeError):
    """Triton could not be reached or could not run the model (the request may be retried later)."""


class Towers(Protocol):
    """Where the user/query vectors come from: Triton when serving, TorchScript in-process as a baseline."""

    async def user_vectors(self, history: np.ndarray, mask: np.ndarray, age: np.ndarray) -> np.ndarray: ...

    async def query_vectors(self, input_ids: np.ndarray) -> np.ndarray:
        """Text queries' vectors: the distilled query tower when the index names one, else the item tower."""
        ...

    async def close(self) -> None: ...


class TowerClient:
    """Calls `item_tower` / `user_tower` / `query_tower` on Triton at the model version the index names.

    Speaks the KServe v2 REST protocol with Triton's binary tensor extension over serving.http1:
    0.21-0.42 ms of CPU per user-tower call where tritonclient.http.aio (aiohttp) took 0.46-0.92 ms,
    at the same calls/s with 4 in flight (benchmarks/LEVERS.md).
    """

    def __init__(
        self,
        url: str,
        manifest: Manifest,
        timeout_s: float = 2.0,
        retries: int = 1,
        max_batch_sizes: dict[str, int] | None = None,
    ):
        self.url = url.removeprefix("http://").rstrip("/")
        self.manifest = manifest
        self.timeout_s = timeout_s
        self.retries = retries
        # Each model's max_batch_size as Triton's config says (verify_models reads it): more rows go in chunks.
        self.max_batch_sizes = dict(max_batch_sizes or {})
        self.retry_budget = RetryBudget()
        self._client: KeepAliveClient | None = None

    @property
    def client(self) -> KeepAliveClient:
        # Its connections belong to the event loop that opens them: create on first use.
        if self._client is None:
            self._client = KeepAliveClient(self.url, timeout_s=self.timeout_s)
        return self._client

    def __getstate__(self) -> dict[str, object]:
        # KServe's --workers N pickles the model: open connections stay behind, each worker opens its own.
        return {**self.__dict__, "_client": None}

    async def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    async def _call(self, method: str, path: str, body: bytes = b"", headers: str = "") -> Response:
        """One request; again (at most `retries` times, within the retry budget) only when the connection
        failed. Never after a timeout: Triton may still be running the call, and an overloaded server
        answers late, so a retry would double its load when it can least take it."""
        self.retry_budget.earn()
        for attempt in range(self.retries + 1):
            try:
                return await self.client.request(method, path, body, headers)
            except TimeoutError as err:
                raise TritonUnavailable(f"Triton at {self.url} did not answer {method} {path}: {err}") from err
            except OSError as err:  # ConnectionError included: refused, reset, closed
                if attempt == self.retries or not self.retry_budget.spend():
                    raise TritonUnavailable(f"Triton at {self.url} unreachable ({method} {path}): {err!r}") from err
                log.warning("Triton call %s %s failed (%r), retrying", method, path, err)
        raise AssertionError("unreachable")

    async def _infer(self, model: str, tensors: dict[str, np.ndarray]) -> np.ndarray:
        """One request, or concurrent chunks of at most the model's max_batch_size rows: Triton refuses a
        larger batch, and a request carrying more instances is no fault of Triton's."""
        rows = len(next(iter(tensors.values())))
        limit = self.max_batch_sizes.get(model, 0)
        if limit <= 0 or rows <= limit:
            return await self._infer_batch(model, tensors)
        chunks = [{name: t[start : start + limit] for name, t in tensors.items()} for start in range(0, rows, limit)]
        return np.concatenate(await asyncio.gather(*(self._infer_batch(model, chunk) for chunk in chunks)))

    async def _infer_batch(self, model: str, tensors: dict[str, np.ndarray]) -> np.ndarray:
        version = self.manifest.model_version
        body, headers = encode_infer_request(tensors, EMBEDDING_OUTPUT)
        response = await self._call("POST", f"/v2/models/{model}/versions/{version}/infer", body, headers)
        if response.status != 200:
            raise TritonUnavailable(f"Triton failed {model} v{version}: {error_message(response)}")
        try:
            return decode_infer_output(response, EMBEDDING_OUTPUT)
        except ValueError as err:
            raise TritonUnavailable(f"Triton answered {model} v{version} with a malformed response: {err}") from err

    async def user_vectors(self, history: np.ndarray, mask: np.ndarray, age: np.ndarray) -> np.ndarray:
        return await self._infer(self.manifest.user_model, dict(zip(USER_INPUTS, (history, mask, age))))

    async def query_vectors(self, input_ids: np.ndarray) -> np.ndarray:
        return await self._infer(self.manifest.text_query_model, {ITEM_INPUTS[0]: input_ids})

    async def item_vectors(self, input_ids: np.ndarray) -> np.ndarray:
        """Catalogue captions' vectors: always the item tower (the index holds its vectors)."""
        return await self._infer(self.manifest.item_model, {ITEM_INPUTS[0]: input_ids})

    async def verify_models(self) -> None:
        """The served towers must be the version the index was built with, with matching shapes."""
        version = self.manifest.model_version
        tokens = {ITEM_INPUTS[0]: [self.manifest.context_length]}
        expected = {
            self.manifest.item_model: tokens,
            self.manifest.text_query_model: tokens,
            self.manifest.user_model: {USER_INPUTS[0]: [self.manifest.max_history, self.manifest.dim]},
        }
        for model, inputs in expected.items():
            base = f"/v2/models/{model}/versions/{version}"
            if (await self._call("GET", f"{base}/ready")).status != 200:
                raise TritonUnavailable(f"Triton at {self.url}: model {model} version {version} is not ready")
            response = await self._call("GET", f"{base}/config")
            if response.status != 200:
                raise TritonUnavailable(f"Triton at {self.url}, model {model} v{version}: {error_message(response)}")
            config = json.loads(response.body)
            self.max_batch_sizes[model] = int(config.get("max_batch_size", 0))
            dims = {entry["name"]: [int(d) for d in entry["dims"]] for entry in config["input"]}
            out_dims = [int(d) for d in config["output"][0]["dims"]]
            for name, want in inputs.items():
                if dims.get(name) != want:
                    raise ArtifactError(
                        f"{model} v{version} input {name} has dims {dims.get(name)}, index expects {want}"
                    )
            if out_dims != [self.manifest.dim]:
                raise ArtifactError(
                    f"{model} v{version} output dims {out_dims}, index dimension is {self.manifest.dim}"
                )


_DATATYPES: dict[np.dtype, str] = {np.dtype(np.int64): "INT64", np.dtype(np.float32): "FP32"}
_DTYPES: dict[str, np.dtype] = {name: dtype for dtype, name in _DATATYPES.items()}


def encode_infer_request(tensors: dict[str, np.ndarray], output: str) -> tuple[bytes, str]:
    """Body and extra headers of a v2 infer request whose tensors travel as raw bytes after a JSON header."""
    arrays = [np.ascontiguousarray(array) for array in tensors.values()]
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": name,
                    "shape": list(array.shape),
                    "datatype": _DATATYPES[array.dtype],
                    "parameters": {"binary_data_size": array.nbytes},
                }
                for name, array in zip(tensors, arrays)
            ],
            "outputs": [{"name": output, "parameters": {"binary_data": True}}],
        }
    ).encode()
    headers = f"Content-Type: application/octet-stream\r\nInference-Header-Content-Length: {len(header)}\r\n"
    return b"".join([header, *(array.tobytes() for array in arrays)]), headers


def decode_infer_output(response: Response, output: str) -> np.ndarray:
    """The named output tensor of a v2 infer response (binary, or JSON `data` when the server chose that)."""
    length = response.header("inference-header-content-length")
    header_size = int(length) if length is not None else len(response.body)
    try:
        header = json.loads(response.body[:header_size])
    except json.JSONDecodeError as err:
        raise ValueError(f"response header is not JSON: {err}") from err
    offset = header_size
    for entry in header.get("outputs", []):
        size = entry.get("parameters", {}).get("binary_data_size")
        if entry.get("name") == output:
            dtype = _DTYPES.get(entry.get("datatype", ""))
            if dtype is None:
                raise ValueError(f"output {output} has datatype {entry.get('datatype')!r}, expected FP32 or INT64")
            if size is None:
                return np.asarray(entry["data"], dtype=dtype).reshape(entry["shape"])
            if offset + size > len(response.body):
                raise ValueError(f"output {output} needs {size} bytes at {offset}, body has {len(response.body)}")
            return np.frombuffer(response.body, dtype=dtype, count=size // dtype.itemsize, offset=offset).reshape(
                entry["shape"]
            )
        offset += size or 0
    raise ValueError(f"no output named {output}")


def error_message(response: Response) -> str:
    """Triton's `{"error": ...}` text, else the status and the start of the body."""
    try:
        return str(json.loads(response.body)["error"])
    except (ValueError, KeyError, TypeError):
        return f"HTTP {response.status}: {response.body[:200]!r}"


class LocalTowers:
    """The exported TorchScript towers run in this process (no Triton, no network)."""

    def __init__(self, repository: Path, manifest: Manifest):
        import torch

        self._torch = torch
        self.user = load_tower(repository, manifest, manifest.user_model)
        self.query = load_tower(repository, manifest, manifest.text_query_model)

    async def user_vectors(self, history: np.ndarray, mask: np.ndarray, age: np.ndarray) -> np.ndarray:
        with self._torch.inference_mode():
            return self.user(*(self._torch.from_numpy(a) for a in (history, mask, age))).numpy()

    async def query_vectors(self, input_ids: np.ndarray) -> np.ndarray:
        with self._torch.inference_mode():
            return self.query(self._torch.from_numpy(input_ids)).numpy()

    async def close(self) -> None:
        return None


@dataclasses.dataclass
class TowerSource:
    """Where an index version's towers come from: Triton at `triton_url`, or, with `local_repository`,
    the same TorchScript files in this process (the benchmark's in-process baseline: no network)."""

    triton_url: str = ""
    local_repository: Path | None = None
    timeout_s: float = 2.0
    retries: int = 1

    def open(self, manifest: Manifest, wait_s: float = 0.0) -> Towers:
        """Towers for this index's model version, proven to be served (ArtifactError otherwise). Blocking."""
        if self.local_repository is not None:
            return LocalTowers(self.local_repository, manifest)
        loop = asyncio.new_event_loop()  # not asyncio.run: that would unset the loop KServe starts on
        try:
            max_batch_sizes = loop.run_until_complete(self._wait_until_served(manifest, wait_s))
        finally:
            loop.close()
        return TowerClient(self.triton_url, manifest, self.timeout_s, self.retries, max_batch_sizes)

    async def _wait_until_served(self, manifest: Manifest, wait_s: float) -> dict[str, int]:
        """Each tower's max_batch_size, once Triton serves both at the index's model version."""
        client = TowerClient(self.triton_url, manifest, self.timeout_s, retries=0)
        deadline = time.monotonic() + wait_s
        try:
            while True:
                try:
                    await client.verify_models()
                    log.info(
                        "Triton at %s serves %s version %d matching index %s",
                        self.triton_url,
                        "/".join(dict.fromkeys((manifest.item_model, manifest.text_query_model, manifest.user_model))),
                        manifest.model_version,
                        manifest.index_version,
                    )
                    return client.max_batch_sizes
                except TritonUnavailable as err:
                    if time.monotonic() > deadline:
                        raise ArtifactError(
                            f"giving up after {wait_s:.0f}s: {err}" if wait_s > 0 else str(err)
                        ) from err
                    log.info("waiting for Triton: %s", err)
                    await asyncio.sleep(1.0)
        finally:
            await client.close()
