"""Start the retriever as a separate process and wait until KServe reports it ready.

Used by the demo and the integration tests, which must talk to a real server process.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

from localtriton.process import ProcessStartError, free_port, wait_until_ready
from retriever.kserve_adapter import DEFAULT_MODEL_NAME

log = logging.getLogger("retriever.launch")


class RetrieverProcess:
    def __init__(
        self,
        index_dir: Path | str,
        triton_http: str,
        http_port: int | None = None,
        log_path: Path | str | None = None,
        extra_args: list[str] | None = None,
        model_name: str = DEFAULT_MODEL_NAME,
    ):
        self.index_dir = Path(index_dir)
        self.triton_http = triton_http
        self.http_port = http_port or free_port()
        self.model_name = model_name
        self.log_path = Path(log_path) if log_path else Path(f".localtriton/retriever-{self.http_port}.log")
        self.extra_args = extra_args or []
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def predict_url(self) -> str:
        return f"{self.url}/v1/models/{self.model_name}:predict"

    def command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "retriever",
            "--index-dir",
            str(self.index_dir),
            "--predictor_host",
            self.triton_http,
            "--http_port",
            str(self.http_port),
            "--model_name",
            self.model_name,
            *self.extra_args,
        ]

    def start(self, ready_timeout_s: float = 90.0) -> "RetrieverProcess":
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as log_file:
            self.process = subprocess.Popen(
                self.command(),
                stdout=log_file,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        try:
            wait_until_ready(
                self.process, f"{self.url}/v1/models/{self.model_name}", ready_timeout_s, "retriever", self.log_path
            )
        except ProcessStartError:
            self.stop()
            raise
        log.info("retriever ready at %s (pid %d)", self.url, self.process.pid)
        return self

    def stop(self, timeout_s: float = 20.0) -> int | None:
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("retriever (pid %d) ignored SIGTERM: killing it", self.process.pid)
                self.process.kill()
                self.process.wait(10)
        code = self.process.returncode
        self.process = None
        return code

    def __enter__(self) -> "RetrieverProcess":
        return self.start() if self.process is None else self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
