"""Give a replaced index version's memory back to the OS once it is freed.

glibc keeps freed heap memory for reuse instead of returning it: at 10M articles a hot swap under a 4 Gi pod
limit left the retriever's own memory at 1,574 MiB after the old version was freed (1,085 before the swap),
and the page cache the vectors need shrank by that much (206,379 pages read back from disk in the next 30 s,
536 of 3,000 requests refused; docs/scale.md). `malloc_trim(0)` hands the free pages back (a 10M version:
1,252 -> 775 MiB). Elsewhere than glibc this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import threading
import time
import weakref
from pathlib import Path

log = logging.getLogger("retriever.heap")

_libc_name = ctypes.util.find_library("c")
_LIBC = ctypes.CDLL(_libc_name) if _libc_name else None
_MALLOC_TRIM = getattr(_LIBC, "malloc_trim", None)  # glibc only


def process_memory(pid: int | str = "self") -> dict[str, float]:
    """Resident memory of a process (this one by default) in MiB: all, anonymous (its own: what the heap
    holds) and file-backed pages."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "RssAnon", "RssFile"):
            fields[name] = int(value.split()[0]) / 1024  # kB -> MiB
    return {"rss_mib": fields["VmRSS"], "anon_mib": fields["RssAnon"], "file_mib": fields["RssFile"]}


def release_freed_heap() -> bool:
    """Return the heap's free pages to the OS; False where the C library has no malloc_trim."""
    if _MALLOC_TRIM is None:
        return False
    _MALLOC_TRIM(0)
    return True


def release_when_freed(obj: object, name: str, timeout_s: float) -> threading.Thread:
    """In a thread: wait until `obj` (a replaced version, still read by requests that started on it) is freed,
    then release the heap's free pages. Logs what came back, or that `obj` outlived `timeout_s`."""
    freed = threading.Event()
    # The finalizer runs in whichever thread drops the last reference (a request's): it only sets the event,
    # and the trim (100-175 ms at 10M) runs here, never on the event loop.
    weakref.finalize(obj, freed.set)

    def wait() -> None:
        if not freed.wait(timeout_s):
            log.warning("%s still referenced %g s after it was replaced: its memory stays", name, timeout_s)
            return
        before = process_memory()["anon_mib"]
        started = time.perf_counter()
        if release_freed_heap():
            log.info(
                "%s freed: own memory %.0f -> %.0f MiB (returned to the OS in %.0f ms)",
                name,
                before,
                process_memory()["anon_mib"],
                1000 * (time.perf_counter() - started),
            )

    thread = threading.Thread(target=wait, name="release-replaced-version", daemon=True)
    thread.start()
    return thread
