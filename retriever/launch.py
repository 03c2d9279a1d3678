"""Start the retriever, and optionally HAProxy in front of it or a Redis beside it, as separate processes and
wait until ready.

Used by the demo, the benchmarks and the integration tests, which must talk to real server processes.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Self, Sequence

from localtriton.process import ProcessStartError, free_port, wait_until_ready
from retriever.kserve_adapter import DEFAULT_MODEL_NAME

log = logging.getLogger("retriever.launch")
# The one HAProxy configuration: every overlay's sidecar reads it from a ConfigMap made of this file.
ADMISSION_PROXY_CONFIG = Path(__file__).resolve().parent.parent / "k8s/components/admission-proxy/admission-proxy.cfg"


@functools.cache
def admission_proxy_defaults() -> dict[str, str]:
    """The environment variables ADMISSION_PROXY_CONFIG reads ("${NAME-default}"), with its defaults."""
    code = "\n".join(line.split("#", 1)[0] for line in ADMISSION_PROXY_CONFIG.read_text().splitlines())
    return dict(re.findall(r"\$\{(\w+)-([^}]*)\}", code))


class ServerProcess:
    """A server started as a child process, its output in `log_path`, ready when `ready_url` answers 200."""

    name = "server"

    def __init__(self, log_path: Path, http_port: int) -> None:
        self.log_path = log_path
        self.http_port = http_port
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def ready_url(self) -> str:
        raise NotImplementedError

    def command(self) -> list[str]:
        raise NotImplementedError

    def environment(self) -> dict[str, str]:
        return {**os.environ, "PYTHONUNBUFFERED": "1"}

    def start(self, ready_timeout_s: float = 90.0) -> Self:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as log_file:
            self.process = subprocess.Popen(
                self.command(),
                stdout=log_file,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.environment(),
            )
        try:
            self.wait_until_ready(ready_timeout_s)
        except ProcessStartError:
            self.stop()
            raise
        log.info("%s ready at %s (pid %d)", self.name, self.ready_url, self.process.pid)
        return self

    def wait_until_ready(self, timeout_s: float) -> None:
        assert self.process is not None
        wait_until_ready(self.process, self.ready_url, timeout_s, self.name, self.log_path)

    def stop(self, timeout_s: float = 20.0) -> int | None:
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("%s (pid %d) ignored SIGTERM: killing it", self.name, self.process.pid)
                self.process.kill()
                self.process.wait(10)
        code = self.process.returncode
        self.process = None
        return code

    def __enter__(self) -> Self:
        return self.start() if self.process is None else self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


class RetrieverProcess(ServerProcess):
    name = "retriever"

    def __init__(
        self,
        index_dir: Path | str,
        triton_http: str,
        http_port: int | None = None,
        log_path: Path | str | None = None,
        extra_args: list[str] | None = None,
        model_name: str = DEFAULT_MODEL_NAME,
        launcher: Sequence[str] = (),
    ):
        """`launcher`: a prefix the command runs under (benchmarks.memory_limit: inside a memory cgroup)."""
        self.launcher = list(launcher)
        self.index_dir = Path(index_dir)
        self.triton_http = triton_http
        self.model_name = model_name
        port = http_port or free_port()
        super().__init__(Path(log_path) if log_path else Path(f".localtriton/retriever-{port}.log"), port)
        self.extra_args = extra_args or []

    @property
    def predict_url(self) -> str:
        return f"{self.url}/v1/models/{self.model_name}:predict"

    @property
    def ready_url(self) -> str:
        return f"{self.url}/v1/models/{self.model_name}"

    def command(self) -> list[str]:
        return [
            *self.launcher,
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


class AdmissionProxy(ServerProcess):
    """HAProxy with ADMISSION_PROXY_CONFIG in front of a retriever at `retriever_url` (Debian's `haproxy`:
    `make tools` installs it). `settings` are that file's environment variables, e.g. ADMISSION_MAX_IN_FLIGHT."""

    name = "admission proxy"

    def __init__(self, retriever_url: str, log_path: Path, settings: dict[str, str] | None = None) -> None:
        super().__init__(log_path, free_port())
        self.retriever_address = retriever_url.removeprefix("http://")
        self.metrics_port = free_port()
        self.settings = settings or {}

    @property
    def ready_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def command(self) -> list[str]:
        binary = shutil.which("haproxy")
        if binary is None:
            raise ProcessStartError("haproxy is not installed (Debian's haproxy package; `make tools` installs it)")
        return [binary, "-db", "-f", str(ADMISSION_PROXY_CONFIG)]  # -db: in the foreground, no daemon

    def through(self, url: str) -> str:
        """`url` (the retriever's) as reached through this proxy."""
        return self.url + url.removeprefix("http://" + self.retriever_address)

    def environment(self) -> dict[str, str]:
        # only `settings` and the addresses below: a stray ADMISSION_* in the caller's environment is not used
        return {
            **{name: value for name, value in os.environ.items() if name not in admission_proxy_defaults()},
            "PROXY_BIND": f"127.0.0.1:{self.http_port}",
            "PROXY_METRICS_BIND": f"127.0.0.1:{self.metrics_port}",
            "RETRIEVER_ADDRESS": self.retriever_address,
            **self.settings,
        }


class RedisServer(ServerProcess):
    """Debian's redis-server on a loopback port, nothing persisted (`make tools` installs it)."""

    name = "redis"

    def __init__(self, log_path: Path) -> None:
        super().__init__(log_path, free_port())

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.http_port}/0"

    @property
    def ready_url(self) -> str:
        return self.url

    def command(self) -> list[str]:
        binary = shutil.which("redis-server")
        if binary is None:
            raise ProcessStartError("redis-server is not installed (Debian's redis-server; `make tools` installs it)")
        return [binary, "--port", str(self.http_port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]

    def wait_until_ready(self, timeout_s: float) -> None:
        import redis

        assert self.process is not None
        client = redis.Redis(port=self.http_port, socket_timeout=1, socket_connect_timeout=1)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and self.process.poll() is None:
            try:
                if client.ping():
                    return
            except redis.ConnectionError:
                time.sleep(0.05)
        raise ProcessStartError(f"redis-server did not answer on port {self.http_port} (log: {self.log_path})")

    def kill(self) -> None:
        """Gone at once, as a crashed Redis is (start() brings it back, empty, on the same port)."""
        if self.process is not None:
            self.process.kill()
            self.process.wait(10)
            self.process = None
