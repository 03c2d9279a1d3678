"""An index root's versions: list, publish (roll back), prune (export.versions, artifacts.prune_versions)."""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path

import pytest

from export.catalogue_update import update_catalogue
from export.update import main as update_main
from export.versions import main as versions_main
from serving.catalog import Catalog
from tests.conftest import write_random_index
from twotower import artifacts


@pytest.fixture(autouse=True)
def no_grace(monkeypatch) -> None:
    """Versions published moments ago are as old as any (-1: nothing counts as recent); the grace for replicas
    still serving a version is tested on its own."""
    monkeypatch.setattr(artifacts, "PRUNE_GRACE_S", -1.0)


def root_of_versions(tmp_path: Path, updates: int) -> Path:
    """An index root: a full export (v0001), then `updates` removals of one article each, v0002 ... CURRENT last."""
    root = tmp_path / "index"
    ids = [f"{i:010d}" for i in range(30)]
    write_random_index(root / "v0001", "flat", ["Garment Upper body"] * 30, article_ids=ids)
    artifacts.publish_version(root, "v0001")
    for number in range(updates):
        update_catalogue(root, lambda manifest: None, remove_ids=[f"{number:010d}"])
    return root


def test_prune_keeps_current_its_parent_the_newest_and_what_they_share(tmp_path: Path) -> None:
    root = root_of_versions(tmp_path, 5)  # v0001 .. v0006
    stale = root / ".v0007.partial-killed"  # a writer killed while filling its staging directory
    stale.mkdir()
    (stale / "vectors.npy").write_bytes(b"half")
    artifacts.publish_version(root, "v0003")  # rolled back: replicas serve v0003, and swap from it to its children
    assert artifacts.prune_versions(root, 2) == ["v0001", "v0004"]  # v0002 is v0003's parent
    assert artifacts.list_versions(root) == ["v0002", "v0003", "v0005", "v0006"] and not stale.exists()
    assert not list(root.glob(".v*"))  # removed versions went out of sight, then away
    for name in artifacts.list_versions(root):  # the files they linked from v0001 are still there, and check out
        catalog = Catalog(root / name)
        assert len(catalog.article_ids) == 30 and catalog.n_excluded == int(name[1:]) - 1
    assert {line.split()[1] for line in (root / artifacts.PUBLISHED_LOG).read_text().splitlines()} <= {
        "v0002",
        "v0003",
        "v0005",
        "v0006",
    }
    with pytest.raises(ValueError, match="keep at least"):
        artifacts.prune_versions(root, 0)


def test_prune_keeps_what_current_named_recently(tmp_path: Path) -> None:
    root = root_of_versions(tmp_path, 3)  # v0001 .. v0004, each CURRENT in turn just now
    log = root / artifacts.PUBLISHED_LOG
    hour_ago = time.time() - 3700
    log.write_text("".join(f"{hour_ago:.0f} v000{n}\n" for n in (1, 2)) + f"{time.time():.0f} v0004\n")
    assert artifacts.prune_versions(root, 1, grace_s=3600) == ["v0001", "v0002"]  # v0003: CURRENT's parent
    artifacts.publish_version(root, "v0003")  # a rollback just now: v0004, which replicas may still serve, stays
    assert artifacts.prune_versions(root, 1, grace_s=3600) == [] and artifacts.list_versions(root) == ["v0003", "v0004"]


def test_a_version_that_cannot_be_removed_is_left_for_the_next_prune(tmp_path: Path, monkeypatch, caplog) -> None:
    root = root_of_versions(tmp_path, 3)
    real_rename = os.rename

    def rename(source: Path, target: Path) -> None:
        if Path(source).name == "v0001":
            raise PermissionError("read-only")
        real_rename(source, target)

    monkeypatch.setattr(os, "rename", rename)
    assert artifacts.prune_versions(root, 1) == ["v0002"]
    assert "could not remove version v0001" in caplog.text and artifacts.list_versions(root) == [
        "v0001",
        "v0003",
        "v0004",
    ]


def test_the_versions_command_lists_rolls_back_and_prunes(tmp_path: Path, capsys) -> None:
    root = root_of_versions(tmp_path, 2)
    assert versions_main(["--index-dir", str(root)]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in listed[:3]] == ["v0001", "v0002", "v0003 (CURRENT)"]
    assert "parent - (full export)" in listed[0] and "parent v0002" in listed[2] and "2 hidden" in listed[2]
    assert listed[3].startswith("3 version(s), ") and "MiB on disk" in listed[3]

    assert versions_main(["--index-dir", str(root), "--publish", "v0002"]) == 0
    assert "published v0002 (was v0003)" in capsys.readouterr().out and artifacts.current_version(root) == "v0002"
    assert versions_main(["--index-dir", str(root), "--publish", "v0002"]) == 0
    assert "CURRENT already" in capsys.readouterr().out
    # Refused, CURRENT stays: a damaged version, a name that is no version, one running retrievers would refuse.
    (root / "v0001" / artifacts.SCORE_HEAD_FILE).write_text("{}")
    for name, message in (("v0001", "checksum"), ("v0009", "not a complete index version")):
        assert versions_main(["--index-dir", str(root), "--publish", name]) == 2
        assert message in capsys.readouterr().err and artifacts.current_version(root) == "v0002"
    manifest = artifacts.read_manifest(root / "v0003")
    artifacts.write_manifest(root / "v0003", dataclasses.replace(manifest, max_history=manifest.max_history + 1))
    assert versions_main(["--index-dir", str(root), "--publish", "v0003"]) == 2
    assert "max_history" in capsys.readouterr().err and artifacts.current_version(root) == "v0002"
    assert versions_main(["--index-dir", str(root), "--publish", "v0003", "--force"]) == 0
    # Not an index root: said so, and nothing written there.
    for wrong, message in ((tmp_path / "typo", "not an index root"), (root / "v0002", "pass its index root")):
        assert versions_main(["--index-dir", str(wrong), "--prune", "1"]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "typo").exists() and not (root / "v0002" / artifacts.WRITER_LOCK_FILE).exists()

    assert versions_main(["--index-dir", str(root), "--prune", "1"]) == 0
    assert "removed 1 version(s): v0001 (" in capsys.readouterr().out  # v0002: CURRENT's parent
    assert artifacts.list_versions(root) == ["v0002", "v0003"]
    with pytest.raises(SystemExit):
        versions_main(["--index-dir", str(root), "--prune", "0"])


def test_an_update_prunes_old_versions_when_asked_and_a_failed_prune_is_no_failed_update(
    tmp_path: Path, capsys, monkeypatch
) -> None:
    root = root_of_versions(tmp_path, 2)
    (tmp_path / "remove.txt").write_text("29\n")
    removals = str(tmp_path / "remove.txt")
    assert update_main(["--index-dir", str(root), "--remove", removals, "--keep-versions", "1"]) == 0
    assert "pruned v0001, v0002" in capsys.readouterr().out  # v0003: the new CURRENT's parent
    assert artifacts.list_versions(root) == ["v0003", "v0004"] and Catalog(root).n_excluded == 3

    def refuse(*_: object) -> list[str]:
        raise OSError("the volume went read-only")

    monkeypatch.setattr(artifacts, "prune_versions", refuse)
    (tmp_path / "remove.txt").write_text("28\n")
    assert update_main(["--index-dir", str(root), "--remove", removals, "--keep-versions", "1"]) == 0  # published
    out = capsys.readouterr()
    assert "published v0005" in out.out and "pruning old versions failed" in out.err
