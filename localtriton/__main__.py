"""Local Triton: the real server binary from the nvidia-pytriton wheel, on loopback, CPU only.

python -m localtriton serve --model-repository model_repository     # foreground, Ctrl-C stops
python -m localtriton start --model-repository model_repository     # background, waits for ready
python -m localtriton stop                                          # SIGTERM by recorded PID
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from pathlib import Path

from localtriton.server import (
    TritonServer,
    TritonSettings,
    TritonStartError,
    remove_shm_regions,
    stop_process,
    write_state,
)


def state_file(settings: TritonSettings) -> Path:
    return Path(settings.state_dir) / f"triton-{settings.http_port}.json"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["serve", "start", "stop"])
    parser.add_argument("--model-repository", type=Path, default=Path("model_repository"))
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--http-port", type=int, default=8000)
    parser.add_argument("--grpc-port", type=int, default=8001)
    parser.add_argument("--metrics-port", type=int, default=8002)
    parser.add_argument("--state-dir", type=Path, default=Path(".localtriton"))
    parser.add_argument("--torch-threads", type=int, default=1)
    parser.add_argument(
        "--repository-poll-s",
        type=int,
        default=5,
        help="load new model versions from the repository every N s without restart (0 = never)",
    )
    parser.add_argument("--ready-timeout", type=float, default=120.0, help="seconds to wait for /v2/health/ready")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = TritonSettings(
        model_repository=args.model_repository,
        host=args.host,
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        metrics_port=args.metrics_port,
        state_dir=args.state_dir,
        torch_threads=args.torch_threads,
        repository_poll_s=args.repository_poll_s,
    )
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    state = state_file(settings)

    if args.action == "stop":
        if not state.is_file():
            print(f"no Triton recorded in {state}; nothing to stop")
            return 0
        pid = int(json.loads(state.read_text())["pid"])
        stop_process(pid, settings.exit_timeout_s + 10)
        remove_shm_regions(settings.shm_prefix)
        state.unlink()
        print(f"stopped Triton (pid {pid})")
        return 0

    server = TritonServer(settings)
    try:
        server.start(args.ready_timeout)
    except TritonStartError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if args.action == "start":
        write_state(state, server)
        print(
            f"Triton ready at {settings.http_url} (pid {server.pid}, metrics {settings.metrics_url}); "
            f"stop with: python -m localtriton stop --http-port {settings.http_port}"
        )
        return 0

    stopping = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stopping.set())
    print(f"Triton serving {settings.model_repository} at {settings.http_url}; Ctrl-C to stop")
    while not stopping.wait(1.0):
        if server.process is not None and server.process.poll() is not None:
            print(f"Triton exited on its own (code {server.process.returncode})", file=sys.stderr)
            return 1
    server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
