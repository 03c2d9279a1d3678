"""`python -m retriever`: the KServe model server (retriever/server.py has the flags)."""

from __future__ import annotations

import os
import sys

# One BLAS thread, set before numpy loads OpenBLAS: its extra threads busy-wait after every product over
# a few hundred rows (the repeat boost's candidates), which cost ~9 ms of CPU per request at 100 QPS.
# The service gets its parallelism from concurrent requests, not from threads inside one.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from retriever.server import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
