"""The soak run end to end, briefly: real Triton + retriever on the tiny model (it had broken unnoticed)."""

from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import TinyPipeline


def test_short_soak_serves_every_window_without_errors(tiny_pipeline: TinyPipeline, tmp_path: Path) -> None:
    from benchmarks import soak

    out = tmp_path / "out"
    code = soak.main(
        [
            "--data-dir",
            str(tiny_pipeline.data_dir),
            "--run-dir",
            str(tiny_pipeline.run_dir),
            "--work-dir",
            str(tmp_path / "work"),
            "--minutes",
            "0.1",
            "--window-s",
            "3",
            "--rate",
            "20",
            "--out",
            str(out),
        ]
    )
    report = json.loads((out / "soak.json").read_text())
    assert code == 0 and report["requests"] == 120 and report["errors"] == 0 and len(report["windows"]) == 2
    assert all(w["cpu_ms_per_request"]["retriever"] > 0 for w in report["windows"])
    assert "Verdict: zero errors held" in (out / "soak.md").read_text()
