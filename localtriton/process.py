"""Helpers for server processes started by this project (Triton, the retriever): ports, readiness, logs."""

from __future__ import annotations

import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path


class ProcessStartError(RuntimeError):
    """A server process exited or did not become ready before its deadline."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_in_use(host: str, port: int) -> bool:
    """Something accepts connections on host:port (a server already running there)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(1.0)
        return sock.connect_ex((host, port)) == 0


def http_ok(url: str, timeout: float = 1.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return False


def log_tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def wait_until_ready(process: subprocess.Popen, ready_url: str, timeout_s: float, name: str, log_path: Path) -> None:
    """Poll `ready_url` until it answers 200; raise if the process dies or the deadline passes."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise ProcessStartError(
                f"{name} exited with code {process.returncode} during start-up; last log lines:\n{log_tail(log_path)}"
            )
        if http_ok(ready_url):
            if process.poll() is not None:  # the answer came from another server, ours is gone
                continue
            return
        time.sleep(0.2)
    raise ProcessStartError(f"{name} not ready after {timeout_s:.0f}s; last log lines:\n{log_tail(log_path)}")
