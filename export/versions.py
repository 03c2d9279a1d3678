"""An index root's versions: list them, publish one (roll back or forward), remove old ones.

    python -m export.versions --index-dir artifacts/index                    # list, newest last
    python -m export.versions --index-dir artifacts/index --publish v0003    # roll back to v0003
    python -m export.versions --index-dir artifacts/index --prune 5          # keep CURRENT and the 5 newest

Every export and catalogue update adds a version and none is ever removed by them (at 10M articles an
addition writes ~1 GB: docs/scale.md), so a volume fills unless old ones go; `python -m export.update
--keep-versions N` prunes after it publishes. A published version is verified first (every file against its
manifest's checksum): a retriever would refuse a damaged one anyway, this says so before CURRENT moves. Both
hold the root's writer lock, so they wait for an export or update in progress.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from twotower import artifacts


def version_rows(root: Path) -> list[str]:
    """One line per complete version, oldest first: its parent, rows, hidden rows, and the bytes only it holds
    (freed when it is removed) against those it shares with other versions (hard links)."""
    current = artifacts.current_version(root)
    lines = []
    for name in artifacts.list_versions(root):
        manifest = artifacts.read_manifest(root / name)
        own = shared = 0
        for path in (root / name).rglob("*"):
            if path.is_file():
                stat = path.stat()
                own, shared = (own + stat.st_size, shared) if stat.st_nlink == 1 else (own, shared + stat.st_size)
        hidden = len(artifacts.read_excluded(root / name))
        lines.append(
            f"{name}{' (CURRENT)' if name == current else ''}: parent {manifest.parent_version or '- (full export)'}, "
            f"model version {manifest.model_version}, {manifest.item_count:,} rows, {hidden:,} hidden, "
            f"{own / 2**20:,.1f} MiB its own, {shared / 2**20:,.1f} MiB shared"
        )
    return lines


def publish(root: Path, name: str) -> None:
    """Point CURRENT at `name` once every file of it checks out."""
    with artifacts.writer_lock(root):
        directory = root / name
        if name not in artifacts.list_versions(root):
            raise artifacts.ArtifactError(f"{directory}: not a complete index version of {root}")
        artifacts.verify_files(directory, artifacts.read_manifest(directory))
        artifacts.publish_version(root, name)


def prune(root: Path, keep: int) -> list[str]:
    with artifacts.writer_lock(root):
        return artifacts.prune_versions(root, keep)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--index-dir", type=Path, default=Path("artifacts/index"), help="the index root")
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--publish", metavar="VERSION", help="make VERSION the served one (CURRENT)")
    action.add_argument("--prune", type=int, metavar="N", help="remove all but CURRENT and the N newest versions")
    args = parser.parse_args(argv)
    if args.prune is not None and args.prune < 1:
        parser.error("--prune: keep at least 1 version")
    try:
        if args.publish:
            publish(args.index_dir, args.publish)
            print(f"published {args.publish}: retrievers watching {args.index_dir} swap to it")
        elif args.prune is not None:
            removed = prune(args.index_dir, args.prune)
            print(f"removed {len(removed)} version(s): {', '.join(removed) or '-'}")
        else:
            print("\n".join(version_rows(args.index_dir)))
    except (artifacts.ArtifactError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
