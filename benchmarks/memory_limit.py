"""A server under a real memory limit, as a Kubernetes container runs: a memory cgroup the benchmark creates.

The kernel charges a cgroup for its processes' own pages and for the page cache they fault in, and under the
limit it reclaims file pages (the memory-mapped vectors, index and metadata) before it kills a process: what a
pod's `resources.limits.memory` does. cgroup v1 (`memory.limit_in_bytes`) and v2 (`memory.max`) are both
handled; where the host does not let this process create one, `MemoryCgroup.create` says so and returns None.

Page-cache pages are charged to the cgroup that first faults them in. Files the benchmark itself just wrote
sit in the cache charged to the benchmark, so `evict_from_page_cache` drops them first: the server then reads
them as a pod reads its volume.
"""

from __future__ import annotations

import itertools
import logging
import os
from pathlib import Path
from typing import Any

from twotower.files import drop_from_page_cache

log = logging.getLogger(__name__)

CGROUP_ROOTS = (Path("/sys/fs/cgroup/memory"), Path("/sys/fs/cgroup"))  # v1's memory hierarchy, v2's unified one
_CREATED = itertools.count()


class MemoryCgroup:
    """A memory cgroup of its own: `launcher()` prefixes a command so that it starts inside."""

    def __init__(self, path: Path, limit_bytes: int) -> None:
        self.path = path
        self.limit_bytes = limit_bytes
        self.v1 = (path / "memory.limit_in_bytes").exists()

    @classmethod
    def create(cls, limit_bytes: int, name: str = "") -> MemoryCgroup | None:
        """A new cgroup (by default named after this process and a count: a fresh peak and fault count each)."""
        name = name or f"twotower-bench-{os.getpid()}-{next(_CREATED)}"
        for root in CGROUP_ROOTS:
            path = root / name
            try:
                path.mkdir(exist_ok=True)
                limit_file = "memory.limit_in_bytes" if (path / "memory.limit_in_bytes").exists() else "memory.max"
                (path / limit_file).write_text(str(limit_bytes))
                return cls(path, limit_bytes)
            except OSError as err:
                if path.is_dir():
                    path.rmdir()
                log.debug("no memory cgroup under %s: %s", root, err)
        log.warning("this host does not let the benchmark create a memory cgroup: no memory limit applied")
        return None

    def launcher(self) -> list[str]:
        """A command prefix: the shell joins the cgroup, then becomes the command (same pid, children inherit)."""
        return ["/bin/sh", "-c", 'echo $$ > "$0" && exec "$@"', str(self.path / "cgroup.procs")]

    def usage(self) -> dict[str, Any]:
        """Peak charge (MiB), the times the limit was hit, OOM kills and major faults (pages read back from disk)."""
        stat = _key_values(self.path / "memory.stat")
        if self.v1:
            peak = int((self.path / "memory.max_usage_in_bytes").read_text())
            at_limit = int((self.path / "memory.failcnt").read_text())
            oom_kills = _key_values(self.path / "memory.oom_control").get("oom_kill", 0)
            major_faults = stat.get("total_pgmajfault", stat.get("pgmajfault", 0))
        else:
            peak_file = self.path / "memory.peak"
            peak = int(peak_file.read_text()) if peak_file.exists() else int((self.path / "memory.current").read_text())
            events = _key_values(self.path / "memory.events")
            at_limit, oom_kills = events.get("max", 0), events.get("oom_kill", 0)
            major_faults = stat.get("pgmajfault", 0)
        return {
            "limit_mib": self.limit_bytes / 2**20,
            "peak_mib": peak / 2**20,
            "times_at_limit": at_limit,
            "oom_kills": oom_kills,
            "major_faults": major_faults,
        }

    def remove(self) -> None:
        try:
            self.path.rmdir()  # the kernel refuses while a process is still inside
        except OSError as err:
            log.warning("could not remove %s: %s", self.path, err)


def evict_from_page_cache(directory: Path) -> None:
    """Write back and drop the cached pages of every file under `directory`, through linked directories too
    (an index root's versions may be links; they stay on disk)."""
    for folder, _, names in os.walk(directory, followlinks=True):
        for path in (Path(folder) / name for name in names):
            if path.is_file():
                drop_from_page_cache(path)


def _key_values(path: Path) -> dict[str, int]:
    return {key: int(value) for key, value in (line.split() for line in path.read_text().splitlines() if line.strip())}
