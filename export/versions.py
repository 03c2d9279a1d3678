"""An index root's versions: list them, publish one (roll back or forward), remove old ones.

    python -m export.versions --index-dir artifacts/index                    # list, oldest first
    python -m export.versions --index-dir artifacts/index --publish v0003    # roll back to v0003
    python -m export.versions --index-dir artifacts/index --prune 5          # keep CURRENT and the 5 newest

Exports and catalogue updates add a version and never remove one (at 10M articles an addition of 1,000 writes
~400 MiB: docs/scale.md), so a volume fills unless old ones go; `python -m export.update --keep-versions N` prunes
after it publishes. A prune also keeps CURRENT's parent and every version CURRENT named in the last hour
(artifacts.prune_versions): replicas may still serve those. A version is verified before it is published (every
file against its manifest's checksum) and refused when running retrievers would refuse it (another dimension,
history length or tokenizer: they need a restart for that; --force publishes it anyway). Both hold the root's
writer lock, so they wait for an export or update in progress (the log says so).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from twotower import artifacts

log = logging.getLogger("export.versions")


def _file_sizes(directory: Path) -> dict[tuple[int, int], int]:
    """(device, inode) -> size of every file under a version: hard links between versions are one file."""
    sizes = {}
    for path in directory.rglob("*"):
        if path.is_file():
            stat = path.stat()
            sizes[(stat.st_dev, stat.st_ino)] = stat.st_size
    return sizes


def _version_files(root: Path) -> dict[str, dict[tuple[int, int], int]]:
    """Each complete version's files (_file_sizes), oldest version first."""
    return {name: _file_sizes(root / name) for name in artifacts.list_versions(root)}


def disk_bytes(files: dict[str, dict[tuple[int, int], int]]) -> int:
    """What the versions' files hold on disk, each file once however many versions link it."""
    return sum({key: size for sizes in files.values() for key, size in sizes.items()}.values())


def version_rows(root: Path) -> list[str]:
    """One line per complete version, oldest first: its parent, rows, hidden rows and the MiB only it holds (what
    removing it alone would free), then the root's total on disk."""
    current = artifacts.current_version(root) if (root / artifacts.CURRENT_FILE).is_file() else ""
    files = _version_files(root)
    names = list(files)
    holders: dict[tuple[int, int], int] = {}
    for sizes in files.values():
        for key in sizes:
            holders[key] = holders.get(key, 0) + 1
    lines = []
    for name in names:
        own = sum(size for key, size in files[name].items() if holders[key] == 1)
        try:
            manifest = artifacts.read_manifest(root / name)
            hidden = len(artifacts.read_excluded(root / name))
        except artifacts.ArtifactError as err:
            lines.append(f"{name}{' (CURRENT)' if name == current else ''}: unreadable ({err})")
            continue
        lines.append(
            f"{name}{' (CURRENT)' if name == current else ''}: parent {manifest.parent_version or '- (full export)'}, "
            f"model version {manifest.model_version}, {manifest.item_count:,} rows, {hidden:,} hidden, "
            f"{own / 2**20:,.1f} MiB its own"
        )
    total = disk_bytes(files) / 2**20
    lines.append(f"{len(names)} version(s), {total:,.1f} MiB on disk (files shared by versions counted once)")
    return lines


def publish(root: Path, name: str, force: bool = False) -> str:
    """Point CURRENT at `name` once every file of it checks out and running retrievers can swap to it; returns
    the version CURRENT named before."""
    with artifacts.writer_lock(artifacts.index_root(root)):
        if name not in artifacts.list_versions(root):
            raise artifacts.ArtifactError(f"{root / name}: not a complete index version of {root}")
        manifest = artifacts.read_manifest(root / name)
        artifacts.verify_files(root / name, manifest)
        previous = artifacts.current_version(root)
        if previous == name:
            return previous
        served = artifacts.read_manifest(root / previous)
        problem = artifacts.swap_problem(served, manifest)
        if problem and not force:
            raise artifacts.ArtifactError(
                f"{name}: {problem}: running retrievers would refuse it (restart them on it, or --force)"
            )
        if manifest.model_version != served.model_version:
            log.warning(
                "%s needs model version %d of the towers (CURRENT %s has %d): retrievers swap to it once Triton "
                "serves it (the model repository keeps the newest few)",
                name,
                manifest.model_version,
                previous,
                served.model_version,
            )
        artifacts.publish_version(root, name)
        return previous


def prune(root: Path, keep: int) -> list[str]:
    """artifacts.prune_versions under the root's writer lock."""
    with artifacts.writer_lock(artifacts.index_root(root)):
        return artifacts.prune_versions(root, keep)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--index-dir", type=Path, default=Path("artifacts/index"), help="the index root")
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--publish", metavar="VERSION", help="make VERSION the served one (CURRENT)")
    action.add_argument(
        "--prune", type=int, metavar="N", help="remove all but CURRENT, its parent, recent ones and the N newest"
    )
    parser.add_argument("--force", action="store_true", help="--publish a version running retrievers would refuse")
    args = parser.parse_args(argv)
    if args.prune is not None and args.prune < 1:
        parser.error("--prune: keep at least 1 version")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    root = args.index_dir
    try:
        if args.publish is not None:
            previous = publish(root, args.publish, args.force)
            if previous == args.publish:
                print(f"{args.publish} is CURRENT already")
            else:
                print(f"published {args.publish} (was {previous}): retrievers watching {root} swap to it")
        elif args.prune is not None:
            before = disk_bytes(_version_files(artifacts.index_root(root)))
            removed = prune(root, args.prune)
            freed = (before - disk_bytes(_version_files(root))) / 2**20
            print(f"removed {len(removed)} version(s): {', '.join(removed) or '-'} ({freed:,.1f} MiB freed)")
        else:
            print("\n".join(version_rows(root)))
    except (artifacts.ArtifactError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
