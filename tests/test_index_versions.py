"""An index root's versions: list, publish (roll back), prune (export.versions, artifacts.prune_versions)."""

from __future__ import annotations

from pathlib import Path

import pytest

from export.catalogue_update import update_catalogue
from export.update import main as update_main
from export.versions import main as versions_main
from serving.catalog import Catalog
from tests.conftest import write_random_index
from twotower import artifacts


def root_of_versions(tmp_path: Path, updates: int) -> Path:
    """An index root: a full export (v0001), then `updates` removals of one article each, v0002 ... CURRENT last."""
    root = tmp_path / "index"
    write_random_index(
        root / "v0001", "flat", ["Garment Upper body"] * 30, article_ids=[f"{i:010d}" for i in range(30)]
    )
    artifacts.publish_version(root, "v0001")
    for number in range(updates):
        update_catalogue(root, lambda manifest: None, remove_ids=[f"{number:010d}"])
    return root


def test_prune_keeps_current_and_the_newest_and_what_they_share(tmp_path: Path) -> None:
    root = root_of_versions(tmp_path, 4)  # v0001 .. v0005
    stale = root / ".v0006.partial-killed"  # a writer killed while filling its staging directory
    stale.mkdir()
    (stale / "vectors.npy").write_bytes(b"half")
    artifacts.publish_version(root, "v0002")  # rolled back
    assert artifacts.prune_versions(root, 2) == ["v0001", "v0003"]
    assert artifacts.list_versions(root) == ["v0002", "v0004", "v0005"] and not stale.exists()
    for name in artifacts.list_versions(root):  # the files they linked from v0001 are still there, and check out
        catalog = Catalog(root / name)
        assert len(catalog.article_ids) == 30 and catalog.n_excluded == int(name[1:]) - 1
    with pytest.raises(ValueError, match="keep at least"):
        artifacts.prune_versions(root, 0)


def test_the_versions_command_lists_rolls_back_and_prunes(tmp_path: Path, capsys) -> None:
    root = root_of_versions(tmp_path, 2)
    assert versions_main(["--index-dir", str(root)]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in listed] == ["v0001", "v0002", "v0003 (CURRENT)"]
    assert "parent - (full export)" in listed[0] and "parent v0002" in listed[2] and "2 hidden" in listed[2]

    assert versions_main(["--index-dir", str(root), "--publish", "v0002"]) == 0
    assert artifacts.current_version(root) == "v0002"
    # A damaged version is refused and CURRENT stays; so is a name that is no version of the root.
    (root / "v0001" / artifacts.SCORE_HEAD_FILE).write_text("{}")
    capsys.readouterr()
    assert versions_main(["--index-dir", str(root), "--publish", "v0001"]) == 2
    assert "checksum" in capsys.readouterr().err and artifacts.current_version(root) == "v0002"
    assert versions_main(["--index-dir", str(root), "--publish", "v0009"]) == 2
    assert "not a complete index version" in capsys.readouterr().err

    assert versions_main(["--index-dir", str(root), "--prune", "1"]) == 0
    assert "removed 1 version(s): v0001" in capsys.readouterr().out
    assert artifacts.list_versions(root) == ["v0002", "v0003"]
    with pytest.raises(SystemExit):
        versions_main(["--index-dir", str(root), "--prune", "0"])


def test_an_update_prunes_old_versions_when_asked(tmp_path: Path, capsys) -> None:
    root = root_of_versions(tmp_path, 2)
    (tmp_path / "remove.txt").write_text("29\n")
    removals = str(tmp_path / "remove.txt")
    assert update_main(["--index-dir", str(root), "--remove", removals, "--keep-versions", "2"]) == 0
    assert "pruned v0001, v0002" in capsys.readouterr().out
    assert artifacts.list_versions(root) == ["v0003", "v0004"] and Catalog(root).n_excluded == 3
