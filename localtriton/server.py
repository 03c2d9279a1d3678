"""Start, probe and stop a local Triton server process (the binary from the nvidia-pytriton wheel).

The wheel has Triton's python backend but no libtorch backend, so a backend directory is
assembled: `python/` (libtriton_python.so + the stub built for this interpreter) and
`pytorch/model.py` (our Python implementation of the libtorch backend). The model repository
is served unchanged. See ../shared/notes/platform-facts.md for why each setting is needed.
"""

from __future__ import annotations

import dataclasses
import filecmp
import glob
import importlib.util
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

from localtriton.process import ProcessStartError, free_port, port_in_use, wait_until_ready

log = logging.getLogger("localtriton")

PYTORCH_BACKEND_SOURCE = Path(__file__).with_name("backends") / "pytorch" / "model.py"


class TritonStartError(ProcessStartError):
    """Triton exited or did not become ready before the deadline."""


@dataclasses.dataclass
class TritonSettings:
    model_repository: Path
    host: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    state_dir: Path = Path(".localtriton")  # backend directory and logs live here
    torch_threads: int = 1  # per model instance; 2 cores are shared with the retriever
    log_verbose: int = 0
    exit_timeout_s: int = 10
    repository_poll_s: int = 0  # > 0: poll the repository, loading new model versions without restart

    @classmethod
    def on_free_ports(cls, model_repository: Path, state_dir: Path, host: str = "127.0.0.1") -> "TritonSettings":
        """Settings for a private server (tests, demo) that cannot collide with one already running."""
        return cls(model_repository, host, free_port(host), free_port(host), free_port(host), Path(state_dir))

    @property
    def http_url(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.host}:{self.metrics_port}/metrics"

    @property
    def shm_prefix(self) -> str:
        return f"localtriton_{self.http_port}_"


def pytriton_root() -> Path:
    # Locate, never import: pytriton imports tritonclient.grpc, which clashes with kserve's protobufs.
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise TritonStartError("the nvidia-pytriton wheel (which carries the Triton binary) is not installed")
    return Path(list(spec.submodule_search_locations)[0]) / "tritonserver"


def prepare_backend_dir(state_dir: Path) -> Path:
    """Assemble (or refresh) `<state_dir>/backends` with the python and pytorch backends."""
    root = pytriton_root()
    backends = Path(state_dir) / "backends"
    python_dir = backends / "python"
    python_dir.mkdir(parents=True, exist_ok=True)
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = root / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise TritonStartError(f"nvidia-pytriton has no python backend stub for Python {version} ({stub})")
    for source in [stub, *(root / "backends" / "python").glob("*.*")]:
        target = python_dir / source.name
        if source.is_file() and not (target.exists() and filecmp.cmp(source, target, shallow=False)):
            shutil.copy2(source, target)
    pytorch_dir = backends / "pytorch"
    pytorch_dir.mkdir(exist_ok=True)
    shutil.copy2(PYTORCH_BACKEND_SOURCE, pytorch_dir / "model.py")
    return backends


def server_environment(settings: TritonSettings) -> dict[str, str]:
    env = dict(os.environ)
    libs = Path(pytriton_root()).parent.parent / "nvidia_pytriton.libs"
    # The interpreter's own libdir first: otherwise the stub picks Debian's libpython.
    env["LD_LIBRARY_PATH"] = os.pathsep.join(
        p for p in (sysconfig.get_config_var("LIBDIR"), str(libs), env.get("LD_LIBRARY_PATH", "")) if p
    )
    # The stub finds torch through `python3` on PATH: put this environment's bin first.
    env["PATH"] = os.pathsep.join((str(Path(sys.executable).parent), env.get("PATH", "")))
    env["LOCALTRITON_TORCH_THREADS"] = str(settings.torch_threads)
    env.setdefault("OMP_NUM_THREADS", str(settings.torch_threads))
    return env


def server_command(settings: TritonSettings, backend_dir: Path) -> list[str]:
    return [
        str(pytriton_root() / "bin" / "tritonserver"),
        f"--model-repository={Path(settings.model_repository).resolve()}",
        f"--backend-directory={backend_dir.resolve()}",
        f"--backend-config=python,shm-region-prefix-name={settings.shm_prefix}",
        "--allow-gpu-metrics=false",
        "--pinned-memory-pool-byte-size=0",
        f"--exit-timeout-secs={settings.exit_timeout_s}",
        f"--http-address={settings.host}",
        f"--grpc-address={settings.host}",
        f"--metrics-address={settings.host}",
        f"--http-port={settings.http_port}",
        f"--grpc-port={settings.grpc_port}",
        f"--metrics-port={settings.metrics_port}",
        f"--log-verbose={settings.log_verbose}",
        *(
            ["--model-control-mode=poll", f"--repository-poll-secs={settings.repository_poll_s}"]
            if settings.repository_poll_s > 0
            else []
        ),
    ]


class TritonServer:
    """One Triton process. Use as a context manager, or start()/stop() explicitly."""

    def __init__(self, settings: TritonSettings):
        self.settings = settings
        self.process: subprocess.Popen | None = None
        self.log_path = Path(settings.state_dir) / f"tritonserver-{settings.http_port}.log"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def start(self, ready_timeout_s: float = 120.0) -> "TritonServer":
        repository = Path(self.settings.model_repository)
        if not repository.is_dir():
            raise TritonStartError(f"model repository {repository} does not exist (run `python -m export` first)")
        s = self.settings
        taken = [port for port in (s.http_port, s.grpc_port, s.metrics_port) if port_in_use(s.host, port)]
        if taken:  # another server's "ready" would be taken for ours, and ours would fail to bind
            raise TritonStartError(
                f"port(s) {', '.join(map(str, taken))} on {s.host} already accept connections (another Triton?); "
                "stop it or choose other ports"
            )
        backend_dir = prepare_backend_dir(self.settings.state_dir)
        command = server_command(self.settings, backend_dir)
        log.info("starting Triton on %s (log %s)", self.settings.http_url, self.log_path)
        with open(self.log_path, "wb") as log_file:
            self.process = subprocess.Popen(
                command,
                env=server_environment(self.settings),
                stdout=log_file,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        self.wait_ready(ready_timeout_s)
        return self

    def wait_ready(self, timeout_s: float) -> None:
        """Poll /v2/health/ready until it answers 200, the process dies, or the deadline passes."""
        assert self.process is not None
        try:
            wait_until_ready(
                self.process, f"{self.settings.http_url}/v2/health/ready", timeout_s, "Triton", self.log_path
            )
        except ProcessStartError as err:
            self.stop()
            raise TritonStartError(str(err)) from err
        log.info("Triton ready (pid %s)", self.pid)

    def stop(self, timeout_s: float | None = None) -> int | None:
        """SIGTERM, wait, SIGKILL if needed; remove this server's leftover shared-memory regions."""
        if self.process is None:
            return None
        returncode = stop_process(self.process.pid, timeout_s or self.settings.exit_timeout_s + 10, self.process)
        self.process = None
        remove_shm_regions(self.settings.shm_prefix)
        return returncode

    def __enter__(self) -> "TritonServer":
        return self.start() if self.process is None else self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def stop_process(pid: int, timeout_s: float, process: subprocess.Popen | None = None) -> int | None:
    """Terminate a process group led by `pid` (the server and its python stubs)."""
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return process.poll() if process else None
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None:
            if process.poll() is not None:
                break
        elif not pid_alive(pid):
            break
        time.sleep(0.1)
    else:
        log.warning("Triton (pid %d) ignored SIGTERM for %.0fs: killing it", pid, timeout_s)
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if process is not None:
            process.wait(timeout=10)
    try:  # stubs share the group; make sure none outlives the server
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    return process.returncode if process is not None else None


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (our own un-reaped child) counts as gone.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def remove_shm_regions(prefix: str) -> None:
    for path in glob.glob(f"/dev/shm/{prefix}*"):
        try:
            os.unlink(path)
        except OSError:
            pass


def write_state(path: Path, server: TritonServer) -> None:
    path.write_text(
        json.dumps({"pid": server.pid, **{k: str(v) for k, v in dataclasses.asdict(server.settings).items()}})
    )
