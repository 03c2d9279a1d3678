"""Export a trained run for serving.

    python -m export --run runs/demo --data-dir data/synthetic \
        --model-repository model_repository --index-dir artifacts/index

Traces both towers to TorchScript (refusing any whose output differs from eager by more than
--tolerance), embeds the whole catalogue through the exported item tower into a FAISS index
directory with a manifest, and writes both towers as the next Triton model version.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from export.catalogue_index import INDEX_TYPES
from export.pipeline import ExportOptions, export_run
from export.torchscript import ExportMismatchError
from twotower.artifacts import VECTOR_DTYPES, ArtifactError
from twotower.config import add_arguments, from_arguments
from twotower.data.hm import DataFormatError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, type=Path, help="run directory from twotower.train")
    parser.add_argument("--data-dir", required=True, type=Path, help="H&M-format directory whose catalogue is indexed")
    parser.add_argument("--model-repository", default=Path("model_repository"), type=Path)
    parser.add_argument(
        "--index-dir",
        default=Path("artifacts/index"),
        type=Path,
        help="index root: the new version is written beside earlier ones and published via CURRENT",
    )
    add_arguments(parser, ExportOptions)
    args = parser.parse_args(argv)
    if args.index_type not in INDEX_TYPES:
        parser.error(f"--index-type must be one of {INDEX_TYPES}")
    if args.vector_dtype not in VECTOR_DTYPES:
        parser.error(f"--vector-dtype must be one of {VECTOR_DTYPES}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        export_run(args.run, args.data_dir, args.model_repository, args.index_dir, from_arguments(ExportOptions, args))
    except (ArtifactError, DataFormatError, ExportMismatchError, FileNotFoundError, FileExistsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
