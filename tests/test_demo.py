"""`make demo`'s driver with the debug overlays: every stage runs and the combined table lists every row."""

from __future__ import annotations

import json
from pathlib import Path

from lightning_ar.demo import REPO, run_demo


def test_demo_pipeline_with_debug_overlays(tmp_path: Path) -> None:
    configs = REPO / "configs"
    paths = run_demo(
        tmp_path / "demo",
        configs / "digits" / "mar.yaml",
        configs / "digits" / "refine.yaml",
        extra=["--config", str(configs / "debug.yaml"), "--trainer.enable_progress_bar=false"],
        refine_extra=["--config", str(configs / "debug_refine.yaml"), "--trainer.enable_progress_bar=false"],
    )
    for name in ("generator checkpoint", "samples (test)", "refinement checkpoint", "results table"):
        assert paths[name].is_file(), name
    rows = json.loads(paths["results json"].read_text())
    assert set(rows) == {"mar (default)", "mar + refine=none", "mar + refine=flow", "mar + refine=amortized"}
    for row in rows.values():
        assert 0.0 <= row["cond_acc"] <= 1.0 and row["fid"] > 0 and row["sec_per_image"] > 0
    # same test batches and seeds: refinement mode `none` reproduces the generator's own row
    assert rows["mar + refine=none"]["fid"] == rows["mar (default)"]["fid"]
    assert rows["mar + refine=flow"]["refine_share"] > 0
