"""Shared fixtures: a tiny trained + exported model, and the REAL Triton and KServe processes."""

from __future__ import annotations

import dataclasses
import http.server
import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

HM_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "hm_lastweek"


@dataclasses.dataclass
class TinyPipeline:
    data_dir: Path
    run_dir: Path
    repository: Path
    index_dir: Path  # the index root

    @property
    def version_dir(self) -> Path:
        """The published index version (what CURRENT names)."""
        from twotower.artifacts import resolve_index_dir

        return resolve_index_dir(self.index_dir)

    @property
    def article_ids(self) -> list[str]:
        """The published version's article ids, row order."""
        from twotower import artifacts

        version = self.version_dir
        return list(artifacts.read_items(version, artifacts.read_manifest(version)).article_ids)


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory: pytest.TempPathFactory) -> TinyPipeline:
    """Synthetic shop -> 1 epoch of training -> TorchScript towers + FAISS index (about 15 s)."""
    from export.pipeline import export_run
    from twotower.config import ModelConfig, TrainConfig
    from twotower.data.hm import load_hm_dir
    from twotower.data.synthetic import generate
    from twotower.train import train

    logging.getLogger().setLevel(logging.INFO)
    root = tmp_path_factory.mktemp("pipeline")
    data_dir = generate(root / "data", seed=1, n_articles=150, n_customers=200)
    run_dir = train(load_hm_dir(data_dir), ModelConfig(), TrainConfig(epochs=1), root / "run")
    export_run(run_dir, data_dir, root / "model_repository", root / "index")
    return TinyPipeline(data_dir, run_dir, root / "model_repository", root / "index")


@pytest.fixture(scope="session")
def triton(tiny_pipeline: TinyPipeline, tmp_path_factory: pytest.TempPathFactory):
    """The real Triton binary serving the tiny model repository on loopback ports."""
    from localtriton import TritonServer, TritonSettings

    settings = TritonSettings.on_free_ports(tiny_pipeline.repository, tmp_path_factory.mktemp("triton"))
    with TritonServer(settings) as server:
        yield server


@pytest.fixture(scope="session")
def retriever(tiny_pipeline: TinyPipeline, triton, tmp_path_factory: pytest.TempPathFactory):
    """The real KServe retriever process, talking to the real Triton."""
    from retriever.launch import RetrieverProcess

    log_path = tmp_path_factory.mktemp("retriever") / "retriever.log"
    with RetrieverProcess(
        tiny_pipeline.index_dir,
        f"127.0.0.1:{triton.settings.http_port}",
        log_path=log_path,
        extra_args=["--history-clock", "index"],  # the synthetic shop's days are in 2020: replay them as of then
    ) as process:
        yield process


def require_hm() -> Path:
    if not (HM_DIR / "articles.csv.gz").is_file():
        pytest.skip(f"real H&M data not found at {HM_DIR} (only present beside the project's shared/ folder)")
    return HM_DIR


def write_random_index(
    directory: Path,
    index_type: str,
    groups: list[str],
    dim: int = 16,
    seed: int = 0,
    item_bias=None,
    prior_weight: float = 0.0,
    vector_dtype: str = "float32",
    article_ids: list[str] | None = None,
):
    """An index version of len(groups) random unit vectors (product_group_name = groups) and no customers:
    for search tests that need no trained model; `item_bias` + `prior_weight` add a popularity prior.
    Returns the vectors (float32, whatever `vector_dtype` stores). Article ids "0", "1", ... unless given."""
    import numpy as np

    from export.catalogue_index import build_faiss_index, write_catalogue_only

    n = len(groups)
    vectors = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    write_catalogue_only(
        directory,
        build_faiss_index(vectors, index_type, item_bias),
        vectors,
        {"article_id": article_ids or [str(i) for i in range(n)], "product_group_name": groups},
        "random",
        index_type,
        item_bias=item_bias,
        prior_weight=prior_weight,
        vector_dtype=vector_dtype,
    )
    return vectors


class EchoHandler(http.server.BaseHTTPRequestHandler):
    """A real HTTP/1.1 server for the keep-alive client (serving/http1.py): the status is the path's last
    part; /close asks to close, /chunked frames by chunks, /slow answers late."""

    protocol_version = "HTTP/1.1"
    connections = 0  # accepted so far (one handler instance per connection)

    def setup(self) -> None:
        super().setup()
        EchoHandler.connections += 1

    def do_GET(self) -> None:
        self._answer(b"")

    def do_POST(self) -> None:
        self._answer(self.rfile.read(int(self.headers["Content-Length"])))

    def _answer(self, body: bytes) -> None:
        if self.path.startswith("/slow"):
            time.sleep(0.5)
        self.send_response(int(self.path.rsplit("/", 1)[-1]))
        self.send_header("X-Echo-Path", self.path)
        if self.path.startswith("/chunked"):
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            self.wfile.write(b"2\r\nok\r\n0\r\n\r\n")
            return
        if self.path.startswith("/close"):
            self.send_header("Connection", "close")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture()
def http_server() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), EchoHandler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    EchoHandler.connections = 0
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
