"""Unfiltered searches on a GPU copy of the index, when the faiss build has GPUs and one is visible.

The retriever image built with `--build-arg FAISS=faiss-gpu-cu12` (make images) carries faiss-gpu;
the default faiss-cpu build has no GPU functions, so `auto` quietly stays on the CPU there.
Only plain top-k searches move: faiss' GPU indexes take no id selector (filtered searches stay on the
CPU index) and faiss has no GPU HNSW (export an IVF or flat index, the default above 50k articles).
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import faiss
import numpy as np

log = logging.getLogger("serving.gpu_search")

MODES = ("auto", "on", "off")
GPU_MAX_K = 2048  # faiss' GPU k-selection returns at most this many results per query
# Bytes per code faiss' GPU IVF-PQ implements (faiss wiki, "Faiss on the GPU"); export picks one of them
# where the index's dimension allows (export.catalogue_index.pq_subquantizers).
GPU_PQ_SUBQUANTIZERS = (1, 2, 3, 4, 8, 12, 16, 20, 24, 28, 32, 40, 48, 56, 64, 96)


class GpuUnavailable(RuntimeError):
    """`faiss_gpu on` was asked for and this process cannot search on a GPU."""


class GpuIndex:
    """A GPU copy of a CPU index. Searches are serialised: a faiss GPU index is not safe to search
    from several threads at once (filtered searches and --search-in-thread use a thread pool)."""

    def __init__(self, index: Any, resources: Any):
        self.index = index
        self._resources = resources  # the GPU memory and streams the copy lives in: kept alive with it
        self._lock = threading.Lock()

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        with self._lock:
            return self.index.search(queries, k)


def why_not_gpu(index: faiss.Index) -> str | None:
    """Why this index cannot be searched on a GPU here, or None when it can."""
    if not hasattr(faiss, "StandardGpuResources"):
        return "this faiss build has no GPU support (faiss-cpu)"
    if faiss.get_num_gpus() < 1:
        return "no GPU is visible to this process"
    if hasattr(index, "hnsw"):
        return "faiss has no GPU HNSW index (export an IVF or flat index)"
    if hasattr(index, "bbs"):  # FastScan's block size
        return "faiss has no GPU index for 4-bit FastScan codes (export ivf-pq or ivf-sq8 for a GPU)"
    if hasattr(index, "pq") and index.pq.M not in GPU_PQ_SUBQUANTIZERS:
        return f"faiss' GPU IVF-PQ has no {index.pq.M}-byte codes (export ivf-sq8 or ivf for a GPU)"
    return None


def gpu_copy(index: faiss.Index, mode: str, ivf_nprobe: int) -> GpuIndex | None:
    """The index copied to GPU 0 (with the served nprobe) per `mode`: auto = when possible, on = or
    raise GpuUnavailable, off = never. None means: search on the CPU."""
    if mode not in MODES:
        raise ValueError(f"faiss_gpu: {mode!r} is not one of {', '.join(MODES)}")
    if mode == "off":
        return None
    reason = why_not_gpu(index)
    if reason is not None:
        if mode == "on":
            raise GpuUnavailable(f"faiss_gpu on: {reason}")
        log.info("searching on the CPU: %s", reason)
        return None
    resources = faiss.StandardGpuResources()
    copy = faiss.index_cpu_to_gpu(resources, 0, index)
    if hasattr(index, "nprobe"):
        faiss.GpuParameterSpace().set_index_parameter(copy, "nprobe", ivf_nprobe)
    log.info("unfiltered searches on GPU 0 (%s, %d vectors)", type(index).__name__, index.ntotal)
    return GpuIndex(copy, resources)
